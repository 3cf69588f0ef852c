//! `RedisStore` on a Redis Cluster through a failover under load: two layer
//! instances, each on a store of its own, take a duplicate-heavy load
//! while one primary is SIGKILLed and its replica promoted.
//!
//! Every answer is a first execution or a replay (201), a conflict (409)
//! or a 503 problem, within the bound; service comes back without new
//! stores. With replica acknowledgement (the cluster default) no key runs
//! twice and every recorded key still replays afterwards; without it the
//! keys that ran twice are counted and printed, not asserted (a fast
//! loopback may lose none).
//!
//! Needs the local cluster of `scripts/redis-cluster.sh` (the test kills
//! one of its nodes, restarts it and waits until the cluster is healthy
//! again, also when an assertion fails); skipped when nothing answers,
//! unless `CI=true`.

#![cfg(all(feature = "redis", feature = "test-util"))]
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::{post_req, problem, send, store_key_hex};
use tower_idempotency::IdempotencyLayer;
use tower_idempotency::store::redis::{RedisStore, driver};

/// Concurrent clients during the load.
const CLIENTS: u64 = 10;
/// How long the load runs.
const LOAD: Duration = Duration::from_secs(6);
/// When the primary is killed, from the start of the load.
const KILL_AT: Duration = Duration::from_secs(1);
/// A new key joins the pool this often (and the oldest leaves it).
const NEW_KEY_EVERY_MS: u128 = 50;
/// How many keys the clients choose from at any moment.
const POOL: u64 = 8;
/// Each client's pause between two requests.
const PAUSE: Duration = Duration::from_millis(5);
/// How long the handler works.
const HANDLER_DELAY: Duration = Duration::from_millis(5);
/// Per request: `begin` and `complete`, each bounded by the store's 1 s
/// (below the layer's 2 s store timeout), plus room for a loaded machine.
const BOUND: Duration = Duration::from_millis(2500);
/// How long recovery (promotion, a slot map refresh) may take.
const RECOVERY: Duration = Duration::from_secs(20);

fn script() -> String {
    format!("{}/scripts/redis-cluster.sh", env!("CARGO_MANIFEST_DIR"))
}

/// Executions per idempotency key, across both instances.
type Runs = Arc<Mutex<HashMap<String, usize>>>;

async fn create(State(runs): State<Runs>, headers: HeaderMap) -> Response {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let n = {
        let mut runs = runs.lock().unwrap();
        let n = runs.entry(key.clone()).or_default();
        *n += 1;
        *n
    };
    tokio::time::sleep(HANDLER_DELAY).await;
    (
        StatusCode::CREATED,
        [("x-execution", n.to_string())],
        format!("created {key}"),
    )
        .into_response()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    First,
    Replay,
    Conflict,
    Unavailable,
}

#[derive(Debug)]
struct Outcome {
    key: String,
    kind: Kind,
    /// When the request was sent and answered, from the start of the load.
    sent: Duration,
    answered: Duration,
    latency: Duration,
}

/// One POST with `key` to `app`: its kind, checked, and its latency.
async fn request(app: &Router, key: &str) -> (Kind, Duration) {
    let req = post_req(Some(key))
        .body(Body::from(format!("{{\"key\":\"{key}\"}}")))
        .unwrap();
    let start = Instant::now();
    let (status, headers, body) = send(app, req).await;
    let latency = start.elapsed();
    let kind = match status {
        StatusCode::CREATED => {
            assert_eq!(body, format!("created {key}"), "{key}: the wrong body");
            match headers.get("idempotent-replayed") {
                Some(v) => {
                    assert_eq!(v, "true");
                    Kind::Replay
                }
                None => Kind::First,
            }
        }
        StatusCode::CONFLICT => {
            problem(status, &headers, &body);
            Kind::Conflict
        }
        StatusCode::SERVICE_UNAVAILABLE => {
            problem(status, &headers, &body);
            assert!(headers.contains_key("retry-after"), "{key}: no Retry-After");
            Kind::Unavailable
        }
        other => panic!("{key}: unexpected {other}: {body:?}"),
    };
    assert!(latency < BOUND, "{key}: {kind:?} took {latency:?}");
    (kind, latency)
}

