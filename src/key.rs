//! The `Idempotency-Key` header: parsing and validation.
//!
//! The IETF draft makes the field an RFC 8941 structured-field String, so it
//! is quoted on the wire (`Idempotency-Key: "8e03978e-40d5"`); Stripe-style
//! clients send a bare token (`Idempotency-Key: 8e03978e-40d5`). Both are
//! accepted and name the same key.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use http::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};

/// The header the layer reads by default: `Idempotency-Key`.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The header a replayed response carries by default: `Idempotent-Replayed`.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// A validated idempotency key, as the client sent it (unquoted).
///
/// The layer puts it in the request's extensions, so a handler can derive
/// keys for its own downstream calls. With the `axum` feature it is an
/// extractor: `IdempotencyKey` in a handler behind the layer is the
/// validated key, and `Option<IdempotencyKey>` is `None` when the request
/// carried none (and the layer does not require one). Used on a route the
/// layer does not cover, the required form answers `500` and logs an error
/// naming the mistake, rather than let the handler run without its key.
///
/// ```
/// use axum::http::StatusCode;
/// use tower_idempotency::key::IdempotencyKey;
///
/// # #[cfg(feature = "axum")]
/// async fn create_payment(key: IdempotencyKey) -> StatusCode {
///     // The same request always sends the provider the same key.
///     let provider_key = key.derive("payment-provider");
///     assert_eq!(provider_key.len(), 64);
///     StatusCode::CREATED
/// }
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(Arc<str>);

impl IdempotencyKey {
    /// The key, without the quotes of the sf-string form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A deterministic key for a downstream call, derived from this key and
    /// a label naming the call: 64 lower-case hex characters of
    /// SHA-256(label, key). A retry of the request derives the same key, so
    /// the downstream service deduplicates it too.
    pub fn derive(&self, label: &str) -> String {
        let mut h = Sha256::new();
        h.update(b"tower-idempotency/derive/v1\0");
        h.update((label.len() as u64).to_be_bytes());
        h.update(label.as_bytes());
        h.update(self.0.as_bytes());
        crate::util::hex(&h.finalize())
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys can be guessable secrets: never print them whole.
        write!(f, "IdempotencyKey(<{} chars>)", self.0.len())
    }
}

impl AsRef<str> for IdempotencyKey {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

/// Why a key was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// The header is absent.
    Missing,
    /// The header appears more than once.
    Multiple,
    /// The key is empty.
    Empty,
    /// The key is shorter than the configured minimum.
    TooShort,
    /// The key is longer than the configured maximum.
    TooLong,
    /// A byte outside visible ASCII (and space inside quotes), a comma in a
    /// bare token, or a malformed sf-string.
    Malformed,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Missing => "the Idempotency-Key header is missing",
            Self::Multiple => "the Idempotency-Key header appears more than once",
            Self::Empty => "the idempotency key is empty",
            Self::TooShort => "the idempotency key is shorter than allowed",
            Self::TooLong => "the idempotency key is longer than allowed",
            Self::Malformed => {
                "the idempotency key must be a quoted sf-string or a bare token of visible ASCII characters"
            }
        })
    }
}

/// Reads the key from `headers`: at most one field, then [`parse_key`].
pub(crate) fn key_from_headers(
    headers: &HeaderMap,
    name: &HeaderName,
    min_len: usize,
    max_len: usize,
) -> Result<IdempotencyKey, KeyError> {
    let mut values = headers.get_all(name).iter();
    let value = values.next().ok_or(KeyError::Missing)?;
    if values.next().is_some() {
        return Err(KeyError::Multiple);
    }
    parse_key(value.as_bytes(), min_len, max_len)
}

/// Parses one header value as an sf-string (`"abc"`) or a bare token
/// (`abc`), with optional surrounding spaces, and checks the length of the
/// key it names (in characters, without quotes) against `min_len..=max_len`.
///
/// ```
/// use tower_idempotency::key::{KeyError, parse_key};
///
/// assert_eq!(parse_key(b"\"abc\"", 1, 255).unwrap().as_str(), "abc");
/// assert_eq!(parse_key(b"abc", 1, 255).unwrap().as_str(), "abc");
/// assert_eq!(parse_key(b"a\r\nb", 1, 255), Err(KeyError::Malformed));
/// ```
pub fn parse_key(raw: &[u8], min_len: usize, max_len: usize) -> Result<IdempotencyKey, KeyError> {
    let trimmed = trim_ows(raw);
    // Borrowed unless escapes had to be undone: the key is copied once,
    // into its `Arc`.
    let key: Cow<'_, str> = if let Some(rest) = trimmed.strip_prefix(b"\"") {
        parse_sf_string(rest)?
    } else {
        if trimmed
            .iter()
            .any(|&b| !(0x21..=0x7e).contains(&b) || b == b',' || b == b'"')
        {
            return Err(KeyError::Malformed);
        }
        // Visible ASCII only, so this never fails.
        Cow::Borrowed(std::str::from_utf8(trimmed).map_err(|_| KeyError::Malformed)?)
    };
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > max_len {
        return Err(KeyError::TooLong);
    }
    if key.len() < min_len {
        return Err(KeyError::TooShort);
    }
    Ok(IdempotencyKey(Arc::from(&*key)))
}

