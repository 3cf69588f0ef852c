//! Test kit: the store conformance suite and a fault-injecting store.
//!
//! Every store that ships with this crate passes the same suite, and a
//! third-party store can run it too:
//!
//! ```
//! use std::sync::Arc;
//! use tower_idempotency::{MemoryStore, store::Store};
//!
//! async fn make_store() -> Option<Arc<dyn Store>> {
//!     // Return `None` to skip (for example when a server URL is unset).
//!     Some(Arc::new(MemoryStore::new()))
//! }
//!
//! mod memory_conformance {
//!     tower_idempotency::store_conformance_tests!(super::make_store);
//! }
//! ```
//!
//! The checks use short real leases and ttls (a few hundred milliseconds)
//! and `tokio::time::sleep`, so they work against servers with their own
//! clocks. They are not a stable part of the public API: new checks may be
//! added in any release.

#![allow(clippy::unwrap_used)] // test support: a failed check is a panic by design

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};

use crate::fingerprint::Fingerprint;
use crate::record::Record;
use crate::store::{Attachment, Begin, Capabilities, LockToken, Store, StoreError, StoreKey};

/// A fresh random store key, so checks never collide in a shared backend.
pub fn random_key() -> StoreKey {
    let a = uuid::Uuid::new_v4().as_u128().to_be_bytes();
    let b = uuid::Uuid::new_v4().as_u128().to_be_bytes();
    let mut out = [0u8; 32];
    out[..16].copy_from_slice(&a);
    out[16..].copy_from_slice(&b);
    StoreKey::from_bytes(out)
}

fn fp(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

/// A record with repeated headers and a body of `len` bytes.
pub fn sample_record(fingerprint: Fingerprint, len: usize) -> Record {
    let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    Record::response(
        fingerprint,
        StatusCode::CREATED,
        vec![
            (
                HeaderName::from_static("set-cookie"),
                HeaderValue::from_static("a=1"),
            ),
            (
                HeaderName::from_static("location"),
                HeaderValue::from_static("/orders/1"),
            ),
            (
                HeaderName::from_static("set-cookie"),
                HeaderValue::from_static("b=2"),
            ),
        ],
        Bytes::from(body),
    )
}

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

async fn acquire(
    store: &dyn Store,
    key: &StoreKey,
    fingerprint: &Fingerprint,
    lease: Duration,
) -> LockToken {
    match store.begin(key, fingerprint, lease).await {
        Ok(Begin::Acquired(token)) => token,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

async fn completed(store: &dyn Store, key: &StoreKey) -> Record {
    match store.begin(key, &fp(0xEE), LEASE).await {
        Ok(Begin::Completed(record)) => record,
        other => panic!("expected Completed, got {other:?}"),
    }
}

/// Checks the fingerprint an [`Begin::InFlight`] carries against what the
/// store declares: the holder's own where it reports one, `None` where it
/// says it cannot see it. Never the caller's in place of the holder's.
fn assert_holder(store: &dyn Store, reported: Option<Fingerprint>, holder: Fingerprint) {
    if store.capabilities().reports_in_flight_fingerprint() {
        assert_eq!(
            reported,
            Some(holder),
            "InFlight must carry the holder's fingerprint"
        );
    } else {
        assert_eq!(
            reported, None,
            "a store that declares it cannot see the holder's fingerprint must say None"
        );
    }
}

/// 64 concurrent `begin`s on one key: exactly one acquires, every other
/// sees the lock (with the winner's fingerprint, where the store reports
/// one).
pub async fn begin_is_exclusive(store: Arc<dyn Store>) {
    let key = random_key();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.begin(&key, &fp(1), LEASE).await
        }));
    }
    let mut acquired = 0;
    for task in tasks {
        match task.await.expect("task panicked").expect("begin failed") {
            Begin::Acquired(_) => acquired += 1,
            Begin::InFlight { fingerprint } => assert_holder(&*store, fingerprint, fp(1)),
            Begin::Completed(_) => panic!("nothing was completed"),
        }
    }
    assert_eq!(acquired, 1, "begin must be exclusive");
}

/// A completed record replays as written: status, every header value in
/// order, body, fingerprint.
pub async fn replay_after_complete(store: Arc<dyn Store>) {
    let key = random_key();
    let token = acquire(&*store, &key, &fp(2), LEASE).await;
    let record = sample_record(fp(2), 1024);
    assert!(store.complete(&key, &token, &record, TTL).await.unwrap());
    let replay = completed(&*store, &key).await;
    assert_eq!(replay, record);
    assert_eq!(replay.headers()[0].1, "a=1");
    assert_eq!(replay.headers()[2].1, "b=2");
    // And again: a replay does not consume the record.
    assert_eq!(completed(&*store, &key).await, record);
}

