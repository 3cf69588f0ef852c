//! `DynamoDbStore` against a DynamoDB-compatible server (moto in server
//! mode, from `scripts/dynamodb-emulator.sh`): the conformance suite, two
//! layer instances sharing one table, the requests each step costs, lease
//! takeover, records at the item limit, an outage and recovery, a frozen
//! server and an unanswered `begin`, and the item layout.
//!
//! The server comes from `AWS_ENDPOINT_URL`, or else
//! `http://127.0.0.1:8000`. Some tests start a private `moto_server` of
//! their own (from `target/tools/moto`, or `DYNAMODB_EMULATOR_BIN`). If
//! neither can be had the tests are skipped, unless `CI=true`, where they
//! fail.

#![cfg(all(feature = "dynamodb", feature = "test-util", feature = "axum"))]
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_dynamodb::config::{
    BehaviorVersion, ConfigBag, Credentials, Intercept, Region, RuntimeComponents,
};
use aws_sdk_dynamodb::error::BoxError;
use aws_sdk_dynamodb::types::{AttributeValue, TimeToLiveStatus};
use axum::Router;
use axum::body::Body;
use axum::http::StatusCode;
use common::proxy::Proxy;
use common::{Counter, call_post, post_req, problem, send};
use tower_idempotency::store::dynamodb::{Client, DynamoDbStore, RecordTooLarge};
use tower_idempotency::test_util::{random_key, sample_record};
use tower_idempotency::{
    IdempotencyLayer,
    fingerprint::Fingerprint,
    store::{Begin, LockToken, Store, StoreError},
};

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);
/// moto's item limit (DynamoDB's is 409,600).
const MOTO_ITEM_LIMIT: usize = 405_000;

fn fp(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

/// The endpoint of the shared server, or `None` (after one line saying
/// so) when nothing answers there outside CI. Under `CI=true` a missing
/// server fails the test.
fn endpoint() -> Option<String> {
    common::backend(common::DYNAMODB)
}

/// A client on `endpoint`, with dummy credentials, plain HTTP, and
/// `interceptor` if any. One per test: a client's connections belong to
/// the runtime that opened them.
fn client_with(endpoint: &str, interceptor: Option<Wire>) -> Client {
    let mut config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "AKIDTESTONLY",
            "secret-test-only",
            None,
            None,
            "tests",
        ))
        .endpoint_url(endpoint)
        .http_client(aws_smithy_http_client::Builder::new().build_http());
    if let Some(wire) = interceptor {
        config = config.interceptor(wire);
    }
    Client::from_conf(config.build())
}

fn client(endpoint: &str) -> Client {
    client_with(endpoint, None)
}

/// The table every test of this binary shares; each store has a prefix of
/// its own.
fn table() -> &'static str {
    static TABLE: OnceLock<String> = OnceLock::new();
    TABLE.get_or_init(|| common::unique_table("idempotency"))
}

fn unique_prefix() -> String {
    format!("test:{}:", uuid::Uuid::new_v4().simple())
}

/// A store on the shared server and table (created if missing), with a
/// prefix of its own and moto's item limit.
async fn store_on(client: Client) -> DynamoDbStore {
    let store = DynamoDbStore::new(client, table())
        .with_prefix(unique_prefix())
        .with_max_item_size(MOTO_ITEM_LIMIT);
    store.create_table().await.unwrap();
    store
}

/// For the conformance suite. The emulator answers in Python, one
/// request at a time: on a loaded machine its 64 concurrent `begin`s can
/// take longer than the default 1 s bound, which would measure the
/// emulator, not the store.
async fn store() -> Option<Arc<dyn Store>> {
    let endpoint = endpoint()?;
    let store = store_on(client(&endpoint)).await;
    Some(Arc::new(store.with_timeout(Duration::from_secs(5))))
}

mod conformance {
    // The large-record check sizes its record by the store's declared
    // item limit.
    tower_idempotency::store_conformance_tests!(super::store);
}

