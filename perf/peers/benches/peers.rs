//! tower-idempotency against the other idempotency middleware for axum and
//! Tower, in process, through `oneshot`, with a 1 KiB JSON body that the
//! handler echoes back (201).
//!
//! - `bare`: the router alone, the reference;
//! - `tower_idempotency`: this crate, `MemoryStore` (2,000,000 entries,
//!   4 GiB), default settings;
//! - `tower_idempotency_keep`: the same with `keep_body_type()`, which
//!   spares axum a second boxing of every response body;
//! - `idempotent`: `idempotent` 2.0.0, its `MemoryStore` (an actor task),
//!   default settings; the only other one that locks a key in flight;
//! - `axum_idempotent_header` / `axum_idempotent_hash`: `axum-idempotent`
//!   0.6.0 on a `ruts` moka session store, behind the `SessionLayer` and
//!   `CookieManagerLayer` it requires, keyed on the `Idempotency-Key` header
//!   (which it does not check against the body) or on a hash of the method,
//!   target, headers and body. It takes no lock and caches only for a client
//!   that already has a session.
//!
//! Groups: `first` (a fresh key each iteration), `replay`, `conflict_409`
//! (a duplicate of a request still running: the layers that lock),
//! `get_passthrough` (a GET without a key, with a do-nothing layer for
//! reference, and both again around the whole router instead of inside
//! it), all on a current-thread runtime; `mt_sequential_first` /
//! `mt_sequential_replay` (one task on a 2-thread runtime, as a server runs
//! a connection); and `concurrent64_first` / `concurrent64_replay` (64 tasks
//! on a 2-thread runtime, throughput).
//!
//! ```text
//! CARGO_TARGET_DIR=… cargo bench --ignore-rust-version --manifest-path perf/peers/Cargo.toml
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use axum::routing::post;
use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http_body_util::BodyExt;
use ruts::store::Ttl;
use ruts::store::moka::MokaStore;
use ruts::{CookieOptions, Session, SessionLayer};
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceExt};
use tower_cookies::CookieManagerLayer;

/// Requests per `axum-idempotent` session in `first`: it caches every
/// response as a field of the client's session, and its moka store scans
/// the whole session on every write, so one session per benchmark would
/// make each first execution slower than the last. A new session every 256
/// requests, made outside the timed region, keeps that cost bounded.
const PER_SESSION: u64 = 256;
const TASKS: u64 = 64;

async fn handler(headers: HeaderMap, body: Bytes) -> (StatusCode, Bytes) {
    if headers.contains_key("x-hold") {
        // The request the conflict benchmarks collide with: never ends.
        std::future::pending::<()>().await;
    }
    // A fresh buffer, as a handler that serializes its answer makes: an
    // echo of the request's shared buffer would let a store keep every
    // record for the price of a reference count.
    (StatusCode::CREATED, Bytes::copy_from_slice(&body))
}

async fn list() -> (StatusCode, &'static str) {
    (StatusCode::OK, r#"[{"id":1,"item":"book","qty":1}]"#)
}

async fn new_session(session: Session<MokaStore>) -> &'static str {
    session
        .set(
            "user",
            &String::from("bench"),
            Ttl::new(3600).unwrap(),
            None,
        )
        .await
        .unwrap();
    "ok"
}

fn body_1k() -> Bytes {
    let mut s = String::from("{\"items\":[");
    while s.len() < 1000 {
        s.push_str("{\"sku\":\"abc-123\",\"qty\":1},");
    }
    s.pop();
    s.push_str("]}");
    Bytes::from(s)
}

fn routes() -> Router {
    Router::new()
        .route("/orders", post(handler).get(list))
        .route("/session", post(new_session))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Bare,
    Ours,
    OursKeep,
    Idempotent,
    AxumIdemHeader,
    AxumIdemHash,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Bare => "bare",
            Kind::Ours => "tower_idempotency",
            Kind::OursKeep => "tower_idempotency_keep",
            Kind::Idempotent => "idempotent",
            Kind::AxumIdemHeader => "axum_idempotent_header",
            Kind::AxumIdemHash => "axum_idempotent_hash",
        }
    }

    fn sessions(self) -> bool {
        matches!(self, Kind::AxumIdemHeader | Kind::AxumIdemHash)
    }
}

fn ours() -> tower_idempotency::IdempotencyLayer {
    let store = tower_idempotency::MemoryStore::builder()
        .max_entries(2_000_000)
        .max_bytes(4 << 30)
        .build();
    tower_idempotency::IdempotencyLayer::new(store)
}

