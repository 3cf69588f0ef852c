//! `RedisStore` against a real Redis: the conformance suite, two layer
//! instances sharing one server, an outage and recovery, a frozen server,
//! the key layout and its cluster slot, undecodable values, and the
//! commands each request costs.
//!
//! The shared server comes from `REDIS_URL`, or else the standard local
//! address (`redis://127.0.0.1:6379`). Some tests start a private
//! `redis-server` of their own on a spare loopback port. If neither can be
//! had the tests are skipped, unless `CI=true`, where they fail.

#![cfg(all(feature = "redis", feature = "test-util"))]
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::StatusCode;
use common::{Counter, call_post, post_req, problem, scan, send};
use tower_idempotency::store::redis::{RedisStore, driver};
use tower_idempotency::test_util::{random_key, sample_record};
use tower_idempotency::{
    IdempotencyLayer,
    fingerprint::Fingerprint,
    record::Record,
    store::{Begin, Store, StoreError},
};

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

fn redis_url() -> Option<String> {
    common::backend(common::REDIS)
}

/// A prefix of its own for every store, so parallel tests never meet.
fn unique_prefix() -> String {
    format!("test:{}:", uuid::Uuid::new_v4().simple())
}

async fn store_on(url: &str) -> RedisStore {
    RedisStore::from_url(url)
        .await
        .unwrap()
        .with_prefix(unique_prefix())
}

/// For the conformance suite: a prefix of its own per check, whose keys
/// the teardown deletes.
async fn store() -> Option<(Arc<dyn Store>, (String, String))> {
    let url = redis_url()?;
    let store = store_on(&url).await;
    let prefix = store.prefix().to_owned();
    Some((Arc::new(store), (url, prefix)))
}

async fn delete_keys((url, prefix): (String, String)) {
    common::delete_prefix(&url, &prefix).await;
}

mod conformance {
    tower_idempotency::store_conformance_tests!(super::store, super::delete_keys);
}

async fn raw(url: &str) -> driver::aio::MultiplexedConnection {
    driver::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

fn fp(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

// A private redis-server.

fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    listener.local_addr().unwrap().port()
}

/// A `redis-server` child process on a loopback port, killed on drop (also
/// when the test fails).
struct Server {
    port: u16,
    child: Option<Child>,
}

impl Server {
    /// Starts a server, or returns `None` (after saying why) when
    /// `redis-server` is not installed and CI is not set.
    fn start() -> Option<Self> {
        let installed = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            if common::in_ci() {
                panic!(
                    "redis-server is not on PATH, and CI=true: the Redis tests may not be skipped"
                );
            }
            eprintln!("skipping: redis-server not on PATH");
            return None;
        }
        let mut server = Self {
            port: free_port(),
            child: None,
        };
        server.restart();
        Some(server)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// (Re)starts the server on its port and waits until it accepts
    /// connections.
    fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_err() {
            let exited = self.child.as_mut().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none(),
                "redis-server exited on port {}: {exited:?}",
                self.port
            );
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_some() {
            // A frozen server must be woken to die promptly.
            let _ = Command::new("kill")
                .args(["-CONT", &self.pid().to_string()])
                .status();
        }
        self.kill();
    }
}

