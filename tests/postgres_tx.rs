//! `TransactionalPostgresStore` against a real PostgreSQL server: the
//! handler's order and the record commit together or not at all, through
//! panics, killed connections, a crashed runtime and 100 concurrent
//! duplicates on two layer instances.
//!
//! The server comes from `DATABASE_URL`, or else the standard local address
//! (`postgres://postgres@127.0.0.1:5432/test`). If nothing answers, the
//! tests are skipped, unless `CI=true`, where they fail.

#![cfg(all(feature = "postgres", feature = "test-util"))]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Router};
use bytes::Bytes;
use common::{call_post, post_req, problem, problem_type, send};
use sqlx::postgres::PgPoolOptions;
use tokio::sync::mpsc;
use tower_idempotency::store::postgres::PgPool;
use tower_idempotency::store::postgres::TransactionFinished;
use tower_idempotency::test_util::{random_key, sample_record};
use tower_idempotency::{
    IdempotencyLayer, InFlightPolicy,
    fingerprint::Fingerprint,
    store::{
        Begin, Store, StoreError,
        postgres::{IdempotentTransaction, TransactionalPostgresStore},
    },
};

/// Every test table lives here, named `t_<unix seconds>_<random>` (the
/// records) and `…_orders` (the handler's).
const SCHEMA: &str = "tower_idempotency_test";

fn database_url() -> Option<String> {
    common::backend(common::POSTGRES)
}

async fn connect(url: &str, max: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max)
        .connect(url)
        .await
        .unwrap()
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn unique_table() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("t_{}_{}", unix_secs(), &id[..16])
}

/// Drops test tables left behind more than ten minutes ago. Once per run.
async fn drop_stale_tables(pool: &PgPool) {
    static DONE: AtomicBool = AtomicBool::new(false);
    if DONE.swap(true, Ordering::SeqCst) {
        return;
    }
    let _ = sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{SCHEMA}\""))
        .execute(pool)
        .await;
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = $1 AND tablename LIKE 't\\_%'",
    )
    .bind(SCHEMA)
    .fetch_all(pool)
    .await
    .unwrap();
    let now = unix_secs();
    for name in names {
        let made: Option<u64> = name.split('_').nth(1).and_then(|s| s.parse().ok());
        if made.is_some_and(|made| made + 600 < now) {
            let _ = sqlx::query(&format!("DROP TABLE IF EXISTS \"{SCHEMA}\".\"{name}\""))
                .execute(pool)
                .await;
        }
    }
}

/// A records table and an orders table of one test, and a store on them.
struct Db {
    pool: PgPool,
    table: String,
    /// `"schema"."table_orders"`
    orders: String,
    store: TransactionalPostgresStore,
}

impl Db {
    async fn new(url: &str) -> Self {
        let pool = connect(url, 16).await;
        drop_stale_tables(&pool).await;
        let table = unique_table();
        let store = TransactionalPostgresStore::new(pool.clone())
            .with_schema(SCHEMA)
            .unwrap()
            .with_table(&table)
            .unwrap();
        store.migrate().await.unwrap();
        let orders = format!("\"{SCHEMA}\".\"{table}_orders\"");
        sqlx::query(&format!(
            "CREATE TABLE {orders} (id bigserial PRIMARY KEY, item text NOT NULL)"
        ))
        .execute(&pool)
        .await
        .unwrap();
        Self {
            pool,
            table,
            orders,
            store,
        }
    }

    /// Another store on the same table, through `pool`.
    fn store_on(&self, pool: PgPool) -> TransactionalPostgresStore {
        TransactionalPostgresStore::new(pool)
            .with_schema(SCHEMA)
            .unwrap()
            .with_table(&self.table)
            .unwrap()
    }

    async fn orders(&self) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {}", self.orders))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn records(&self) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {}",
            self.store.qualified_table()
        ))
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// Drops both tables. Transactions the store still holds open (a
    /// check that never completed its lock) roll back first: they hold a
    /// lock on the records table that `DROP TABLE` would wait for.
    async fn drop_tables(self) {
        let records = self.store.qualified_table().to_owned();
        drop(self.store);
        for t in [&records, &self.orders] {
            sqlx::query(&format!("DROP TABLE IF EXISTS {t}"))
                .execute(&self.pool)
                .await
                .unwrap();
        }
    }
}

