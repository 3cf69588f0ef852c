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
//! # fn f(err: tower_idempotency::BoxError) {
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

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use pin_project_lite::pin_project;
use tower::ServiceExt;
use tower_layer::Layer;
use tower_service::Service;
use uuid::Uuid;

use crate::key::IDEMPOTENCY_KEY;
use crate::store::BoxError;

use crate::util::BoxFuture;

#[derive(Debug, Clone)]
struct ClientConfig {
    header: HeaderName,
    methods: Vec<Method>,
    timeout: Duration,
    base_backoff: Duration,
    max_backoff: Duration,
    max_attempts: u32,
    max_body: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            header: IDEMPOTENCY_KEY,
            methods: crate::util::default_methods(),
            timeout: Duration::from_secs(10),
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            max_attempts: 5,
            max_body: 1024 * 1024,
        }
    }
}

impl ClientConfig {
    fn covers(&self, method: &Method) -> bool {
        crate::util::covers(&self.methods, method)
    }
}

/// Applies [`IdempotentClient`] to an HTTP client service: covered requests
/// get an `Idempotency-Key` and are retried with that same key.
///
/// See the [module docs](crate::client) for the retry rules.
///
/// | setting | default |
/// |---|---|
/// | [`with_methods`](Self::with_methods) | `POST`, `PATCH` |
/// | [`with_header`](Self::with_header) | `Idempotency-Key` |
/// | [`with_timeout`](Self::with_timeout) | 10 s per attempt, until the response head |
/// | [`with_backoff`](Self::with_backoff) | base 100 ms, cap 5 s, full jitter |
/// | [`with_max_attempts`](Self::with_max_attempts) | 5, the first attempt included |
/// | [`with_max_body`](Self::with_max_body) | 1 MiB buffered for replays |
///
/// # Example
///
/// ```
/// use std::convert::Infallible;
/// use bytes::Bytes;
/// use http::{Request, Response, StatusCode};
/// use http_body_util::Full;
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
/// use tower_idempotency::IdempotentClientLayer;
/// use tower_idempotency::client::Attempts;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_idempotency::BoxError> {
/// // Stands in for an HTTP client such as hyper-util's legacy `Client`.
/// let server = service_fn(|req: Request<Full<Bytes>>| async move {
///     assert!(req.headers()["idempotency-key"].to_str()?.starts_with('"'));
///     let mut res = Response::new(Full::new(Bytes::from("created")));
///     *res.status_mut() = StatusCode::CREATED;
///     Ok::<_, tower_idempotency::BoxError>(res)
/// });
///
/// let client = ServiceBuilder::new()
///     .layer(IdempotentClientLayer::new().with_max_attempts(3))
///     .service(server);
///
/// let req = Request::post("http://api.example/orders").body(Full::from("{\"item\":\"book\"}"))?;
/// let res = client.oneshot(req).await?;
/// assert_eq!(res.status(), StatusCode::CREATED);
/// assert_eq!(res.extensions().get::<Attempts>().map(Attempts::count), Some(1));
/// # Ok(())
/// # }
/// ```
///
/// Over hyper-util's legacy client no adapter is needed: its body type
/// (here `Full<Bytes>`) is `From<Bytes>`, and the client is `Clone`.
///
/// ```no_run
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use hyper_util::client::legacy::Client;
/// use hyper_util::rt::TokioExecutor;
/// use tower::ServiceBuilder;
/// use tower_idempotency::IdempotentClientLayer;
///
/// let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
/// let client = ServiceBuilder::new()
///     .layer(IdempotentClientLayer::new())
///     .service(http);
/// # let _ = client;
/// ```
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct IdempotentClientLayer {
    config: Arc<ClientConfig>,
}

impl IdempotentClientLayer {
    /// A layer with the default settings.
    pub fn new() -> Self {
        Self::default()
    }

    fn config(mut self, f: impl FnOnce(&mut ClientConfig)) -> Self {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// The methods that get a key and retries (default `POST` and `PATCH`).
    /// Every other method passes through untouched.
    ///
    /// ```
    /// use http::Method;
    /// use tower_idempotency::IdempotentClientLayer;
    ///
    /// // The server also keys its `PUT` and `DELETE` routes.
    /// let layer = IdempotentClientLayer::new()
    ///     .with_methods([Method::POST, Method::PUT, Method::PATCH, Method::DELETE]);
    /// # let _ = layer;
    /// ```
    pub fn with_methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let methods = methods.into_iter().collect();
        self.config(|c| c.methods = methods)
    }

