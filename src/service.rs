//! [`Idempotency`]: the request path.

use std::fmt;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header, request};
use http_body::Body;
use tower_service::Service;
use tracing::Instrument;

use crate::body::{BodyMode, Collected, ResponseBody, WrapBody, collect};
use crate::config::{Config, Retention};
use crate::engine::{Acquired, Completion, Engine};
use crate::fingerprint::Fingerprint;
use crate::future::{Detached, ResponseFuture};
use crate::key::{IdempotencyKey, KeyError, key_from_headers};
use crate::observe::{Outcome, mark};
use crate::problem::{ProblemDocs, Rejection};
use crate::record::{Record, RecordKind};
use crate::store::{LockToken, StoreKey};

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
    pub(crate) engine: Engine,
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

impl<S> Idempotency<S> {
    /// `inner` behind the layer's default settings on `store`: the same
    /// as `IdempotencyLayer::new(store).layer(inner)`. For other settings,
    /// build an [`IdempotencyLayer`](crate::IdempotencyLayer).
    ///
    /// ```
    /// use tower_idempotency::{Idempotency, MemoryStore};
    ///
    /// let handler = tower::service_fn(|_req: http::Request<String>| async {
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(String::from("created")))
    /// });
    /// let service = Idempotency::new(handler, MemoryStore::new());
    /// # let _ = service;
    /// ```
    pub fn new(inner: S, store: impl crate::store::Store) -> Self {
        use tower_layer::Layer;
        crate::IdempotencyLayer::new(store).layer(inner)
    }
}

impl<S, M> Idempotency<S, M> {
    define_inner_service_accessors!();
}

/// The outcome a rejection stands for, in the span, the metrics and the
/// response's extensions.
fn outcome_of(rejection: &Rejection) -> Outcome {
    match rejection {
        Rejection::KeyMissing
        | Rejection::KeyInvalid(_)
        | Rejection::BodyUnreadable
        | Rejection::BodyTooLarge { .. } => Outcome::Rejected,
        Rejection::KeyReused => Outcome::Mismatch,
        Rejection::InFlight { .. } => Outcome::Conflict,
        Rejection::ResponseNotStored { .. } => Outcome::Tombstone,
        Rejection::HandlerPanicked => Outcome::Released,
        Rejection::StoreUnavailable { .. } => Outcome::StoreError,
    }
}

/// The layer's own answer: the problem document, with a fresh `instance`
/// that the log line carries too, so an operator can find the occurrence a
/// client reports.
fn reject<B: Body>(problems: &ProblemDocs, rejection: Rejection) -> Response<ResponseBody<B>> {
    let instance = crate::problem::new_instance();
    let outcome = outcome_of(&rejection);
    if matches!(rejection, Rejection::InFlight { .. }) {
        // Routine under retries: not worth a line each at info.
        tracing::debug!(instance = %instance, outcome = outcome.as_str(), status = rejection.status().as_u16(), problem = rejection.type_suffix(), "idempotency rejection");
    } else {
        tracing::info!(instance = %instance, outcome = outcome.as_str(), status = rejection.status().as_u16(), problem = rejection.type_suffix(), "idempotency rejection");
    }
    let res = rejection
        .to_response_with(problems, &instance)
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
            Ok(key) => Ok(key),
            Err(KeyError::Missing) if !config.require_key => {
                return ResponseFuture::passthrough(self.inner.call(req));
            }
            Err(KeyError::Missing) => Err(Rejection::KeyMissing),
            Err(e) => Err(Rejection::KeyInvalid(e)),
        };
        // Every covered request has its span from here on: its outcome is
        // recorded there, whether it is refused now or runs.
        let span = tracing::info_span!(
            "idempotency",
            key = tracing::field::Empty,
            outcome = tracing::field::Empty,
            status = tracing::field::Empty,
            store_us = tracing::field::Empty,
        );
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let key = key.and_then(|key| match declared {
            Some(len) if len > config.max_request_body as u64 => Err(Rejection::BodyTooLarge {
                limit: config.max_request_body,
            }),
            _ => Ok(key),
        });
        let key = match key {
            Ok(key) => key,
            Err(rejection) => {
                return ResponseFuture::ready(
                    span.in_scope(|| reject(&config.problems, rejection)),
                );
            }
        };
        // The clone is not ready; the ready one goes with this request
        // (tower-service docs, "Be careful when cloning inner services").
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let (parts, body) = req.into_parts();
        let run = covered(self.shared.clone(), inner, parts, body, key).instrument(span);
        // The whole covered path is detached from the connection: once the
        // lock is taken it must be completed or released, whoever waits.
        ResponseFuture::covered(Detached::new(Box::pin(run)))
    }
}

