//! The order service under load: `POST /orders` answers 201 with a small
//! JSON order echoing the item; `GET /orders` answers 200 with the count.
//!
//! ```text
//! bench-server --port 3000 --mode bare|memory|redis|redis-cluster|redis-cluster-noack|postgres|postgres-async|mysql|sqlite|dynamodb \
//!              [--preload N] [--preload-body-bytes 1024] [--delay-ms 0] \
//!              [--threads 0] [--exit-after 900] [--max-entries 2000000] \
//!              [--max-mib 4096] [--preload-rows N] [--body-mode keep|wrap]
//! ```
//!
//! - `bare`: no idempotency layer, the reference;
//! - `memory`: `MemoryStore` bounded to `--max-entries` (2,000,000) entries
//!   and `--max-mib` (4,096) MiB (a small bound keeps the store from
//!   growing: the oldest records make room);
//! - `redis`: `RedisStore` on `REDIS_URL` (feature `redis`);
//! - `redis-cluster`: `RedisStore` on the Redis Cluster `REDIS_CLUSTER_URLS`
//!   names (comma-separated nodes), each lock, record and extension
//!   acknowledged by a replica (the cluster default); `redis-cluster-noack`:
//!   the same without acknowledgement (feature `redis`);
//! - `postgres`: `PostgresStore` on `DATABASE_URL`, table
//!   `perf_idempotency_records` (feature `postgres`; `PG_POOL` connections,
//!   default 16: PostgreSQL shares the 2 cores, and more backends than that
//!   only contend: of 4, 8, 16, 32 and 64, 16 did best for first executions);
//!   `postgres-async`: the same with `with_async_lock_commit(true)`, one WAL
//!   flush per first execution instead of two.
//!
//! `--body-mode` picks the layer's response body type: `keep` (default,
//! `keep_body_type()`: axum's own `Body`) or `wrap` (`ResponseBody<Body>`,
//! which axum boxes once more).
//!
//! `--delay-ms` makes `POST /orders` sleep first, as a slow downstream call
//! would (so `loadgen --keys storm` meets locks). `--threads` sets the
//! runtime's worker threads (0: one per core).
//!
//! `--preload N` records N orders (keys `pre-0` .. `pre-{N-1}`, bodies of
//! `--preload-body-bytes`) through the layer, in process, before listening,
//! so `loadgen --keys preloaded --key-space N` replays them.
//!
//! `--preload-rows N` (PostgreSQL only) empties the table and fills it with
//! N completed records in bulk, far faster than through the layer: one
//! order is recorded through the layer, and N − 1 rows copy its record
//! under keys of their own (SHA-256 digests, spread over the key index as
//! the store's keys are). They measure first executions next to N resident
//! rows; they are not replayable under any key a client would send. The
//! server
//! binds 127.0.0.1 only, prints `listening on http://…` once ready, and
//! exits by itself after `--exit-after` seconds (0: never).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, MemoryStore, store::Store};
use tower_idempotency_perf::{Args, order_body, preload_key};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The table of the PostgreSQL and MySQL modes (and of `--preload-rows`).
#[cfg(any(feature = "postgres", feature = "mysql"))]
const SQL_TABLE: &str = "perf_idempotency_records";

#[derive(Deserialize)]
struct NewOrder {
    item: String,
    qty: i64,
}

#[derive(Serialize)]
struct Order {
    id: u64,
    item: String,
    qty: i64,
}

#[derive(Serialize)]
struct Count {
    orders: u64,
}

#[derive(Clone)]
struct App {
    next: Arc<AtomicU64>,
    delay: Duration,
}

async fn create_order(
    State(app): State<App>,
    Json(new): Json<NewOrder>,
) -> (StatusCode, Json<Order>) {
    if !app.delay.is_zero() {
        tokio::time::sleep(app.delay).await;
    }
    let next = &app.next;
    let id = next.fetch_add(1, Ordering::Relaxed);
    let order = Order {
        id,
        item: new.item,
        qty: new.qty,
    };
    (StatusCode::CREATED, Json(order))
}

async fn count_orders(State(app): State<App>) -> Json<Count> {
    Json(Count {
        orders: app.next.load(Ordering::Relaxed),
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Bare,
    Memory,
    Redis,
    RedisCluster { ack: bool },
    Postgres { async_lock: bool },
    Mysql,
    Sqlite,
    Dynamodb,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "bare" => Self::Bare,
            "memory" => Self::Memory,
            "redis" => Self::Redis,
            "redis-cluster" => Self::RedisCluster { ack: true },
            "redis-cluster-noack" => Self::RedisCluster { ack: false },
            "postgres" => Self::Postgres { async_lock: false },
            "postgres-async" => Self::Postgres { async_lock: true },
            "mysql" => Self::Mysql,
            "sqlite" => Self::Sqlite,
            "dynamodb" => Self::Dynamodb,
            _ => return Err(format!("unknown mode `{s}`")),
        })
    }
}

