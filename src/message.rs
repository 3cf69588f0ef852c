//! The message face: exactly-once processing for queue consumers.
//!
//! Brokers deliver at least once. NATS JetStream, RabbitMQ, Kafka and SQS
//! all redeliver a message whose consumer crashed before its ack, whose ack
//! wait ran out, or whose producer retried. The message face runs each
//! message id once on the same stores and the same engine as the HTTP
//! layer, records the handler's output, and hands that record back to every
//! redelivery.
//!
//! | piece | what it is |
//! |---|---|
//! | [`MessageKey`] | the store key (a scope and the message id, hashed), the fingerprint (the payload, hashed), and an optional heartbeat hook |
//! | [`Codec`] | how the handler's output becomes a record and back: [`UnitCodec`] for "done", [`BytesCodec`], `JsonCodec` (feature `json`) |
//! | [`IdempotentConsumer`] | the settings and the plain async-function form, [`process`](IdempotentConsumer::process) |
//! | [`MessageLayer`] | the Tower form over any `Service<Msg>`, with a [`KeyExtractor`] |
//! | [`Processed`] | what happened, and its [`Disposition`]: ack, retry later, or terminate |
//!
//! No broker crate is a dependency: the consumer loop is yours (see the
//! `consumer` and `rabbitmq` examples), the engine is this crate's.
//!
//! # Example
//!
//! ```
//! use tower_idempotency::MemoryStore;
//! use tower_idempotency::message::{Disposition, IdempotentConsumer, MessageKey, Processed};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! async fn charge(amount: u64) -> Result<(), std::io::Error> {
//!     println!("charged {amount}");
//!     Ok(())
//! }
//!
//! let consumer = IdempotentConsumer::new(MemoryStore::new());
//! // The broker delivers the same message twice.
//! let delivery = || MessageKey::new("billing", "msg-1", br#"{"amount":42}"#);
//!
//! let first = consumer.process(delivery(), |_| charge(42)).await.unwrap();
//! assert!(matches!(first, Processed::Ran(())));
//! let again = consumer.process(delivery(), |_| charge(42)).await.unwrap();
//! assert!(matches!(again, Processed::Replayed(())), "charged once");
//! assert_eq!(again.disposition(), Disposition::Ack);
//!
//! // The same id with another payload never runs.
//! let reused = MessageKey::new("billing", "msg-1", br#"{"amount":1000}"#);
//! let reused = consumer.process(reused, |_| charge(1000)).await.unwrap();
//! assert_eq!(reused.disposition(), Disposition::Terminate);
//! # }
//! ```
//!
//! # What each store guarantees for messages
//!
//! | store | a crash after the side effect, before the record |
//! |---|---|
//! | [`TransactionalPostgresStore`](crate::store::postgres::TransactionalPostgresStore) | the side effect and the record commit in one transaction: exactly once |
//! | every other store | the lock expires with its lease and the redelivery runs again: at least once between effect and record |
//!
//! # Poison messages
//!
//! A handler that fails or panics on every delivery releases its key each
//! time, and [`Disposition::Retry`] sends it back to the broker: cap the
//! deliveries there (JetStream's `max_deliver`, a RabbitMQ quorum queue's
//! `x-delivery-limit` or a dead-letter exchange), as with any consumer.
//!
//! With any store, a duplicate delivered while the first still runs gets
//! [`Processed::InFlight`] (or waits, with [`InFlightPolicy::Wait`]), and a
//! message id reused with another payload gets [`Processed::Mismatch`] and
//! never runs.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use sha2::{Digest, Sha256};
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;

use crate::engine::{
    Acquired, Beat, Completion, Engine, Executed, InFlightPolicy, StoreErrorPolicy,
};
use crate::fingerprint::Fingerprint;
use crate::future::Detached;
use crate::observe::mark_message;
use crate::record::{Record, RecordKind};
use crate::store::{Attachment, BoxError, Store, StoreError, StoreKey};

