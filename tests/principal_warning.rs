//! The one-time warning when covered requests carry credentials and no
//! scope is set. Alone in its binary: tracing caches whether a log line is
//! wanted per call site, and a parallel test hitting the same line without
//! a subscriber would race with this one's.

#![cfg(feature = "test-util")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use common::{Counter, post_req, send};
use tower_idempotency::{IdempotencyLayer, MemoryStore};

#[derive(Clone, Debug)]
struct Account(String);

impl std::fmt::Display for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "account:{}", self.0)
    }
}

/// Any bearer token is the account of that name.
async fn bearer_auth(mut req: Request, next: Next) -> Response {
    let Some(account) = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
    else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    req.extensions_mut().insert(Account(account));
    next.run(req).await
}

fn app(layer: IdempotencyLayer, counter: Counter) -> Router {
    common::router(counter)
        .route_layer(layer)
        .layer(middleware::from_fn(bearer_auth))
}

async fn post_as(app: &Router, token: &str, key: &str, body: &'static str) {
    send(
        app,
        post_req(Some(key))
            .header("authorization", format!("Bearer {token}"))
            .body(Body::from(body))
            .unwrap(),
    )
    .await;
}

/// Collects the messages of WARN events.
#[derive(Clone, Default)]
struct Warnings(Arc<Mutex<Vec<String>>>);

impl Warnings {
    fn about_scope(&self) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.contains("no scope is set"))
            .count()
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() != tracing::Level::WARN {
            return;
        }
        struct Message<'a>(&'a mut String);
        impl tracing::field::Visit for Message<'_> {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    *self.0 = format!("{value:?}");
                }
            }
        }
        let mut message = String::new();
        event.record(&mut Message(&mut message));
        self.0.lock().unwrap().push(message);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_warning_is_logged_once_and_only_when_it_should() {
    use tracing_subscriber::layer::SubscriberExt;
    let warnings = Warnings::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(warnings.clone()));

    // Scoped by principal: no warning.
    let scoped = app(
        IdempotencyLayer::new(MemoryStore::new()).with_principal_scope::<Account>(),
        Counter::default(),
    );
    post_as(&scoped, "alice-1", "k1", "{}").await;
    // Unscoped without credentials: no warning.
    let unscoped = IdempotencyLayer::new(MemoryStore::new());
    let anonymous = common::router(Counter::default()).layer(unscoped.clone());
    send(
        &anonymous,
        post_req(Some("k2")).body(Body::from("{}")).unwrap(),
    )
    .await;
    // Binding off: the user chose a global key space; no warning.
    let off = app(
        IdempotencyLayer::new(MemoryStore::new()).with_credential_binding(false),
        Counter::default(),
    );
    post_as(&off, "alice-1", "k3", "{}").await;
    assert_eq!(warnings.about_scope(), 0);

    // Unscoped with credentials: once, however many requests.
    let bound = app(unscoped, Counter::default());
    for n in 0..3 {
        post_as(&bound, "alice-1", &format!("k{n}"), "{}").await;
    }
    assert_eq!(warnings.about_scope(), 1);
}
