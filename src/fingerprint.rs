//! Request fingerprints: SHA-256 over the method, the target and the body.
//!
//! A fingerprint tells a retry (same key, same request) from a key reused
//! for another request (same key, different method, target or body), which
//! the layer refuses with `422 Unprocessable Content`.
//!
//! The hash input is framed so that two different requests never feed
//! SHA-256 the same bytes: a version tag, then each of the method, the target
//! and every selected header as a length-prefixed field, then the body last.
//! The body is hashed frame by frame while it is read, in the same pass that
//! buffers it.

use std::fmt;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use sha2::{Digest, Sha256};

/// The SHA-256 fingerprint of a request.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Wraps 32 raw bytes, as a store reads them back.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw 32 bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", hex_prefix(&self.0))
    }
}

/// Lower-case hex of the first 8 bytes: enough to correlate log lines,
/// useless for recovering what was hashed.
pub(crate) fn hex_prefix(bytes: &[u8; 32]) -> String {
    crate::util::hex(&bytes[..8])
}

/// What the fingerprint covers.
///
/// The default covers the method, the path and query, and the body, as
/// Stripe compares "endpoint and parameters". Reusing a key on another
/// endpoint is therefore a mismatch too.
///
/// ```
/// use tower_idempotency::fingerprint::FingerprintConfig;
///
/// // Also treat a different `Content-Type` as a different request, and
/// // ignore the query string.
/// let config = FingerprintConfig::default()
///     .with_header(http::header::CONTENT_TYPE)
///     .with_query(false);
/// # let _ = config;
/// ```
#[derive(Debug, Clone)]
pub struct FingerprintConfig {
    method: bool,
    target: bool,
    query: bool,
    body: bool,
    json: JsonBody,
    headers: Vec<HeaderName>,
}

/// How a JSON body enters the fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
enum JsonBody {
    /// The body's bytes as sent.
    Raw,
    /// The body's canonical form: member order and whitespace do not count.
    Canonical,
    /// Only the members these JSON Pointers select, each canonical.
    Members(Vec<String>),
}

/// A JSON Pointer passed to [`FingerprintConfig::with_json_members`] that
/// is not one (RFC 6901: empty, or starting with `/`, with `~` followed by
/// `0` or `1`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a JSON Pointer: {0:?}")]
pub struct InvalidPointer(pub String);

impl Default for FingerprintConfig {
    fn default() -> Self {
        Self {
            method: true,
            target: true,
            query: true,
            body: true,
            json: JsonBody::Raw,
            headers: Vec::new(),
        }
    }
}

impl FingerprintConfig {
    /// A fingerprint that covers nothing: any request under a key is a retry
    /// of the first. Only for clients that guarantee a key is never reused.
    pub fn key_only() -> Self {
        Self {
            method: false,
            target: false,
            query: false,
            body: false,
            json: JsonBody::Raw,
            headers: Vec::new(),
        }
    }

    /// Fingerprints a JSON body in its canonical form, so two clients that
    /// order members differently or space them differently send the same
    /// request: members sorted by name, no insignificant whitespace,
    /// strings re-escaped minimally, numbers exactly as written (`1.0` is
    /// not `1`).
    ///
    /// A body that is not valid JSON is fingerprinted as its raw bytes: it
    /// is never rejected for that. The body is read whole before it is
    /// fingerprinted (it is anyway, up to `max_request_body`).
    ///
    /// ```
    /// use http::{HeaderMap, Method, Uri};
    /// use tower_idempotency::fingerprint::FingerprintConfig;
    ///
    /// let config = FingerprintConfig::default().with_canonical_json();
    /// let uri = Uri::from_static("/payments");
    /// let a = config.fingerprint(&Method::POST, &uri, &HeaderMap::new(), br#"{"amount":10,"to":"bob"}"#);
    /// let b = config.fingerprint(&Method::POST, &uri, &HeaderMap::new(), b"{ \"to\": \"bob\", \"amount\": 10 }");
    /// assert_eq!(a, b);
    /// ```
    #[must_use]
    pub fn with_canonical_json(mut self) -> Self {
        self.body = true;
        self.json = JsonBody::Canonical;
        self
    }