#[derive(Clone)]
struct AppState {
    orders: Arc<str>,
    /// The handler's backend pid, sent once the order is written.
    written: mpsc::UnboundedSender<i32>,
}

/// Inserts an order on the request's transaction, then steers by headers:
/// `x-bad-sql` (run a failing statement), `x-sleep-ms` (sleep after the
/// write), `x-panic`, `x-status`.
async fn create_order(
    State(app): State<AppState>,
    Extension(tx): Extension<IdempotentTransaction>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut conn = tx.lock().await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    let id: i64 = sqlx::query_scalar(&format!(
        "INSERT INTO {} (item) VALUES ($1) RETURNING id",
        app.orders
    ))
    .bind(String::from_utf8_lossy(&body).into_owned())
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    if headers.contains_key("x-bad-sql") {
        // Fails, and leaves the transaction aborted; the handler answers
        // 201 all the same.
        let failed = sqlx::query("SELECT 1 / 0").execute(&mut *conn).await;
        assert!(failed.is_err());
    }
    drop(conn);
    let _ = app.written.send(pid);
    if let Some(ms) = headers.get("x-sleep-ms") {
        let ms: u64 = ms.to_str().unwrap().parse().unwrap();
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if headers.contains_key("x-panic") {
        panic!("handler asked to panic after its write");
    }
    let status = headers
        .get("x-status")
        .map(|s| StatusCode::from_u16(s.to_str().unwrap().parse().unwrap()).unwrap())
        .unwrap_or(StatusCode::CREATED);
    (status, format!("{{\"id\":{id}}}")).into_response()
}

/// Never touches the transaction.
async fn plain(body: Bytes) -> (StatusCode, Bytes) {
    (StatusCode::CREATED, body)
}

fn app_with(
    store: TransactionalPostgresStore,
    orders: &str,
    layer: impl FnOnce(IdempotencyLayer) -> IdempotencyLayer,
) -> (Router, mpsc::UnboundedReceiver<i32>) {
    let (written, rx) = mpsc::unbounded_channel();
    let state = AppState {
        orders: orders.into(),
        written,
    };
    let router = Router::new()
        .route("/orders", post(create_order))
        .route("/plain", post(plain))
        .layer(layer(IdempotencyLayer::new(store).with_require_key(true)))
        .with_state(state);
    (router, rx)
}

fn app(db: &Db) -> (Router, mpsc::UnboundedReceiver<i32>) {
    app_with(db.store.clone(), &db.orders, |l| l)
}

fn with_headers(key: &str, body: &str, headers: &[(&str, &str)]) -> axum::http::Request<Body> {
    let mut b = post_req(Some(key));
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(Body::from(body.to_owned())).unwrap()
}

fn replayed(headers: &HeaderMap) -> bool {
    headers
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

/// The first attempt wrote an order and panicked: nothing remains; the
/// retry creates exactly one order, the next one replays it.
#[tokio::test]
async fn panic_after_write_leaves_nothing() {
    let Some(url) = database_url() else { return };
    let db = Db::new(&url).await;
    let (app, _rx) = app(&db);

    let (status, headers, body) = send(&app, with_headers("k", "book", &[("x-panic", "1")])).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        problem_type(&problem(status, &headers, &body)),
        "handler-panicked"
    );
    assert_eq!(db.orders().await, 0, "the order rolled back");
    assert_eq!(db.records().await, 0, "the key rolled back");
    assert_eq!(db.store.open_transactions(), 0);

    let (status, headers, first) = call_post(&app, Some("k"), "book").await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(!replayed(&headers));
    assert_eq!(db.orders().await, 1);
    assert_eq!(db.records().await, 1);

    let (status, headers, again) = call_post(&app, Some("k"), "book").await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(replayed(&headers));
    assert_eq!(again, first);
    assert_eq!(db.orders().await, 1);
    db.drop_tables().await;
}

/// The handler's backend is terminated before the commit: the client gets
/// 503, nothing remains, and the retry creates one order.
#[tokio::test]
async fn killed_connection_leaves_nothing() {
    let Some(url) = database_url() else { return };
    let db = Db::new(&url).await;
    let (app, mut written) = app(&db);

    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, with_headers("k", "book", &[("x-sleep-ms", "500")])).await }
    });
    let pid = written.recv().await.unwrap();
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(killed);
    let (status, headers, body) = first.await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        problem_type(&problem(status, &headers, &body)),
        "store-unavailable"
    );
    assert_eq!(db.orders().await, 0);
    assert_eq!(db.records().await, 0);

    let (status, headers, _) = call_post(&app, Some("k"), "book").await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(!replayed(&headers));
    assert_eq!(db.orders().await, 1);
    let (status, headers, _) = call_post(&app, Some("k"), "book").await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(replayed(&headers));
    assert_eq!(db.orders().await, 1);
    db.drop_tables().await;
}

