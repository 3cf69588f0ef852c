//! Which answers are retried, after how long: the statuses, `Retry-After`,
//! and the backoff with full jitter (the table is in the
//! [module docs](super#retry-rules)).

use std::time::Duration;

use http::{HeaderMap, StatusCode, header};
use uuid::Uuid;

use super::layer::ClientConfig;

pub(super) enum Verdict {
    /// Hand the response to the caller.
    Final,
    /// Retry, after the server's `Retry-After` if it gave one.
    Retry(Option<Duration>),
}

/// Whether a response is retried, and after how long if the server says.
pub(super) fn retry_after(status: StatusCode, headers: &HeaderMap, cap: Duration) -> Verdict {
    let after = headers
        .get(header::RETRY_AFTER)
        .and_then(|v| parse_delta_seconds(v.as_bytes()));
    match status.as_u16() {
        409 | 500 | 502 | 503 | 504 => Verdict::Retry(after.map(|a| a.min(cap))),
        429 => match after {
            Some(a) if a <= cap => Verdict::Retry(Some(a)),
            _ => Verdict::Final,
        },
        _ => Verdict::Final,
    }
}

/// `Retry-After` in its delay-seconds form (RFC 9110 §10.2.3); `None` for
/// the HTTP-date form or anything malformed.
fn parse_delta_seconds(raw: &[u8]) -> Option<Duration> {
    let s = std::str::from_utf8(raw).ok()?.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Absurdly long numbers saturate; the cap applies anyway.
    Some(Duration::from_secs(s.parse::<u64>().unwrap_or(u64::MAX)))
}

/// xorshift64*, seeded from a UUID v4's randomness: enough for jitter.
pub(super) struct Jitter(u64);

impl Jitter {
    pub(super) fn new() -> Self {
        let (hi, lo) = Uuid::new_v4().as_u64_pair();
        Self((hi ^ lo) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Full jitter: uniform in `[0, min(max, base * 2^(attempt-1))]`.
    pub(super) fn backoff(&mut self, config: &ClientConfig, attempt: u32) -> Duration {
        let ceiling = backoff_ceiling(config.base_backoff, config.max_backoff, attempt);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.next_u64() % nanos.saturating_add(1))
    }
}

fn backoff_ceiling(base: Duration, max: Duration, attempt: u32) -> Duration {
    let factor = 1u32
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        let ceilings: Vec<_> = (1..=8).map(|n| backoff_ceiling(base, max, n)).collect();
        assert_eq!(ceilings[0], Duration::from_millis(100));
        assert_eq!(ceilings[1], Duration::from_millis(200));
        assert_eq!(ceilings[4], Duration::from_millis(1600));
        assert_eq!(ceilings[6], max);
        assert_eq!(backoff_ceiling(base, max, 100), max);
    }

    #[test]
    fn jitter_stays_in_range_and_varies() {
        let config = ClientConfig::default();
        let mut j = Jitter::new();
        let delays: Vec<_> = (0..200).map(|_| j.backoff(&config, 3)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(400)));
        assert!(delays.iter().any(|d| *d < Duration::from_millis(200)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(200)));
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_delta_seconds(b"2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_delta_seconds(b" 0 "), Some(Duration::ZERO));
        assert_eq!(parse_delta_seconds(b"Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_delta_seconds(b"-1"), None);
        assert_eq!(parse_delta_seconds(b""), None);
    }

    #[test]
    fn verdicts() {
        let cap = Duration::from_secs(5);
        let mut h = HeaderMap::new();
        let v = |code: u16, h: &HeaderMap| match retry_after(
            StatusCode::from_u16(code).unwrap(),
            h,
            cap,
        ) {
            Verdict::Final => None,
            Verdict::Retry(after) => Some(after),
        };
        for code in [200, 201, 302, 400, 401, 403, 404, 410, 413, 422, 429, 501] {
            assert_eq!(v(code, &h), None, "{code}");
        }
        for code in [409, 500, 502, 503, 504] {
            assert_eq!(v(code, &h), Some(None), "{code}");
        }
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
        assert_eq!(v(409, &h), Some(Some(cap)));
        assert_eq!(
            v(429, &h),
            None,
            "a longer wait than the cap is the caller's call"
        );
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(v(429, &h), Some(Some(Duration::from_secs(2))));
        assert_eq!(v(503, &h), Some(Some(Duration::from_secs(2))));
    }
}