    /// Fingerprints only the members of a JSON body that these JSON
    /// Pointers (RFC 6901) select, each in canonical form, in the order
    /// given; a member that is absent counts as absent, which differs from
    /// any value. Everything else in the body may change between retries
    /// (a client timestamp, a trace id). Combine with
    /// [`with_header`](Self::with_header) to cover request headers too.
    ///
    /// A body that is not valid JSON is fingerprinted as its raw bytes.
    ///
    /// ```
    /// use http::{HeaderMap, Method, Uri};
    /// use tower_idempotency::fingerprint::FingerprintConfig;
    ///
    /// let config = FingerprintConfig::default()
    ///     .with_json_members(["/amount", "/to"])
    ///     .unwrap();
    /// let uri = Uri::from_static("/payments");
    /// let fp = |body: &[u8]| config.fingerprint(&Method::POST, &uri, &HeaderMap::new(), body);
    /// assert_eq!(
    ///     fp(br#"{"amount":10,"to":"bob","sent_at":"12:00:01"}"#),
    ///     fp(br#"{"sent_at":"12:00:07","to":"bob","amount":10}"#),
    /// );
    /// assert_ne!(fp(br#"{"amount":10,"to":"bob"}"#), fp(br#"{"amount":11,"to":"bob"}"#));
    /// ```
    pub fn with_json_members<I, P>(mut self, pointers: I) -> Result<Self, InvalidPointer>
    where
        I: IntoIterator<Item = P>,
        P: Into<String>,
    {
        let pointers: Vec<String> = pointers.into_iter().map(Into::into).collect();
        if let Some(bad) = pointers.iter().find(|p| !crate::json::is_pointer(p)) {
            return Err(InvalidPointer(bad.clone()));
        }
        self.body = true;
        self.json = JsonBody::Members(pointers);
        Ok(self)
    }

    /// Whether the method is covered (default: yes).
    ///
    /// ```
    /// use http::{HeaderMap, Method, Uri};
    /// use tower_idempotency::fingerprint::FingerprintConfig;
    ///
    /// // The key names the operation: the method does not count.
    /// let config = FingerprintConfig::default().with_method(false);
    /// let uri = Uri::from_static("/orders/7");
    /// let fp = |method| config.fingerprint(&method, &uri, &HeaderMap::new(), b"{}");
    /// assert_eq!(fp(Method::PUT), fp(Method::POST));
    /// ```
    #[must_use]
    pub fn with_method(mut self, on: bool) -> Self {
        self.method = on;
        self
    }

    /// Whether the path is covered (default: yes).
    ///
    /// ```
    /// use http::{HeaderMap, Method, Uri};
    /// use tower_idempotency::fingerprint::FingerprintConfig;
    ///
    /// // One resource under two routes: the path does not count.
    /// let config = FingerprintConfig::default().with_path(false);
    /// let fp = |uri: &'static str| config.fingerprint(&Method::POST, &Uri::from_static(uri), &HeaderMap::new(), b"{}");
    /// assert_eq!(fp("/v1/orders"), fp("/v2/orders"));
    /// ```
    #[must_use]
    pub fn with_path(mut self, on: bool) -> Self {
        self.target = on;
        self
    }

    /// Whether the query string is covered (default: yes; only when the
    /// path is covered).
    ///
    /// ```
    /// use http::{HeaderMap, Method, Uri};
    /// use tower_idempotency::fingerprint::FingerprintConfig;
    ///
    /// // Clients add a cache-busting `?ts=` to each attempt.
    /// let config = FingerprintConfig::default().with_query(false);
    /// let fp = |uri: &'static str| config.fingerprint(&Method::POST, &Uri::from_static(uri), &HeaderMap::new(), b"{}");
    /// assert_eq!(fp("/orders?ts=1"), fp("/orders?ts=2"));
    /// assert_ne!(fp("/orders"), fp("/refunds"), "the path still counts");
    /// ```
    #[must_use]
    pub fn with_query(mut self, on: bool) -> Self {
        self.query = on;
        self
    }

    /// Whether the body is covered (default: yes).
    ///
    /// ```
    /// use http::{HeaderMap, Method, Uri};
    /// use tower_idempotency::fingerprint::FingerprintConfig;
    ///
    /// let config = FingerprintConfig::default().with_body(false);
    /// let uri = Uri::from_static("/orders");
    /// let fp = |body: &[u8]| config.fingerprint(&Method::POST, &uri, &HeaderMap::new(), body);
    /// assert_eq!(fp(br#"{"qty":1}"#), fp(br#"{"qty":2}"#));
    /// ```
    #[must_use]
    pub fn with_body(mut self, on: bool) -> Self {
        self.body = on;
        self
    }

