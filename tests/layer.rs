//! The layer's behaviour through a real axum `Router`.

#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use bytes::Bytes;
use common::*;
use http_body::Frame;
use tower::ServiceExt;
use tower_idempotency::test_util::{Fault, FaultyStore, Op};
use tower_idempotency::{
    IdempotencyLayer, InFlightPolicy, MemoryStore, Retention, StoreErrorPolicy,
    fingerprint::{Fingerprint, FingerprintConfig},
    key::IdempotencyKey,
    problem::Rejection,
    store::{Begin, Store, StoreKey},
};

fn app_with(layer: IdempotencyLayer) -> (Router, Counter) {
    let counter = Counter::default();
    (router(counter.clone()).layer(layer), counter)
}

fn app() -> (Router, Counter) {
    app_with(IdempotencyLayer::new(MemoryStore::new()))
}

fn req(method: &str, key: Option<&str>) -> axum::http::request::Builder {
    let mut b = Request::builder().method(method).uri("/orders");
    if let Some(key) = key {
        b = b.header("idempotency-key", key);
    }
    b
}

/// A body that fails when it is read.
struct Unreadable;

impl http_body::Body for Unreadable {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Poll::Ready(Some(Err(std::io::Error::other("read"))))
    }
}

// 1. Covered methods.

#[tokio::test]
async fn uncovered_methods_pass_through_untouched_and_unbuffered() {
    let (app, counter) = app();
    for _ in 0..2 {
        let (status, headers, _) =
            send(&app, req("PUT", Some("k")).body(Body::from("x")).unwrap()).await;
        assert_eq!(status, StatusCode::CREATED);
        assert!(headers.get("idempotent-replayed").is_none());
    }
    assert_eq!(counter.get(), 2);

    // A body that fails when read: the layer must not read it for GET.
    let svc = tower::ServiceBuilder::new()
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .service_fn(
            |req: Request<tower_idempotency::RequestBody<Unreadable>>| async move {
                // The handler never reads the body either: it is untouched.
                assert!(matches!(
                    format!("{:?}", req.body()).as_str(),
                    "RequestBody(\"Stream\")"
                ));
                Ok::<_, Infallible>(axum::http::Response::new(http_body_util::Full::new(
                    Bytes::from_static(b"ok"),
                )))
            },
        );
    let r = Request::get("/orders")
        .header("idempotency-key", "k")
        .body(tower_idempotency::RequestBody::new(Unreadable))
        .unwrap();
    let res = svc.oneshot(r).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);

    // And a covered method reads it: the failure is a 400 problem.
    let svc = tower::ServiceBuilder::new()
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .service_fn(
            |_req: Request<tower_idempotency::RequestBody<Unreadable>>| async move {
                Ok::<_, Infallible>(axum::http::Response::new(http_body_util::Full::new(
                    Bytes::new(),
                )))
            },
        );
    let r = Request::post("/orders")
        .header("idempotency-key", "k")
        .body(tower_idempotency::RequestBody::new(Unreadable))
        .unwrap();
    let res = svc.oneshot(r).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        res.extensions().get::<Rejection>(),
        Some(&Rejection::BodyUnreadable)
    );
}

#[tokio::test]
async fn methods_are_configurable() {
    let (app, counter) =
        app_with(IdempotencyLayer::new(MemoryStore::new()).with_methods([axum::http::Method::PUT]));
    let (first, _, _) = send(&app, req("PUT", Some("k")).body(Body::from("x")).unwrap()).await;
    let (second, headers, _) =
        send(&app, req("PUT", Some("k")).body(Body::from("x")).unwrap()).await;
    assert_eq!((first, second), (StatusCode::CREATED, StatusCode::CREATED));
    assert_eq!(headers["idempotent-replayed"], "true", "PUT is covered");
    assert_eq!(counter.get(), 1);
    for _ in 0..2 {
        let (status, headers, _) = call_post(&app, Some("k2"), "x").await;
        assert_eq!(status, StatusCode::CREATED);
        assert!(
            headers.get("idempotent-replayed").is_none(),
            "POST is not covered"
        );
    }
    assert_eq!(counter.get(), 3, "POST is no longer covered");
}

// 2. Keys.

#[tokio::test]
async fn sf_string_and_bare_token_name_the_same_key() {
    let (app, counter) = app();
    let (s1, _, b1) = call_post(&app, Some("\"order-1\""), "{}").await;
    let (s2, h2, b2) = call_post(&app, Some("order-1"), "{}").await;
    assert_eq!(s1, StatusCode::CREATED);
    assert_eq!((s2, b2), (s1, b1));
    assert_eq!(h2["idempotent-replayed"], "true");
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn missing_key_passes_through_unless_required() {
    let (app, counter) = app();
    call_post(&app, None, "{}").await;
    call_post(&app, None, "{}").await;
    assert_eq!(counter.get(), 2);

    let (app, counter) = app_with(IdempotencyLayer::new(MemoryStore::new()).with_require_key(true));
    let (status, headers, body) = call_post(&app, None, "{}").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        problem_type(&problem(status, &headers, &body)),
        "key-missing"
    );
    assert_eq!(counter.get(), 0);
}

#[tokio::test]
async fn invalid_keys_are_400_problems() {
    let (app, counter) = app();
    let long = "k".repeat(256);
    for bad in [
        "",
        "\"\"",
        "a b",
        "\"unterminated",
        long.as_str(),
        "caf\u{e9}",
    ] {
        let r = post_req(None)
            .header(
                "idempotency-key",
                axum::http::HeaderValue::from_bytes(bad.as_bytes()).unwrap(),
            )
            .body(Body::from("{}"))
            .unwrap();
        let (status, headers, body) = send(&app, r).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad:?}");
        assert_eq!(
            problem_type(&problem(status, &headers, &body)),
            "key-invalid"
        );
    }
    // Two key fields.
    let r = post_req(Some("a"))
        .header("idempotency-key", "b")
        .body(Body::from("{}"))
        .unwrap();
    let (status, _, _) = send(&app, r).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(counter.get(), 0);
}

#[tokio::test]
async fn key_header_and_bounds_are_configurable() {
    let (app, counter) = app_with(
        IdempotencyLayer::new(MemoryStore::new())
            .with_header(axum::http::HeaderName::from_static("x-delivery-id"))
            .with_key_length(4, 8),
    );
    let send_with = |id: &'static str| {
        post_req(None)
            .header("x-delivery-id", id)
            .body(Body::from("{}"))
            .unwrap()
    };
    assert_eq!(send(&app, send_with("abcd")).await.0, StatusCode::CREATED);
    assert_eq!(
        send(&app, send_with("abcd")).await.1["idempotent-replayed"],
        "true"
    );
    assert_eq!(
        send(&app, send_with("abc")).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        send(&app, send_with("abcdefghi")).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(counter.get(), 1);
}

// 3. Body limit.

