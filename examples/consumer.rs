//! A billing consumer on NATS JetStream that charges each order exactly
//! once, however often JetStream delivers it: the charge row and the
//! idempotency record commit in one PostgreSQL transaction
//! (`TransactionalPostgresStore`), and every redelivery replays the record.
//!
//! Run it (NATS with JetStream and PostgreSQL on localhost):
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo run --example consumer --features postgres,json
//! ```
//!
//! # What it does
//!
//! - It uses the JetStream stream `ORDERS` (subjects `orders.>`) and its
//!   durable pull consumer `billing` (explicit ack) if they exist, and
//!   creates them if not. An existing stream or consumer is used as it is.
//! - Every message carries a `Nats-Msg-Id` header, the idempotency key, and
//!   a JSON payload `{"order_id": string, "amount": integer}`. The key is
//!   `MessageKey::new("billing", msg_id, payload)`: the same id with the same
//!   payload is the same message, the same id with another payload is an
//!   error.
//! - The side effect inserts one row into `charges (msg_id, order_id,
//!   amount, charged_at)` (created if missing) on the store's transaction:
//!   it commits together with the record, or rolls back with it. Then the
//!   message is acked. The records table is `idempotency_records`
//!   (`store.migrate()`).
//! - A message without `Nats-Msg-Id`, with a malformed payload, or reusing
//!   an id with another payload is terminated (`AckKind::Term`, never
//!   redelivered) and logged; it charges nothing.
//! - While the handler runs, the engine extends the lease every third of
//!   it and each extension sends JetStream an in-progress ack
//!   (`AckKind::Progress`). The lease is the consumer's `ack_wait`, so
//!   JetStream never redelivers a message that is still being worked on.
//! - What JetStream is told follows `Processed::disposition()`: `Ack` is
//!   acked (and the ack confirmed by the server), `Retry` (another delivery
//!   of the same id is in flight, the lease was lost, the commit failed, the
//!   store is down) and a handler error are negatively acked with a short
//!   delay, `Terminate` is terminated.
//! - SIGTERM or ctrl-c: it stops fetching, finishes the message in hand,
//!   acks it, and exits 0. Messages are fetched one at a time, so none
//!   waits unstarted in this process.
//!
//! # Environment
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `NATS_URL` | the NATS server | `nats://127.0.0.1:4222` |
//! | `DATABASE_URL` | the PostgreSQL database (required) | |
//! | `CONSUMER_DELAY_MS` | sleep this long before the side effect | 0 |
//! | `CONSUMER_ACK_WAIT_MS` | the consumer's `ack_wait`, when this process creates it | 30000 |
//! | `RUST_LOG` | log filter (logs go to stderr) | `info` |
//!
//! Test knobs, for fault injection; their defaults change nothing:
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `CONSUMER_DELAY_JITTER_MS` | add a random 0..=N ms to `CONSUMER_DELAY_MS` | 0 |
//! | `CONSUMER_FAIL_PERCENT` | this percentage of handler runs fail after the insert (rolled back, negatively acked) | 0 |
//! | `CONSUMER_CRASH_PERCENT` | this percentage of messages kill the process (SIGKILL) at a random point: `before_effect`, `after_effect` (inserted, not committed) or `after_commit` (committed, not acked) | 0 |
//! | `CONSUMER_PAUSE_BEFORE_COMMIT_MS` | sleep after the insert, before the handler returns (and the transaction commits) | 0 |
//! | `CONSUMER_PAUSE_BEFORE_ACK_MS` | sleep after the commit, before the ack | 0 |
//! | `CONSUMER_STORE` | `transactional`, or a store that records apart from the charge, to measure what it guarantees: `postgres` (`PostgresStore`), `redis` (`RedisStore` on `REDIS_URL`, feature `redis`) or `memory` | `transactional` |
//!
//! With any `CONSUMER_STORE` but `transactional`, the charge row commits on
//! its own, before the record is written: a crash between the two (a kill
//! during `CONSUMER_PAUSE_BEFORE_COMMIT_MS`) leaves a charge and no record,
//! and the redelivery charges again once the lock's lease has run out. That
//! is the "at least once between effect and record" of every store but the
//! transactional one.
//!
//! # Standard output
//!
//! One line per event, for scripts and tests; the message id comes last
//! and runs to the end of the line (`-` when the message has none):
//!
//! | line | when |
//! |---|---|
//! | `ready ack_wait_ms=N id=-` | connected, stream and consumer in place, about to fetch |
//! | `progress delivered=N id=ID` | an in-progress ack was sent while the handler runs |
//! | `effect delivered=N id=ID` | the charge row is inserted (not yet committed, unless `CONSUMER_STORE` is not `transactional`) |
//! | `committed delivered=N id=ID` | the charge and the record are committed, the ack not yet sent |
//! | `crash point=P id=ID` | a `CONSUMER_CRASH_PERCENT` crash, right before the SIGKILL |
//! | `outcome result=R action=A delivered=N id=ID` | JetStream has been told `A` (`ack`, `nak`, `term`) about the message; `R` is `Processed::as_str()` (`ran`, `replayed`, `in_flight`, `mismatch`, …), `invalid` (no id, malformed payload) or `error` (the handler failed) |
//! | `stopped id=-` | SIGTERM handled; the process exits 0 |
//!
//! Publish to it (any NATS client; the header is the key):
//!
//! ```text
//! nats pub orders.new '{"order_id":"o-1","amount":1299}' -H Nats-Msg-Id:order-1
//! ```