    /// The header that carries the key (default `Idempotency-Key`).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::{HeaderName, Request, Response};
    /// use http_body_util::Full;
    /// use tower::{Layer, ServiceExt, service_fn};
    /// use tower_idempotency::IdempotentClientLayer;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_idempotency::BoxError> {
    /// let server = service_fn(|req: Request<Full<Bytes>>| async move {
    ///     assert!(req.headers().contains_key("x-request-key"));
    ///     Ok::<_, tower_idempotency::BoxError>(Response::new(Full::new(Bytes::new())))
    /// });
    /// let client = IdempotentClientLayer::new()
    ///     .with_header(HeaderName::from_static("x-request-key"))
    ///     .layer(server);
    /// client.oneshot(Request::post("http://api.example/orders").body(Full::default())?).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_header(self, name: HeaderName) -> Self {
        self.config(|c| c.header = name)
    }

    /// How long one attempt may wait for the response head (default 10 s);
    /// past it the attempt counts as failed and is retried. The wait for the
    /// inner service's readiness before a retry counts too; reading the
    /// response body does not.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::IdempotentClientLayer;
    ///
    /// let layer = IdempotentClientLayer::new().with_timeout(Duration::from_secs(3));
    /// # let _ = layer;
    /// ```
    pub fn with_timeout(self, timeout: Duration) -> Self {
        self.config(|c| c.timeout = timeout)
    }

    /// The backoff between attempts (default base 100 ms, cap 5 s): before
    /// retry `n` the layer sleeps a random time between zero and
    /// `min(max, base * 2^(n-1))`. The cap also bounds a `Retry-After`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::IdempotentClientLayer;
    ///
    /// // Waits of up to 250 ms, 500 ms, 1 s, then 2 s between attempts.
    /// let layer = IdempotentClientLayer::new()
    ///     .with_backoff(Duration::from_millis(250), Duration::from_secs(2));
    /// # let _ = layer;
    /// ```
    pub fn with_backoff(self, base: Duration, max: Duration) -> Self {
        self.config(|c| {
            c.base_backoff = base;
            c.max_backoff = max.max(base);
        })
    }

    /// How many attempts a request gets in all, the first included (default
    /// 5; at least 1, which disables retries).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::{Request, Response, StatusCode};
    /// use http_body_util::Full;
    /// use tower::{Layer, ServiceExt, service_fn};
    /// use tower_idempotency::IdempotentClientLayer;
    /// use tower_idempotency::client::Attempts;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), tower_idempotency::BoxError> {
    /// let unavailable = service_fn(|_: Request<Full<Bytes>>| async {
    ///     let mut res = Response::new(Full::new(Bytes::new()));
    ///     *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    ///     Ok::<_, tower_idempotency::BoxError>(res)
    /// });
    /// let client = IdempotentClientLayer::new().with_max_attempts(3).layer(unavailable);
    /// let res = client.oneshot(Request::post("http://api.example/orders").body(Full::default())?).await?;
    /// assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "the last answer, as it is");
    /// assert_eq!(res.extensions().get::<Attempts>().map(Attempts::count), Some(3));
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_max_attempts(self, attempts: u32) -> Self {
        self.config(|c| c.max_attempts = attempts.max(1))
    }

    /// The largest request body that is buffered for retries (default 1
    /// MiB). A body whose size hint is larger is sent once without retries;
    /// a streaming body that grows past it fails with
    /// [`ClientError::BodyTooLarge`] before it is sent.
    ///
    /// ```
    /// use tower_idempotency::IdempotentClientLayer;
    ///
    /// // Uploads of up to 8 MiB are retried.
    /// let layer = IdempotentClientLayer::new().with_max_body(8 * 1024 * 1024);
    /// # let _ = layer;
    /// ```
    pub fn with_max_body(self, bytes: usize) -> Self {
        self.config(|c| c.max_body = bytes)
    }
}

impl<S> Layer<S> for IdempotentClientLayer {
    type Service = IdempotentClient<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotentClient {
            inner,
            config: self.config.clone(),
        }
    }
}

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

    define_inner_service_accessors!();
}

