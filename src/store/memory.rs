//! [`MemoryStore`]: the default store, sharded, bounded and self-expiring.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Begin, LockToken, Store, StoreError, StoreKey};
use crate::fingerprint::Fingerprint;
use crate::record::Record;

/// Bookkeeping bytes charged per entry on top of its record.
const ENTRY_OVERHEAD: usize = 160;
/// Expired entries swept from the front of a shard's queue per operation.
const SWEEP_PER_OP: usize = 8;

/// An in-process store: the default, and the store for unit-testing
/// handlers.
///
/// - **Sharded**: up to 64 independently locked maps, chosen by the store
///   key's hash, so concurrent requests rarely contend and no resize stalls
///   the whole store. No lock is held across an `.await`.
/// - **Self-expiring**: every operation sweeps a few expired entries from the
///   front of its shard, and expired entries are never returned.
/// - **Bounded** by entries and by bytes: when full, it evicts expired
///   entries first, then completed records oldest first, and never a live
///   lock; if only live locks remain, `begin` fails with
///   [`StoreError::CapacityExceeded`] (the layer answers 503).
/// - **Time is tokio's**, so tests can pause and advance it.
/// - [`Store::wait`] is woken by the completion or release, not by polling.
///
/// Records live in this process only: for a service on more than one
/// machine use a shared store.
///
/// Cloning is cheap and shares the records.
///
/// ```
/// use tower_idempotency::MemoryStore;
///
/// let store = MemoryStore::new()
///     .with_max_entries(1_000_000)
///     .with_max_bytes(512 * 1024 * 1024);
/// assert!(store.is_empty());
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Box<[Mutex<Shard>]>,
    mask: usize,
    max_entries: usize,
    max_bytes: usize,
    /// The next shard swept on behalf of every shard (round robin), so
    /// expired entries leave shards that see no traffic of their own.
    cursor: AtomicUsize,
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shards", &self.inner.shards.len())
            .field("max_entries", &self.inner.max_entries)
            .field("max_bytes", &self.inner.max_bytes)
            .field("len", &self.len())
            .finish()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Map = HashMap<StoreKey, Entry, BuildHasherDefault<KeyHasher>>;

#[derive(Default)]
struct Shard {
    map: Map,
    /// Entries in creation order, tagged with their generation; a tag whose
    /// entry is gone or newer is stale and skipped.
    order: VecDeque<(StoreKey, u64)>,
    bytes: usize,
    next_gen: u64,
}

struct Entry {
    generation: u64,
    expires_at: Instant,
    size: usize,
    state: State,
}

enum State {
    InFlight {
        token: LockToken,
        // Only a lock needs its own copy: a record carries the fingerprint.
        fingerprint: Fingerprint,
        waiters: Option<Arc<Notify>>,
    },
    Completed(Record),
}

impl Entry {
    fn wake(&mut self) {
        if let State::InFlight {
            waiters: Some(n), ..
        } = &self.state
        {
            n.notify_waiters();
        }
    }
}

impl MemoryStore {
    /// A store bounded to 100,000 entries and 256 MiB.
    pub fn new() -> Self {
        Self::with_limits(100_000, 256 * 1024 * 1024)
    }

    fn with_limits(max_entries: usize, max_bytes: usize) -> Self {
        let max_entries = max_entries.max(1);
        // About a thousand entries and at least 8 MiB a shard, between 1
        // and 64 shards.
        let shards = (max_entries / 1024)
            .min(max_bytes / (8 * 1024 * 1024))
            .clamp(1, 64)
            .next_power_of_two()
            .min(64);
        Self {
            inner: Arc::new(Inner {
                shards: (0..shards).map(|_| Mutex::new(Shard::default())).collect(),
                mask: shards - 1,
                max_entries,
                max_bytes: max_bytes.max(1),
                cursor: AtomicUsize::new(0),
            }),
        }
    }

    /// Bounds the number of entries (locks and records). Default 100,000.
    #[must_use]
    pub fn with_max_entries(self, max_entries: usize) -> Self {
        Self::with_limits(max_entries, self.inner.max_bytes)
    }

    /// Bounds the bytes the records occupy (bodies, headers, and a fixed
    /// overhead per entry). Default 256 MiB.
    #[must_use]
    pub fn with_max_bytes(self, max_bytes: usize) -> Self {
        Self::with_limits(self.inner.max_entries, max_bytes)
    }

    /// How many entries (live or expired but not yet swept) the store holds.
    pub fn len(&self) -> usize {
        self.inner.shards.iter().map(|s| lock(s).map.len()).sum()
    }

    /// Whether the store holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes charged against [`with_max_bytes`](Self::with_max_bytes).
    pub fn bytes(&self) -> usize {
        self.inner.shards.iter().map(|s| lock(s).bytes).sum()
    }

    /// How many live (unexpired) in-flight locks the store holds.
    pub fn live_locks(&self) -> usize {
        let now = Instant::now();
        self.inner
            .shards
            .iter()
            .map(|s| {
                lock(s)
                    .map
                    .values()
                    .filter(|e| e.expires_at > now && matches!(e.state, State::InFlight { .. }))
                    .count()
            })
            .sum()
    }

