//! [`TransactionalPostgresStore`]: a keyed request in one PostgreSQL
//! transaction, with its open transactions and the handle handlers use.

use std::collections::HashMap;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::{PgConnection, Postgres, Transaction};
use tokio::sync::{Mutex as AsyncMutex, OwnedMappedMutexGuard, OwnedMutexGuard};
use tokio::time::Instant;

use super::sql::{interval_secs, live_row};
use super::{PgPool, PostgresStore};
use crate::fingerprint::Fingerprint;
use crate::record::Record;
use crate::store::{Attachment, Begin, Capabilities, LockToken, Store, StoreError, StoreKey};

/// Takes the key's lock if it is free, never waiting.
const TRY_LOCK: &str = "SELECT pg_try_advisory_xact_lock($1)";
/// Bounds the wait on a taken key; returns whether the key was free.
const TRY_LOCK_SHARED: &str =
    "SELECT set_config('lock_timeout', $2, true), pg_try_advisory_xact_lock_shared($1)";
/// Waits, within `lock_timeout`, until the key's holder has finished.
const LOCK_SHARED: &str = "SELECT pg_advisory_xact_lock_shared($1)";
/// SQLSTATE `lock_not_available`: `lock_timeout` passed.
const LOCK_NOT_AVAILABLE: &str = "55P03";
/// How long `wait` sleeps when the key is not held by a transaction (an
/// ordinary-mode lock on the same table): the trait's default poll.
const POLL: Duration = Duration::from_millis(25);

/// The request's transaction, shared by the store's table of open
/// transactions and, while a guard is held, the handler.
type Slot = Arc<AsyncMutex<Option<Transaction<'static, Postgres>>>>;

/// One open transaction: the key it holds, and when it is abandoned.
struct Entry {
    key: StoreKey,
    /// Pushed out by `extend`; past it, the next `begin` rolls it back.
    /// `None` for a lease too long to count.
    lease_end: Option<Instant>,
    slot: Slot,
}

/// The open transactions, by lock token.
#[derive(Default)]
struct Open {
    entries: Mutex<HashMap<LockToken, Entry>>,
    /// No lease ends before this: until then `begin` has nothing to purge
    /// and does not scan. Lowered by every new entry; raised only by a
    /// scan (an extension or a completion leaves it early, which costs
    /// one scan that finds nothing).
    next_end: Mutex<Option<Instant>>,
}

impl Open {
    fn lock(&self) -> MutexGuard<'_, HashMap<LockToken, Entry>> {
        // The map stays consistent whatever panicked: every change is one
        // insert or remove.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn next_end(&self) -> MutexGuard<'_, Option<Instant>> {
        self.next_end.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn insert(&self, token: LockToken, entry: Entry) {
        if let Some(end) = entry.lease_end {
            let mut next = self.next_end();
            *next = Some(next.map_or(end, |next| next.min(end)));
        }
        self.lock().insert(token, entry);
    }

    /// Removes and returns the entries whose lease ended by `now`, without
    /// a scan while no lease can have ended.
    fn take_ended(&self, now: Instant) -> Vec<Entry> {
        if self.next_end().is_none_or(|end| end > now) {
            return Vec::new();
        }
        let mut open = self.lock();
        let ended = |e: &Entry| e.lease_end.is_some_and(|end| end <= now);
        let tokens: Vec<LockToken> = open
            .iter()
            .filter(|(_, e)| ended(e))
            .map(|(t, _)| *t)
            .collect();
        let taken = tokens.iter().filter_map(|t| open.remove(t)).collect();
        *self.next_end() = open.values().filter_map(|e| e.lease_end).min();
        taken
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        // Dropping a pooled connection needs a Tokio runtime. Without one
        // (the runtime is gone: the process is ending), the connections are
        // left to close with the process, and PostgreSQL rolls back.
        if tokio::runtime::Handle::try_current().is_err() {
            let entries = self
                .entries
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner);
            for (_, entry) in entries.drain() {
                std::mem::forget(entry.slot);
            }
        }
    }
}

/// The statements of one store, for its table.
struct TxSql {
    /// The key's live row, if any.
    read: String,
    /// Writes the record over a missing or expired row.
    complete: String,
    /// Mixed into every advisory lock id, so that tables do not share ids.
    namespace: i64,
}

