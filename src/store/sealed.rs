//! [`SealedStore`]: encryption at rest for every store. Records are sealed
//! with AES-256-GCM before the store sees them and opened after it hands
//! them back, so Redis, PostgreSQL, MySQL, SQLite or memory only ever hold
//! ciphertext of responses and message outputs.
//!
//! It wraps a [`Store`], so it works with every store this crate ships, a
//! third-party one, and both faces: the HTTP layer and the message
//! consumer.
//!
//! ```
//! use tower_idempotency::IdempotencyLayer;
//! use tower_idempotency::MemoryStore;
//! use tower_idempotency::store::sealed::{RecordKey, SealedStore};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let secret = "4f".repeat(32);
//! // 32 random bytes as 64 hex characters (`openssl rand -hex 32` makes
//! // one), from the application's secret store; never from source code.
//! let key = RecordKey::from_hex(secret.trim())?;
//! let layer = IdempotencyLayer::new(SealedStore::new(MemoryStore::new(), key));
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```
//!
//! What the wrapped store holds is an envelope, not the record:
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use bytes::Bytes;
//! use tower_idempotency::store::sealed::{RecordKey, SealedStore};
//! use tower_idempotency::{MemoryStore, fingerprint::Fingerprint, record::Record, store::{Begin, Store, StoreKey}};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let memory = Arc::new(MemoryStore::new());
//! let sealed = SealedStore::new(memory.clone(), RecordKey::from_bytes([7; 32]));
//! let (key, fp) = (StoreKey::from_bytes([1; 32]), Fingerprint::from_bytes([2; 32]));
//! let lease = Duration::from_secs(30);
//!
//! let Begin::Acquired(token) = sealed.begin(&key, &fp, lease).await? else { unreachable!() };
//! let record = Record::value(fp, Bytes::from_static(b"card 4111-1111"));
//! assert!(sealed.complete(&key, &token, &record, Duration::from_secs(60)).await?);
//!
//! // The sealed store replays the record...
//! let Begin::Completed(replay) = sealed.begin(&key, &fp, lease).await? else { unreachable!() };
//! assert_eq!(replay, record);
//! // ...while the store underneath holds only ciphertext.
//! let Begin::Completed(held) = memory.begin(&key, &fp, lease).await? else { unreachable!() };
//! assert!(!held.body().windows(4).any(|w| w == b"4111"));
//! # Ok(())
//! # }
//! ```
//!
//! # What is sealed, and what is not
//!
//! Sealed: the whole [`Record`] as [`Record::encode`] writes it. For the
//! HTTP layer that is the status, every recorded header and trailer, and
//! the body; for the message face, the handler's output as its codec
//! encoded it; for a tombstone, its status and headers. A record sealed
//! under one store key does not open under another: a record copied or
//! moved to another key fails as if tampered with.
//!
//! Not sealed, and what it tells a reader of the store:
//!
//! - **Store keys**: already SHA-256 of the scope and the client's key (or
//!   the message id); neither can be read back.
//! - **Fingerprints**: SHA-256 of what the fingerprint covers (method,
//!   path, query, body, bound credentials; the payload for a message).
//!   The engine needs it in the clear, and SQL stores keep it in a column
//!   of its own from the moment the lock is taken, before any record
//!   exists, so the envelope carries it in the clear too: sealing it there
//!   would hide nothing. It is an unkeyed hash: whoever can read the store
//!   and guess a request's exact content can confirm the guess. Cover only
//!   what is needed ([`FingerprintConfig`](crate::fingerprint::FingerprintConfig)) if
//!   request bodies are guessable and secret.
//! - **Lock tokens, states, timestamps and ttls**: random or operational,
//!   they stay visible to the store, which needs them.
//! - **Sizes**: the envelope is 33 bytes longer than the encoded record, so
//!   its length reveals the response's length.
//!
//! # Envelope
//!
//! The record handed to the wrapped store is a [`RecordKind::Value`]
//! record whose fingerprint is the real one (see above) and whose value is:
//!
//! ```text
//! version     u8        1
//! key id      4 bytes   of the record key that sealed it (see RecordKey::id)
//! nonce       12 bytes  random, fresh for every record
//! ciphertext  n bytes   AES-256-GCM of Record::encode(), n = its length
//! tag         16 bytes  the GCM authentication tag
//! ```
//!
//! The associated data, authenticated but not stored, is the label
//! `tower-idempotency/sealed-record/v1\0`, the 32-byte store key, the
//! version and the key id.
//!
//! # Failures are closed
//!
//! A record that does not open is [`StoreError::Corrupt`]: unknown key id,
//! failed authentication (tampered with, moved to another store key,
//! sealed under another key with a colliding id), a truncated envelope, or
//! a plaintext record written before sealing was turned on. The engine
//! answers `503` and logs the error with the store key's hash prefix (never
//! the key, never the record key), even under
//! [`StoreErrorPolicy::FailOpen`](crate::StoreErrorPolicy::FailOpen): the
//! request that record stands for has run, and running it again is what
//! this crate exists to prevent. The message face reports
//! [`Processed::StoreError`](crate::message::Processed::StoreError) and the handler
//! does not run.
//!
//! A **wrong key** (an instance deployed with a key that did not seal the
//! records) therefore answers `503` to every retry of a completed request,
//! until the right key is deployed or the record's ttl passes; the handler
//! never re-runs. New keys still work, but are sealed under the wrong key:
//! keep it as a [previous key](SealedStore::with_previous_key) for one ttl
//! when putting the right one back.
//!
//! # Rotation
//!
//! [`with_previous_key`](SealedStore::with_previous_key) lists keys that
//! still open records but never seal new ones. To replace key `A` with `B`
//! across a fleet, without a window where one instance cannot read what
//! another wrote:
//!
//! 1. Deploy `SealedStore::new(store, A).with_previous_key(B)` everywhere:
//!    every instance can now open `B`, none writes it yet.
//! 2. Deploy `SealedStore::new(store, B).with_previous_key(A)` everywhere:
//!    new records are sealed under `B`, those under `A` still replay.
//! 3. Once the longest ttl in use (layer and consumer) has passed since
//!    step 2 finished, every record sealed under `A` has expired: deploy
//!    `SealedStore::new(store, B)` and retire `A`.
//!
//! If every instance restarts at once (a single instance), step 1 can be
//! skipped.
//!
//! A key seals records with random 96-bit nonces: keep it well below 2³²
//! records (four billion) before rotating, the bound under which a nonce
//! collision stays negligible.
//!
//! # Turning it on for an existing deployment
//!
//! Records written before sealing was turned on are plaintext, and by
//! default a retry that hits one gets `503` until it expires.
//! [`with_plaintext_fallback(true)`](SealedStore::with_plaintext_fallback)
//! replays them instead for the migration, at a price in integrity: while
//! it is on, whoever can write to the store can plant a plaintext record
//! that will be replayed. Turn it off once the longest ttl has passed.
//!
//! # Cost
//!
//! Sealing adds one AES-256-GCM pass and one copy of the encoded record to
//! each `complete`, and the same to each replay; the `aes-gcm` crate
//! detects AES-NI and CLMUL (x86) or the ARMv8 crypto extensions at run
//! time, and falls back to constant-time software. Measured in a release
//! build on a shared 2-core x86-64 virtual machine with AES-NI: about 2 µs
//! to seal and 2 µs to open a record with a 1 KiB body, and about 90 µs
//! each for 64 KiB (up to twice that under load), of which about 40 µs is
//! the record's own encoding and checksum, paid with or without sealing.
//! The store's own round trip is usually larger. The work runs on the
//! calling task, like the record's encoding.
//!
//! # Why AES-256-GCM
//!
//! AES-256-GCM (the RustCrypto `aes-gcm` crate) is the standard AEAD that
//! compliance regimes name, with hardware support on every server CPU, and
//! a 256-bit key. ChaCha20-Poly1305 would serve as well on hardware
//! without AES instructions; servers have them.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{AeadInPlace, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Key};
use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};