    fn shard(&self, key: &StoreKey) -> MutexGuard<'_, Shard> {
        let b = key.as_bytes();
        let idx = usize::from(b[0]) | (usize::from(b[1]) << 8);
        lock(&self.inner.shards[idx & self.inner.mask])
    }

    /// Sweeps a few expired entries from the next shard in turn, unless
    /// another caller holds it.
    fn sweep_next(&self, now: Instant) {
        let idx = self.inner.cursor.fetch_add(1, Ordering::Relaxed) & self.inner.mask;
        let mut shard = match self.inner.shards[idx].try_lock() {
            Ok(shard) => shard,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return,
        };
        shard.sweep(now, SWEEP_PER_OP);
    }

    fn shard_limits(&self) -> (usize, usize) {
        let n = self.inner.shards.len();
        (
            self.inner.max_entries.div_ceil(n),
            self.inner.max_bytes.div_ceil(n),
        )
    }
}

fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A panic while holding a shard lock cannot leave a half-written entry
    // (every mutation is a single map operation), so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shard {
    fn live<'a>(&'a mut self, key: &StoreKey, now: Instant) -> Option<&'a mut Entry> {
        self.map.get_mut(key).filter(|e| e.expires_at > now)
    }

    fn remove(&mut self, key: &StoreKey) {
        if let Some(mut e) = self.map.remove(key) {
            self.bytes -= e.size;
            e.wake();
        }
    }

    /// Drops expired or stale tags from the front, at most `budget`.
    fn sweep(&mut self, now: Instant, budget: usize) {
        for _ in 0..budget {
            let Some(&(key, generation)) = self.order.front() else {
                return;
            };
            match self.map.get(&key) {
                Some(e) if e.generation == generation => {
                    if e.expires_at > now {
                        return;
                    }
                    self.order.pop_front();
                    self.remove(&key);
                }
                _ => {
                    self.order.pop_front();
                }
            }
        }
        // Stale tags pile up behind a long-lived front entry: compact.
        if self.order.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.order
                .retain(|(k, g)| map.get(k).is_some_and(|e| e.generation == *g));
        }
    }

    /// Makes room for one more entry of `size` bytes: expired entries first,
    /// then completed records oldest first, never a live lock, and never
    /// the entry `protect` (the record being written).
    fn make_room(
        &mut self,
        size: usize,
        now: Instant,
        (max_entries, max_bytes): (usize, usize),
        protect: Option<&StoreKey>,
    ) -> Result<(), StoreError> {
        let mut skipped = 0;
        while self.map.len() + 1 > max_entries || self.bytes + size > max_bytes {
            if skipped >= self.order.len() {
                return Err(StoreError::CapacityExceeded);
            }
            let Some((key, generation)) = self.order.pop_front() else {
                return Err(StoreError::CapacityExceeded);
            };
            let Some(e) = self.map.get(&key) else {
                continue;
            };
            if e.generation != generation {
                continue;
            }
            let live_lock = e.expires_at > now && matches!(e.state, State::InFlight { .. });
            if live_lock || protect == Some(&key) {
                // A live lock is never evicted: keep it, look further.
                self.order.push_back((key, generation));
                skipped += 1;
                continue;
            }
            self.remove(&key);
        }
        Ok(())
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let now = Instant::now();
        let limits = self.shard_limits();
        self.sweep_next(now);
        let mut shard = self.shard(key);
        shard.sweep(now, SWEEP_PER_OP);
        if let Some(e) = shard.live(key, now) {
            return Ok(match &e.state {
                State::InFlight { fingerprint, .. } => Begin::InFlight {
                    fingerprint: *fingerprint,
                },
                State::Completed(record) => Begin::Completed(record.clone()),
            });
        }
        // Absent, or expired (a dead holder's lock, or an old record).
        shard.remove(key);
        shard.make_room(ENTRY_OVERHEAD, now, limits, None)?;
        let token = LockToken::new();
        let generation = shard.next_gen;
        shard.next_gen += 1;
        shard.map.insert(
            *key,
            Entry {
                generation,
                expires_at: now + lease,
                size: ENTRY_OVERHEAD,
                state: State::InFlight {
                    token,
                    fingerprint: *fingerprint,
                    waiters: None,
                },
            },
        );
        shard.bytes += ENTRY_OVERHEAD;
        shard.order.push_back((*key, generation));
        Ok(Begin::Acquired(token))
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: &LockToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let now = Instant::now();
        let (_, max_bytes) = self.shard_limits();
        let mut shard = self.shard(key);
        let held = matches!(
            shard.live(key, now).map(|e| &e.state),
            Some(State::InFlight { token: t, .. }) if t == token
        );
        if !held {
            return Ok(false);
        }
        let size = ENTRY_OVERHEAD + record.size_hint();
        let Some(e) = shard.map.get_mut(key) else {
            return Ok(false);
        };
        let old = e.size;
        e.wake();
        e.state = State::Completed(record.clone());
        e.expires_at = now + ttl;
        e.size = size;
        shard.bytes = shard.bytes - old + size;
        if shard.bytes > max_bytes {
            // Over the byte bound: evict older completed records, never
            // this one (a shard may exceed its share by one record).
            let _ = shard.make_room(0, now, (usize::MAX, max_bytes), Some(key));
        }
        Ok(true)
    }

    async fn release(&self, key: &StoreKey, token: &LockToken) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(key);
        let held = matches!(
            shard.live(key, now).map(|e| &e.state),
            Some(State::InFlight { token: t, .. }) if t == token
        );
        if held {
            shard.remove(key);
        }
        Ok(held)
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: &LockToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(key);
        match shard.live(key, now) {
            Some(e) if matches!(&e.state, State::InFlight { token: t, .. } if t == token) => {
                e.expires_at = now + lease;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        let now = Instant::now();
        let (notified, until) = {
            let mut shard = self.shard(key);
            let Some(e) = shard.live(key, now) else {
                return Ok(());
            };
            let State::InFlight { waiters, .. } = &mut e.state else {
                return Ok(());
            };
            let notify = waiters
                .get_or_insert_with(|| Arc::new(Notify::new()))
                .clone();
            let mut notified = Box::pin(notify.notified_owned());
            // Registered before the shard lock is released: a completion
            // that follows cannot be missed.
            Pin::as_mut(&mut notified).enable();
            (notified, e.expires_at.min(now + timeout))
        };
        let _ = tokio::time::timeout_at(until, notified).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::StatusCode;

    fn key(n: u32) -> StoreKey {
        use sha2::{Digest, Sha256};
        StoreKey::from_bytes(Sha256::digest(n.to_be_bytes()).into())
    }

    fn record(body: usize) -> Record {
        Record::response(
            Fingerprint::from_bytes([1; 32]),
            StatusCode::OK,
            vec![],
            Bytes::from(vec![b'x'; body]),
        )
    }

    const FP: Fingerprint = Fingerprint::from_bytes([1; 32]);
    const LEASE: Duration = Duration::from_secs(30);
    const TTL: Duration = Duration::from_secs(3600);

    async fn acquire(store: &MemoryStore, k: &StoreKey) -> LockToken {
        match store.begin(k, &FP, LEASE).await.unwrap() {
            Begin::Acquired(t) => t,
            other => panic!("expected Acquired, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_evicts_completed_records_and_never_live_locks() {
        let store = MemoryStore::new().with_max_entries(10);
        // Five live locks.
        let mut live = Vec::new();
        for n in 0..5 {
            live.push((key(n), acquire(&store, &key(n)).await));
        }
        // Many completed records.
        for n in 100..200 {
            let t = acquire(&store, &key(n)).await;
            assert!(store.complete(&key(n), &t, &record(10), TTL).await.unwrap());
        }
        assert!(store.len() <= 10);
        assert_eq!(store.live_locks(), 5);
        for (k, t) in &live {
            assert!(
                store.extend(k, t, LEASE).await.unwrap(),
                "a live lock was evicted"
            );
        }
        // Only live locks left and full: a new lock is refused, not forced in.
        let store = MemoryStore::new().with_max_entries(2);
        acquire(&store, &key(1)).await;
        acquire(&store, &key(2)).await;
        assert!(matches!(
            store.begin(&key(3), &FP, LEASE).await,
            Err(StoreError::CapacityExceeded)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn byte_bound_holds() {
        let store = MemoryStore::new().with_max_bytes(64 * 1024);
        for n in 0..100 {
            let t = acquire(&store, &key(n)).await;
            store
                .complete(&key(n), &t, &record(4096), TTL)
                .await
                .unwrap();
        }
        assert!(store.bytes() <= 64 * 1024, "{} bytes", store.bytes());
        assert!(store.len() >= 10);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entries_are_swept_without_a_manual_call() {
        let store = MemoryStore::new();
        for n in 0..50 {
            let t = acquire(&store, &key(n)).await;
            store
                .complete(&key(n), &t, &record(1), Duration::from_secs(1))
                .await
                .unwrap();
        }
        assert_eq!(store.len(), 50);
        tokio::time::advance(Duration::from_secs(2)).await;
        // Ordinary traffic sweeps them, in every shard.
        for n in 1000..1100 {
            acquire(&store, &key(n)).await;
        }
        assert_eq!(store.len(), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_is_woken_by_completion() {
        let store = MemoryStore::new();
        let k = key(1);
        let t = acquire(&store, &k).await;
        let s2 = store.clone();
        let waiter = tokio::spawn(async move {
            let start = Instant::now();
            s2.wait(&k, Duration::from_secs(10)).await.unwrap();
            start.elapsed()
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        store.complete(&k, &t, &record(1), TTL).await.unwrap();
        let waited = waiter.await.unwrap();
        assert!(waited < Duration::from_millis(400), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn wait_ends_at_lease_expiry() {
        let store = MemoryStore::new();
        let k = key(1);
        acquire(&store, &k).await;
        let start = Instant::now();
        store.wait(&k, Duration::from_secs(100)).await.unwrap();
        assert_eq!(start.elapsed(), LEASE);
    }
}
