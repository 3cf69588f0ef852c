//! A RabbitMQ consumer that charges each order exactly once, however often
//! the broker delivers it.
//!
//! RabbitMQ delivers at least once: a consumer that dies after the side
//! effect but before its ack gets the message again, on this consumer or
//! another one, and a producer that retries a publish sends it twice. This
//! consumer keys every delivery by its AMQP `message_id` property and runs
//! the handler through the message face: the first delivery runs it and
//! records its receipt, every redelivery gets the recorded receipt back
//! without running anything.
//!
//! What each outcome tells the broker (`Processed::disposition`):
//!
//! | outcome | disposition | AMQP |
//! |---|---|---|
//! | ran, replayed | `Ack` | `basic.ack` |
//! | in flight elsewhere, store down, handler error | `Retry` | `basic.nack`, requeued |
//! | no `message_id`, malformed payload, id reused with another payload | `Terminate` | `basic.reject`, not requeued (dead-lettered if the queue has a DLX) |
//!
//! Run it (RabbitMQ on localhost, guest/guest):
//!
//! ```text
//! cargo run --example rabbitmq --features json
//! # with the records in Redis, shared by every consumer process:
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example rabbitmq --features redis,json
//! ```
//!
//! Environment: `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`),
//! `RABBITMQ_QUEUE` (default `orders`), `PREFETCH` (default 16),
//! `GATEWAY_FAILURES` (the first N charges fail as if the payment gateway
//! were down, to show a retry), `REDIS_URL` (with feature `redis`),
//! `RUST_LOG`.
//!
//! With Redis the records outlive the process (24 hours): a rerun replays
//! the ids it has seen. Deliveries are handled one at a time, in order; the
//! prefetch keeps the next ones on hand.
//!
//! Publish to it (rabbitmqadmin needs the management plugin; any client
//! that sets the `message_id` property will do), twice with the same id
//! (charged once), then the same id with another amount (rejected):
//!
//! ```text
//! rabbitmqadmin publish routing_key=orders properties='{"message_id":"order-1"}' \
//!     payload='{"order_id":"o-1","amount_cents":1299}'
//! rabbitmqadmin publish routing_key=orders properties='{"message_id":"order-1"}' \
//!     payload='{"order_id":"o-1","amount_cents":1299}'
//! rabbitmqadmin publish routing_key=orders properties='{"message_id":"order-1"}' \
//!     payload='{"order_id":"o-1","amount_cents":99999}'
//! ```
//!
//! SIGTERM or ctrl-c stops consuming, finishes the delivery in hand, and
//! exits 0; the deliveries prefetched but not started go back to the queue.

use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tower_idempotency::message::{
    Disposition, IdempotentConsumer, JsonCodec, MessageKey, Processed,
};

/// The scope of the keys: another consumer of the same messages (shipping,
/// say) would use its own, and process each message once too.
const SCOPE: &str = "orders";

/// How long a failed delivery waits before it goes back to the queue, so
/// that a message that keeps failing does not spin.
const RETRY_DELAY: Duration = Duration::from_millis(500);

/// The message body.
#[derive(Debug, Deserialize)]
struct Order {
    order_id: String,
    amount_cents: u64,
}

/// The handler's output: recorded as JSON, replayed to every redelivery.
/// A declined charge is an outcome too (recorded, never retried); only an
/// unavailable gateway is an error (released, retried).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
enum Receipt {
    Charged { charge_id: u64, amount_cents: u64 },
    Declined { reason: String },
}

#[derive(Debug)]
struct GatewayUnavailable;

impl std::fmt::Display for GatewayUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("payment gateway unavailable")
    }
}

impl Error for GatewayUnavailable {}

/// A stand-in for a payment gateway: the side effect that must happen once.
#[derive(Debug, Default)]
struct Gateway {
    charges: AtomicU64,
    failures_left: AtomicU32,
}

