//! No response reaches another principal: without a scope, a request is
//! bound to its credentials; with a principal scope, each principal has
//! its own records. And the one-time warning when credentials arrive with
//! no scope.

#![cfg(feature = "test-util")]
#![allow(clippy::unwrap_used)]

mod common;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use common::{Counter, post_req, problem, problem_type, send};
use tower_idempotency::{IdempotencyLayer, MemoryStore};

/// What the bearer-token check below puts in the request: the caller's
/// account, whatever token it used.
#[derive(Clone, Debug)]
struct Account(String);

impl std::fmt::Display for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "account:{}", self.0)
    }
}

/// Tokens `alice-1`, `alice-2` (a refresh) and `mallory-1`.
async fn bearer_auth(mut req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let account = match token {
        Some("alice-1" | "alice-2") => "alice",
        Some("mallory-1") => "mallory",
        _ => return StatusCode::UNAUTHORIZED.into_response(),
    };
    req.extensions_mut().insert(Account(account.to_owned()));
    next.run(req).await
}

/// The test router, with `layer` on the route and the bearer check in
/// front of everything.
fn app(layer: IdempotencyLayer, counter: Counter) -> Router {
    common::router(counter)
        .route_layer(layer)
        .layer(middleware::from_fn(bearer_auth))
}

async fn post_as(
    app: &Router,
    token: &str,
    key: &str,
    body: &'static str,
) -> (StatusCode, axum::http::HeaderMap, bytes::Bytes) {
    send(
        app,
        post_req(Some(key))
            .header("authorization", format!("Bearer {token}"))
            .body(Body::from(body))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn without_a_scope_another_credential_never_gets_the_response() {
    let counter = Counter::default();
    let app = app(IdempotencyLayer::new(MemoryStore::new()), counter.clone());
    let order = r#"{"item":"alice's order"}"#;

    let (status, _, body) = post_as(&app, "alice-1", "k1", order).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body, order);

    // Mallory, same key and body: the key is taken, the response is not his.
    let (status, headers, body) = post_as(&app, "mallory-1", "k1", order).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(headers.get("idempotent-replayed").is_none());
    let doc = problem(status, &headers, &body);
    assert_eq!(problem_type(&doc), "key-reused");
    assert!(!String::from_utf8_lossy(&body).contains("alice's order"));
    assert_eq!(counter.get(), 1, "mallory's request did not run either");

    // Alice, same token: her replay.
    let (status, headers, body) = post_as(&app, "alice-1", "k1", order).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(body, order);

    // Alice after a token refresh: bound to the old token, so 422 too (as
    // documented), and never a second execution.
    let (status, headers, body) = post_as(&app, "alice-2", "k1", order).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    problem(status, &headers, &body);
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn a_principal_scope_gives_each_principal_its_own_records() {
    let counter = Counter::default();
    let layer = IdempotencyLayer::new(MemoryStore::new()).with_principal_scope::<Account>();
    let app = app(layer, counter.clone());

    let (status, _, alice) = post_as(&app, "alice-1", "k1", r#"{"by":"alice"}"#).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, headers, mallory) = post_as(&app, "mallory-1", "k1", r#"{"by":"mallory"}"#).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(headers.get("idempotent-replayed").is_none(), "his own run");
    assert_eq!(counter.get(), 2);
    assert_ne!(alice, mallory);

    // Each replays their own, Alice across a token refresh.
    let (status, headers, body) = post_as(&app, "alice-2", "k1", r#"{"by":"alice"}"#).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(body, alice);
    let (_, headers, body) = post_as(&app, "mallory-1", "k1", r#"{"by":"mallory"}"#).await;
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(body, mallory);
    assert_eq!(counter.get(), 2);
}

#[tokio::test]
async fn binding_can_be_turned_off_and_then_the_key_space_is_global() {
    let counter = Counter::default();
    let layer = IdempotencyLayer::new(MemoryStore::new()).with_credential_binding(false);
    let app = app(layer, counter.clone());
    let order = r#"{"item":"x"}"#;
    post_as(&app, "alice-1", "k1", order).await;
    let (status, headers, _) = post_as(&app, "mallory-1", "k1", order).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(counter.get(), 1);
}

/// Requests without credentials are not bound: the same key and body from
/// two anonymous callers is one request, as before.
#[tokio::test]
async fn requests_without_credentials_are_not_bound() {
    let counter = Counter::default();
    let app = common::router(counter.clone()).layer(IdempotencyLayer::new(MemoryStore::new()));
    let req = || post_req(Some("k1")).body(Body::from("{}")).unwrap();
    assert_eq!(send(&app, req()).await.0, StatusCode::CREATED);
    let (status, headers, _) = send(&app, req()).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(counter.get(), 1);
}