/// The store for `mode`, or `None` for `bare`; the `MemoryStore` handle
/// too, to report its size.
async fn store(
    mode: Mode,
    max_entries: usize,
    max_mib: usize,
) -> Result<(Option<Arc<dyn Store>>, Option<MemoryStore>), BoxError> {
    match mode {
        Mode::Bare => Ok((None, None)),
        Mode::Memory => {
            let store = MemoryStore::builder()
                .max_entries(max_entries)
                .max_bytes(max_mib << 20)
                .build();
            Ok((Some(Arc::new(store.clone())), Some(store)))
        }
        Mode::Redis => redis_store().await.map(|s| (Some(s), None)),
        Mode::RedisCluster { ack } => redis_cluster_store(ack).await.map(|s| (Some(s), None)),
        Mode::Postgres { async_lock } => postgres_store(async_lock).await.map(|s| (Some(s), None)),
        Mode::Mysql => mysql_store().await.map(|s| (Some(s), None)),
        Mode::Sqlite => sqlite_store().await.map(|s| (Some(s), None)),
        Mode::Dynamodb => dynamodb_store().await.map(|s| (Some(s), None)),
    }
}

#[cfg(feature = "redis")]
async fn redis_store() -> Result<Arc<dyn Store>, BoxError> {
    let url = std::env::var("REDIS_URL").map_err(|_| "--mode redis needs REDIS_URL")?;
    Ok(Arc::new(
        tower_idempotency::store::redis::RedisStore::from_url(&url)
            .await?
            .with_prefix("perf:idempotency:"),
    ))
}

#[cfg(not(feature = "redis"))]
async fn redis_store() -> Result<Arc<dyn Store>, BoxError> {
    Err("--mode redis needs the `redis` feature of this crate".into())
}

#[cfg(feature = "redis")]
async fn redis_cluster_store(ack: bool) -> Result<Arc<dyn Store>, BoxError> {
    let urls = std::env::var("REDIS_CLUSTER_URLS")
        .map_err(|_| "--mode redis-cluster needs REDIS_CLUSTER_URLS")?;
    let store = tower_idempotency::store::redis::RedisStore::from_cluster_urls(urls.split(','))
        .await?
        .with_prefix("perf:idempotency:");
    Ok(Arc::new(if ack {
        store
    } else {
        store.with_replica_ack(0)
    }))
}

#[cfg(not(feature = "redis"))]
async fn redis_cluster_store(_ack: bool) -> Result<Arc<dyn Store>, BoxError> {
    Err("--mode redis-cluster needs the `redis` feature of this crate".into())
}

#[cfg(feature = "postgres")]
async fn postgres_store(async_lock: bool) -> Result<Arc<dyn Store>, BoxError> {
    let url = std::env::var("DATABASE_URL").map_err(|_| "--mode postgres needs DATABASE_URL")?;
    let pool_size: u32 = std::env::var("PG_POOL")
        .ok()
        .map(|p| p.parse())
        .transpose()?
        .unwrap_or(16);
    let pool = sqlx::postgres::PgPoolOptions::new()
        // No ping before every statement: a broken connection fails its
        // call (503) and is dropped.
        .test_before_acquire(false)
        .max_connections(pool_size)
        .connect(&url)
        .await?;
    let store = tower_idempotency::store::postgres::PostgresStore::new(pool)
        .with_table(SQL_TABLE)?
        .with_async_lock_commit(async_lock);
    store.migrate().await?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "postgres"))]
async fn postgres_store(_async_lock: bool) -> Result<Arc<dyn Store>, BoxError> {
    Err("--mode postgres needs the `postgres` feature of this crate".into())
}

#[cfg(feature = "mysql")]
async fn mysql_store() -> Result<Arc<dyn Store>, BoxError> {
    use std::str::FromStr;
    let url = std::env::var("MYSQL_URL").map_err(|_| "--mode mysql needs MYSQL_URL")?;
    let pool_size: u32 = std::env::var("PG_POOL")
        .ok()
        .map(|p| p.parse())
        .transpose()?
        .unwrap_or(16);
    let options =
        sqlx::mysql::MySqlConnectOptions::from_str(&url.replacen("mariadb:", "mysql:", 1))?;
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .test_before_acquire(false)
        .max_connections(pool_size)
        .connect_with(options)
        .await?;
    let store = tower_idempotency::store::mysql::MySqlStore::new(pool).with_table(SQL_TABLE)?;
    store.migrate().await?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "mysql"))]
