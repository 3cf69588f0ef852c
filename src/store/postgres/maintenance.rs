//! The upkeep of a PostgreSQL store's table: creating it and sweeping its
//! expired rows.

use std::time::Duration;

use sqlx::Row;

use super::PostgresStore;
use super::sql::MIGRATE_LOCK;
use crate::store::StoreError;
use crate::store::sql::{self as shared, MAINTENANCE_TIMEOUT};

impl PostgresStore {
    /// Creates the schema, the table and its index, each only if missing.
    ///
    /// Safe to call from every instance at start-up: concurrent calls are
    /// serialized through an advisory lock, and once everything exists the
    /// call only reads the catalog (it needs no `CREATE` privilege then).
    /// Bounded by 30 seconds or [`with_timeout`](Self::with_timeout),
    /// whichever is longer.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let sql = &self.sql;
        self.bounded(self.timeout.max(MAINTENANCE_TIMEOUT), async {
            let mut tx = self.pool.begin().await?;
            let row = sqlx::query(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1), \
                        to_regclass($2) IS NOT NULL, to_regclass($3) IS NOT NULL",
            )
            .bind(&sql.schema)
            .bind(&sql.qualified)
            .bind(&sql.qualified_index)
            .fetch_one(&mut *tx)
            .await?;
            let (schema, table, index): (bool, bool, bool) =
                (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            if !(schema && table && index) {
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(MIGRATE_LOCK)
                    .execute(&mut *tx)
                    .await?;
                // Another instance may have finished while this one waited;
                // `IF NOT EXISTS` covers it.
                if !schema {
                    sqlx::query(&sql.create_schema).execute(&mut *tx).await?;
                }
                sqlx::query(&sql.create_table).execute(&mut *tx).await?;
                sqlx::query(&sql.create_index).execute(&mut *tx).await?;
            }
            tx.commit().await
        })
        .await
    }

    /// Deletes at most `batch` expired rows (completed records past their
    /// ttl, and locks abandoned past their lease) in one statement, and
    /// returns how many it deleted.
    ///
    /// Rows another session holds locked are skipped, so concurrent sweeps
    /// from several instances do not block each other or a `begin` taking
    /// an expired key over. Bounded by 30 seconds or
    /// [`with_timeout`](Self::with_timeout), whichever is longer.
    pub async fn delete_expired(&self, batch: usize) -> Result<u64, StoreError> {
        if batch == 0 {
            return Ok(0);
        }
        let limit = i64::try_from(batch).unwrap_or(i64::MAX);
        let done = self
            .bounded(self.timeout.max(MAINTENANCE_TIMEOUT), async {
                sqlx::query(&self.sql.delete_expired)
                    .bind(limit)
                    .execute(&self.pool)
                    .await
            })
            .await?;
        Ok(done.rows_affected())
    }

    /// Spawns a task that sweeps expired rows: every `interval` it calls
    /// [`delete_expired`](Self::delete_expired) with `batch` until a call
    /// deletes fewer than `batch` rows. Errors are logged (through
    /// `tracing`, at `warn`) and the task goes on; it never panics.
    ///
    /// The first sweep starts at once. The task ends when the pool is
    /// closed; abort the returned handle to stop it sooner. Must be called
    /// within a Tokio runtime.
    pub fn spawn_sweeper(&self, interval: Duration, batch: usize) -> tokio::task::JoinHandle<()> {
        shared::spawn_sweeper(
            self.clone(),
            self.sql.qualified.clone(),
            interval,
            batch,
            |store| store.pool.is_closed(),
            |store, batch| {
                let store = store.clone();
                async move { store.delete_expired(batch).await }
            },
        )
    }
}
