//! The layer's settings, as the service reads them: built by
//! [`IdempotencyLayer`](crate::IdempotencyLayer)'s `with_*` methods, used by
//! [`Idempotency`](crate::Idempotency) on every request, and the recording
//! policy a handler can override per response ([`Retention`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::request::Parts;
use http::{HeaderName, Method, StatusCode};
use sha2::{Digest, Sha256};

use crate::fingerprint::FingerprintConfig;
use crate::key::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, IdempotencyKey};
use crate::problem::ProblemDocs;
use crate::store::StoreKey;

/// A handler's say over one response, put in the response's extensions.
///
/// ```
/// use axum::{http::StatusCode, response::IntoResponse};
/// use std::time::Duration;
/// use tower_idempotency::Retention;
///
/// async fn handler() -> impl IntoResponse {
///     // A quote that is only valid for five minutes.
///     (StatusCode::CREATED, axum::Extension(Retention::RecordFor(Duration::from_secs(300))), "quote")
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Retention {
    /// Do not record this response; release the key so a retry runs again.
    DoNotRecord,
    /// Record this response even if the policy would not (for example a
    /// 5xx that must not be repeated).
    Record,
    /// Record this response for this long instead of the layer's ttl.
    RecordFor(Duration),
}

pub(crate) type ScopeFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;
pub(crate) type RecordIfFn = dyn Fn(StatusCode) -> bool + Send + Sync;

/// The default recording policy: 2xx, 3xx and 4xx, except the 4xx that
/// depend on credentials or time (401, 403, 408, 425, 429).
pub fn default_record_if(status: StatusCode) -> bool {
    let code = status.as_u16();
    (200..500).contains(&code) && !matches!(code, 401 | 403 | 408 | 425 | 429)
}

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) header: HeaderName,
    pub(crate) methods: Vec<Method>,
    pub(crate) require_key: bool,
    pub(crate) min_key_len: usize,
    pub(crate) max_key_len: usize,
    pub(crate) max_request_body: usize,
    pub(crate) max_response_body: usize,
    pub(crate) scope: Option<Arc<ScopeFn>>,
    /// Whether a request without a scope has its `Authorization` in its
    /// fingerprint (default: yes).
    pub(crate) bind_credentials: bool,
    /// Set once the warning about credentials without a scope is logged.
    pub(crate) warned_unscoped: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) fingerprint: FingerprintConfig,
    pub(crate) record_if: Arc<RecordIfFn>,
    pub(crate) replayed_header: Option<HeaderName>,
    pub(crate) excluded_headers: Vec<HeaderName>,
    pub(crate) retry_after: Duration,
    pub(crate) problems: ProblemDocs,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            header: IDEMPOTENCY_KEY,
            methods: crate::util::default_methods(),
            require_key: false,
            min_key_len: 1,
            max_key_len: 255,
            max_request_body: 1024 * 1024,
            max_response_body: 4 * 1024 * 1024,
            scope: None,
            bind_credentials: true,
            warned_unscoped: Arc::default(),
            fingerprint: FingerprintConfig::default(),
            record_if: Arc::new(default_record_if),
            replayed_header: Some(IDEMPOTENT_REPLAYED),
            excluded_headers: Vec::new(),
            retry_after: Duration::from_secs(1),
            problems: ProblemDocs::default(),
        }
    }
}

impl Config {
    #[inline]
    pub(crate) fn covers(&self, method: &Method) -> bool {
        crate::util::covers(&self.methods, method)
    }

    /// SHA-256 of the scope and the key: what the store files under; and
    /// whether the request had a scope.
    pub(crate) fn store_key(&self, parts: &Parts, key: &IdempotencyKey) -> (StoreKey, bool) {
        let mut h = Sha256::new();
        h.update(b"tower-idempotency/key/v1\0");
        let scoped = match self.scope.as_ref().and_then(|f| f(parts)) {
            Some(scope) => {
                h.update([1]);
                h.update((scope.len() as u64).to_be_bytes());
                h.update(scope.as_bytes());
                true
            }
            None => {
                h.update([0]);
                false
            }
        };
        h.update(key.as_str().as_bytes());
        (StoreKey::from_bytes(h.finalize().into()), scoped)
    }

    /// The request's credentials to bind into its fingerprint: its
    /// `Authorization` values, when it has no scope and binding is on.
    /// Logs, once per layer, that credentials arrive without a scope.
    pub(crate) fn credentials<'a>(
        &self,
        parts: &'a Parts,
        scoped: bool,
    ) -> Option<http::header::GetAll<'a, http::HeaderValue>> {
        if scoped || !self.bind_credentials || !parts.headers.contains_key(AUTHORIZATION) {
            return None;
        }
        if !self.warned_unscoped.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "idempotency: covered requests carry credentials (Authorization) and no scope is set; \
                 each record is bound to the exact credential, so a caller with another credential \
                 gets 422, and so does the same caller after its token is refreshed. \
                 Scope keys by principal with IdempotencyLayer::with_principal_scope"
            );
        }
        Some(parts.headers.get_all(AUTHORIZATION))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_matches_the_design() {
        for code in [200, 201, 204, 301, 302, 400, 404, 409, 422] {
            assert!(
                default_record_if(StatusCode::from_u16(code).unwrap()),
                "{code}"
            );
        }
        for code in [100, 401, 403, 408, 425, 429, 500, 502, 503, 504] {
            assert!(
                !default_record_if(StatusCode::from_u16(code).unwrap()),
                "{code}"
            );
        }
    }
}
