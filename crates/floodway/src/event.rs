//! The event envelope: the wire format every Floodway service shares.
//!
//! An event is a JSON object with four required envelope fields (`id`, `type`, `timestamp` in
//! milliseconds, `partitionKey`), optional `tags`, and any payload fields, which are carried
//! through unchanged. This is the format of the Node library `aws-lambda-stream`, so Rust and
//! Node services can share a hub.
//!
//! Decoding reads only the envelope: routing needs nothing else. The payload stays as the
//! original text until a step asks for it, as a typed value with [`Event::payload`] or as JSON
//! fields with [`Event::fields`]. An event that no step changed encodes back to the exact bytes
//! it was decoded from.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use bytes::Bytes;
use bytestring::ByteString;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::error::{DecodeEventError, Error};

/// The default largest event [`Event::decode`] accepts: 1 MiB.
pub const DEFAULT_MAX_EVENT_SIZE: usize = 1024 * 1024;

/// The event type reserved for fault events.
pub const FAULT_EVENT_TYPE: &str = "fault";

/// The envelope's own fields: no field of the payload is named so.
pub const ENVELOPE_FIELDS: [&str; 5] = ["id", "type", "timestamp", "partitionKey", "tags"];

/// An immutable fact, in the envelope of `DESIGN.md` section 2.
///
/// ```
/// use floodway::Event;
///
/// let bytes = br#"{"id":"e1","type":"order-submitted","timestamp":1700000000000,
///                  "partitionKey":"o-1","order":{"id":"o-1","total":42}}"#;
/// let event = Event::decode(bytes).unwrap();
/// assert_eq!(event.event_type(), "order-submitted");
/// assert_eq!(event.partition_key(), "o-1");
///
/// #[derive(serde::Deserialize)]
/// struct Submitted { order: Order }
/// #[derive(serde::Deserialize)]
/// struct Order { total: u32 }
/// assert_eq!(event.payload::<Submitted>().unwrap().order.total, 42);
///
/// // Untouched events re-encode to their original bytes.
/// assert_eq!(event.to_json().as_bytes(), bytes);
/// ```
#[derive(Clone)]
pub struct Event {
    id: Text,
    ty: Text,
    timestamp: i64,
    partition_key: Text,
    repr: Repr,
}

/// An envelope string: a span of the source bytes when it needed no unescaping (no
/// allocation), or owned.
#[derive(Clone)]
enum Text {
    Span(u32, u32),
    Owned(String),
}

#[derive(Clone)]
enum Repr {
    /// Decoded from `text` (checked to be UTF-8 once, as it was decoded), or built from one
    /// payload written straight into it; tags and payload are parsed from it on first use.
    Raw {
        text: ByteString,
        has_tags: bool,
        /// Whether the text may hold compressed values ([`crate::compression`]), revived on
        /// first use: looked for when the payload or tags are first read, not at decoding,
        /// so an event passed on unread is never searched for them.
        compressed: Compressed,
        tags: OnceLock<Box<Map<String, Value>>>,
        /// The payload, or why the text does not parse into one (decoding checks the
        /// envelope and leaves the payload's values to their first reader: a number out of
        /// range, a lone surrogate or nesting deeper than serde_json reads are found then).
        fields: OnceLock<Box<Result<Map<String, Value>, String>>>,
        /// Where the top-level members are, when decoding found them: [`Event::payload`]
        /// reads only the members its type takes.
        members: crate::envelope::Members,
    },
    /// Built field by field, or changed in code.
    Owned {
        tags: Option<Map<String, Value>>,
        fields: Map<String, Value>,
        /// The JSON encoding, made on first use (a batch's byte count, a sink) and kept until
        /// the event changes: an event built by a step is encoded once, however many look.
        encoded: OnceLock<Bytes>,
    },
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Event")
            .field("id", &self.id())
            .field("type", &self.event_type())
            .field("timestamp", &self.timestamp)
            .field("partitionKey", &self.partition_key())
            .finish_non_exhaustive()
    }
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        self.id() == other.id()
            && self.event_type() == other.event_type()
            && self.timestamp == other.timestamp
            && self.partition_key() == other.partition_key()
            && self.tags() == other.tags()
            && self.fields() == other.fields()
    }
}

/// The text at a JSON pointer's `tokens`, found in one pass over a value: at each level the
/// member or element named is descended into and the rest skipped, with nothing collected.
struct At<'t> {
    tokens: &'t [Cow<'t, str>],
}

impl<'de, 't> serde::de::DeserializeSeed<'de> for At<'t> {
    type Value = Option<&'de RawValue>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        match self.tokens.split_first() {
            None => <&'de RawValue>::deserialize(d).map(Some),
            Some((token, rest)) => d.deserialize_any(AtVisitor { token, rest }),
        }
    }
}

/// Where the value at `tokens` inside the value at `i` of a checked text begins and ends, as
/// [`AtVisitor`] finds it (the last of repeated names; an index written as JSON Pointer writes
/// one); `Some(None)` when there is nothing there, `None` when the scanner leaves a level to
/// serde_json (a key with an escape, a path through a scalar).
fn checked_at(b: &[u8], i: usize, tokens: &[Cow<'_, str>]) -> Option<Option<(usize, usize)>> {
    let Some((token, rest)) = tokens.split_first() else {
        return Some(Some((i, crate::scan::skip_checked(b, i))));
    };
    if !matches!(b.get(i), Some(b'{' | b'[')) {
        // A path through a string, number or literal finds nothing, unless serde_json cannot
        // read the value at all (a number past f64, a lone surrogate), which spoils the whole
        // answer: let it decide.
        return None;
    }
    let mut found = None;
    let mut taken = true;
    let mut at = |start: usize| {
        match checked_at(b, start, rest) {
            Some(value) => found = value,
            None => taken = false,
        }
        taken.then(|| crate::scan::skip_checked(b, start))
    };
    match b[i] {
        b'{' => {
            crate::scan::object(b, i, |key, start| {
                if key == token.as_bytes() {
                    at(start)
                } else {
                    Some(crate::scan::skip_checked(b, start))
                }
            })?;
        }
        _ => {
            let sloppy = token.starts_with('+') || (token.starts_with('0') && token.len() > 1);
            let wanted: Option<usize> = if sloppy { None } else { token.parse().ok() };
            let mut index = 0;
            crate::scan::array(b, i, |start| {
                index += 1;
                if Some(index - 1) == wanted {
                    at(start)
                } else {
                    Some(crate::scan::skip_checked(b, start))
                }
            })?;
        }
    }
    Some(found)
}

struct AtVisitor<'t> {
    token: &'t str,
    rest: &'t [Cow<'t, str>],
}

/// Whether a member's name is the one wanted (compared without copying it).
struct KeyIs<'t>(&'t str);

impl<'de> serde::de::DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl serde::de::Visitor<'_> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.0)
    }
}