async fn mysql_store() -> Result<Arc<dyn Store>, BoxError> {
    Err("--mode mysql needs the `mysql` feature of this crate".into())
}

/// A SQLite file at `SQLITE_PATH`, or a fresh one in the temporary
/// directory.
#[cfg(feature = "sqlite")]
async fn sqlite_store() -> Result<Arc<dyn Store>, BoxError> {
    let path = match std::env::var("SQLITE_PATH") {
        Ok(path) => std::path::PathBuf::from(path),
        Err(_) => std::env::temp_dir().join(format!("bench-server-{}.db", std::process::id())),
    };
    let store = tower_idempotency::store::sqlite::SqliteStore::open(&path).await?;
    store.migrate().await?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "sqlite"))]
async fn sqlite_store() -> Result<Arc<dyn Store>, BoxError> {
    Err("--mode sqlite needs the `sqlite` feature of this crate".into())
}

/// A DynamoDB table (`DYNAMODB_TABLE`, default `perf-idempotency`) at
/// `AWS_ENDPOINT_URL`, created if missing; dummy credentials unless the
/// environment has some.
#[cfg(feature = "dynamodb")]
async fn dynamodb_store() -> Result<Arc<dyn Store>, BoxError> {
    use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let mut config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(
            var("AWS_REGION").unwrap_or_else(|| "us-east-1".into()),
        ))
        .credentials_provider(Credentials::new(
            var("AWS_ACCESS_KEY_ID").unwrap_or_else(|| "test".into()),
            var("AWS_SECRET_ACCESS_KEY").unwrap_or_else(|| "test".into()),
            None,
            None,
            "bench-server",
        ))
        .http_client(aws_smithy_http_client::Builder::new().build_http());
    if let Some(endpoint) = var("AWS_ENDPOINT_URL") {
        config = config.endpoint_url(endpoint);
    }
    let client = aws_sdk_dynamodb::Client::from_conf(config.build());
    let table = var("DYNAMODB_TABLE").unwrap_or_else(|| "perf-idempotency".into());
    let store = tower_idempotency::store::dynamodb::DynamoDbStore::new(client, table.as_str());
    store.create_table().await?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "dynamodb"))]
async fn dynamodb_store() -> Result<Arc<dyn Store>, BoxError> {
    Err("--mode dynamodb needs the `dynamodb` feature of this crate".into())
}

/// Empties the PostgreSQL table and fills it with `rows` completed records:
/// one recorded through `app`, the others copies of it under keys of their
/// own, inserted a million to a statement.
#[cfg(feature = "postgres")]
async fn fill_postgres(app: &Router, rows: u64) -> Result<(), BoxError> {
    use sqlx::Connection;
    const TABLE: &str = SQL_TABLE;
    let url = std::env::var("DATABASE_URL").map_err(|_| "--preload-rows needs DATABASE_URL")?;
    let mut conn = sqlx::PgConnection::connect(&url).await?;
    sqlx::query(&format!("TRUNCATE {TABLE}"))
        .execute(&mut conn)
        .await?;
    preload(app, 1, 64, 1).await?;
    let mut done = 1;
    while done < rows {
        let upto = (done + 1_000_000).min(rows);
        sqlx::query(&format!(
            "INSERT INTO {TABLE} (key, fingerprint, state, lock_token, record, expires_at) \
             SELECT sha256(convert_to('perf-row-' || i, 'UTF8')), t.fingerprint, t.state, \
                    t.lock_token, t.record, now() + interval '1 hour' \
             FROM generate_series($1::bigint, $2::bigint - 1) AS i, \
                  (SELECT * FROM {TABLE} LIMIT 1) AS t"
        ))
        .bind(done as i64)
        .bind(upto as i64)
        .execute(&mut conn)
        .await?;
        done = upto;
        eprintln!("  {done} rows");
    }
    sqlx::query(&format!("VACUUM ANALYZE {TABLE}"))
        .execute(&mut conn)
        .await?;
    // The bulk load's dirty pages written out now, not by a checkpoint in
    // the middle of the measurement. Best effort: it needs a superuser or
    // `pg_checkpoint`.
    if let Err(e) = sqlx::query("CHECKPOINT").execute(&mut conn).await {
        eprintln!("  no CHECKPOINT after the load ({e}): one may fall in the measurement");
    }
    Ok(())
}

#[cfg(not(feature = "postgres"))]
async fn fill_postgres(_app: &Router, _rows: u64) -> Result<(), BoxError> {
    Err("--preload-rows needs the `postgres` feature of this crate".into())
}

