//! An event's envelope, found in one pass over its text by Floodway's JSON scanner
//! ([`crate::scan`]), which also checks the rest is JSON.
//!
//! Decoding an event needs five top-level members (`id`, `type`, `timestamp`,
//! `partitionKey`, `tags`) and the assurance that the whole text is one JSON object. serde_json
//! gives both through its general machinery: a visitor per member, a field identifier per key,
//! a `RawValue` per field. The scanner does only what decoding needs.
//!
//! It is a fast path, not a second parser to trust: it answers `None` for anything it does not
//! accept outright (an escape in a top-level key, a repeated envelope member, any syntax error,
//! deep nesting), and [`read`] then decodes with serde_json, which gives the same result or the
//! precise error. So the one property that matters is: **when the scanner answers, serde_json
//! accepts the text and finds the same members.** A property test checks it against serde_json
//! on generated and damaged events.
use serde_json::value::RawValue;

use crate::scan;

/// The raw text of each envelope member present, as serde_json's `RawValue` would give it:
/// without the surrounding whitespace. A `null` member is absent from serde_json and `"null"`
/// from the scanner; the decoder reads both as missing.
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
    match by_scanner(text) {
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

/// The envelope of `text`, when it is a JSON object the scanner accepts (see the module docs).
fn by_scanner(text: &str) -> Option<Envelope<'_>> {
    let b = text.as_bytes();
    let mut env = Envelope::default();
    let end = scan::object(b, scan::ws(b, 0), |key, start| {
        let end = scan::skip_value(b, start)?;
        let slot = match key {
            b"id" => &mut env.id,
            b"type" => &mut env.ty,
            b"timestamp" => &mut env.timestamp,
            b"partitionKey" => &mut env.partition_key,
            b"tags" => &mut env.tags,
            _ => return Some(end),
        };
        // serde_json rejects a repeated field; let it say so.
        match slot.replace(&text[start..end]) {
            Some(_) => None,
            None => Some(end),
        }
    })?;
    (scan::ws(b, end) == b.len()).then_some(env)
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
        if let Some(env) = by_scanner(text) {
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
        let env = by_scanner(text).unwrap();
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
            assert_eq!(by_scanner(text), None, "{text:?}");
        }
        let deep = format!(r#"{{"a":{}1{}}}"#, "[".repeat(200), "]".repeat(200));
        assert_eq!(by_scanner(&deep), None);
        let fine = format!(r#"{{"a":{}1{}}}"#, "[".repeat(100), "]".repeat(100));
        assert!(by_scanner(&fine).is_some());
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
            assert!(by_scanner(text).is_some(), "{text:?}");
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
                prop_assert!(repeated || by_scanner(&text).is_some(), "gave up on {text:?}");
            }
        }

        #[test]
        fn agrees_with_serde_json_on_damaged_objects(
            text in object(),
            cut in any::<usize>(),
            insert in any::<usize>(),
            byte in prop::sample::select(b"{}[]\",:\\ 0-.eE+tfnu\x01x".to_vec()),
        ) {
            for damaged in scan::damaged(&text, cut, insert, byte) {
                agrees(&damaged);
            }
        }
    }
}