impl TxSql {
    fn new(qualified: &str) -> Self {
        use sha2::{Digest, Sha256};
        let read = format!(
            "SELECT fingerprint, state, record FROM {qualified} \
             WHERE key = $1 AND expires_at > statement_timestamp()"
        );
        // `now()` is the start of the transaction, which began with the
        // request: the ttl counts from this statement instead.
        let complete = format!(
            "INSERT INTO {qualified} AS cur \
                 (key, fingerprint, state, lock_token, record, created_at, expires_at) \
             VALUES ($1, $2, 1, NULL, $3, now(), \
                 statement_timestamp() + make_interval(secs => $4)) \
             ON CONFLICT (key) DO UPDATE SET \
                 fingerprint = EXCLUDED.fingerprint, state = 1, lock_token = NULL, \
                 record = EXCLUDED.record, created_at = EXCLUDED.created_at, \
                 expires_at = EXCLUDED.expires_at \
             WHERE cur.expires_at <= statement_timestamp()"
        );
        let hash = Sha256::new()
            .chain_update(b"tower-idempotency/advisory-lock/v1\0")
            .chain_update(qualified.as_bytes())
            .finalize();
        Self {
            read,
            complete,
            namespace: fold(&hash),
        }
    }

    /// The advisory lock id of `key` in this table.
    fn lock_id(&self, key: &StoreKey) -> i64 {
        fold(key.as_bytes()) ^ self.namespace
    }
}

/// The first eight bytes of a hash, as a signed 64-bit number.
fn fold(hash: &[u8]) -> i64 {
    let mut eight = [0u8; 8];
    for (to, from) in eight.iter_mut().zip(hash) {
        *to = *from;
    }
    i64::from_be_bytes(eight)
}