#[tokio::test]
async fn oversized_request_body_is_413_before_the_store() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let (app, counter) =
        app_with(IdempotencyLayer::from_arc(store.clone()).with_max_request_body(16));
    // Declared by Content-Length.
    let (status, headers, body) = call_post(&app, Some("k"), &"x".repeat(17)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        problem_type(&problem(status, &headers, &body)),
        "body-too-large"
    );
    // Streamed without a length.
    let chunks: Vec<Result<Frame<Bytes>, Infallible>> = (0..5)
        .map(|_| Ok(Frame::data(Bytes::from_static(b"abcd"))))
        .collect();
    let stream = http_body_util::StreamBody::new(tokio_stream_from(chunks));
    let r = post_req(Some("k")).body(Body::new(stream)).unwrap();
    let (status, _, _) = send(&app, r).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(store.calls(Op::Begin), 0);
    assert_eq!(counter.get(), 0);
    // At the limit it runs.
    assert_eq!(
        call_post(&app, Some("k"), &"x".repeat(16)).await.0,
        StatusCode::CREATED
    );
}

/// A declared `Content-Length` over the limit is refused before a byte is
/// read (the body here fails if it is read, which would be a 400); one at
/// the limit is read and runs.
#[tokio::test]
async fn a_declared_length_over_the_limit_is_refused_unread() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let (app, counter) =
        app_with(IdempotencyLayer::from_arc(store.clone()).with_max_request_body(16));
    for declared in ["17", "1000000"] {
        let r = post_req(Some("k"))
            .header("content-length", declared)
            .body(Body::new(Unreadable))
            .unwrap();
        let (status, headers, body) = send(&app, r).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "declared {declared}");
        assert_eq!(
            problem_type(&problem(status, &headers, &body)),
            "body-too-large"
        );
    }
    assert_eq!(store.calls(Op::Begin), 0);
    let r = post_req(Some("k"))
        .header("content-length", "16")
        .body(Body::from("x".repeat(16)))
        .unwrap();
    assert_eq!(send(&app, r).await.0, StatusCode::CREATED);
    assert_eq!(counter.get(), 1);
}

fn tokio_stream_from<T: Unpin + Send + 'static>(
    items: Vec<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::iter(items)
}