    /// Also covers every value of the header `name`, in order.
    ///
    /// ```
    /// use http::{HeaderMap, HeaderValue, Method, Uri, header::CONTENT_TYPE};
    /// use tower_idempotency::fingerprint::FingerprintConfig;
    ///
    /// let config = FingerprintConfig::default().with_header(CONTENT_TYPE);
    /// let uri = Uri::from_static("/orders");
    /// let fp = |content_type: &'static str| {
    ///     let mut headers = HeaderMap::new();
    ///     headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    ///     config.fingerprint(&Method::POST, &uri, &headers, b"qty=1")
    /// };
    /// assert_ne!(fp("application/json"), fp("application/x-www-form-urlencoded"));
    /// ```
    #[must_use]
    pub fn with_header(mut self, name: HeaderName) -> Self {
        self.headers.push(name);
        self
    }

    /// The fingerprint of a whole request, as the layer computes it while
    /// reading the body.
    ///
    /// ```
    /// use http::{HeaderMap, Method, Uri};
    /// use tower_idempotency::fingerprint::FingerprintConfig;
    ///
    /// let config = FingerprintConfig::default();
    /// let uri: Uri = "/orders?x=1".parse().unwrap();
    /// let a = config.fingerprint(&Method::POST, &uri, &HeaderMap::new(), b"{}");
    /// let b = config.fingerprint(&Method::POST, &uri, &HeaderMap::new(), b"{ }");
    /// assert_ne!(a, b);
    /// ```
    pub fn fingerprint(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Fingerprint {
        let mut f = self.start(method, uri, headers);
        if self.body {
            f.update(&self.json_body(body));
        }
        f.finish()
    }

    pub(crate) fn covers_body(&self) -> bool {
        self.body
    }

    /// Whether the body streams into the fingerprint as it arrives (raw),
    /// or goes in whole once read ([`json_body`](Self::json_body)).
    pub(crate) fn streams_body(&self) -> bool {
        self.body && self.json == JsonBody::Raw
    }

    /// What of a whole body goes into the fingerprint: its canonical form or
    /// its selected members under the JSON options, the bytes as sent
    /// otherwise (and when the body is not JSON).
    pub(crate) fn json_body<'b>(&self, body: &'b [u8]) -> std::borrow::Cow<'b, [u8]> {
        use std::borrow::Cow;
        let transformed = match &self.json {
            JsonBody::Raw => None,
            // A tag byte keeps a transformed body from colliding with a raw
            // one that happens to have the same bytes.
            JsonBody::Canonical => crate::json::canonical(body).map(|c| [&[b'c'][..], &c].concat()),
            JsonBody::Members(pointers) => {
                crate::json::select(body, pointers).map(|s| [&[b's'][..], &s].concat())
            }
        };
        match transformed {
            Some(t) => Cow::Owned(t),
            None => Cow::Borrowed(body),
        }
    }

    /// Starts a fingerprint over the request head; feed the body with
    /// [`Fingerprinter::update`].
    pub(crate) fn start(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Fingerprinter {
        self.start_bound(method, uri, headers, std::iter::empty())
    }

    /// [`start`](Self::start), bound to `credentials` too: each value is a
    /// field of the fingerprint, so the same request under other
    /// credentials has another fingerprint.
    pub(crate) fn start_bound<'a>(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        credentials: impl Iterator<Item = &'a HeaderValue>,
    ) -> Fingerprinter {
        let mut f = Fingerprinter::new();
        if self.method {
            f.field(b'm', method.as_str().as_bytes());
        }
        if self.target {
            let target = if self.query {
                uri.path_and_query().map_or("/", |pq| pq.as_str())
            } else {
                uri.path()
            };
            f.field(b't', target.as_bytes());
        }
        for name in &self.headers {
            f.field(b'h', name.as_str().as_bytes());
            for value in headers.get_all(name) {
                f.field(b'v', value.as_bytes());
            }
        }
        for value in credentials {
            f.field(b'a', value.as_bytes());
        }
        f.hasher.update([b'b']);
        f
    }
}

/// An incremental fingerprint: the head is framed, the body is streamed in.
#[derive(Debug, Clone)]
pub(crate) struct Fingerprinter {
    hasher: Sha256,
}

