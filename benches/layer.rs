//! The layer's cost in process, through `oneshot`, with a 1 KiB JSON body:
//! under an axum router, and around a plain Tower `service_fn`.
//!
//! Run with `cargo bench --features axum --bench layer` (without the
//! feature, the `keep_body_type` rows under axum are left out).

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::http::{Method, Request, StatusCode};
use axum::routing::post;
use bytes::Bytes;
use common::*;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::BodyExt;
use tower_idempotency::IdempotencyLayer;

fn body_1k() -> Bytes {
    let mut s = String::from("{\"items\":[");
    while s.len() < 1000 {
        s.push_str("{\"sku\":\"abc-123\",\"qty\":1},");
    }
    s.pop();
    s.push_str("]}");
    Bytes::from(s)
}

fn bench(c: &mut Criterion) {
    let rt = current_thread();
    let body = body_1k();
    let routes = || Router::new().route("/orders", post(handler).get(handler));
    // Built once with `with_state`, as `axum::serve` does, not per request.
    let bare: Router = routes().with_state(());
    let layered: Router = routes()
        .layer(IdempotencyLayer::new(store()))
        .with_state(());
    let counter = AtomicU64::new(0);
    let fresh = || format!("key-{}", counter.fetch_add(1, Ordering::Relaxed));

    let mut g = c.benchmark_group("in_process_1k");
    g.bench_function("bare_post", |b| {
        b.to_async(&rt)
            .iter(|| drain(bare.clone(), request(Method::POST, &fresh(), &body)))
    });
    g.bench_function("layer_get_passthrough", |b| {
        b.to_async(&rt)
            .iter(|| drain(layered.clone(), request(Method::GET, &fresh(), &body)))
    });
    g.bench_function("bare_get", |b| {
        b.to_async(&rt)
            .iter(|| drain(bare.clone(), request(Method::GET, &fresh(), &body)))
    });
    g.bench_function("layer_first_post", |b| {
        b.to_async(&rt)
            .iter(|| drain(layered.clone(), request(Method::POST, &fresh(), &body)))
    });
    rt.block_on(drain(
        layered.clone(),
        request(Method::POST, "replayed", &body),
    ));
    g.bench_function("layer_replay", |b| {
        b.to_async(&rt)
            .iter(|| drain(layered.clone(), request(Method::POST, "replayed", &body)))
    });
    #[cfg(feature = "axum")]
    {
        use tower::Layer;

        // `keep_body_type`: axum's own body type, not boxed again.
        let keep: Router = routes()
            .layer(IdempotencyLayer::new(store()).keep_body_type())
            .with_state(());
        g.bench_function("layer_keep_get_passthrough", |b| {
            b.to_async(&rt)
                .iter(|| drain(keep.clone(), request(Method::GET, &fresh(), &body)))
        });
        // The layer around the whole router rather than inside it.
        let around = IdempotencyLayer::new(store())
            .keep_body_type()
            .layer(routes().with_state(()));
        g.bench_function("around_router_keep_get_passthrough", |b| {
            b.to_async(&rt)
                .iter(|| drain(around.clone(), request(Method::GET, &fresh(), &body)))
        });
    }
    g.finish();
}

/// The same without axum: a plain Tower stack around a `service_fn`, so the
/// layer's own cost is all that differs from the bare service.
fn tower_stack(c: &mut Criterion) {
    use std::convert::Infallible;

    use axum::http::Response;
    use http_body_util::Full;
    use tower::{Layer, service_fn};

    let rt = current_thread();
    let body = body_1k();
    let handler = service_fn(|req: Request<Full<Bytes>>| async move {
        let status = if req.method() == Method::GET {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        };
        let body = req.into_body().collect().await?.to_bytes();
        let mut res = Response::new(Full::new(body));
        *res.status_mut() = status;
        Ok::<_, Infallible>(res)
    });
    let layered = IdempotencyLayer::new(store()).layer(handler);
    // No body on a GET here.
    let req = |method: Method, key: Option<&str>| {
        let body = if method == Method::GET {
            Full::new(Bytes::new())
        } else {
            Full::new(body.clone())
        };
        request_with(method, key, body)
    };
    let counter = AtomicU64::new(0);
    let fresh = || format!("key-{}", counter.fetch_add(1, Ordering::Relaxed));

    let mut g = c.benchmark_group("tower_stack_1k");
    g.bench_function("bare_get", |b| {
        b.to_async(&rt)
            .iter(|| drain(handler, req(Method::GET, None)))
    });
    g.bench_function("layer_get_passthrough", |b| {
        b.to_async(&rt)
            .iter(|| drain(layered.clone(), req(Method::GET, None)))
    });
    g.bench_function("bare_post", |b| {
        b.to_async(&rt)
            .iter(|| drain(handler, req(Method::POST, Some(&fresh()))))
    });
    g.bench_function("layer_first_post", |b| {
        b.to_async(&rt)
            .iter(|| drain(layered.clone(), req(Method::POST, Some(&fresh()))))
    });
    g.bench_function("layer_replay", |b| {
        b.to_async(&rt)
            .iter(|| drain(layered.clone(), req(Method::POST, Some("replayed"))))
    });
    // A service whose body type is boxed (as hyper and tonic stacks often
    // have), and the layer keeping that type.
    let boxed = tower::util::MapResponseLayer::new(|res: Response<Full<Bytes>>| {
        res.map(BodyExt::boxed_unsync)
    })
    .layer(handler);
    let keep = IdempotencyLayer::new(store())
        .keep_body_type()
        .layer(boxed.clone());
    g.bench_function("bare_get_boxed", |b| {
        b.to_async(&rt)
            .iter(|| drain(boxed.clone(), req(Method::GET, None)))
    });
    g.bench_function("layer_keep_get_passthrough_boxed", |b| {
        b.to_async(&rt)
            .iter(|| drain(keep.clone(), req(Method::GET, None)))
    });
    g.finish();
}

/// The fingerprint against raw SHA-256 over the same buffer.
fn fingerprint(c: &mut Criterion) {
    use criterion::Throughput;
    use sha2::{Digest, Sha256};
    use tower_idempotency::fingerprint::FingerprintConfig;

    let config = FingerprintConfig::default();
    let uri: axum::http::Uri = "/orders?page=1".parse().unwrap();
    let headers = axum::http::HeaderMap::new();
    let mut g = c.benchmark_group("fingerprint");
    for size in [1024usize, 64 * 1024, 1024 * 1024] {
        let buf = vec![0x5au8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("raw_sha256/{size}"), |b| {
            b.iter(|| Sha256::digest(std::hint::black_box(&buf)))
        });
        g.bench_function(format!("fingerprint/{size}"), |b| {
            b.iter(|| config.fingerprint(&Method::POST, &uri, &headers, std::hint::black_box(&buf)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench, tower_stack, fingerprint);
criterion_main!(benches);
