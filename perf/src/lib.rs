//! Shared pieces of the HTTP benchmark tools: the request body both sides
//! agree on, a tiny `--flag value` parser, and latency percentiles.
//!
//! The binaries are `loadgen` (an HTTP/1.1 keep-alive load generator) and
//! `bench-server` (the order service under test); `run-http.sh` drives both.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

/// A JSON order of exactly `size` bytes (or the smallest valid one, if
/// `size` is smaller): `{"item":"book","qty":1,"pad":"xxx…"}`.
///
/// The load generator sends it and `bench-server --preload` records it, so
/// a preloaded record's fingerprint matches the load generator's requests.
pub fn order_body(size: usize) -> Bytes {
    const HEAD: &str = r#"{"item":"book","qty":1,"pad":""#;
    const TAIL: &str = r#""}"#;
    let pad = size.saturating_sub(HEAD.len() + TAIL.len());
    let mut s = String::with_capacity(HEAD.len() + pad + TAIL.len());
    s.push_str(HEAD);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str(TAIL);
    Bytes::from(s)
}

/// The key `bench-server --preload` records for its `i`-th request, and
/// that `loadgen --keys preloaded` replays.
pub fn preload_key(i: u64) -> String {
    format!("pre-{i}")
}

/// A command-line error.
#[derive(Debug)]
pub struct ArgError(pub String);

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ArgError {}

/// `--name value` and `--name=value` pairs, parsed by hand.
#[derive(Debug, Default)]
pub struct Args {
    values: BTreeMap<String, String>,
}

impl Args {
    /// Parses the process arguments (without the program name). Every flag
    /// takes a value; anything else is an error.
    pub fn from_env() -> Result<Self, ArgError> {
        Self::parse(std::env::args().skip(1))
    }

    /// Parses `args`.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Self, ArgError> {
        let mut values = BTreeMap::new();
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let Some(flag) = arg.strip_prefix("--") else {
                return Err(ArgError(format!("unexpected argument `{arg}`")));
            };
            let (name, value) = match flag.split_once('=') {
                Some((n, v)) => (n.to_owned(), v.to_owned()),
                None => {
                    let v = it
                        .next()
                        .ok_or_else(|| ArgError(format!("`--{flag}` needs a value")))?;
                    (flag.to_owned(), v)
                }
            };
            values.insert(name, value);
        }
        Ok(Self { values })
    }

    /// The value of `--name` parsed as `T`, or `default`.
    pub fn get<T>(&mut self, name: &str, default: T) -> Result<T, ArgError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        match self.values.remove(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|e| ArgError(format!("--{name} {v}: {e}"))),
        }
    }

    /// The raw value of `--name`, or `default`.
    pub fn string(&mut self, name: &str, default: &str) -> String {
        self.values
            .remove(name)
            .unwrap_or_else(|| default.to_owned())
    }

    /// Fails on any flag not consumed by [`get`](Self::get) or
    /// [`string`](Self::string).
    pub fn finish(self) -> Result<(), ArgError> {
        match self.values.keys().next() {
            None => Ok(()),
            Some(k) => Err(ArgError(format!("unknown flag `--{k}`"))),
        }
    }
}

/// Latency percentiles over microsecond samples.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50: u32,
    /// 90th percentile.
    pub p90: u32,
    /// 99th percentile.
    pub p99: u32,
    /// 99.9th percentile.
    pub p999: u32,
    /// Largest sample.
    pub max: u32,
    /// Arithmetic mean.
    pub mean: f64,
}

impl Percentiles {
    /// Sorts `samples` and reads the percentiles off it (nearest rank).
    pub fn of(samples: &mut [u32]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let rank = |q: f64| {
            let n = samples.len();
            // Nearest rank: the smallest sample with at least q of them at
            // or below it.
            let idx = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
            samples[idx]
        };
        let sum: u64 = samples.iter().map(|&s| u64::from(s)).sum();
        Self {
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            p999: rank(0.999),
            max: samples[samples.len() - 1],
            mean: sum as f64 / samples.len() as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_asked_size_and_parses() {
        for size in [0, 10, 64, 1024, 4096] {
            let body = order_body(size);
            assert!(body.len() >= size.min(body.len()));
            if size >= 40 {
                assert_eq!(body.len(), size);
            }
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["item"], "book");
        }
    }

    #[test]
    fn args_parse_both_forms() {
        let mut a = Args::parse(
            ["--connections", "8", "--keys=repeat"]
                .into_iter()
                .map(String::from),
        )
        .unwrap();
        assert_eq!(a.get("connections", 64u32).unwrap(), 8);
        assert_eq!(a.string("keys", "unique"), "repeat");
        assert_eq!(a.get("duration", 10u64).unwrap(), 10);
        a.finish().unwrap();
        assert!(Args::parse(["--x".to_owned()]).is_err());
        let a = Args::parse(["--nope", "1"].into_iter().map(String::from)).unwrap();
        assert!(a.finish().is_err());
    }

    #[test]
    fn percentiles_nearest_rank() {
        let mut s: Vec<u32> = (1..=100).rev().collect();
        let p = Percentiles::of(&mut s);
        assert_eq!((p.p50, p.p90, p.p99, p.max), (50, 90, 99, 100));
        assert!((p.mean - 50.5).abs() < 1e-9);
        assert_eq!(Percentiles::of(&mut []), Percentiles::default());
    }
}