/// Which message this is, as the engine sees it: the store key (a hash of
/// the scope and the message id), the fingerprint (a hash of the payload),
/// and an optional heartbeat hook.
///
/// ```
/// use tower_idempotency::message::MessageKey;
///
/// let a = MessageKey::new("billing", "msg-1", b"{\"amount\":1}");
/// let b = MessageKey::new("shipping", "msg-1", b"{\"amount\":1}");
/// assert_ne!(a.store_key(), b.store_key(), "each scope processes the message once");
/// assert_eq!(a.fingerprint(), b.fingerprint());
/// ```
#[derive(Clone)]
pub struct MessageKey {
    key: StoreKey,
    fingerprint: Fingerprint,
    heartbeat: Option<Beat>,
}

impl fmt::Debug for MessageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageKey")
            .field("key", &self.key)
            .field("fingerprint", &self.fingerprint)
            .field("heartbeat", &self.heartbeat.is_some())
            .finish()
    }
}

impl MessageKey {
    /// The key of message `id` in `scope` (a consumer or handler name:
    /// two scopes each process a message once), fingerprinted by its
    /// `payload`. Neither the id nor the payload is stored: only their
    /// SHA-256 hashes.
    pub fn new(scope: &str, id: impl AsRef<[u8]>, payload: impl AsRef<[u8]>) -> Self {
        let id = id.as_ref();
        let key = Sha256::new()
            .chain_update(b"tower-idempotency/message-key/v1\0")
            .chain_update((scope.len() as u64).to_be_bytes())
            .chain_update(scope.as_bytes())
            .chain_update(id)
            .finalize();
        let fingerprint = Sha256::new()
            .chain_update(b"tower-idempotency/message-payload/v1\0")
            .chain_update(payload.as_ref())
            .finalize();
        Self::from_parts(
            StoreKey::from_bytes(key.into()),
            Fingerprint::from_bytes(fingerprint.into()),
        )
    }

    /// A key from a store key and a fingerprint computed elsewhere (for
    /// example a fingerprint over selected fields of the payload).
    pub fn from_parts(key: StoreKey, fingerprint: Fingerprint) -> Self {
        Self {
            key,
            fingerprint,
            heartbeat: None,
        }
    }

    /// Calls `beat` every time the engine extends the lease while the
    /// handler runs (every third of the lease): the place to tell the
    /// broker the message is still being worked on, such as JetStream's
    /// in-progress ack (`AckKind::Progress`). Each call is bounded by a
    /// third of the lease.
    ///
    /// The hook fires every third of the consumer's lease
    /// ([`IdempotentConsumer::with_lease`]): keep the lease no longer than
    /// the broker's own deadline (JetStream's `ack_wait`), or the broker
    /// redelivers before the first beat.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// use std::time::Duration;
    /// use tower_idempotency::MemoryStore;
    /// use tower_idempotency::message::{IdempotentConsumer, MessageKey};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let beats = Arc::new(AtomicU32::new(0));
    /// let counter = beats.clone();
    /// let key = MessageKey::new("billing", "msg-1", b"{}").with_heartbeat(move || {
    ///     let counter = counter.clone();
    ///     // In a real consumer: `message.ack_with(AckKind::Progress).await`.
    ///     async move { counter.fetch_add(1, Ordering::Relaxed); }
    /// });
    ///
    /// let consumer = IdempotentConsumer::new(MemoryStore::new()).with_lease(Duration::from_secs(30));
    /// let slow = |_| async {
    ///     tokio::time::sleep(Duration::from_secs(25)).await;
    ///     Ok::<_, std::io::Error>(())
    /// };
    /// let _ = consumer.process(key, slow).await.unwrap();
    /// assert_eq!(beats.load(Ordering::Relaxed), 2, "after 10 s and after 20 s");
    /// # }
    /// ```
    #[must_use]
    pub fn with_heartbeat<F, Fut>(mut self, beat: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.heartbeat = Some(Arc::new(move || Box::pin(beat())));
        self
    }

    /// The key the store files the record under.
    pub fn store_key(&self) -> &StoreKey {
        &self.key
    }

    /// The payload's fingerprint.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }
}

