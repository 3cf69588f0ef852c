//! What the layer decided, for logs, metrics and outer layers.
//!
//! Every covered request with a key runs inside a `tracing` span named
//! `idempotency` with these fields:
//!
//! | field | value |
//! |---|---|
//! | `key` | the first 16 hex characters of the store key (a hash: never the raw key) |
//! | `outcome` | one of the [`Outcome`] names below |
//! | `status` | the status of the response sent |
//! | `store_us` | how long `begin` took, in microseconds |
//!
//! The [`Outcome`] is also put in the response's extensions.
//!
//! Every message through the message face runs inside a span named
//! `idempotency_message` with `key`, `outcome` (a
//! [`Processed::as_str`](crate::message::Processed::as_str) name) and
//! `store_us`.
//!
//! With the `metrics` feature, the layer reports through the [`metrics`]
//! facade (install any recorder, such as a Prometheus exporter):
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `idempotency_requests_total` | counter | `outcome` |
//! | `idempotency_messages_total` | counter | `outcome` (message face) |
//! | `idempotency_store_duration_seconds` | histogram | `op` (`begin`, `complete`, `release`, `extend`) |
//!
//! [`metrics`]: https://docs.rs/metrics

use std::time::Duration;

use http::Response;

/// What the layer did with one covered request that carried a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The handler ran and its response was recorded.
    Executed,
    /// The handler ran and its response was not recorded (a status the
    /// policy skips, a failure, a panic): the key was released.
    Released,
    /// A recorded response was replayed.
    Replayed,
    /// A duplicate arrived while the first request ran: 409.
    Conflict,
    /// The key was used before for a different request: 422.
    Mismatch,
    /// The request was refused before the store (invalid key, body).
    Rejected,
    /// The store failed: 503.
    StoreError,
    /// The store failed and the request was forwarded without idempotency.
    FailedOpen,
    /// The response was too large to record (the first execution), or a
    /// retry was told so (410).
    Tombstone,
}

impl Outcome {
    /// The outcome's name in logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Executed => "executed",
            Self::Released => "released",
            Self::Replayed => "replayed",
            Self::Conflict => "conflict",
            Self::Mismatch => "mismatch",
            Self::Rejected => "rejected",
            Self::StoreError => "store_error",
            Self::FailedOpen => "failed_open",
            Self::Tombstone => "tombstone",
        }
    }
}

/// Records the outcome on the current span and in metrics, and puts it in
/// the response's extensions.
pub(crate) fn mark<B>(mut res: Response<B>, outcome: Outcome) -> Response<B> {
    let span = tracing::Span::current();
    span.record("outcome", outcome.as_str());
    span.record("status", res.status().as_u16());
    #[cfg(feature = "metrics")]
    metrics::counter!("idempotency_requests_total", "outcome" => outcome.as_str()).increment(1);
    res.extensions_mut().insert(outcome);
    res
}

/// Records a message's outcome on the current span and in metrics.
pub(crate) fn mark_message(outcome: &'static str) {
    tracing::Span::current().record("outcome", outcome);
    #[cfg(feature = "metrics")]
    metrics::counter!("idempotency_messages_total", "outcome" => outcome).increment(1);
}

/// Records how long one store call took.
pub(crate) fn store_latency(op: &'static str, took: Duration) {
    if op == "begin" {
        tracing::Span::current().record("store_us", took.as_micros() as u64);
    }
    #[cfg(feature = "metrics")]
    metrics::histogram!("idempotency_store_duration_seconds", "op" => op)
        .record(took.as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = (op, took);
}
