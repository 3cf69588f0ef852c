//! The client half: keys, same-key retries, and end to end against the
//! server layer through a proxy that loses responses.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt};
use tower_idempotency::client::{Attempts, ClientError};
use tower_idempotency::{
    IdempotencyLayer, MemoryStore,
    client::{IdempotentClient, IdempotentClientLayer},
    store::BoxError,
};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_test_writer()
        .try_init();
}

// ---------------------------------------------------------------------------
// A scripted fake server.
// ---------------------------------------------------------------------------

/// What the fake server does on one call.
#[derive(Clone, Copy)]
enum Step {
    /// Answer this status.
    Status(u16),
    /// Answer this status with `Retry-After: secs`.
    RetryAfter(u16, u64),
    /// Fail as a broken connection would.
    Fail,
    /// Answer 201 only after a minute.
    Hang,
}

/// One call the fake server saw.
#[derive(Clone)]
struct Call {
    method: Method,
    keys: Vec<HeaderValue>,
    body: Bytes,
    at: Instant,
}

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Call>>>);

impl Seen {
    fn calls(&self) -> Vec<Call> {
        self.0.lock().unwrap().clone()
    }
}

type Fake<B> = BoxCloneService<Request<B>, Response<Full<Bytes>>, BoxError>;

/// A server that follows `script` (the last step repeats) and records what
/// it saw.
fn fake<B>(script: Vec<Step>) -> (Fake<B>, Seen)
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let seen = Seen::default();
    let log = seen.clone();
    let svc = tower::service_fn(move |req: Request<B>| {
        let log = log.clone();
        let script = script.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.map_err(Into::into)?.to_bytes();
            let n = {
                let mut calls = log.0.lock().unwrap();
                calls.push(Call {
                    method: parts.method.clone(),
                    keys: parts
                        .headers
                        .get_all("idempotency-key")
                        .iter()
                        .cloned()
                        .collect(),
                    body,
                    at: Instant::now(),
                });
                calls.len() - 1
            };
            let step = script[n.min(script.len() - 1)];
            let (status, after) = match step {
                Step::Status(s) => (s, None),
                Step::RetryAfter(s, secs) => (s, Some(secs)),
                Step::Fail => return Err::<_, BoxError>("connection reset by peer".into()),
                Step::Hang => {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    (201, None)
                }
            };
            let mut res = Response::new(Full::new(Bytes::from(format!("call {n}"))));
            *res.status_mut() = StatusCode::from_u16(status).unwrap();
            if let Some(secs) = after {
                res.headers_mut().insert("retry-after", secs.into());
            }
            Ok(res)
        }
    });
    (BoxCloneService::new(svc), seen)
}

fn client(
    script: Vec<Step>,
    layer: IdempotentClientLayer,
) -> (IdempotentClient<Fake<Full<Bytes>>>, Seen) {
    let (svc, seen) = fake(script);
    (ServiceBuilder::new().layer(layer).service(svc), seen)
}

fn post(body: &'static str) -> Request<Full<Bytes>> {
    Request::post("http://api.test/orders")
        .body(Full::from(body))
        .unwrap()
}

/// Every error the layer returns is a boxed `ClientError`.
fn client_error(err: BoxError) -> ClientError {
    *err.downcast::<ClientError>().unwrap()
}

fn attempts<T>(res: &Response<T>) -> u32 {
    res.extensions().get::<Attempts>().unwrap().count()
}

// ---------------------------------------------------------------------------
// Unit level.
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn key_attached_once_and_identical_on_every_attempt() {
    use Step::*;
    let (svc, seen) = client(
        vec![Status(503), Fail, Status(502), Status(201)],
        IdempotentClientLayer::new(),
    );
    let res = svc.oneshot(post("{\"item\":\"book\"}")).await.unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(attempts(&res), 4);

    let calls = seen.calls();
    assert_eq!(calls.len(), 4);
    let key = calls[0].keys[0].clone();
    for call in &calls {
        assert_eq!(call.keys.len(), 1, "one key field");
        assert_eq!(call.keys[0], key, "the same key every time");
        assert_eq!(
            call.body, "{\"item\":\"book\"}",
            "the body is replayed whole"
        );
    }
    // The draft's sf-string form around a UUID v4.
    let text = key.to_str().unwrap();
    let uuid = text.strip_prefix('"').unwrap().strip_suffix('"').unwrap();
    assert_eq!(uuid::Uuid::parse_str(uuid).unwrap().get_version_num(), 4);
    assert_eq!(res.extensions().get::<Attempts>().unwrap().key(), &key);
}

