//! Recorded outcomes and their compact, versioned binary encoding.
//!
//! Every store keeps a completed request as a [`Record`]: an HTTP response
//! (the HTTP layer), an opaque value (the message face: a handler's output
//! as its codec encoded it), or a tombstone (the work completed, its
//! output was not kept). Stores that write bytes somewhere (Redis,
//! PostgreSQL) use [`Record::encode`] and [`Record::decode`], so a record
//! written by one version of this crate can be read by the next.
//!
//! # Wire format (versions 1 and 2)
//!
//! All integers are big-endian. Version 2 adds the value kind; a record of
//! a kind that version 1 knows is still written as version 1, so that
//! during a rolling upgrade an instance of the previous release reads
//! every HTTP record the new one writes.
//!
//! ```text
//! magic      2 bytes  "TI"
//! version    u8       1, or 2 for a value record
//! kind       u8       0 = response, 1 = tombstone (output too large to keep),
//!                     2 = value (version 2 only)
//! fingerprint 32 bytes
//! created_at u64      milliseconds since the Unix epoch (informational)
//! status     u16      a value record: 200, not meaningful
//! headers    u32 count, then per header: u16 name length, name, u32 value length, value
//! trailers   u32 count, then as headers
//! body       u32 length, then the bytes
//! checksum   8 bytes  the first 8 bytes of SHA-256 over everything before it
//! ```
//!
//! Decoding verifies the checksum, then checks every length against the
//! input and every header name, value and status for validity: a truncated
//! or corrupt record is a [`DecodeError`], never a panic and never a wrong
//! replay.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderName, HeaderValue, StatusCode};
use sha2::{Digest, Sha256};

use crate::fingerprint::Fingerprint;

const MAGIC: &[u8; 2] = b"TI";
/// The newest format version this crate writes and reads.
const VERSION: u8 = 2;

/// What a [`Record`] holds: a full response, an opaque value, or a
/// tombstone for an output that was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RecordKind {
    /// The response was recorded in full and is replayed as it was.
    Response,
    /// The request completed but its output was not kept (a response body
    /// over the layer's `max_response_body`, or a value its codec could not
    /// encode); a retry is told so instead of running again.
    Tombstone,
    /// A handler's output, encoded by the caller's codec: the message
    /// face's record. Only [`body`](Record::body) and the fingerprint are
    /// meaningful.
    Value,
}