/// A [`Store`] that runs each keyed request in one PostgreSQL transaction:
/// the handler's own writes, the key's lock and the recorded response
/// commit together, or none of them do.
///
/// Records live in the same table, with the same schema, as
/// [`PostgresStore`]'s (see the [module docs](super)); [`migrate`](Self::migrate)
/// creates it. Cloning is cheap and shares the pool and the open
/// transactions.
///
/// With an ordinary store, a process that dies after the handler wrote its
/// order but before the response was recorded leaves no record: the retry
/// runs the handler again once the lease ends. When the handler's effects
/// live in the same PostgreSQL database as the records, this store closes
/// that gap (the "atomic phases" design): `begin` opens a transaction on a
/// connection from the application's pool and takes the key inside it, the
/// handler receives that transaction as an [`IdempotentTransaction`]
/// request extension and does its writes on it, and the layer writes the
/// record in the same transaction and commits. Nothing is visible to anyone
/// before the commit.
///
/// ```no_run
/// use axum::{Extension, Router, http::StatusCode, routing::post};
/// use tower_idempotency::IdempotencyLayer;
/// use tower_idempotency::store::postgres::PgPool;
/// use tower_idempotency::store::postgres::{IdempotentTransaction, TransactionalPostgresStore};
///
/// async fn create_order(Extension(tx): Extension<IdempotentTransaction>) -> StatusCode {
///     let Ok(mut conn) = tx.lock().await else {
///         return StatusCode::INTERNAL_SERVER_ERROR;
///     };
///     // Committed together with the recorded response, or not at all.
///     match sqlx::query("INSERT INTO orders (item) VALUES ('book')")
///         .execute(&mut *conn)
///         .await
///     {
///         Ok(_) => StatusCode::CREATED,
///         Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
///     }
/// }
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = PgPool::connect("postgres://app@db.internal/app").await?;
/// let store = TransactionalPostgresStore::new(pool);
/// store.migrate().await?; // the same table as PostgresStore
/// let _sweeper = store.spawn_sweeper(std::time::Duration::from_secs(60), 1000);
///
/// let app: Router = Router::new()
///     .route("/orders", post(create_order))
///     // Every request that reaches the handler then has a transaction.
///     .layer(IdempotencyLayer::new(store).with_require_key(true));
/// # let _ = app;
/// # Ok(())
/// # }
/// ```
///
/// # With the message face
///
/// The same store makes a queue consumer exactly-once: the
/// [`IdempotentConsumer`](crate::message::IdempotentConsumer) hands the
/// handler the transaction as an [`Attachment`]
/// (`attachment.get::<IdempotentTransaction>()`), the side effect is written
/// on it, and the record commits with it before the consumer acks. A crash
/// before the commit rolls both back and the redelivery runs cleanly; a
/// crash after it makes the redelivery a replay.
///
/// # What happens to the transaction
///
/// | the request | the transaction |
/// |---|---|
/// | the handler answers a status that is recorded | the record is written in it and it commits; if the commit fails, the client gets 503 instead of the handler's answer |
/// | the handler panics, fails, or answers a status that is not recorded (5xx by default), or its response body fails | rolled back: its writes and the key vanish together, and a retry runs cleanly |
/// | the process dies, or its connection is lost | PostgreSQL rolls it back when the connection ends |
///
/// A 503 after a failed commit does not always mean nothing happened: if
/// the commit reached the server but its answer did not come back, the work
/// is committed and the retry replays it. Either way the client retries
/// with the same key and the handler's writes exist at most once.
///
/// # Locking
///
/// The key is locked with a transaction-level advisory lock,
/// `pg_try_advisory_xact_lock`, on a 64-bit id folded from the store key
/// and the table's name. The lock never waits: a concurrent duplicate finds
/// it taken and answers [`Begin::InFlight`] at once (409), while a live
/// holder keeps it exactly as long as its transaction and connection live,
/// so the connection itself is the lease. With
/// [`InFlightPolicy::Wait`](crate::InFlightPolicy::Wait), a duplicate
/// waits on the lock in the database (a shared advisory lock bounded by
/// `lock_timeout`), not in a sleep loop, and replays the first response as
/// soon as it commits.
///
/// Because nothing is committed before the end, the fingerprint of an
/// in-flight request is invisible to the others: a concurrent duplicate
/// with a *different* body gets 409 while the first runs, and 422 once it
/// has committed. Two different keys whose ids collide (a chance of 2⁻⁶⁴
/// per pair) only ever make one of them wait or answer 409 spuriously:
/// records are read by the full key.
///
/// Once the lock is held, `begin` reads the key's committed row in a new
/// statement, so a record committed just before is seen; expired rows are
/// overwritten when the record is written.
///
/// # Requirements and limits
///
/// - The guarantee covers writes made on the transaction, in this database.
///   Calls to other systems (a payment provider, a queue, another
///   database) are not rolled back: give them keys derived with
///   [`IdempotencyKey::derive`](crate::key::IdempotencyKey::derive).
/// - Every in-flight request holds one pooled connection for as long as its
///   handler runs, and a duplicate holds one briefly: size the pool for it.
///   `begin` waits for a connection at most
///   [`with_timeout`](TransactionalPostgresStore::with_timeout), then the
///   layer answers 503.
/// - Requests the layer does not cover (other methods, no key when keys are
///   optional, a store failure with fail-open) reach the handler without a
///   transaction. Use [`with_require_key(true)`](crate::IdempotencyLayer::with_require_key),
///   or extract `Option<Extension<IdempotentTransaction>>` and fall back to
///   a transaction of the handler's own.
/// - Do not commit or roll back the transaction by hand: the layer does.
///   Savepoints are fine ([`sqlx::Connection::begin`] on the guard opens
///   one).
/// - The transaction's isolation level is the connection's default (READ
///   COMMITTED unless configured otherwise). Under REPEATABLE READ or
///   SERIALIZABLE a race with a concurrent commit of the same key makes the
///   record write fail, so the handler's writes roll back and the client
///   gets 503; the retry replays.
/// - A handler whose statement failed leaves the transaction aborted: the
///   record cannot be written, so whatever status the handler answers, the
///   client gets 503 and nothing is committed.
/// - An open transaction holds locks like any other: on the records table
///   (a share lock, which only schema changes wait for) and on whatever the
///   handler wrote. A server-side `idle_in_transaction_session_timeout`
///   shorter than a handler's pauses between statements ends its
///   transaction: the client then gets 503.
/// - Serve each key through one mode. The ordinary [`PostgresStore`] can
///   share the table (its in-flight and completed rows are honoured here),
///   but it does not see this store's requests while they run.
#[derive(Clone)]
pub struct TransactionalPostgresStore {
    pg: PostgresStore,
    sql: Arc<TxSql>,
    open: Arc<Open>,
}

impl fmt::Debug for TransactionalPostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransactionalPostgresStore")
            .field("table", &self.pg.qualified_table())
            .field("timeout", &self.pg.timeout())
            .field("open", &self.open_transactions())
            .finish_non_exhaustive()
    }
}

