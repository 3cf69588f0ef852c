//! A payment handler that derives the key for its call to a payment
//! provider from the request's own key, so a retry that runs again (after a
//! crash between the charge and the record) cannot charge twice: the
//! provider sees the same key and deduplicates.
//!
//! Run with `cargo run --example downstream`, then:
//!
//! ```text
//! curl -i -X POST localhost:3003/payments -H 'Idempotency-Key: "pay-1"' -d '{"amount":100}'
//! ```

use axum::http::StatusCode;
use axum::routing::post;
use axum::{Extension, Router};
use tower_idempotency::{IdempotencyLayer, MemoryStore, key::IdempotencyKey};

/// Stands in for a payment provider's client.
async fn charge(provider_key: &str, body: &str) -> String {
    tracing::info!(provider_key, "charging: {body}");
    format!("ch_{}", &provider_key[..12])
}

async fn pay(Extension(key): Extension<IdempotencyKey>, body: String) -> (StatusCode, String) {
    // Deterministic: every attempt of this request sends the same key.
    let provider_key = key.derive("payment-provider");
    let charge_id = charge(&provider_key, &body).await;
    (
        StatusCode::CREATED,
        format!("{{\"charge\":\"{charge_id}\"}}\n"),
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let app = Router::new().route(
        "/payments",
        post(pay).route_layer(IdempotencyLayer::new(MemoryStore::new()).with_require_key(true)),
    );
    let port = std::env::var("PORT").unwrap_or_else(|_| "3003".into());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
