//! An order service whose `POST /orders` is safe to retry.
//!
//! Run with `cargo run --example orders` (in-memory store). With
//! `--features redis` and `REDIS_CLUSTER_URLS` set (comma-separated node
//! URLs), records live in that Redis Cluster, each lock and record
//! acknowledged by a replica before the service relies on it; with
//! `REDIS_URL` set instead, in that Redis. Otherwise the scheme of
//! `DATABASE_URL` picks a SQL store, each with its feature:
//!
//! | `DATABASE_URL` | store | feature |
//! |---|---|---|
//! | `postgres://…`, `postgresql://…` | `PostgresStore` | `postgres` |
//! | `mysql://…`, `mariadb://…` | `MySqlStore` | `mysql` |
//! | `sqlite://PATH`, `sqlite:PATH` | `SqliteStore` (the file is created if missing) | `sqlite` |
//!
//! A URL whose store is not compiled in is ignored with a warning, and the
//! records stay in memory. Each SQL store creates its table if missing and
//! sweeps expired rows every minute.
//!
//! With `--features dynamodb` and `DYNAMODB_TABLE` set, records live in
//! that DynamoDB table (from the standard AWS environment: `AWS_REGION`,
//! default `us-east-1`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`, and `AWS_ENDPOINT_URL` for an emulator), created if
//! missing.
//!
//! With `--features utoipa`, `GET /openapi.json` serves the service's
//! OpenAPI document, with the idempotency contract of `POST /orders` (the
//! key header, the problem responses, `Idempotent-Replayed`, the expiry
//! policy) written in by the layer.
//!
//! With `--features encryption` and `IDEMPOTENCY_RECORD_KEY` set (64 hex
//! characters, for example from `openssl rand -hex 32`), every record is
//! sealed with AES-256-GCM before the store sees it: the store holds no
//! order in plaintext. Set without that feature, the example refuses to
//! start rather than store plaintext.
//!
//! - `POST /orders` with JSON `{"item": string, "qty": integer}` and an
//!   `Idempotency-Key` header (required): creates an order with a fresh
//!   UUID and answers 201 with the order as JSON. Retries replay it.
//! - `GET /orders`: every order created so far, as a JSON array.
//!
//! Environment: `PORT` (default 3000, on 127.0.0.1), `ORDERS_DELAY_MS`
//! (the handler sleeps this long before creating the order, as a slow
//! payment provider would), `RUST_LOG` (for example
//! `RUST_LOG=tower_idempotency=debug`).
//!
//! ```text
//! curl -i -X POST localhost:3000/orders -H 'Idempotency-Key: "k1"' \
//!      -H 'Content-Type: application/json' -d '{"item":"book","qty":1}'
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower_idempotency::{IdempotencyLayer, MemoryStore, store::Store};

#[derive(Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
struct NewOrder {
    item: String,
    qty: i64,
}

#[derive(Clone, Serialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
struct Order {
    id: String,
    item: String,
    qty: i64,
}

#[derive(Clone)]
struct App {
    orders: Arc<Mutex<Vec<Order>>>,
    delay: Duration,
}

#[cfg_attr(feature = "utoipa", utoipa::path(
    post,
    path = "/orders",
    request_body = NewOrder,
    responses((status = 201, description = "The order, created once per Idempotency-Key", body = Order)),
))]
async fn create_order(
    State(app): State<App>,
    Json(new): Json<NewOrder>,
) -> (StatusCode, Json<Order>) {
    if !app.delay.is_zero() {
        tokio::time::sleep(app.delay).await;
    }
    let order = Order {
        id: uuid::Uuid::new_v4().to_string(),
        item: new.item,
        qty: new.qty,
    };
    app.orders
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(order.clone());
    tracing::info!(id = %order.id, "order created");
    (StatusCode::CREATED, Json(order))
}

#[cfg_attr(feature = "utoipa", utoipa::path(
    get,
    path = "/orders",
    responses((status = 200, description = "Every order created so far, oldest first", body = [Order])),
))]
async fn list_orders(State(app): State<App>) -> Json<Vec<Order>> {
    Json(app.orders.lock().unwrap_or_else(|e| e.into_inner()).clone())
}

/// The store named by the environment, sealed when `IDEMPOTENCY_RECORD_KEY`
/// is set.
async fn store() -> Result<Arc<dyn Store>, Box<dyn std::error::Error>> {
    let store = backend().await?;
    let Ok(hex) = std::env::var("IDEMPOTENCY_RECORD_KEY") else {
        return Ok(store);
    };
    #[cfg(feature = "encryption")]
    {
        use tower_idempotency::store::sealed::{RecordKey, SealedStore};
        let key = RecordKey::from_hex(hex.trim())?;
        tracing::info!(key_id = %format!("{:08x}", key.id()), "sealing records (AES-256-GCM)");
        Ok(Arc::new(SealedStore::new(store, key)))
    }
    #[cfg(not(feature = "encryption"))]
    {
        let _ = (hex, store);
        Err(
            "IDEMPOTENCY_RECORD_KEY is set, but this build has no `encryption` feature: \
             rebuild with --features encryption rather than store records in plaintext"
                .into(),
        )
    }
}

