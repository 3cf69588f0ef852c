//! `SealedStore`: the conformance suite through it; on every store, what
//! the store holds after a request carries none of the response, and the
//! replay is exact; the message face; key rotation; tampering, a record
//! moved to another key and a wrong key all fail closed without running
//! the handler again; record key parsing and printing.
//!
//! Redis, PostgreSQL and MySQL come from `REDIS_URL`, `DATABASE_URL` and
//! `MYSQL_URL` (or the standard local addresses); a backend that does not
//! answer is skipped visibly, unless `CI=true`. SQLite runs on temporary
//! files.

#![cfg(all(feature = "encryption", feature = "test-util"))]
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use common::{Counter, call_post, problem};
use sha2::{Digest, Sha256};
use tower_idempotency::message::{BytesCodec, IdempotentConsumer, MessageKey, Processed};
use tower_idempotency::store::sealed::{InvalidRecordKey, RecordKey, SealedStore};
use tower_idempotency::store::{Attachment, BoxError, StoreError};
use tower_idempotency::{
    IdempotencyLayer, MemoryStore, StoreErrorPolicy,
    fingerprint::Fingerprint,
    record::{Record, RecordKind},
    store::{Begin, Store, StoreKey},
};

/// What the handler answers (it echoes the request body): a stand-in for a
/// secret in a response.
const MARKER: &str = "4111-PLAINTEXT-MARKER";
const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

