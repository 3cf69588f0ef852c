//! Different idempotency settings per route, with `route_layer`.
//!
//! Run with `cargo run --example per_route`.
//!
//! - `POST /payments`: a key is required; records replay for 24 hours.
//! - `POST /carts`: a key is optional; records replay for 10 minutes.
//! - `GET /health`: never touched by the layer.

use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use tower_idempotency::{IdempotencyLayer, MemoryStore};

async fn pay() -> (StatusCode, &'static str) {
    (StatusCode::CREATED, "paid\n")
}

async fn cart() -> (StatusCode, &'static str) {
    (StatusCode::CREATED, "cart created\n")
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter("info,tower_idempotency=debug")
        .init();
    // One store shared by both routes; keys are separate per route because
    // the fingerprint covers the path (reuse across routes is a 422).
    let store = MemoryStore::new();
    let strict = IdempotencyLayer::new(store.clone())
        .with_require_key(true)
        .with_ttl(Duration::from_secs(24 * 3600));
    let relaxed = IdempotencyLayer::new(store).with_ttl(Duration::from_secs(600));

    let app = Router::new()
        .merge(
            Router::new()
                .route("/payments", post(pay))
                .route_layer(strict),
        )
        .merge(
            Router::new()
                .route("/carts", post(cart))
                .route_layer(relaxed),
        )
        .route("/health", get(|| async { "ok\n" }));

    let port = std::env::var("PORT").unwrap_or_else(|_| "3002".into());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
