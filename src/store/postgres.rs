//! [`PostgresStore`]: durable records in PostgreSQL, shared by every
//! instance of the application, through the sqlx [`PgPool`] the application
//! already has.
//!
//! ```no_run
//! use axum::{Router, routing::post};
//! use tower_idempotency::IdempotencyLayer;
//! use tower_idempotency::store::postgres::{PgPool, PostgresStore};
//!
//! async fn create_payment() -> &'static str {
//!     "charged once"
//! }
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = PgPool::connect("postgres://app@db.internal/app").await?;
//! let store = PostgresStore::new(pool);
//! store.migrate().await?; // creates the table and its index if missing
//! let _sweeper = store.spawn_sweeper(std::time::Duration::from_secs(60), 1000);
//!
//! let app: Router = Router::new()
//!     .route("/payments", post(create_payment))
//!     .layer(IdempotencyLayer::new(store));
//! # let _ = app;
//! # Ok(())
//! # }
//! ```
//!
//! # Schema
//!
//! One row per store key, in `public.idempotency_records` unless
//! [`with_schema`](PostgresStore::with_schema) or
//! [`with_table`](PostgresStore::with_table) say otherwise:
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS "public"."idempotency_records" (
//!     key         bytea       PRIMARY KEY,         -- SHA-256 of scope and key
//!     fingerprint bytea       NOT NULL,            -- of the request holding the key
//!     state       smallint    NOT NULL,            -- 0 in flight, 1 completed
//!     lock_token  bytea,                           -- the holder's token while in flight
//!     record      bytea,                           -- the encoded record once completed
//!     created_at  timestamptz NOT NULL DEFAULT now(),
//!     expires_at  timestamptz NOT NULL             -- lease end in flight, ttl end completed
//! );
//! CREATE INDEX IF NOT EXISTS "idempotency_records_expires_at_idx"
//!     ON "public"."idempotency_records" (expires_at);
//! ```
//!
//! The record column holds [`Record::encode`] bytes, the crate's versioned
//! encoding. [`migrate`](PostgresStore::migrate) creates all of it, or the
//! statements above can go into the application's own migrations.
//!
//! # One statement per step
//!
//! Every [`Store`] call is one SQL statement in its own implicit
//! transaction, and every time comparison uses the database's `now()`,
//! never the application's clock:
//!
//! - `begin` reads the live row and, only when there is none, runs an
//!   `INSERT … ON CONFLICT DO UPDATE … WHERE expires_at <= now()` that takes
//!   a missing or expired key, all in one statement. A replay or a conflict
//!   therefore writes nothing: its transaction is read-only and commits
//!   without a WAL flush. Under a race the row may have been committed after
//!   the statement's snapshot was taken; the statement is then run again
//!   (rare, and bounded).
//! - `complete`, `release` and `extend` are one `UPDATE` or `DELETE` each,
//!   fenced by the lock token and a live lease.
//!
//! Each statement is one round trip once the connection has prepared it.
//! sqlx itself pings a connection when it goes back to the pool (off the
//! request's path) and, unless the pool is built with
//! `test_before_acquire(false)`, when it hands one out: build the pool with
//! `test_before_acquire(false)` to save that round trip on every call (a
//! broken connection still fails the call, which the layer answers with
//! 503, and sqlx drops it).
//!
//! Expired rows are never returned; they are taken over by the next `begin`
//! and removed by [`delete_expired`](PostgresStore::delete_expired), which
//! [`spawn_sweeper`](PostgresStore::spawn_sweeper) calls periodically.
//!
//! # Timeouts and errors
//!
//! Every call, acquiring a pooled connection included, is bounded by
//! [`with_timeout`](PostgresStore::with_timeout) (1 second by default),
//! whatever the pool's own `acquire_timeout`: past it the call fails with
//! [`StoreError::Timeout`]. A connection failure is
//! [`StoreError::Unavailable`], a record that does not decode
//! [`StoreError::Corrupt`], anything else [`StoreError::Backend`]. A call
//! cut short by the bound may still have been applied by the server: a
//! `begin` that took the lock then releases it as soon as its answer
//! arrives.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use tokio::time::Instant;

pub use sqlx::PgPool;

use super::DEFAULT_TIMEOUT;
use super::sql::{self, BEGIN_ATTEMPTS, MAINTENANCE_TIMEOUT};
use super::{Begin, LockToken, Store, StoreError, StoreKey, Unsettled};
use crate::fingerprint::Fingerprint;
use crate::record::Record;

const DEFAULT_SCHEMA: &str = "public";
const DEFAULT_TABLE: &str = "idempotency_records";
/// PostgreSQL's identifier limit (NAMEDATALEN - 1).
const MAX_IDENTIFIER: usize = 63;
/// Serializes concurrent `migrate` calls (ASCII "tower_id").
const MIGRATE_LOCK: i64 = 0x746f_7765_725f_6964;

/// Where this type lived before the MySQL and SQLite stores shared it.
pub use super::sql::InvalidIdentifier;

fn identifier(name: &str) -> Result<String, StoreError> {
    sql::identifier(name, MAX_IDENTIFIER)
}

/// The statements of one store, built once for its schema and table.
struct Sql {
    schema: String,
    table: String,
    /// `"schema"."table"`
    qualified: String,
    /// `"schema"."index"`, as `to_regclass` takes it.
    qualified_index: String,
    create_schema: String,
    create_table: String,
    create_index: String,
    begin: String,
    complete: String,
    release: String,
    extend: String,
    delete_expired: String,
}

impl Sql {
    fn new(schema: String, table: String) -> Self {
        let t = format!("\"{schema}\".\"{table}\"");
        let index = index_name(&table);
        // The live row is read first, and the INSERT runs only when there
        // is none: a replay or a conflict modifies nothing, so it is a
        // read-only transaction that commits without waiting for the WAL to
        // be flushed. (An `ON CONFLICT DO UPDATE` that finds a live row locks
        // it even when its WHERE is false, which makes every replay a write.)
        let begin = format!(
            "WITH live AS ( \
                SELECT fingerprint, state, record FROM {t} \
                WHERE key = $1 AND expires_at > now() \
            ), ins AS ( \
                INSERT INTO {t} AS cur \
                    (key, fingerprint, state, lock_token, record, created_at, expires_at) \
                SELECT $1, $2, 0, $3, NULL, now(), now() + make_interval(secs => $4) \
                WHERE NOT EXISTS (SELECT 1 FROM live) \
                ON CONFLICT (key) DO UPDATE SET \
                    fingerprint = EXCLUDED.fingerprint, state = 0, \
                    lock_token = EXCLUDED.lock_token, record = NULL, \
                    created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at \
                WHERE cur.expires_at <= now() \
                RETURNING 1 \
            ) \
            SELECT true AS acquired, NULL::bytea AS fingerprint, \
                   NULL::smallint AS state, NULL::bytea AS record \
            FROM ins \
            UNION ALL \
            SELECT false, fingerprint, state, record FROM live"
        );
        let complete = format!(
            "UPDATE {t} SET state = 1, record = $3, lock_token = NULL, \
                expires_at = now() + make_interval(secs => $4) \
             WHERE key = $1 AND state = 0 AND lock_token = $2 AND expires_at > now()"
        );
        let release = format!(
            "DELETE FROM {t} \
             WHERE key = $1 AND state = 0 AND lock_token = $2 AND expires_at > now()"
        );
        let extend = format!(
            "UPDATE {t} SET expires_at = now() + make_interval(secs => $3) \
             WHERE key = $1 AND state = 0 AND lock_token = $2 AND expires_at > now()"
        );
        let delete_expired = format!(
            "DELETE FROM {t} \
             WHERE key IN ( \
                 SELECT key FROM {t} WHERE expires_at <= now() \
                 LIMIT $1 FOR UPDATE SKIP LOCKED \
             ) AND expires_at <= now()"
        );
        let create_schema = format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"");
        let create_table = format!(
            "CREATE TABLE IF NOT EXISTS {t} ( \
                key bytea PRIMARY KEY, \
                fingerprint bytea NOT NULL, \
                state smallint NOT NULL CHECK (state IN (0, 1)), \
                lock_token bytea, \
                record bytea, \
                created_at timestamptz NOT NULL DEFAULT now(), \
                expires_at timestamptz NOT NULL \
            )"
        );
        let create_index = format!("CREATE INDEX IF NOT EXISTS \"{index}\" ON {t} (expires_at)");
        Self {
            qualified_index: format!("\"{schema}\".\"{index}\""),
            qualified: t,
            schema,
            table,
            create_schema,
            create_table,
            create_index,
            begin,
            complete,
            release,
            extend,
            delete_expired,
        }
    }
}

