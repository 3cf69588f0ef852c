#![no_main]
//! Any header bytes give a valid key or a refusal, never a panic; a key
//! that parses bare parses the same when quoted.

use libfuzzer_sys::fuzz_target;
use tower_idempotency::key::parse_key;

fuzz_target!(|data: &[u8]| {
    if let Ok(key) = parse_key(data, 1, 255) {
        let k = key.as_str();
        assert!(!k.is_empty() && k.len() <= 255);
        assert!(k.bytes().all(|b| (0x20..=0x7e).contains(&b)));
        let mut quoted = String::from("\"");
        for c in k.chars() {
            if c == '"' || c == '\\' {
                quoted.push('\\');
            }
            quoted.push(c);
        }
        quoted.push('"');
        let again = parse_key(quoted.as_bytes(), 1, 255).expect("a parsed key re-quotes");
        assert_eq!(again.as_str(), k);
    }
});
