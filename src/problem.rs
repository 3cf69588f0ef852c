//! Rejections, and their RFC 9457 `application/problem+json` responses.
//!
//! Every response the layer makes itself is a problem document with a
//! stable `type` URI, a `title`, the `status` and a `detail`. The
//! [`Rejection`] is also put in the response's extensions, so outer layers
//! can tell why a request was answered by the layer.
//!
//! | status | `type` suffix | when |
//! |---|---|---|
//! | 400 | `key-missing` | no key, and the layer requires one |
//! | 400 | `key-invalid` | empty, too long, not visible ASCII, not an sf-string, or several key fields |
//! | 400 | `body-unreadable` | the request body failed while being read |
//! | 409 | `request-in-flight` | a request with this key is still running (with `Retry-After`) |
//! | 410 | `response-not-stored` | the request completed, but its response was too large to keep |
//! | 413 | `body-too-large` | the request body exceeds `max_request_body` |
//! | 422 | `key-reused` | the key was used for a different request |
//! | 500 | `handler-panicked` | the handler panicked; the lock was released |
//! | 503 | `store-unavailable` | the store failed or timed out (with `Retry-After`) |
//!
//! Members of every document:
//!
//! | member | value |
//! |---|---|
//! | `type` | the type base plus the suffix above; the base is [`TYPE_BASE`] (this crate's documentation) unless [`ProblemDocs::with_type_base`] names the service's own |
//! | `title` | the same for every occurrence of a type |
//! | `status` | the HTTP status |
//! | `detail` | this occurrence explained |
//! | `instance` | a fresh `urn:uuid:…` per occurrence, also on the layer's log line for it |
//! | `retryable` | `true` when the same request with the same key may succeed later (409, 503), else `false` |
//! | `original_status` | 410 only: the status of the response that was not kept |
//!
//! With [`ProblemDocs::with_describedby`], every problem response also
//! carries `Link: <…>; rel="describedby"; type="text/html"`, as the
//! Idempotency-Key draft suggests, pointing at the service's own
//! documentation.

use std::fmt;
use std::time::Duration;

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, Uri, header};

use crate::key::KeyError;

/// The base of every problem `type` URI.
pub const TYPE_BASE: &str = "https://docs.rs/tower-idempotency/latest/tower_idempotency/problem/#";

/// How the layer writes its problem documents; see
/// [`IdempotencyLayer::with_problems`](crate::IdempotencyLayer::with_problems).
#[derive(Debug, Clone)]
pub struct ProblemDocs {
    type_base: Arc<str>,
    describedby: Option<HeaderValue>,
}

impl Default for ProblemDocs {
    fn default() -> Self {
        Self {
            type_base: Arc::from(TYPE_BASE),
            describedby: None,
        }
    }
}

impl ProblemDocs {
    /// `type` URIs under [`TYPE_BASE`], no `Link` header.
    pub fn new() -> Self {
        Self::default()
    }

    /// The base every `type` URI starts with; the type's suffix (such as
    /// `key-reused`) follows it directly, so end it with `/` or `#`.
    ///
    /// ```
    /// use tower_idempotency::problem::Rejection;
    /// use tower_idempotency::problem::ProblemDocs;
    ///
    /// let docs = ProblemDocs::new().with_type_base("https://api.example.com/problems/");
    /// let json = Rejection::KeyReused.to_json_with(&docs, None);
    /// assert!(json.starts_with(r#"{"type":"https://api.example.com/problems/key-reused""#));
    /// ```
    #[must_use]
    pub fn with_type_base(mut self, base: impl Into<String>) -> Self {
        self.type_base = Arc::from(base.into());
        self
    }

