//! `KeepBody`: the layer keeps the inner service's response body type.

#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use axum::http::{Request, Response, StatusCode};
use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::combinators::{BoxBody, UnsyncBoxBody};
use http_body_util::{BodyExt, Full};
use tower::{ServiceBuilder, ServiceExt};
use tower_idempotency::{IdempotencyLayer, MemoryStore, ResponseBody};

/// A body type of the application's own: its own bytes, or a response the
/// layer made, converted through `From<ResponseBody<Tagged>>`.
enum Tagged {
    Own(Option<Bytes>),
    Converted(UnsyncBoxBody<Bytes, Infallible>),
}

impl Body for Tagged {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Tagged::Own(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Tagged::Converted(body) => Pin::new(body).poll_frame(cx),
        }
    }
}

impl From<ResponseBody<Tagged>> for Tagged {
    fn from(body: ResponseBody<Tagged>) -> Self {
        Tagged::Converted(body.boxed_unsync())
    }
}

fn tagged_req(method: &str, path: &str, key: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(key) = key {
        b = b.header("idempotency-key", key);
    }
    b.body(Full::new(Bytes::from_static(b"{\"n\":1}"))).unwrap()
}

async fn read(body: Tagged) -> (bool, Bytes) {
    let converted = matches!(body, Tagged::Converted(_));
    (converted, body.collect().await.unwrap().to_bytes())
}

#[tokio::test]
async fn keep_body_hands_untouched_responses_on_as_they_are() {
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(MemoryStore::new()).keep_body_type())
        .service_fn(move |req: Request<Full<Bytes>>| {
            let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                let status = if req.uri().path() == "/fail" {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::CREATED
                };
                let mut res = Response::new(Tagged::Own(Some(Bytes::from(format!("run {n}")))));
                *res.status_mut() = status;
                Ok::<_, Infallible>(res)
            }
        });

    // The response type is the inner service's own body type.
    let call = |req| {
        let svc = svc.clone();
        async move {
            let res: Response<Tagged> = svc.oneshot(req).await.unwrap();
            let (parts, body) = res.into_parts();
            let (converted, bytes) = read(body).await;
            (parts.status, parts.headers, converted, bytes)
        }
    };

    // Not covered (GET), and covered without a key: the inner body as it is.
    let (status, _, converted, body) = call(tagged_req("GET", "/ok", None)).await;
    assert_eq!(
        (status, converted, &body[..]),
        (StatusCode::CREATED, false, &b"run 1"[..])
    );
    let (_, _, converted, body) = call(tagged_req("POST", "/ok", None)).await;
    assert_eq!((converted, &body[..]), (false, &b"run 2"[..]));

    // Covered, but not recorded (a 500 releases the key): still handed on
    // unconverted, whatever the `From` impl does.
    let (status, _, converted, body) = call(tagged_req("POST", "/fail", Some("f"))).await;
    assert_eq!(
        (status, converted, &body[..]),
        (StatusCode::INTERNAL_SERVER_ERROR, false, &b"run 3"[..])
    );

    // Recorded, then replayed: bodies the layer made, converted.
    let (status, headers, converted, body) = call(tagged_req("POST", "/ok", Some("k"))).await;
    assert_eq!(
        (status, converted, &body[..]),
        (StatusCode::CREATED, true, &b"run 4"[..])
    );
    assert!(headers.get("idempotent-replayed").is_none());
    let (status, headers, converted, body) = call(tagged_req("POST", "/ok", Some("k"))).await;
    assert_eq!(
        (status, converted, &body[..]),
        (StatusCode::CREATED, true, &b"run 4"[..])
    );
    assert_eq!(headers["idempotent-replayed"], "true");

    // A rejection is a problem document in the same body type.
    let (status, headers, converted, body) =
        call(tagged_req("POST", "/ok", Some("\"unterminated"))).await;
    assert_eq!((status, converted), (StatusCode::BAD_REQUEST, true));
    assert_eq!(headers["content-type"], "application/problem+json");
    assert!(!body.is_empty());

    assert_eq!(runs.load(Ordering::SeqCst), 4, "the replay ran nothing");
}

