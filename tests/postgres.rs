//! `PostgresStore` against a real PostgreSQL server: the conformance suite,
//! two layer instances sharing one table, restarts, outages, the sweeper,
//! and the statements each request costs.
//!
//! The server comes from `DATABASE_URL`, or else the standard local address
//! (`postgres://postgres@127.0.0.1:5432/test`). If nothing answers, the
//! tests are skipped, unless `CI=true`, where they fail.

#![cfg(all(feature = "postgres", feature = "test-util"))]
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::proxy::{self, Proxy, Tap};
use common::scenarios::{self, fp};
use common::{Counter, call_post};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use tower_idempotency::store::{
    InvalidIdentifier,
    postgres::{PgPool, PostgresStore},
};
use tower_idempotency::test_util::{FaultyStore, Op, random_key, sample_record};
use tower_idempotency::{
    IdempotencyLayer,
    store::{Begin, Store, StoreError},
};

/// Every test table lives here, named `t_<unix seconds>_<random>`.
const SCHEMA: &str = "tower_idempotency_test";

fn database_url() -> Option<String> {
    common::backend(common::POSTGRES)
}

async fn connect(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(4)
        .connect(url)
        .await
        .unwrap()
}

fn unique_table() -> String {
    common::unique_table("t")
}

/// Drops test tables left behind more than ten minutes ago by runs that
/// were interrupted. Once per run.
async fn drop_stale_tables(pool: &PgPool) {
    static DONE: AtomicBool = AtomicBool::new(false);
    if DONE.swap(true, Ordering::SeqCst) {
        return;
    }
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = $1 AND tablename LIKE 't\\_%'",
    )
    .bind(SCHEMA)
    .fetch_all(pool)
    .await
    .unwrap();
    for name in names {
        if common::is_stale(&name) {
            let _ = sqlx::query(&format!("DROP TABLE IF EXISTS \"{SCHEMA}\".\"{name}\""))
                .execute(pool)
                .await;
        }
    }
}

/// A migrated store on a fresh table of its own.
async fn store_on(pool: PgPool) -> PostgresStore {
    drop_stale_tables(&pool).await;
    let store = PostgresStore::new(pool)
        .with_schema(SCHEMA)
        .unwrap()
        .with_table(&unique_table())
        .unwrap();
    store.migrate().await.unwrap();
    store
}

/// For the conformance suite: a table and a pool of its own per check,
/// dropped by the teardown.
async fn store() -> Option<(Arc<dyn Store>, PostgresStore)> {
    let url = database_url()?;
    let store = store_on(connect(&url).await).await;
    Some((Arc::new(store.clone()), store))
}

async fn teardown(store: PostgresStore) {
    drop_table(&store).await;
}

mod conformance {
    tower_idempotency::store_conformance_tests!(super::store, super::teardown);
}

/// The same suite with the lock committed asynchronously: the statement
/// that does it differs.
async fn async_lock_store() -> Option<(Arc<dyn Store>, PostgresStore)> {
    let url = database_url()?;
    let store = store_on(connect(&url).await)
        .await
        .with_async_lock_commit(true);
    Some((Arc::new(store.clone()), store))
}

mod conformance_async_lock_commit {
    tower_idempotency::store_conformance_tests!(super::async_lock_store, super::teardown);
}

async fn drop_table(store: &PostgresStore) {
    sqlx::query(&format!("DROP TABLE IF EXISTS {}", store.qualified_table()))
        .execute(store.pool())
        .await
        .unwrap();
}

/// The same table through another pool.
async fn same_table(store: &PostgresStore, pool: PgPool) -> PostgresStore {
    let table = store
        .qualified_table()
        .rsplit('.')
        .next()
        .unwrap()
        .trim_matches('"');
    PostgresStore::new(pool)
        .with_schema(SCHEMA)
        .unwrap()
        .with_table(table)
        .unwrap()
}

async fn acquire(
    store: &PostgresStore,
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

async fn count_rows(store: &PostgresStore, live: bool) -> i64 {
    let op = if live { ">" } else { "<=" };
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE expires_at {op} now()",
        store.qualified_table()
    ))
    .fetch_one(store.pool())
    .await
    .unwrap()
}

// Configuration.