impl<'de> serde::de::Visitor<'de> for AtVisitor<'_> {
    type Value = Option<&'de RawValue>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        let mut found = None;
        while let Some(hit) = map.next_key_seed(KeyIs(self.token))? {
            // The last of duplicate names, as in the parsed object (serde_json keeps the last).
            if hit {
                found = map.next_value_seed(At { tokens: self.rest })?;
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(found)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // An index as JSON Pointer writes one (RFC 6901): no sign, no leading zero.
        let sloppy =
            self.token.starts_with('+') || (self.token.starts_with('0') && self.token.len() > 1);
        let wanted: Option<usize> = if sloppy {
            None
        } else {
            self.token.parse().ok()
        };
        let mut found = None;
        for i in 0.. {
            if Some(i) == wanted {
                match seq.next_element_seed(At { tokens: self.rest })? {
                    Some(value) => found = value,
                    None => break,
                }
            } else if seq.next_element::<serde::de::IgnoredAny>()?.is_none() {
                break;
            }
        }
        Ok(found)
    }

    // A scalar has no members.
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

fn found(raw: &str) -> String {
    let mut s: String = raw.chars().take(40).collect();
    if s.len() < raw.len() {
        s.push('…');
    }
    s
}

/// The string member `field` of the envelope: a span of `text` when it is a non-empty string
/// with no escapes (the common case, inlined into decoding), else read by
/// [`owned_string_field`].
#[inline(always)]
fn string_field(
    text: &str,
    raw: Option<&str>,
    field: &'static str,
    non_empty: bool,
) -> Result<Text, DecodeEventError> {
    match raw
        .filter(|raw| raw.len() > 2)
        .and_then(|raw| plain_span(text, raw))
    {
        Some(span) => Ok(span),
        None => owned_string_field(text, raw, field, non_empty),
    }
}

/// The span of the content of `raw`, a slice of `text`, when `raw` is a string with no escapes
/// (and the span fits in `u32`s).
#[inline(always)]
fn plain_span(text: &str, raw: &str) -> Option<Text> {
    if raw.len() < 2 || !raw.starts_with('"') || raw.contains('\\') {
        return None;
    }
    let start = raw.as_ptr() as usize - text.as_ptr() as usize + 1;
    let end = start + raw.len() - 2;
    Some(Text::Span(
        u32::try_from(start).ok()?,
        u32::try_from(end).ok()?,
    ))
}

/// [`string_field`] for what its fast path does not take: absent, `null`, empty, escaped, or
/// not a string.
#[cold]
#[inline(never)]
fn owned_string_field(
    text: &str,
    raw: Option<&str>,
    field: &'static str,
    non_empty: bool,
) -> Result<Text, DecodeEventError> {
    let raw = raw
        .filter(|r| *r != "null")
        .ok_or(DecodeEventError::MissingField { field })?;
    if non_empty && raw == "\"\"" {
        return Err(DecodeEventError::InvalidField {
            field,
            expected: "a non-empty string",
            found: "\"\"".into(),
        });
    }
    if let Some(span) = plain_span(text, raw) {
        return Ok(span);
    }
    let value = {
        serde_json::from_str::<String>(raw).map_err(|_| DecodeEventError::InvalidField {
            field,
            expected: "a string",
            found: found(raw),
        })?
    };
    if non_empty && value.is_empty() {
        return Err(DecodeEventError::InvalidField {
            field,
            expected: "a non-empty string",
            found: "\"\"".into(),
        });
    }
    Ok(Text::Owned(value))
}

/// The payload fields of an event's text (every member but the envelope's), compressed values
/// revived; or why the text does not read as a tree.
fn payload_fields(text: &str, compressed: &Compressed) -> Result<Map<String, Value>, String> {
    let mut map: Map<String, Value> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    for key in ENVELOPE_FIELDS {
        map.remove(key);
    }
    if compressed.get(text) {
        // A value that cannot be revived stays as it is: `payload` reports it.
        crate::compression::revive_members("", &mut map);
    }
    Ok(map)
}

/// Whether an event's text may hold compressed values: unknown until first asked, then kept.
/// An atomic rather than a `OnceLock`: two threads asking at once find the same answer, so
/// either may keep it, and a `OnceLock` goes through its `Once` to be set, even when made
/// with its value (a cost every decoded and every built event paid).
struct Compressed(AtomicU8);

impl Compressed {
    const UNKNOWN: u8 = 0;
    const NO: u8 = 1;
    const YES: u8 = 2;

    fn unknown() -> Compressed {
        Compressed(AtomicU8::new(Self::UNKNOWN))
    }

    fn known(holds: bool) -> Compressed {
        Compressed(AtomicU8::new(if holds { Self::YES } else { Self::NO }))
    }

    /// Whether `text`, the event's, may hold compressed values: searched for once.
    fn get(&self, text: &str) -> bool {
        match self.0.load(Ordering::Relaxed) {
            Self::NO => false,
            Self::YES => true,
            _ => {
                let holds = crate::compression::may_hold(text.as_bytes());
                let kept = if holds { Self::YES } else { Self::NO };
                self.0.store(kept, Ordering::Relaxed);
                holds
            }
        }
    }
}

impl Clone for Compressed {
    fn clone(&self) -> Compressed {
        Compressed(AtomicU8::new(self.0.load(Ordering::Relaxed)))
    }
}

fn timestamp_field(raw: Option<&str>) -> Result<i64, DecodeEventError> {
    let raw = raw
        .filter(|r| *r != "null")
        .ok_or(DecodeEventError::MissingField { field: "timestamp" })?;
    if let Ok(ms) = raw.parse::<i64>() {
        return Ok(ms);
    }
    // JavaScript writes large integers as floats (`1.7e12`); accept those that are whole.
    match raw.parse::<f64>() {
        Ok(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(f as i64),
        _ => Err(DecodeEventError::InvalidField {
            field: "timestamp",
            expected: "an integer number of milliseconds since the Unix epoch",
            found: found(raw),
        }),
    }
}

fn json_error(err: &serde_json::Error) -> DecodeEventError {
    let message = err.to_string();
    let message = match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message,
    };
    DecodeEventError::NotJson {
        line: err.line(),
        column: err.column(),
        message,
    }
}

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// The civil date `(year, month, day)` in UTC of a time in ms since the epoch.
pub fn civil_date(ms: i64) -> (i64, u32, u32) {
    // Howard Hinnant's days-to-civil.
    let days = ms.div_euclid(86_400_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// A stable id from parts: the first 128 bits of SHA-256 over the parts, in hex.
///
/// Used wherever an id must be the same every time it is derived (fault ids, derived events),
/// so that a repeated derivation is stored once.
pub fn stable_id(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    let digest = hasher.finalize();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(32);
    for byte in &digest[..16] {
        out.push(HEX[usize::from(byte >> 4)] as char);
        out.push(HEX[usize::from(byte & 0xf)] as char);
    }
    out
}

/// A stable 64-bit hash of a partition key (FNV-1a): the same in every process and version,
/// so that every runtime maps a key to the same partition.
pub fn key_hash(key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The partition, among `partitions`, of a partition key.
///
/// ```
/// use floodway::event::partition_for;
/// assert_eq!(partition_for("order-1", 8), partition_for("order-1", 8));
/// assert!(partition_for("order-1", 8) < 8);
/// ```
pub fn partition_for(partition_key: &str, partitions: u32) -> u32 {
    partition_of_hash(key_hash(partition_key), partitions)
}

/// The partition, among `partitions`, of a partition key whose [`key_hash`] is `hash`: for a
/// caller that needs the hash for more than the partition.
pub fn partition_of_hash(hash: u64, partitions: u32) -> u32 {
    (hash % u64::from(partitions.max(1))) as u32
}

/// A map keyed by [`key_hash`]es: a key is its own hash, folded so that the low bits, which
/// pick a bucket, depend on all of its bits (FNV-1a's low bits depend only on the low bits of
/// each byte). Keys that are ids or counters hash to themselves.
pub type KeyHashMap<V> =
    std::collections::HashMap<u64, V, std::hash::BuildHasherDefault<KeyHashHasher>>;

/// The hasher of a [`KeyHashMap`].
#[derive(Debug, Default, Clone, Copy)]
pub struct KeyHashHasher(u64);

impl std::hash::Hasher for KeyHashHasher {
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }

    fn write(&mut self, bytes: &[u8]) {
        // Keys of other types than `u64` still hash, if slowly.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

fn random_id() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

impl Event {
    /// Starts building an event of type `event_type` with ordering key `partition_key`.
    pub fn builder(
        event_type: impl Into<String>,
        partition_key: impl Into<String>,
    ) -> EventBuilder {
        EventBuilder {
            id: None,
            ty: event_type.into(),
            timestamp: None,
            partition_key: partition_key.into(),
            tags: None,
            fields: Map::new(),
            payload: None,
        }
    }

    /// Decodes an event from bytes, with the default size limit of 1 MiB.
    ///
    /// # Errors
    /// Returns a [`DecodeEventError`] naming what is wrong: too large, not UTF-8, not JSON, not
    /// an object, a missing or mistyped envelope field.
    pub fn decode(bytes: &[u8]) -> Result<Event, DecodeEventError> {
        Self::decode_with_limit(bytes, DEFAULT_MAX_EVENT_SIZE)
    }

    /// Decodes an event from bytes, rejecting records over `max_size` bytes.
    ///
    /// # Errors
    /// As [`Event::decode`].
    pub fn decode_with_limit(bytes: &[u8], max_size: usize) -> Result<Event, DecodeEventError> {
        if bytes.len() > max_size {
            return Err(DecodeEventError::TooLarge {
                size: bytes.len(),
                limit: max_size,
            });
        }
        Self::decode_bytes(Bytes::copy_from_slice(bytes), max_size)
    }

    /// Decodes an event from a shared buffer without copying it: the event keeps the buffer
    /// and reads its envelope strings from it.
    ///
    /// # Errors
    /// As [`Event::decode`].
    pub fn decode_bytes(bytes: Bytes, max_size: usize) -> Result<Event, DecodeEventError> {
        if bytes.len() > max_size {
            return Err(DecodeEventError::TooLarge {
                size: bytes.len(),
                limit: max_size,
            });
        }
        // Checked once: the event keeps its text as text, and reading it (the envelope
        // strings, the payload) never checks it again.
        let source = ByteString::try_from(bytes).map_err(|e| DecodeEventError::NotUtf8 {
            valid_up_to: e.valid_up_to(),
        })?;
        let text: &str = &source;

        if !text.trim_start().starts_with('{') {
            return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                Ok(_) => DecodeEventError::NotObject,
                Err(err) => json_error(&err),
            });
        }
        // The scanner answers for the events it accepts outright; serde_json decides the rest
        // and words the errors.
        let (env, members) = crate::envelope::read(text).map_err(|e| json_error(&e))?;
        let id = string_field(text, env.id, "id", true)?;
        let ty = string_field(text, env.ty, "type", true)?;
        let partition_key = string_field(text, env.partition_key, "partitionKey", false)?;
        let timestamp = timestamp_field(env.timestamp)?;
        let has_tags = match env.tags {
            None | Some("null") => false,
            Some(t) if t.starts_with('{') => true,
            Some(t) => {
                return Err(DecodeEventError::InvalidField {
                    field: "tags",
                    expected: "an object",
                    found: found(t),
                })
            }
        };
        Ok(Event {
            id,
            ty,
            timestamp,
            partition_key,
            repr: Repr::Raw {
                compressed: Compressed::unknown(),
                text: source,
                has_tags,
                tags: OnceLock::new(),
                fields: OnceLock::new(),
                members,
            },
        })
    }

    /// Builds an event from a JSON object, checking the envelope as [`Event::decode`] does.
    ///
    /// # Errors
    /// As [`Event::decode`], except size.
    pub fn from_value(value: Value) -> Result<Event, DecodeEventError> {
        let Value::Object(mut map) = value else {
            return Err(DecodeEventError::NotObject);
        };
        fn take_str(
            map: &mut Map<String, Value>,
            field: &'static str,
            non_empty: bool,
        ) -> Result<String, DecodeEventError> {
            match map.remove(field) {
                None | Some(Value::Null) => Err(DecodeEventError::MissingField { field }),
                Some(Value::String(s)) if non_empty && s.is_empty() => {
                    Err(DecodeEventError::InvalidField {
                        field,
                        expected: "a non-empty string",
                        found: "\"\"".into(),
                    })
                }
                Some(Value::String(s)) => Ok(s),
                Some(other) => Err(DecodeEventError::InvalidField {
                    field,
                    expected: "a string",
                    found: found(&other.to_string()),
                }),
            }
        }
        let id = take_str(&mut map, "id", true)?;
        let ty = take_str(&mut map, "type", true)?;
        let partition_key = take_str(&mut map, "partitionKey", false)?;
        let timestamp = match map.remove("timestamp") {
            None | Some(Value::Null) => {
                return Err(DecodeEventError::MissingField { field: "timestamp" })
            }
            Some(v) => {
                let raw = v.to_string();
                let raw_value = RawValue::from_string(raw).map_err(|e| json_error(&e))?;
                timestamp_field(Some(raw_value.get()))?
            }
        };
        let tags = match map.remove("tags") {
            None | Some(Value::Null) => None,
            Some(Value::Object(t)) => Some(t),
            Some(other) => {
                return Err(DecodeEventError::InvalidField {
                    field: "tags",
                    expected: "an object",
                    found: found(&other.to_string()),
                })
            }
        };
        Ok(Event {
            id: Text::Owned(id),
            ty: Text::Owned(ty),
            timestamp,
            partition_key: Text::Owned(partition_key),
            repr: Repr::Owned {
                tags,
                fields: map,
                encoded: OnceLock::new(),
            },
        })
    }

    fn text<'a>(&'a self, text: &'a Text) -> &'a str {
        match (text, &self.repr) {
            (Text::Owned(s), _) => s,
            (Text::Span(a, b), Repr::Raw { text, .. }) => {
                text.get(*a as usize..*b as usize).unwrap_or_default()
            }
            // `owned()` turns spans into owned strings before it drops the bytes.
            (Text::Span(..), Repr::Owned { .. }) => "",
        }
    }

    /// The unique id.
    pub fn id(&self) -> &str {
        self.text(&self.id)
    }

    /// The kebab-case domain type, e.g. `order-submitted`.
    pub fn event_type(&self) -> &str {
        self.text(&self.ty)
    }

    /// Event time in milliseconds since the Unix epoch.
    pub fn timestamp(&self) -> i64 {
        self.timestamp
    }

    /// The ordering key: events with the same key are processed in order.
    pub fn partition_key(&self) -> &str {
        self.text(&self.partition_key)
    }

    /// Whether this is a fault event.
    pub fn is_fault(&self) -> bool {
        self.event_type() == FAULT_EVENT_TYPE
    }

    /// The tags (`source`, `pipeline`, `skip`, ...), if the event has any.
    pub fn tags(&self) -> Option<&Map<String, Value>> {
        match &self.repr {
            Repr::Raw {
                text,
                has_tags,
                compressed,
                tags,
                ..
            } => {
                if !has_tags {
                    return None;
                }
                let compressed = compressed.get(text);
                Some(tags.get_or_init(|| {
                    #[derive(Deserialize)]
                    struct Tags {
                        #[serde(default)]
                        tags: Map<String, Value>,
                    }
                    let mut tags = serde_json::from_str::<Tags>(text)
                        .map(|t| t.tags)
                        .unwrap_or_default();
                    if compressed {
                        // A value that cannot be revived stays as it is (see `payload`).
                        crate::compression::revive_members("tags", &mut tags);
                    }
                    Box::new(tags)
                }))
            }
            Repr::Owned { tags, .. } => tags.as_ref(),
        }
    }

    /// One tag's value as a string, if present and a string.
    pub fn tag(&self, name: &str) -> Option<&str> {
        self.tags()?.get(name)?.as_str()
    }

    /// The payload fields: every field of the object except the envelope, with compressed
    /// values revived ([`crate::compression`]).
    pub fn fields(&self) -> &Map<String, Value> {
        match &self.repr {
            Repr::Raw {
                text,
                fields,
                compressed,
                ..
            } => fields
                .get_or_init(|| Box::new(payload_fields(text, compressed)))
                .as_ref()
                .as_ref()
                .unwrap_or_else(|_| {
                    static NONE: std::sync::LazyLock<Map<String, Value>> =
                        std::sync::LazyLock::new(Map::new);
                    &NONE
                }),
            Repr::Owned { fields, .. } => fields,
        }
    }

    /// Whether the payload reads as JSON values: `Ok` for every event built in code, and for a
    /// decoded one whose every value serde_json reads. [`Event::fields`] of one that does not
    /// is empty; a step that must see every field (decryption, encryption, redaction) checks
    /// first, so that such an event is poison rather than passed on as if it had none.
    ///
    /// # Errors
    /// A poison error saying what does not read.
    pub fn check_payload(&self) -> Result<(), Error> {
        self.fields();
        match &self.repr {
            Repr::Raw { fields, .. } => match fields.get().map(|f| f.as_ref()) {
                Some(Err(why)) => Err(Error::poison_msg(
                    "UnreadablePayload",
                    format!("event {}: the payload does not read: {why}", self.id()),
                )),
                _ => Ok(()),
            },
            Repr::Owned { .. } => Ok(()),
        }
    }

    /// One payload field.
    pub fn field(&self, name: &str) -> Option<&Value> {
        self.fields().get(name)
    }

    /// The JSON text at a JSON pointer (`/order/id`), or `None` when there is nothing there.
    ///
    /// A decoded event is not parsed into a tree for this: each level is scanned for the one
    /// member wanted and the text returned as it is in the source, which is several times
    /// cheaper than [`Event::fields`] on large payloads.
    ///
    /// ```
    /// use floodway::Event;
    /// let e = Event::decode(br#"{"id":"1","type":"t","timestamp":1,"partitionKey":"k",
    ///                           "order":{"id":"o-1","lines":[{"sku":"a"}]}}"#).unwrap();
    /// assert_eq!(e.json_at("/order/id").as_deref(), Some(r#""o-1""#));
    /// assert_eq!(e.json_at("/order/lines/0/sku").as_deref(), Some(r#""a""#));
    /// assert_eq!(e.json_at("/partitionKey").as_deref(), Some(r#""k""#));
    /// assert!(e.json_at("/order/missing").is_none());
    /// ```
    pub fn json_at(&self, pointer: &str) -> Option<Cow<'_, str>> {
        let (text, members): (&str, _) = match &self.repr {
            Repr::Raw {
                text,
                compressed,
                members,
                ..
            } if !compressed.get(text) => (text, members),
            _ => {
                return self
                    .to_value()
                    .pointer(pointer)
                    .map(|v| Cow::Owned(v.to_string()))
            }
        };
        if pointer.is_empty() {
            return Some(Cow::Borrowed(text));
        }
        let tokens: Vec<Cow<'_, str>> = pointer
            .strip_prefix('/')?
            .split('/')
            .map(|t| {
                if t.contains('~') {
                    Cow::Owned(t.replace("~1", "/").replace("~0", "~"))
                } else {
                    Cow::Borrowed(t)
                }
            })
            .collect();
        // The first step goes straight to its member when decoding noted where they are.
        let (text, tokens) = match crate::envelope::member(text, members, &tokens[0]) {
            // A member wanted whole: decoding checked the text, so its value ends where its
            // brackets balance, found without reading it again.
            Some(value) if tokens.len() == 1 => {
                let value = &text[value?..];
                return Some(Cow::Borrowed(
                    &value[..crate::scan::skip_checked(value.as_bytes(), 0)],
                ));
            }
            Some(value) => (&text[value?..], &tokens[1..]),
            None => (text, &tokens[..]),
        };
        // Decoding checked the text: the scanner walks each level to the member wanted and
        // passes the others over by counting brackets. serde_json decides what it does not
        // take (a key written with an escape).
        // (A path into containers nested as deep as serde_json's limit is left to it too.)
        let b = text.as_bytes();
        if tokens.len() < 100 {
            if let Some(found) = checked_at(b, crate::scan::ws(b, 0), tokens) {
                return found.map(|(start, end)| Cow::Borrowed(&text[start..end]));
            }
        }
        let mut de = serde_json::Deserializer::from_str(text);
        let found = serde::de::DeserializeSeed::deserialize(At { tokens }, &mut de).ok()??;
        Some(Cow::Borrowed(found.get()))
    }

    /// Deserializes the event (envelope and payload) into a typed value.
    ///
    /// `T` may borrow from the event: a `Cow<'a, str>` field marked `#[serde(borrow)]` takes
    /// its string from the event's text without a copy where the string has no escapes, and
    /// owns it where it has. A decoded event is read from its text: only the members `T` takes
    /// are parsed, those it does not take are passed over. An event changed in code, or one
    /// holding compressed values, is read from its JSON tree, where every string is owned. A
    /// plain `&'a str` field can hold neither a string written with escapes nor an owned one:
    /// such an event would not fit `T`, so use `Cow`.
    ///
    /// # Errors
    /// A [poison](crate::ErrorClass::Poison) error named `InvalidPayload` when the event does not
    /// fit `T`.
    pub fn payload<'a, T: Deserialize<'a>>(&'a self) -> Result<T, Error> {
        let result = match &self.repr {
            Repr::Raw {
                text,
                compressed,
                members,
                ..
            } if !compressed.get(text) => {
                let text: &'a str = text;
                match crate::envelope::payload(text, members) {
                    Some(value) => Ok(value),
                    None => serde_json::from_str(text),
                }
            }
            Repr::Raw { text, .. } => {
                let mut value: Value = serde_json::from_str(text).unwrap_or_default();
                let failed = crate::compression::revive_all("", &mut value);
                // A value that cannot be revived stays as it is: it is the error only when it
                // keeps the event from fitting `T` (a fault event carries other events, which
                // may hold anything).
                let typed = T::deserialize(value);
                if let (Err(_), Some(bad)) = (&typed, failed.first()) {
                    return Err(Error::poison_msg(
                        "CompressedFieldError",
                        format!("event {}: {bad}", self.id()),
                    ));
                }
                typed
            }
            // The tree, as serde_json would read the event's encoding but with floats kept to
            // the bit and a member set in code over an envelope name read once.
            Repr::Owned { .. } => serde_json::to_value(self).and_then(T::deserialize),
        };
        result.map_err(|e| {
            Error::poison_msg(
                "InvalidPayload",
                format!(
                    "event {} does not fit {}: {e}",
                    self.id(),
                    std::any::type_name::<T>()
                ),
            )
        })
    }

    /// Encodes the event as JSON. An event decoded and not changed encodes to its original text.
    pub fn to_json(&self) -> String {
        match &self.repr {
            Repr::Raw { text, .. } => text.to_string(),
            // serde_json's encoding, which is UTF-8.
            Repr::Owned { .. } => String::from_utf8(self.to_bytes().to_vec()).unwrap_or_default(),
        }
    }

    /// The event's JSON as a shared buffer: the bytes it was decoded from when unchanged (no
    /// copy), else its encoding, made once and kept until the event changes. What sinks that
    /// publish events send.
    pub fn to_bytes(&self) -> Bytes {
        match &self.repr {
            Repr::Raw { text, .. } => text.as_bytes().clone(),
            Repr::Owned { encoded, .. } => encoded
                .get_or_init(|| Bytes::from(serde_json::to_vec(self).unwrap_or_default()))
                .clone(),
        }
    }

    /// The JSON text this event was decoded from (or written as, when built from one
    /// payload), if it was not changed since.
    pub fn source_text(&self) -> Option<&str> {
        match &self.repr {
            Repr::Raw { text, .. } => Some(text),
            Repr::Owned { .. } => None,
        }
    }

    /// The bytes this event was decoded from (or written as, when built from one payload), if
    /// it was not changed since: a cheap clone of the buffer, for publishing it on without
    /// copying.
    pub fn source_bytes(&self) -> Option<&Bytes> {
        match &self.repr {
            Repr::Raw { text, .. } => Some(text.as_bytes()),
            Repr::Owned { .. } => None,
        }
    }

    /// The encoded size in bytes (exact for decoded events, computed otherwise).
    pub fn encoded_len(&self) -> usize {
        match &self.repr {
            Repr::Raw { text, .. } => text.len(),
            Repr::Owned { .. } => self.to_bytes().len(),
        }
    }

    /// The event as a JSON value.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    fn owned(&mut self) -> (&mut Option<Map<String, Value>>, &mut Map<String, Value>) {
        if let Repr::Raw { .. } = self.repr {
            let tags = self.tags().cloned();
            let fields = self.fields().clone();
            self.id = Text::Owned(self.id().to_owned());
            self.ty = Text::Owned(self.event_type().to_owned());
            self.partition_key = Text::Owned(self.partition_key().to_owned());
            self.repr = Repr::Owned {
                tags,
                fields,
                encoded: OnceLock::new(),
            };
        }
        match &mut self.repr {
            Repr::Owned {
                tags,
                fields,
                encoded,
            } => {
                // About to change: the kept encoding no longer holds.
                encoded.take();
                (tags, fields)
            }
            Repr::Raw { .. } => unreachable!("converted to owned above"),
        }
    }

    /// Compresses each payload field (at any depth) over `threshold` bytes, as
    /// aws-lambda-stream does when it publishes ([`crate::compression`]), but not members
    /// named in `ignore`; how many it compressed. An event no larger than `threshold` is left
    /// untouched (and keeps its source text).
    pub fn compress_fields(&mut self, threshold: usize, ignore: &[&str]) -> usize {
        if self.encoded_len() <= threshold {
            return 0;
        }
        let mut fields = self.fields().clone();
        let compressed = crate::compression::compress_members(&mut fields, threshold, ignore);
        if compressed > 0 {
            *self.owned().1 = fields;
        }
        compressed
    }

    /// The payload fields, to change. The event no longer encodes to its source text.
    pub fn fields_mut(&mut self) -> &mut Map<String, Value> {
        self.owned().1
    }

    /// Sets a tag.
    pub fn set_tag(&mut self, name: impl Into<String>, value: impl Into<Value>) {
        self.owned()
            .0
            .get_or_insert_with(Map::new)
            .insert(name.into(), value.into());
    }

    /// Replaces the event type.
    pub fn set_event_type(&mut self, event_type: impl Into<String>) {
        self.owned();
        self.ty = Text::Owned(event_type.into());
    }

    /// Replaces the id.
    pub fn set_id(&mut self, id: impl Into<String>) {
        self.owned();
        self.id = Text::Owned(id.into());
    }

    /// Replaces the partition key.
    pub fn set_partition_key(&mut self, key: impl Into<String>) {
        self.owned();
        self.partition_key = Text::Owned(key.into());
    }

    /// Replaces the timestamp.
    pub fn set_timestamp(&mut self, millis: i64) {
        self.owned();
        self.timestamp = millis;
    }

    /// Starts a new event derived from this one: its id is a stable hash of this event's id and
    /// the new type (so deriving twice gives the same id), with the same partition key and time.
    ///
    /// One event of a type per event: a step deriving several of one type from one event
    /// (an order's line items, in a [`flat_map`](crate::pipeline::PipelineBuilder::flat_map)) gives each its own
    /// id with [`derive_part`](Self::derive_part).
    pub fn derive(&self, event_type: impl Into<String>) -> EventBuilder {
        let ty = event_type.into();
        let id = stable_id(&[self.id(), &ty]);
        Event::builder(ty, self.partition_key())
            .id(id)
            .timestamp(self.timestamp)
    }

    /// Starts the new event derived from this one for `part` (a line item's id or place): as
    /// [`derive`](Self::derive), with `part` in the stable id, so that each of several events
    /// of one type derived from one event has an id of its own (a hub keeps only the first of
    /// events with one id), and deriving again gives the same ids.
    pub fn derive_part(&self, event_type: impl Into<String>, part: &str) -> EventBuilder {
        let ty = event_type.into();
        let id = stable_id(&[self.id(), &ty, part]);
        Event::builder(ty, self.partition_key())
            .id(id)
            .timestamp(self.timestamp)
    }
}

impl Serialize for Event {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let fields = self.fields();
        let tags = self.tags();
        let mut map =
            serializer.serialize_map(Some(4 + usize::from(tags.is_some()) + fields.len()))?;
        map.serialize_entry("id", self.id())?;
        map.serialize_entry("type", self.event_type())?;
        map.serialize_entry("timestamp", &self.timestamp)?;
        map.serialize_entry("partitionKey", self.partition_key())?;
        if let Some(tags) = tags {
            map.serialize_entry("tags", tags)?;
        }
        for (k, v) in fields {
            // A payload field named as the envelope's (put there through `fields_mut`) would
            // write the key twice: the envelope's wins, as when the event is read.
            if ENVELOPE_FIELDS.contains(&k.as_str()) {
                continue;
            }
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Event::from_value(value).map_err(serde::de::Error::custom)
    }
}

/// Builds an [`Event`] in code.
///
/// ```
/// use floodway::Event;
/// use serde_json::json;
///
/// let event = Event::builder("order-submitted", "o-1")
///     .id("e1")
///     .timestamp(1_700_000_000_000)
///     .tag("source", "web")
///     .field("order", json!({"id": "o-1", "total": 42}))
///     .build();
/// assert_eq!(event.field("order").unwrap()["total"], 42);
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct EventBuilder {
    id: Option<String>,
    ty: String,
    timestamp: Option<i64>,
    partition_key: String,
    tags: Option<Map<String, Value>>,
    fields: Map<String, Value>,
    /// A payload's JSON object, serialized straight from its type, while it is the only
    /// source of fields: the event is then written as text without a `Value` tree.
    payload: Option<Vec<u8>>,
}

impl EventBuilder {
    /// Sets the id (default: a random 128-bit hex id).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets the event time in milliseconds (default: now).
    pub fn timestamp(mut self, millis: i64) -> Self {
        self.timestamp = Some(millis);
        self
    }

    /// Adds a tag.
    pub fn tag(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.tags
            .get_or_insert_with(Map::new)
            .insert(name.into(), value.into());
        self
    }

    /// Adds a payload field. Envelope names (`id`, `type`, ...) are ignored here: use the
    /// builder's own methods for those.
    pub fn field(mut self, name: impl Into<Cow<'static, str>>, value: impl Into<Value>) -> Self {
        let name = name.into();
        if !ENVELOPE_FIELDS.contains(&name.as_ref()) {
            self.payload_into_fields();
            self.fields.insert(name.into_owned(), value.into());
        }
        self
    }

    /// Adds every field of a serializable value (a struct or a map) to the payload.
    ///
    /// The value is serialized straight to JSON. When it is the only source of fields (no
    /// [`field`](Self::field) before or after it, no envelope name among its members), the
    /// event is written from that text as it is built, with no `serde_json::Value` in between:
    /// the way a step deriving an event is fastest.
    ///
    /// # Errors
    /// A poison error when `value` does not serialize to a JSON object.
    pub fn payload<T: Serialize>(mut self, value: &T) -> Result<Self, Error> {
        let not_object = || {
            Error::poison_msg(
                "InvalidPayload",
                "a payload must serialize to a JSON object",
            )
        };
        let map = if self.fields.is_empty() && self.payload.is_none() {
            let mut json = Vec::with_capacity(128);
            // A struct says as it is written whether its members are plain; anything else is
            // written again and read back to tell.
            let plain = match written::structure(value, &mut json) {
                Some(plain) => plain,
                None => {
                    json = serde_json::to_vec(value).map_err(Error::poison)?;
                    match serde_json::from_slice::<PlainObject>(&json) {
                        Ok(PlainObject(plain)) => plain,
                        Err(_) => return Err(not_object()),
                    }
                }
            };
            if plain {
                self.payload = Some(json);
                return Ok(self);
            }
            // Envelope names among its members: they are dropped below.
            serde_json::from_slice(&json).map_err(Error::poison)?
        } else {
            self.payload_into_fields();
            match serde_json::to_value(value).map_err(Error::poison)? {
                Value::Object(map) => map,
                _ => return Err(not_object()),
            }
        };
        for (k, v) in map {
            if !ENVELOPE_FIELDS.contains(&k.as_str()) {
                self.fields.insert(k, v);
            }
        }
        Ok(self)
    }

    /// Moves a payload kept as text into the fields, before another field is set.
    fn payload_into_fields(&mut self) {
        if let Some(json) = self.payload.take() {
            let map: Map<String, Value> = serde_json::from_slice(&json).unwrap_or_default();
            self.fields.extend(map);
        }
    }

    /// Finishes the event.
    pub fn build(self) -> Event {
        let id = self.id.unwrap_or_else(random_id);
        let timestamp = self.timestamp.unwrap_or_else(now_millis);
        let repr = match self.payload {
            Some(payload) => {
                // `{envelope, payload members}`, written once: the event's text from the start.
                let mut out = Vec::with_capacity(payload.len() + id.len() + 96);
                let mut write = |name: &str, value: &dyn erased::Json| {
                    out.push(if out.is_empty() { b'{' } else { b',' });
                    out.push(b'"');
                    out.extend_from_slice(name.as_bytes());
                    out.extend_from_slice(b"\":");
                    value.write(&mut out);
                };
                write("id", &id.as_str());
                write("type", &self.ty.as_str());
                write("timestamp", &timestamp);
                write("partitionKey", &self.partition_key.as_str());
                if let Some(tags) = &self.tags {
                    write("tags", tags);
                }
                if payload.len() > 2 {
                    out.push(b',');
                    out.extend_from_slice(&payload[1..payload.len() - 1]);
                }
                out.push(b'}');
                // Exactly as long as it holds: `Bytes` takes such a buffer as it is, and
                // another one needs a shared header allocated beside it (shrinking in place
                // is cheaper than that allocation and its free).
                out.shrink_to_fit();
                Repr::Raw {
                    // serde_json writes UTF-8, and so does everything else written here.
                    text: ByteString::try_from(out).unwrap_or_default(),
                    has_tags: self.tags.is_some(),
                    // Values set in code are never taken for compressed ones.
                    compressed: Compressed::known(false),
                    tags: self
                        .tags
                        .map(|tags| OnceLock::from(Box::new(tags)))
                        .unwrap_or_default(),
                    fields: OnceLock::new(),
                    members: crate::envelope::Members::UNKNOWN,
                }
            }
            None => Repr::Owned {
                tags: self.tags,
                fields: self.fields,
                encoded: OnceLock::new(),
            },
        };
        Event {
            id: Text::Owned(id),
            ty: Text::Owned(self.ty),
            timestamp,
            partition_key: Text::Owned(self.partition_key),
            repr,
        }
    }
}

/// Whether a JSON text is an object none of whose members has an envelope name (`false`
/// when one has); an error when it is no object.
struct PlainObject(bool);

impl<'de> Deserialize<'de> for PlainObject {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = PlainObject;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<PlainObject, A::Error> {
                let mut plain = true;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    plain &= !ENVELOPE_FIELDS.contains(&key.as_ref());
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
                Ok(PlainObject(plain))
            }
        }
        deserializer.deserialize_map(Members)
    }
}

