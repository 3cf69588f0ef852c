//! Soak: two server instances sharing one store backend, many clients with
//! unique keys, retried keys and duplicate storms, injected handler panics,
//! and a store outage in the middle. At the end the handler's own ledger is
//! checked: no key with a recorded answer ran twice, no replay differs from
//! its original, nothing panicked but the injected panics.
//!
//! Bounded and loopback only. CI runs a short version; the full one:
//!
//! ```text
//! SOAK_SECS=60 REDIS_URL=redis://127.0.0.1:6379 \
//!   DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//!   cargo test --release --all-features --test soak -- --nocapture
//! ```

#![cfg(all(feature = "redis", feature = "postgres"))]
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tower_idempotency::{IdempotencyLayer, store::Store};

const INJECTED: &str = "injected handler panic";

/// What the handler did, per key: executions that returned an answer.
#[derive(Default)]
struct Ledger {
    executions: Mutex<HashMap<String, u32>>,
    panicked: Mutex<HashMap<String, u32>>,
    next: AtomicU64,
}

async fn handler(
    State(ledger): State<Arc<Ledger>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let key = headers["idempotency-key"].to_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(
        2 + ledger.next.load(Ordering::Relaxed) % 8,
    ))
    .await;
    // Some keys panic on their first execution.
    if key.ends_with("-p") {
        let mut panicked = ledger.panicked.lock().unwrap();
        let n = panicked.entry(key.clone()).or_default();
        if *n == 0 {
            *n += 1;
            drop(panicked);
            panic!("{INJECTED}");
        }
    }
    let exec = ledger.next.fetch_add(1, Ordering::SeqCst);
    *ledger
        .executions
        .lock()
        .unwrap()
        .entry(key.clone())
        .or_default() += 1;
    (
        StatusCode::CREATED,
        format!(
            "{{\"key\":\"{key}\",\"execution\":{exec},\"body\":{}}}",
            body.len()
        ),
    )
}

/// A TCP proxy in front of the store backend that can be cut (an outage)
/// and restored.
struct Proxy {
    addr: SocketAddr,
    broken: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let broken = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (b, c) = (broken.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if b.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                c.lock().unwrap().push(task);
            }
        });
        Self {
            addr,
            broken,
            conns,
            accept,
        }
    }

    fn cut(&self) {
        self.broken.store(true, Ordering::SeqCst);
        for task in self.conns.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    fn restore(&self) {
        self.broken.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

#[derive(Default)]
struct Tally {
    requests: AtomicUsize,
    created: AtomicUsize,
    replayed: AtomicUsize,
    conflicts: AtomicUsize,
    unavailable: AtomicUsize,
    server_errors: AtomicUsize,
    other: AtomicUsize,
    gave_up: AtomicUsize,
    /// The first 201 body each key got, and whether a later one differed.
    answers: Mutex<HashMap<String, Bytes>>,
    differing: AtomicUsize,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn send(
    client: &HttpClient,
    addr: SocketAddr,
    key: &str,
    tally: &Tally,
) -> Option<StatusCode> {
    tally.requests.fetch_add(1, Ordering::Relaxed);
    let req = http::Request::post(format!("http://{addr}/orders"))
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            b"{\"item\":\"soak\",\"qty\":1}",
        )))
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .ok()?
        .ok()?;
    let status = res.status();
    let replayed = res.headers().contains_key("idempotent-replayed");
    let body = res.into_body().collect().await.ok()?.to_bytes();
    match status {
        StatusCode::CREATED => {
            if replayed {
                tally.replayed.fetch_add(1, Ordering::Relaxed);
            } else {
                tally.created.fetch_add(1, Ordering::Relaxed);
            }
            let mut answers = tally.answers.lock().unwrap();
            match answers.get(key) {
                Some(first) if *first != body => {
                    tally.differing.fetch_add(1, Ordering::Relaxed);
                }
                Some(_) => {}
                None => {
                    answers.insert(key.to_owned(), body);
                }
            }
        }
        StatusCode::CONFLICT => {
            tally.conflicts.fetch_add(1, Ordering::Relaxed);
        }
        StatusCode::SERVICE_UNAVAILABLE => {
            tally.unavailable.fetch_add(1, Ordering::Relaxed);
        }
        s if s.is_server_error() => {
            tally.server_errors.fetch_add(1, Ordering::Relaxed);
        }
        _ => {
            tally.other.fetch_add(1, Ordering::Relaxed);
        }
    }
    Some(status)
}

/// Sends until a 201, retrying 409, 5xx and connection errors with backoff,
/// alternating between the instances, for at most `patience`.
async fn until_created(
    client: &HttpClient,
    addrs: &[SocketAddr; 2],
    key: &str,
    tally: &Tally,
    patience: Duration,
) {
    let started = Instant::now();
    let mut attempt = 0u32;
    while started.elapsed() < patience {
        let addr = addrs[(attempt as usize) % 2];
        if send(client, addr, key, tally).await == Some(StatusCode::CREATED) {
            return;
        }
        attempt += 1;
        tokio::time::sleep(Duration::from_millis((20 << attempt.min(5)) as u64)).await;
    }
    tally.gave_up.fetch_add(1, Ordering::Relaxed);
}

