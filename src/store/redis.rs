//! [`RedisStore`]: records shared by every instance of the application
//! through Redis or Redis Cluster, one round trip per step.
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
//! `begin` uses `SET … NX GET`. [`RedisStore`] talks to one endpoint: a
//! standalone server or primary, or a proxy that routes for a cluster.
//! [`RedisClusterStore`] talks to a Redis Cluster itself.
//!
//! # Redis Cluster
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_idempotency::store::redis::RedisClusterStore;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = RedisClusterStore::from_cluster_urls(&[
//!     "redis://10.0.0.1:6379",
//!     "redis://10.0.0.2:6379",
//!     "redis://10.0.0.3:6379",
//! ])
//! .await?;
//! // Replica acknowledgement is on by default on a cluster; this is the
//! // default, spelled out.
//! let store = store.with_replica_ack(1, Duration::from_millis(10));
//! # let _ = store;
//! # Ok(())
//! # }
//! ```
//!
//! [`RedisClusterStore`] (a [`RedisStore`] on the `redis` crate's
//! [`ClusterConnection`]) follows `MOVED` and `ASK` redirections and
//! refreshes its slot map by itself. Any one reachable node is enough to
//! start; listing several lets it start while one of them is down. Every
//! command touches a single key, whose hash tag picks its slot, so each
//! step is still one round trip to the primary that owns the key.
//!
//! The cluster client is configured so that no call outlives the store's
//! bound ([`cluster_client_builder`](RedisStore::cluster_client_builder)):
//! a few quick retries (at most 4, 10 to 100 ms apart, for redirections and
//! `TRYAGAIN`), a connection timeout of half the bound, and a response
//! timeout, per attempt and overall, of the bound. The store wraps every
//! call in the bound as well. While a primary fails over, its slots answer
//! `CLUSTERDOWN` (or the client cannot connect) until a replica is
//! promoted: those calls fail with [`StoreError::Unavailable`] or
//! [`StoreError::Timeout`] within the bound, so the layer answers `503`,
//! and the same store serves again once the promotion is done.
//!
//! Scripts are cached per node, and a replica promoted by a failover has
//! never seen them. On a cluster, a script call refused with `NOSCRIPT` is
//! sent again as `EVAL` with the script's source, routed by its key like
//! the `EVALSHA` was, so it works on whichever node owns the key now (and
//! caches the script there).
//!
//! # Replica acknowledgement (`WAIT`)
//!
//! Redis replicates asynchronously. A primary that acknowledged a lock or a
//! record and died before its replica received it leaves a promoted
//! replica without it, and the next retry of that request runs the handler
//! again. With [`with_replica_ack`](RedisStore::with_replica_ack) the
//! store pipelines `WAIT <replicas> <ms>` after the write, in the same
//! round trip (a script cannot call `WAIT` itself), on `begin`, `complete`
//! and `extend`:
//!
//! - `begin` that took the lock, acknowledged by fewer replicas than asked:
//!   the lock is released (fenced, in the background) and the call fails
//!   with [`StoreError::Unavailable`], so the layer answers `503` and runs
//!   nothing. A lock that may vanish in a failover is not taken.
//! - `complete` acknowledged by fewer replicas: the handler has run and its
//!   response goes out; the record stays on the primary and a warning is
//!   logged (with the key's hash prefix), since a failover before it
//!   replicates would lose it.
//! - `extend` acknowledged by fewer replicas: a warning, as for `complete`.
//!
//! It is **on** for [`RedisClusterStore`] (one replica, 10 ms) and off for
//! the single-endpoint [`RedisStore`]. A cluster is run for failover; the
//! crate's promise is that a request runs once, and a failover without
//! `WAIT` breaks that promise silently, while with it the failure is a
//! `503` the client retries. The price is a replica round trip per write
//! (see the project's benchmarks), and a shard whose replicas are all down
//! or lagging past the `WAIT` timeout answers `503` for its keys until a
//! replica is back. A cluster without replicas, or an application that
//! prefers availability, calls
//! [`without_replica_ack`](RedisStore::without_replica_ack).
//!
//! `WAIT` blocks the connection it was sent on until it returns, and the
//! store multiplexes one connection per node: concurrent calls to the same
//! node queue behind each `WAIT` for one replica round trip each, and
//! behind its whole timeout when no replica answers. Keep the `WAIT`
//! timeout short (a few replica round trips): with 100 ms, a shard that
//! lost its replica under load queued calls faster than it answered them,
//! and its connection stayed jammed past the replica's return.
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
//!   `SCRIPT FLUSH`) is loaded again and the call repeated, transparently.
//! - With replica acknowledgement, `WAIT` travels in the same pipeline.
//!
//! A request that runs its handler costs two commands (`SET`, then
//! `EVALSHA` to record or release), plus one `EVALSHA` per heartbeat while
//! a handler outlives a third of its lease; a replay, a conflict or a
//! fingerprint mismatch costs one. [`Store::wait`] keeps the trait's
//! default (a 25 ms sleep, then the layer calls `begin` again) for layers
//! that wait on an in-flight request instead of answering 409.
//!
//! # Commands sent twice
//!
//! The cluster client sends a command again after a dropped connection, a
//! response timeout or a redirection, and the first copy may have been
//! applied. No step can break fencing or run a request twice that way:
//!
//! - `begin`: the `SET … NX` carries a token drawn for this one call. If
//!   the first copy took the lock, the second finds the key and is a no-op
//!   (`NX`) that returns the value written by the first, with this call's
//!   own token in it: the store recognises its token and reports
//!   [`Begin::Acquired`] with it. Exactly one caller holds the token, so
//!   one handler runs. If another caller took the key between the copies,
//!   the value carries the other token: [`Begin::InFlight`], nothing runs
//!   here. If a failover lost the first copy, the second takes the lock on
//!   the new primary, still for this one caller.
//! - `complete`: the script writes only while the stored value is this
//!   token's in-flight lock. After the first copy wrote the record, the
//!   value is completed, so the second copy changes nothing and answers
//!   `false` (logged by the layer as a lost lease; the record is there and
//!   the response already went out). It can never overwrite a newer
//!   holder's lock or record: their values do not start with this token.
//! - `release`: after the first copy deleted the lock, the second finds
//!   no key, or a newer holder's lock under another token, and deletes
//!   nothing. A retry that took the key in between keeps it.
//! - `extend`: a second `PEXPIRE` under the same fence only moves the
//!   same holder's lease end again by the same amount from now; once the
//!   key is completed, released or taken over, it changes nothing.
//! - `WAIT` changes no data; sent again it only waits again.
//!
//! A call cut short by the store's bound is not sent again by the store.
//! Its copy may still reach the server: a `begin` whose answer never came
//! is released in the background under its own token, so its lock cannot
//! strand a retry.
//!
//! # Timeouts and errors
//!
//! Every call is bounded by [`with_timeout`](RedisStore::with_timeout)
//! (1 second by default): past it the call fails with
//! [`StoreError::Timeout`]. While Redis is down the connection manager
//! reconnects in the background, and calls fail within that bound in the
//! meantime; no store needs rebuilding once Redis is back. A connection
//! failure is [`StoreError::Unavailable`] (so are `LOADING`, `MASTERDOWN`,
//! `READONLY`, `TRYAGAIN`, `CLUSTERDOWN`, `MOVED` and `ASK` replies left
//! after the cluster client's retries, and a slot with no reachable
//! node), a value that does not decode [`StoreError::Corrupt`], anything
//! else [`StoreError::Backend`]. A call cut short by the bound may still
//! have been applied by the server: a `begin` that took the lock then
//! holds it until its lease ends, unless the background release frees it
//! first.

use std::fmt;
use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManagerConfig};
use ::redis::{
    Cmd, ErrorKind, IntoConnectionInfo, RedisError, RedisWrite, Script, ServerErrorKind,
    ToRedisArgs, Value,
};
use async_trait::async_trait;
use bytes::{BufMut, Bytes};

/// The `redis` crate this store is built on, so that an application builds
/// its [`ConnectionManager`] or [`ClusterClient`] with the matching version.
pub use ::redis as driver;
pub use ::redis::aio::ConnectionManager;
pub use ::redis::cluster::{ClusterClient, ClusterClientBuilder};
pub use ::redis::cluster_async::ClusterConnection;

use super::{Begin, LockToken, Store, StoreError, StoreKey, Unsettled};
use crate::fingerprint::Fingerprint;
use crate::record::Record;

const DEFAULT_PREFIX: &str = "idempotency:";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// The bound on [`RedisStore::from_url`] and
/// [`RedisStore::from_cluster_urls`], connecting and loading the scripts
/// included.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Leases and ttls are capped here (about 100 years) so that Redis accepts
/// the expiry.
const MAX_EXPIRY_MS: u64 = 100 * 366 * 24 * 60 * 60 * 1000;
/// The replica acknowledgement a cluster store starts with.
const CLUSTER_REPLICA_ACK: ReplicaAck = ReplicaAck {
    replicas: 1,
    timeout: Duration::from_millis(10),
};
/// Retries the cluster client may spend on one call (redirections,
/// `TRYAGAIN`, reconnections), and the waits between them in ms.
const CLUSTER_RETRIES: u32 = 4;
const CLUSTER_MIN_RETRY_WAIT_MS: u64 = 10;
const CLUSTER_MAX_RETRY_WAIT_MS: u64 = 100;

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
/// [`ConnectionManager`] (the default) or its Redis Cluster client
/// ([`RedisClusterStore`]).
///
/// Records are shared by every process that uses the same server (or
/// cluster) and prefix, and expire by Redis's own clock. Cloning is cheap
/// and shares the connection. See the [module docs](self) for the layout,
/// cluster use and an example.
#[derive(Clone)]
pub struct RedisStore<C = ConnectionManager> {
    conn: C,
    prefix: String,
    timeout: Duration,
    replica_ack: Option<ReplicaAck>,
    /// Whether the connection routes by key over a cluster: scripts that a
    /// node lacks are then sent again as `EVAL`.
    cluster: bool,
}

/// A [`RedisStore`] on Redis Cluster, through the `redis` crate's
/// [`ClusterConnection`]. See the [module docs](self#redis-cluster).
pub type RedisClusterStore = RedisStore<ClusterConnection>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReplicaAck {
    replicas: usize,
    timeout: Duration,
}

impl<C> fmt::Debug for RedisStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The connection is left out: its address may carry credentials.
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("cluster", &self.cluster)
            .field("replica_ack", &self.replica_ack)
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
            replica_ack: None,
            cluster: false,
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
        let client = ::redis::Client::open(url).map_err(map_err)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(DEFAULT_TIMEOUT))
            .set_response_timeout(None)
            .set_max_delay(DEFAULT_TIMEOUT);
        let connect = async {
            let conn = ConnectionManager::new_with_config(client, config)
                .await
                .map_err(map_err)?;
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
}

