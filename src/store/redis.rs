//! [`RedisStore`]: records shared by every instance of the application
//! through Redis, one round trip per step.
//!
//! ```no_run
//! use axum::{Router, routing::post};
//! use tower_idempotency::IdempotencyLayer;
//! use tower_idempotency::store::redis::RedisStore;
//!
//! async fn create_payment() -> &'static str {
//!     "charged once"
//! }
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = RedisStore::from_url("redis://cache.internal:6379").await?
//!     .with_prefix("payments:idempotency:");
//!
//! let app: Router = Router::new()
//!     .route("/payments", post(create_payment))
//!     .layer(IdempotencyLayer::new(store));
//! # let _ = app;
//! # Ok(())
//! # }
//! ```
//!
//! An application that already has a [`ConnectionManager`] passes it to
//! [`RedisStore::new`]. The store is built on the `redis` crate, major
//! version 1, re-exported as [`driver`] so the versions always match.
//!
//! Requires Redis 7.0 or later (or a compatible server such as Valkey):
//! `begin` uses `SET … NX GET`. The store talks to one endpoint: a
//! standalone server or primary, or a proxy that routes for a cluster.
//!
//! # Layout
//!
//! One Redis string per idempotency key, named
//! `<prefix>{<64 hex digits of the StoreKey>}`, with the prefix
//! `idempotency:` unless [`with_prefix`](RedisStore::with_prefix) says
//! otherwise. The braces are a Redis Cluster hash tag: only the hex digits
//! pick the slot, so keys spread over the cluster whatever the prefix, and
//! every command and script touches a single key. Its value is one of:
//!
//! ```text
//! in flight   0x01 | lock token (16 bytes, big-endian) | fingerprint (32 bytes)
//! completed   0x02 | Record::encode() bytes
//! ```
//!
//! The completed form holds the crate's versioned record encoding (see
//! [`Record::encode`]). Expiry is Redis's own: an in-flight value lives for
//! its lease (`PX`), a completed one for its ttl (`PX`). The application's
//! clock is never consulted, and nothing needs sweeping.
//!
//! # One round trip per step
//!
//! - `begin` is a single `SET key <in-flight> NX PX <lease> GET`: a nil
//!   reply means the lock was taken (a missing or expired key); otherwise
//!   the reply is the current value, in flight or completed, and nothing
//!   was written.
//! - `complete`, `release` and `extend` are one `EVALSHA` each, of a short
//!   Lua script that compares the stored state and lock token (fencing)
//!   before it writes (`SET … PX`), deletes, or moves the expiry (`PEXPIRE`).
//!   A script missing from the server (after a restart or `SCRIPT FLUSH`) is
//!   loaded again and the call repeated, transparently.
//!
//! A request that runs its handler costs two commands (`SET`, then
//! `EVALSHA` to record or release), plus one `EVALSHA` per heartbeat while
//! a handler outlives a third of its lease; a replay, a conflict or a
//! fingerprint mismatch costs one. [`Store::wait`] keeps the trait's
//! default (a 25 ms sleep, then the layer calls `begin` again) for layers
//! that wait on an in-flight request instead of answering 409.
//!
//! # Timeouts and errors
//!
//! Every call is bounded by [`with_timeout`](RedisStore::with_timeout)
//! (1 second by default): past it the call fails with
//! [`StoreError::Timeout`]. While Redis is down the connection manager
//! reconnects in the background, and calls fail within that bound in the
//! meantime; no store needs rebuilding once Redis is back. A connection
//! failure is [`StoreError::Unavailable`] (so are `LOADING`, `MASTERDOWN`,
//! `READONLY`, `TRYAGAIN` and `CLUSTERDOWN` replies), a value that does not
//! decode [`StoreError::Corrupt`], anything else [`StoreError::Backend`]. A
//! call cut short by the bound may still have been applied by the server: a
//! `begin` that took the lock then releases it as soon as its answer
//! arrives.

use std::fmt;
use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;

