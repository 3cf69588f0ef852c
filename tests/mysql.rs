//! `MySqlStore` against a real MariaDB (or MySQL) server: the conformance
//! suite in both flavors (the one-statement MariaDB `begin` and the MySQL 8
//! one, which MariaDB also runs), two layer instances sharing one table,
//! restarts, outages, the sweeper, no raw key at rest, and the statements
//! each request costs, counted on the wire.
//!
//! The server comes from `MYSQL_URL`, or else the standard local address
//! (`mysql://root@127.0.0.1:3306/test`). If nothing answers, the tests are
//! skipped, unless `CI=true`, where they fail.

#![cfg(all(feature = "mysql", feature = "test-util"))]
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
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use tower_idempotency::store::mysql::{Flavor, MySqlPool, MySqlStore};
use tower_idempotency::store::{InvalidIdentifier, LockToken, StoreKey};
use tower_idempotency::test_util::{FaultyStore, Op, random_key, sample_record};
use tower_idempotency::{
    IdempotencyLayer,
    store::{Begin, Store, StoreError},
};

fn mysql_url() -> Option<String> {
    common::backend(common::MYSQL)
}

fn connect_options(url: &str) -> MySqlConnectOptions {
    // `mariadb://` is the same protocol.
    let url = url.replacen("mariadb://", "mysql://", 1);
    MySqlConnectOptions::from_str(&url).unwrap()
}

async fn connect(url: &str) -> MySqlPool {
    MySqlPoolOptions::new()
        .max_connections(8)
        .connect_with(connect_options(url))
        .await
        .unwrap()
}

fn unique_table() -> String {
    common::unique_table("tidem")
}

/// Drops test tables left behind more than ten minutes ago by runs that
/// were interrupted. Once per run.
async fn drop_stale_tables(pool: &MySqlPool) {
    static DONE: AtomicBool = AtomicBool::new(false);
    if DONE.swap(true, Ordering::SeqCst) {
        return;
    }
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(table_name AS CHAR) FROM information_schema.tables \
         WHERE table_schema = DATABASE() AND table_name LIKE 'tidem\\_%'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for name in names {
        if common::is_stale(&name) {
            let _ = sqlx::query(&format!("DROP TABLE IF EXISTS `{name}`"))
                .execute(pool)
                .await;
        }
    }
}

/// A migrated store on a fresh table of its own.
async fn store_on(pool: MySqlPool) -> MySqlStore {
    drop_stale_tables(&pool).await;
    let store = MySqlStore::new(pool).with_table(&unique_table()).unwrap();
    store.migrate().await.unwrap();
    store
}

/// The same table through another pool.
fn same_table(store: &MySqlStore, pool: MySqlPool) -> MySqlStore {
    let table = store.quoted_table().trim_matches('`');
    MySqlStore::new(pool).with_table(table).unwrap()
}

async fn drop_table(store: &MySqlStore) {
    sqlx::query(&format!("DROP TABLE IF EXISTS {}", store.quoted_table()))
        .execute(store.pool())
        .await
        .unwrap();
}

/// For the conformance suites: a table and a pool of its own per check,
/// dropped by the teardown.
async fn conformance_store(flavor: Option<Flavor>) -> Option<(Arc<dyn Store>, MySqlStore)> {
    let url = mysql_url()?;
    let pool = connect(&url).await;
    drop_stale_tables(&pool).await;
    // 5 s a call, not 1: the checks are about the contract, and a commit
    // of the multi-megabyte record waits for the disk's flush, which a
    // busy machine can hold up for more than a second.
    let mut store = MySqlStore::new(pool)
        .with_table(&unique_table())
        .unwrap()
        .with_timeout(Duration::from_secs(5));
    if let Some(flavor) = flavor {
        store = store.with_flavor(flavor);
    }
    store.migrate().await.unwrap();
    Some((Arc::new(store.clone()), store))
}

async fn detected() -> Option<(Arc<dyn Store>, MySqlStore)> {
    conformance_store(None).await
}

/// The MySQL 8 statements (no `RETURNING`), which MariaDB runs as well.
async fn without_returning() -> Option<(Arc<dyn Store>, MySqlStore)> {
    conformance_store(Some(Flavor::MySql)).await
}

