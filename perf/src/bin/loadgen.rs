//! An HTTP/1.1 load generator: N keep-alive connections (one per worker),
//! a warm-up, then a fixed measured duration; it stops by itself.
//!
//! ```text
//! loadgen --url http://127.0.0.1:3000/orders --connections 64 --duration 10 \
//!         --keys unique|repeat|storm|preloaded|none --body-bytes 1024 --method POST
//! ```
//!
//! Key scenarios:
//! - `unique`: a fresh key per request (every request is a first execution);
//! - `repeat`: each connection first records `--repeat-keys` keys, then
//!   cycles through them (every measured request is a replay);
//! - `storm`: every connection sends the same key, which changes every
//!   `--storm-ms` (100) milliseconds: one execution, then 409s and replays;
//! - `preloaded`: keys `pre-0` .. `pre-{N-1}` (`--key-space N`) chosen at
//!   random, replaying what `bench-server --preload N` recorded;
//! - `none`: no key header.
//!
//! Only loopback targets are accepted. Prints one JSON line, then one human
//! line.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Empty, Full};
use hyper::Request;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tower_idempotency_perf::{Args, Percentiles, order_body, preload_key};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Keys {
    Unique,
    Repeat,
    Storm,
    Preloaded,
    None,
}

impl std::str::FromStr for Keys {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "unique" => Self::Unique,
            "repeat" => Self::Repeat,
            "storm" => Self::Storm,
            "preloaded" => Self::Preloaded,
            "none" => Self::None,
            _ => return Err(format!("unknown key scenario `{s}`")),
        })
    }
}

impl Keys {
    fn name(self) -> &'static str {
        match self {
            Self::Unique => "unique",
            Self::Repeat => "repeat",
            Self::Storm => "storm",
            Self::Preloaded => "preloaded",
            Self::None => "none",
        }
    }
}

#[derive(Debug)]
struct Config {
    addr: SocketAddr,
    authority: String,
    path: String,
    method: hyper::Method,
    connections: usize,
    duration: Duration,
    warmup: Duration,
    keys: Keys,
    body: Bytes,
    repeat_keys: usize,
    storm_every: Duration,
    key_space: u64,
    run_id: String,
    timeout: Duration,
    threads: usize,
}

/// What one worker measured.
#[derive(Debug, Default)]
struct Tally {
    latencies_us: Vec<u32>,
    status: BTreeMap<u16, u64>,
    replayed: u64,
    errors: u64,
    warm_failures: u64,
}

type Sender = hyper::client::conn::http1::SendRequest<Either<Full<Bytes>, Empty<Bytes>>>;

fn parse_url(url: &str) -> Result<(SocketAddr, String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs are supported")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr: SocketAddr = if let Ok(a) = authority.parse() {
        a
    } else if let Some(port) = authority.strip_prefix("localhost:") {
        SocketAddr::new(
            IpAddr::from([127, 0, 0, 1]),
            port.parse().map_err(|e| format!("port: {e}"))?,
        )
    } else {
        return Err(format!(
            "`{authority}`: give a loopback IP and a port, e.g. 127.0.0.1:3000"
        ));
    };
    if !addr.ip().is_loopback() {
        return Err(format!("{addr} is not a loopback address; refusing"));
    }
    Ok((addr, authority.to_owned(), path.to_owned()))
}