use std::error::Error;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::message::Acker;
use async_nats::jetstream::{self, AckKind, Message, stream};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use tower_idempotency::message::{
    Disposition, IdempotentConsumer, JsonCodec, MessageKey, Processed,
};
use tower_idempotency::store::Attachment;
use tower_idempotency::{
    MemoryStore,
    store::{
        Store,
        postgres::{IdempotentTransaction, PostgresStore, TransactionalPostgresStore},
    },
};

type BoxError = Box<dyn Error + Send + Sync>;

const STREAM: &str = "ORDERS";
const SUBJECTS: &str = "orders.>";
const DURABLE: &str = "billing";
/// The scope of the keys: another consumer of the same messages (shipping,
/// say) would use its own, and process each message once too.
const SCOPE: &str = "billing";
/// How long a message that could not be processed now waits before
/// JetStream delivers it again.
const RETRY_DELAY: Duration = Duration::from_millis(500);
/// How long one fetch waits for a message: also the longest a SIGTERM
/// waits while the consumer is idle.
const FETCH_WAIT: Duration = Duration::from_secs(1);

/// The message payload.
#[derive(Debug, Deserialize)]
struct Order {
    order_id: String,
    amount: i64,
}

/// The handler's output, recorded as JSON and handed back to every
/// redelivery.
#[derive(Debug, Serialize, Deserialize)]
struct Charge {
    order_id: String,
    amount: i64,
}

/// Where a `CONSUMER_CRASH_PERCENT` crash happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CrashPoint {
    BeforeEffect,
    AfterEffect,
    AfterCommit,
}

impl CrashPoint {
    fn as_str(self) -> &'static str {
        match self {
            Self::BeforeEffect => "before_effect",
            Self::AfterEffect => "after_effect",
            Self::AfterCommit => "after_commit",
        }
    }
}

/// The settings from the environment.
#[derive(Debug)]
struct Settings {
    nats_url: String,
    database_url: String,
    delay: Duration,
    ack_wait: Duration,
    jitter_ms: u64,
    fail_percent: u64,
    crash_percent: u64,
    pause_before_commit: Duration,
    pause_before_ack: Duration,
    store: StoreKind,
}

/// Where the records live (`CONSUMER_STORE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoreKind {
    Transactional,
    Postgres,
    Redis,
    Memory,
}

impl FromStr for StoreKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "transactional" => Ok(Self::Transactional),
            "postgres" => Ok(Self::Postgres),
            "redis" => Ok(Self::Redis),
            "memory" => Ok(Self::Memory),
            _ => Err("expected transactional, postgres, redis or memory".into()),
        }
    }
}

fn env_or<T: FromStr>(name: &str, default: T) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map_err(|e| format!("{name}={v:?} is not valid: {e}")),
        _ => Ok(default),
    }
}

fn millis(name: &str, default: u64) -> Result<Duration, String> {
    env_or(name, default).map(Duration::from_millis)
}

fn percent(name: &str) -> Result<u64, String> {
    let p: u64 = env_or(name, 0)?;
    if p > 100 {
        return Err(format!("{name}={p} is not a percentage"));
    }
    Ok(p)
}