/// A struct written as JSON, telling as it goes whether it is a plain object.
mod written {
    use serde::ser::{Impossible, Serialize, SerializeStruct, Serializer};

    type Json<'w> = serde_json::Serializer<&'w mut Vec<u8>>;
    type Members<'s, 'w> = <&'s mut Json<'w> as Serializer>::SerializeStruct;
    type Error = serde_json::Error;
    type Never = Impossible<(), Error>;

    /// Writes `value` into `out` when it serializes as a struct, and answers whether none of
    /// its members has an envelope name; `None` for anything else (or an error), which the
    /// caller writes again its own way.
    pub(super) fn structure<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Option<bool> {
        let mut json = serde_json::Serializer::new(out);
        let mut plain = true;
        value
            .serialize(Top {
                json: &mut json,
                plain: &mut plain,
            })
            .ok()?;
        Some(plain)
    }

    struct Top<'s, 'w> {
        json: &'s mut Json<'w>,
        plain: &'s mut bool,
    }

    /// What is not a struct.
    fn other<T>() -> Result<T, Error> {
        Err(serde::ser::Error::custom("not a struct"))
    }

    /// Serializer methods for what is not a struct.
    macro_rules! not_a_struct {
        ($($method:ident($($arg:ty),*) -> $ok:ty;)*) => {$(
            fn $method(self, $(_: $arg),*) -> Result<$ok, Error> {
                other()
            }
        )*};
    }