/// The app for `kind`, its stores made on `rt` (the `idempotent` store
/// spawns its actor there). `long_lease`: locks outlive the benchmark.
///
/// Every app is finished with `with_state(())`, as `axum::serve` does
/// (`into_make_service`): routes and their layers are then built once, not
/// on every request, so each request costs what it costs in a server.
fn app(kind: Kind, rt: &Runtime, long_lease: bool) -> Router {
    let _guard = rt.enter();
    let app: Router = match kind {
        Kind::Bare => routes(),
        Kind::Ours | Kind::OursKeep => {
            let mut layer = ours();
            if long_lease {
                layer = layer.with_lease(Duration::from_secs(3600));
            }
            if kind == Kind::OursKeep {
                routes().layer(layer.keep_body_type())
            } else {
                routes().layer(layer)
            }
        }
        Kind::Idempotent => {
            let store = idempotent::memory::MemoryStore::builder()
                .try_build()
                .unwrap();
            let mut layer = idempotent::middleware::IdempotencyLayer::new(store);
            if long_lease {
                layer = layer.processing_ttl(Duration::from_secs(3600));
            }
            routes().layer(layer)
        }
        Kind::AxumIdemHeader | Kind::AxumIdemHash => {
            let mut options = axum_idempotent::IdempotentOptions::default().expire_after(3600);
            if kind == Kind::AxumIdemHeader {
                options = options.use_idempotency_key_header(Some("idempotency-key"), false);
            }
            let sessions = SessionLayer::new(Arc::new(MokaStore::builder().build()))
                .with_cookie_options(
                    CookieOptions::build()
                        .name("session")
                        .max_age(3600)
                        .path("/"),
                );
            routes()
                .layer(axum_idempotent::IdempotentLayer::<MokaStore>::new(options))
                .layer(sessions)
                .layer(CookieManagerLayer::new())
        }
    };
    app.with_state(())
}

fn request(
    method: Method,
    key: Option<&str>,
    cookie: Option<&HeaderValue>,
    body: &Bytes,
) -> Request<Body> {
    let mut b = Request::builder()
        .method(method.clone())
        .uri("/orders")
        .header("content-type", "application/json");
    if let Some(key) = key {
        b = b.header("idempotency-key", key);
    }
    if let Some(cookie) = cookie {
        b = b.header("cookie", cookie.clone());
    }
    let body = if method == Method::GET {
        Body::empty()
    } else {
        Body::from(body.clone())
    };
    b.body(body).unwrap()
}

/// Sends `req` and reads the whole response; the status.
async fn run<S>(app: &S, req: Request<Body>) -> StatusCode
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone,
{
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    std::hint::black_box(body);
    status
}

/// A fresh `axum-idempotent` session: its cookie.
async fn session(app: &Router) -> HeaderValue {
    let req = Request::post("/session").body(Body::empty()).unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let set = res
        .headers()
        .get_all("set-cookie")
        .iter()
        .find(|c| c.as_bytes().starts_with(b"session="))
        .expect("a session cookie")
        .to_str()
        .unwrap();
    let pair = set.split(';').next().unwrap();
    HeaderValue::from_str(pair).unwrap()
}

fn fresh_key(counter: &AtomicU64) -> String {
    format!("key-{}", counter.fetch_add(1, Ordering::Relaxed))
}

/// Checks once, outside any timing, that `kind` replays: the second
/// request must be answered from the record, not by the handler.
async fn assert_replays(kind: Kind, app: &Router, cookie: Option<&HeaderValue>, body: &Bytes) {
    for _ in 0..2 {
        assert_eq!(
            run(
                app,
                request(Method::POST, Some("check-replay"), cookie, body)
            )
            .await,
            StatusCode::CREATED
        );
    }
    let res = app
        .clone()
        .oneshot(request(Method::POST, Some("check-replay"), cookie, body))
        .await
        .unwrap();
    let replayed = res
        .headers()
        .iter()
        .any(|(n, v)| n.as_str().ends_with("replayed") && v == "true");
    assert!(
        replayed,
        "{}: the third request was not a replay",
        kind.name()
    );
}

