//! [`Idempotency`]: the request path.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, header};
use http_body::Body;
use tower_service::Service;
use tracing::Instrument;

use crate::body::{BodyMode, Collected, ResponseBody, WrapBody, collect};
use crate::config::{Config, Retention};
use crate::engine::{Acquired, Completion, Engine, Executed};
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
        let run = self.shared.clone().run(inner, req, key).instrument(span);
        // The whole covered path is detached from the connection: once the
        // lock is taken it must be completed or released, whoever waits.
        ResponseFuture::covered(Detached::new(Box::pin(run)))
    }
}

/// What the response's [`Retention`] (or the layer's policy) asks for.
enum Keep {
    /// Record it, for this long.
    For(Duration),
    /// Do not record it: release the key.
    No,
}

impl Shared {
    /// One covered request, in its span: the body read and fingerprinted,
    /// the store consulted, and the handler run or the record replayed.
    async fn run<S, ReqBody, ResBody>(
        self: Arc<Self>,
        mut inner: S,
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
        let (store_key, scoped) = self.config.store_key(&parts, &key);
        tracing::Span::current().record("key", tracing::field::display(&store_key));
        let credentials = self
            .config
            .credentials(&parts, scoped)
            .into_iter()
            .flatten();
        let mut fingerprinter = self.config.fingerprint.start_bound(
            &parts.method,
            &parts.uri,
            &parts.headers,
            credentials,
        );
        let streams_body = self.config.fingerprint.streams_body();
        let body = std::pin::pin!(body);
        let bytes = match collect(body, self.config.max_request_body, |chunk| {
            if streams_body {
                fingerprinter.update(chunk);
            }
        })
        .await
        {
            Collected::Full { data, .. } => data,
            Collected::TooLarge { .. } => {
                let limit = self.config.max_request_body;
                return Ok(self.reject(Rejection::BodyTooLarge { limit }));
            }
            Collected::Failed { .. } => return Ok(self.reject(Rejection::BodyUnreadable)),
        };
        if self.config.fingerprint.covers_body() && !streams_body {
            fingerprinter.update(&self.config.fingerprint.json_body(&bytes));
        }
        let fingerprint = fingerprinter.finish();
        parts.extensions.insert(key);
        let req = Request::from_parts(parts, ReqBody::from(bytes));
        let retry_after = self.config.retry_after;
        match self.engine.acquire(&store_key, &fingerprint).await {
            Acquired::Lock(token) => {
                self.execute(inner, req, store_key, token, fingerprint)
                    .await
            }
            Acquired::Replay(record) => Ok(self.replay(record)),
            Acquired::Mismatch => Ok(self.reject(Rejection::KeyReused)),
            Acquired::InFlight => Ok(self.reject(Rejection::InFlight { retry_after })),
            Acquired::Failed(_) => Ok(self.reject(Rejection::StoreUnavailable { retry_after })),
            Acquired::FailOpen => {
                let res = inner.call(req).await?;
                Ok(mark(res.map(ResponseBody::stream), Outcome::FailedOpen))
            }
        }
    }

    fn reject<B: Body>(&self, rejection: Rejection) -> Response<ResponseBody<B>> {
        reject(&self.config.problems, rejection)
    }

