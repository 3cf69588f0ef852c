//! The synchronous sharded table behind [`MemoryStore`](super::MemoryStore):
//! shards, their slabs and indexes, expiry ticks, eviction and byte
//! accounting (the layout is in the [parent module's docs](super)).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use bytes::Bytes;
use hashbrown::HashTable;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::fingerprint::Fingerprint;
use crate::store::{LockToken, StoreError, StoreKey};

/// Bookkeeping bytes charged per entry on top of its record's buffer.
pub(super) const ENTRY_OVERHEAD: usize = 128;
/// Expired entries swept from the front of a shard's queue per insertion.
pub(super) const SWEEP_PER_OP: usize = 8;

/// The most entries a store holds: a slot number is a `u32`, and no shard's
/// slab holds more slots than the store's bound on entries, so with this
/// bound every slot number fits.
pub(super) const MAX_ENTRIES: u32 = u32::MAX;

/// Microseconds since the store's epoch.
pub(super) type Ticks = u64;

pub(super) fn ticks(d: Duration) -> Ticks {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The shards and the bounds they share: what a [`MemoryStore`] clone
/// shares with the others.
///
/// [`MemoryStore`]: super::MemoryStore
pub(super) struct Table {
    shards: Box<[Mutex<Shard>]>,
    mask: usize,
    max_entries: usize,
    max_bytes: usize,
    /// Entry deadlines are microseconds since this instant.
    epoch: Instant,
    seed: Seed,
}

impl Table {
    /// A table bounded to `max_entries` entries (at least 1, and a `u32`,
    /// so that every slot number is one) and `max_bytes` bytes (at
    /// least 1).
    pub(super) fn new(max_entries: u32, max_bytes: usize) -> Self {
        // Lossless: `usize` is at least 32 bits wherever tokio runs.
        let max_entries = max_entries.max(1) as usize;
        // About a thousand entries and at least 8 MiB a shard, between 1
        // and 64 shards.
        let shards = (max_entries / 1024)
            .min(max_bytes / (8 * 1024 * 1024))
            .clamp(1, 64)
            .next_power_of_two()
            .min(64);
        let seed = Seed::random();
        Self {
            shards: (0..shards)
                .map(|_| Mutex::new(Shard::new(seed.clone())))
                .collect(),
            mask: shards - 1,
            max_entries,
            max_bytes: max_bytes.max(1),
            epoch: Instant::now(),
            seed,
        }
    }

    /// How many shards the entries are spread over.
    pub(super) fn shard_count(&self) -> usize {
        self.shards.len()
    }

    pub(super) fn max_entries(&self) -> usize {
        self.max_entries
    }

    pub(super) fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Entries, live or expired but not yet swept.
    pub(super) fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).table.len()).sum()
    }

    /// The bytes charged against `max_bytes`.
    pub(super) fn bytes(&self) -> usize {
        self.shards.iter().map(|s| lock(s).bytes).sum()
    }

    /// Live (unexpired) in-flight locks.
    pub(super) fn live_locks(&self) -> usize {
        let now = self.now();
        self.shards.iter().map(|s| lock(s).live_locks(now)).sum()
    }

    pub(super) fn now(&self) -> Ticks {
        self.ticks_at(Instant::now())
    }

    pub(super) fn ticks_at(&self, at: Instant) -> Ticks {
        ticks(at.saturating_duration_since(self.epoch))
    }

    /// The instant `ticks` stands for.
    pub(super) fn instant(&self, ticks: Ticks) -> Instant {
        self.epoch + Duration::from_micros(ticks)
    }

    pub(super) fn hashed<'a>(&self, key: &'a StoreKey) -> Hashed<'a> {
        Hashed {
            key,
            hash: self.seed.hash(key),
        }
    }

    pub(super) fn shard(&self, key: Hashed<'_>) -> MutexGuard<'_, Shard> {
        // The top bits; the table uses the low ones.
        let idx = (key.hash >> 58) as usize;
        lock(&self.shards[idx & self.mask])
    }

    /// Sweeps a few expired entries from another shard, chosen by the key's
    /// hash (uniformly), unless another caller holds it: so
    /// expired entries leave shards that see no insertions of their own,
    /// without a shared counter that every thread would write to.
    pub(super) fn sweep_other(&self, key: Hashed<'_>, now: Ticks) {
        let idx = (key.hash >> 52) as usize & self.mask;
        let mut shard = match self.shards[idx].try_lock() {
            Ok(shard) => shard,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return,
        };
        shard.sweep(now, SWEEP_PER_OP);
    }

    pub(super) fn shard_limits(&self) -> (usize, usize) {
        let n = self.shards.len();
        (self.max_entries.div_ceil(n), self.max_bytes.div_ceil(n))
    }
}

fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A panic while holding a shard lock cannot leave a half-written entry
    // (every mutation completes before anything that could panic), so
    // poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) struct Shard {
    seed: Seed,
    /// (slot number, the key's 32-bit hash): a lookup reads the slab only
    /// for a matching hash, and growing the table never reads it.
    table: HashTable<(u32, u32)>,
    slots: Vec<Slot>,
    /// Vacant slots, reused before the slab grows.
    free: Vec<u32>,
    /// Entries in creation order as (slot, generation) tags; a tag whose
    /// slot has moved on to a later generation is stale and skipped.
    order: VecDeque<(u32, u32)>,
    /// The sum of the slots' [charges](Slot::charge).
    bytes: usize,
}

pub(super) struct Slot {
    key: StoreKey,
    expires_at: Ticks,
    /// Bumped whenever the slot is vacated, so old tags go stale.
    generation: u32,
    state: State,
}

pub(super) enum State {
    Vacant,
    InFlight(Box<Lock>),
    /// The record in [`Record::to_compact`] form.
    ///
    /// [`Record::to_compact`]: crate::record::Record::to_compact
    Completed(Bytes),
}

impl Slot {
    pub(super) fn expires_at(&self) -> Ticks {
        self.expires_at
    }

    pub(super) fn state(&self) -> &State {
        &self.state
    }

    /// Bytes charged for this entry: none for a vacant slot, the overhead
    /// for a lock, and the overhead and the buffer for a record. Derived
    /// from the state rather than stored, so it cannot disagree with it
    /// (nor be cut short for a buffer past 4 GiB).
    fn charge(&self) -> usize {
        match &self.state {
            State::Vacant => 0,
            State::InFlight(_) => ENTRY_OVERHEAD,
            State::Completed(buf) => ENTRY_OVERHEAD + buf.len(),
        }
    }

    /// Replaces the state; a lock that ends wakes whoever waits on it.
    fn set_state(&mut self, state: State) {
        if let State::InFlight(lock) = std::mem::replace(&mut self.state, state)
            && let Some(waiters) = &lock.waiters
        {
            waiters.notify_waiters();
        }
    }
}

pub(super) struct Lock {
    pub(super) token: LockToken,
    // Only a lock needs its own copy: a record carries the fingerprint.
    pub(super) fingerprint: Fingerprint,
    pub(super) waiters: Option<Arc<Notify>>,
}

/// A per-store secret that every key is hashed with. Store keys are
/// SHA-256 digests, but a client chooses its idempotency keys, and with an
/// unkeyed hash it could grind keys whose digests share a shard or a run of
/// table buckets (a few thousand tries each) and make every lookup there
/// slow. Keyed (SipHash, std's `RandomState`), it cannot tell which keys
/// collide.
#[derive(Clone)]
struct Seed(std::hash::RandomState);

impl Seed {
    fn random() -> Self {
        Self(std::hash::RandomState::new())
    }

    fn hash(&self, key: &StoreKey) -> u64 {
        use std::hash::BuildHasher;
        self.0.hash_one(key.as_bytes())
    }
}

/// A key with its keyed hash, computed once per operation.
#[derive(Clone, Copy)]
pub(super) struct Hashed<'a> {
    key: &'a StoreKey,
    hash: u64,
}

impl Hashed<'_> {
    /// The 32 bits of the hash that the table stores.
    fn short(&self) -> u32 {
        // Truncation on purpose: the low half.
        self.hash as u32
    }
}