fn config() -> Result<Config, Box<dyn std::error::Error>> {
    let mut args = Args::from_env()?;
    let url = args.string("url", "http://127.0.0.1:3000/orders");
    let (addr, authority, path) = parse_url(&url)?;
    let method: hyper::Method = args.string("method", "POST").parse()?;
    let connections: usize = args.get("connections", 64)?;
    let duration: f64 = args.get("duration", 10.0)?;
    let warmup: f64 = args.get("warmup", 2.0)?;
    let keys: Keys = args.get("keys", Keys::Unique)?;
    let body_bytes: usize = args.get("body-bytes", 1024)?;
    let repeat_keys: usize = args.get("repeat-keys", 8)?;
    let storm_ms: u64 = args.get("storm-ms", 100)?;
    let key_space: u64 = args.get("key-space", 0)?;
    let timeout: f64 = args.get("timeout", 5.0)?;
    let threads: usize = args.get("threads", 1)?;
    args.finish()?;
    if connections == 0 || repeat_keys == 0 || storm_ms == 0 {
        return Err("--connections, --repeat-keys and --storm-ms must be positive".into());
    }
    if !(duration > 0.0 && duration <= 3600.0 && (0.0..=600.0).contains(&warmup)) {
        return Err("--duration must be in (0, 3600] s and --warmup in [0, 600] s".into());
    }
    if keys == Keys::Preloaded && key_space == 0 {
        return Err("--keys preloaded needs --key-space N (the server's --preload)".into());
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let body = if method == hyper::Method::GET || method == hyper::Method::HEAD {
        Bytes::new()
    } else {
        order_body(body_bytes)
    };
    Ok(Config {
        addr,
        authority,
        path,
        method,
        connections,
        duration: Duration::from_secs_f64(duration),
        warmup: Duration::from_secs_f64(warmup),
        keys,
        body,
        repeat_keys,
        storm_every: Duration::from_millis(storm_ms),
        key_space,
        run_id: format!("{:x}", nanos & 0xffff_ffff_ffff),
        timeout: Duration::from_secs_f64(timeout.max(0.001)),
        threads: threads.max(1),
    })
}

async fn connect(cfg: &Config) -> Result<Sender, Box<dyn std::error::Error + Send + Sync>> {
    let stream = TcpStream::connect(cfg.addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // The connection ends when the sender is dropped or the server
        // closes it; the worker sees the error on its next request.
        let _ = conn.await;
    });
    Ok(sender)
}

/// One request; `Ok((status, replayed))` once the whole body has arrived.
async fn send(
    cfg: &Config,
    sender: &mut Sender,
    key: Option<&str>,
) -> Result<(u16, bool), Box<dyn std::error::Error + Send + Sync>> {
    sender.ready().await?;
    let mut req = Request::builder()
        .method(cfg.method.clone())
        .uri(cfg.path.as_str())
        .header(HOST, cfg.authority.as_str());
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    let req = if cfg.body.is_empty() {
        req.body(Either::Right(Empty::new()))?
    } else {
        req.header(CONTENT_TYPE, "application/json")
            .body(Either::Left(Full::new(cfg.body.clone())))?
    };
    let res = sender.send_request(req).await?;
    let status = res.status().as_u16();
    let replayed = res
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v.as_bytes() == b"true");
    res.into_body().collect().await?;
    Ok((status, replayed))
}

/// One request on the worker's connection, opening it first if needed.
/// `None` on any failure or time-out, after dropping the connection (the
/// next attempt reconnects).
async fn attempt(
    cfg: &Config,
    sender: &mut Option<Sender>,
    key: Option<&str>,
    deadline: Instant,
) -> Option<(u16, bool)> {
    let mut s = match sender.take() {
        Some(s) => s,
        None => timeout_at(deadline, connect(cfg)).await.ok()?.ok()?,
    };
    let result = timeout_at(deadline, send(cfg, &mut s, key))
        .await
        .ok()?
        .ok()?;
    *sender = Some(s);
    Some(result)
}

/// A small xorshift generator: keys for `preloaded`, no dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