use ::redis::aio::ConnectionManagerConfig;
use ::redis::{
    Cmd, ErrorKind, RedisError, RedisWrite, Script, ServerErrorKind, ToRedisArgs, Value,
};
use async_trait::async_trait;
use bytes::{BufMut, Bytes};

/// The `redis` crate this store is built on, so that an application builds
/// its [`ConnectionManager`] with the matching version.
pub use ::redis as driver;
pub use ::redis::aio::ConnectionManager;

use super::{
    Begin, DEFAULT_TIMEOUT, LockToken, MAX_EXPIRY, Store, StoreError, StoreKey, Unsettled,
};
use crate::fingerprint::Fingerprint;
use crate::record::Record;

const DEFAULT_PREFIX: &str = "idempotency:";
/// The bound on [`RedisStore::from_url`], connecting and loading the
/// scripts included.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

const IN_FLIGHT: u8 = 0x01;
const COMPLETED: u8 = 0x02;
/// State byte and lock token: what the scripts compare.
const FENCE_LEN: usize = 1 + 16;
const IN_FLIGHT_LEN: usize = FENCE_LEN + 32;

/// `ARGV[1]`: the fence (in-flight state and token). `ARGV[2]`: the
/// completed value. `ARGV[3]`: the ttl in milliseconds.
const COMPLETE_SRC: &str = "\
if redis.call('GETRANGE', KEYS[1], 0, 16) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0";

/// `ARGV[1]`: the fence.
const RELEASE_SRC: &str = "\
if redis.call('GETRANGE', KEYS[1], 0, 16) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0";

/// `ARGV[1]`: the fence. `ARGV[2]`: the lease in milliseconds.
const EXTEND_SRC: &str = "\
if redis.call('GETRANGE', KEYS[1], 0, 16) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0";

static COMPLETE: LazyLock<Script> = LazyLock::new(|| Script::new(COMPLETE_SRC));
static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE_SRC));
static EXTEND: LazyLock<Script> = LazyLock::new(|| Script::new(EXTEND_SRC));