/// The 64-bit hash the table probes with, spread from the 32-bit one it
/// stores so that its top bits (the table's tags) are as random as its low
/// bits.
fn spread(short: u32) -> u64 {
    u64::from(short).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

impl Shard {
    fn new(seed: Seed) -> Self {
        Self {
            seed,
            table: HashTable::new(),
            slots: Vec::new(),
            free: Vec::new(),
            order: VecDeque::new(),
            bytes: 0,
        }
    }

    /// The slot number of `key`'s entry, expired or not.
    pub(super) fn find(&self, key: Hashed<'_>) -> Option<u32> {
        let slots = &self.slots;
        let short = key.short();
        self.table
            .find(spread(short), |&(i, h)| {
                h == short && slots[i as usize].key == *key.key
            })
            .map(|&(i, _)| i)
    }

    /// The entry in slot `idx`, from [`find`](Self::find) or
    /// [`held`](Self::held).
    pub(super) fn slot(&self, idx: u32) -> &Slot {
        &self.slots[idx as usize]
    }

    /// Replaces the state of slot `idx`, and its charge in `bytes`.
    fn set_state(&mut self, idx: u32, state: State) {
        let slot = &mut self.slots[idx as usize];
        let old = slot.charge();
        slot.set_state(state);
        self.bytes = self.bytes - old + slot.charge();
    }

    /// Whether `tag` still names the entry it was made for.
    fn is_current(&self, (idx, generation): (u32, u32)) -> bool {
        self.slots
            .get(idx as usize)
            .is_some_and(|e| e.generation == generation && !matches!(e.state, State::Vacant))
    }

    /// Adds an entry for `key`, which has none; the caller has made room
    /// with [`make_room`](Self::make_room).
    ///
    /// Fails with [`StoreError::CapacityExceeded`] if the slab is full and
    /// its next slot number would not fit in a `u32`. That cannot happen:
    /// the slab grows only when every slot holds an entry, a shard holds at
    /// most its share of the store's bound on entries, and that bound is at
    /// most [`MAX_ENTRIES`].
    pub(super) fn insert(
        &mut self,
        key: Hashed<'_>,
        expires_at: Ticks,
        state: State,
    ) -> Result<(), StoreError> {
        let slot = Slot {
            key: *key.key,
            expires_at,
            generation: 0,
            state,
        };
        let idx = match self.free.pop() {
            Some(idx) => {
                let generation = self.slots[idx as usize].generation;
                self.slots[idx as usize] = Slot { generation, ..slot };
                idx
            }
            None => {
                let idx = u32::try_from(self.slots.len());
                debug_assert!(idx.is_ok(), "a shard outgrew its bound on entries");
                let Ok(idx) = idx else {
                    return Err(StoreError::CapacityExceeded);
                };
                if self.slots.len() == self.slots.capacity() {
                    // Grow by a quarter, not double: the slab is most of a
                    // shard's memory.
                    self.slots.reserve_exact(self.slots.len() / 4 + 16);
                }
                self.slots.push(slot);
                idx
            }
        };
        // The slot was vacant (charged nothing) or new.
        self.bytes += self.slots[idx as usize].charge();
        let short = key.short();
        self.table
            .insert_unique(spread(short), (idx, short), |&(_, h)| spread(h));
        let generation = self.slots[idx as usize].generation;
        self.order.push_back((idx, generation));
        Ok(())
    }

    /// Turns the held lock in slot `idx` into the record `buf`, kept until
    /// `expires_at`. Over `max_bytes`, evicts older completed records,
    /// never this one (a shard may exceed its share by one record).
    pub(super) fn complete(
        &mut self,
        idx: u32,
        buf: Bytes,
        now: Ticks,
        expires_at: Ticks,
        max_bytes: usize,
    ) {
        self.set_state(idx, State::Completed(buf));
        self.slots[idx as usize].expires_at = expires_at;
        if self.bytes > max_bytes {
            let _ = self.make_room(0, now, (usize::MAX, max_bytes), Some(idx));
        }
    }

    /// Moves the expiry of slot `idx`.
    pub(super) fn extend(&mut self, idx: u32, expires_at: Ticks) {
        self.slots[idx as usize].expires_at = expires_at;
    }

    pub(super) fn remove_at(&mut self, idx: u32) {
        // Removals (release, expiry, eviction) hash the key again.
        let short = self.seed.hash(&self.slots[idx as usize].key) as u32;
        if let Ok(entry) = self.table.find_entry(spread(short), |&(i, _)| i == idx) {
            entry.remove();
        }
        self.set_state(idx, State::Vacant);
        let slot = &mut self.slots[idx as usize];
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(idx);
    }

    /// Drops expired or stale tags from the front, at most `budget`.
    pub(super) fn sweep(&mut self, now: Ticks, budget: usize) {
        for _ in 0..budget {
            let Some(&tag) = self.order.front() else {
                return;
            };
            if self.is_current(tag) {
                if self.slots[tag.0 as usize].expires_at > now {
                    break;
                }
                self.order.pop_front();
                self.remove_at(tag.0);
            } else {
                self.order.pop_front();
            }
        }
        // Stale tags pile up behind a long-lived front entry: compact.
        if self.order.len() > 2 * self.table.len() + 64 {
            let mut order = std::mem::take(&mut self.order);
            order.retain(|&tag| self.is_current(tag));
            self.order = order;
        }
    }

    /// Makes room for one more entry of `size` bytes: expired entries first,
    /// then completed records oldest first, never a live lock, and never
    /// the entry `protect` (the record being written).
    pub(super) fn make_room(
        &mut self,
        size: usize,
        now: Ticks,
        (max_entries, max_bytes): (usize, usize),
        protect: Option<u32>,
    ) -> Result<(), StoreError> {
        let mut skipped = 0;
        while self.table.len() + 1 > max_entries || self.bytes + size > max_bytes {
            if skipped >= self.order.len() {
                return Err(StoreError::CapacityExceeded);
            }
            let Some(tag) = self.order.pop_front() else {
                return Err(StoreError::CapacityExceeded);
            };
            if !self.is_current(tag) {
                continue;
            }
            let idx = tag.0;
            let e = &self.slots[idx as usize];
            let live_lock = e.expires_at > now && matches!(e.state, State::InFlight(_));
            if live_lock || protect == Some(idx) {
                // A live lock is never evicted: keep it, look further.
                self.order.push_back(tag);
                skipped += 1;
                continue;
            }
            self.remove_at(idx);
        }
        Ok(())
    }

    /// The held lock on `key`, if `token` holds it and it is live.
    pub(super) fn held(&self, key: Hashed<'_>, token: &LockToken, now: Ticks) -> Option<u32> {
        let idx = self.find(key)?;
        let e = &self.slots[idx as usize];
        let held =
            e.expires_at > now && matches!(&e.state, State::InFlight(l) if l.token == *token);
        held.then_some(idx)
    }

    /// What a waiter on `key`'s live lock is woken by (made on first use),
    /// and when the lock expires; `None` unless `key` has a live lock.
    pub(super) fn waiters(&mut self, key: Hashed<'_>, now: Ticks) -> Option<(Arc<Notify>, Ticks)> {
        let idx = self.find(key)?;
        let e = &mut self.slots[idx as usize];
        if e.expires_at <= now {
            return None;
        }
        let State::InFlight(lock) = &mut e.state else {
            return None;
        };
        let notify = lock
            .waiters
            .get_or_insert_with(|| Arc::new(Notify::new()))
            .clone();
        Some((notify, e.expires_at))
    }

    /// Live (unexpired) in-flight locks.
    fn live_locks(&self, now: Ticks) -> usize {
        self.slots
            .iter()
            .filter(|e| e.expires_at > now && matches!(e.state, State::InFlight(_)))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;
    use crate::record::Record;
    use crate::store::memory::tests::{FP, LEASE, TTL, acquire, key, record};
    use crate::store::{Begin, Store};
    use http::StatusCode;

    /// Two keys whose hashes agree in every bit are still two entries: the
    /// hash finds candidates, the key decides.
    #[test]
    fn a_full_hash_collision_is_told_apart_by_the_key() {
        let store = MemoryStore::builder().max_entries(1000).build();
        let (a, b) = (key(1), key(2));
        let (ha, hb) = (Hashed { key: &a, hash: 7 }, Hashed { key: &b, hash: 7 });
        let mut shard = store.inner.shard(ha);
        shard
            .insert(
                ha,
                u64::MAX,
                State::InFlight(Box::new(Lock {
                    token: crate::store::LockToken::new(),
                    fingerprint: FP,
                    waiters: None,
                })),
            )
            .unwrap();
        assert!(shard.find(ha).is_some());
        assert_eq!(shard.find(hb), None);
    }

    /// What the store charges against `max_bytes` is exact: the overhead
    /// for a lock, the overhead and the compact record for a record, and
    /// nothing once the entry is gone.
    #[tokio::test]
    async fn bytes_are_charged_exactly() {
        let store = MemoryStore::new();
        let t = acquire(&store, &key(1)).await;
        assert_eq!(store.bytes(), ENTRY_OVERHEAD);
        let r = record(1000);
        store.complete(&key(1), &t, &r, TTL).await.unwrap();
        assert_eq!(store.bytes(), ENTRY_OVERHEAD + r.to_compact().len());
        let t = acquire(&store, &key(2)).await;
        store.release(&key(2), &t).await.unwrap();
        assert_eq!(store.bytes(), ENTRY_OVERHEAD + r.to_compact().len());
    }

    /// An entry is expired at its deadline, not a tick after: the sweep
    /// removes a record whose ttl ended exactly now, as `begin` would take
    /// its key over.
    #[tokio::test(start_paused = true)]
    async fn the_sweep_removes_an_entry_at_its_deadline() {
        // One shard, so the next insertion sweeps it.
        let store = MemoryStore::builder().max_entries(1000).build();
        assert_eq!(store.inner.shard_count(), 1);
        let t = acquire(&store, &key(1)).await;
        let ttl = Duration::from_secs(1);
        store.complete(&key(1), &t, &record(1), ttl).await.unwrap();
        tokio::time::advance(ttl).await;
        acquire(&store, &key(2)).await;
        assert_eq!(store.len(), 1);
    }

    /// Tags of removed entries behind a long-lived entry at the front of
    /// the order do not pile up: the sweep stops at the live entry, then
    /// compacts the order once it holds more than twice the live entries
    /// (and 64).
    #[tokio::test]
    async fn stale_tags_behind_a_live_lock_are_compacted() {
        let store = MemoryStore::builder().max_entries(1000).build();
        acquire(&store, &key(0)).await;
        for n in 1..1000 {
            let t = acquire(&store, &key(n)).await;
            store.release(&key(n), &t).await.unwrap();
        }
        let shard = store.inner.shard(store.inner.hashed(&key(0)));
        assert_eq!(shard.table.len(), 1);
        assert!(
            shard.order.len() <= 2 + 64 + 1,
            "{} tags",
            shard.order.len()
        );
    }

    /// A store fills to its byte bound exactly: three locks fit in three
    /// locks' bytes, and the fourth is refused (live locks are never
    /// evicted).
    #[tokio::test]
    async fn the_byte_bound_is_reached_exactly() {
        let store = MemoryStore::builder()
            .max_entries(1000)
            .max_bytes(3 * ENTRY_OVERHEAD)
            .build();
        for n in 0..3 {
            acquire(&store, &key(n)).await;
        }
        assert_eq!(store.bytes(), 3 * ENTRY_OVERHEAD);
        assert!(matches!(
            store.begin(&key(3), &FP, LEASE).await,
            Err(StoreError::CapacityExceeded)
        ));
    }

    /// A lock is gone at its deadline, not a tick after: its holder can no
    /// longer complete it, and it makes room for a new entry like any
    /// expired one (here behind a live lock at the front of the order).
    #[tokio::test(start_paused = true)]
    async fn a_lock_at_its_deadline_is_expired() {
        let store = MemoryStore::builder().max_entries(2).build();
        let lease = Duration::from_secs(1);
        store.begin(&key(0), &FP, LEASE).await.unwrap();
        let Begin::Acquired(t) = store.begin(&key(1), &FP, lease).await.unwrap() else {
            panic!("expected the lock");
        };
        tokio::time::advance(lease).await;
        assert_eq!(store.live_locks(), 1);
        assert!(!store.complete(&key(1), &t, &record(1), TTL).await.unwrap());
        acquire(&store, &key(2)).await;
        assert_eq!(store.live_locks(), 2);
    }

    /// Entries land in every shard, so the store holds its whole bound:
    /// 2,000 locks in a store of 64 shards of 1,024 entries each all get
    /// in (were they all in one shard, the 1,025th would be refused).
    #[tokio::test]
    async fn entries_use_every_shard() {
        let store = MemoryStore::builder()
            .max_entries(64 * 1024)
            .max_bytes(512 << 20)
            .build();
        assert_eq!(store.inner.shard_count(), 64);
        for n in 0..2000 {
            acquire(&store, &key(n)).await;
        }
        assert_eq!(store.live_locks(), 2000);
    }

    /// A shard that sees no insertions of its own is still swept: every
    /// insertion sweeps one more shard, picked by its key's hash. Here
    /// every insertion lands in shard 0, and the entries that expired in
    /// the other shards are gone after them.
    #[tokio::test(start_paused = true)]
    async fn shards_without_insertions_are_swept_by_the_others() {
        let store = MemoryStore::new();
        let shards = store.inner.shard_count() as u64;
        assert_eq!(shards, 32);
        for n in 0..1000 {
            acquire(&store, &key(n)).await;
        }
        tokio::time::advance(LEASE + Duration::from_secs(1)).await;
        let in_shard_0 = (1000..)
            .map(key)
            .filter(|k| (store.inner.hashed(k).hash >> 58) & (shards - 1) == 0)
            .take(2000)
            .collect::<Vec<_>>();
        for k in &in_shard_0 {
            acquire(&store, k).await;
        }
        assert_eq!(store.len(), 2000);
    }

    /// Keys a client ground to agree in every byte but their last word still
    /// spread over the shards and the table's hashes, and two stores hash
    /// the same key differently: what collides cannot be known outside.
    #[test]
    fn keys_are_hashed_with_a_per_store_secret() {
        let store = MemoryStore::new();
        let n = store.inner.shards.len() as u64;
        assert!(n >= 16, "{n} shards");
        let keys: Vec<StoreKey> = (0..256u64)
            .map(|n| {
                let mut b = [0x5a; 32];
                b[24..].copy_from_slice(&n.to_le_bytes());
                StoreKey::from_bytes(b)
            })
            .collect();
        let seed = &store.inner.seed;
        let shards: std::collections::HashSet<u64> = keys
            .iter()
            .map(|k| (seed.hash(k) >> 58) & (n - 1))
            .collect();
        let shorts: std::collections::HashSet<u32> =
            keys.iter().map(|k| seed.hash(k) as u32).collect();
        assert!(
            shards.len() as u64 > n * 3 / 4,
            "{} shards of {n}",
            shards.len()
        );
        assert_eq!(shorts.len(), keys.len());
        let other = MemoryStore::new();
        let other = &other.inner.seed;
        assert!(keys.iter().all(|k| other.hash(k) != seed.hash(k)));
    }

    /// A slot freed and reused keeps the order of its new entry: the old
    /// entry's tag must not make the newer record look oldest.
    #[tokio::test(start_paused = true)]
    async fn eviction_is_oldest_first_across_slot_reuse() {
        let store = MemoryStore::builder().max_entries(3).build();
        // A live lock at the front keeps the queue from being swept.
        acquire(&store, &key(1)).await;
        let gone = acquire(&store, &key(2)).await;
        let t = acquire(&store, &key(3)).await;
        assert!(store.complete(&key(3), &t, &record(1), TTL).await.unwrap());
        assert!(store.release(&key(2), &gone).await.unwrap());
        // Takes key 2's slot, behind key 2's old place in the queue.
        let t = acquire(&store, &key(4)).await;
        assert!(store.complete(&key(4), &t, &record(2), TTL).await.unwrap());
        // Full: the oldest record (key 3) makes way, not the newest.
        acquire(&store, &key(5)).await;
        assert!(matches!(
            store.begin(&key(4), &FP, LEASE).await.unwrap(),
            Begin::Completed(r) if r.body().len() == 2
        ));
        assert_eq!(store.len(), 3);
        assert!(!matches!(
            store.begin(&key(3), &FP, LEASE).await,
            Ok(Begin::Completed(_))
        ));
    }

    /// The store against a plain model, over a long random sequence of
    /// operations on a few keys with time moving: slot reuse, stale order
    /// tags and expiry must never change an answer.
    #[tokio::test(start_paused = true)]
    async fn agrees_with_a_model_under_random_operations() {
        model_run(1_000, 0x2545_f491_4f6c_dd1d).await;
    }

    /// The same with room for only 6 of the 12 keys: a completed record may
    /// be evicted (the model then allows a fresh lock), a live lock never.
    #[tokio::test(start_paused = true)]
    async fn agrees_with_a_model_when_full() {
        model_run(6, 0x9e37_79b9_7f4a_7c15).await;
    }

    async fn model_run(max_entries: usize, seed: u64) {
        use std::collections::HashMap;

        #[derive(Clone, Copy, PartialEq, Debug)]
        enum M {
            Held(LockToken, u8),
            Done(u8),
        }
        let store = MemoryStore::builder().max_entries(max_entries).build();
        let evicts = max_entries < 12;
        let mut model: HashMap<u32, (M, Instant)> = HashMap::new();
        let mut tokens: Vec<(u32, LockToken)> = Vec::new();
        let mut rng = seed;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let lease = Duration::from_millis(2_000);
        let ttl = Duration::from_millis(5_000);
        for step in 0..20_000 {
            let k = next(12) as u32;
            let now = Instant::now();
            let live = model.get(&k).copied().filter(|(_, until)| *until > now);
            match next(6) {
                0 | 1 => {
                    let fp_n = next(2) as u8 + 1;
                    let got = store
                        .begin(&key(k), &Fingerprint::from_bytes([fp_n; 32]), lease)
                        .await;
                    let got = match got {
                        Ok(b) => Ok(b),
                        Err(StoreError::CapacityExceeded) => Err(StoreError::CapacityExceeded),
                        Err(e) => panic!("step {step}: {e}"),
                    };
                    let got = match got {
                        Ok(b) => b,
                        Err(e) => {
                            assert!(evicts, "step {step}: {e}");
                            let locks = model
                                .values()
                                .filter(|(m, until)| matches!(m, M::Held(..)) && *until > now)
                                .count();
                            assert!(
                                locks >= max_entries,
                                "step {step}: refused with {locks} locks"
                            );
                            continue;
                        }
                    };
                    match (live, got) {
                        (None, Begin::Acquired(t))
                        | (Some((M::Done(_), _)), Begin::Acquired(t))
                            if evicts || live.is_none() =>
                        {
                            model.insert(k, (M::Held(t, fp_n), now + lease));
                            tokens.push((k, t));
                        }
                        (Some((M::Held(_, f), _)), Begin::InFlight { fingerprint }) => {
                            assert_eq!(
                                fingerprint,
                                Some(Fingerprint::from_bytes([f; 32])),
                                "step {step}"
                            );
                        }
                        (Some((M::Done(f), _)), Begin::Completed(r)) => {
                            assert_eq!(
                                *r.fingerprint(),
                                Fingerprint::from_bytes([f; 32]),
                                "step {step}"
                            );
                            assert_eq!(r.body().len(), usize::from(f) * 10, "step {step}");
                        }
                        (want, got) => panic!("step {step}: model {want:?}, store {got:?}"),
                    }
                }
                op @ 2..=4 if !tokens.is_empty() => {
                    // A token for this key: current or long stale.
                    let mine: Vec<LockToken> = tokens
                        .iter()
                        .filter(|(tk, _)| *tk == k)
                        .map(|(_, t)| *t)
                        .collect();
                    let Some(&t) = mine.get(next(mine.len().max(1) as u64) as usize) else {
                        continue;
                    };
                    let holds = matches!(live, Some((M::Held(h, _), _)) if h == t);
                    let got = match op {
                        2 => {
                            let Some((M::Held(_, f), _)) = live else {
                                assert!(
                                    !store.complete(&key(k), &t, &record(1), ttl).await.unwrap()
                                );
                                continue;
                            };
                            let rec = Record::response(
                                Fingerprint::from_bytes([f; 32]),
                                StatusCode::OK,
                                vec![],
                                Bytes::from(vec![b'x'; usize::from(f) * 10]),
                            );
                            let ok = store.complete(&key(k), &t, &rec, ttl).await.unwrap();
                            if ok {
                                model.insert(k, (M::Done(f), now + ttl));
                            }
                            ok
                        }
                        3 => {
                            let ok = store.release(&key(k), &t).await.unwrap();
                            if ok {
                                model.remove(&k);
                            }
                            ok
                        }
                        _ => {
                            let ok = store.extend(&key(k), &t, lease).await.unwrap();
                            if ok && let Some((m, _)) = model.get(&k).copied() {
                                model.insert(k, (m, now + lease));
                            }
                            ok
                        }
                    };
                    assert_eq!(got, holds, "step {step}: op {op} on key {k}");
                }
                _ => tokio::time::advance(Duration::from_millis(next(700))).await,
            }
        }
        let now = Instant::now();
        let live = model.values().filter(|(_, until)| *until > now).count();
        if evicts {
            assert!(store.len() <= max_entries, "{} entries", store.len());
        } else {
            assert!(
                store.len() >= live,
                "{} entries, {live} live in the model",
                store.len()
            );
        }
    }
}
