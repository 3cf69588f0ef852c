//! The message face on NATS JetStream, end to end: the `consumer` example
//! (a `TransactionalPostgresStore` consumer) driven from outside as child
//! processes, and the same example on the non-transactional stores
//! (`CONSUMER_STORE`).
//!
//! - A consumer SIGKILLed between the commit and the ack: the redelivery
//!   replays, one charge. SIGKILLed between the insert and the commit: the
//!   insert rolls back, the redelivery runs, one charge.
//! - A handler slower than `ack_wait`: the in-progress acks keep JetStream
//!   from redelivering it to the idle second consumer; SIGTERM finishes it,
//!   acks it, and exits 0.
//! - Two consumer processes, random delays, 10% handler errors, 5% crashes
//!   and restarts, republished duplicates, reused ids, malformed messages:
//!   every message charged exactly once, nothing pending.
//! - The same id published after JetStream's duplicate window: replayed.
//! - `MemoryStore`, `RedisStore` and `PostgresStore` under the same crash
//!   (after the effect, before the record): at least once, measured.
//!
//! The servers come from `NATS_URL` (default `nats://127.0.0.1:4222`, with
//! JetStream), `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`) and `REDIS_URL` (default
//! `redis://127.0.0.1:6379`, with feature `redis`). A server that does not
//! answer skips its tests, unless `CI=true`, where they fail.
//!
//! The tests share the stream `ORDERS`, the consumer `billing` and the
//! table `public.charges` (the example's contract fixes all three), so they
//! run one at a time and each starts by deleting the stream and dropping
//! the table.

#![cfg(all(feature = "postgres", feature = "test-util", feature = "json"))]
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, stream};
use sqlx::postgres::PgPoolOptions;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tower_idempotency::store::postgres::PgPool;

const STREAM: &str = "ORDERS";
const DURABLE: &str = "billing";
const SUBJECT: &str = "orders.new";

/// The tests share one stream, one consumer and one table.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------
// Servers

struct Env {
    js: jetstream::Context,
    pool: PgPool,
    nats_url: String,
    database_url: String,
    /// A prefix for this run's message ids: the records table outlives it.
    run: String,
}

/// Skips (outside CI) or fails (under `CI=true`) for a server that does
/// not answer.
fn unavailable(what: &str, url: &str, err: &dyn std::fmt::Display) {
    if common::in_ci() {
        panic!(
            "{what} at {url} does not answer ({err}), and CI=true: these tests may not be skipped"
        );
    }
    eprintln!("skipping: {what} at {url} does not answer: {err}");
}

async fn env() -> Option<Env> {
    let nats_url = common::backend(common::NATS)?;
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .connect(nats_url.as_str());
    let client = match tokio::time::timeout(Duration::from_secs(5), client).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => {
            unavailable("NATS", &nats_url, &e);
            return None;
        }
        Err(e) => {
            unavailable("NATS", &nats_url, &e);
            return None;
        }
    };
    let js = jetstream::new(client);
    // JetStream answers (the stream or "not found"), or nobody does.
    if let Err(e) = js.get_stream(STREAM).await
        && !matches!(e.kind(), GetStreamErrorKind::JetStream(_))
    {
        unavailable("JetStream", &nats_url, &e);
        return None;
    }
    let database_url = common::backend(common::POSTGRES)?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&database_url)
        .await;
    let pool = match pool {
        Ok(pool) => pool,
        Err(e) => {
            unavailable("PostgreSQL", &database_url, &e);
            return None;
        }
    };
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    Some(Env {
        js,
        pool,
        nats_url,
        database_url,
        run,
    })
}

/// No stream (and so no consumer), no `charges` table.
async fn reset(env: &Env) {
    let _ = env.js.delete_stream(STREAM).await;
    assert!(
        env.js.get_stream(STREAM).await.is_err(),
        "the stream {STREAM} could not be deleted"
    );
    sqlx::query("DROP TABLE IF EXISTS public.charges")
        .execute(&env.pool)
        .await
        .unwrap();
}