/// The backend named by the environment: Redis, a SQL database by the
/// scheme of `DATABASE_URL`, or memory.
async fn backend() -> Result<Arc<dyn Store>, Box<dyn std::error::Error>> {
    #[cfg(feature = "dynamodb")]
    if let Ok(table) = std::env::var("DYNAMODB_TABLE") {
        return dynamodb_store(table).await;
    }
    #[cfg(feature = "redis")]
    if let Ok(urls) = std::env::var("REDIS_CLUSTER_URLS") {
        let store = tower_idempotency::store::redis::RedisStore::from_cluster_urls(
            urls.split(',').map(str::trim).filter(|u| !u.is_empty()),
        )
        .await?;
        tracing::info!(
            replica_ack = store.replica_ack(),
            "using RedisStore on a Redis Cluster"
        );
        return Ok(Arc::new(store));
    }
    #[cfg(feature = "redis")]
    if let Ok(url) = std::env::var("REDIS_URL") {
        tracing::info!("using RedisStore");
        return Ok(Arc::new(
            tower_idempotency::store::redis::RedisStore::from_url(&url).await?,
        ));
    }
    if let Ok(url) = std::env::var("DATABASE_URL")
        && let Some(store) = sql_store(&url).await?
    {
        return Ok(store);
    }
    tracing::info!("using MemoryStore");
    Ok(Arc::new(MemoryStore::new()))
}

/// DynamoDbStore on `table`, from the standard AWS environment; the table
/// is created if missing.
#[cfg(feature = "dynamodb")]
async fn dynamodb_store(table: String) -> Result<Arc<dyn Store>, Box<dyn std::error::Error>> {
    use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
    use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
    use tower_idempotency::store::dynamodb::DynamoDbStore;

    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let region = var("AWS_REGION").unwrap_or_else(|| "us-east-1".to_owned());
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let mut config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region))
        .http_client(http);
    if let Some(endpoint) = var("AWS_ENDPOINT_URL") {
        config = config.endpoint_url(endpoint);
    }
    if let (Some(id), Some(secret)) = (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
        let credentials =
            Credentials::new(id, secret, var("AWS_SESSION_TOKEN"), None, "environment");
        config = config.credentials_provider(credentials);
    }
    let client = aws_sdk_dynamodb::Client::from_conf(config.build());
    let store = DynamoDbStore::new(client, table.as_str());
    store.create_table().await?;
    tracing::info!(table = %table, "using DynamoDbStore");
    Ok(Arc::new(store))
}

/// The SQL store `url`'s scheme names, if its feature is compiled in.
async fn sql_store(url: &str) -> Result<Option<Arc<dyn Store>>, Box<dyn std::error::Error>> {
    let scheme = url.split_once(':').map_or("", |(scheme, _)| scheme);
    match scheme {
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => {
            tracing::info!("using PostgresStore");
            let pool = sqlx::postgres::PgPoolOptions::new()
                .test_before_acquire(false)
                .connect(url)
                .await?;
            let store = tower_idempotency::store::postgres::PostgresStore::new(pool);
            store.migrate().await?;
            store.spawn_sweeper(Duration::from_secs(60), 1000);
            Ok(Some(Arc::new(store)))
        }
        #[cfg(feature = "mysql")]
        "mysql" | "mariadb" => {
            use std::str::FromStr;
            tracing::info!("using MySqlStore");
            let options =
                sqlx::mysql::MySqlConnectOptions::from_str(&url.replacen("mariadb:", "mysql:", 1))?;
            let pool = sqlx::mysql::MySqlPoolOptions::new()
                .test_before_acquire(false)
                .connect_with(options)
                .await?;
            let store = tower_idempotency::store::mysql::MySqlStore::new(pool);
            store.migrate().await?;
            store.spawn_sweeper(Duration::from_secs(60), 1000);
            Ok(Some(Arc::new(store)))
        }
        #[cfg(feature = "sqlite")]
        "sqlite" => {
            tracing::info!("using SqliteStore");
            let store = tower_idempotency::store::sqlite::SqliteStore::open(url).await?;
            store.migrate().await?;
            store.spawn_sweeper(Duration::from_secs(60), 1000);
            Ok(Some(Arc::new(store)))
        }
        _ => {
            tracing::warn!(
                scheme,
                "DATABASE_URL names no store compiled into this build (features postgres, mysql, sqlite); keeping records in memory"
            );
            Ok(None)
        }
    }
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
    let delay_ms: u64 = std::env::var("ORDERS_DELAY_MS")
        .ok()
        .map(|d| d.parse())
        .transpose()?
        .unwrap_or(0);

    let app = App {
        orders: Arc::default(),
        delay: Duration::from_millis(delay_ms),
    };
    let idempotency = IdempotencyLayer::from_arc(store().await?).with_require_key(true);
    #[cfg(feature = "utoipa")]
    let openapi = {
        use utoipa::OpenApi;
        #[derive(OpenApi)]
        #[openapi(
            info(
                title = "orders",
                description = "An order service whose POST /orders is safe to retry."
            ),
            paths(create_order, list_orders)
        )]
        struct ApiDoc;
        let mut doc = ApiDoc::openapi();
        idempotency.openapi().apply(&mut doc);
        doc.to_pretty_json()?
    };
    let router = Router::new().route(
        "/orders",
        post(create_order)
            .get(list_orders)
            // The route's handlers only: an unknown path keeps the
            // router's 404 and a method the route lacks its 405.
            .route_layer(idempotency),
    );
    // The published policy (the Idempotency-Key draft, 2.3 and 2.5.2).
    #[cfg(feature = "utoipa")]
    let router = router.route(
        "/openapi.json",
        axum::routing::get(move || async move {
            (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                openapi,
            )
        }),
    );
    let router = router.with_state(app);

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router).await?;
    Ok(())
}
