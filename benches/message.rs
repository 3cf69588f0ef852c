//! Messages per second through the message face, in process, against the
//! bare handler: `IdempotentConsumer::process` and `MessageLayer` around a
//! `tower::service_fn`, on `MemoryStore`, `PostgresStore` and
//! `TransactionalPostgresStore`; first executions (a fresh message id
//! each time) and redeliveries (ids already processed); one message at a
//! time on a current-thread runtime, and 64 in flight (64 tasks on a
//! 2-thread runtime, as a consumer that processes in parallel).
//!
//! Run with `cargo bench --all-features --bench message`. PostgreSQL comes
//! from `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`);
//! the benchmark makes two tables in the schema `tower_idempotency_bench`
//! and drops them at the end. Without a server that answers, it says so
//! and runs the memory groups only.

#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput};
use criterion::{criterion_group, criterion_main};
use sqlx::postgres::PgPoolOptions;
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_idempotency::message::{BytesCodec, IdempotentConsumer, MessageKey, Processed};
use tower_idempotency::store::postgres::PgPool;
use tower_idempotency::{
    MemoryStore,
    store::{
        Store,
        postgres::{PostgresStore, TransactionalPostgresStore},
    },
};

/// The consumer's scope in every key.
const SCOPE: &str = "bench";
/// Messages in flight in the concurrent groups: one task each.
const TASKS: u64 = 64;
/// Ids processed before a replay row, 16 per task, each task replaying
/// its own so that two deliveries of one id are never in flight together.
const REPLAY_IDS: u64 = 1024;
/// Where the PostgreSQL tables go.
const SCHEMA: &str = "tower_idempotency_bench";
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A delivery as a broker hands it over: an id and a payload.
#[derive(Clone, Debug)]
struct Msg {
    id: String,
    payload: Bytes,
}

/// A 256-byte JSON payload.
fn payload() -> Bytes {
    let mut s = String::from("{\"items\":[");
    for _ in 0..7 {
        s.push_str("{\"sku\":\"abc-123\",\"qty\":1},");
    }
    s.pop();
    s.push_str("],\"note\":\"");
    while s.len() < 254 {
        s.push('x');
    }
    s.push_str("\"}");
    assert_eq!(s.len(), 256);
    Bytes::from(s)
}

/// The handler: its output is a fresh copy of the payload, as a handler
/// that serializes a result makes (an echo of the shared buffer would let
/// a store keep it for a reference count).
async fn handle(msg: Msg) -> Result<Bytes, Infallible> {
    Ok(Bytes::copy_from_slice(&msg.payload))
}

/// The key of a message: its id in the scope, fingerprinted by its payload.
fn extract(msg: &Msg) -> Result<MessageKey, Infallible> {
    Ok(MessageKey::new(SCOPE, &msg.id, &msg.payload))
}

type Consumer = IdempotentConsumer<BytesCodec>;

/// The consumer, recording the handler's output so that a redelivery gets
/// it back.
fn consumer(store: Arc<dyn Store>) -> Consumer {
    IdempotentConsumer::from_arc(store).with_codec(BytesCodec)
}

/// How a row sends its messages.
#[derive(Clone, Copy, Debug)]
enum Path {
    /// The handler called directly.
    Bare,
    /// `IdempotentConsumer::process`.
    Process,
    /// `MessageLayer` over a `service_fn`: the caller's own service, made
    /// ready and called, as a consumer loop holds one.
    Layer,
    /// The same through a clone of the service per message and `oneshot`,
    /// as a consumer that spawns a task per message does.
    LayerClone,
}

/// Messages that did not come back as the row expects (`Ran` for a first
/// execution, `Replayed` for a redelivery), and the last such outcome.
static ODD: AtomicU64 = AtomicU64::new(0);
static LAST_ODD: Mutex<&str> = Mutex::new("");

/// One consumer and its Tower form, over one store.
#[derive(Clone)]
struct Target<S> {
    consumer: Consumer,
    layered: S,
}

fn target(
    store: Arc<dyn Store>,
) -> Target<
    impl Service<Msg, Response = Processed<Bytes>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + Sync
    + 'static,
