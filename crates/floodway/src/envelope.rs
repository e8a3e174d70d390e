//! One pass over an event's text that finds the envelope's fields and checks the rest is JSON.
//!
//! Decoding an event needs five top-level members (`id`, `type`, `timestamp`,
//! `partitionKey`, `tags`) and the assurance that the whole text is one JSON object. serde_json
//! gives both through its general machinery: a visitor per member, a field identifier per key,
//! a `RawValue` per field. This scanner does only what decoding needs: strings are skipped
//! eight bytes at a time (the word-at-a-time search serde_json's own string reader uses),
//! everything else by a small loop, and nothing is allocated.
//!
//! It is a fast path, not a second parser to trust: it answers `None` for anything it does not
//! accept outright (an escape in a top-level key, a repeated envelope member, any syntax error,
//! deep nesting), and [`read`] then decodes with serde_json, which gives the same result or the
//! precise error. So the one property that matters is: **when the scanner answers, serde_json
//! accepts the text and finds the same members.** A property test checks it against serde_json
//! on generated and damaged events.
use serde_json::value::RawValue;

/// The raw text of each envelope member present (the JSON value, `null` included), as
/// serde_json's `RawValue` would give it: without the surrounding whitespace.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Envelope<'a> {
    pub(crate) id: Option<&'a str>,
    pub(crate) ty: Option<&'a str>,
    pub(crate) timestamp: Option<&'a str>,
    pub(crate) partition_key: Option<&'a str>,
    pub(crate) tags: Option<&'a str>,
}

/// The envelope of `text`: from the scanner when it answers, else from serde_json, which
/// decides and words the error.
pub(crate) fn read(text: &str) -> serde_json::Result<Envelope<'_>> {
    match scan(text) {
        Some(env) => Ok(env),
        None => with_serde(text),
    }
}

/// What serde_json finds: the members as `RawValue`s (a `null` one as absent).
fn with_serde(text: &str) -> serde_json::Result<Envelope<'_>> {
    #[derive(serde::Deserialize)]
    struct Members<'a> {
        #[serde(borrow, default)]
        id: Option<&'a RawValue>,
        #[serde(rename = "type", borrow, default)]
        ty: Option<&'a RawValue>,
        #[serde(borrow, default)]
        timestamp: Option<&'a RawValue>,
        #[serde(rename = "partitionKey", borrow, default)]
        partition_key: Option<&'a RawValue>,
        #[serde(borrow, default)]
        tags: Option<&'a RawValue>,
    }
    let m: Members<'_> = serde_json::from_str(text)?;
    Ok(Envelope {
        id: m.id.map(RawValue::get),
        ty: m.ty.map(RawValue::get),
        timestamp: m.timestamp.map(RawValue::get),
        partition_key: m.partition_key.map(RawValue::get),
        tags: m.tags.map(RawValue::get),
    })
}

/// Containers nested deeper than this send the text to serde_json.
const MAX_DEPTH: u32 = 128;

/// The envelope of `text`, when it is a JSON object this scanner accepts (see the module docs).
pub(crate) fn scan(text: &str) -> Option<Envelope<'_>> {
    let b = text.as_bytes();
    let mut env = Envelope::default();
    let mut i = ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        return (ws(b, i + 1) == b.len()).then_some(env);
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let key_start = i + 1;
        let key_end = plain_string_end(b, key_start)?;
        i = ws(b, key_end + 1);
        if b.get(i) != Some(&b':') {
            return None;
        }
        let value_start = ws(b, i + 1);
        let value_end = skip_value(b, value_start)?;
        let value = &text[value_start..value_end];
        let slot = match &b[key_start..key_end] {
            b"id" => Some(&mut env.id),
            b"type" => Some(&mut env.ty),
            b"timestamp" => Some(&mut env.timestamp),
            b"partitionKey" => Some(&mut env.partition_key),
            b"tags" => Some(&mut env.tags),
            _ => None,
        };
        if let Some(slot) = slot {
            // serde_json rejects a repeated field; let it say so.
            if slot.replace(value).is_some() {
                return None;
            }
        }
        i = ws(b, value_end);
        match b.get(i) {
            Some(b',') => i = ws(b, i + 1),
            Some(b'}') => return (ws(b, i + 1) == b.len()).then_some(env),
            _ => return None,
        }
    }
}