/// The transactional mode of `store`: the same pool, table and timeout.
impl From<PostgresStore> for TransactionalPostgresStore {
    fn from(store: PostgresStore) -> Self {
        Self {
            sql: Arc::new(TxSql::new(store.qualified_table())),
            pg: store,
            open: Arc::default(),
        }
    }
}

impl TransactionalPostgresStore {
    /// A store on `pool`, in the table `public.idempotency_records`, with a
    /// 1 second bound on every call.
    ///
    /// Nothing is created yet: call [`migrate`](Self::migrate) once, or
    /// create the table in the application's own migrations.
    pub fn new(pool: PgPool) -> Self {
        Self::from(PostgresStore::new(pool))
    }

    /// Uses the schema `name` (default `public`), as
    /// [`PostgresStore::with_schema`] does. The result is a store on
    /// another table: transactions opened through `self` belong to `self`
    /// and its clones, which keep them, and are never seen through it.
    pub fn with_schema(self, name: &str) -> Result<Self, StoreError> {
        Ok(Self::from(self.pg.with_schema(name)?))
    }

    /// Uses the table `name` (default `idempotency_records`), as
    /// [`PostgresStore::with_table`] does. As with
    /// [`with_schema`](Self::with_schema), the result is a store on another
    /// table, with no open transaction of `self`'s.
    pub fn with_table(self, name: &str) -> Result<Self, StoreError> {
        Ok(Self::from(self.pg.with_table(name)?))
    }

    /// Bounds every call (default 1 second): opening the transaction,
    /// acquiring its connection from the pool included, and writing the
    /// record and committing. Past the bound a call fails with
    /// [`StoreError::Timeout`], and an open transaction rolls back.
    ///
    /// Keep it below the layer's
    /// [`with_store_timeout`](crate::IdempotencyLayer::with_store_timeout)
    /// so the store reports its own error first.
    #[must_use]
    pub fn with_timeout(self, timeout: Duration) -> Self {
        Self {
            pg: self.pg.with_timeout(timeout),
            ..self
        }
    }

    /// The pool the store runs on.
    pub fn pool(&self) -> &PgPool {
        self.pg.pool()
    }

    /// The bound on every call, as [`with_timeout`](Self::with_timeout)
    /// set it (1 second by default).
    pub fn timeout(&self) -> Duration {
        self.pg.timeout()
    }

    /// The quoted, schema-qualified table name, as in `"public"."idempotency_records"`.
    pub fn qualified_table(&self) -> &str {
        self.pg.qualified_table()
    }

    /// The ordinary store on the same pool and table, for routes whose
    /// handlers do not write to this database.
    pub fn postgres_store(&self) -> &PostgresStore {
        &self.pg
    }

    /// How many transactions this store holds open: requests whose handler
    /// is running, or whose record is being written.
    pub fn open_transactions(&self) -> usize {
        self.open.lock().len()
    }

    /// Creates the schema, the table and its index, each only if missing;
    /// see [`PostgresStore::migrate`].
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.pg.migrate().await
    }

    /// Deletes at most `batch` expired records; see
    /// [`PostgresStore::delete_expired`].
    pub async fn delete_expired(&self, batch: usize) -> Result<u64, StoreError> {
        self.pg.delete_expired(batch).await
    }

    /// Spawns a task that sweeps expired records; see
    /// [`PostgresStore::spawn_sweeper`].
    pub fn spawn_sweeper(&self, interval: Duration, batch: usize) -> tokio::task::JoinHandle<()> {
        self.pg.spawn_sweeper(interval, batch)
    }

    /// Takes the open transaction of `token` out of the table, if it holds
    /// `key`.
    fn take(&self, key: &StoreKey, token: &LockToken) -> Option<Entry> {
        let mut open = self.open.lock();
        match open.get(token) {
            Some(entry) if entry.key == *key => open.remove(token),
            _ => None,
        }
    }

    /// Rolls back the transactions whose lease ended without `complete` or
    /// `release`: their request was dropped (its runtime shut down, say)
    /// while this store lives on. Their keys are free once this returns.
    async fn purge_abandoned(&self) {
        for entry in self.open.take_ended(Instant::now()) {
            tracing::warn!(
                key = %entry.key,
                "idempotency transaction abandoned past its lease; rolling it back"
            );
            // A guard a handler still holds keeps the transaction until the
            // guard goes; dropping it then rolls back. Otherwise roll back
            // now, so that the key is free for this caller.
            let tx = entry.slot.try_lock().ok().and_then(|mut slot| slot.take());
            if let Some(tx) = tx {
                let _ = self.pg.bounded(self.pg.timeout(), tx.rollback()).await;
            }
        }
    }
}

