//! [`Idempotency`]: the request path.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, header};
use http_body::Body;
use tokio::time::Instant;
use tower_service::Service;
use tracing::Instrument;

use crate::body::{BodyMode, Collected, ResponseBody, WrapBody, collect};
use crate::fingerprint::Fingerprint;
use crate::future::{CatchUnwind, Detached, ResponseFuture};
use crate::key::{IdempotencyKey, KeyError, key_from_headers};
use crate::layer::{Config, InFlightPolicy, Retention, StoreErrorPolicy};
use crate::observe::{Outcome, mark, store_latency};
use crate::problem::Rejection;
use crate::record::{Record, RecordKind};
use crate::store::{Begin, LockToken, Store, StoreError, StoreKey};

/// Middleware that runs each keyed request once and replays its response to
/// every retry. Made by [`IdempotencyLayer`](crate::IdempotencyLayer).
///
/// The error type is the inner service's: every decision the layer makes is
/// a response, so the service drops into axum's `Router::layer` as it is.
/// The response body type is chosen by the mode `M`: [`ResponseBody`]
/// around the inner body ([`WrapBody`], the default), or the inner body type
/// itself ([`KeepBody`](crate::KeepBody)).
pub struct Idempotency<S, M = WrapBody> {
    pub(crate) inner: S,
    pub(crate) shared: Arc<Shared>,
    pub(crate) mode: PhantomData<fn() -> M>,
}

/// What every request of one service shares: the store and the settings,
/// behind one reference count.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) config: Config,
}

impl<S: Clone, M> Clone for Idempotency<S, M> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            mode: PhantomData,
        }
    }
}

impl<S: fmt::Debug, M> fmt::Debug for Idempotency<S, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, M> Idempotency<S, M> {
    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

fn reject<B: Body>(rejection: Rejection, outcome: Outcome) -> Response<ResponseBody<B>> {
    let res = rejection
        .to_response()
        .map(|body| ResponseBody::full(body, None));
    mark(res, outcome)
}

impl<S, M, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<S, M>
where
    M: BodyMode<ResBody>,
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Send,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Send,
{
    type Response = Response<M::Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error, M>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let config = &self.shared.config;
        if !config.covers(req.method()) {
            return ResponseFuture::passthrough(self.inner.call(req));
        }
        let key = match key_from_headers(
            req.headers(),
            &config.header,
            config.min_key_len,
            config.max_key_len,
        ) {
            Ok(key) => key,
            Err(KeyError::Missing) if !config.require_key => {
                return ResponseFuture::passthrough(self.inner.call(req));
            }
            Err(KeyError::Missing) => {
                tracing::debug!(outcome = "rejected", reason = "key-missing");
                return ResponseFuture::ready(reject(Rejection::KeyMissing, Outcome::Rejected));
            }
            Err(e) => {
                tracing::debug!(outcome = "rejected", reason = "key-invalid", error = %e);
                return ResponseFuture::ready(reject(Rejection::KeyInvalid(e), Outcome::Rejected));
            }
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|len| len > config.max_request_body as u64) {
            tracing::debug!(outcome = "rejected", reason = "body-too-large");
            return ResponseFuture::ready(reject(
                Rejection::BodyTooLarge {
                    limit: config.max_request_body,
                },
                Outcome::Rejected,
            ));
        }
        // The clone is not ready; the ready one goes with this request
        // (tower-service docs, "Be careful when cloning inner services").
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let ctx = Ctx(self.shared.clone());
        // The whole covered path is detached from the connection: once the
        // lock is taken it must be completed or released, whoever waits.
        ResponseFuture::covered(Detached::new(Box::pin(ctx.run(inner, req, key))))
    }
}

/// What one covered request needs from the service.
#[derive(Clone)]
struct Ctx(Arc<Shared>);