/// `InFlight` and `Completed` carry the stored fingerprint, not the
/// caller's (`InFlight` carries none where the store declares it cannot
/// see it).
pub async fn stored_fingerprint_is_returned(store: Arc<dyn Store>) {
    let key = random_key();
    let token = acquire(&*store, &key, &fp(3), LEASE).await;
    match store.begin(&key, &fp(4), LEASE).await.unwrap() {
        Begin::InFlight { fingerprint } => assert_holder(&*store, fingerprint, fp(3)),
        other => panic!("expected InFlight, got {other:?}"),
    }
    assert!(
        store
            .complete(&key, &token, &sample_record(fp(3), 8), TTL)
            .await
            .unwrap()
    );
    match store.begin(&key, &fp(4), LEASE).await.unwrap() {
        Begin::Completed(record) => assert_eq!(*record.fingerprint(), fp(3)),
        other => panic!("expected Completed, got {other:?}"),
    }
}

/// A holder whose lease expired and was taken over cannot complete,
/// release or extend; the new holder's record is the one stored.
pub async fn fencing_after_lease_expiry(store: Arc<dyn Store>) {
    let key = random_key();
    let lease = Duration::from_millis(200);
    let first = acquire(&*store, &key, &fp(5), lease).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let second = acquire(&*store, &key, &fp(5), LEASE).await;
    assert_ne!(first, second, "tokens are never reused");
    let stale = sample_record(fp(5), 16);
    assert!(!store.complete(&key, &first, &stale, TTL).await.unwrap());
    assert!(!store.extend(&key, &first, LEASE).await.unwrap());
    assert!(!store.release(&key, &first).await.unwrap());
    // The second holder still holds it.
    assert!(matches!(
        store.begin(&key, &fp(5), LEASE).await.unwrap(),
        Begin::InFlight { .. }
    ));
    let fresh = sample_record(fp(5), 32);
    assert!(store.complete(&key, &second, &fresh, TTL).await.unwrap());
    assert_eq!(completed(&*store, &key).await.body(), fresh.body());
}

/// Release frees the key for a retry with a new token; the old token then
/// holds nothing.
pub async fn release_allows_retry(store: Arc<dyn Store>) {
    let key = random_key();
    let token = acquire(&*store, &key, &fp(6), LEASE).await;
    assert!(store.release(&key, &token).await.unwrap());
    let again = acquire(&*store, &key, &fp(6), LEASE).await;
    assert_ne!(token, again);
    assert!(!store.release(&key, &token).await.unwrap());
    assert!(
        !store
            .complete(&key, &token, &sample_record(fp(6), 1), TTL)
            .await
            .unwrap()
    );
    assert!(store.release(&key, &again).await.unwrap());
}

/// `extend` keeps a lock alive past its first lease; without it the lock
/// lapses and the next `begin` takes it over.
pub async fn extend_keeps_the_lock(store: Arc<dyn Store>) {
    let key = random_key();
    // Extended every 500 ms, so an extension may land 1.5 s late before
    // the 2 s lease lapses: a database waiting on a busy disk for its
    // commit's flush is slow, not wrong.
    let lease = Duration::from_secs(2);
    let token = acquire(&*store, &key, &fp(7), lease).await;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(store.extend(&key, &token, lease).await.unwrap());
    }
    // 2.5 s after the start, past the first lease: still held.
    assert!(matches!(
        store.begin(&key, &fp(7), lease).await.unwrap(),
        Begin::InFlight { .. }
    ));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let next = acquire(&*store, &key, &fp(7), lease).await;
    assert_ne!(next, token);
}

/// A completed record expires after its ttl; the key can then be used
/// again.
pub async fn ttl_expires(store: Arc<dyn Store>) {
    let key = random_key();
    let token = acquire(&*store, &key, &fp(8), LEASE).await;
    let ttl = Duration::from_millis(300);
    assert!(
        store
            .complete(&key, &token, &sample_record(fp(8), 4), ttl)
            .await
            .unwrap()
    );
    completed(&*store, &key).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    acquire(&*store, &key, &fp(8), LEASE).await;
}