/// Put in the extensions of every response to a covered request: how many
/// attempts it took, and the key they carried.
///
/// A caller that must give up (the attempts ran out on a `503`) can keep
/// the key and try again later with the same one.
#[derive(Clone, PartialEq, Eq)]
pub struct Attempts {
    count: u32,
    key: HeaderValue,
}

impl Attempts {
    /// How many attempts were sent; 1 means no retry.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The key header's value, as every attempt sent it (the sf-string form,
    /// quotes included, for a key the layer made).
    pub fn key(&self) -> &HeaderValue {
        &self.key
    }
}

impl fmt::Debug for Attempts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys can be guessable secrets: never print them whole.
        f.debug_struct("Attempts")
            .field("count", &self.count)
            .field("key", &format_args!("<{} bytes>", self.key.len()))
            .finish()
    }
}

/// Why [`IdempotentClient`] returned no response; it reaches the caller
/// boxed, as a [`BoxError`] (see [Errors](crate::client#errors)).
///
/// A retryable status that is still there after the last attempt is not an
/// error: that response is returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The inner service failed on the last attempt (or, with `attempts`
    /// 0, while becoming ready before any attempt).
    #[error("the request failed after {attempts} attempt(s)")]
    Inner {
        /// The inner service's error, boxed.
        source: BoxError,
        /// How many attempts were sent.
        attempts: u32,
    },
    /// The last attempt got no response head within the per-attempt
    /// timeout.
    #[error("the request timed out after {attempts} attempt(s) of {timeout:?} each")]
    Timeout {
        /// How many attempts were sent.
        attempts: u32,
        /// The per-attempt timeout.
        timeout: Duration,
    },
    /// The request body failed while it was buffered; nothing was sent.
    #[error("the request body could not be read")]
    Body(#[source] BoxError),
    /// The request body grew past the buffering limit while it was read;
    /// nothing was sent.
    #[error("the request body exceeds the {limit} bytes buffered for retries")]
    BodyTooLarge {
        /// The configured limit.
        limit: usize,
    },
}

impl ClientError {
    /// How many attempts were sent (0 when the body failed, or the service
    /// failed to become ready before the first one).
    pub fn attempts(&self) -> u32 {
        match self {
            Self::Inner { attempts, .. } | Self::Timeout { attempts, .. } => *attempts,
            Self::Body(_) | Self::BodyTooLarge { .. } => 0,
        }
    }

    /// Whether the last attempt timed out.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout { .. })
    }

    /// The inner service's error, if that is what ended the request.
    pub fn inner(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        match self {
            Self::Inner { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }

    fn inner_boxed(source: impl Into<BoxError>, attempts: u32) -> BoxError {
        Box::new(Self::Inner {
            source: source.into(),
            attempts,
        })
    }
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
            return ResponseFuture {
                kind: Kind::Passthrough {
                    fut: self.inner.call(req),
                },
            };
        }
        // The service `poll_ready` readied goes with this request; `self`
        // keeps a fresh clone for the next one.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture {
            kind: Kind::Covered {
                fut: Box::pin(send(inner, req, self.config.clone())),
            },
        }
    }
}

pin_project! {
    /// The response future of [`IdempotentClient`]: the inner future for a
    /// request the layer does not cover, a boxed retry loop for a covered
    /// one.
    pub struct ResponseFuture<F, T> {
        #[pin]
        kind: Kind<F, T>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, T> {
        Passthrough {
            #[pin]
            fut: F,
        },
        Covered {
            fut: BoxFuture<Result<T, BoxError>>,
        },
    }
}

impl<F, T> fmt::Debug for ResponseFuture<F, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match &self.kind {
            Kind::Passthrough { .. } => "Passthrough",
            Kind::Covered { .. } => "Covered",
        };
        f.debug_tuple("ResponseFuture").field(&name).finish()
    }
}

impl<F, T, E> Future for ResponseFuture<F, T>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Passthrough { fut } => {
                let res = ready!(fut.poll(cx));
                Poll::Ready(res.map_err(|error| ClientError::inner_boxed(error, 1)))
            }
            KindProj::Covered { fut } => fut.as_mut().poll(cx),
        }
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

fn with_attempts<T>(mut res: Response<T>, count: u32, key: HeaderValue) -> Response<T> {
    res.extensions_mut().insert(Attempts { count, key });
    res
}

/// A fresh UUID v4 as an sf-string: `"8e03978e-40d5-4c3a-…"`.
fn fresh_key() -> Option<HeaderValue> {
    HeaderValue::try_from(format!("\"{}\"", Uuid::new_v4())).ok()
}

