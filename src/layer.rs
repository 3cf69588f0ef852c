//! [`IdempotencyLayer`] and its configuration.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{HeaderName, Method, StatusCode};
use tower_layer::Layer;

use crate::body::{KeepBody, WrapBody};
use crate::config::Config;
use crate::engine::{Engine, InFlightPolicy, Settings, StoreErrorPolicy};
use crate::fingerprint::FingerprintConfig;
use crate::problem::ProblemDocs;
use crate::service::{Idempotency, Shared};
use crate::store::Store;

/// Applies [`Idempotency`] to a service: requests with an
/// `Idempotency-Key` run once, and every retry gets the recorded response.
///
/// The defaults follow Stripe and the IETF draft; every `with_*` method
/// changes one of them. See the [crate docs](crate) for an example.
///
/// | setting | default |
/// |---|---|
/// | [`with_methods`](Self::with_methods) | `POST`, `PATCH` |
/// | [`with_header`](Self::with_header) | `Idempotency-Key` |
/// | [`with_require_key`](Self::with_require_key) | `false`: a request without a key passes through |
/// | [`with_key_length`](Self::with_key_length) | 1 to 255 characters |
/// | [`with_ttl`](Self::with_ttl) | 24 hours |
/// | [`with_lease`](Self::with_lease) | 30 seconds, renewed while the handler runs |
/// | [`with_max_request_body`](Self::with_max_request_body) | 1 MiB (413 above) |
/// | [`with_max_response_body`](Self::with_max_response_body) | 4 MiB (a tombstone above) |
/// | [`with_scope`](Self::with_scope), [`with_principal_scope`](Self::with_principal_scope) | none: keys are global |
/// | [`with_credential_binding`](Self::with_credential_binding) | on: an unscoped request's `Authorization` is part of its fingerprint |
/// | [`with_fingerprint`](Self::with_fingerprint) | method, path and query, body |
/// | [`with_in_flight`](Self::with_in_flight) | [`InFlightPolicy::Reject`] (409) |
/// | [`with_store_error_policy`](Self::with_store_error_policy) | [`StoreErrorPolicy::FailClosed`] (503) |
/// | [`with_record_if`](Self::with_record_if) | [`default_record_if`](crate::default_record_if) |
/// | [`with_replayed_header`](Self::with_replayed_header) | `Idempotent-Replayed: true` |
/// | [`with_store_timeout`](Self::with_store_timeout) | 2 seconds per store call |
/// | [`with_write_retries`](Self::with_write_retries) | 8 background retries of a failed record write or release |
/// | [`with_problems`](Self::with_problems) | `type` URIs on this crate's docs, no `Link` header |
/// | [`keep_body_type`](Self::keep_body_type) | off: response bodies are [`ResponseBody`](crate::ResponseBody) ([`WrapBody`]) |
#[must_use]
pub struct IdempotencyLayer<M = WrapBody> {
    /// The store and the settings, shared with every service made from
    /// this layer: making one (axum does it per route) is a reference count.
    pub(crate) shared: Arc<Shared>,
    mode: PhantomData<fn() -> M>,
}

impl<M> Clone for IdempotencyLayer<M> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            mode: PhantomData,
        }
    }
}

impl<M> fmt::Debug for IdempotencyLayer<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.shared.config;
        let e = &self.shared.engine.settings;
        f.debug_struct("IdempotencyLayer")
            .field("header", &c.header)
            .field("methods", &c.methods)
            .field("require_key", &c.require_key)
            .field("ttl", &e.ttl)
            .field("lease", &e.lease)
            .field("max_request_body", &c.max_request_body)
            .field("max_response_body", &c.max_response_body)
            .field("scoped", &c.scope.is_some())
            .field("bind_credentials", &c.bind_credentials)
            .field("in_flight", &e.in_flight)
            .field("on_store_error", &e.on_store_error)
            .finish_non_exhaustive()
    }
}

/// The largest body a record can hold: its length is encoded in 32 bits.
/// [`IdempotencyLayer::with_max_response_body`] clamps to it.
const MAX_RECORDED_BODY: usize = u32::MAX as usize;