/// One covered request, in its span: the body read and fingerprinted, the
/// store consulted, and the handler run or the record replayed.
///
/// An async block, not an async fn: rustc keeps each by-value argument of
/// an async fn twice, as the argument and as the local it is moved into,
/// while a block keeps what it captures once. The request's parts and the
/// inner service live here once; every step below borrows what it needs,
/// and the request is rebuilt only to be handed to the service, which
/// consumes it before anything is awaited. That keeps a covered request's
/// boxed future under 1 KiB for a small service future.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps each argument twice"
)]
fn covered<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    mut inner: S,
    mut parts: request::Parts,
    body: ReqBody,
    key: IdempotencyKey,
) -> impl Future<Output = Result<Response<ResponseBody<ResBody>>, S::Error>> + Send + 'static
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body + From<Bytes> + Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Send,
{
    async move {
        // Each value below lives in a block around the one await it
        // serves. A local keeps its storage to the end of its block, even
        // once moved out of in part or after a borrow, and one kept across
        // two awaits gets room of its own in this future instead of
        // sharing it with the others.
        let (store_key, fingerprint, bytes) = {
            let (store_key, mut fingerprinter) = shared.start(&mut parts, key);
            let streams_body = shared.config.fingerprint.streams_body();
            let limit = shared.config.max_request_body;
            let body = std::pin::pin!(body);
            let collected = collect(body, limit, |chunk| {
                if streams_body {
                    fingerprinter.update(chunk);
                }
            })
            .await;
            match shared.fingerprint(collected, fingerprinter) {
                Ok((fingerprint, bytes)) => (store_key, fingerprint, bytes),
                Err(rejection) => return Ok(shared.reject(rejection)),
            }
        };
        let engine = &shared.engine;
        let acquired = match engine.acquire(&store_key, &fingerprint).await {
            Acquired::Lock(token) => Some(token),
            Acquired::FailOpen => None,
            Acquired::Replay(record) => return Ok(shared.replay(record)),
            Acquired::Mismatch => return Ok(shared.reject(Rejection::KeyReused)),
            Acquired::InFlight => {
                let retry_after = shared.config.retry_after;
                return Ok(shared.reject(Rejection::InFlight { retry_after }));
            }
            Acquired::Failed(_) => {
                let retry_after = shared.config.retry_after;
                return Ok(shared.reject(Rejection::StoreUnavailable { retry_after }));
            }
        };
        let Some(token) = acquired else {
            let req = Request::from_parts(parts, ReqBody::from(bytes));
            let res = inner.call(req).await?;
            return Ok(mark(res.map(ResponseBody::stream), Outcome::FailedOpen));
        };
        let key = &store_key;
        // The handler's response, or its error (`Some`) or panic (`None`,
        // when called or while it ran).
        let ran = 'ran: {
            let handler = {
                let mut req = Request::from_parts(parts, ReqBody::from(bytes));
                if let Some(attachment) = engine.attachment(key, &token) {
                    attachment.insert_into(req.extensions_mut());
                }
                Engine::start(|| inner.call(req))
            };
            let Some(handler) = handler else {
                break 'ran Err(None);
            };
            let handler = std::pin::pin!(handler);
            match engine.heartbeat(key, &token, handler, None).await.0 {
                Ok(Ok(res)) => Ok(res),
                Ok(Err(e)) => Err(Some(e)),
                Err(_panic) => Err(None),
            }
        };
        // `{ ran }` moves it whole: matched in place, it would be moved out
        // of only in part and keep its storage past this statement.
        #[allow(clippy::blocks_in_conditions, reason = "the braces move the value")]
        let res = match { ran } {
            Ok(res) => res,
            Err(failure) => return shared.failed(key, &token, failure).await,
        };
        let (parts, body) = res.into_parts();
        let recorded = match shared.keep(&parts) {
            Keep::For(ttl) => {
                // Boxed here, not in `record`: an argument is kept twice.
                let body = Box::pin(body);
                match shared
                    .record(key, &token, &fingerprint, &parts, body, ttl)
                    .await
                {
                    Ok(recorded) => recorded,
                    Err(rejection) => return Ok(shared.reject(rejection)),
                }
            }
            Keep::No => Recorded::Not(ResponseBody::stream(body), "response not recorded"),
        };
        let (body, outcome) = match recorded {
            Recorded::Yes(body, outcome) => (body, outcome),
            Recorded::Not(body, why) => {
                let status = parts.status.as_u16();
                tracing::debug!(key = %key, status, outcome = Outcome::Released.as_str(), "{why}; the key is released");
                engine.release(key, &token).await;
                (body, Outcome::Released)
            }
        };
        Ok(mark(Response::from_parts(parts, body), outcome))
    }
}