async fn worker(cfg: Arc<Config>, id: usize, t0: Instant) -> Tally {
    let measure_from = t0 + cfg.warmup;
    let end = measure_from + cfg.duration;
    // Nothing runs past this, whatever the server does.
    let hard_end = end + cfg.timeout;
    let mut tally = Tally {
        latencies_us: Vec::with_capacity(1 << 14),
        ..Tally::default()
    };
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ ((id as u64 + 1) << 17));
    let mut sender: Option<Sender> = None;

    // `repeat`: record this connection's keys before the clock starts.
    let own_keys: Vec<String> = (0..cfg.repeat_keys)
        .map(|i| format!("r-{}-{id}-{i}", cfg.run_id))
        .collect();
    if cfg.keys == Keys::Repeat {
        for key in &own_keys {
            let deadline = (Instant::now() + cfg.timeout).min(hard_end);
            match attempt(&cfg, &mut sender, Some(key), deadline).await {
                Some((status, _)) if (200..300).contains(&status) => {}
                _ => tally.warm_failures += 1,
            }
        }
    }

    let mut seq: u64 = 0;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let key = match cfg.keys {
            Keys::Unique => Some(format!("u-{}-{id}-{seq}", cfg.run_id)),
            Keys::Repeat => Some(own_keys[seq as usize % own_keys.len()].clone()),
            Keys::Storm => {
                let epoch = (now - t0).as_nanos() / cfg.storm_every.as_nanos().max(1);
                Some(format!("s-{}-{epoch}", cfg.run_id))
            }
            Keys::Preloaded => Some(preload_key(rng.next() % cfg.key_space)),
            Keys::None => None,
        };
        seq += 1;
        if sender.is_none() {
            match timeout_at(hard_end, connect(&cfg)).await {
                Ok(Ok(s)) => sender = Some(s),
                _ => {
                    if now >= measure_from {
                        tally.errors += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let started = Instant::now();
        let deadline = (started + cfg.timeout).min(hard_end);
        let result = attempt(&cfg, &mut sender, key.as_deref(), deadline).await;
        let done = Instant::now();
        match result {
            Some((status, replayed)) => {
                if started >= measure_from && done <= end {
                    let us = (done - started).as_micros().min(u128::from(u32::MAX)) as u32;
                    tally.latencies_us.push(us);
                    *tally.status.entry(status).or_default() += 1;
                    tally.replayed += u64::from(replayed);
                }
            }
            None => {
                if started >= measure_from && started < end {
                    tally.errors += 1;
                }
            }
        }
    }
    tally
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cfg = match config() {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("loadgen: {e}");
            eprintln!(
                "usage: loadgen --url http://127.0.0.1:PORT/orders [--connections 64] \
                 [--duration 10] [--warmup 2] [--keys unique|repeat|storm|preloaded|none] \
                 [--body-bytes 1024] [--method POST] [--repeat-keys 8] [--storm-ms 100] \
                 [--key-space N] [--timeout 5] [--threads 1]"
            );
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.threads)
        .enable_all()
        .build()?;
    let tallies = rt.block_on(async {
        let t0 = Instant::now();
        let handles: Vec<_> = (0..cfg.connections)
            .map(|id| tokio::spawn(worker(cfg.clone(), id, t0)))
            .collect();
        let mut tallies = Vec::with_capacity(handles.len());
        for h in handles {
            match h.await {
                Ok(t) => tallies.push(t),
                Err(e) => eprintln!("loadgen: a worker failed: {e}"),
            }
        }
        tallies
    });
    // Connection tasks still parked on closed sockets end with the runtime.
    rt.shutdown_timeout(Duration::from_millis(100));

    let mut all: Vec<u32> = Vec::with_capacity(tallies.iter().map(|t| t.latencies_us.len()).sum());
    let mut status: BTreeMap<u16, u64> = BTreeMap::new();
    let (mut replayed, mut errors, mut warm_failures) = (0, 0, 0);
    for t in tallies {
        all.extend_from_slice(&t.latencies_us);
        for (s, n) in t.status {
            *status.entry(s).or_default() += n;
        }
        replayed += t.replayed;
        errors += t.errors;
        warm_failures += t.warm_failures;
    }
    let requests = all.len() as u64;
    let p = Percentiles::of(&mut all);
    let secs = cfg.duration.as_secs_f64();
    let rps = requests as f64 / secs;
    let json = serde_json::json!({
        "url": format!("http://{}{}", cfg.authority, cfg.path),
        "method": cfg.method.as_str(),
        "keys": cfg.keys.name(),
        "connections": cfg.connections,
        "duration_s": secs,
        "warmup_s": cfg.warmup.as_secs_f64(),
        "body_bytes": cfg.body.len(),
        "requests": requests,
        "rps": (rps * 10.0).round() / 10.0,
        "latency_us": {
            "p50": p.p50, "p90": p.p90, "p99": p.p99, "p999": p.p999,
            "max": p.max, "mean": (p.mean * 10.0).round() / 10.0,
        },
        "status": status.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
        "replayed": replayed,
        "errors": errors,
        "warm_failures": warm_failures,
        "loadgen_threads": cfg.threads,
    });
    println!("{json}");
    let statuses: Vec<String> = status.iter().map(|(s, n)| format!("{s}:{n}")).collect();
    println!(
        "{} {} keys={} c={} {:.0}s: {} req, {:.0} req/s, p50 {:.2} ms, p90 {:.2} ms, \
         p99 {:.2} ms, max {:.2} ms; status {}; replayed {}; errors {}",
        cfg.method,
        cfg.path,
        cfg.keys.name(),
        cfg.connections,
        secs,
        requests,
        rps,
        f64::from(p.p50) / 1000.0,
        f64::from(p.p90) / 1000.0,
        f64::from(p.p99) / 1000.0,
        f64::from(p.max) / 1000.0,
        statuses.join(" "),
        replayed,
        errors
    );
    Ok(())
}
