//! Faults: dead processes, lapsed leases, and a store under pressure.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use common::*;
use tower_idempotency::test_util::{Fault, FaultyStore, Op, random_key, sample_record};
use tower_idempotency::{
    IdempotencyLayer, MemoryStore,
    fingerprint::Fingerprint,
    store::{Begin, Store},
};

fn slow(key: &str, ms: u64) -> axum::http::Request<Body> {
    post_req(Some(key))
        .header("x-delay-ms", ms.to_string())
        .body(Body::from("{}"))
        .unwrap()
}

/// A process dies mid-request: its runtime is dropped with the handler
/// pending. The retry is refused while the lease lives and runs after it.
#[test]
fn dead_process_lock_is_taken_over_after_the_lease() {
    let store = Arc::new(MemoryStore::new());
    let lease = Duration::from_millis(400);
    let counter = Counter::default();
    let make = |store: Arc<MemoryStore>, counter: Counter| {
        router(counter).layer(IdempotencyLayer::from_arc(store).with_lease(lease))
    };

    // The first "process".
    let doomed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let app = make(store.clone(), counter.clone());
    doomed.spawn(async move { send(&app, slow("k", 60_000)).await });
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(counter.get(), 1, "the first attempt started");
    doomed.shutdown_background(); // the process dies: no heartbeat, no release

    // The second "process", sharing the store.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let app = make(store.clone(), counter.clone());
        let (status, _, _) = send(&app, slow("k", 0)).await;
        assert_eq!(
            status,
            StatusCode::CONFLICT,
            "refused while the dead lease lives"
        );
        tokio::time::sleep(lease).await;
        let (status, headers, _) = send(&app, slow("k", 0)).await;
        assert_eq!(status, StatusCode::CREATED, "taken over after the lease");
        assert_eq!(headers["x-execution"], "2");
        let (_, headers, _) = send(&app, slow("k", 0)).await;
        assert_eq!(headers["idempotent-replayed"], "true");
        assert_eq!(headers["x-execution"], "2");
    });
    assert_eq!(counter.get(), 2);
}

/// The first holder's lease lapses (its heartbeats fail), a second request
/// takes over and completes, then the first finishes: the first's write is
/// refused, the stored record is the second's, and each client got one
/// whole response.
#[tokio::test]
async fn lapsed_holder_cannot_overwrite_the_new_holders_record() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    store.inject(Op::Extend, Fault::Fail, usize::MAX);
    let counter = Counter::default();
    let app = router(counter.clone())
        .layer(IdempotencyLayer::from_arc(store.clone()).with_lease(Duration::from_millis(300)));

    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, slow("k", 1000)).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, second_headers, second_body) = send(&app, slow("k", 0)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(second_headers["x-execution"], "2");

    let (status, first_headers, first_body) = first.await.unwrap();
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        first_headers["x-execution"], "1",
        "the first client got its own whole response"
    );
    assert_eq!(first_body, second_body);

    let (_, replay, _) = send(&app, slow("k", 0)).await;
    assert_eq!(replay["idempotent-replayed"], "true");
    assert_eq!(
        replay["x-execution"], "2",
        "the record is the second holder's"
    );
    assert_eq!(counter.get(), 2);
    assert!(store.calls(Op::Extend) >= 1, "heartbeats were attempted");
}