#[tokio::test(start_paused = true)]
async fn a_request_with_its_own_key_keeps_it() {
    let (svc, seen) = client(
        vec![Step::Status(500), Step::Status(201)],
        IdempotentClientLayer::new(),
    );
    let mut req = post("{}");
    req.headers_mut()
        .insert("idempotency-key", HeaderValue::from_static("order-42"));
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 201);
    let calls = seen.calls();
    assert_eq!(calls.len(), 2);
    for call in &calls {
        assert_eq!(call.keys, ["order-42"]);
    }
}

#[tokio::test(start_paused = true)]
async fn retries_503_then_succeeds_within_the_backoff() {
    let (svc, seen) = client(
        vec![Step::Status(503), Step::Status(201)],
        IdempotentClientLayer::new(),
    );
    let start = Instant::now();
    let res = svc.oneshot(post("{}")).await.unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(attempts(&res), 2);
    assert_eq!(seen.calls().len(), 2);
    // Full jitter below the base (100 ms) before the first retry.
    assert!(start.elapsed() <= ms(100), "{:?}", start.elapsed());
}

#[tokio::test(start_paused = true)]
async fn stops_after_max_attempts_with_the_last_response() {
    let (svc, seen) = client(
        vec![Step::Status(503)],
        IdempotentClientLayer::new().with_max_attempts(3),
    );
    let res = svc.oneshot(post("{}")).await.unwrap();
    assert_eq!(res.status(), 503, "the server's own answer, not an error");
    assert_eq!(attempts(&res), 3);
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "call 2"
    );
    assert_eq!(seen.calls().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn errors_run_out_into_client_error() {
    let (svc, seen) = client(vec![Step::Fail], IdempotentClientLayer::new());
    let start = Instant::now();
    let err = client_error(svc.oneshot(post("{}")).await.unwrap_err());
    assert!(
        matches!(err, ClientError::Inner { attempts: 5, .. }),
        "{err:?}"
    );
    assert_eq!(err.attempts(), 5);
    assert_eq!(err.inner().unwrap().to_string(), "connection reset by peer");
    assert_eq!(seen.calls().len(), 5, "five attempts by default");
    // Ceilings 100 + 200 + 400 + 800 ms.
    assert!(start.elapsed() <= ms(1500), "{:?}", start.elapsed());
}

#[tokio::test(start_paused = true)]
async fn never_retries_other_4xx() {
    for code in [400, 401, 403, 404, 410, 413, 422, 429] {
        let (svc, seen) = client(
            vec![Step::Status(code), Step::Status(201)],
            IdempotentClientLayer::new(),
        );
        let res = svc.oneshot(post("{}")).await.unwrap();
        assert_eq!(res.status(), code);
        assert_eq!(attempts(&res), 1);
        assert_eq!(seen.calls().len(), 1, "{code} was retried");
    }
    // 429 only with a Retry-After the client will honour.
    let (svc, seen) = client(
        vec![Step::RetryAfter(429, 60), Step::Status(201)],
        IdempotentClientLayer::new(),
    );
    assert_eq!(svc.oneshot(post("{}")).await.unwrap().status(), 429);
    assert_eq!(seen.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn honours_retry_after_on_409() {
    let (svc, seen) = client(
        vec![Step::RetryAfter(409, 2), Step::Status(201)],
        IdempotentClientLayer::new(),
    );
    let start = Instant::now();
    let res = svc.oneshot(post("{}")).await.unwrap();
    assert_eq!(res.status(), 201);
    let calls = seen.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].at - calls[0].at, Duration::from_secs(2));
    assert_eq!(start.elapsed(), Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_capped_by_the_max_backoff() {
    let layer = IdempotentClientLayer::new().with_backoff(ms(100), Duration::from_secs(3));
    let (svc, seen) = client(vec![Step::RetryAfter(409, 3600), Step::Status(201)], layer);
    let start = Instant::now();
    assert_eq!(svc.oneshot(post("{}")).await.unwrap().status(), 201);
    assert_eq!(seen.calls().len(), 2);
    assert_eq!(start.elapsed(), Duration::from_secs(3));

    let (svc, seen) = client(
        vec![Step::RetryAfter(429, 1), Step::Status(201)],
        IdempotentClientLayer::new(),
    );
    let start = Instant::now();
    assert_eq!(svc.oneshot(post("{}")).await.unwrap().status(), 201);
    assert_eq!(seen.calls().len(), 2);
    assert_eq!(start.elapsed(), Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn a_get_gets_no_key_and_no_retry() {
    let (svc, seen) = client(vec![Step::Status(503)], IdempotentClientLayer::new());
    let req = Request::get("http://api.test/orders")
        .body(Full::default())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 503);
    assert!(res.extensions().get::<Attempts>().is_none());
    let calls = seen.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].method, Method::GET);
    assert!(calls[0].keys.is_empty());
}

#[tokio::test(start_paused = true)]
async fn configured_methods_and_header() {
    let layer = IdempotentClientLayer::new()
        .with_methods([Method::PUT])
        .with_header(http::HeaderName::from_static("x-request-key"));
    let (svc, _) = fake::<Full<Bytes>>(vec![Step::Status(201)]);
    let seen_header = Arc::new(Mutex::new(Vec::new()));
    let log = seen_header.clone();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .map_request(move |req: Request<Full<Bytes>>| {
            log.lock()
                .unwrap()
                .push(req.headers().get("x-request-key").cloned());
            req
        })
        .service(svc);
    let put = Request::put("http://api.test/orders/1")
        .body(Full::from("{}"))
        .unwrap();
    svc.clone().oneshot(put).await.unwrap();
    svc.oneshot(post("{}")).await.unwrap();
    let seen = seen_header.lock().unwrap();
    assert!(seen[0].is_some(), "PUT is covered");
    assert!(seen[1].is_none(), "POST is not");
}

#[tokio::test(start_paused = true)]
async fn timeouts_are_retried_then_reported() {
    let layer = IdempotentClientLayer::new().with_timeout(Duration::from_secs(1));
    let (svc, seen) = client(vec![Step::Hang, Step::Status(201)], layer.clone());
    let start = Instant::now();
    let res = svc.oneshot(post("{}")).await.unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(seen.calls().len(), 2);
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed <= ms(1100),
        "{elapsed:?}"
    );

    let (svc, seen) = client(vec![Step::Hang], layer.with_max_attempts(2));
    let err = client_error(svc.oneshot(post("{}")).await.unwrap_err());
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(err.attempts(), 2);
    assert_eq!(seen.calls().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_body_over_the_limit_is_sent_once_or_refused() {
    // Known size over the limit: sent once, with its key, without retries.
    let layer = IdempotentClientLayer::new().with_max_body(1024);
    let (svc, seen) = client(vec![Step::Status(503), Step::Status(201)], layer.clone());
    let big = Request::post("http://api.test/upload")
        .body(Full::from(vec![b'x'; 2048]))
        .unwrap();
    let res = svc.oneshot(big).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(attempts(&res), 1);
    let calls = seen.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].keys.len(), 1);
    assert_eq!(calls[0].body.len(), 2048);

    // A stream of unknown size that grows past the limit: nothing is sent.
    let (svc, seen) = fake::<axum::body::Body>(vec![Step::Status(201)]);
    let svc = ServiceBuilder::new().layer(layer).service(svc);
    let chunks = futures_util::stream::iter([
        Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; 600])),
        Ok(Bytes::from(vec![b'y'; 600])),
    ]);
    let req = Request::post("http://api.test/upload")
        .body(axum::body::Body::from_stream(chunks))
        .unwrap();
    let err = client_error(svc.oneshot(req).await.unwrap_err());
    assert!(
        matches!(err, ClientError::BodyTooLarge { limit: 1024 }),
        "{err:?}"
    );
    assert!(seen.calls().is_empty());
}

