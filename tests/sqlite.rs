//! `SqliteStore` on temporary files: the conformance suite, two processes
//! sharing one file, restarts, a file locked too long, the sweeper, what
//! the rows hold, and the statements each request costs.
//!
//! Every test works on files of its own under the system's temporary
//! directory and removes them when it ends. No server is needed.

#![cfg(all(feature = "sqlite", feature = "test-util"))]
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::body::Body;
use axum::http::StatusCode;
use common::{Counter, call_post, post_req, problem, send};
use sqlx::Connection;
use sqlx::sqlite::{SqliteConnection, SqlitePoolOptions};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tower_idempotency::store::InvalidIdentifier;
use tower_idempotency::store::sqlite::{SqliteConnectOptions, SqliteStore};
use tower_idempotency::test_util::{FaultyStore, Op, random_key, sample_record};
use tower_idempotency::{
    IdempotencyLayer,
    fingerprint::Fingerprint,
    record::Record,
    store::{Begin, LockToken, Store, StoreError, StoreKey},
};

/// SQLite's clock in microseconds, as the store's statements read it.
const NOW: &str = "(CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000)";

/// A database file under the temporary directory, removed with its
/// write-ahead log and shared-memory files when dropped.
struct TempDb {
    path: PathBuf,
}

impl TempDb {
    fn new(tag: &str) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let path = std::env::temp_dir().join(format!(
            "tower-idempotency-{tag}-{}-{}.db",
            std::process::id(),
            &id[..12]
        ));
        Self { path }
    }

    fn files(&self) -> Vec<PathBuf> {
        ["", "-wal", "-shm", "-journal"]
            .iter()
            .map(|suffix| {
                let mut name = self.path.clone().into_os_string();
                name.push(suffix);
                PathBuf::from(name)
            })
            .collect()
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        for file in self.files() {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// A migrated store on `db`, through `open`.
async fn store_on(db: &TempDb) -> SqliteStore {
    let store = SqliteStore::open(&db.path).await.unwrap();
    store.migrate().await.unwrap();
    store
}

/// A store that owns its file: the conformance checks drop the store when
/// they end, and the file goes with it.
struct Scratch {
    store: SqliteStore,
    _db: TempDb,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let pool = self.store.pool().clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { pool.close().await });
        }
    }
}

#[async_trait]
impl Store for Scratch {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        self.store.begin(key, fingerprint, lease).await
    }
    async fn complete(
        &self,
        key: &StoreKey,
        token: &LockToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.store.complete(key, token, record, ttl).await
    }
    async fn release(&self, key: &StoreKey, token: &LockToken) -> Result<bool, StoreError> {
        self.store.release(key, token).await
    }
    async fn extend(
        &self,
        key: &StoreKey,
        token: &LockToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.store.extend(key, token, lease).await
    }
}

/// For the conformance suite: each check on a file of its own.
async fn store() -> Option<Arc<dyn Store>> {
    let db = TempDb::new("conformance");
    let store = store_on(&db).await;
    Some(Arc::new(Scratch { store, _db: db }))
}

mod conformance {
    tower_idempotency::store_conformance_tests!(super::store);
}