/// A completed request: its fingerprint and the outcome to replay.
///
/// Cloning copies the header list; the body and the trailers are reference
/// counted.
#[derive(Clone, PartialEq, Eq)]
pub struct Record {
    kind: RecordKind,
    fingerprint: Fingerprint,
    created_at_ms: u64,
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// `None` when there are none (most records): no shared empty list whose
    /// reference count every thread would write to.
    trailers: Option<Arc<[(HeaderName, HeaderValue)]>>,
    body: Bytes,
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("kind", &self.kind)
            .field("fingerprint", &self.fingerprint)
            .field("status", &self.status)
            .field("headers", &self.headers.len())
            .field("trailers", &self.trailers().len())
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl Record {
    /// A recorded response.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::{HeaderName, HeaderValue, StatusCode};
    /// use tower_idempotency::{fingerprint::Fingerprint, record::Record};
    ///
    /// let record = Record::response(
    ///     Fingerprint::from_bytes([7; 32]),
    ///     StatusCode::CREATED,
    ///     vec![(HeaderName::from_static("content-type"), HeaderValue::from_static("application/json"))],
    ///     Bytes::from_static(br#"{"id":1}"#),
    /// );
    /// let bytes = record.encode();
    /// assert_eq!(Record::decode(&bytes).unwrap(), record);
    /// ```
    pub fn response(
        fingerprint: Fingerprint,
        status: StatusCode,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: Bytes,
    ) -> Self {
        Self {
            kind: RecordKind::Response,
            fingerprint,
            created_at_ms: crate::util::unix_millis(),
            status,
            headers,
            trailers: None,
            body,
        }
    }

    /// A tombstone: the request completed with `status`, but the body was
    /// too large to keep. Replays answer with a problem response instead of
    /// running the request again.
    pub fn tombstone(
        fingerprint: Fingerprint,
        status: StatusCode,
        headers: Vec<(HeaderName, HeaderValue)>,
    ) -> Self {
        Self {
            kind: RecordKind::Tombstone,
            fingerprint,
            created_at_ms: crate::util::unix_millis(),
            status,
            headers,
            trailers: None,
            body: Bytes::new(),
        }
    }

    /// A recorded value: the opaque bytes a codec made of a handler's
    /// output. Its status is `200` and it has no headers; neither means
    /// anything.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use tower_idempotency::{fingerprint::Fingerprint, record::{Record, RecordKind}};
    ///
    /// let record = Record::value(Fingerprint::from_bytes([1; 32]), Bytes::from_static(b"42"));
    /// let decoded = Record::decode(&record.encode()).unwrap();
    /// assert_eq!(decoded.kind(), RecordKind::Value);
    /// assert_eq!(decoded.body(), "42");
    /// ```
    pub fn value(fingerprint: Fingerprint, value: Bytes) -> Self {
        Self {
            kind: RecordKind::Value,
            fingerprint,
            created_at_ms: crate::util::unix_millis(),
            status: StatusCode::OK,
            headers: Vec::new(),
            trailers: None,
            body: value,
        }
    }

    /// Sets the trailers recorded after the body (gRPC-style responses).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::{HeaderName, HeaderValue, StatusCode};
    /// use tower_idempotency::{fingerprint::Fingerprint, record::Record};
    ///
    /// let record = Record::response(Fingerprint::from_bytes([7; 32]), StatusCode::OK, vec![], Bytes::new())
    ///     .with_trailers(vec![(HeaderName::from_static("grpc-status"), HeaderValue::from_static("0"))]);
    /// let decoded = Record::decode(&record.encode()).unwrap();
    /// assert_eq!(decoded.trailers()[0].1, "0");
    /// ```
    #[must_use]
    pub fn with_trailers(mut self, trailers: Vec<(HeaderName, HeaderValue)>) -> Self {
        self.trailers = if trailers.is_empty() {
            None
        } else {
            Some(trailers.into())
        };
        self
    }

    /// Whether this is a full response or a tombstone.
    pub fn kind(&self) -> RecordKind {
        self.kind
    }

    /// The fingerprint of the request that produced this record.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    /// When the record was made, by the clock of the process that made it.
    /// Informational only: no store uses it for expiry.
    pub fn created_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.created_at_ms)
    }

    /// The recorded status code.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The recorded end-to-end headers, every value in order.
    pub fn headers(&self) -> &[(HeaderName, HeaderValue)] {
        &self.headers
    }

    /// The recorded trailers, if any.
    pub fn trailers(&self) -> &[(HeaderName, HeaderValue)] {
        self.trailers.as_deref().unwrap_or(&[])
    }

    /// The recorded body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The recorded body, taking it out of the record.
    pub fn into_body(self) -> Bytes {
        self.body
    }

    /// Encodes the record in the versioned binary format described in the
    /// [module docs](self).
    pub fn encode(&self) -> Bytes {
        let len = self.encoded_len();
        let mut out = BytesMut::with_capacity(len);
        out.put_slice(MAGIC);
        out.put_u8(self.format_version());
        out.put_u8(self.kind_byte());
        out.put_slice(self.fingerprint.as_bytes());
        out.put_u64(self.created_at_ms);
        out.put_u16(self.status.as_u16());
        self.put_fields(&mut out);
        out.put_u32(len_u32(self.body.len()));
        out.put_slice(&self.body);
        let sum = checksum(&out);
        out.put_slice(&sum);
        debug_assert_eq!(out.len(), len, "encoded_len disagrees with encode");
        out.freeze()
    }

    /// The length of [`encode`](Self::encode)'s output, without encoding:
    /// what a store with a size limit compares against it.
    pub(crate) fn encoded_len(&self) -> usize {
        2 + 1 + 1 + 32 + 8 + 2 + self.fields_len() + 4 + self.body.len() + CHECKSUM_LEN
    }

    /// The in-process form, for stores that keep records in memory: one
    /// buffer (kind, fingerprint, time, status, fields as in [`encode`](Self::encode),
    /// then the body to the end), with neither magic, version nor checksum,
    /// as it never leaves the process. Far smaller than the record's own
    /// header lists, and [`from_compact`](Self::from_compact) shares the
    /// buffer instead of copying it.
    pub(crate) fn to_compact(&self) -> Bytes {
        let len = 1 + 32 + 8 + 2 + self.fields_len() + self.body.len();
        let mut out = BytesMut::with_capacity(len);
        out.put_u8(self.kind_byte());
        out.put_slice(self.fingerprint.as_bytes());
        out.put_u64(self.created_at_ms);
        out.put_u16(self.status.as_u16());
        self.put_fields(&mut out);
        out.put_slice(&self.body);
        debug_assert_eq!(out.len(), len, "to_compact's size estimate is wrong");
        out.freeze()
    }

    /// Reads a record written by [`to_compact`](Self::to_compact). The
    /// fields are still checked: a bug elsewhere must not become a response
    /// with an invalid header.
    pub(crate) fn from_compact(bytes: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader { buf: bytes };
        let mut record = r.record_without_body()?;
        record.body = r.buf;
        Ok(record)
    }

    fn kind_byte(&self) -> u8 {
        match self.kind {
            RecordKind::Response => 0,
            RecordKind::Tombstone => 1,
            RecordKind::Value => 2,
        }
    }

    /// The oldest format version that holds this record's kind.
    fn format_version(&self) -> u8 {
        match self.kind {
            RecordKind::Response | RecordKind::Tombstone => 1,
            RecordKind::Value => 2,
        }
    }

    /// The encoded length of the header and trailer lists.
    fn fields_len(&self) -> usize {
        let list_len = |list: &[(HeaderName, HeaderValue)]| {
            4 + list
                .iter()
                .map(|(n, v)| 6 + n.as_str().len() + v.len())
                .sum::<usize>()
        };
        list_len(&self.headers) + list_len(self.trailers())
    }

    fn put_fields(&self, out: &mut BytesMut) {
        for list in [&self.headers[..], self.trailers()] {
            out.put_u32(len_u32(list.len()));
            for (name, value) in list.iter() {
                let name = name.as_str().as_bytes();
                // Header names are far below 64 KiB: `HeaderName` caps them.
                out.put_u16(u16::try_from(name.len()).unwrap_or(u16::MAX));
                out.put_slice(name);
                out.put_u32(len_u32(value.len()));
                out.put_slice(value.as_bytes());
            }
        }
    }

    /// Decodes a record written by [`Record::encode`] from a byte slice.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        Self::decode_bytes(Bytes::copy_from_slice(bytes))
    }

    /// Decodes a record from owned bytes; the body shares the buffer
    /// instead of being copied.
    pub fn decode_bytes(mut bytes: Bytes) -> Result<Self, DecodeError> {
        if bytes.len() < CHECKSUM_LEN {
            return Err(DecodeError::new("truncated record"));
        }
        let sum = bytes.split_off(bytes.len() - CHECKSUM_LEN);
        if checksum(&bytes) != sum[..] {
            return Err(DecodeError::new("checksum mismatch"));
        }
        let mut r = Reader { buf: bytes };
        if r.take(2)?.as_ref() != MAGIC {
            return Err(DecodeError::new("bad magic"));
        }
        let version = r.u8()?;
        if !(1..=VERSION).contains(&version) {
            return Err(DecodeError::new("unsupported version"));
        }
        let mut record = r.record_without_body()?;
        if record.format_version() > version {
            return Err(DecodeError::new("record kind newer than its version"));
        }
        let body_len = r.u32()? as usize;
        record.body = r.take(body_len)?;
        if r.buf.has_remaining() {
            return Err(DecodeError::new("trailing bytes"));
        }
        Ok(record)
    }
}