/// The process dies between the handler's write and the record: the first
/// attempt runs in a runtime of its own, with a pool and a layer of its
/// own, and that runtime is dropped while the handler sleeps after its
/// write. Its connection closes, PostgreSQL rolls back, and the retries of
/// a fresh instance end with exactly one order.
#[test]
fn crash_between_write_and_record() {
    let Some(url) = database_url() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(Db::new(&url));

    let doomed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (pid_tx, mut pid_rx) = mpsc::unbounded_channel();
    doomed.spawn({
        let url = url.clone();
        let table = db.table.clone();
        let orders = db.orders.clone();
        async move {
            let pool = connect(&url, 4).await;
            let store = TransactionalPostgresStore::new(pool)
                .with_schema(SCHEMA)
                .unwrap()
                .with_table(&table)
                .unwrap();
            let (app, mut written) = app_with(store, &orders, |l| l);
            let req = tokio::spawn(async move {
                send(&app, with_headers("k", "book", &[("x-sleep-ms", "60000")])).await
            });
            let pid = written.recv().await.unwrap();
            pid_tx.send(pid).unwrap();
            let _ = req.await;
            unreachable!("the runtime dies first");
        }
    });
    let pid = pid_rx.blocking_recv().unwrap();
    // The order is written but not committed: invisible.
    assert_eq!(rt.block_on(db.orders()), 0);
    doomed.shutdown_background();

    rt.block_on(async {
        // The server notices the closed connection and rolls back.
        let started = Instant::now();
        loop {
            let alive: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
                    .bind(pid)
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
            if !alive {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "backend lives on"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(db.orders().await, 0);
        assert_eq!(db.records().await, 0);

        // A fresh instance: retry until done.
        let (app, _rx) = app(&db);
        let started = Instant::now();
        let first = loop {
            let (status, headers, body) = call_post(&app, Some("k"), "book").await;
            match status {
                StatusCode::CREATED => break (headers, body),
                StatusCode::CONFLICT => {}
                other => panic!("unexpected {other}"),
            }
            assert!(started.elapsed() < Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(!replayed(&first.0));
        for _ in 0..3 {
            let (status, headers, body) = call_post(&app, Some("k"), "book").await;
            assert_eq!(status, StatusCode::CREATED);
            assert!(replayed(&headers));
            assert_eq!(body, first.1);
        }
        assert_eq!(db.orders().await, 1, "exactly one order, never two");
        assert_eq!(db.records().await, 1);
        db.drop_tables().await;
    });
}

/// 100 concurrent requests with one key, spread over two layer instances
/// with a store and a pool each: one order, every other answer a 409 or a
/// replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_concurrent_duplicates_on_two_instances() {
    let Some(url) = database_url() else { return };
    let db = Db::new(&url).await;
    let second = db.store_on(connect(&url, 16).await);
    let (a, _ra) = app(&db);
    let (b, _rb) = app_with(second, &db.orders, |l| l);

    let mut tasks = Vec::new();
    for i in 0..100 {
        let app = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            send(&app, with_headers("k", "book", &[("x-sleep-ms", "200")])).await
        }));
    }
    let (mut executed, mut conflicts, mut replays) = (0, 0, 0);
    for task in tasks {
        let (status, headers, body) = task.await.unwrap();
        match status {
            StatusCode::CREATED if replayed(&headers) => replays += 1,
            StatusCode::CREATED => executed += 1,
            StatusCode::CONFLICT => {
                assert_eq!(
                    problem_type(&problem(status, &headers, &body)),
                    "request-in-flight"
                );
                conflicts += 1;
            }
            other => panic!("unexpected {other}: {body:?}"),
        }
    }
    assert_eq!(executed, 1, "{conflicts} conflicts, {replays} replays");
    assert_eq!(executed + conflicts + replays, 100);
    assert_eq!(db.orders().await, 1);
    assert_eq!(db.records().await, 1);
    db.drop_tables().await;
}