/// Records `n` orders through `app`, from `tasks` concurrent tasks.
async fn preload(app: &Router, n: u64, body_bytes: usize, tasks: u64) -> Result<(), BoxError> {
    let body = order_body(body_bytes);
    let tasks = tasks.max(1);
    let mut handles = Vec::new();
    for t in 0..tasks {
        let app = app.clone();
        let body = body.clone();
        handles.push(tokio::spawn(async move {
            let mut i = t;
            while i < n {
                let req = Request::post("/orders")
                    .header("content-type", "application/json")
                    .header("idempotency-key", preload_key(i))
                    .body(Body::from(body.clone()))?;
                let res = app.clone().oneshot(req).await?;
                if res.status() != StatusCode::CREATED {
                    return Err(format!("preload {i}: status {}", res.status()).into());
                }
                // The record is written once the body has been read.
                axum::body::to_bytes(res.into_body(), usize::MAX).await?;
                i += tasks;
            }
            Ok::<(), BoxError>(())
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok(())
}

struct Opts {
    port: u16,
    mode: Mode,
    preload: u64,
    preload_body: usize,
    exit_after: u64,
    threads: usize,
    delay: Duration,
    max_entries: usize,
    max_mib: usize,
    preload_rows: u64,
    keep_body: bool,
}

fn opts() -> Result<Opts, BoxError> {
    let mut args = Args::from_env()?;
    let opts = Opts {
        port: args.get("port", 3000)?,
        mode: args.get("mode", Mode::Memory)?,
        preload: args.get("preload", 0)?,
        preload_body: args.get("preload-body-bytes", 1024)?,
        exit_after: args.get("exit-after", 900)?,
        threads: args.get("threads", 0)?,
        delay: Duration::from_millis(args.get("delay-ms", 0)?),
        max_entries: args.get("max-entries", 2_000_000)?,
        max_mib: args.get("max-mib", 4096)?,
        preload_rows: args.get("preload-rows", 0)?,
        keep_body: match args.get("body-mode", String::from("keep"))?.as_str() {
            "keep" => true,
            "wrap" => false,
            other => return Err(format!("--body-mode {other}: expected keep or wrap").into()),
        },
    };
    args.finish()?;
    Ok(opts)
}

async fn run(opts: Opts) -> Result<(), BoxError> {
    let Opts {
        port,
        mode,
        preload: preload_n,
        preload_body,
        exit_after,
        threads: _,
        delay,
        max_entries,
        max_mib,
        preload_rows,
        keep_body,
    } = opts;
    let (store, memory) = store(mode, max_entries, max_mib).await?;
    let state = App {
        next: Arc::new(AtomicU64::new(0)),
        delay,
    };
    let routes = Router::new().route("/orders", post(create_order).get(count_orders));
    let app = match store {
        None => routes.with_state(state),
        Some(store) => {
            // Records outlive the run by minutes, not a day: the shared
            // Redis and PostgreSQL are not left holding millions of them.
            let layer = IdempotencyLayer::from_arc(store).with_ttl(Duration::from_secs(600));
            if keep_body {
                routes.layer(layer.keep_body_type()).with_state(state)
            } else {
                routes.layer(layer).with_state(state)
            }
        }
    };

    if preload_n > 0 {
        if mode == Mode::Bare {
            return Err("--preload needs a store (not --mode bare)".into());
        }
        let t = Instant::now();
        preload(&app, preload_n, preload_body, 64).await?;
        let secs = t.elapsed().as_secs_f64();
        let size = memory
            .as_ref()
            .map(|m| format!(" (store: {} entries, {} MiB)", m.len(), m.bytes() >> 20))
            .unwrap_or_default();
        println!(
            "preloaded {preload_n} records in {secs:.1} s, {:.0}/s{size}",
            preload_n as f64 / secs
        );
    }

    if preload_rows > 0 {
        if !matches!(mode, Mode::Postgres { .. }) {
            return Err("--preload-rows needs --mode postgres or postgres-async".into());
        }
        let t = Instant::now();
        fill_postgres(&app, preload_rows).await?;
        println!(
            "filled the table with {preload_rows} rows in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on http://{} ({mode:?})", listener.local_addr()?);
    let serve = axum::serve(listener, app);
    if exit_after == 0 {
        serve.await?;
    } else {
        // Bounded: a server somebody forgot stops by itself.
        let _ = tokio::time::timeout(Duration::from_secs(exit_after), serve).await;
        println!("exiting after {exit_after} s");
    }
    Ok(())
}

fn main() {
    let result = opts().and_then(|opts| {
        let mut rt = tokio::runtime::Builder::new_multi_thread();
        if opts.threads > 0 {
            rt.worker_threads(opts.threads);
        }
        rt.enable_all().build()?.block_on(run(opts))
    });
    if let Err(e) = result {
        eprintln!("bench-server: {e}");
        std::process::exit(1);
    }
}