const CHECKSUM_LEN: usize = 8;

fn checksum(bytes: &[u8]) -> [u8; CHECKSUM_LEN] {
    let digest = Sha256::digest(bytes);
    let mut out = [0u8; CHECKSUM_LEN];
    out.copy_from_slice(&digest[..CHECKSUM_LEN]);
    out
}

fn len_u32(len: usize) -> u32 {
    // Bodies are bounded by the layer's `max_response_body`, which is
    // clamped to `MAX_RECORDED_BODY`; header values and lists are far
    // smaller.
    debug_assert!(u32::try_from(len).is_ok(), "a length past 32 bits: {len}");
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn kind_from(byte: u8) -> Result<RecordKind, DecodeError> {
    match byte {
        0 => Ok(RecordKind::Response),
        1 => Ok(RecordKind::Tombstone),
        2 => Ok(RecordKind::Value),
        _ => Err(DecodeError::new("unknown record kind")),
    }
}

struct Reader {
    buf: Bytes,
}

impl Reader {
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            Err(DecodeError::new("truncated record"))
        } else {
            Ok(())
        }
    }
    fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }
    /// What both formats hold after their preamble and before the body:
    /// kind, fingerprint, time, status, headers and trailers.
    fn record_without_body(&mut self) -> Result<Record, DecodeError> {
        let kind = kind_from(self.u8()?)?;
        let fingerprint = self.fingerprint()?;
        let created_at_ms = self.u64()?;
        let status =
            StatusCode::from_u16(self.u16()?).map_err(|_| DecodeError::new("invalid status"))?;
        let headers = self.fields()?;
        let trailers = self.fields()?;
        Ok(Record {
            kind,
            fingerprint,
            created_at_ms,
            status,
            headers,
            trailers: None,
            body: Bytes::new(),
        }
        .with_trailers(trailers))
    }
    fn fingerprint(&mut self) -> Result<Fingerprint, DecodeError> {
        self.need(32)?;
        let mut fingerprint = [0u8; 32];
        self.buf.copy_to_slice(&mut fingerprint);
        Ok(Fingerprint::from_bytes(fingerprint))
    }
    fn fields(&mut self) -> Result<Vec<(HeaderName, HeaderValue)>, DecodeError> {
        let count = self.u32()? as usize;
        // Each field takes at least 6 bytes: refuse counts the input cannot hold
        // before allocating for them.
        if count > self.buf.remaining() / 6 {
            return Err(DecodeError::new("truncated record"));
        }
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            let name_len = self.u16()? as usize;
            let name = self.take(name_len)?;
            let parsed = HeaderName::from_bytes(&name)
                .map_err(|_| DecodeError::new("invalid header name"))?;
            // Only the canonical (lower-case) form that `encode` writes.
            if parsed.as_str().as_bytes() != &name[..] {
                return Err(DecodeError::new("non-canonical header name"));
            }
            let name = parsed;
            let value_len = self.u32()? as usize;
            let value = self.take(value_len)?;
            let value = HeaderValue::from_maybe_shared(value)
                .map_err(|_| DecodeError::new("invalid header value"))?;
            out.push((name, value));
        }
        Ok(out)
    }
}

