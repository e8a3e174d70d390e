//! Field compression, wire-compatible with aws-lambda-stream: a field whose value is large is
//! replaced by the string `COMPRESSED` followed by the base64 of its JSON, gzipped.
//!
//! Reading is transparent and lazy: [`Event::decode`](crate::Event::decode) only notes that
//! the text holds the marker (one substring search), and the compressed values are revived
//! when a step first reads the payload ([`Event::fields`](crate::Event::fields),
//! [`Event::payload`](crate::Event::payload), [`Event::json_at`](crate::Event::json_at)); an
//! event forwarded unread keeps its compressed text. Writing is opt-in
//! ([`Event::compress_fields`](crate::Event::compress_fields), `compress_over` in the
//! configuration): Floodway-only hubs need not pay for gzip, and Node services read either
//! form.
//!
//! The rules are aws-lambda-stream's (`src/utils/compression.js`): on write, every object
//! member at any depth (but not array elements, and not members named in `ignore`) whose
//! size is over the threshold is compressed whole, where the size of an object or array is
//! its JSON's length in bytes and a string's is `12 + 4 * ceil(length / 4)` (as the
//! `object-sizeof` package counts); on read, every string that starts with the marker, at any
//! depth, is revived, again if what it holds is itself compressed.

use std::io::{Read as _, Write as _};

use base64::Engine as _;
use serde_json::{Map, Value};

/// What marks a compressed value.
pub const MARKER: &str = "COMPRESSED";

/// aws-lambda-stream's default threshold: 10 KiB.
pub const DEFAULT_THRESHOLD: usize = 10 * 1024;

/// Whether JSON text may hold a compressed value (a string starting with the marker).
pub fn may_hold(text: &[u8]) -> bool {
    // Built once: building a searcher costs more than searching an event.
    static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"COMPRESSED"));
    FINDER.find(text).is_some()
}

/// A compressed value that could not be revived.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{path}` is marked {MARKER} but {why}")]
pub struct ReviveError {
    /// Where the value is (`order.lines`).
    pub path: String,
    /// What is wrong with it.
    pub why: String,
}

/// Bytes of JSON the compressed values of one event may revive to, all together: gzip packs
/// a run of one byte a thousand times over, so a 1 MiB event could otherwise hold gigabytes
/// (and parsed, JSON takes up to some sixteen times its text: `[0,0,...]`).
pub const MAX_REVIVED: usize = 16 << 20;

/// How deep revived values may nest, counting through every compressed layer: each layer's
/// JSON is parsed to at most 128 levels, but compressed values inside compressed values
/// chain them, and the walk that revives them would run out of stack.
pub const MAX_REVIVED_DEPTH: usize = 512;

/// The value a compressed string holds (without its marker): base64, gzip, JSON; no more
/// than `budget` bytes of JSON, taken from it.
fn unzip(packed: &str, budget: &mut usize) -> Result<Value, String> {
    let gz = base64::engine::general_purpose::STANDARD
        .decode(packed.trim_end())
        .map_err(|e| format!("is not base64 ({e})"))?;
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(gz.as_slice())
        .take(*budget as u64 + 1)
        .read_to_end(&mut json)
        .map_err(|e| format!("is not gzip ({e})"))?;
    if json.len() > *budget {
        return Err(format!(
            "revives to more than the {MAX_REVIVED} bytes an event's compressed values may hold"
        ));
    }
    *budget -= json.len();
    serde_json::from_slice(&json).map_err(|e| format!("does not hold JSON ({e})"))
}

/// Revives every compressed value in `value`, at any depth (again when what it holds is
/// compressed too), leaving those that cannot be revived as they are (among them any past
/// [`MAX_REVIVED`] bytes in all); what could not be revived, in document order. `path` names
/// `value` in the errors.
pub fn revive_all(path: &str, value: &mut Value) -> Vec<ReviveError> {
    revive_within(path, value, MAX_REVIVED)
}

/// [`revive_all`] over each member of `map` (an event's payload, its tags), with one budget
/// for them all: [`MAX_REVIVED`] bytes per event, not per member. `prefix` names the map in
/// the errors.
pub fn revive_members(prefix: &str, map: &mut Map<String, Value>) -> Vec<ReviveError> {
    members_within(prefix, map, MAX_REVIVED)
}