// ---------------------------------------------------------------------------
// End to end: hyper client ─► lossy proxy ─► axum + IdempotencyLayer.
// ---------------------------------------------------------------------------

/// The order service: every POST creates an order with a fresh id.
#[derive(Clone, Default)]
struct Orders {
    created: Arc<AtomicUsize>,
    list: Arc<Mutex<Vec<Value>>>,
}

async fn create_order(
    State(orders): State<Orders>,
    axum::Json(input): axum::Json<Value>,
) -> (StatusCode, axum::Json<Value>) {
    orders.created.fetch_add(1, Ordering::SeqCst);
    let order = json!({ "id": uuid::Uuid::new_v4().to_string(), "item": input["item"] });
    orders.list.lock().unwrap().push(order.clone());
    (StatusCode::CREATED, axum::Json(order))
}

async fn list_orders(State(orders): State<Orders>) -> axum::Json<Value> {
    axum::Json(Value::Array(orders.list.lock().unwrap().clone()))
}

async fn order_server(idempotent: bool) -> (SocketAddr, Orders) {
    let orders = Orders::default();
    let mut app = Router::new()
        .route("/orders", routing::post(create_order).get(list_orders))
        .with_state(orders.clone());
    if idempotent {
        app = app.layer(IdempotencyLayer::new(MemoryStore::new()).with_require_key(true));
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, orders)
}