/// A stored record could not be decoded: it is truncated, corrupt, or was
/// written by an incompatible version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode idempotency record: {reason}")]
pub struct DecodeError {
    reason: &'static str,
}

impl DecodeError {
    pub(crate) fn new(reason: &'static str) -> Self {
        Self { reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_sizes_never_contents() {
        let record = sample();
        let text = format!("{record:?}");
        assert!(text.starts_with("Record { kind: Response"), "{text}");
        assert!(text.contains("status: 201"), "{text}");
        assert!(
            text.contains(&format!("body_len: {}", record.body().len())),
            "{text}"
        );
        assert!(!text.contains("a=1"), "a header value leaked: {text}");
    }

    #[test]
    fn encoded_len_is_the_encodings_length() {
        let bare = Record::tombstone(Fingerprint::from_bytes([1; 32]), StatusCode::OK, vec![]);
        let with_trailers = sample().with_trailers(vec![(
            HeaderName::from_static("grpc-status"),
            HeaderValue::from_static("0"),
        )]);
        for record in [bare, sample(), with_trailers] {
            assert_eq!(record.encoded_len(), record.encode().len(), "{record:?}");
            let compact = record.to_compact();
            assert_eq!(Record::from_compact(compact).unwrap(), record);
        }
    }

    #[test]
    fn too_short_is_truncated_and_eight_bytes_fail_their_checksum() {
        let err = Record::decode(&[0; CHECKSUM_LEN - 1]).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        let err = Record::decode(&[0; CHECKSUM_LEN]).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn created_at_is_now() {
        let age = SystemTime::now()
            .duration_since(sample().created_at())
            .unwrap();
        assert!(age < Duration::from_secs(60), "{age:?}");
    }

    fn sample() -> Record {
        Record::response(
            Fingerprint::from_bytes([9; 32]),
            StatusCode::CREATED,
            vec![
                (
                    HeaderName::from_static("set-cookie"),
                    HeaderValue::from_static("a=1"),
                ),
                (
                    HeaderName::from_static("set-cookie"),
                    HeaderValue::from_static("b=2"),
                ),
                (
                    HeaderName::from_static("location"),
                    HeaderValue::from_static("/orders/1"),
                ),
            ],
            Bytes::from_static(b"{\"id\":1}"),
        )
        .with_trailers(vec![(
            HeaderName::from_static("grpc-status"),
            HeaderValue::from_static("0"),
        )])
    }

    #[test]
    fn compact_form_round_trips_and_refuses_a_cut_head() {
        let tombstone = Record::tombstone(
            Fingerprint::from_bytes([3; 32]),
            StatusCode::OK,
            vec![(
                HeaderName::from_static("x-custom-header"),
                HeaderValue::from_static("v"),
            )],
        );
        for record in [sample(), tombstone] {
            let compact = record.to_compact();
            assert_eq!(Record::from_compact(compact.clone()).unwrap(), record);
            // The body is the rest of the buffer: every cut before it fails.
            let head = compact.len() - record.body().len();
            for cut in 0..head {
                assert!(
                    Record::from_compact(compact.slice(..cut)).is_err(),
                    "cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn round_trip_keeps_everything_in_order() {
        let record = sample();
        let decoded = Record::decode(&record.encode()).unwrap();
        assert_eq!(decoded, record);
        assert_eq!(decoded.headers()[0].1, "a=1");
        assert_eq!(decoded.headers()[1].1, "b=2");
        assert_eq!(decoded.trailers().len(), 1);
        assert_eq!(decoded.created_at(), record.created_at());
    }

    #[test]
    fn value_records_are_version_2_and_http_records_stay_version_1() {
        let value = Record::value(Fingerprint::from_bytes([4; 32]), Bytes::from_static(b"{}"));
        let bytes = value.encode();
        assert_eq!(bytes[2], 2, "a value record needs version 2");
        assert_eq!(Record::decode(&bytes).unwrap(), value);
        assert_eq!(
            Record::from_compact(value.to_compact()).unwrap(),
            value,
            "the in-process form knows values too"
        );
        assert_eq!(sample().encode()[2], 1, "an old reader can read it");
        // A value kind under version 1 is refused: version 1 had no such kind.
        let mut bad = bytes[..bytes.len() - CHECKSUM_LEN].to_vec();
        bad[2] = 1;
        assert_eq!(
            Record::decode(&seal(bad)).unwrap_err().to_string(),
            "cannot decode idempotency record: record kind newer than its version"
        );
    }

    /// A version-1 record as the previous release wrote it, byte for byte:
    /// it still decodes.
    #[test]
    fn a_version_1_record_from_the_previous_release_decodes() {
        let mut v1 = Vec::new();
        v1.extend_from_slice(b"TI");
        v1.push(1); // version
        v1.push(0); // response
        v1.extend_from_slice(&[5; 32]);
        v1.extend_from_slice(&1_700_000_000_000u64.to_be_bytes());
        v1.extend_from_slice(&201u16.to_be_bytes());
        v1.extend_from_slice(&1u32.to_be_bytes());
        v1.extend_from_slice(&8u16.to_be_bytes());
        v1.extend_from_slice(b"location");
        v1.extend_from_slice(&3u32.to_be_bytes());
        v1.extend_from_slice(b"/o1");
        v1.extend_from_slice(&0u32.to_be_bytes()); // trailers
        v1.extend_from_slice(&2u32.to_be_bytes());
        v1.extend_from_slice(b"ok");
        let record = Record::decode(&seal(v1)).unwrap();
        assert_eq!(record.kind(), RecordKind::Response);
        assert_eq!(record.status(), StatusCode::CREATED);
        assert_eq!(record.headers()[0].1, "/o1");
        assert_eq!(record.body(), "ok");
        assert_eq!(record.fingerprint(), &Fingerprint::from_bytes([5; 32]));
    }

    #[test]
    fn tombstone_round_trips() {
        let record = Record::tombstone(Fingerprint::from_bytes([1; 32]), StatusCode::OK, vec![]);
        let decoded = Record::decode(&record.encode()).unwrap();
        assert_eq!(decoded.kind(), RecordKind::Tombstone);
        assert!(decoded.body().is_empty());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            assert!(
                Record::decode(&bytes[..len]).is_err(),
                "prefix of {len} bytes decoded"
            );
        }
    }

    /// Re-seals a hand-edited record with a valid checksum, to reach the
    /// structural checks behind it.
    fn seal(mut bytes: Vec<u8>) -> Vec<u8> {
        let sum = checksum(&bytes);
        bytes.extend_from_slice(&sum);
        bytes
    }

    fn unsealed() -> Vec<u8> {
        let bytes = sample().encode();
        bytes[..bytes.len() - CHECKSUM_LEN].to_vec()
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let bytes = sample().encode();
        for i in 0..bytes.len() {
            let mut bad = bytes.to_vec();
            bad[i] ^= 0x01;
            assert!(Record::decode(&bad).is_err(), "flip at {i} went unnoticed");
        }
    }

    #[test]
    fn structural_checks_behind_the_checksum() {
        let mut bytes = unsealed();
        bytes[2] = 99; // version
        assert!(Record::decode(&seal(bytes)).is_err());
        let mut bytes = unsealed();
        bytes[2] = 0; // version 0 never existed
        assert!(Record::decode(&seal(bytes)).is_err());
        let mut bytes = unsealed();
        bytes.push(0);
        assert_eq!(
            Record::decode(&seal(bytes)).unwrap_err().to_string(),
            "cannot decode idempotency record: trailing bytes"
        );
        let mut bytes = unsealed();
        bytes[44] = 0x00; // status high byte -> status < 100
        bytes[45] = 0x05;
        assert!(Record::decode(&seal(bytes)).is_err());
    }

    #[test]
    fn non_canonical_header_names_are_refused() {
        // Found by fuzzing: "locatiOn" parsed as "location" and re-encoded
        // differently.
        let mut bytes = unsealed();
        let at = bytes.windows(8).position(|w| w == b"location").unwrap();
        bytes[at + 6] = b'O';
        assert_eq!(
            Record::decode(&seal(bytes)).unwrap_err().to_string(),
            "cannot decode idempotency record: non-canonical header name"
        );
    }

    #[test]
    fn huge_counts_do_not_allocate() {
        let mut bytes = unsealed()[..46].to_vec();
        bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(Record::decode(&seal(bytes)).is_err());
    }
}