    struct Fields<'s, 'w> {
        members: Members<'s, 'w>,
        plain: &'s mut bool,
    }

    impl SerializeStruct for Fields<'_, '_> {
        type Ok = ();
        type Error = Error;

        fn serialize_field<T: Serialize + ?Sized>(
            &mut self,
            key: &'static str,
            value: &T,
        ) -> Result<(), Error> {
            *self.plain &= !super::ENVELOPE_FIELDS.contains(&key);
            self.members.serialize_field(key, value)
        }

        fn skip_field(&mut self, key: &'static str) -> Result<(), Error> {
            self.members.skip_field(key)
        }

        fn end(self) -> Result<(), Error> {
            self.members.end()
        }
    }

    impl<'s, 'w> Serializer for Top<'s, 'w> {
        type Ok = ();
        type Error = Error;
        type SerializeSeq = Never;
        type SerializeTuple = Never;
        type SerializeTupleStruct = Never;
        type SerializeTupleVariant = Never;
        type SerializeMap = Never;
        type SerializeStruct = Fields<'s, 'w>;
        type SerializeStructVariant = Never;

        fn serialize_struct(self, name: &'static str, len: usize) -> Result<Fields<'s, 'w>, Error> {
            // serde_json's own types written as structs (`RawValue`, an arbitrary-precision
            // `Number`) stand for other JSON: what they hold is read back instead.
            if name.starts_with("$serde_json::") {
                return other();
            }
            Ok(Fields {
                members: self.json.serialize_struct(name, len)?,
                plain: self.plain,
            })
        }