#[tokio::test]
async fn names_are_validated_and_migrate_is_idempotent() {
    let Some(url) = database_url() else { return };
    let pool = connect(&url).await;
    for bad in [
        "",
        "1table",
        "a-b",
        "x\"; DROP TABLE y; --",
        &"n".repeat(64),
    ] {
        let err = PostgresStore::new(pool.clone())
            .with_table(bad)
            .unwrap_err();
        let StoreError::Backend(err) = err else {
            panic!("{bad:?}: not a backend error")
        };
        assert!(err.downcast_ref::<InvalidIdentifier>().is_some(), "{bad:?}");
        assert!(PostgresStore::new(pool.clone()).with_schema(bad).is_err());
    }

    // A fresh schema, migrated by several instances at once, then again.
    let schema = format!("ti_{}", uuid::Uuid::new_v4().simple());
    let store = PostgresStore::new(pool.clone())
        .with_schema(&schema)
        .unwrap()
        .with_table("records")
        .unwrap();
    assert_eq!(store.qualified_table(), format!("\"{schema}\".\"records\""));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move { store.migrate().await }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    store.migrate().await.unwrap();
    let key = random_key();
    acquire(&store, &key).await;
    let index: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_indexes WHERE schemaname = $1 AND indexdef LIKE '%(expires_at)%')",
    )
    .bind(&schema)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(index, "no index on expires_at");
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_corrupt_record_is_reported_not_replayed() {
    let Some(url) = database_url() else { return };
    let store = store_on(connect(&url).await).await;
    let key = random_key();
    let token = acquire(&store, &key).await;
    let record = sample_record(fp(1), 16);
    assert!(
        store
            .complete(&key, &token, &record, Duration::from_secs(60))
            .await
            .unwrap()
    );
    sqlx::query(&format!(
        "UPDATE {} SET record = substring(record from 1 for 20) WHERE key = $1",
        store.qualified_table()
    ))
    .bind(&key.as_bytes()[..])
    .execute(store.pool())
    .await
    .unwrap();
    assert!(matches!(
        store.begin(&key, &fp(1), Duration::from_secs(30)).await,
        Err(StoreError::Corrupt(_))
    ));
    drop_table(&store).await;
}

/// A replay and a conflict write nothing: they do not wait for a row lock
/// that another transaction holds (an `ON CONFLICT DO UPDATE` would), and
/// their transactions take no transaction id, so they commit without a WAL
/// flush.
#[tokio::test]
async fn replays_and_conflicts_write_nothing() {
    let Some(url) = database_url() else { return };
    let store = store_on(connect(&url).await).await;
    let done = random_key();
    let token = acquire(&store, &done).await;
    let record = sample_record(fp(1), 16);
    assert!(
        store
            .complete(&done, &token, &record, Duration::from_secs(60))
            .await
            .unwrap()
    );
    let held = random_key();
    acquire(&store, &held).await;
    // Another transaction holds both rows locked.
    let mut locker = store.pool().begin().await.unwrap();
    sqlx::query(&format!(
        "SELECT 1 FROM {} WHERE key = $1 OR key = $2 FOR UPDATE",
        store.qualified_table()
    ))
    .bind(&done.as_bytes()[..])
    .bind(&held.as_bytes()[..])
    .execute(&mut *locker)
    .await
    .unwrap();
    let replay = tokio::time::timeout(
        Duration::from_secs(1),
        store.begin(&done, &fp(1), Duration::from_secs(30)),
    )
    .await
    .expect("a replay waited for a row lock");
    assert!(matches!(replay, Ok(Begin::Completed(r)) if r.body() == record.body()));
    let conflict = tokio::time::timeout(
        Duration::from_secs(1),
        store.begin(&held, &fp(1), Duration::from_secs(30)),
    )
    .await
    .expect("a conflict waited for a row lock");
    assert!(matches!(conflict, Ok(Begin::InFlight { .. })));
    locker.rollback().await.unwrap();
    drop_table(&store).await;
}

/// Whether the WAL was flushed past where it ended before a `begin` that
/// took a lock, read on the connection that ran it, right after it.
async fn lock_flushed(store: &PostgresStore) -> bool {
    let lsn = |f: &str| format!("SELECT ({f}() - '0/0'::pg_lsn)::bigint");
    let before: i64 = sqlx::query_scalar(&lsn("pg_current_wal_insert_lsn"))
        .fetch_one(store.pool())
        .await
        .unwrap();
    acquire(store, &random_key()).await;
    let flushed: i64 = sqlx::query_scalar(&lsn("pg_current_wal_flush_lsn"))
        .fetch_one(store.pool())
        .await
        .unwrap();
    flushed > before
}

