//! The message face against a real RabbitMQ: a delivery whose consumer
//! went away before its ack is redelivered and replayed, not run again; a
//! duplicate publish runs once; a message without a `message_id`, or with
//! an id reused for another payload, is rejected and never comes back; a
//! handler error requeues the message and its redelivery runs it again;
//! the Tower form over a service of AMQP messages.
//!
//! The server comes from `AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`). When it does not answer the
//! tests are skipped, unless `CI=true`, where they fail. Every test uses a
//! queue of its own, deleted at its end (and expiring by itself a minute
//! after a failed test left it).

#![cfg(all(feature = "test-util", feature = "json"))]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tower::{Service, ServiceExt, service_fn};
use tower_idempotency::message::{Disposition, IdempotentConsumer, JsonCodec, MessageKey};
use tower_idempotency::{MemoryStore, message::Processed, store::Store};

/// The longest any single broker step may take.
const WAIT: Duration = Duration::from_secs(10);
/// How long a queue must stay silent to count as "nothing redelivered".
const QUIET: Duration = Duration::from_millis(700);
const SCOPE: &str = "orders";
const ORDER: &[u8] = br#"{"order":"o-1","amount":42}"#;

fn amqp_url() -> Option<String> {
    common::backend(common::RABBITMQ)
}

async fn connect(url: &str) -> Result<Connection, String> {
    match timeout(
        Duration::from_secs(5),
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 5 s".into()),
    }
}

/// A connection, a confirming publisher channel, and a queue of the
/// test's own.
struct Broker {
    url: String,
    conn: Connection,
    publisher: Channel,
    queue: String,
}

impl Broker {
    /// `None` (the test is skipped) when RabbitMQ does not answer, outside CI.
    async fn new() -> Option<Self> {
        let url = amqp_url()?;
        let conn = match connect(&url).await {
            Ok(conn) => conn,
            Err(e) if common::in_ci() => {
                panic!(
                    "RabbitMQ at {url} does not answer ({e}), and CI=true: the tests may not be skipped"
                )
            }
            Err(e) => {
                eprintln!("skipping: RabbitMQ at {url} does not answer ({e})");
                return None;
            }
        };
        let publisher = step(conn.create_channel()).await;
        step(publisher.confirm_select(ConfirmSelectOptions::default())).await;
        let queue = format!("tower-idempotency-test-{}", uuid::Uuid::new_v4().simple());
        let mut args = FieldTable::default();
        // A queue a failed test leaves behind goes away by itself.
        args.insert("x-expires".into(), AMQPValue::LongInt(60_000));
        step(publisher.queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), args))
            .await;
        Some(Self {
            url,
            conn,
            publisher,
            queue,
        })
    }

    /// Publishes `payload` with `message_id` (if any) and waits for the
    /// broker's confirm.
    async fn publish(&self, message_id: Option<&str>, payload: &[u8]) {
        let mut properties =
            BasicProperties::default().with_content_type("application/json".into());
        if let Some(id) = message_id {
            properties = properties.with_message_id(id.into());
        }
        let confirm = step(self.publisher.basic_publish(
            "".into(),
            self.queue.as_str().into(),
            BasicPublishOptions::default(),
            payload,
            properties,
        ))
        .await;
        let confirmation = step(confirm).await;
        assert!(
            matches!(confirmation, Confirmation::Ack(None)),
            "publish not confirmed: {confirmation:?}"
        );
    }

    /// A consumer with manual acks on a channel of its own, on `conn`.
    async fn consumer_on(&self, conn: &Connection, prefetch: u16) -> (Channel, Consumer) {
        let channel = step(conn.create_channel()).await;
        step(channel.basic_qos(prefetch, BasicQosOptions::default())).await;
        let consumer = step(channel.basic_consume(
            self.queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ))
        .await;
        (channel, consumer)
    }

    async fn consumer(&self, prefetch: u16) -> (Channel, Consumer) {
        self.consumer_on(&self.conn, prefetch).await
    }

    /// Messages ready in the queue (not counting the unacked ones).
    async fn ready(&self) -> u32 {
        let queue = step(self.publisher.queue_declare(
            self.queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ))
        .await;
        queue.message_count()
    }

    async fn delete(self) {
        step(
            self.publisher
                .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default()),
        )
        .await;
        let _ = timeout(WAIT, self.conn.close(200, "done".into())).await;
    }
}

