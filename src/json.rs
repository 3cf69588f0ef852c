//! A small JSON reader for fingerprints: the canonical form of a body, and
//! the members that JSON Pointers select from it.
//!
//! The canonical form is the same for two bodies that differ only in the
//! order of object members or in insignificant whitespace: members sorted
//! by their (unescaped) names, byte-wise; no whitespace; strings re-escaped
//! minimally; numbers exactly as written (`1.0` and `1` stay different,
//! since a server may well treat them differently). Duplicate member names
//! are kept, in their order, after sorting. Nothing here allocates a
//! general-purpose value tree beyond what the selection needs, and
//! nothing can panic: depth is bounded, and any malformed input is `None`.

/// How deep objects and arrays may nest before the input is treated as
/// not JSON (and fingerprinted raw).
const MAX_DEPTH: usize = 128;

/// A parsed value; numbers keep their text.
#[derive(Debug, Clone, PartialEq)]
enum Value<'a> {
    Null,
    Bool(bool),
    Number(&'a str),
    String(String),
    Array(Vec<Value<'a>>),
    Object(Vec<(String, Value<'a>)>),
}

/// The canonical form of `input`, or `None` if it is not one JSON value.
pub(crate) fn canonical(input: &[u8]) -> Option<Vec<u8>> {
    let value = parse(input)?;
    let mut out = Vec::with_capacity(input.len());
    write(&value, &mut out);
    Some(out)
}

/// The canonical form of each member `pointers` select, in the order of
/// `pointers`, each framed with its length (a missing member is framed
/// as absent, so it differs from any value), or `None` if `input` is not
/// JSON.
pub(crate) fn select(input: &[u8], pointers: &[String]) -> Option<Vec<u8>> {
    let value = parse(input)?;
    let mut out = Vec::new();
    let mut member = Vec::new();
    for pointer in pointers {
        match resolve(&value, pointer) {
            Some(found) => {
                member.clear();
                write(found, &mut member);
                out.push(b'p');
                out.extend_from_slice(&(member.len() as u64).to_be_bytes());
                out.extend_from_slice(&member);
            }
            None => out.push(b'-'),
        }
    }
    Some(out)
}

/// Whether `pointer` is a JSON Pointer (RFC 6901): empty, or `/`-separated
/// tokens whose `~` is followed by `0` or `1`.
pub(crate) fn is_pointer(pointer: &str) -> bool {
    if pointer.is_empty() {
        return true;
    }
    pointer.starts_with('/')
        && pointer.split('/').skip(1).all(|token| {
            let mut chars = token.chars();
            while let Some(c) = chars.next() {
                if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
                    return false;
                }
            }
            true
        })
}

fn resolve<'v, 'a>(mut value: &'v Value<'a>, pointer: &str) -> Option<&'v Value<'a>> {
    if pointer.is_empty() {
        return Some(value);
    }
    for token in pointer.strip_prefix('/')?.split('/') {
        let token = token.replace("~1", "/").replace("~0", "~");
        value = match value {
            Value::Object(members) => members.iter().find(|(k, _)| *k == token).map(|(_, v)| v)?,
            Value::Array(items) => {
                // RFC 6901: no leading zeros, no sign.
                if token.len() > 1 && token.starts_with('0') {
                    return None;
                }
                items.get(token.parse::<usize>().ok()?)?
            }
            _ => return None,
        };
    }
    Some(value)
}

fn write(value: &Value<'_>, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => out.extend_from_slice(n.as_bytes()),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(item, out);
            }
            out.push(b']');
        }
        Value::Object(members) => {
            let mut sorted: Vec<&(String, Value<'_>)> = members.iter().collect();
            // Stable: duplicate names keep their order.
            sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (name, item)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(name, out);
                out.push(b':');
                write(item, out);
            }
            out.push(b'}');
        }
    }
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\u{08}' => out.extend_from_slice(b"\\b"),
            '\u{0c}' => out.extend_from_slice(b"\\f"),
            c if (c as u32) < 0x20 => {
                out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes());
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.push(b'"');
}