/// The layer is ready when, and only when, the inner service is, and
/// passes on its error.
#[test]
fn readiness_is_the_inner_services() {
    use tower::{Layer, Service};
    #[derive(Clone)]
    struct Gate(Option<&'static str>);
    impl Service<Request<Body>> for Gate {
        type Response = axum::http::Response<Body>;
        type Error = &'static str;
        type Future = std::future::Ready<Result<Self::Response, &'static str>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), &'static str>> {
            match self.0 {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            }
        }
        fn call(&mut self, _: Request<Body>) -> Self::Future {
            std::future::ready(Err("called"))
        }
    }
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let layer = IdempotencyLayer::new(MemoryStore::new());
    assert!(layer.layer(Gate(None)).poll_ready(&mut cx).is_pending());
    assert_eq!(
        layer.layer(Gate(Some("down"))).poll_ready(&mut cx),
        Poll::Ready(Err("down"))
    );
}

/// `Debug` shows the settings and the inner service, as tower-http's
/// layers do.
#[test]
fn debug_shows_the_settings_and_the_inner_service() {
    use tower::Layer;
    let layer = IdempotencyLayer::new(MemoryStore::new()).with_max_request_body(16);
    let shown = format!("{layer:?}");
    assert!(shown.starts_with("IdempotencyLayer {"), "{shown}");
    assert!(shown.contains("max_request_body: 16"), "{shown}");
    #[derive(Clone, Debug)]
    struct Inner;
    let service = layer.layer(Inner);
    assert_eq!(format!("{service:?}"), "Idempotency { inner: Inner, .. }");
}

// 4. begin outcomes.

#[tokio::test]
async fn replay_is_exact_and_marked() {
    let (app, counter) = app();
    let (s1, h1, b1) = call_post(&app, Some("k"), "{\"item\":\"book\"}").await;
    let (s2, h2, b2) = call_post(&app, Some("k"), "{\"item\":\"book\"}").await;
    assert_eq!(counter.get(), 1);
    assert_eq!(s2, s1);
    assert_eq!(b2, b1);
    assert_eq!(&b2[..], b"{\"item\":\"book\"}");
    let cookies: Vec<_> = h2.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert_eq!(h2["x-execution"], h1["x-execution"]);
    assert_eq!(h2["idempotent-replayed"], "true");
    assert!(h1.get("idempotent-replayed").is_none());
    // Hop-by-hop headers and Date are not replayed.
    assert!(h2.get("keep-alive").is_none());
    assert!(h2.get("date").is_none());
}

#[tokio::test]
async fn different_request_under_a_used_key_is_422() {
    let (app, counter) = app();
    call_post(&app, Some("k"), "{\"qty\":1}").await;
    let (status, headers, body) = call_post(&app, Some("k"), "{\"qty\":2}").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        problem_type(&problem(status, &headers, &body)),
        "key-reused"
    );
    // Another method on the same key: also a different request.
    let (status, _, _) = send(
        &app,
        req("PATCH", Some("k"))
            .body(Body::from("{\"qty\":1}"))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn same_body_under_another_key_is_not_a_conflict() {
    let (app, counter) = app();
    call_post(&app, Some("k1"), "{\"qty\":1}").await;
    assert_eq!(
        call_post(&app, Some("k2"), "{\"qty\":1}").await.0,
        StatusCode::CREATED
    );
    assert_eq!(counter.get(), 2);
}

#[tokio::test]
async fn in_flight_duplicate_is_409_and_mismatch_wins() {
    let (app, counter) = app();
    let first = {
        let app = app.clone();
        tokio::spawn(async move {
            send(
                &app,
                post_req(Some("k"))
                    .header("x-delay-ms", "300")
                    .body(Body::from("a"))
                    .unwrap(),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, headers, body) = send(
        &app,
        post_req(Some("k"))
            .header("x-delay-ms", "300")
            .body(Body::from("a"))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(
        problem_type(&problem(status, &headers, &body)),
        "request-in-flight"
    );
    // A different body while in flight: 422, not 409.
    let (status, _, _) = call_post(&app, Some("k"), "b").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(first.await.unwrap().0, StatusCode::CREATED);
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn wait_policy_replays_when_the_first_finishes() {
    let (app, counter) = app_with(
        IdempotencyLayer::new(MemoryStore::new())
            .with_in_flight(InFlightPolicy::Wait(Duration::from_secs(5))),
    );
    let slow = |app: Router| async move {
        send(
            &app,
            post_req(Some("k"))
                .header("x-delay-ms", "300")
                .body(Body::from("a"))
                .unwrap(),
        )
        .await
    };
    let first = tokio::spawn(slow(app.clone()));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = std::time::Instant::now();
    let (status, headers, _) = slow(app.clone()).await;
    let waited = started.elapsed();
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    // Woken by the completion (about 250 ms), not by the 5 s bound.
    assert!(waited < Duration::from_secs(2), "{waited:?}");
    first.await.unwrap();
    assert_eq!(counter.get(), 1);

    // The bound passes first: 409.
    let (app, _) = app_with(
        IdempotencyLayer::new(MemoryStore::new())
            .with_in_flight(InFlightPolicy::Wait(Duration::from_millis(50))),
    );
    let first = tokio::spawn(slow(app.clone()));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(slow(app.clone()).await.0, StatusCode::CONFLICT);
    first.await.unwrap();
}

/// On a paused clock the wait ends exactly at its bound: the duplicate
/// gets its 409 then, after one wait, and does not ask the store again.
#[tokio::test(start_paused = true)]
async fn wait_policy_answers_409_exactly_at_the_bound() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let (app, counter) = app_with(
        IdempotencyLayer::from_arc(store.clone())
            .with_in_flight(InFlightPolicy::Wait(Duration::from_millis(50))),
    );
    let slow = |app: Router| async move {
        send(
            &app,
            post_req(Some("k"))
                .header("x-delay-ms", "1000")
                .body(Body::from("a"))
                .unwrap(),
        )
        .await
    };
    let first = tokio::spawn(slow(app.clone()));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let started = tokio::time::Instant::now();
    assert_eq!(slow(app.clone()).await.0, StatusCode::CONFLICT);
    assert_eq!(started.elapsed(), Duration::from_millis(50));
    // The first request's begin, and the duplicate's two: before and after
    // its one wait.
    assert_eq!(store.calls(Op::Begin), 3);
    assert_eq!(first.await.unwrap().0, StatusCode::CREATED);
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn hundred_concurrent_duplicates_run_once() {
    let (app, counter) = app();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            send(
                &app,
                post_req(Some("storm"))
                    .header("x-delay-ms", "100")
                    .body(Body::from("{}"))
                    .unwrap(),
            )
            .await
        }));
    }
    let mut created = 0;
    for t in tasks {
        let (status, headers, _) = t.await.unwrap();
        match status {
            StatusCode::CREATED if headers.get("idempotent-replayed").is_none() => created += 1,
            StatusCode::CREATED | StatusCode::CONFLICT => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(created, 1);
    assert_eq!(counter.get(), 1);
}

// 5. Recording policy.

#[tokio::test]
async fn server_errors_are_released_and_retried() {
    let (app, counter) = app();
    let fail = || {
        post_req(Some("k"))
            .header("x-status", "500")
            .body(Body::from("{}"))
            .unwrap()
    };
    assert_eq!(
        send(&app, fail()).await.0,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        send(&app, fail()).await.0,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(counter.get(), 2);
    // Rate limits and credentials are not recorded either.
    for status in ["429", "401"] {
        let r = || {
            post_req(Some(status))
                .header("x-status", status)
                .body(Body::from("{}"))
                .unwrap()
        };
        send(&app, r()).await;
        send(&app, r()).await;
    }
    assert_eq!(counter.get(), 6);
    // A 404 is.
    let r = || {
        post_req(Some("nf"))
            .header("x-status", "404")
            .body(Body::from("{}"))
            .unwrap()
    };
    send(&app, r()).await;
    assert_eq!(send(&app, r()).await.1["idempotent-replayed"], "true");
    assert_eq!(counter.get(), 7);
}

#[tokio::test]
async fn recording_policy_is_configurable() {
    let (app, counter) = app_with(
        IdempotencyLayer::new(MemoryStore::new())
            .with_record_if(|s| s.is_success() || s.is_server_error()),
    );
    let r = || {
        post_req(Some("k"))
            .header("x-status", "503")
            .body(Body::from("{}"))
            .unwrap()
    };
    send(&app, r()).await;
    assert_eq!(send(&app, r()).await.1["idempotent-replayed"], "true");
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn handler_panic_is_500_and_releases_the_key() {
    let (app, counter) = app();
    let (status, headers, body) = send(
        &app,
        post_req(Some("k"))
            .header("x-panic", "1")
            .body(Body::from("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        problem_type(&problem(status, &headers, &body)),
        "handler-panicked"
    );
    let (status, _, _) = call_post(&app, Some("k"), "{}").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(counter.get(), 2);
}

#[tokio::test]
async fn inner_error_releases_the_key() {
    let store = Arc::new(MemoryStore::new());
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = calls.clone();
    let svc = tower::ServiceBuilder::new()
        .layer(IdempotencyLayer::from_arc(store.clone()))
        .service_fn(move |_req: Request<Body>| {
            let n = c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                if n == 0 {
                    Err(std::io::Error::other("inner failure"))
                } else {
                    Ok(axum::http::Response::new(Body::from("ok")))
                }
            }
        });
    let r = || post_req(Some("k")).body(Body::from("{}")).unwrap();
    assert!(
        svc.clone().oneshot(r()).await.is_err(),
        "the inner error type is kept"
    );
    let res = svc.clone().oneshot(r()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn handler_overrides_recording_per_response() {
    async fn h(headers: axum::http::HeaderMap) -> axum::response::Response {
        use axum::response::IntoResponse;
        match headers["x-mode"].to_str().unwrap() {
            "skip" => (
                StatusCode::OK,
                axum::Extension(Retention::DoNotRecord),
                "skip",
            )
                .into_response(),
            "force" => (
                StatusCode::BAD_GATEWAY,
                axum::Extension(Retention::Record),
                "force",
            )
                .into_response(),
            _ => (
                StatusCode::OK,
                axum::Extension(Retention::RecordFor(Duration::from_secs(60))),
                "short",
            )
                .into_response(),
        }
    }
    let app = Router::new()
        .route("/orders", post(h))
        .layer(IdempotencyLayer::new(MemoryStore::new()));
    let r = |key: &str, mode: &str| {
        post_req(Some(key))
            .header("x-mode", mode)
            .body(Body::from("{}"))
            .unwrap()
    };
    // Not recorded, and the key is released at once: the retry runs again
    // (a 200 of its own, not a replay, and not a 409 from a lock left
    // behind until its lease ends).
    let (status, _, _) = send(&app, r("a", "skip")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, headers, body) = send(&app, r("a", "skip")).await;
    assert_eq!(status, StatusCode::OK, "the key was not released");
    assert!(headers.get("idempotent-replayed").is_none());
    assert_eq!(body, "skip");
    send(&app, r("b", "force")).await;
    let (status, headers, _) = send(&app, r("b", "force")).await;
    assert_eq!(
        (status, &headers["idempotent-replayed"]),
        (
            StatusCode::BAD_GATEWAY,
            &"true".parse::<axum::http::HeaderValue>().unwrap()
        )
    );
    send(&app, r("c", "ttl")).await;
    assert_eq!(
        send(&app, r("c", "ttl")).await.1["idempotent-replayed"],
        "true"
    );
    tokio::time::advance(Duration::from_secs(61)).await;
    assert!(
        send(&app, r("c", "ttl"))
            .await
            .1
            .get("idempotent-replayed")
            .is_none(),
        "expired after its own ttl"
    );
}

#[tokio::test(start_paused = true)]
async fn records_expire_after_the_ttl() {
    let (app, counter) =
        app_with(IdempotencyLayer::new(MemoryStore::new()).with_ttl(Duration::from_secs(3600)));
    call_post(&app, Some("k"), "{}").await;
    tokio::time::advance(Duration::from_secs(3599)).await;
    assert_eq!(
        call_post(&app, Some("k"), "{}").await.1["idempotent-replayed"],
        "true"
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(
        call_post(&app, Some("k"), "{}")
            .await
            .1
            .get("idempotent-replayed")
            .is_none()
    );
    assert_eq!(counter.get(), 2);
}

// 6. Run to completion.

#[tokio::test]
async fn dropped_request_still_completes_and_the_retry_replays() {
    let (app, counter) = app();
    let r = || {
        post_req(Some("k"))
            .header("x-delay-ms", "200")
            .body(Body::from("{}"))
            .unwrap()
    };
    // The client gives up after 50 ms: the response future is dropped.
    let res = tokio::time::timeout(Duration::from_millis(50), app.clone().oneshot(r())).await;
    assert!(res.is_err());
    assert_eq!(counter.get(), 1, "the handler had started");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, headers, _) = send(&app, r()).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(counter.get(), 1);
}

// 7. Lease and heartbeat.

#[tokio::test(start_paused = true)]
async fn heartbeat_keeps_a_long_handler_locked() {
    let (app, counter) =
        app_with(IdempotencyLayer::new(MemoryStore::new()).with_lease(Duration::from_secs(3)));
    let r = || {
        post_req(Some("k"))
            .header("x-delay-ms", "10000")
            .body(Body::from("{}"))
            .unwrap()
    };
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, r()).await }
    });
    // Three leases later, the lock is still held.
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(send(&app, r()).await.0, StatusCode::CONFLICT);
    assert_eq!(first.await.unwrap().0, StatusCode::CREATED);
    assert_eq!(send(&app, r()).await.1["idempotent-replayed"], "true");
    assert_eq!(counter.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_dead_holders_lock_is_taken_over_after_the_lease() {
    let store = Arc::new(MemoryStore::new());
    let layer = IdempotencyLayer::from_arc(store.clone());
    let (app, counter) = app_with(layer);
    // A live handler whose client left keeps its lock.
    let r = || {
        post_req(Some("k"))
            .header("x-delay-ms", "100000000")
            .body(Body::from("{}"))
            .unwrap()
    };
    let stuck = tokio::spawn({
        let app = app.clone();
        async move { send(&app, r()).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    stuck.abort(); // the client is gone, but the handler runs on: still locked
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        call_post(&app, Some("k"), "{}").await.0,
        StatusCode::CONFLICT,
        "heartbeats keep a live handler's lock"
    );
    assert_eq!(counter.get(), 1);

    // A lock whose holder is truly gone (no heartbeat) lapses after the lease.
    let dead_key = StoreKey::from_bytes([42; 32]);
    let fp = Fingerprint::from_bytes([1; 32]);
    assert!(matches!(
        store
            .begin(&dead_key, &fp, Duration::from_secs(30))
            .await
            .unwrap(),
        Begin::Acquired(_)
    ));
    assert!(matches!(
        store
            .begin(&dead_key, &fp, Duration::from_secs(30))
            .await
            .unwrap(),
        Begin::InFlight { .. }
    ));
    tokio::time::advance(Duration::from_secs(31)).await;
    assert!(matches!(
        store
            .begin(&dead_key, &fp, Duration::from_secs(30))
            .await
            .unwrap(),
        Begin::Acquired(_)
    ));
}

// 8. Store failure.

#[tokio::test]
async fn store_failure_is_503_or_fails_open() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    store.inject(Op::Begin, Fault::Fail, 1);
    let (app, counter) = app_with(IdempotencyLayer::from_arc(store.clone()));
    let (status, headers, body) = call_post(&app, Some("k"), "{}").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(
        problem_type(&problem(status, &headers, &body)),
        "store-unavailable"
    );
    assert_eq!(counter.get(), 0);

    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    store.inject(Op::Begin, Fault::Fail, 1);
    let (app, counter) = app_with(
        IdempotencyLayer::from_arc(store.clone())
            .with_store_error_policy(StoreErrorPolicy::FailOpen),
    );
    assert_eq!(
        call_post(&app, Some("k"), "{}").await.0,
        StatusCode::CREATED
    );
    assert_eq!(counter.get(), 1);
}

/// Failing open is for a store that cannot answer; a store that answers
/// with a record it cannot read has seen the request run, so even
/// `FailOpen` answers 503 and the handler does not run again.
#[tokio::test]
async fn an_unreadable_record_fails_closed_even_when_failing_open() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    store.inject(Op::Begin, Fault::Corrupt, 1);
    let (app, counter) = app_with(
        IdempotencyLayer::from_arc(store.clone())
            .with_store_error_policy(StoreErrorPolicy::FailOpen),
    );
    let (status, headers, body) = call_post(&app, Some("k"), "{}").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    problem(status, &headers, &body);
    assert_eq!(counter.get(), 0, "the handler ran on an unreadable record");
    // The next call reads the store normally again.
    assert_eq!(
        call_post(&app, Some("k"), "{}").await.0,
        StatusCode::CREATED
    );
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn hung_store_is_bounded_by_the_timeout() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    store.inject(Op::Begin, Fault::Hang, 1);
    let (app, counter) = app_with(
        IdempotencyLayer::from_arc(store.clone()).with_store_timeout(Duration::from_millis(100)),
    );
    let started = std::time::Instant::now();
    assert_eq!(
        call_post(&app, Some("k"), "{}").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(counter.get(), 0);
}

#[tokio::test]
async fn failed_completion_still_answers_and_is_retried() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    store.inject(Op::Complete, Fault::Fail, 1);
    let (app, counter) = app_with(IdempotencyLayer::from_arc(store.clone()));
    let (status, _, body) = call_post(&app, Some("k"), "{\"a\":1}").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(&body[..], b"{\"a\":1}");
    // The background retry writes the record.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.calls(Op::Complete), 2);
    assert_eq!(
        call_post(&app, Some("k"), "{\"a\":1}").await.1["idempotent-replayed"],
        "true"
    );
    assert_eq!(counter.get(), 1);
}

// 9. Oversized responses.

#[tokio::test]
async fn oversized_response_reaches_the_client_and_leaves_a_tombstone() {
    let (app, counter) =
        app_with(IdempotencyLayer::new(MemoryStore::new()).with_max_response_body(1024));
    let r = || {
        post_req(Some("k"))
            .header("x-size", "5000")
            .body(Body::from("{}"))
            .unwrap()
    };
    let (status, _, body) = send(&app, r()).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body.len(), 5000);
    let (status, headers, body) = send(&app, r()).await;
    assert_eq!(status, StatusCode::GONE);
    let p = problem(status, &headers, &body);
    assert_eq!(problem_type(&p), "response-not-stored");
    assert_eq!(p["original_status"], 201);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(counter.get(), 1, "never runs again");
}

// 10. Scope.

#[tokio::test]
async fn scopes_separate_tenants() {
    let (app, counter) = app_with(
        IdempotencyLayer::new(MemoryStore::new()).with_scope(|parts| {
            parts
                .headers
                .get("x-tenant")?
                .to_str()
                .ok()
                .map(str::to_owned)
        }),
    );
    let r = |tenant: &str| {
        post_req(Some("same-key"))
            .header("x-tenant", tenant)
            .body(Body::from("{}"))
            .unwrap()
    };
    let (_, a1, _) = send(&app, r("a")).await;
    let (_, b1, _) = send(&app, r("b")).await;
    assert!(
        b1.get("idempotent-replayed").is_none(),
        "tenant b never sees tenant a's response"
    );
    assert_ne!(a1["x-execution"], b1["x-execution"]);
    let (_, a2, _) = send(&app, r("a")).await;
    assert_eq!(a2["x-execution"], a1["x-execution"]);
    assert_eq!(counter.get(), 2);
}

// 11. The key in the extensions.

#[tokio::test]
async fn handler_sees_the_validated_key() {
    async fn h(axum::Extension(key): axum::Extension<IdempotencyKey>) -> String {
        format!("{}|{}", key.as_str(), key.derive("psp"))
    }
    let app = Router::new()
        .route("/orders", post(h))
        .layer(IdempotencyLayer::new(MemoryStore::new()));
    let (_, _, body) = call_post(&app, Some("\"abc\""), "{}").await;
    let body = String::from_utf8(body.to_vec()).unwrap();
    let (key, derived) = body.split_once('|').unwrap();
    assert_eq!(key, "abc");
    assert_eq!(derived.len(), 64);
}

// 12. Composition.

#[tokio::test]
async fn composes_with_route_layer_from_fn_and_tower_http() {
    use axum::middleware::{self, Next};
    async fn mark(req: axum::extract::Request, next: Next) -> axum::response::Response {
        let mut res = next.run(req).await;
        res.headers_mut().insert("x-outer", "1".parse().unwrap());
        res
    }
    let counter = Counter::default();
    let app = Router::new()
        .route("/orders", post(handler))
        .route_layer(IdempotencyLayer::new(MemoryStore::new()).with_require_key(true))
        .layer(middleware::from_fn(mark))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(1024))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(counter.clone());
    let (status, headers, _) = call_post(&app, Some("k"), "{}").await;
    assert_eq!(
        (status, &headers["x-outer"]),
        (
            StatusCode::CREATED,
            &"1".parse::<axum::http::HeaderValue>().unwrap()
        )
    );
    assert_eq!(
        call_post(&app, Some("k"), "{}").await.1["idempotent-replayed"],
        "true"
    );

    // The other order: the layer outermost, from_fn and tower-http inside.
    let app = Router::new()
        .route("/orders", post(handler))
        .layer(middleware::from_fn(mark))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(1024))
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .layer(middleware::from_fn(mark))
        .with_state(counter.clone());
    assert_eq!(
        call_post(&app, Some("k"), "{}").await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        call_post(&app, Some("k"), "{}").await.1["idempotent-replayed"],
        "true"
    );
    assert_eq!(counter.get(), 2);
}

#[tokio::test]
async fn rejections_are_in_the_extensions() {
    let (app, _) = app_with(IdempotencyLayer::new(MemoryStore::new()).with_require_key(true));
    let res = app
        .clone()
        .oneshot(post_req(None).body(Body::from("{}")).unwrap())
        .await
        .unwrap();
    assert_eq!(
        res.extensions().get::<Rejection>(),
        Some(&Rejection::KeyMissing)
    );
}

#[tokio::test]
async fn fingerprint_coverage_is_configurable() {
    let (app, counter) = app_with(
        IdempotencyLayer::new(MemoryStore::new())
            .with_fingerprint(FingerprintConfig::default().with_body(false)),
    );
    call_post(&app, Some("k"), "{\"qty\":1}").await;
    assert_eq!(
        call_post(&app, Some("k"), "{\"qty\":2}").await.1["idempotent-replayed"],
        "true"
    );
    assert_eq!(counter.get(), 1);
}

#[test]
fn layer_and_service_are_send_sync_clone() {
    fn assert_all<T: Send + Sync + Clone + 'static>() {}
    assert_all::<IdempotencyLayer>();
    assert_all::<tower_idempotency::Idempotency<axum::routing::Route>>();
}

#[tokio::test]
async fn every_decision_is_an_outcome_in_the_extensions() {
    use tower_idempotency::observe::Outcome;
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let (app, _) = app_with(
        IdempotencyLayer::from_arc(store.clone())
            .with_max_response_body(64)
            .with_store_error_policy(StoreErrorPolicy::FailClosed),
    );
    let outcome = |r: Request<Body>| {
        let app = app.clone();
        async move {
            let res = app.oneshot(r).await.unwrap();
            *res.extensions().get::<Outcome>().unwrap()
        }
    };
    let r = |key: &str, body: &'static str| post_req(Some(key)).body(Body::from(body)).unwrap();
    assert_eq!(outcome(r("a", "1")).await, Outcome::Executed);
    assert_eq!(outcome(r("a", "1")).await, Outcome::Replayed);
    assert_eq!(outcome(r("a", "2")).await, Outcome::Mismatch);
    let r500 = post_req(Some("b"))
        .header("x-status", "500")
        .body(Body::from("1"))
        .unwrap();
    assert_eq!(outcome(r500).await, Outcome::Released);
    let big = post_req(Some("c"))
        .header("x-size", "100")
        .body(Body::from("1"))
        .unwrap();
    assert_eq!(outcome(big).await, Outcome::Tombstone);
    assert_eq!(outcome(r("c", "1")).await, Outcome::Tombstone);
    assert_eq!(outcome(r("\"", "1")).await, Outcome::Rejected);
    store.inject(Op::Begin, Fault::Fail, 1);
    assert_eq!(outcome(r("d", "1")).await, Outcome::StoreError);
    let slow = post_req(Some("e"))
        .header("x-delay-ms", "300")
        .body(Body::from("1"))
        .unwrap();
    let first = tokio::spawn(outcome(slow));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(outcome(r("e", "1")).await, Outcome::Conflict);
    assert_eq!(first.await.unwrap(), Outcome::Executed);
}

/// The fault injector on a `MemoryStore`, declaring `caps`: transactional
/// (it then hands the handler an attachment, as a transactional store
/// hands over its transaction), or with a record size limit, which its
/// `complete` enforces (as DynamoDB's item limit does).
struct Declared {
    inner: FaultyStore<MemoryStore>,
    caps: tower_idempotency::store::Capabilities,
}

impl Declared {
    fn transactional() -> Self {
        Self {
            inner: FaultyStore::new(MemoryStore::new()),
            caps: tower_idempotency::store::Capabilities::new().with_transactional(true),
        }
    }

    fn limited(max: usize) -> Self {
        Self {
            inner: FaultyStore::new(MemoryStore::new()),
            caps: tower_idempotency::store::Capabilities::new().with_max_record_size(max),
        }
    }
}

#[derive(Clone)]
struct Attached(#[allow(dead_code)] tower_idempotency::store::LockToken);

#[async_trait::async_trait]
impl Store for Declared {
    async fn begin(
        &self,
        key: &StoreKey,
        fp: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, tower_idempotency::store::StoreError> {
        self.inner.begin(key, fp, lease).await
    }
    async fn complete(
        &self,
        key: &StoreKey,
        token: &tower_idempotency::store::LockToken,
        record: &tower_idempotency::record::Record,
        ttl: Duration,
    ) -> Result<bool, tower_idempotency::store::StoreError> {
        let size = record.encode().len();
        if let Some(max) = self.caps.max_record_size().filter(|max| size > *max) {
            return Err(tower_idempotency::store::StoreError::backend(format!(
                "a record of {size} bytes, over {max}"
            )));
        }
        self.inner.complete(key, token, record, ttl).await
    }
    async fn release(
        &self,
        key: &StoreKey,
        token: &tower_idempotency::store::LockToken,
    ) -> Result<bool, tower_idempotency::store::StoreError> {
        self.inner.release(key, token).await
    }
    async fn extend(
        &self,
        key: &StoreKey,
        token: &tower_idempotency::store::LockToken,
        lease: Duration,
    ) -> Result<bool, tower_idempotency::store::StoreError> {
        self.inner.extend(key, token, lease).await
    }
    fn attachment(
        &self,
        _key: &StoreKey,
        token: &tower_idempotency::store::LockToken,
    ) -> Option<tower_idempotency::store::Attachment> {
        self.caps
            .is_transactional()
            .then(|| tower_idempotency::store::Attachment::new(Attached(*token)))
    }
    fn capabilities(&self) -> tower_idempotency::store::Capabilities {
        self.caps
    }
}

#[tokio::test]
async fn transactional_store_hooks() {
    let store = Arc::new(Declared::transactional());
    async fn h(attached: Option<axum::Extension<Attached>>) -> (StatusCode, &'static str) {
        assert!(attached.is_some(), "the store's state reaches the handler");
        (StatusCode::CREATED, "written in the transaction")
    }
    let app = Router::new()
        .route("/orders", post(h))
        .layer(IdempotencyLayer::from_arc(store.clone()));
    // The commit fails: the handler's writes are gone, so its 201 must not
    // reach the client, and the write is not retried in the background.
    store.inner.inject(Op::Complete, Fault::Fail, 1);
    let (status, headers, body) = call_post(&app, Some("k"), "{}").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        problem_type(&problem(status, &headers, &body)),
        "store-unavailable"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.inner.calls(Op::Complete), 1);
    // A healthy commit answers normally.
    let (status, _, _) = call_post(&app, Some("k2"), "{}").await;
    assert_eq!(status, StatusCode::CREATED);
}

/// A transactional store whose lock lapsed while the handler ran (every
/// heartbeat failed) refuses the record: its transaction, the handler's
/// writes with it, is gone, so the client gets 503, never the 201 of
/// writes that did not happen.
#[tokio::test(start_paused = true)]
async fn transactional_store_that_lost_its_lock_answers_503() {
    let store = Arc::new(Declared::transactional());
    async fn slow() -> (StatusCode, &'static str) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        (StatusCode::CREATED, "written in the transaction")
    }
    let app = Router::new()
        .route("/orders", post(slow))
        .layer(IdempotencyLayer::from_arc(store.clone()).with_lease(Duration::from_millis(300)));
    store.inner.inject(Op::Extend, Fault::Fail, 100);
    let (status, headers, body) = call_post(&app, Some("k"), "{}").await;
    assert_eq!(store.inner.calls(Op::Complete), 1);
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        problem_type(&problem(status, &headers, &body)),
        "store-unavailable"
    );
}

#[tokio::test]
async fn failed_release_is_retried_so_the_key_frees() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    store.inject(Op::Release, Fault::Fail, 1);
    let (app, counter) = app_with(IdempotencyLayer::from_arc(store.clone()));
    let fail = || {
        post_req(Some("k"))
            .header("x-status", "500")
            .body(Body::from("{}"))
            .unwrap()
    };
    assert_eq!(
        send(&app, fail()).await.0,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    // The release failed; the background retry frees the key well before
    // the 30 s lease would.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.calls(Op::Release), 2);
    assert_eq!(
        call_post(&app, Some("k"), "{}").await.0,
        StatusCode::CREATED
    );
    assert_eq!(counter.get(), 2);
}

/// On the method router's `route_layer`, as the README and the examples
/// attach it, the layer covers the route's handlers only: an unknown path
/// keeps the router's 404 and a method the route lacks its 405, with or
/// without a key, and neither is recorded. `Router::route_layer` still
/// wraps the 405, and `Router::layer` the fallback too, which is what the
/// docs warn of.
#[tokio::test]
async fn route_layer_leaves_404_and_405_to_the_router() {
    let counter = Counter::default();
    let layer = IdempotencyLayer::new(MemoryStore::new()).with_require_key(true);
    let routes = || {
        Router::new()
            .route("/orders", post(handler))
            .with_state(counter.clone())
    };
    let matched = Router::new()
        .route("/orders", post(handler).route_layer(layer.clone()))
        .with_state(counter.clone());
    let call = |app: &Router, method: &str, uri: &str, key: Option<&str>| {
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(key) = key {
            b = b.header("idempotency-key", key);
        }
        let req = b.body(Body::from("{}")).unwrap();
        let app = app.clone();
        async move { send(&app, req).await }
    };
    for key in [None, Some("k404"), Some("k404")] {
        let (status, headers, _) = call(&matched, "POST", "/nonexistent", key).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "key {key:?}");
        assert!(headers.get("idempotent-replayed").is_none());
    }
    for key in [None, Some("k405"), Some("k405")] {
        let (status, headers, _) = call(&matched, "PATCH", "/orders", key).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "key {key:?}");
        assert!(headers.get("idempotent-replayed").is_none());
    }
    // The matched route is covered as before.
    let (status, _, _) = call(&matched, "POST", "/orders", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a key is required");
    let (status, _, _) = call(&matched, "POST", "/orders", Some("k")).await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, headers, _) = call(&matched, "POST", "/orders", Some("k")).await;
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(counter.get(), 1);

    // `Router::route_layer` leaves the 404 alone, but wraps the 405.
    let router_wide = routes().route_layer(layer.clone());
    let (status, _, _) = call(&router_wide, "POST", "/nonexistent", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = call(&router_wide, "PATCH", "/orders", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // `Router::layer` wraps the fallback: the unknown path needs a key, and
    // its 404 is recorded and replayed.
    let everything = routes().layer(layer);
    let (status, _, _) = call(&everything, "POST", "/nonexistent", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    call(&everything, "POST", "/nonexistent", Some("n")).await;
    let (status, headers, _) = call(&everything, "POST", "/nonexistent", Some("n")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(headers["idempotent-replayed"], "true");
}

/// The service's own problem links: the `type` base and the `Link:
/// rel="describedby"` header on every rejection, a fresh `instance` per
/// occurrence, and `retryable` true for 409 and 503 only.
#[tokio::test]
async fn problem_documents_link_to_the_services_own_docs() {
    let docs = tower_idempotency::problem::ProblemDocs::new()
        .with_type_base("https://api.example.com/problems/")
        .with_describedby("https://api.example.com/docs/idempotency".parse().unwrap());
    let (app, counter) = app_with(IdempotencyLayer::new(MemoryStore::new()).with_problems(docs));

    let slow = |body: &'static str| {
        post_req(Some("k1"))
            .header("x-delay-ms", "300")
            .body(Body::from(body))
            .unwrap()
    };
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, slow("{}")).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, headers, body) = send(&app, slow("{}")).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let conflict = problem(status, &headers, &body);
    assert_eq!(
        conflict["type"],
        "https://api.example.com/problems/request-in-flight"
    );
    assert_eq!(conflict["retryable"], true);
    assert_eq!(
        headers["link"],
        "<https://api.example.com/docs/idempotency>; rel=\"describedby\"; type=\"text/html\""
    );
    assert_eq!(first.await.unwrap().0, StatusCode::CREATED);

    let (status, headers, body) = call_post(&app, Some("k1"), "{\"other\":1}").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let reused = problem(status, &headers, &body);
    assert_eq!(
        reused["type"],
        "https://api.example.com/problems/key-reused"
    );
    assert_eq!(reused["retryable"], false);
    assert!(headers.contains_key("link"));
    let (a, b) = (
        conflict["instance"].as_str().unwrap(),
        reused["instance"].as_str().unwrap(),
    );
    assert!(a.starts_with("urn:uuid:") && b.starts_with("urn:uuid:"));
    assert_ne!(a, b, "each occurrence has its own instance");
    assert_eq!(counter.get(), 1);

    // Without the option: this crate's docs, no Link header.
    let (plain, _) = app_with(IdempotencyLayer::new(MemoryStore::new()));
    let (status, headers, body) = call_post(&plain, Some("x x"), "{}").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let v = problem(status, &headers, &body);
    assert!(
        v["type"]
            .as_str()
            .unwrap()
            .starts_with(tower_idempotency::problem::TYPE_BASE)
    );
    assert!(headers.get("link").is_none());
    assert_eq!(v["retryable"], false);
}

/// The key as an axum extractor: the validated key behind the layer,
/// `None` for a request without one, and a 500 naming the mistake on a
/// route the layer does not cover.
#[cfg(feature = "axum")]
#[tokio::test]
async fn the_key_is_an_extractor() {
    use tower_idempotency::key::IdempotencyKey;

    async fn required(key: IdempotencyKey) -> String {
        key.as_str().to_owned()
    }
    async fn optional(key: Option<IdempotencyKey>) -> String {
        key.map_or_else(|| "none".to_owned(), |k| k.as_str().to_owned())
    }
    let layer = IdempotencyLayer::new(MemoryStore::new());
    let app = Router::new()
        .route("/required", post(required).route_layer(layer.clone()))
        .route("/optional", post(optional).route_layer(layer))
        .route("/uncovered", post(required));
    let call = |path: &'static str, key: Option<&'static str>| {
        let mut b = Request::builder().method("POST").uri(path);
        if let Some(key) = key {
            b = b.header("idempotency-key", key);
        }
        b.body(Body::empty()).unwrap()
    };
    let (status, _, body) = send(&app, call("/required", Some("\"k-1\""))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "k-1", "the unquoted key");
    let (_, _, body) = send(&app, call("/optional", Some("k-2"))).await;
    assert_eq!(body, "k-2");
    let (status, _, body) = send(&app, call("/optional", None)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "none");
    let (status, _, body) = send(&app, call("/uncovered", Some("k-3"))).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    if cfg!(debug_assertions) {
        assert!(String::from_utf8_lossy(&body).contains("IdempotencyLayer"));
    }
}

/// Browser clients: a CORS preflight allows the `Idempotency-Key` request
/// header, and a replay exposes `Idempotent-Replayed` to the page, with
/// tower-http's `CorsLayer` around the route, as the README shows.
#[tokio::test]
async fn cors_allows_the_key_and_exposes_the_replay_header() {
    use axum::http::{HeaderValue, Method, header};
    use tower_http::cors::CorsLayer;
    use tower_idempotency::key::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED};

    let counter = Counter::default();
    let cors = CorsLayer::new()
        .allow_origin(HeaderValue::from_static("https://shop.example"))
        .allow_methods([Method::POST])
        .allow_headers([header::CONTENT_TYPE, IDEMPOTENCY_KEY])
        .expose_headers([IDEMPOTENT_REPLAYED]);
    let app = router(counter.clone())
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .layer(cors);

    let preflight = Request::builder()
        .method("OPTIONS")
        .uri("/orders")
        .header("origin", "https://shop.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,idempotency-key",
        )
        .body(Body::empty())
        .unwrap();
    let (status, headers, _) = send(&app, preflight).await;
    assert!(status.is_success(), "{status}");
    let allowed = headers["access-control-allow-headers"].to_str().unwrap();
    assert!(allowed.contains("idempotency-key"), "{allowed}");
    assert_eq!(counter.get(), 0, "a preflight runs nothing");

    let post = || {
        post_req(Some("k"))
            .header("origin", "https://shop.example")
            .body(Body::from("{}"))
            .unwrap()
    };
    send(&app, post()).await;
    let (status, headers, _) = send(&app, post()).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    let exposed = headers["access-control-expose-headers"].to_str().unwrap();
    assert!(exposed.contains("idempotent-replayed"), "{exposed}");
    assert_eq!(counter.get(), 1);
}

/// The JSON fingerprint options through a Router: a reordered, respaced
/// body is the same request under `with_canonical_json`; under
/// `with_json_members`, only the selected members count; a body that is
/// not JSON is fingerprinted raw, never rejected.
#[tokio::test]
async fn json_fingerprints_through_a_router() {
    use tower_idempotency::fingerprint::FingerprintConfig;

    let (app, counter) = app_with(
        IdempotencyLayer::new(MemoryStore::new())
            .with_fingerprint(FingerprintConfig::default().with_canonical_json()),
    );
    let (status, _, _) = call_post(&app, Some("c1"), r#"{"amount":10,"to":"bob"}"#).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, headers, _) =
        call_post(&app, Some("c1"), "{ \"to\" : \"bob\",\n \"amount\": 10 }").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    let (status, _, _) = call_post(&app, Some("c1"), r#"{"amount":11,"to":"bob"}"#).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // Not JSON: raw bytes, the same bytes replay, others mismatch.
    assert_eq!(
        call_post(&app, Some("c2"), "amount=10").await.0,
        StatusCode::CREATED
    );
    let (status, headers, _) = call_post(&app, Some("c2"), "amount=10").await;
    assert_eq!(
        (status, &headers["idempotent-replayed"]),
        (StatusCode::CREATED, &"true".parse().unwrap())
    );
    assert_eq!(
        call_post(&app, Some("c2"), "amount=10 ").await.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(counter.get(), 2);

    let (app, counter) = app_with(
        IdempotencyLayer::new(MemoryStore::new()).with_fingerprint(
            FingerprintConfig::default()
                .with_json_members(["/amount", "/to"])
                .unwrap(),
        ),
    );
    call_post(
        &app,
        Some("m1"),
        r#"{"amount":10,"to":"bob","sent_at":"12:00:01"}"#,
    )
    .await;
    let (status, headers, _) = call_post(
        &app,
        Some("m1"),
        r#"{"sent_at":"12:00:09","to":"bob","amount":10}"#,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    let (status, _, _) = call_post(&app, Some("m1"), r#"{"amount":10,"to":"eve"}"#).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(counter.get(), 1);

    assert!(
        FingerprintConfig::default()
            .with_json_members(["amount"])
            .is_err()
    );
}

/// A response future says which path its request took: passed through (not
/// covered), answered at once (a rejection), or covered.
#[tokio::test]
async fn response_futures_say_which_path_they_take() {
    use tower::Service;
    let inner = tower::service_fn(|_req: Request<Body>| async {
        Ok::<_, Infallible>(axum::response::Response::new(Body::empty()))
    });
    let mut svc = tower_idempotency::Idempotency::new(inner, MemoryStore::new());
    std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
    let get = svc.call(req("GET", None).body(Body::empty()).unwrap());
    assert_eq!(format!("{get:?}"), "ResponseFuture(\"Passthrough\")");
    let malformed = svc.call(req("POST", Some("\"")).body(Body::empty()).unwrap());
    assert_eq!(format!("{malformed:?}"), "ResponseFuture(\"Ready\")");
    let covered = svc.call(req("POST", Some("\"k\"")).body(Body::empty()).unwrap());
    assert_eq!(format!("{covered:?}"), "ResponseFuture(\"Covered\")");
    assert_eq!(covered.await.unwrap().status(), StatusCode::OK);
}

// 13. Trailers.

type Framed = http_body_util::StreamBody<
    futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>,
>;

fn checksum_trailer() -> axum::http::HeaderMap {
    let mut t = axum::http::HeaderMap::new();
    t.insert("x-checksum", "c0ffee".parse().unwrap());
    t
}

/// `store` behind the layer around a service that answers 200 with
/// `body` and an `x-checksum` trailer, and counts its runs.
fn trailing_service(
    store: Arc<dyn Store>,
    body: &'static [u8],
    runs: Counter,
) -> tower_idempotency::Idempotency<
    impl tower::Service<
        Request<http_body_util::Full<Bytes>>,
        Response = axum::http::Response<Framed>,
        Error = Infallible,
        Future = impl Send,
    > + Clone,
> {
    use tower::Layer;
    IdempotencyLayer::from_arc(store).layer(tower::service_fn(
        move |_: Request<http_body_util::Full<Bytes>>| {
            runs.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let frames = vec![
                Ok(Frame::data(Bytes::from_static(body))),
                Ok(Frame::trailers(checksum_trailer())),
            ];
            async move {
                Ok::<_, Infallible>(axum::http::Response::new(http_body_util::StreamBody::new(
                    futures_util::stream::iter(frames),
                )))
            }
        },
    ))
}

/// Status, replay marker, body and trailers of one keyed POST.
async fn post_collect<S, B>(
    svc: &S,
    key: &str,
) -> (StatusCode, bool, Bytes, Option<axum::http::HeaderMap>)
where
    S: tower::Service<Request<http_body_util::Full<Bytes>>, Response = axum::http::Response<B>>
        + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    use http_body_util::BodyExt;
    let req = Request::post("/orders")
        .header("idempotency-key", key)
        .body(http_body_util::Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let res = svc.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let replayed = res.headers().contains_key("idempotent-replayed");
    let collected = res.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    (status, replayed, collected.to_bytes(), trailers)
}

/// What `trailing_service` answers with `b"signed"`, first or replayed.
fn signed(replayed: bool) -> (StatusCode, bool, Bytes, Option<axum::http::HeaderMap>) {
    let body = Bytes::from_static(b"signed");
    (StatusCode::OK, replayed, body, Some(checksum_trailer()))
}

#[tokio::test]
async fn trailers_are_recorded_and_replayed() {
    let runs = Counter::default();
    let svc = trailing_service(Arc::new(MemoryStore::new()), b"signed", runs.clone());
    assert_eq!(post_collect(&svc, "t").await, signed(false));
    assert_eq!(post_collect(&svc, "t").await, signed(true));
    assert_eq!(runs.get(), 1);
}

/// Trailers arrive after the body, so only then can the layer tell that
/// they push a record past the store's limit: a record exactly at the
/// limit is kept and replayed; one byte over, a tombstone (retries get
/// 410). The client gets the whole response either way.
#[tokio::test]
async fn trailers_past_the_stores_limit_leave_a_tombstone() {
    let exact = tower_idempotency::record::Record::response(
        Fingerprint::from_bytes([0; 32]),
        StatusCode::OK,
        Vec::new(),
        Bytes::from_static(b"signed"),
    )
    .with_trailers(vec![(
        axum::http::HeaderName::from_static("x-checksum"),
        axum::http::HeaderValue::from_static("c0ffee"),
    )])
    .encode()
    .len();
    let runs = Counter::default();
    let at = Arc::new(Declared::limited(exact));
    let svc = trailing_service(at, b"signed", runs.clone());
    assert_eq!(post_collect(&svc, "t").await, signed(false));
    assert_eq!(post_collect(&svc, "t").await, signed(true));

    let over = Arc::new(Declared::limited(exact - 1));
    let svc = trailing_service(over, b"signed", runs.clone());
    assert_eq!(post_collect(&svc, "t").await, signed(false));
    assert_eq!(post_collect(&svc, "t").await.0, StatusCode::GONE);
    assert_eq!(runs.get(), 2);
}