impl std::ops::Deref for Ctx {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

#[allow(clippy::large_enum_variant)] // built once per request, boxing would cost an allocation
enum Acquire<B: Body> {
    Token(LockToken),
    Respond(Response<ResponseBody<B>>),
    FailOpen,
}

impl Ctx {
    async fn run<S, ReqBody, ResBody>(
        self,
        inner: S,
        req: Request<ReqBody>,
        key: IdempotencyKey,
    ) -> Result<Response<ResponseBody<ResBody>>, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        ReqBody: Body + From<Bytes> + Send + 'static,
        ResBody: Body + Send + 'static,
        ResBody::Data: Send,
        ResBody::Error: Send,
    {
        let (mut parts, body) = req.into_parts();
        let store_key = self.config.store_key(&parts, &key);
        let mut fingerprinter =
            self.config
                .fingerprint
                .start(&parts.method, &parts.uri, &parts.headers);
        let covers_body = self.config.fingerprint.covers_body();
        let body = std::pin::pin!(body);
        let bytes = match collect(body, self.config.max_request_body, |chunk| {
            if covers_body {
                fingerprinter.update(chunk);
            }
        })
        .await
        {
            Collected::Full { data, .. } => data,
            Collected::TooLarge { .. } => {
                tracing::debug!(key = %store_key, outcome = "rejected", reason = "body-too-large");
                return Ok(reject(
                    Rejection::BodyTooLarge {
                        limit: self.config.max_request_body,
                    },
                    Outcome::Rejected,
                ));
            }
            Collected::Failed { .. } => {
                tracing::debug!(key = %store_key, outcome = "rejected", reason = "body-unreadable");
                return Ok(reject(Rejection::BodyUnreadable, Outcome::Rejected));
            }
        };
        let fingerprint = fingerprinter.finish();
        parts.extensions.insert(key);
        let req = Request::from_parts(parts, ReqBody::from(bytes));
        let span = tracing::info_span!(
            "idempotency",
            key = %store_key,
            outcome = tracing::field::Empty,
            status = tracing::field::Empty,
            store_us = tracing::field::Empty,
        );
        self.decide(inner, req, store_key, fingerprint)
            .instrument(span)
            .await
    }

    async fn decide<S, ReqBody, ResBody>(
        self,
        mut inner: S,
        req: Request<ReqBody>,
        key: StoreKey,
        fingerprint: Fingerprint,
    ) -> Result<Response<ResponseBody<ResBody>>, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
        S::Future: Send + 'static,
        ResBody: Body + Send + 'static,
    {
        match self.acquire(&key, &fingerprint).await {
            Acquire::Token(token) => self.execute(inner, req, key, token, fingerprint).await,
            Acquire::Respond(res) => Ok(res),
            Acquire::FailOpen => {
                let res = inner.call(req).await?;
                Ok(mark(res.map(ResponseBody::stream), Outcome::FailedOpen))
            }
        }
    }

    /// Bounds one store call by the configured timeout, and times it.
    async fn bounded<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        // Read the clock only for someone who will see the figure.
        let timed = cfg!(feature = "metrics") || !tracing::Span::current().is_disabled();
        let started = timed.then(Instant::now);
        let out = Bounded::new(call, self.config.store_timeout).await;
        if let Some(started) = started {
            store_latency(op, started.elapsed());
        }
        out
    }

