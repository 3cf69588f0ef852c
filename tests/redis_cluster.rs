//! `RedisStore` on a real Redis Cluster of three primaries and three
//! replicas: the conformance suite, keys spread over every primary, two
//! layer instances under 100 concurrent duplicates, the round trips of
//! each step with replica acknowledgement pipelined, and a script missing
//! from the node a key lives on. `tests/redis_failover.rs` kills a primary
//! under load.
//!
//! The nodes come from `REDIS_CLUSTER_URLS` (comma-separated), or else the
//! cluster `scripts/redis-cluster.sh start` runs on ports 7000-7005. If no
//! node answers the tests are skipped, unless `CI=true`, where they fail.
//! Every test deletes its keys on every primary.

#![cfg(all(feature = "redis", feature = "test-util"))]
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::resp::{Wire, counting_proxy_into};
use common::{Counter, call_post};
use tower_idempotency::IdempotencyLayer;
use tower_idempotency::store::redis::{RedisStore, driver};
use tower_idempotency::store::{Begin, Store};
use tower_idempotency::test_util::{random_key, sample_record};

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

/// A prefix of its own for every store, so parallel tests never meet.
fn unique_prefix() -> String {
    format!("test:{}:", uuid::Uuid::new_v4().simple())
}

/// Deletes the prefix's keys on every primary when dropped, also when the
/// test fails.
struct Cleanup {
    urls: Vec<String>,
    prefix: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (urls, prefix) = (self.urls.clone(), self.prefix.clone());
        // `Drop` cannot await: a runtime of its own, on a thread of its own.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(common::delete_prefix_on_cluster(&urls, &prefix));
        })
        .join();
    }
}

/// The cluster's node URLs and a fresh prefix, whose keys the guard
/// deletes on every primary when the test ends.
fn cluster_with_prefix() -> Option<(Vec<String>, String, Cleanup)> {
    let urls = common::cluster_backend()?;
    let prefix = unique_prefix();
    let cleanup = Cleanup {
        urls: urls.clone(),
        prefix: prefix.clone(),
    };
    Some((urls, prefix, cleanup))
}

async fn store_on(urls: &[String], prefix: &str) -> RedisStore {
    RedisStore::from_cluster_urls(urls)
        .await
        .unwrap()
        .with_prefix(prefix)
}

/// For the conformance suite: a prefix of its own per check, whose keys
/// the teardown deletes on every primary.
async fn store() -> Option<(Arc<dyn Store>, (Vec<String>, String))> {
    let urls = common::cluster_backend()?;
    let prefix = unique_prefix();
    let store = store_on(&urls, &prefix).await;
    Some((Arc::new(store), (urls, prefix)))
}

async fn delete_keys((urls, prefix): (Vec<String>, String)) {
    common::delete_prefix_on_cluster(&urls, &prefix).await;
}

mod conformance {
    tower_idempotency::store_conformance_tests!(super::store, super::delete_keys);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_store_acknowledges_by_default() {
    let Some(urls) = common::cluster_backend() else {
        return;
    };
    let store = RedisStore::from_cluster_urls(&urls).await.unwrap();
    assert!(store.is_cluster());
    assert!(store.connection().is_none() && store.cluster_connection().is_some());
    assert_eq!(store.replica_ack(), 1);
    assert_eq!(store.with_replica_ack(0).replica_ack(), 0);
}

/// Thirty keys land on all three primaries, each key on exactly one, and
/// each replays from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_spread_over_every_primary() {
    let Some((urls, prefix, _cleanup)) = cluster_with_prefix() else {
        return;
    };
    let store = store_on(&urls, &prefix).await;
    let mut written = Vec::new();
    for _ in 0..30 {
        let key = random_key();
        let fp = tower_idempotency::fingerprint::Fingerprint::from_bytes([7; 32]);
        let Begin::Acquired(token) = store.begin(&key, &fp, LEASE).await.unwrap() else {
            panic!("a fresh key was not acquired");
        };
        assert!(
            store
                .complete(&key, &token, &sample_record(fp, 16), TTL)
                .await
                .unwrap()
        );
        written.push(store.redis_key(&key));
    }
    let primaries = common::cluster_primaries(&urls).await;
    assert_eq!(primaries.len(), 3, "{primaries:?}");
    let mut found = Vec::new();
    for primary in &primaries {
        let mut conn = driver::Client::open(primary.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let keys = common::scan(&mut conn, &prefix).await;
        assert!(!keys.is_empty(), "no key on the primary {primary}");
        found.extend(keys);
    }
    found.sort();
    written.sort();
    assert_eq!(found, written, "each key on exactly one primary");
}

/// Two instances, each with a cluster connection of its own, 100
/// concurrent requests with one key: one execution.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_duplicates_on_two_instances() {
    let Some((urls, prefix, _cleanup)) = cluster_with_prefix() else {
        return;
    };
    let counter = Counter::default();
    let app =
        |store: RedisStore| common::router(counter.clone()).layer(IdempotencyLayer::new(store));
    let apps = [
        app(store_on(&urls, &prefix).await),
        app(store_on(&urls, &prefix).await),
    ];
    common::scenarios::hundred_duplicates_on_two_instances(apps, &counter).await;
}