impl Settings {
    fn from_env() -> Result<Self, String> {
        let database_url = match std::env::var("DATABASE_URL") {
            Ok(url) if !url.trim().is_empty() => url,
            _ => {
                return Err(
                    "DATABASE_URL is required: the PostgreSQL database for the charges and \
                     the idempotency records, e.g. postgres://postgres@127.0.0.1:5432/test"
                        .into(),
                );
            }
        };
        Ok(Self {
            nats_url: env_or("NATS_URL", "nats://127.0.0.1:4222".to_owned())?,
            database_url,
            delay: millis("CONSUMER_DELAY_MS", 0)?,
            ack_wait: millis("CONSUMER_ACK_WAIT_MS", 30_000)?,
            jitter_ms: env_or("CONSUMER_DELAY_JITTER_MS", 0)?,
            fail_percent: percent("CONSUMER_FAIL_PERCENT")?,
            crash_percent: percent("CONSUMER_CRASH_PERCENT")?,
            pause_before_commit: millis("CONSUMER_PAUSE_BEFORE_COMMIT_MS", 0)?,
            pause_before_ack: millis("CONSUMER_PAUSE_BEFORE_ACK_MS", 0)?,
            store: env_or("CONSUMER_STORE", StoreKind::Transactional)?,
        })
    }
}

/// A random number in `0..n` (0 for `n == 0`).
fn random_below(n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    (uuid::Uuid::new_v4().as_u128() % u128::from(n)) as u64
}

/// Whether an event of `percent` per cent happens this time.
fn roll(percent: u64) -> bool {
    percent > 0 && random_below(100) < percent
}

/// Kills this process with SIGKILL, as a crash would: no destructor, no
/// ack, no commit. Falls back on `abort` if `kill` cannot be run.
fn crash(point: CrashPoint, id: &str) -> ! {
    println!("crash point={} id={id}", point.as_str());
    tracing::warn!(id, point = point.as_str(), "injected crash");
    let pid = std::process::id().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status();
    std::process::abort()
}

/// Everything a message needs.
struct App {
    js: jetstream::Context,
    /// For the charges of a store that is not transactional.
    pool: sqlx::PgPool,
    consumer: IdempotentConsumer<JsonCodec>,
    settings: Settings,
}

impl App {
    /// Processes one message and tells JetStream what became of it.
    async fn handle(&self, msg: Message) {
        let delivered = msg.info().map(|i| i.delivered).unwrap_or(0);
        let id = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(NATS_MESSAGE_ID))
            .map(|v| v.as_str().trim().to_owned())
            .filter(|id| !id.is_empty());
        let parsed = match &id {
            None => Err("no Nats-Msg-Id header".to_owned()),
            Some(_) => serde_json::from_slice::<Order>(&msg.payload)
                .map_err(|e| format!("malformed payload: {e}")),
        };
        let order = match parsed {
            Ok(order) => order,
            Err(why) => {
                let id = id.as_deref().unwrap_or("-");
                tracing::warn!(id, subject = %msg.subject, why, "message terminated: it can never be processed");
                self.tell(&msg, Disposition::Terminate, "invalid", delivered, id)
                    .await;
                return;
            }
        };
        let id = id.unwrap_or_default();

        let crash_at = roll(self.settings.crash_percent).then(|| match random_below(3) {
            0 => CrashPoint::BeforeEffect,
            1 => CrashPoint::AfterEffect,
            _ => CrashPoint::AfterCommit,
        });
        let key = MessageKey::new(SCOPE, &id, &msg.payload)
            .with_heartbeat(self.heartbeat(&msg, &id, delivered));
        let run = Run {
            pool: self.pool.clone(),
            id: id.clone(),
            delivered,
            order,
            delay: self.delay(),
            pause_before_commit: self.settings.pause_before_commit,
            fail: roll(self.settings.fail_percent),
            crash_at,
        };
        let processed = self
            .consumer
            .process(key, move |attachment| run.charge(attachment))
            .await;