    async fn acquire<B: Body>(&self, key: &StoreKey, fingerprint: &Fingerprint) -> Acquire<B> {
        let deadline = match self.config.in_flight {
            InFlightPolicy::Wait(bound) => Some(Instant::now() + bound),
            InFlightPolicy::Reject => None,
        };
        loop {
            let begun = self
                .bounded(
                    "begin",
                    self.store
                        .as_ref()
                        .begin(key, fingerprint, self.config.lease),
                )
                .await;
            match begun {
                Ok(Begin::Acquired(token)) => return Acquire::Token(token),
                Ok(Begin::Completed(record)) => {
                    if record.fingerprint() != fingerprint {
                        tracing::debug!(key = %key, outcome = "mismatch");
                        return Acquire::Respond(reject(Rejection::KeyReused, Outcome::Mismatch));
                    }
                    tracing::debug!(key = %key, outcome = "replayed");
                    return Acquire::Respond(self.replay(record));
                }
                Ok(Begin::InFlight { fingerprint: held }) => {
                    if held != *fingerprint {
                        tracing::debug!(key = %key, outcome = "mismatch");
                        return Acquire::Respond(reject(Rejection::KeyReused, Outcome::Mismatch));
                    }
                    let now = Instant::now();
                    match deadline {
                        Some(deadline) if now < deadline => {
                            let left = deadline - now;
                            let waited = tokio::time::timeout(
                                left + self.config.store_timeout,
                                self.store.as_ref().wait(key, left),
                            )
                            .await;
                            if let Ok(Err(e)) = waited {
                                log_store_error("wait", key, &e);
                            }
                        }
                        _ => {
                            tracing::debug!(key = %key, outcome = "conflict");
                            return Acquire::Respond(reject(
                                Rejection::InFlight {
                                    retry_after: self.config.retry_after,
                                },
                                Outcome::Conflict,
                            ));
                        }
                    }
                }
                Err(e) => {
                    log_store_error("begin", key, &e);
                    return match self.config.on_store_error {
                        StoreErrorPolicy::FailClosed => Acquire::Respond(reject(
                            Rejection::StoreUnavailable {
                                retry_after: self.config.retry_after,
                            },
                            Outcome::StoreError,
                        )),
                        StoreErrorPolicy::FailOpen => Acquire::FailOpen,
                    };
                }
            }
        }
    }