#[async_trait]
impl Store for TransactionalPostgresStore {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        // The fingerprint is committed with the record: an in-flight
        // transaction's is invisible to everyone else, so begin needs none.
        let _ = fingerprint;
        self.purge_abandoned().await;
        let timeout = self.pg.timeout();
        let deadline = Instant::now() + timeout;
        let lock_id = self.sql.lock_id(key);
        let locked = self
            .pg
            .bounded_until(deadline, timeout, async {
                let mut tx = self.pg.pool().begin().await?;
                let locked: bool = sqlx::query_scalar(TRY_LOCK)
                    .bind(lock_id)
                    .fetch_one(&mut *tx)
                    .await?;
                if !locked {
                    // Dropped: rolled back on its way to the pool; it holds
                    // nothing.
                    return Ok(None);
                }
                // A statement of its own, so its snapshot is taken after the
                // lock: a record committed by the previous holder is seen.
                let row = sqlx::query(&self.sql.read)
                    .bind(&key.as_bytes()[..])
                    .fetch_optional(&mut *tx)
                    .await?;
                Ok(Some((tx, row)))
            })
            .await?;
        let Some((tx, row)) = locked else {
            // Another live transaction holds the key. Its fingerprint is not
            // committed anywhere: say so, rather than guess.
            return Ok(Begin::InFlight { fingerprint: None });
        };
        if let Some(row) = row {
            // Completed, or locked by the ordinary mode on the same table.
            let outcome = live_row(&row);
            // Free the key at once for the next caller. Should this fail,
            // the dropped transaction rolls back on its way to the pool.
            let _ = self
                .pg
                .bounded_until(deadline, timeout, tx.rollback())
                .await;
            return outcome;
        }
        let token = LockToken::new();
        let entry = Entry {
            key: *key,
            lease_end: Instant::now().checked_add(lease),
            slot: Arc::new(AsyncMutex::new(Some(tx))),
        };
        self.open.insert(token, entry);
        Ok(Begin::Acquired(token))
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: &LockToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        // Out of the table first: whatever happens next (an error, this
        // future dropped by a timeout), the transaction is finished by this
        // call, committed or rolled back on drop.
        let Some(entry) = self.take(key, token) else {
            return Ok(false);
        };
        let encoded = record.encode();
        let written = self
            .pg
            .bounded(self.pg.timeout(), async {
                // Waits for a guard the handler may still hold.
                let Some(mut tx) = entry.slot.lock().await.take() else {
                    return Ok(false);
                };
                let done = sqlx::query(&self.sql.complete)
                    .bind(&key.as_bytes()[..])
                    .bind(&record.fingerprint().as_bytes()[..])
                    .bind(encoded.as_ref())
                    .bind(interval_secs(ttl))
                    .execute(&mut *tx)
                    .await?;
                if done.rows_affected() != 1 {
                    tx.rollback().await?;
                    return Ok(false);
                }
                tx.commit().await?;
                Ok(true)
            })
            .await?;
        if !written {
            tracing::warn!(
                key = %key,
                "a live row of the ordinary mode holds the key; the handler's writes were rolled back"
            );
        }
        Ok(written)
    }

    async fn release(&self, key: &StoreKey, token: &LockToken) -> Result<bool, StoreError> {
        let Some(entry) = self.take(key, token) else {
            return Ok(false);
        };
        self.pg
            .bounded(self.pg.timeout(), async {
                if let Some(tx) = entry.slot.lock().await.take() {
                    tx.rollback().await?;
                }
                Ok(true)
            })
            .await
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: &LockToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        // The database needs no heartbeat (the connection is the lease);
        // this only tells `begin` the request is alive.
        let mut open = self.open.lock();
        match open.get_mut(token) {
            Some(entry) if entry.key == *key => {
                entry.lease_end = Instant::now().checked_add(lease);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn attachment(&self, key: &StoreKey, token: &LockToken) -> Option<Attachment> {
        let slot = match self.open.lock().get(token) {
            Some(entry) if entry.key == *key => Arc::downgrade(&entry.slot),
            _ => Weak::new(),
        };
        Some(Attachment::new(IdempotentTransaction { slot }))
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new()
            .with_transactional(true)
            .with_in_flight_fingerprint(false)
    }

    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        let lock_id = self.sql.lock_id(key);
        let millis = timeout.as_millis().clamp(1, i32::MAX as u128);
        let free = self
            .pg
            .bounded(timeout + self.pg.timeout(), async {
                let mut tx = self.pg.pool().begin().await?;
                let (_, free): (String, bool) = sqlx::query_as(TRY_LOCK_SHARED)
                    .bind(lock_id)
                    .bind(format!("{millis}ms"))
                    .fetch_one(&mut *tx)
                    .await?;
                if !free {
                    match sqlx::query(LOCK_SHARED)
                        .bind(lock_id)
                        .execute(&mut *tx)
                        .await
                    {
                        Ok(_) => {}
                        Err(sqlx::Error::Database(e))
                            if e.code().as_deref() == Some(LOCK_NOT_AVAILABLE) => {}
                        Err(e) => return Err(e),
                    }
                }
                tx.rollback().await?;
                Ok(free)
            })
            .await?;
        if free {
            // No transaction holds the key: the holder just finished, or it
            // is an ordinary-mode lock, which only time can end.
            tokio::time::sleep(timeout.min(POLL)).await;
        }
        Ok(())
    }
}

/// The request's transaction, handed to the handler as a request extension
/// by [`TransactionalPostgresStore`]: extract it with axum's
/// `Extension<IdempotentTransaction>` (or `req.extensions().get()`), and
/// run queries on the connection [`lock`](Self::lock) yields.
///
/// Whatever the handler writes on it commits together with the recorded
/// response, or rolls back with the key. The handle does not keep the
/// transaction alive: once the layer has committed or rolled it back,
/// [`lock`](Self::lock) fails with [`TransactionFinished`].
#[derive(Clone)]
pub struct IdempotentTransaction {
    slot: Weak<AsyncMutex<Option<Transaction<'static, Postgres>>>>,
}

impl fmt::Debug for IdempotentTransaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotentTransaction")
            .field("open", &(self.slot.strong_count() > 0))
            .finish()
    }
}