async fn teardown(store: MySqlStore) {
    drop_table(&store).await;
}

mod conformance {
    tower_idempotency::store_conformance_tests!(super::detected, super::teardown);
}

mod conformance_without_returning {
    tower_idempotency::store_conformance_tests!(super::without_returning, super::teardown);
}

async fn acquire(store: &MySqlStore, key: &StoreKey) -> LockToken {
    match store
        .begin(key, &fp(1), Duration::from_secs(30))
        .await
        .unwrap()
    {
        Begin::Acquired(token) => token,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

async fn count_rows(store: &MySqlStore, live: bool) -> i64 {
    let op = if live { ">" } else { "<=" };
    sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM {} WHERE expires_at {op} UTC_TIMESTAMP(6)",
        store.quoted_table()
    ))
    .fetch_one(store.pool())
    .await
    .unwrap()
}

// Configuration.

#[tokio::test]
async fn names_are_validated_and_migrate_is_idempotent() {
    let Some(url) = mysql_url() else { return };
    let pool = connect(&url).await;
    for bad in ["", "1t", "t-1", "t`; DROP TABLE x; --", &"x".repeat(65)] {
        match MySqlStore::new(pool.clone()).with_table(bad) {
            Err(StoreError::Backend(err)) => {
                let err = err.downcast_ref::<InvalidIdentifier>().unwrap();
                assert_eq!(err.name(), bad);
            }
            other => panic!("{bad:?} accepted: {other:?}"),
        }
    }
    let store = store_on(pool).await;
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    // The server's flavor was read by `migrate`.
    let version: String = sqlx::query_scalar("SELECT VERSION()")
        .fetch_one(store.pool())
        .await
        .unwrap();
    let expected = if version.to_ascii_lowercase().contains("mariadb") {
        Flavor::MariaDb
    } else {
        Flavor::MySql
    };
    assert_eq!(store.flavor().await.unwrap(), expected);
    assert!(format!("{store:?}").contains(store.quoted_table()));
    drop_table(&store).await;
}

#[tokio::test]
async fn a_corrupt_record_is_reported_not_replayed() {
    let Some(url) = mysql_url() else { return };
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
        "UPDATE {} SET record = 'not a record' WHERE `key` = ?",
        store.quoted_table()
    ))
    .bind(&key.as_bytes()[..])
    .execute(store.pool())
    .await
    .unwrap();
    let err = store
        .begin(&key, &fp(1), Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    drop_table(&store).await;
}

/// Many concurrent `begin`s on keys whose rows expire and are taken over
/// while the others' statements run, in both flavors: exactly one
/// acquires, the others see the winner's lock, and InnoDB's deadlock
/// victims (if any) are run again, not reported.
/// In both flavors; InnoDB's deadlock victims (if any) are run again, not
/// reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn begin_is_exclusive_under_takeover_races() {
    let Some(url) = mysql_url() else { return };
    let pool = MySqlPoolOptions::new()
        .max_connections(16)
        .connect_with(connect_options(&url))
        .await
        .unwrap();
    let detected = store_on(pool).await.with_timeout(Duration::from_secs(5));
    let forced = detected.clone().with_flavor(Flavor::MySql);
    let stores: [Arc<dyn Store>; 2] = [Arc::new(detected.clone()), Arc::new(forced)];
    scenarios::begin_is_exclusive_under_takeover_races(|round| stores[round / 2 % 2].clone()).await;
    drop_table(&detected).await;
}

