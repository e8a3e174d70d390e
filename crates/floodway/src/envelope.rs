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
//!
//! The scanner also notes where each top-level member starts ([`Members`]), so that a typed
//! read of the event ([`payload`], [`member`]) goes to the members it wants without walking the
//! text again. The same kind of property holds there: **when the member-by-member read
//! answers, serde_json reading the whole text gives the same answer**; anything else is left
//! to serde_json.
//!
//! Within a member the text is known to be JSON, so the read walks nested structs and arrays
//! itself ([`Checked`]): a member the type does not take (an order's items, its address) is
//! skipped by counting brackets, without being parsed again, and serde_json reads only the
//! values the type takes (and maps, whose keys it reads as the map's key type asks). Any error
//! in the read, even one a visitor passes over, leaves the whole text to serde_json: after an
//! error serde_json stands wherever its parse stopped, which this reader cannot follow. A
//! property test holds this to serde_json on generated values of nested structs, enums of each
//! representation, flattened and strict structs, with unknown members put into every object.
use std::cell::Cell;

use serde::de::{Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
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

/// The most top-level members whose places an event keeps.
const MAX_MEMBERS: usize = 12;

/// The deepest nesting of containers in a member the scanner answers for. serde_json reads
/// at most 127 containers deep, and the event's object is one of them: a member read on its
/// own ([`payload`]) must not get the level the object would have taken. Deeper members send
/// the text to serde_json (which skips what it does not read at any depth).
const MEMBER_DEPTH: u32 = 126;

/// The most containers nested in members whose places an event keeps.
const MAX_SPANS: usize = 8;

/// Where the keys of an event's top-level members start (their opening quotes), noted as the
/// scanner read the envelope, so that the payload is read without scanning the text again
/// ([`payload`]). Unknown for a text the scanner did not answer for, one of more than
/// `MAX_MEMBERS` members, or one with a member starting past its first 64 KiB (the places are
/// kept small: an event carries them).
///
/// Also where the first containers nested in the members' values end (an order's items, its
/// address), so that a typed read passes over one it does not take at once instead of
/// counting its brackets ([`scan::skip_checked`]): up to `MAX_SPANS`, in the order they
/// close, those ending within the first 64 KiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Members {
    starts: [u16; MAX_MEMBERS],
    /// How many of `starts` hold a place; `UNKNOWN` when they are not known.
    len: u8,
    /// How many of `spans` hold a container.
    spans_len: u8,
    /// Where a nested container starts (its opening bracket), and the position after it.
    spans: [(u16, u16); MAX_SPANS],
}

const UNKNOWN: u8 = u8::MAX;

impl Members {
    pub(crate) const UNKNOWN: Members = Members {
        starts: [0; MAX_MEMBERS],
        len: UNKNOWN,
        spans_len: 0,
        spans: [(0, 0); MAX_SPANS],
    };

    const NONE: Members = Members {
        starts: [0; MAX_MEMBERS],
        len: 0,
        spans_len: 0,
        spans: [(0, 0); MAX_SPANS],
    };

    fn push(&mut self, at: usize) {
        if self.len == UNKNOWN {
            return;
        }
        match u16::try_from(at) {
            Ok(at) if usize::from(self.len) < MAX_MEMBERS => {
                self.starts[usize::from(self.len)] = at;
                self.len += 1;
            }
            _ => *self = Members::UNKNOWN,
        }
    }

    fn known(&self) -> Option<&[u16]> {
        (self.len != UNKNOWN).then(|| &self.starts[..usize::from(self.len)])
    }

    /// Notes the nested container from `start` to `end`, if there is room for it.
    fn span(&mut self, start: usize, end: usize) {
        let (Ok(start), Ok(end)) = (u16::try_from(start), u16::try_from(end)) else {
            return;
        };
        if let Some(slot) = self.spans.get_mut(usize::from(self.spans_len)) {
            *slot = (start, end);
            self.spans_len += 1;
        }
    }

    fn spans(&self) -> &[(u16, u16)] {
        &self.spans[..usize::from(self.spans_len)]
    }
}

/// The position after the container starting at `at`, when `spans` holds it.
#[inline]
fn span_end(spans: &[(u16, u16)], at: usize) -> Option<usize> {
    let at = u16::try_from(at).ok()?;
    spans
        .iter()
        .find(|&&(start, _)| start == at)
        .map(|&(_, end)| usize::from(end))
}