/// [`revive_members`] with `budget` bytes of revived JSON in all.
fn members_within(
    prefix: &str,
    map: &mut Map<String, Value>,
    mut budget: usize,
) -> Vec<ReviveError> {
    let mut failed = Vec::new();
    for (name, member) in map.iter_mut() {
        revive_into(&join(prefix, name), member, &mut budget, &mut failed, 0);
    }
    failed
}

/// [`revive_all`] with `budget` bytes of revived JSON in all.
fn revive_within(path: &str, value: &mut Value, mut budget: usize) -> Vec<ReviveError> {
    let mut failed = Vec::new();
    revive_into(path, value, &mut budget, &mut failed, 0);
    failed
}

/// Revives the compressed values in `value`, `depth` levels down from its member; a value
/// too deep is left as it is, with an error (and the walk goes no deeper).
fn revive_into(
    path: &str,
    value: &mut Value,
    budget: &mut usize,
    failed: &mut Vec<ReviveError>,
    depth: usize,
) {
    if depth > MAX_REVIVED_DEPTH {
        if matches!(value, Value::String(s) if s.starts_with(MARKER))
            || matches!(value, Value::Object(_) | Value::Array(_))
        {
            failed.push(ReviveError {
                path: path.to_owned(),
                why: format!("nests deeper than the {MAX_REVIVED_DEPTH} levels revived values may"),
            });
        }
        return;
    }
    match value {
        Value::String(s) if s.starts_with(MARKER) => match unzip(&s[MARKER.len()..], budget) {
            Ok(mut inner) => {
                revive_into(path, &mut inner, budget, failed, depth + 1);
                *value = inner;
            }
            Err(why) => failed.push(ReviveError {
                path: path.to_owned(),
                why,
            }),
        },
        Value::Object(map) => {
            for (name, member) in map.iter_mut() {
                revive_into(&join(path, name), member, budget, failed, depth + 1);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                revive_into(&format!("{path}[{i}]"), item, budget, failed, depth + 1);
            }
        }
        _ => {}
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

/// The size `object-sizeof` gives a value, which aws-lambda-stream compares to its threshold.
fn sizeof(value: &Value) -> usize {
    match value {
        Value::Null => 0,
        Value::Bool(_) => 4,
        Value::Number(_) => 8,
        Value::String(s) => 12 + 4 * s.encode_utf16().count().div_ceil(4),
        Value::Array(_) | Value::Object(_) => serde_json::to_string(value).map_or(0, |t| t.len()),
    }
}

/// The compressed form of `value`: the marker, then base64 of its JSON gzipped.
pub fn zip(value: &Value) -> String {
    let json = serde_json::to_vec(value).unwrap_or_default();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing to a Vec cannot fail.
    let _ = gz.write_all(&json);
    let gz = gz.finish().unwrap_or_default();
    format!(
        "{MARKER}{}",
        base64::engine::general_purpose::STANDARD.encode(gz)
    )
}

/// Whether aws-lambda-stream takes `key` for an array index (`parseInt` gives a number) and
/// so never compresses its value.
fn looks_like_index(key: &str) -> bool {
    let key = key.trim_start();
    let key = key.strip_prefix(['-', '+']).unwrap_or(key);
    key.starts_with(|c: char| c.is_ascii_digit())
}

/// Compresses, in place, every member of `map` (at any depth) whose size is over `threshold`,
/// but not those named in `ignore` (whose own members may be) and not array elements; returns
/// how many it compressed.
pub fn compress_members(map: &mut Map<String, Value>, threshold: usize, ignore: &[&str]) -> usize {
    let mut compressed = 0;
    for (name, member) in map.iter_mut() {
        let skip = ignore.contains(&name.as_str())
            || looks_like_index(name)
            || matches!(member, Value::String(s) if s.starts_with(MARKER));
        if !skip && sizeof(member) > threshold {
            *member = Value::String(zip(member));
            compressed += 1;
        } else {
            // As with aws-lambda-stream's replacer, a member left whole (an ignored one too)
            // has its own members looked at.
            compressed += compress_within(member, threshold, ignore);
        }
    }
    compressed
}

fn compress_within(value: &mut Value, threshold: usize, ignore: &[&str]) -> usize {
    match value {
        Value::Object(map) => compress_members(map, threshold, ignore),
        Value::Array(items) => items
            .iter_mut()
            .map(|item| compress_within(item, threshold, ignore))
            .sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compressed values nested in compressed values, each layer a hundred arrays deep: the
    /// walk stops at its depth limit with an error, on a small stack, instead of overflowing
    /// it (a stack overflow aborts the process, and redelivery repeats it).
    #[test]
    fn a_chain_of_compressed_layers_stops_at_the_depth_limit() {
        let mut value = Value::from(1);
        for _ in 0..200 {
            for _ in 0..100 {
                value = Value::Array(vec![value]);
            }
            value = Value::String(zip(&value));
        }
        let failed = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let mut value = value;
                revive_all("deep", &mut value)
            })
            .unwrap()
            .join()
            .expect("no stack overflow");
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(failed[0].why.contains("nests deeper"), "{failed:?}");
    }
    use serde_json::json;

    #[test]
    fn a_value_compressed_by_aws_lambda_stream_revives() {
        // Node's zlib.gzipSync of {"name":"hello hello hello hello"}, as aws-lambda-stream
        // writes it.
        let mut value = json!({
            "thing": "COMPRESSEDH4sIAAAAAAAAA6tWykvMTVWyUspIzcnJV8AglWoBWze8TyIAAAA=",
            "list": ["COMPRESSEDH4sIAAAAAAAAA6tWykvMTVWyUspIzcnJV8AglWoBWze8TyIAAAA="],
        });
        assert!(revive_all("", &mut value).is_empty());
        let thing = json!({ "name": "hello hello hello hello" });
        assert_eq!(value, json!({ "thing": thing, "list": [thing] }));
    }

    #[test]
    fn compressed_values_revive_to_a_bounded_size_in_all() {
        // Each packs 600 KiB of JSON into about a kilobyte.
        let packed = zip(&json!("a".repeat(600 * 1024)));
        assert!(packed.len() < 4096, "{}", packed.len());
        let mut value = json!({ "one": packed, "two": packed });
        let failed = revive_within("", &mut value, 1 << 20);
        // The first fits the budget; the second would pass it and is left as it was.
        assert_eq!(value["one"].as_str().map(str::len), Some(600 * 1024));
        assert!(value["two"].as_str().unwrap().starts_with(MARKER));
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].path, "two");
        assert!(failed[0].why.contains("more than"), "{}", failed[0]);
    }

    #[test]
    fn the_members_of_an_event_share_one_budget() {
        // Five fields of 300 KiB each against a budget of 1 MiB: three revive, not five.
        let packed = zip(&json!("a".repeat(300 * 1024)));
        let mut map = Map::new();
        for i in 0..5 {
            map.insert(format!("f{i}"), Value::String(packed.clone()));
        }
        let failed = members_within("", &mut map, 1 << 20);
        let revived = map
            .values()
            .filter(|v| !v.as_str().unwrap().starts_with(MARKER));
        assert_eq!(revived.count(), 3, "{failed:?}");
        assert_eq!(failed.len(), 2);
        assert_eq!(failed[0].path, "f3");
    }

    #[test]
    fn large_members_compress_and_revive_to_what_they_were() {
        let big = json!({ "text": "x".repeat(200), "n": [1, 2, 3] });
        let small = json!({ "a": 1 });
        let mut map = json!({
            "big": big, "small": small, "keep": { "inner": "y".repeat(300) },
            "list": [{ "inner": "z".repeat(300) }, "w".repeat(300)], "0": "v".repeat(300),
        })
        .as_object()
        .unwrap()
        .clone();
        let before = Value::Object(map.clone());
        assert_eq!(compress_members(&mut map, 100, &["keep", "list"]), 3);
        assert!(map["big"].as_str().unwrap().starts_with(MARKER));
        assert_eq!(map["small"], small);
        // An ignored member is kept whole, but its own members are looked at.
        assert!(map["keep"].is_object());
        assert!(map["keep"]["inner"].as_str().unwrap().starts_with(MARKER));
        // An array element is not compressed, but an object member inside one is (the
        // array itself is ignored here, or it would be compressed whole).
        assert!(map["list"][0]["inner"]
            .as_str()
            .unwrap()
            .starts_with(MARKER));
        assert!(!map["list"][1].as_str().unwrap().starts_with(MARKER));
        assert!(!map["0"].as_str().unwrap().starts_with(MARKER));
        // Compressing again changes nothing.
        assert_eq!(compress_members(&mut map, 100, &["keep", "list"]), 0);
        let mut after = Value::Object(map);
        assert!(revive_all("", &mut after).is_empty());
        assert_eq!(after, before);
    }

    #[test]
    fn sizes_are_counted_as_object_sizeof_counts_them() {
        assert_eq!(sizeof(&json!("abcde")), 12 + 8);
        assert_eq!(sizeof(&json!({ "a": 1 })), 7);
        assert_eq!(sizeof(&json!(1.5)), 8);
        // A member is compressed only over the threshold.
        let mut at = json!({ "s": "x".repeat(10_228) })
            .as_object()
            .unwrap()
            .clone();
        assert_eq!(compress_members(&mut at, DEFAULT_THRESHOLD, &[]), 0);
        let mut over = json!({ "s": "x".repeat(10_229) })
            .as_object()
            .unwrap()
            .clone();
        assert_eq!(compress_members(&mut over, DEFAULT_THRESHOLD, &[]), 1);
    }

    #[test]
    fn a_bad_compressed_value_is_named_by_its_path() {
        let mut value = json!({ "order": { "lines": "COMPRESSED!!!" } });
        let err = revive_all("", &mut value).remove(0);
        assert_eq!(err.path, "order.lines");
        assert!(err.to_string().contains("is not base64"), "{err}");
        let mut value = json!({ "a": format!("{MARKER}{}", base64::engine::general_purpose::STANDARD.encode(b"plain")) });
        assert!(revive_all("", &mut value)[0].why.contains("not gzip"));
    }

    #[test]
    fn an_event_revives_its_compressed_fields_only_when_read_and_forwards_them_as_they_came() {
        let packed = "COMPRESSEDH4sIAAAAAAAAA6tWykvMTVWyUspIzcnJV8AglWoBWze8TyIAAAA=";
        let text = format!(
            r#"{{"id":"e1","type":"thing-created","timestamp":1,"partitionKey":"k","thing":"{packed}"}}"#
        );
        let event = crate::Event::decode(text.as_bytes()).unwrap();
        assert_eq!(event.to_json(), text, "forwarded as it came");
        let thing = json!({ "name": "hello hello hello hello" });
        assert_eq!(event.field("thing"), Some(&thing));
        assert_eq!(
            event.json_at("/thing/name").as_deref(),
            Some("\"hello hello hello hello\"")
        );
        #[derive(serde::Deserialize)]
        struct Thing {
            name: String,
        }
        #[derive(serde::Deserialize)]
        struct Payload {
            thing: Thing,
        }
        let payload: Payload = event.payload().unwrap();
        assert_eq!(payload.thing.name, "hello hello hello hello");
        assert_eq!(event.to_value()["thing"], thing);

        // Compressed again by Floodway: the same value comes back.
        let mut big = crate::Event::builder("thing-created", "k")
            .field("thing", json!({ "text": "y".repeat(20_000) }))
            .build();
        assert_eq!(big.compress_fields(DEFAULT_THRESHOLD, &[]), 1);
        let wire = big.to_json();
        assert!(wire.len() < 1_000, "{}", wire.len());
        let back = crate::Event::decode(wire.as_bytes()).unwrap();
        assert_eq!(
            back.field("thing").unwrap()["text"].as_str().unwrap().len(),
            20_000
        );
    }

    #[test]
    fn a_bad_compressed_field_fails_the_payload_with_its_path() {
        let text = r#"{"id":"e1","type":"t","timestamp":1,"partitionKey":"k","order":{"lines":"COMPRESSEDnot-gzip"}}"#;
        let event = crate::Event::decode(text.as_bytes()).unwrap();
        #[derive(Debug, serde::Deserialize)]
        struct Order {
            #[allow(dead_code)]
            order: Lines,
        }
        #[derive(Debug, serde::Deserialize)]
        struct Lines {
            #[allow(dead_code)]
            lines: Vec<Value>,
        }
        let err = event.payload::<Order>().unwrap_err();
        assert_eq!(err.name(), "CompressedFieldError");
        assert!(
            err.to_string()
                .contains("`order.lines` is marked COMPRESSED"),
            "{err}"
        );
        // The fields keep what could not be revived, and a payload that does not need it to
        // be revived reads.
        assert_eq!(event.field("order").unwrap()["lines"], "COMPRESSEDnot-gzip");
        assert!(event.payload::<Value>().is_ok());
    }
}
