//! [`MySqlStore`]: durable records in MySQL 8 or MariaDB (10.5 and later),
//! shared by every instance of the application, through the sqlx
//! [`MySqlPool`] the application already has.
//!
//! ```no_run
//! use axum::{Router, routing::post};
//! use tower_idempotency::IdempotencyLayer;
//! use tower_idempotency::store::mysql::{MySqlPool, MySqlStore};
//!
//! async fn create_payment() -> &'static str {
//!     "charged once"
//! }
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = MySqlPool::connect("mysql://app@db.internal/app").await?;
//! let store = MySqlStore::new(pool);
//! store.migrate().await?; // creates the table if missing
//! let _sweeper = store.spawn_sweeper(std::time::Duration::from_secs(60), 1000);
//!
//! let app: Router = Router::new().route(
//!     "/payments",
//!     post(create_payment).route_layer(IdempotencyLayer::new(store)),
//! );
//! # let _ = app;
//! # Ok(())
//! # }
//! ```
//!
//! # Schema
//!
//! One InnoDB row per store key, in the table `idempotency_records` of the
//! pool's database unless [`with_table`](MySqlStore::with_table) says
//! otherwise:
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS `idempotency_records` (
//!     `key`       BINARY(32)  NOT NULL PRIMARY KEY, -- SHA-256 of scope and key
//!     fingerprint BINARY(32)  NOT NULL,             -- of the request holding the key
//!     state       TINYINT     NOT NULL,             -- 0 in flight, 1 completed
//!     lock_token  BINARY(16)  NULL,                 -- the holder's token while in flight
//!     record      LONGBLOB    NULL,                 -- the encoded record once completed
//!     created_at  DATETIME(6) NOT NULL,
//!     expires_at  DATETIME(6) NOT NULL,             -- lease end in flight, ttl end completed
//!     INDEX `expires_at_idx` (expires_at),
//!     CHECK (state IN (0, 1))
//! ) ENGINE = InnoDB;
//! ```
//!
//! Times are UTC, from the server's `UTC_TIMESTAMP(6)`: the application's
//! clock is never used, and the session's time zone does not matter. The
//! record column holds [`Record::encode`] bytes. A record travels in one
//! packet, so it must fit the server's `max_allowed_packet` (16 MiB by
//! default on MariaDB 10.11, 64 MiB on MySQL 8): the layer records at most
//! [`with_max_response_body`](crate::IdempotencyLayer::with_max_response_body)
//! (4 MiB by default) and leaves a tombstone for anything larger, so keep
//! that limit below the packet size if you raise it.
//!
//! # Statements per step
//!
//! Every [`Store`] call runs in autocommit mode, and every time comparison
//! uses the server's clock:
//!
//! | step | MariaDB | MySQL 8 |
//! |---|---|---|
//! | `begin`, key free or expired (a first execution) | 1 | 1 |
//! | `begin`, key live (a replay, a conflict, a mismatch) | 1 | 2 |
//! | `complete`, `release`, `extend` | 1 | 1 |
//!
//! - `begin` is one `INSERT … ON DUPLICATE KEY UPDATE` that takes a missing
//!   key, or takes over one whose expiry has passed, and leaves a live row
//!   untouched. MariaDB returns the row the statement leaves (`RETURNING`),
//!   so the caller learns in the same statement whether it holds the lock
//!   or what the live row holds. MySQL has no `RETURNING`: the statement
//!   tells through `LAST_INSERT_ID(expr)` whether it found a live row, and
//!   only then a `SELECT` reads that row (if the row went away meanwhile,
//!   `begin` runs again, a bounded number of times).
//! - `complete`, `release` and `extend` are one `UPDATE` or `DELETE` each,
//!   fenced by the lock token and a live lease.
//!
//! Which server the pool talks to is read once, from `SELECT VERSION()` on
//! the first `begin` (or [`migrate`](MySqlStore::migrate)), unless
//! [`with_flavor`](MySqlStore::with_flavor) says it up front. sqlx prepares
//! each statement once per connection, so each is one round trip after
//! that.
//!
//! Expired rows are never returned; they are taken over by the next `begin`
//! and removed by [`delete_expired`](MySqlStore::delete_expired), which
//! [`spawn_sweeper`](MySqlStore::spawn_sweeper) calls periodically.
//!
//! # Timeouts and errors
//!
//! Every call, acquiring a pooled connection included, is bounded by
//! [`with_timeout`](MySqlStore::with_timeout) (1 second by default),
//! whatever the pool's own `acquire_timeout`: past it the call fails with
//! [`StoreError::Timeout`]. A connection failure, a server shutting down,
//! too many connections, a lock wait timeout or a read-only server (as
//! after a failover) is [`StoreError::Unavailable`], a record that does not
//! decode [`StoreError::Corrupt`], anything else [`StoreError::Backend`].
//! InnoDB may pick a concurrent `begin` as a deadlock victim; the statement
//! is then rolled back whole, and `begin` runs it again. A call cut short
//! by the bound may still have been applied by the server: a `begin` that
//! took the lock then releases it as soon as its answer arrives.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::mysql::{MySqlDatabaseError, MySqlRow};
use tokio::sync::OnceCell;
use tokio::time::Instant;

pub use sqlx::MySqlPool;

use super::DEFAULT_TIMEOUT;
use super::sql::{self, BEGIN_ATTEMPTS, MAINTENANCE_TIMEOUT};
use super::{Begin, LockToken, Store, StoreError, StoreKey, Unsettled};
use crate::fingerprint::Fingerprint;
use crate::record::Record;

const DEFAULT_TABLE: &str = "idempotency_records";
/// MySQL's identifier limit.
const MAX_IDENTIFIER: usize = 64;
/// `ER_LOCK_DEADLOCK`: the statement was rolled back whole.
const DEADLOCK: u16 = 1213;
/// What the `begin` statement leaves in `LAST_INSERT_ID` on a live row.
const LIVE: u64 = 1;

/// The server behind a [`MySqlStore`], which decides how many statements a
/// `begin` on a live key takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Flavor {
    /// MySQL (8.0 and later): no `RETURNING`, so a `begin` that finds a
    /// live row reads it with a second statement.
    MySql,
    /// MariaDB (10.5 and later): `INSERT … RETURNING`, so every `begin` is
    /// one statement.
    MariaDb,
}

