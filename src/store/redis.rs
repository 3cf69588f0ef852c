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
//! `begin` uses `SET … NX GET`. The store talks to one endpoint (a
//! standalone server or primary, or a proxy that routes for a cluster), or
//! to a Redis Cluster: see [Redis Cluster](#redis-cluster).
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
//!   A script missing from the server (after a restart, a failover or
//!   `SCRIPT FLUSH`) is sent once more with `EVAL` and its source, which
//!   caches it again, transparently.
//!
//! A request that runs its handler costs two commands (`SET`, then
//! `EVALSHA` to record or release), plus one `EVALSHA` per heartbeat while
//! a handler outlives a third of its lease; a replay, a conflict or a
//! fingerprint mismatch costs one. [`Store::wait`] keeps the trait's
//! default (a 25 ms sleep, then the layer calls `begin` again) for layers
//! that wait on an in-flight request instead of answering 409.
//!
//! # Redis Cluster
//!
//! [`RedisStore::from_cluster_urls`] connects to a cluster (self-hosted,
//! ElastiCache or MemoryDB in cluster mode, Valkey) through the `redis`
//! crate's [`ClusterConnection`], which follows `MOVED` and `ASK` and
//! refreshes its slot map by itself; [`RedisStore::from_cluster`] takes
//! one the application built. Each key's hash tag puts it in one slot, so
//! every step is still one round trip, to the primary that owns the key:
//!
//! ```no_run
//! use tower_idempotency::IdempotencyLayer;
//! use tower_idempotency::store::redis::RedisStore;
//!
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let store = RedisStore::from_cluster_urls([
//!     "redis://10.0.0.1:6379",
//!     "redis://10.0.0.2:6379",
//!     "redis://10.0.0.3:6379",
//! ])
//! .await?;
//! let layer = IdempotencyLayer::new(store);
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```
//!
//! A primary promoted by a failover, or a restarted node, has not seen the
//! scripts: a `NOSCRIPT` reply makes the store send the same call once
//! more with `EVAL` and the script's source, which reaches whichever node
//! holds the key and leaves the script cached there.
//!
//! ## Replica acknowledgement
//!
//! Redis replicates asynchronously. A primary that acknowledged a lock or
//! a record and failed before its replica received it loses that write
//! when the replica takes over, and the next retry of the key runs the
//! request a second time. With [`with_replica_ack`](RedisStore::with_replica_ack)
//! (one replica, on by default for a cluster) the store pipelines
//! `WAIT <replicas> <ms>` after the lock, the record and each lease
//! extension: no extra round trip, the replication delay added to those
//! steps, and a write too few replicas acknowledged in time fails closed
//! (503) instead of being relied on. A release is not acknowledged: losing
//! one only brings the lock back until its lease ends. `WAIT` narrows the
//! window to writes the primary and its replica both lose; it is not a
//! consensus (see Redis's own documentation of `WAIT`).
//!
//! ## A resent command
//!
//! A reconnect, a redirection or a retry of the cluster client can send a
//! command again after the first one was applied. No step can then run a
//! request twice or break the fence:
//!
//! - `begin`: the second `SET … NX` finds the first one's value. If it
//!   holds this attempt's own token, the store answers
//!   [`Begin::Acquired`], as the first `SET` did; any other value is
//!   another request's lock or record, and nothing is written.
//! - `complete`: the script writes only while the key holds this token in
//!   flight. Resent, it finds the record it wrote, byte for byte, and
//!   answers `1` again; it never overwrites another holder's lock or
//!   record.
//! - `release`: resent, it finds the key gone (or held under another
//!   token) and deletes nothing.
//! - `extend`: fenced by the token; resent, it moves the same lease end.
//! - `WAIT` writes nothing.
//!
//! # Timeouts and errors
//!
//! Every call is bounded by [`with_timeout`](RedisStore::with_timeout)
//! (1 second by default): past it the call fails with
//! [`StoreError::Timeout`]. While Redis is down the connection manager
//! reconnects in the background, and calls fail within that bound in the
//! meantime; no store needs rebuilding once Redis is back. A connection
//! failure is [`StoreError::Unavailable`] (so are `LOADING`, `MASTERDOWN`,
//! `READONLY`, `TRYAGAIN`, `CLUSTERDOWN`, and `MOVED` or `ASK` past the
//! cluster client's retries), a value that does not
//! decode [`StoreError::Corrupt`], anything else [`StoreError::Backend`]. A
//! call cut short by the bound may still have been applied by the server: a
//! `begin` that took the lock then releases it as soon as its answer
//! arrives.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use ::redis::aio::ConnectionManagerConfig;
use ::redis::cluster::ClusterClient;
use ::redis::{
    Cmd, ErrorKind, Pipeline, RedisError, RedisResult, RedisWrite, Script, ServerErrorKind,
    ToRedisArgs, Value,
};
use async_trait::async_trait;
use bytes::{BufMut, Bytes};

/// The `redis` crate this store is built on, so that an application builds
/// its [`ConnectionManager`] with the matching version.
pub use ::redis as driver;
pub use ::redis::aio::ConnectionManager;
pub use ::redis::cluster_async::ClusterConnection;

use super::{
    Begin, DEFAULT_TIMEOUT, LockToken, MAX_EXPIRY, Store, StoreError, StoreKey, Unsettled,
};
use crate::fingerprint::Fingerprint;
use crate::record::Record;

const DEFAULT_PREFIX: &str = "idempotency:";
/// The bound on [`RedisStore::from_url`], connecting and loading the
/// scripts included.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the cluster client retries a call (a redirection, a
/// `TRYAGAIN` or `CLUSTERDOWN`, a lost connection) within the bound.
const CLUSTER_RETRIES: u32 = 3;
/// The cluster connections [`RedisStore::from_cluster_urls`] opens; see
/// [`RedisStore::from_cluster_connections`].
const CLUSTER_CONNECTIONS: usize = 4;

const IN_FLIGHT: u8 = 0x01;
const COMPLETED: u8 = 0x02;
/// State byte and lock token: what the scripts compare.
const FENCE_LEN: usize = 1 + 16;
const IN_FLIGHT_LEN: usize = FENCE_LEN + 32;

/// `ARGV[1]`: the fence (in-flight state and token). `ARGV[2]`: the
/// completed value. `ARGV[3]`: the ttl in milliseconds.
///
/// A value already equal to `ARGV[2]` counts as written: it is what a
/// resent `complete` finds after the first one applied (a reconnect, a
/// cluster redirection, a retry after an unacknowledged write), and
/// reporting it as a lost lease would be wrong. Another holder's record
/// with the very same bytes would be the same response, so `1` is true
/// either way. The comparison runs only when the fence does not match.
const COMPLETE_SRC: &str = "\
if redis.call('GETRANGE', KEYS[1], 0, 16) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
if redis.call('GET', KEYS[1]) == ARGV[2] then
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

/// A [`Store`] in Redis: one server (or primary) through the `redis`
/// crate's auto-reconnecting [`ConnectionManager`], or a Redis Cluster
/// through its [`ClusterConnection`].
///
/// Records are shared by every process that uses the same server (or
/// cluster) and prefix, and expire by Redis's own clock. Cloning is cheap
/// and shares the connection. See the [module docs](self) for the layout,
/// the cluster, replica acknowledgement and an example.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    prefix: String,
    timeout: Duration,
    replica_ack: u32,
}

/// The connection a store runs on.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(Arc<ClusterPool>),
}

/// Cluster connections: the first for plain commands, all in turn for
/// pipelines that end in `WAIT`. A `WAIT` holds up every command sent
/// after it on its connection until the replicas answer, so one
/// multiplexed connection would run the acknowledged writes of the whole
/// process one replica round trip at a time; a few connections let that
/// many wait together, and a replica's one answer releases them all.
struct ClusterPool {
    conns: Box<[ClusterConnection]>,
    next: AtomicUsize,
}

impl ClusterPool {
    fn next(&self) -> ClusterConnection {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        self.conns[i].clone()
    }
}

impl Conn {
    fn cluster(conns: Vec<ClusterConnection>) -> Self {
        Self::Cluster(Arc::new(ClusterPool {
            conns: conns.into_boxed_slice(),
            next: AtomicUsize::new(0),
        }))
    }

    async fn query(&self, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            Self::Single(conn) => cmd.query_async(&mut conn.clone()).await,
            // Without `WAIT` one connection pipelines best.
            Self::Cluster(pool) => cmd.query_async(&mut pool.conns[0].clone()).await,
        }
    }

    async fn query_pipe(&self, pipe: &Pipeline) -> RedisResult<Vec<Value>> {
        match self {
            Self::Single(conn) => pipe.query_async(&mut conn.clone()).await,
            Self::Cluster(pool) => pipe.query_async(&mut pool.next()).await,
        }
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The connection is left out: its address may carry credentials.
        f.debug_struct("RedisStore")
            .field("cluster", &self.is_cluster())
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("replica_ack", &self.replica_ack)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store on `conn`, with the prefix `idempotency:`, a 1 second bound
    /// on every call, and no replica acknowledgement.
    ///
    /// The manager's own response timeout (500 ms unless configured)
    /// applies too; [`from_url`](Self::from_url) turns it off in favour of
    /// [`with_timeout`](Self::with_timeout).
    pub fn new(conn: ConnectionManager) -> Self {
        Self {
            conn: Conn::Single(conn),
            prefix: DEFAULT_PREFIX.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            replica_ack: 0,
        }
    }

    /// A store on a Redis Cluster connection, with the prefix
    /// `idempotency:`, a 1 second bound on every call, and every write
    /// that guards against a second execution (the lock, the record, a
    /// lease extension) acknowledged by one replica
    /// ([`with_replica_ack`](Self::with_replica_ack)).
    ///
    /// The cluster client's own retries and timeouts apply within the
    /// store's bound; [`from_cluster_urls`](Self::from_cluster_urls)
    /// configures them so that a call never outlives it. One built
    /// elsewhere should do the same: its defaults retry 16 times with waits
    /// of at least 1.28 s and no response timeout, so a failover would
    /// surface as [`StoreError::Timeout`] rather than as the
    /// `CLUSTERDOWN` it is.
    pub fn from_cluster(conn: ClusterConnection) -> Self {
        Self::from_cluster_connections(vec![conn])
    }

    /// [`from_cluster`](Self::from_cluster) on several connections, used in
    /// turn. With replica acknowledgement, a `WAIT` holds up everything
    /// sent after it on its connection until a replica answers: on one
    /// connection the acknowledged writes of the whole process run one
    /// replica round trip at a time, on several that many wait together.
    /// [`from_cluster_urls`](Self::from_cluster_urls) opens four.
    ///
    /// # Panics
    ///
    /// If `conns` is empty.
    pub fn from_cluster_connections(conns: Vec<ClusterConnection>) -> Self {
        assert!(!conns.is_empty(), "a cluster store needs a connection");
        Self {
            conn: Conn::cluster(conns),
            prefix: DEFAULT_PREFIX.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            replica_ack: 1,
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
        Self::connect_within(connect).await
    }

    /// Connects to the Redis Cluster that `urls` (one or more of its nodes,
    /// `redis://[user:password@]host:port`) belong to, learns its slot map
    /// and loads the store's scripts on every primary.
    ///
    /// Replica acknowledgement is on (one replica; see
    /// [`with_replica_ack`](Self::with_replica_ack)), over four connections
    /// ([`from_cluster_connections`](Self::from_cluster_connections) says
    /// why). The cluster client
    /// follows `MOVED` and `ASK` and refreshes its slot map by itself, and
    /// is configured so that no call outlives the store's default 1 second
    /// bound: a connection or a response may take 1 second, and a call is
    /// retried at most 3 times after waits of at most 250 ms, so
    /// `CLUSTERDOWN` and `TRYAGAIN` during a failover reach the layer as
    /// [`StoreError::Unavailable`] (503) within the bound.
    ///
    /// Gives up after 2 seconds with [`StoreError::Unavailable`] when no
    /// node can be reached; an invalid URL is [`StoreError::Backend`].
    pub async fn from_cluster_urls<I, S>(urls: I) -> Result<Self, StoreError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let urls: Vec<String> = urls.into_iter().map(|u| u.as_ref().to_owned()).collect();
        let client = ClusterClient::builder(urls)
            .connection_timeout(DEFAULT_TIMEOUT)
            .response_timeout(DEFAULT_TIMEOUT)
            .overall_response_timeout(Some(DEFAULT_TIMEOUT))
            .retries(CLUSTER_RETRIES)
            .min_retry_wait(10)
            .max_retry_wait(250)
            .retry_wait_formula(50, 2)
            .build()
            .map_err(classify)?;
        let connect = async {
            let mut conns = Vec::with_capacity(CLUSTER_CONNECTIONS);
            for _ in 0..CLUSTER_CONNECTIONS {
                conns.push(client.get_async_connection().await.map_err(classify)?);
            }
            let store = Self::from_cluster_connections(conns);
            store.load_scripts_unbounded().await?;
            Ok(store)
        };
        Self::connect_within(connect).await
    }

    async fn connect_within(
        connect: impl Future<Output = Result<Self, StoreError>>,
    ) -> Result<Self, StoreError> {
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
    ///
    /// ```
    /// # async fn f(conn: tower_idempotency::store::redis::ConnectionManager) {
    /// use tower_idempotency::store::redis::RedisStore;
    ///
    /// let store = RedisStore::new(conn).with_prefix("payments:idempotency:");
    /// # }
    /// ```
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

    /// Waits until `replicas` replicas have acknowledged each write that
    /// guards against a second execution: the lock `begin` takes, the
    /// record `complete` writes, and each lease extension. `0` turns it
    /// off. On by default (one replica) for a cluster, off for a single
    /// server, which often has no replica to wait for.
    ///
    /// Redis replicates asynchronously: a primary that fails after
    /// acknowledging a write but before a replica has it loses the write
    /// when the replica takes over, and the next retry of that key runs
    /// the request again. With acknowledgement, `WAIT <replicas> <ms>` is
    /// sent in the same pipeline as the write (no extra round trip; it
    /// costs the replication delay, see BENCHMARKS.md), and a write that
    /// too few replicas acknowledged within half the store's bound fails
    /// closed: the lock is released and `begin` fails with
    /// [`StoreError::Unavailable`] (503, and the client retries later), a
    /// record or an extension fails with it too (the layer retries the
    /// record in the background and the response is still sent). While a
    /// primary has no live replica, its keys therefore answer 503.
    ///
    /// ```
    /// # async fn f(conn: tower_idempotency::store::redis::ConnectionManager) {
    /// use tower_idempotency::store::redis::RedisStore;
    ///
    /// // A primary with replicas behind Sentinel: wait for one of them.
    /// let store = RedisStore::new(conn).with_replica_ack(1);
    /// # }
    /// ```
    #[must_use]
    pub fn with_replica_ack(mut self, replicas: u32) -> Self {
        self.replica_ack = replicas;
        self
    }

    /// The connection manager the store runs on; `None` on a cluster.
    pub fn connection(&self) -> Option<&ConnectionManager> {
        match &self.conn {
            Conn::Single(conn) => Some(conn),
            Conn::Cluster(_) => None,
        }
    }

    /// The (first) cluster connection the store runs on; `None` on a
    /// single server.
    pub fn cluster_connection(&self) -> Option<&ClusterConnection> {
        match &self.conn {
            Conn::Single(_) => None,
            Conn::Cluster(pool) => pool.conns.first(),
        }
    }

    /// Whether the store runs on a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
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

    /// How many replicas must acknowledge a write, as
    /// [`with_replica_ack`](Self::with_replica_ack) set it (`0`: none).
    pub fn replica_ack(&self) -> u32 {
        self.replica_ack
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

    /// Loads the store's Lua scripts into the server's script cache (on a
    /// cluster, every node's), in one round trip per node, so that the
    /// first `complete`, `release` or `extend` finds them there. Optional:
    /// a missing script is sent again in full on first use.
    /// [`from_url`](Self::from_url) and
    /// [`from_cluster_urls`](Self::from_cluster_urls) call it.
    pub async fn load_scripts(&self) -> Result<(), StoreError> {
        self.bounded(self.load_scripts_unbounded()).await
    }

    async fn load_scripts_unbounded(&self) -> Result<(), StoreError> {
        match &self.conn {
            Conn::Single(_) => {
                let mut pipe = ::redis::pipe();
                for source in [COMPLETE_SRC, RELEASE_SRC, EXTEND_SRC] {
                    pipe.cmd("SCRIPT").arg("LOAD").arg(source).ignore();
                }
                self.conn.query_pipe(&pipe).await.map_err(classify)?;
            }
            // The cluster client sends `SCRIPT LOAD` to every node.
            Conn::Cluster(_) => {
                for source in [COMPLETE_SRC, RELEASE_SRC, EXTEND_SRC] {
                    let mut cmd = ::redis::cmd("SCRIPT");
                    cmd.arg("LOAD").arg(source);
                    self.conn.query(&cmd).await.map_err(classify)?;
                }
            }
        }
        Ok(())
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

    /// Sends `cmd`, followed in the same pipeline by `WAIT` when writes
    /// need replica acknowledgement (`ack`): one round trip either way.
    /// Returns the command's reply, and whether enough replicas
    /// acknowledged it (always `true` without `WAIT`).
    async fn send(&self, cmd: Cmd, ack: bool) -> RedisResult<(Value, bool)> {
        if !ack || self.replica_ack == 0 {
            return Ok((self.conn.query(&cmd).await?, true));
        }
        let wait_ms = crate::util::millis(self.timeout / 2).max(1);
        let mut pipe = ::redis::pipe();
        pipe.add_command(cmd)
            .cmd("WAIT")
            .arg(self.replica_ack)
            .arg(wait_ms);
        let mut replies = self.conn.query_pipe(&pipe).await?.into_iter();
        let (Some(reply), Some(acked)) = (replies.next(), replies.next()) else {
            return Err(RedisError::from((
                ErrorKind::Client,
                "a pipeline of two commands got fewer than two replies",
            )));
        };
        let acked = match acked {
            Value::Int(n) => u64::try_from(n).unwrap_or(0) >= u64::from(self.replica_ack),
            _ => false,
        };
        Ok((reply, acked))
    }

    /// One fenced script call on `key`: `EVALSHA` (and `WAIT` if `ack`),
    /// and on `NOSCRIPT`, as on a primary that a failover promoted or a
    /// server restarted since the scripts were loaded, the same call with
    /// `EVAL` and the script's source, which the node it reaches caches.
    /// The whole is bounded.
    async fn fenced(
        &self,
        script: &Script,
        source: &'static str,
        key: &StoreKey,
        token: &LockToken,
        ack: bool,
        args: impl Fn(&mut Cmd),
    ) -> Result<bool, StoreError> {
        let call = |by_hash: bool| {
            let mut cmd = ::redis::cmd(if by_hash { "EVALSHA" } else { "EVAL" });
            if by_hash {
                cmd.arg(script.get_hash());
            } else {
                cmd.arg(source);
            }
            cmd.arg(1).arg(self.redis_key(key)).arg(&fence(token)[..]);
            args(&mut cmd);
            cmd
        };
        self.bounded(async {
            let (reply, acked) = match self.send(call(true), ack).await {
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    self.send(call(false), ack).await
                }
                other => other,
            }
            .map_err(classify)?;
            let done = match reply {
                Value::Int(1) => true,
                Value::Int(0) => false,
                other => {
                    return Err(StoreError::backend(format!(
                        "unexpected reply from an idempotency script: {other:?}"
                    )));
                }
            };
            if done && !acked {
                return Err(not_acknowledged(self.replica_ack));
            }
            Ok(done)
        })
        .await
    }
}

/// A write that too few replicas acknowledged.
fn not_acknowledged(replicas: u32) -> StoreError {
    StoreError::unavailable(format!(
        "the write was not acknowledged by {replicas} replica(s) in time; a failover could lose it"
    ))
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
                        // Slots moving (a failover, a resharding) past the
                        // cluster client's retries.
                        | ServerErrorKind::Moved
                        | ServerErrorKind::Ask
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
        // If the SET is sent but its answer never arrives, or the lock is
        // taken but too few replicas acknowledged it, the lock may be held
        // under `token`: release it in the background.
        let unsettled = Unsettled::new(self, key, token);
        let (reply, acked) = self
            .bounded(async { self.send(cmd, true).await.map_err(map_set_err) })
            .await?;
        let begin = match reply {
            Value::Nil => Begin::Acquired(token),
            // A SET resent after the first one applied (a reconnect, a
            // cluster redirection) finds this very attempt's lock.
            Value::BulkString(bytes) if bytes.starts_with(&fence(&token)) => Begin::Acquired(token),
            Value::BulkString(bytes) => {
                unsettled.settled();
                return decode_value(Bytes::from(bytes));
            }
            other => {
                return Err(StoreError::backend(format!(
                    "unexpected reply to SET NX GET: {other:?}"
                )));
            }
        };
        if !acked {
            return Err(not_acknowledged(self.replica_ack));
        }
        unsettled.settled();
        Ok(begin)
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: &LockToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let encoded = record.encode();
        self.fenced(&COMPLETE, COMPLETE_SRC, key, token, true, |cmd| {
            cmd.arg(CompletedValue(&encoded)).arg(millis(ttl));
        })
        .await
    }

    async fn release(&self, key: &StoreKey, token: &LockToken) -> Result<bool, StoreError> {
        // A release lost in a failover brings the lock back until its lease
        // ends: retries wait, nothing runs twice. No acknowledgement needed.
        self.fenced(&RELEASE, RELEASE_SRC, key, token, false, |_| {})
            .await
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: &LockToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.fenced(&EXTEND, EXTEND_SRC, key, token, true, |cmd| {
            cmd.arg(millis(lease));
        })
        .await
    }
}