/// A 4 MiB record survives the round trip byte for byte.
pub async fn large_record_round_trip(store: Arc<dyn Store>) {
    let key = random_key();
    let token = acquire(&*store, &key, &fp(9), LEASE).await;
    // 4 MiB, or as large as a store that declares a limit holds.
    let overhead = sample_record(fp(9), 0).encode().len();
    let len = store
        .capabilities()
        .max_record_size()
        .map_or(4 * 1024 * 1024, |max| {
            max.saturating_sub(overhead).min(4 * 1024 * 1024)
        });
    let record = sample_record(fp(9), len);
    assert!(store.complete(&key, &token, &record, TTL).await.unwrap());
    let replay = completed(&*store, &key).await;
    assert_eq!(replay.body().len(), record.body().len());
    assert!(
        replay == record,
        "a {len}-byte record differs after the round trip"
    );
}

/// A value record (the message face's) round-trips like a response: kind,
/// fingerprint and bytes, an empty value included.
pub async fn value_record_round_trip(store: Arc<dyn Store>) {
    for value in [Bytes::from_static(br#"{"charge_id":"ch_1"}"#), Bytes::new()] {
        let key = random_key();
        let token = acquire(&*store, &key, &fp(13), LEASE).await;
        let record = Record::value(fp(13), value.clone());
        assert!(store.complete(&key, &token, &record, TTL).await.unwrap());
        let replay = completed(&*store, &key).await;
        assert_eq!(replay.kind(), crate::record::RecordKind::Value);
        assert_eq!(replay.body(), &value);
        assert_eq!(*replay.fingerprint(), fp(13));
    }
}

/// Completing a key nobody locked is refused and writes nothing.
pub async fn complete_without_lock_is_refused(store: Arc<dyn Store>) {
    let key = random_key();
    let stranger = LockToken::new();
    assert!(
        !store
            .complete(&key, &stranger, &sample_record(fp(10), 4), TTL)
            .await
            .unwrap()
    );
    assert!(!store.extend(&key, &stranger, LEASE).await.unwrap());
    assert!(!store.release(&key, &stranger).await.unwrap());
    acquire(&*store, &key, &fp(10), LEASE).await;
}

/// Keys are independent: one key's lock and record do not touch another.
pub async fn keys_are_independent(store: Arc<dyn Store>) {
    let a = random_key();
    let b = random_key();
    let ta = acquire(&*store, &a, &fp(11), LEASE).await;
    let tb = acquire(&*store, &b, &fp(12), LEASE).await;
    assert!(
        store
            .complete(&a, &ta, &sample_record(fp(11), 1), TTL)
            .await
            .unwrap()
    );
    assert!(matches!(
        store.begin(&b, &fp(12), LEASE).await.unwrap(),
        Begin::InFlight { .. }
    ));
    // A token of one key does not open another.
    assert!(!store.release(&b, &ta).await.unwrap());
    assert!(store.release(&b, &tb).await.unwrap());
}

/// Stamps out one `#[tokio::test]` per conformance check.
///
/// The argument is the path of an `async fn() -> Option<Arc<dyn Store>>`
/// that builds a fresh store, or returns `None` to skip (after printing
/// why).
///
/// With a second argument, each check cleans up after itself: `make` then
/// returns `Option<(Arc<dyn Store>, T)>`, and `teardown`, an
/// `async fn(T)`, runs after the check, whether it passed or failed (the
/// check runs on its own task, and its panic is resumed after the
/// teardown). A store on a shared server can drop its table or delete its
/// prefix there, so a test run leaves nothing behind:
///
/// ```
/// use std::sync::Arc;
/// use tower_idempotency::{MemoryStore, store::Store};
///
/// async fn make_store() -> Option<(Arc<dyn Store>, String)> {
///     let table = format!("conformance_{}", std::process::id());
///     // ... create the table, build the store on it ...
///     Some((Arc::new(MemoryStore::new()), table))
/// }
///
/// async fn drop_table(table: String) {
///     // ... DROP TABLE ...
///     # let _ = table;
/// }
///
/// mod memory_conformance {
///     tower_idempotency::store_conformance_tests!(super::make_store, super::drop_table);
/// }
/// ```
#[macro_export]
macro_rules! store_conformance_tests {
    ($make:path, $teardown:path) => {
        $crate::store_conformance_tests!(@checks (@torn $make, $teardown));
    };
    ($make:path) => {
        $crate::store_conformance_tests!(@checks (@tests $make));
    };
    // The one list of checks, handed to the arm that stamps them out.
    (@checks ($($arm:tt)*)) => {
        $crate::store_conformance_tests!($($arm)*;
            begin_is_exclusive,
            replay_after_complete,
            stored_fingerprint_is_returned,
            fencing_after_lease_expiry,
            release_allows_retry,
            extend_keeps_the_lock,
            ttl_expires,
            large_record_round_trip,
            value_record_round_trip,
            complete_without_lock_is_refused,
            keys_are_independent,
        );
    };
    (@torn $make:path, $teardown:path; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                if let Some((store, state)) = $make().await {
                    let outcome = ::tokio::spawn($crate::test_util::$check(store)).await;
                    $teardown(state).await;
                    if let Err(err) = outcome {
                        match err.try_into_panic() {
                            Ok(panic) => ::std::panic::resume_unwind(panic),
                            Err(err) => panic!("conformance check did not finish: {err}"),
                        }
                    }
                }
            }
        )*
    };
    (@tests $make:path; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                if let Some(store) = $make().await {
                    $crate::test_util::$check(store).await;
                }
            }
        )*
    };
}