/// Turns a handler's output into the bytes of a record, and back for a
/// replay.
///
/// An output the codec cannot encode still counts as done: a tombstone is
/// recorded and redeliveries get [`Processed::AlreadyDone`]. A record it
/// cannot decode fails closed, as [`Processed::StoreError`] with
/// [`StoreError::Undecodable`]: the handler never runs again for it.
pub trait Codec<T>: Send + Sync + 'static {
    /// The record's bytes for `value`.
    fn encode(&self, value: &T) -> Result<Bytes, BoxError>;
    /// The value back from a record's bytes.
    fn decode(&self, bytes: &Bytes) -> Result<T, BoxError>;
}

/// The codec for `()`: the record says "done" and nothing more.
#[derive(Debug, Clone, Copy, Default)]
pub struct UnitCodec;

impl Codec<()> for UnitCodec {
    fn encode(&self, _: &()) -> Result<Bytes, BoxError> {
        Ok(Bytes::new())
    }

    fn decode(&self, bytes: &Bytes) -> Result<(), BoxError> {
        if bytes.is_empty() {
            Ok(())
        } else {
            Err("a unit record holds bytes".into())
        }
    }
}

/// The codec for raw bytes: the output is the record.
#[derive(Debug, Clone, Copy, Default)]
pub struct BytesCodec;

impl Codec<Bytes> for BytesCodec {
    fn encode(&self, value: &Bytes) -> Result<Bytes, BoxError> {
        Ok(value.clone())
    }

    fn decode(&self, bytes: &Bytes) -> Result<Bytes, BoxError> {
        Ok(bytes.clone())
    }
}

/// The codec for any serde type, as JSON.
///
/// ```
/// # #[cfg(feature = "json")] {
/// use tower_idempotency::message::{Codec, JsonCodec};
///
/// #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
/// struct Charge { id: u64 }
///
/// let bytes = JsonCodec.encode(&Charge { id: 7 }).unwrap();
/// assert_eq!(bytes, r#"{"id":7}"#);
/// assert_eq!(Codec::<Charge>::decode(&JsonCodec, &bytes).unwrap(), Charge { id: 7 });
/// # }
/// ```
#[cfg(feature = "json")]
#[cfg_attr(docsrs, doc(cfg(feature = "json")))]
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonCodec;

#[cfg(feature = "json")]
impl<T> Codec<T> for JsonCodec
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    fn encode(&self, value: &T) -> Result<Bytes, BoxError> {
        Ok(serde_json::to_vec(value)?.into())
    }

    fn decode(&self, bytes: &Bytes) -> Result<T, BoxError> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

/// What became of one message, and what to tell the broker: see
/// [`disposition`](Self::disposition).
///
/// A handler's own error is not here: it releases the key and comes back
/// as the `Err` of [`process`](IdempotentConsumer::process) (the service's
/// error, for [`MessageLayer`]), so a redelivery runs it again.
#[derive(Debug)]
#[non_exhaustive]
#[must_use]
pub enum Processed<T> {
    /// The handler ran, and this is its output; the record is written (or
    /// being retried in the background after a store failure).
    Ran(T),
    /// A redelivery: the handler ran before, and this is its recorded
    /// output. It did not run now.
    Replayed(T),
    /// A redelivery of a message whose handler ran, but whose output was
    /// not kept (its codec could not encode it).
    AlreadyDone,
    /// Another delivery of this message is being processed now: retry
    /// later (the redelivery then replays).
    InFlight,
    /// The message id was used before with another payload: it never ran,
    /// and never will under this id.
    Mismatch,
    /// The handler ran, but its lease was taken over while it ran (it was
    /// slower than the lease and the heartbeat could not extend it): its
    /// record was not written. Do not ack: the holder that took over
    /// decides.
    LeaseLost(T),
    /// The handler ran on a transactional store, but the record could not
    /// be committed: its writes were rolled back with it. Nothing happened;
    /// retry.
    RolledBack,
    /// The handler panicked; the key was released so that a redelivery
    /// runs it again.
    Panicked,
    /// The key extractor refused the message (no id, a payload it cannot
    /// read). It did not run.
    Rejected(BoxError),
    /// The store failed before the handler ran (or a record could not be
    /// read): it did not run. Retry later.
    StoreError(StoreError),
    /// The store failed and the store-error policy is
    /// [`StoreErrorPolicy::FailOpen`]: the handler ran without protection.
    FailedOpen(T),
}