#[tokio::test]
async fn keep_body_works_with_boxed_bodies() {
    async fn boxed(
        _: Request<Full<Bytes>>,
    ) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
        Ok(Response::new(
            Full::new(Bytes::from_static(b"sync")).boxed(),
        ))
    }
    async fn unsync(
        _: Request<Full<Bytes>>,
    ) -> Result<Response<UnsyncBoxBody<Bytes, Infallible>>, Infallible> {
        Ok(Response::new(
            Full::new(Bytes::from_static(b"unsync")).boxed_unsync(),
        ))
    }
    let layer = IdempotencyLayer::new(MemoryStore::new()).keep_body_type();

    // The response body types are the services' own: naming them would not
    // compile otherwise.
    let svc = ServiceBuilder::new().layer(layer.clone()).service_fn(boxed);
    records_then_replays::<_, BoxBody<Bytes, Infallible>>(svc, "a", "sync").await;
    let svc = ServiceBuilder::new().layer(layer).service_fn(unsync);
    records_then_replays::<_, UnsyncBoxBody<Bytes, Infallible>>(svc, "b", "unsync").await;
}

/// Sends the same keyed POST twice: recorded, then replayed, with `body`.
async fn records_then_replays<S, B>(svc: S, key: &str, body: &str)
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    for replayed in [false, true] {
        let res = svc
            .clone()
            .oneshot(tagged_req("POST", "/", Some(key)))
            .await
            .unwrap();
        assert_eq!(res.headers().contains_key("idempotent-replayed"), replayed);
        assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), body);
    }
}

#[cfg(feature = "axum")]
mod axum_router {
    use axum::body::Body;
    use common::*;

    use super::*;

    fn app(layer: IdempotencyLayer<tower_idempotency::KeepBody>) -> (axum::Router, Counter) {
        let counter = Counter::default();
        (router(counter.clone()).layer(layer), counter)
    }

    #[tokio::test]
    async fn keep_body_under_router_layer_records_and_replays() {
        let (app, counter) = app(IdempotencyLayer::new(MemoryStore::new()).keep_body_type());
        let (status, headers, body) = call_post(&app, Some("k"), "{\"a\":1}").await;
        assert_eq!(
            (status, &body[..]),
            (StatusCode::CREATED, &b"{\"a\":1}"[..])
        );
        assert!(headers.get("idempotent-replayed").is_none());
        let (status, headers, body) = call_post(&app, Some("k"), "{\"a\":1}").await;
        assert_eq!(
            (status, &body[..]),
            (StatusCode::CREATED, &b"{\"a\":1}"[..])
        );
        assert_eq!(headers["idempotent-replayed"], "true");
        assert_eq!(headers["x-execution"], "1");

        let (status, headers, body) = call_post(&app, Some("k"), "{\"a\":2}").await;
        let p = problem(status, &headers, &body);
        assert_eq!(p["status"], 422);

        let get = Request::get("/orders").body(Body::from("g")).unwrap();
        let (status, _, body) = send(&app, get).await;
        assert_eq!((status, &body[..]), (StatusCode::CREATED, &b"g"[..]));
        assert_eq!(counter.get(), 2);
    }

    #[tokio::test]
    async fn keep_body_streams_an_oversized_response_whole() {
        let (app, counter) = app(IdempotencyLayer::new(MemoryStore::new())
            .with_max_response_body(1024)
            .keep_body_type());
        let r = || {
            post_req(Some("big"))
                .header("x-size", "5000")
                .body(Body::from("{}"))
                .unwrap()
        };
        let (status, _, body) = send(&app, r()).await;
        assert_eq!((status, body.len()), (StatusCode::CREATED, 5000));
        assert!(body.iter().all(|&b| b == b'z'));
        let (status, _, _) = send(&app, r()).await;
        assert_eq!(status, StatusCode::GONE);
        assert_eq!(counter.get(), 1);
    }
}