/// A handler that never touches the transaction works as with the ordinary
/// mode, and its response is recorded.
#[tokio::test]
async fn handler_without_the_transaction() {
    let Some(url) = database_url() else { return };
    let db = Db::new(&url).await;
    let (app, _rx) = app(&db);
    let req = || {
        post_req(Some("p"))
            .uri("/plain")
            .body(Body::from("hello"))
            .unwrap()
    };
    let (status, headers, body) = send(&app, req()).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(!replayed(&headers));
    assert_eq!(body, "hello");
    assert_eq!(db.records().await, 1);
    let (status, headers, body) = send(&app, req()).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(replayed(&headers));
    assert_eq!(body, "hello");
    assert_eq!(db.store.open_transactions(), 0);
    db.drop_tables().await;
}

/// A status that is not recorded (a 500, a 429) rolls the handler's writes
/// back with the key.
#[tokio::test]
async fn unrecorded_status_rolls_back() {
    let Some(url) = database_url() else { return };
    let db = Db::new(&url).await;
    let (app, _rx) = app(&db);
    for status in ["500", "429"] {
        let (got, _, _) = send(&app, with_headers("k", "book", &[("x-status", status)])).await;
        assert_eq!(got.as_str(), status);
        assert_eq!(db.orders().await, 0, "{status}: the order rolled back");
        assert_eq!(db.records().await, 0);
    }
    let (status, _, _) = call_post(&app, Some("k"), "book").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(db.orders().await, 1);
    db.drop_tables().await;
}

/// A handler whose statement failed answers 201 anyway: the aborted
/// transaction cannot take the record, so the client gets 503 and nothing
/// is committed.
#[tokio::test]
async fn aborted_transaction_is_not_answered() {
    let Some(url) = database_url() else { return };
    let db = Db::new(&url).await;
    let (app, _rx) = app(&db);
    let (status, headers, body) =
        send(&app, with_headers("k", "book", &[("x-bad-sql", "1")])).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        problem_type(&problem(status, &headers, &body)),
        "store-unavailable"
    );
    assert_eq!(db.orders().await, 0);
    assert_eq!(db.records().await, 0);
    let (status, _, _) = call_post(&app, Some("k"), "book").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(db.orders().await, 1);
    db.drop_tables().await;
}

/// A duplicate gets its 409 at once while the first request holds its
/// transaction for 2 seconds; a duplicate with another body gets 409 too
/// (the first one's fingerprint is not committed yet), then 422 once it is.
#[tokio::test]
async fn duplicate_does_not_block() {
    let Some(url) = database_url() else { return };
    let db = Db::new(&url).await;
    let (app, mut written) = app(&db);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, with_headers("k", "book", &[("x-sleep-ms", "2000")])).await }
    });
    written.recv().await.unwrap();

    let started = Instant::now();
    let (status, headers, body) = call_post(&app, Some("k"), "book").await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(
        problem_type(&problem(status, &headers, &body)),
        "request-in-flight"
    );
    assert!(took < Duration::from_millis(500), "the 409 took {took:?}");
    let (status, _, _) = call_post(&app, Some("k"), "another body").await;
    assert_eq!(status, StatusCode::CONFLICT);

    let (status, _, _) = first.await.unwrap();
    assert_eq!(status, StatusCode::CREATED);
    let (status, headers, body) = call_post(&app, Some("k"), "another body").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        problem_type(&problem(status, &headers, &body)),
        "key-reused"
    );
    assert_eq!(db.orders().await, 1);
    db.drop_tables().await;
}

/// With `InFlightPolicy::Wait`, a duplicate waits on the lock in the
/// database and replays the first response as soon as it commits.
#[tokio::test]
async fn waiting_duplicate_replays() {
    let Some(url) = database_url() else { return };
    let db = Db::new(&url).await;
    let (app, mut written) = app_with(db.store.clone(), &db.orders, |l| {
        l.with_in_flight(InFlightPolicy::Wait(Duration::from_secs(5)))
    });
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, with_headers("k", "book", &[("x-sleep-ms", "700")])).await }
    });
    written.recv().await.unwrap();
    let started = Instant::now();
    let (status, headers, body) = call_post(&app, Some("k"), "book").await;
    let took = started.elapsed();
    let (first_status, _, first_body) = first.await.unwrap();
    assert_eq!(first_status, StatusCode::CREATED);
    assert_eq!(status, StatusCode::CREATED);
    assert!(replayed(&headers));
    assert_eq!(body, first_body);
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(2000),
        "waited {took:?}"
    );
    assert_eq!(db.orders().await, 1);
    db.drop_tables().await;
}