> {
    let consumer = consumer(store);
    // The Tower form: `MessageLayer` around a `service_fn` of the handler.
    let layered = consumer.layer(extract).layer(service_fn(handle));
    Target { consumer, layered }
}

impl<S> Target<S>
where
    S: Service<Msg, Response = Processed<Bytes>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    /// Sends one message down `path`; a replay is expected to replay.
    async fn send(&mut self, path: Path, msg: Msg, replay: bool) {
        let processed = match path {
            Path::Bare => {
                let Ok(output) = handle(msg).await;
                std::hint::black_box(output);
                return;
            }
            Path::Process => {
                let key = MessageKey::new(SCOPE, &msg.id, &msg.payload);
                let Ok(processed) = self.consumer.process(key, move |_| handle(msg)).await;
                processed
            }
            Path::Layer => {
                let Ok(svc) = self.layered.ready().await;
                let Ok(processed) = svc.call(msg).await;
                processed
            }
            Path::LayerClone => {
                let Ok(processed) = self.layered.clone().oneshot(msg).await;
                processed
            }
        };
        let expected = matches!(
            (&processed, replay),
            (Processed::Ran(_), false) | (Processed::Replayed(_), true)
        );
        if !expected {
            ODD.fetch_add(1, Ordering::Relaxed);
            *LAST_ODD.lock().unwrap() = processed.as_str();
        }
        let _ = std::hint::black_box(processed);
    }

    /// Processes the ids the replay rows redeliver.
    async fn preload(&mut self, payload: &Bytes) {
        for i in 0..REPLAY_IDS {
            self.send(Path::Process, replay_msg(i, payload), false)
                .await;
        }
    }
}

fn fresh_msg(n: u64, payload: &Bytes) -> Msg {
    Msg {
        id: format!("msg-{n}"),
        payload: payload.clone(),
    }
}

fn replay_msg(n: u64, payload: &Bytes) -> Msg {
    Msg {
        id: format!("replay-{}", n % REPLAY_IDS),
        payload: payload.clone(),
    }
}

/// Says so if any message of the group came back other than expected.
fn report_odd(group: &str) {
    let odd = ODD.swap(0, Ordering::Relaxed);
    if odd > 0 {
        let last = *LAST_ODD.lock().unwrap();
        eprintln!(
            "WARNING {group}: {odd} messages did not come back as ran/replayed (last: {last})"
        );
    }
}

/// One row of a group: its name, how it sends, and whether it redelivers
/// ids already processed.
#[derive(Clone, Copy, Debug)]
struct Row {
    name: &'static str,
    path: Path,
    replay: bool,
}

const fn row(name: &'static str, path: Path, replay: bool) -> Row {
    Row { name, path, replay }
}

/// What every message is made of: a counter for fresh ids, and the
/// payload.
#[derive(Clone, Debug)]
struct Feed {
    ids: Arc<AtomicU64>,
    payload: Bytes,
}

impl Feed {
    /// Message `n` of a row: fresh, or one of the preloaded ids.
    fn msg(&self, n: u64, replay: bool) -> Msg {
        if replay {
            replay_msg(n, &self.payload)
        } else {
            fresh_msg(n, &self.payload)
        }
    }
}

/// One message at a time: criterion times each.
fn sequential<S>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    t: &Target<S>,
    row: Row,
    feed: &Feed,
) where
    S: Service<Msg, Response = Processed<Bytes>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    g.bench_function(row.name, |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (mut t, feed) = (t.clone(), feed.clone());
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    let n = feed.ids.fetch_add(1, Ordering::Relaxed);
                    t.send(row.path, feed.msg(n, row.replay), row.replay).await;
                }
                start.elapsed()
            }
        })
    });
}

/// 64 tasks, each sending its share of criterion's iterations one after
/// another: 64 messages in flight. Throughput is still per message.
fn concurrent<S>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    t: &Target<S>,
    row: Row,
    feed: &Feed,
) where
    S: Service<Msg, Response = Processed<Bytes>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
{
    g.bench_function(row.name, |b| {
        b.to_async(rt)
            .iter_custom(|iters| run_tasks(t, row, feed, iters))
    });
}

