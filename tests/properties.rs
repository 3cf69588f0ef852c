//! Property tests: the key parser, the record encoding, the fingerprint
//! framing.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use proptest::prelude::*;
use tower_idempotency::key::{KeyError, parse_key};
use tower_idempotency::{
    fingerprint::{Fingerprint, FingerprintConfig},
    record::Record,
};

fn quote(token: &str) -> String {
    let mut out = String::from("\"");
    for c in token.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Any bytes give a key or a refusal, never a panic; a key is always
    /// 1 to 255 visible ASCII characters (and spaces from an sf-string).
    #[test]
    fn any_bytes_parse_or_are_refused(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(key) = parse_key(&raw, 1, 255) {
            let k = key.as_str();
            prop_assert!(!k.is_empty() && k.len() <= 255);
            prop_assert!(k.bytes().all(|b| (0x20..=0x7e).contains(&b)));
        }
    }

    /// Header-like input near the grammar's edges: a key that parses
    /// round-trips (its sf-string form names the same key), and a refusal
    /// names the right reason.
    #[test]
    fn near_miss_input_round_trips_or_is_refused_for_its_reason(raw in "[ \t\"\\\\a-z,;=\\x00-\\x1f\\x7f]{0,40}") {
        match parse_key(raw.as_bytes(), 1, 255) {
            Ok(key) => {
                let again = parse_key(quote(key.as_str()).as_bytes(), 1, 255);
                prop_assert_eq!(again.map(|k| k.as_str().to_owned()), Ok(key.as_str().to_owned()));
            }
            Err(e) => {
                let trimmed = raw.trim_matches([' ', '\t']);
                if trimmed.is_empty() || trimmed == "\"\"" {
                    prop_assert_eq!(e, KeyError::Empty, "{:?}", raw);
                } else {
                    prop_assert_eq!(e, KeyError::Malformed, "{:?}", raw);
                }
            }
        }
    }

    /// A bare token and its sf-string form name the same key.
    #[test]
    fn sf_string_and_token_agree(token in "[!#-+\\--~]{1,255}") {
        // The class excludes '"' (0x22) and ',' (0x2c).
        let bare = parse_key(token.as_bytes(), 1, 255);
        let quoted = parse_key(quote(&token).as_bytes(), 1, 255);
        prop_assert_eq!(bare.clone().map(|k| k.as_str().to_owned()), Ok(token.clone()));
        prop_assert_eq!(quoted.map(|k| k.as_str().to_owned()), Ok(token));
    }

    /// Control characters, CR, LF and NUL are refused wherever they stand.
    #[test]
    fn control_bytes_are_refused(prefix in "[a-z]{0,10}", bad in 0u8..0x20, suffix in "[a-z]{0,10}") {
        let mut raw = prefix.clone().into_bytes();
        raw.push(bad);
        raw.extend_from_slice(suffix.as_bytes());
        // Spaces and tabs at the ends are optional white space; inside they are not allowed.
        if !(bad == b'\t' && (prefix.is_empty() || suffix.is_empty())) {
            prop_assert!(parse_key(&raw, 1, 255).is_err());
        }
        let mut quoted = b"\"".to_vec();
        quoted.extend_from_slice(&raw);
        quoted.push(b'"');
        prop_assert!(parse_key(&quoted, 1, 255).is_err());
    }
}

fn header_name() -> impl Strategy<Value = HeaderName> {
    prop_oneof![
        Just(HeaderName::from_static("set-cookie")),
        Just(HeaderName::from_static("location")),
        Just(HeaderName::from_static("content-type")),
        "[a-z][a-z0-9-]{0,20}".prop_map(|s| HeaderName::from_bytes(s.as_bytes()).unwrap()),
    ]
}

fn header_value() -> impl Strategy<Value = HeaderValue> {
    proptest::collection::vec(prop_oneof![Just(b'\t'), 0x20u8..0x7f, 0x80u8..=0xff], 0..40)
        .prop_map(|v| HeaderValue::from_bytes(&v).unwrap())
}

