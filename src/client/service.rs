//! [`IdempotentClient`]: the service, and the loop that sends a covered
//! request until it is answered or its attempts run out.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tower::ServiceExt;
use tower_layer::Layer;
use tower_service::Service;
use uuid::Uuid;

use super::attempts::with_attempts;
use super::layer::ClientConfig;
use super::retry::{Jitter, Verdict, retry_after};
use super::{ClientError, IdempotentClientLayer, ResponseFuture};
use crate::store::BoxError;

/// Middleware that gives each covered outgoing request an `Idempotency-Key`
/// and retries it with that key. Made by [`IdempotentClientLayer`].
///
/// The inner service must be `Clone`: each request takes the service that
/// [`poll_ready`](Service::poll_ready) readied for its first attempt, and
/// waits for its readiness again before every retry.
#[derive(Debug, Clone)]
pub struct IdempotentClient<S> {
    inner: S,
    config: Arc<ClientConfig>,
}

impl<S> IdempotentClient<S> {
    /// Wraps `inner` with the default settings.
    pub fn new(inner: S) -> Self {
        IdempotentClientLayer::new().layer(inner)
    }

    /// `inner` with the layer's settings.
    pub(super) fn from_config(inner: S, config: Arc<ClientConfig>) -> Self {
        Self { inner, config }
    }

    define_inner_service_accessors!();
}

impl<S, B, ResB> Service<Request<B>> for IdempotentClient<S>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    B: Body + From<Bytes> + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    ResB: Send + 'static,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, Response<ResB>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|error| ClientError::inner_boxed(error, 0))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if !self.config.covers(req.method()) {
            return ResponseFuture::passthrough(self.inner.call(req));
        }
        // The service `poll_ready` readied goes with this request; `self`
        // keeps a fresh clone for the next one.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::covered(Box::pin(send(inner, req, self.config.clone())))
    }
}

/// One covered request: key, buffer, attempts.
async fn send<S, B, ResB>(
    mut inner: S,
    req: Request<B>,
    config: Arc<ClientConfig>,
) -> Result<Response<ResB>, BoxError>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    B: Body + From<Bytes>,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = req.into_parts();
    let key = match parts.headers.get(&config.header) {
        Some(key) => key.clone(),
        None => match fresh_key() {
            Some(key) => {
                parts.headers.insert(config.header.clone(), key.clone());
                key
            }
            // A hyphenated UUID is always a valid header value.
            None => return attempt_once(inner, Request::from_parts(parts, body), 1).await,
        },
    };
    let timeout = config.timeout;

    if body.size_hint().lower() > config.max_body as u64 {
        tracing::debug!(
            limit = config.max_body,
            "request body over the buffering limit: sent once, without retries"
        );
        let req = Request::from_parts(parts, body);
        return match tokio::time::timeout(timeout, inner.call(req)).await {
            Ok(Ok(res)) => Ok(with_attempts(res, 1, key)),
            Ok(Err(error)) => Err(ClientError::inner_boxed(error, 1)),
            Err(_) => Err(Box::new(ClientError::Timeout {
                attempts: 1,
                timeout,
            })),
        };
    }
    let bytes = match Limited::new(body, config.max_body).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            return Err(Box::new(ClientError::BodyTooLarge {
                limit: config.max_body,
            }));
        }
        Err(e) => return Err(Box::new(ClientError::Body(e))),
    };

    let mut jitter = Jitter::new();
    let mut attempt: u32 = 1;
    loop {
        let req = Request::from_parts(parts.clone(), B::from(bytes.clone()));
        let first = attempt == 1;
        let outcome = tokio::time::timeout(timeout, async {
            if !first {
                inner.ready().await?;
            }
            inner.call(req).await
        })
        .await;
        let last = attempt >= config.max_attempts;
        let delay = match outcome {
            Ok(Ok(res)) => match retry_after(res.status(), res.headers(), config.max_backoff) {
                Verdict::Final => return Ok(with_attempts(res, attempt, key)),
                Verdict::Retry(_) if last => return Ok(with_attempts(res, attempt, key)),
                Verdict::Retry(after) => {
                    let delay = after.unwrap_or_else(|| jitter.backoff(&config, attempt));
                    tracing::debug!(
                        attempt,
                        status = res.status().as_u16(),
                        delay_ms = crate::util::millis(delay),
                        retry_after = after.is_some(),
                        "retrying idempotent request"
                    );
                    delay
                }
            },
            Ok(Err(error)) => {
                let error: BoxError = error.into();
                if last {
                    return Err(ClientError::inner_boxed(error, attempt));
                }
                let delay = jitter.backoff(&config, attempt);
                tracing::debug!(
                    attempt,
                    error = %error,
                    delay_ms = crate::util::millis(delay),
                    "retrying idempotent request"
                );
                delay
            }
            Err(_) => {
                if last {
                    return Err(Box::new(ClientError::Timeout {
                        attempts: attempt,
                        timeout,
                    }));
                }
                let delay = jitter.backoff(&config, attempt);
                tracing::debug!(
                    attempt,
                    error = "timeout",
                    delay_ms = crate::util::millis(delay),
                    "retrying idempotent request"
                );
                delay
            }
        };
        tokio::time::sleep(delay).await;
        attempt += 1;
    }
}

async fn attempt_once<S, B, ResB>(
    mut inner: S,
    req: Request<B>,
    attempts: u32,
) -> Result<Response<ResB>, BoxError>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
{
    inner
        .call(req)
        .await
        .map_err(|error| ClientError::inner_boxed(error, attempts))
}

/// A fresh UUID v4 as an sf-string: `"8e03978e-40d5-4c3a-…"`.
fn fresh_key() -> Option<HeaderValue> {
    HeaderValue::try_from(format!("\"{}\"", Uuid::new_v4())).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_keys_are_sf_strings() {
        let key = fresh_key().unwrap();
        let parsed = crate::key::parse_key(key.as_bytes(), 1, 255).unwrap();
        assert!(Uuid::parse_str(parsed.as_str()).is_ok());
        assert_ne!(fresh_key(), Some(key));
    }
}
