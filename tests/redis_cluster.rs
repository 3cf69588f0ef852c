//! `RedisClusterStore` against a real Redis Cluster (3 primaries, 3
//! replicas): the conformance suite with keys on every primary, two layer
//! instances sharing the cluster, the commands each step costs on the
//! primary that owns the key, and a primary killed during a duplicate-heavy
//! load, with replica acknowledgement on and off.
//!
//! The cluster comes from `REDIS_CLUSTER_URLS` (comma-separated node URLs),
//! or else the ports `scripts/redis-cluster.sh start` uses
//! (`redis://127.0.0.1:7101` to `7106`). If neither answers the tests are
//! skipped, unless `CI=true`, where they fail. The failover test kills a
//! node by the PID file the script wrote (in `REDIS_CLUSTER_DIR`, default
//! `/tmp/tower-idempotency-redis-cluster`) and starts it again with the
//! script. The tests take turns: they count commands per node and kill
//! nodes, so none may run beside another.

#![cfg(all(feature = "redis", feature = "test-util"))]
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use common::{Counter, call_post, post_req, send};
use tower_idempotency::store::redis::{RedisClusterStore, driver};
use tower_idempotency::test_util::{self, random_key, sample_record};
use tower_idempotency::{Begin, Fingerprint, IdempotencyLayer, Store};

const DEFAULT_URLS: &str = "redis://127.0.0.1:7101,redis://127.0.0.1:7102,redis://127.0.0.1:7103,redis://127.0.0.1:7104,redis://127.0.0.1:7105,redis://127.0.0.1:7106";
const LEASE: Duration = Duration::from_secs(30);

/// One test at a time (see the module docs).
static TURN: LazyLock<tokio::sync::Mutex<()>> = LazyLock::new(|| tokio::sync::Mutex::new(()));

/// The cluster's node URLs: `REDIS_CLUSTER_URLS`, or the script's ports if
/// the first answers. `None` (after one visible line) when nothing
/// answers, outside CI; under `CI=true` it panics.
fn cluster_urls() -> Option<Vec<String>> {
    static RESOLVED: LazyLock<Option<Vec<String>>> = LazyLock::new(|| {
        let (raw, from) = match std::env::var("REDIS_CLUSTER_URLS") {
            Ok(v) if !v.trim().is_empty() => (v, "REDIS_CLUSTER_URLS"),
            _ => (DEFAULT_URLS.to_owned(), "the standard local ports"),
        };
        let urls: Vec<String> = raw
            .split(',')
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        let answers = urls.iter().any(|u| listening(u));
        if answers {
            eprintln!(
                "[backends] redis_cluster: REDIS_CLUSTER_URLS ran against {} nodes (from {from})",
                urls.len()
            );
            Some(urls)
        } else if common::in_ci() {
            panic!(
                "REDIS_CLUSTER_URLS: no node answers ({from}), and CI=true: these tests may not be skipped; start one with scripts/redis-cluster.sh start"
            );
        } else {
            eprintln!(
                "[backends] redis_cluster: REDIS_CLUSTER_URLS SKIPPED: no node answers (from {from}); start one with scripts/redis-cluster.sh start"
            );
            None
        }
    });
    RESOLVED.clone()
}

fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, h)| h)
        .to_owned()
}

fn listening(url: &str) -> bool {
    host_port(url)
        .to_socket_addrs()
        .ok()
        .into_iter()
        .flatten()
        .any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok())
}

fn unique_prefix() -> String {
    format!("test:{}:", uuid::Uuid::new_v4().simple())
}

async fn cluster_store(urls: &[String]) -> RedisClusterStore {
    RedisClusterStore::from_cluster_urls(urls)
        .await
        .unwrap()
        .with_prefix(unique_prefix())
}