/// By default a lock is on disk when `begin` returns, every time. With
/// `with_async_lock_commit(true)` it is not waited for: at least one of
/// fifty locks returns before the flush (the WAL writer, or another
/// session's commit, may flush some of them first).
#[tokio::test]
async fn async_lock_commit_does_not_wait_for_the_flush() {
    let Some(url) = database_url() else { return };
    // One connection: the reads see the same session's commit.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    let store = store_on(pool).await;
    assert!(!store.async_lock_commit());
    for _ in 0..20 {
        assert!(lock_flushed(&store).await, "a lock was not flushed");
    }
    let store = store.with_async_lock_commit(true);
    let mut unflushed = 0;
    for _ in 0..50 {
        if !lock_flushed(&store).await {
            unflushed += 1;
        }
    }
    assert!(unflushed > 0, "every asynchronous lock waited for a flush");
    drop_table(&store).await;
}

/// Many concurrent `begin`s on keys whose rows expire, are taken over and
/// are committed while the others' statements run: exactly one acquires,
/// the others see the winner's lock, and nobody sees the expired record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn begin_is_exclusive_under_takeover_races() {
    let Some(url) = database_url() else { return };
    let store = store_on(
        PgPoolOptions::new()
            .max_connections(16)
            .connect(&url)
            .await
            .unwrap(),
    )
    .await;
    let shared: Arc<dyn Store> = Arc::new(store.clone());
    scenarios::begin_is_exclusive_under_takeover_races(|_| shared.clone()).await;
    drop_table(&store).await;
}

// Two instances, one database.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_layer_instances_share_one_table() {
    let Some(url) = database_url() else { return };
    let first = store_on(connect(&url).await).await;
    let second = same_table(&first, connect(&url).await).await;
    let counter = Counter::default();
    let apps = [
        common::router(counter.clone()).layer(IdempotencyLayer::new(first.clone())),
        common::router(counter.clone()).layer(IdempotencyLayer::new(second)),
    ];
    scenarios::hundred_duplicates_on_two_instances(apps, &counter).await;
    drop_table(&first).await;
}

// Durability.

#[tokio::test]
async fn records_survive_a_restart_byte_for_byte() {
    let Some(url) = database_url() else { return };
    let pool = connect(&url).await;
    let store = store_on(pool.clone()).await;
    let key = random_key();
    let token = acquire(&store, &key).await;
    let record = sample_record(fp(1), 64 * 1024);
    assert!(
        store
            .complete(&key, &token, &record, Duration::from_secs(3600))
            .await
            .unwrap()
    );
    pool.close().await;

    let restarted = same_table(&store, connect(&url).await).await;
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
    drop_table(&restarted).await;
}

// Outages.

/// What a [`Proxy`] saw the client send, by PostgreSQL protocol message.
#[derive(Default)]
struct Wire {
    /// `Execute` (extended protocol) and `Query` (simple protocol)
    /// messages: statements run.
    statements: AtomicUsize,
    /// `Sync` messages: round trips that wait for the server.
    syncs: AtomicUsize,
}

impl Wire {
    fn take(&self) -> (usize, usize) {
        (
            self.statements.swap(0, Ordering::SeqCst),
            self.syncs.swap(0, Ordering::SeqCst),
        )
    }

    /// Counts the complete messages at the front of `buf` and drops them.
    fn count(&self, buf: &mut Vec<u8>, started: &mut bool) {
        loop {
            let header = if *started { 5 } else { 8 };
            if buf.len() < header {
                return;
            }
            let len_at = usize::from(*started);
            let len = u32::from_be_bytes(buf[len_at..len_at + 4].try_into().unwrap()) as usize;
            let total = len_at + len;
            if buf.len() < total {
                return;
            }
            if *started {
                match buf[0] {
                    b'E' | b'Q' => self.statements.fetch_add(1, Ordering::SeqCst),
                    b'S' => self.syncs.fetch_add(1, Ordering::SeqCst),
                    _ => 0,
                };
            } else if buf[4..8] == 196_608u32.to_be_bytes() {
                // The start-up message (protocol 3.0): typed messages follow.
                *started = true;
            }
            buf.drain(..total);
        }
    }
}