enum Verdict {
    /// Hand the response to the caller.
    Final,
    /// Retry, after the server's `Retry-After` if it gave one.
    Retry(Option<Duration>),
}

/// Whether a response is retried, and after how long if the server says.
fn retry_after(status: StatusCode, headers: &HeaderMap, cap: Duration) -> Verdict {
    let after = headers
        .get(header::RETRY_AFTER)
        .and_then(|v| parse_delta_seconds(v.as_bytes()));
    match status.as_u16() {
        409 | 500 | 502 | 503 | 504 => Verdict::Retry(after.map(|a| a.min(cap))),
        429 => match after {
            Some(a) if a <= cap => Verdict::Retry(Some(a)),
            _ => Verdict::Final,
        },
        _ => Verdict::Final,
    }
}

/// `Retry-After` in its delay-seconds form (RFC 9110 §10.2.3); `None` for
/// the HTTP-date form or anything malformed.
fn parse_delta_seconds(raw: &[u8]) -> Option<Duration> {
    let s = std::str::from_utf8(raw).ok()?.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Absurdly long numbers saturate; the cap applies anyway.
    Some(Duration::from_secs(s.parse::<u64>().unwrap_or(u64::MAX)))
}

/// xorshift64*, seeded from a UUID v4's randomness: enough for jitter.
struct Jitter(u64);

impl Jitter {
    fn new() -> Self {
        let (hi, lo) = Uuid::new_v4().as_u64_pair();
        Self((hi ^ lo) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Full jitter: uniform in `[0, min(max, base * 2^(attempt-1))]`.
    fn backoff(&mut self, config: &ClientConfig, attempt: u32) -> Duration {
        let ceiling = backoff_ceiling(config.base_backoff, config.max_backoff, attempt);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.next_u64() % nanos.saturating_add(1))
    }
}

fn backoff_ceiling(base: Duration, max: Duration, attempt: u32) -> Duration {
    let factor = 1u32
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        let ceilings: Vec<_> = (1..=8).map(|n| backoff_ceiling(base, max, n)).collect();
        assert_eq!(ceilings[0], Duration::from_millis(100));
        assert_eq!(ceilings[1], Duration::from_millis(200));
        assert_eq!(ceilings[4], Duration::from_millis(1600));
        assert_eq!(ceilings[6], max);
        assert_eq!(backoff_ceiling(base, max, 100), max);
    }

    #[test]
    fn jitter_stays_in_range_and_varies() {
        let config = ClientConfig::default();
        let mut j = Jitter::new();
        let delays: Vec<_> = (0..200).map(|_| j.backoff(&config, 3)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(400)));
        assert!(delays.iter().any(|d| *d < Duration::from_millis(200)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(200)));
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_delta_seconds(b"2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_delta_seconds(b" 0 "), Some(Duration::ZERO));
        assert_eq!(parse_delta_seconds(b"Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_delta_seconds(b"-1"), None);
        assert_eq!(parse_delta_seconds(b""), None);
    }

    #[test]
    fn verdicts() {
        let cap = Duration::from_secs(5);
        let mut h = HeaderMap::new();
        let v = |code: u16, h: &HeaderMap| match retry_after(
            StatusCode::from_u16(code).unwrap(),
            h,
            cap,
        ) {
            Verdict::Final => None,
            Verdict::Retry(after) => Some(after),
        };
        for code in [200, 201, 302, 400, 401, 403, 404, 410, 413, 422, 429, 501] {
            assert_eq!(v(code, &h), None, "{code}");
        }
        for code in [409, 500, 502, 503, 504] {
            assert_eq!(v(code, &h), Some(None), "{code}");
        }
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
        assert_eq!(v(409, &h), Some(Some(cap)));
        assert_eq!(
            v(429, &h),
            None,
            "a longer wait than the cap is the caller's call"
        );
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(v(429, &h), Some(Some(Duration::from_secs(2))));
        assert_eq!(v(503, &h), Some(Some(Duration::from_secs(2))));
    }

    #[test]
    fn fresh_keys_are_sf_strings() {
        let key = fresh_key().unwrap();
        let parsed = crate::key::parse_key(key.as_bytes(), 1, 255).unwrap();
        assert!(Uuid::parse_str(parsed.as_str()).is_ok());
        assert_ne!(fresh_key(), Some(key));
    }
}