/// One broker step, bounded by [`WAIT`].
async fn step<T, E: std::fmt::Debug>(fut: impl Future<Output = Result<T, E>>) -> T {
    timeout(WAIT, fut)
        .await
        .expect("RabbitMQ did not answer in time")
        .unwrap()
}

/// The next delivery, within [`WAIT`].
async fn next(consumer: &mut Consumer) -> Delivery {
    timeout(WAIT, consumer.next())
        .await
        .expect("no delivery in time")
        .expect("the consumer was cancelled")
        .unwrap()
}

/// Asserts that nothing arrives for [`QUIET`].
async fn nothing_more(consumer: &mut Consumer) {
    if let Ok(d) = timeout(QUIET, consumer.next()).await {
        panic!("unexpected delivery: {d:?}");
    }
}

/// The handler's output, recorded as JSON and replayed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Receipt {
    charge: usize,
}

/// The side effect: every charge the handler made, by message id, and how
/// often it was called. It fails its next `fail_next` calls.
#[derive(Clone, Default)]
struct Ledger {
    charges: Arc<Mutex<Vec<String>>>,
    calls: Arc<AtomicUsize>,
    fail_next: Arc<AtomicUsize>,
    /// Extra milliseconds each call takes.
    slow_ms: Arc<AtomicU64>,
}

impl Ledger {
    async fn charge(&self, id: String) -> Result<Receipt, String> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let slow = self.slow_ms.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20 + slow)).await;
        let fail = self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Err("gateway unavailable".into());
        }
        let mut charges = self.charges.lock().unwrap();
        charges.push(id);
        Ok(Receipt {
            charge: charges.len(),
        })
    }

    fn charges(&self) -> Vec<String> {
        self.charges.lock().unwrap().clone()
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

fn consumer_on(store: Arc<dyn Store>) -> IdempotentConsumer<JsonCodec> {
    IdempotentConsumer::from_arc(store).with_codec(JsonCodec)
}

/// What became of one delivery: the outcome's name (`handler_error` for a
/// handler's `Err`), what to tell the broker, and the receipt if any.
#[derive(Debug)]
struct Handled {
    outcome: &'static str,
    disposition: Disposition,
    receipt: Option<Receipt>,
}

/// The consumer's work for one delivery, as the example does it: keyed by
/// the AMQP `message_id`, run through the message face. It does not settle.
async fn handle(
    consumer: &IdempotentConsumer<JsonCodec>,
    ledger: &Ledger,
    d: &Delivery,
) -> Handled {
    let id = d
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str().to_owned())
        .filter(|id| !id.is_empty());
    let Some(id) = id else {
        let rejected: Processed<Receipt> = Processed::Rejected("no message_id".into());
        return Handled {
            outcome: rejected.as_str(),
            disposition: rejected.disposition(),
            receipt: None,
        };
    };
    let key = MessageKey::new(SCOPE, &id, &d.data);
    let ledger = ledger.clone();
    match consumer
        .process(key, move |_| async move { ledger.charge(id).await })
        .await
    {
        Ok(processed) => Handled {
            outcome: processed.as_str(),
            disposition: processed.disposition(),
            receipt: processed.into_output(),
        },
        Err(_) => Handled {
            outcome: "handler_error",
            disposition: Disposition::Retry,
            receipt: None,
        },
    }
}

/// Tells the broker: ack, nack with requeue, or reject without.
async fn settle(d: &Delivery, disposition: Disposition) {
    let sent = match disposition {
        Disposition::Ack => step(d.ack(BasicAckOptions::default())).await,
        Disposition::Terminate => step(d.reject(BasicRejectOptions { requeue: false })).await,
        _ => {
            step(d.nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            }))
            .await
        }
    };
    assert!(sent, "the acker was already used or poisoned");
}

fn message_id(d: &Delivery) -> Option<&str> {
    d.properties.message_id().as_ref().map(|id| id.as_str())
}

/// How the first consumer goes away before its ack.
#[derive(Debug, Clone, Copy)]
enum Crash {
    /// Its channel closes.
    Channel,
    /// Its whole connection closes.
    Connection,
}

