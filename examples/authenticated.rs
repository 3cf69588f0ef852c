//! Idempotency behind authentication: a bearer-token check (axum's
//! `middleware::from_fn`) puts the caller's account in the request, and the
//! layer scopes keys by it. Two accounts never share a record, whatever
//! keys they pick, and one account keeps its records across token
//! refreshes.
//!
//! Run with `cargo run --example authenticated`, then:
//!
//! ```text
//! # Alice pays; her retry (even with a refreshed token) replays it.
//! curl -i -X POST localhost:3000/payments -H 'Authorization: Bearer alice-token-1' \
//!      -H 'Idempotency-Key: "p1"' -d '{"amount":10}'
//! curl -i -X POST localhost:3000/payments -H 'Authorization: Bearer alice-token-2' \
//!      -H 'Idempotency-Key: "p1"' -d '{"amount":10}'
//! # Bob with the same key runs his own payment, and never sees Alice's.
//! curl -i -X POST localhost:3000/payments -H 'Authorization: Bearer bob-token' \
//!      -H 'Idempotency-Key: "p1"' -d '{"amount":10}'
//! ```
//!
//! Environment: `PORT` (default 3000, on 127.0.0.1).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Router};
use tower_idempotency::{IdempotencyLayer, MemoryStore};

/// The authenticated caller, as the auth middleware finds it.
#[derive(Clone, Debug)]
struct Account(&'static str);

impl std::fmt::Display for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The scope the layer files records under (hashed, never stored).
        write!(f, "account:{}", self.0)
    }
}

/// Stands in for a real token check (a JWT verification, a session
/// lookup): several tokens may belong to one account.
fn account_of(token: &str) -> Option<Account> {
    match token {
        "alice-token-1" | "alice-token-2" => Some(Account("alice")),
        "bob-token" => Some(Account("bob")),
        _ => None,
    }
}

async fn require_bearer(mut req: Request, next: Next) -> Response {
    let account = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(account_of);
    match account {
        Some(account) => {
            req.extensions_mut().insert(account);
            next.run(req).await
        }
        None => (StatusCode::UNAUTHORIZED, "a valid bearer token is required").into_response(),
    }
}

async fn pay(
    State(next_id): State<Arc<AtomicU64>>,
    Extension(account): Extension<Account>,
    body: String,
) -> (StatusCode, String) {
    let id = next_id.fetch_add(1, Ordering::Relaxed) + 1;
    tracing::info!(%account, id, "payment made");
    (
        StatusCode::CREATED,
        format!(
            "{{\"payment\":{id},\"account\":\"{}\",\"request\":{body}}}",
            account.0
        ),
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_idempotency=debug".into()),
        )
        .init();
    let port: u16 = std::env::var("PORT")
        .ok()
        .map(|p| p.parse())
        .transpose()?
        .unwrap_or(3000);

    let idempotency = IdempotencyLayer::new(MemoryStore::new())
        .with_require_key(true)
        .with_principal_scope::<Account>();
    let app = Router::new()
        .route("/payments", post(pay).route_layer(idempotency))
        // Outermost, so the account is in the request before the layer
        // reads it.
        .layer(middleware::from_fn(require_bearer))
        .with_state(Arc::new(AtomicU64::new(0)));

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