/// What a consumer should tell the broker about a [`Processed`] message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Disposition {
    /// Done (now or before): acknowledge it.
    Ack,
    /// Not done, or not known to be: leave it for redelivery (a negative
    /// ack with a delay, or no ack at all).
    Retry,
    /// It can never be processed: terminate it (JetStream's `Term`, a
    /// RabbitMQ reject without requeue, a dead-letter queue).
    Terminate,
}

impl<T> Processed<T> {
    /// What to tell the broker.
    pub fn disposition(&self) -> Disposition {
        match self {
            Self::Ran(_) | Self::Replayed(_) | Self::AlreadyDone | Self::FailedOpen(_) => {
                Disposition::Ack
            }
            Self::Mismatch | Self::Rejected(_) => Disposition::Terminate,
            Self::InFlight
            | Self::LeaseLost(_)
            | Self::RolledBack
            | Self::Panicked
            | Self::StoreError(_) => Disposition::Retry,
        }
    }

    /// The handler's output, from this run or a recorded one, if there is
    /// one.
    pub fn into_output(self) -> Option<T> {
        match self {
            Self::Ran(v) | Self::Replayed(v) | Self::LeaseLost(v) | Self::FailedOpen(v) => Some(v),
            _ => None,
        }
    }

    /// A short name for logs and metrics: `ran`, `replayed`, and so on.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Ran(_) => "ran",
            Self::Replayed(_) => "replayed",
            Self::AlreadyDone => "already_done",
            Self::InFlight => "in_flight",
            Self::Mismatch => "mismatch",
            Self::LeaseLost(_) => "lease_lost",
            Self::RolledBack => "rolled_back",
            Self::Panicked => "panicked",
            Self::Rejected(_) => "rejected",
            Self::StoreError(_) => "store_error",
            Self::FailedOpen(_) => "failed_open",
        }
    }
}

/// The message face's settings over a store, and its plain async-function
/// form. Cheap to clone; see the [module docs](self) for an example.
///
/// | setting | default |
/// |---|---|
/// | [`with_codec`](Self::with_codec) | [`UnitCodec`]: the handler returns `()` |
/// | [`with_ttl`](Self::with_ttl) | 24 hours: keep it longer than the broker may redeliver |
/// | [`with_lease`](Self::with_lease) | 30 seconds, renewed while the handler runs |
/// | [`with_in_flight`](Self::with_in_flight) | [`InFlightPolicy::Reject`]: [`Processed::InFlight`] at once |
/// | [`with_store_error_policy`](Self::with_store_error_policy) | [`StoreErrorPolicy::FailClosed`] |
/// | [`with_store_timeout`](Self::with_store_timeout) | 2 seconds per store call |
/// | [`with_write_retries`](Self::with_write_retries) | 8 background retries of a failed record write or release |
pub struct IdempotentConsumer<C = UnitCodec> {
    engine: Engine,
    codec: Arc<C>,
}

impl<C> Clone for IdempotentConsumer<C> {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            codec: self.codec.clone(),
        }
    }
}

impl<C> fmt::Debug for IdempotentConsumer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotentConsumer")
            .field("settings", &self.engine.settings)
            .field("codec", &std::any::type_name::<C>())
            .finish_non_exhaustive()
    }
}

impl IdempotentConsumer {
    /// A consumer over `store` with the default settings.
    pub fn new(store: impl Store) -> Self {
        Self::from_arc(Arc::new(store))
    }

    /// A consumer over a store that is already shared (with an HTTP layer,
    /// say).
    pub fn from_arc(store: Arc<dyn Store>) -> Self {
        Self {
            engine: Engine::new(store),
            codec: Arc::new(UnitCodec),
        }
    }
}

