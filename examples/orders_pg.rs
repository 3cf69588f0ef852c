//! The order service of the `orders` example, with its orders in a
//! PostgreSQL table written through `TransactionalPostgresStore`: an order
//! and the recorded response commit in one transaction, so no crash, panic
//! or lost connection can ever create an order twice or leave half of one.
//!
//! Run with `DATABASE_URL=postgres://… cargo run --example orders_pg
//! --features postgres`. It creates the `orders` table and the
//! idempotency table if they are missing.
//!
//! - `POST /orders` with JSON `{"item": string, "qty": integer}` and an
//!   `Idempotency-Key` header (required): creates an order with a fresh
//!   UUID and answers 201 with the order as JSON. Retries replay it.
//! - `GET /orders`: every committed order, oldest first, as a JSON array.
//!
//! Environment: `DATABASE_URL` (required), `PORT` (default 3000, on
//! 127.0.0.1), `ORDERS_DELAY_MS` (the handler sleeps this long after
//! writing the order and before answering, as a slow payment provider
//! would: kill the process meanwhile, and the order is gone with the
//! transaction), `RUST_LOG`.
//!
//! ```text
//! curl -i -X POST localhost:3000/orders -H 'Idempotency-Key: "k1"' \
//!      -H 'Content-Type: application/json' -d '{"item":"book","qty":1}'
//! ```

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Row};
use tower_idempotency::{
    IdempotencyLayer,
    store::postgres::{IdempotentTransaction, TransactionalPostgresStore},
};

#[derive(Deserialize)]
struct NewOrder {
    item: String,
    qty: i64,
}

#[derive(Clone, Serialize)]
struct Order {
    id: String,
    item: String,
    qty: i64,
}

#[derive(Clone)]
struct App {
    pool: PgPool,
    delay: Duration,
}

/// An error answered as a 500; the layer does not record it, so the
/// transaction rolls back and a retry runs again.
struct Failed(String);

impl axum::response::IntoResponse for Failed {
    fn into_response(self) -> axum::response::Response {
        tracing::error!(error = %self.0, "order failed");
        (StatusCode::INTERNAL_SERVER_ERROR, "order failed").into_response()
    }
}

impl<E: std::fmt::Display> From<E> for Failed {
    fn from(err: E) -> Self {
        Self(err.to_string())
    }
}

/// Writes the order on the request's transaction: it commits together with
/// the recorded 201, or not at all.
async fn create_order(
    State(app): State<App>,
    Extension(tx): Extension<IdempotentTransaction>,
    Json(new): Json<NewOrder>,
) -> Result<(StatusCode, Json<Order>), Failed> {
    let order = Order {
        id: uuid::Uuid::new_v4().to_string(),
        item: new.item,
        qty: new.qty,
    };
    {
        let mut conn = tx.lock().await?;
        sqlx::query("INSERT INTO orders (id, item, qty) VALUES ($1, $2, $3)")
            .bind(&order.id)
            .bind(&order.item)
            .bind(order.qty)
            .execute(&mut *conn)
            .await?;
    }
    if !app.delay.is_zero() {
        tokio::time::sleep(app.delay).await;
    }
    tracing::info!(id = %order.id, "order written; it commits with the response");
    Ok((StatusCode::CREATED, Json(order)))
}

async fn list_orders(State(app): State<App>) -> Result<Json<Vec<Order>>, Failed> {
    let rows = sqlx::query("SELECT id, item, qty FROM orders ORDER BY created_at, id")
        .fetch_all(&app.pool)
        .await?;
    let orders = rows
        .iter()
        .map(|row| {
            Ok(Order {
                id: row.try_get("id")?,
                item: row.try_get("item")?,
                qty: row.try_get("qty")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(orders))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_idempotency=debug".into()),
        )
        .init();

    let url = std::env::var("DATABASE_URL")
        .map_err(|_| "DATABASE_URL must name the PostgreSQL database for the orders")?;
    let port: u16 = std::env::var("PORT")
        .ok()
        .map(|p| p.parse())
        .transpose()?
        .unwrap_or(3000);
    let delay_ms: u64 = std::env::var("ORDERS_DELAY_MS")
        .ok()
        .map(|d| d.parse())
        .transpose()?
        .unwrap_or(0);

    // Every in-flight order holds a connection until it commits.
    let pool = sqlx::postgres::PgPoolOptions::new()
        // No ping before every statement: a broken connection fails its
        // call (503) and is dropped.
        .test_before_acquire(false)
        .max_connections(32)
        .connect(&url)
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS orders ( \
             id text PRIMARY KEY, \
             item text NOT NULL, \
             qty bigint NOT NULL, \
             created_at timestamptz NOT NULL DEFAULT now() \
         )",
    )
    .execute(&pool)
    .await?;
    let store = TransactionalPostgresStore::new(pool.clone());
    store.migrate().await?;
    store.spawn_sweeper(Duration::from_secs(60), 1000);

    let app = App {
        pool,
        delay: Duration::from_millis(delay_ms),
    };
    let router = Router::new()
        .route(
            "/orders",
            post(create_order)
                .get(list_orders)
                // Keys are required: every POST reaching the handler has its
                // transaction. Unknown paths and methods keep 404 and 405.
                .route_layer(IdempotencyLayer::new(store).with_require_key(true)),
        )
        .with_state(app);

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router).await?;
    Ok(())
}