impl Flavor {
    /// The flavor a `SELECT VERSION()` string names.
    fn of_version(version: &str) -> Self {
        if version.to_ascii_lowercase().contains("mariadb") {
            Self::MariaDb
        } else {
            Self::MySql
        }
    }
}

/// The statements of one store, built once for its table.
struct Sql {
    /// `` `table` ``
    quoted: String,
    create_table: String,
    /// The `INSERT … ON DUPLICATE KEY UPDATE` both flavors share.
    insert: String,
    /// `insert`, returning the row it leaves (MariaDB).
    insert_returning: String,
    /// The live row, after `insert` found one (MySQL).
    select_live: String,
    complete: String,
    release: String,
    extend: String,
    delete_expired: String,
}

impl Sql {
    fn new(table: &str) -> Self {
        let t = format!("`{table}`");
        const NOW: &str = "UTC_TIMESTAMP(6)";
        // The assignments run left to right and each sees the ones before
        // it: every condition reads `expires_at`, so it is assigned last.
        // `LAST_INSERT_ID(expr)` reaches the client in the OK packet: 2 when
        // an expired row was taken over, 1 when a live row was left alone,
        // and 0 (nothing set) when the row was inserted.
        let insert = format!(
            "INSERT INTO {t} (`key`, fingerprint, state, lock_token, record, created_at, expires_at) \
             VALUES (?, ?, 0, ?, NULL, {NOW}, {NOW} + INTERVAL ? MICROSECOND) \
             ON DUPLICATE KEY UPDATE \
                state = IF(LAST_INSERT_ID(IF(expires_at <= {NOW}, 2, {LIVE})) = 2, 0, state), \
                fingerprint = IF(expires_at <= {NOW}, ?, fingerprint), \
                lock_token = IF(expires_at <= {NOW}, ?, lock_token), \
                record = IF(expires_at <= {NOW}, NULL, record), \
                created_at = IF(expires_at <= {NOW}, {NOW}, created_at), \
                expires_at = IF(expires_at <= {NOW}, {NOW} + INTERVAL ? MICROSECOND, expires_at)"
        );
        let insert_returning = format!("{insert} RETURNING state, lock_token, fingerprint, record");
        let select_live = format!(
            "SELECT state, lock_token, fingerprint, record FROM {t} \
             WHERE `key` = ? AND expires_at > {NOW}"
        );
        let fence = format!("`key` = ? AND state = 0 AND lock_token = ? AND expires_at > {NOW}");
        let complete = format!(
            "UPDATE {t} SET state = 1, record = ?, lock_token = NULL, \
                expires_at = {NOW} + INTERVAL ? MICROSECOND \
             WHERE {fence}"
        );
        let release = format!("DELETE FROM {t} WHERE {fence}");
        let extend =
            format!("UPDATE {t} SET expires_at = {NOW} + INTERVAL ? MICROSECOND WHERE {fence}");
        let delete_expired =
            format!("DELETE FROM {t} WHERE expires_at <= {NOW} ORDER BY expires_at LIMIT ?");
        let create_table = format!(
            "CREATE TABLE IF NOT EXISTS {t} ( \
                `key` BINARY(32) NOT NULL PRIMARY KEY, \
                fingerprint BINARY(32) NOT NULL, \
                state TINYINT NOT NULL, \
                lock_token BINARY(16) NULL, \
                record LONGBLOB NULL, \
                created_at DATETIME(6) NOT NULL, \
                expires_at DATETIME(6) NOT NULL, \
                INDEX `expires_at_idx` (expires_at), \
                CHECK (state IN (0, 1)) \
            ) ENGINE = InnoDB"
        );
        Self {
            quoted: t,
            create_table,
            insert,
            insert_returning,
            select_live,
            complete,
            release,
            extend,
            delete_expired,
        }
    }
}