impl<C> IdempotentConsumer<C> {
    /// Records the handler's output with `codec`, so that a redelivery
    /// gets it back in [`Processed::Replayed`].
    ///
    /// ```
    /// use bytes::Bytes;
    /// use tower_idempotency::MemoryStore;
    /// use tower_idempotency::message::{BytesCodec, IdempotentConsumer, MessageKey, Processed};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let consumer = IdempotentConsumer::new(MemoryStore::new()).with_codec(BytesCodec);
    /// let delivery = || MessageKey::new("billing", "msg-1", br#"{"amount":42}"#);
    /// let charge = |_| async { Ok::<_, std::io::Error>(Bytes::from("receipt-17")) };
    ///
    /// let _ = consumer.process(delivery(), charge).await.unwrap();
    /// let again = consumer.process(delivery(), charge).await.unwrap();
    /// assert!(matches!(again, Processed::Replayed(receipt) if receipt == "receipt-17"));
    /// # }
    /// ```
    pub fn with_codec<C2>(self, codec: C2) -> IdempotentConsumer<C2> {
        IdempotentConsumer {
            engine: self.engine,
            codec: Arc::new(codec),
        }
    }

    /// How long a record answers redeliveries (default 24 hours). Keep it
    /// longer than the broker may redeliver or a producer may resend.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::MemoryStore;
    /// use tower_idempotency::message::{IdempotentConsumer, MessageKey, Processed};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let consumer = IdempotentConsumer::new(MemoryStore::new()).with_ttl(Duration::from_secs(60 * 60));
    /// let delivery = || MessageKey::new("billing", "msg-1", b"{}");
    /// let charge = |_| async { Ok::<_, std::io::Error>(()) };
    ///
    /// let _ = consumer.process(delivery(), charge).await.unwrap();
    /// tokio::time::advance(Duration::from_secs(2 * 60 * 60)).await;
    /// let late = consumer.process(delivery(), charge).await.unwrap();
    /// assert!(matches!(late, Processed::Ran(())), "the record expired: it ran again");
    /// # }
    /// ```
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.engine.settings.ttl = ttl;
        self
    }

    /// How long a lock lives without a heartbeat (default 30 seconds,
    /// at least 30 ms). The engine extends it every third of it while the
    /// handler runs, so only a crashed consumer's lock runs out.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::MemoryStore;
    /// use tower_idempotency::message::IdempotentConsumer;
    ///
    /// // The broker's ack wait is 20 s: a crashed consumer's lock must be gone by then.
    /// let consumer = IdempotentConsumer::new(MemoryStore::new()).with_lease(Duration::from_secs(20));
    /// # let _ = consumer;
    /// ```
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.engine.settings.set_lease(lease);
        self
    }

    /// What a duplicate gets while the first delivery still runs (default
    /// [`InFlightPolicy::Reject`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::{InFlightPolicy, MemoryStore};
    /// use tower_idempotency::message::IdempotentConsumer;
    ///
    /// // A duplicate waits up to 10 s for the first delivery's output.
    /// let consumer = IdempotentConsumer::new(MemoryStore::new())
    ///     .with_in_flight(InFlightPolicy::Wait(Duration::from_secs(10)));
    /// # let _ = consumer;
    /// ```
    #[must_use]
    pub fn with_in_flight(mut self, policy: InFlightPolicy) -> Self {
        self.engine.settings.in_flight = policy;
        self
    }

    /// What happens when the store fails (default
    /// [`StoreErrorPolicy::FailClosed`]).
    ///
    /// ```
    /// use tower_idempotency::{MemoryStore, StoreErrorPolicy};
    /// use tower_idempotency::message::IdempotentConsumer;
    ///
    /// // Process messages unprotected while the store is down: `Processed::FailedOpen`.
    /// let consumer = IdempotentConsumer::new(MemoryStore::new())
    ///     .with_store_error_policy(StoreErrorPolicy::FailOpen);
    /// # let _ = consumer;
    /// ```
    #[must_use]
    pub fn with_store_error_policy(mut self, policy: StoreErrorPolicy) -> Self {
        self.engine.settings.on_store_error = policy;
        self
    }

    /// Bounds every store call (default 2 seconds).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::MemoryStore;
    /// use tower_idempotency::message::IdempotentConsumer;
    ///
    /// let consumer = IdempotentConsumer::new(MemoryStore::new())
    ///     .with_store_timeout(Duration::from_millis(500));
    /// # let _ = consumer;
    /// ```
    #[must_use]
    pub fn with_store_timeout(mut self, timeout: Duration) -> Self {
        self.engine.settings.store_timeout = timeout;
        self
    }

    /// How many more times a failed store write is retried in the
    /// background (default 8): both the `complete` that records the
    /// handler's output and the `release` that frees the key after a
    /// handler error or panic. The retries back off exponentially from
    /// 50 ms, each wait at most a quarter of the lease; `0` disables them.
    /// A transactional store's failed `complete` is never retried (the
    /// handler's writes were rolled back).
    ///
    /// ```
    /// use tower_idempotency::MemoryStore;
    /// use tower_idempotency::message::IdempotentConsumer;
    ///
    /// let consumer = IdempotentConsumer::new(MemoryStore::new()).with_write_retries(3);
    /// # let _ = consumer;
    /// ```
    #[must_use]
    pub fn with_write_retries(mut self, retries: u32) -> Self {
        self.engine.settings.complete_retries = retries;
        self
    }

    /// The old name of [`with_write_retries`](Self::with_write_retries),
    /// which it calls: it governs `release` as well as `complete`.
    #[must_use]
    #[deprecated(
        since = "0.1.0",
        note = "use with_write_retries: it also governs release"
    )]
    pub fn with_complete_retries(self, retries: u32) -> Self {
        self.with_write_retries(retries)
    }

    /// A Tower layer that runs every message through this consumer, keyed
    /// by `keys`.
    pub fn layer<K>(&self, keys: K) -> MessageLayer<K, C> {
        MessageLayer {
            consumer: self.clone(),
            keys: Arc::new(keys),
        }
    }

    /// Processes one message: runs `handler` once for its key, and replays
    /// its recorded output to every redelivery.
    ///
    /// The handler receives the store's [`Attachment`], if it has one: the
    /// open transaction of a
    /// [`TransactionalPostgresStore`](crate::store::postgres::TransactionalPostgresStore)
    /// (`attachment.get::<IdempotentTransaction>()`), on which its writes
    /// commit together with the record.
    ///
    /// Once the lock is taken the handler runs to its end even if this
    /// future is dropped (it moves to a spawned task), so a consumer that
    /// stops mid-message still records what it did. A handler's `Err`
    /// releases the key and is returned as it is.
    pub async fn process<T, E, F, Fut>(
        &self,
        key: MessageKey,
        handler: F,
    ) -> Result<Processed<T>, E>
    where
        C: Codec<T>,
        T: Send + 'static,
        E: Send + 'static,
        F: FnOnce(Option<Attachment>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        self.detached(key, handler).await
    }

    fn detached<T, E, F, Fut>(
        &self,
        key: MessageKey,
        handler: F,
    ) -> Detached<Result<Processed<T>, E>>
    where
        C: Codec<T>,
        T: Send + 'static,
        E: Send + 'static,
        F: FnOnce(Option<Attachment>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let span = tracing::info_span!(
            "idempotency_message",
            key = %key.key,
            outcome = tracing::field::Empty,
            store_us = tracing::field::Empty,
        );
        let engine = self.engine.clone();
        let codec = self.codec.clone();
        let run = async move {
            let out = run(engine, codec, key, handler).await;
            mark_message(match &out {
                Ok(processed) => processed.as_str(),
                Err(_) => "released",
            });
            out
        };
        Detached::new(Box::pin(run.instrument(span)))
    }
}