fn parse(input: &[u8]) -> Option<Value<'_>> {
    let text = std::str::from_utf8(input).ok()?;
    let mut p = Parser { text, pos: 0 };
    p.ws();
    let value = p.value(0)?;
    p.ws();
    (p.pos == text.len()).then_some(value)
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, lit: &str) -> Option<()> {
        self.text[self.pos..]
            .starts_with(lit)
            .then(|| self.pos += lit.len())
    }

    fn value(&mut self, depth: usize) -> Option<Value<'a>> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'n' => self.eat("null").map(|()| Value::Null),
            b't' => self.eat("true").map(|()| Value::Bool(true)),
            b'f' => self.eat("false").map(|()| Value::Bool(false)),
            b'"' => self.string().map(Value::String),
            b'[' => {
                self.pos += 1;
                let mut items = Vec::new();
                self.ws();
                if self.peek()? == b']' {
                    self.pos += 1;
                    return Some(Value::Array(items));
                }
                loop {
                    self.ws();
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    match self.peek()? {
                        b',' => self.pos += 1,
                        b']' => {
                            self.pos += 1;
                            return Some(Value::Array(items));
                        }
                        _ => return None,
                    }
                }
            }
            b'{' => {
                self.pos += 1;
                let mut members = Vec::new();
                self.ws();
                if self.peek()? == b'}' {
                    self.pos += 1;
                    return Some(Value::Object(members));
                }
                loop {
                    self.ws();
                    if self.peek()? != b'"' {
                        return None;
                    }
                    let name = self.string()?;
                    self.ws();
                    self.eat(":")?;
                    self.ws();
                    members.push((name, self.value(depth + 1)?));
                    self.ws();
                    match self.peek()? {
                        b',' => self.pos += 1,
                        b'}' => {
                            self.pos += 1;
                            return Some(Value::Object(members));
                        }
                        _ => return None,
                    }
                }
            }
            b'-' | b'0'..=b'9' => self.number().map(Value::Number),
            _ => None,
        }
    }

    /// A number as RFC 8259 writes it: `-? int frac? exp?`.
    fn number(&mut self) -> Option<&'a str> {
        let start = self.pos;
        let bytes = self.text.as_bytes();
        let digits = |p: &mut usize| {
            let from = *p;
            while bytes.get(*p).is_some_and(u8::is_ascii_digit) {
                *p += 1;
            }
            *p > from
        };
        let mut p = self.pos;
        if bytes.get(p) == Some(&b'-') {
            p += 1;
        }
        match bytes.get(p) {
            Some(b'0') => p += 1,
            Some(b'1'..=b'9') => {
                digits(&mut p);
            }
            _ => return None,
        }
        if bytes.get(p) == Some(&b'.') {
            p += 1;
            if !digits(&mut p) {
                return None;
            }
        }
        if matches!(bytes.get(p), Some(b'e' | b'E')) {
            p += 1;
            if matches!(bytes.get(p), Some(b'+' | b'-')) {
                p += 1;
            }
            if !digits(&mut p) {
                return None;
            }
        }
        self.pos = p;
        self.text.get(start..p)
    }

    fn string(&mut self) -> Option<String> {
        self.eat("\"")?;
        let mut out = String::new();
        loop {
            let rest = self.text.get(self.pos..)?;
            let mut chars = rest.char_indices();
            let (_, c) = chars.next()?;
            match c {
                '"' => {
                    self.pos += 1;
                    return Some(out);
                }
                '\\' => {
                    let (_, e) = chars.next()?;
                    self.pos += 2;
                    match e {
                        '"' => out.push('"'),
                        '\\' => out.push('\\'),
                        '/' => out.push('/'),
                        'b' => out.push('\u{08}'),
                        'f' => out.push('\u{0c}'),
                        'n' => out.push('\n'),
                        'r' => out.push('\r'),
                        't' => out.push('\t'),
                        'u' => {
                            let high = self.hex4()?;
                            let c = if (0xd800..0xdc00).contains(&high) {
                                self.eat("\\u")?;
                                let low = self.hex4()?;
                                if !(0xdc00..0xe000).contains(&low) {
                                    return None;
                                }
                                0x10000 + ((high - 0xd800) << 10) + (low - 0xdc00)
                            } else {
                                high
                            };
                            out.push(char::from_u32(c)?);
                        }
                        _ => return None,
                    }
                }
                c if (c as u32) < 0x20 => return None,
                c => {
                    out.push(c);
                    self.pos += c.len_utf8();
                }
            }
        }
    }

    fn hex4(&mut self) -> Option<u32> {
        let hex = self.text.get(self.pos..self.pos + 4)?;
        let v = u32::from_str_radix(hex, 16).ok()?;
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        self.pos += 4;
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Option<String> {
        canonical(s.as_bytes()).map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn member_order_and_whitespace_do_not_matter() {
        assert_eq!(
            c(r#" { "b" : [1, 2.50, {"y":null,"x":true}], "a":"\u0041\n" } "#).as_deref(),
            Some(r#"{"a":"A\n","b":[1,2.50,{"x":true,"y":null}]}"#)
        );
        assert_eq!(c(r#"{"a":1,"b":2}"#), c("{\"b\":2,\n\t\"a\":1}"));
    }

    #[test]
    fn values_do_matter_and_numbers_stay_as_written() {
        assert_ne!(c(r#"{"a":1}"#), c(r#"{"a":1.0}"#));
        assert_ne!(c(r#"{"a":1}"#), c(r#"{"a":2}"#));
        assert_ne!(c(r#"{"a":"1"}"#), c(r#"{"a":1}"#));
        assert_ne!(c("[1,2]"), c("[2,1]"));
        assert_eq!(c("-0.5e+10").as_deref(), Some("-0.5e+10"));
        assert_eq!(c(r#""\ud83d\ude00""#).as_deref(), Some("\"\u{1f600}\""));
    }

    #[test]
    fn malformed_input_is_none() {
        for bad in [
            "",
            "{",
            "{\"a\"}",
            "[1,]",
            "01",
            "1.",
            "-",
            "tru",
            "\"\\x\"",
            "\"a",
            "{} {}",
            "\"\\ud800\"",
            "{\"a\":1,}",
            "\u{1}",
        ] {
            assert_eq!(c(bad), None, "{bad:?}");
        }
        let deep = "[".repeat(MAX_DEPTH + 2) + &"]".repeat(MAX_DEPTH + 2);
        assert_eq!(c(&deep), None);
        assert_eq!(canonical(&[0xff, 0xfe]), None);
    }

    #[test]
    fn pointers_select_members() {
        let body = br#"{"amount":{"value":10,"currency":"EUR"},"items":[{"id":"a"},{"id":"b"}],"a/b":1,"m~n":2,"note":"x"}"#;
        let pick = |p: &[&str]| {
            select(body, &p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
        };
        let picked = pick(&["/amount", "/items/1/id", "/a~1b", "/m~0n"]);
        let text = String::from_utf8_lossy(&picked);
        assert!(text.contains(r#"{"currency":"EUR","value":10}"#), "{text}");
        assert!(text.contains(r#""b""#));
        // Missing members differ from any value, and from each other's order.
        assert_ne!(pick(&["/missing"]), pick(&["/note"]));
        assert_ne!(pick(&["/amount", "/note"]), pick(&["/note", "/amount"]));
        assert_eq!(pick(&["/items/01"]), pick(&["/missing"]));
        assert!(select(b"not json", &["/a".to_owned()]).is_none());
    }

    #[test]
    fn pointers_are_checked() {
        for ok in ["", "/", "/a", "/a/0", "/a~0b", "/a~1b"] {
            assert!(is_pointer(ok), "{ok:?}");
        }
        for bad in ["a", "/a~", "/a~2"] {
            assert!(!is_pointer(bad), "{bad:?}");
        }
    }
}
