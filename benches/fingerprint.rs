//! The fingerprint of a request body: the raw bytes against the canonical
//! JSON form and against two selected members, at 1 KiB and 64 KiB.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderMap, Method, Uri};
use tower_idempotency::fingerprint::FingerprintConfig;

/// A JSON order of about `size` bytes: a few fields and a list of items.
fn body(size: usize) -> Vec<u8> {
    let mut items = Vec::new();
    let mut len = 0;
    let mut n = 0;
    while len < size.saturating_sub(80) {
        let item = format!(
            r#"{{"sku":"SKU-{n:06}","qty":{},"price":{}.99,"note":"gift wrap"}}"#,
            n % 7 + 1,
            n % 90 + 10
        );
        len += item.len() + 1;
        items.push(item);
        n += 1;
    }
    format!(
        r#"{{"to":"bob","currency":"EUR","amount":1234.50,"items":[{}]}}"#,
        items.join(",")
    )
    .into_bytes()
}

fn bench(c: &mut Criterion) {
    let uri = Uri::from_static("/orders");
    let headers = HeaderMap::new();
    let configs = [
        ("raw", FingerprintConfig::default()),
        (
            "canonical",
            FingerprintConfig::default().with_canonical_json(),
        ),
        (
            "two members",
            FingerprintConfig::default()
                .with_json_members(["/amount", "/to"])
                .expect("valid pointers"),
        ),
    ];
    let mut group = c.benchmark_group("fingerprint");
    for size in [1024, 64 * 1024] {
        let body = body(size);
        group.throughput(Throughput::Bytes(body.len() as u64));
        for (name, config) in &configs {
            group.bench_with_input(BenchmarkId::new(*name, size), &body, |b, body| {
                b.iter(|| config.fingerprint(&Method::POST, &uri, &headers, body));
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