/// A store whose connections to the six nodes go through counting proxies
/// (the slot map keeps the nodes' own addresses; only the connections are
/// redirected), and what the proxies saw.
async fn counted_store(urls: &[String], prefix: &str) -> (RedisStore, Wire) {
    use driver::cluster::{ClusterClient, NodeAddress};

    let wire = Wire::default();
    let mut map = HashMap::new();
    for url in urls {
        let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
        let proxy = counting_proxy_into(port, wire.clone()).await;
        map.insert(
            NodeAddress::new("127.0.0.1", port),
            NodeAddress::new("127.0.0.1", proxy),
        );
    }
    let conn = ClusterClient::builder(urls.to_vec())
        .node_address_map(map)
        .response_timeout(Duration::from_secs(1))
        .build()
        .unwrap()
        .get_async_connection()
        .await
        .unwrap();
    let store = RedisStore::from_cluster(conn).with_prefix(prefix);
    store.load_scripts().await.unwrap();
    (store, wire)
}

fn assert_replayed(status: StatusCode, headers: &axum::http::HeaderMap) {
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
}

/// The store's own commands, not the cluster client's upkeep (slot map
/// refreshes, pings, the connection handshake).
fn the_stores(name: &str) -> bool {
    matches!(name, "set" | "evalsha" | "eval" | "wait" | "script")
}

/// Each step is one round trip on the node that holds the key, `WAIT`
/// pipelined with the write it acknowledges; a script missing from that
/// node costs one more, with `EVAL`, after which the node has it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_per_step() {
    let Some((urls, prefix, _cleanup)) = cluster_with_prefix() else {
        return;
    };
    let (store, wire) = counted_store(&urls, &prefix).await;
    let unacked = store.clone().with_replica_ack(0);
    let counter = Counter::default();
    let app = common::router(counter.clone()).layer(IdempotencyLayer::new(store));
    let unacked_app = common::router(counter.clone()).layer(IdempotencyLayer::new(unacked));

    macro_rules! measure {
        ($what:literal, $expected:expr, $run:expr) => {{
            let start = wire.len();
            let out = $run;
            let got = wire.rounds_since(start, the_stores);
            eprintln!("{}: {:?}", $what, got);
            let expected: Vec<Vec<&str>> = $expected;
            assert_eq!(got, expected, "{}", $what);
            out
        }};
    }

    let (status, _, _) = measure!(
        "first execution",
        vec![vec!["set", "wait"], vec!["evalsha", "wait"]],
        call_post(&app, Some("rt-1"), "{}").await
    );
    assert_eq!(status, StatusCode::CREATED);
    let (status, headers, _) = measure!(
        "replay",
        vec![vec!["set", "wait"]],
        call_post(&app, Some("rt-1"), "{}").await
    );
    assert_replayed(status, &headers);

    // A response the layer does not record releases the key, unacknowledged:
    // a lost release only delays a retry.
    let req = common::post_req(Some("rt-2"))
        .header("x-status", "500")
        .body(axum::body::Body::from("{}"))
        .unwrap();
    let (status, _, _) = measure!(
        "not recorded",
        vec![vec!["set", "wait"], vec!["evalsha"]],
        common::send(&app, req).await
    );
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);

    let (status, _, _) = measure!(
        "first execution without acknowledgement",
        vec![vec!["set"], vec!["evalsha"]],
        call_post(&unacked_app, Some("rt-3"), "{}").await
    );
    assert_eq!(status, StatusCode::CREATED);

    // Every node forgets its scripts, as a restarted or newly promoted
    // primary has: the record is written with EVAL, one round trip more.
    for url in &urls {
        let mut conn = driver::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = driver::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let (status, _, _) = measure!(
        "first execution, script missing",
        vec![
            vec!["set", "wait"],
            vec!["evalsha", "wait"],
            vec!["eval", "wait"]
        ],
        call_post(&app, Some("rt-4"), "{}").await
    );
    assert_eq!(status, StatusCode::CREATED);
    let (status, headers, _) = measure!(
        "replay of the record written with EVAL",
        vec![vec!["set", "wait"]],
        call_post(&app, Some("rt-4"), "{}").await
    );
    assert_replayed(status, &headers);
    assert_eq!(counter.get(), 4);
}
