//! [`Idempotency`]: the request path.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, header};
use http_body::Body;
use tower_service::Service;
use tracing::Instrument;

use crate::body::{BodyMode, Collected, ResponseBody, WrapBody, collect};
use crate::engine::{Acquired, Completion, Engine, Executed};
use crate::fingerprint::Fingerprint;
use crate::future::{Detached, ResponseFuture};
use crate::key::{IdempotencyKey, KeyError, key_from_headers};
use crate::layer::{Config, Retention};
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

impl<S, M> Idempotency<S, M> {
    define_inner_service_accessors!();
}

/// The layer's own answer: the problem document, with a fresh `instance`
/// that the log line carries too, so an operator can find the occurrence a
/// client reports.
fn reject<B: Body>(
    problems: &ProblemDocs,
    rejection: Rejection,
    outcome: Outcome,
) -> Response<ResponseBody<B>> {
    let instance = crate::problem::new_instance();
    if matches!(rejection, Rejection::InFlight { .. }) {
        // Routine under retries: not worth a line each at info.
        tracing::debug!(instance = %instance, status = rejection.status().as_u16(), problem = rejection.type_suffix(), "idempotency rejection");
    } else {
        tracing::info!(instance = %instance, status = rejection.status().as_u16(), problem = rejection.type_suffix(), "idempotency rejection");
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
            Ok(key) => key,
            Err(KeyError::Missing) if !config.require_key => {
                return ResponseFuture::passthrough(self.inner.call(req));
            }
            Err(KeyError::Missing) => {
                tracing::debug!(outcome = "rejected", reason = "key-missing");
                return ResponseFuture::ready(reject(
                    &config.problems,
                    Rejection::KeyMissing,
                    Outcome::Rejected,
                ));
            }
            Err(e) => {
                tracing::debug!(outcome = "rejected", reason = "key-invalid", error = %e);
                return ResponseFuture::ready(reject(
                    &config.problems,
                    Rejection::KeyInvalid(e),
                    Outcome::Rejected,
                ));
            }
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|len| len > config.max_request_body as u64) {
            tracing::debug!(outcome = "rejected", reason = "body-too-large");
            return ResponseFuture::ready(reject(
                &config.problems,
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
        let (store_key, scoped) = self.config.store_key(&parts, &key);
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
                tracing::debug!(key = %store_key, outcome = "rejected", reason = "body-too-large");
                return Ok(reject(
                    &self.config.problems,
                    Rejection::BodyTooLarge {
                        limit: self.config.max_request_body,
                    },
                    Outcome::Rejected,
                ));
            }
            Collected::Failed { .. } => {
                tracing::debug!(key = %store_key, outcome = "rejected", reason = "body-unreadable");
                return Ok(reject(
                    &self.config.problems,
                    Rejection::BodyUnreadable,
                    Outcome::Rejected,
                ));
            }
        };
        if self.config.fingerprint.covers_body() && !streams_body {
            fingerprinter.update(&self.config.fingerprint.json_body(&bytes));
        }
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
        let retry_after = self.config.retry_after;
        match self.engine.acquire(&key, &fingerprint).await {
            Acquired::Lock(token) => self.execute(inner, req, key, token, fingerprint).await,
            Acquired::Replay(record) => Ok(self.replay(record)),
            Acquired::Mismatch => Ok(reject(
                &self.config.problems,
                Rejection::KeyReused,
                Outcome::Mismatch,
            )),
            Acquired::InFlight => Ok(reject(
                &self.config.problems,
                Rejection::InFlight { retry_after },
                Outcome::Conflict,
            )),
            Acquired::Failed(_) => Ok(reject(
                &self.config.problems,
                Rejection::StoreUnavailable { retry_after },
                Outcome::StoreError,
            )),
            Acquired::FailOpen => {
                let res = inner.call(req).await?;
                Ok(mark(res.map(ResponseBody::stream), Outcome::FailedOpen))
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
        if let Some(attachment) = self.engine.attachment(&key, &token) {
            attachment.insert_into(req.extensions_mut());
        }
        let res = match self
            .engine
            .execute(&key, &token, || inner.call(req), None)
            .await
        {
            Executed::Panicked => {
                tracing::error!(key = %key, outcome = "released", "handler panicked; the key is released");
                self.engine.release(&key, &token).await;
                return Ok(reject(
                    &self.config.problems,
                    Rejection::HandlerPanicked,
                    Outcome::Released,
                ));
            }
            Executed::Done { output: Err(e), .. } => {
                tracing::debug!(key = %key, outcome = "released", "handler failed; the key is released");
                self.engine.release(&key, &token).await;
                return Err(e);
            }
            Executed::Done {
                output: Ok(res), ..
            } => res,
        };
        let (parts, body) = res.into_parts();
        let default_ttl = self.engine.settings.ttl;
        let (record, ttl) = match parts.extensions.get::<Retention>() {
            Some(Retention::DoNotRecord) => (false, default_ttl),
            Some(Retention::Record) => (true, default_ttl),
            Some(Retention::RecordFor(ttl)) => (true, *ttl),
            None => ((self.config.record_if)(parts.status), default_ttl),
        };
        if !record {
            tracing::debug!(key = %key, status = parts.status.as_u16(), outcome = "released", "response not recorded");
            self.engine.release(&key, &token).await;
            let res = Response::from_parts(parts, ResponseBody::stream(body));
            return Ok(mark(res, Outcome::Released));
        }
        // A store that holds records up to a size (DynamoDB's item limit)
        // lowers the body limit by what the record adds around the body.
        let store_limit = self.engine.store.capabilities().max_record_size();
        let body_limit = match store_limit {
            Some(max) => {
                let around =
                    Record::tombstone(fingerprint, parts.status, self.recordable(&parts.headers));
                max.saturating_sub(around.encode().len())
                    .min(self.config.max_response_body)
            }
            None => self.config.max_response_body,
        };
        let collecting = std::pin::pin!(collect(Box::pin(body), body_limit, |_| {}));
        let (collected, _) = self.engine.heartbeat(&key, &token, collecting, None).await;
        match collected {
            // Trailers, known only now, may still push the record past the
            // store's limit: a tombstone then, and the client gets the body.
            Collected::Full { data, trailers }
                if trailers.is_some()
                    && store_limit.is_some_and(|max| {
                        let around = Record::tombstone(
                            fingerprint,
                            parts.status,
                            self.recordable(&parts.headers),
                        )
                        .with_trailers(trailers.as_ref().map(fields).unwrap_or_default());
                        around.encode().len() + data.len() > max
                    }) =>
            {
                let record =
                    Record::tombstone(fingerprint, parts.status, self.recordable(&parts.headers));
                if let Some(res) =
                    self.rolled_back(self.engine.complete(key, token, &record, ttl).await)
                {
                    return Ok(res);
                }
                tracing::warn!(key = %key, status = parts.status.as_u16(), outcome = "tombstone",
                    limit = body_limit, "response too large to record; retries get a 410");
                let res = Response::from_parts(parts, ResponseBody::full(data, trailers));
                Ok(mark(res, Outcome::Tombstone))
            }
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
                if let Some(res) =
                    self.rolled_back(self.engine.complete(key, token, &record, ttl).await)
                {
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
                if let Some(res) =
                    self.rolled_back(self.engine.complete(key, token, &record, ttl).await)
                {
                    return Ok(res);
                }
                tracing::warn!(key = %key, status = parts.status.as_u16(), outcome = "tombstone",
                    limit = body_limit, "response too large to record; retries get a 410");
                let res = Response::from_parts(parts, ResponseBody::chain(prefix, rest));
                Ok(mark(res, Outcome::Tombstone))
            }
            Collected::Failed { error } => {
                tracing::debug!(key = %key, outcome = "released", "response body failed; the key is released");
                self.engine.release(&key, &token).await;
                let res = Response::from_parts(parts, ResponseBody::failed(error));
                Ok(mark(res, Outcome::Released))
            }
        }
    }

    /// For a transactional store, a failed completion rolled the
    /// handler's writes back: the client must not see the handler's answer.
    fn rolled_back<B: Body>(&self, completion: Completion) -> Option<Response<ResponseBody<B>>> {
        (completion == Completion::RolledBack).then(|| {
            reject(
                &self.config.problems,
                Rejection::StoreUnavailable {
                    retry_after: self.config.retry_after,
                },
                Outcome::StoreError,
            )
        })
    }

    fn replay<B: Body>(&self, record: Record) -> Response<ResponseBody<B>> {
        let mut res = if record.kind() == RecordKind::Tombstone {
            reject(
                &self.config.problems,
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
