//! What the request-path benches share: the handler, the requests, the
//! store, and reading a response.
#![allow(unreachable_pub, clippy::unwrap_used)]

use axum::body::Body;
use axum::http::{Method, Request, Response, StatusCode};
use bytes::Bytes;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::MemoryStore;

pub async fn handler(body: Bytes) -> (StatusCode, Bytes) {
    // A fresh buffer, as a handler that serializes its answer makes: an
    // echo of the request's shared buffer would let a store keep every
    // record for the price of a reference count.
    (StatusCode::CREATED, Bytes::copy_from_slice(&body))
}

/// The runtime the benches run on: one thread, as a server's connection
/// task is polled.
pub fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A JSON request to `/orders`, with the key if any.
pub fn request_with<B>(method: Method, key: Option<&str>, body: B) -> Request<B> {
    let mut b = Request::builder()
        .method(method)
        .uri("/orders")
        .header("content-type", "application/json");
    if let Some(key) = key {
        b = b.header("idempotency-key", key);
    }
    b.body(body).unwrap()
}

/// The same for axum, keyed, with `body` whatever the method.
pub fn request(method: Method, key: &str, body: &Bytes) -> Request<Body> {
    request_with(method, Some(key), Body::from(body.clone()))
}

/// The store every layer here uses: large enough to keep every record a
/// run makes.
pub fn store() -> MemoryStore {
    MemoryStore::builder()
        .max_entries(2_000_000)
        .max_bytes(4 << 30)
        .build()
}

/// Sends `req` through `svc` and reads the whole response body.
pub async fn drain<S, ReqB, B>(svc: S, req: Request<ReqB>)
where
    S: tower::Service<Request<ReqB>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let res = svc.oneshot(req).await.unwrap();
    std::hint::black_box(res.into_body().collect().await.unwrap().to_bytes());
}
