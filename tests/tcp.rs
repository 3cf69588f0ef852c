//! Over real TCP sockets: client disconnects, and a plain hyper server.

#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::Counter;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceBuilder;
use tower_idempotency::{IdempotencyLayer, MemoryStore, RequestBody};

/// Sends one raw HTTP/1.1 request and reads the whole answer.
async fn http1(addr: SocketAddr, key: &str, body: &str, delay_ms: u64) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST /orders HTTP/1.1\r\nhost: test\r\nidempotency-key: {key}\r\nx-delay-ms: {delay_ms}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

#[tokio::test]
async fn client_disconnect_mid_handler_then_retry_replays() {
    let counter = Counter::default();
    let app = common::router(counter.clone()).layer(IdempotencyLayer::new(MemoryStore::new()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    // The first client sends its request and hangs up while the handler runs.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let body = "{\"item\":\"book\"}";
    let req = format!(
        "POST /orders HTTP/1.1\r\nhost: test\r\nidempotency-key: lost\r\nx-delay-ms: 300\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(counter.get(), 1, "the handler started");
    drop(stream);

    // While it still runs, a retry is told to wait.
    let (status, _, _) = http1(addr, "lost", body, 300).await;
    assert_eq!(status, 409);

    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, head, replay) = http1(addr, "lost", body, 300).await;
    assert_eq!(status, 201);
    assert!(head.contains("idempotent-replayed: true"), "{head}");
    assert_eq!(replay, body);
    assert_eq!(counter.get(), 1, "the handler ran once");
}

#[tokio::test]
async fn plain_hyper_server_with_one_map() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let svc = ServiceBuilder::new()
        .map_request(|req: Request<Incoming>| req.map(RequestBody::new))
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .service_fn(move |req: Request<RequestBody<Incoming>>| {
            let r = r.clone();
            async move {
                let n = r.fetch_add(1, Ordering::SeqCst) + 1;
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let mut res = Response::new(Full::new(Bytes::from(format!(
                    "run {n}: {}",
                    String::from_utf8_lossy(&body)
                ))));
                *res.status_mut() = http::StatusCode::CREATED;
                Ok::<_, Infallible>(res)
            }
        });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (io, _) = listener.accept().await.unwrap();
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(io), svc)
                    .await;
            });
        }
    });

    let (s1, _, b1) = http1(addr, "\"h1\"", "{\"a\":1}", 0).await;
    let (s2, h2, b2) = http1(addr, "h1", "{\"a\":1}", 0).await;
    assert_eq!((s1, s2), (201, 201));
    assert_eq!(b1, "run 1: {\"a\":1}");
    assert_eq!(b2, b1);
    assert!(h2.contains("idempotent-replayed: true"));
    let (s3, _, _) = http1(addr, "h1", "{\"a\":2}", 0).await;
    assert_eq!(s3, 422);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