// Two instances, one database.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_layer_instances_share_one_table() {
    let Some(url) = mysql_url() else { return };
    let first = store_on(connect(&url).await).await;
    // The second instance runs the MySQL 8 statements: both kinds of
    // instance agree on one table.
    let second = same_table(&first, connect(&url).await).with_flavor(Flavor::MySql);
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
    let Some(url) = mysql_url() else { return };
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
    // And one through the layer.
    let counter = Counter::default();
    let app = common::router(counter.clone()).layer(IdempotencyLayer::new(store.clone()));
    let (status, headers, body) = call_post(&app, Some("restart"), "{\"n\":1}").await;
    assert_eq!(status, StatusCode::CREATED);

    // The application goes away: its pool closes.
    pool.close().await;
    drop(app);

    let again = same_table(&store, connect(&url).await);
    match again
        .begin(&key, &fp(1), Duration::from_secs(30))
        .await
        .unwrap()
    {
        Begin::Completed(stored) => assert_eq!(stored.encode(), record.encode()),
        other => panic!("expected the record, got {other:?}"),
    }
    let app = common::router(counter.clone()).layer(IdempotencyLayer::new(again.clone()));
    let (status2, headers2, body2) = call_post(&app, Some("restart"), "{\"n\":1}").await;
    assert_eq!(status2, status);
    assert_eq!(body2, body);
    assert_eq!(headers2["idempotent-replayed"], "true");
    // Hop-by-hop headers are not recorded, and `Date` is the replay's own.
    let own = |name: &&axum::http::HeaderName| !["keep-alive", "date"].contains(&name.as_str());
    for (name, value) in headers.iter().filter(|(name, _)| own(name)) {
        assert!(
            headers2.get_all(name).iter().any(|v| v == value),
            "{name} changed"
        );
    }
    assert_eq!(counter.get(), 1);
    drop_table(&again).await;
}

// Outages.

async fn upstream(url: &str) -> SocketAddr {
    let opts = connect_options(url);
    proxy::resolve(opts.get_host(), opts.get_port()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_answers_503_in_bound_and_recovers() {
    let Some(url) = mysql_url() else { return };
    let direct = store_on(connect(&url).await).await;
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), upstream(&url).await, None).await;
    let through = MySqlPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_millis(500))
        .connect_with(
            connect_options(&url)
                .host("127.0.0.1")
                .port(proxy.addr.port()),
        )
        .await
        .unwrap();
    let store = same_table(&direct, through);
    let counter = Counter::default();
    let app = common::router(counter.clone()).layer(IdempotencyLayer::new(store));
    let proxy = scenarios::outage_answers_503_in_bound_and_recovers(&app, &counter, proxy).await;
    proxy.stop().await;
    drop_table(&direct).await;
}

#[tokio::test]
async fn an_unreachable_server_answers_503_in_bound() {
    let Some(url) = mysql_url() else { return };
    // The pool's own acquire timeout is the default 30 s: the store's bound
    // is what answers.
    let pool = MySqlPoolOptions::new().connect_lazy_with(
        connect_options(&url)
            .host("127.0.0.1")
            .port(scenarios::closed_port()),
    );
    let store = MySqlStore::new(pool)
        .with_flavor(Flavor::MariaDb)
        .with_timeout(Duration::from_millis(500));
    scenarios::unreachable_answers_503_in_bound(Arc::new(store)).await;
}

/// A `begin` cut off by its timeout while its statement waits on a row lock
/// still commits once the lock is freed; the store then releases that lock
/// under the attempt's own token, so a retry acquires the key instead of
/// waiting out the 30 s lease.
#[tokio::test]
async fn an_unanswered_begin_does_not_strand_its_lock() {
    let Some(url) = mysql_url() else { return };
    let store = store_on(connect(&url).await)
        .await
        .with_timeout(Duration::from_millis(300));
    let key = random_key();
    let blocker_pool = connect(&url).await;
    let mut blocker = blocker_pool.begin().await.unwrap();
    sqlx::query(&format!(
        "INSERT INTO {} (`key`, fingerprint, state, lock_token, created_at, expires_at) \
         VALUES (?, ?, 0, ?, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6) - INTERVAL 1 HOUR)",
        store.quoted_table()
    ))
    .bind(&key.as_bytes()[..])
    .bind(&fp(3).as_bytes()[..])
    .bind(&[0u8; 16][..])
    .execute(&mut *blocker)
    .await
    .unwrap();
    let err = store
        .begin(&key, &fp(3), Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Timeout(_)), "{err:?}");
    // The blocker goes away; the cut-off statement now takes the lock under
    // a token nobody holds, and its task releases it.
    blocker.rollback().await.unwrap();
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
    drop_table(&store).await;
}

// Expiry.

