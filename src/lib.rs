//! Idempotency-Key middleware for [Tower] and [axum]: run a request once,
//! record its response, replay that record to every retry. The same engine
//! makes queue consumers exactly-once ([`message`]).
//!
//! Networks time out, load balancers retry, users double-click, webhook
//! senders redeliver: without protection every retry of a `POST /payments`
//! charges again. The client sends an `Idempotency-Key` header (the IETF
//! draft "The Idempotency-Key HTTP Header Field", and Stripe's API); this
//! layer runs the first request with that key, records its response, and
//! answers every retry with the record.
//!
//! # Example
//!
//! ```
//! use axum::{Router, routing::post};
//! use tower_idempotency::{IdempotencyLayer, MemoryStore};
//!
//! async fn create_payment() -> &'static str {
//!     "charged once"
//! }
//!
//! let app: Router = Router::new().route(
//!     "/payments",
//!     // The route's handlers only: unknown paths keep axum's 404, missing methods its 405.
//!     post(create_payment).route_layer(IdempotencyLayer::new(MemoryStore::new())),
//! );
//! ```
//!
//! The method router's `route_layer` is what an API means almost always:
//! the layer covers the route's handlers. `Router::route_layer` also wraps
//! a matched path's `405`, and `Router::layer` the router's fallback too,
//! so a `POST` to an unknown path without a key is refused (`400`) when
//! keys are required, and with a key its `404` (or a missing method's
//! `405`) is recorded and replayed. Use `Router::layer` only when the
//! fallback itself should be idempotent, or to measure the layer around a
//! whole router.
//!
//! # The path of one request
//!
//! ```text
//! request ─► covered method? ──no──► inner service, untouched
//!              │yes
//!              ▼
//!          Idempotency-Key ─ missing ─► forward (or 400 if required)
//!              │ present      invalid ─► 400
//!              ▼
//!          store key   = SHA-256(scope, key)
//!          fingerprint = SHA-256(method, path+query, body), in the pass
//!                        that reads the body; over the limit ─► 413
//!              ▼
//!          store.begin(key, fingerprint, lease)
//!              ├─ Completed ─ fingerprint differs ─► 422
//!              │             └ same ─► replay + `Idempotent-Replayed: true`
//!              ├─ InFlight  ─ fingerprint differs ─► 422
//!              │             └ same ─► 409 + Retry-After (or wait, then replay)
//!              ├─ Acquired  ─► run the handler to completion (even if the
//!              │               client leaves), heartbeat the lease, record
//!              │               the response or release the key
//!              └─ Err       ─► 503 + Retry-After (or fail open)
//! ```
//!
//! Every answer the layer makes itself is an RFC 9457 problem document; see
//! [`problem`].
//!
//! # Guarantees
//!
//! - Two requests with the same key never run the handler at the same time:
//!   [`Store::begin`](store::Store::begin) is one atomic step, and the loser gets 409.
//! - A handler whose client disconnects still runs to completion, and its
//!   response is recorded for the retry.
//! - A handler that panics, fails, or answers a status that is not recorded
//!   (5xx by default) releases the key: the retry runs.
//! - A process that dies mid-request leaves a lock that expires with its
//!   lease (30 s by default); the next retry then runs. If the handler had
//!   already caused a side effect, that retry runs it again: derive keys for
//!   downstream calls from [`IdempotencyKey::derive`](key::IdempotencyKey::derive) so they deduplicate
//!   too.
//! - A holder whose lease was taken over cannot write its record (fencing).
//! - A store that fails answers 503 (fail closed) by default: no request
//!   runs without its lock. A record write that fails after the handler ran
//!   still answers the client and is retried in the background.
//!
//! # One engine, two faces
//!
//! ```text
//! faces     HTTP: IdempotencyLayer          messages: IdempotentConsumer,
//!           (Idempotency-Key, fingerprint    MessageLayer (message id,
//!           of method+target+body,           payload fingerprint, a codec
//!           problem+json, response replay)   for the output, Processed)
//!                        \                      /
//! engine    acquire (in-flight and store-error policies, mismatch check)
//!           -> execute (heartbeat + hook, panic caught, lease loss noticed)
//!           -> complete / release (fenced; background retries; a failed
//!              commit of a transactional store rolls the handler back)
//!                                   |
//! contract  Store: begin / complete / release / extend / wait over StoreKey,
//!           Fingerprint, LockToken and Record (response | value | tombstone);
//!           attachment() for request-scoped state, capabilities(); no http type
//!                                   |
//! backends  MemoryStore, SqliteStore, PostgresStore, TransactionalPostgresStore,
//!           MySqlStore, RedisStore, DynamoDbStore (any of them inside SealedStore)
//! ```
//!
//! A face turns its input into a store key and a fingerprint and its
//! handler's outcome into a [`Record`](record::Record); everything that decides whether a
//! handler runs, and what happens when something fails, lives once in the
//! engine. Stores see neither HTTP nor brokers, so a new backend serves
//! both faces, and the conformance suite ([`test_util`], feature
//! `test-util`) proves it once for both.
//!
//! # Queue consumers
//!
//! ```
//! use tower_idempotency::MemoryStore;
//! use tower_idempotency::message::{Disposition, IdempotentConsumer, MessageKey};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let consumer = IdempotentConsumer::new(MemoryStore::new());
//! for _delivery in 0..2 {
//!     // The broker redelivers: the message id is the key, the payload its fingerprint.
//!     let key = MessageKey::new("billing", "msg-1", br#"{"amount":42}"#);
//!     let processed = consumer
//!         .process(key, |_| async { Ok::<(), std::io::Error>(()) /* charge */ })
//!         .await
//!         .unwrap();
//!     assert_eq!(processed.disposition(), Disposition::Ack);
//! }
//! # }
//! ```
//!
//! # Configuration
//!
//! Every setting is a `with_*` builder on [`IdempotencyLayer`]; its docs
//! hold the table of defaults. Per-route settings come from axum's
//! `route_layer` with differently configured layers. A handler overrides the
//! recording of one response with a [`Retention`] response extension.
//!
//! # Response bodies
//!
//! By default the service answers with [`ResponseBody`], which wraps the
//! inner service's body: a response the layer does not touch streams
//! through it, a recorded or replayed one is buffered bytes. That works for
//! any body type, but under axum's `Router::layer` it costs a second boxing
//! of every response body, passthroughs included. With the `axum` feature,
//! [`IdempotencyLayer::keep_body_type`] keeps axum's own `Body` instead
//! ([`KeepBody`]): untouched responses are handed on as they are. It works
//! for any body type with `From<ResponseBody<B>>`, which this crate also
//! implements for `http_body_util`'s `BoxBody` and `UnsyncBoxBody`.
//!
//! ```
//! # #[cfg(feature = "axum")] {
//! use axum::{Router, routing::post};
//! use tower_idempotency::{IdempotencyLayer, MemoryStore};
//!
//! let app: Router = Router::new()
//!     .route(
//!         "/payments",
//!         post(|| async { "charged once" })
//!             .route_layer(IdempotencyLayer::new(MemoryStore::new()).keep_body_type()),
//!     );
//! # }
//! ```
//!
//! # Choosing a store
//!
//! | store | when |
//! |---|---|
//! | [`MemoryStore`] | one process; tests. Sharded, bounded, self-expiring. |
//! | `RedisStore` (feature `redis`) | several instances behind a load balancer; one round trip per step. |
//! | `SqliteStore` (feature `sqlite`) | one host: records survive restarts in one file that every process on the host shares; no server to run. |
//! | `PostgresStore` (feature `postgres`) | records must survive restarts, in the database the service already runs. |
//! | `MySqlStore` (feature `mysql`) | the same, for a service on MySQL 8 or MariaDB. |
//! | `DynamoDbStore` (feature `dynamodb`) | services on AWS without a database to spare: one conditional request per step. |
//! | `TransactionalPostgresStore` (feature `postgres`) | the handler writes to that same database: its writes and the record commit in one transaction, so a crash can never run it twice. |
//!
//! Any other backend implements [`Store`](store::Store) and proves itself with the
//! conformance suite in `test_util` (feature `test-util`). Every store
//! serves both the HTTP layer and the message face.
//!
//! # Testing handlers
//!
//! [`MemoryStore`] keeps time by tokio's clock, so a test can pause time
//! and jump past a ttl or a lease:
//!
//! ```
//! use std::time::Duration;
//! use axum::{Router, body::Body, http::Request, routing::post};
//! use tower::ServiceExt;
//! use tower_idempotency::{IdempotencyLayer, MemoryStore};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let app = Router::new()
//!     .route(
//!         "/orders",
//!         post(|| async { "created" })
//!             .route_layer(IdempotencyLayer::new(MemoryStore::new()).with_ttl(Duration::from_secs(60))),
//!     );
//! let req = || Request::post("/orders").header("idempotency-key", "k1").body(Body::empty()).unwrap();
//!
//! let first = app.clone().oneshot(req()).await.unwrap();
//! assert!(first.headers().get("idempotent-replayed").is_none());
//! let retry = app.clone().oneshot(req()).await.unwrap();
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//!
//! tokio::time::advance(Duration::from_secs(61)).await;
//! let later = app.clone().oneshot(req()).await.unwrap();
//! assert!(later.headers().get("idempotent-replayed").is_none(), "the record expired");
//! # }
//! ```
//!
//! # Observability
//!
//! Each keyed request runs in a `tracing` span named `idempotency` that
//! records the [`Outcome`](observe::Outcome), the status, the store latency and a hash prefix
//! of the key (never the key); the `metrics` feature adds counters and
//! histograms. See [`observe`].
//!
//! # Feature flags
//!
//! - `redis`: `RedisStore`, records shared by every instance
//!   through Redis.
//! - `postgres`: `PostgresStore`, durable records in
//!   PostgreSQL through sqlx.
//! - `mysql`: `MySqlStore`, durable records in MySQL 8 or MariaDB through
//!   sqlx.
//! - `sqlite`: `SqliteStore`, durable records in one SQLite file for the
//!   processes of one host, through sqlx (SQLite compiled in).
//! - `dynamodb`: `store::DynamoDbStore`, records in a DynamoDB table
//!   through the official `aws-sdk-dynamodb` crate.
//! - `utoipa`: [`IdempotencyLayer::openapi`], the layer's contract (the key
//!   header, the problem responses, `Idempotent-Replayed`, the expiry
//!   policy) written into a utoipa OpenAPI document.
//! - `encryption`: `store::SealedStore`, which seals every record with
//!   AES-256-GCM (a key id for rotation, bound to the store key) around any
//!   store.
//! - `metrics`: counters and histograms through the `metrics` facade (see
//!   [`observe`]).
//! - `test-util`: the store conformance suite ([`test_util`]) and a
//!   fault-injecting store wrapper.
//! - `client`: `IdempotentClientLayer`, keys and same-key retries for
//!   outgoing requests.
//! - `axum`: `From<ResponseBody<Body>>` for axum's `Body`, so that
//!   [`IdempotencyLayer::keep_body_type`] works under axum.
//! - `json`: `message::JsonCodec`, a message handler's output recorded as
//!   JSON.
//!
//! [Tower]: https://docs.rs/tower
//! [axum]: https://docs.rs/axum
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[macro_use]
mod macros;