        // serde_json writes these as what they hold.
        fn serialize_newtype_struct<T: Serialize + ?Sized>(
            self,
            _name: &'static str,
            value: &T,
        ) -> Result<(), Error> {
            value.serialize(self)
        }

        fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Error> {
            value.serialize(self)
        }

        fn serialize_newtype_variant<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: &T,
        ) -> Result<(), Error> {
            other()
        }

        not_a_struct! {
            serialize_bool(bool) -> ();
            serialize_i8(i8) -> ();
            serialize_i16(i16) -> ();
            serialize_i32(i32) -> ();
            serialize_i64(i64) -> ();
            serialize_u8(u8) -> ();
            serialize_u16(u16) -> ();
            serialize_u32(u32) -> ();
            serialize_u64(u64) -> ();
            serialize_f32(f32) -> ();
            serialize_f64(f64) -> ();
            serialize_char(char) -> ();
            serialize_str(&str) -> ();
            serialize_bytes(&[u8]) -> ();
            serialize_none() -> ();
            serialize_unit() -> ();
            serialize_unit_struct(&'static str) -> ();
            serialize_unit_variant(&'static str, u32, &'static str) -> ();
            serialize_seq(Option<usize>) -> Never;
            serialize_tuple(usize) -> Never;
            serialize_tuple_struct(&'static str, usize) -> Never;
            serialize_tuple_variant(&'static str, u32, &'static str, usize) -> Never;
            serialize_map(Option<usize>) -> Never;
            serialize_struct_variant(&'static str, u32, &'static str, usize) -> Never;
        }
    }
}

/// Values written as JSON into a buffer, behind one `dyn` type.
mod erased {
    pub(super) trait Json {
        fn write(&self, out: &mut Vec<u8>);
    }