/// A [`Store`] in Redis, through the `redis` crate's auto-reconnecting
/// [`ConnectionManager`].
///
/// Records are shared by every process that uses the same server and
/// prefix, and expire by Redis's own clock. Cloning is cheap and shares
/// the connection. See the [module docs](self) for the layout and an
/// example.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The connection is left out: its address may carry credentials.
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store on `conn`, with the prefix `idempotency:` and a 1 second
    /// bound on every call.
    ///
    /// The manager's own response timeout (500 ms unless configured)
    /// applies too; [`from_url`](Self::from_url) turns it off in favour of
    /// [`with_timeout`](Self::with_timeout).
    pub fn new(conn: ConnectionManager) -> Self {
        Self {
            conn,
            prefix: DEFAULT_PREFIX.to_owned(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Connects to the Redis at `url` (`redis://[user:password@]host:port[/db]`;
    /// `rediss://` needs one of the `redis` crate's TLS features) and loads
    /// the store's scripts.
    ///
    /// Gives up after 2 seconds with [`StoreError::Unavailable`] when the
    /// server cannot be reached; an invalid URL is
    /// [`StoreError::Backend`]. Once connected, the manager reconnects by
    /// itself after an outage, waiting at most a second between attempts.
    pub async fn from_url(url: &str) -> Result<Self, StoreError> {
        let client = ::redis::Client::open(url).map_err(classify)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(DEFAULT_TIMEOUT))
            .set_response_timeout(None)
            .set_max_delay(DEFAULT_TIMEOUT);
        let connect = async {
            let conn = ConnectionManager::new_with_config(client, config)
                .await
                .map_err(classify)?;
            let store = Self::new(conn);
            store.load_scripts_unbounded().await?;
            Ok(store)
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::unavailable(format!(
                "no connection to Redis within {CONNECT_TIMEOUT:?}"
            ))),
        }
    }

    /// Files every Redis key under `prefix` (default `idempotency:`).
    ///
    /// Keep braces out of the prefix: Redis Cluster hashes the first
    /// `{…}` in a key, and the store's own hash tag follows the prefix.
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Bounds every call (default 1 second). Past the bound a call fails
    /// with [`StoreError::Timeout`].
    ///
    /// Keep it below the layer's
    /// [`with_store_timeout`](crate::IdempotencyLayer::with_store_timeout)
    /// so the store reports its own error first.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The connection the store runs on.
    pub fn connection(&self) -> &ConnectionManager {
        &self.conn
    }

    /// The prefix of every Redis key the store writes.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The bound on every call, as [`with_timeout`](Self::with_timeout)
    /// set it (1 second by default).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The Redis key that holds `key`'s lock or record:
    /// `<prefix>{<64 hex digits>}`.
    pub fn redis_key(&self, key: &StoreKey) -> String {
        let mut out = String::with_capacity(self.prefix.len() + 66);
        out.push_str(&self.prefix);
        out.push('{');
        out.push_str(&key.to_hex());
        out.push('}');
        out
    }

    /// Loads the store's Lua scripts into the server's script cache, in
    /// one round trip, so that the first `complete`, `release` or `extend`
    /// finds them there. Optional: a missing script is loaded on first use.
    /// [`from_url`](Self::from_url) calls it.
    pub async fn load_scripts(&self) -> Result<(), StoreError> {
        self.bounded(self.load_scripts_unbounded()).await
    }

    async fn load_scripts_unbounded(&self) -> Result<(), StoreError> {
        let mut pipe = ::redis::pipe();
        for source in [COMPLETE_SRC, RELEASE_SRC, EXTEND_SRC] {
            pipe.cmd("SCRIPT").arg("LOAD").arg(source).ignore();
        }
        let mut conn = self.conn.clone();
        pipe.exec_async(&mut conn).await.map_err(classify)
    }

    /// Runs `op` within the store's bound.
    async fn bounded<T>(
        &self,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, op).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }

    /// One fenced script call on `key`: `EVALSHA`, and on `NOSCRIPT` the
    /// script is loaded and the call repeated. The whole is bounded.
    async fn fenced(
        &self,
        script: &Script,
        key: &StoreKey,
        token: &LockToken,
        args: impl FnOnce(&mut Cmd),
    ) -> Result<bool, StoreError> {
        let mut cmd = ::redis::cmd("EVALSHA");
        cmd.arg(script.get_hash())
            .arg(1)
            .arg(self.redis_key(key))
            .arg(&fence(token)[..]);
        args(&mut cmd);
        self.bounded(async {
            let mut conn = self.conn.clone();
            let reply = match cmd.query_async::<Value>(&mut conn).await {
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    script.load_async(&mut conn).await.map_err(classify)?;
                    cmd.query_async::<Value>(&mut conn).await
                }
                other => other,
            }
            .map_err(classify)?;
            match reply {
                Value::Int(1) => Ok(true),
                Value::Int(0) => Ok(false),
                other => Err(StoreError::backend(format!(
                    "unexpected reply from an idempotency script: {other:?}"
                ))),
            }
        })
        .await
    }
}

/// The in-flight state byte and the token: the first 17 bytes of the value
/// that `token` holds.
fn fence(token: &LockToken) -> [u8; FENCE_LEN] {
    let mut out = [0u8; FENCE_LEN];
    out[0] = IN_FLIGHT;
    out[1..].copy_from_slice(&token.to_bytes());
    out
}

fn in_flight_value(token: &LockToken, fingerprint: &Fingerprint) -> [u8; IN_FLIGHT_LEN] {
    let mut out = [0u8; IN_FLIGHT_LEN];
    out[..FENCE_LEN].copy_from_slice(&fence(token));
    out[FENCE_LEN..].copy_from_slice(fingerprint.as_bytes());
    out
}

/// The completed value, written straight into the command's buffer: the
/// state byte, then the encoded record.
struct CompletedValue<'a>(&'a [u8]);

impl ToRedisArgs for CompletedValue<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + RedisWrite,
    {
        let mut buf = out.bufmut_for_next_arg(1 + self.0.len());
        buf.put_u8(COMPLETED);
        buf.put_slice(self.0);
    }
}