/// The whole path of one message through the engine.
async fn run<T, E, C, F, Fut>(
    engine: Engine,
    codec: Arc<C>,
    key: MessageKey,
    handler: F,
) -> Result<Processed<T>, E>
where
    C: Codec<T>,
    F: FnOnce(Option<Attachment>) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let MessageKey {
        key,
        fingerprint,
        heartbeat,
    } = key;
    let token = match engine.acquire(&key, &fingerprint).await {
        Acquired::Lock(token) => token,
        Acquired::Replay(record) => return Ok(replay(&*codec, &key, &record)),
        Acquired::Mismatch => return Ok(Processed::Mismatch),
        Acquired::InFlight => return Ok(Processed::InFlight),
        Acquired::Failed(e) => return Ok(Processed::StoreError(e)),
        Acquired::FailOpen => {
            tracing::warn!(key = %key, outcome = "failed_open", "store failed; the message runs without idempotency");
            return handler(None).await.map(Processed::FailedOpen);
        }
    };
    let attachment = engine.attachment(&key, &token);
    let (output, lease_held) = match engine
        .execute(&key, &token, || handler(attachment), heartbeat.as_ref())
        .await
    {
        Executed::Done {
            output: Ok(output),
            lease_held,
        } => (output, lease_held),
        Executed::Done { output: Err(e), .. } => {
            tracing::debug!(key = %key, outcome = "released", "handler failed; the key is released");
            engine.release(&key, &token).await;
            return Err(e);
        }
        Executed::Panicked => {
            tracing::error!(key = %key, outcome = "released", "handler panicked; the key is released");
            engine.release(&key, &token).await;
            return Ok(Processed::Panicked);
        }
    };
    if !lease_held {
        // Fenced out: the record could not be written. A transactional
        // store rolls the handler's writes back here.
        engine.release(&key, &token).await;
        return Ok(Processed::LeaseLost(output));
    }
    let record = match codec.encode(&output) {
        Ok(bytes) => Record::value(fingerprint, bytes),
        Err(e) => {
            tracing::warn!(key = %key, error = %e, "the codec could not encode the output; a tombstone is recorded instead");
            Record::tombstone(fingerprint, StatusCode::OK, Vec::new())
        }
    };
    let completion = engine
        .complete(&key, &token, &record, engine.settings.ttl)
        .await;
    Ok(match completion {
        Completion::Written | Completion::Deferred => {
            tracing::debug!(key = %key, outcome = "executed");
            Processed::Ran(output)
        }
        Completion::LeaseLost => Processed::LeaseLost(output),
        Completion::RolledBack => Processed::RolledBack,
    })
}