/// What the proxy saw.
#[derive(Default)]
struct ProxyLog {
    /// Responses read from the server, forwarded or not.
    responses: AtomicUsize,
    /// The request line and key header of every forwarded request.
    requests: Mutex<Vec<(String, Option<String>)>>,
}

/// A loopback proxy that forwards each request to `upstream`, reads the
/// server's whole response, and for the first `drop_first` responses closes
/// the client's connection instead of forwarding it: the server acted, the
/// client never hears.
async fn lossy_proxy(upstream: SocketAddr, drop_first: usize) -> (SocketAddr, Arc<ProxyLog>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(ProxyLog::default());
    let shared = log.clone();
    tokio::spawn(async move {
        loop {
            let (client, _) = listener.accept().await.unwrap();
            tokio::spawn(relay(client, upstream, shared.clone(), drop_first));
        }
    });
    (addr, log)
}

async fn relay(mut client: TcpStream, upstream: SocketAddr, log: Arc<ProxyLog>, drop_first: usize) {
    let mut server = TcpStream::connect(upstream).await.unwrap();
    let (mut from_client, mut from_server) = (Vec::new(), Vec::new());
    // One connection may carry several requests (the client pools).
    while let Some(req) = read_message(&mut client, &mut from_client).await {
        let head = String::from_utf8_lossy(&req).to_ascii_lowercase();
        let line = head.lines().next().unwrap_or_default().to_owned();
        let key = head
            .lines()
            .find_map(|l| l.strip_prefix("idempotency-key:"))
            .map(|v| v.trim().to_owned());
        log.requests.lock().unwrap().push((line, key));
        server.write_all(&req).await.unwrap();
        let Some(res) = read_message(&mut server, &mut from_server).await else {
            return;
        };
        if log.responses.fetch_add(1, Ordering::SeqCst) < drop_first {
            return; // both connections close; the response is lost
        }
        client.write_all(&res).await.unwrap();
    }
}