fn trim_ows(mut b: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = b {
        b = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = b {
        b = rest;
    }
    b
}

/// RFC 8941 §4.2.5: the part after the opening quote.
fn parse_sf_string(rest: &[u8]) -> Result<Cow<'_, str>, KeyError> {
    // Without escapes (the usual case) the key is the bytes up to the
    // closing quote, borrowed.
    for (i, &c) in rest.iter().enumerate() {
        match c {
            b'"' if i + 1 == rest.len() => {
                // Every byte before the quote passed the printable-ASCII
                // arm below: never fails.
                return std::str::from_utf8(&rest[..i])
                    .map(Cow::Borrowed)
                    .map_err(|_| KeyError::Malformed);
            }
            b'"' => return Err(KeyError::Malformed), // bytes after the closing quote
            b'\\' => return unescape(rest).map(Cow::Owned),
            0x20..=0x7e => {}
            _ => return Err(KeyError::Malformed),
        }
    }
    Err(KeyError::Malformed)
}

fn unescape(mut rest: &[u8]) -> Result<String, KeyError> {
    let mut out = String::with_capacity(rest.len());
    loop {
        match rest {
            [] => return Err(KeyError::Malformed),
            [b'"'] => return Ok(out),
            [b'"', ..] => return Err(KeyError::Malformed), // bytes after the closing quote
            [b'\\', c @ (b'"' | b'\\'), tail @ ..] => {
                out.push(char::from(*c));
                rest = tail;
            }
            [b'\\', ..] => return Err(KeyError::Malformed),
            [c, tail @ ..] if (0x20..=0x7e).contains(c) => {
                out.push(char::from(*c));
                rest = tail;
            }
            _ => return Err(KeyError::Malformed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(raw: &str) -> Result<String, KeyError> {
        parse_key(raw.as_bytes(), 1, 255).map(|k| k.as_str().to_owned())
    }

    #[test]
    fn sf_string_and_token_agree() {
        assert_eq!(p("\"8e03978e-40d5\"").unwrap(), "8e03978e-40d5");
        assert_eq!(p("8e03978e-40d5").unwrap(), "8e03978e-40d5");
        assert_eq!(p("  \"abc\"\t").unwrap(), "abc");
    }

    #[test]
    fn sf_string_escapes_and_spaces() {
        assert_eq!(p(r#""a\"b\\c""#).unwrap(), "a\"b\\c");
        assert_eq!(p("\"a b, c\"").unwrap(), "a b, c");
        assert_eq!(p(r#""a\nb""#), Err(KeyError::Malformed));
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(p(""), Err(KeyError::Empty));
        assert_eq!(p("\"\""), Err(KeyError::Empty));
        assert_eq!(p("\"abc"), Err(KeyError::Malformed));
        assert_eq!(p("\"abc\";x=1"), Err(KeyError::Malformed));
        assert_eq!(p("a b"), Err(KeyError::Malformed));
        assert_eq!(p("a,b"), Err(KeyError::Malformed));
        assert_eq!(p("ab\"c"), Err(KeyError::Malformed));
        assert_eq!(parse_key(b"a\0b", 1, 255).unwrap_err(), KeyError::Malformed);
        assert_eq!(
            parse_key(b"\"a\rb\"", 1, 255).unwrap_err(),
            KeyError::Malformed
        );
        assert_eq!(
            parse_key("ключ".as_bytes(), 1, 255).unwrap_err(),
            KeyError::Malformed
        );
    }

    #[test]
    fn length_bounds() {
        let max = "k".repeat(255);
        assert!(p(&max).is_ok());
        assert_eq!(p(&format!("{max}k")), Err(KeyError::TooLong));
        // The quotes do not count.
        assert!(p(&format!("\"{max}\"")).is_ok());
        assert_eq!(parse_key(b"abc", 4, 255).unwrap_err(), KeyError::TooShort);
    }

    #[test]
    fn several_fields_are_refused() {
        let mut h = HeaderMap::new();
        h.append(IDEMPOTENCY_KEY, "a".parse().unwrap());
        assert_eq!(
            key_from_headers(&h, &IDEMPOTENCY_KEY, 1, 255)
                .unwrap()
                .as_str(),
            "a"
        );
        h.append(IDEMPOTENCY_KEY, "b".parse().unwrap());
        assert_eq!(
            key_from_headers(&h, &IDEMPOTENCY_KEY, 1, 255),
            Err(KeyError::Multiple)
        );
        assert_eq!(
            key_from_headers(&HeaderMap::new(), &IDEMPOTENCY_KEY, 1, 255),
            Err(KeyError::Missing)
        );
    }

    #[test]
    fn derived_keys_are_stable_and_distinct() {
        let k = parse_key(b"abc", 1, 255).unwrap();
        assert_eq!(k.derive("stripe"), k.derive("stripe"));
        assert_ne!(k.derive("stripe"), k.derive("mail"));
        assert_ne!(
            k.derive("stripe"),
            parse_key(b"abd", 1, 255).unwrap().derive("stripe")
        );
        assert_eq!(format!("{k:?}"), "IdempotencyKey(<3 chars>)");
        // A known answer, computed outside this crate: SHA-256 of the
        // domain tag, the label's length (8 bytes, big-endian), the label
        // and the key, in lower-case hex.
        assert_eq!(
            k.derive("stripe"),
            "85dbafe1f9c89750d1355a63cceb68470e1118f596443a4a360e939adc830815"
        );
        assert_eq!(k.as_ref(), "abc");
    }

    #[test]
    fn a_quote_before_the_end_is_malformed() {
        // Without escapes, with them, and after an escaped quote.
        assert_eq!(p("\"ab\"cd\""), Err(KeyError::Malformed));
        assert_eq!(p("\"a\\\\b\"cd\""), Err(KeyError::Malformed));
        assert_eq!(p("\"a\\\"b\"c\""), Err(KeyError::Malformed));
        assert_eq!(p("\"a\\\"b\"").unwrap(), "a\"b");
    }

    #[test]
    fn a_control_character_after_an_escape_is_malformed() {
        assert_eq!(p("\"a\\\\\u{1}b\""), Err(KeyError::Malformed));
        assert_eq!(p("\"a\\\\\u{7f}b\""), Err(KeyError::Malformed));
        assert_eq!(p("\"a\\\\ b~\"").unwrap(), "a\\ b~");
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(
            KeyError::Missing.to_string(),
            "the Idempotency-Key header is missing"
        );
        let all = [
            KeyError::Missing,
            KeyError::Multiple,
            KeyError::Empty,
            KeyError::TooShort,
            KeyError::TooLong,
            KeyError::Malformed,
        ];
        let texts: std::collections::HashSet<String> =
            all.iter().map(ToString::to_string).collect();
        assert_eq!(texts.len(), all.len(), "each error has its own message");
        assert!(texts.iter().all(|t| t.contains("key") || t.contains("Key")));
    }
}

/// The rejection of the [`IdempotencyKey`] extractor on a request the layer
/// did not handle: a route without `IdempotencyLayer` in front, or a method
/// it does not cover. It answers `500` (with the explanation in debug
/// builds) and is logged at `error`: a programming error, not a client one.
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyNotExtracted;

#[cfg(feature = "axum")]
impl fmt::Display for KeyNotExtracted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "IdempotencyKey extractor used on a request the idempotency layer did not handle: \
             put IdempotencyLayer on this route (and cover its method), or take Option<IdempotencyKey>",
        )
    }
}

#[cfg(feature = "axum")]
impl std::error::Error for KeyNotExtracted {}

#[cfg(feature = "axum")]
impl axum_core::response::IntoResponse for KeyNotExtracted {
    fn into_response(self) -> axum_core::response::Response {
        let detail = if cfg!(debug_assertions) {
            self.to_string()
        } else {
            "Internal error".to_owned()
        };
        let mut res = axum_core::response::Response::new(axum_core::body::Body::from(detail));
        *res.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
        res.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        res
    }
}

#[cfg(feature = "axum")]
impl<S: Send + Sync> axum_core::extract::FromRequestParts<S> for IdempotencyKey {
    type Rejection = KeyNotExtracted;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<IdempotencyKey>() {
            Some(key) => Ok(key.clone()),
            None => {
                tracing::error!(
                    method = %parts.method,
                    path = parts.uri.path(),
                    "{KeyNotExtracted}"
                );
                Err(KeyNotExtracted)
            }
        }
    }
}

#[cfg(feature = "axum")]
impl<S: Send + Sync> axum_core::extract::OptionalFromRequestParts<S> for IdempotencyKey {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<IdempotencyKey>().cloned())
    }
}