    impl<T: serde::Serialize + ?Sized> Json for T {
        fn write(&self, out: &mut Vec<u8>) {
            // Writing into a Vec fails only for values JSON cannot hold, which these are not.
            let _ = serde_json::to_writer(out, self);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A payload field put through `fields_mut` under an envelope name is not written: the
    /// event reads back, with its own id.
    #[test]
    fn a_payload_field_named_as_the_envelope_is_not_written_twice() {
        let mut e = Event::builder("t", "k").id("e1").build();
        e.fields_mut().insert("id".into(), "x".into());
        e.fields_mut().insert("n".into(), 1.into());
        let back = Event::decode(&e.to_bytes()).expect("no duplicate key");
        assert_eq!(back.id(), "e1");
        assert_eq!(back.field("n"), Some(&Value::from(1)));
    }
    use serde_json::json;

    const GOOD: &str = r#"{"id":"1","type":"thing-created","timestamp":1600000000000,"partitionKey":"k","tags":{"source":"s"},"thing":{"name":"a\"b","n":[1,2]}}"#;

    #[test]
    fn a_payload_that_does_not_read_is_poison_where_every_field_counts() {
        // Decoding checks the envelope; these values serde_json reads only as ignored ones.
        let mut decoded = 0;
        for payload in [r#""x":1e400"#, r#""x":"\ud800""#] {
            let text = format!(
                r#"{{"id":"1","type":"t","timestamp":1,"partitionKey":"k",{payload},"eem":{{"dataKeys":{{}}}}}}"#
            );
            let Ok(e) = Event::decode(text.as_bytes()) else {
                continue; // refused outright: as good
            };
            decoded += 1;
            assert!(e.fields().is_empty(), "{payload}");
            let err = e.check_payload().unwrap_err();
            assert_eq!(err.class(), crate::ErrorClass::Poison, "{payload}");
            assert!(err.to_string().contains("does not read"), "{err}");
        }
        assert!(decoded > 0, "the case this guards against");
        assert!(Event::decode(GOOD.as_bytes())
            .unwrap()
            .check_payload()
            .is_ok());
        assert!(Event::builder("t", "k").build().check_payload().is_ok());
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Confirmed {
        order: String,
        total: u64,
        note: String,
    }

    #[test]
    fn a_payload_alone_is_written_as_the_events_text() {
        let confirmed = Confirmed {
            order: "o-1".into(),
            total: 42,
            note: format!("{}xyz \"quoted\"", crate::compression::MARKER),
        };
        let e = Event::builder("order-confirmed", "o-1")
            .id("e1")
            .timestamp(7)
            .tag("source", "web")
            .payload(&confirmed)
            .unwrap()
            .build();
        let text = e.to_json();
        assert!(
            text.starts_with(r#"{"id":"e1","type":"order-confirmed","timestamp":7,"partitionKey":"o-1","tags":{"source":"web"},"order":"o-1""#),
            "{text}"
        );
        assert_eq!(e.source_text(), Some(text.as_str()));
        assert_eq!(e.encoded_len(), text.len());
        assert_eq!(e.tag("source"), Some("web"));
        assert_eq!(e.field("total"), Some(&json!(42)));
        // A value set in code that looks compressed is taken as it is.
        assert_eq!(e.payload::<Confirmed>().unwrap(), confirmed);
        assert_eq!(e.field("note").unwrap(), &json!(confirmed.note));
        // The same event as a tree of fields encodes to the same members.
        let tree = Event::builder("order-confirmed", "o-1")
            .id("e1")
            .timestamp(7)
            .tag("source", "web")
            .field("order", "o-1")
            .field("total", 42)
            .field("note", confirmed.note.clone())
            .build();
        assert_eq!(e.to_value(), tree.to_value());
        let decoded = Event::decode(text.as_bytes()).unwrap();
        assert_eq!(decoded.to_value(), tree.to_value());
        // An empty payload.
        let empty = Event::builder("t", "k")
            .id("x")
            .timestamp(1)
            .payload(&json!({}))
            .unwrap()
            .build();
        assert_eq!(
            empty.to_json(),
            r#"{"id":"x","type":"t","timestamp":1,"partitionKey":"k"}"#
        );
    }

    #[test]
    fn a_payload_mixed_with_fields_or_envelope_names_keeps_the_rules() {
        // Envelope names in a payload are ignored.
        let e = Event::builder("t", "k")
            .id("real")
            .payload(&json!({ "id": "fake", "type": "fake", "a": 1 }))
            .unwrap()
            .build();
        assert_eq!((e.id(), e.event_type()), ("real", "t"));
        assert_eq!(e.fields(), json!({ "a": 1 }).as_object().unwrap());
        // A field after the payload joins it, and wins over a member of the same name.
        let e = Event::builder("t", "k")
            .payload(&json!({ "a": 1, "b": 2 }))
            .unwrap()
            .field("b", 3)
            .field("c", 4)
            .build();
        assert_eq!(
            e.fields(),
            json!({ "a": 1, "b": 3, "c": 4 }).as_object().unwrap()
        );
        // A payload after a field joins it, and wins.
        let e = Event::builder("t", "k")
            .field("b", 3)
            .payload(&json!({ "a": 1, "b": 2 }))
            .unwrap()
            .build();
        assert_eq!(e.fields(), json!({ "a": 1, "b": 2 }).as_object().unwrap());
        // Two payloads.
        let e = Event::builder("t", "k")
            .payload(&json!({ "a": 1 }))
            .unwrap()
            .payload(&json!({ "b": 2 }))
            .unwrap()
            .build();
        assert_eq!(e.fields(), json!({ "a": 1, "b": 2 }).as_object().unwrap());
        // What is no object is refused, before or after other fields.
        for builder in [
            Event::builder("t", "k"),
            Event::builder("t", "k").field("a", 1),
        ] {
            let err = builder.payload(&5).unwrap_err();
            assert!(err.to_string().contains("JSON object"), "{err}");
        }
    }

    #[test]
    fn a_payload_of_any_shape_gives_the_event_its_tree_gives() {
        #[derive(Serialize)]
        struct Plain {
            a: u32,
            b: Option<&'static str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            c: Option<u32>,
        }
        #[derive(Serialize)]
        struct Enveloped {
            id: &'static str,
            a: u32,
        }
        #[derive(Serialize)]
        struct Newtype(Plain);
        #[derive(Serialize)]
        struct Flattened {
            #[serde(flatten)]
            inner: Plain,
            d: u32,
        }
        #[derive(Serialize)]
        enum Variant {
            V { a: u32 },
        }
        let plain = || Plain {
            a: 1,
            b: None,
            c: None,
        };
        let raw = |text: &str| RawValue::from_string(text.to_owned()).unwrap();
        /// The event from `value`, and from its JSON tree.
        fn both<T: Serialize>(value: &T) -> (Result<String, Error>, Result<String, Error>) {
            let event = |e: Result<EventBuilder, Error>| e.map(|b| b.build().to_json());
            let tree = serde_json::to_value(value).unwrap();
            (
                event(Event::builder("t", "k").id("i").timestamp(0).payload(value)),
                event(Event::builder("t", "k").id("i").timestamp(0).payload(&tree)),
            )
        }
        for (ours, tree) in [
            both(&plain()),
            both(&Enveloped { id: "fake", a: 2 }),
            both(&Newtype(plain())),
            both(&Some(plain())),
            both(&Flattened {
                inner: plain(),
                d: 4,
            }),
            both(&Variant::V { a: 5 }),
            both(&std::collections::BTreeMap::from([("a", 1), ("type", 2)])),
            both(&raw(r#"{"id":"fake","a":1}"#)),
            both(&raw(r#"{"a":[1]}"#)),
        ] {
            assert_eq!(ours.unwrap(), tree.unwrap());
        }
        let (ours, _) = both(&plain());
        assert_eq!(
            ours.unwrap(),
            r#"{"id":"i","type":"t","timestamp":0,"partitionKey":"k","a":1,"b":null}"#
        );
        for refused in [
            both(&None::<Plain>),
            both(&[1, 2]),
            both(&"text"),
            both(&raw("[1,2]")),
            both(&raw("5")),
        ] {
            assert!(refused.0.is_err() && refused.1.is_err());
        }
    }

    #[test]
    fn a_typed_read_borrows_strings_from_the_event() {
        #[derive(Deserialize)]
        struct Read<'a> {
            #[serde(borrow)]
            thing: Thing<'a>,
        }
        #[derive(Deserialize)]
        struct Thing<'a> {
            #[serde(borrow)]
            name: Cow<'a, str>,
            #[serde(borrow)]
            plain: Cow<'a, str>,
        }
        let text = r#"{"id":"1","type":"t","timestamp":1,"partitionKey":"k","thing":{"name":"a\"b","n":[1],"plain":"p"}}"#;
        let borrowed = |cow: &Cow<'_, str>| matches!(cow, Cow::Borrowed(_));
        // Decoded: borrowed from the text where there is no escape.
        let decoded = Event::decode(text.as_bytes()).unwrap();
        let read: Read<'_> = decoded.payload().unwrap();
        assert_eq!(
            (read.thing.name.as_ref(), read.thing.plain.as_ref()),
            ("a\"b", "p")
        );
        assert!(!borrowed(&read.thing.name) && borrowed(&read.thing.plain));
        // Changed in code: read from its tree, owned, floats to the bit.
        let mut changed = decoded.clone();
        changed.set_tag("n", 1);
        let read: Read<'_> = changed.payload().unwrap();
        assert_eq!(
            (read.thing.name.as_ref(), read.thing.plain.as_ref()),
            ("a\"b", "p")
        );
        assert!(!borrowed(&read.thing.plain));
        let float = 51.248_178_375_505_404_f64;
        let built = Event::builder("t", "k").field("x", float).build();
        #[derive(Deserialize)]
        struct X {
            x: f64,
        }
        assert_eq!(built.payload::<X>().unwrap().x.to_bits(), float.to_bits());
        // Compressed: read from the revived tree, owned.
        let mut compressed = Event::builder("t", "k")
            .field("thing", json!({"name": "a\"b", "plain": "p".repeat(500)}))
            .build();
        assert_eq!(compressed.compress_fields(100, &[]), 1);
        let compressed = Event::decode(compressed.to_json().as_bytes()).unwrap();
        let read: Read<'_> = compressed.payload().unwrap();
        assert_eq!(read.thing.plain, "p".repeat(500));
        assert!(!borrowed(&read.thing.plain));
        // A plain `&str` cannot hold a string written with escapes: the event does not fit.
        #[derive(Debug, Deserialize)]
        struct Strict<'a> {
            #[allow(dead_code)]
            #[serde(borrow)]
            thing: StrictThing<'a>,
        }
        #[derive(Debug, Deserialize)]
        struct StrictThing<'a> {
            #[allow(dead_code)]
            name: &'a str,
        }
        let err = decoded.payload::<Strict<'_>>().unwrap_err();
        assert_eq!(err.name(), "InvalidPayload");
    }

    #[test]
    fn decodes_envelope_and_keeps_payload() {
        let e = Event::decode(GOOD.as_bytes()).unwrap();
        assert_eq!(e.id(), "1");
        assert_eq!(e.timestamp(), 1_600_000_000_000);
        assert_eq!(e.tag("source"), Some("s"));
        assert_eq!(e.field("thing").unwrap()["name"], "a\"b");
        assert_eq!(e.fields().len(), 1);
        assert_eq!(e.to_json(), GOOD);
    }

    #[test]
    fn changed_events_round_trip_in_meaning() {
        let mut e = Event::decode(GOOD.as_bytes()).unwrap();
        e.set_tag("pipeline", "p1");
        let back = Event::decode(e.to_json().as_bytes()).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.tag("pipeline"), Some("p1"));
        assert_eq!(back.field("thing"), Some(&json!({"name":"a\"b","n":[1,2]})));
        let original: Value = serde_json::from_str(GOOD).unwrap();
        let mut expected = original.clone();
        expected["tags"]["pipeline"] = json!("p1");
        assert_eq!(e.to_value(), expected);
    }

    #[test]
    fn escaped_strings_are_unescaped() {
        let e = Event::decode(br#"{"id":"a\u0041","type":"t","timestamp":1,"partitionKey":"k\n"}"#)
            .unwrap();
        assert_eq!(e.id(), "aA");
        assert_eq!(e.partition_key(), "k\n");
        assert!(e.tags().is_none());
    }

    #[test]
    fn an_empty_partition_key_is_read_as_it_is() {
        // The fast path takes non-empty strings only; the rest is read the long way.
        let e = Event::decode(br#"{"id":"1","type":"t","timestamp":1,"partitionKey":""}"#).unwrap();
        assert_eq!(e.partition_key(), "");
        let e =
            Event::decode(br#"{"id":"1","type":"t","timestamp":1,"partitionKey":"k"}"#).unwrap();
        assert_eq!((e.id(), e.event_type(), e.partition_key()), ("1", "t", "k"));
        assert_eq!(
            Event::decode(br#"{"id":"1","type":"t","timestamp":1,"partitionKey":null}"#)
                .unwrap_err(),
            DecodeEventError::MissingField {
                field: "partitionKey"
            }
        );
    }

    #[test]
    fn bad_input_is_a_precise_error() {
        let cases: &[(&[u8], DecodeEventError)] = &[
            (b"\xff\xfe", DecodeEventError::NotUtf8 { valid_up_to: 0 }),
            (
                b"{\"id\":\"a\xc3\"}",
                DecodeEventError::NotUtf8 { valid_up_to: 8 },
            ),
            (b"[1,2]", DecodeEventError::NotObject),
            (b"\"x\"", DecodeEventError::NotObject),
            (
                br#"{"type":"t","timestamp":1,"partitionKey":"k"}"#,
                DecodeEventError::MissingField { field: "id" },
            ),
            (
                br#"{"id":"1","type":"t","partitionKey":"k"}"#,
                DecodeEventError::MissingField { field: "timestamp" },
            ),
            (
                br#"{"id":"1","type":"t","timestamp":1}"#,
                DecodeEventError::MissingField {
                    field: "partitionKey",
                },
            ),
            (
                br#"{"id":7,"type":"t","timestamp":1,"partitionKey":"k"}"#,
                DecodeEventError::InvalidField {
                    field: "id",
                    expected: "a string",
                    found: "7".into(),
                },
            ),
            (
                br#"{"id":"1","type":"","timestamp":1,"partitionKey":"k"}"#,
                DecodeEventError::InvalidField {
                    field: "type",
                    expected: "a non-empty string",
                    found: "\"\"".into(),
                },
            ),
            (
                br#"{"id":"1","type":"t","timestamp":"yesterday","partitionKey":"k"}"#,
                DecodeEventError::InvalidField {
                    field: "timestamp",
                    expected: "an integer number of milliseconds since the Unix epoch",
                    found: "\"yesterday\"".into(),
                },
            ),
            (
                br#"{"id":"1","type":"t","timestamp":1,"partitionKey":"k","tags":[]}"#,
                DecodeEventError::InvalidField {
                    field: "tags",
                    expected: "an object",
                    found: "[]".into(),
                },
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(&Event::decode(input).unwrap_err(), expected, "{input:?}");
        }
        match Event::decode(br#"{"id":"1","type""#).unwrap_err() {
            DecodeEventError::NotJson {
                line: 1, column, ..
            } => assert!(column > 10),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            Event::decode_with_limit(GOOD.as_bytes(), 10).unwrap_err(),
            DecodeEventError::TooLarge {
                size: GOOD.len(),
                limit: 10
            }
        );
    }

    #[test]
    fn float_timestamps_from_javascript_are_accepted_when_whole() {
        let e = Event::decode(br#"{"id":"1","type":"t","timestamp":1.6e12,"partitionKey":"k"}"#)
            .unwrap();
        assert_eq!(e.timestamp(), 1_600_000_000_000);
        assert!(
            Event::decode(br#"{"id":"1","type":"t","timestamp":1.5,"partitionKey":"k"}"#).is_err()
        );
    }

    #[test]
    fn builder_and_serde_agree() {
        let e = Event::builder("a-b", "k")
            .id("x")
            .timestamp(5)
            .field("v", 1)
            .field("id", "ignored")
            .build();
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(
            text,
            r#"{"id":"x","type":"a-b","timestamp":5,"partitionKey":"k","v":1}"#
        );
        let back: Event = serde_json::from_str(&text).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn derived_ids_are_stable() {
        let e = Event::decode(GOOD.as_bytes()).unwrap();
        let a = e.derive("thing-notified").build();
        let b = e.derive("thing-notified").build();
        assert_eq!(a.id(), b.id());
        assert_ne!(a.id(), e.derive("other").build().id());
        assert_eq!(a.partition_key(), "k");
        let one = e.derive_part("line-shipped", "1").build();
        assert_eq!(one.id(), e.derive_part("line-shipped", "1").build().id());
        assert_ne!(one.id(), e.derive_part("line-shipped", "2").build().id());
        assert_ne!(one.id(), e.derive("line-shipped").build().id());
        // The parts are hashed apart: ("a", "b1") is not ("ab", "1").
        assert_ne!(
            e.derive_part("a", "b1").build().id(),
            e.derive_part("ab", "1").build().id()
        );
    }

    #[test]
    fn a_built_event_is_encoded_once_and_again_after_each_change() {
        let mut e = Event::builder("t", "k")
            .id("e1")
            .timestamp(1)
            .field("n", 1)
            .build();
        let first = e.to_bytes();
        // Kept: the same buffer, not a second encoding.
        assert_eq!(first.as_ptr(), e.to_bytes().as_ptr());
        assert_eq!(e.encoded_len(), first.len());
        e.fields_mut().insert("n".into(), 2.into());
        assert_eq!(e.field("n"), Some(&Value::from(2)));
        assert!(e.to_json().contains(r#""n":2"#), "{}", e.to_json());
        e.set_event_type("u");
        assert!(e.to_json().contains(r#""type":"u""#));
        assert_eq!(Event::decode(&e.to_bytes()).unwrap(), e);
        // A decoded event hands out its source bytes.
        let decoded = Event::decode_bytes(first.clone(), 1 << 20).unwrap();
        assert_eq!(decoded.to_bytes().as_ptr(), first.as_ptr());
    }

    #[test]
    fn json_at_agrees_with_a_lookup_in_the_parsed_event() {
        let text = r#"{"id":"1","type":"t","timestamp":1,"partitionKey":"k",
            "order":{"id":"o-1","lines":[{"sku":"a","n":[1,2,{"x":null}]},{"sku":"b"}],
                     "a/b":{"c~d":"slash and tilde"},"esc\"aped":"\u00e9t\u00e9","empty":{},
                     "twice":{"x":1},"twice":{"y":2}},
            "n":3.5,"flag":true,"dup":1,"dup":{"z":2},"s/l~":4}"#;
        let event = Event::decode(text.as_bytes()).unwrap();
        let parsed: Value = serde_json::from_str(text).unwrap();
        for pointer in [
            "",
            "/order",
            "/order/id",
            "/order/lines/0/sku",
            "/order/lines/1/sku",
            "/order/lines/0/n/2/x",
            "/order/lines/0/n/1",
            "/order/lines/01",
            "/order/lines/+1",
            "/order/twice/x",
            "/order/twice/y",
            "/order/lines/2",
            "/order/lines/x",
            "/order/a~1b/c~0d",
            "/order/esc\"aped",
            "/order/empty",
            "/order/empty/x",
            "/order/id/deeper",
            "/n",
            "/n/0",
            "/flag",
            "/missing",
            "/partitionKey",
            "/dup",
            "/dup/z",
            "/s~1l~0",
            "/",
        ] {
            let ours = event
                .json_at(pointer)
                .map(|t| serde_json::from_str::<Value>(&t).unwrap());
            assert_eq!(ours.as_ref(), parsed.pointer(pointer), "{pointer}");
        }
        // A repeated name is walked as serde_json reads the text, each in turn: an earlier one
        // it cannot read (a key that is a lone surrogate) spoils the answer, as before.
        let twice = Event::decode(
            br#"{"id":"1","type":"t","timestamp":1,"partitionKey":"k","w":{"\ud800":1},"w":{"b":2}}"#,
        )
        .unwrap();
        assert_eq!(twice.json_at("/w/b"), None);
        // A value serde_json cannot read on the path spoils it the same way.
        for earlier in ["1e400", r#""\ud800""#] {
            let text = format!(
                r#"{{"id":"1","type":"t","timestamp":1,"partitionKey":"k","o":{{"a":{earlier},"a":{{"b":1}}}}}}"#
            );
            let event = Event::decode(text.as_bytes()).unwrap();
            assert_eq!(event.json_at("/o/a/b"), None, "{earlier}");
        }
    }

    /// JSON text of some depth whose keys repeat and look like indexes, white space between
    /// the tokens, a string with escapes among the values.
    fn nested() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just("null".to_owned()),
            Just("\"q\\\"u]}\"".to_owned()),
            (-3i64..30).prop_map(|n| n.to_string()),
            Just("[ ]".to_owned()),
            Just("{ }".to_owned()),
        ];
        // Mostly plain keys, so that names repeat; now and then one the scanner leaves alone.
        let key = prop::sample::select(vec![
            "\"a\"",
            "\"a\"",
            "\"0\"",
            "\"0\"",
            "\"b\"",
            "\"a\\u0062\"",
        ]);
        leaf.prop_recursive(4, 24, 4, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|items| format!("[ {} ]", items.join(" , "))),
                prop::collection::vec((key.clone(), inner), 0..4).prop_map(|members| {
                    let members: Vec<String> = members
                        .into_iter()
                        .map(|(k, v)| format!("{k} : {v}"))
                        .collect();
                    format!("{{{}}}", members.join(","))
                }),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1024))]
        #[test]
        fn json_at_finds_what_serde_json_finds(
            body in nested(),
            tokens in proptest::collection::vec(
                proptest::sample::select(vec!["a", "b", "0", "1", "01", "+1"]), 1..4),
        ) {
            let text = format!(
                r#"{{"id":"1","type":"t","timestamp":1,"partitionKey":"k","a":{body},"b":[{body}]}}"#
            );
            let event = Event::decode(text.as_bytes()).unwrap();
            let pointer = format!("/{}", tokens.join("/"));
            let tokens: Vec<Cow<'_, str>> = tokens.iter().map(|t| Cow::Borrowed(*t)).collect();
            let mut de = serde_json::Deserializer::from_str(&text);
            let expected = serde::de::DeserializeSeed::deserialize(At { tokens: &tokens }, &mut de)
                .ok()
                .flatten()
                .map(RawValue::get);
            let found = event.json_at(&pointer);
            proptest::prop_assert_eq!(found.as_deref(), expected, "{}", pointer);
        }
    }

    #[test]
    fn json_at_hands_out_a_members_text_as_written() {
        // Each has at most twelve members, so decoding notes where they are.
        for text in [
            r#"{"id":"1","type":"t","timestamp":1,"partitionKey":"k" ,
            "s" : "q\"u\\o]}te\u005d" , "n":-1.5e3,"m":0 ,"t":true,"f":false,"z":null,"w":"x"
            }"#,
            r#"{"id":"1","type":"t","timestamp":1,"partitionKey":"k",
            "o":{ "a":[1,{"b":"]}"}] , "c":"{" } ,"a":[ ],"e":{} ,"l":[[],[{}]]}"#,
        ] {
            let event = Event::decode(text.as_bytes()).unwrap();
            assert!(
                matches!(&event.repr, Repr::Raw { text, members, .. }
                    if crate::envelope::member(text, members, "id").is_some()),
                "the places are known"
            );
            let written: std::collections::HashMap<String, &RawValue> =
                serde_json::from_str(text).unwrap();
            for (name, raw) in &written {
                assert_eq!(
                    event.json_at(&format!("/{name}")).as_deref(),
                    Some(raw.get()),
                    "{name}"
                );
            }
        }
    }
}