        match processed {
            Ok(processed) => {
                if let Processed::Ran(charge) = &processed {
                    println!("committed delivered={delivered} id={id}");
                    tracing::info!(id, order_id = %charge.order_id, amount = charge.amount, "charged");
                    if crash_at == Some(CrashPoint::AfterCommit) {
                        crash(CrashPoint::AfterCommit, &id);
                    }
                    if !self.settings.pause_before_ack.is_zero() {
                        tokio::time::sleep(self.settings.pause_before_ack).await;
                    }
                }
                match &processed {
                    Processed::Ran(_) => {}
                    Processed::Replayed(charge) => {
                        tracing::info!(id, order_id = %charge.order_id, amount = charge.amount, "redelivery: charged before, not again");
                    }
                    Processed::Mismatch => {
                        tracing::warn!(
                            id,
                            "message id reused with another payload: terminated, not charged"
                        );
                    }
                    other if other.disposition() == Disposition::Retry => {
                        tracing::info!(id, outcome = other.as_str(), "not done now; retried later");
                    }
                    other => tracing::info!(id, outcome = other.as_str()),
                }
                self.tell(
                    &msg,
                    processed.disposition(),
                    processed.as_str(),
                    delivered,
                    &id,
                )
                .await;
            }
            Err(e) => {
                tracing::warn!(id, error = %e, "charge failed and rolled back; retried later");
                self.tell(&msg, Disposition::Retry, "error", delivered, &id)
                    .await;
            }
        }
    }

    /// The in-progress ack sent each time the engine extends the lease.
    fn heartbeat(
        &self,
        msg: &Message,
        id: &str,
        delivered: i64,
    ) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync + 'static
    {
        let js = self.js.clone();
        let reply = msg.reply.clone();
        let id: Arc<str> = id.into();
        move || {
            let acker = Acker::new(js.clone(), reply.clone());
            let id = id.clone();
            Box::pin(async move {
                match acker.ack_with(AckKind::Progress).await {
                    Ok(()) => println!("progress delivered={delivered} id={id}"),
                    Err(e) => tracing::warn!(id = %id, error = %e, "in-progress ack failed"),
                }
            })
        }
    }

    fn delay(&self) -> Duration {
        self.settings.delay + Duration::from_millis(random_below(self.settings.jitter_ms + 1))
    }

    /// Acks, negatively acks or terminates `msg`, then prints its outcome.
    async fn tell(
        &self,
        msg: &Message,
        disposition: Disposition,
        result: &str,
        delivered: i64,
        id: &str,
    ) {
        let (action, told) = match disposition {
            // Confirmed by the server: once it answers, the message will
            // not come back.
            Disposition::Ack => ("ack", msg.double_ack().await),
            Disposition::Terminate => ("term", msg.ack_with(AckKind::Term).await),
            _ => ("nak", msg.ack_with(AckKind::Nak(Some(RETRY_DELAY))).await),
        };
        let told = match told {
            Ok(()) => self.js.client().flush().await.map_err(BoxError::from),
            Err(e) => Err(e),
        };
        match told {
            Ok(()) => {
                println!("outcome result={result} action={action} delivered={delivered} id={id}")
            }
            Err(e) => {
                // Nothing lost: JetStream delivers it again after ack_wait,
                // and the redelivery replays.
                tracing::warn!(id, action, error = %e, "could not tell JetStream");
            }
        }
    }
}

/// One run of the handler, with what it needs.
struct Run {
    pool: sqlx::PgPool,
    id: String,
    delivered: i64,
    order: Order,
    delay: Duration,
    pause_before_commit: Duration,
    fail: bool,
    crash_at: Option<CrashPoint>,
}

impl Run {
    /// The side effect: one charge row, on the store's transaction.
    async fn charge(self, attachment: Option<Attachment>) -> Result<Charge, BoxError> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if self.crash_at == Some(CrashPoint::BeforeEffect) {
            crash(CrashPoint::BeforeEffect, &self.id);
        }
        let insert = sqlx::query(
            "INSERT INTO charges (msg_id, order_id, amount, charged_at) \
             VALUES ($1, $2, $3, now())",
        )
        .bind(&self.id)
        .bind(&self.order.order_id)
        .bind(self.order.amount);
        match attachment
            .as_ref()
            .and_then(|a| a.get::<IdempotentTransaction>())
        {
            // Committed together with the record.
            Some(tx) => {
                let mut conn = tx.lock().await?;
                insert.execute(&mut *conn).await?;
            }
            // A store that is not transactional: committed now, alone.
            None => {
                insert.execute(&self.pool).await?;
            }
        }
        println!("effect delivered={} id={}", self.delivered, self.id);
        if !self.pause_before_commit.is_zero() {
            tokio::time::sleep(self.pause_before_commit).await;
        }
        if self.crash_at == Some(CrashPoint::AfterEffect) {
            crash(CrashPoint::AfterEffect, &self.id);
        }
        if self.fail {
            return Err("injected handler failure (CONSUMER_FAIL_PERCENT)".into());
        }
        Ok(Charge {
            order_id: self.order.order_id,
            amount: self.order.amount,
        })
    }
}

/// The stream `ORDERS` as it is, or a new one.
async fn orders_stream(js: &jetstream::Context) -> Result<stream::Stream, BoxError> {
    let config = stream::Config {
        name: STREAM.to_owned(),
        subjects: vec![SUBJECTS.to_owned()],
        ..Default::default()
    };
    match js.get_or_create_stream(config).await {
        Ok(stream) => Ok(stream),
        // Another consumer process created it meanwhile.
        Err(e) => {
            tracing::debug!(error = %e, "creating the stream failed; reading it again");
            Ok(js.get_stream(STREAM).await?)
        }
    }
}