impl RedisStore<ClusterConnection> {
    /// A store on a Redis Cluster connection, with the prefix
    /// `idempotency:`, a 1 second bound on every call, and replica
    /// acknowledgement on (one replica, 10 ms).
    ///
    /// Build `conn` from
    /// [`cluster_client_builder`](Self::cluster_client_builder) so that the
    /// client's own retries and timeouts stay within the bound; the
    /// `redis` crate's defaults (16 retries, waits of at least 1.28 s, no
    /// response timeout) do not.
    pub fn cluster(conn: ClusterConnection) -> Self {
        Self {
            conn,
            prefix: DEFAULT_PREFIX.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            replica_ack: Some(CLUSTER_REPLICA_ACK),
            cluster: true,
        }
    }

    /// A cluster client builder for `nodes`, configured so that no call
    /// outlives `timeout`: at most 4 retries (redirections, `TRYAGAIN`,
    /// reconnections) 10 to 100 ms apart, a connection timeout of half of
    /// `timeout`, and a response timeout of `timeout`, per attempt and for
    /// the whole call. Add credentials or TLS to it, build it, and pass
    /// the client to [`from_cluster_client`](Self::from_cluster_client).
    pub fn cluster_client_builder<T: IntoConnectionInfo>(
        nodes: impl IntoIterator<Item = T>,
        timeout: Duration,
    ) -> ClusterClientBuilder {
        let timeout = timeout.max(Duration::from_millis(1));
        ClusterClient::builder(nodes)
            .retries(CLUSTER_RETRIES)
            .min_retry_wait(CLUSTER_MIN_RETRY_WAIT_MS)
            .max_retry_wait(CLUSTER_MAX_RETRY_WAIT_MS)
            .retry_wait_formula(CLUSTER_MIN_RETRY_WAIT_MS, 2)
            .connection_timeout(timeout / 2)
            .response_timeout(timeout)
            .overall_response_timeout(Some(timeout))
    }