/// The fence alone. The lapsed first holder finishes while the second
/// holder still runs, so when its `complete` arrives the key is in flight
/// under a live lock, and only the lock token tells the two holders apart.
/// Its write is refused: a retry at that moment is told the key is in
/// flight (not handed the lapsed holder's response), and the record is the
/// second holder's.
#[tokio::test]
async fn lapsed_holder_is_fenced_by_its_token_while_the_new_holder_runs() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    // No heartbeat ever lands: the first lease lapses at 1 s, the second
    // holder's lease (1 s from its start) outlives its 700 ms handler.
    store.inject(Op::Extend, Fault::Fail, usize::MAX);
    let counter = Counter::default();
    let app = router(counter.clone())
        .layer(IdempotencyLayer::from_arc(store.clone()).with_lease(Duration::from_secs(1)));

    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, slow("k", 1500)).await }
    });
    tokio::time::sleep(Duration::from_millis(1150)).await;
    let second = tokio::spawn({
        let app = app.clone();
        async move { send(&app, slow("k", 700)).await }
    });

    let (status, first_headers, _) = first.await.unwrap();
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(first_headers["x-execution"], "1");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, probe, _) = send(&app, slow("k", 0)).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "the key is in flight under the second holder; the lapsed holder's \
         response must not have been recorded (replayed: {:?})",
        probe.get("idempotent-replayed")
    );

    let (status, second_headers, _) = second.await.unwrap();
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(second_headers["x-execution"], "2");
    let (_, replay, _) = send(&app, slow("k", 0)).await;
    assert_eq!(replay["idempotent-replayed"], "true");
    assert_eq!(
        replay["x-execution"], "2",
        "the record is the second holder's"
    );
    assert_eq!(counter.get(), 2);
}

/// A million distinct keys through a store bounded to a hundred thousand:
/// memory stays bounded and live locks survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_stays_bounded_under_a_million_keys() {
    let store = MemoryStore::builder().max_entries(100_000).build();
    let fp = Fingerprint::from_bytes([7; 32]);
    let lease = Duration::from_secs(600);
    let ttl = Duration::from_secs(3600);
    // Live locks taken first, so they are the oldest entries.
    let mut live = Vec::new();
    for _ in 0..100 {
        let key = random_key();
        let Begin::Acquired(token) = store.begin(&key, &fp, lease).await.unwrap() else {
            panic!("fresh key not acquired");
        };
        live.push((key, token));
    }
    let record = sample_record(fp, 64);
    let mut peak_len = 0;
    let mut peak_bytes = 0;
    for i in 0..1_000_000u32 {
        let key = random_key();
        let Begin::Acquired(token) = store.begin(&key, &fp, lease).await.unwrap() else {
            panic!("fresh key not acquired");
        };
        assert!(store.complete(&key, &token, &record, ttl).await.unwrap());
        if i % 50_000 == 0 {
            peak_len = peak_len.max(store.len());
            peak_bytes = peak_bytes.max(store.bytes());
        }
    }
    peak_len = peak_len.max(store.len());
    assert!(peak_len <= 100_000 + 64, "{peak_len} entries");
    assert!(peak_bytes < 64 << 20, "{peak_bytes} bytes");
    assert_eq!(store.live_locks(), 100);
    for (key, token) in &live {
        assert!(
            store.extend(key, token, lease).await.unwrap(),
            "a live lock was evicted"
        );
    }
}

/// A record write that fails is retried in the background after 50, 100,
/// 200 ms and so on, each wait at most a quarter of the lease (here 250
/// ms): the store gets room to recover, and the key is recorded well
/// before its lease would let a retry run again.
#[tokio::test(start_paused = true)]
async fn failed_record_writes_back_off_exponentially_within_the_lease() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    store.inject(Op::Complete, Fault::Fail, 4);
    let counter = Counter::default();
    let app = router(counter.clone())
        .layer(IdempotencyLayer::from_arc(store.clone()).with_lease(Duration::from_secs(1)));
    let (status, _, _) = call_post(&app, Some("k"), "{}").await;
    assert_eq!(status, StatusCode::CREATED);
    let answered = tokio::time::Instant::now();
    // The first write failed as the response went out; then the retries.
    let mut seen = Vec::new();
    for at in [49, 51, 149, 151, 349, 351, 599, 601] {
        tokio::time::sleep_until(answered + Duration::from_millis(at)).await;
        seen.push((at, store.calls(Op::Complete)));
    }
    assert_eq!(
        seen,
        [
            (49, 1),
            (51, 2),
            (149, 2),
            (151, 3),
            (349, 3),
            (351, 4),
            (599, 4),
            (601, 5)
        ],
        "(ms after the response, record writes so far)"
    );
    let (status, headers, _) = call_post(&app, Some("k"), "{}").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(counter.get(), 1);
}