async fn acquire(
    store: &DynamoDbStore,
    key: &tower_idempotency::store::StoreKey,
    lease: Duration,
) -> LockToken {
    match store.begin(key, &fp(1), lease).await.unwrap() {
        Begin::Acquired(token) => token,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

/// The item of `key`, read straight from the table.
async fn item(
    store: &DynamoDbStore,
    key: &tower_idempotency::store::StoreKey,
) -> Option<HashMap<String, AttributeValue>> {
    store
        .client()
        .get_item()
        .table_name(store.table())
        .key("pk", AttributeValue::S(store.partition_key(key)))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item
}

fn bytes_of(item: &HashMap<String, AttributeValue>, name: &str) -> Vec<u8> {
    item[name].as_b().unwrap().as_ref().to_vec()
}

fn number_of(item: &HashMap<String, AttributeValue>, name: &str) -> u64 {
    item[name].as_n().unwrap().parse().unwrap()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

// The item limit.

/// The record that fills an item to the declared limit round-trips byte
/// for byte (so the declared limit is one the server accepts); one byte
/// more is refused before anything is sent, and the lock stays.
#[tokio::test]
async fn record_at_the_item_limit_round_trips() {
    let Some(endpoint) = endpoint() else { return };
    let store = store_on(client(&endpoint)).await;
    let limit = store.max_record_size();
    assert_eq!(
        store.capabilities().max_record_size(),
        Some(limit),
        "declared in the capabilities"
    );
    let overhead = sample_record(fp(9), 0).encode().len();

    let key = random_key();
    let token = acquire(&store, &key, LEASE).await;
    let record = sample_record(fp(9), limit - overhead);
    assert_eq!(record.encode().len(), limit);
    assert!(store.complete(&key, &token, &record, TTL).await.unwrap());
    match store.begin(&key, &fp(9), LEASE).await.unwrap() {
        Begin::Completed(replay) => assert!(replay == record, "differs after the round trip"),
        other => panic!("{other:?}"),
    }

    let key = random_key();
    let token = acquire(&store, &key, LEASE).await;
    let record = sample_record(fp(9), limit - overhead + 1);
    match store.complete(&key, &token, &record, TTL).await {
        Err(StoreError::Backend(e)) => {
            let e = e.downcast_ref::<RecordTooLarge>().unwrap();
            assert_eq!((e.size(), e.limit()), (limit + 1, limit));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        store.begin(&key, &fp(9), LEASE).await.unwrap(),
        Begin::InFlight { .. }
    ));
    assert!(store.release(&key, &token).await.unwrap());
}

/// Every item under the store's prefix.
async fn items_under(store: &DynamoDbStore) -> Vec<HashMap<String, AttributeValue>> {
    let mut items = Vec::new();
    let mut start = None;
    loop {
        let out = store
            .client()
            .scan()
            .table_name(store.table())
            .filter_expression("begins_with(pk, :prefix)")
            .expression_attribute_values(":prefix", AttributeValue::S(store.prefix().to_owned()))
            .set_exclusive_start_key(start)
            .consistent_read(true)
            .send()
            .await
            .unwrap();
        items.extend(out.items.unwrap_or_default());
        start = out.last_evaluated_key;
        if start.is_none() {
            return items;
        }
    }
}

/// The one item under the store's prefix.
async fn only_item(store: &DynamoDbStore) -> HashMap<String, AttributeValue> {
    let mut items = items_under(store).await;
    assert_eq!(items.len(), 1, "one item per idempotency key");
    items.remove(0)
}

/// Through the layer: a response whose record just fits replays; one byte
/// more and the client still gets its response, retries get a 410, and
/// neither request runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_just_under_and_just_over_the_item_limit() {
    let Some(endpoint) = endpoint() else { return };
    let counter = Counter::default();
    let mut apps = Vec::new();
    for _ in 0..3 {
        let store = store_on(client(&endpoint)).await;
        let app = common::router(counter.clone()).layer(IdempotencyLayer::new(store.clone()));
        apps.push((store, app));
    }
    let req = |size: usize| {
        post_req(Some("sized"))
            .header("x-size", size.to_string())
            .body(Body::from("{}"))
            .unwrap()
    };

    // What the record adds around the body, from a small one.
    let (store, app) = &apps[0];
    let (status, _, _) = send(app, req(1000)).await;
    assert_eq!(status, StatusCode::CREATED);
    let overhead = bytes_of(&only_item(store).await, "record").len() - 1000;
    let fits = store.max_record_size() - overhead;

    let (store, app) = &apps[1];
    let (status, _, body) = send(app, req(fits)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body.len(), fits);
    let stored = only_item(store).await;
    assert_eq!(bytes_of(&stored, "record").len(), store.max_record_size());
    let (status, headers, replay) = send(app, req(fits)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert!(replay == body);
    assert_eq!(counter.get(), 2);

    let (store, app) = &apps[2];
    let (status, _, body) = send(app, req(fits + 1)).await;
    assert_eq!(status, StatusCode::CREATED, "the client gets its response");
    assert_eq!(body.len(), fits + 1);
    for _ in 0..2 {
        let (status, headers, body) = send(app, req(fits + 1)).await;
        assert_eq!(status, StatusCode::GONE);
        problem(status, &headers, &body);
    }
    let tombstone = only_item(store).await;
    assert!(bytes_of(&tombstone, "record").len() < 1000);
    assert_eq!(counter.get(), 3, "no request ran twice");
}

// Two layer instances, one table.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_layers_hundred_duplicates_one_execution() {
    let Some(endpoint) = endpoint() else { return };
    let prefix = unique_prefix();
    let counter = Counter::default();
    let mut apps = Vec::new();
    for _ in 0..2 {
        let store = DynamoDbStore::new(client(&endpoint), table()).with_prefix(prefix.clone());
        store.create_table().await.unwrap();
        apps.push(common::router(counter.clone()).layer(IdempotencyLayer::new(store)));
    }
    let apps: [Router; 2] = [apps[0].clone(), apps[1].clone()];
    common::scenarios::hundred_duplicates_on_two_instances(apps, &counter).await;
}

// Requests per step.

/// Records the DynamoDB operation of every HTTP request the client
/// transmits (SDK retries included).
#[derive(Debug, Clone, Default)]
struct Wire(Arc<Mutex<Vec<String>>>);

impl Wire {
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    fn since(&self, start: usize) -> Vec<String> {
        self.0.lock().unwrap()[start..].to_vec()
    }
}

impl Intercept for Wire {
    fn name(&self) -> &'static str {
        "Wire"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let target = context
            .request()
            .headers()
            .get("x-amz-target")
            .unwrap_or("?");
        let op = target.rsplit('.').next().unwrap_or(target).to_owned();
        self.0.lock().unwrap().push(op);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_step() {
    let Some(endpoint) = endpoint() else { return };
    let wire = Wire::default();
    let store = store_on(client_with(&endpoint, Some(wire.clone()))).await;
    let counter = Counter::default();
    let app = common::router(counter.clone()).layer(IdempotencyLayer::new(store));

    macro_rules! measure {
        ($what:literal, $expected:expr, $run:expr) => {{
            let start = wire.len();
            let out = $run;
            let got = wire.since(start);
            eprintln!("{}: {:?}", $what, got);
            assert_eq!(got, $expected, "{}", $what);
            out
        }};
    }

    let (status, _, _) = measure!(
        "first execution",
        ["PutItem", "UpdateItem"],
        call_post(&app, Some("rt-1"), "{}").await
    );
    assert_eq!(status, StatusCode::CREATED);

    let (status, headers, _) = measure!(
        "replay",
        ["PutItem"],
        call_post(&app, Some("rt-1"), "{}").await
    );
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");

    let (status, _, _) = measure!(
        "fingerprint mismatch",
        ["PutItem"],
        call_post(&app, Some("rt-1"), r#"{"other":true}"#).await
    );
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    let holder = {
        let app = app.clone();
        tokio::spawn(async move {
            let req = post_req(Some("rt-2"))
                .header("x-delay-ms", "600")
                .body(Body::from("{}"))
                .unwrap();
            send(&app, req).await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _, _) = measure!(
        "conflict",
        ["PutItem"],
        call_post(&app, Some("rt-2"), "{}").await
    );
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(holder.await.unwrap().0, StatusCode::CREATED);

    let (status, _, _) = measure!(
        "not recorded",
        ["PutItem", "DeleteItem"],
        send(
            &app,
            post_req(Some("rt-3"))
                .header("x-status", "500")
                .body(Body::from("{}"))
                .unwrap()
        )
        .await
    );
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(counter.get(), 3);
}

// Leases.

/// A lock whose lease lapsed is taken over; the lapsed holder can then
/// neither complete, extend nor release, and the item is the new holder's.
#[tokio::test]
async fn a_lapsed_lease_is_taken_over_and_its_holder_fenced() {
    let Some(endpoint) = endpoint() else { return };
    let store = store_on(client(&endpoint)).await;
    let key = random_key();
    let first = acquire(&store, &key, Duration::from_millis(200)).await;
    assert!(matches!(
        store.begin(&key, &fp(2), LEASE).await.unwrap(),
        Begin::InFlight { fingerprint } if fingerprint == Some(fp(1))
    ));
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Still in the table (TTL deletes lazily), but expired: taken over.
    assert!(item(&store, &key).await.is_some());
    let second = match store.begin(&key, &fp(2), LEASE).await.unwrap() {
        Begin::Acquired(token) => token,
        other => panic!("{other:?}"),
    };
    let stale = sample_record(fp(1), 8);
    assert!(!store.complete(&key, &first, &stale, TTL).await.unwrap());
    assert!(!store.extend(&key, &first, LEASE).await.unwrap());
    assert!(!store.release(&key, &first).await.unwrap());
    let held = item(&store, &key).await.unwrap();
    assert_eq!(bytes_of(&held, "token"), second.to_bytes());
    assert_eq!(bytes_of(&held, "fingerprint"), [2u8; 32]);
    assert!(!held.contains_key("record"));

    // A clock-skew margin delays the takeover by that much.
    let careful = DynamoDbStore::new(store.client().clone(), table())
        .with_prefix(store.prefix())
        .with_clock_skew_margin(Duration::from_millis(800));
    let key = random_key();
    acquire(&careful, &key, Duration::from_millis(100)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        careful.begin(&key, &fp(3), LEASE).await.unwrap(),
        Begin::InFlight { .. }
    ));
    assert!(matches!(
        store.begin(&key, &fp(3), LEASE).await.unwrap(),
        Begin::Acquired(_)
    ));
}

/// `wait` returns once the holder completes, well before its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_returns_when_the_holder_completes() {
    let Some(endpoint) = endpoint() else { return };
    let store = store_on(client(&endpoint)).await;
    let key = random_key();
    let token = acquire(&store, &key, LEASE).await;
    let holder = {
        let store = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let record = sample_record(fp(1), 16);
            assert!(store.complete(&key, &token, &record, TTL).await.unwrap());
        })
    };
    let started = Instant::now();
    store.wait(&key, Duration::from_secs(10)).await.unwrap();
    let waited = started.elapsed();
    holder.await.unwrap();
    assert!(waited < Duration::from_secs(5), "waited {waited:?}");
    assert!(matches!(
        store.begin(&key, &fp(1), LEASE).await.unwrap(),
        Begin::Completed(_)
    ));
}

// Layout.

/// The table has `pk` as its key and TTL on `expires_at`; `create_table`
/// is idempotent; every item is keyed by the prefix and the hex of the
/// store key, with the documented attributes, and the client's raw key
/// appears in no item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_are_as_documented_and_carry_no_raw_key() {
    let Some(endpoint) = endpoint() else { return };
    let store = store_on(client(&endpoint)).await;
    store.create_table().await.unwrap();
    let ttl = store
        .client()
        .describe_time_to_live()
        .table_name(store.table())
        .send()
        .await
        .unwrap();
    let ttl = ttl.time_to_live_description().unwrap();
    assert_eq!(ttl.attribute_name(), Some("expires_at"));
    assert!(matches!(
        ttl.time_to_live_status(),
        Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling)
    ));

    // The layout of an in-flight and a completed item.
    let key = random_key();
    let lease = Duration::from_secs(20);
    let before = now_ms();
    let token = acquire(&store, &key, lease).await;
    let held = item(&store, &key).await.unwrap();
    let pk = held["pk"].as_s().unwrap();
    assert_eq!(*pk, format!("{}{}", store.prefix(), key.to_hex()));
    assert_eq!(bytes_of(&held, "token"), token.to_bytes());
    assert_eq!(bytes_of(&held, "fingerprint"), [1u8; 32]);
    let end = number_of(&held, "expires_at_ms");
    assert!(
        (before + 20_000..=now_ms() + 20_000).contains(&end),
        "{end}"
    );
    assert_eq!(number_of(&held, "expires_at"), end.div_ceil(1000));
    let record = sample_record(fp(1), 100);
    assert!(
        store
            .complete(&key, &token, &record, Duration::from_secs(600))
            .await
            .unwrap()
    );
    let done = item(&store, &key).await.unwrap();
    assert_eq!(
        tower_idempotency::record::Record::decode(&bytes_of(&done, "record")).unwrap(),
        record
    );
    let end = number_of(&done, "expires_at_ms");
    assert!(end >= before + 600_000 && end <= now_ms() + 600_000);

    // The raw key, through the layer: in no attribute of any item.
    let app = common::router(Counter::default()).layer(IdempotencyLayer::new(store.clone()));
    let raw = "raw-client-key-7f3a9c";
    for body in ["{}", "{}", r#"{"x":1}"#] {
        call_post(&app, Some(raw), body).await;
    }
    let items = items_under(&store).await;
    assert_eq!(items.len(), 2);
    for item in &items {
        for (name, value) in item {
            let bytes: Vec<u8> = match value {
                AttributeValue::S(s) | AttributeValue::N(s) => s.clone().into_bytes(),
                AttributeValue::B(b) => b.as_ref().to_vec(),
                other => panic!("{name}: unexpected {other:?}"),
            };
            assert!(
                !bytes.windows(raw.len()).any(|w| w == raw.as_bytes()),
                "the raw key is in {name}"
            );
        }
        let pk = item["pk"].as_s().unwrap();
        let hex = pk.strip_prefix(store.prefix()).unwrap();
        assert_eq!(hex.len(), 64);
        assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    let shown = format!("{store:?}");
    assert!(shown.contains(store.table()), "{shown}");
    assert!(
        !shown.contains("AKIDTESTONLY") && !shown.contains("secret-test-only"),
        "no credentials: {shown}"
    );
}

// Outages.

/// The server behind a proxy that stops: every request is a 503 with
/// `Retry-After` within the bound; the proxy starts again and the same
/// store recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_answers_503_in_bound_then_recovers() {
    let Some(endpoint) = endpoint() else { return };
    let upstream: SocketAddr = endpoint
        .strip_prefix("http://")
        .unwrap()
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let proxy = Proxy::start((Ipv4Addr::LOCALHOST, 0).into(), upstream, None).await;
    let through = format!("http://{}", proxy.addr);
    let store = DynamoDbStore::new(client(&through), table())
        .with_prefix(unique_prefix())
        .with_timeout(Duration::from_millis(500));
    store.create_table().await.unwrap();
    let counter = Counter::default();
    let app = common::router(counter.clone()).layer(IdempotencyLayer::new(store));
    let proxy =
        common::scenarios::outage_answers_503_in_bound_and_recovers(&app, &counter, proxy).await;
    drop(proxy);
}

