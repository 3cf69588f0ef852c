//! The [`Store`] contract, and the stores that implement it.
//!
//! The store is where correctness lives. The layer asks it four things, each
//! one atomic step:
//!
//! | call | does |
//! |---|---|
//! | [`begin`](Store::begin) | no live record, or an in-flight record whose lease has expired: take the lock with a fresh [`LockToken`] ([`Begin::Acquired`]); a live lock: [`Begin::InFlight`]; a completed, unexpired record: [`Begin::Completed`]. Both of the latter carry the stored fingerprint. |
//! | [`complete`](Store::complete) | write the record with a ttl, **only if** the token still holds the lock (fencing) |
//! | [`release`](Store::release) | drop the lock so a retry may run, same fencing |
//! | [`extend`](Store::extend) | the heartbeat: push the lease end out, same fencing |
//!
//! A holder whose lease expired and was taken over learns `false` from
//! `complete`, `release` and `extend`, and changes nothing.
//!
//! The contract knows no transport: no `http` type appears in it, and the
//! same store serves the HTTP layer and the message face. Two optional
//! hooks cover what differs between stores:
//! [`attachment`](Store::attachment) hands the lock holder request-scoped
//! state (a transaction) as a typed [`Attachment`], and
//! [`capabilities`](Store::capabilities) declares what the store does
//! beyond the common contract ([`Capabilities`]), which the engine and the
//! conformance suite both read.
//!
//! Time is the store's own: tokio's clock in [`MemoryStore`](crate::MemoryStore) (so tests can
//! pause and advance it), the server's clock in Redis and PostgreSQL. No
//! store trusts the application's wall clock. Expired records disappear
//! without anyone calling a cleanup by hand.
//!
//! Third-party stores can prove themselves with the conformance suite behind
//! the `test-util` feature.
//!
//! # The stores
//!
//! Each store has one path: the default one at the crate's root, each
//! backend in a module of its own with what it needs besides (its driver's
//! pool or client, its errors).
//!
//! | store | path | feature |
//! |---|---|---|
//! | in process, sharded and bounded | [`crate::MemoryStore`] | (default) |
//! | Redis | [`redis::RedisStore`] | `redis` |
//! | PostgreSQL, one statement per step | [`postgres::PostgresStore`] | `postgres` |
//! | PostgreSQL, the handler's writes in the key's transaction | [`postgres::TransactionalPostgresStore`] | `postgres` |
//! | MySQL 8, MariaDB 10.5+ | [`mysql::MySqlStore`] | `mysql` |
//! | SQLite | [`sqlite::SqliteStore`] | `sqlite` |
//! | DynamoDB | [`dynamodb::DynamoDbStore`] | `dynamodb` |
//! | any store, its records sealed with AES-256-GCM | [`sealed::SealedStore`] | `encryption` |

use std::fmt;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use async_trait::async_trait;

use crate::fingerprint::Fingerprint;
use crate::record::{DecodeError, Record};

pub use crate::attachment::Attachment;

#[cfg(feature = "dynamodb")]
#[cfg_attr(docsrs, doc(cfg(feature = "dynamodb")))]
pub mod dynamodb;
pub(crate) mod memory;
#[cfg(feature = "mysql")]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
pub mod mysql;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
mod recovery;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
#[cfg(feature = "encryption")]
#[cfg_attr(docsrs, doc(cfg(feature = "encryption")))]
pub mod sealed;
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
mod sql;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub mod sqlite;

#[cfg(any(
    feature = "redis",
    feature = "postgres",
    feature = "mysql",
    feature = "sqlite"
))]
pub(crate) use recovery::Unsettled;
#[cfg(any(
    feature = "postgres",
    feature = "mysql",
    feature = "sqlite",
    feature = "dynamodb"
))]
pub(crate) use recovery::release_unanswered;
pub(crate) use recovery::{log_store_error, retry_with_backoff};

/// How long one call of a store on a server or a file may take before it
/// fails with [`StoreError::Timeout`], unless its `with_timeout` says
/// otherwise.
#[cfg(any(
    feature = "redis",
    feature = "postgres",
    feature = "mysql",
    feature = "sqlite",
    feature = "dynamodb"
))]
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// The longest lease or ttl a store on a server keeps (about 1000 years):
/// longer ones are cut to it, so that no server's time arithmetic can
/// overflow (Redis's millisecond expiries, SQL intervals, DynamoDB's epoch
/// numbers).
#[cfg(any(
    feature = "redis",
    feature = "postgres",
    feature = "mysql",
    feature = "sqlite",
    feature = "dynamodb"
))]
const MAX_EXPIRY: Duration = Duration::from_secs(1000 * 366 * 24 * 60 * 60);

#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
#[cfg_attr(
    docsrs,
    doc(cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite")))
)]
pub use sql::InvalidIdentifier;

/// A boxed error, as tower uses.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The key a store files a record under: SHA-256 of the scope and the
/// client's key. Fixed size, and neither the raw key nor the scope can be
/// read back from it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct StoreKey([u8; 32]);