/// Milliseconds for `PX` and `PEXPIRE`: at least 1, at most
/// [`MAX_EXPIRY`].
fn millis(d: Duration) -> u64 {
    crate::util::millis(d.min(MAX_EXPIRY)).max(1)
}

/// Reads the value `SET … NX GET` found.
fn decode_value(value: Bytes) -> Result<Begin, StoreError> {
    match value.first() {
        Some(&IN_FLIGHT) if value.len() == IN_FLIGHT_LEN => {
            let mut fingerprint = [0u8; 32];
            fingerprint.copy_from_slice(&value[FENCE_LEN..]);
            Ok(Begin::InFlight {
                fingerprint: Some(Fingerprint::from_bytes(fingerprint)),
            })
        }
        Some(&COMPLETED) => Ok(Begin::Completed(Record::decode_bytes(value.slice(1..))?)),
        _ => Err(corrupt(value)),
    }
}

/// A value of an unknown form. It is reported as the record decoder's own
/// error for it, so that every undecodable value is
/// [`StoreError::Corrupt`].
fn corrupt(value: Bytes) -> StoreError {
    match Record::decode_bytes(value) {
        Err(e) => StoreError::Corrupt(e),
        // Not reachable: a record always starts with its magic, never with a
        // state byte. Report it rather than replaying it.
        Ok(_) => StoreError::backend("idempotency value without a state byte"),
    }
}

/// `SET … NX GET` refused as a syntax error: the server predates Redis 7.0.
#[derive(Debug, thiserror::Error)]
#[error("Redis refused SET NX GET: RedisStore needs Redis 7.0 or later")]
struct NeedsRedis7(#[source] RedisError);

fn map_set_err(err: RedisError) -> StoreError {
    let syntax = err.kind() == ErrorKind::Server(ServerErrorKind::ResponseError)
        && err.detail().is_some_and(|d| d.contains("syntax"));
    if syntax {
        StoreError::backend(NeedsRedis7(err))
    } else {
        classify(err)
    }
}

/// Connection-level failures, and replies meaning the server cannot serve
/// now, are `Unavailable`; everything else is `Backend`.
fn classify(err: RedisError) -> StoreError {
    let unavailable = err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
        || matches!(
            err.kind(),
            ErrorKind::AuthenticationFailed
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                )
        );
    if unavailable {
        StoreError::unavailable(err)
    } else {
        StoreError::backend(err)
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let token = LockToken::new();
        let mut cmd = ::redis::cmd("SET");
        cmd.arg(self.redis_key(key))
            .arg(&in_flight_value(&token, fingerprint)[..])
            .arg("NX")
            .arg("PX")
            .arg(millis(lease))
            .arg("GET");
        // If the SET is sent but its answer never arrives, the lock may have
        // been taken under `token`: release it in the background.
        let unsettled = Unsettled::new(self, key, token);
        let reply = self
            .bounded(async {
                let mut conn = self.conn.clone();
                cmd.query_async::<Value>(&mut conn)
                    .await
                    .map_err(map_set_err)
            })
            .await?;
        unsettled.settled();
        match reply {
            Value::Nil => Ok(Begin::Acquired(token)),
            Value::BulkString(bytes) => decode_value(Bytes::from(bytes)),
            other => Err(StoreError::backend(format!(
                "unexpected reply to SET NX GET: {other:?}"
            ))),
        }
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: &LockToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let encoded = record.encode();
        self.fenced(&COMPLETE, key, token, |cmd| {
            cmd.arg(CompletedValue(&encoded)).arg(millis(ttl));
        })
        .await
    }

    async fn release(&self, key: &StoreKey, token: &LockToken) -> Result<bool, StoreError> {
        self.fenced(&RELEASE, key, token, |_| {}).await
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: &LockToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.fenced(&EXTEND, key, token, |cmd| {
            cmd.arg(millis(lease));
        })
        .await
    }
}