fn run_tasks<S>(
    t: &Target<S>,
    row: Row,
    feed: &Feed,
    iters: u64,
) -> impl Future<Output = Duration> + use<S>
where
    S: Service<Msg, Response = Processed<Bytes>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
{
    let per_task = iters.div_ceil(TASKS).max(1);
    // Fresh ids for this batch, taken once, so the tasks share no counter.
    let base = feed.ids.fetch_add(per_task * TASKS, Ordering::Relaxed);
    let (t, feed) = (t.clone(), feed.clone());
    async move {
        let start = Instant::now();
        let tasks: Vec<_> = (0..TASKS)
            .map(|task| {
                let (mut t, feed) = (t.clone(), feed.clone());
                tokio::spawn(async move {
                    // A replaying task cycles through its own 16 ids.
                    let own = REPLAY_IDS / TASKS;
                    for i in 0..per_task {
                        let n = if row.replay {
                            task * own + i % own
                        } else {
                            base + task * per_task + i
                        };
                        t.send(row.path, feed.msg(n, row.replay), row.replay).await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        // Scaled to the iterations criterion asked for.
        start
            .elapsed()
            .mul_f64(iters as f64 / (per_task * TASKS) as f64)
    }
}

/// The memory store: bounded, so that the first-execution rows run at the
/// bound (every insert evicts the oldest record) rather than measure
/// fresh memory.
fn memory_store() -> MemoryStore {
    MemoryStore::builder()
        .max_entries(200_000)
        .max_bytes(1 << 30)
        .build()
}

const ROWS: [Row; 7] = [
    row("bare", Path::Bare, false),
    row("process_first", Path::Process, false),
    row("process_replay", Path::Process, true),
    row("layer_first", Path::Layer, false),
    row("layer_replay", Path::Layer, true),
    row("layer_clone_first", Path::LayerClone, false),
    row("layer_clone_replay", Path::LayerClone, true),
];

fn memory(c: &mut Criterion, ct: &Runtime, mt: &Runtime, feed: &Feed) {
    let mut g = c.benchmark_group("message_memory");
    g.throughput(Throughput::Elements(1));
    for row in ROWS {
        // A store of its own per row: each first-execution row fills its
        // own, and each replay row finds only its preloaded ids.
        let mut t = target(Arc::new(memory_store()));
        if row.replay {
            ct.block_on(t.preload(&feed.payload));
        }
        sequential(&mut g, ct, &t, row, feed);
    }
    g.finish();
    report_odd("message_memory");

    let mut g = c.benchmark_group("message_memory_c64");
    g.throughput(Throughput::Elements(1));
    for row in ROWS {
        let mut t = target(Arc::new(memory_store()));
        if row.replay {
            mt.block_on(t.preload(&feed.payload));
        }
        concurrent(&mut g, mt, &t, row, feed);
    }
    g.finish();
    report_odd("message_memory_c64");
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The pool the README advises: no ping before every statement.
async fn connect(url: &str) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(3))
        .test_before_acquire(false)
        .connect(url)
        .await
}

/// The URL without its credentials, for a message.
fn redacted(url: &str) -> &str {
    url.rsplit_once('@').map_or(url, |(_, host)| host)
}

/// Drops this benchmark's tables left behind by a run that did not finish
/// more than an hour ago.
async fn drop_stale_tables(pool: &PgPool) {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = $1 AND tablename LIKE 'm\\_%'",
    )
    .bind(SCHEMA)
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    let now = unix_secs();
    for name in names {
        let made: Option<u64> = name.split('_').nth(1).and_then(|s| s.parse().ok());
        if made.is_some_and(|made| made + 3600 < now) {
            let _ = sqlx::query(&format!("DROP TABLE IF EXISTS \"{SCHEMA}\".\"{name}\""))
                .execute(pool)
                .await;
        }
    }
}

/// The two stores over one pool, on the tables `plain` and `tx`.
fn pg_stores(pool: &PgPool, plain: &str, tx: &str) -> (PostgresStore, TransactionalPostgresStore) {
    let plain = PostgresStore::new(pool.clone())
        .with_schema(SCHEMA)
        .unwrap()
        .with_table(plain)
        .unwrap();
    let tx = TransactionalPostgresStore::new(pool.clone())
        .with_schema(SCHEMA)
        .unwrap()
        .with_table(tx)
        .unwrap();
    (plain, tx)
}

const PG_ROWS: [Row; 4] = [
    row("process_first", Path::Process, false),
    row("process_replay", Path::Process, true),
    row("layer_first", Path::Layer, false),
    row("layer_replay", Path::Layer, true),
];

fn postgres(c: &mut Criterion, ct: &Runtime, mt: &Runtime, feed: &Feed) {
    let url = std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| DEFAULT_URL.to_owned());
    // A pool per runtime: a connection's socket belongs to the runtime
    // that opened it.
    let ct_pool = match ct.block_on(connect(&url)) {
        Ok(pool) => pool,
        Err(e) => {
            eprintln!(
                "SKIPPED message_pg*: PostgreSQL at {} did not answer ({e}); only the memory groups ran",
                redacted(&url)
            );
            return;
        }
    };
    let mt_pool = mt.block_on(connect(&url)).unwrap();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let base = format!("m_{}_{}", unix_secs(), &id[..12]);
    let (plain_table, tx_table) = (format!("{base}_plain"), format!("{base}_tx"));
    let (ct_plain, ct_tx) = pg_stores(&ct_pool, &plain_table, &tx_table);
    let (mt_plain, mt_tx) = pg_stores(&mt_pool, &plain_table, &tx_table);
    ct.block_on(async {
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{SCHEMA}\""))
            .execute(&ct_pool)
            .await
            .unwrap();
        drop_stale_tables(&ct_pool).await;
        ct_plain.migrate().await.unwrap();
        ct_tx.migrate().await.unwrap();
    });

    // Sequential, on the current-thread runtime. Each store's replay rows
    // redeliver the ids preloaded here (the same keys for both faces).
    let mut stores = [
        ("message_pg", target(Arc::new(ct_plain))),
        ("message_pg_tx", target(Arc::new(ct_tx))),
    ];
    for (group, t) in &mut stores {
        ct.block_on(t.preload(&feed.payload));
        let mut g = c.benchmark_group(*group);
        g.throughput(Throughput::Elements(1))
            .sampling_mode(SamplingMode::Flat)
            .sample_size(20);
        for row in PG_ROWS {
            sequential(&mut g, ct, t, row, feed);
        }
        g.finish();
        report_odd(group);
    }

    // 64 in flight, on the 2-thread runtime, through its own pool (16
    // connections, as the HTTP bench server), on the same tables.
    let stores = [
        ("message_pg_c64", target(Arc::new(mt_plain))),
        ("message_pg_tx_c64", target(Arc::new(mt_tx))),
    ];
    for (group, t) in &stores {
        let mut g = c.benchmark_group(*group);
        g.throughput(Throughput::Elements(1))
            .sampling_mode(SamplingMode::Flat)
            .sample_size(10);
        for row in PG_ROWS {
            concurrent(&mut g, mt, t, row, feed);
        }
        g.finish();
        report_odd(group);
    }
    drop(stores);

    ct.block_on(async {
        for table in [&plain_table, &tx_table] {
            sqlx::query(&format!("DROP TABLE IF EXISTS \"{SCHEMA}\".\"{table}\""))
                .execute(&ct_pool)
                .await
                .unwrap();
        }
        ct_pool.close().await;
    });
    mt.block_on(mt_pool.close());
}

fn bench(c: &mut Criterion) {
    let ct = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let feed = Feed {
        ids: Arc::new(AtomicU64::new(0)),
        payload: payload(),
    };
    memory(c, &ct, &mt, &feed);
    postgres(c, &ct, &mt, &feed);
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench
}
criterion_main!(benches);