/// `<table>_expires_at_idx`, or, when that would pass PostgreSQL's 63-byte
/// limit, a prefix of the table name and a hash of all of it, so two long
/// table names never share an index name.
fn index_name(table: &str) -> String {
    const SUFFIX: &str = "_expires_at_idx";
    if table.len() + SUFFIX.len() <= 63 {
        return format!("{table}{SUFFIX}");
    }
    use sha2::{Digest, Sha256};
    let hash = Sha256::digest(table.as_bytes());
    let hex = crate::util::hex(&hash[..4]);
    // Identifiers are ASCII: any byte index is a char boundary.
    let keep = 63 - SUFFIX.len() - hex.len() - 1;
    format!("{}_{hex}{SUFFIX}", &table[..keep])
}

/// A [`Store`] in a PostgreSQL table, through a sqlx [`PgPool`].
///
/// Records survive restarts and are shared by every process using the same
/// table. Cloning is cheap and shares the pool. See the
/// [module docs](self) for the schema and an example.
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    timeout: Duration,
    sql: Arc<Sql>,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.sql.qualified)
            .field("timeout", &self.timeout)
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
        }
    }

    /// Uses the schema `name` (default `public`).
    ///
    /// Fails with [`StoreError::Backend`] holding an [`InvalidIdentifier`]
    /// unless `name` matches `[A-Za-z_][A-Za-z0-9_]{0,62}`. The name is
    /// quoted, so its case is kept.
    pub fn with_schema(self, name: &str) -> Result<Self, StoreError> {
        let schema = identifier(name)?;
        let table = self.sql.table.clone();
        Ok(self.with_sql(schema, table))
    }

    /// Uses the table `name` (default `idempotency_records`).
    ///
    /// Fails with [`StoreError::Backend`] holding an [`InvalidIdentifier`]
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
        sql::spawn_sweeper(
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
        sql::bounded_until(deadline, limit, unavailable, op).await
    }

    /// One `begin` statement: `Some` with the outcome, `None` when the row
    /// was committed concurrently and is not in the statement's snapshot.
    /// The statement runs on a task of its own, which releases a lock that
    /// nobody received ([`sql::answered_begin`]).
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
            let row = sqlx::query(&store.sql.begin)
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
        sql::answered_begin(self, k, t, deadline, self.timeout, statement, |answer| {
            matches!(answer, Some(Begin::Acquired(_)))
        })
        .await
    }
}