/// At a test's end: no stream, no `charges` table, and no records table
/// (the example's default, `public.idempotency_records`), so a run leaves
/// nothing behind.
async fn finish(env: &Env) {
    reset(env).await;
    sqlx::query("DROP TABLE IF EXISTS public.idempotency_records")
        .execute(&env.pool)
        .await
        .unwrap();
}

/// The stream as the example would create it, in memory, with this
/// duplicate window.
async fn create_stream(env: &Env, duplicate_window: Duration) -> stream::Stream {
    env.js
        .create_stream(stream::Config {
            name: STREAM.to_owned(),
            subjects: vec!["orders.>".to_owned()],
            storage: stream::StorageType::Memory,
            duplicate_window,
            ..Default::default()
        })
        .await
        .unwrap()
}

async fn create_consumer(env: &Env, ack_wait: Duration) {
    env.js
        .get_stream(STREAM)
        .await
        .unwrap()
        .create_consumer(pull::Config {
            durable_name: Some(DURABLE.to_owned()),
            ack_policy: AckPolicy::Explicit,
            ack_wait,
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn consumer_info(env: &Env) -> async_nats::jetstream::consumer::Info {
    env.js
        .get_stream(STREAM)
        .await
        .unwrap()
        .consumer_info(DURABLE)
        .await
        .unwrap()
}

/// Waits until the consumer has nothing pending and nothing unacked.
async fn wait_settled(env: &Env, within: Duration) -> async_nats::jetstream::consumer::Info {
    let deadline = Instant::now() + within;
    loop {
        let info = consumer_info(env).await;
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "the consumer did not settle within {within:?}: pending {}, ack pending {}",
            info.num_pending,
            info.num_ack_pending
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn order(id: &str, amount: i64) -> String {
    serde_json::json!({ "order_id": format!("o-{id}"), "amount": amount }).to_string()
}

/// Publishes `payload` with `id` as its `Nats-Msg-Id`, and waits for the
/// stream's ack.
async fn publish(env: &Env, id: Option<&str>, payload: &str) -> PublishAck {
    let mut headers = HeaderMap::new();
    if let Some(id) = id {
        headers.insert(NATS_MESSAGE_ID, id);
    }
    env.js
        .publish_with_headers(SUBJECT, headers, payload.to_owned().into())
        .await
        .unwrap()
        .await
        .unwrap()
}

/// Every charge row: msg_id → its amounts, one per row.
async fn charges(pool: &PgPool, table: &str) -> BTreeMap<String, Vec<i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT msg_id, amount FROM {table} ORDER BY msg_id"
    ))
    .fetch_all(pool)
    .await
    .unwrap();
    let mut by_id: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (id, amount) in rows {
        by_id.entry(id).or_default().push(amount);
    }
    by_id
}

async fn charges_of(env: &Env, id: &str) -> Vec<i64> {
    charges(&env.pool, "public.charges")
        .await
        .remove(id)
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Child processes and their output

/// One line a child printed on stdout.
#[derive(Clone, Debug)]
struct Line {
    proc: String,
    text: String,
}

impl Line {
    /// The first word: `ready`, `effect`, `outcome`, …
    fn kind(&self) -> &str {
        self.text.split_whitespace().next().unwrap_or("")
    }

    /// The message id: everything after ` id=`.
    fn id(&self) -> &str {
        self.text.split_once(" id=").map_or("", |(_, id)| id)
    }

    /// The value of `key=` among the words before the id.
    fn field(&self, key: &str) -> Option<&str> {
        let head = self.text.split_once(" id=").map_or(&*self.text, |(h, _)| h);
        head.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    }

    fn is(&self, kind: &str, id: &str) -> bool {
        self.kind() == kind && self.id() == id
    }

    fn is_outcome(&self, id: &str, result: &str, action: &str) -> bool {
        self.is("outcome", id)
            && self.field("result") == Some(result)
            && self.field("action") == Some(action)
    }
}

/// Every line the children of one test printed, in order.
#[derive(Clone, Default)]
struct Log(Arc<std::sync::Mutex<Vec<Line>>>);

impl Log {
    fn push(&self, proc: &str, text: String) {
        self.0.lock().unwrap().push(Line {
            proc: proc.to_owned(),
            text,
        });
    }

    fn lines(&self) -> Vec<Line> {
        self.0.lock().unwrap().clone()
    }

    fn count(&self, pred: impl Fn(&Line) -> bool) -> usize {
        self.0.lock().unwrap().iter().filter(|l| pred(l)).count()
    }

    /// Waits for the first line that satisfies `pred`; fails after
    /// `within`.
    async fn wait_for(&self, what: &str, within: Duration, pred: impl Fn(&Line) -> bool) -> Line {
        let deadline = Instant::now() + within;
        loop {
            if let Some(line) = self.0.lock().unwrap().iter().find(|l| pred(l)) {
                return line.clone();
            }
            if Instant::now() >= deadline {
                let tail: Vec<String> = self
                    .lines()
                    .iter()
                    .rev()
                    .take(30)
                    .rev()
                    .map(|l| format!("  [{}] {}", l.proc, l.text))
                    .collect();
                panic!(
                    "no {what} within {within:?}; the last lines:\n{}",
                    tail.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A child process, killed (SIGKILL) when dropped, whatever the path.
struct Proc {
    name: String,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn forward(
    name: String,
    out: impl AsyncRead + Unpin + Send + 'static,
    log: Option<Log>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(out).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match &log {
                Some(log) => {
                    eprintln!("[{name}] {line}");
                    log.push(&name, line);
                }
                None => eprintln!("[{name} stderr] {line}"),
            }
        }
    })
}

impl Proc {
    /// Starts `cmd`; its stdout lines go to `log`, its stderr to the test's
    /// (captured) output.
    fn spawn(name: &str, mut cmd: Command, log: &Log) -> Self {
        // Knobs of the environment the tests run in must not leak in.
        for (var, _) in std::env::vars() {
            if var.starts_with("CONSUMER_") {
                cmd.env_remove(var);
            }
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        forward(
            name.to_owned(),
            child.stdout.take().unwrap(),
            Some(log.clone()),
        );
        forward(name.to_owned(), child.stderr.take().unwrap(), None);
        Self {
            name: name.to_owned(),
            child,
        }
    }

    /// The `consumer` example with these knobs.
    async fn consumer(env: &Env, name: &str, knobs: &[(&str, &str)], log: &Log) -> Self {
        let mut cmd = Command::new(consumer_bin().await);
        cmd.env("NATS_URL", &env.nats_url)
            .env("DATABASE_URL", &env.database_url)
            .env("RUST_LOG", "warn");
        for (k, v) in knobs {
            cmd.env(k, v);
        }
        Self::spawn(name, cmd, log)
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("the child was already reaped")
    }

    /// SIGKILL, and wait for it to be gone.
    async fn sigkill(&mut self) {
        self.child.kill().await.unwrap();
    }

    /// SIGTERM, through the system's `kill`: std has no other way.
    async fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .await
            .unwrap();
        assert!(status.success(), "kill -TERM {} failed", self.pid());
    }

    async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!("{} did not exit within {within:?}", self.name),
        }
    }

    /// Whether it has exited (a crash), without waiting.
    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

/// Waits for `proc`'s `ready` line; fails if it exits first.
async fn ready(log: &Log, proc: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if log.count(|l| l.proc == proc.name && l.kind() == "ready") > 0 {
            return;
        }
        assert!(!proc.exited(), "{} exited before it was ready", proc.name);
        assert!(
            Instant::now() < deadline,
            "{} not ready within 30 s",
            proc.name
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `consumer` example, built with this test binary's features.
async fn consumer_bin() -> PathBuf {
    common::example_bin("consumer").await
}

// ---------------------------------------------------------------------------
// 1. Crashes around the commit

/// SIGKILL after the commit, before the ack: the redelivery, to a
/// restarted consumer, replays; one charge. SIGKILL after the insert,
/// before the commit: the insert rolls back and the redelivery runs; one
/// charge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_around_the_commit_charges_once() {
    let _serial = SERIAL.lock().await;
    let Some(env) = env().await else { return };
    reset(&env).await;
    let log = Log::default();

    // Commits, then pauses before the ack: killed there.
    let mut a = Proc::consumer(
        &env,
        "a",
        &[
            ("CONSUMER_ACK_WAIT_MS", "2000"),
            ("CONSUMER_PAUSE_BEFORE_ACK_MS", "60000"),
        ],
        &log,
    )
    .await;
    ready(&log, &mut a).await;
    let acked = format!("{}-commit-then-kill", env.run);
    publish(&env, Some(&acked), &order(&acked, 700)).await;
    log.wait_for("the commit", Duration::from_secs(15), |l| {
        l.is("committed", &acked)
    })
    .await;
    a.sigkill().await;
    assert_eq!(
        charges_of(&env, &acked).await,
        [700],
        "committed before the kill"
    );

    // Inserts, then pauses before the commit: killed there too.
    let mut b = Proc::consumer(
        &env,
        "b",
        &[("CONSUMER_PAUSE_BEFORE_COMMIT_MS", "60000")],
        &log,
    )
    .await;
    ready(&log, &mut b).await;
    let replay = log
        .wait_for("the replay", Duration::from_secs(15), |l| {
            l.is("outcome", &acked)
        })
        .await;
    assert!(
        replay.is_outcome(&acked, "replayed", "ack"),
        "the redelivery replays: {}",
        replay.text
    );
    assert_eq!(replay.field("delivered"), Some("2"));
    assert_eq!(charges_of(&env, &acked).await, [700], "not charged again");

    let rolled = format!("{}-insert-then-kill", env.run);
    publish(&env, Some(&rolled), &order(&rolled, 800)).await;
    log.wait_for("the insert", Duration::from_secs(15), |l| {
        l.is("effect", &rolled)
    })
    .await;
    b.sigkill().await;
    assert_eq!(charges_of(&env, &rolled).await, [0i64; 0], "rolled back");

    let mut c = Proc::consumer(&env, "c", &[], &log).await;
    ready(&log, &mut c).await;
    let ran = log
        .wait_for("the rerun", Duration::from_secs(15), |l| {
            l.is("outcome", &rolled)
        })
        .await;
    assert!(ran.is_outcome(&rolled, "ran", "ack"), "{}", ran.text);
    assert_eq!(ran.field("delivered"), Some("2"));
    assert_eq!(charges_of(&env, &rolled).await, [800]);
    assert_eq!(charges_of(&env, &acked).await, [700]);
    wait_settled(&env, Duration::from_secs(10)).await;

    c.sigterm().await;
    assert!(c.wait_exit(Duration::from_secs(10)).await.success());
    finish(&env).await;
}

// ---------------------------------------------------------------------------
// 2. A handler slower than ack_wait

/// ack_wait 1 s, a 3 s handler, a second consumer pulling all along: the
/// in-progress acks keep the message from being redelivered. SIGTERM in the
/// middle finishes it, acks it, and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_is_not_redelivered() {
    let _serial = SERIAL.lock().await;
    let Some(env) = env().await else { return };
    reset(&env).await;
    let log = Log::default();
    let knobs = [
        ("CONSUMER_ACK_WAIT_MS", "1000"),
        ("CONSUMER_DELAY_MS", "3000"),
    ];
    let mut a = Proc::consumer(&env, "a", &knobs, &log).await;
    ready(&log, &mut a).await;
    let mut b = Proc::consumer(&env, "b", &knobs, &log).await;
    ready(&log, &mut b).await;
    let mut procs = [a, b];

    let id = format!("{}-slow", env.run);
    let started = Instant::now();
    publish(&env, Some(&id), &order(&id, 42)).await;
    let beat = log
        .wait_for("an in-progress ack", Duration::from_secs(10), |l| {
            l.is("progress", &id)
        })
        .await;
    let (busy, idle) = if beat.proc == "a" { (0, 1) } else { (1, 0) };
    procs[busy].sigterm().await;

    let outcome = log
        .wait_for("the outcome", Duration::from_secs(15), |l| {
            l.is("outcome", &id)
        })
        .await;
    assert!(outcome.is_outcome(&id, "ran", "ack"), "{}", outcome.text);
    assert_eq!(outcome.proc, beat.proc);
    assert_eq!(outcome.field("delivered"), Some("1"));
    assert!(started.elapsed() >= Duration::from_secs(3));
    let status = procs[busy].wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "SIGTERM exits 0: {status}");
    assert_eq!(
        log.count(|l| l.proc == beat.proc && l.kind() == "stopped"),
        1
    );

    let beats = log.count(|l| l.is("progress", &id));
    let info = wait_settled(&env, Duration::from_secs(5)).await;
    eprintln!(
        "[heartbeat] ack_wait=1s handler=3s progress_acks={beats} deliveries={} redelivered={}",
        info.delivered.consumer_sequence, info.num_redelivered
    );
    assert!(
        beats >= 3,
        "an in-progress ack every third of ack_wait: {beats}"
    );
    assert_eq!(info.delivered.consumer_sequence, 1, "delivered once");
    assert_eq!(info.num_redelivered, 0);
    assert_eq!(log.count(|l| l.is("outcome", &id)), 1, "one outcome");
    assert_eq!(charges_of(&env, &id).await, [42]);

    procs[idle].sigterm().await;
    assert!(
        procs[idle]
            .wait_exit(Duration::from_secs(10))
            .await
            .success()
    );
    finish(&env).await;
}

// ---------------------------------------------------------------------------
// 3. Two consumers, errors, crashes, duplicates

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_with_errors_and_crashes_charge_each_message_once() {
    const MESSAGES: usize = 200;
    const REPUBLISHED: usize = 40;
    const WITHIN_WINDOW: usize = 10;
    const BOUND: Duration = Duration::from_secs(90);

    let _serial = SERIAL.lock().await;
    let Some(env) = env().await else { return };
    reset(&env).await;
    // A short duplicate window, so that republished ids reach the consumer.
    create_stream(&env, Duration::from_secs(1)).await;
    let log = Log::default();
    let knobs = [
        ("CONSUMER_ACK_WAIT_MS", "2000"),
        ("CONSUMER_DELAY_JITTER_MS", "20"),
        ("CONSUMER_FAIL_PERCENT", "10"),
        ("CONSUMER_CRASH_PERCENT", "5"),
    ];
    let started = Instant::now();
    let mut generation = 0;
    let mut spawn = async |slot: usize| {
        generation += 1;
        let name = format!("c{slot}.{generation}");
        Proc::consumer(&env, &name, &knobs, &log).await
    };
    let mut procs = vec![spawn(1).await, spawn(2).await];
    ready(&log, &mut procs[0]).await;
    ready(&log, &mut procs[1]).await;

    let id = |i: usize| format!("{}-chaos-{i}", env.run);
    let amount = |i: usize| 1000 + i as i64;
    for i in 0..MESSAGES {
        let ack = publish(&env, Some(&id(i)), &order(&id(i), amount(i))).await;
        assert!(!ack.duplicate);
    }
    // Within the window, JetStream itself drops the duplicates.
    for i in 0..WITHIN_WINDOW {
        let ack = publish(&env, Some(&id(i)), &order(&id(i), amount(i))).await;
        assert!(
            ack.duplicate,
            "JetStream drops a duplicate within its window"
        );
    }
    tokio::time::sleep(Duration::from_millis(1300)).await;
    // Past it, they are new messages: the consumer must replay them.
    for i in 0..REPUBLISHED {
        let ack = publish(&env, Some(&id(i)), &order(&id(i), amount(i))).await;
        assert!(!ack.duplicate, "past the window, a duplicate is stored");
    }
    // Never processable: terminated, not charged.
    for i in 0..5 {
        let bad = format!("{}-malformed-{i}", env.run);
        publish(&env, Some(&bad), "{\"order_id\": 7").await;
        publish(&env, None, &order(&bad, 1)).await;
    }
    // Ids reused with another payload, once their first payload is charged
    // (and past the duplicate window): terminated.
    let reused: Vec<usize> = (MESSAGES - 5..MESSAGES).collect();
    let mut reused_published = false;
    let expected_stream_len = (MESSAGES + REPUBLISHED + 10 + reused.len()) as u64;

    let mut restarts = 0;
    let deadline = started + BOUND;
    loop {
        assert!(
            Instant::now() < deadline,
            "not settled within {BOUND:?}: {} charged, {:?}",
            charges(&env.pool, "public.charges").await.len(),
            consumer_info(&env).await
        );
        for (slot, proc) in procs.iter_mut().enumerate() {
            if proc.exited() {
                restarts += 1;
                assert!(restarts <= 100, "crashing in a loop");
                *proc = spawn(slot + 1).await;
            }
        }
        let charged = charges(&env.pool, "public.charges").await;
        if !reused_published && reused.iter().all(|&i| charged.contains_key(&id(i))) {
            for &i in &reused {
                let ack = publish(&env, Some(&id(i)), &order(&id(i), 1)).await;
                assert!(!ack.duplicate);
            }
            reused_published = true;
        }
        if reused_published && charged.len() >= MESSAGES {
            let info = consumer_info(&env).await;
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();

    let stream_info = env
        .js
        .get_stream(STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(stream_info.state.messages, expected_stream_len);
    let info = wait_settled(&env, Duration::from_secs(5)).await;
    let charged = charges(&env.pool, "public.charges").await;
    for i in 0..MESSAGES {
        assert_eq!(
            charged.get(&id(i)).map(Vec::as_slice),
            Some(&[amount(i)][..]),
            "{} charged exactly once, with its first payload",
            id(i)
        );
    }
    assert_eq!(charged.len(), MESSAGES, "nothing else charged: {charged:?}");
    for &i in &reused {
        assert!(
            log.count(|l| l.is_outcome(&id(i), "mismatch", "term")) >= 1,
            "{} reused with another payload is terminated",
            id(i)
        );
    }

    let outcomes =
        |result: &str| log.count(|l| l.kind() == "outcome" && l.field("result") == Some(result));
    let crashes = log.count(|l| l.kind() == "crash");
    let crash_points = ["before_effect", "after_effect", "after_commit"]
        .map(|p| {
            format!(
                "{p}={}",
                log.count(|l| l.kind() == "crash" && l.field("point") == Some(p))
            )
        })
        .join(" ");
    eprintln!(
        "[chaos] messages={MESSAGES} republished={REPUBLISHED} reused={} malformed=5 no_id=5 \
         consumers=2 crashes={crashes} ({crash_points}) restarts={restarts} handler_errors={} ran={} replayed={} in_flight={} \
         mismatch={} invalid={} deliveries={} seconds={:.1}",
        reused.len(),
        outcomes("error"),
        outcomes("ran"),
        outcomes("replayed"),
        outcomes("in_flight"),
        outcomes("mismatch"),
        outcomes("invalid"),
        info.delivered.consumer_sequence,
        elapsed.as_secs_f64()
    );
    assert!(
        outcomes("replayed") >= 1,
        "the republished duplicates replay"
    );
    // Asserted above, message by message; for comparison with the
    // non-transactional stores' lines.
    eprintln!("[tx] store=transactional-postgres crashes={crashes} duplicates=0");

    for proc in &procs {
        proc.sigterm().await;
    }
    for proc in &mut procs {
        let status = proc.wait_exit(Duration::from_secs(10)).await;
        assert!(
            status.success(),
            "{} exits 0 on SIGTERM: {status}",
            proc.name
        );
    }
    finish(&env).await;
}

// ---------------------------------------------------------------------------
// 4. Past JetStream's duplicate window

/// JetStream drops a duplicate `Nats-Msg-Id` only within its duplicate
/// window; past it the record replays. The example uses the stream as it
/// finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_republished_after_the_duplicate_window_is_replayed() {
    let _serial = SERIAL.lock().await;
    let Some(env) = env().await else { return };
    reset(&env).await;
    create_stream(&env, Duration::from_secs(1)).await;
    let log = Log::default();
    let mut p = Proc::consumer(&env, "a", &[], &log).await;
    ready(&log, &mut p).await;
    let info = env
        .js
        .get_stream(STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(
        info.config.duplicate_window,
        Duration::from_secs(1),
        "the example keeps an existing stream"
    );

    let id = format!("{}-window", env.run);
    let payload = order(&id, 1299);
    assert!(!publish(&env, Some(&id), &payload).await.duplicate);
    let first = log
        .wait_for("the first outcome", Duration::from_secs(10), |l| {
            l.is("outcome", &id)
        })
        .await;
    assert!(first.is_outcome(&id, "ran", "ack"), "{}", first.text);
    assert!(
        publish(&env, Some(&id), &payload).await.duplicate,
        "within the window JetStream drops it"
    );

    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(
        !publish(&env, Some(&id), &payload).await.duplicate,
        "past the window JetStream stores it again"
    );
    let second = log
        .wait_for("the replay", Duration::from_secs(10), |l| {
            l.is("outcome", &id) && !l.is_outcome(&id, "ran", "ack")
        })
        .await;
    assert!(second.is_outcome(&id, "replayed", "ack"), "{}", second.text);
    assert_eq!(
        second.field("delivered"),
        Some("1"),
        "a new message, not a redelivery"
    );

    // The same id with another payload, past the window again: terminated.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(!publish(&env, Some(&id), &order(&id, 1)).await.duplicate);
    let reused = log
        .wait_for("the mismatch", Duration::from_secs(10), |l| {
            l.is("outcome", &id) && l.field("result") == Some("mismatch")
        })
        .await;
    assert!(reused.is_outcome(&id, "mismatch", "term"));

    // No id, or a malformed payload: terminated.
    publish(&env, None, &order("anonymous", 5)).await;
    let malformed = format!("{}-malformed", env.run);
    publish(&env, Some(&malformed), "not json").await;
    log.wait_for("the anonymous message", Duration::from_secs(10), |l| {
        l.is_outcome("-", "invalid", "term")
    })
    .await;
    log.wait_for("the malformed message", Duration::from_secs(10), |l| {
        l.is_outcome(&malformed, "invalid", "term")
    })
    .await;

    let info = wait_settled(&env, Duration::from_secs(5)).await;
    assert_eq!(
        info.delivered.consumer_sequence, 5,
        "five deliveries, none again"
    );
    let charged = charges(&env.pool, "public.charges").await;
    assert_eq!(charged.len(), 1, "{charged:?}");
    assert_eq!(charged[&id], [1299], "charged once");

    p.sigterm().await;
    assert!(p.wait_exit(Duration::from_secs(10)).await.success());
    finish(&env).await;
}

// ---------------------------------------------------------------------------
// 5. Non-transactional stores under the same crash

/// How many times the example on each store is SIGKILLed after an effect.
const NONTX_CRASHES: usize = 5;
/// The consumer's ack_wait, and so the example's lease, in that test.
const NONTX_ACK_WAIT: Duration = Duration::from_secs(1);

/// With a store whose record is written apart from the side effect, a
/// crash after the effect and before the record leaves the lock (or, in
/// memory, nothing at all): once the lock's lease has run out, the
/// redelivery runs the handler again. The guarantee is at least once
/// between effect and record, never lost; this measures it, on the
/// `consumer` example with `CONSUMER_STORE` set to each such store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_transactional_stores_are_at_least_once_under_a_crash() {
    let _serial = SERIAL.lock().await;
    let Some(env) = env().await else { return };

    let mut stores = vec!["memory"];
    let redis_url = common::backend(common::REDIS).unwrap_or_else(|| common::REDIS.1.to_owned());
    #[cfg(feature = "redis")]
    match tower_idempotency::store::redis::RedisStore::from_url(&redis_url).await {
        Ok(_) => stores.push("redis"),
        Err(e) => unavailable("Redis", &redis_url, &e),
    }
    #[cfg(not(feature = "redis"))]
    eprintln!("[non-tx] store=redis skipped: feature `redis` is off");
    stores.push("postgres");

    for kind in stores {
        let (crashes, duplicates) = crash_the_example_on(&env, kind, &redis_url).await;
        eprintln!("[non-tx] store={kind} crashes={crashes} duplicates={duplicates}");
    }
    finish(&env).await;
    #[cfg(feature = "redis")]
    common::delete_prefix(&redis_url, "examples-consumer:").await;
}

/// Publishes `NONTX_CRASHES` messages to the example on store `kind`, kills
/// it after the effect and before the record of each of them (it pauses
/// there), then lets an unpaused one settle; returns the crashes and the
/// duplicate charges.
async fn crash_the_example_on(env: &Env, kind: &str, redis_url: &str) -> (usize, usize) {
    reset(env).await;
    create_stream(env, Duration::from_secs(120)).await;
    create_consumer(env, NONTX_ACK_WAIT).await;
    let ids: Vec<String> = (0..NONTX_CRASHES)
        .map(|i| format!("{}-{kind}-{i}", env.run))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        publish(env, Some(id), &order(id, i as i64 + 1)).await;
    }

    let log = Log::default();
    let mut generation = 0;
    let mut spawn = |paused: bool| {
        generation += 1;
        let name = format!("{kind}.{generation}");
        let pause = if paused { "60000" } else { "0" };
        let knobs = [
            ("CONSUMER_STORE", kind),
            ("CONSUMER_PAUSE_BEFORE_COMMIT_MS", pause),
            ("REDIS_URL", redis_url),
        ];
        let log = log.clone();
        async move { Proc::consumer(env, &name, &knobs, &log).await }
    };

    let mut worker = spawn(true).await;
    let mut crashes = 0;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        assert!(
            Instant::now() < deadline,
            "store {kind}: not settled; {:?}",
            charges(&env.pool, "public.charges").await
        );
        // A paused worker stops after an effect: kill it there, before its
        // record, until every message has had one such crash.
        let effect = log
            .lines()
            .into_iter()
            .any(|l| l.proc == worker.name && l.kind() == "effect");
        if crashes < NONTX_CRASHES && effect {
            worker.sigkill().await;
            crashes += 1;
            worker = spawn(crashes < NONTX_CRASHES).await;
            continue;
        }
        assert!(!worker.exited(), "the consumer {} died", worker.name);
        if crashes == NONTX_CRASHES {
            let charged = charges(&env.pool, "public.charges").await;
            let info = consumer_info(env).await;
            if ids.iter().all(|id| charged.contains_key(id))
                && info.num_pending == 0
                && info.num_ack_pending == 0
            {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(worker);

    let charged = charges(&env.pool, "public.charges").await;
    let lost = ids.iter().filter(|id| !charged.contains_key(*id)).count();
    assert_eq!(lost, 0, "store {kind}: a message was lost: {charged:?}");
    let rows: usize = ids.iter().map(|id| charged[id].len()).sum();
    #[cfg(feature = "redis")]
    if kind == "redis" {
        common::delete_prefix(redis_url, "examples-consumer:").await;
    }
    (crashes, rows - ids.len())
}