/// Reads one HTTP/1.1 message framed by `Content-Length` (absent means no
/// body), keeping whatever follows it in `buf`. `None` at end of stream.
async fn read_message(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            assert!(
                !head.contains("transfer-encoding"),
                "the proxy only speaks Content-Length: {head}"
            );
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            let total = end + 4 + len;
            if buf.len() >= total {
                return Some(buf.drain(..total).collect());
            }
        }
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The client under test: hyper-util's legacy client, wrapped with no
/// adapter at all (its `Full<Bytes>` body is `From<Bytes>`, it is `Clone`,
/// and its error is `Display`).
fn http_client()
-> IdempotentClient<Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>> {
    let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    ServiceBuilder::new()
        .layer(
            IdempotentClientLayer::new()
                .with_backoff(ms(20), ms(200))
                .with_timeout(Duration::from_secs(2)),
        )
        .service(http)
}

async fn body_json<B>(res: Response<B>) -> Value
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

#[tokio::test]
async fn end_to_end_lost_responses_create_one_order_and_return_the_original() {
    init_tracing();
    let (server, orders) = order_server(true).await;
    let (proxy, log) = lossy_proxy(server, 2).await;
    let client = http_client();

    let started = std::time::Instant::now();
    let req = Request::post(format!("http://{proxy}/orders"))
        .header("content-type", "application/json")
        .body(Full::from("{\"item\":\"book\"}"))
        .unwrap();
    let res = client.clone().oneshot(req).await.unwrap();

    // The client: the original 201, replayed, after three attempts.
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(attempts(&res), 3);
    let key = res.extensions().get::<Attempts>().unwrap().key().clone();
    let got = body_json(res).await;

    // The server: one execution, one order, the one the client got.
    assert_eq!(
        orders.created.load(Ordering::SeqCst),
        1,
        "the order was created once"
    );
    let list = orders.list.lock().unwrap().clone();
    assert_eq!(list.len(), 1);
    assert_eq!(got, list[0], "the client got the original order");
    assert_eq!(got["item"], "book");

    // The wire: three POSTs with one key, two answers lost.
    assert_eq!(log.responses.load(Ordering::SeqCst), 3);
    let requests = log.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 3);
    for (line, sent) in &requests {
        assert!(line.starts_with("post /orders"), "{line}");
        assert_eq!(sent.as_deref(), Some(key.to_str().unwrap()));
    }

    // A GET passes through the layer untouched (no key; the server layer
    // requires keys only on POST and PATCH) and lists the one order.
    let req = Request::get(format!("http://{proxy}/orders"))
        .body(Full::default())
        .unwrap();
    let res = client.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(body_json(res).await, json!([got]));
    assert_eq!(log.requests.lock().unwrap()[3].1, None);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn end_to_end_without_the_server_layer_every_retry_creates_an_order() {
    // The control: the same client and the same lossy proxy, but a server
    // that ignores keys. The retries that saved the caller above now create
    // an order each.
    let (server, orders) = order_server(false).await;
    let (proxy, _log) = lossy_proxy(server, 2).await;
    let req = Request::post(format!("http://{proxy}/orders"))
        .header("content-type", "application/json")
        .body(Full::from("{\"item\":\"book\"}"))
        .unwrap();
    let res = http_client().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert!(res.headers().get("idempotent-replayed").is_none());
    assert_eq!(orders.created.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn end_to_end_server_down_is_a_client_error() {
    // Nothing listens on this port once the listener is dropped.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let client = ServiceBuilder::new()
        .layer(
            IdempotentClientLayer::new()
                .with_backoff(ms(1), ms(5))
                .with_max_attempts(3),
        )
        .service(http);
    let req = Request::post(format!("http://{addr}/orders"))
        .body(Full::from("{}"))
        .unwrap();
    let err: BoxError = client.oneshot(req).await.unwrap_err();
    // The inner error is the error's source, as the error chain shows it.
    let source = std::error::Error::source(err.as_ref()).unwrap();
    assert!(
        source
            .downcast_ref::<hyper_util::client::legacy::Error>()
            .is_some()
    );
    let ClientError::Inner { source, attempts } = client_error(err) else {
        unreachable!()
    };
    assert_eq!(attempts, 3);
    let error = source
        .downcast_ref::<hyper_util::client::legacy::Error>()
        .unwrap();
    assert!(error.is_connect(), "{error:?}");
}