/// The envelope of `text`, and where its members are when the scanner answered: from the
/// scanner when it answers, else from serde_json, which decides and words the error.
pub(crate) fn read(text: &str) -> serde_json::Result<(Envelope<'_>, Members)> {
    match indexed(text) {
        Some(found) => Ok(found),
        None => with_serde(text).map(|env| (env, Members::UNKNOWN)),
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

/// The envelope of `text` and where its members are, when it is a JSON object the scanner
/// accepts (see the module docs).
fn indexed(text: &str) -> Option<(Envelope<'_>, Members)> {
    let b = text.as_bytes();
    let mut env = Envelope::default();
    let mut members = Members::NONE;
    let end = scan::object(b, scan::ws(b, 0), |key, start| {
        // The key is a slice of the text just after its opening quote.
        members.push(key.as_ptr() as usize - b.as_ptr() as usize - 1);
        let end = scan::skip_value_noting(b, start, MEMBER_DEPTH, |depth, start, end| {
            // The member's own value is passed over through `starts`.
            if depth > 1 {
                members.span(start, end);
            }
        })?;
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
    (scan::ws(b, end) == b.len()).then_some((env, members))
}

/// `T` read from an event's `text` member by member, `members` saying where each starts (the
/// scanner checked the whole text as it found them): a member `T` does not take is passed over
/// without a look, and serde_json reads the others where they start. `None` when this does not
/// give a `T`, for the caller to read the whole text with serde_json, which gives the same `T`
/// or words the error.
pub(crate) fn payload<'t, T: Deserialize<'t>>(text: &'t str, members: &'t Members) -> Option<T> {
    let starts = members.known()?;
    let failed = Cell::new(false);
    let value = T::deserialize(Object {
        text,
        starts,
        spans: members.spans(),
        failed: &failed,
    })
    .ok()?;
    // A visitor may pass over an error and go on: serde_json would then stand elsewhere in
    // the text than this reader, so any error leaves the whole text to serde_json.
    (!failed.get()).then_some(value)
}

/// Where the value of the top-level member `name` starts, `Some(None)` when there is none;
/// `None` when the members are not known, or when `name` is there more than once (serde_json
/// then reads each in turn, and the caller leaves it to do so).
pub(crate) fn member(text: &str, members: &Members, name: &str) -> Option<Option<usize>> {
    let b = text.as_bytes();
    let mut found = None;
    for &at in members.known()? {
        let (key, after) = scan::plain_string(b, usize::from(at))?;
        if key == name.as_bytes() {
            if found.is_some() {
                return None;
            }
            found = Some(scan::ws(b, scan::ws(b, after) + 1));
        }
    }
    Some(found)
}

/// Refused: the caller reads the text with serde_json, which answers or words the error.
fn refused<T>() -> serde_json::Result<T> {
    Err(serde::de::Error::custom("left to serde_json"))
}

/// The event's object, read through `starts`. It answers as serde_json does for an object:
/// a map for `any`, `map` and `struct`, `Some` for an option; anything else (a newtype, which
/// serde_json may give a meaning of its own such as `RawValue`, an enum, a sequence) is
/// refused.
struct Object<'t, 'f> {
    text: &'t str,
    starts: &'t [u16],
    spans: &'t [(u16, u16)],
    failed: &'f Cell<bool>,
}

impl<'de> Object<'de, '_> {
    /// Visits the members as a map; refused unless the visitor read every member whole, as
    /// serde_json expects the object's end once the visitor returns.
    fn visit<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
        let mut walk = Walk {
            text: self.text,
            starts: self.starts.iter(),
            spans: self.spans,
            value: None,
            failed: self.failed,
        };
        let value = visitor.visit_map(&mut walk)?;
        if walk.starts.len() > 0 || walk.value.is_some() || self.failed.get() {
            return refused();
        }
        Ok(value)
    }
}

macro_rules! refuse {
    ($($method:ident($($arg:ident: $ty:ty),*))*) => {$(
        fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* _visitor: V) -> serde_json::Result<V::Value> {
            $(let _ = $arg;)*
            refused()
        }
    )*};
}

impl<'de> Deserializer<'de> for Object<'de, '_> {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
        self.visit(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
        self.visit(visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> serde_json::Result<V::Value> {
        self.visit(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
        visitor.visit_some(self)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
        visitor.visit_unit()
    }

    refuse! {
        deserialize_bool() deserialize_i8() deserialize_i16() deserialize_i32()
        deserialize_i64() deserialize_i128() deserialize_u8() deserialize_u16()
        deserialize_u32() deserialize_u64() deserialize_u128() deserialize_f32()
        deserialize_f64() deserialize_char() deserialize_str() deserialize_string()
        deserialize_bytes() deserialize_byte_buf() deserialize_unit() deserialize_seq()
        deserialize_identifier()
        deserialize_unit_struct(name: &'static str)
        deserialize_newtype_struct(name: &'static str)
        deserialize_tuple(len: usize)
        deserialize_tuple_struct(name: &'static str, len: usize)
        deserialize_enum(name: &'static str, variants: &'static [&'static str])
    }
}

/// The members of an [`Object`], in the order of the text.
struct Walk<'t, 'f> {
    text: &'t str,
    starts: std::slice::Iter<'t, u16>,
    /// As [`Members::spans`].
    spans: &'t [(u16, u16)],
    /// Where the value of the member whose key was last given starts, until it is read.
    value: Option<usize>,
    /// Set by any error in the read, which then ends every walk (a visitor that passes over
    /// the error sees the end) and leaves the text to serde_json.
    failed: &'f Cell<bool>,
}

/// Notes an error in `failed`, and passes it on.
fn noted<T>(result: serde_json::Result<T>, failed: &Cell<bool>) -> serde_json::Result<T> {
    if result.is_err() {
        failed.set(true);
    }
    result
}

impl<'de> MapAccess<'de> for Walk<'de, '_> {
    type Error = serde_json::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> serde_json::Result<Option<K::Value>> {
        if self.failed.get() {
            return Ok(None);
        }
        if self.value.is_some() {
            // A key asked for before the last one's value was read.
            return noted(refused(), self.failed);
        }
        let Some(&at) = self.starts.next() else {
            return Ok(None);
        };
        let b = self.text.as_bytes();
        let at = usize::from(at);
        // The scanner took only keys without escapes.
        let Some((key, after)) = scan::plain_string(b, at) else {
            return noted(refused(), self.failed);
        };
        let key = &self.text[at + 1..at + 1 + key.len()];
        self.value = Some(scan::ws(b, scan::ws(b, after) + 1));
        let key = seed.deserialize(serde::de::value::BorrowedStrDeserializer::new(key));
        noted(key, self.failed).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> serde_json::Result<V::Value> {
        let Some(value) = self.value.take() else {
            return noted(refused(), self.failed);
        };
        let value = seed.deserialize(Checked {
            text: self.text,
            spans: self.spans,
            at: value,
            end: None,
            failed: self.failed,
        });
        noted(value, self.failed)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.starts.len())
    }
}

/// A value of a text the scanner has accepted, at `at`. Objects and arrays are walked here, so
/// that a member the type does not take is skipped without being parsed again
/// ([`scan::skip_checked`]). A string with no escapes and an integer with no sign, fraction or
/// exponent are read here too, as serde_json reads them; everything else is read by
/// serde_json, from the value's start (it stops at the value's end). A value read here says
/// where it ends in `end`, which saves the container that holds it from skipping the value
/// again.
struct Checked<'t, 'e> {
    text: &'t str,
    /// As [`Members::spans`].
    spans: &'t [(u16, u16)],
    at: usize,
    end: Option<&'e Cell<Option<usize>>>,
    failed: &'e Cell<bool>,
}

impl<'de> Checked<'de, '_> {
    fn first(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    /// The value at `at` when it is a string with no escapes nor control characters (serde_json
    /// gives such a string to the visitor borrowed), and the position after it.
    #[inline]
    fn plain_str(&self) -> Option<(&'de str, usize)> {
        let (content, after) = scan::plain_string(self.text.as_bytes(), self.at)?;
        let start = self.at + 1;
        Some((&self.text[start..start + content.len()], after))
    }

    /// The value at `at` when it is an integer of at most 19 digits with no sign, fraction or
    /// exponent (serde_json gives such a number to the visitor as a `u64`, whatever type is
    /// asked for), and the position after it.
    #[inline]
    fn plain_u64(&self) -> Option<(u64, usize)> {
        let b = self.text.as_bytes();
        let mut n = 0u64;
        let mut i = self.at;
        while let Some(&c @ b'0'..=b'9') = b.get(i) {
            // Wraps past 19 digits, where the number goes to serde_json instead.
            n = n.wrapping_mul(10).wrapping_add(u64::from(c - b'0'));
            i += 1;
        }
        let digits = i - self.at;
        let integer = (1..=19).contains(&digits) && !matches!(b.get(i), Some(b'.' | b'e' | b'E'));
        integer.then_some((n, i))
    }

    /// A value read here, without serde_json: the container holding it learns where it ends
    /// rather than skipping it again.
    #[inline]
    fn read_here<T>(&self, value: serde_json::Result<T>, end: usize) -> serde_json::Result<T> {
        if let Some(cell) = self.end {
            cell.set(Some(end));
        }
        noted(value, self.failed)
    }

    /// Has serde_json read the value, noting an error (a visitor may pass over it).
    fn by_serde_json<T>(
        &self,
        read: impl FnOnce(
            &mut serde_json::Deserializer<serde_json::de::StrRead<'de>>,
        ) -> serde_json::Result<T>,
    ) -> serde_json::Result<T> {
        let read = read(&mut serde_json::Deserializer::from_str(
            &self.text[self.at..],
        ));
        noted(read, self.failed)
    }

    /// Walks the object at `at` (its members are given to the visitor in turn), or the array.
    fn walk<V: Visitor<'de>>(self, visitor: V, object: bool) -> serde_json::Result<V::Value> {
        let mut walk = Items {
            text: self.text,
            spans: self.spans,
            at: self.at + 1,
            close: if object { b'}' } else { b']' },
            started: false,
            value: None,
            end: None,
            failed: self.failed,
        };
        let value = noted(
            if object {
                visitor.visit_map(&mut walk)
            } else {
                visitor.visit_seq(&mut walk)
            },
            self.failed,
        )?;
        if self.failed.get() {
            return refused();
        }
        // serde_json wants the container's end once the visitor returns.
        let end = match walk.end {
            Some(end) => end,
            None if walk.value.is_none() => {
                let i = scan::ws(self.text.as_bytes(), walk.at);
                if self.text.as_bytes().get(i) != Some(&walk.close) {
                    return refused();
                }
                i + 1
            }
            None => return refused(),
        };
        if let Some(cell) = self.end {
            cell.set(Some(end));
        }
        Ok(value)
    }
}

/// Values read here when `$plain` finds one of its kind (given to the visitor with `$visit`,
/// as serde_json gives it), the rest by serde_json.
macro_rules! read_here_or_by_serde_json {
    ($plain:ident => $visit:ident: $($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
            match self.$plain() {
                Some((value, end)) => self.read_here(visitor.$visit(value), end),
                None => self.by_serde_json(|de| de.$method(visitor)),
            }
        }
    )*};
}

macro_rules! by_serde_json {
    ($($method:ident($($arg:ident: $ty:ty),*))*) => {$(
        fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> serde_json::Result<V::Value> {
            self.by_serde_json(|de| de.$method($($arg,)* visitor))
        }
    )*};
}

impl<'de> Deserializer<'de> for Checked<'de, '_> {
    type Error = serde_json::Error;

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
        visitor.visit_unit()
    }

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
        match self.first() {
            Some(b'{') => self.walk(visitor, true),
            Some(b'[') => self.walk(visitor, false),
            _ => self.by_serde_json(|de| de.deserialize_any(visitor)),
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
        // A map takes every member, so walking it would save nothing; and serde_json reads
        // keys that are not strings (numbers, `true`) as the map's key type asks.
        self.by_serde_json(|de| de.deserialize_map(visitor))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> serde_json::Result<V::Value> {
        // serde_json takes a struct from an array too, its fields in order.
        match self.first() {
            Some(b'{') => self.walk(visitor, true),
            Some(b'[') => self.walk(visitor, false),
            _ => self.by_serde_json(|de| de.deserialize_struct(name, fields, visitor)),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
        match self.first() {
            Some(b'[') => self.walk(visitor, false),
            _ => self.by_serde_json(|de| de.deserialize_seq(visitor)),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> serde_json::Result<V::Value> {
        match self.first() {
            Some(b'[') => self.walk(visitor, false),
            _ => self.by_serde_json(|de| de.deserialize_tuple(len, visitor)),
        }
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> serde_json::Result<V::Value> {
        match self.first() {
            Some(b'[') => self.walk(visitor, false),
            _ => self.by_serde_json(|de| de.deserialize_tuple_struct(name, len, visitor)),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
        match self.first() {
            Some(b'n') => self.by_serde_json(|de| de.deserialize_option(visitor)),
            _ => visitor.visit_some(self),
        }
    }

    read_here_or_by_serde_json! {
        plain_str => visit_borrowed_str: deserialize_str deserialize_string deserialize_identifier
    }

    read_here_or_by_serde_json! {
        plain_u64 => visit_u64:
        deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64
        deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64
    }

    by_serde_json! {
        deserialize_bool() deserialize_i128() deserialize_u128() deserialize_f32()
        deserialize_f64() deserialize_char()
        deserialize_bytes() deserialize_byte_buf() deserialize_unit()
        deserialize_unit_struct(name: &'static str)
        deserialize_newtype_struct(name: &'static str)
        deserialize_enum(name: &'static str, variants: &'static [&'static str])
    }
}

/// The members of a checked object, or the elements of a checked array, in turn.
struct Items<'t, 'f> {
    text: &'t str,
    /// As [`Members::spans`].
    spans: &'t [(u16, u16)],
    /// Where the next member or element is looked for: after the opening bracket, or after
    /// the last value read.
    at: usize,
    close: u8,
    started: bool,
    /// The start of the value of the member whose key was read last, until it is read.
    value: Option<usize>,
    /// The position after the closing bracket, once found.
    end: Option<usize>,
    /// As [`Walk::failed`].
    failed: &'f Cell<bool>,
}

impl<'de> Items<'de, '_> {
    /// The start of the next member or element, `None` at the end.
    fn next(&mut self) -> serde_json::Result<Option<usize>> {
        if self.end.is_some() || self.failed.get() {
            return Ok(None);
        }
        if self.value.is_some() {
            return noted(refused(), self.failed);
        }
        let b = self.text.as_bytes();
        let i = scan::ws(b, self.at);
        match b.get(i) {
            Some(&c) if c == self.close => {
                self.end = Some(i + 1);
                Ok(None)
            }
            Some(b',') if self.started => Ok(Some(scan::ws(b, i + 1))),
            Some(_) if !self.started => {
                self.started = true;
                Ok(Some(i))
            }
            _ => noted(refused(), self.failed),
        }
    }

    /// Reads the value at `at` with `seed`, and moves past it.
    fn read<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
        at: usize,
    ) -> serde_json::Result<S::Value> {
        let end = Cell::new(None);
        let value = noted(
            seed.deserialize(Checked {
                text: self.text,
                spans: self.spans,
                at,
                end: Some(&end),
                failed: self.failed,
            }),
            self.failed,
        )?;
        // A value read says where it ends; a container passed over may be among the spans.
        self.at = end
            .get()
            .or_else(|| span_end(self.spans, at))
            .unwrap_or_else(|| scan::skip_checked(self.text.as_bytes(), at));
        Ok(value)
    }
}

impl<'de> MapAccess<'de> for Items<'de, '_> {
    type Error = serde_json::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> serde_json::Result<Option<K::Value>> {
        let Some(at) = self.next()? else {
            return Ok(None);
        };
        let b = self.text.as_bytes();
        let (key, after) = match scan::plain_string(b, at) {
            Some((key, after)) => (
                seed.deserialize(serde::de::value::BorrowedStrDeserializer::new(
                    &self.text[at + 1..at + 1 + key.len()],
                )),
                after,
            ),
            // A key with escapes is unescaped by serde_json, which refuses a lone surrogate in
            // a key whatever the visitor does with it.
            None => {
                let after = scan::skip_checked(b, at);
                let key = serde_json::from_str::<String>(&self.text[at..after]).and_then(|key| {
                    seed.deserialize(serde::de::value::StringDeserializer::new(key))
                });
                (key, after)
            }
        };
        let key = noted(key, self.failed)?;
        // The text is checked: the colon follows.
        self.value = Some(scan::ws(b, scan::ws(b, after) + 1));
        Ok(Some(key))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> serde_json::Result<V::Value> {
        let Some(at) = self.value.take() else {
            return refused();
        };
        self.read(seed, at)
    }
}

impl<'de> SeqAccess<'de> for Items<'de, '_> {
    type Error = serde_json::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> serde_json::Result<Option<T::Value>> {
        match self.next()? {
            Some(at) => self.read(seed, at).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The scanner's answer.
    fn by_scanner(text: &str) -> Option<Envelope<'_>> {
        indexed(text).map(|(env, _)| env)
    }

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

    /// Types a payload is read into: a JSON tree, a map, and a struct taking envelope
    /// members, a member of a fixed type, and anything else.
    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct Taking {
        id: Option<serde_json::Value>,
        tags: Option<serde_json::Value>,
        a: Option<String>,
        #[serde(flatten)]
        rest: std::collections::BTreeMap<String, serde_json::Value>,
    }

    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct Picky {
        #[serde(rename = "type")]
        ty: String,
        order: Order,
    }

    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct Order {
        id: String,
        total: u64,
        raw: Raw,
    }

    /// A member kept as its text.
    #[derive(Debug, serde::Deserialize)]
    #[serde(transparent)]
    struct Raw(Box<RawValue>);

    impl PartialEq for Raw {
        fn eq(&self, other: &Self) -> bool {
            self.0.get() == other.0.get()
        }
    }

    /// Whatever reading member by member gives, serde_json gives the same from the whole text.
    fn reads_alike<T: serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(text: &str) {
        if let Some((_, members)) = indexed(text) {
            if let Some(ours) = payload::<T>(text, &members) {
                let theirs = serde_json::from_str::<T>(text).ok();
                assert_eq!(Some(ours), theirs, "{text:?}");
            }
        }
    }

    #[test]
    fn reads_scalars_as_serde_json_does() {
        #[derive(Debug, PartialEq, serde::Deserialize)]
        struct Small {
            n: u8,
        }
        #[derive(Debug, PartialEq, serde::Deserialize)]
        struct Signed {
            n: i8,
        }
        #[derive(Debug, PartialEq, serde::Deserialize)]
        struct Wide {
            n: u64,
        }
        #[derive(Debug, PartialEq, serde::Deserialize)]
        struct Float {
            n: f64,
        }
        #[derive(Debug, PartialEq, serde::Deserialize)]
        struct Named {
            n: String,
        }
        /// Reads as serde_json does, and reads for itself whatever serde_json reads.
        fn both<T: serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(text: &str) {
            reads_alike::<T>(text);
            let (_, members) = indexed(text).unwrap();
            let ours = payload::<T>(text, &members);
            let theirs = serde_json::from_str::<T>(text).ok();
            assert_eq!(ours, theirs, "{text:?}");
        }
        let numbers = [
            "0",
            "7",
            "127",
            "128",
            "255",
            "256",
            "-1",
            "-128",
            "-129",
            "9999999999999999999",
            "18446744073709551615",
            "18446744073709551616",
            "1.0",
            "1e3",
            "2E2",
            "\"5\"",
        ];
        for n in numbers {
            let text = format!(r#"{{"id":"e","type":"t","n":{n},"after":[1]}}"#);
            both::<Small>(&text);
            both::<Signed>(&text);
            both::<Wide>(&text);
            both::<Float>(&text);
            both::<Named>(&text);
            both::<serde_json::Value>(&text);
        }
        for s in [
            r#""""#,
            r#""plain""#,
            r#""a\"b""#,
            r#""\u00e9t\u00e9""#,
            r#""été""#,
            "7",
        ] {
            let text = format!(r#"{{"id":"e","type":"t","n":{s},"after":[1]}}"#);
            both::<Named>(&text);
            both::<serde_json::Value>(&text);
        }
        // A plain string is lent from the text, as serde_json lends it.
        #[derive(serde::Deserialize)]
        struct Lent<'a> {
            #[serde(borrow)]
            n: std::borrow::Cow<'a, str>,
        }
        let text = r#"{"id":"e","type":"t","n":"o-1"}"#;
        let (_, members) = indexed(text).unwrap();
        let lent: Lent<'_> = payload(text, &members).unwrap();
        assert!(matches!(lent.n, std::borrow::Cow::Borrowed("o-1")));
    }

    #[test]
    fn reads_a_payload_from_its_members() {
        let text = r#"{"id":"e1","type":"order-placed","timestamp":1,"partitionKey":"o-1",
            "tags":{"a":[1,{"b":"}"}]},"order":{"id":"o-1","total":42,"raw":[1, "x"] },"n":1.5}"#;
        let (_, members) = indexed(text).unwrap();
        let picky: Picky = payload(text, &members).expect("read member by member");
        assert_eq!(picky.ty, "order-placed");
        assert_eq!((picky.order.id.as_str(), picky.order.total), ("o-1", 42));
        assert_eq!(picky.order.raw.0.get(), r#"[1, "x"]"#);
        let tree: serde_json::Value = payload(text, &members).unwrap();
        assert_eq!(
            tree,
            serde_json::from_str::<serde_json::Value>(text).unwrap()
        );
        reads_alike::<Picky>(text);
        reads_alike::<Taking>(text);
        // serde_json decides what this reader does not: the whole text as one raw value, a
        // text that does not fit the type (to word the error).
        assert!(payload::<Box<RawValue>>(text, &members).is_none());
        assert!(payload::<Vec<u8>>(text, &members).is_none());
        assert!(payload::<Order>(text, &members).is_none());
    }

    /// A type whose visitor reads one member and stops: asked for as a map, or as a struct.
    #[derive(Debug, PartialEq)]
    struct First<const STRUCT: bool>(String);

    type FirstKey = First<false>;
    type FirstField = First<true>;

    impl<'de, const STRUCT: bool> serde::Deserialize<'de> for First<STRUCT> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Reading<const STRUCT: bool>;
            impl<'de, const STRUCT: bool> Visitor<'de> for Reading<STRUCT> {
                type Value = First<STRUCT>;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a map")
                }
                fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                    Ok(First(map.next_key()?.unwrap_or_default()))
                }
            }
            if STRUCT {
                d.deserialize_struct("First", &["x"], Reading::<STRUCT>)
            } else {
                d.deserialize_map(Reading::<STRUCT>)
            }
        }
    }

    /// A struct whose visitor passes over members whose values do not fit, and goes on.
    #[derive(Debug, PartialEq)]
    struct Lenient(Vec<(String, u32)>);

    impl<'de> serde::Deserialize<'de> for Lenient {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Passing;
            impl<'de> Visitor<'de> for Passing {
                type Value = Lenient;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a struct or a sequence")
                }
                fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Lenient, M::Error> {
                    let mut kept = Vec::new();
                    while let Some(key) = map.next_key::<String>()? {
                        if let Ok(n) = map.next_value::<u32>() {
                            kept.push((key, n));
                        }
                    }
                    Ok(Lenient(kept))
                }
                fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Lenient, S::Error> {
                    let mut kept = Vec::new();
                    loop {
                        match seq.next_element::<u32>() {
                            Ok(Some(n)) => kept.push((String::new(), n)),
                            Ok(None) => return Ok(Lenient(kept)),
                            Err(_) => {}
                        }
                    }
                }
            }
            d.deserialize_struct("Lenient", &["x", "y"], Passing)
        }
    }

    /// A field read leniently: a value that does not fit is `None`.
    fn lenient<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        Ok(<u32 as serde::Deserialize>::deserialize(d).ok())
    }

    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct LenientField {
        #[serde(deserialize_with = "lenient")]
        n: Option<u32>,
        m: u32,
    }

    /// A type that asks for a sequence and would take a map, read whole.
    #[derive(Debug, PartialEq)]
    struct SeqOfMap;

    impl<'de> serde::Deserialize<'de> for SeqOfMap {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Any;
            impl<'de> Visitor<'de> for Any {
                type Value = SeqOfMap;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("anything")
                }
                fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<SeqOfMap, M::Error> {
                    use serde::de::IgnoredAny;
                    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                    Ok(SeqOfMap)
                }
            }
            d.deserialize_seq(Any)
        }
    }

    #[test]
    fn answers_only_where_serde_json_would() {
        let text = r#"{"id":"e1","type":"t","a":1}"#;
        let (_, members) = indexed(text).unwrap();
        // serde_json wants the object's end once the visitor returns, and gives a map only to
        // `any`, `map`, `struct`.
        assert!(serde_json::from_str::<FirstKey>(text).is_err());
        assert_eq!(payload::<FirstKey>(text, &members), None);
        assert!(serde_json::from_str::<SeqOfMap>(text).is_err());
        assert_eq!(payload::<SeqOfMap>(text, &members), None);
        // The same within a member, walked by the checked reader.
        #[derive(Debug, PartialEq, serde::Deserialize)]
        struct Within<T> {
            a: T,
        }
        let text = r#"{"id":"e1","a":{"x":1,"y":2}}"#;
        let (_, members) = indexed(text).unwrap();
        assert!(serde_json::from_str::<Within<FirstField>>(text).is_err());
        assert_eq!(payload::<Within<FirstField>>(text, &members), None);
        assert!(serde_json::from_str::<Within<FirstKey>>(text).is_err());
        assert_eq!(payload::<Within<FirstKey>>(text, &members), None);
        assert!(serde_json::from_str::<Within<SeqOfMap>>(text).is_err());
        assert_eq!(payload::<Within<SeqOfMap>>(text, &members), None);
        let text = r#"{"id":"e1","a":[1,2]}"#;
        let (_, members) = indexed(text).unwrap();
        assert!(serde_json::from_str::<Within<(u8,)>>(text).is_err());
        assert_eq!(payload::<Within<(u8,)>>(text, &members), None);
        // A key with escapes is read by serde_json; one that is a number too.
        let text = r#"{"id":"e1","a":{"i\u0064":"x","b\"":1,"7":{"c":[]}}}"#;
        let (_, members) = indexed(text).unwrap();
        #[derive(Debug, PartialEq, serde::Deserialize)]
        struct Escaped {
            id: String,
            #[serde(rename = "b\"")]
            b: u8,
        }
        let ours = payload::<Within<Escaped>>(text, &members);
        assert_eq!(ours, serde_json::from_str(text).ok());
        assert!(ours.is_some());
        // A lone surrogate in a key: serde_json refuses it, whatever the visitor wants.
        for text in [
            r#"{"id":"e1","a":{"\ud800":1,"id":"x"}}"#,
            r#"{"id":"e1","a":{"\ud800":1}}"#,
        ] {
            let (_, members) = indexed(text).unwrap();
            assert!(serde_json::from_str::<Within<Escaped>>(text).is_err());
            assert_eq!(payload::<Within<Escaped>>(text, &members), None);
            assert!(serde_json::from_str::<serde_json::Value>(text).is_err());
            assert_eq!(payload::<serde_json::Value>(text, &members), None);
        }
        // A map is read by serde_json, which takes keys that are numbers.
        type Numbered = Within<std::collections::BTreeMap<u32, serde_json::Value>>;
        let text = r#"{"id":"e1","a":{"7":1}}"#;
        let (_, members) = indexed(text).unwrap();
        assert_eq!(
            payload::<Numbered>(text, &members),
            serde_json::from_str(text).ok()
        );
        assert!(payload::<Numbered>(text, &members).is_some());
        // serde_json takes a struct from an array, its fields in order.
        #[derive(Debug, PartialEq, serde::Deserialize)]
        struct Pair {
            id: String,
            total: u64,
        }
        let text = r#"{"id":"e1","a":[ "o-1" , 42 ]}"#;
        let (_, members) = indexed(text).unwrap();
        let ours = payload::<Within<Pair>>(text, &members);
        assert_eq!(ours, serde_json::from_str(text).ok());
        assert!(ours.is_some());
        // A visitor that passes over an error and goes on: serde_json then stands elsewhere
        // than this reader would, so the text is left to it (and nothing loops).
        for text in [
            r#"{"id":"e1","a":{"x":1,"y":"bad","z":2}}"#,
            r#"{"id":"e1","a":[1,"x",2]}"#,
            r#"{"id":"e1","a":{"x":{"p":[1]},"z":2}}"#,
        ] {
            let (_, members) = indexed(text).unwrap();
            assert_eq!(payload::<Within<Lenient>>(text, &members), None, "{text}");
            assert_eq!(payload::<Lenient>(text, &members), None, "{text}");
        }
        for text in [
            r#"{"id":"e1","a":{"n":[1],"m":2}}"#,
            r#"{"id":"e1","a":{"n":"x","m":2}}"#,
            // The last member: the walk ends where serde_json's would not.
            r#"{"id":"e1","a":{"m":2,"n":[1]}}"#,
        ] {
            let (_, members) = indexed(text).unwrap();
            assert_eq!(
                payload::<Within<LenientField>>(text, &members),
                None,
                "{text}"
            );
            reads_alike::<Within<LenientField>>(text);
        }
        let text = r#"{"id":"e1","m":2,"n":[1]}"#;
        let (_, members) = indexed(text).unwrap();
        assert!(serde_json::from_str::<LenientField>(text).is_err());
        assert_eq!(payload::<LenientField>(text, &members), None);
        // Nesting: serde_json reads 127 containers deep, the object included.
        let nested = |k: usize, inner: &str| {
            let (open, close) = ("[".repeat(k), "]".repeat(k));
            format!(r#"{{"id":"1","a":{open}{inner}{close}}}"#)
        };
        for inner in ["", "1"] {
            for k in 120..130 {
                let text = nested(k, inner);
                let whole = serde_json::from_str::<serde_json::Value>(&text).ok();
                if let Some((_, members)) = indexed(&text) {
                    assert_eq!(
                        payload(&text, &members),
                        whole,
                        "{k} levels around {inner:?}"
                    );
                }
            }
            let (_, members) = indexed(&nested(120, inner)).unwrap();
            assert!(payload::<serde_json::Value>(&nested(120, inner), &members).is_some());
        }
    }

    #[test]
    fn notes_where_the_first_nested_containers_end() {
        let text = r#"{"id":"e1","type":"t","tags":{"a":1},"order":{"items":[{"n":1},{}],"to":{"c":"x"}}}"#;
        let (_, members) = indexed(text).unwrap();
        let noted: Vec<&str> = members
            .spans()
            .iter()
            .map(|&(s, e)| &text[usize::from(s)..usize::from(e)])
            .collect();
        // Inner ones close first; the members' own values and empty containers are not noted.
        assert_eq!(noted, [r#"{"n":1}"#, r#"[{"n":1},{}]"#, r#"{"c":"x"}"#]);

        // Only the first few are kept; the rest are found by counting brackets.
        let many = format!(
            r#"{{"id":"e1","type":"t","list":[{}]}}"#,
            ["[1]"; MAX_SPANS + 3].join(",")
        );
        let (_, members) = indexed(&many).unwrap();
        assert_eq!(members.spans().len(), MAX_SPANS);
        #[derive(serde::Deserialize, PartialEq, Debug)]
        struct Lists {
            list: Vec<Vec<u8>>,
        }
        reads_alike::<Lists>(&many);
    }

    #[test]
    fn finds_a_member_named_once() {
        let text = r#"{"id":"e1","a":{"b":1},"d":1,"d":2}"#;
        let (_, members) = indexed(text).unwrap();
        assert_eq!(
            member(text, &members, "a").map(|at| &text[at.unwrap()..]),
            Some(r#"{"b":1},"d":1,"d":2}"#)
        );
        assert_eq!(member(text, &members, "x"), Some(None));
        // serde_json reads each of a repeated name in turn: left to it.
        assert_eq!(member(text, &members, "d"), None);
        assert_eq!(member(text, &Members::UNKNOWN, "a"), None);
    }

    #[test]
    fn leaves_a_payload_to_serde_when_its_members_are_not_known() {
        // An object of `n` members.
        let members_of = |n: usize| {
            let members: Vec<String> = (0..n).map(|i| format!(r#""m{i}":{i}"#)).collect();
            format!("{{{}}}", members.join(","))
        };
        let (_, members) = indexed(&members_of(13)).unwrap();
        assert_eq!(members, Members::UNKNOWN);
        let long = format!(r#"{{"a":"{}","b":1}}"#, "x".repeat(70_000));
        let (_, members) = indexed(&long).unwrap();
        assert_eq!(members, Members::UNKNOWN);
        assert!(payload::<serde_json::Value>(&long, &members).is_none());
        let (_, members) = indexed(&members_of(12)).unwrap();
        assert_eq!(members.known().map(<[u16]>::len), Some(12));
    }

    /// Types whose members are walked by the checked reader: nested structs, sequences,
    /// options, maps, enums of every representation, flattened and strict structs.
    mod shapes {
        use std::collections::BTreeMap;

        use serde::{Deserialize, Serialize};
        use serde_json::Value;

        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        pub(super) struct Holder {
            pub(super) deep: Deep,
        }

        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        pub(super) struct Deep {
            pub(super) name: String,
            pub(super) count: Option<u32>,
            pub(super) lines: Vec<Line>,
            pub(super) kind: Kind,
            pub(super) tagged: Tagged,
            pub(super) loose: Vec<Loose>,
            pub(super) pair: (i64, String),
            pub(super) point: Point,
            pub(super) extra: BTreeMap<String, Value>,
            #[serde(default)]
            pub(super) missing: Option<Line>,
        }

        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        pub(super) struct Line {
            pub(super) sku: String,
            pub(super) qty: u32,
            #[serde(flatten)]
            pub(super) rest: BTreeMap<String, Value>,
        }

        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        pub(super) struct Point(pub(super) f64, pub(super) f64);

        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        pub(super) enum Kind {
            Unit,
            New(String),
            Tuple(u8, u8),
            Struct { a: bool },
        }

        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "t")]
        pub(super) enum Tagged {
            A { x: i32 },
            B { y: String },
        }

        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(untagged)]
        pub(super) enum Loose {
            N(i64),
            S(String),
            L(Vec<u8>),
        }

        #[derive(Debug, PartialEq, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(super) struct Strict {
            pub(super) deep: StrictInner,
        }

        #[derive(Debug, PartialEq, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(super) struct StrictInner {
            pub(super) name: String,
        }
    }

    fn deep() -> impl Strategy<Value = shapes::Deep> {
        use shapes::*;
        let line = (
            any::<String>(),
            any::<u32>(),
            prop::collection::btree_map(any::<String>(), value(), 0..3),
        )
            .prop_map(|(sku, qty, rest)| Line {
                sku,
                qty,
                rest: rest
                    .into_iter()
                    .filter(|(k, _)| k != "sku" && k != "qty")
                    .map(|(k, v)| (k, serde_json::from_str(&v).unwrap()))
                    .collect(),
            });
        let kind = prop_oneof![
            Just(Kind::Unit),
            any::<String>().prop_map(Kind::New),
            (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Kind::Tuple(a, b)),
            any::<bool>().prop_map(|a| Kind::Struct { a }),
        ];
        let tagged = prop_oneof![
            any::<i32>().prop_map(|x| Tagged::A { x }),
            any::<String>().prop_map(|y| Tagged::B { y }),
        ];
        let loose = prop_oneof![
            any::<i64>().prop_map(Loose::N),
            any::<String>().prop_map(Loose::S),
            prop::collection::vec(any::<u8>(), 0..4).prop_map(Loose::L),
        ];
        (
            (
                any::<String>(),
                any::<Option<u32>>(),
                prop::collection::vec(line, 0..3),
            ),
            (kind, tagged, prop::collection::vec(loose, 0..3)),
            (any::<i64>(), any::<String>(), -1e9..1e9f64, -1e9..1e9f64),
            prop::collection::btree_map(any::<String>(), value(), 0..3),
        )
            .prop_map(
                |((name, count, lines), (kind, tagged, loose), (n, s, x, y), extra)| Deep {
                    name,
                    count,
                    lines,
                    kind,
                    tagged,
                    loose,
                    pair: (n, s),
                    point: Point(x, y),
                    extra: extra
                        .into_iter()
                        .map(|(k, v)| (k, serde_json::from_str(&v).unwrap()))
                        .collect(),
                    missing: None,
                },
            )
    }

    /// `value` written as JSON with members no type takes put into each of its objects (after
    /// the member `after` of them, taken modulo their count), spaced as `space` says.
    fn with_strangers(
        value: &serde_json::Value,
        stranger: &str,
        after: usize,
        space: &str,
    ) -> String {
        use serde_json::Value;
        match value {
            Value::Object(map) => {
                let mut members: Vec<String> = map
                    .iter()
                    .map(|(k, v)| {
                        let k = serde_json::to_string(k).unwrap();
                        format!(
                            "{k}{space}:{space}{}",
                            with_strangers(v, stranger, after, space)
                        )
                    })
                    .collect();
                // An object of one member may be an enum's variant, which takes no other.
                if members.len() != 1 {
                    let at = after % (members.len() + 1);
                    members.insert(at, format!(r#""zz-stranger"{space}:{space}{stranger}"#));
                }
                format!(
                    "{{{space}{}{space}}}",
                    members.join(&format!("{space},{space}"))
                )
            }
            Value::Array(items) => {
                let items: Vec<String> = items
                    .iter()
                    .map(|v| with_strangers(v, stranger, after, space))
                    .collect();
                format!(
                    "[{space}{}{space}]",
                    items.join(&format!("{space},{space}"))
                )
            }
            other => other.to_string(),
        }
    }

    proptest! {
        #[test]
        fn reads_payloads_as_serde_json_does(text in object()) {
            if let Some((_, members)) = indexed(&text) {
                // A tree fits any object: reading it member by member must not give up.
                prop_assert!(
                    members == Members::UNKNOWN
                        || payload::<serde_json::Value>(&text, &members).is_some(),
                    "gave up on {text:?}"
                );
            }
            reads_alike::<serde_json::Value>(&text);
            reads_alike::<std::collections::HashMap<String, serde_json::Value>>(&text);
            reads_alike::<Taking>(&text);
            reads_alike::<Picky>(&text);
        }

        #[test]
        fn skips_a_checked_value_where_the_scanner_ends_it(text in value(), tail in "[,}\\] \n]{0,2}") {
            let text = format!("{text}{tail}");
            let b = text.as_bytes();
            if let Some(end) = scan::skip_value(b, 0) {
                prop_assert_eq!(scan::skip_checked(b, 0), end, "{}", text);
            }
        }

        #[test]
        fn notes_nested_containers_where_they_end(text in object()) {
            if let Some((_, members)) = indexed(&text) {
                let b = text.as_bytes();
                for &(start, end) in members.spans() {
                    let (start, end) = (usize::from(start), usize::from(end));
                    prop_assert!(matches!(b[start], b'{' | b'['), "{}", text);
                    prop_assert_eq!(scan::skip_checked(b, start), end, "{}", text);
                }
            }
        }

        #[test]
        fn walks_nested_members_as_serde_json_reads_them(
            deep in deep(),
            stranger in value(),
            after in any::<usize>(),
            spaced in any::<bool>(),
        ) {
            let space = if spaced { " \n" } else { "" };
            let tree = serde_json::to_value(&deep).unwrap();
            for text in [
                format!(r#"{{"id":"e1","type":"t","deep":{}}}"#, with_strangers(&tree, &stranger, after, space)),
                format!(r#"{{"id":"e1","type":"t","deep":{}}}"#, serde_json::to_string(&tree).unwrap()),
            ] {
                let (_, members) = indexed(&text).expect("an event the scanner takes");
                // Strangers are skipped as serde_json skips them; a flattened struct keeps
                // them, and the checked reader must agree.
                let theirs = serde_json::from_str::<shapes::Holder>(&text).ok();
                prop_assert!(theirs.is_some(), "serde_json refused {text:?}");
                prop_assert_eq!(payload::<shapes::Holder>(&text, &members), theirs, "{}", text);
                reads_alike::<serde_json::Value>(&text);
                reads_alike::<shapes::Strict>(&text);
            }
        }

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
                // Skipping a value of a text nobody checked answers a place in it.
                let b = damaged.as_bytes();
                for at in 0..=b.len() {
                    prop_assert!(scan::skip_checked(b, at) <= b.len().max(at));
                }
            }
        }
    }
}