    /// Adds `Link: <uri>; rel="describedby"; type="text/html"` to every
    /// problem response.
    ///
    /// ```
    /// use tower_idempotency::problem::Rejection;
    /// use tower_idempotency::problem::ProblemDocs;
    ///
    /// let docs = ProblemDocs::new()
    ///     .with_describedby("https://api.example.com/docs/idempotency".parse().unwrap());
    /// let res = Rejection::KeyMissing.to_response_with(&docs, "urn:uuid:0");
    /// assert_eq!(
    ///     res.headers()["link"],
    ///     r#"<https://api.example.com/docs/idempotency>; rel="describedby"; type="text/html""#
    /// );
    /// ```
    #[must_use]
    pub fn with_describedby(mut self, uri: Uri) -> Self {
        // A `Uri` holds visible ASCII only: always a valid header value.
        self.describedby =
            HeaderValue::from_str(&format!("<{uri}>; rel=\"describedby\"; type=\"text/html\""))
                .ok();
        self
    }

    /// The base of the `type` URIs.
    pub fn type_base(&self) -> &str {
        &self.type_base
    }
}

/// A fresh `urn:uuid:` for a problem's `instance`.
pub(crate) fn new_instance() -> String {
    uuid::Uuid::new_v4().urn().to_string()
}

/// Why the layer answered a request itself.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// The key is required and absent.
    KeyMissing,
    /// The key header is malformed or appears more than once.
    KeyInvalid(KeyError),
    /// The request body failed while being read.
    BodyUnreadable,
    /// The request body exceeds the limit (bytes).
    BodyTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// The key was used before for a different request.
    KeyReused,
    /// A request with this key is still in flight.
    InFlight {
        /// The `Retry-After` sent with the response.
        retry_after: Duration,
    },
    /// The request completed before but its response was too large to keep.
    ResponseNotStored {
        /// The status of the original response.
        original_status: StatusCode,
    },
    /// The handler panicked.
    HandlerPanicked,
    /// The store failed or timed out.
    StoreUnavailable {
        /// The `Retry-After` sent with the response.
        retry_after: Duration,
    },
}