/// A store operation, for [`FaultyStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Op {
    /// [`Store::begin`]
    Begin,
    /// [`Store::complete`]
    Complete,
    /// [`Store::release`]
    Release,
    /// [`Store::extend`]
    Extend,
}

/// What a [`FaultyStore`] does to an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Fail with [`StoreError::Unavailable`].
    Fail,
    /// Sleep this long, then run the operation.
    Delay(Duration),
    /// Never answer.
    Hang,
    /// Fail with [`StoreError::Corrupt`]: a record that exists but does
    /// not decode.
    Corrupt,
}

#[derive(Debug, Default)]
struct Faults {
    planned: Vec<(Op, Fault, usize)>,
    calls: Vec<Op>,
}

/// Wraps a store and injects faults into chosen operations a chosen number
/// of times; also counts calls per operation.
///
/// ```
/// use std::sync::Arc;
/// use tower_idempotency::MemoryStore;
/// use tower_idempotency::test_util::{Fault, FaultyStore, Op};
///
/// let store = Arc::new(FaultyStore::new(MemoryStore::new()));
/// store.inject(Op::Complete, Fault::Fail, 2); // the next two completes fail
/// assert_eq!(store.calls(Op::Begin), 0);
/// ```
#[derive(Debug)]
pub struct FaultyStore<S> {
    inner: S,
    faults: Mutex<Faults>,
}

impl<S: Store> FaultyStore<S> {
    /// Wraps `inner` with no fault planned.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            faults: Mutex::new(Faults::default()),
        }
    }

    /// The next `times` calls of `op` suffer `fault`.
    pub fn inject(&self, op: Op, fault: Fault, times: usize) {
        self.lock().planned.push((op, fault, times));
    }

    /// Removes every planned fault.
    pub fn heal(&self) {
        self.lock().planned.clear();
    }

    /// How many times `op` was called.
    pub fn calls(&self, op: Op) -> usize {
        self.lock().calls.iter().filter(|o| **o == op).count()
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn enter(&self, op: Op) -> Result<(), StoreError> {
        let fault = {
            let mut f = self.lock();
            f.calls.push(op);
            let hit = f.planned.iter_mut().find(|(o, _, n)| *o == op && *n > 0);
            hit.map(|(_, fault, n)| {
                *n -= 1;
                *fault
            })
        };
        match fault {
            None => Ok(()),
            Some(Fault::Fail) => Err(StoreError::unavailable(format!("injected fault in {op:?}"))),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            Some(Fault::Hang) => std::future::pending().await,
            Some(Fault::Corrupt) => Err(StoreError::Corrupt(crate::record::DecodeError::new(
                "injected corruption",
            ))),
        }
    }
}

#[async_trait]
impl<S: Store> Store for FaultyStore<S> {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        self.enter(Op::Begin).await?;
        self.inner.begin(key, fingerprint, lease).await
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: &LockToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.enter(Op::Complete).await?;
        self.inner.complete(key, token, record, ttl).await
    }

    async fn release(&self, key: &StoreKey, token: &LockToken) -> Result<bool, StoreError> {
        self.enter(Op::Release).await?;
        self.inner.release(key, token).await
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: &LockToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.enter(Op::Extend).await?;
        self.inner.extend(key, token, lease).await
    }

    fn attachment(&self, key: &StoreKey, token: &LockToken) -> Option<Attachment> {
        self.inner.attachment(key, token)
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        self.inner.wait(key, timeout).await
    }
}

#[cfg(test)]
mod memory_conformance {
    use super::*;
    use crate::MemoryStore;

    async fn make() -> Option<Arc<dyn Store>> {
        Some(Arc::new(MemoryStore::new()))
    }

    crate::store_conformance_tests!(make);
}