impl IdempotentTransaction {
    /// Exclusive use of the transaction's connection until the guard is
    /// dropped: `sqlx::query(…).execute(&mut *guard)`.
    ///
    /// Waits while another guard of the same request is held. Drop the
    /// guard before the handler returns: the layer takes the transaction
    /// to write the record only once it is free. Fails with
    /// [`TransactionFinished`] once the transaction has been committed or
    /// rolled back.
    pub async fn lock(&self) -> Result<TransactionGuard, TransactionFinished> {
        let slot = self.slot.upgrade().ok_or(TransactionFinished(()))?;
        let guard = slot.lock_owned().await;
        OwnedMutexGuard::try_map(guard, |tx| tx.as_deref_mut())
            .map(TransactionGuard)
            .map_err(|_| TransactionFinished(()))
    }
}

/// The connection of a request's transaction, from
/// [`IdempotentTransaction::lock`]; dereferences to a [`PgConnection`].
pub struct TransactionGuard(
    OwnedMappedMutexGuard<Option<Transaction<'static, Postgres>>, PgConnection>,
);

impl fmt::Debug for TransactionGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransactionGuard").finish_non_exhaustive()
    }
}

impl Deref for TransactionGuard {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.0
    }
}

impl DerefMut for TransactionGuard {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.0
    }
}

/// The request's transaction has already been committed or rolled back (or
/// abandoned past its lease): its handle cannot be used any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the idempotency transaction has already finished")]
pub struct TransactionFinished(());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_ids_differ_by_table() {
        let key = StoreKey::from_bytes([7; 32]);
        let a = TxSql::new("\"public\".\"a\"");
        let b = TxSql::new("\"public\".\"b\"");
        assert_ne!(a.lock_id(&key), b.lock_id(&key));
        assert_eq!(
            a.lock_id(&key),
            TxSql::new("\"public\".\"a\"").lock_id(&key)
        );
        let other = StoreKey::from_bytes([8; 32]);
        assert_ne!(a.lock_id(&key), a.lock_id(&other));
    }

    #[test]
    fn fold_reads_eight_bytes() {
        assert_eq!(fold(&[0, 0, 0, 0, 0, 0, 1, 2, 3]), 0x0102);
        assert_eq!(fold(&[1]), 1 << 56);
    }
}
