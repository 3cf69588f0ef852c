//! Shared helpers for the integration tests.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

pub mod proxy;
#[cfg(feature = "redis")]
pub mod resp;
#[cfg(feature = "test-util")]
pub mod scenarios;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{MethodFilter, on};
use bytes::Bytes;
use http_body_util::BodyExt;
use tower::ServiceExt;

/// Counts how often the handler ran.
#[derive(Clone, Default)]
pub struct Counter(pub Arc<AtomicUsize>);

impl Counter {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// The test handler. Headers steer it:
/// - `x-delay-ms`: sleep first;
/// - `x-status`: the status to answer (default 201);
/// - `x-panic`: panic;
/// - `x-size`: answer a body of this many bytes instead of the echo.
///
/// It answers the request body echoed back, with two `Set-Cookie` values, a
/// `Date`, and a hop-by-hop header.
pub async fn handler(
    State(counter): State<Counter>,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    let n = counter.0.fetch_add(1, Ordering::SeqCst) + 1;
    if let Some(ms) = headers.get("x-delay-ms") {
        let ms: u64 = ms.to_str().unwrap().parse().unwrap();
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if headers.contains_key("x-panic") {
        panic!("handler asked to panic");
    }
    let status = headers
        .get("x-status")
        .map(|s| StatusCode::from_u16(s.to_str().unwrap().parse().unwrap()).unwrap())
        .unwrap_or(StatusCode::CREATED);
    let body = match headers.get("x-size") {
        Some(size) => Bytes::from(vec![b'z'; size.to_str().unwrap().parse().unwrap()]),
        None => body,
    };
    let mut res = (status, body).into_response();
    let h = res.headers_mut();
    h.append("set-cookie", "a=1".parse().unwrap());
    h.append("set-cookie", "b=2".parse().unwrap());
    h.insert("x-execution", n.to_string().parse().unwrap());
    h.insert("date", "Mon, 23 Nov 2026 07:00:00 GMT".parse().unwrap());
    h.insert("keep-alive", "timeout=5".parse().unwrap());
    res
}

/// A router with the handler on `/orders` (POST and GET), no layer yet.
pub fn router(counter: Counter) -> Router {
    Router::new()
        .route(
            "/orders",
            on(
                MethodFilter::POST
                    .or(MethodFilter::GET)
                    .or(MethodFilter::PATCH)
                    .or(MethodFilter::PUT),
                handler,
            ),
        )
        .with_state(counter)
}

/// A POST to `/orders` with the key (if any) and the body.
pub fn post_req(key: Option<&str>) -> axum::http::request::Builder {
    let mut b = Request::builder()
        .method("POST")
        .uri("/orders")
        .header("content-type", "application/json");
    if let Some(key) = key {
        b = b.header("idempotency-key", key);
    }
    b
}

/// Sends a request and returns status, headers, body.
pub async fn send(app: &Router, req: Request<Body>) -> (StatusCode, HeaderMap, Bytes) {
    let res = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, body)
}

/// POSTs `body` with `key` to `/orders`.
pub async fn call_post(
    app: &Router,
    key: Option<&str>,
    body: &str,
) -> (StatusCode, HeaderMap, Bytes) {
    send(
        app,
        post_req(key).body(Body::from(body.to_owned())).unwrap(),
    )
    .await
}

/// Parses a problem+json body and checks its shape.
pub fn problem(status: StatusCode, headers: &HeaderMap, body: &Bytes) -> serde_json::Value {
    assert_eq!(
        headers["content-type"], "application/problem+json",
        "not a problem: {status}"
    );
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["status"], status.as_u16());
    assert!(v["title"].is_string());
    assert!(v["detail"].is_string());
    v
}

/// The suffix of a problem's `type` URI.
pub fn problem_type(v: &serde_json::Value) -> String {
    v["type"]
        .as_str()
        .unwrap()
        .rsplit('#')
        .next()
        .unwrap()
        .to_owned()
}