fn replay<T, C: Codec<T>>(codec: &C, key: &StoreKey, record: &Record) -> Processed<T> {
    match record.kind() {
        RecordKind::Value => match codec.decode(record.body()) {
            Ok(value) => Processed::Replayed(value),
            Err(e) => {
                let e = StoreError::Undecodable(e);
                tracing::error!(key = %key, error = %e, "a recorded value could not be decoded; failing closed");
                Processed::StoreError(e)
            }
        },
        RecordKind::Tombstone => Processed::AlreadyDone,
        // An HTTP response under a message key: not this face's record.
        _ => Processed::Mismatch,
    }
}

/// Finds a message's [`MessageKey`] for [`MessageLayer`], and hands the
/// handler the store's [`Attachment`].
///
/// Any `Fn(&Msg) -> Result<MessageKey, E>` is one (it drops the
/// attachment). Implement the trait to pass the attachment on, into a
/// field of your message type, for a transactional store.
pub trait KeyExtractor<Msg>: Send + Sync + 'static {
    /// The key of `message`; an error rejects it
    /// ([`Processed::Rejected`]) without running anything.
    fn extract(&self, message: &Msg) -> Result<MessageKey, BoxError>;

    /// Called once the lock is taken, before the handler runs, if the store
    /// has request-scoped state for it. The default drops it.
    fn attach(&self, message: &mut Msg, attachment: Attachment) {
        let _ = (message, attachment);
    }
}

impl<Msg, F, E> KeyExtractor<Msg> for F
where
    F: Fn(&Msg) -> Result<MessageKey, E> + Send + Sync + 'static,
    E: Into<BoxError>,
{
    fn extract(&self, message: &Msg) -> Result<MessageKey, BoxError> {
        self(message).map_err(Into::into)
    }
}

/// Applies [`MessageService`] to a service over messages: made by
/// [`IdempotentConsumer::layer`].
///
/// ```
/// use tower::{Service, ServiceExt, service_fn};
/// use tower_idempotency::MemoryStore;
/// use tower_idempotency::message::{IdempotentConsumer, MessageKey, Processed};
///
/// struct Msg { id: String, body: Vec<u8> }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let layer = IdempotentConsumer::new(MemoryStore::new())
///     .layer(|m: &Msg| Ok::<_, std::convert::Infallible>(MessageKey::new("billing", &m.id, &m.body)));
/// let mut svc = tower::ServiceBuilder::new()
///     .layer(layer)
///     .service(service_fn(|m: Msg| async move { Ok::<_, std::io::Error>(()) }));
/// let msg = || Msg { id: "m1".into(), body: b"{}".to_vec() };
/// assert!(matches!(svc.ready().await.unwrap().call(msg()).await.unwrap(), Processed::Ran(())));
/// assert!(matches!(svc.ready().await.unwrap().call(msg()).await.unwrap(), Processed::Replayed(())));
/// # }
/// ```
pub struct MessageLayer<K, C = UnitCodec> {
    consumer: IdempotentConsumer<C>,
    keys: Arc<K>,
}

