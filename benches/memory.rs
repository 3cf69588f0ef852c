//! MemoryStore's memory per record above the body, measured with a counting
//! allocator, and its begin+complete rate with many records resident.
//!
//! Run with `cargo bench --bench memory`.

#![allow(clippy::unwrap_used)]

use std::alloc::System;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use tower_idempotency::test_util::random_key;
use tower_idempotency::{
    MemoryStore,
    fingerprint::Fingerprint,
    record::Record,
    store::{Begin, Store},
};

// The crate forbids unsafe code, so the counting allocator comes from a
// crate that wraps the system allocator.
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn live() -> isize {
    let s = GLOBAL.stats();
    s.bytes_allocated as isize - s.bytes_deallocated as isize
}

/// begin+complete per second on fresh keys, `per_thread` on each of
/// `threads` tasks.
async fn rate(store: &Arc<MemoryStore>, fp: Fingerprint, threads: usize, per_thread: usize) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = (0..threads)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let record =
                    Record::response(fp, StatusCode::CREATED, vec![], Bytes::from_static(b"{}"));
                for _ in 0..per_thread {
                    let key = random_key();
                    if let Begin::Acquired(token) = store
                        .begin(&key, &fp, Duration::from_secs(30))
                        .await
                        .unwrap()
                    {
                        store
                            .complete(&key, &token, &record, Duration::from_secs(3600))
                            .await
                            .unwrap();
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (per_thread * threads) as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let n = 200_000usize;
        let body_len = 1024;
        let store = Arc::new(MemoryStore::builder().max_entries(4_000_000).max_bytes(8 << 30).build());
        let fp = Fingerprint::from_bytes([7; 32]);
        let headers = vec![
            (HeaderName::from_static("content-type"), HeaderValue::from_static("application/json")),
            (HeaderName::from_static("content-length"), HeaderValue::from_static("1024")),
        ];
        // Each response body is a fresh buffer that the response gives up
        // once recorded, as in the layer: whatever of it the store keeps
        // (a reference or a copy) is counted, and the body's own bytes are
        // taken off at the end.
        let keys: Vec<_> = (0..n).map(|_| random_key()).collect();
        let before = live();
        for key in &keys {
            let Begin::Acquired(token) = store.begin(key, &fp, Duration::from_secs(30)).await.unwrap() else {
                panic!("not acquired");
            };
            let body = Bytes::from(vec![b'x'; body_len]);
            let record = Record::response(fp, StatusCode::CREATED, headers.clone(), body);
            assert!(store.complete(key, &token, &record, Duration::from_secs(3600)).await.unwrap());
        }
        let after = live();
        let per_record = (after - before) as f64 / n as f64 - body_len as f64;
        println!("memory: {per_record:.0} bytes per record above its {body_len}-byte body ({n} records, 2 headers)");
        // A replay of each, so every buffer is shared as a replay shares it.
        for key in &keys {
            let Begin::Completed(record) = store.begin(key, &fp, Duration::from_secs(30)).await.unwrap() else {
                panic!("not recorded");
            };
            assert_eq!(record.body().len(), body_len);
        }
        let replayed = (live() - before) as f64 / n as f64 - body_len as f64;
        println!("memory: {replayed:.0} bytes per record above its body once each was replayed");

        // begin+complete per second with a million records resident.
        let fill: Vec<_> = (0..800_000).map(|_| random_key()).collect();
        for key in &fill {
            if let Begin::Acquired(token) = store.begin(key, &fp, Duration::from_secs(30)).await.unwrap() {
                let record = Record::response(fp, StatusCode::CREATED, headers.clone(), Bytes::from_static(b"{}"));
                store.complete(key, &token, &record, Duration::from_secs(3600)).await.unwrap();
            }
        }
        println!("resident: {} records", store.len());
        // Five rounds per thread count (the machine is shared: the median
        // is the figure, the spread is shown).
        for threads in [1usize, 2] {
            let mut rates = Vec::new();
            for _ in 0..5 {
                rates.push(rate(&store, fp, threads, 100_000 / threads).await);
            }
            rates.sort_by(f64::total_cmp);
            println!(
                "begin+complete on {threads} thread(s): median {:.0}/s (min {:.0}, max {:.0}) with ~1M resident",
                rates[2], rates[0], rates[4]
            );
        }
    });
}
