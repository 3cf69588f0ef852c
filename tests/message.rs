//! The message face on `MemoryStore` and a fault-injecting store: every
//! `Processed` outcome, the heartbeat hook, lease loss, codecs, the Tower
//! form and its key extractor, and a consumer that goes away mid-message.

#![cfg(all(feature = "test-util", feature = "json"))]
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tower::{Service, ServiceExt, service_fn};
use tower_idempotency::message::{
    BytesCodec, Codec, Disposition, IdempotentConsumer, JsonCodec, KeyExtractor, MessageKey,
    Processed,
};
use tower_idempotency::store::{Attachment, BoxError, StoreError};
use tower_idempotency::test_util::{Fault, FaultyStore, Op};
use tower_idempotency::{InFlightPolicy, MemoryStore, StoreErrorPolicy, store::Store};

#[derive(Clone, Default)]
struct Effects(Arc<AtomicUsize>);

impl Effects {
    fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// The side effect: counts, then answers with the count.
    fn charge(&self) -> impl Future<Output = Result<u64, BoxError>> + Send + use<> {
        let n = self.0.clone();
        async move { Ok(n.fetch_add(1, Ordering::SeqCst) as u64 + 1) }
    }
}

fn key(id: &str, payload: &str) -> MessageKey {
    MessageKey::new("billing", id, payload)
}

fn json_consumer(store: impl Store) -> IdempotentConsumer<JsonCodec> {
    IdempotentConsumer::new(store).with_codec(JsonCodec)
}

#[tokio::test]
async fn runs_once_and_replays_the_recorded_output() {
    let consumer = json_consumer(MemoryStore::new());
    let effects = Effects::default();
    let e = effects.clone();
    let first = consumer
        .process(key("m1", "{}"), move |_| e.charge())
        .await
        .unwrap();
    assert!(matches!(first, Processed::Ran(1)));
    for _ in 0..3 {
        let e = effects.clone();
        let again = consumer
            .process(key("m1", "{}"), move |_| e.charge())
            .await
            .unwrap();
        assert_eq!(again.disposition(), Disposition::Ack);
        assert!(matches!(again, Processed::Replayed(1)), "{again:?}");
    }
    assert_eq!(effects.count(), 1);
    // Another id runs; the same id in another scope runs too.
    let e = effects.clone();
    let other = consumer.process(key("m2", "{}"), move |_| e.charge());
    assert!(matches!(other.await.unwrap(), Processed::Ran(2)));
    let e = effects.clone();
    let scoped = MessageKey::new("shipping", "m1", "{}");
    let scoped = consumer.process(scoped, move |_| e.charge());
    assert!(matches!(scoped.await.unwrap(), Processed::Ran(3)));
}