/// Sends `key` until it is not a 409 or a 503, for at most `within`.
async fn settle(app: &Router, key: &str, within: Duration) -> Kind {
    let deadline = Instant::now() + within;
    loop {
        let (kind, _) = request(app, key).await;
        if matches!(kind, Kind::First | Kind::Replay) {
            return kind;
        }
        assert!(
            Instant::now() < deadline,
            "{key}: still {kind:?} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One node as `CLUSTER NODES` shows it.
#[derive(Clone, Debug)]
struct Node {
    id: String,
    addr: String,
    port: u16,
    primary: bool,
    failed: bool,
    /// The id of its primary (`-` for a primary).
    master: String,
    slots: Vec<(u16, u16)>,
}

impl Node {
    fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }
}

fn parse_nodes(text: &str) -> Vec<Node> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let addr = f[1].split(['@', ',']).next()?.to_owned();
            let port = addr.rsplit_once(':')?.1.parse().ok()?;
            let flags: Vec<&str> = f[2].split(',').collect();
            let slots = f[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|n| (n, n)),
                })
                .collect();
            Some(Node {
                id: f[0].to_owned(),
                addr,
                port,
                primary: flags.contains(&"master"),
                failed: flags.iter().any(|f| *f == "fail" || *f == "fail?"),
                master: f[3].to_owned(),
                slots,
            })
        })
        .collect()
}

/// One command to the node at `addr` (`host:port`), on a connection of its
/// own, bounded by a second. Blocking: for the guard's `Drop` and
/// `spawn_blocking`.
fn node_query<T: driver::FromRedisValue>(addr: &str, cmd: &driver::Cmd) -> Result<T, String> {
    cmd.query(&mut connect(addr)?)
        .map_err(|e| format!("{addr}: {e}"))
}

/// [`node_query`] for a pipeline.
fn node_pipe<T: driver::FromRedisValue>(addr: &str, pipe: &driver::Pipeline) -> Result<T, String> {
    pipe.query(&mut connect(addr)?)
        .map_err(|e| format!("{addr}: {e}"))
}

fn connect(addr: &str) -> Result<driver::Connection, String> {
    let bound = Duration::from_secs(1);
    let fail = |e: driver::RedisError| format!("{addr}: {e}");
    let conn = driver::Client::open(format!("redis://{addr}"))
        .map_err(fail)?
        .get_connection_with_timeout(bound)
        .map_err(fail)?;
    conn.set_read_timeout(Some(bound)).map_err(fail)?;
    conn.set_write_timeout(Some(bound)).map_err(fail)?;
    Ok(conn)
}

fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines().find_map(|l| {
        l.trim()
            .strip_prefix(&format!("{field}:"))
            .map(str::to_owned)
    })
}

