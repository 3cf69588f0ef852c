//! [`SqliteStore`]: durable records in one SQLite file, for the processes
//! of one host: no server to run, shared by every process that opens the
//! file, and kept across restarts.
//!
//! ```
//! use std::time::Duration;
//!
//! use axum::{Router, routing::post};
//! use tower_idempotency::IdempotencyLayer;
//! use tower_idempotency::store::sqlite::SqliteStore;
//!
//! async fn create_payment() -> &'static str {
//!     "charged once"
//! }
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = std::env::temp_dir().join(format!("tower-idempotency-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! # let path = dir.join("idempotency.db");
//! // A path, or a URL such as "sqlite:///var/lib/app/idempotency.db".
//! let store = SqliteStore::open(&path).await?;
//! store.migrate().await?; // creates the table and its index if missing
//! let _sweeper = store.spawn_sweeper(Duration::from_secs(60), 1000);
//!
//! let app: Router = Router::new().route(
//!     "/payments",
//!     post(create_payment).route_layer(IdempotencyLayer::new(store)),
//! );
//! # let _ = app;
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```
//!
//! # One host
//!
//! SQLite serializes writers through locks on the file itself, so every
//! process on the host that opens the same file sees the same records and
//! takes the same locks: two instances of a service behind one port, a
//! worker and its web front, an old and a new process during a rolling
//! restart. It is not a store for several hosts: file locks over a network
//! filesystem (NFS, SMB) are unreliable, and SQLite's write-ahead log needs
//! shared memory that only one host has. Use the PostgreSQL, MySQL or
//! Redis store there.
//!
//! # Opening the file
//!
//! [`open`](SqliteStore::open) builds the pool itself, with the settings
//! this store is designed for:
//!
//! - the file is created if missing;
//! - `journal_mode=WAL`: readers never wait for the writer, and a commit
//!   is an append to the log;
//! - `synchronous=NORMAL`: in WAL mode, a commit survives the process
//!   crashing or being killed, but a power loss or an operating system crash
//!   may roll back the last transactions committed before it (the file stays
//!   consistent). A record lost that way lets a retry run its request again.
//!   For `synchronous=FULL` (an `fsync` on every commit), pass
//!   [`connect_options`](SqliteStore::connect_options) changed with
//!   [`SqliteConnectOptions::synchronous`] to
//!   [`open_with`](SqliteStore::open_with);
//! - a busy timeout (how long SQLite waits for another connection's write
//!   lock) of three quarters of the store's timeout, so a file locked for
//!   too long fails the call with [`StoreError::Unavailable`] before the
//!   store's own bound.
//!
//! An application's own [`SqlitePool`] goes to [`new`](SqliteStore::new);
//! build it with the same settings:
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
//! use tower_idempotency::store::sqlite::SqliteStore;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let options = SqliteConnectOptions::new()
//!     .filename("/var/lib/app/app.db")
//!     .create_if_missing(true)
//!     .journal_mode(SqliteJournalMode::Wal)
//!     .synchronous(SqliteSynchronous::Normal)
//!     // Below the store's timeout (1 second by default).
//!     .busy_timeout(Duration::from_millis(750));
//! let pool = SqlitePoolOptions::new().connect_with(options).await?;
//! let store = SqliteStore::new(pool);
//! store.migrate().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Schema
//!
//! One row per store key, in the table `idempotency_records` unless
//! [`with_table`](SqliteStore::with_table) says otherwise. Times are integer
//! microseconds since the Unix epoch, from SQLite's clock:
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS "idempotency_records" (
//!     key         BLOB    NOT NULL PRIMARY KEY,   -- SHA-256 of scope and key
//!     fingerprint BLOB    NOT NULL,               -- of the request holding the key
//!     state       INTEGER NOT NULL CHECK (state IN (0, 1)), -- 0 in flight, 1 completed
//!     lock_token  BLOB,                           -- the holder's token while in flight
//!     record      BLOB,                           -- the encoded record once completed
//!     created_at  INTEGER NOT NULL,
//!     expires_at  INTEGER NOT NULL                -- lease end in flight, ttl end completed
//! );
//! CREATE INDEX IF NOT EXISTS "idempotency_records_expires_at_idx"
//!     ON "idempotency_records" (expires_at);
//! ```
//!
//! The record column holds [`Record::encode`] bytes, the crate's versioned
//! encoding. The table keeps its rowid: a record holds a whole response
//! body, and SQLite advises against `WITHOUT ROWID` for rows that large.
//! [`migrate`](SqliteStore::migrate) creates all of it, or the statements
//! above can go into the application's own migrations.
//!
//! # One statement per step
//!
//! Every [`Store`] call is one SQL statement in its own implicit
//! transaction, and every time comparison uses SQLite's own clock, read
//! once per statement, never the application's:
//!
//! - `begin` is one `INSERT … ON CONFLICT (key) DO UPDATE … RETURNING`. A
//!   missing key is inserted; an expired row is taken over; a live row is
//!   written back unchanged and returned, in flight or completed. The
//!   caller took the key if the returned row carries its fresh lock token.
//!   As SQLite has a single writer, every `begin` takes the file's write
//!   lock for the statement's duration, replays included.
//! - `complete`, `release` and `extend` are one `UPDATE` or `DELETE` each,
//!   fenced by the lock token and a live lease.
//!
//! Expired rows are never returned; they are taken over by the next `begin`
//! and removed by [`delete_expired`](SqliteStore::delete_expired), which
//! [`spawn_sweeper`](SqliteStore::spawn_sweeper) calls periodically.
//!
//! The statements need SQLite 3.35 or later (`RETURNING`); the SQLite
//! compiled into this crate's build is newer.
//!
//! # Timeouts and errors
//!
//! Every call, acquiring a pooled connection included, is bounded by
//! [`with_timeout`](SqliteStore::with_timeout) (1 second by default): past
//! it the call fails with [`StoreError::Timeout`]. A file locked by another
//! connection past the busy timeout, a disk that is full or failing, or a
//! file that cannot be opened is [`StoreError::Unavailable`]; a record that
//! does not decode is [`StoreError::Corrupt`]; anything else (a missing
//! table, a corrupt file) is [`StoreError::Backend`]. A `begin` cut short by
//! the bound may still run to its end in SQLite; a lock it takes there is
//! released in the background under its own token.

use std::fmt;
use std::future::Future;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::sqlite::{SqlitePoolOptions, SqliteRow};
use tokio::time::Instant;

pub use sqlx::SqlitePool;
pub use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};

use super::DEFAULT_TIMEOUT;
use super::sql::{self, MAINTENANCE_TIMEOUT};
use super::{Begin, LockToken, Store, StoreError, StoreKey, Unsettled};
use crate::fingerprint::Fingerprint;
use crate::record::Record;

const DEFAULT_TABLE: &str = "idempotency_records";
/// The identifier limit the SQL stores share for SQLite (which has none of
/// its own).
const MAX_IDENTIFIER: usize = 64;
/// The largest busy timeout SQLite takes (an `int` of milliseconds).
const MAX_BUSY_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);