#[tokio::test]
async fn delete_expired_deletes_in_batches_and_never_live_rows() {
    let Some(url) = mysql_url() else { return };
    let store = store_on(connect(&url).await).await;
    let (short, long) = (Duration::from_millis(300), Duration::from_secs(3600));
    for _ in 0..5 {
        let key = random_key();
        let token = acquire(&store, &key).await;
        assert!(
            store
                .complete(&key, &token, &sample_record(fp(1), 8), long)
                .await
                .unwrap()
        );
    }
    for n in 0..25 {
        let key = random_key();
        let token = acquire(&store, &key).await;
        if n % 2 == 0 {
            let record = sample_record(fp(1), 8);
            assert!(store.complete(&key, &token, &record, short).await.unwrap());
        } else {
            assert!(store.extend(&key, &token, short).await.unwrap());
        }
    }
    tokio::time::sleep(short + Duration::from_millis(100)).await;
    assert_eq!(count_rows(&store, false).await, 25);
    assert_eq!(store.delete_expired(10).await.unwrap(), 10);
    assert_eq!(store.delete_expired(10).await.unwrap(), 10);
    assert_eq!(store.delete_expired(10).await.unwrap(), 5);
    assert_eq!(store.delete_expired(10).await.unwrap(), 0);
    assert_eq!(store.delete_expired(0).await.unwrap(), 0);
    assert_eq!(count_rows(&store, true).await, 5);
    assert_eq!(count_rows(&store, false).await, 0);
    drop_table(&store).await;
}

#[tokio::test]
async fn the_sweeper_removes_expired_rows() {
    let Some(url) = mysql_url() else { return };
    let store = store_on(connect(&url).await).await;
    for _ in 0..7 {
        let key = random_key();
        let token = acquire(&store, &key).await;
        let record = sample_record(fp(1), 8);
        let ttl = Duration::from_millis(200);
        assert!(store.complete(&key, &token, &record, ttl).await.unwrap());
    }
    let live = random_key();
    acquire(&store, &live).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sweeper = store.spawn_sweeper(Duration::from_millis(100), 3);
    let deadline = Instant::now() + Duration::from_secs(5);
    while count_rows(&store, false).await > 0 {
        assert!(Instant::now() < deadline, "expired rows remain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count_rows(&store, true).await, 1);
    sweeper.abort();
    drop_table(&store).await;
}

// At rest.

#[tokio::test]
async fn no_raw_key_in_any_row() {
    let Some(url) = mysql_url() else { return };
    let store = store_on(connect(&url).await).await;
    let app = common::router(Counter::default()).layer(IdempotencyLayer::new(store.clone()));
    let key = "raw-key-4f1d9c7e-never-stored";
    let (status, _, _) = call_post(&app, Some(key), "{\"item\":\"x\"}").await;
    assert_eq!(status, StatusCode::CREATED);
    type Row = (Vec<u8>, Vec<u8>, Option<Vec<u8>>, Option<Vec<u8>>);
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT `key`, fingerprint, lock_token, record FROM {}",
        store.quoted_table()
    ))
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), 1);
    let needle = key.as_bytes();
    for (k, f, t, r) in rows {
        for column in [Some(k), Some(f), t, r].into_iter().flatten() {
            assert!(
                !column.windows(needle.len()).any(|w| w == needle),
                "the raw key is stored"
            );
        }
    }
    drop_table(&store).await;
}

// Statements on the wire.

/// What the client sent, by MySQL command: statements run
/// (`COM_STMT_EXECUTE` and `COM_QUERY`), every command but pings (one
/// round trip each), and the pings sqlx sends when a connection goes back
/// to the pool, after the answer (off the request's path).
#[derive(Default)]
struct Wire {
    statements: AtomicUsize,
    commands: AtomicUsize,
    pings: AtomicUsize,
}

impl Wire {
    fn take(&self) -> (usize, usize) {
        self.pings.store(0, Ordering::SeqCst);
        (
            self.statements.swap(0, Ordering::SeqCst),
            self.commands.swap(0, Ordering::SeqCst),
        )
    }

