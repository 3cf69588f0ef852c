//! Nothing a store keeps reveals the client's key or the tenant's scope:
//! every byte written to Redis and PostgreSQL is scanned for both.

#![cfg(all(feature = "redis", feature = "postgres"))]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::StatusCode;
use common::*;
use tower_idempotency::{IdempotencyLayer, store::Store};

const RAW_KEY: &str = "raw-key-7f3a9c1e";
const SCOPE: &str = "tenant-secret-5d2b";

fn url(var: &str) -> Option<String> {
    common::backend(match var {
        "REDIS_URL" => common::REDIS,
        _ => common::POSTGRES,
    })
}

/// Drives a first execution, a replay, a mismatch and an oversized response
/// (a tombstone) through the layer, with a scope.
async fn exercise(store: Arc<dyn Store>) {
    let counter = Counter::default();
    let app = router(counter.clone()).layer(
        IdempotencyLayer::from_arc(store)
            .with_max_response_body(64)
            .with_scope(|parts| {
                parts
                    .headers
                    .get("x-tenant")?
                    .to_str()
                    .ok()
                    .map(str::to_owned)
            }),
    );
    let req = |key: &str, body: &'static str, extra: Option<(&'static str, &'static str)>| {
        let mut b = post_req(Some(key)).header("x-tenant", SCOPE);
        if let Some((name, value)) = extra {
            b = b.header(name, value);
        }
        b.body(Body::from(body)).unwrap()
    };
    assert_eq!(
        send(&app, req(RAW_KEY, "{}", None)).await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        send(&app, req(RAW_KEY, "{}", None)).await.1["idempotent-replayed"],
        "true"
    );
    assert_eq!(
        send(&app, req(RAW_KEY, "{\"x\":1}", None)).await.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let big = format!("{RAW_KEY}-big");
    assert_eq!(
        send(&app, req(&big, "{}", Some(("x-size", "500")))).await.0,
        StatusCode::CREATED
    );
    assert_eq!(send(&app, req(&big, "{}", None)).await.0, StatusCode::GONE);
    assert_eq!(counter.get(), 2);
}

fn assert_clean(what: &str, bytes: &[u8]) {
    for secret in [RAW_KEY, SCOPE] {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{what} contains {secret:?}"
        );
    }
}

#[tokio::test]
async fn redis_keeps_neither_key_nor_scope() {
    let Some(url) = url("REDIS_URL") else { return };
    let prefix = format!("security:{}:", uuid::Uuid::new_v4().simple());
    let store = tower_idempotency::store::redis::RedisStore::from_url(&url)
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    let _cleanup = common::DeleteOnDrop::new(&url, &prefix);
    exercise(Arc::new(store.clone())).await;

    let client = tower_idempotency::store::redis::driver::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys = scan(&mut conn, &prefix).await;
    assert_eq!(keys.len(), 2, "{keys:?}");
    for key in keys {
        assert_clean("a Redis key name", key.as_bytes());
        let value: Vec<u8> = tower_idempotency::store::redis::driver::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(!value.is_empty());
        assert_clean("a Redis value", &value);
        let _: () = tower_idempotency::store::redis::driver::cmd("DEL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn postgres_keeps_neither_key_nor_scope() {
    let Some(url) = url("DATABASE_URL") else {
        return;
    };
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let table = format!(
        "t_{}_sec",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    );
    let store = tower_idempotency::store::postgres::PostgresStore::new(pool.clone())
        .with_schema("tower_idempotency_test")
        .unwrap()
        .with_table(&format!(
            "{table}_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ))
        .unwrap();
    store.migrate().await.unwrap();
    exercise(Arc::new(store.clone())).await;

    // Every column of every row, as the server renders it.
    let rows: Vec<(Vec<u8>,)> = sqlx::query_as(&format!(
        "SELECT convert_to(t::text, 'UTF8') FROM {} AS t",
        store.qualified_table()
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2);
    // Binary columns render as hex there: scan the raw bytes too.
    type Row = (Vec<u8>, Vec<u8>, Option<Vec<u8>>);
    let raw: Vec<Row> = sqlx::query_as(&format!(
        "SELECT key, fingerprint, record FROM {}",
        store.qualified_table()
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    for (text,) in &rows {
        assert_clean("a PostgreSQL row", text);
    }
    for (key, fingerprint, record) in &raw {
        assert_clean("a PostgreSQL key", key);
        assert_clean("a PostgreSQL fingerprint", fingerprint);
        assert_clean("a PostgreSQL record", record.as_deref().unwrap_or_default());
    }
    sqlx::query(&format!("DROP TABLE {}", store.qualified_table()))
        .execute(&pool)
        .await
        .unwrap();
}