/// Whether the CI environment asks for every backend.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The standard local addresses the backend tests fall back on.
pub const REDIS: (&str, &str) = ("REDIS_URL", "redis://127.0.0.1:6379");
pub const POSTGRES: (&str, &str) = ("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test");
pub const NATS: (&str, &str) = ("NATS_URL", "nats://127.0.0.1:4222");
pub const RABBITMQ: (&str, &str) = ("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
pub const MYSQL: (&str, &str) = ("MYSQL_URL", "mysql://root@127.0.0.1:3306/test");
pub const DYNAMODB: (&str, &str) = ("AWS_ENDPOINT_URL", "http://127.0.0.1:8000");
/// The local cluster `scripts/redis-cluster.sh start` runs: comma-separated
/// node URLs.
pub const REDIS_CLUSTER: (&str, &str) = (
    "REDIS_CLUSTER_URLS",
    "redis://127.0.0.1:7000,redis://127.0.0.1:7001,redis://127.0.0.1:7002,\
     redis://127.0.0.1:7003,redis://127.0.0.1:7004,redis://127.0.0.1:7005",
);

/// The node URLs of a Redis Cluster, from `REDIS_CLUSTER_URLS` or the local
/// cluster's, as [`backend`] finds a server (its first node must answer).
pub fn cluster_backend() -> Option<Vec<String>> {
    let urls = backend(REDIS_CLUSTER)?;
    Some(
        urls.split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect(),
    )
}

/// The URL of a backend: its variable if set, otherwise the standard local
/// address if something listens there. `None` (the caller skips) when
/// nothing answers, outside CI; under `CI=true` a missing server panics.
///
/// The first call for each backend in a test binary prints one line to
/// the real stderr (past the test harness's capture), saying whether the
/// backend ran, from where, or was skipped: a green run shows what it
/// covered.
pub fn backend((var, default): (&str, &str)) -> Option<String> {
    use std::collections::HashMap;
    use std::io::Write;
    use std::sync::{Mutex, OnceLock};

    static SEEN: OnceLock<Mutex<HashMap<String, Option<String>>>> = OnceLock::new();
    // Held while resolving, so parallel tests print the line once.
    let mut seen = SEEN
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(known) = seen.get(var) {
        return known.clone();
    }
    let (url, from) = match std::env::var(var) {
        Ok(url) if !url.trim().is_empty() => (url, var.to_owned()),
        _ => (default.to_owned(), "the standard local address".to_owned()),
    };
    let answers = listening(&url);
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|s| {
            s.rsplit_once('-')
                .map_or(s.clone(), |(name, _)| name.to_owned())
        })
        .unwrap_or_default();
    let line = if answers {
        format!(
            "[backends] {binary}: {var} ran against {} (from {from})",
            redact(&url)
        )
    } else if in_ci() {
        panic!(
            "{var}: nothing answers at {}, and CI=true: these tests may not be skipped",
            redact(&url)
        );
    } else {
        format!(
            "[backends] {binary}: {var} SKIPPED: nothing answers at {} (from {from})",
            redact(&url)
        )
    };
    let _ = writeln!(std::io::stderr(), "{line}");
    let resolved = answers.then_some(url);
    seen.insert(var.to_owned(), resolved.clone());
    resolved
}

/// Whether something accepts a TCP connection at the URL's host and port
/// (the first URL's, of a comma-separated list).
fn listening(url: &str) -> bool {
    use std::net::{TcpStream, ToSocketAddrs};
    // A list of node URLs (a cluster): its first.
    let url = url.split(',').next().unwrap_or("").trim();
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let default_port = match url.split_once("://").map(|(s, _)| s) {
        Some("redis") => 6379,
        Some("postgres" | "postgresql") => 5432,
        Some("nats") => 4222,
        Some("amqp") => 5672,
        Some("mysql" | "mariadb") => 3306,
        Some("http") => 80,
        _ => return false,
    };
    let addr = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:{default_port}")
    };
    addr.to_socket_addrs()
        .ok()
        .into_iter()
        .flatten()
        .any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok())
}

/// The URL without its password, for printing.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let user = &url[scheme + 3..at];
            let user = user.split(':').next().unwrap_or("");
            format!("{}{user}@{}", &url[..scheme + 3], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// Every Redis key under `prefix`, sorted, each once. SCAN, not KEYS: one
/// KEYS over a server holding millions of keys outlasts the client's
/// response timeout, and SCAN may return a key twice.
#[cfg(feature = "redis")]
pub async fn scan(
    conn: &mut tower_idempotency::store::redis::driver::aio::MultiplexedConnection,
    prefix: &str,
) -> Vec<String> {
    let mut cursor = 0u64;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) =
            tower_idempotency::store::redis::driver::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(conn)
                .await
                .unwrap();
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys.sort();
    keys.dedup();
    keys
}

/// Deletes every key under `prefix` in the Redis at `url`: for tests that
/// leave many records behind, which would otherwise stay for their ttl.
#[cfg(feature = "redis")]
pub async fn delete_prefix(url: &str, prefix: &str) {
    use tower_idempotency::store::redis::driver;
    let mut conn = driver::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // One DEL per key, pipelined: a cluster node refuses a DEL of keys in
    // different slots (CROSSSLOT).
    for keys in scan(&mut conn, prefix).await.chunks(1000) {
        let mut pipe = driver::pipe();
        for key in keys {
            pipe.cmd("DEL").arg(key).ignore();
        }
        let _: () = pipe.query_async(&mut conn).await.unwrap();
    }
}

