//! A fixed workload for instruction-level profiling of the request path.
//!
//! `cargo bench --features axum --bench hotpath` runs every scenario briefly and prints the
//! time per request. For a profile, run one scenario under callgrind:
//!
//! ```text
//! valgrind --tool=callgrind target/release/deps/hotpath-<hash> first 20000
//! ```
//!
//! Scenarios: `bare` (no layer, POST), `bare-get` (no layer, GET), `noop`
//! (a layer that does nothing, GET), `get` (passthrough), `first` (a fresh
//! key each time), `replay`; `outer-noop-get` and `outer-get` apply the layer
//! around the whole router instead of inside it; a `-keep` suffix runs a
//! layer scenario with `keep_body_type` (feature `axum`).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::http::Response;
use axum::http::{Method, Request};
use axum::routing::post;
use bytes::Bytes;
use common::*;
use tower::util::MapRequestLayer;
use tower::{Layer, Service};
use tower_idempotency::IdempotencyLayer;

/// Runs scenario `base` (its name without `-keep`) `n` times through `app`.
async fn drive<S, B>(app: S, base: &str, n: u64) -> f64
where
    S: Service<Request<Body>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let body = Bytes::from(vec![b'x'; 1024]);
    let method = if base.ends_with("get") || base == "noop" {
        Method::GET
    } else {
        Method::POST
    };
    let keys: Vec<String> = (0..n).map(|i| format!("key-{i}")).collect();
    drain(app.clone(), request(Method::POST, "replayed", &body)).await;
    let started = Instant::now();
    for key in &keys {
        let key = if base == "replay" { "replayed" } else { key };
        drain(app.clone(), request(method.clone(), key, &body)).await;
    }
    started.elapsed().as_nanos() as f64 / n as f64
}

async fn scenario(name: &str, n: u64) -> f64 {
    let routes = Router::new().route("/orders", post(handler).get(handler));
    let layer = IdempotencyLayer::new(store());
    // `-keep`: the same with `keep_body_type`.
    let (base, keep) = match name.strip_suffix("-keep") {
        Some(base) => (base, true),
        None => (name, false),
    };
    // Built once, as `axum::serve` does, not on every request.
    match (base, keep) {
        ("bare" | "bare-get", _) => drive(routes.with_state(()), base, n).await,
        // Any middleware at all: a layer that changes nothing.
        ("noop", _) => {
            let app = routes.layer(MapRequestLayer::new(|r: Request<Body>| r));
            drive(app.with_state(()), base, n).await
        }
        // The layer around the whole router instead of inside it.
        ("outer-noop-get", _) => {
            let app = MapRequestLayer::new(|r: Request<Body>| r).layer(routes.with_state(()));
            drive(app, base, n).await
        }
        ("outer-get", false) => drive(layer.layer(routes.with_state(())), base, n).await,
        ("outer-get", true) => {
            let app = layer.keep_body_type().layer(routes.with_state(()));
            drive(app, base, n).await
        }
        (_, false) => drive(routes.layer(layer).with_state(()), base, n).await,
        (_, true) => {
            let app = routes.layer(layer.keep_body_type());
            drive(app.with_state(()), base, n).await
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let rt = current_thread();
    let (names, n) = match args.as_slice() {
        [name, n] => (vec![name.clone()], n.parse().unwrap()),
        _ => (
            [
                "bare",
                "bare-get",
                "noop",
                "get",
                "outer-noop-get",
                "outer-get",
                "get-keep",
                "outer-get-keep",
                "first",
                "first-keep",
                "replay",
                "replay-keep",
            ]
            .map(String::from)
            .to_vec(),
            50_000,
        ),
    };
    for name in names {
        let ns = rt.block_on(scenario(&name, n));
        println!("{name:>7}: {ns:8.0} ns/request");
    }
}