/// The position of the first byte at or after `i` that is not JSON whitespace.
fn ws(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\r' | b'\t') = b.get(i) {
        i += 1;
    }
    i
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// The position of the first `"`, `\` or control character at or after `i`, or `b.len()`.
///
/// Eight bytes at a time: a byte equal to `"` or `\` becomes zero after an XOR, and the
/// classic zero-byte test flags it; a byte below 0x20 borrows in the subtraction. A flag can
/// be false only above a true one, so the lowest flag is exact.
fn special(b: &[u8], mut i: usize) -> usize {
    while let Some(chunk) = b.get(i..i + 8) {
        let v = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let quote = v ^ (ONES * u64::from(b'"'));
        let slash = v ^ (ONES * u64::from(b'\\'));
        let found = (quote.wrapping_sub(ONES) & !quote
            | slash.wrapping_sub(ONES) & !slash
            | v.wrapping_sub(ONES * 0x20) & !v)
            & HIGH;
        if found != 0 {
            return i + (found.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while let Some(&c) = b.get(i) {
        if c == b'"' || c == b'\\' || c < 0x20 {
            return i;
        }
        i += 1;
    }
    i
}

/// The position of the closing quote of a string whose content starts at `i` and has no
/// escape (a key the envelope compares as it is written).
fn plain_string_end(b: &[u8], i: usize) -> Option<usize> {
    let end = special(b, i);
    (b.get(end) == Some(&b'"')).then_some(end)
}

/// The position after a string whose content starts at `i`.
fn skip_string(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        i = special(b, i);
        match *b.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => match *b.get(i + 1)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                b'u' if b.get(i + 2..i + 6)?.iter().all(u8::is_ascii_hexdigit) => i += 6,
                _ => return None,
            },
            _ => return None,
        }
    }
}

/// The position after a number starting at `i` (JSON's grammar: no leading zeros, digits on
/// both sides of a point, an optional signed exponent).
fn skip_number(b: &[u8], mut i: usize) -> Option<usize> {
    let digits = |b: &[u8], mut i: usize| {
        let start = i;
        while let Some(b'0'..=b'9') = b.get(i) {
            i += 1;
        }
        (i > start).then_some(i)
    };
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    i = match *b.get(i)? {
        b'0' => i + 1,
        b'1'..=b'9' => digits(b, i)?,
        _ => return None,
    };
    if b.get(i) == Some(&b'.') {
        i = digits(b, i + 1)?;
    }
    if let Some(b'e' | b'E') = b.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = b.get(i) {
            i += 1;
        }
        i = digits(b, i)?;
    }
    Some(i)
}

/// The position after the value starting at `i`; containers are walked without recursion,
/// their kinds kept as bits (1: object) of `open`.
fn skip_value(b: &[u8], mut i: usize) -> Option<usize> {
    let mut open: u128 = 0;
    let mut depth = 0u32;
    loop {
        // At the start of a value.
        match *b.get(i)? {
            b'"' => i = skip_string(b, i + 1)?,
            c @ (b'{' | b'[') => {
                let close = if c == b'{' { b'}' } else { b']' };
                i = ws(b, i + 1);
                if b.get(i) == Some(&close) {
                    i += 1;
                } else {
                    if depth == MAX_DEPTH {
                        return None;
                    }
                    open = open << 1 | u128::from(c == b'{');
                    depth += 1;
                    if c == b'{' {
                        i = member_value(b, i)?;
                    }
                    continue;
                }
            }
            b't' => i = literal(b, i, b"true")?,
            b'f' => i = literal(b, i, b"false")?,
            b'n' => i = literal(b, i, b"null")?,
            _ => i = skip_number(b, i)?,
        }
        // After a value: close what ends here, then go on to the next value.
        loop {
            if depth == 0 {
                return Some(i);
            }
            i = ws(b, i);
            let object = open & 1 == 1;
            match *b.get(i)? {
                b',' => {
                    i = ws(b, i + 1);
                    if object {
                        i = member_value(b, i)?;
                    }
                    break;
                }
                b'}' if object => {}
                b']' if !object => {}
                _ => return None,
            }
            i += 1;
            open >>= 1;
            depth -= 1;
        }
    }
}

/// From a member's key at `i`, the position of its value.
fn member_value(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let i = ws(b, skip_string(b, i + 1)?);
    (b.get(i) == Some(&b':')).then(|| ws(b, i + 1))
}