/// A live row (its `state`, `fingerprint` and `record` columns) as the
/// outcome of a `begin` that did not take the key: in flight, or completed.
pub(super) fn live_row(row: &sqlx::postgres::PgRow) -> Result<Begin, StoreError> {
    let state: Option<i16> = row.try_get("state").map_err(classify)?;
    sql::live_row(
        state.map(i64::from),
        row.try_get("fingerprint").map_err(classify)?,
        row.try_get("record").map_err(classify)?,
    )
}

pub(super) fn interval_secs(d: Duration) -> f64 {
    sql::capped(d).as_secs_f64()
}

/// Connection-level failures are `Unavailable`; everything else `Backend`.
fn classify(err: sqlx::Error) -> StoreError {
    sql::classify(err, unavailable)
}

/// SQLSTATEs that mean the server cannot serve now, rather than that the
/// statement is wrong: connection exceptions (08), insufficient resources
/// (53), shutdown and start-up (57P01-57P03), and a read-only server
/// (25006, as after a failover).
fn unavailable(err: &(dyn sqlx::error::DatabaseError + 'static)) -> bool {
    err.code().is_some_and(|code| {
        code.starts_with("08")
            || code.starts_with("53")
            || matches!(&*code, "57P01" | "57P02" | "57P03" | "25006")
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_validated_at_postgres_length() {
        assert!(identifier(&"x".repeat(63)).is_ok());
        assert!(identifier(&"x".repeat(64)).is_err());
    }

    #[test]
    fn index_names_fit_and_differ() {
        assert_eq!(
            index_name("idempotency_records"),
            "idempotency_records_expires_at_idx"
        );
        let a = index_name(&format!("{}a", "x".repeat(62)));
        let b = index_name(&format!("{}b", "x".repeat(62)));
        assert!(a.len() <= 63 && b.len() <= 63);
        assert_ne!(a, b);
    }

    #[test]
    fn intervals_are_in_seconds() {
        assert_eq!(interval_secs(Duration::from_millis(1500)), 1.5);
        assert!(interval_secs(Duration::MAX) < 1e11);
    }
}
