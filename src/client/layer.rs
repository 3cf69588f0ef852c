//! [`IdempotentClientLayer`] and the settings it gives every
//! [`IdempotentClient`] it makes.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use tower_layer::Layer;

use super::IdempotentClient;
use crate::key::IDEMPOTENCY_KEY;

/// The settings an [`IdempotentClientLayer`] shares with the services it
/// makes.
#[derive(Debug, Clone)]
pub(super) struct ClientConfig {
    pub(super) header: HeaderName,
    pub(super) methods: Vec<Method>,
    pub(super) timeout: Duration,
    pub(super) base_backoff: Duration,
    pub(super) max_backoff: Duration,
    pub(super) max_attempts: u32,
    pub(super) max_body: usize,
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
    pub(super) fn covers(&self, method: &Method) -> bool {
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
/// use tower_idempotency::client::IdempotentClientLayer;
/// use tower_idempotency::client::Attempts;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_idempotency::store::BoxError> {
/// // Stands in for an HTTP client such as hyper-util's legacy `Client`.
/// let server = service_fn(|req: Request<Full<Bytes>>| async move {
///     assert!(req.headers()["idempotency-key"].to_str()?.starts_with('"'));
///     let mut res = Response::new(Full::new(Bytes::from("created")));
///     *res.status_mut() = StatusCode::CREATED;
///     Ok::<_, tower_idempotency::store::BoxError>(res)
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
/// use tower_idempotency::client::IdempotentClientLayer;
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
    /// use tower_idempotency::client::IdempotentClientLayer;
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
    /// use tower_idempotency::client::IdempotentClientLayer;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_idempotency::store::BoxError> {
    /// let server = service_fn(|req: Request<Full<Bytes>>| async move {
    ///     assert!(req.headers().contains_key("x-request-key"));
    ///     Ok::<_, tower_idempotency::store::BoxError>(Response::new(Full::new(Bytes::new())))
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
    /// use tower_idempotency::client::IdempotentClientLayer;
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
    /// use tower_idempotency::client::IdempotentClientLayer;
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
    /// use tower_idempotency::client::IdempotentClientLayer;
    /// use tower_idempotency::client::Attempts;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), tower_idempotency::store::BoxError> {
    /// let unavailable = service_fn(|_: Request<Full<Bytes>>| async {
    ///     let mut res = Response::new(Full::new(Bytes::new()));
    ///     *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    ///     Ok::<_, tower_idempotency::store::BoxError>(res)
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
    /// [`ClientError::BodyTooLarge`](super::ClientError::BodyTooLarge) before it is sent.
    ///
    /// ```
    /// use tower_idempotency::client::IdempotentClientLayer;
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
        IdempotentClient::from_config(inner, self.config.clone())
    }
}