/// The redelivery the message face exists for: a consumer runs the
/// handler, goes away before its ack, RabbitMQ redelivers the message to
/// another consumer on the same store, and that one replays the record.
async fn redelivery_after(crash: Crash) {
    let Some(broker) = Broker::new().await else {
        return;
    };
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let ledger = Ledger::default();
    broker.publish(Some("order-1"), ORDER).await;

    // The first consumer, on a connection of its own so that it can die.
    let first_conn = connect(&broker.url).await.unwrap();
    let (first_channel, mut first) = broker.consumer_on(&first_conn, 1).await;
    let d = next(&mut first).await;
    assert!(!d.redelivered);
    assert_eq!(message_id(&d), Some("order-1"));
    let ran = handle(&consumer_on(store.clone()), &ledger, &d).await;
    assert_eq!(ran.outcome, "ran");
    assert_eq!(ran.disposition, Disposition::Ack);
    assert_eq!(ledger.charges(), ["order-1"]);
    // ... and it is gone before the ack.
    match crash {
        Crash::Channel => step(first_channel.close(200, "gone before the ack".into())).await,
        Crash::Connection => step(first_conn.close(200, "gone before the ack".into())).await,
    }
    drop(d);

    let (_channel, mut second) = broker.consumer(1).await;
    let again = next(&mut second).await;
    assert!(again.redelivered, "RabbitMQ marks the redelivery");
    assert_eq!(message_id(&again), Some("order-1"));
    assert_eq!(again.data, ORDER);
    let replayed = handle(&consumer_on(store), &ledger, &again).await;
    assert_eq!(
        replayed.outcome, "replayed",
        "the handler did not run again"
    );
    assert_eq!(replayed.disposition, Disposition::Ack);
    assert_eq!(replayed.receipt, ran.receipt, "the first run's receipt");
    settle(&again, replayed.disposition).await;

    assert_eq!(ledger.charges(), ["order-1"], "one side effect");
    assert_eq!(ledger.calls(), 1);
    nothing_more(&mut second).await;
    assert_eq!(broker.ready().await, 0);
    // Already closed after a connection crash: the error does not matter.
    let _ = timeout(WAIT, first_conn.close(200, "done".into())).await;
    broker.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_closed_before_the_ack_redelivers_and_replays() {
    redelivery_after(Crash::Channel).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_lost_before_the_ack_redelivers_and_replays() {
    redelivery_after(Crash::Connection).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_publish_is_processed_once() {
    let Some(broker) = Broker::new().await else {
        return;
    };
    let consumer = consumer_on(Arc::new(MemoryStore::new()));
    let ledger = Ledger::default();
    // A producer that retried its publish: the same message twice.
    broker.publish(Some("order-2"), ORDER).await;
    broker.publish(Some("order-2"), ORDER).await;

    let (_channel, mut deliveries) = broker.consumer(10).await;
    let first = next(&mut deliveries).await;
    let ran = handle(&consumer, &ledger, &first).await;
    assert_eq!(ran.outcome, "ran");
    settle(&first, ran.disposition).await;
    let second = next(&mut deliveries).await;
    assert!(!second.redelivered, "a second publish, not a redelivery");
    let replayed = handle(&consumer, &ledger, &second).await;
    assert_eq!(replayed.outcome, "replayed");
    assert_eq!(replayed.disposition, Disposition::Ack);
    assert_eq!(replayed.receipt, ran.receipt);
    settle(&second, replayed.disposition).await;

    assert_eq!(ledger.charges(), ["order-2"]);
    assert_eq!(ledger.calls(), 1);
    nothing_more(&mut deliveries).await;
    assert_eq!(broker.ready().await, 0);
    broker.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_without_an_id_is_rejected_and_not_redelivered() {
    let Some(broker) = Broker::new().await else {
        return;
    };
    let consumer = consumer_on(Arc::new(MemoryStore::new()));
    let ledger = Ledger::default();
    broker.publish(None, ORDER).await;
    broker.publish(Some(""), ORDER).await;

    let (_channel, mut deliveries) = broker.consumer(10).await;
    for _ in 0..2 {
        let d = next(&mut deliveries).await;
        let handled = handle(&consumer, &ledger, &d).await;
        assert_eq!(handled.outcome, "rejected");
        assert_eq!(handled.disposition, Disposition::Terminate);
        settle(&d, handled.disposition).await;
    }

    assert_eq!(ledger.calls(), 0, "the handler never ran");
    nothing_more(&mut deliveries).await;
    assert_eq!(broker.ready().await, 0, "rejected, not requeued");
    broker.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn id_reused_with_another_payload_is_a_mismatch_and_rejected() {
    let Some(broker) = Broker::new().await else {
        return;
    };
    let consumer = consumer_on(Arc::new(MemoryStore::new()));
    let ledger = Ledger::default();
    broker.publish(Some("order-3"), ORDER).await;
    broker
        .publish(Some("order-3"), br#"{"order":"o-1","amount":1000}"#)
        .await;

    let (_channel, mut deliveries) = broker.consumer(10).await;
    let first = next(&mut deliveries).await;
    let ran = handle(&consumer, &ledger, &first).await;
    assert_eq!(ran.outcome, "ran");
    settle(&first, ran.disposition).await;
    let reused = next(&mut deliveries).await;
    let mismatch = handle(&consumer, &ledger, &reused).await;
    assert_eq!(mismatch.outcome, "mismatch");
    assert_eq!(mismatch.disposition, Disposition::Terminate);
    settle(&reused, mismatch.disposition).await;

    assert_eq!(ledger.charges(), ["order-3"]);
    assert_eq!(ledger.calls(), 1, "the reused id never ran");
    nothing_more(&mut deliveries).await;
    assert_eq!(broker.ready().await, 0, "rejected, not requeued");
    broker.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_error_requeues_and_the_redelivery_runs_again() {
    let Some(broker) = Broker::new().await else {
        return;
    };
    let consumer = consumer_on(Arc::new(MemoryStore::new()));
    let ledger = Ledger::default();
    ledger.fail_next.store(1, Ordering::SeqCst);
    broker.publish(Some("order-4"), ORDER).await;

    let (_channel, mut deliveries) = broker.consumer(1).await;
    let d = next(&mut deliveries).await;
    assert!(!d.redelivered);
    let failed = handle(&consumer, &ledger, &d).await;
    assert_eq!(failed.outcome, "handler_error");
    assert_eq!(failed.disposition, Disposition::Retry);
    settle(&d, failed.disposition).await;

    let again = next(&mut deliveries).await;
    assert!(again.redelivered, "the nacked message comes back");
    let ran = handle(&consumer, &ledger, &again).await;
    assert_eq!(ran.outcome, "ran", "the failure released the key");
    assert_eq!(ran.receipt, Some(Receipt { charge: 1 }));
    settle(&again, ran.disposition).await;
    assert_eq!(ledger.calls(), 2);
    assert_eq!(ledger.charges(), ["order-4"]);
    nothing_more(&mut deliveries).await;

    // Once it succeeded, it is done: a late duplicate replays.
    broker.publish(Some("order-4"), ORDER).await;
    let late = next(&mut deliveries).await;
    let replayed = handle(&consumer, &ledger, &late).await;
    assert_eq!(replayed.outcome, "replayed");
    assert_eq!(replayed.receipt, Some(Receipt { charge: 1 }));
    settle(&late, replayed.disposition).await;
    assert_eq!(ledger.calls(), 2);
    assert_eq!(ledger.charges(), ["order-4"]);
    nothing_more(&mut deliveries).await;
    assert_eq!(broker.ready().await, 0);
    broker.delete().await;
}

/// A consumer loop for the concurrent test: handles and settles every
/// delivery (a retry after a short pause, as a real consumer would), and
/// reports each outcome with the delivery's redelivered flag.
async fn consume(
    mut deliveries: Consumer,
    consumer: IdempotentConsumer<JsonCodec>,
    ledger: Ledger,
    outcomes: mpsc::UnboundedSender<(&'static str, bool)>,
) {
    while let Some(Ok(d)) = deliveries.next().await {
        let handled = handle(&consumer, &ledger, &d).await;
        if handled.disposition == Disposition::Retry {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        settle(&d, handled.disposition).await;
        if outcomes.send((handled.outcome, d.redelivered)).is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_in_flight_on_another_consumer_is_retried_then_replayed() {
    let Some(broker) = Broker::new().await else {
        return;
    };
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let ledger = Ledger::default();
    ledger.slow_ms.store(400, Ordering::SeqCst);
    broker.publish(Some("order-6"), ORDER).await;
    broker.publish(Some("order-6"), ORDER).await;

    // Two consumer processes on one store, one message each at a time:
    // the duplicate reaches the second while the first still runs.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (channel, deliveries) = broker.consumer(1).await;
        let task = tokio::spawn(consume(
            deliveries,
            consumer_on(store.clone()),
            ledger.clone(),
            tx.clone(),
        ));
        tasks.push((channel, task));
    }
    let mut seen = Vec::new();
    while !(seen.iter().any(|(o, _)| *o == "ran") && seen.iter().any(|(o, _)| *o == "replayed")) {
        let outcome = timeout(WAIT, rx.recv()).await.expect("no outcome in time");
        seen.push(outcome.unwrap());
    }
    for (channel, task) in tasks {
        step(channel.close(200, "done".into())).await;
        task.abort();
    }

    let count = |name: &str| seen.iter().filter(|(o, _)| *o == name).count();
    assert_eq!(count("ran"), 1, "{seen:?}");
    assert_eq!(count("replayed"), 1, "{seen:?}");
    assert!(
        count("in_flight") >= 1,
        "the duplicate met the running first: {seen:?}"
    );
    assert_eq!(count("in_flight") + 2, seen.len(), "{seen:?}");
    assert!(
        seen.iter()
            .any(|&(o, redelivered)| o == "replayed" && redelivered),
        "the replay came from a requeued delivery: {seen:?}"
    );
    assert_eq!(ledger.charges(), ["order-6"]);
    assert_eq!(ledger.calls(), 1);
    assert_eq!(broker.ready().await, 0);
    broker.delete().await;
}

/// A delivery as an application might model it, for the Tower form.
struct AmqpMessage {
    id: Option<String>,
    payload: Vec<u8>,
}

impl From<&Delivery> for AmqpMessage {
    fn from(d: &Delivery) -> Self {
        Self {
            id: message_id(d).map(str::to_owned),
            payload: d.data.clone(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tower_form_over_amqp_messages() {
    let Some(broker) = Broker::new().await else {
        return;
    };
    let ledger = Ledger::default();
    let layer = IdempotentConsumer::new(MemoryStore::new())
        .with_codec(JsonCodec)
        .layer(|m: &AmqpMessage| match m.id.as_deref() {
            Some(id) if !id.is_empty() => Ok(MessageKey::new(SCOPE, id, &m.payload)),
            _ => Err("no message_id"),
        });
    let charge = {
        let ledger = ledger.clone();
        service_fn(move |m: AmqpMessage| {
            let ledger = ledger.clone();
            async move { ledger.charge(m.id.unwrap_or_default()).await }
        })
    };
    let mut svc = tower::ServiceBuilder::new().layer(layer).service(charge);

    broker.publish(Some("order-5"), ORDER).await;
    broker.publish(Some("order-5"), ORDER).await;
    broker.publish(None, ORDER).await;
    broker
        .publish(Some("order-5"), br#"{"order":"o-1","amount":7}"#)
        .await;

    let (_channel, mut deliveries) = broker.consumer(10).await;
    let mut outcomes = Vec::new();
    for _ in 0..4 {
        let d = next(&mut deliveries).await;
        let processed = svc
            .ready()
            .await
            .unwrap()
            .call(AmqpMessage::from(&d))
            .await
            .unwrap();
        outcomes.push((processed.as_str(), processed.disposition()));
        settle(&d, processed.disposition()).await;
    }
    assert_eq!(
        outcomes,
        [
            ("ran", Disposition::Ack),
            ("replayed", Disposition::Ack),
            ("rejected", Disposition::Terminate),
            ("mismatch", Disposition::Terminate),
        ]
    );
    assert_eq!(ledger.charges(), ["order-5"]);
    assert_eq!(ledger.calls(), 1);
    nothing_more(&mut deliveries).await;
    assert_eq!(broker.ready().await, 0);
    broker.delete().await;
}