/// What became of a response the handler gave.
enum Recorded<B: Body> {
    /// Recorded (or a tombstone left): answer with this body.
    Yes(ResponseBody<B>, Outcome),
    /// Not recorded, for this reason: release the key, and answer with
    /// this body.
    Not(ResponseBody<B>, &'static str),
}

/// How large a response may be recorded.
struct Limits {
    /// The largest body recorded.
    body: usize,
    /// The store's limit on a whole record, if it has one.
    store: Option<usize>,
}

/// What the response's [`Retention`] (or the layer's policy) asks for.
enum Keep {
    /// Record it, for this long.
    For(Duration),
    /// Do not record it: release the key.
    No,
}

impl Shared {
    /// The request's store key, and its fingerprint begun (the body
    /// follows as it is read); hands the key to the handler in the
    /// request's extensions.
    fn start(
        &self,
        parts: &mut request::Parts,
        key: IdempotencyKey,
    ) -> (StoreKey, crate::fingerprint::Fingerprinter) {
        let (store_key, scoped) = self.config.store_key(parts, &key);
        tracing::Span::current().record("key", tracing::field::display(&store_key));
        let credentials = self.config.credentials(parts, scoped).into_iter().flatten();
        let fingerprinter = self.config.fingerprint.start_bound(
            &parts.method,
            &parts.uri,
            &parts.headers,
            credentials,
        );
        parts.extensions.insert(key);
        (store_key, fingerprinter)
    }

    /// The fingerprint and the body of a request body read whole, or the
    /// rejection of one too large or that could not be read.
    fn fingerprint<B: Body>(
        &self,
        collected: Collected<B>,
        mut fingerprinter: crate::fingerprint::Fingerprinter,
    ) -> Result<(Fingerprint, Bytes), Rejection> {
        let bytes = match collected {
            Collected::Full { data, .. } => data,
            Collected::TooLarge { .. } => {
                let limit = self.config.max_request_body;
                return Err(Rejection::BodyTooLarge { limit });
            }
            Collected::Failed { .. } => return Err(Rejection::BodyUnreadable),
        };
        let config = &self.config.fingerprint;
        if config.covers_body() && !config.streams_body() {
            fingerprinter.update(&config.json_body(&bytes));
        }
        Ok((fingerprinter.finish(), bytes))
    }

    fn reject<B: Body>(&self, rejection: Rejection) -> Response<ResponseBody<B>> {
        reject(&self.config.problems, rejection)
    }

    /// Whether and how long to keep the handler's response.
    fn keep(&self, parts: &http::response::Parts) -> Keep {
        let ttl = self.engine.settings.ttl;
        match parts.extensions.get::<Retention>() {
            Some(Retention::DoNotRecord) => Keep::No,
            Some(Retention::Record) => Keep::For(ttl),
            Some(Retention::RecordFor(ttl)) => Keep::For(*ttl),
            None if (self.config.record_if)(parts.status) => Keep::For(ttl),
            None => Keep::No,
        }
    }