impl Gateway {
    async fn charge(&self, order: &Order) -> Result<Receipt, GatewayUnavailable> {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let failing = self
            .failures_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(GatewayUnavailable);
        }
        if order.amount_cents > 50_000 {
            return Ok(Receipt::Declined {
                reason: "over the limit".into(),
            });
        }
        let charge_id = self.charges.fetch_add(1, Ordering::SeqCst) + 1;
        tracing::info!(order_id = %order.order_id, amount_cents = order.amount_cents, charge_id, "CHARGED");
        Ok(Receipt::Charged {
            charge_id,
            amount_cents: order.amount_cents,
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_idempotency=debug".into()),
        )
        .init();

    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let queue = std::env::var("RABBITMQ_QUEUE").unwrap_or_else(|_| "orders".into());
    let prefetch: u16 = env_number("PREFETCH", 16)?;
    let gateway = Arc::new(Gateway {
        failures_left: AtomicU32::new(env_number("GATEWAY_FAILURES", 0)?),
        ..Gateway::default()
    });

    let consumer = consumer().await?;

    let conn = Connection::connect(
        &url,
        ConnectionProperties::default().with_connection_name("tower-idempotency-orders".into()),
    )
    .await?;
    let channel = conn.create_channel().await?;
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut deliveries = channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(%queue, prefetch, "consuming; ctrl-c or SIGTERM to stop");

    let (stop_tx, mut stop) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });

    let mut result = Ok(());
    loop {
        // Only the wait for the next delivery races the signal: a delivery
        // in hand is always finished and settled.
        let next = tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => {
                tracing::info!("stopping: no new deliveries");
                break;
            }
            next = deliveries.next() => next,
        };
        match next {
            Some(Ok(delivery)) => handle(&consumer, &gateway, delivery).await,
            Some(Err(e)) => {
                tracing::error!(error = %e, "the consumer failed");
                result = Err(e.into());
                break;
            }
            None => {
                tracing::warn!("the broker cancelled the consumer");
                break;
            }
        }
    }

    // Prefetched deliveries that never started go back to the queue when
    // the channel closes.
    let tag = deliveries.tag();
    if let Err(e) = channel
        .basic_cancel(tag, BasicCancelOptions::default())
        .await
    {
        tracing::debug!(error = %e, "cancel failed");
    }
    if let Err(e) = channel.close(200, "bye".into()).await {
        tracing::debug!(error = %e, "channel close failed");
    }
    if let Err(e) = conn.close(200, "bye".into()).await {
        tracing::debug!(error = %e, "connection close failed");
    }
    tracing::info!("stopped");
    result
}

/// The message face over MemoryStore, or over Redis when `REDIS_URL` is
/// set and the example is built with feature `redis`: then several
/// consumer processes share the records, and a redelivery to another
/// process replays too.
async fn consumer() -> Result<IdempotentConsumer<JsonCodec>, Box<dyn Error>> {
    #[cfg(feature = "redis")]
    if let Ok(url) = std::env::var("REDIS_URL") {
        let store = tower_idempotency::store::redis::RedisStore::from_url(&url)
            .await?
            .with_prefix("orders-example:");
        tracing::info!("records in Redis");
        return Ok(IdempotentConsumer::new(store).with_codec(JsonCodec));
    }
    tracing::info!("records in memory: one process only");
    Ok(IdempotentConsumer::new(tower_idempotency::MemoryStore::new()).with_codec(JsonCodec))
}

/// One delivery: key it, run it once, settle it with the broker.
async fn handle(consumer: &IdempotentConsumer<JsonCodec>, gateway: &Arc<Gateway>, d: Delivery) {
    let tag = d.delivery_tag;
    let redelivered = d.redelivered;
    let Some(id) = d
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str().to_owned())
        .filter(|id| !id.is_empty())
    else {
        tracing::warn!(tag, "no message_id: rejected");
        settle(&d, Disposition::Terminate).await;
        return;
    };
    let order: Order = match serde_json::from_slice(&d.data) {
        Ok(order) => order,
        Err(e) => {
            tracing::warn!(%id, error = %e, "malformed payload: rejected");
            settle(&d, Disposition::Terminate).await;
            return;
        }
    };

    let key = MessageKey::new(SCOPE, &id, &d.data);
    let gateway = gateway.clone();
    let disposition = match consumer
        .process(key, move |_| async move { gateway.charge(&order).await })
        .await
    {
        Ok(processed) => {
            match &processed {
                Processed::Ran(receipt) => {
                    tracing::info!(%id, redelivered, ?receipt, "processed");
                }
                Processed::Replayed(receipt) => {
                    tracing::info!(%id, redelivered, ?receipt, "duplicate: replayed, not charged again");
                }
                Processed::Mismatch => {
                    tracing::warn!(%id, "message_id reused with another payload: rejected");
                }
                other => tracing::warn!(%id, outcome = other.as_str(), "not processed"),
            }
            processed.disposition()
        }
        Err(e) => {
            tracing::warn!(%id, error = %e, "handler failed; the message will be retried");
            Disposition::Retry
        }
    };
    settle(&d, disposition).await;
}

/// Tells the broker. A failure here is logged, not fatal: the broker
/// redelivers an unacked message, and the redelivery replays.
async fn settle(d: &Delivery, disposition: Disposition) {
    let tag = d.delivery_tag;
    let sent = match disposition {
        Disposition::Ack => d.ack(BasicAckOptions::default()).await,
        Disposition::Terminate => d.reject(BasicRejectOptions { requeue: false }).await,
        // Retry, and anything a later version adds: back to the queue.
        _ => {
            tokio::time::sleep(RETRY_DELAY).await;
            d.nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await
        }
    };
    match sent {
        Ok(true) => tracing::debug!(tag, ?disposition, "settled"),
        Ok(false) => tracing::warn!(
            tag,
            ?disposition,
            "the channel is gone; the broker will redeliver"
        ),
        Err(e) => {
            tracing::warn!(tag, ?disposition, error = %e, "settling failed; the broker will redeliver")
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "no SIGTERM handler; ctrl-c only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn env_number<N: std::str::FromStr>(name: &str, default: N) -> Result<N, Box<dyn Error>>
where
    N::Err: Error + 'static,
{
    match std::env::var(name) {
        Ok(v) => v.parse().map_err(|e| format!("{name}={v}: {e}").into()),
        Err(_) => Ok(default),
    }
}
