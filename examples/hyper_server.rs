//! The layer on a plain hyper server, without axum.
//!
//! Run with `cargo run --example hyper_server`, then:
//!
//! ```text
//! curl -i -X POST localhost:3004/ -H 'Idempotency-Key: "h1"' -d 'hello'
//! ```
//!
//! hyper's `Incoming` body cannot be rebuilt from bytes, so the request is
//! mapped once into [`RequestBody`] before the layer: that is the only
//! change from a bare hyper service.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tower::ServiceBuilder;
use tower_idempotency::{IdempotencyLayer, MemoryStore, RequestBody};

async fn handler(req: Request<RequestBody<Incoming>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = match req.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let id = uuid::Uuid::new_v4();
    let mut res = Response::new(Full::new(Bytes::from(format!(
        "created {id} from {} bytes\n",
        body.len()
    ))));
    *res.status_mut() = StatusCode::CREATED;
    Ok(res)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let svc = ServiceBuilder::new()
        .map_request(|req: Request<Incoming>| req.map(RequestBody::new))
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .service_fn(handler);

    let port = std::env::var("PORT").unwrap_or_else(|_| "3004".into());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    println!("listening on http://{}", listener.local_addr()?);
    loop {
        let (io, _) = listener.accept().await?;
        let svc = TowerToHyperService::new(svc.clone());
        tokio::spawn(async move {
            if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(io), svc)
                .await
            {
                eprintln!("connection error: {e}");
            }
        });
    }
}