impl StoreKey {
    /// Wraps 32 raw bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw 32 bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex of all 32 bytes, for stores that key by text.
    pub fn to_hex(&self) -> String {
        crate::util::hex(&self.0)
    }
}

impl Hash for StoreKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already uniformly distributed: eight bytes are a perfect hash.
        let mut eight = [0u8; 8];
        eight.copy_from_slice(&self.0[8..16]);
        state.write_u64(u64::from_le_bytes(eight));
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreKey({self})")
    }
}

/// The first 16 hex characters: what log lines carry (formatted only when
/// a log line is actually written).
impl fmt::Display for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::util::write_hex(f, &self.0[..8])
    }
}

/// The proof of holding an in-flight lock. Fresh for every acquisition and
/// never reused, so a holder whose lease was taken over cannot act on the
/// new holder's lock.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LockToken(u128);

impl LockToken {
    /// A fresh random (v4 UUID) token.
    pub fn new() -> Self {
        Self(uuid::Uuid::new_v4().as_u128())
    }

    /// Wraps a token a store's server made (a counter, a database
    /// default), for a store that does not take [`LockToken::new`]'s.
    pub const fn from_u128(value: u128) -> Self {
        Self(value)
    }

    /// The token as a number, as [`from_u128`](Self::from_u128) takes it.
    pub const fn as_u128(&self) -> u128 {
        self.0
    }

    /// The token as 16 big-endian bytes.
    pub const fn to_bytes(&self) -> [u8; 16] {
        self.0.to_be_bytes()
    }
}

impl Default for LockToken {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for LockToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LockToken({:08x}…)", (self.0 >> 96) as u32)
    }
}

/// The outcome of [`Store::begin`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Begin {
    /// The caller holds the lock and runs the request.
    Acquired(LockToken),
    /// Another caller holds a live lock.
    InFlight {
        /// The fingerprint of the request that holds the lock, if the store
        /// knows it. A store that cannot see it (a lock held by an
        /// uncommitted transaction) says `None` and declares so in its
        /// [`Capabilities`]; it never reports the caller's own fingerprint
        /// as the holder's.
        fingerprint: Option<Fingerprint>,
    },
    /// The request completed; replay this record.
    Completed(Record),
}