/// A [`Store`] in a MySQL or MariaDB table, through a sqlx [`MySqlPool`].
///
/// Records survive restarts and are shared by every process using the same
/// table. Cloning is cheap and shares the pool. See the
/// [module docs](self) for the schema, the statements each step runs, and
/// an example.
#[derive(Clone)]
pub struct MySqlStore {
    pool: MySqlPool,
    timeout: Duration,
    sql: Arc<Sql>,
    flavor: Arc<OnceCell<Flavor>>,
}

impl fmt::Debug for MySqlStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MySqlStore")
            .field("table", &self.sql.quoted)
            .field("flavor", &self.flavor.get())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl MySqlStore {
    /// A store on `pool`, in the table `idempotency_records`, with a 1
    /// second bound on every call.
    ///
    /// Nothing is created yet: call [`migrate`](Self::migrate) once, or
    /// create the table in the application's own migrations.
    pub fn new(pool: MySqlPool) -> Self {
        Self {
            pool,
            timeout: DEFAULT_TIMEOUT,
            sql: Arc::new(Sql::new(DEFAULT_TABLE)),
            flavor: Arc::default(),
        }
    }

    /// Uses the table `name` (default `idempotency_records`), in the pool's
    /// database.
    ///
    /// Fails with [`StoreError::Backend`] holding an
    /// [`InvalidIdentifier`](super::InvalidIdentifier) unless `name`
    /// matches `[A-Za-z_][A-Za-z0-9_]{0,63}`. The name is quoted.
    pub fn with_table(mut self, name: &str) -> Result<Self, StoreError> {
        let table = sql::identifier(name, MAX_IDENTIFIER)?;
        self.sql = Arc::new(Sql::new(&table));
        Ok(self)
    }

    /// Says which server the pool talks to, instead of asking it with
    /// `SELECT VERSION()` on first use.
    ///
    /// [`Flavor::MySql`] works on MariaDB too (a `begin` on a live key then
    /// takes two statements, as on MySQL); [`Flavor::MariaDb`] fails on
    /// MySQL, which has no `RETURNING`.
    #[must_use]
    pub fn with_flavor(mut self, flavor: Flavor) -> Self {
        self.flavor = Arc::new(OnceCell::new_with(Some(flavor)));
        self
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
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// The bound on every call, as [`with_timeout`](Self::with_timeout)
    /// set it (1 second by default).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The quoted table name, as in `` `idempotency_records` ``.
    pub fn quoted_table(&self) -> &str {
        &self.sql.quoted
    }

    /// The server's flavor, asking it once if nobody said.
    pub async fn flavor(&self) -> Result<Flavor, StoreError> {
        let deadline = Instant::now() + self.timeout;
        self.flavor_until(deadline).await
    }

    async fn flavor_until(&self, deadline: Instant) -> Result<Flavor, StoreError> {
        self.flavor
            .get_or_try_init(|| async {
                let version: String = self
                    .bounded_until(deadline, self.timeout, async {
                        sqlx::query_scalar("SELECT VERSION()")
                            .fetch_one(&self.pool)
                            .await
                    })
                    .await?;
                Ok(Flavor::of_version(&version))
            })
            .await
            .copied()
    }

    /// Creates the table and its index if missing.
    ///
    /// Safe to call from every instance at start-up (`CREATE TABLE IF NOT
    /// EXISTS`). Bounded by 30 seconds or
    /// [`with_timeout`](Self::with_timeout), whichever is longer.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let limit = self.timeout.max(MAINTENANCE_TIMEOUT);
        self.bounded_until(Instant::now() + limit, limit, async {
            sqlx::query(&self.sql.create_table)
                .execute(&self.pool)
                .await
                .map(drop)
        })
        .await?;
        self.flavor_until(Instant::now() + limit).await.map(drop)
    }

    /// Deletes at most `batch` expired rows (completed records past their
    /// ttl, and locks abandoned past their lease), oldest first, in one
    /// statement, and returns how many it deleted.
    ///
    /// Bounded by 30 seconds or [`with_timeout`](Self::with_timeout),
    /// whichever is longer.
    pub async fn delete_expired(&self, batch: usize) -> Result<u64, StoreError> {
        if batch == 0 {
            return Ok(0);
        }
        let limit = self.timeout.max(MAINTENANCE_TIMEOUT);
        let done = self
            .bounded_until(Instant::now() + limit, limit, async {
                sqlx::query(&self.sql.delete_expired)
                    .bind(u64::try_from(batch).unwrap_or(u64::MAX))
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
            self.sql.quoted.clone(),
            interval,
            batch,
            |store| store.pool.is_closed(),
            |store, batch| {
                let store = store.clone();
                async move { store.delete_expired(batch).await }
            },
        )
    }

    async fn bounded_until<T>(
        &self,
        deadline: Instant,
        limit: Duration,
        op: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreError> {
        sql::bounded_until(deadline, limit, unavailable, op).await
    }

    async fn bounded<T>(
        &self,
        op: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreError> {
        self.bounded_until(Instant::now() + self.timeout, self.timeout, op)
            .await
    }

    /// One attempt: `Some` with the outcome, `None` when it must run again
    /// (the live row the insert found was gone by the time it was read, or
    /// InnoDB rolled the statement back as a deadlock victim). The
    /// statements run on a task of their own, which releases a lock that
    /// nobody received ([`sql::answered_begin`]).
    async fn try_begin(
        &self,
        flavor: Flavor,
        key: StoreKey,
        fingerprint: Fingerprint,
        token: LockToken,
        lease: i64,
        deadline: Instant,
    ) -> Result<Option<Begin>, StoreError> {
        let store = self.clone();
        let statement = async move {
            let key_bytes = &key.as_bytes()[..];
            let (fp, tok) = (&fingerprint.as_bytes()[..], token.to_bytes());
            let insert = match flavor {
                Flavor::MariaDb => &store.sql.insert_returning,
                Flavor::MySql => &store.sql.insert,
            };
            let insert = sqlx::query(insert)
                .bind(key_bytes)
                .bind(fp)
                .bind(&tok[..])
                .bind(lease)
                .bind(fp)
                .bind(&tok[..])
                .bind(lease);
            let row = match flavor {
                Flavor::MariaDb => insert.fetch_one(&store.pool).await.map(Some),
                Flavor::MySql => match insert.execute(&store.pool).await {
                    Ok(done) if done.last_insert_id() != LIVE => {
                        return Ok(Some(Begin::Acquired(token)));
                    }
                    Ok(_) => {
                        sqlx::query(&store.sql.select_live)
                            .bind(key_bytes)
                            .fetch_optional(&store.pool)
                            .await
                    }
                    Err(err) => Err(err),
                },
            };
            match row {
                Ok(Some(row)) => outcome(&row, &token).map(Some),
                Ok(None) => Ok(None),
                // Rolled back whole: nothing was taken.
                Err(err) if is_deadlock(&err) => Ok(None),
                Err(err) => Err(classify(err)),
            }
        };
        sql::answered_begin(
            self,
            key,
            token,
            deadline,
            self.timeout,
            statement,
            |answer| matches!(answer, Some(Begin::Acquired(_))),
        )
        .await
    }
}

/// The row a `begin` left or found: the caller's own lock, or a live row.
fn outcome(row: &MySqlRow, token: &LockToken) -> Result<Begin, StoreError> {
    // By position: sqlx does not learn the names of MariaDB's `RETURNING`
    // columns from the prepared statement.
    let state: Option<i8> = row.try_get(0).map_err(classify)?;
    let lock_token: Option<Vec<u8>> = row.try_get(1).map_err(classify)?;
    if state == Some(0) && lock_token.as_deref() == Some(&token.to_bytes()[..]) {
        return Ok(Begin::Acquired(*token));
    }
    sql::live_row(
        state.map(i64::from),
        row.try_get(2).map_err(classify)?,
        row.try_get(3).map_err(classify)?,
    )
}

fn classify(err: sqlx::Error) -> StoreError {
    sql::classify(err, unavailable)
}

/// Errors that mean the server cannot serve now, rather than that the
/// statement is wrong: too many connections (1040), shutdown (1053, 1927
/// on MariaDB), a lock wait timeout (1205), a deadlock victim (1213), and
/// a read-only server (1290, 1792, 1836), plus SQLSTATE class 08.
fn unavailable(err: &(dyn sqlx::error::DatabaseError + 'static)) -> bool {
    if let Some(my) = err.try_downcast_ref::<MySqlDatabaseError>() {
        return matches!(
            my.number(),
            1040 | 1053 | 1205 | DEADLOCK | 1290 | 1792 | 1836 | 1927
        ) || my.code().is_some_and(|code| code.starts_with("08"));
    }
    err.code().is_some_and(|code| code.starts_with("08"))
}

fn is_deadlock(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db)
        if db.try_downcast_ref::<MySqlDatabaseError>().is_some_and(|my| my.number() == DEADLOCK))
}

#[async_trait]
impl Store for MySqlStore {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let token = LockToken::new();
        let lease = sql::micros(lease);
        // One bound for every attempt together.
        let deadline = Instant::now() + self.timeout;
        let flavor = self.flavor_until(deadline).await?;
        // A statement cut off by the timeout or a lost connection may still
        // commit the lock under `token`: release it in the background.
        let unsettled = Unsettled::new(self, key, token);
        for attempt in 1..=BEGIN_ATTEMPTS {
            if let Some(outcome) = self
                .try_begin(flavor, *key, *fingerprint, token, lease, deadline)
                .await?
            {
                unsettled.settled();
                return Ok(outcome);
            }
            tracing::debug!(
                key = %key,
                attempt,
                "idempotency row changed under begin, or a deadlock rolled it back; running begin again"
            );
        }
        Err(StoreError::backend(format!(
            "begin found the row changing under it {BEGIN_ATTEMPTS} times in a row"
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
            .bounded(async {
                sqlx::query(&self.sql.complete)
                    .bind(encoded.as_ref())
                    .bind(sql::micros(ttl))
                    .bind(&key.as_bytes()[..])
                    .bind(&token.to_bytes()[..])
                    .execute(&self.pool)
                    .await
            })
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn release(&self, key: &StoreKey, token: &LockToken) -> Result<bool, StoreError> {
        let done = self
            .bounded(async {
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
            .bounded(async {
                sqlx::query(&self.sql.extend)
                    .bind(sql::micros(lease))
                    .bind(&key.as_bytes()[..])
                    .bind(&token.to_bytes()[..])
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
    fn flavors_are_read_from_the_version() {
        assert_eq!(
            Flavor::of_version("10.11.19-MariaDB-0+deb12u1"),
            Flavor::MariaDb
        );
        assert_eq!(Flavor::of_version("8.0.39"), Flavor::MySql);
        assert_eq!(Flavor::of_version("8.4.2-log"), Flavor::MySql);
    }

    #[test]
    fn statements_quote_the_table_and_fence_by_token() {
        let sql = Sql::new("t1");
        assert_eq!(sql.quoted, "`t1`");
        for statement in [&sql.complete, &sql.release, &sql.extend] {
            assert!(statement.contains("lock_token = ?"), "{statement}");
            assert!(statement.contains("expires_at > UTC_TIMESTAMP(6)"));
        }
        assert!(sql.insert_returning.starts_with(&sql.insert));
        // Every condition reads the old expiry: it is assigned last.
        assert!(sql.insert.trim_end().ends_with("expires_at)"));
    }
}