/// The primaries among `urls` (a cluster's node URLs): each answers
/// `ROLE` with `master`. Nodes that do not answer (a killed one) are left
/// out.
#[cfg(feature = "redis")]
pub async fn cluster_primaries(urls: &[String]) -> Vec<String> {
    use tower_idempotency::store::redis::driver;
    let mut primaries = Vec::new();
    for url in urls {
        let Ok(client) = driver::Client::open(url.as_str()) else {
            continue;
        };
        let connect = client.get_multiplexed_async_connection();
        let Ok(Ok(mut conn)) = tokio::time::timeout(Duration::from_secs(1), connect).await else {
            continue;
        };
        let role: driver::RedisResult<Vec<driver::Value>> =
            driver::cmd("ROLE").query_async(&mut conn).await;
        if let Ok(role) = role
            && matches!(role.first(), Some(driver::Value::BulkString(r)) if r == b"master")
        {
            primaries.push(url.clone());
        }
    }
    primaries
}

/// Deletes every key under `prefix` on every primary of the cluster `urls`
/// belong to: `SCAN` sees one node's keys only.
#[cfg(feature = "redis")]
pub async fn delete_prefix_on_cluster(urls: &[String], prefix: &str) {
    for primary in cluster_primaries(urls).await {
        delete_prefix(&primary, prefix).await;
    }
}

/// Deletes every Redis key under its prefix when dropped, so a test leaves
/// nothing behind even when it fails. `Drop` cannot await, so it runs
/// [`delete_prefix`] on a runtime of its own, on a thread of its own; a
/// failure there (a server gone) is left to the keys' ttl.
#[cfg(feature = "redis")]
pub struct DeleteOnDrop {
    url: String,
    prefix: String,
}

#[cfg(feature = "redis")]
impl DeleteOnDrop {
    pub fn new(url: &str, prefix: &str) -> Self {
        Self {
            url: url.to_owned(),
            prefix: prefix.to_owned(),
        }
    }
}

#[cfg(feature = "redis")]
impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        let (url, prefix) = (self.url.clone(), self.prefix.clone());
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(delete_prefix(&url, &prefix));
        })
        .join();
    }
}

/// An example of this package, built once per test binary with the test
/// binary's features (so that `cargo test` has usually built it already),
/// next to this binary: `target/<profile>/examples/<name>`.
pub async fn example_bin(name: &'static str) -> std::path::PathBuf {
    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::sync::{Mutex, OnceLock};

    static BUILT: OnceLock<Mutex<HashMap<&'static str, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Mutex::default);
    if let Some(bin) = built.lock().unwrap().get(name) {
        return bin.clone();
    }
    let bin = tokio::task::spawn_blocking(move || {
        let features: Vec<&str> = [
            (cfg!(feature = "test-util"), "test-util"),
            (cfg!(feature = "redis"), "redis"),
            (cfg!(feature = "postgres"), "postgres"),
            (cfg!(feature = "mysql"), "mysql"),
            (cfg!(feature = "sqlite"), "sqlite"),
            (cfg!(feature = "encryption"), "encryption"),
            (cfg!(feature = "dynamodb"), "dynamodb"),
            (cfg!(feature = "utoipa"), "utoipa"),
            (cfg!(feature = "metrics"), "metrics"),
            (cfg!(feature = "client"), "client"),
            (cfg!(feature = "axum"), "axum"),
            (cfg!(feature = "json"), "json"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut cmd = std::process::Command::new(cargo);
        // What cargo sets for a test run describes this package: build
        // scripts that watch such variables (ring's) would see them change
        // and rebuild, here and again in the next plain `cargo test`.
        for (var, _) in std::env::vars_os() {
            let var_name = var.to_string_lossy();
            if [
                "CARGO_MANIFEST_",
                "CARGO_PKG_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
            ]
            .iter()
            .any(|p| var_name.starts_with(p))
                || [
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                    "OUT_DIR",
                ]
                .contains(&&*var_name)
            {
                cmd.env_remove(&var);
            }
        }
        cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args([
            "build",
            "--example",
            name,
            "--features",
            &features.join(","),
        ]);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "building the {name} example failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // target/<profile>/deps/<test>-<hash> → target/<profile>
        let exe = std::env::current_exe().unwrap();
        let profile = exe.parent().unwrap().parent().unwrap();
        let bin = profile.join("examples").join(name);
        assert!(bin.exists(), "{} is missing after the build", bin.display());
        bin
    })
    .await
    .unwrap();
    built.lock().unwrap().insert(name, bin.clone());
    bin
}

/// `<prefix>_<unix seconds>_<random>`: a test table of its own, whose name
/// says when it was made.
pub fn unique_table(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}_{}", unix_secs(), &id[..16])
}

/// The hex of the store key the layer derives from the idempotency key
/// `idem` on a request without a scope: where a store keeps its record.
pub fn store_key_hex(idem: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(b"tower-idempotency/key/v1\0")
        .chain_update([0])
        .chain_update(idem.as_bytes())
        .finalize();
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether a table named by [`unique_table`] was made more than ten
/// minutes ago: left behind by an interrupted run.
pub fn is_stale(table: &str) -> bool {
    let made: Option<u64> = table.split('_').nth(1).and_then(|s| s.parse().ok());
    made.is_some_and(|made| made + 600 < unix_secs())
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