impl IdempotencyLayer {
    /// A layer over `store` with the default settings.
    pub fn new(store: impl Store) -> Self {
        Self::from_arc(Arc::new(store))
    }

    /// A layer over a store that is already shared.
    pub fn from_arc(store: Arc<dyn Store>) -> Self {
        Self {
            shared: Arc::new(Shared {
                engine: Engine::new(store),
                config: Config::default(),
            }),
            mode: PhantomData,
        }
    }
}

impl<M> IdempotencyLayer<M> {
    /// Keeps the inner service's response body type instead of wrapping it
    /// in [`ResponseBody`](crate::ResponseBody): see [`KeepBody`]. The
    /// inner body type must implement `From<ResponseBody<B>>`, as axum's
    /// `Body` does with the `axum` feature.
    ///
    /// Under axum's `Router::layer` this spares every response a second
    /// boxing (axum boxes any body type but its own).
    ///
    /// ```
    /// # #[cfg(feature = "axum")] {
    /// use axum::{Router, routing::post};
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore};
    ///
    /// let app: Router = Router::new()
    ///     .route(
    ///         "/orders",
    ///         post(|| async { "created" })
    ///             .route_layer(IdempotencyLayer::new(MemoryStore::new()).keep_body_type()),
    ///     );
    /// # }
    /// ```
    pub fn keep_body_type(self) -> IdempotencyLayer<KeepBody> {
        IdempotencyLayer {
            shared: self.shared,
            mode: PhantomData,
        }
    }

    fn config(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(&mut Arc::make_mut(&mut self.shared).config);
        self
    }

    fn engine(mut self, f: impl FnOnce(&mut Settings)) -> Self {
        f(&mut Arc::make_mut(&mut self.shared).engine.settings);
        self
    }

    /// The methods the layer covers (default `POST` and `PATCH`). Every other
    /// method passes through untouched and unbuffered.
    ///
    /// ```
    /// use axum::{Router, body::Body, http::Request, routing::put};
    /// use http::Method;
    /// use tower::ServiceExt;
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let layer = IdempotencyLayer::new(MemoryStore::new())
    ///     .with_methods([Method::POST, Method::PUT, Method::PATCH]);
    /// let app = Router::new().route("/items/7", put(|| async { "stored" }).route_layer(layer));
    /// let req = || Request::put("/items/7").header("idempotency-key", "k1").body(Body::empty()).unwrap();
    ///
    /// app.clone().oneshot(req()).await.unwrap();
    /// let retry = app.oneshot(req()).await.unwrap();
    /// assert_eq!(retry.headers()["idempotent-replayed"], "true");
    /// # }
    /// ```
    pub fn with_methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let methods = methods.into_iter().collect();
        self.config(|c| c.methods = methods)
    }

    /// The header that carries the key (default `Idempotency-Key`); a webhook
    /// receiver can key on the sender's delivery-id header instead.
    ///
    /// ```
    /// use axum::{Router, body::Body, http::Request, routing::post};
    /// use http::HeaderName;
    /// use tower::ServiceExt;
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let layer = IdempotencyLayer::new(MemoryStore::new())
    ///     .with_header(HeaderName::from_static("x-delivery-id"));
    /// let app = Router::new().route("/webhooks", post(|| async { "handled" }).route_layer(layer));
    /// let req = || Request::post("/webhooks").header("x-delivery-id", "evt_1").body(Body::empty()).unwrap();
    ///
    /// app.clone().oneshot(req()).await.unwrap();
    /// let redelivery = app.oneshot(req()).await.unwrap();
    /// assert_eq!(redelivery.headers()["idempotent-replayed"], "true");
    /// # }
    /// ```
    pub fn with_header(self, name: HeaderName) -> Self {
        self.config(|c| c.header = name)
    }

    /// Whether a covered request without a key is refused with 400 (default:
    /// no, it passes through without idempotency).
    ///
    /// ```
    /// use axum::{Router, body::Body, http::Request, routing::post};
    /// use tower::ServiceExt;
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).with_require_key(true);
    /// let app = Router::new().route("/payments", post(|| async { "charged" }).route_layer(layer));
    ///
    /// let res = app.oneshot(Request::post("/payments").body(Body::empty()).unwrap()).await.unwrap();
    /// assert_eq!(res.status(), 400, "no Idempotency-Key");
    /// # }
    /// ```
    pub fn with_require_key(self, require: bool) -> Self {
        self.config(|c| c.require_key = require)
    }

    /// The accepted key length in characters, without quotes (default 1 to
    /// 255).
    ///
    /// ```
    /// use axum::{Router, body::Body, http::Request, routing::post};
    /// use tower::ServiceExt;
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// // Keys must be UUID-sized: too short to guess is too short to accept.
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).with_key_length(32, 64);
    /// let app = Router::new().route("/payments", post(|| async { "charged" }).route_layer(layer));
    ///
    /// let req = Request::post("/payments").header("idempotency-key", "1").body(Body::empty()).unwrap();
    /// assert_eq!(app.oneshot(req).await.unwrap().status(), 400);
    /// # }
    /// ```
    pub fn with_key_length(self, min: usize, max: usize) -> Self {
        self.config(|c| {
            c.min_key_len = min.max(1);
            c.max_key_len = max.max(c.min_key_len);
        })
    }

    /// How long a completed record replays (default 24 hours).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore};
    ///
    /// // A retry a day later is a new request.
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).with_ttl(Duration::from_secs(60 * 60));
    /// # let _ = layer;
    /// ```
    ///
    /// The crate docs' [testing example](crate#testing-handlers) shows a
    /// record expiring under a paused clock.
    pub fn with_ttl(self, ttl: Duration) -> Self {
        self.engine(|e| e.ttl = ttl)
    }

    /// How long an in-flight lock lives without a heartbeat (default 30 s).
    /// The layer renews it every third of the lease while the handler runs;
    /// a process that dies leaves a lock that a retry takes over after this.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore};
    ///
    /// // A crashed instance's lock frees its key after 10 s instead of 30 s.
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).with_lease(Duration::from_secs(10));
    /// # let _ = layer;
    /// ```
    pub fn with_lease(self, lease: Duration) -> Self {
        self.engine(|e| e.set_lease(lease))
    }

    /// The largest request body a covered request may carry (default 1 MiB);
    /// larger ones get 413 before any store call.
    ///
    /// ```
    /// use axum::{Router, body::Body, http::Request, routing::post};
    /// use tower::ServiceExt;
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).with_max_request_body(64 * 1024);
    /// let app = Router::new().route("/orders", post(|| async { "created" }).route_layer(layer));
    ///
    /// let upload = Body::from(vec![b'x'; 100 * 1024]);
    /// let req = Request::post("/orders").header("idempotency-key", "k1").body(upload).unwrap();
    /// assert_eq!(app.oneshot(req).await.unwrap().status(), 413);
    /// # }
    /// ```
    pub fn with_max_request_body(self, bytes: usize) -> Self {
        self.config(|c| c.max_request_body = bytes)
    }

    /// The largest response body that is recorded (default 4 MiB), at most
    /// 4 GiB − 1 (a record holds a body's length in 32 bits; larger values
    /// are clamped to it). A larger response still reaches
    /// the client in full, and the key records a tombstone: retries are
    /// told the request completed, and it never runs again.
    ///
    /// ```
    /// use axum::{Router, body::Body, http::Request, routing::post};
    /// use tower::ServiceExt;
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).with_max_response_body(1024);
    /// let app = Router::new().route("/reports", post(|| async { "x".repeat(4096) }).route_layer(layer));
    /// let req = || Request::post("/reports").header("idempotency-key", "k1").body(Body::empty()).unwrap();
    ///
    /// assert_eq!(app.clone().oneshot(req()).await.unwrap().status(), 200);
    /// assert_eq!(app.oneshot(req()).await.unwrap().status(), 410, "ran, but not kept");
    /// # }
    /// ```
    pub fn with_max_response_body(self, bytes: usize) -> Self {
        self.config(|c| c.max_response_body = bytes.min(MAX_RECORDED_BODY))
    }

    /// Scopes keys by tenant or principal: the same key under two scopes is
    /// two independent records. The closure sees the request head (after
    /// authentication layers have put their extensions there).
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore};
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).with_scope(|parts| {
    ///     parts.headers.get("x-tenant-id")?.to_str().ok().map(str::to_owned)
    /// });
    /// # let _ = layer;
    /// ```
    pub fn with_scope<F>(self, scope: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.config(|c| c.scope = Some(Arc::new(scope)))
    }

    /// Scopes keys by the authenticated principal: the value of type `P`
    /// that an authentication layer in front put in the request
    /// extensions (a user or account id of the application's own type).
    /// Two principals then never share a record, and one principal keeps
    /// its records across token refreshes.
    ///
    /// A request without a `P` (not authenticated) has no scope: its
    /// `Authorization`, if any, is bound into its fingerprint instead (see
    /// [`with_credential_binding`](Self::with_credential_binding)).
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore};
    ///
    /// /// What the application's auth middleware inserts.
    /// #[derive(Clone)]
    /// struct UserId(u64);
    ///
    /// impl std::fmt::Display for UserId {
    ///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    ///         write!(f, "user:{}", self.0)
    ///     }
    /// }
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).with_principal_scope::<UserId>();
    /// # let _ = layer;
    /// ```
    pub fn with_principal_scope<P>(self) -> Self
    where
        P: fmt::Display + Send + Sync + 'static,
    {
        self.with_scope(|parts| parts.extensions.get::<P>().map(ToString::to_string))
    }

    /// How the layer writes its problem documents: the base of their
    /// `type` URIs (default: this crate's documentation) and an optional
    /// `Link: <…>; rel="describedby"` header pointing at the service's own
    /// documentation of its idempotency contract.
    ///
    /// ```
    /// use tower_idempotency::problem::ProblemDocs;
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore};
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).with_problems(
    ///     ProblemDocs::new()
    ///         .with_type_base("https://api.example.com/problems/")
    ///         .with_describedby("https://api.example.com/docs/idempotency".parse().unwrap()),
    /// );
    /// # let _ = layer;
    /// ```
    pub fn with_problems(self, problems: ProblemDocs) -> Self {
        self.config(|c| c.problems = problems)
    }

    /// The layer's idempotency contract, to write into an OpenAPI document
    /// (feature `utoipa`): the key header parameter, the problem responses,
    /// the `Idempotent-Replayed` header and the expiry policy of every
    /// operation the layer covers. See [`crate::openapi`].
    #[cfg(feature = "utoipa")]
    #[cfg_attr(docsrs, doc(cfg(feature = "utoipa")))]
    pub fn openapi(&self) -> crate::openapi::IdempotencyOpenApi {
        let c = &self.shared.config;
        crate::openapi::IdempotencyOpenApi {
            methods: c.methods.clone(),
            header: c.header.clone(),
            require_key: c.require_key,
            min_key_len: c.min_key_len,
            max_key_len: c.max_key_len,
            ttl: self.shared.engine.settings.ttl,
            replayed_header: c.replayed_header.clone(),
            type_base: c.problems.type_base().to_owned(),
            paths: None,
        }
    }

    /// Whether a request that has no scope is bound to its credentials
    /// (default: on).
    ///
    /// With no scope the key space is global: without binding, a caller
    /// who sends another caller's key and body would get that caller's
    /// recorded response. Bound, every `Authorization` value is part of the
    /// request's fingerprint, so another credential gets `422` (the key is
    /// in use for another request) and never the response. The price: a
    /// retry whose token was refreshed in between also gets `422`. Scope
    /// keys by principal ([`with_principal_scope`](Self::with_principal_scope))
    /// to keep a principal's records across token refreshes; the binding
    /// then applies only to requests without a principal.
    ///
    /// Turn it off only when no response can be private, or when every
    /// key is unguessable and never shared.
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore};
    ///
    /// // A public catalogue API: responses hold nothing private, so a
    /// // refreshed token must not turn a retry into a 422.
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).with_credential_binding(false);
    /// # let _ = layer;
    /// ```
    pub fn with_credential_binding(self, on: bool) -> Self {
        self.config(|c| c.bind_credentials = on)
    }

    /// What the fingerprint covers (default: method, path and query, body).
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore, fingerprint::FingerprintConfig};
    ///
    /// // Clients may reorder JSON members between retries.
    /// let layer = IdempotencyLayer::new(MemoryStore::new())
    ///     .with_fingerprint(FingerprintConfig::default().with_canonical_json());
    /// # let _ = layer;
    /// ```
    pub fn with_fingerprint(self, fingerprint: FingerprintConfig) -> Self {
        self.config(|c| c.fingerprint = fingerprint)
    }

    /// What a duplicate gets while the first request runs (default 409).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::{IdempotencyLayer, InFlightPolicy, MemoryStore};
    ///
    /// // A duplicate waits up to 5 s for the first request's response instead of a 409.
    /// let layer = IdempotencyLayer::new(MemoryStore::new())
    ///     .with_in_flight(InFlightPolicy::Wait(Duration::from_secs(5)));
    /// # let _ = layer;
    /// ```
    pub fn with_in_flight(self, policy: InFlightPolicy) -> Self {
        self.engine(|e| e.in_flight = policy)
    }

    /// What happens when the store fails (default: 503, fail closed).
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore, StoreErrorPolicy};
    ///
    /// // Availability first: while the store is down, requests run unprotected.
    /// let layer = IdempotencyLayer::new(MemoryStore::new())
    ///     .with_store_error_policy(StoreErrorPolicy::FailOpen);
    /// # let _ = layer;
    /// ```
    pub fn with_store_error_policy(self, policy: StoreErrorPolicy) -> Self {
        self.engine(|e| e.on_store_error = policy)
    }

    /// Which responses are recorded, by status (default
    /// [`default_record_if`](crate::default_record_if)). A response that is not recorded releases the
    /// key, so the client may retry. A handler overrides this for one
    /// response with [`Retention`](crate::Retention).
    ///
    /// ```
    /// use axum::{Router, body::Body, http::{Request, StatusCode}, routing::post};
    /// use tower::ServiceExt;
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// // Record successes only: a rejected request runs again when retried.
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).with_record_if(|status| status.is_success());
    /// let handler = || async { (StatusCode::NOT_FOUND, "no such account") };
    /// let app = Router::new().route("/transfers", post(handler).route_layer(layer));
    /// let req = || Request::post("/transfers").header("idempotency-key", "k1").body(Body::empty()).unwrap();
    ///
    /// app.clone().oneshot(req()).await.unwrap();
    /// let retry = app.oneshot(req()).await.unwrap();
    /// assert!(retry.headers().get("idempotent-replayed").is_none(), "ran again");
    /// # }
    /// ```
    pub fn with_record_if<F>(self, record_if: F) -> Self
    where
        F: Fn(StatusCode) -> bool + Send + Sync + 'static,
    {
        self.config(|c| c.record_if = Arc::new(record_if))
    }

    /// The header a replay carries with the value `true` (default
    /// `Idempotent-Replayed`); `None` for no header.
    ///
    /// ```
    /// use axum::{Router, body::Body, http::Request, routing::post};
    /// use http::HeaderName;
    /// use tower::ServiceExt;
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let layer = IdempotencyLayer::new(MemoryStore::new())
    ///     .with_replayed_header(Some(HeaderName::from_static("x-idempotent-replay")));
    /// let app = Router::new().route("/orders", post(|| async { "created" }).route_layer(layer));
    /// let req = || Request::post("/orders").header("idempotency-key", "k1").body(Body::empty()).unwrap();
    ///
    /// app.clone().oneshot(req()).await.unwrap();
    /// let retry = app.oneshot(req()).await.unwrap();
    /// assert_eq!(retry.headers()["x-idempotent-replay"], "true");
    /// assert!(retry.headers().get("idempotent-replayed").is_none());
    /// # }
    /// ```
    pub fn with_replayed_header(self, name: Option<HeaderName>) -> Self {
        self.config(|c| c.replayed_header = name)
    }

    /// A response header that is never recorded or replayed, in addition to
    /// the hop-by-hop headers and `Date`.
    ///
    /// ```
    /// use axum::{Router, body::Body, http::Request, routing::post};
    /// use http::HeaderName;
    /// use tower::ServiceExt;
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// // A per-response trace id must not be replayed as if it were the retry's.
    /// let layer = IdempotencyLayer::new(MemoryStore::new())
    ///     .with_excluded_header(HeaderName::from_static("x-trace-id"));
    /// let handler = || async { ([("x-trace-id", "4bf92f35")], "created") };
    /// let app = Router::new().route("/orders", post(handler).route_layer(layer));
    /// let req = || Request::post("/orders").header("idempotency-key", "k1").body(Body::empty()).unwrap();
    ///
    /// assert_eq!(app.clone().oneshot(req()).await.unwrap().headers()["x-trace-id"], "4bf92f35");
    /// let retry = app.oneshot(req()).await.unwrap();
    /// assert!(retry.headers().get("x-trace-id").is_none());
    /// # }
    /// ```
    pub fn with_excluded_header(self, name: HeaderName) -> Self {
        self.config(|c| c.excluded_headers.push(name))
    }

    /// The bound on every store call (default 2 s); past it the call counts
    /// as a store failure.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore};
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).with_store_timeout(Duration::from_millis(500));
    /// # let _ = layer;
    /// ```
    pub fn with_store_timeout(self, timeout: Duration) -> Self {
        self.engine(|e| e.store_timeout = timeout)
    }

    /// The `Retry-After` sent with 409 and 503 (default 1 s).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore};
    ///
    /// // Handlers take seconds: tell a duplicate to come back later.
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).with_retry_after(Duration::from_secs(5));
    /// # let _ = layer;
    /// ```
    pub fn with_retry_after(self, after: Duration) -> Self {
        self.config(|c| c.retry_after = after)
    }

    /// How many more times a failed store write is retried in the
    /// background after the response was sent (default 8): both the
    /// `complete` that records the response and the `release` that frees
    /// the key of a response that is not recorded. The retries back off
    /// exponentially from 50 ms, each wait at most a quarter of the lease:
    /// about 13 s in all with the defaults, so a store outage shorter than
    /// that loses no record and leaves no key locked until its lease ends.
    /// `0` disables them. A transactional store's failed `complete` is
    /// never retried (its handler's writes were rolled back).
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore};
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).with_write_retries(3);
    /// # let _ = layer;
    /// ```
    pub fn with_write_retries(self, retries: u32) -> Self {
        self.engine(|e| e.complete_retries = retries)
    }

    /// The old name of [`with_write_retries`](Self::with_write_retries),
    /// which it calls: it governs `release` as well as `complete`.
    #[deprecated(
        since = "0.1.0",
        note = "use with_write_retries: it also governs release"
    )]
    pub fn with_complete_retries(self, retries: u32) -> Self {
        self.with_write_retries(retries)
    }
}

impl<S, M> Layer<S> for IdempotencyLayer<M> {
    type Service = Idempotency<S, M>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            shared: self.shared.clone(),
            mode: PhantomData,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_separates_store_keys() {
        let key = crate::key::parse_key(b"k", 1, 255).unwrap();
        let scoped = IdempotencyLayer::new(crate::MemoryStore::new())
            .with_scope(|p| Some(p.headers.get("t")?.to_str().ok()?.to_owned()));
        let req = |t: &str| {
            http::Request::builder()
                .header("t", t)
                .body(())
                .unwrap()
                .into_parts()
                .0
        };
        let a = scoped.shared.config.store_key(&req("a"), &key).0;
        let b = scoped.shared.config.store_key(&req("b"), &key).0;
        assert_ne!(a, b);
        assert_eq!(a, scoped.shared.config.store_key(&req("a"), &key).0);
        let unscoped = IdempotencyLayer::new(crate::MemoryStore::new());
        assert_ne!(a, unscoped.shared.config.store_key(&req("a"), &key).0);
    }
}