fn fp(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

async fn acquire(
    store: &TransactionalPostgresStore,
    key: &tower_idempotency::store::StoreKey,
) -> tower_idempotency::store::LockToken {
    match store
        .begin(key, &fp(1), Duration::from_secs(30))
        .await
        .unwrap()
    {
        Begin::Acquired(token) => token,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

/// For the shared conformance suite: a records table and a pool of its
/// own per check, dropped by the teardown. The store declares what differs
/// in this mode (its `InFlight` cannot see the holder's fingerprint), and
/// the suite checks that declaration too.
async fn conformance_store() -> Option<(Arc<dyn Store>, (PgPool, String))> {
    let url = database_url()?;
    // 64 concurrent begins: each briefly needs a connection of its own.
    let pool = connect(&url, 70).await;
    drop_stale_tables(&pool).await;
    let store = TransactionalPostgresStore::new(pool.clone())
        .with_schema(SCHEMA)
        .unwrap()
        .with_table(&unique_table())
        .unwrap();
    store.migrate().await.unwrap();
    let table = store.qualified_table().to_owned();
    Some((Arc::new(store), (pool, table)))
}

async fn drop_conformance_table((pool, table): (PgPool, String)) {
    sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
        .execute(&pool)
        .await
        .unwrap();
}

mod conformance {
    tower_idempotency::store_conformance_tests!(
        super::conformance_store,
        super::drop_conformance_table
    );
}

/// `InFlight` reports what this store really knows: the holder's
/// fingerprint is not committed, so it says `None` instead of echoing the
/// caller's; once completed, the stored one.
#[tokio::test]
async fn in_flight_reports_no_fingerprint_it_cannot_see() {
    let Some(url) = database_url() else { return };
    let db = Db::new(&url).await;
    let store: Arc<dyn Store> = Arc::new(db.store.clone());
    assert!(!store.capabilities().reports_in_flight_fingerprint());
    assert!(store.capabilities().is_transactional());
    let key = random_key();
    let token = acquire(&db.store, &key).await;
    match store
        .begin(&key, &fp(4), Duration::from_secs(30))
        .await
        .unwrap()
    {
        Begin::InFlight { fingerprint } => assert_eq!(fingerprint, None),
        other => panic!("expected InFlight, got {other:?}"),
    }
    let record = sample_record(fp(1), 8);
    let ttl = Duration::from_secs(60);
    assert!(store.complete(&key, &token, &record, ttl).await.unwrap());
    match store
        .begin(&key, &fp(4), Duration::from_secs(30))
        .await
        .unwrap()
    {
        Begin::Completed(record) => assert_eq!(*record.fingerprint(), fp(1)),
        other => panic!("expected Completed, got {other:?}"),
    }
    drop(store);
    db.drop_tables().await;
}

/// The handle reaches the transaction only while it is open; a guard the
/// handler keeps makes `complete` time out, and the transaction still rolls
/// back when the guard goes.
#[tokio::test]
async fn handle_lifecycle() {
    let Some(url) = database_url() else { return };
    let db = Db::new(&url).await;
    let store = db.store.clone().with_timeout(Duration::from_millis(300));
    let key = random_key();
    let token = acquire(&store, &key).await;
    let attachment = store.attachment(&key, &token).unwrap();
    let handle = attachment.get::<IdempotentTransaction>().unwrap().clone();
    let mut guard = handle.lock().await.unwrap();
    sqlx::query(&format!("INSERT INTO {} (item) VALUES ('kept')", db.orders))
        .execute(&mut *guard)
        .await
        .unwrap();
    let record = sample_record(fp(1), 8);
    let ttl = Duration::from_secs(60);
    match store.complete(&key, &token, &record, ttl).await {
        Err(StoreError::Timeout(_)) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(store.open_transactions(), 0);
    assert!(!store.complete(&key, &token, &record, ttl).await.unwrap());
    drop(guard);
    let _: TransactionFinished = handle.lock().await.unwrap_err();
    // The key is free again: the dropped transaction rolled back.
    let started = Instant::now();
    loop {
        match store
            .begin(&key, &fp(1), Duration::from_secs(30))
            .await
            .unwrap()
        {
            Begin::Acquired(again) => {
                assert!(store.release(&key, &again).await.unwrap());
                break;
            }
            Begin::InFlight { .. } => {
                assert!(started.elapsed() < Duration::from_secs(5));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(db.orders().await, 0);
    assert_eq!(db.records().await, 0);

    // An abandoned transaction (no complete, no release) is rolled back by
    // the next `begin` once its lease is over.
    let lease = Duration::from_millis(100);
    let abandoned = match store.begin(&key, &fp(1), lease).await.unwrap() {
        Begin::Acquired(token) => token,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(store.open_transactions(), 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let next = acquire(&store, &key).await;
    assert_eq!(store.open_transactions(), 1);
    assert!(!store.extend(&key, &abandoned, lease).await.unwrap());
    assert!(store.release(&key, &next).await.unwrap());
    db.drop_tables().await;
}

/// The message face on the transactional store: the side effect, written
/// on the attached transaction, and the record commit together. A
/// redelivery replays; a handler error, a failed commit, or a lost lease
/// leave nothing behind, and the redelivery then runs cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_face_commits_the_effect_with_the_record() {
    use tower_idempotency::message::{BytesCodec, IdempotentConsumer, MessageKey, Processed};
    use tower_idempotency::store::Attachment;
    use tower_idempotency::test_util::{Fault, FaultyStore, Op};

    let Some(url) = database_url() else { return };
    let db = Db::new(&url).await;
    let store = Arc::new(FaultyStore::new(db.store.clone()));
    let consumer = IdempotentConsumer::from_arc(store.clone()).with_codec(BytesCodec);
    let orders: Arc<str> = db.orders.clone().into();
    // Inserts an order on the attached transaction; fails after it if asked.
    let handler = |orders: Arc<str>, fail: bool| {
        move |attachment: Option<Attachment>| async move {
            let tx = attachment
                .as_ref()
                .and_then(|a| a.get::<IdempotentTransaction>())
                .ok_or("no transaction attached")?
                .clone();
            let mut conn = tx.lock().await?;
            let id: i64 = sqlx::query_scalar(&format!(
                "INSERT INTO {orders} (item) VALUES ('book') RETURNING id"
            ))
            .fetch_one(&mut *conn)
            .await?;
            if fail {
                return Err::<Bytes, tower_idempotency::store::BoxError>(
                    "the handler failed".into(),
                );
            }
            Ok(Bytes::from(id.to_string()))
        }
    };
    let msg = |id: &str| MessageKey::new("billing", id, "{}");

    let first = consumer
        .process(msg("m1"), handler(orders.clone(), false))
        .await
        .unwrap();
    let Processed::Ran(order_id) = first else {
        panic!("expected Ran, got {first:?}")
    };
    let again = consumer
        .process(msg("m1"), handler(orders.clone(), false))
        .await
        .unwrap();
    assert!(matches!(&again, Processed::Replayed(id) if *id == order_id));
    assert_eq!(db.orders().await, 1);
    assert_eq!(db.records().await, 1);

    // A handler error rolls its insert back; the redelivery runs.
    let failed = consumer
        .process(msg("m2"), handler(orders.clone(), true))
        .await;
    assert!(failed.is_err());
    assert_eq!(db.orders().await, 1);
    assert_eq!(store.inner().open_transactions(), 0);

    // A commit that fails: the insert is rolled back with the record, and
    // the consumer is told nothing happened.
    store.inject(Op::Complete, Fault::Fail, 1);
    let rolled = consumer
        .process(msg("m2"), handler(orders.clone(), false))
        .await
        .unwrap();
    assert!(matches!(rolled, Processed::RolledBack), "{rolled:?}");
    assert_eq!(db.orders().await, 1);
    assert_eq!(store.inner().open_transactions(), 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        store.calls(Op::Complete),
        2,
        "a rolled-back write is not retried"
    );

    let ran = consumer
        .process(msg("m2"), handler(orders.clone(), false))
        .await
        .unwrap();
    assert!(matches!(ran, Processed::Ran(_)));
    assert_eq!(db.orders().await, 2);
    assert_eq!(db.records().await, 2);
    drop(consumer);
    drop(store);
    db.drop_tables().await;
}