fn single_thread(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = body_1k();
    let counter = AtomicU64::new(0);
    let kinds = [
        Kind::Bare,
        Kind::Ours,
        Kind::OursKeep,
        Kind::Idempotent,
        Kind::AxumIdemHeader,
        Kind::AxumIdemHash,
    ];
    let apps: Vec<(Kind, Router)> = kinds.iter().map(|&k| (k, app(k, &rt, false))).collect();

    for (kind, app) in &apps {
        if *kind != Kind::Bare {
            let cookie = kind.sessions().then(|| rt.block_on(session(app)));
            rt.block_on(assert_replays(*kind, app, cookie.as_ref(), &body));
        }
    }

    let mut g = c.benchmark_group("first");
    g.throughput(Throughput::Elements(1));
    for (kind, app) in &apps {
        if kind.sessions() {
            g.bench_function(kind.name(), |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let counter = &counter;
                    let body = &body;
                    async move {
                        let mut spent = Duration::ZERO;
                        let mut cookie = session(app).await;
                        for i in 0..iters {
                            if i > 0 && i % PER_SESSION == 0 {
                                cookie = session(app).await;
                            }
                            let req = request(
                                Method::POST,
                                Some(&fresh_key(counter)),
                                Some(&cookie),
                                body,
                            );
                            let t = Instant::now();
                            run(app, req).await;
                            spent += t.elapsed();
                        }
                        spent
                    }
                })
            });
        } else {
            g.bench_function(kind.name(), |b| {
                b.to_async(&rt).iter(|| {
                    run(
                        app,
                        request(Method::POST, Some(&fresh_key(&counter)), None, &body),
                    )
                })
            });
        }
    }
    g.finish();

    let mut g = c.benchmark_group("replay");
    g.throughput(Throughput::Elements(1));
    for (kind, app) in apps.iter().filter(|(k, _)| *k != Kind::Bare) {
        let cookie = kind.sessions().then(|| rt.block_on(session(app)));
        rt.block_on(run(
            app,
            request(Method::POST, Some("replayed"), cookie.as_ref(), &body),
        ));
        g.bench_function(kind.name(), |b| {
            b.to_async(&rt).iter(|| {
                run(
                    app,
                    request(Method::POST, Some("replayed"), cookie.as_ref(), &body),
                )
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("get_passthrough");
    g.throughput(Throughput::Elements(1));
    // What any layer at all costs under axum: one that changes nothing.
    let noop: Router = routes()
        .layer(tower::util::MapRequestLayer::new(|r: Request<Body>| r))
        .with_state(());
    g.bench_function("noop_layer", |b| {
        b.to_async(&rt)
            .iter(|| run(&noop, request(Method::GET, None, None, &body)))
    });
    for (kind, app) in apps.iter().filter(|(k, _)| *k != Kind::AxumIdemHash) {
        // axum-idempotent's hashing mode caches GETs too: no passthrough.
        let cookie = kind.sessions().then(|| rt.block_on(session(app)));
        g.bench_function(kind.name(), |b| {
            b.to_async(&rt)
                .iter(|| run(app, request(Method::GET, None, cookie.as_ref(), &body)))
        });
    }
    // The layer around the whole router (`Layer::layer(router)`, as for a
    // `ServiceBuilder` stack) instead of inside it: axum adds nothing, so
    // what is left is the layer's own cost.
    let outer_noop =
        tower::util::MapRequestLayer::new(|r: Request<Body>| r).layer(routes().with_state(()));
    g.bench_function("around_router_noop_layer", |b| {
        b.to_async(&rt)
            .iter(|| run(&outer_noop, request(Method::GET, None, None, &body)))
    });
    let outer_ours = ours().keep_body_type().layer(routes().with_state(()));
    g.bench_function("around_router_tower_idempotency_keep", |b| {
        b.to_async(&rt)
            .iter(|| run(&outer_ours, request(Method::GET, None, None, &body)))
    });
    g.finish();

    // The layers that lock: a duplicate of a request that is still running.
    let mut g = c.benchmark_group("conflict_409");
    g.throughput(Throughput::Elements(1));
    for kind in [Kind::Ours, Kind::OursKeep, Kind::Idempotent] {
        let app = app(kind, &rt, true);
        let mut held = request(Method::POST, Some("held"), None, &body);
        held.headers_mut()
            .insert("x-hold", HeaderValue::from_static("1"));
        let held_app = app.clone();
        rt.spawn(async move { held_app.oneshot(held).await });
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
        let status = rt.block_on(run(&app, request(Method::POST, Some("held"), None, &body)));
        assert_eq!(status, StatusCode::CONFLICT, "{}", kind.name());
        g.bench_function(kind.name(), |b| {
            b.to_async(&rt)
                .iter(|| run(&app, request(Method::POST, Some("held"), None, &body)))
        });
    }
    g.finish();
}

/// A 2-worker runtime, the body and a key counter.
fn multi_thread_setup() -> (Runtime, Bytes, Arc<AtomicU64>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    (rt, body_1k(), Arc::new(AtomicU64::new(0)))
}

/// Sequential requests from one task on a 2-thread runtime, as a server
/// runs one connection: the latency a client sees when nothing else runs,
/// including any hop to another task or thread that a layer makes.
fn multi_thread_sequential(c: &mut Criterion) {
    let (rt, body, counter) = multi_thread_setup();
    for replay in [false, true] {
        let name = if replay {
            "mt_sequential_replay"
        } else {
            "mt_sequential_first"
        };
        let mut g = c.benchmark_group(name);
        g.throughput(Throughput::Elements(1));
        for kind in [Kind::Bare, Kind::Ours, Kind::OursKeep, Kind::Idempotent] {
            if replay && kind == Kind::Bare {
                continue;
            }
            let app = app(kind, &rt, false);
            rt.block_on(run(
                &app,
                request(Method::POST, Some("mt-replayed"), None, &body),
            ));
            g.bench_function(kind.name(), |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let app = app.clone();
                    let body = body.clone();
                    let counter = counter.clone();
                    async move {
                        // The loop runs on a worker, as a connection's task does.
                        tokio::spawn(async move {
                            let start = Instant::now();
                            for _ in 0..iters {
                                let key = if replay {
                                    String::from("mt-replayed")
                                } else {
                                    fresh_key(&counter)
                                };
                                run(&app, request(Method::POST, Some(&key), None, &body)).await;
                            }
                            start.elapsed()
                        })
                        .await
                        .unwrap()
                    }
                })
            });
        }
        g.finish();
    }
}

/// 64 tasks on a 2-thread runtime; an iteration is one request, so
/// criterion's throughput is requests per second.
fn concurrent(c: &mut Criterion) {
    let (rt, body, counter) = multi_thread_setup();
    let kinds = [
        Kind::Bare,
        Kind::Ours,
        Kind::OursKeep,
        Kind::Idempotent,
        Kind::AxumIdemHeader,
    ];

    for replay in [false, true] {
        let name = if replay {
            "concurrent64_replay"
        } else {
            "concurrent64_first"
        };
        let mut g = c.benchmark_group(name);
        g.throughput(Throughput::Elements(1));
        for kind in kinds {
            if replay && kind == Kind::Bare {
                continue;
            }
            let app = app(kind, &rt, false);
            // Replay: every task has its own recorded key (and session).
            let replay_state: Vec<(String, Option<HeaderValue>)> = (0..TASKS)
                .map(|t| {
                    let key = format!("replay-{t}");
                    let cookie = kind.sessions().then(|| rt.block_on(session(&app)));
                    rt.block_on(run(
                        &app,
                        request(Method::POST, Some(&key), cookie.as_ref(), &body),
                    ));
                    (key, cookie)
                })
                .collect();
            let replay_state = Arc::new(replay_state);
            g.bench_function(kind.name(), |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let app = app.clone();
                    let body = body.clone();
                    let counter = counter.clone();
                    let replay_state = replay_state.clone();
                    async move {
                        let per_task = iters.div_ceil(TASKS).max(1);
                        // Sessions for first executions, made before the clock.
                        let mut cookies: Vec<Vec<HeaderValue>> = Vec::new();
                        if kind.sessions() && !replay {
                            for _ in 0..TASKS {
                                let mut v = Vec::new();
                                for _ in 0..per_task.div_ceil(PER_SESSION) {
                                    v.push(session(&app).await);
                                }
                                cookies.push(v);
                            }
                        }
                        let cookies = Arc::new(cookies);
                        let start = Instant::now();
                        let tasks: Vec<_> = (0..TASKS as usize)
                            .map(|t| {
                                let app = app.clone();
                                let body = body.clone();
                                let counter = counter.clone();
                                let replay_state = replay_state.clone();
                                let cookies = cookies.clone();
                                tokio::spawn(async move {
                                    for i in 0..per_task {
                                        let req = if replay {
                                            let (key, cookie) = &replay_state[t];
                                            request(Method::POST, Some(key), cookie.as_ref(), &body)
                                        } else {
                                            let cookie = cookies
                                                .get(t)
                                                .map(|v| &v[(i / PER_SESSION) as usize]);
                                            request(
                                                Method::POST,
                                                Some(&fresh_key(&counter)),
                                                cookie,
                                                &body,
                                            )
                                        };
                                        run(&app, req).await;
                                    }
                                })
                            })
                            .collect();
                        for task in tasks {
                            task.await.unwrap();
                        }
                        // Scale to the `iters` requests criterion asked for.
                        start
                            .elapsed()
                            .mul_f64(iters as f64 / (per_task * TASKS) as f64)
                    }
                })
            });
        }
        g.finish();
    }
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = single_thread, multi_thread_sequential, concurrent
}
criterion_main!(benches);
