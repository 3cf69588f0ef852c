//! [`PostgresStore`]: one statement per step, in its own implicit
//! transaction.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use tokio::time::Instant;

use super::PgPool;
use super::sql::{
    DEFAULT_SCHEMA, DEFAULT_TABLE, Sql, classify, identifier, interval_secs, live_row, unavailable,
};
use crate::fingerprint::Fingerprint;
use crate::record::Record;
use crate::store::sql::{self as shared, BEGIN_ATTEMPTS};
use crate::store::{Begin, DEFAULT_TIMEOUT, LockToken, Store, StoreError, StoreKey, Unsettled};

/// A [`Store`] in a PostgreSQL table, through a sqlx [`PgPool`].
///
/// Records survive restarts and are shared by every process using the same
/// table. Cloning is cheap and shares the pool. See the
/// [module docs](super) for the schema and an example.
#[derive(Clone)]
pub struct PostgresStore {
    pub(super) pool: PgPool,
    pub(super) timeout: Duration,
    pub(super) sql: Arc<Sql>,
    pub(super) async_lock_commit: bool,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.sql.qualified)
            .field("timeout", &self.timeout)
            .field("async_lock_commit", &self.async_lock_commit)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// A store on `pool`, in the table `public.idempotency_records`, with a
    /// 1 second bound on every call.
    ///
    /// Nothing is created yet: call [`migrate`](Self::migrate) once, or
    /// create the table in the application's own migrations.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            timeout: DEFAULT_TIMEOUT,
            sql: Arc::new(Sql::new(
                DEFAULT_SCHEMA.to_owned(),
                DEFAULT_TABLE.to_owned(),
            )),
            async_lock_commit: false,
        }
    }

    /// Uses the schema `name` (default `public`).
    ///
    /// Fails with [`StoreError::Backend`] holding an [`InvalidIdentifier`](crate::store::InvalidIdentifier)
    /// unless `name` matches `[A-Za-z_][A-Za-z0-9_]{0,62}`. The name is
    /// quoted, so its case is kept.
    pub fn with_schema(self, name: &str) -> Result<Self, StoreError> {
        let schema = identifier(name)?;
        let table = self.sql.table.clone();
        Ok(self.with_sql(schema, table))
    }

    /// Uses the table `name` (default `idempotency_records`).
    ///
    /// Fails with [`StoreError::Backend`] holding an [`InvalidIdentifier`](crate::store::InvalidIdentifier)
    /// unless `name` matches `[A-Za-z_][A-Za-z0-9_]{0,62}`. The name is
    /// quoted, so its case is kept.
    pub fn with_table(self, name: &str) -> Result<Self, StoreError> {
        let table = identifier(name)?;
        let schema = self.sql.schema.clone();
        Ok(self.with_sql(schema, table))
    }

    /// Bounds every call, acquiring a connection from the pool included
    /// (default 1 second). Past the bound a call fails with
    /// [`StoreError::Timeout`].
    ///
    /// Keep it below the layer's
    /// [`with_store_timeout`](crate::IdempotencyLayer::with_store_timeout)
    /// so the store reports its own error first.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Commits a lock that `begin` takes without waiting for the WAL flush
    /// (PostgreSQL's [asynchronous commit] for that one statement), so a
    /// first execution waits for one flush, its record's, instead of two.
    /// Off by default.
    ///
    /// It weakens the guarantee in one case only: a crash of the database
    /// server within about three times its `wal_writer_delay` (200 ms by
    /// default) of a lock's commit loses that lock. A retry after the
    /// restart then finds the key free and runs the handler again, while
    /// the first execution's record is refused by the fence. Replays,
    /// conflicts and records are unchanged, and a record's commit flushes
    /// its lock with it. The [module docs](super#asynchronous-lock-commit)
    /// go through each moment of a crash.
    ///
    /// [asynchronous commit]: https://www.postgresql.org/docs/current/wal-async-commit.html
    ///
    /// ```no_run
    /// # async fn f(pool: tower_idempotency::store::postgres::PgPool) {
    /// use tower_idempotency::store::postgres::PostgresStore;
    ///
    /// let store = PostgresStore::new(pool).with_async_lock_commit(true);
    /// assert!(store.async_lock_commit());
    /// # }
    /// ```
    #[must_use]
    pub fn with_async_lock_commit(mut self, on: bool) -> Self {
        self.async_lock_commit = on;
        self
    }

    /// Whether `begin` commits its lock without waiting for the WAL flush,
    /// as [`with_async_lock_commit`](Self::with_async_lock_commit) set it.
    pub fn async_lock_commit(&self) -> bool {
        self.async_lock_commit
    }

    /// The pool the store runs on.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The quoted, schema-qualified table name, as in `"public"."idempotency_records"`.
    pub fn qualified_table(&self) -> &str {
        &self.sql.qualified
    }

    fn with_sql(mut self, schema: String, table: String) -> Self {
        self.sql = Arc::new(Sql::new(schema, table));
        self
    }

    /// The bound on every call, as [`with_timeout`](Self::with_timeout)
    /// set it (1 second by default).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs `op` within `limit`, mapping its errors.
    pub(super) async fn bounded<T>(
        &self,
        limit: Duration,
        op: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreError> {
        self.bounded_until(Instant::now() + limit, limit, op).await
    }

    /// Runs `op` until `deadline`, mapping its errors; a timeout reports
    /// `limit`.
    pub(super) async fn bounded_until<T>(
        &self,
        deadline: Instant,
        limit: Duration,
        op: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreError> {
        shared::bounded_until(deadline, limit, unavailable, op).await
    }

    /// One `begin` statement: `Some` with the outcome, `None` when the row
    /// was committed concurrently and is not in the statement's snapshot.
    /// The statement runs on a task of its own, which releases a lock that
    /// nobody received ([`shared::answered_begin`]).
    async fn try_begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        token: &LockToken,
        lease: f64,
        deadline: Instant,
    ) -> Result<Option<Begin>, StoreError> {
        let store = self.clone();
        let (k, fp, t) = (*key, *fingerprint, *token);
        let statement = async move {
            let statement = if store.async_lock_commit {
                &store.sql.begin_async
            } else {
                &store.sql.begin
            };
            let row = sqlx::query(statement)
                .bind(&k.as_bytes()[..])
                .bind(&fp.as_bytes()[..])
                .bind(&t.to_bytes()[..])
                .bind(lease)
                .fetch_optional(&store.pool)
                .await
                .map_err(classify)?;
            let Some(row) = row else {
                return Ok(None);
            };
            let acquired: bool = row.try_get("acquired").map_err(classify)?;
            if acquired {
                return Ok(Some(Begin::Acquired(t)));
            }
            live_row(&row).map(Some)
        };
        shared::answered_begin(self, k, t, deadline, self.timeout, statement, |answer| {
            matches!(answer, Some(Begin::Acquired(_)))
        })
        .await
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let token = LockToken::new();
        let lease = interval_secs(lease);
        // One bound for every attempt together.
        let deadline = Instant::now() + self.timeout;
        // A statement cut off by the timeout or a lost connection may still
        // commit the lock under `token`: release it in the background.
        let unsettled = Unsettled::new(self, key, token);
        for attempt in 1..=BEGIN_ATTEMPTS {
            if let Some(outcome) = self
                .try_begin(key, fingerprint, &token, lease, deadline)
                .await?
            {
                unsettled.settled();
                return Ok(outcome);
            }
            tracing::debug!(
                key = %key,
                attempt,
                "idempotency row committed concurrently; running begin again"
            );
        }
        Err(StoreError::backend(format!(
            "begin saw a concurrently committed row {BEGIN_ATTEMPTS} times in a row"
        )))
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: &LockToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let encoded = record.encode();
        let done = self
            .bounded(self.timeout, async {
                sqlx::query(&self.sql.complete)
                    .bind(&key.as_bytes()[..])
                    .bind(&token.to_bytes()[..])
                    .bind(encoded.as_ref())
                    .bind(interval_secs(ttl))
                    .execute(&self.pool)
                    .await
            })
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn release(&self, key: &StoreKey, token: &LockToken) -> Result<bool, StoreError> {
        let done = self
            .bounded(self.timeout, async {
                sqlx::query(&self.sql.release)
                    .bind(&key.as_bytes()[..])
                    .bind(&token.to_bytes()[..])
                    .execute(&self.pool)
                    .await
            })
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: &LockToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let done = self
            .bounded(self.timeout, async {
                sqlx::query(&self.sql.extend)
                    .bind(&key.as_bytes()[..])
                    .bind(&token.to_bytes()[..])
                    .bind(interval_secs(lease))
                    .execute(&self.pool)
                    .await
            })
            .await?;
        Ok(done.rows_affected() == 1)
    }
}