use super::{Attachment, Begin, Capabilities, LockToken, Store, StoreError, StoreKey};
use crate::fingerprint::Fingerprint;
use crate::record::{DecodeError, Record, RecordKind};

/// The envelope format this module writes and reads.
const VERSION: u8 = 1;
const KEY_ID_LEN: usize = 4;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Version, key id, nonce.
const HEADER_LEN: usize = 1 + KEY_ID_LEN + NONCE_LEN;
/// The shortest envelope: an empty ciphertext and its tag.
const MIN_LEN: usize = HEADER_LEN + TAG_LEN;
const AAD_LABEL: &[u8] = b"tower-idempotency/sealed-record/v1\0";
const KEY_ID_LABEL: &[u8] = b"tower-idempotency/record-key-id/v1";

/// A 256-bit AES-GCM key that seals records.
///
/// Its [`id`](Self::id) is derived from the key, written into every
/// envelope it seals, and is all that `Debug` prints.
///
/// ```
/// use tower_idempotency::store::sealed::RecordKey;
///
/// let key = RecordKey::from_hex(&"ab".repeat(32)).unwrap();
/// let printed = format!("{key:?}");
/// assert_eq!(printed, format!("RecordKey({:08x})", key.id()));
/// assert!(!printed.contains("abab"));
/// ```
#[derive(Clone)]
pub struct RecordKey {
    cipher: Aes256Gcm,
    id: [u8; KEY_ID_LEN],
}