    /// Connects to the Redis Cluster that `nodes` belong to (one reachable
    /// node is enough; URLs as for [`from_url`](RedisStore::from_url)),
    /// with the bounds of
    /// [`cluster_client_builder`](Self::cluster_client_builder) for a 1
    /// second timeout, and loads the store's scripts on every primary.
    ///
    /// Gives up after 2 seconds with [`StoreError::Unavailable`] when no
    /// node can be reached; an invalid URL is [`StoreError::Backend`].
    pub async fn from_cluster_urls<S: AsRef<str>>(
        nodes: impl IntoIterator<Item = S>,
    ) -> Result<Self, StoreError> {
        let nodes: Vec<String> = nodes.into_iter().map(|n| n.as_ref().to_owned()).collect();
        let client = Self::cluster_client_builder(nodes, DEFAULT_TIMEOUT)
            .build()
            .map_err(map_err)?;
        Self::from_cluster_client(client).await
    }

    /// Connects through `client` (see
    /// [`cluster_client_builder`](Self::cluster_client_builder)) and loads
    /// the store's scripts on every primary it can reach. Gives up after 2
    /// seconds with [`StoreError::Unavailable`].
    pub async fn from_cluster_client(client: ClusterClient) -> Result<Self, StoreError> {
        let connect = async {
            let conn = client.get_async_connection().await.map_err(map_err)?;
            let store = Self::cluster(conn);
            // A primary that cannot be reached now loads them on first use.
            if let Err(e) = store.load_scripts_unbounded().await {
                tracing::debug!(error = %e, "idempotency scripts not loaded on every primary; they load on first use");
            }
            Ok(store)
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::unavailable(format!(
                "no connection to Redis Cluster within {CONNECT_TIMEOUT:?}"
            ))),
        }
    }
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
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
    /// so the store reports its own error first. On a cluster, build the
    /// client for the same bound
    /// ([`cluster_client_builder`](RedisStore::cluster_client_builder)).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Waits, in the same round trip, until `replicas` replicas have
    /// acknowledged each lock, record and lease extension, for at most
    /// `timeout` (`WAIT <replicas> <ms>`; keep it well below the store's
    /// bound). A lock acknowledged by fewer replicas is released and
    /// `begin` fails with [`StoreError::Unavailable`]; a record or an
    /// extension acknowledged by fewer is kept and logged. See the
    /// [module docs](self#replica-acknowledgement-wait).
    ///
    /// On by default for [`RedisClusterStore`] (one replica, 10 ms), off
    /// otherwise. `replicas` of 0 turns it off. Keep `timeout` short: each
    /// `WAIT` holds up the calls behind it on the node's connection.
    #[must_use]
    pub fn with_replica_ack(mut self, replicas: usize, timeout: Duration) -> Self {
        self.replica_ack = (replicas > 0).then_some(ReplicaAck { replicas, timeout });
        self
    }

    /// Writes without waiting for replicas: a failover may then lose a lock
    /// or a record the primary had acknowledged, and a retry run the
    /// request again.
    #[must_use]
    pub fn without_replica_ack(mut self) -> Self {
        self.replica_ack = None;
        self
    }

    /// The replica acknowledgement each write waits for: the number of
    /// replicas and the `WAIT` timeout, or `None`.
    pub fn replica_ack(&self) -> Option<(usize, Duration)> {
        self.replica_ack.map(|ack| (ack.replicas, ack.timeout))
    }

    /// The connection the store runs on.
    pub fn connection(&self) -> &C {
        &self.conn
    }

    /// The prefix of every Redis key the store writes.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The bound on every call.
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

    /// Loads the store's Lua scripts into the server's script cache (on a
    /// cluster, every primary's), so that the first `complete`, `release`
    /// or `extend` finds them there. Optional: a missing script is loaded
    /// on first use. [`from_url`](RedisStore::from_url) and
    /// [`from_cluster_urls`](RedisStore::from_cluster_urls) call it.
    pub async fn load_scripts(&self) -> Result<(), StoreError> {
        self.bounded(self.load_scripts_unbounded()).await
    }

    async fn load_scripts_unbounded(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        if self.cluster {
            // A pipeline goes to one node; each `SCRIPT LOAD` on its own is
            // sent to every primary.
            for source in [COMPLETE_SRC, RELEASE_SRC, EXTEND_SRC] {
                ::redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(source)
                    .exec_async(&mut conn)
                    .await
                    .map_err(map_err)?;
            }
            return Ok(());
        }
        let mut pipe = ::redis::pipe();
        for source in [COMPLETE_SRC, RELEASE_SRC, EXTEND_SRC] {
            pipe.cmd("SCRIPT").arg("LOAD").arg(source).ignore();
        }
        pipe.exec_async(&mut conn).await.map_err(map_err)
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

    /// Sends `cmd`, followed in the same pipeline by `WAIT` when `ack` is
    /// set: the reply, and the number of replicas that acknowledged.
    async fn send(
        &self,
        conn: &mut C,
        cmd: &Cmd,
        ack: Option<ReplicaAck>,
    ) -> Result<(Value, Option<usize>), RedisError> {
        match ack {
            None => Ok((cmd.query_async::<Value>(conn).await?, None)),
            Some(ack) => {
                let mut pipe = ::redis::pipe();
                pipe.add_command(cmd.clone())
                    .cmd("WAIT")
                    .arg(ack.replicas)
                    .arg(wait_millis(ack.timeout));
                let (reply, acked) = pipe.query_async::<(Value, usize)>(conn).await?;
                Ok((reply, Some(acked)))
            }
        }
    }

    /// One fenced script call on `key`: `EVALSHA`, and on `NOSCRIPT` the
    /// script is loaded and the call repeated (on a cluster, sent as
    /// `EVAL`). `ack` pipelines `WAIT` after it. The whole is bounded.
    #[allow(clippy::too_many_arguments)] // private; each is one part of the call
    async fn fenced(
        &self,
        op: &'static str,
        script: &Script,
        source: &str,
        key: &StoreKey,
        token: &LockToken,
        ack: Option<ReplicaAck>,
        args: impl Fn(&mut Cmd),
    ) -> Result<bool, StoreError> {
        let redis_key = self.redis_key(key);
        let fence = fence(token);
        let call = |name: &str, script_arg: &str| {
            let mut cmd = ::redis::cmd(name);
            cmd.arg(script_arg).arg(1).arg(&redis_key).arg(&fence[..]);
            args(&mut cmd);
            cmd
        };
        let cmd = call("EVALSHA", script.get_hash());
        let (reply, acked) = self
            .bounded(async {
                let mut conn = self.conn.clone();
                match self.send(&mut conn, &cmd, ack).await {
                    Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                        if self.cluster {
                            // `SCRIPT LOAD` would go to every primary, and
                            // the key's node may be new: `EVAL` goes to it.
                            self.send(&mut conn, &call("EVAL", source), ack).await
                        } else {
                            script.load_async(&mut conn).await.map_err(map_err)?;
                            self.send(&mut conn, &cmd, ack).await
                        }
                    }
                    other => other,
                }
                .map_err(map_err)
            })
            .await?;
        let done = match reply {
            Value::Int(1) => true,
            Value::Int(0) => false,
            other => {
                return Err(StoreError::backend(format!(
                    "unexpected reply from an idempotency script: {other:?}"
                )));
            }
        };
        if let (true, Some(ack), Some(acked)) = (done, ack, acked)
            && acked < ack.replicas
        {
            tracing::warn!(key = %key, op, acked, wanted = ack.replicas, "written on the primary but acknowledged by fewer replicas than asked: a failover now may lose it");
        }
        Ok(done)
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

/// Milliseconds for `PX` and `PEXPIRE`: at least 1, at most about a
/// century.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_EXPIRY_MS)
}