/// A store operation failed.
///
/// The layer answers `503` with `Retry-After` (or forwards the request
/// without idempotency, when configured to fail open) and logs the error
/// with a hash of the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend could not be reached or refused the connection.
    #[error("idempotency store unavailable")]
    Unavailable(#[source] BoxError),
    /// The operation did not finish within its bound.
    #[error("idempotency store timed out after {0:?}")]
    Timeout(Duration),
    /// A stored record could not be decoded.
    #[error("idempotency record is corrupt")]
    Corrupt(#[from] DecodeError),
    /// The store is full of live locks and cannot take another.
    #[error("idempotency store is at capacity")]
    CapacityExceeded,
    /// A recorded value that the caller's codec could not decode (message
    /// face): the engine fails closed rather than run the handler again.
    #[error("idempotency record holds a value the codec cannot decode")]
    Undecodable(#[source] BoxError),
    /// Any other backend failure.
    #[error("idempotency store failed")]
    Backend(#[source] BoxError),
}

impl StoreError {
    /// Wraps a connection-level failure.
    pub fn unavailable(err: impl Into<BoxError>) -> Self {
        Self::Unavailable(err.into())
    }

    /// Wraps any other backend failure.
    pub fn backend(err: impl Into<BoxError>) -> Self {
        Self::Backend(err.into())
    }
}

/// Where the layer locks, records and replays.
///
/// Every method is one atomic step against the backend. See the
/// [module docs](self) for the contract, and the conformance suite (feature
/// `test-util`) for its executable form.
///
/// The layer holds the store as `Arc<dyn Store>`, so stores need neither
/// `Clone` nor `Debug`.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Takes the lock for `key`, or reports the current state.
    ///
    /// No record, or an in-flight record whose lease has expired: a fresh
    /// lock with a lease of `lease` ([`Begin::Acquired`]). A live in-flight
    /// record: [`Begin::InFlight`]. A completed unexpired record:
    /// [`Begin::Completed`].
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError>;

    /// Stores `record` for `ttl`, if `token` still holds the lock. Returns
    /// `false`, changing nothing, if it does not.
    async fn complete(
        &self,
        key: &StoreKey,
        token: &LockToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<bool, StoreError>;

    /// Drops the lock, if `token` still holds it, so a retry may run.
    async fn release(&self, key: &StoreKey, token: &LockToken) -> Result<bool, StoreError>;

    /// Extends the lease to `lease` from now, if `token` still holds it.
    async fn extend(
        &self,
        key: &StoreKey,
        token: &LockToken,
        lease: Duration,
    ) -> Result<bool, StoreError>;

    /// Request-scoped state for the holder of `token`, handed to the
    /// handler once the lock is acquired and before it runs: a
    /// transactional store hands over its open transaction this way. The
    /// HTTP layer puts the value in the request's extensions; the message
    /// face passes it to the handler. The default is `None`.
    fn attachment(&self, key: &StoreKey, token: &LockToken) -> Option<Attachment> {
        let _ = (key, token);
        None
    }

    /// What this store guarantees beyond the common contract. The engine
    /// reads [`Capabilities::is_transactional`]; the conformance suite
    /// checks every declared capability. The default is
    /// [`Capabilities::new`].
    fn capabilities(&self) -> Capabilities {
        Capabilities::new()
    }

    /// Waits, at most `timeout`, until the in-flight record for `key` may
    /// have changed (completed, released or expired). The caller calls
    /// [`begin`](Store::begin) again afterwards; a spurious early return is
    /// allowed.
    ///
    /// The default sleeps `min(timeout, 25 ms)`: a poll. Stores that can be
    /// woken (such as [`MemoryStore`](crate::MemoryStore)) override it.
    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        let _ = key;
        tokio::time::sleep(timeout.min(Duration::from_millis(25))).await;
        Ok(())
    }
}

/// What a store guarantees beyond the common contract, as
/// [`Store::capabilities`] declares it.
///
/// ```
/// use tower_idempotency::store::Capabilities;
///
/// let caps = Capabilities::new().with_transactional(true).with_in_flight_fingerprint(false);
/// assert!(caps.is_transactional());
/// assert!(!caps.reports_in_flight_fingerprint());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    transactional: bool,
    in_flight_fingerprint: bool,
    max_record_size: Option<usize>,
}

impl Default for Capabilities {
    fn default() -> Self {
        Self::new()
    }
}

impl Capabilities {
    /// The common case: not transactional, [`Begin::InFlight`] carries
    /// the holder's fingerprint, and records of any size are kept.
    pub const fn new() -> Self {
        Self {
            transactional: false,
            in_flight_fingerprint: true,
            max_record_size: None,
        }
    }

    /// Whether [`complete`](Store::complete) commits the handler's own
    /// writes together with the record (and [`release`](Store::release)
    /// rolls them back). If so, a failed completion means the handler's
    /// effects were rolled back: the engine reports a store failure
    /// instead of the handler's output, and does not retry the write in
    /// the background.
    ///
    /// ```
    /// use tower_idempotency::store::Capabilities;
    ///
    /// // A store whose `complete` commits the handler's transaction.
    /// const CAPS: Capabilities = Capabilities::new().with_transactional(true);
    /// assert!(CAPS.is_transactional());
    /// ```
    pub const fn with_transactional(mut self, yes: bool) -> Self {
        self.transactional = yes;
        self
    }

    /// Whether [`Begin::InFlight`] carries the holder's fingerprint
    /// (`Some`) or the store cannot see it (`None`).
    ///
    /// ```
    /// use tower_idempotency::store::Capabilities;
    ///
    /// // A store that keeps a lock as a bare flag, without the fingerprint.
    /// let caps = Capabilities::new().with_in_flight_fingerprint(false);
    /// assert!(!caps.reports_in_flight_fingerprint());
    /// ```
    pub const fn with_in_flight_fingerprint(mut self, yes: bool) -> Self {
        self.in_flight_fingerprint = yes;
        self
    }

    /// The largest record, in [`Record::encode`] bytes, that
    /// [`complete`](Store::complete) can keep (DynamoDB's item limit, for
    /// instance). The HTTP layer records a response whose record would be
    /// larger as a tombstone, as it does a body past
    /// [`with_max_response_body`](crate::IdempotencyLayer::with_max_response_body):
    /// the request is not run twice and retries answer `410 Gone`.
    ///
    /// ```
    /// use tower_idempotency::store::Capabilities;
    ///
    /// // DynamoDB items hold at most 400 KB, attribute names included.
    /// let caps = Capabilities::new().with_max_record_size(390 * 1024);
    /// assert_eq!(caps.max_record_size(), Some(390 * 1024));
    /// ```
    pub const fn with_max_record_size(mut self, bytes: usize) -> Self {
        self.max_record_size = Some(bytes);
        self
    }

    /// See [`with_max_record_size`](Self::with_max_record_size); `None`
    /// when the store sets no limit of its own.
    pub const fn max_record_size(&self) -> Option<usize> {
        self.max_record_size
    }

    /// See [`with_transactional`](Self::with_transactional).
    pub const fn is_transactional(&self) -> bool {
        self.transactional
    }

    /// See [`with_in_flight_fingerprint`](Self::with_in_flight_fingerprint).
    pub const fn reports_in_flight_fingerprint(&self) -> bool {
        self.in_flight_fingerprint
    }
}

#[async_trait]
impl<T: Store + ?Sized> Store for std::sync::Arc<T> {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        (**self).begin(key, fingerprint, lease).await
    }
    async fn complete(
        &self,
        key: &StoreKey,
        token: &LockToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        (**self).complete(key, token, record, ttl).await
    }
    async fn release(&self, key: &StoreKey, token: &LockToken) -> Result<bool, StoreError> {
        (**self).release(key, token).await
    }
    async fn extend(
        &self,
        key: &StoreKey,
        token: &LockToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        (**self).extend(key, token, lease).await
    }
    fn attachment(&self, key: &StoreKey, token: &LockToken) -> Option<Attachment> {
        (**self).attachment(key, token)
    }
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        (**self).wait(key, timeout).await
    }
}