impl RecordKey {
    /// A key from 32 bytes, which must be random (from a CSPRNG or a key
    /// management service), and secret.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let digest = Sha256::new()
            .chain_update(KEY_ID_LABEL)
            .chain_update(bytes)
            .finalize();
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        let cipher = Aes256Gcm::new(&Key::<Aes256Gcm>::from(bytes));
        Self { cipher, id }
    }

    /// A key from exactly 64 hex characters (either case, no prefix, no
    /// surrounding whitespace: trim a value read from a file first).
    pub fn from_hex(hex: &str) -> Result<Self, InvalidRecordKey> {
        let count = hex.chars().count();
        if count != 64 {
            return Err(InvalidRecordKey::Length(count));
        }
        let mut bytes = [0u8; 32];
        for (i, c) in hex.chars().enumerate() {
            let digit = c.to_digit(16).ok_or(InvalidRecordKey::NotHex(i))?;
            // A hex digit is below 16.
            let digit = u8::try_from(digit).map_err(|_| InvalidRecordKey::NotHex(i))?;
            bytes[i / 2] |= if i % 2 == 0 { digit << 4 } else { digit };
        }
        Ok(Self::from_bytes(bytes))
    }

    /// The key's id: the first four bytes of
    /// SHA-256(`tower-idempotency/record-key-id/v1` ‖ key), big-endian.
    /// Not secret: it names the key in envelopes and log lines, and tells
    /// which key sealed a record.
    pub fn id(&self) -> u32 {
        u32::from_be_bytes(self.id)
    }
}

impl fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordKey({:08x})", self.id())
    }
}

/// Parses 64 hex characters, as [`RecordKey::from_hex`].
impl FromStr for RecordKey {
    type Err = InvalidRecordKey;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_hex(s)
    }
}

/// A record key that [`RecordKey::from_hex`] refused. The message never
/// repeats the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidRecordKey {
    /// Not 64 characters long; carries the length found.
    #[error("a record key is 64 hex characters (32 bytes), got {0} characters")]
    Length(usize),
    /// The character at this position (from 0) is not a hex digit.
    #[error("a record key is hex: the character at position {0} is not a hex digit")]
    NotHex(usize),
}