// Two layer instances, one Redis.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_layers_share_one_redis() {
    let Some(url) = redis_url() else { return };
    let prefix = unique_prefix();
    let _cleanup = common::DeleteOnDrop::new(&url, &prefix);
    let counter = Counter::default();
    let mut apps: Vec<Router> = Vec::new();
    for _ in 0..2 {
        let store = RedisStore::from_url(&url)
            .await
            .unwrap()
            .with_prefix(prefix.clone());
        apps.push(common::router(counter.clone()).layer(IdempotencyLayer::new(store)));
    }

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100 {
        let app = apps[i % 2].clone();
        // Spread over 400 ms, twice the handler's time: the later ones
        // arrive after the record is written.
        let offset = Duration::from_millis(8 * (i as u64 / 2));
        tasks.spawn(async move {
            tokio::time::sleep(offset).await;
            let req = post_req(Some("shared-key"))
                .header("x-delay-ms", "200")
                .body(Body::from(r#"{"amount":10}"#))
                .unwrap();
            send(&app, req).await
        });
    }
    let (mut executed, mut conflicts, mut replays) = (0, 0, 0);
    while let Some(joined) = tasks.join_next().await {
        let (status, headers, body) = joined.unwrap();
        match status {
            StatusCode::CREATED if headers.get("idempotent-replayed").is_none() => {
                assert_eq!(headers["x-execution"], "1");
                executed += 1;
            }
            StatusCode::CREATED => {
                assert_eq!(headers["idempotent-replayed"], "true");
                assert_eq!(headers["x-execution"], "1");
                assert_eq!(body, r#"{"amount":10}"#);
                replays += 1;
            }
            StatusCode::CONFLICT => {
                problem(status, &headers, &body);
                conflicts += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    eprintln!("1 execution, {conflicts} conflicts, {replays} replays");
    assert_eq!(counter.get(), 1, "the handler ran more than once");
    assert_eq!(executed, 1);
    assert_eq!(executed + conflicts + replays, 100);
    assert!(conflicts > 0, "no request met the lock");

    // Afterwards both instances replay the one record.
    for app in &apps {
        let (status, headers, body) = call_post(app, Some("shared-key"), r#"{"amount":10}"#).await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(headers["idempotent-replayed"], "true");
        assert_eq!(headers["x-execution"], "1");
        assert_eq!(body, r#"{"amount":10}"#);
    }
    assert_eq!(counter.get(), 1);
}

// Outage and recovery.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_answers_503_in_bound_then_recovers_without_a_new_store() {
    let Some(mut server) = Server::start() else {
        return;
    };
    let store = RedisStore::from_url(&server.url())
        .await
        .unwrap()
        .with_prefix(unique_prefix());
    let counter = Counter::default();
    let app = common::router(counter.clone()).layer(IdempotencyLayer::new(store));

    let (status, _, _) = call_post(&app, Some("before"), "{}").await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, headers, _) = call_post(&app, Some("before"), "{}").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");

    // Long enough for the manager to run out of reconnection attempts
    // (6, at most a second apart) and start again.
    server.kill();
    let killed = Instant::now();
    let mut i = 0;
    while killed.elapsed() < Duration::from_secs(8) {
        i += 1;
        let started = Instant::now();
        let (status, headers, body) = call_post(&app, Some(&format!("during-{i}")), "{}").await;
        let elapsed = started.elapsed();
        eprintln!("during the outage: {status} in {elapsed:?}");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "request {i}");
        problem(status, &headers, &body);
        assert!(headers.contains_key("retry-after"));
        assert!(
            elapsed < Duration::from_millis(2500),
            "request {i} took {elapsed:?} during the outage"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(counter.get(), 1, "no handler runs without its lock");

    server.restart();
    let restarted = Instant::now();
    let deadline = restarted + Duration::from_secs(10);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let key = format!("after-{attempt}");
        let (status, _, _) = call_post(&app, Some(&key), "{}").await;
        if status == StatusCode::CREATED {
            eprintln!("recovered {:?} after the restart", restarted.elapsed());
            let (status, headers, _) = call_post(&app, Some(&key), "{}").await;
            assert_eq!(status, StatusCode::CREATED);
            assert_eq!(headers["idempotent-replayed"], "true");
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            Instant::now() < deadline,
            "no recovery within 10 s of the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_frozen_server_times_out_within_the_bound() {
    let Some(server) = Server::start() else {
        return;
    };
    let store = RedisStore::from_url(&server.url())
        .await
        .unwrap()
        .with_prefix(unique_prefix())
        .with_timeout(Duration::from_millis(300));
    let ok = random_key();
    assert!(matches!(
        store.begin(&ok, &fp(1), LEASE).await.unwrap(),
        Begin::Acquired(_)
    ));

    server.signal("-STOP");
    let started = Instant::now();
    let frozen = random_key();
    let err = store.begin(&frozen, &fp(1), LEASE).await.unwrap_err();
    assert!(matches!(err, StoreError::Timeout(d) if d == Duration::from_millis(300)));
    assert!(started.elapsed() < Duration::from_secs(1));
    let started = Instant::now();
    let token = tower_idempotency::store::LockToken::new();
    let err = store.release(&ok, &token).await.unwrap_err();
    assert!(matches!(err, StoreError::Timeout(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(1));

    server.signal("-CONT");
    let after = random_key();
    assert!(matches!(
        store.begin(&after, &fp(1), LEASE).await.unwrap(),
        Begin::Acquired(_)
    ));
}

#[tokio::test]
async fn from_url_fails_fast() {
    // Nothing listens on a port just released.
    let port = free_port();
    let started = Instant::now();
    let err = RedisStore::from_url(&format!("redis://127.0.0.1:{port}"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "took {:?}",
        started.elapsed()
    );

    let err = RedisStore::from_url("not a url").await.unwrap_err();
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
}

// Layout and cluster safety.

/// CRC16/XMODEM, the checksum Redis Cluster hashes keys with.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The cluster slot of `key`: the hash tag (the first `{…}` with something
/// inside) if there is one, else the whole key.
fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&c| c == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        rest.iter()
            .position(|&c| c == b'}')
            .filter(|&len| len > 0)
            .map(|len| &rest[..len])
    });
    crc16(tagged.unwrap_or(key)) % 16384
}

#[test]
fn key_slot_matches_redis() {
    assert_eq!(crc16(b"123456789"), 0x31C3);
    assert_eq!(key_slot(b"somekey"), 11058);
    assert_eq!(key_slot(b"foo"), 12182);
    assert_eq!(key_slot(b"{foo}.bar"), 12182);
    assert_ne!(key_slot(b"{}foo"), key_slot(b"foo"));
}

#[tokio::test]
async fn one_redis_key_per_idempotency_key_in_the_slot_of_its_hash() {
    let Some(url) = redis_url() else { return };
    let store = store_on(&url).await;
    let _cleanup = common::DeleteOnDrop::new(&url, store.prefix());
    let mut conn = raw(&url).await;

    let done = random_key();
    let token = match store.begin(&done, &fp(1), LEASE).await.unwrap() {
        Begin::Acquired(token) => token,
        other => panic!("{other:?}"),
    };
    let held = random_key();
    assert!(matches!(
        store.begin(&held, &fp(2), LEASE).await.unwrap(),
        Begin::Acquired(_)
    ));
    let record = sample_record(fp(1), 64);
    assert!(store.complete(&done, &token, &record, TTL).await.unwrap());

    let keys = scan(&mut conn, store.prefix()).await;
    let mut expected = vec![store.redis_key(&done), store.redis_key(&held)];
    expected.sort();
    assert_eq!(keys, expected, "exactly one Redis key per idempotency key");

    for key in [&done, &held] {
        let hex = key.to_hex();
        let written: Vec<&String> = keys.iter().filter(|k| k.contains(&hex)).collect();
        assert_eq!(written.len(), 1);
        for redis_key in written {
            assert_eq!(*redis_key, format!("{}{{{hex}}}", store.prefix()));
            assert_eq!(
                key_slot(redis_key.as_bytes()),
                crc16(hex.as_bytes()) % 16384
            );
        }
        // The slot is the hash's whatever the prefix.
        let other = RedisStore::new(store.connection().unwrap().clone()).with_prefix("elsewhere:");
        assert_eq!(
            key_slot(other.redis_key(key).as_bytes()),
            key_slot(store.redis_key(key).as_bytes())
        );
    }
    let default = RedisStore::new(store.connection().unwrap().clone());
    assert_eq!(
        default.redis_key(&done),
        format!("idempotency:{{{}}}", done.to_hex())
    );
}

#[tokio::test]
async fn values_and_expiry_are_as_documented() {
    let Some(url) = redis_url() else { return };
    let store = store_on(&url).await;
    let _cleanup = common::DeleteOnDrop::new(&url, store.prefix());
    let mut conn = raw(&url).await;
    let key = random_key();
    let rkey = store.redis_key(&key);
    let lease = Duration::from_secs(20);

    let token = match store.begin(&key, &fp(3), lease).await.unwrap() {
        Begin::Acquired(token) => token,
        other => panic!("{other:?}"),
    };
    let value: Vec<u8> = driver::cmd("GET")
        .arg(&rkey)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(value.len(), 49);
    assert_eq!(value[0], 0x01);
    assert_eq!(value[1..17], token.to_bytes());
    assert_eq!(value[17..], [3u8; 32]);
    let pttl: i64 = driver::cmd("PTTL")
        .arg(&rkey)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((19_000..=20_000).contains(&pttl), "lease pttl {pttl}");

    assert!(
        store
            .extend(&key, &token, Duration::from_secs(40))
            .await
            .unwrap()
    );
    let pttl: i64 = driver::cmd("PTTL")
        .arg(&rkey)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((39_000..=40_000).contains(&pttl), "extended pttl {pttl}");

    let record = sample_record(fp(3), 100);
    assert!(
        store
            .complete(&key, &token, &record, Duration::from_secs(600))
            .await
            .unwrap()
    );
    let value: Vec<u8> = driver::cmd("GET")
        .arg(&rkey)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(value[0], 0x02);
    assert_eq!(Record::decode(&value[1..]).unwrap(), record);
    let pttl: i64 = driver::cmd("PTTL")
        .arg(&rkey)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((599_000..=600_000).contains(&pttl), "ttl pttl {pttl}");

    // A completed record is not a lock: nothing more to extend or release.
    assert!(!store.extend(&key, &token, lease).await.unwrap());
    assert!(!store.release(&key, &token).await.unwrap());
    assert!(matches!(
        store.begin(&key, &fp(9), lease).await.unwrap(),
        Begin::Completed(r) if r == record
    ));

    let shown = format!("{store:?}");
    assert!(shown.contains(store.prefix()), "{shown}");
    assert!(!shown.contains("127.0.0.1"), "{shown}");
}

#[tokio::test]
async fn undecodable_values_are_errors_not_replays() {
    let Some(url) = redis_url() else { return };
    let store = store_on(&url).await;
    let _cleanup = common::DeleteOnDrop::new(&url, store.prefix());
    let mut conn = raw(&url).await;
    let shared = conn.clone();
    let set = |key: String, value: Vec<u8>| {
        let mut conn = shared.clone();
        async move {
            let () = driver::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(60_000)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    };

    // An unknown state byte, a short lock, a record with a flipped byte.
    let mut flipped = vec![0x02];
    flipped.extend_from_slice(&sample_record(fp(4), 32).encode());
    let last = flipped.len() - 1;
    flipped[last] ^= 0x01;
    for value in [b"\x07garbage".to_vec(), vec![0x01; 20], flipped, Vec::new()] {
        let key = random_key();
        set(store.redis_key(&key), value.clone()).await;
        let err = store.begin(&key, &fp(4), LEASE).await.unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{value:?}: {err:?}");
    }

    // A key of another type: the backend's error, nothing overwritten.
    let key = random_key();
    let rkey = store.redis_key(&key);
    let _: i64 = driver::cmd("RPUSH")
        .arg(&rkey)
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: i64 = driver::cmd("PEXPIRE")
        .arg(&rkey)
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let err = store.begin(&key, &fp(4), LEASE).await.unwrap_err();
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
    let token = tower_idempotency::store::LockToken::new();
    let err = store.release(&key, &token).await.unwrap_err();
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
    let len: i64 = driver::cmd("LLEN")
        .arg(&rkey)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 1);
}

// Commands per request.

#[test]
fn resp_requests_are_split() {
    let two = b"*1\r\n$4\r\nPING\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$4\r\n*\r\n*\r\n";
    let (name, used) = common::resp::command(two).unwrap();
    assert_eq!((name.as_str(), used), ("ping", 14));
    let (name, rest) = common::resp::command(&two[used..]).unwrap();
    assert_eq!((name.as_str(), rest), ("set", two.len() - used));
    for cut in 0..two.len() - used {
        assert!(common::resp::command(&two[used..used + cut]).is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_per_request() {
    // A server of this test's own: SCRIPT FLUSH touches every client.
    let Some(server) = Server::start() else {
        return;
    };
    let (port, wire) = common::resp::counting_proxy(server.port).await;
    let store = RedisStore::from_url(&format!("redis://127.0.0.1:{port}"))
        .await
        .unwrap()
        .with_prefix(unique_prefix());
    let counter = Counter::default();
    let app = common::router(counter.clone()).layer(IdempotencyLayer::new(store));
    // Straight to the server, past the proxy.
    let mut conn = raw(&server.url()).await;

    macro_rules! measure {
        ($what:literal, $expected:expr, $run:expr) => {{
            let start = wire.len();
            let out = $run;
            let got = wire.since(start);
            eprintln!("{}: {:?}", $what, got);
            assert_eq!(got, $expected, "{}", $what);
            out
        }};
    }

    // First execution: begin (SET) and complete (EVALSHA).
    let (status, _, _) = measure!(
        "first execution",
        ["set", "evalsha"],
        call_post(&app, Some("rt-1"), "{}").await
    );
    assert_eq!(status, StatusCode::CREATED);

    // Replay: one SET that finds the record.
    let (status, headers, _) =
        measure!("replay", ["set"], call_post(&app, Some("rt-1"), "{}").await);
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");

    // Same key, different body: one SET.
    let (status, _, _) = measure!(
        "fingerprint mismatch",
        ["set"],
        call_post(&app, Some("rt-1"), r#"{"other":true}"#).await
    );
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    // Conflict: one SET that finds the lock.
    let holder = {
        let app = app.clone();
        tokio::spawn(async move {
            let req = post_req(Some("rt-2"))
                .header("x-delay-ms", "600")
                .body(Body::from("{}"))
                .unwrap();
            send(&app, req).await
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (status, _, _) = measure!(
        "conflict",
        ["set"],
        call_post(&app, Some("rt-2"), "{}").await
    );
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(holder.await.unwrap().0, StatusCode::CREATED);

    // A response that is not recorded: begin and release.
    let (status, _, _) = measure!(
        "not recorded",
        ["set", "evalsha"],
        send(
            &app,
            post_req(Some("rt-3"))
                .header("x-status", "500")
                .body(Body::from("{}"))
                .unwrap()
        )
        .await
    );
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);

    // After SCRIPT FLUSH the call is sent again with the script's source,
    // which caches it: the refused EVALSHA, then EVAL.
    let () = driver::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (status, _, _) = measure!(
        "first execution after SCRIPT FLUSH",
        ["set", "evalsha", "eval"],
        call_post(&app, Some("rt-4"), "{}").await
    );
    assert_eq!(status, StatusCode::CREATED);
    let (status, headers, _) = call_post(&app, Some("rt-4"), "{}").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(counter.get(), 4);
}

#[tokio::test]
async fn a_4_mib_record_replays_through_the_layer() {
    let Some(url) = redis_url() else { return };
    let counter = Counter::default();
    let prefix = unique_prefix();
    let store = RedisStore::from_url(&url)
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    // A short ttl, and a cleanup below: 4 MiB must not stay in the shared
    // Redis for a day after every run.
    let app = common::router(counter.clone())
        .layer(IdempotencyLayer::new(store).with_ttl(Duration::from_secs(60)));
    let req = || {
        post_req(Some("big"))
            .header("x-size", (4 * 1024 * 1024 - 1).to_string())
            .body(Body::from("{}"))
            .unwrap()
    };
    let (status, _, first) = send(&app, req()).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, headers, replay) = send(&app, req()).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(replay.len(), first.len());
    assert!(replay == first);
    assert_eq!(counter.get(), 1);
    common::delete_prefix(&url, &prefix).await;
}

/// A `begin` whose answer never arrives (the server froze after receiving
/// the SET) must not strand the lock it may have taken: the store releases
/// it under the attempt's own token, so a retry soon acquires the key
/// instead of waiting out the 30 s lease.
#[tokio::test]
async fn an_unanswered_begin_does_not_strand_its_lock() {
    let Some(server) = Server::start() else {
        return;
    };
    let store = RedisStore::from_url(&server.url())
        .await
        .unwrap()
        .with_prefix(unique_prefix())
        .with_timeout(Duration::from_millis(300));
    let key = random_key();
    server.signal("-STOP");
    let err = store.begin(&key, &fp(1), LEASE).await.unwrap_err();
    assert!(matches!(err, StoreError::Timeout(_)), "{err:?}");
    // The SET runs now, under a token nobody holds.
    server.signal("-CONT");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match store.begin(&key, &fp(1), LEASE).await.unwrap() {
            Begin::Acquired(_) => break,
            Begin::InFlight { .. } => {
                assert!(
                    Instant::now() < deadline,
                    "the unanswered begin's lock was never released"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