fn body() -> String {
    format!(r#"{{"card":"{MARKER}"}}"#)
}

fn key_a() -> RecordKey {
    RecordKey::from_hex("0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff0").unwrap()
}

fn key_b() -> RecordKey {
    RecordKey::from_bytes([0xB0; 32])
}

fn unrelated_key() -> RecordKey {
    RecordKey::from_bytes([0x5C; 32])
}

/// A fresh client key, so tests on shared servers never meet.
fn idem_key() -> String {
    format!("sealed-{}", uuid::Uuid::new_v4().simple())
}

/// The store key the layer files an unscoped request under: SHA-256 of
/// the label, "no scope", and the client's key. Every test that relies on
/// it first finds the request's record under it, so a change in the
/// derivation fails loudly here rather than passing vacuously.
fn http_store_key(idem: &str) -> StoreKey {
    let digest = Sha256::new()
        .chain_update(b"tower-idempotency/key/v1\0")
        .chain_update([0])
        .chain_update(idem.as_bytes())
        .finalize();
    StoreKey::from_bytes(digest.into())
}

fn app(store: impl Store, counter: &Counter) -> Router {
    common::router(counter.clone()).layer(IdempotencyLayer::new(store))
}

fn fail_open_app(store: impl Store, counter: &Counter) -> Router {
    common::router(counter.clone())
        .layer(IdempotencyLayer::new(store).with_store_error_policy(StoreErrorPolicy::FailOpen))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Neither the marker nor its hex form (how PostgreSQL prints bytea) is
/// anywhere in `held`.
fn assert_no_marker(held: &[u8], what: &str) {
    assert!(
        !contains(held, MARKER.as_bytes()),
        "{what} holds the plaintext marker"
    );
    assert!(
        !contains(held, hex(MARKER.as_bytes()).as_bytes()),
        "{what} holds the marker as hex"
    );
}

/// The first request runs the handler and answers the marker body.
async fn first_request(app: &Router, counter: &Counter, idem: &str) -> HeaderMap {
    let before = counter.get();
    let (status, headers, got) = call_post(app, Some(idem), &body()).await;
    assert_eq!(status, StatusCode::CREATED, "{got:?}");
    assert_eq!(got, body().as_bytes());
    assert_eq!(counter.get(), before + 1, "the handler ran");
    assert!(!headers.contains_key("idempotent-replayed"));
    headers
}

/// A retry replays exactly what the first request answered, without
/// running the handler.
async fn assert_replays(app: &Router, counter: &Counter, idem: &str, first: &HeaderMap) {
    let before = counter.get();
    let (status, headers, got) = call_post(app, Some(idem), &body()).await;
    assert_eq!(status, StatusCode::CREATED, "{got:?}");
    assert_eq!(got, body().as_bytes(), "the replay is byte for byte");
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(headers["x-execution"], first["x-execution"]);
    let cookies = |h: &HeaderMap| {
        h.get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(cookies(&headers), cookies(first));
    assert_eq!(counter.get(), before, "a replay never runs the handler");
}

/// A retry fails closed: 503 problem+json, and the handler does not run.
async fn assert_fails_closed(app: &Router, counter: &Counter, idem: &str) {
    let before = counter.get();
    let (status, headers, got) = call_post(app, Some(idem), &body()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{got:?}");
    problem(status, &headers, &got);
    assert!(!contains(&got, MARKER.as_bytes()));
    assert_eq!(counter.get(), before, "the handler must not run again");
}

/// Key, fingerprint, lock token, record, and the rest of the row as text.
#[cfg(any(feature = "postgres", feature = "mysql"))]
type SqlRow = (Vec<u8>, Vec<u8>, Option<Vec<u8>>, Option<Vec<u8>>, String);

/// Every column of a SQLite row, in table order, as bytes.
#[cfg(feature = "sqlite")]
type SqliteRow = (
    Vec<u8>,
    Vec<u8>,
    Vec<u8>,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Vec<u8>,
    Vec<u8>,
);

/// What the store underneath holds for `key`: the outer record.
async fn held(store: &dyn Store, key: &StoreKey) -> Record {
    match store
        .begin(key, &Fingerprint::from_bytes([0; 32]), LEASE)
        .await
    {
        Ok(Begin::Completed(record)) => record,
        other => panic!("expected the sealed record, got {other:?}"),
    }
}

/// Files `record` under `key` in `store`, which must not hold it yet.
async fn plant(store: &dyn Store, key: &StoreKey, record: &Record) {
    let fp = *record.fingerprint();
    let Ok(Begin::Acquired(token)) = store.begin(key, &fp, LEASE).await else {
        panic!("the key is taken");
    };
    assert!(store.complete(key, &token, record, TTL).await.unwrap());
}

/// The same outer record with one byte of its envelope flipped.
fn flipped(outer: &Record, at: usize) -> Record {
    let mut envelope = outer.body().to_vec();
    envelope[at] ^= 0x01;
    Record::value(*outer.fingerprint(), Bytes::from(envelope))
}

// 1. Conformance.

mod memory_conformance {
    use super::*;

    async fn make() -> Option<Arc<dyn Store>> {
        Some(Arc::new(SealedStore::new(MemoryStore::new(), key_a())))
    }

    tower_idempotency::store_conformance_tests!(make);
}

#[cfg(feature = "redis")]
mod redis_conformance {
    use super::*;

    async fn make() -> Option<(Arc<dyn Store>, (String, String))> {
        let url = common::backend(common::REDIS)?;
        let prefix = format!("test:sealed:{}:", uuid::Uuid::new_v4().simple());
        let redis = tower_idempotency::store::redis::RedisStore::from_url(&url)
            .await
            .unwrap()
            .with_prefix(prefix.clone());
        Some((Arc::new(SealedStore::new(redis, key_a())), (url, prefix)))
    }

    async fn delete_keys((url, prefix): (String, String)) {
        common::delete_prefix(&url, &prefix).await;
    }

    tower_idempotency::store_conformance_tests!(make, delete_keys);
}

// 2. Nothing of the response at rest, on every store; the replay is exact.

#[tokio::test]
async fn memory_holds_only_ciphertext() {
    let memory = Arc::new(MemoryStore::new());
    let counter = Counter::default();
    let app = app(SealedStore::new(memory.clone(), key_a()), &counter);
    let idem = idem_key();
    let first = first_request(&app, &counter, &idem).await;
    let outer = held(&*memory, &http_store_key(&idem)).await;
    assert_eq!(
        outer.kind(),
        RecordKind::Value,
        "an envelope, not a response"
    );
    assert_eq!(outer.body()[0], 1, "envelope version");
    assert_eq!(outer.body()[1..5], key_a().id().to_be_bytes());
    assert_no_marker(&outer.encode(), "the memory store");
    assert_replays(&app, &counter, &idem, &first).await;
}

#[tokio::test]
async fn message_output_replays_and_is_sealed() {
    let memory = Arc::new(MemoryStore::new());
    let consumer =
        IdempotentConsumer::new(SealedStore::new(memory.clone(), key_a())).with_codec(BytesCodec);
    let runs = Arc::new(AtomicUsize::new(0));
    let message = || MessageKey::new("billing", "msg-1", b"charge 42");
    let handle = |runs: Arc<AtomicUsize>| {
        move |_: Option<Attachment>| async move {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, BoxError>(Bytes::from(body()))
        }
    };
    let first = consumer
        .process(message(), handle(runs.clone()))
        .await
        .unwrap();
    assert!(matches!(&first, Processed::Ran(out) if out == body().as_bytes()));
    let again = consumer
        .process(message(), handle(runs.clone()))
        .await
        .unwrap();
    assert!(
        matches!(&again, Processed::Replayed(out) if out == body().as_bytes()),
        "{again:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    let outer = held(&*memory, message().store_key()).await;
    assert_eq!(outer.fingerprint(), message().fingerprint());
    assert_no_marker(&outer.encode(), "the memory store (message face)");

    // Under an unrelated key the message fails closed: not run again.
    let stranger = IdempotentConsumer::new(SealedStore::new(memory.clone(), unrelated_key()))
        .with_codec(BytesCodec);
    let refused = stranger
        .process(message(), handle(runs.clone()))
        .await
        .unwrap();
    assert!(
        matches!(refused, Processed::StoreError(StoreError::Corrupt(_))),
        "{refused:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_holds_only_ciphertext() {
    use tower_idempotency::store::redis::{RedisStore, driver};
    let Some(url) = common::backend(common::REDIS) else {
        return;
    };
    let prefix = format!("test:sealed:{}:", uuid::Uuid::new_v4().simple());
    let redis = RedisStore::from_url(&url)
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    let counter = Counter::default();
    let app = app(SealedStore::new(redis.clone(), key_a()), &counter);
    let idem = idem_key();
    let first = first_request(&app, &counter, &idem).await;

    let mut conn = driver::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys = common::scan(&mut conn, &prefix).await;
    assert_eq!(
        keys,
        vec![redis.redis_key(&http_store_key(&idem))],
        "one record, under the request's key"
    );
    for key in &keys {
        assert_no_marker(key.as_bytes(), "a Redis key");
        let value: Vec<u8> = driver::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(!value.is_empty());
        assert_no_marker(&value, "a Redis value");
    }
    assert_replays(&app, &counter, &idem, &first).await;
    common::delete_prefix(&url, &prefix).await;
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_holds_only_ciphertext() {
    use tower_idempotency::store::postgres::{PgPool, PostgresStore};
    let Some(url) = common::backend(common::POSTGRES) else {
        return;
    };
    let pool = PgPool::connect(&url).await.unwrap();
    let pg = PostgresStore::new(pool.clone())
        .with_schema("tower_idempotency_test")
        .unwrap()
        .with_table(&common::unique_table("t"))
        .unwrap();
    pg.migrate().await.unwrap();
    let counter = Counter::default();
    let app = app(SealedStore::new(pg.clone(), key_a()), &counter);
    let idem = idem_key();
    let first = first_request(&app, &counter, &idem).await;

    // Every column of every row: the byte columns as they are, and the
    // whole row as text (bytea printed as hex, the timestamps).
    let rows: Vec<SqlRow> = sqlx::query_as(&format!(
        "SELECT key, fingerprint, lock_token, record, t::text FROM {} t",
        pg.qualified_table()
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 1);
    let (key, fingerprint, token, record, text) = &rows[0];
    assert_eq!(key, http_store_key(&idem).as_bytes());
    assert!(record.is_some(), "the row is completed");
    for column in [
        Some(key),
        Some(fingerprint),
        token.as_ref(),
        record.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        assert_no_marker(column, "a PostgreSQL column");
    }
    assert_no_marker(text.as_bytes(), "a PostgreSQL row");
    assert_replays(&app, &counter, &idem, &first).await;
    sqlx::query(&format!("DROP TABLE {}", pg.qualified_table()))
        .execute(&pool)
        .await
        .unwrap();
}

#[cfg(feature = "mysql")]
#[tokio::test]
async fn mysql_holds_only_ciphertext() {
    use std::str::FromStr;
    use tower_idempotency::store::mysql::{MySqlPool, MySqlStore};
    let Some(url) = common::backend(common::MYSQL) else {
        return;
    };
    let options =
        sqlx::mysql::MySqlConnectOptions::from_str(&url.replacen("mariadb://", "mysql://", 1))
            .unwrap();
    let pool = MySqlPool::connect_with(options).await.unwrap();
    let my = MySqlStore::new(pool.clone())
        .with_table(&common::unique_table("tidem"))
        .unwrap();
    my.migrate().await.unwrap();
    let counter = Counter::default();
    let app = app(SealedStore::new(my.clone(), key_a()), &counter);
    let idem = idem_key();
    let first = first_request(&app, &counter, &idem).await;

    let rows: Vec<SqlRow> = sqlx::query_as(&format!(
        "SELECT `key`, fingerprint, lock_token, record, \
                CAST(CONCAT_WS('|', state, created_at, expires_at) AS CHAR) FROM {}",
        my.quoted_table()
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 1);
    let (key, fingerprint, token, record, rest) = &rows[0];
    assert_eq!(key, http_store_key(&idem).as_bytes());
    assert!(record.is_some(), "the row is completed");
    for column in [
        Some(key),
        Some(fingerprint),
        token.as_ref(),
        record.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        assert_no_marker(column, "a MySQL column");
    }
    assert_no_marker(rest.as_bytes(), "a MySQL row");
    assert_replays(&app, &counter, &idem, &first).await;
    sqlx::query(&format!("DROP TABLE {}", my.quoted_table()))
        .execute(&pool)
        .await
        .unwrap();
}

/// A SQLite database file under the temporary directory, removed with its
/// journal files when dropped.
#[cfg(feature = "sqlite")]
struct TempDb(std::path::PathBuf);

#[cfg(feature = "sqlite")]
impl TempDb {
    fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self(std::env::temp_dir().join(format!(
            "tower-idempotency-sealed-{}-{}.db",
            std::process::id(),
            &id[..12]
        )))
    }

    async fn store(&self) -> tower_idempotency::store::sqlite::SqliteStore {
        let store = tower_idempotency::store::sqlite::SqliteStore::open(&self.0)
            .await
            .unwrap();
        store.migrate().await.unwrap();
        store
    }
}

#[cfg(feature = "sqlite")]
impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let mut name = self.0.clone().into_os_string();
            name.push(suffix);
            let _ = std::fs::remove_file(name);
        }
    }
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn sqlite_holds_only_ciphertext() {
    let db = TempDb::new();
    let lite = db.store().await;
    let counter = Counter::default();
    let app = app(SealedStore::new(lite.clone(), key_a()), &counter);
    let idem = idem_key();
    let first = first_request(&app, &counter, &idem).await;

    // Every column, each cast to its bytes.
    let rows: Vec<SqliteRow> = sqlx::query_as(&format!(
        "SELECT CAST(key AS BLOB), CAST(fingerprint AS BLOB), CAST(state AS BLOB), \
                CAST(lock_token AS BLOB), CAST(record AS BLOB), CAST(created_at AS BLOB), \
                CAST(expires_at AS BLOB) FROM {}",
        lite.quoted_table()
    ))
    .fetch_all(lite.pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), 1);
    let (key, fingerprint, state, token, record, created, expires) = &rows[0];
    assert_eq!(key, http_store_key(&idem).as_bytes());
    assert!(record.is_some(), "the row is completed");
    for column in [
        Some(key),
        Some(fingerprint),
        Some(state),
        token.as_ref(),
        record.as_ref(),
        Some(created),
        Some(expires),
    ]
    .into_iter()
    .flatten()
    {
        assert_no_marker(column, "a SQLite column");
    }
    // And the file itself, write-ahead log included.
    lite.pool().close().await;
    for suffix in ["", "-wal"] {
        let mut name = db.0.clone().into_os_string();
        name.push(suffix);
        if let Ok(bytes) = std::fs::read(&name) {
            assert_no_marker(&bytes, "the SQLite file");
        }
    }
    let app = self::app(SealedStore::new(db.store().await, key_a()), &counter);
    assert_replays(&app, &counter, &idem, &first).await;
}

// 3. Rotation.

#[tokio::test]
async fn rotation_opens_previous_keys_and_seals_under_the_current_one() {
    let memory = Arc::new(MemoryStore::new());
    let counter = Counter::default();
    let only_a = app(SealedStore::new(memory.clone(), key_a()), &counter);
    let rotated = app(
        SealedStore::new(memory.clone(), key_b()).with_previous_key(key_a()),
        &counter,
    );
    let only_b = app(SealedStore::new(memory.clone(), key_b()), &counter);

    // Sealed under A, replayed by a store on B that still knows A.
    let old = idem_key();
    let first_old = first_request(&only_a, &counter, &old).await;
    assert_replays(&rotated, &counter, &old, &first_old).await;

    // A new record is sealed under B...
    let new = idem_key();
    let first_new = first_request(&rotated, &counter, &new).await;
    let outer = held(&*memory, &http_store_key(&new)).await;
    assert_eq!(outer.body()[1..5], key_b().id().to_be_bytes());
    // ...so B alone opens it and A alone does not.
    assert_replays(&only_b, &counter, &new, &first_new).await;
    assert_fails_closed(&only_a, &counter, &new).await;
    // Once A is dropped, its records no longer open.
    assert_fails_closed(&only_b, &counter, &old).await;
    assert_eq!(counter.get(), 2, "each request ran once");
}

// 4. Tampering.

#[tokio::test]
async fn a_tampered_envelope_fails_closed_in_memory() {
    let memory = Arc::new(MemoryStore::new());
    let counter = Counter::default();
    let idem = idem_key();
    let key = http_store_key(&idem);
    let first = first_request(
        &app(SealedStore::new(memory.clone(), key_a()), &counter),
        &counter,
        &idem,
    )
    .await;
    let outer = held(&*memory, &key).await;

    // The untouched copy, planted in another store, replays: the copying
    // itself changes nothing.
    let copy = Arc::new(MemoryStore::new());
    plant(&*copy, &key, &outer).await;
    let copy_app = app(SealedStore::new(copy, key_a()), &counter);
    assert_replays(&copy_app, &counter, &idem, &first).await;

    // One flipped byte anywhere (key id, nonce, ciphertext, tag) fails
    // closed, fail-open policy or not.
    let len = outer.body().len();
    for at in [1, 5, 17, len / 2, len - 1] {
        let tampered = Arc::new(MemoryStore::new());
        plant(&*tampered, &key, &flipped(&outer, at)).await;
        let sealed = SealedStore::new(tampered.clone(), key_a());
        assert_fails_closed(&app(sealed, &counter), &counter, &idem).await;
        let sealed = SealedStore::new(tampered, key_a());
        assert_fails_closed(&fail_open_app(sealed, &counter), &counter, &idem).await;
    }
    // A truncated envelope, and a plaintext record, too.
    for bad in [
        Record::value(*outer.fingerprint(), outer.body().slice(..20)),
        Record::value(*outer.fingerprint(), outer.body().slice(..len - 1)),
        Record::response(
            *outer.fingerprint(),
            StatusCode::CREATED,
            vec![],
            Bytes::from(body()),
        ),
    ] {
        let store = Arc::new(MemoryStore::new());
        plant(&*store, &key, &bad).await;
        let sealed = SealedStore::new(store, key_a());
        assert_fails_closed(&fail_open_app(sealed, &counter), &counter, &idem).await;
    }
    assert_eq!(counter.get(), 1);
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn a_tampered_envelope_fails_closed_in_sqlite() {
    let db = TempDb::new();
    let lite = db.store().await;
    let counter = Counter::default();
    let app = app(SealedStore::new(lite.clone(), key_a()), &counter);
    let fail_open = fail_open_app(SealedStore::new(lite.clone(), key_a()), &counter);
    let idem = idem_key();
    first_request(&app, &counter, &idem).await;

    let select = format!("SELECT record FROM {} WHERE key = ?", lite.quoted_table());
    let key = http_store_key(&idem);
    let stored: Vec<u8> = sqlx::query_scalar(&select)
        .bind(key.as_bytes().as_slice())
        .fetch_one(lite.pool())
        .await
        .unwrap();
    let outer = Record::decode(&stored).unwrap();
    // The envelope's middle byte flipped, and the outer record re-encoded
    // with a valid checksum: only the seal can notice.
    let at = outer.body().len() / 2;
    let tampered = flipped(&outer, at).encode();
    let update = format!(
        "UPDATE {} SET record = ? WHERE key = ?",
        lite.quoted_table()
    );
    let changed = sqlx::query(&update)
        .bind(tampered.as_ref())
        .bind(key.as_bytes().as_slice())
        .execute(lite.pool())
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(changed, 1);

    assert_fails_closed(&app, &counter, &idem).await;
    assert_fails_closed(&fail_open, &counter, &idem).await;
    assert_eq!(counter.get(), 1);
}

// 5. A record moved to another key.

#[tokio::test]
async fn a_record_moved_to_another_key_does_not_open() {
    let memory = Arc::new(MemoryStore::new());
    let counter = Counter::default();
    let app = app(SealedStore::new(memory.clone(), key_a()), &counter);
    let from = idem_key();
    first_request(&app, &counter, &from).await;
    let outer = held(&*memory, &http_store_key(&from)).await;

    let to = idem_key();
    plant(&*memory, &http_store_key(&to), &outer).await;
    assert_fails_closed(&app, &counter, &to).await;
    let fail_open = fail_open_app(SealedStore::new(memory.clone(), key_a()), &counter);
    assert_fails_closed(&fail_open, &counter, &to).await;
    assert_eq!(counter.get(), 1);
}

// 6. A wrong key.

/// Log lines, as a `MakeWriter`.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_wrong_key_fails_closed_and_logs_no_secret() {
    let memory = Arc::new(MemoryStore::new());
    let counter = Counter::default();
    let idem = idem_key();
    let right = app(SealedStore::new(memory.clone(), key_a()), &counter);
    let first = first_request(&right, &counter, &idem).await;

    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    let wrong = app(SealedStore::new(memory.clone(), unrelated_key()), &counter);
    assert_fails_closed(&wrong, &counter, &idem).await;
    let fail_open = fail_open_app(SealedStore::new(memory.clone(), unrelated_key()), &counter);
    assert_fails_closed(&fail_open, &counter, &idem).await;
    drop(guard);

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let prefix = http_store_key(&idem).to_string();
    assert!(logs.contains(&prefix), "the key's hash prefix: {logs}");
    assert!(
        logs.contains(&format!("{:08x}", key_a().id())),
        "which key sealed it: {logs}"
    );
    assert!(!logs.contains(&idem), "the raw key leaked: {logs}");
    for secret in [
        "0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff0".to_owned(),
        hex(&[0x5C; 32]),
        hex(&[0x5C; 8]),
    ] {
        assert!(
            !logs.contains(&secret),
            "record key material leaked: {logs}"
        );
    }
    assert!(!logs.contains(MARKER), "the response leaked: {logs}");

    // The right key still replays: nothing was overwritten.
    assert_replays(&right, &counter, &idem, &first).await;
    assert_eq!(counter.get(), 1);
}

// Migration: opt-in plaintext fallback.

#[tokio::test]
async fn plaintext_fallback_replays_records_from_before_sealing() {
    let memory = Arc::new(MemoryStore::new());
    let counter = Counter::default();
    let idem = idem_key();
    let plain = app(memory.clone(), &counter);
    let first = first_request(&plain, &counter, &idem).await;

    let strict = app(SealedStore::new(memory.clone(), key_a()), &counter);
    assert_fails_closed(&strict, &counter, &idem).await;
    let migrating = app(
        SealedStore::new(memory.clone(), key_a()).with_plaintext_fallback(true),
        &counter,
    );
    assert_replays(&migrating, &counter, &idem, &first).await;
    // New records are still sealed, and a wrong key still fails closed.
    let new = idem_key();
    first_request(&migrating, &counter, &new).await;
    assert_no_marker(
        &held(&*memory, &http_store_key(&new)).await.encode(),
        "the memory store",
    );
    let wrong = app(
        SealedStore::new(memory.clone(), unrelated_key()).with_plaintext_fallback(true),
        &counter,
    );
    assert_fails_closed(&wrong, &counter, &new).await;
    assert_eq!(counter.get(), 2);
}

// 7. Record keys.

#[test]
fn record_keys_parse_strictly() {
    let good = "0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff0";
    let key = RecordKey::from_hex(good).unwrap();
    assert_eq!(key.id(), key_a().id());
    assert_eq!(
        RecordKey::from_hex(&good.to_uppercase()).unwrap().id(),
        key.id(),
        "either case"
    );
    let parsed: RecordKey = good.parse().unwrap();
    assert_eq!(parsed.id(), key.id());
    assert_ne!(key.id(), key_b().id());

    assert_eq!(
        RecordKey::from_hex(&good[..62]).unwrap_err(),
        InvalidRecordKey::Length(62)
    );
    assert_eq!(
        RecordKey::from_hex(&format!("{good}\n")).unwrap_err(),
        InvalidRecordKey::Length(65)
    );
    assert_eq!(
        RecordKey::from_hex("").unwrap_err(),
        InvalidRecordKey::Length(0)
    );
    let mut not_hex = good.to_owned();
    not_hex.replace_range(10..11, "g");
    let err = RecordKey::from_hex(&not_hex).unwrap_err();
    assert_eq!(err, InvalidRecordKey::NotHex(10));
    let message = err.to_string();
    assert!(message.contains("position 10"), "{message}");
    assert!(!message.contains(&good[..8]), "the input is not repeated");
    // 64 characters, one of them two bytes long.
    let wide = format!("é{}", &good[1..]);
    assert_eq!(
        RecordKey::from_hex(&wide).unwrap_err(),
        InvalidRecordKey::NotHex(0)
    );
    assert!(
        RecordKey::from_hex("0x0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddee")
            .is_err()
    );
}

#[test]
fn debug_prints_only_the_key_id() {
    let key = RecordKey::from_bytes([0xAB; 32]);
    let printed = format!("{key:?} {key:#?}");
    assert!(printed.contains(&format!("{:08x}", key.id())), "{printed}");
    for material in ["abab", "ABAB", "171, 171", "0xab"] {
        assert!(!printed.contains(material), "key material in {printed}");
    }
    let store = SealedStore::new(MemoryStore::new(), key).with_previous_key(key_a());
    let printed = format!("{store:?}");
    assert!(
        printed.contains(&format!("{:08x}", key_a().id())),
        "{printed}"
    );
    assert!(
        !printed.contains("abab") && !printed.contains("0f1e2d3c"),
        "{printed}"
    );
    assert_eq!(store.key_id(), RecordKey::from_bytes([0xAB; 32]).id());
}