/// Seals every record with AES-256-GCM before the wrapped store sees it,
/// and opens it on the way back. See the [module docs](self) for what is
/// sealed, the envelope, rotation and failures.
///
/// `S` is any [`Store`], `Arc<dyn Store>` included:
///
/// ```
/// use std::sync::Arc;
/// use tower_idempotency::store::sealed::{RecordKey, SealedStore};
/// use tower_idempotency::{IdempotencyLayer, MemoryStore, store::Store};
///
/// let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
/// let current = RecordKey::from_bytes([2; 32]);
/// let previous = RecordKey::from_bytes([1; 32]);
/// let sealed = SealedStore::new(store, current).with_previous_key(previous);
/// let layer = IdempotencyLayer::new(sealed);
/// # let _ = layer;
/// ```
pub struct SealedStore<S> {
    inner: S,
    current: RecordKey,
    previous: Vec<RecordKey>,
    plaintext_fallback: bool,
}

impl<S> fmt::Debug for SealedStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedStore")
            .field("key", &self.current)
            .field("previous", &self.previous)
            .field("plaintext_fallback", &self.plaintext_fallback)
            .finish_non_exhaustive()
    }
}

impl<S> SealedStore<S> {
    /// Wraps `inner`: records are sealed under `key`, and only records
    /// sealed under `key` (or a [previous key](Self::with_previous_key))
    /// open.
    pub fn new(inner: S, key: RecordKey) -> Self {
        Self {
            inner,
            current: key,
            previous: Vec::new(),
            plaintext_fallback: false,
        }
    }

    /// Also opens records sealed under `key`, without sealing new ones
    /// with it: for [rotation](self#rotation). Repeatable.
    #[must_use]
    pub fn with_previous_key(mut self, key: RecordKey) -> Self {
        self.previous.push(key);
        self
    }

    /// Replays records that were never sealed (written before sealing was
    /// turned on) instead of failing closed on them (default: off).
    ///
    /// For migrating a deployment only. While on, whoever can write to the
    /// store can plant a plaintext record and have it replayed: integrity
    /// then rests on the store's access control alone. A record that looks
    /// like an envelope (a value record whose value is at least 33 bytes
    /// and starts with the version byte) must still open, so a wrong key
    /// still fails closed; a plaintext message output of that shape fails
    /// closed too. Turn it off once the longest ttl in use has passed.
    #[must_use]
    pub fn with_plaintext_fallback(mut self, on: bool) -> Self {
        self.plaintext_fallback = on;
        self
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The wrapped store, taking it out.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The current key's [id](RecordKey::id): the one new records are
    /// sealed under.
    pub fn key_id(&self) -> u32 {
        self.current.id()
    }

    /// The envelope of `record`, filed under `key`, sealed with the current
    /// key.
    fn seal(&self, key: &StoreKey, record: &Record) -> Result<Bytes, StoreError> {
        let plaintext = record.encode();
        let mut nonce = [0u8; NONCE_LEN];
        OsRng
            .try_fill_bytes(&mut nonce)
            .map_err(|e| StoreError::backend(format!("no randomness for a record nonce: {e}")))?;
        let key_id = self.current.id;
        let mut out = BytesMut::with_capacity(MIN_LEN + plaintext.len());
        out.put_u8(VERSION);
        out.put_slice(&key_id);
        out.put_slice(&nonce);
        out.put_slice(&plaintext);
        let tag = self
            .current
            .cipher
            .encrypt_in_place_detached(
                &nonce.into(),
                &associated_data(key, &key_id),
                &mut out[HEADER_LEN..],
            )
            .map_err(|_| StoreError::backend("record too large to seal"))?;
        out.put_slice(&tag);
        Ok(out.freeze())
    }

    /// The record inside `outer`, as the wrapped store returned it for
    /// `key`.
    fn open(&self, key: &StoreKey, outer: Record) -> Result<Record, StoreError> {
        let looks_sealed = outer.kind() == RecordKind::Value
            && outer.body().len() >= MIN_LEN
            && outer.body().first() == Some(&VERSION);
        if !looks_sealed {
            if self.plaintext_fallback {
                return Ok(outer);
            }
            let reason = if outer.kind() != RecordKind::Value {
                "record is not sealed"
            } else if outer.body().len() < MIN_LEN {
                "sealed record is truncated"
            } else {
                "unsupported sealed record version"
            };
            return Err(corrupt(reason));
        }
        let body = outer.into_body();
        let Some(envelope) = Envelope::parse(&body) else {
            return Err(corrupt("sealed record is truncated"));
        };
        let aad = associated_data(key, &envelope.key_id);
        let mut known = false;
        for candidate in std::iter::once(&self.current).chain(&self.previous) {
            if candidate.id != envelope.key_id {
                continue;
            }
            known = true;
            let mut buf = BytesMut::from(envelope.ciphertext);
            let opened = candidate.cipher.decrypt_in_place_detached(
                &(*envelope.nonce).into(),
                &aad,
                &mut buf,
                &(*envelope.tag).into(),
            );
            if opened.is_ok() {
                return Record::decode_bytes(buf.freeze()).map_err(StoreError::Corrupt);
            }
        }
        if known {
            Err(corrupt(
                "sealed record failed authentication: tampered with, moved from another key, or sealed under another record key",
            ))
        } else {
            tracing::warn!(
                key = %key,
                sealed_with = %format_args!("{:08x}", u32::from_be_bytes(envelope.key_id)),
                current = %format_args!("{:08x}", self.current.id()),
                "idempotency record sealed under a record key this store does not hold"
            );
            Err(corrupt(
                "sealed under a record key this store does not hold",
            ))
        }
    }
}

/// The parts of an envelope, borrowed from its bytes.
struct Envelope<'a> {
    key_id: [u8; KEY_ID_LEN],
    nonce: &'a [u8; NONCE_LEN],
    ciphertext: &'a [u8],
    tag: &'a [u8; TAG_LEN],
}