    /// Counts the complete packets at the front of `buf` and drops them. A
    /// packet is a 3-byte little-endian length, a sequence number, and the
    /// payload; a command starts a new sequence (0), and its first payload
    /// byte names it. The handshake's packets never have sequence 0.
    fn count(&self, buf: &mut Vec<u8>) {
        while buf.len() >= 4 {
            let len = usize::from(buf[0]) | usize::from(buf[1]) << 8 | usize::from(buf[2]) << 16;
            if buf.len() < 4 + len {
                return;
            }
            if buf[3] == 0 && len > 0 {
                match buf[4] {
                    // COM_QUERY, COM_STMT_EXECUTE
                    0x03 | 0x17 => {
                        self.statements.fetch_add(1, Ordering::SeqCst);
                        self.commands.fetch_add(1, Ordering::SeqCst);
                    }
                    // COM_PING, when a connection goes back to the pool
                    0x0e => {
                        self.pings.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {
                        self.commands.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            buf.drain(..4 + len);
        }
    }

    fn tap(self: &Arc<Self>) -> Tap {
        let wire = self.clone();
        Arc::new(move || {
            let wire = wire.clone();
            let mut pending = Vec::new();
            Box::new(move |bytes: &[u8]| {
                pending.extend_from_slice(bytes);
                wire.count(&mut pending);
            })
        })
    }
}

/// Lets anything the pool does on release finish, so it is counted with
/// its statement.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Counted on the wire, between the pool and the server: a first execution
/// runs two statements in either flavor (begin, complete); a replay runs
/// one on MariaDB (`INSERT … RETURNING`) and two on MySQL 8 (the insert
/// that finds the live row, and the `SELECT` that reads it).
#[tokio::test]
async fn statements_per_step_in_each_flavor() {
    let Some(url) = mysql_url() else { return };
    let direct = store_on(connect(&url).await).await;
    if direct.flavor().await.unwrap() != Flavor::MariaDb {
        eprintln!("not MariaDB: only the MySQL 8 statements are counted");
    }
    for flavor in [Flavor::MariaDb, Flavor::MySql] {
        if flavor == Flavor::MariaDb && direct.flavor().await.unwrap() != Flavor::MariaDb {
            continue;
        }
        let wire = Arc::new(Wire::default());
        let proxy = Proxy::start(
            "127.0.0.1:0".parse().unwrap(),
            upstream(&url).await,
            Some(wire.tap()),
        )
        .await;
        let pool = MySqlPoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(
                connect_options(&url)
                    .host("127.0.0.1")
                    .port(proxy.addr.port()),
            )
            .await
            .unwrap();
        let store = same_table(&direct, pool).with_flavor(flavor);
        let faulty = Arc::new(FaultyStore::new(store));
        let app =
            common::router(Counter::default()).layer(IdempotencyLayer::from_arc(faulty.clone()));

        // Warm the connection up: its set-up and the first preparation of
        // each statement are not counted.
        for _ in 0..2 {
            call_post(&app, Some(&format!("warm-up-{flavor:?}")), "{}").await;
        }
        settle().await;
        wire.take();
        let before = (faulty.calls(Op::Begin), faulty.calls(Op::Complete));

        let key = format!("counted-{flavor:?}");
        let (status, _, _) = call_post(&app, Some(&key), "{}").await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(faulty.calls(Op::Begin) - before.0, 1);
        assert_eq!(faulty.calls(Op::Complete) - before.1, 1);
        settle().await;
        let (statements, commands) = wire.take();
        assert_eq!(
            statements, 2,
            "{flavor:?}: a first execution, begin and complete"
        );
        assert_eq!(commands, statements, "{flavor:?}: one round trip each");

        let (status, headers, _) = call_post(&app, Some(&key), "{}").await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(headers["idempotent-replayed"], "true");
        settle().await;
        let (statements, commands) = wire.take();
        let expected = match flavor {
            Flavor::MariaDb => 1,
            _ => 2,
        };
        assert_eq!(statements, expected, "{flavor:?}: a replay");
        assert_eq!(commands, statements, "{flavor:?}: one round trip each");
        assert_eq!(faulty.calls(Op::Release) + faulty.calls(Op::Extend), 0);
        proxy.stop().await;
    }
    drop_table(&direct).await;
}