/// A `moto_server` of the test's own on a spare port, killed on drop.
struct Moto {
    port: u16,
    child: Child,
}

impl Moto {
    fn bin() -> PathBuf {
        std::env::var_os("DYNAMODB_EMULATOR_BIN").map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/tools/moto/bin/moto_server"),
            PathBuf::from,
        )
    }

    /// Starts one, or returns `None` (after saying why) when the emulator
    /// is not installed and CI is not set.
    fn start() -> Option<Self> {
        let bin = Self::bin();
        if !bin.exists() {
            assert!(
                !common::in_ci(),
                "{} is missing, and CI=true: run scripts/dynamodb-emulator.sh install",
                bin.display()
            );
            eprintln!(
                "[backends] dynamodb: private moto_server SKIPPED: {} is missing",
                bin.display()
            );
            return None;
        }
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut moto = Self { port, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            assert!(
                moto.child.try_wait().unwrap().is_none(),
                "moto_server exited"
            );
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(moto)
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A frozen server: calls fail typed within the bound, a request through
/// the layer is a 503 within it; the `begin` whose answer never came does
/// not strand its lock once the server thaws; the same store serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_times_out_in_bound_and_strands_no_lock() {
    let Some(moto) = Moto::start() else { return };
    // The table is made without the tight bound (a loaded machine may take
    // longer than 400 ms to create it).
    DynamoDbStore::new(client(&moto.endpoint()), "frozen")
        .with_timeout(Duration::from_secs(10))
        .create_table()
        .await
        .unwrap();
    let store = DynamoDbStore::new(client(&moto.endpoint()), "frozen")
        .with_timeout(Duration::from_millis(400));
    let counter = Counter::default();
    let app = common::router(counter.clone()).layer(IdempotencyLayer::new(store.clone()));
    let (status, _, _) = call_post(&app, Some("before"), "{}").await;
    assert_eq!(status, StatusCode::CREATED);

    moto.signal("-STOP");
    let key = random_key();
    let started = Instant::now();
    let err = store.begin(&key, &fp(1), LEASE).await.unwrap_err();
    assert!(matches!(err, StoreError::Timeout(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_millis(1000));
    let started = Instant::now();
    let (status, headers, body) = call_post(&app, Some("during"), "{}").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    problem(status, &headers, &body);
    assert!(headers.contains_key("retry-after"));
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(counter.get(), 1);

    // The frozen PutItems run now, under tokens nobody holds.
    moto.signal("-CONT");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match store.begin(&key, &fp(1), LEASE).await {
            Ok(Begin::Acquired(_)) => break,
            Ok(Begin::InFlight { .. }) | Err(_) => {
                assert!(
                    Instant::now() < deadline,
                    "the unanswered begin's lock was never released"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(other) => panic!("unexpected {other:?}"),
        }
    }
    let (status, headers, _) = call_post(&app, Some("before"), "{}").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    // The layer's unanswered begin is released too: "during" runs, once.
    loop {
        let (status, headers, body) = call_post(&app, Some("during"), "{}").await;
        match status {
            StatusCode::CREATED => {
                assert!(headers.get("idempotent-replayed").is_none());
                break;
            }
            StatusCode::CONFLICT => {
                problem(status, &headers, &body);
                assert!(
                    Instant::now() < deadline,
                    "the layer's lock was never released"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("unexpected {other}: {body:?}"),
        }
    }
    assert_eq!(counter.get(), 2);
}

/// A table that does not exist: a typed backend error, not a hang.
#[tokio::test]
async fn a_missing_table_is_a_backend_error() {
    let Some(endpoint) = endpoint() else { return };
    let store = DynamoDbStore::new(client(&endpoint), "no_such_table_here");
    let err = store.begin(&random_key(), &fp(1), LEASE).await.unwrap_err();
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
}