    /// Releases the key of a handler that failed (`Some(error)`) or
    /// panicked (`None`), and answers as it did.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn keeps each argument twice"
    )]
    fn failed<B: Body, E>(
        &self,
        key: &StoreKey,
        token: &LockToken,
        error: Option<E>,
    ) -> impl Future<Output = Result<Response<ResponseBody<B>>, E>> {
        async move {
            match error {
                Some(_) => {
                    tracing::debug!(key = %key, outcome = Outcome::Released.as_str(), "handler failed; the key is released");
                }
                None => tracing::error!(key = %key, "handler panicked; the key is released"),
            }
            self.engine.release(key, token).await;
            match error {
                Some(e) => Err(e),
                None => Ok(self.reject(Rejection::HandlerPanicked)),
            }
        }
    }

    /// Reads the response body (the lease kept alive meanwhile), and
    /// writes the record, or past the size limit a tombstone; gives back
    /// the body to answer the client with, whole either way. The response's
    /// parts stay with the caller: borrowed, they are not held twice.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn keeps each argument twice"
    )]
    fn record<ResBody: Body>(
        &self,
        key: &StoreKey,
        token: &LockToken,
        fingerprint: &Fingerprint,
        parts: &http::response::Parts,
        body: Pin<Box<ResBody>>,
        ttl: Duration,
    ) -> impl Future<Output = Result<Recorded<ResBody>, Rejection>> {
        async move {
            let (headers, limits) = self.recordable(parts, fingerprint);
            // Reads the body, the lease kept alive meanwhile. Scoped: a pinned
            // future's storage lasts to the end of its block, and one kept
            // past this await would not share its room with the completion's.
            let (collected, _) = {
                let collecting = std::pin::pin!(collect(body, limits.body, |_| {}));
                self.engine.heartbeat(key, token, collecting, None).await
            };
            let status = parts.status;
            let (record, answer) =
                match Self::to_record(collected, *fingerprint, status, headers, limits.store) {
                    Ok(built) => built,
                    Err(error) => {
                        let failed = ResponseBody::failed(error);
                        return Ok(Recorded::Not(failed, "response body failed"));
                    }
                };
            let tombstone = record.kind() == RecordKind::Tombstone;
            if self.engine.complete(key, token, &record, ttl).await == Completion::RolledBack {
                // A transactional store's failed completion rolled the
                // handler's writes back: the client must not see its answer.
                let retry_after = self.config.retry_after;
                return Err(Rejection::StoreUnavailable { retry_after });
            }
            let status = status.as_u16();
            let outcome = if tombstone {
                tracing::warn!(key = %key, status, outcome = Outcome::Tombstone.as_str(), limit = limits.body, "response too large to record; retries get a 410");
                Outcome::Tombstone
            } else {
                tracing::debug!(key = %key, status, outcome = Outcome::Executed.as_str());
                Outcome::Executed
            };
            Ok(Recorded::Yes(answer, outcome))
        }
    }

    /// The headers to record, and how large a body may be recorded: the
    /// layer's limit, lowered for a store that holds records up to a size
    /// (DynamoDB's item limit) by what the record adds around the body.
    fn recordable(
        &self,
        parts: &http::response::Parts,
        fingerprint: &Fingerprint,
    ) -> (Vec<(HeaderName, HeaderValue)>, Limits) {
        let headers = self.recordable_headers(&parts.headers);
        let store = self.engine.store.capabilities().max_record_size();
        let body = match store {
            Some(max) => {
                let around = Record::tombstone(*fingerprint, parts.status, headers.clone());
                max.saturating_sub(around.encoded_len())
                    .min(self.config.max_response_body)
            }
            None => self.config.max_response_body,
        };
        (headers, Limits { body, store })
    }

    /// The record of a collected response body, and the body to answer
    /// with; the body's error if it failed.
    fn to_record<B: Body>(
        collected: Collected<Pin<Box<B>>>,
        fingerprint: Fingerprint,
        status: StatusCode,
        headers: Vec<(HeaderName, HeaderValue)>,
        store_limit: Option<usize>,
    ) -> Result<(Record, ResponseBody<B>), B::Error> {
        match collected {
            Collected::Full { data, trailers } => {
                let record = Record::response(fingerprint, status, headers, data.clone())
                    .with_trailers(trailers.as_ref().map(fields).unwrap_or_default());
                // Trailers, known only now, may still push the record past
                // the store's limit: a tombstone then, and the client gets
                // the body.
                let record = if trailers.is_some()
                    && store_limit.is_some_and(|max| record.encoded_len() > max)
                {
                    Record::tombstone(fingerprint, status, record.headers().to_vec())
                } else {
                    record
                };
                Ok((record, ResponseBody::full(data, trailers)))
            }
            Collected::TooLarge { prefix, rest } => Ok((
                Record::tombstone(fingerprint, status, headers),
                ResponseBody::chain(prefix, rest),
            )),
            Collected::Failed { error } => Err(error),
        }
    }

    fn replay<B: Body>(&self, record: Record) -> Response<ResponseBody<B>> {
        let mut res = if record.kind() == RecordKind::Tombstone {
            self.reject(Rejection::ResponseNotStored {
                original_status: record.status(),
            })
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
    fn recordable_headers(&self, headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
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

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::Full;
    use tower_layer::Layer;

    use super::*;

    /// The future a covered request boxes, for a service whose own future
    /// is small, stays under 1 KiB: its allocation then takes glibc's
    /// per-thread fast path (sizes up to 1,032 bytes). It was 3,376 bytes
    /// before the request path was laid out for it (see `covered`).
    #[test]
    fn a_covered_requests_boxed_future_is_under_one_kib() {
        let handler = tower::service_fn(|_req: Request<Full<Bytes>>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"x"))))
        });
        let svc = crate::IdempotencyLayer::new(crate::MemoryStore::new()).layer(handler);
        let key = crate::key::parse_key(b"abcdefgh", 1, 255).unwrap();
        let (parts, body) = Request::new(Full::new(Bytes::from_static(b"x"))).into_parts();
        let run = covered(svc.shared.clone(), svc.inner, parts, body, key)
            .instrument(tracing::info_span!("idempotency"));
        let size = std::mem::size_of_val(&run);
        assert!(size < 1024, "the boxed future is {size} bytes");
        eprintln!("boxed future: {size} bytes");
    }
}