async fn soak(name: &str, stores: [Arc<dyn Store>; 2], proxy: &Proxy) {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let run_for = Duration::from_secs(secs);
    let stray_panics = Arc::new(AtomicUsize::new(0));
    let hook_count = stray_panics.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        if !msg.contains(INJECTED) {
            hook_count.fetch_add(1, Ordering::SeqCst);
            eprintln!("unexpected panic: {info}");
        }
    }));

    let ledger = Arc::new(Ledger::default());
    let mut addrs = Vec::new();
    for store in stores {
        let app: Router = Router::new()
            .route("/orders", post(handler))
            .layer(
                IdempotencyLayer::from_arc(store)
                    .with_require_key(true)
                    .with_store_timeout(Duration::from_secs(1)),
            )
            .with_state(ledger.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    }
    let addrs: [SocketAddr; 2] = [addrs[0], addrs[1]];
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let deadline = started + run_for;
    let patience = Duration::from_secs(20);
    let run = uuid::Uuid::new_v4().simple().to_string();

    let mut workers = Vec::new();
    // Unique keys, one in seven panicking on its first run, and retried keys.
    for w in 0..24 {
        let (client, tally, run) = (client.clone(), tally.clone(), run.clone());
        workers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let suffix = if n.is_multiple_of(7) { "-p" } else { "" };
                let key = format!("{run}-w{w}-{n}{suffix}");
                until_created(&client, &addrs, &key, &tally, patience).await;
                if n.is_multiple_of(4) {
                    // A client retry of a completed request: a replay.
                    send(&client, addrs[(n as usize + 1) % 2], &key, &tally).await;
                }
            }
        }));
    }
    // Duplicate storms: 20 concurrent copies of one key over both instances.
    {
        let (client, tally, run) = (client.clone(), tally.clone(), run.clone());
        workers.push(tokio::spawn(async move {
            let mut n = 0;
            while Instant::now() < deadline {
                n += 1;
                let key = format!("{run}-storm-{n}");
                let copies: Vec<_> = (0..20)
                    .map(|i| {
                        let (client, tally, key) = (client.clone(), tally.clone(), key.clone());
                        tokio::spawn(async move {
                            until_created(&client, &addrs, &key, &tally, patience).await;
                            let _ = i;
                        })
                    })
                    .collect();
                for c in copies {
                    c.await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    // A store outage in the middle.
    tokio::time::sleep(run_for * 2 / 5).await;
    proxy.cut();
    eprintln!("[{name}] store outage at {:?}", started.elapsed());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.restore();
    eprintln!("[{name}] store back at {:?}", started.elapsed());

    for w in workers {
        w.await.unwrap();
    }
    std::panic::set_hook(previous);

    let executions = ledger.executions.lock().unwrap();
    let answers = tally.answers.lock().unwrap();
    let twice: Vec<_> = answers
        .keys()
        .filter(|k| executions.get(*k).copied().unwrap_or(0) > 1)
        .collect();
    let injected: u32 = ledger.panicked.lock().unwrap().values().sum();
    let t = &tally;
    println!(
        "[{name}] {:.1}s: {} requests, {} keys answered, {} executions, {} first answers, {} replays, {} conflicts (409), {} unavailable (503), {} other 5xx, {} other, {} keys given up, {} injected panics; keys run twice: {}, differing replays: {}, stray panics: {}",
        started.elapsed().as_secs_f64(),
        t.requests.load(Ordering::Relaxed),
        answers.len(),
        executions.values().sum::<u32>(),
        t.created.load(Ordering::Relaxed),
        t.replayed.load(Ordering::Relaxed),
        t.conflicts.load(Ordering::Relaxed),
        t.unavailable.load(Ordering::Relaxed),
        t.server_errors.load(Ordering::Relaxed),
        t.other.load(Ordering::Relaxed),
        t.gave_up.load(Ordering::Relaxed),
        injected,
        twice.len(),
        t.differing.load(Ordering::Relaxed),
        stray_panics.load(Ordering::SeqCst),
    );
    assert!(
        twice.is_empty(),
        "keys with a recorded answer ran twice: {twice:?}"
    );
    assert_eq!(
        t.differing.load(Ordering::Relaxed),
        0,
        "a replay differed from its original"
    );
    assert_eq!(
        stray_panics.load(Ordering::SeqCst),
        0,
        "something other than the handler panicked"
    );
    assert_eq!(t.other.load(Ordering::Relaxed), 0, "unexpected statuses");
    assert_eq!(
        t.gave_up.load(Ordering::Relaxed),
        0,
        "keys that never got their 201 within the patience: lost to a lock left behind or a store that never recovered"
    );
    assert!(
        injected > 0
            && t.replayed.load(Ordering::Relaxed) > 0
            && t.conflicts.load(Ordering::Relaxed) > 0
    );
    assert!(
        t.unavailable.load(Ordering::Relaxed) > 0,
        "the outage was not seen"
    );
}

fn url(var: &str) -> Option<String> {
    common::backend(match var {
        "REDIS_URL" => common::REDIS,
        _ => common::POSTGRES,
    })
}

fn upstream(url: &str, default_port: u16) -> SocketAddr {
    let rest = url.split("://").nth(1).unwrap();
    let host_port = rest.rsplit('@').next().unwrap().split('/').next().unwrap();
    let (host, port) = host_port.split_once(':').unwrap_or((host_port, ""));
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    format!("{host}:{}", port.parse().unwrap_or(default_port))
        .parse()
        .unwrap()
}

/// `url` with its host and port replaced by the proxy's `addr`. The user,
/// password, database (a Redis index, a PostgreSQL name) and query stay, so
/// the soak runs where `url` says.
fn through(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let userinfo = authority
        .rsplit_once('@')
        .map(|(user, _)| format!("{user}@"))
        .unwrap_or_default();
    format!("{scheme}://{userinfo}{addr}{tail}")
}

/// `url` pointing at Redis database `db`.
fn redis_db(url: &str, db: u32) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (rest, query) = rest.split_at(rest.find('?').unwrap_or(rest.len()));
    let authority = rest.split('/').next().unwrap();
    format!("{scheme}://{authority}/{db}{query}")
}

/// The Redis database index `url` names (0 when it names none).
fn redis_index(url: &str) -> u32 {
    let rest = url.split_once("://").unwrap().1;
    let rest = rest.split('?').next().unwrap();
    rest.split_once('/')
        .and_then(|(_, db)| db.parse().ok())
        .unwrap_or(0)
}

#[test]
fn the_proxy_url_keeps_all_but_the_address() {
    let addr: SocketAddr = "127.0.0.1:4000".parse().unwrap();
    assert_eq!(
        through("redis://:secret@10.0.0.1:6379/3", addr),
        "redis://:secret@127.0.0.1:4000/3"
    );
    assert_eq!(through("redis://10.0.0.1", addr), "redis://127.0.0.1:4000");
    assert_eq!(
        through("postgres://app:pw@db:5432/orders?sslmode=disable", addr),
        "postgres://app:pw@127.0.0.1:4000/orders?sslmode=disable"
    );
    assert_eq!(redis_index("redis://h:1/3"), 3);
    assert_eq!(redis_index("redis://h:1"), 0);
    assert_eq!(
        redis_db("redis://:pw@h:1/3?x=1", 0),
        "redis://:pw@h:1/0?x=1"
    );
}

// One test: the panic hook that tells injected panics from stray ones is
// process-wide, so the two soaks run one after the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_two_instances_through_an_outage() {
    soak_redis().await;
    soak_postgres().await;
}

async fn soak_redis() {
    let Some(url) = url("REDIS_URL") else { return };
    let proxy = Proxy::start(upstream(&url, 6379)).await;
    let via = through(&url, proxy.addr);
    let prefix = format!("soak:{}:", uuid::Uuid::new_v4().simple());
    let mut stores: Vec<Arc<dyn Store>> = Vec::new();
    for _ in 0..2 {
        let store = tower_idempotency::store::redis::RedisStore::from_url(&via)
            .await
            .unwrap()
            .with_prefix(prefix.clone());
        stores.push(Arc::new(store));
    }
    soak("redis", [stores[0].clone(), stores[1].clone()], &proxy).await;
    // The records are in the database REDIS_URL names, and nowhere else.
    let index = redis_index(&url);
    assert!(
        count(&url, &prefix).await > 0,
        "no soak record in Redis database {index}"
    );
    for other in [0, 1].into_iter().filter(|db| *db != index) {
        assert_eq!(
            count(&redis_db(&url, other), &prefix).await,
            0,
            "soak records leaked into Redis database {other}, not the {index} of REDIS_URL"
        );
    }
    // Its records would stay for the 24-hour ttl, run after run.
    common::delete_prefix(&url, &prefix).await;
    assert_eq!(count(&url, &prefix).await, 0, "soak records left behind");
}

async fn count(url: &str, prefix: &str) -> usize {
    let mut conn = tower_idempotency::store::redis::driver::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    common::scan(&mut conn, prefix).await.len()
}

async fn soak_postgres() {
    let Some(url) = url("DATABASE_URL") else {
        return;
    };
    let proxy = Proxy::start(upstream(&url, 5432)).await;
    let via = through(&url, proxy.addr);
    let table = format!("soak_{}", uuid::Uuid::new_v4().simple());
    let mut stores: Vec<Arc<dyn Store>> = Vec::new();
    let mut first = None;
    for _ in 0..2 {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_millis(500))
            .connect(&via)
            .await
            .unwrap();
        let store = tower_idempotency::store::postgres::PostgresStore::new(pool)
            .with_schema("tower_idempotency_test")
            .unwrap()
            .with_table(&table)
            .unwrap();
        store.migrate().await.unwrap();
        first.get_or_insert_with(|| store.clone());
        stores.push(Arc::new(store));
    }
    soak("postgres", [stores[0].clone(), stores[1].clone()], &proxy).await;
    let store = first.unwrap();
    let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {}", store.qualified_table()))
        .execute(store.pool())
        .await;
}
