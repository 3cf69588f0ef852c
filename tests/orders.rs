//! The `orders` example driven from outside, over TCP, as its users run it,
//! on every shared store it can pick from its environment: two instances on
//! one store take 100 concurrent requests with one key and create one
//! order; a fresh instance after both are gone replays that order without
//! creating another.
//!
//! Each store runs when its feature is built and its server answers
//! (SQLite needs none); outside CI a missing server skips with a visible
//! line, under `CI=true` it fails.

#![cfg(any(
    feature = "redis",
    feature = "postgres",
    feature = "mysql",
    feature = "sqlite",
    feature = "dynamodb",
    feature = "utoipa"
))]
#![allow(clippy::unwrap_used)]
// The helpers serve whichever store tests the features build.
#![allow(dead_code)]

mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One running `orders` process, killed when dropped.
struct Orders {
    child: Child,
    port: u16,
}

impl Drop for Orders {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Orders {
    /// Starts the example with `env` (and nothing of this process's store
    /// variables), and waits until it accepts connections.
    async fn start(env: &[(&str, String)]) -> Self {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let mut cmd = Command::new(common::example_bin("orders").await);
        for var in [
            "REDIS_URL",
            "REDIS_CLUSTER_URLS",
            "DATABASE_URL",
            "DYNAMODB_TABLE",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)))
            .env("PORT", port.to_string())
            .env("ORDERS_DELAY_MS", "100")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let mut orders = Self {
            child: cmd.spawn().unwrap(),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if let Some(status) = orders.child.try_wait().unwrap() {
                panic!("orders exited before listening: {status}");
            }
            assert!(Instant::now() < deadline, "orders not listening in 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        orders
    }

    async fn post(&self, key: &str) -> Response {
        self.post_as(key, None).await
    }

    /// `POST /orders`, with `Authorization: Bearer <token>` if given.
    async fn post_as(&self, key: &str, token: Option<&str>) -> Response {
        let body = r#"{"item":"book","qty":1}"#;
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        request(
            self.port,
            &format!(
                "POST /orders HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
                 Idempotency-Key: {key}\r\nContent-Type: application/json\r\n{auth}\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        )
        .await
    }

    /// The orders this instance created.
    async fn orders(&self) -> Vec<serde_json::Value> {
        let res = request(
            self.port,
            "GET /orders HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(res.status, 200);
        serde_json::from_str(&res.body).unwrap()
    }
}

struct Response {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

/// One HTTP/1.1 exchange on a connection of its own.
async fn request(port: u16, raw: &str) -> Response {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(raw.as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await.unwrap();
    let text = String::from_utf8(bytes).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    // axum answers these bodies with a length, never chunked.
    assert!(!headers.contains_key("transfer-encoding"), "{head}");
    Response {
        status: status.parse().unwrap(),
        headers,
        body: body.to_owned(),
    }
}

/// Two instances, 100 concurrent requests with one key: one order. Then
/// both stop, a third starts, and the same key replays that order. Returns
/// the idempotency key it used (without its quotes).
async fn one_order_across_instances_and_restarts(env: Vec<(&str, String)>) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    let key = format!("\"{id}\"");
    let (a, b) = (Orders::start(&env).await, Orders::start(&env).await);
    let (a, b) = (std::sync::Arc::new(a), std::sync::Arc::new(b));
    let mut tasks = Vec::new();
    for i in 0..100 {
        let instance = if i % 2 == 0 { a.clone() } else { b.clone() };
        let key = key.clone();
        tasks.push(tokio::spawn(async move { instance.post(&key).await }));
    }
    let (mut created, mut replayed, mut conflicts) = (Vec::new(), 0, 0);
    for task in tasks {
        let res = task.await.unwrap();
        match res.status {
            201 if res.headers.get("idempotent-replayed").map(String::as_str) == Some("true") => {
                created.push(res.body);
                replayed += 1;
            }
            201 => created.push(res.body),
            409 => {
                assert_eq!(res.headers["content-type"], "application/problem+json");
                conflicts += 1;
            }
            other => panic!("unexpected {other}: {}", res.body),
        }
    }
    assert_eq!(created.len() + conflicts, 100);
    assert_eq!(created.len(), replayed + 1, "one first execution");
    assert!(
        created.windows(2).all(|w| w[0] == w[1]),
        "every 201 is the same order"
    );
    let made = a.orders().await.len() + b.orders().await.len();
    assert_eq!(made, 1, "the two instances created {made} orders");
    let order: serde_json::Value = serde_json::from_str(&created[0]).unwrap();

    // Both instances stop; a new one replays from the store.
    drop((a, b));
    let c = Orders::start(&env).await;
    let res = c.post(&key).await;
    assert_eq!(res.status, 201, "{}", res.body);
    assert_eq!(res.headers["idempotent-replayed"], "true");
    let replay: serde_json::Value = serde_json::from_str(&res.body).unwrap();
    assert_eq!(replay, order, "the same order, byte for byte in JSON");
    assert!(c.orders().await.is_empty(), "the restart created an order");
    id
}

/// Deletes the example's Redis record for the idempotency key `idem` (its
/// default prefix, no scope), so a test run leaves nothing behind.
#[cfg(feature = "redis")]
async fn delete_record(url: &str, idem: &str) {
    let client = tower_idempotency::store::redis::driver::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let deleted: usize = tower_idempotency::store::redis::driver::cmd("DEL")
        .arg(format!("idempotency:{{{}}}", common::store_key_hex(idem)))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(deleted, 1, "the record was not where the example keeps it");
}

/// Drops the example's records table (its default name) from the test
/// database.
#[cfg(feature = "postgres")]
async fn drop_postgres_records(url: &str) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query("DROP TABLE IF EXISTS idempotency_records")
        .execute(&mut conn)
        .await
        .unwrap();
}

/// The same for MariaDB.
#[cfg(feature = "mysql")]
async fn drop_mysql_records(url: &str) {
    use sqlx::Connection;
    let mut conn = sqlx::MySqlConnection::connect(url).await.unwrap();
    sqlx::query("DROP TABLE IF EXISTS idempotency_records")
        .execute(&mut conn)
        .await
        .unwrap();
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_on_postgres() {
    let Some(url) = common::backend(common::POSTGRES) else {
        return;
    };
    one_order_across_instances_and_restarts(vec![("DATABASE_URL", url.clone())]).await;
    drop_postgres_records(&url).await;
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_on_mariadb() {
    let Some(url) = common::backend(common::MYSQL) else {
        return;
    };
    // The `mariadb://` scheme, as the example documents it.
    let mariadb = url.replacen("mysql://", "mariadb://", 1);
    one_order_across_instances_and_restarts(vec![("DATABASE_URL", mariadb)]).await;
    drop_mysql_records(&url).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_on_sqlite() {
    let dir = std::env::temp_dir().join(format!("orders-sqlite-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    // The file does not exist yet: the example creates it.
    let url = format!("sqlite://{}", dir.join("orders.db").display());
    one_order_across_instances_and_restarts(vec![("DATABASE_URL", url)]).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_on_redis() {
    let Some(url) = common::backend(common::REDIS) else {
        return;
    };
    let idem = one_order_across_instances_and_restarts(vec![("REDIS_URL", url.clone())]).await;
    delete_record(&url, &idem).await;
}

/// On a Redis Cluster (`REDIS_CLUSTER_URLS`), the record is on exactly one
/// primary and on its replica: the example waits for the replica to
/// acknowledge it.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_on_redis_cluster() {
    use tower_idempotency::store::redis::driver;
    let Some(urls) = common::cluster_backend() else {
        return;
    };
    let idem =
        one_order_across_instances_and_restarts(vec![("REDIS_CLUSTER_URLS", urls.join(","))]).await;
    let key = format!("idempotency:{{{}}}", common::store_key_hex(&idem));
    // Each node: a primary holds it, a replica holds a copy (READONLY lets
    // a replica answer for its primary's slots).
    let (mut on_primaries, mut on_replicas) = (0, 0);
    let primaries = common::cluster_primaries(&urls).await;
    for url in &urls {
        let mut conn = driver::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = driver::cmd("READONLY")
            .query_async(&mut conn)
            .await
            .unwrap();
        let exists: driver::RedisResult<usize> =
            driver::cmd("EXISTS").arg(&key).query_async(&mut conn).await;
        if exists == Ok(1) {
            if primaries.contains(url) {
                on_primaries += 1;
            } else {
                on_replicas += 1;
            }
        }
    }
    common::delete_prefix_on_cluster(&urls, &key).await;
    assert_eq!((on_primaries, on_replicas), (1, 1), "the record's copies");
}

/// Started with `REDIS_URL` and `IDEMPOTENCY_RECORD_KEY`: Redis holds no
/// order in plaintext, the order still replays, and another caller's
/// credentials with the same key and body get 422, never the order.
#[cfg(all(feature = "redis", feature = "encryption"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_sealed_in_redis_keep_no_plaintext_and_no_other_callers_order() {
    let Some(url) = common::backend(common::REDIS) else {
        return;
    };
    let secret: String = (0..32).map(|i| format!("{:02x}", i * 7 + 3)).collect();
    let orders = Orders::start(&[
        ("REDIS_URL", url.clone()),
        ("IDEMPOTENCY_RECORD_KEY", secret),
    ])
    .await;
    let idem = uuid::Uuid::new_v4().to_string();
    let key = format!("\"{idem}\"");
    let res = orders.post_as(&key, Some("alice")).await;
    assert_eq!(res.status, 201, "{}", res.body);
    let order: serde_json::Value = serde_json::from_str(&res.body).unwrap();
    let id = order["id"].as_str().unwrap().to_owned();

    let replay = orders.post_as(&key, Some("alice")).await;
    assert_eq!(replay.status, 201);
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    assert_eq!(replay.body, res.body);

    let other = orders.post_as(&key, Some("mallory")).await;
    assert_eq!(other.status, 422, "{}", other.body);
    assert!(!other.body.contains(&id), "another caller got the order");
    assert_eq!(orders.orders().await.len(), 1);

    // Every value under the store's prefix, as bytes: the order's id is in
    // none of them.
    let client = tower_idempotency::store::redis::driver::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys = common::scan(&mut conn, "idempotency:").await;
    assert!(!keys.is_empty(), "no record in Redis");
    for k in keys {
        let value: Option<Vec<u8>> = tower_idempotency::store::redis::driver::cmd("GET")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .unwrap_or(None);
        let value = value.unwrap_or_default();
        assert!(
            !value.windows(id.len()).any(|w| w == id.as_bytes()),
            "the order is in Redis in plaintext under {k}"
        );
    }
    delete_record(&url, &idem).await;
}

#[cfg(feature = "dynamodb")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_on_dynamodb() {
    let Some(endpoint) = common::backend(common::DYNAMODB) else {
        return;
    };
    let table = format!("orders-{}", uuid::Uuid::new_v4().simple());
    one_order_across_instances_and_restarts(vec![
        ("DYNAMODB_TABLE", table),
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_ACCESS_KEY_ID", "test".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
    ])
    .await;
}
/// The OpenAPI document the example serves describes the idempotency
/// contract of `POST /orders` completely: the key header (required, its
/// syntax and length), the 400/409/410/413/422/503 problem responses with
/// their schema (and `Retry-After` where it applies), `Idempotent-Replayed`
/// on the 201, and the expiry policy.
#[cfg(feature = "utoipa")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_publishes_its_idempotency_policy() {
    let orders = Orders::start(&[]).await;
    let res = request(
        orders.port,
        "GET /openapi.json HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(res.status, 200);
    let doc: serde_json::Value = serde_json::from_str(&res.body).unwrap();
    let post = &doc["paths"]["/orders"]["post"];

    let key = post["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "Idempotency-Key")
        .expect("the key header parameter");
    assert_eq!(key["in"], "header");
    assert_eq!(key["required"], true);
    assert_eq!(key["schema"]["type"], "string");
    assert_eq!(key["schema"]["minLength"], 1);
    assert_eq!(key["schema"]["maxLength"], 255);
    assert!(key["description"].as_str().unwrap().contains("sf-string"));

    for status in ["400", "409", "410", "413", "422", "503"] {
        let response = &post["responses"][status];
        assert_eq!(
            response["content"]["application/problem+json"]["schema"]["$ref"],
            "#/components/schemas/IdempotencyProblem",
            "{status}"
        );
        let retry_after = !response["headers"]["Retry-After"].is_null();
        assert_eq!(retry_after, status == "409" || status == "503", "{status}");
    }
    let created = &post["responses"]["201"];
    assert_eq!(
        created["headers"]["Idempotent-Replayed"]["schema"]["enum"][0],
        "true"
    );
    assert!(
        !created["content"]["application/json"].is_null(),
        "the order itself"
    );
    let description = post["description"].as_str().unwrap();
    assert!(
        description.contains("1 day (86400 seconds)"),
        "{description}"
    );

    let problem = &doc["components"]["schemas"]["IdempotencyProblem"];
    for member in ["type", "title", "status", "detail", "instance", "retryable"] {
        assert!(!problem["properties"][member].is_null(), "{member}");
    }
    // GET is not covered: no key parameter there.
    assert!(doc["paths"]["/orders"]["get"]["parameters"].is_null());
}