impl<'a> Envelope<'a> {
    /// Splits a version-1 envelope; `None` if it is too short.
    fn parse(bytes: &'a [u8]) -> Option<Self> {
        let (_version, rest) = bytes.split_first()?;
        let (key_id, rest) = rest.split_first_chunk::<KEY_ID_LEN>()?;
        let (nonce, rest) = rest.split_first_chunk::<NONCE_LEN>()?;
        let (ciphertext, tag) = rest.split_last_chunk::<TAG_LEN>()?;
        Some(Self {
            key_id: *key_id,
            nonce,
            ciphertext,
            tag,
        })
    }
}

/// Label ‖ store key ‖ version ‖ key id: binds the envelope to the key it
/// is filed under and to its own header.
fn associated_data(key: &StoreKey, key_id: &[u8; KEY_ID_LEN]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_LABEL.len() + 32 + 1 + KEY_ID_LEN);
    aad.extend_from_slice(AAD_LABEL);
    aad.extend_from_slice(key.as_bytes());
    aad.push(VERSION);
    aad.extend_from_slice(key_id);
    aad
}

fn corrupt(reason: &'static str) -> StoreError {
    StoreError::Corrupt(DecodeError::new(reason))
}

#[async_trait]
impl<S: Store> Store for SealedStore<S> {
    async fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        match self.inner.begin(key, fingerprint, lease).await? {
            Begin::Completed(outer) => Ok(Begin::Completed(self.open(key, outer)?)),
            other => Ok(other),
        }
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: &LockToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let sealed = Record::value(*record.fingerprint(), self.seal(key, record)?);
        self.inner.complete(key, token, &sealed, ttl).await
    }

    async fn release(&self, key: &StoreKey, token: &LockToken) -> Result<bool, StoreError> {
        self.inner.release(key, token).await
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: &LockToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.inner.extend(key, token, lease).await
    }

    fn attachment(&self, key: &StoreKey, token: &LockToken) -> Option<Attachment> {
        self.inner.attachment(key, token)
    }

    fn capabilities(&self) -> Capabilities {
        // A sealed record is the plain one plus the envelope and the value
        // record around it: what the inner store holds, less that.
        let inner = self.inner.capabilities();
        match inner.max_record_size() {
            Some(max) => {
                let around = Record::value(Fingerprint::from_bytes([0; 32]), Bytes::new())
                    .encode()
                    .len()
                    + MIN_LEN;
                inner.with_max_record_size(max.saturating_sub(around))
            }
            None => inner,
        }
    }

    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<(), StoreError> {
        self.inner.wait(key, timeout).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use http::{HeaderName, HeaderValue, StatusCode};

    use super::*;
    use crate::MemoryStore;

    fn fp(n: u8) -> Fingerprint {
        Fingerprint::from_bytes([n; 32])
    }

    fn sample(len: usize) -> Record {
        Record::response(
            fp(3),
            StatusCode::CREATED,
            vec![(
                HeaderName::from_static("location"),
                HeaderValue::from_static("/orders/1"),
            )],
            Bytes::from(vec![b'x'; len]),
        )
    }

    fn store() -> SealedStore<MemoryStore> {
        SealedStore::new(MemoryStore::new(), RecordKey::from_bytes([9; 32]))
    }

    fn outer(envelope: Bytes) -> Record {
        Record::value(fp(3), envelope)
    }

    #[test]
    fn key_id_is_the_documented_hash() {
        let digest =
            Sha256::digest([&b"tower-idempotency/record-key-id/v1"[..], &[5; 32]].concat());
        let want = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
        assert_eq!(RecordKey::from_bytes([5; 32]).id(), want);
        assert_ne!(want, RecordKey::from_bytes([6; 32]).id());
    }

    #[test]
    fn envelope_layout() {
        let s = store();
        let key = StoreKey::from_bytes([1; 32]);
        let record = sample(100);
        let env = s.seal(&key, &record).unwrap();
        assert_eq!(env.len(), MIN_LEN + record.encode().len());
        assert_eq!(env[0], VERSION);
        assert_eq!(env[1..5], s.current.id);
        // Fresh nonce every time.
        let again = s.seal(&key, &record).unwrap();
        assert_ne!(env[5..17], again[5..17]);
        assert_eq!(s.open(&key, outer(env)).unwrap(), record);
    }

    #[test]
    fn every_flipped_byte_and_every_cut_fails_closed() {
        let s = store();
        let key = StoreKey::from_bytes([1; 32]);
        let env = s.seal(&key, &sample(40)).unwrap();
        for i in 0..env.len() {
            let mut bad = env.to_vec();
            bad[i] ^= 0x01;
            let err = s.open(&key, outer(Bytes::from(bad))).unwrap_err();
            assert!(
                matches!(err, StoreError::Corrupt(_)),
                "flip at {i}: {err:?}"
            );
        }
        for len in 0..env.len() {
            let err = s.open(&key, outer(env.slice(..len))).unwrap_err();
            assert!(
                matches!(err, StoreError::Corrupt(_)),
                "cut at {len}: {err:?}"
            );
        }
    }

    #[test]
    fn plaintext_fallback_replays_only_what_does_not_look_sealed() {
        let key = StoreKey::from_bytes([1; 32]);
        let plain = sample(10);
        assert!(matches!(
            store().open(&key, plain.clone()),
            Err(StoreError::Corrupt(_))
        ));
        let lenient = store().with_plaintext_fallback(true);
        assert_eq!(lenient.open(&key, plain.clone()).unwrap(), plain);
        // An envelope under an unknown key still fails closed.
        let foreign = SealedStore::new(MemoryStore::new(), RecordKey::from_bytes([8; 32]));
        let env = foreign.seal(&key, &plain).unwrap();
        assert!(matches!(
            lenient.open(&key, outer(env)),
            Err(StoreError::Corrupt(_))
        ));
    }

    /// A sealed record opens to the same record, at a small and a large
    /// body, and its envelope is longer than the record's own encoding (it
    /// carries a nonce and a tag). What sealing costs is measured in
    /// `benches/sealed.rs`.
    #[test]
    fn seal_and_open_round_trip() {
        let s = store();
        let key = StoreKey::from_bytes([1; 32]);
        for len in [1024, 64 * 1024] {
            let record = sample(len);
            let env = s.seal(&key, &record).unwrap();
            let opened = s.open(&key, outer(env.clone())).unwrap();
            assert_eq!(opened.body(), record.body());
            assert_eq!(opened.encode(), record.encode());
            assert!(env.len() > record.encode().len());
        }
    }
}