/// Milliseconds for `WAIT`: at least 1 (0 would wait forever).
fn wait_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_EXPIRY_MS)
}

/// Reads the value `SET … NX GET` found. A lock under `own` is this very
/// call's: a copy of its `SET` sent again after it had been applied.
fn decode_value(value: Bytes, own: &LockToken) -> Result<Begin, StoreError> {
    match value.first() {
        Some(&IN_FLIGHT) if value.len() == IN_FLIGHT_LEN => {
            if value[..FENCE_LEN] == fence(own) {
                return Ok(Begin::Acquired(*own));
            }
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

/// A lock that fewer replicas acknowledged than the store asks for.
#[derive(Debug, thiserror::Error)]
#[error(
    "the lock was acknowledged by {acked} of {wanted} replicas within {timeout:?}; released, nothing ran"
)]
struct TooFewReplicas {
    acked: usize,
    wanted: usize,
    timeout: Duration,
}

fn map_set_err(err: RedisError) -> StoreError {
    let syntax = err.kind() == ErrorKind::Server(ServerErrorKind::ResponseError)
        && err.detail().is_some_and(|d| d.contains("syntax"));
    if syntax {
        StoreError::backend(NeedsRedis7(err))
    } else {
        map_err(err)
    }
}

/// Connection-level failures, and replies meaning the server or cluster
/// cannot serve now, are `Unavailable`; everything else is `Backend`.
fn map_err(err: RedisError) -> StoreError {
    let unavailable = err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
        || matches!(
            err.kind(),
            ErrorKind::AuthenticationFailed
                | ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
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
impl<C> Store for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
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
        let ack = self.replica_ack;
        let (reply, acked) = self
            .bounded(async {
                let mut conn = self.conn.clone();
                self.send(&mut conn, &cmd, ack).await.map_err(map_set_err)
            })
            .await?;
        let found = match reply {
            Value::Nil => Ok(Begin::Acquired(token)),
            Value::BulkString(bytes) => decode_value(Bytes::from(bytes), &token),
            other => Err(StoreError::backend(format!(
                "unexpected reply to SET NX GET: {other:?}"
            ))),
        };
        let begin = match found {
            Ok(Begin::Acquired(token)) => Begin::Acquired(token),
            other => {
                // Nothing was written under `token`.
                unsettled.settled();
                return other;
            }
        };
        if let (Some(ack), Some(acked)) = (ack, acked)
            && acked < ack.replicas
        {
            // A lock a failover may lose is not taken: `unsettled`
            // releases it in the background, under this token only.
            tracing::warn!(key = %key, acked, wanted = ack.replicas, "lock acknowledged by fewer replicas than asked; released, answering unavailable");
            return Err(StoreError::unavailable(TooFewReplicas {
                acked,
                wanted: ack.replicas,
                timeout: ack.timeout,
            }));
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
        self.fenced(
            "complete",
            &COMPLETE,
            COMPLETE_SRC,
            key,
            token,
            self.replica_ack,
            |cmd| {
                cmd.arg(CompletedValue(&encoded)).arg(millis(ttl));
            },
        )
        .await
    }

    async fn release(&self, key: &StoreKey, token: &LockToken) -> Result<bool, StoreError> {
        // A lost release only keeps a lock until its lease ends: no WAIT.
        self.fenced("release", &RELEASE, RELEASE_SRC, key, token, None, |_| {})
            .await
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: &LockToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.fenced(
            "extend",
            &EXTEND,
            EXTEND_SRC,
            key,
            token,
            self.replica_ack,
            |cmd| {
                cmd.arg(millis(lease));
            },
        )
        .await
    }
}