/// `CLUSTER NODES` from the first of `addrs` that answers.
fn cluster_nodes(addrs: &[String]) -> Result<Vec<Node>, String> {
    let mut last = String::from("no node address");
    for addr in addrs {
        let mut cmd = driver::cmd("CLUSTER");
        cmd.arg("NODES");
        match node_query::<String>(addr, &cmd) {
            Ok(text) => return Ok(parse_nodes(&text)),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn cluster_state(addr: &str) -> Option<String> {
    let mut cmd = driver::cmd("CLUSTER");
    cmd.arg("INFO");
    let info: String = node_query(addr, &cmd).ok()?;
    info_field(&info, "cluster_state")
}

fn role(addr: &str) -> Option<String> {
    let mut cmd = driver::cmd("INFO");
    cmd.arg("replication");
    let info: String = node_query(addr, &cmd).ok()?;
    info_field(&info, "role")
}

fn script_ok(args: &[&str]) -> Result<String, String> {
    let out = Command::new("bash")
        .arg(script())
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "redis-cluster.sh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Waits until `redis-cluster.sh status` says the cluster is healthy.
fn wait_healthy(within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        match script_ok(&["status"]) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Starts the killed node on `port` again, once its replica (`replica`)
/// has taken over, and waits until the node replicates its new primary
/// (`role:slave`, `master_link_status:up`) and the whole cluster is
/// healthy. A node restarted before the takeover would come back as the
/// primary of its slots with whatever its last `dump.rdb` held (a stale
/// snapshot from a full sync, or nothing), losing writes.
fn restore(port: u16, replica: &str) -> Result<Duration, String> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(20);
    while role(replica).as_deref() != Some("master") {
        if Instant::now() >= deadline {
            return Err(format!("{replica} not promoted within 20 s"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    script_ok(&["restart-node", &port.to_string()])?;
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut cmd = driver::cmd("INFO");
        cmd.arg("replication");
        let info: String = node_query(&addr, &cmd).unwrap_or_default();
        let replica = info_field(&info, "role").as_deref() == Some("slave")
            && info_field(&info, "master_link_status").as_deref() == Some("up");
        if replica && script_ok(&["status"]).is_ok() {
            return Ok(start.elapsed());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "node {port} not a healthy replica within 20 s of its restart: {}",
                script_ok(&["status"]).err().unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Deletes every key under `prefix` on every primary (a SCAN sees only
/// its own node's keys). Returns how many were deleted.
fn delete_prefix(addrs: &[String], prefix: &str) -> Result<usize, String> {
    let mut deleted = 0;
    for node in cluster_nodes(addrs)? {
        if !node.primary || node.failed {
            continue;
        }
        let mut cursor = 0u64;
        loop {
            let mut cmd = driver::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(1000);
            let (next, keys): (u64, Vec<String>) = node_query(&node.addr, &cmd)?;
            if !keys.is_empty() {
                // One DEL per key: a node refuses a DEL across slots.
                let mut pipe = driver::pipe();
                for key in &keys {
                    pipe.cmd("DEL").arg(key);
                }
                let n: Vec<usize> = node_pipe(&node.addr, &pipe)?;
                deleted += n.iter().sum::<usize>();
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(deleted)
}

/// Restarts the killed node (if it was killed and not restarted yet) and
/// deletes the scenario's keys, when the scenario ends, passed or failed.
struct Cleanup {
    addrs: Vec<String>,
    prefix: String,
    /// The killed node's port and its replica's address.
    killed: Option<(u16, String)>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some((port, replica)) = self.killed.take()
            && let Err(e) = restore(port, &replica)
        {
            eprintln!("[failover] restoring node {port} failed: {e}");
        }
        match delete_prefix(&self.addrs, &self.prefix) {
            Ok(n) => eprintln!("[failover] deleted {n} keys under {}", self.prefix),
            Err(e) => eprintln!("[failover] deleting keys under {} failed: {e}", self.prefix),
        }
    }
}

/// Redis Cluster's key slot: CRC16 (XMODEM) of the hash tag, mod 16384.
fn slot(tag: &str) -> u16 {
    let mut crc = 0u16;
    for &b in tag.as_bytes() {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// The slot of idempotency key `key`'s record (its store key is the tag).
fn key_slot(key: &str) -> u16 {
    slot(&store_key_hex(key))
}

/// What the monitor saw after the kill, from the kill.
#[derive(Debug, Default)]
struct Failover {
    promoted: Option<Duration>,
    ok: Option<Duration>,
}

/// Polls, from the kill, until the replica says it is a primary and then
/// every surviving node says `cluster_state:ok`.
fn monitor(replica: String, survivors: Vec<String>, within: Duration) -> Failover {
    let start = Instant::now();
    let mut seen = Failover::default();
    while start.elapsed() < within {
        if seen.promoted.is_none() && role(&replica).as_deref() == Some("master") {
            seen.promoted = Some(start.elapsed());
        }
        if seen.promoted.is_some()
            && survivors
                .iter()
                .all(|a| cluster_state(a).as_deref() == Some("ok"))
        {
            seen.ok = Some(start.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    seen
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_under_load_with_and_without_replica_ack() {
    let Some(urls) = common::cluster_backend() else {
        return;
    };
    let addrs: Vec<String> = urls
        .iter()
        .map(|u| {
            u.trim_start_matches("redis://")
                .trim_end_matches('/')
                .to_owned()
        })
        .collect();
    // Both scenarios kill a node of the script's cluster: skip (or fail,
    // under CI) if the script does not manage this one.
    let managed = tokio::task::spawn_blocking(|| wait_healthy(Duration::from_secs(30)))
        .await
        .unwrap();
    if let Err(e) = managed {
        assert!(!common::in_ci(), "the cluster is not healthy: {e}");
        eprintln!("[failover] SKIPPED: not the healthy local cluster of redis-cluster.sh: {e}");
        return;
    }
    scenario(&urls, &addrs, 1).await;
    scenario(&urls, &addrs, 0).await;
}

/// One run: load, kill, recovery, restart, replays, with `ack` replicas
/// acknowledging each write (`0`: off). Prints its summary line.
async fn scenario(urls: &[String], addrs: &[String], ack: u32) {
    let prefix = format!("test:failover:{}:", uuid::Uuid::new_v4().simple());
    let mut cleanup = Cleanup {
        addrs: addrs.to_vec(),
        prefix: prefix.clone(),
        killed: None,
    };
    tokio::task::spawn_blocking(move || wait_healthy(Duration::from_secs(30)))
        .await
        .unwrap()
        .unwrap();

    // The victim: the primary on the lowest port, and its replica.
    let seeds = addrs.to_vec();
    let nodes = tokio::task::spawn_blocking(move || cluster_nodes(&seeds))
        .await
        .unwrap()
        .unwrap();
    let victim = nodes
        .iter()
        .filter(|n| n.primary && !n.slots.is_empty())
        .min_by_key(|n| n.port)
        .unwrap()
        .clone();
    let replica = nodes
        .iter()
        .find(|n| !n.primary && n.master == victim.id)
        .unwrap()
        .clone();
    let survivors: Vec<String> = nodes
        .iter()
        .filter(|n| n.id != victim.id)
        .map(|n| n.addr.clone())
        .collect();
    {
        // The slot function agrees with the server.
        let tag = store_key_hex("probe");
        let mut cmd = driver::cmd("CLUSTER");
        cmd.arg("KEYSLOT").arg(format!("{prefix}{{{tag}}}"));
        let addr = replica.addr.clone();
        let server: u16 = tokio::task::spawn_blocking(move || node_query(&addr, &cmd))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(server, slot(&tag));
    }
    let on_victim = |key: &str| victim.owns(key_slot(key));
    let pid = script_ok(&["pid", &victim.port.to_string()]).unwrap();

    let mut stores = Vec::new();
    for _ in 0..2 {
        let store = RedisStore::from_cluster_urls(urls)
            .await
            .unwrap()
            .with_prefix(prefix.clone());
        assert_eq!(store.replica_ack(), 1, "on by default for a cluster");
        stores.push(store.with_replica_ack(ack));
    }
    let runs = Runs::default();
    let apps: [Router; 2] = [0, 1].map(|i| {
        Router::new()
            .route("/orders", post(create))
            .with_state(runs.clone())
            .layer(IdempotencyLayer::new(stores[i].clone()))
    });

    // The load. Dropping the set (a failed assertion) stops the clients
    // before `cleanup` restores the node and deletes the keys.
    let start = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let apps = apps.clone();
        clients.spawn(async move {
            let mut rng = (c + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut outcomes = Vec::new();
            let mut n = c;
            while start.elapsed() < LOAD {
                let base = (start.elapsed().as_millis() / NEW_KEY_EVERY_MS) as u64;
                let key = format!("k{}", base + xorshift(&mut rng) % POOL);
                let sent = start.elapsed();
                let (kind, latency) = request(&apps[(n % 2) as usize], &key).await;
                outcomes.push(Outcome {
                    key,
                    kind,
                    sent,
                    answered: start.elapsed(),
                    latency,
                });
                n += 1;
                tokio::time::sleep(PAUSE).await;
            }
            outcomes
        });
    }

    tokio::time::sleep_until((start + KILL_AT).into()).await;
    let killed = tokio::process::Command::new("kill")
        .args(["-9", &pid])
        .status()
        .await
        .unwrap();
    let kill_at = start.elapsed();
    cleanup.killed = Some((victim.port, replica.addr.clone()));
    assert!(killed.success(), "kill -9 {pid} failed");
    let watch = {
        let (replica, survivors) = (replica.addr.clone(), survivors.clone());
        tokio::task::spawn_blocking(move || monitor(replica, survivors, RECOVERY))
    };

    let mut outcomes = Vec::new();
    while let Some(client) = clients.join_next().await {
        outcomes.extend(client.unwrap());
    }
    let failover = watch.await.unwrap();
    let ok_at = kill_at
        + failover
            .ok
            .expect("the cluster did not recover within 20 s");

    // Service comes back without new stores, on both instances.
    let mut n = 0;
    let mut recovered = 0;
    while recovered < 12 {
        let key = format!("after-{n}");
        n += 1;
        // With acknowledgement, the promoted primary has no replica until
        // the killed node is back: its keys answer 503 (below).
        if ack > 0 && on_victim(&key) {
            continue;
        }
        assert_eq!(settle(&apps[n % 2], &key, RECOVERY).await, Kind::First);
        recovered += 1;
    }
    let recovered_at = start.elapsed();
    let mut orphans = Vec::new();
    while ack > 0 && orphans.len() < 4 {
        let key = format!("orphan-{n}");
        n += 1;
        if on_victim(&key) {
            let (kind, _) = request(&apps[n % 2], &key).await;
            assert_eq!(kind, Kind::Unavailable, "{key}: no replica to acknowledge");
            orphans.push(key);
        }
    }

    let (port, promoted) = (victim.port, replica.addr.clone());
    let restored = tokio::task::spawn_blocking(move || restore(port, &promoted))
        .await
        .unwrap();
    cleanup.killed = None;
    let restored = restored.unwrap();

    // After the restart, keys on every primary run on both instances.
    for (i, key) in orphans.iter().enumerate() {
        assert_eq!(
            settle(&apps[i % 2], key, RECOVERY).await,
            Kind::First,
            "{key}"
        );
    }
    let mut n = 0;
    let mut victim_keys = 0;
    while victim_keys < 4 {
        let key = format!("restored-{n}");
        if on_victim(&key) {
            victim_keys += 1;
        }
        assert_eq!(settle(&apps[n % 2], &key, RECOVERY).await, Kind::First);
        n += 1;
    }

    // The keys that never ran during the load: run now, or 409 while a
    // lock left behind by an unanswered `begin` lives out its lease.
    let ran: HashSet<&str> = outcomes
        .iter()
        .filter(|o| o.kind == Kind::First)
        .map(|o| o.key.as_str())
        .collect();
    let mut never_ran: Vec<&str> = outcomes
        .iter()
        .map(|o| o.key.as_str())
        .filter(|k| !ran.contains(k))
        .collect();
    never_ran.sort_unstable();
    never_ran.dedup();
    let mut still_locked = Vec::new();
    for (i, key) in never_ran.iter().enumerate() {
        if request(&apps[i % 2], key).await.0 != Kind::First {
            still_locked.push(*key);
        }
    }

    // Every key that ran during the load replays on both instances; a
    // record lost in the failover (without acknowledgement) runs again.
    let first: HashMap<&str, &Outcome> = outcomes
        .iter()
        .filter(|o| o.kind == Kind::First)
        .map(|o| (o.key.as_str(), o))
        .collect();
    let mut keys: Vec<&str> = first.keys().copied().collect();
    keys.sort_unstable();
    let mut rerun: HashSet<&str> = HashSet::new();
    for key in &keys {
        for app in &apps {
            if settle(app, key, Duration::from_secs(10)).await == Kind::First {
                rerun.insert(key);
            }
        }
    }
    let pre_kill: Vec<&str> = keys
        .iter()
        .copied()
        .filter(|k| first[k].answered < kill_at)
        .collect();
    let pre_kill_on_victim = pre_kill.iter().filter(|k| on_victim(k)).count();
    let pre_kill_rerun = pre_kill.iter().filter(|k| rerun.contains(*k)).count();

    // The summary.
    let count = |kind| outcomes.iter().filter(|o| o.kind == kind).count();
    let unavailable: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.kind == Kind::Unavailable)
        .collect();
    let window = match (
        unavailable.iter().map(|o| o.sent).min(),
        unavailable.iter().map(|o| o.answered).max(),
    ) {
        (Some(a), Some(b)) => format!(
            "{:.2}..{:.2} s after the kill",
            a.as_secs_f64() - kill_at.as_secs_f64(),
            b.as_secs_f64() - kill_at.as_secs_f64()
        ),
        _ => "none".to_owned(),
    };
    let late_503 = unavailable.iter().filter(|o| o.sent > ok_at).count();
    let late_503_on_victim = unavailable
        .iter()
        .filter(|o| o.sent > ok_at && on_victim(&o.key))
        .count();
    let longest = outcomes.iter().map(|o| o.latency).max().unwrap();
    let firsts_during = outcomes
        .iter()
        .filter(|o| o.kind == Kind::First && o.sent >= kill_at && o.answered <= ok_at)
        .count();
    let firsts_after = outcomes
        .iter()
        .filter(|o| o.kind == Kind::First && o.sent > ok_at)
        .count();
    let runs = runs.lock().unwrap().clone();
    let mut doubles: Vec<(&String, &usize)> = runs.iter().filter(|(_, n)| **n > 1).collect();
    doubles.sort();
    eprintln!(
        "[failover] replica_ack={ack}: killed primary :{} at {:.2} s (replica :{} promoted after {:.2} s, \
         cluster_state ok after {:.2} s); {} requests over {} keys: {} first executions \
         ({} before the kill, {firsts_during} during the failover, {firsts_after} after), {} replays, \
         {} 409s, {} 503s (window {window}; {late_503} sent after cluster_state ok, {late_503_on_victim} of \
         them on the killed primary's slots), longest latency {longest:?}; double executions {} {:?}; \
         pre-kill keys rerun {pre_kill_rerun}/{} ({pre_kill_on_victim} on the killed primary); \
         never-run keys not runnable after the restore {}/{}; \
         recovery probes passed {:.2} s after the kill (the load ended {:.2} s after it), \
         node restored in {:.2} s",
        victim.port,
        kill_at.as_secs_f64(),
        replica.port,
        failover.promoted.unwrap_or_default().as_secs_f64(),
        failover.ok.unwrap_or_default().as_secs_f64(),
        outcomes.len(),
        runs.len(),
        count(Kind::First),
        outcomes
            .iter()
            .filter(|o| o.kind == Kind::First && o.answered < kill_at)
            .count(),
        count(Kind::Replay),
        count(Kind::Conflict),
        count(Kind::Unavailable),
        doubles.len(),
        doubles,
        pre_kill.len(),
        still_locked.len(),
        never_ran.len(),
        (recovered_at - kill_at).as_secs_f64(),
        (LOAD - kill_at).as_secs_f64(),
        restored.as_secs_f64(),
    );

    assert!(longest < BOUND, "longest latency {longest:?}");
    assert!(count(Kind::First) > 0 && count(Kind::Replay) > 0);
    assert!(!pre_kill.is_empty(), "no key ran before the kill");
    if ack > 0 {
        assert!(
            doubles.is_empty(),
            "ran twice with replica ack: {doubles:?}"
        );
        assert!(rerun.is_empty(), "records lost with replica ack: {rerun:?}");
    }
}
