//! Recorded responses and their compact, versioned binary encoding.
//!
//! Every store keeps a completed request as a [`Record`]. Stores that write
//! bytes somewhere (Redis, PostgreSQL) use [`Record::encode`] and
//! [`Record::decode`], so a record written by one version of this crate can
//! be read by the next.
//!
//! # Wire format (version 1)
//!
//! All integers are big-endian.
//!
//! ```text
//! magic      2 bytes  "TI"
//! version    u8       1
//! kind       u8       0 = response, 1 = tombstone (response too large to keep)
//! fingerprint 32 bytes
//! created_at u64      milliseconds since the Unix epoch (informational)
//! status     u16
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
const VERSION: u8 = 1;

/// What a [`Record`] holds: a full response, or a tombstone for a response
/// that completed but was too large to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RecordKind {
    /// The response was recorded in full and is replayed as it was.
    Response,
    /// The request completed but its body exceeded the layer's
    /// `max_response_body`; a retry is told so instead of running again.
    Tombstone,
}

/// A completed request: its fingerprint and the response to replay.
///
/// Cloning is cheap: the body and the header lists are reference counted.
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
    /// use tower_idempotency::{Fingerprint, Record};
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
            created_at_ms: now_ms(),
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
            created_at_ms: now_ms(),
            status,
            headers,
            trailers: None,
            body: Bytes::new(),
        }
    }

    /// Sets the trailers recorded after the body (gRPC-style responses).
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

    /// An estimate of the memory this record occupies, used by stores that
    /// bound themselves by bytes.
    pub fn size_hint(&self) -> usize {
        let fields = |list: &[(HeaderName, HeaderValue)]| {
            list.iter()
                .map(|(n, v)| n.as_str().len() + v.len() + 2 * std::mem::size_of::<usize>())
                .sum::<usize>()
        };
        std::mem::size_of::<Self>()
            + fields(&self.headers)
            + fields(self.trailers())
            + self.body.len()
    }

    /// Encodes the record in the versioned binary format described in the
    /// [module docs](self).
    pub fn encode(&self) -> Bytes {
        let len = 2 + 1 + 1 + 32 + 8 + 2 + self.fields_len() + 4 + self.body.len() + CHECKSUM_LEN;
        let mut out = BytesMut::with_capacity(len);
        out.put_slice(MAGIC);
        out.put_u8(VERSION);
        out.put_u8(self.kind_byte());
        out.put_slice(self.fingerprint.as_bytes());
        out.put_u64(self.created_at_ms);
        out.put_u16(self.status.as_u16());
        self.put_fields(&mut out);
        out.put_u32(len_u32(self.body.len()));
        out.put_slice(&self.body);
        let sum = checksum(&out);
        out.put_slice(&sum);
        out.freeze()
    }

    /// The in-process form, for stores that keep records in memory: one
    /// buffer (kind, fingerprint, time, status, fields as in [`encode`](Self::encode),
    /// then the body to the end), with neither magic, version nor checksum,
    /// as it never leaves the process. Far smaller than the record's own
    /// header lists, and [`from_compact`](Self::from_compact) shares the
    /// buffer instead of copying it.
    pub(crate) fn to_compact(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(1 + 32 + 8 + 2 + self.fields_len() + self.body.len());
        out.put_u8(self.kind_byte());
        out.put_slice(self.fingerprint.as_bytes());
        out.put_u64(self.created_at_ms);
        out.put_u16(self.status.as_u16());
        self.put_fields(&mut out);
        out.put_slice(&self.body);
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
        if version != VERSION {
            return Err(DecodeError::new("unsupported version"));
        }
        let mut record = r.record_without_body()?;
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
    // Bodies are bounded by the layer's `max_response_body`, far below 4 GiB.
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn kind_from(byte: u8) -> Result<RecordKind, DecodeError> {
    match byte {
        0 => Ok(RecordKind::Response),
        1 => Ok(RecordKind::Tombstone),
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
    fn new(reason: &'static str) -> Self {
        Self { reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
