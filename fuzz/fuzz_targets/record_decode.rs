#![no_main]
//! Any bytes decode to a record or an error, never a panic; a record that
//! decodes encodes back to the same bytes. The input is tried as it is and
//! sealed with a valid checksum, so the structural checks behind the
//! checksum are reached too.

use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use tower_idempotency::Record;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = Record::decode(data) {
        assert_eq!(&record.encode()[..], data);
    }
    let mut sealed = data.to_vec();
    let sum = Sha256::digest(data);
    sealed.extend_from_slice(&sum[..8]);
    if let Ok(record) = Record::decode(&sealed) {
        assert_eq!(&record.encode()[..], &sealed[..]);
    }
});