    async fn execute<S, ReqBody, ResBody>(
        self,
        mut inner: S,
        req: Request<ReqBody>,
        key: StoreKey,
        token: LockToken,
        fingerprint: Fingerprint,
    ) -> Result<Response<ResponseBody<ResBody>>, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        ResBody: Body,
    {
        let mut req = req;
        self.store.attach(&key, &token, req.extensions_mut());
        let call = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.call(req)));
        let outcome = match call {
            Ok(fut) => {
                let fut = std::pin::pin!(CatchUnwind::new(fut));
                self.heartbeat(&key, &token, fut).await
            }
            Err(panic) => Err(panic),
        };
        let res = match outcome {
            Err(_panic) => {
                tracing::error!(key = %key, outcome = "released", "handler panicked; the key is released");
                self.release(&key, &token).await;
                return Ok(reject(Rejection::HandlerPanicked, Outcome::Released));
            }
            Ok(Err(e)) => {
                tracing::debug!(key = %key, outcome = "released", "handler failed; the key is released");
                self.release(&key, &token).await;
                return Err(e);
            }
            Ok(Ok(res)) => res,
        };
        let (parts, body) = res.into_parts();
        let (record, ttl) = match parts.extensions.get::<Retention>() {
            Some(Retention::DoNotRecord) => (false, self.config.ttl),
            Some(Retention::Record) => (true, self.config.ttl),
            Some(Retention::RecordFor(ttl)) => (true, *ttl),
            None => ((self.config.record_if)(parts.status), self.config.ttl),
        };
        if !record {
            tracing::debug!(key = %key, status = parts.status.as_u16(), outcome = "released", "response not recorded");
            self.release(&key, &token).await;
            let res = Response::from_parts(parts, ResponseBody::stream(body));
            return Ok(mark(res, Outcome::Released));
        }
        let collecting = std::pin::pin!(collect(
            Box::pin(body),
            self.config.max_response_body,
            |_| {}
        ));
        let collected = self.heartbeat(&key, &token, collecting).await;
        match collected {
            Collected::Full { data, trailers } => {
                // The body goes into the record and comes back out of it
                // for the client: a store copies what it keeps.
                let record = Record::response(
                    fingerprint,
                    parts.status,
                    self.recordable(&parts.headers),
                    data,
                )
                .with_trailers(trailers.as_ref().map(fields).unwrap_or_default());
                let written = self.complete(key, token, &record, ttl).await;
                if !written && let Some(res) = self.rolled_back(&key) {
                    return Ok(res);
                }
                tracing::debug!(key = %key, status = parts.status.as_u16(), outcome = "executed");
                let res =
                    Response::from_parts(parts, ResponseBody::full(record.into_body(), trailers));
                Ok(mark(res, Outcome::Executed))
            }
            Collected::TooLarge { prefix, rest } => {
                let record =
                    Record::tombstone(fingerprint, parts.status, self.recordable(&parts.headers));
                let written = self.complete(key, token, &record, ttl).await;
                if !written && let Some(res) = self.rolled_back(&key) {
                    return Ok(res);
                }
                tracing::warn!(key = %key, status = parts.status.as_u16(), outcome = "tombstone",
                    limit = self.config.max_response_body, "response too large to record; retries get a 410");
                let res = Response::from_parts(parts, ResponseBody::chain(prefix, rest));
                Ok(mark(res, Outcome::Tombstone))
            }
            Collected::Failed { error } => {
                tracing::debug!(key = %key, outcome = "released", "response body failed; the key is released");
                self.release(&key, &token).await;
                let res = Response::from_parts(parts, ResponseBody::failed(error));
                Ok(mark(res, Outcome::Released))
            }
        }
    }

    /// Runs `fut` while extending the lease every third of it. Pinned by
    /// the caller: an async fn that takes a future by value holds it twice.
    async fn heartbeat<F: Future>(
        &self,
        key: &StoreKey,
        token: &LockToken,
        mut fut: Pin<&mut F>,
    ) -> F::Output {
        // A future that finishes on its first poll needs no heartbeat, and
        // its request's future no room for one.
        if let Poll::Ready(out) =
            std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await
        {
            return out;
        }
        let lease = self.config.lease;
        let beat = Box::pin(async {
            loop {
                tokio::time::sleep(lease / 3).await;
                match self
                    .bounded("extend", self.store.as_ref().extend(key, token, lease))
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(key = %key, "lease lost while the handler ran: another request took the key over; this response will not be recorded");
                        return;
                    }
                    Err(e) => log_store_error("extend", key, &e),
                }
            }
        });
        tokio::select! {
            biased;
            out = &mut fut => return out,
            () = beat => {}
        }
        fut.await
    }

    async fn release(&self, key: &StoreKey, token: &LockToken) {
        match self
            .bounded("release", self.store.as_ref().release(key, token))
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(key = %key, "release found the lock taken over");
            }
            Err(e) => {
                log_store_error("release", key, &e);
                // A lock left behind refuses every retry until its lease
                // ends: keep trying in the background, as for `complete`.
                let (this, key, token) = (self.clone(), *key, *token);
                tokio::spawn(async move {
                    for attempt in 0..this.config.complete_retries {
                        tokio::time::sleep(this.backoff(attempt)).await;
                        match this
                            .bounded("release", this.store.as_ref().release(&key, &token))
                            .await
                        {
                            Ok(_) => return,
                            Err(e) => log_store_error("release retry", &key, &e),
                        }
                    }
                });
            }
        }
    }

    /// The wait before background retry `attempt`: exponential from 50 ms,
    /// and well inside the lease, which still holds the key while the store
    /// recovers.
    fn backoff(&self, attempt: u32) -> Duration {
        Duration::from_millis(50 << attempt.min(10)).min(self.config.lease / 4)
    }

    /// Writes the record; on a store failure, answers the client anyway and
    /// retries in the background (with a copy of the record) a bounded
    /// number of times. Returns whether the record was written (at once).
    async fn complete(
        &self,
        key: StoreKey,
        token: LockToken,
        record: &Record,
        ttl: Duration,
    ) -> bool {
        match self
            .bounded(
                "complete",
                self.store.as_ref().complete(&key, &token, record, ttl),
            )
            .await
        {
            Ok(true) => return true,
            Ok(false) => {
                tracing::warn!(key = %key, "lease lost before completion: another request took the key over; this response is not recorded");
                return false;
            }
            Err(e) => log_store_error("complete", &key, &e),
        }
        let retries = self.config.complete_retries;
        if retries == 0 || self.store.commits_handler_writes() {
            return false;
        }
        let record = record.clone();
        let this = self.clone();
        tokio::spawn(async move {
            for attempt in 0..retries {
                tokio::time::sleep(this.backoff(attempt)).await;
                match this
                    .bounded(
                        "complete",
                        this.store.as_ref().complete(&key, &token, &record, ttl),
                    )
                    .await
                {
                    Ok(true) => {
                        tracing::info!(key = %key, attempt = attempt + 1, "record completed on retry");
                        return;
                    }
                    Ok(false) => {
                        tracing::warn!(key = %key, "lease lost before completion retry");
                        return;
                    }
                    Err(e) => log_store_error("complete retry", &key, &e),
                }
            }
            tracing::error!(key = %key, retries, "record not written: the key stays locked until its lease expires, then a retry runs again");
        });
        false
    }

    /// For a store that commits the handler's writes with the record: a
    /// failed completion rolled them back, so the client must not see the
    /// handler's answer.
    fn rolled_back<B: Body>(&self, key: &StoreKey) -> Option<Response<ResponseBody<B>>> {
        if !self.store.commits_handler_writes() {
            return None;
        }
        tracing::error!(key = %key, "completion failed and the handler's writes were rolled back; answering 503");
        Some(reject(
            Rejection::StoreUnavailable {
                retry_after: self.config.retry_after,
            },
            Outcome::StoreError,
        ))
    }

    fn replay<B: Body>(&self, record: Record) -> Response<ResponseBody<B>> {
        let mut res = if record.kind() == RecordKind::Tombstone {
            reject(
                Rejection::ResponseNotStored {
                    original_status: record.status(),
                },
                Outcome::Tombstone,
            )
        } else {
            let trailers = (!record.trailers().is_empty()).then(|| to_map(record.trailers()));
            let mut res = Response::new(ResponseBody::full(record.body().clone(), trailers));
            *res.status_mut() = record.status();
            *res.headers_mut() = to_map(record.headers());
            mark(res, Outcome::Replayed)
        };
        if let Some(name) = &self.config.replayed_header {
            res.headers_mut()
                .insert(name.clone(), HeaderValue::from_static("true"));
        }
        res
    }

    /// The end-to-end headers of a response: not hop-by-hop, not `Date`, not
    /// the replay marker, not excluded by configuration.
    fn recordable(&self, headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
        let listed: Vec<&str> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        headers
            .iter()
            .filter(|(name, _)| {
                !is_hop_by_hop(name)
                    && *name != header::DATE
                    && Some(*name) != self.config.replayed_header.as_ref()
                    && !self.config.excluded_headers.contains(name)
                    && !listed.iter().any(|l| l.eq_ignore_ascii_case(name.as_str()))
            })
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect()
    }
}

