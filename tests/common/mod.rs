//! Shared helpers for the integration tests.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{MethodFilter, on};
use bytes::Bytes;
use http_body_util::BodyExt;
use tower::ServiceExt;

/// Counts how often the handler ran.
#[derive(Clone, Default)]
pub struct Counter(pub Arc<AtomicUsize>);

impl Counter {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// The test handler. Headers steer it:
/// - `x-delay-ms`: sleep first;
/// - `x-status`: the status to answer (default 201);
/// - `x-panic`: panic;
/// - `x-size`: answer a body of this many bytes instead of the echo.
///
/// It answers the request body echoed back, with two `Set-Cookie` values, a
/// `Date`, and a hop-by-hop header.
pub async fn handler(
    State(counter): State<Counter>,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    let n = counter.0.fetch_add(1, Ordering::SeqCst) + 1;
    if let Some(ms) = headers.get("x-delay-ms") {
        let ms: u64 = ms.to_str().unwrap().parse().unwrap();
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if headers.contains_key("x-panic") {
        panic!("handler asked to panic");
    }
    let status = headers
        .get("x-status")
        .map(|s| StatusCode::from_u16(s.to_str().unwrap().parse().unwrap()).unwrap())
        .unwrap_or(StatusCode::CREATED);
    let body = match headers.get("x-size") {
        Some(size) => Bytes::from(vec![b'z'; size.to_str().unwrap().parse().unwrap()]),
        None => body,
    };
    let mut res = (status, body).into_response();
    let h = res.headers_mut();
    h.append("set-cookie", "a=1".parse().unwrap());
    h.append("set-cookie", "b=2".parse().unwrap());
    h.insert("x-execution", n.to_string().parse().unwrap());
    h.insert("date", "Mon, 23 Nov 2026 07:00:00 GMT".parse().unwrap());
    h.insert("keep-alive", "timeout=5".parse().unwrap());
    res
}

/// A router with the handler on `/orders` (POST and GET), no layer yet.
pub fn router(counter: Counter) -> Router {
    Router::new()
        .route(
            "/orders",
            on(
                MethodFilter::POST
                    .or(MethodFilter::GET)
                    .or(MethodFilter::PATCH)
                    .or(MethodFilter::PUT),
                handler,
            ),
        )
        .with_state(counter)
}

/// A POST to `/orders` with the key (if any) and the body.
pub fn post_req(key: Option<&str>) -> axum::http::request::Builder {
    let mut b = Request::builder()
        .method("POST")
        .uri("/orders")
        .header("content-type", "application/json");
    if let Some(key) = key {
        b = b.header("idempotency-key", key);
    }
    b
}

/// Sends a request and returns status, headers, body.
pub async fn send(app: &Router, req: Request<Body>) -> (StatusCode, HeaderMap, Bytes) {
    let res = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, body)
}

/// POSTs `body` with `key` to `/orders`.
pub async fn call_post(
    app: &Router,
    key: Option<&str>,
    body: &str,
) -> (StatusCode, HeaderMap, Bytes) {
    send(
        app,
        post_req(key).body(Body::from(body.to_owned())).unwrap(),
    )
    .await
}

/// Parses a problem+json body and checks its shape.
pub fn problem(status: StatusCode, headers: &HeaderMap, body: &Bytes) -> serde_json::Value {
    assert_eq!(
        headers["content-type"], "application/problem+json",
        "not a problem: {status}"
    );
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["status"], status.as_u16());
    assert!(v["title"].is_string());
    assert!(v["detail"].is_string());
    v
}

/// The suffix of a problem's `type` URI.
pub fn problem_type(v: &serde_json::Value) -> String {
    v["type"]
        .as_str()
        .unwrap()
        .rsplit('#')
        .next()
        .unwrap()
        .to_owned()
}

/// Whether the CI environment asks for every backend.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Every Redis key under `prefix`, sorted, each once. SCAN, not KEYS: one
/// KEYS over a server holding millions of keys outlasts the client's
/// response timeout, and SCAN may return a key twice.
#[cfg(feature = "redis")]
pub async fn scan(
    conn: &mut tower_idempotency::store::redis::driver::aio::MultiplexedConnection,
    prefix: &str,
) -> Vec<String> {
    let mut cursor = 0u64;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) =
            tower_idempotency::store::redis::driver::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(conn)
                .await
                .unwrap();
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys.sort();
    keys.dedup();
    keys
}

/// Deletes every key under `prefix` in the Redis at `url`: for tests that
/// leave many records behind, which would otherwise stay for their ttl.
#[cfg(feature = "redis")]
pub async fn delete_prefix(url: &str, prefix: &str) {
    use tower_idempotency::store::redis::driver;
    let mut conn = driver::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for keys in scan(&mut conn, prefix).await.chunks(1000) {
        let _: () = driver::cmd("DEL")
            .arg(keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}
