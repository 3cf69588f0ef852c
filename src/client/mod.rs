//! The client half of the protocol: [`IdempotentClientLayer`] gives every
//! outgoing `POST` and `PATCH` an `Idempotency-Key` and retries it, with the
//! same key, until the server answers.
//!
//! A retry of a request that changes state is only safe when the server can
//! recognise it as a retry. This layer attaches a fresh UUID v4 key (as the
//! IETF draft's sf-string, `Idempotency-Key: "8e03978e-…"`) to each covered
//! request that has none, buffers the body so it can send it again, and
//! retries failures that may not have reached, or may not have been
//! answered by, the server: connection and other inner-service errors,
//! per-attempt timeouts, `409 Conflict` (the first attempt is still
//! running), and `500`, `502`, `503` and `504`. A server running
//! [`IdempotencyLayer`](crate::IdempotencyLayer) runs the request once and
//! replays its response to every retry, so the caller gets the original
//! answer even when the connection dropped after the server acted.
//!
//! It works over any `tower::Service<http::Request<B>>` that answers
//! `http::Response<_>` and is `Clone`, such as hyper-util's legacy `Client`.
//!
//! # Retry rules
//!
//! | outcome of an attempt | retried? | delay |
//! |---|---|---|
//! | inner-service error (connect, reset, closed before the answer) | yes | backoff |
//! | no response head within the per-attempt timeout | yes | backoff |
//! | `409` | yes | `Retry-After` seconds, capped by the max backoff; backoff without it |
//! | `500`, `502`, `503`, `504` | yes | as for `409` |
//! | `429` with `Retry-After` no longer than the max backoff | yes | `Retry-After` |
//! | `429` without `Retry-After`, or asking for longer | no | |
//! | any other status (`2xx`, `3xx`, `400`, `401`, `403`, `404`, `410`, `413`, `422`, `501`, …) | no | |
//!
//! The backoff is exponential with full jitter: before retry `n` the layer
//! sleeps a uniformly random time between zero and
//! `min(max_backoff, base * 2^(n-1))`. A `Retry-After` in the HTTP-date form
//! is ignored (the backoff applies).
//!
//! `429` is only retried when the server names a wait the client is willing
//! to honour: a rate limiter without `Retry-After`, or with a longer one,
//! would refuse an early retry again and every attempt would add to the
//! load, so the caller gets the `429` to decide. A `409` from an
//! idempotency layer means an earlier attempt with this key is still
//! running and its answer is coming, so the layer retries it even when the
//! server asks for a longer wait than the cap (after the cap). A `409` for a
//! business conflict (a version mismatch, say) is retried too, and reaches
//! the caller once the attempts run out.
//!
//! When the attempts run out on a retryable status, the last response is
//! returned as it is (`Ok`), so the caller sees the server's `503` and its
//! body; when they run out on an error or a timeout, that is the error.
//!
//! # Errors
//!
//! Like tower's `Timeout`, the service's error is a [`BoxError`], so the
//! layer composes with any stack and converts with `?`. Every error it
//! returns is a boxed [`ClientError`], inner-service errors included (as
//! [`ClientError::Inner`], with the number of attempts); downcast to reach
//! it:
//!
//! ```
//! # fn f(err: tower_idempotency::store::BoxError) {
//! use tower_idempotency::client::ClientError;
//!
//! match err.downcast_ref::<ClientError>() {
//!     Some(ClientError::Inner { source, attempts }) => {
//!         eprintln!("gave up after {attempts} attempts: {source}");
//!     }
//!     Some(e) if e.is_timeout() => eprintln!("timed out: {e}"),
//!     _ => eprintln!("{err}"),
//! }
//! # }
//! ```
//!
//! # Bodies
//!
//! The request body is buffered (up to [`with_max_body`], 1 MiB by default)
//! and each attempt is rebuilt from a clone of the request head (method,
//! URI, version, headers and extensions: `http` 1.x requires every extension
//! to be `Clone`) and `B::from(bytes)`. Request trailers are dropped. A body
//! whose size hint already exceeds the limit is sent once, unbuffered, with
//! its key and without retries; a streaming body that turns out larger than
//! the limit while it is read fails with [`ClientError::BodyTooLarge`]
//! before anything is sent (the bytes read so far cannot be put back).
//!
//! Requests with other methods (by default everything but `POST` and
//! `PATCH`) pass through untouched: no key, no buffering, no timeout, no
//! retries.
//!
//! [`with_max_body`]: IdempotentClientLayer::with_max_body
//! [`BoxError`]: crate::store::BoxError

mod attempts;
mod error;
mod future;
mod layer;
mod retry;
mod service;

pub use attempts::Attempts;
pub use error::ClientError;
pub use future::ResponseFuture;
pub use layer::IdempotentClientLayer;
pub use service::IdempotentClient;