    /// Runs the handler under the lock, then records its response or
    /// releases the key.
    async fn execute<S, ReqBody, ResBody>(
        &self,
        mut inner: S,
        mut req: Request<ReqBody>,
        key: StoreKey,
        token: LockToken,
        fingerprint: Fingerprint,
    ) -> Result<Response<ResponseBody<ResBody>>, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        ResBody: Body,
    {
        if let Some(attachment) = self.engine.attachment(&key, &token) {
            attachment.insert_into(req.extensions_mut());
        }
        let res = match self
            .engine
            .execute(&key, &token, || inner.call(req), None)
            .await
        {
            Executed::Panicked => {
                tracing::error!(key = %key, "handler panicked; the key is released");
                self.engine.release(&key, &token).await;
                return Ok(self.reject(Rejection::HandlerPanicked));
            }
            Executed::Done { output: Err(e), .. } => {
                tracing::debug!(key = %key, outcome = Outcome::Released.as_str(), "handler failed; the key is released");
                self.engine.release(&key, &token).await;
                return Err(e);
            }
            Executed::Done {
                output: Ok(res), ..
            } => res,
        };
        let (parts, body) = res.into_parts();
        Ok(match self.keep(&parts) {
            Keep::No => {
                let res = Response::from_parts(parts, ResponseBody::stream(body));
                self.release(&key, &token, res, "response not recorded")
                    .await
            }
            Keep::For(ttl) => self.record(key, token, fingerprint, parts, body, ttl).await,
        })
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

    /// Releases the key and answers `res` as it is, unrecorded.
    async fn release<B>(
        &self,
        key: &StoreKey,
        token: &LockToken,
        res: Response<B>,
        why: &'static str,
    ) -> Response<B> {
        tracing::debug!(key = %key, status = res.status().as_u16(), outcome = Outcome::Released.as_str(), "{why}; the key is released");
        self.engine.release(key, token).await;
        mark(res, Outcome::Released)
    }

    /// Reads the response body (the lease kept alive meanwhile), writes
    /// the record (or, past the size limit, a tombstone), and answers the
    /// client with the whole body either way.
    async fn record<ResBody: Body>(
        &self,
        key: StoreKey,
        token: LockToken,
        fingerprint: Fingerprint,
        parts: http::response::Parts,
        body: ResBody,
        ttl: Duration,
    ) -> Response<ResponseBody<ResBody>> {
        let headers = self.recordable(&parts.headers);
        // A store that holds records up to a size (DynamoDB's item limit)
        // lowers the body limit by what the record adds around the body.
        let store_limit = self.engine.store.capabilities().max_record_size();
        let body_limit = match store_limit {
            Some(max) => {
                let around = Record::tombstone(fingerprint, parts.status, headers.clone());
                max.saturating_sub(around.encoded_len())
                    .min(self.config.max_response_body)
            }
            None => self.config.max_response_body,
        };
        let collecting = std::pin::pin!(collect(Box::pin(body), body_limit, |_| {}));
        let (collected, _) = self.engine.heartbeat(&key, &token, collecting, None).await;
        let (record, answer) = match collected {
            Collected::Full { data, trailers } => {
                let record = Record::response(fingerprint, parts.status, headers, data.clone())
                    .with_trailers(trailers.as_ref().map(fields).unwrap_or_default());
                // Trailers, known only now, may still push the record past
                // the store's limit: a tombstone then, and the client gets
                // the body.
                let record = if trailers.is_some()
                    && store_limit.is_some_and(|max| record.encoded_len() > max)
                {
                    Record::tombstone(fingerprint, parts.status, record.headers().to_vec())
                } else {
                    record
                };
                (record, ResponseBody::full(data, trailers))
            }
            Collected::TooLarge { prefix, rest } => (
                Record::tombstone(fingerprint, parts.status, headers),
                ResponseBody::chain(prefix, rest),
            ),
            Collected::Failed { error } => {
                let res = Response::from_parts(parts, ResponseBody::failed(error));
                return self
                    .release(&key, &token, res, "response body failed")
                    .await;
            }
        };
        let tombstone = record.kind() == RecordKind::Tombstone;
        if self.engine.complete(key, token, &record, ttl).await == Completion::RolledBack {
            // A transactional store's failed completion rolled the
            // handler's writes back: the client must not see its answer.
            let retry_after = self.config.retry_after;
            return self.reject(Rejection::StoreUnavailable { retry_after });
        }
        let status = parts.status.as_u16();
        let outcome = if tombstone {
            tracing::warn!(key = %key, status, outcome = Outcome::Tombstone.as_str(), limit = body_limit, "response too large to record; retries get a 410");
            Outcome::Tombstone
        } else {
            tracing::debug!(key = %key, status, outcome = Outcome::Executed.as_str());
            Outcome::Executed
        };
        mark(Response::from_parts(parts, answer), outcome)
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
