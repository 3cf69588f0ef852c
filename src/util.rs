//! Small helpers the crate's modules share.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::Method;

/// A boxed, sendable future: what a covered request's response future
/// holds.
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The methods the server and client layers cover unless told otherwise:
/// the two that are not idempotent by definition.
pub(crate) fn default_methods() -> Vec<Method> {
    vec![Method::POST, Method::PATCH]
}

/// Whether `method` is one of `methods`.
#[inline]
pub(crate) fn covers(methods: &[Method], method: &Method) -> bool {
    methods.iter().any(|m| m == method)
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// The two lower-case hex digits of `byte`.
#[inline]
fn hex_pair(byte: u8) -> [char; 2] {
    // Both indices are below 16.
    [
        char::from(HEX_DIGITS[usize::from(byte >> 4)]),
        char::from(HEX_DIGITS[usize::from(byte & 0x0f)]),
    ]
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.extend(hex_pair(b));
    }
    s
}

/// Lower-case hex of `bytes`, written straight into a formatter.
pub(crate) fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for &b in bytes {
        let [hi, lo] = hex_pair(b);
        fmt::Write::write_char(f, hi)?;
        fmt::Write::write_char(f, lo)?;
    }
    Ok(())
}

/// Whole milliseconds in `d`, saturating at `u64::MAX` (585 million
/// years).
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds since the Unix epoch by the system clock; 0 for a clock
/// set before 1970.
pub(crate) fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lower_case_and_complete() {
        let bytes: Vec<u8> = (0..=255).collect();
        let s = hex(&bytes);
        assert_eq!(s.len(), 512);
        assert!(s.starts_with("000102"));
        assert!(s.ends_with("fdfeff"));
        for (i, pair) in s.as_bytes().chunks(2).enumerate() {
            assert_eq!(pair, format!("{i:02x}").as_bytes());
        }
        struct Hex<'a>(&'a [u8]);
        impl fmt::Display for Hex<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex(f, self.0)
            }
        }
        assert_eq!(Hex(&bytes).to_string(), s);
    }

    #[test]
    fn millis_saturates() {
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
        assert_eq!(millis(Duration::MAX), u64::MAX);
        assert!(unix_millis() > 1_700_000_000_000);
    }

    #[test]
    fn covers_only_the_listed_methods() {
        let methods = default_methods();
        assert!(covers(&methods, &Method::POST));
        assert!(covers(&methods, &Method::PATCH));
        assert!(!covers(&methods, &Method::PUT));
        assert!(!covers(&[], &Method::POST));
    }
}