fn fp(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

async fn acquire(store: &SqliteStore, key: &StoreKey, lease: Duration) -> LockToken {
    match store.begin(key, &fp(1), lease).await.unwrap() {
        Begin::Acquired(token) => token,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

async fn count_rows(store: &SqliteStore, live: bool) -> i64 {
    let op = if live { ">" } else { "<=" };
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE expires_at {op} {NOW}",
        store.quoted_table()
    ))
    .fetch_one(store.pool())
    .await
    .unwrap()
}

// Configuration.

#[tokio::test]
async fn names_are_validated_and_migrate_is_idempotent() {
    let db = TempDb::new("names");
    let store = SqliteStore::open(&db.path).await.unwrap();
    for bad in [
        "",
        "1table",
        "a-b",
        "main.t",
        "x\"; DROP TABLE y; --",
        &"n".repeat(65),
    ] {
        let err = store.clone().with_table(bad).unwrap_err();
        let StoreError::Backend(err) = err else {
            panic!("{bad:?}: not a backend error")
        };
        let err = err.downcast_ref::<InvalidIdentifier>().unwrap();
        assert_eq!(err.name(), bad);
    }

    // A fresh table, migrated at once by tasks on one pool and by a second
    // pool (another process would hold one), then again.
    let store = store.with_table("Orders_Records").unwrap();
    assert_eq!(store.quoted_table(), "\"Orders_Records\"");
    let other = SqliteStore::open(&db.path)
        .await
        .unwrap()
        .with_table("Orders_Records")
        .unwrap();
    let mut tasks = Vec::new();
    for n in 0..6 {
        let store = if n % 2 == 0 {
            store.clone()
        } else {
            other.clone()
        };
        tasks.push(tokio::spawn(async move { store.migrate().await }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    store.migrate().await.unwrap();
    let key = random_key();
    acquire(&store, &key, Duration::from_secs(30)).await;
    // Migrating again keeps the rows.
    other.migrate().await.unwrap();
    assert!(matches!(
        other
            .begin(&key, &fp(2), Duration::from_secs(30))
            .await
            .unwrap(),
        Begin::InFlight { .. }
    ));

    let objects: Vec<(String, String)> = sqlx::query_as(
        "SELECT type, name FROM sqlite_master WHERE tbl_name = 'Orders_Records' ORDER BY type",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert!(objects.contains(&("table".into(), "Orders_Records".into())));
    assert!(
        objects.contains(&("index".into(), "Orders_Records_expires_at_idx".into())),
        "{objects:?}"
    );
    // The default table is untouched by all of it.
    let default: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sqlite_master WHERE name = 'idempotency_records'")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(default, 0);
    let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(journal, "wal");
    store.pool().close().await;
    other.pool().close().await;
}

#[tokio::test]
async fn a_corrupt_record_is_reported_not_replayed() {
    let db = TempDb::new("corrupt");
    let store = store_on(&db).await;
    let key = random_key();
    let token = acquire(&store, &key, Duration::from_secs(30)).await;
    let record = sample_record(fp(1), 16);
    assert!(
        store
            .complete(&key, &token, &record, Duration::from_secs(60))
            .await
            .unwrap()
    );
    sqlx::query(&format!(
        "UPDATE {} SET record = substr(record, 1, 20) WHERE key = ?",
        store.quoted_table()
    ))
    .bind(&key.as_bytes()[..])
    .execute(store.pool())
    .await
    .unwrap();
    assert!(matches!(
        store.begin(&key, &fp(1), Duration::from_secs(30)).await,
        Err(StoreError::Corrupt(_))
    ));
    store.pool().close().await;
}

// Two processes, one file.

/// The child half of [`two_processes_share_one_file`]: with the variable
/// set, it serves the layer on that file over TCP, prints its port, and
/// once its stdin closes prints how often its handler ran. Without the
/// variable (an ordinary test run) it does nothing.
const CHILD_DB: &str = "TOWER_IDEMPOTENCY_SQLITE_CHILD_DB";
const CHILD_TEST: &str = "child_serves_the_shared_file";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_serves_the_shared_file() {
    let Ok(path) = std::env::var(CHILD_DB) else {
        return;
    };
    let store = SqliteStore::open(&path).await.unwrap();
    let counter = Counter::default();
    let app = common::router(counter.clone()).layer(IdempotencyLayer::new(store));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("CHILD_PORT={}", listener.local_addr().unwrap().port());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let mut stdin = tokio::io::stdin();
    let mut sink = Vec::new();
    let _ = stdin.read_to_end(&mut sink).await;
    println!("CHILD_EXECUTIONS={}", counter.get());
    server.abort();
}

/// One HTTP/1.1 POST over TCP: status, lower-cased head, body.
async fn http_post(port: u16, key: &str, body: &str, delay_ms: u64) -> (u16, String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let req = format!(
        "POST /orders HTTP/1.1\r\nhost: test\r\nidempotency-key: {key}\r\nx-delay-ms: {delay_ms}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

type ChildLines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

/// The number the child prints after `prefix`.
async fn read_value(lines: &mut ChildLines, prefix: &str) -> usize {
    loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("the child ended before printing {prefix}"));
        // The test harness may have begun the line with the test's name.
        if let Some((_, value)) = line.split_once(prefix) {
            return value.trim().parse().unwrap();
        }
    }
}

/// What one of the 100 requests got back.
#[derive(Debug, PartialEq)]
enum Answer {
    Executed,
    Replayed,
    Conflict,
}

fn classify(status: u16, replayed: Option<&str>, execution: Option<&str>, body: &str) -> Answer {
    match (status, replayed) {
        (201, Some("true")) => {
            assert_eq!(execution, Some("1"), "a replay of another execution");
            assert_eq!(body, "{\"item\":\"book\"}");
            Answer::Replayed
        }
        (201, None) => {
            assert_eq!(body, "{\"item\":\"book\"}");
            Answer::Executed
        }
        (409, None) => Answer::Conflict,
        _ => panic!("unexpected {status} (replayed {replayed:?}): {body}"),
    }
}

fn head_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// Two layer instances in two processes on one file: 100 concurrent
/// requests with one key, split between them, run the handler exactly once
/// in total; every other request gets the replay or a 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_one_file() {
    let db = TempDb::new("processes");
    let store = store_on(&db).await;
    let counter = Counter::default();
    let app = common::router(counter.clone()).layer(IdempotencyLayer::new(store.clone()));

    // The same test binary, running only the child test.
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([CHILD_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DB, &db.path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let port = tokio::time::timeout(
        Duration::from_secs(30),
        read_value(&mut lines, "CHILD_PORT="),
    )
    .await
    .expect("the child did not start serving");
    let port = u16::try_from(port).unwrap();

    let body = "{\"item\":\"book\"}";
    let mut tasks = Vec::new();
    for i in 0..100 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let req = post_req(Some("shared-key"))
                    .header("x-delay-ms", "50")
                    .body(Body::from(body))
                    .unwrap();
                let (status, headers, bytes) = send(&app, req).await;
                if status == StatusCode::CONFLICT {
                    problem(status, &headers, &bytes);
                }
                let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
                let replayed = header("idempotent-replayed");
                let execution = header("x-execution");
                let body = String::from_utf8(bytes.to_vec()).unwrap();
                classify(
                    status.as_u16(),
                    replayed.as_deref(),
                    execution.as_deref(),
                    &body,
                )
            } else {
                let (status, head, body) = http_post(port, "shared-key", body, 50).await;
                if status == 409 {
                    assert!(head.contains("application/problem+json"), "{head}");
                }
                classify(
                    status,
                    head_value(&head, "idempotent-replayed"),
                    head_value(&head, "x-execution"),
                    &body,
                )
            }
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    let executed = answers.iter().filter(|a| **a == Answer::Executed).count();
    assert_eq!(executed, 1, "{answers:?}");
    assert_eq!(answers.len(), 100);

    // Afterwards both processes replay.
    let (status, headers, _) = call_post(&app, Some("shared-key"), body).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    let (status, head, _) = http_post(port, "shared-key", body, 0).await;
    assert_eq!(status, 201);
    assert_eq!(head_value(&head, "idempotent-replayed"), Some("true"));

    // The child reports its executions once its stdin closes.
    drop(stdin);
    let child_runs = tokio::time::timeout(
        Duration::from_secs(10),
        read_value(&mut lines, "CHILD_EXECUTIONS="),
    )
    .await
    .expect("the child did not report");
    assert_eq!(
        counter.get() + child_runs,
        1,
        "the handler ran {} times here and {child_runs} times in the child",
        counter.get()
    );
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the child did not exit")
        .unwrap();
    assert!(status.success(), "the child failed: {status}");
    store.pool().close().await;
}

// Durability.

type Response = (StatusCode, Vec<(String, Vec<u8>)>, bytes::Bytes);

async fn post_through(app: &axum::Router, key: &str) -> Response {
    let (status, headers, body) = call_post(app, Some(key), "{\"item\":\"lamp\"}").await;
    let headers = headers
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
        .collect();
    (status, headers, body)
}

#[tokio::test]
async fn records_survive_a_restart_byte_for_byte() {
    let db = TempDb::new("restart");
    let store = store_on(&db).await;
    let counter = Counter::default();

    // Through the layer.
    let app = common::router(counter.clone()).layer(IdempotencyLayer::new(store.clone()));
    let first = post_through(&app, "durable").await;
    assert_eq!(first.0, StatusCode::CREATED);
    let replay_before = post_through(&app, "durable").await;
    assert!(
        replay_before
            .1
            .contains(&("idempotent-replayed".into(), b"true".to_vec()))
    );

    // And the raw record.
    let key = random_key();
    let token = acquire(&store, &key, Duration::from_secs(30)).await;
    let record = sample_record(fp(1), 64 * 1024);
    assert!(
        store
            .complete(&key, &token, &record, Duration::from_secs(3600))
            .await
            .unwrap()
    );

    drop(app);
    let pool = store.pool().clone();
    drop(store);
    pool.close().await;
    assert!(pool.is_closed());

    let restarted = SqliteStore::open(&db.path).await.unwrap();
    let app = common::router(counter.clone()).layer(IdempotencyLayer::new(restarted.clone()));
    let replay_after = post_through(&app, "durable").await;
    assert_eq!(
        replay_after, replay_before,
        "the replay changed over a restart"
    );
    assert_eq!(replay_after.0, first.0);
    assert_eq!(replay_after.2, first.2);
    assert_eq!(counter.get(), 1, "the handler ran again after the restart");

    match restarted
        .begin(&key, &fp(2), Duration::from_secs(30))
        .await
        .unwrap()
    {
        Begin::Completed(replay) => {
            assert_eq!(replay, record);
            assert_eq!(replay.body(), record.body());
            assert_eq!(replay.encode(), record.encode());
        }
        other => panic!("expected Completed, got {other:?}"),
    }
    restarted.pool().close().await;
}

// A file locked too long.

/// Another connection takes the file's write lock and keeps it.
async fn lock_the_file(path: &Path, table: &str) -> SqliteConnection {
    let mut blocker = SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(path))
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut blocker)
        .await
        .unwrap();
    sqlx::query(&format!(
        "INSERT INTO {table} (key, fingerprint, state, created_at, expires_at) \
         VALUES (randomblob(32), zeroblob(32), 0, 0, 0)"
    ))
    .execute(&mut blocker)
    .await
    .unwrap();
    blocker
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_file_answers_503_in_bound_and_recovers() {
    let db = TempDb::new("locked");
    let timeout = Duration::from_millis(300);
    let store = SqliteStore::open_with(SqliteStore::connect_options(&db.path).unwrap(), timeout)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let counter = Counter::default();
    let app = common::router(counter.clone()).layer(IdempotencyLayer::new(store.clone()));
    let (status, _, _) = call_post(&app, Some("before"), "{}").await;
    assert_eq!(status, StatusCode::CREATED);

    let mut blocker = lock_the_file(&db.path, store.quoted_table()).await;
    for n in 0..3 {
        let start = Instant::now();
        let (status, headers, body) = call_post(&app, Some(&format!("during-{n}")), "{}").await;
        let elapsed = start.elapsed();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body:?}");
        problem(status, &headers, &body);
        assert!(headers.contains_key("retry-after"));
        assert!(
            elapsed < timeout + Duration::from_secs(2),
            "took {elapsed:?}"
        );
    }
    // A replay needs the write lock too, and fails the same way.
    let (status, _, _) = call_post(&app, Some("before"), "{}").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(counter.get(), 1, "no handler ran while the file was locked");

    // With a longer bound, the busy timeout (three quarters of the 300 ms
    // the connections were opened with) answers first: SQLITE_BUSY.
    let patient = store.clone().with_timeout(Duration::from_secs(5));
    let start = Instant::now();
    match patient
        .begin(&random_key(), &fp(1), Duration::from_secs(30))
        .await
    {
        Err(StoreError::Unavailable(err)) => {
            assert!(err.to_string().contains("code: 5"), "{err}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(3));

    // The lock goes away: the same store serves again, without a rebuild.
    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    blocker.close().await.unwrap();
    let (status, headers, _) = call_post(&app, Some("during-0"), "{}").await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(!headers.contains_key("idempotent-replayed"));
    let (status, headers, _) = call_post(&app, Some("before"), "{}").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(counter.get(), 2);
    store.pool().close().await;
}

/// A `begin` cut off by its bound while SQLite still waits for the file
/// (the busy timeout of this pool outlasts the bound) commits once the lock
/// is freed; the store then releases that lock under the attempt's own
/// token, so a retry acquires the key instead of waiting out the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_begin_does_not_strand_its_lock() {
    let db = TempDb::new("unanswered");
    store_on(&db).await.pool().close().await;
    let pool = SqlitePoolOptions::new()
        .connect_with(
            SqliteStore::connect_options(&db.path)
                .unwrap()
                .busy_timeout(Duration::from_secs(10)),
        )
        .await
        .unwrap();
    let store = SqliteStore::new(pool).with_timeout(Duration::from_millis(300));
    let key = random_key();
    let mut blocker = lock_the_file(&db.path, store.quoted_table()).await;
    let err = store
        .begin(&key, &fp(3), Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Timeout(_)), "{err:?}");
    // The cut-off statement takes the key under a token nobody holds once
    // the blocker goes away.
    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        match store.begin(&key, &fp(3), Duration::from_secs(30)).await {
            Ok(Begin::Acquired(_)) => break,
            Ok(Begin::InFlight { .. }) | Err(StoreError::Timeout(_)) => {
                assert!(
                    Instant::now() < deadline,
                    "the unanswered begin's lock was never released"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    store.pool().close().await;
}

// Expiry.

#[tokio::test]
async fn delete_expired_deletes_in_batches_and_never_live_rows() {
    let db = TempDb::new("batches");
    let store = store_on(&db).await;
    let (short, long) = (Duration::from_millis(200), Duration::from_secs(3600));
    let mut live = Vec::new();
    for n in 0..30 {
        let key = random_key();
        if n < 5 {
            // Abandoned locks expire too.
            acquire(&store, &key, short).await;
            continue;
        }
        let token = acquire(&store, &key, Duration::from_secs(30)).await;
        let ttl = if n < 25 { short } else { long };
        let record = sample_record(fp(1), 32);
        assert!(store.complete(&key, &token, &record, ttl).await.unwrap());
        if ttl == long {
            live.push(key);
        }
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(count_rows(&store, false).await, 25);

    assert_eq!(store.delete_expired(0).await.unwrap(), 0);
    assert_eq!(store.delete_expired(10).await.unwrap(), 10);
    assert_eq!(store.delete_expired(10).await.unwrap(), 10);
    assert_eq!(store.delete_expired(10).await.unwrap(), 5);
    assert_eq!(store.delete_expired(10).await.unwrap(), 0);
    assert_eq!(count_rows(&store, false).await, 0);
    assert_eq!(count_rows(&store, true).await, 5);
    for key in &live {
        assert!(matches!(
            store
                .begin(key, &fp(1), Duration::from_secs(30))
                .await
                .unwrap(),
            Begin::Completed(_)
        ));
    }
    store.pool().close().await;
}

#[tokio::test]
async fn the_sweeper_removes_expired_rows() {
    let db = TempDb::new("sweeper");
    let store = store_on(&db).await;
    for n in 0..25 {
        let key = random_key();
        let token = acquire(&store, &key, Duration::from_secs(30)).await;
        let ttl = if n < 20 {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(3600)
        };
        assert!(
            store
                .complete(&key, &token, &sample_record(fp(1), 8), ttl)
                .await
                .unwrap()
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count_rows(&store, false).await, 20);
    let sweeper = store.spawn_sweeper(Duration::from_millis(100), 3);
    let deadline = Instant::now() + Duration::from_secs(5);
    while count_rows(&store, false).await > 0 {
        assert!(Instant::now() < deadline, "the sweeper left expired rows");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count_rows(&store, true).await, 5);
    assert!(!sweeper.is_finished());

    // Errors are logged, not fatal: the table vanishes under it.
    sqlx::query(&format!("DROP TABLE {}", store.quoted_table()))
        .execute(store.pool())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(!sweeper.is_finished(), "the sweeper stopped on an error");
    // A closed pool ends it.
    store.pool().close().await;
    tokio::time::timeout(Duration::from_secs(2), sweeper)
        .await
        .expect("the sweeper outlived its pool")
        .unwrap();
}

/// A lease that ran out is taken over; the lapsed holder's calls change
/// nothing.
#[tokio::test]
async fn an_expired_lease_is_taken_over_and_fenced() {
    let db = TempDb::new("takeover");
    let store = store_on(&db).await;
    let key = random_key();
    let lapsed = acquire(&store, &key, Duration::from_millis(150)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let holder = match store
        .begin(&key, &fp(2), Duration::from_secs(30))
        .await
        .unwrap()
    {
        Begin::Acquired(token) => token,
        other => panic!("expected a takeover, got {other:?}"),
    };
    assert_ne!(holder, lapsed);
    let record = sample_record(fp(1), 8);
    let ttl = Duration::from_secs(60);
    assert!(!store.complete(&key, &lapsed, &record, ttl).await.unwrap());
    assert!(
        !store
            .extend(&key, &lapsed, Duration::from_secs(30))
            .await
            .unwrap()
    );
    assert!(!store.release(&key, &lapsed).await.unwrap());
    match store
        .begin(&key, &fp(3), Duration::from_secs(30))
        .await
        .unwrap()
    {
        Begin::InFlight { fingerprint } => assert_eq!(fingerprint, Some(fp(2))),
        other => panic!("expected the new holder in flight, got {other:?}"),
    }
    let record = sample_record(fp(2), 8);
    assert!(store.complete(&key, &holder, &record, ttl).await.unwrap());
    match store
        .begin(&key, &fp(2), Duration::from_secs(30))
        .await
        .unwrap()
    {
        Begin::Completed(replay) => assert_eq!(replay, record),
        other => panic!("expected Completed, got {other:?}"),
    }
    // The row holds the new holder's request, and no token once completed.
    let (fingerprint, token): (Vec<u8>, Option<Vec<u8>>) = sqlx::query_as(&format!(
        "SELECT fingerprint, lock_token FROM {} WHERE key = ?",
        store.quoted_table()
    ))
    .bind(&key.as_bytes()[..])
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(fingerprint, fp(2).as_bytes().to_vec());
    assert_eq!(token, None);
    store.pool().close().await;
}

// What the file holds.

/// A column's value, as bytes.
type Cell = Option<Vec<u8>>;

/// Whether `needle` occurs in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn no_raw_key_is_stored() {
    let db = TempDb::new("rawkey");
    let store = store_on(&db).await;
    let app = common::router(Counter::default()).layer(IdempotencyLayer::new(store.clone()));
    let done = "raw-key-Zq7-4f1c9e-completed";
    let (status, _, _) = call_post(&app, Some(done), "{\"item\":\"pen\"}").await;
    assert_eq!(status, StatusCode::CREATED);
    // And one left in flight.
    let held = "raw-key-Zq7-4f1c9e-in-flight";
    let slow = {
        let app = app.clone();
        tokio::spawn(async move {
            let req = post_req(Some(held))
                .header("x-delay-ms", "400")
                .body(Body::from("{}"))
                .unwrap();
            send(&app, req).await
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;

    let columns: Vec<String> =
        sqlx::query_scalar("SELECT name FROM pragma_table_info('idempotency_records')")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(columns.len(), 7, "{columns:?}");
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", store.quoted_table()))
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(rows, 2, "one completed record and one lock");
    for column in &columns {
        let values: Vec<(Cell, Cell)> = sqlx::query_as(&format!(
            "SELECT CAST(\"{column}\" AS BLOB), CAST(\"{column}\" AS TEXT) FROM {}",
            store.quoted_table()
        ))
        .fetch_all(store.pool())
        .await
        .unwrap();
        for (bytes, text) in values {
            for key in [done, held, "raw-key-Zq7"] {
                if let Some(bytes) = &bytes {
                    assert!(!contains(bytes, key.as_bytes()), "{key} in {column}");
                }
                if let Some(text) = &text {
                    let text = String::from_utf8_lossy(text);
                    assert!(!text.contains(key), "{key} in {column} as text");
                }
            }
        }
    }
    // Nor anywhere in the files: the database, its log, its shared memory.
    for file in db.files() {
        if let Ok(bytes) = std::fs::read(&file) {
            assert!(
                !contains(&bytes, b"raw-key-Zq7"),
                "a raw key in {}",
                file.display()
            );
        }
    }
    let (status, _, _) = slow.await.unwrap();
    assert_eq!(status, StatusCode::CREATED);
    store.pool().close().await;
}

// Statements per request.

/// What the connections of one pool ran: the SQL of every statement sqlx
/// executed on them, and every commit SQLite made there.
#[derive(Default)]
struct Ledger {
    statements: Mutex<Vec<String>>,
    commits: AtomicUsize,
}

impl Ledger {
    fn take(&self) -> (Vec<String>, usize) {
        (
            std::mem::take(&mut *self.statements.lock().unwrap()),
            self.commits.swap(0, Ordering::SeqCst),
        )
    }
}

/// The worker threads of the counted pool carry this prefix.
const COUNTED_THREADS: &str = "counted-sqlite-";

/// Records sqlx's per-statement events (target `sqlx::query`), emitted on
/// the connection's worker thread as each statement finishes, for the
/// counted pool's threads only.
struct StatementLog(Arc<Ledger>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for StatementLog {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let counted = std::thread::current()
            .name()
            .is_some_and(|name| name.starts_with(COUNTED_THREADS));
        if !counted || event.metadata().target() != "sqlx::query" {
            return;
        }
        // sqlx puts the whole SQL in `db.statement`, or leaves it empty
        // when the SQL is no longer than its `summary` (the first words).
        #[derive(Default)]
        struct Sql {
            statement: String,
            summary: String,
        }
        impl tracing::field::Visit for Sql {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                match field.name() {
                    "db.statement" => value.clone_into(&mut self.statement),
                    "summary" => value.clone_into(&mut self.summary),
                    _ => {}
                }
            }
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                match field.name() {
                    "db.statement" => self.statement = format!("{value:?}"),
                    "summary" => self.summary = format!("{value:?}"),
                    _ => {}
                }
            }
        }
        let mut sql = Sql::default();
        event.record(&mut sql);
        let text = if sql.statement.trim().is_empty() {
            sql.summary
        } else {
            sql.statement
        };
        self.0.statements.lock().unwrap().push(text);
    }
}

/// Lets the last statement's event arrive.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Counted on the connections themselves: sqlx's event for every statement
/// it runs on them, and SQLite's commit hook for every transaction they
/// commit. A first execution runs two statements (begin, complete), a
/// replay one (begin), each its own transaction: no hidden BEGIN/COMMIT
/// around them, nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_statement_for_begin_and_one_for_complete() {
    use tracing_subscriber::layer::SubscriberExt;

    let ledger = Arc::new(Ledger::default());
    // The global subscriber: sqlx emits on its own worker threads. Only
    // this test installs one in this binary.
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(StatementLog(ledger.clone())),
    )
    .unwrap();

    let db = TempDb::new("statements");
    store_on(&db).await.pool().close().await;
    let hook = ledger.clone();
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .after_connect(move |conn, _| {
            let ledger = hook.clone();
            Box::pin(async move {
                conn.lock_handle().await?.set_commit_hook(move || {
                    ledger.commits.fetch_add(1, Ordering::SeqCst);
                    true
                });
                Ok(())
            })
        })
        .connect_with(
            SqliteStore::connect_options(&db.path)
                .unwrap()
                .thread_name(|id| format!("{COUNTED_THREADS}{id}")),
        )
        .await
        .unwrap();
    let faulty = Arc::new(FaultyStore::new(SqliteStore::new(pool.clone())));
    let app = common::router(Counter::default()).layer(IdempotencyLayer::from_arc(faulty.clone()));

    // The connection's set-up is not counted.
    call_post(&app, Some("warm-up"), "{}").await;
    call_post(&app, Some("warm-up"), "{}").await;
    settle().await;
    let (warm, _) = ledger.take();
    assert!(warm.len() >= 3, "the ledger saw nothing: {warm:?}");
    let before = (faulty.calls(Op::Begin), faulty.calls(Op::Complete));

    let single = |sql: &str| {
        let sql = sql.trim().trim_end_matches(';');
        assert!(!sql.contains(';'), "more than one statement: {sql}");
        sql.split_whitespace().next().unwrap_or("").to_owned()
    };

    let (status, _, _) = call_post(&app, Some("counted"), "{}").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(faulty.calls(Op::Begin) - before.0, 1);
    assert_eq!(faulty.calls(Op::Complete) - before.1, 1);
    settle().await;
    let (statements, commits) = ledger.take();
    let verbs: Vec<String> = statements.iter().map(|s| single(s)).collect();
    assert_eq!(
        verbs,
        ["INSERT", "UPDATE"],
        "a first execution: {statements:?}"
    );
    assert_eq!(commits, 2, "each statement its own transaction");

    let (status, headers, _) = call_post(&app, Some("counted"), "{}").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(faulty.calls(Op::Begin) - before.0, 2);
    assert_eq!(faulty.calls(Op::Complete) - before.1, 1);
    settle().await;
    let (statements, commits) = ledger.take();
    let verbs: Vec<String> = statements.iter().map(|s| single(s)).collect();
    assert_eq!(verbs, ["INSERT"], "a replay: begin only: {statements:?}");
    assert_eq!(commits, 1);
    assert_eq!(faulty.calls(Op::Release) + faulty.calls(Op::Extend), 0);
    pool.close().await;
}