pin_project_lite::pin_project! {
    /// A store call bounded by `limit`. The timer is armed only if the call
    /// does not answer on its first poll (the memory store always does):
    /// arming one costs more than such a call, and a future that may need
    /// one would carry it.
    struct Bounded<F> {
        #[pin]
        call: F,
        limit: Duration,
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<F> Bounded<F> {
    fn new(call: F, limit: Duration) -> Self {
        Self {
            call,
            limit,
            timer: None,
        }
    }
}

impl<T, F> Future for Bounded<F>
where
    F: Future<Output = Result<T, StoreError>>,
{
    type Output = Result<T, StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.call.poll(cx) {
            return Poll::Ready(out);
        }
        let limit = *this.limit;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(StoreError::Timeout(limit))),
            Poll::Pending => Poll::Pending,
        }
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "upgrade"
            | "te"
            | "trailer"
            | "proxy-authenticate"
            | "proxy-authorization"
    )
}

fn fields(map: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    map.iter().map(|(n, v)| (n.clone(), v.clone())).collect()
}

fn to_map(fields: &[(HeaderName, HeaderValue)]) -> HeaderMap {
    // Room for the replay marker and what servers add on the way out
    // (axum sets `content-length`): growing a full map rehashes it.
    let mut map = HeaderMap::with_capacity(fields.len() + 4);
    for (n, v) in fields {
        map.append(n.clone(), v.clone());
    }
    map
}

fn log_store_error(op: &'static str, key: &StoreKey, error: &StoreError) {
    let source = std::error::Error::source(error).map(ToString::to_string);
    tracing::error!(key = %key, op, error = %error, source = source.as_deref().unwrap_or(""), outcome = "store_error", "idempotency store call failed");
}