fn literal(b: &[u8], i: usize, word: &[u8]) -> Option<usize> {
    (b.get(i..i + word.len())? == word).then_some(i + word.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// serde_json's answer, as the decoder falls back to it.
    fn serde(text: &str) -> Option<Envelope<'_>> {
        with_serde(text).ok()
    }

    fn without_nulls<'a>(env: Envelope<'a>) -> Envelope<'a> {
        let keep = |v: Option<&'a str>| v.filter(|v| *v != "null");
        Envelope {
            id: keep(env.id),
            ty: keep(env.ty),
            timestamp: keep(env.timestamp),
            partition_key: keep(env.partition_key),
            tags: keep(env.tags),
        }
    }

    /// The property: whatever the scanner answers, serde_json answers the same.
    fn agrees(text: &str) {
        if let Some(env) = scan(text) {
            let theirs = serde(text);
            assert_eq!(
                Some(without_nulls(env)),
                theirs.map(without_nulls),
                "scanner accepted {text:?}"
            );
        }
    }

    #[test]
    fn finds_the_members_of_an_event() {
        let text = r#" { "id" : "e1", "type":"order-placed","timestamp":1700000000000,
            "partitionKey":"o-1","tags":{"source":"shop","n":[1,2.5,-3e4,true,false,null]},
            "order":{"lines":[{"sku":"a\"b\\c\u00e9","qty":2}],"note":"héllo"}}"#;
        let env = scan(text).unwrap();
        assert_eq!(env.id, Some(r#""e1""#));
        assert_eq!(env.ty, Some(r#""order-placed""#));
        assert_eq!(env.timestamp, Some("1700000000000"));
        assert_eq!(env.partition_key, Some(r#""o-1""#));
        assert_eq!(
            env.tags,
            Some(r#"{"source":"shop","n":[1,2.5,-3e4,true,false,null]}"#)
        );
        agrees(text);
    }

    #[test]
    fn leaves_to_serde_what_it_does_not_accept_outright() {
        for text in [
            "",
            "[]",
            "{",
            r#"{"id":"a","id":"b"}"#, // a repeated field
            r#"{"i\u0064":"a"}"#,     // an escaped key
            r#"{"a":1,}"#,            // a trailing comma
            r#"{"a":[1,]}"#,          // a trailing comma in an array
            r#"{"a":01}"#,            // a leading zero
            r#"{"a":1.}"#,            // no digit after the point
            r#"{"a":1e}"#,            // no exponent
            r#"{"a":-}"#,             // a sign alone
            r#"{"a":"\x"}"#,          // an unknown escape
            r#"{"a":"\u12g4"}"#,      // a bad hex escape
            "{\"a\":\"tab\there\"}",  // a control character in a string
            r#"{"a":tru}"#,           // a broken literal
            r#"{"a":{"b" 1}}"#,       // no colon
            r#"{"a":{1:2}}"#,         // a key that is not a string
            r#"{"a":1} x"#,           // trailing text
            r#"{"a":[1 2]}"#,         // no comma
            r#"{"a":{"b":1]}"#,       // mismatched brackets
            r#"{"a":"unterminated}"#, // a string without its end
            r#"{"a":1"#,              // a truncated object
        ] {
            assert_eq!(scan(text), None, "{text:?}");
        }
        let deep = format!(r#"{{"a":{}1{}}}"#, "[".repeat(200), "]".repeat(200));
        assert_eq!(scan(&deep), None);
        let fine = format!(r#"{{"a":{}1{}}}"#, "[".repeat(100), "]".repeat(100));
        assert!(scan(&fine).is_some());
        agrees(&fine);
    }

    #[test]
    fn accepts_what_json_allows() {
        for text in [
            "{}",
            " {\t}\n",
            r#"{"a":{},"b":[],"c":[{}],"d":{"e":[]}}"#,
            r#"{"a":0,"b":-0.5,"c":1E+2,"d":2e-3,"e":10}"#,
            r#"{"a":"\"\\\/\b\f\n\r\t\uABCD\ud800"}"#,
            r#"{"id":null,"type":"t"}"#,
            "{\"a\":\"\u{7f}\u{e9}\u{1F600}\"}",
        ] {
            assert!(scan(text).is_some(), "{text:?}");
            agrees(text);
        }
    }

    /// JSON values of some depth, as text, with the envelope's names among the keys.
    fn value() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("false".to_owned()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| serde_json::to_string(&f).unwrap()),
            any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5)
                    .prop_map(|items| format!("[{}]", items.join(","))),
                prop::collection::vec((key(), inner), 0..5).prop_map(|members| {
                    let members: Vec<String> = members
                        .into_iter()
                        .map(|(k, v)| format!("{k}:{v}"))
                        .collect();
                    format!("{{{}}}", members.join(","))
                }),
            ]
        })
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "\"id\"",
                "\"type\"",
                "\"timestamp\"",
                "\"partitionKey\"",
                "\"tags\"",
                "\"i\\u0064\"",
            ])
            .prop_map(str::to_owned),
            any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
        ]
    }

    fn object() -> impl Strategy<Value = String> {
        prop::collection::vec((key(), value()), 0..8).prop_map(|members| {
            let members: Vec<String> = members
                .into_iter()
                .map(|(k, v)| format!("{k} : {v}"))
                .collect();
            format!("{{ {} }}", members.join(" ,"))
        })
    }

    proptest! {
        #[test]
        fn agrees_with_serde_json_on_objects(text in object()) {
            agrees(&text);
            if serde(&text).is_some() && !text.contains('\\') {
                // Without escapes or repeated members, the fast path must not give up.
                let names = ["\"id\"", "\"type\"", "\"timestamp\"", "\"partitionKey\"", "\"tags\""];
                let repeated = names.iter().any(|n| text.matches(&format!("{n} :")).count() > 1);
                prop_assert!(repeated || scan(&text).is_some(), "gave up on {text:?}");
            }
        }

        #[test]
        fn agrees_with_serde_json_on_damaged_objects(
            text in object(),
            cut in any::<prop::sample::Index>(),
            insert in any::<prop::sample::Index>(),
            byte in prop::sample::select(b"{}[]\",:\\ 0-.eE+tfnu\x01x".to_vec()),
        ) {
            // Truncated at a character boundary.
            let mut at = cut.index(text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            agrees(&text[..at]);
            // One character inserted.
            let mut at = insert.index(text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            let mut damaged = text.clone();
            damaged.insert(at, char::from(byte));
            agrees(&damaged);
        }
    }
}