#[tokio::test]
async fn a_reused_id_with_another_payload_never_runs() {
    let consumer = json_consumer(MemoryStore::new());
    let effects = Effects::default();
    let e = effects.clone();
    let _ = consumer
        .process(key("m1", r#"{"amount":1}"#), move |_| e.charge())
        .await
        .unwrap();
    let e = effects.clone();
    let reused = consumer
        .process(key("m1", r#"{"amount":2}"#), move |_| e.charge())
        .await
        .unwrap();
    assert!(matches!(reused, Processed::Mismatch));
    assert_eq!(reused.disposition(), Disposition::Terminate);
    assert_eq!(effects.count(), 1);
}

#[tokio::test]
async fn a_duplicate_in_flight_is_told_so_or_waits_and_replays() {
    let store = Arc::new(MemoryStore::new());
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let consumer = IdempotentConsumer::from_arc(store.clone()).with_codec(JsonCodec);
    let slow = tokio::spawn({
        let consumer = consumer.clone();
        async move {
            consumer
                .process(key("m1", "{}"), move |_| async move {
                    started_tx.send(()).unwrap();
                    finish_rx.await.unwrap();
                    Ok::<_, Infallible>(7u32)
                })
                .await
        }
    });
    started_rx.await.unwrap();
    let now = consumer
        .process(key("m1", "{}"), |_| async { Ok::<u32, Infallible>(0) })
        .await
        .unwrap();
    assert!(matches!(now, Processed::InFlight));
    assert_eq!(now.disposition(), Disposition::Retry);
    // A different payload under the same id is a mismatch even while the
    // first runs: MemoryStore reports the holder's fingerprint.
    let other = consumer
        .process(key("m1", "{\"x\":1}"), |_| async {
            Ok::<u32, Infallible>(0)
        })
        .await
        .unwrap();
    assert!(matches!(other, Processed::Mismatch));

    let waiting = IdempotentConsumer::from_arc(store.clone())
        .with_codec(JsonCodec)
        .with_in_flight(InFlightPolicy::Wait(Duration::from_secs(5)));
    let waiter = tokio::spawn(async move {
        waiting
            .process(key("m1", "{}"), |_| async { Ok::<u32, Infallible>(0) })
            .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    finish_tx.send(()).unwrap();
    assert!(matches!(slow.await.unwrap().unwrap(), Processed::Ran(7)));
    assert!(matches!(
        waiter.await.unwrap().unwrap(),
        Processed::Replayed(7)
    ));
}

#[tokio::test]
async fn a_handler_error_or_panic_releases_the_key() {
    let consumer = json_consumer(MemoryStore::new());
    let failed = consumer
        .process(key("m1", "{}"), |_| async {
            Err::<u32, _>("the payment provider timed out")
        })
        .await;
    assert_eq!(failed.unwrap_err(), "the payment provider timed out");
    let panicked = consumer
        .process(key("m1", "{}"), |_| async {
            if true {
                panic!("handler bug");
            }
            Ok::<u32, Infallible>(0)
        })
        .await
        .unwrap();
    assert!(matches!(panicked, Processed::Panicked));
    assert_eq!(panicked.disposition(), Disposition::Retry);
    // A panic while the handler's future is being made is caught too.
    let panicked = consumer
        .process(
            key("m1", "{}"),
            |_| -> std::future::Ready<Result<u32, Infallible>> {
                panic!("before the future exists")
            },
        )
        .await
        .unwrap();
    assert!(matches!(panicked, Processed::Panicked));
    // The key is free: the redelivery runs.
    let ran = consumer
        .process(key("m1", "{}"), |_| async { Ok::<u32, Infallible>(3) })
        .await
        .unwrap();
    assert!(matches!(ran, Processed::Ran(3)));
}

#[tokio::test]
async fn a_store_that_fails_first_runs_nothing_unless_told_to_fail_open() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    store.inject(Op::Begin, Fault::Fail, 2);
    let effects = Effects::default();
    let closed = IdempotentConsumer::from_arc(store.clone()).with_codec(JsonCodec);
    let e = effects.clone();
    let out = closed
        .process(key("m1", "{}"), move |_| e.charge())
        .await
        .unwrap();
    assert!(matches!(
        out,
        Processed::StoreError(StoreError::Unavailable(_))
    ));
    assert_eq!(out.disposition(), Disposition::Retry);
    assert_eq!(effects.count(), 0);
    let open = closed
        .clone()
        .with_store_error_policy(StoreErrorPolicy::FailOpen);
    let e = effects.clone();
    let out = open
        .process(key("m1", "{}"), move |_| e.charge())
        .await
        .unwrap();
    assert!(matches!(out, Processed::FailedOpen(1)));
    assert_eq!(effects.count(), 1);
}

#[tokio::test]
async fn a_failed_record_write_is_retried_in_the_background() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    store.inject(Op::Complete, Fault::Fail, 1);
    let consumer = IdempotentConsumer::from_arc(store.clone()).with_codec(JsonCodec);
    let out = consumer
        .process(key("m1", "{}"), |_| async { Ok::<u32, Infallible>(5) })
        .await
        .unwrap();
    // The handler ran: its output is the consumer's to act on.
    assert!(matches!(out, Processed::Ran(5)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.calls(Op::Complete), 2);
    let again = consumer
        .process(key("m1", "{}"), |_| async { Ok::<u32, Infallible>(0) })
        .await
        .unwrap();
    assert!(matches!(again, Processed::Replayed(5)));
}

/// The lease is extended while a slow handler runs, and the hook fires on
/// every extension: the place for a broker's in-progress ack.
#[tokio::test]
async fn the_heartbeat_extends_the_lease_and_calls_the_hook() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let consumer =
        IdempotentConsumer::from_arc(store.clone()).with_lease(Duration::from_millis(90));
    let beats = Arc::new(AtomicUsize::new(0));
    let b = beats.clone();
    let message = key("m1", "{}").with_heartbeat(move || {
        let b = b.clone();
        async move {
            b.fetch_add(1, Ordering::SeqCst);
        }
    });
    let slow = tokio::spawn({
        let consumer = consumer.clone();
        async move {
            consumer
                .process(message, |_| async {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    Ok::<_, Infallible>(())
                })
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(250)).await;
    // Well past the 90 ms lease, the first delivery still holds the key.
    let dup = consumer
        .process(key("m1", "{}"), |_| async { Ok::<_, Infallible>(()) })
        .await
        .unwrap();
    assert!(matches!(dup, Processed::InFlight), "{dup:?}");
    assert!(matches!(slow.await.unwrap().unwrap(), Processed::Ran(())));
    let extends = store.calls(Op::Extend);
    assert!(extends >= 3, "{extends} extensions");
    assert_eq!(
        beats.load(Ordering::SeqCst),
        extends,
        "a beat per extension"
    );
}

/// A heartbeat hook that never finishes (a broker that stopped answering)
/// is given a third of the lease, then the heartbeat goes on: the lease is
/// still extended on time and a duplicate still finds the key held.
#[tokio::test(start_paused = true)]
async fn a_hook_that_hangs_does_not_stall_the_heartbeat() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let consumer =
        IdempotentConsumer::from_arc(store.clone()).with_lease(Duration::from_millis(90));
    let message = key("m1", "{}").with_heartbeat(std::future::pending::<()>);
    let slow = tokio::spawn({
        let consumer = consumer.clone();
        async move {
            consumer
                .process(message, |_| async {
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    Ok::<_, Infallible>(())
                })
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(450)).await;
    let dup = consumer
        .process(key("m1", "{}"), |_| async { Ok::<_, Infallible>(()) })
        .await
        .unwrap();
    assert!(matches!(dup, Processed::InFlight), "{dup:?}");
    assert!(matches!(slow.await.unwrap().unwrap(), Processed::Ran(())));
    // A beat every 30 ms, each waiting 30 ms on the hook: one per 60 ms.
    let extends = store.calls(Op::Extend);
    assert!(extends >= 7, "{extends} extensions in 600 ms");
}

/// A handler whose lease lapsed (the store refused every extension) and
/// was taken over learns that it was fenced out: its output is not
/// recorded, and it must not ack.
#[tokio::test]
async fn a_handler_fenced_out_is_told_its_lease_was_lost() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let consumer = IdempotentConsumer::from_arc(store.clone())
        .with_codec(JsonCodec)
        .with_lease(Duration::from_millis(60));
    store.inject(Op::Extend, Fault::Fail, 3);
    let (taken_tx, taken_rx) = tokio::sync::oneshot::channel::<()>();
    let slow = tokio::spawn({
        let consumer = consumer.clone();
        async move {
            consumer
                .process(key("m1", "{}"), |_| async {
                    taken_rx.await.unwrap();
                    // Let one more heartbeat find the lock taken over.
                    tokio::time::sleep(Duration::from_millis(60)).await;
                    Ok::<_, Infallible>(1u32)
                })
                .await
        }
    });
    // The extensions fail, the lease lapses, a redelivery takes the key.
    let mut takeover = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let out = consumer
            .process(key("m1", "{}"), |_| async { Ok::<_, Infallible>(2u32) })
            .await
            .unwrap();
        if !matches!(out, Processed::InFlight) {
            takeover = Some(out);
            break;
        }
    }
    assert!(matches!(takeover, Some(Processed::Ran(2))), "{takeover:?}");
    taken_tx.send(()).unwrap();
    let fenced = slow.await.unwrap().unwrap();
    assert!(matches!(fenced, Processed::LeaseLost(1)), "{fenced:?}");
    assert_eq!(fenced.disposition(), Disposition::Retry);
    // The heartbeat already learned the lease was lost: the fenced-out
    // output is never offered to the store, only the takeover's is.
    assert_eq!(store.calls(Op::Complete), 1);
    // The record is the one that held the lock.
    let replay = consumer
        .process(key("m1", "{}"), |_| async { Ok::<_, Infallible>(0u32) })
        .await
        .unwrap();
    assert!(matches!(replay, Processed::Replayed(2)));
}

/// A codec that cannot encode some outputs, and cannot decode anything.
struct Picky;

impl Codec<u32> for Picky {
    fn encode(&self, value: &u32) -> Result<Bytes, BoxError> {
        if *value == 13 {
            Err("unlucky".into())
        } else {
            Ok(Bytes::from(value.to_string()))
        }
    }

    fn decode(&self, _: &Bytes) -> Result<u32, BoxError> {
        Err("cannot read".into())
    }
}

#[tokio::test]
async fn codec_failures_never_run_the_handler_twice() {
    let consumer = IdempotentConsumer::new(MemoryStore::new()).with_codec(Picky);
    let effects = Effects::default();
    let run = |id: &'static str, out: u32| {
        let e = effects.clone();
        consumer.process(key(id, "{}"), move |_| {
            let charged = e.charge();
            async move {
                charged.await?;
                Ok::<u32, BoxError>(out)
            }
        })
    };
    // Not encodable: done all the same; the redelivery is told so.
    assert!(matches!(run("m1", 13).await.unwrap(), Processed::Ran(13)));
    let again = run("m1", 13).await.unwrap();
    assert!(matches!(again, Processed::AlreadyDone));
    assert_eq!(again.disposition(), Disposition::Ack);
    // Not decodable: fail closed, never run again.
    assert!(matches!(run("m2", 1).await.unwrap(), Processed::Ran(1)));
    let unreadable = run("m2", 1).await.unwrap();
    assert!(matches!(
        unreadable,
        Processed::StoreError(StoreError::Undecodable(_))
    ));
    assert_eq!(effects.count(), 2);
}

#[tokio::test]
async fn bytes_and_unit_codecs_round_trip() {
    let bytes = IdempotentConsumer::new(MemoryStore::new()).with_codec(BytesCodec);
    let body = Bytes::from_static(b"\x00\xffreceipt");
    for expect_replay in [false, true] {
        let b = body.clone();
        let out = bytes
            .process(
                key("m1", "p"),
                move |_| async move { Ok::<_, Infallible>(b) },
            )
            .await
            .unwrap();
        assert_eq!(matches!(out, Processed::Replayed(_)), expect_replay);
        assert_eq!(out.into_output().unwrap(), body);
    }
    let unit = IdempotentConsumer::new(MemoryStore::new());
    let out = unit
        .process(key("m1", "p"), |_| async { Ok::<_, Infallible>(()) })
        .await
        .unwrap();
    assert_eq!(out.as_str(), "ran");
}

/// Once the lock is taken, dropping the caller's future does not cancel
/// the handler: it finishes in the background and its record answers the
/// redelivery.
#[tokio::test]
async fn a_consumer_that_goes_away_mid_message_still_records_it() {
    let consumer = json_consumer(MemoryStore::new());
    let effects = Effects::default();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let e = effects.clone();
    let fut = consumer.process(key("m1", "{}"), move |_| async move {
        started_tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        e.charge().await
    });
    let mut fut = Box::pin(fut);
    tokio::select! {
        _ = &mut fut => panic!("finished too early"),
        _ = started_rx => {}
    }
    drop(fut);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(effects.count(), 1, "the handler ran to its end");
    let e = effects.clone();
    let again = consumer
        .process(key("m1", "{}"), move |_| e.charge())
        .await
        .unwrap();
    assert!(matches!(again, Processed::Replayed(1)));
}

/// A message type of the user's own, with room for the store's attachment.
#[derive(Debug)]
struct Msg {
    id: Option<String>,
    payload: String,
    attachment: Option<Attachment>,
}

struct ById;

impl KeyExtractor<Msg> for ById {
    fn extract(&self, m: &Msg) -> Result<MessageKey, BoxError> {
        let id = m.id.as_deref().ok_or("the message has no id")?;
        Ok(MessageKey::new("billing", id, &m.payload))
    }

    fn attach(&self, m: &mut Msg, attachment: Attachment) {
        m.attachment = Some(attachment);
    }
}

/// A store that hands every holder an attachment, to see it arrive.
struct Attaching(MemoryStore);

#[derive(Clone, Debug, PartialEq)]
struct Note(&'static str);

#[async_trait::async_trait]
impl Store for Attaching {
    async fn begin(
        &self,
        key: &tower_idempotency::store::StoreKey,
        fp: &tower_idempotency::fingerprint::Fingerprint,
        lease: Duration,
    ) -> Result<tower_idempotency::store::Begin, StoreError> {
        self.0.begin(key, fp, lease).await
    }
    async fn complete(
        &self,
        key: &tower_idempotency::store::StoreKey,
        token: &tower_idempotency::store::LockToken,
        record: &tower_idempotency::record::Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.0.complete(key, token, record, ttl).await
    }
    async fn release(
        &self,
        key: &tower_idempotency::store::StoreKey,
        token: &tower_idempotency::store::LockToken,
    ) -> Result<bool, StoreError> {
        self.0.release(key, token).await
    }
    async fn extend(
        &self,
        key: &tower_idempotency::store::StoreKey,
        token: &tower_idempotency::store::LockToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.0.extend(key, token, lease).await
    }
    fn attachment(
        &self,
        _: &tower_idempotency::store::StoreKey,
        _: &tower_idempotency::store::LockToken,
    ) -> Option<Attachment> {
        Some(Attachment::new(Note("in the transaction")))
    }
}

#[tokio::test]
async fn the_tower_form_keys_rejects_and_hands_over_the_attachment() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let layer = IdempotentConsumer::new(Attaching(MemoryStore::new()))
        .with_codec(JsonCodec)
        .layer(ById);
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(move |m: Msg| {
            let c = c.clone();
            async move {
                let note = m.attachment.as_ref().and_then(|a| a.get::<Note>().cloned());
                assert_eq!(note, Some(Note("in the transaction")));
                Ok::<_, Infallible>(c.fetch_add(1, Ordering::SeqCst) as u32)
            }
        }));
    let msg = |id: Option<&str>| Msg {
        id: id.map(str::to_owned),
        payload: "{}".into(),
        attachment: None,
    };
    let out = svc
        .ready()
        .await
        .unwrap()
        .call(msg(Some("a")))
        .await
        .unwrap();
    assert!(matches!(out, Processed::Ran(0)));
    let out = svc
        .ready()
        .await
        .unwrap()
        .call(msg(Some("a")))
        .await
        .unwrap();
    assert!(matches!(out, Processed::Replayed(0)));
    let out = svc.ready().await.unwrap().call(msg(None)).await.unwrap();
    assert!(matches!(&out, Processed::Rejected(e) if e.to_string() == "the message has no id"));
    assert_eq!(out.disposition(), Disposition::Terminate);
    let out = svc.clone().oneshot(msg(Some("b"))).await.unwrap();
    assert!(matches!(out, Processed::Ran(1)));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// Concurrent deliveries of the same ids, as two consumers on one durable
/// would see them: every id runs exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_redeliveries_run_each_id_once() {
    let consumer = json_consumer(MemoryStore::new())
        .with_in_flight(InFlightPolicy::Wait(Duration::from_secs(5)));
    let per_id: Arc<Vec<AtomicUsize>> = Arc::new((0..50).map(|_| AtomicUsize::new(0)).collect());
    let mut tasks = Vec::new();
    for _round in 0..4 {
        for id in 0..50usize {
            let consumer = consumer.clone();
            let per_id = per_id.clone();
            tasks.push(tokio::spawn(async move {
                let m = MessageKey::new("billing", id.to_string(), "{}");
                consumer
                    .process(m, move |_| async move {
                        tokio::time::sleep(Duration::from_millis((id % 5) as u64)).await;
                        per_id[id].fetch_add(1, Ordering::SeqCst);
                        Ok::<_, Infallible>(id)
                    })
                    .await
                    .unwrap()
            }));
        }
    }
    for task in tasks {
        let out = task.await.unwrap();
        assert_eq!(out.disposition(), Disposition::Ack, "{out:?}");
    }
    assert!(per_id.iter().all(|n| n.load(Ordering::SeqCst) == 1));
}
