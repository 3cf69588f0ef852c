//! A webhook receiver that processes each delivery once, keyed on the
//! sender's delivery-id header instead of `Idempotency-Key`.
//!
//! Run with `cargo run --example webhook`, then redeliver:
//!
//! ```text
//! curl -i -X POST localhost:3001/webhooks/github -H 'X-GitHub-Delivery: 72d3162e-cc78' -d '{"action":"opened"}'
//! curl -i -X POST localhost:3001/webhooks/github -H 'X-GitHub-Delivery: 72d3162e-cc78' -d '{"action":"opened"}'
//! ```
//!
//! The second answer is the first one replayed (`Idempotent-Replayed: true`);
//! the event was handled once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::http::{HeaderName, StatusCode};
use axum::routing::post;
use axum::{Extension, Router};
use tower_idempotency::{IdempotencyLayer, MemoryStore, key::IdempotencyKey};

async fn github(
    Extension(delivery): Extension<IdempotencyKey>,
    Extension(handled): Extension<Arc<AtomicUsize>>,
    body: String,
) -> (StatusCode, String) {
    let n = handled.fetch_add(1, Ordering::SeqCst) + 1;
    tracing::info!(delivery = delivery.as_str(), "handling event #{n}: {body}");
    (StatusCode::ACCEPTED, format!("handled event #{n}\n"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let layer = IdempotencyLayer::new(MemoryStore::new())
        // The sender names each delivery; redeliveries reuse the name.
        .with_header(HeaderName::from_static("x-github-delivery"))
        .with_require_key(true)
        // Senders retry for days; keep records for a week.
        .with_ttl(std::time::Duration::from_secs(7 * 24 * 3600));
    let app = Router::new()
        .route("/webhooks/github", post(github).route_layer(layer))
        .layer(Extension(Arc::new(AtomicUsize::new(0))));
    let port = std::env::var("PORT").unwrap_or_else(|_| "3001".into());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