impl Fingerprinter {
    fn new() -> Self {
        let mut hasher = Sha256::new();
        // Short on purpose: with a 1 KiB body the whole input stays within
        // the block count of the body alone.
        hasher.update(b"tower-idem/fp1\0");
        Self { hasher }
    }

    fn field(&mut self, tag: u8, bytes: &[u8]) {
        // Method, target and header values are far below 4 GiB.
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        let mut head = [0u8; 5];
        head[0] = tag;
        head[1..].copy_from_slice(&len.to_be_bytes());
        self.hasher.update(head);
        self.hasher.update(bytes);
    }

    /// Feeds the next chunk of the body.
    pub(crate) fn update(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
    }

    pub(crate) fn finish(self) -> Fingerprint {
        Fingerprint(self.hasher.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(config: &FingerprintConfig, method: &str, uri: &str, body: &[&[u8]]) -> Fingerprint {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let uri: Uri = uri.parse().unwrap();
        let mut f = config.start(&method, &uri, &HeaderMap::new());
        for chunk in body {
            f.update(chunk);
        }
        f.finish()
    }

    #[test]
    fn chunking_does_not_matter() {
        let c = FingerprintConfig::default();
        assert_eq!(
            fp(&c, "POST", "/a?x=1", &[b"hello world"]),
            fp(&c, "POST", "/a?x=1", &[b"hello", b" ", b"world"])
        );
    }

    #[test]
    fn each_part_matters() {
        let c = FingerprintConfig::default();
        let base = fp(&c, "POST", "/a?x=1", &[b"{}"]);
        assert_ne!(base, fp(&c, "PATCH", "/a?x=1", &[b"{}"]));
        assert_ne!(base, fp(&c, "POST", "/b?x=1", &[b"{}"]));
        assert_ne!(base, fp(&c, "POST", "/a?x=2", &[b"{}"]));
        assert_ne!(base, fp(&c, "POST", "/a?x=1", &[b"{ }"]));
    }

    #[test]
    fn framing_separates_target_from_body() {
        let c = FingerprintConfig::default();
        // Without length prefixes these two would hash the same bytes.
        assert_ne!(
            fp(&c, "POST", "/ab", &[b"c"]),
            fp(&c, "POST", "/a", &[b"bc"])
        );
    }

    #[test]
    fn options_narrow_the_coverage() {
        let no_query = FingerprintConfig::default().with_query(false);
        assert_eq!(
            fp(&no_query, "POST", "/a?x=1", &[b"{}"]),
            fp(&no_query, "POST", "/a?x=2", &[b"{}"])
        );
        let key_only = FingerprintConfig::key_only();
        assert_eq!(
            fp(&key_only, "POST", "/a", &[]),
            fp(&key_only, "PATCH", "/b", &[])
        );
        // Each option alone: the part it drops no longer matters, the
        // others still do.
        let no_method = FingerprintConfig::default().with_method(false);
        assert_eq!(
            fp(&no_method, "POST", "/a", &[b"{}"]),
            fp(&no_method, "PATCH", "/a", &[b"{}"])
        );
        assert_ne!(
            fp(&no_method, "POST", "/a", &[b"{}"]),
            fp(&no_method, "POST", "/b", &[b"{}"])
        );
        let no_path = FingerprintConfig::default().with_path(false);
        assert_eq!(
            fp(&no_path, "POST", "/a", &[b"{}"]),
            fp(&no_path, "POST", "/b", &[b"{}"])
        );
        assert_ne!(
            fp(&no_path, "POST", "/a", &[b"{}"]),
            fp(&no_path, "PATCH", "/a", &[b"{}"])
        );
    }

    #[test]
    fn debug_shows_a_short_prefix() {
        let f = Fingerprint::from_bytes([0xab; 32]);
        assert_eq!(format!("{f:?}"), "Fingerprint(abababababababab)");
    }

    #[test]
    fn selected_headers_are_covered() {
        let c = FingerprintConfig::default().with_header(http::header::CONTENT_TYPE);
        let uri: Uri = "/a".parse().unwrap();
        let mut h1 = HeaderMap::new();
        h1.insert(
            http::header::CONTENT_TYPE,
            "application/json".parse().unwrap(),
        );
        let mut h2 = HeaderMap::new();
        h2.insert(http::header::CONTENT_TYPE, "text/plain".parse().unwrap());
        let a = c.start(&Method::POST, &uri, &h1).finish();
        let b = c.start(&Method::POST, &uri, &h2).finish();
        assert_ne!(a, b);
    }
}