/// The durable consumer `billing` as it is, or a new one.
async fn billing_consumer(
    stream: &stream::Stream,
    ack_wait: Duration,
) -> Result<PullConsumer, BoxError> {
    let config = pull::Config {
        durable_name: Some(DURABLE.to_owned()),
        ack_policy: AckPolicy::Explicit,
        ack_wait,
        ..Default::default()
    };
    match stream.get_or_create_consumer(DURABLE, config).await {
        Ok(consumer) => Ok(consumer),
        Err(e) => {
            tracing::debug!(error = %e, "creating the consumer failed; reading it again");
            Ok(stream.get_consumer(DURABLE).await?)
        }
    }
}

/// The store `CONSUMER_STORE` names: the transactional one by default.
async fn records(kind: StoreKind, pool: &sqlx::PgPool) -> Result<Arc<dyn Store>, BoxError> {
    Ok(match kind {
        StoreKind::Transactional => {
            let store = TransactionalPostgresStore::new(pool.clone());
            store.migrate().await?;
            let _sweeper = store.spawn_sweeper(Duration::from_secs(60), 1000);
            Arc::new(store)
        }
        StoreKind::Postgres => {
            let store = PostgresStore::new(pool.clone());
            store.migrate().await?;
            let _sweeper = store.spawn_sweeper(Duration::from_secs(60), 1000);
            Arc::new(store)
        }
        #[cfg(feature = "redis")]
        StoreKind::Redis => {
            let url =
                std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
            Arc::new(
                tower_idempotency::store::redis::RedisStore::from_url(&url)
                    .await?
                    .with_prefix("examples-consumer:"),
            )
        }
        #[cfg(not(feature = "redis"))]
        StoreKind::Redis => return Err("CONSUMER_STORE=redis needs the `redis` feature".into()),
        StoreKind::Memory => Arc::new(MemoryStore::new()),
    })
}

/// Creates the `charges` table if it is missing. Two processes starting at
/// once would race on `CREATE TABLE IF NOT EXISTS` (one of them fails on
/// the catalog's unique index): an advisory lock serializes them.
async fn create_charges(pool: &sqlx::PgPool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('examples/consumer: charges'))")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS charges ( \
             msg_id text, \
             order_id text, \
             amount bigint, \
             charged_at timestamptz \
         )",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

async fn run(settings: Settings) -> Result<(), BoxError> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("stopping: the message in hand is finished first");
            stop.store(true, Ordering::SeqCst);
        });
    }

    // One message at a time holds one connection; the sweeper and a
    // duplicate's check take another now and then.
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&settings.database_url)
        .await
        .map_err(|e| format!("cannot connect to DATABASE_URL: {e}"))?;
    create_charges(&pool).await?;
    let store = records(settings.store, &pool).await?;

    let client = async_nats::ConnectOptions::new()
        .name("billing-consumer")
        .connect(settings.nats_url.as_str())
        .await
        .map_err(|e| format!("cannot connect to NATS at {}: {e}", settings.nats_url))?;
    let js = jetstream::new(client);
    let stream = orders_stream(&js).await?;
    let mut consumer = billing_consumer(&stream, settings.ack_wait).await?;
    // The consumer's own ack_wait, which may differ from ours if it existed.
    let ack_wait = consumer.info().await?.config.ack_wait;
    // Beats every third of the lease, well inside ack_wait.
    let lease = if ack_wait.is_zero() {
        Duration::from_secs(30)
    } else {
        ack_wait
    };

    let app = App {
        js,
        pool,
        consumer: IdempotentConsumer::from_arc(store)
            .with_codec(JsonCodec)
            .with_lease(lease),
        settings,
    };
    tracing::info!(stream = STREAM, consumer = DURABLE, ?ack_wait, "consuming");
    println!("ready ack_wait_ms={} id=-", ack_wait.as_millis());

    while !stop.load(Ordering::SeqCst) {
        let batch = consumer
            .fetch()
            .max_messages(1)
            .expires(FETCH_WAIT)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(e) => {
                tracing::warn!(error = %e, "fetch failed; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(msg) = batch.next().await {
            match msg {
                Ok(msg) => app.handle(msg).await,
                Err(e) => {
                    tracing::warn!(error = %e, "fetch failed");
                    break;
                }
            }
        }
    }
    println!("stopped id=-");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("consumer: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("consumer: {e}");
            tracing::error!(error = %e, "consumer failed");
            ExitCode::FAILURE
        }
    }
}