mod attachment;
mod body;
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub mod client;
mod config;
mod engine;
pub mod fingerprint;
mod future;
mod json;
pub mod key;
mod layer;
pub mod message;
pub mod observe;
#[cfg(feature = "utoipa")]
#[cfg_attr(docsrs, doc(cfg(feature = "utoipa")))]
pub mod openapi;
pub mod problem;
pub mod record;
mod service;
pub mod store;
mod util;

#[cfg(any(test, feature = "test-util"))]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod test_util;

#[cfg(test)]
mod test_helpers;

/// Every code block of the README, compiled (and run, where it can run) as
/// a doctest, so the first code a newcomer copies cannot drift from the
/// API.
#[cfg(all(
    doctest,
    feature = "axum",
    feature = "redis",
    feature = "postgres",
    feature = "mysql",
    feature = "sqlite",
    feature = "encryption",
    feature = "utoipa",
    feature = "client",
    feature = "json"
))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

// The layer, its service and what configures them sit at the root, with the
// default store; every other item has one path, in its module.
pub use body::{BodyMode, KeepBody, RequestBody, ResponseBody, WrapBody};
pub use config::{Retention, default_record_if};
pub use engine::{InFlightPolicy, StoreErrorPolicy};
pub use future::ResponseFuture;
pub use layer::IdempotencyLayer;
pub use service::Idempotency;
pub use store::memory::{MemoryStore, MemoryStoreBuilder};