impl Wire {
    /// A tap that counts each connection's messages.
    fn tap(self: &Arc<Self>) -> Tap {
        let wire = self.clone();
        Arc::new(move || {
            let wire = wire.clone();
            let (mut pending, mut started) = (Vec::new(), false);
            Box::new(move |bytes: &[u8]| {
                pending.extend_from_slice(bytes);
                wire.count(&mut pending, &mut started);
            })
        })
    }
}

fn connect_options(url: &str) -> PgConnectOptions {
    PgConnectOptions::from_str(url).unwrap()
}

async fn upstream(url: &str) -> SocketAddr {
    let opts = connect_options(url);
    proxy::resolve(opts.get_host(), opts.get_port()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_answers_503_in_bound_and_recovers() {
    let Some(url) = database_url() else { return };
    let direct = store_on(connect(&url).await).await;
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), upstream(&url).await, None).await;
    let through = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_millis(500))
        .connect_with(
            connect_options(&url)
                .host("127.0.0.1")
                .port(proxy.addr.port()),
        )
        .await
        .unwrap();
    let store = same_table(&direct, through).await;
    let counter = Counter::default();
    let app = common::router(counter.clone()).layer(IdempotencyLayer::new(store));
    let proxy = scenarios::outage_answers_503_in_bound_and_recovers(&app, &counter, proxy).await;
    proxy.stop().await;
    drop_table(&direct).await;
}

#[tokio::test]
async fn an_unreachable_server_answers_503_in_bound() {
    let Some(url) = database_url() else { return };
    // The pool's own acquire timeout is the default 30 s: the store's bound
    // is what answers.
    let pool = PgPoolOptions::new().connect_lazy_with(
        connect_options(&url)
            .host("127.0.0.1")
            .port(scenarios::closed_port()),
    );
    let store = PostgresStore::new(pool).with_timeout(Duration::from_millis(500));
    scenarios::unreachable_answers_503_in_bound(Arc::new(store)).await;
}

// Expiry.

#[tokio::test]
async fn delete_expired_deletes_in_batches_and_never_live_rows() {
    let Some(url) = database_url() else { return };
    let store = store_on(connect(&url).await).await;
    let (short, long) = (Duration::from_millis(300), Duration::from_secs(3600));
    let mut live = Vec::new();
    for n in 0..12 {
        let key = random_key();
        let token = acquire(&store, &key).await;
        let ttl = if n < 7 { short } else { long };
        let record = sample_record(fp(1), 32);
        assert!(store.complete(&key, &token, &record, ttl).await.unwrap());
        if ttl == long {
            live.push(key);
        }
    }
    // An abandoned lock expires too.
    store
        .begin(&random_key(), &fp(1), Duration::from_millis(300))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count_rows(&store, false).await, 8);

    assert_eq!(store.delete_expired(0).await.unwrap(), 0);
    assert_eq!(store.delete_expired(3).await.unwrap(), 3);
    assert_eq!(store.delete_expired(3).await.unwrap(), 3);
    assert_eq!(store.delete_expired(3).await.unwrap(), 2);
    assert_eq!(store.delete_expired(3).await.unwrap(), 0);
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
    drop_table(&store).await;
}