impl Rejection {
    /// The HTTP status of the problem response.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::KeyMissing | Self::KeyInvalid(_) | Self::BodyUnreadable => {
                StatusCode::BAD_REQUEST
            }
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::InFlight { .. } => StatusCode::CONFLICT,
            Self::ResponseNotStored { .. } => StatusCode::GONE,
            Self::HandlerPanicked => StatusCode::INTERNAL_SERVER_ERROR,
            Self::StoreUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The stable suffix of the problem `type` URI.
    pub fn type_suffix(&self) -> &'static str {
        match self {
            Self::KeyMissing => "key-missing",
            Self::KeyInvalid(_) => "key-invalid",
            Self::BodyUnreadable => "body-unreadable",
            Self::BodyTooLarge { .. } => "body-too-large",
            Self::KeyReused => "key-reused",
            Self::InFlight { .. } => "request-in-flight",
            Self::ResponseNotStored { .. } => "response-not-stored",
            Self::HandlerPanicked => "handler-panicked",
            Self::StoreUnavailable { .. } => "store-unavailable",
        }
    }

    /// The problem `title`: the same for every occurrence of a type.
    pub fn title(&self) -> &'static str {
        match self {
            Self::KeyMissing => "Idempotency-Key is missing",
            Self::KeyInvalid(_) => "Idempotency-Key is invalid",
            Self::BodyUnreadable => "Request body could not be read",
            Self::BodyTooLarge { .. } => "Request body is too large",
            Self::KeyReused => "Idempotency-Key is already used",
            Self::InFlight { .. } => "A request is outstanding for this Idempotency-Key",
            Self::ResponseNotStored { .. } => "Response was not stored",
            Self::HandlerPanicked => "Internal error",
            Self::StoreUnavailable { .. } => "Idempotency store unavailable",
        }
    }

    /// The problem `detail`: this occurrence explained.
    pub fn detail(&self) -> String {
        match self {
            Self::KeyMissing => "This operation requires an Idempotency-Key header.".into(),
            Self::KeyInvalid(e) => format!("{e}. Send one Idempotency-Key field holding a unique value, such as a UUID."),
            Self::BodyUnreadable => "The request body ended with an error before it was complete.".into(),
            Self::BodyTooLarge { limit } => format!(
                "Requests with an Idempotency-Key may carry at most {limit} bytes of body."
            ),
            Self::KeyReused => "This Idempotency-Key was already used for a different request (method, path or body). Use a new key for a new request.".into(),
            Self::InFlight { .. } => "A request with this Idempotency-Key is still being processed. Retry after it completes.".into(),
            Self::ResponseNotStored { original_status } => format!(
                "The request with this Idempotency-Key already completed with status {}, but its response was too large to keep. It will not run again.",
                original_status.as_u16()
            ),
            Self::HandlerPanicked => "The request failed. Nothing was recorded, so it may be retried with the same Idempotency-Key.".into(),
            Self::StoreUnavailable { .. } => "The idempotency store is unavailable, so the request was not processed. Retry with the same Idempotency-Key.".into(),
        }
    }

    /// Whether the same request with the same key may succeed later: true
    /// for 409 (still in flight) and 503 (store unavailable).
    pub fn retryable(&self) -> bool {
        matches!(self, Self::InFlight { .. } | Self::StoreUnavailable { .. })
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::InFlight { retry_after } | Self::StoreUnavailable { retry_after } => {
                Some(*retry_after)
            }
            _ => None,
        }
    }

    /// The RFC 9457 problem document, as JSON, with the default
    /// [`ProblemDocs`] and no `instance`.
    pub fn to_json(&self) -> String {
        self.to_json_with(&ProblemDocs::default(), None)
    }

    /// The problem document as JSON, with `docs`' type base and, if given,
    /// the `instance`.
    pub fn to_json_with(&self, docs: &ProblemDocs, instance: Option<&str>) -> String {
        let mut out = String::with_capacity(320);
        out.push_str("{\"type\":");
        push_json_str(
            &mut out,
            &format!("{}{}", docs.type_base, self.type_suffix()),
        );
        out.push_str(",\"title\":");
        push_json_str(&mut out, self.title());
        out.push_str(",\"status\":");
        out.push_str(&self.status().as_u16().to_string());
        out.push_str(",\"detail\":");
        push_json_str(&mut out, &self.detail());
        if let Some(instance) = instance {
            out.push_str(",\"instance\":");
            push_json_str(&mut out, instance);
        }
        out.push_str(",\"retryable\":");
        out.push_str(if self.retryable() { "true" } else { "false" });
        if let Self::ResponseNotStored { original_status } = self {
            out.push_str(",\"original_status\":");
            out.push_str(&original_status.as_u16().to_string());
        }
        out.push('}');
        out
    }

    /// The problem response: status, `Content-Type:
    /// application/problem+json`, `Retry-After` where it applies, the JSON
    /// body with a fresh `instance`, and the rejection itself in the
    /// extensions.
    pub fn to_response(&self) -> Response<Bytes> {
        self.to_response_with(&ProblemDocs::default(), &new_instance())
    }

    /// [`to_response`](Self::to_response) with `docs`' type base and `Link`
    /// header, and the given `instance`.
    pub fn to_response_with(&self, docs: &ProblemDocs, instance: &str) -> Response<Bytes> {
        let mut res = Response::new(Bytes::from(self.to_json_with(docs, Some(instance))));
        *res.status_mut() = self.status();
        let headers = res.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        headers.insert(header::CONTENT_LANGUAGE, HeaderValue::from_static("en"));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(after) = self.retry_after() {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(after.as_secs().max(1)),
            );
        }
        if let Some(link) = &docs.describedby {
            headers.insert(header::LINK, link.clone());
        }
        res.extensions_mut().insert(self.clone());
        res
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.title())
    }
}

fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rejection_is_valid_problem_json() {
        let all = [
            Rejection::KeyMissing,
            Rejection::KeyInvalid(KeyError::TooLong),
            Rejection::BodyUnreadable,
            Rejection::BodyTooLarge { limit: 10 },
            Rejection::KeyReused,
            Rejection::InFlight {
                retry_after: Duration::from_secs(1),
            },
            Rejection::ResponseNotStored {
                original_status: StatusCode::CREATED,
            },
            Rejection::HandlerPanicked,
            Rejection::StoreUnavailable {
                retry_after: Duration::from_secs(2),
            },
        ];
        // Each type has a title of its own, and each occurrence here a
        // detail of its own: a client can tell them apart without the URI.
        let titles: std::collections::HashSet<_> = all.iter().map(Rejection::title).collect();
        let details: std::collections::HashSet<_> = all.iter().map(Rejection::detail).collect();
        assert_eq!((titles.len(), details.len()), (all.len(), all.len()));
        assert!(titles.iter().all(|t| t.len() > 10), "{titles:?}");
        for r in all {
            let res = r.to_response();
            assert_eq!(res.status(), r.status());
            assert_eq!(
                res.headers()[header::CONTENT_TYPE],
                "application/problem+json"
            );
            let v: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
            assert_eq!(v["status"], r.status().as_u16());
            assert!(v["type"].as_str().unwrap().starts_with(TYPE_BASE));
            assert_eq!(v["title"], r.title());
            assert_eq!(r.to_string(), r.title());
            // Plain text goes out as itself: only quotes, backslashes and
            // control characters are escaped.
            let raw = std::str::from_utf8(res.body()).unwrap();
            assert!(
                raw.contains(&format!("\"title\":\"{}\"", r.title())),
                "{raw}"
            );
            assert!(!v["detail"].as_str().unwrap().is_empty());
            assert_eq!(res.extensions().get::<Rejection>(), Some(&r));
            let retryable = matches!(r.status().as_u16(), 409 | 503);
            assert_eq!(v["retryable"], retryable, "{r:?}");
            let instance = v["instance"].as_str().unwrap();
            assert!(instance.starts_with("urn:uuid:"), "{instance}");
            assert!(uuid::Uuid::parse_str(&instance[9..]).is_ok());
            assert!(res.headers().get(header::LINK).is_none());
        }
    }

    #[test]
    fn docs_set_the_type_base_and_the_link() {
        let docs = ProblemDocs::new()
            .with_type_base("https://api.example.com/problems/")
            .with_describedby("https://api.example.com/docs/idempotency".parse().unwrap());
        let res = Rejection::KeyReused.to_response_with(&docs, "urn:uuid:x");
        let v: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
        assert_eq!(v["type"], "https://api.example.com/problems/key-reused");
        assert_eq!(v["instance"], "urn:uuid:x");
        assert_eq!(v["retryable"], false);
        assert_eq!(
            res.headers()[header::LINK],
            "<https://api.example.com/docs/idempotency>; rel=\"describedby\"; type=\"text/html\""
        );
        // Two responses, two instances.
        let a = Rejection::KeyMissing.to_response();
        let b = Rejection::KeyMissing.to_response();
        assert_ne!(a.body(), b.body());
        // `to_json` is the same document without an instance.
        let json: serde_json::Value =
            serde_json::from_str(&Rejection::KeyMissing.to_json()).unwrap();
        let mut sent: serde_json::Value = serde_json::from_slice(a.body()).unwrap();
        sent.as_object_mut().unwrap().remove("instance");
        assert_eq!(json, sent);
    }

    #[test]
    fn json_strings_escape_quotes_backslashes_and_control_characters_only() {
        let mut out = String::new();
        push_json_str(&mut out, "a\u{1}\u{1f} \"\\é\u{1F600}");
        assert_eq!(out, "\"a\\u0001\\u001f \\\"\\\\é\u{1F600}\"");
        let back: String = serde_json::from_str(&out).unwrap();
        assert_eq!(back, "a\u{1}\u{1f} \"\\é\u{1F600}");
    }

    #[test]
    fn retry_after_on_409_and_503() {
        let r = Rejection::StoreUnavailable {
            retry_after: Duration::from_secs(2),
        };
        assert_eq!(r.to_response().headers()[header::RETRY_AFTER], "2");
        assert!(
            Rejection::KeyReused
                .to_response()
                .headers()
                .get(header::RETRY_AFTER)
                .is_none()
        );
    }
}