fn record() -> impl Strategy<Value = Record> {
    (
        any::<[u8; 32]>(),
        100u16..1000,
        proptest::collection::vec((header_name(), header_value()), 0..12),
        proptest::collection::vec((header_name(), header_value()), 0..3),
        proptest::collection::vec(any::<u8>(), 0..2048),
        any::<bool>(),
    )
        .prop_map(|(fp, status, headers, trailers, body, tomb)| {
            let status = StatusCode::from_u16(status).unwrap();
            if tomb {
                Record::tombstone(Fingerprint::from_bytes(fp), status, headers)
            } else {
                Record::response(
                    Fingerprint::from_bytes(fp),
                    status,
                    headers,
                    Bytes::from(body),
                )
                .with_trailers(trailers)
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// Every record round-trips byte for byte, repeated headers in order.
    #[test]
    fn records_round_trip(r in record()) {
        let decoded = Record::decode(&r.encode()).unwrap();
        prop_assert_eq!(decoded.headers(), r.headers());
        prop_assert_eq!(decoded.body(), r.body());
        prop_assert_eq!(decoded, r);
    }

    /// A truncated record is an error.
    #[test]
    fn truncated_records_are_errors(r in record(), cut in any::<prop::sample::Index>()) {
        let bytes = r.encode();
        let len = cut.index(bytes.len());
        prop_assert!(Record::decode(&bytes[..len]).is_err());
    }

    /// A corrupted record is an error, never a different replay.
    #[test]
    fn corrupt_records_are_errors(r in record(), at in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let mut bytes = r.encode().to_vec();
        let i = at.index(bytes.len());
        bytes[i] ^= flip;
        prop_assert!(Record::decode(&bytes).is_err());
    }

    /// Arbitrary bytes never panic the decoder, and whatever decodes
    /// encodes back to exactly those bytes (no two encodings of one record).
    #[test]
    fn arbitrary_bytes_decode_only_to_their_own_encoding(raw in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(record) = Record::decode(&raw) {
            let encoded = record.encode();
            prop_assert_eq!(&encoded[..], &raw[..]);
        }
    }
}

fn method() -> impl Strategy<Value = String> {
    prop_oneof![Just("A"), Just("AA"), Just("AB"), Just("B"), Just("BA")].prop_map(str::to_owned)
}

fn target() -> impl Strategy<Value = String> {
    "[ab]{0,3}(\\?[ab]{0,2})?".prop_map(|s| format!("/{s}"))
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    "[ab/?]{0,4}".prop_map(String::into_bytes)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// Two different (method, target, body) triples never share a
    /// fingerprint, even when their concatenations are equal: the alphabet
    /// is tiny so that such near-collisions are common.
    #[test]
    fn framing_separates_every_triple(
        (m1, t1, b1) in (method(), target(), body()),
        (m2, t2, b2) in (method(), target(), body()),
    ) {
        let config = FingerprintConfig::default();
        let fp = |m: &str, t: &str, b: &[u8]| {
            let uri: Uri = t.parse().unwrap();
            config.fingerprint(&Method::from_bytes(m.as_bytes()).unwrap(), &uri, &HeaderMap::new(), b)
        };
        let same = (&m1, &t1, &b1) == (&m2, &t2, &b2);
        prop_assert_eq!(fp(&m1, &t1, &b1) == fp(&m2, &t2, &b2), same);
    }
}

#[test]
fn key_error_kinds_are_distinct() {
    assert_eq!(parse_key(b"", 1, 255).unwrap_err(), KeyError::Empty);
    assert_eq!(
        parse_key("k".repeat(256).as_bytes(), 1, 255).unwrap_err(),
        KeyError::TooLong
    );
}

// Canonical JSON fingerprints.

/// A JSON value: numbers as integers or decimals, strings with escapes
/// and non-ASCII, nested arrays and objects.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (-1000i32..1000, 1u32..1000)
            .prop_map(|(a, b)| { serde_json::from_str(&format!("{a}.{b}")).unwrap() }),
        "[a-z\"\\\\/\n\u{e9}\u{1f600} ]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z]{1,4}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// `v` as JSON text, with object members in an order `order` picks and
/// `ws` between tokens.
fn render(
    v: &serde_json::Value,
    order: &mut impl FnMut(usize) -> usize,
    ws: &str,
    out: &mut String,
) {
    use serde_json::Value;
    match v {
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(ws);
                render(item, order, ws, out);
            }
            out.push_str(ws);
            out.push(']');
        }
        Value::Object(map) => {
            let mut members: Vec<_> = map.iter().collect();
            // A permutation drawn from `order`.
            for i in (1..members.len()).rev() {
                members.swap(i, order(i + 1));
            }
            out.push('{');
            for (i, (k, item)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(ws);
                out.push_str(&serde_json::to_string(k).unwrap());
                out.push_str(ws);
                out.push(':');
                out.push_str(ws);
                render(item, order, ws, out);
            }
            out.push_str(ws);
            out.push('}');
        }
        other => out.push_str(&serde_json::to_string(other).unwrap()),
    }
}

/// `v` with its first leaf (depth first) changed, if it has one.
fn change_a_leaf(v: &serde_json::Value) -> Option<serde_json::Value> {
    use serde_json::Value;
    match v {
        Value::Null => Some(Value::Bool(false)),
        Value::Bool(b) => Some(Value::Bool(!b)),
        Value::Number(n) => Some(serde_json::from_str(&format!("{n}1")).unwrap()),
        Value::String(s) => Some(Value::String(format!("{s}x"))),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            change_a_leaf(item).map(|changed| {
                let mut items = items.clone();
                items[i] = changed;
                Value::Array(items)
            })
        }),
        Value::Object(map) => map.iter().find_map(|(k, item)| {
            change_a_leaf(item).map(|changed| {
                let mut map = map.clone();
                map.insert(k.clone(), changed);
                Value::Object(map)
            })
        }),
    }
}

fn canonical_fp(body: &str) -> Fingerprint {
    FingerprintConfig::default()
        .with_canonical_json()
        .fingerprint(
            &Method::POST,
            &Uri::from_static("/payments"),
            &HeaderMap::new(),
            body.as_bytes(),
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// Member order and whitespace do not change a canonical fingerprint.
    #[test]
    fn canonical_fingerprints_ignore_order_and_whitespace(
        v in json_value(),
        picks in proptest::collection::vec(any::<prop::sample::Index>(), 64),
        ws in "[ \t\r\n]{0,3}",
    ) {
        let mut plain = String::new();
        let mut first = |_n: usize| 0usize;
        render(&v, &mut first, "", &mut plain);
        let mut shuffled = String::new();
        let mut i = 0;
        let mut pick = |n: usize| { i += 1; picks[i % picks.len()].index(n) };
        render(&v, &mut pick, &ws, &mut shuffled);
        prop_assert_eq!(canonical_fp(&plain), canonical_fp(&shuffled), "{} vs {}", plain, shuffled);
    }

    /// Any change of a value changes it.
    #[test]
    fn canonical_fingerprints_see_every_value(v in json_value()) {
        let Some(changed) = change_a_leaf(&v) else { return Ok(()) };
        let (a, b) = (v.to_string(), changed.to_string());
        prop_assume!(a != b);
        prop_assert_ne!(canonical_fp(&a), canonical_fp(&b), "{} vs {}", a, b);
    }
}