async fn node(addr: &str) -> driver::aio::MultiplexedConnection {
    driver::Client::open(format!("redis://{addr}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The primaries by address, with their slot ranges, as a live node sees
/// them (`CLUSTER SLOTS`).
async fn primaries(urls: &[String]) -> BTreeMap<String, Vec<(i64, i64)>> {
    for url in urls {
        let Ok(client) = driver::Client::open(url.as_str()) else {
            continue;
        };
        let Ok(Ok(mut conn)) = tokio::time::timeout(
            Duration::from_secs(1),
            client.get_multiplexed_async_connection(),
        )
        .await
        else {
            continue;
        };
        let Ok(slots) = driver::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async::<driver::Value>(&mut conn)
            .await
        else {
            continue;
        };
        let mut out: BTreeMap<String, Vec<(i64, i64)>> = BTreeMap::new();
        let driver::Value::Array(ranges) = slots else {
            continue;
        };
        for range in ranges {
            let driver::Value::Array(items) = range else {
                continue;
            };
            let (Some(driver::Value::Int(start)), Some(driver::Value::Int(end))) =
                (items.first(), items.get(1))
            else {
                continue;
            };
            let Some(driver::Value::Array(primary)) = items.get(2) else {
                continue;
            };
            let host = match primary.first() {
                Some(driver::Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                _ => continue,
            };
            let Some(driver::Value::Int(port)) = primary.get(1) else {
                continue;
            };
            out.entry(format!("{host}:{port}"))
                .or_default()
                .push((*start, *end));
        }
        return out;
    }
    panic!("no node answers CLUSTER SLOTS");
}

/// The primary that owns `redis_key`, by `CLUSTER KEYSLOT` and
/// `CLUSTER SLOTS`.
async fn owner(urls: &[String], redis_key: &str) -> String {
    let layout = primaries(urls).await;
    let mut conn = node(layout.keys().next().unwrap()).await;
    let slot: i64 = driver::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(redis_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    layout
        .into_iter()
        .find(|(_, ranges)| ranges.iter().any(|&(a, b)| (a..=b).contains(&slot)))
        .map(|(addr, _)| addr)
        .unwrap()
}

/// The keys under `prefix` on each primary (a `SCAN` sees one node only).
async fn keys_per_primary(urls: &[String], prefix: &str) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for addr in primaries(urls).await.keys() {
        let mut conn = node(addr).await;
        out.insert(addr.clone(), common::scan(&mut conn, prefix).await);
    }
    out
}

/// Deletes every key under `prefix` on every primary (one `DEL` per key:
/// keys in different slots cannot share one), then checks none is left.
async fn cleanup(urls: &[String], prefix: &str) {
    for (addr, keys) in keys_per_primary(urls, prefix).await {
        let mut conn = node(&addr).await;
        for key in keys {
            let _: i64 = driver::cmd("DEL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }
    let left: usize = keys_per_primary(urls, prefix)
        .await
        .values()
        .map(Vec::len)
        .sum();
    assert_eq!(left, 0, "keys left under {prefix}");
}

fn fp(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

// The conformance suite, keys on every primary.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_on_the_cluster_with_keys_on_every_primary() {
    let Some(urls) = cluster_urls() else { return };
    let _turn = TURN.lock().await;
    let store = cluster_store(&urls).await;
    let prefix = store.prefix().to_owned();
    assert_eq!(store.replica_ack(), Some((1, Duration::from_millis(10))));
    let shared: Arc<dyn Store> = Arc::new(store.clone());
    let started = Instant::now();
    test_util::begin_is_exclusive(shared.clone()).await;
    test_util::replay_after_complete(shared.clone()).await;
    test_util::stored_fingerprint_is_returned(shared.clone()).await;
    test_util::fencing_after_lease_expiry(shared.clone()).await;
    test_util::release_allows_retry(shared.clone()).await;
    test_util::extend_keeps_the_lock(shared.clone()).await;
    test_util::ttl_expires(shared.clone()).await;
    test_util::large_record_round_trip(shared.clone()).await;
    test_util::value_record_round_trip(shared.clone()).await;
    test_util::complete_without_lock_is_refused(shared.clone()).await;
    test_util::keys_are_independent(shared.clone()).await;
    eprintln!("conformance suite on the cluster: {:?}", started.elapsed());

    let after_suite = keys_per_primary(&urls, &prefix).await;
    let holding = after_suite.values().filter(|k| !k.is_empty()).count();
    eprintln!(
        "conformance keys per primary: {:?}",
        after_suite
            .iter()
            .map(|(a, k)| (a.clone(), k.len()))
            .collect::<Vec<_>>()
    );
    assert!(holding >= 2, "the suite's keys landed on {holding} primary");

    // Thirty more keys, locked and completed: every primary owns some.
    let mut by_owner: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..30 {
        let key = random_key();
        let Begin::Acquired(token) = store.begin(&key, &fp(1), LEASE).await.unwrap() else {
            panic!("a fresh key was taken");
        };
        let record = sample_record(fp(1), 16);
        assert!(
            store
                .complete(&key, &token, &record, Duration::from_secs(60))
                .await
                .unwrap()
        );
        *by_owner
            .entry(owner(&urls, &store.redis_key(&key)).await)
            .or_default() += 1;
    }
    eprintln!("30 keys by owner (CLUSTER KEYSLOT): {by_owner:?}");
    assert_eq!(by_owner.len(), 3, "keys on {by_owner:?}");
    let scanned = keys_per_primary(&urls, &prefix).await;
    assert!(
        scanned.values().all(|k| !k.is_empty()),
        "SCAN per primary: {scanned:?}"
    );

    cleanup(&urls, &prefix).await;
}

// Two layer instances.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_hundred_duplicates_one_execution() {
    let Some(urls) = cluster_urls() else { return };
    let _turn = TURN.lock().await;
    let prefix = unique_prefix();
    let counter = Counter::default();
    let mut apps = Vec::new();
    for _ in 0..2 {
        let store = RedisClusterStore::from_cluster_urls(&urls)
            .await
            .unwrap()
            .with_prefix(prefix.clone());
        apps.push(common::router(counter.clone()).layer(IdempotencyLayer::new(store)));
    }
    let apps: [Router; 2] = [apps[0].clone(), apps[1].clone()];
    common::scenarios::hundred_duplicates_on_two_instances(apps, &counter).await;
    cleanup(&urls, &prefix).await;
}

// Commands per step, on the primary that owns the key.

/// `calls` per command on the node at `addr`, from `INFO commandstats`.
async fn command_calls(addr: &str) -> HashMap<String, u64> {
    let mut conn = node(addr).await;
    let info: String = driver::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut out = HashMap::new();
    for line in info.lines() {
        let Some(rest) = line.strip_prefix("cmdstat_") else {
            continue;
        };
        let Some((name, stats)) = rest.split_once(':') else {
            continue;
        };
        let calls = stats
            .split(',')
            .find_map(|kv| kv.strip_prefix("calls="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        out.insert(name.to_owned(), calls);
    }
    out
}

const COUNTED: [&str; 5] = ["set", "evalsha", "eval", "wait", "script|load"];

/// What each node ran of [`COUNTED`] between two snapshots.
fn delta(before: &HashMap<String, u64>, after: &HashMap<String, u64>) -> BTreeMap<String, u64> {
    COUNTED
        .iter()
        .filter_map(|name| {
            let n =
                after.get(*name).copied().unwrap_or(0) - before.get(*name).copied().unwrap_or(0);
            (n > 0).then(|| ((*name).to_owned(), n))
        })
        .collect()
}

/// Runs `step`, then returns what the key's owner and every other primary
/// ran of [`COUNTED`] meanwhile.
async fn measure<F: Future<Output = ()>>(
    urls: &[String],
    owner_addr: &str,
    step: F,
) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let nodes: Vec<String> = primaries(urls).await.into_keys().collect();
    let mut before = HashMap::new();
    for addr in &nodes {
        before.insert(addr.clone(), command_calls(addr).await);
    }
    step.await;
    let (mut at_owner, mut elsewhere) = (BTreeMap::new(), BTreeMap::new());
    for addr in &nodes {
        let d = delta(&before[addr], &command_calls(addr).await);
        if addr == owner_addr {
            at_owner = d;
        } else {
            for (k, v) in d {
                *elsewhere.entry(k).or_insert(0) += v;
            }
        }
    }
    (at_owner, elsewhere)
}

fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_per_step_on_the_owning_primary() {
    let Some(urls) = cluster_urls() else { return };
    let _turn = TURN.lock().await;
    for ack in [true, false] {
        let store = cluster_store(&urls).await;
        let store = if ack {
            store
        } else {
            store.without_replica_ack()
        };
        let prefix = store.prefix().to_owned();
        let key = random_key();
        let owner_addr = owner(&urls, &store.redis_key(&key)).await;
        // Every step is one round trip; with replica acknowledgement its
        // WAIT rides in the same pipeline.
        let with_wait = |mut pairs: Vec<(&'static str, u64)>| {
            if ack {
                pairs.push(("wait", 1));
            }
            counts(&pairs)
        };
        let nothing = BTreeMap::new();

        // begin that acquires: one SET (and its WAIT, in the same pipeline).
        let mut token = None;
        let (got, other) = measure(&urls, &owner_addr, async {
            let Begin::Acquired(t) = store.begin(&key, &fp(1), LEASE).await.unwrap() else {
                panic!("not acquired");
            };
            token = Some(t);
        })
        .await;
        eprintln!("ack {ack}: begin: {got:?} (elsewhere {other:?})");
        assert_eq!(got, with_wait(vec![("set", 1)]), "begin, ack {ack}");
        assert_eq!(other, nothing);
        let token = token.unwrap();

        // begin that finds the lock: one SET.
        let (got, other) = measure(&urls, &owner_addr, async {
            assert!(matches!(
                store.begin(&key, &fp(1), LEASE).await.unwrap(),
                Begin::InFlight { .. }
            ));
        })
        .await;
        eprintln!("ack {ack}: conflict: {got:?}");
        assert_eq!(got, with_wait(vec![("set", 1)]));
        assert_eq!(other, nothing);

        // extend: one EVALSHA.
        let (got, other) = measure(&urls, &owner_addr, async {
            assert!(store.extend(&key, &token, LEASE).await.unwrap());
        })
        .await;
        eprintln!("ack {ack}: extend: {got:?}");
        assert_eq!(got, with_wait(vec![("evalsha", 1)]));
        assert_eq!(other, nothing);

        // complete: one EVALSHA.
        let record = sample_record(fp(1), 32);
        let (got, other) = measure(&urls, &owner_addr, async {
            assert!(
                store
                    .complete(&key, &token, &record, Duration::from_secs(60))
                    .await
                    .unwrap()
            );
        })
        .await;
        eprintln!("ack {ack}: complete: {got:?}");
        // The script's own SET is counted too, inside the one EVALSHA.
        assert_eq!(got, with_wait(vec![("evalsha", 1), ("set", 1)]));
        assert_eq!(other, nothing);

        // replay: one SET.
        let (got, _) = measure(&urls, &owner_addr, async {
            assert!(matches!(
                store.begin(&key, &fp(1), LEASE).await.unwrap(),
                Begin::Completed(_)
            ));
        })
        .await;
        eprintln!("ack {ack}: replay: {got:?}");
        assert_eq!(got, with_wait(vec![("set", 1)]));

        // release: one EVALSHA, never a WAIT.
        let other_key = random_key();
        let other_owner = owner(&urls, &store.redis_key(&other_key)).await;
        let Begin::Acquired(t2) = store.begin(&other_key, &fp(2), LEASE).await.unwrap() else {
            panic!("not acquired");
        };
        let (got, _) = measure(&urls, &other_owner, async {
            assert!(store.release(&other_key, &t2).await.unwrap());
        })
        .await;
        eprintln!("ack {ack}: release: {got:?}");
        assert_eq!(got, counts(&[("evalsha", 1)]));

        // A primary without the scripts (a promoted replica, or after
        // SCRIPT FLUSH): the refused EVALSHA, then EVAL on the same node.
        let third = random_key();
        let third_owner = owner(&urls, &store.redis_key(&third)).await;
        let Begin::Acquired(t3) = store.begin(&third, &fp(3), LEASE).await.unwrap() else {
            panic!("not acquired");
        };
        let mut conn = node(&third_owner).await;
        let () = driver::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .unwrap();
        let (got, other) = measure(&urls, &third_owner, async {
            assert!(
                store
                    .complete(&third, &t3, &record, Duration::from_secs(60))
                    .await
                    .unwrap()
            );
        })
        .await;
        eprintln!("ack {ack}: complete after SCRIPT FLUSH: {got:?}");
        assert_eq!(got.get("eval"), Some(&1), "{got:?}");
        assert!(!got.contains_key("script|load"), "{got:?}");
        assert_eq!(other, nothing);
        // EVAL cached the complete script there again.
        let fourth = loop {
            let k = random_key();
            if owner(&urls, &store.redis_key(&k)).await == third_owner {
                break k;
            }
        };
        let Begin::Acquired(t4) = store.begin(&fourth, &fp(4), LEASE).await.unwrap() else {
            panic!("not acquired");
        };
        let (got, _) = measure(&urls, &third_owner, async {
            assert!(
                store
                    .complete(&fourth, &t4, &record, Duration::from_secs(60))
                    .await
                    .unwrap()
            );
        })
        .await;
        eprintln!("ack {ack}: the next complete there: {got:?}");
        assert_eq!(got, with_wait(vec![("evalsha", 1), ("set", 1)]));

        cleanup(&urls, &prefix).await;
    }
}

// The cost of WAIT.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_ack_cost_is_printed() {
    let Some(urls) = cluster_urls() else { return };
    let _turn = TURN.lock().await;
    const N: usize = 300;
    let mut results = Vec::new();
    for ack in [false, true, false, true] {
        let store = cluster_store(&urls).await;
        let store = if ack {
            store
        } else {
            store.without_replica_ack()
        };
        let record = sample_record(fp(1), 256);
        // Sequential: the latency of one request's two steps.
        let started = Instant::now();
        for _ in 0..N {
            let key = random_key();
            let Begin::Acquired(token) = store.begin(&key, &fp(1), LEASE).await.unwrap() else {
                panic!("not acquired");
            };
            assert!(
                store
                    .complete(&key, &token, &record, Duration::from_secs(60))
                    .await
                    .unwrap()
            );
        }
        let sequential = started.elapsed();
        // 32 at a time: throughput over the shared connections.
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..32 {
            let store = store.clone();
            let record = record.clone();
            tasks.spawn(async move {
                for _ in 0..N / 10 {
                    let key = random_key();
                    let Begin::Acquired(token) = store.begin(&key, &fp(1), LEASE).await.unwrap()
                    else {
                        panic!("not acquired");
                    };
                    assert!(
                        store
                            .complete(&key, &token, &record, Duration::from_secs(60))
                            .await
                            .unwrap()
                    );
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        let concurrent = started.elapsed();
        let per_request = sequential / N as u32;
        let rate = (32 * (N / 10)) as f64 / concurrent.as_secs_f64();
        eprintln!(
            "replica ack {ack}: {per_request:?} per begin+complete one at a time; {rate:.0} begin+complete/s with 32 concurrent"
        );
        results.push((ack, per_request, rate));
        cleanup(&urls, store.prefix()).await;
    }
    assert_eq!(results.len(), 4);
}

// Failover under load.

fn cluster_dir() -> std::path::PathBuf {
    std::env::var("REDIS_CLUSTER_DIR")
        .map(Into::into)
        .unwrap_or_else(|_| "/tmp/tower-idempotency-redis-cluster".into())
}

/// The PID of the node on `port`, from the start script's PID file, if
/// that process is still a `redis-server` on that port.
fn node_pid(port: u16) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(cluster_dir().join(format!("{port}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    (cmdline.contains("redis-server") && cmdline.contains(&format!(":{port}"))).then_some(pid)
}

fn script(args: &[&str]) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/redis-cluster.sh");
    let out = std::process::Command::new("bash")
        .arg(path)
        .args(args)
        .arg(cluster_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "redis-cluster.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn info_field(addr: &str, section: &str, field: &str) -> Option<String> {
    let client = driver::Client::open(format!("redis://{addr}")).ok()?;
    let mut conn = tokio::time::timeout(
        Duration::from_millis(500),
        client.get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()?;
    let text: String = if section == "cluster" {
        driver::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut conn)
            .await
            .ok()?
    } else {
        driver::cmd("INFO")
            .arg(section)
            .query_async(&mut conn)
            .await
            .ok()?
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_owned())
}

/// Waits until every node in `urls` answers, three primaries own all the
/// slots, every node says `cluster_state:ok` and every replica's link is
/// up.
async fn wait_healthy(urls: &[String], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let mut ok = primaries(urls).await.len() == 3;
        for url in urls {
            let addr = host_port(url);
            ok &= info_field(&addr, "cluster", "cluster_state")
                .await
                .as_deref()
                == Some("ok");
            if info_field(&addr, "replication", "role").await.as_deref() == Some("slave") {
                ok &= info_field(&addr, "replication", "master_link_status")
                    .await
                    .as_deref()
                    == Some("up");
            }
        }
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "the cluster is not healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts the killed node again if the test ends (or fails) before it
/// did, so the tests after it find a whole cluster.
struct Revive(Option<u16>);

impl Drop for Revive {
    fn drop(&mut self) {
        if let Some(port) = self.0.take() {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/redis-cluster.sh");
            let _ = std::process::Command::new("bash")
                .arg(path)
                .args(["restart-node", &port.to_string()])
                .arg(cluster_dir())
                .status();
        }
    }
}

/// Executions per idempotency key, for the failover test's handler.
#[derive(Clone, Default)]
struct Runs(Arc<Mutex<HashMap<String, usize>>>);

async fn counting_handler(State(runs): State<Runs>, headers: HeaderMap) -> impl IntoResponse {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let n = {
        let mut runs = runs.0.lock().unwrap();
        let n = runs.entry(key.clone()).or_insert(0);
        *n += 1;
        *n
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    (StatusCode::CREATED, [("x-execution", n.to_string())], key)
}

#[derive(Default, Debug)]
struct Tally {
    executed: usize,
    replayed: usize,
    conflicts: usize,
    unavailable: usize,
    slowest: Duration,
}

/// Two layer instances on their own stores, `workers` requests at a time,
/// each key sent four times in a row by different workers: returns the
/// tally once `stop` is set.
async fn load(
    apps: [Router; 2],
    phase: &'static str,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Tally {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..16 {
        let app = apps[w % 2].clone();
        let (next, tally, stop) = (next.clone(), tally.clone(), stop.clone());
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let n = next.fetch_add(1, Ordering::Relaxed) / 4;
                let key = format!("{phase}-{n}");
                let started = Instant::now();
                let req = post_req(Some(&key)).body(Body::from("{}")).unwrap();
                let (status, headers, body) = send(&app, req).await;
                let took = started.elapsed();
                let mut t = tally.lock().unwrap();
                t.slowest = t.slowest.max(took);
                assert!(
                    took < Duration::from_millis(3000),
                    "{phase}: {status} after {took:?}"
                );
                match status {
                    StatusCode::CREATED if headers.contains_key("idempotent-replayed") => {
                        assert_eq!(body, key.as_bytes());
                        t.replayed += 1;
                    }
                    StatusCode::CREATED => t.executed += 1,
                    StatusCode::CONFLICT => t.conflicts += 1,
                    StatusCode::SERVICE_UNAVAILABLE => t.unavailable += 1,
                    other => panic!("{phase}: unexpected {other}: {body:?}"),
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    std::mem::take(&mut *tally.lock().unwrap())
}

/// Requests with fresh keys until `within` ends: how long until all of
/// 12 in a row (spread over every primary) were executed, or the last
/// failure.
async fn recovers(app: &Router, phase: &str, within: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut n = 0;
    let mut last = String::new();
    while started.elapsed() < within {
        let mut all = true;
        for _ in 0..12 {
            n += 1;
            let (status, _, body) = call_post(app, Some(&format!("{phase}-probe-{n}")), "{}").await;
            if status != StatusCode::CREATED {
                all = false;
                last = format!("{status}: {}", String::from_utf8_lossy(&body));
            }
        }
        if all {
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_killed_under_load_fails_over() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let Some(urls) = cluster_urls() else { return };
    let _turn = TURN.lock().await;
    wait_healthy(&urls, Duration::from_secs(20)).await;
    let started = Instant::now();
    let mut report = Vec::new();
    for (phase, ack) in [("ack-off", false), ("ack-on", true)] {
        let layout = primaries(&urls).await;
        let victim = layout.keys().next().unwrap().clone();
        let port: u16 = victim.rsplit_once(':').unwrap().1.parse().unwrap();
        let Some(pid) = node_pid(port) else {
            assert!(
                !common::in_ci(),
                "no PID file for {victim} in {}: start the cluster with scripts/redis-cluster.sh",
                cluster_dir().display()
            );
            eprintln!(
                "[backends] redis_cluster: failover SKIPPED: {victim} was not started by scripts/redis-cluster.sh"
            );
            return;
        };

        let prefix = unique_prefix();
        let runs = Runs::default();
        let mut apps = Vec::new();
        for _ in 0..2 {
            let store = RedisClusterStore::from_cluster_urls(&urls)
                .await
                .unwrap()
                .with_prefix(prefix.clone());
            let store = if ack {
                store
            } else {
                store.without_replica_ack()
            };
            let app = Router::new()
                .route("/orders", post(counting_handler))
                .with_state(runs.clone())
                .layer(IdempotencyLayer::new(store));
            apps.push(app);
        }
        let apps: [Router; 2] = [apps[0].clone(), apps[1].clone()];
        let stop = Arc::new(AtomicBool::new(false));
        let phase_name: &'static str = if ack { "on" } else { "off" };
        let loader = tokio::spawn(load(apps.clone(), phase_name, stop.clone()));

        tokio::time::sleep(Duration::from_millis(700)).await;
        let status = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let mut revive = Revive(Some(port));
        let killed = Instant::now();

        // A replica takes over the victim's slots.
        let promoted = loop {
            let now = primaries(&urls).await;
            if now.len() == 3 && !now.contains_key(&victim) {
                break killed.elapsed();
            }
            assert!(
                killed.elapsed() < Duration::from_secs(15),
                "{phase}: no replica promoted"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // Without WAIT the service is whole again before the killed node
        // returns; with it, the shard that lost its replica answers 503
        // until a replica is back.
        let before_restart = recovers(&apps[0], phase, Duration::from_secs(3)).await;
        if !ack {
            assert!(
                before_restart.is_ok(),
                "{phase}: no recovery after the promotion: {before_restart:?}"
            );
        }

        // The killed node comes back and rejoins as a replica.
        script(&["restart-node", &port.to_string()]);
        revive.0 = None;
        wait_healthy(&urls, Duration::from_secs(20)).await;
        assert_eq!(
            info_field(&victim, "replication", "role").await.as_deref(),
            Some("slave"),
            "{phase}: {victim} did not rejoin as a replica"
        );
        let rejoined = killed.elapsed();
        // The load stops here: with WAIT, calls queued on the shard's
        // connection while it had no replica drain first.
        stop.store(true, Ordering::Relaxed);
        let tally = loader.await.unwrap();
        let after_rejoin = recovers(&apps[0], phase, Duration::from_secs(10)).await;
        assert!(
            after_rejoin.is_ok(),
            "{phase}: no recovery after the rejoin: {after_rejoin:?}"
        );

        let doubles: Vec<(String, usize)> = runs
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(k, n)| (k.clone(), *n))
            .collect();
        let line = format!(
            "{phase}: promoted after {promoted:?}, service whole before the restart: {before_restart:?}, rejoined after {rejoined:?}; {tally:?}; keys run twice: {}",
            doubles.len()
        );
        eprintln!("{line}");
        report.push(line);
        assert!(
            tally.executed > 0 && tally.unavailable > 0,
            "{phase}: {tally:?}"
        );
        if ack {
            assert!(doubles.is_empty(), "{phase}: keys run twice: {doubles:?}");
        }
        cleanup(&urls, &prefix).await;
    }
    eprintln!(
        "failover test: {:?}\n{}",
        started.elapsed(),
        report.join("\n")
    );
}