#[tokio::test]
async fn the_sweeper_removes_expired_rows() {
    let Some(url) = database_url() else { return };
    let store = store_on(connect(&url).await).await;
    for n in 0..25 {
        let key = random_key();
        let token = acquire(&store, &key).await;
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
    let sweeper = store.spawn_sweeper(Duration::from_millis(100), 3);
    let deadline = Instant::now() + Duration::from_secs(3);
    while count_rows(&store, false).await > 0 {
        assert!(Instant::now() < deadline, "the sweeper left expired rows");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count_rows(&store, true).await, 5);
    assert!(!sweeper.is_finished());

    // Errors are logged, not fatal: the table vanishes under it.
    drop_table(&store).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(!sweeper.is_finished(), "the sweeper stopped on an error");
    // A closed pool ends it.
    store.pool().close().await;
    tokio::time::timeout(Duration::from_secs(2), sweeper)
        .await
        .expect("the sweeper outlived its pool")
        .unwrap();
}

// Statements per request.

/// Lets the pool's on-release ping finish, so it is counted with its
/// statement.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Counted on the wire, between the pool and the server: a first execution
/// runs two statements (begin, complete), a replay one (begin). Each
/// statement is one round trip; sqlx adds a `Sync`-only ping when a
/// connection goes back to the pool (off the request's path), and another
/// when it hands one out unless `test_before_acquire(false)`.
#[tokio::test]
async fn one_statement_for_begin_and_one_for_complete() {
    let Some(url) = database_url() else { return };
    let direct = store_on(connect(&url).await).await;
    let wire = Arc::new(Wire::default());
    let proxy = Proxy::start(
        "127.0.0.1:0".parse().unwrap(),
        upstream(&url).await,
        Some(wire.tap()),
    )
    .await;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        // Otherwise every connection handed out is pinged first.
        .test_before_acquire(false)
        .connect_with(
            connect_options(&url)
                .host("127.0.0.1")
                .port(proxy.addr.port())
                .ssl_mode(PgSslMode::Disable),
        )
        .await
        .unwrap();
    let faulty = Arc::new(FaultyStore::new(same_table(&direct, pool).await));
    let app = common::router(Counter::default()).layer(IdempotencyLayer::from_arc(faulty.clone()));

    // Warm the connection up: its set-up and the first preparation of each
    // statement are not counted.
    call_post(&app, Some("warm-up"), "{}").await;
    call_post(&app, Some("warm-up"), "{}").await;
    settle().await;
    wire.take();
    let before = (faulty.calls(Op::Begin), faulty.calls(Op::Complete));

    let (status, _, _) = call_post(&app, Some("counted"), "{}").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(faulty.calls(Op::Begin) - before.0, 1);
    assert_eq!(faulty.calls(Op::Complete) - before.1, 1);
    settle().await;
    let (statements, syncs) = wire.take();
    assert_eq!(statements, 2, "a first execution: begin and complete");
    assert!(syncs <= 2 * statements, "{syncs} round trips");

    let (status, headers, _) = call_post(&app, Some("counted"), "{}").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(faulty.calls(Op::Begin) - before.0, 2);
    assert_eq!(faulty.calls(Op::Complete) - before.1, 1);
    settle().await;
    let (statements, syncs) = wire.take();
    assert_eq!(statements, 1, "a replay: begin only");
    assert!(syncs <= 2 * statements, "{syncs} round trips");
    assert_eq!(faulty.calls(Op::Release) + faulty.calls(Op::Extend), 0);

    proxy.stop().await;
    drop_table(&direct).await;
}

/// A `begin` cut off by its timeout while its statement waits on a row lock
/// still commits once the lock is freed; the store then releases that lock
/// under the attempt's own token, so a retry acquires the key instead of
/// waiting out the 30 s lease.
#[tokio::test]
async fn an_unanswered_begin_does_not_strand_its_lock() {
    let Some(url) = database_url() else {
        return;
    };
    let store = store_on(connect(&url).await)
        .await
        .with_timeout(Duration::from_millis(300));
    let key = tower_idempotency::test_util::random_key();
    let fp = tower_idempotency::fingerprint::Fingerprint::from_bytes([3; 32]);
    // Another transaction inserts the same key and holds it uncommitted.
    let blocker_pool = connect(&url).await;
    let mut blocker = blocker_pool.begin().await.unwrap();
    sqlx::query(&format!(
        "INSERT INTO {} (key, fingerprint, state, lock_token, expires_at) VALUES ($1, $2, 0, $3, now() - interval '1 hour')",
        store.qualified_table()
    ))
    .bind(&key.as_bytes()[..])
    .bind(&fp.as_bytes()[..])
    .bind(&[0u8; 16][..])
    .execute(&mut *blocker)
    .await
    .unwrap();
    let err = store
        .begin(&key, &fp, Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Timeout(_)), "{err:?}");
    // The blocker goes away; the cut-off statement now takes the lock under
    // a token nobody holds.
    blocker.rollback().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        match store.begin(&key, &fp, Duration::from_secs(30)).await {
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
    drop_table(&store).await;
}
