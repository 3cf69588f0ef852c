//! What sealing costs: a record written (`complete`) and read back (the
//! replay's `begin`) through `SealedStore` over `MemoryStore`, against the
//! same `MemoryStore` unsealed, at 1 KiB and 64 KiB bodies.
//!
//! Run with `cargo bench --features encryption,test-util --bench sealed`.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tower_idempotency::store::sealed::{RecordKey, SealedStore};
use tower_idempotency::test_util::{random_key, sample_record};
use tower_idempotency::{
    MemoryStore,
    fingerprint::Fingerprint,
    store::{Begin, Store},
};

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

/// One record written and replayed once, on a fresh key.
async fn write_and_replay(store: &dyn Store, fp: &Fingerprint, len: usize) {
    let key = random_key();
    let Begin::Acquired(token) = store.begin(&key, fp, LEASE).await.unwrap() else {
        panic!("fresh key not acquired");
    };
    let record = sample_record(*fp, len);
    assert!(store.complete(&key, &token, &record, TTL).await.unwrap());
    let Begin::Completed(replay) = store.begin(&key, fp, LEASE).await.unwrap() else {
        panic!("no replay");
    };
    assert_eq!(replay.body().len(), len);
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let fp = Fingerprint::from_bytes([7; 32]);
    let plain = MemoryStore::new();
    let sealed = SealedStore::new(MemoryStore::new(), RecordKey::from_bytes([9; 32]));
    let mut group = c.benchmark_group("write_and_replay");
    for len in [1024, 64 * 1024] {
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::new("memory", len), &len, |b, &len| {
            b.iter(|| rt.block_on(write_and_replay(&plain, &fp, len)));
        });
        group.bench_with_input(BenchmarkId::new("sealed", len), &len, |b, &len| {
            b.iter(|| rt.block_on(write_and_replay(&sealed, &fp, len)));
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