/// SQLite's clock in integer microseconds since the Unix epoch. `'now'` is
/// read once per statement step, so every use within a statement agrees.
/// `julianday` carries milliseconds, rounded here to whole ones.
const NOW: &str = "(CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000)";

/// The statements of one store, built once for its table.
struct Sql {
    /// `"table"`
    quoted: String,
    create_table: String,
    create_index: String,
    begin: String,
    complete: String,
    release: String,
    extend: String,
    delete_expired: String,
}

impl Sql {
    fn new(table: &str) -> Self {
        let t = format!("\"{table}\"");
        // `?1` key, `?2` fingerprint, `?3` token, `?4` lease in microseconds.
        // The DO UPDATE always fires, so RETURNING always yields the row:
        // each column takes the new value only if the row has expired (every
        // SET expression reads the row as it was before the update). The
        // proposed row's `created_at` is the statement's `now`.
        let expired = format!("{t}.expires_at <= excluded.created_at");
        let take = |column: &str, new: &str| {
            format!("{column} = CASE WHEN {expired} THEN {new} ELSE {t}.{column} END")
        };
        let begin = format!(
            "INSERT INTO {t} \
                (key, fingerprint, state, lock_token, record, created_at, expires_at) \
             VALUES (?1, ?2, 0, ?3, NULL, {NOW}, {NOW} + ?4) \
             ON CONFLICT (key) DO UPDATE SET {}, {}, {}, {}, {}, {} \
             RETURNING state, lock_token, fingerprint, record",
            take("fingerprint", "excluded.fingerprint"),
            take("state", "0"),
            take("lock_token", "excluded.lock_token"),
            take("record", "NULL"),
            take("created_at", "excluded.created_at"),
            take("expires_at", "excluded.expires_at"),
        );
        let fence = format!("key = ?1 AND state = 0 AND lock_token = ?2 AND expires_at > {NOW}");
        let complete = format!(
            "UPDATE {t} SET state = 1, record = ?3, lock_token = NULL, expires_at = {NOW} + ?4 \
             WHERE {fence}"
        );
        let release = format!("DELETE FROM {t} WHERE {fence}");
        let extend = format!("UPDATE {t} SET expires_at = {NOW} + ?3 WHERE {fence}");
        // DELETE … LIMIT is a compile-time option SQLite builds lack by
        // default: the subquery bounds the batch instead.
        let delete_expired = format!(
            "DELETE FROM {t} WHERE key IN ( \
                 SELECT key FROM {t} WHERE expires_at <= {NOW} LIMIT ?1 \
             )"
        );
        let create_table = format!(
            "CREATE TABLE IF NOT EXISTS {t} ( \
                key BLOB NOT NULL PRIMARY KEY, \
                fingerprint BLOB NOT NULL, \
                state INTEGER NOT NULL CHECK (state IN (0, 1)), \
                lock_token BLOB, \
                record BLOB, \
                created_at INTEGER NOT NULL, \
                expires_at INTEGER NOT NULL \
            )"
        );
        let create_index =
            format!("CREATE INDEX IF NOT EXISTS \"{table}_expires_at_idx\" ON {t} (expires_at)");
        Self {
            quoted: t,
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

/// A [`Store`] in a SQLite file, through a sqlx [`SqlitePool`].
///
/// Records survive restarts and are shared by every process on the host
/// that opens the same file; it is not meant for several hosts. Cloning is
/// cheap and shares the pool. See the [module docs](self) for the settings,
/// the schema and an example.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    timeout: Duration,
    sql: Arc<Sql>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("table", &self.sql.quoted)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// A store on the application's own `pool`, in the table
    /// `idempotency_records`, with a 1 second bound on every call.
    ///
    /// Build the pool with WAL and a busy timeout below the store's timeout,
    /// as the [module docs](self#opening-the-file) show. Nothing is created
    /// yet: call [`migrate`](Self::migrate) once, or create the table in the
    /// application's own migrations.
    pub fn new(pool: SqlitePool) -> Self {
        Self {
            pool,
            timeout: DEFAULT_TIMEOUT,
            sql: Arc::new(Sql::new(DEFAULT_TABLE)),
        }
    }

    /// Opens (creating it if missing) the SQLite file at `location`, a path
    /// or a `sqlite:` URL (`sqlite://data/idempotency.db`,
    /// `sqlite:///var/lib/app/idempotency.db`, `sqlite:data.db?mode=rwc`),
    /// with the settings of [`connect_options`](Self::connect_options) and
    /// a 1 second bound on every call.
    ///
    /// An in-memory database is refused: it is neither durable nor shared
    /// with other processes ([`MemoryStore`](crate::MemoryStore) is the
    /// store for that). Fails with [`StoreError::Unavailable`] if the file
    /// cannot be opened. Nothing is created in it yet: call
    /// [`migrate`](Self::migrate).
    pub async fn open(location: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(Self::connect_options(location)?, DEFAULT_TIMEOUT).await
    }

    /// The connect options [`open`](Self::open) uses for `location`: the
    /// file created if missing, `journal_mode=WAL`, `synchronous=NORMAL`
    /// and a busy timeout of 750 ms. Change them and pass them to
    /// [`open_with`](Self::open_with), for instance for `synchronous=FULL`:
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tower_idempotency::store::sqlite::{SqliteStore, SqliteSynchronous};
    ///
    /// # async fn run() -> Result<(), tower_idempotency::store::StoreError> {
    /// let options = SqliteStore::connect_options("/var/lib/app/idempotency.db")?
    ///     .synchronous(SqliteSynchronous::Full);
    /// let store = SqliteStore::open_with(options, Duration::from_secs(1)).await?;
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// Fails with [`StoreError::Backend`] for a URL that does not parse, an
    /// empty location or an in-memory database.
    pub fn connect_options(location: impl AsRef<Path>) -> Result<SqliteConnectOptions, StoreError> {
        Ok(parse_location(location.as_ref())?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(busy_timeout(DEFAULT_TIMEOUT)))
    }

    /// Opens a pool with `options` and a store on it with the bound
    /// `timeout` on every call (see [`with_timeout`](Self::with_timeout)).
    /// The busy timeout of `options` is replaced by three quarters of
    /// `timeout`, so a file locked for too long fails a call with
    /// [`StoreError::Unavailable`] before the bound.
    ///
    /// Opening is bounded by 30 seconds or `timeout`, whichever is longer.
    /// Fails with [`StoreError::Unavailable`] if the file cannot be opened.
    pub async fn open_with(
        options: SqliteConnectOptions,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let options = options.busy_timeout(busy_timeout(timeout));
        let limit = timeout.max(MAINTENANCE_TIMEOUT);
        let pool = sql::bounded_until(
            Instant::now() + limit,
            limit,
            unavailable,
            SqlitePoolOptions::new().connect_with(options),
        )
        .await?;
        Ok(Self::new(pool).with_timeout(timeout))
    }

    /// Uses the table `name` (default `idempotency_records`).
    ///
    /// Fails with [`StoreError::Backend`] holding an [`InvalidIdentifier`](super::InvalidIdentifier)
    /// unless `name` matches `[A-Za-z_][A-Za-z0-9_]{0,63}`. The name is
    /// quoted, so its case is kept.
    pub fn with_table(mut self, name: &str) -> Result<Self, StoreError> {
        let table = sql::identifier(name, MAX_IDENTIFIER)?;
        self.sql = Arc::new(Sql::new(&table));
        Ok(self)
    }

    /// Bounds every call, acquiring a connection from the pool included
    /// (default 1 second). Past the bound a call fails with
    /// [`StoreError::Timeout`].
    ///
    /// The connections' busy timeout is set when they are opened: through
    /// [`open_with`](Self::open_with), which takes the timeout, or by the
    /// application for its own pool. Keep it below this bound, and this
    /// bound below the layer's
    /// [`with_store_timeout`](crate::IdempotencyLayer::with_store_timeout),
    /// so each reports its own error first.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The pool the store runs on.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The bound on every call, as [`with_timeout`](Self::with_timeout)
    /// set it (1 second by default).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The quoted table name, as in `"idempotency_records"`.
    pub fn quoted_table(&self) -> &str {
        &self.sql.quoted
    }

    /// Creates the table and its index, each only if missing.
    ///
    /// Safe to call from every process at start-up: each statement is
    /// `IF NOT EXISTS` and runs in its own transaction, so concurrent calls
    /// wait for one another's write lock and the later ones change nothing.
    /// Bounded by 30 seconds or [`with_timeout`](Self::with_timeout),
    /// whichever is longer.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let sql = &self.sql;
        self.bounded(self.timeout.max(MAINTENANCE_TIMEOUT), async {
            sqlx::query(&sql.create_table).execute(&self.pool).await?;
            sqlx::query(&sql.create_index).execute(&self.pool).await?;
            Ok(())
        })
        .await
    }

    /// Deletes at most `batch` expired rows (completed records past their
    /// ttl, and locks abandoned past their lease) in one statement, and
    /// returns how many it deleted.
    ///
    /// The statement holds the file's write lock while it runs: a small
    /// batch keeps the wait of concurrent `begin`s short. Bounded by 30
    /// seconds or [`with_timeout`](Self::with_timeout), whichever is longer.
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
    /// within a Tokio runtime. One sweeper per file is enough, though
    /// several do no harm.
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

    /// Runs `op` within `limit`, mapping its errors.
    async fn bounded<T>(
        &self,
        limit: Duration,
        op: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreError> {
        sql::bounded_until(Instant::now() + limit, limit, unavailable, op).await
    }

    /// Runs one fenced `UPDATE` or `DELETE`: whether it changed the row.
    async fn fenced(
        &self,
        statement: &str,
        key: &StoreKey,
        token: &LockToken,
        value: Option<&[u8]>,
        micros: Option<i64>,
    ) -> Result<bool, StoreError> {
        let token = token.to_bytes();
        let done = self
            .bounded(self.timeout, async {
                let mut query = sqlx::query(statement)
                    .bind(&key.as_bytes()[..])
                    .bind(&token[..]);
                if let Some(value) = value {
                    query = query.bind(value);
                }
                if let Some(micros) = micros {
                    query = query.bind(micros);
                }
                query.execute(&self.pool).await
            })
            .await?;
        Ok(done.rows_affected() == 1)
    }
}

/// Connect options for a path or a `sqlite:` URL; in-memory databases and
/// empty locations are refused.
fn parse_location(location: &Path) -> Result<SqliteConnectOptions, StoreError> {
    let refuse = |why: &str| {
        Err(StoreError::backend(format!(
            "{why}: SqliteStore needs a database file"
        )))
    };
    match location.to_str() {
        Some(url) if url.starts_with("sqlite:") => {
            let rest = url
                .strip_prefix("sqlite://")
                .or_else(|| url.strip_prefix("sqlite:"))
                .unwrap_or(url);
            let (database, params) = rest.split_once('?').unwrap_or((rest, ""));
            if database.is_empty() {
                return refuse("the URL names no file");
            }
            if database == ":memory:" || params.split('&').any(|p| p == "mode=memory") {
                return refuse("an in-memory database is neither durable nor shared");
            }
            SqliteConnectOptions::from_str(url).map_err(StoreError::backend)
        }
        _ if location.as_os_str().is_empty() => refuse("the path is empty"),
        _ if location == Path::new(":memory:") => {
            refuse("an in-memory database is neither durable nor shared")
        }
        _ => Ok(SqliteConnectOptions::new().filename(location)),
    }
}

/// Three quarters of the store's bound, within what SQLite takes.
fn busy_timeout(timeout: Duration) -> Duration {
    (timeout - timeout / 4).min(MAX_BUSY_TIMEOUT)
}

/// The outcome of a `begin` from the row its statement returned: the
/// caller's own fresh token in flight means it took the key.
fn outcome(row: &SqliteRow, token: &LockToken) -> Result<Begin, StoreError> {
    let state: Option<i64> = row.try_get("state").map_err(classify)?;
    let holder: Option<Vec<u8>> = row.try_get("lock_token").map_err(classify)?;
    if state == Some(0) && holder.as_deref() == Some(&token.to_bytes()[..]) {
        return Ok(Begin::Acquired(*token));
    }
    sql::live_row(
        state,
        row.try_get("fingerprint").map_err(classify)?,
        row.try_get("record").map_err(classify)?,
    )
}

fn classify(err: sqlx::Error) -> StoreError {
    sql::classify(err, unavailable)
}

/// SQLite result codes (the primary code, the low byte of an extended one)
/// that mean the file cannot serve now, rather than that the statement or
/// the file is wrong: `SQLITE_NOMEM` (7), `SQLITE_READONLY` (8, as for a
/// file whose permissions or directory changed), `SQLITE_IOERR` (10),
/// `SQLITE_FULL` (13), `SQLITE_CANTOPEN` (14), `SQLITE_PROTOCOL` (15, a
/// lock race in the write-ahead log), and above all `SQLITE_BUSY` (5, the
/// file locked by another connection past the busy timeout) and
/// `SQLITE_LOCKED` (6). `SQLITE_CORRUPT`, `SQLITE_NOTADB`, `SQLITE_ERROR`
/// (a missing table) and constraint failures are not.
fn unavailable(err: &(dyn sqlx::error::DatabaseError + 'static)) -> bool {
    err.code()
        .and_then(|code| code.parse::<i32>().ok())
        .is_some_and(|code| matches!(code & 0xff, 5 | 6 | 7 | 8 | 10 | 13 | 14 | 15))
}

#[async_trait]
impl Store for SqliteStore {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let token = LockToken::new();
        let deadline = Instant::now() + self.timeout;
        // A statement cut off by the timeout may still commit the lock
        // under `token`: release it in the background.
        let unsettled = Unsettled::new(self, key, token);
        let store = self.clone();
        let (k, fp, lease) = (*key, *fingerprint, sql::micros(lease));
        let statement = async move {
            // `fetch_all`, not `fetch_optional`: the implicit transaction
            // commits as the statement runs to its end, and a failed commit
            // is reported rather than lost.
            let rows = sqlx::query(&store.sql.begin)
                .bind(&k.as_bytes()[..])
                .bind(&fp.as_bytes()[..])
                .bind(&token.to_bytes()[..])
                .bind(lease)
                .fetch_all(&store.pool)
                .await
                .map_err(classify)?;
            match rows.first() {
                Some(row) => outcome(row, &token),
                None => Err(StoreError::backend("begin returned no row")),
            }
        };
        let outcome = sql::answered_begin(
            self,
            k,
            token,
            deadline,
            self.timeout,
            statement,
            |answer| matches!(answer, Begin::Acquired(_)),
        )
        .await?;
        unsettled.settled();
        Ok(outcome)
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: &LockToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let encoded = record.encode();
        self.fenced(
            &self.sql.complete,
            key,
            token,
            Some(encoded.as_ref()),
            Some(sql::micros(ttl)),
        )
        .await
    }

    async fn release(&self, key: &StoreKey, token: &LockToken) -> Result<bool, StoreError> {
        self.fenced(&self.sql.release, key, token, None, None).await
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: &LockToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.fenced(&self.sql.extend, key, token, None, Some(sql::micros(lease)))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filename(location: &str) -> String {
        match parse_location(Path::new(location)) {
            Ok(options) => options.get_filename().to_string_lossy().into_owned(),
            Err(err) => panic!("{location:?} refused: {err:?}"),
        }
    }

    #[test]
    fn paths_and_urls_name_the_file() {
        assert_eq!(filename("data/idem.db"), "data/idem.db");
        assert_eq!(filename("/var/lib/app/idem.db"), "/var/lib/app/idem.db");
        assert_eq!(filename("sqlite://data/idem.db"), "data/idem.db");
        assert_eq!(filename("sqlite:data/idem.db"), "data/idem.db");
        assert_eq!(filename("sqlite:///var/lib/idem.db"), "/var/lib/idem.db");
        assert_eq!(filename("sqlite://idem.db?mode=rwc"), "idem.db");
        // A plain path is taken as it is, `?` and all.
        assert_eq!(filename("odd?name.db"), "odd?name.db");
        assert!(SqliteStore::connect_options("sqlite://idem.db?mode=bogus").is_err());
    }

    #[test]
    fn in_memory_and_empty_locations_are_refused() {
        for location in [
            "",
            ":memory:",
            "sqlite::memory:",
            "sqlite://:memory:",
            "sqlite://",
            "sqlite:",
            "sqlite://idem.db?mode=memory",
            "sqlite://?mode=memory",
        ] {
            assert!(
                matches!(
                    parse_location(Path::new(location)),
                    Err(StoreError::Backend(_))
                ),
                "{location:?} accepted"
            );
        }
    }

    #[test]
    fn busy_timeout_is_below_the_bound() {
        assert_eq!(busy_timeout(DEFAULT_TIMEOUT), Duration::from_millis(750));
        assert_eq!(
            busy_timeout(Duration::from_millis(300)),
            Duration::from_millis(225)
        );
        assert_eq!(busy_timeout(Duration::MAX), MAX_BUSY_TIMEOUT);
        assert_eq!(busy_timeout(Duration::ZERO), Duration::ZERO);
    }

    #[tokio::test]
    async fn table_names_are_validated_and_quoted() {
        let pool = SqlitePoolOptions::new().connect_lazy_with(SqliteConnectOptions::new());
        let store = SqliteStore::new(pool);
        assert_eq!(store.quoted_table(), "\"idempotency_records\"");
        let store = store
            .with_table("Orders_1")
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(store.quoted_table(), "\"Orders_1\"");
        assert!(store.sql.begin.starts_with("INSERT INTO \"Orders_1\""));
        assert!(store.clone().with_table(&"x".repeat(64)).is_ok());
        for bad in ["", "1a", "a\"b", "a.b", &"x".repeat(65)] {
            match store.clone().with_table(bad) {
                Err(StoreError::Backend(err)) => {
                    assert!(
                        err.downcast_ref::<crate::store::InvalidIdentifier>()
                            .is_some(),
                        "{bad:?}"
                    )
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        let debug = format!("{store:?}");
        assert!(
            debug.contains("Orders_1") && debug.contains("timeout"),
            "{debug}"
        );
    }

    /// Real SQLite failures: a file that cannot be opened cannot serve now;
    /// a missing table is a mistake, not an outage.
    #[tokio::test]
    async fn failures_are_mapped_by_result_code() {
        let dir = std::env::temp_dir().join(format!(
            "tower-idempotency-unit-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let missing = dir.join("no-such-dir").join("idem.db");
        match SqliteStore::open(&missing).await {
            Err(StoreError::Unavailable(err)) => assert!(err.to_string().contains("14"), "{err}"),
            other => panic!("{other:?}"),
        }
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let store = SqliteStore::open(dir.join("idem.db"))
            .await
            .unwrap_or_else(|e| panic!("{e:?}"));
        let key = StoreKey::from_bytes([1; 32]);
        let fp = Fingerprint::from_bytes([2; 32]);
        match store.begin(&key, &fp, Duration::from_secs(1)).await {
            Err(StoreError::Backend(err)) => assert!(err.to_string().contains("no such table")),
            other => panic!("{other:?}"),
        }
        store.pool().close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