impl<K, C> Clone for MessageLayer<K, C> {
    fn clone(&self) -> Self {
        Self {
            consumer: self.consumer.clone(),
            keys: self.keys.clone(),
        }
    }
}

impl<K, C> fmt::Debug for MessageLayer<K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageLayer")
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

impl<S, K, C> Layer<S> for MessageLayer<K, C> {
    type Service = MessageService<S, K, C>;

    fn layer(&self, inner: S) -> Self::Service {
        MessageService {
            inner,
            consumer: self.consumer.clone(),
            keys: self.keys.clone(),
        }
    }
}

/// Middleware that runs each message once and replays its recorded output
/// to every redelivery; made by [`MessageLayer`]. Its response is
/// [`Processed`], its error the inner service's.
pub struct MessageService<S, K, C = UnitCodec> {
    inner: S,
    consumer: IdempotentConsumer<C>,
    keys: Arc<K>,
}

impl<S: Clone, K, C> Clone for MessageService<S, K, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            consumer: self.consumer.clone(),
            keys: self.keys.clone(),
        }
    }
}

impl<S: fmt::Debug, K, C> fmt::Debug for MessageService<S, K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, K, C> MessageService<S, K, C> {
    define_inner_service_accessors!();
}

impl<S, K, C, Msg> Service<Msg> for MessageService<S, K, C>
where
    S: Service<Msg> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
    K: KeyExtractor<Msg>,
    C: Codec<S::Response>,
    Msg: Send + 'static,
{
    type Response = Processed<S::Response>;
    type Error = S::Error;
    type Future = MessageFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut message: Msg) -> Self::Future {
        let key = match self.keys.extract(&message) {
            Ok(key) => key,
            Err(e) => {
                tracing::debug!(outcome = "rejected", error = %e, "message refused by the key extractor");
                mark_message("rejected");
                return MessageFuture::ready(Processed::Rejected(e));
            }
        };
        // The clone is not ready; the ready one goes with this message
        // (tower-service docs, "Be careful when cloning inner services").
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let keys = self.keys.clone();
        let fut = self.consumer.detached(key, move |attachment| {
            if let Some(attachment) = attachment {
                keys.attach(&mut message, attachment);
            }
            inner.call(message)
        });
        MessageFuture {
            kind: FutureKind::Running(fut),
            _marker: PhantomData,
        }
    }
}

/// The response future of [`MessageService`].
///
/// # Panics
///
/// Like any future, it panics if polled again after it completed.
pub struct MessageFuture<T, E> {
    kind: FutureKind<T, E>,
    _marker: PhantomData<fn() -> (T, E)>,
}

enum FutureKind<T, E> {
    Ready(Option<Processed<T>>),
    Running(Detached<Result<Processed<T>, E>>),
}

impl<T, E> MessageFuture<T, E> {
    fn ready(processed: Processed<T>) -> Self {
        Self {
            kind: FutureKind::Ready(Some(processed)),
            _marker: PhantomData,
        }
    }
}

// Nothing in it is structurally pinned: `Detached` boxes its future.
impl<T, E> Unpin for MessageFuture<T, E> {}

impl<T, E> fmt::Debug for MessageFuture<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.kind {
            FutureKind::Ready(_) => "Ready",
            FutureKind::Running(_) => "Running",
        };
        f.debug_tuple("MessageFuture").field(&state).finish()
    }
}

impl<T, E> Future for MessageFuture<T, E> {
    type Output = Result<Processed<T>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().kind {
            FutureKind::Ready(processed) => Poll::Ready(Ok(processed
                .take()
                .expect("MessageFuture polled after completion"))),
            FutureKind::Running(fut) => Pin::new(fut).poll(cx),
        }
    }
}
