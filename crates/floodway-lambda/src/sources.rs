//! Lambda invocations into Floodway records: Kinesis, DynamoDB Streams (as change data
//! capture), SQS, SNS, SQS carrying SNS notifications, and EventBridge.
//!
//! The readers are tolerant: they decode only what Floodway needs, take metadata that is
//! absent or loosely typed (a timestamp as a number or a string, no `eventSourceARN`), and
//! read each record on its own. A record that cannot be read (no data, data that is not
//! base64, a malformed image) becomes a record marked [`Record::with_malformed`]: it is faulted
//! by itself, with an error that says what is wrong, and never fails the invocation. Only an
//! invocation that is no known source at all is refused ([`Unrecognized`]).

use std::borrow::Cow;

use base64::Engine as _;
use bytes::Bytes;
use floodway::{Event, Record};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The source of an invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// Kinesis Data Streams.
    Kinesis,
    /// DynamoDB Streams, as change events.
    DynamoDb,
    /// SQS (a message's body is the event, or an SNS notification carrying it).
    Sqs,
    /// SNS (a notification's message is the event).
    Sns,
    /// EventBridge (the detail is the event).
    EventBridge,
}

impl SourceKind {
    /// Whether the source takes `ReportBatchItemFailures` (streams and SQS); SNS and
    /// EventBridge invoke asynchronously and retry a failed invocation instead.
    pub fn reports_items(self) -> bool {
        matches!(
            self,
            SourceKind::Kinesis | SourceKind::DynamoDb | SourceKind::Sqs
        )
    }
}

/// An invocation that is no known source: not JSON, or neither `Records` of a known
/// `eventSource` nor an EventBridge event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unrecognized(pub String);

/// An invocation read into records, in the order given.
#[derive(Debug)]
pub struct Invocation {
    /// Where it came from.
    pub kind: SourceKind,
    /// Its records; those that could not be read are marked malformed.
    pub records: Vec<Record>,
    /// DynamoDB records change data capture skipped (replicas, TTL removals), by sequence.
    pub skipped: Vec<(String, Skipped)>,
    /// The one pipeline to run, and the fault, when the invocation resubmits a fault.
    pub resubmit_to: Option<Resubmission>,
}

/// The top of an invocation: just enough to tell its kind (records are read one by one).
#[derive(Deserialize)]
struct Payload<'a> {
    #[serde(rename = "Records", borrow, default)]
    records: Option<Vec<&'a RawValue>>,
    #[serde(rename = "detail-type", default)]
    detail_type: Option<serde::de::IgnoredAny>,
    /// Set on a resubmission (see [`crate::resubmission_payload`]).
    #[serde(default)]
    floodway: Option<Resubmission>,
}

/// What a resubmission's invocation says of itself (`"floodway": {...}`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Resubmission {
    /// The one pipeline to run.
    pub pipeline: String,
    /// The fault resubmitted: a fault its record raises again is that one (its source,
    /// position and bytes may read otherwise, reshaped into an invocation).
    #[serde(default, rename = "faultId")]
    pub fault: Option<String>,
    /// The record was put together by the source from what no event limit bounds (a
    /// DynamoDB change of two large images): read again without `max_event_size`, as it was
    /// the first time.
    #[serde(default)]
    pub assembled: bool,
}

#[derive(Deserialize)]
struct Sniff<'a> {
    #[serde(rename = "eventSource", alias = "EventSource", borrow, default)]
    source: Option<Cow<'a, str>>,
}

/// Reads an invocation's payload (see the [module docs](self)).
///
/// # Errors
/// An invocation that is no known source.
pub fn read(payload: &[u8], cdc: &CdcOptions) -> Result<Invocation, Unrecognized> {
    if let Some(invocation) = KinesisBatch::read(payload).and_then(KinesisBatch::decoded) {
        return Ok(invocation);
    }
    read_each(payload, cdc)
}

/// [`read`] on a payload it owns, as [`serve`](crate::serve) hands it over: a Kinesis batch's
/// records are decoded where their text was (base64 text is a third longer than its bytes),
/// so the invocation's text and its records' bytes never take memory side by side. The
/// records' bytes keep the payload's buffer until the last of them is dropped.
///
/// # Errors
/// As [`read`].
pub fn read_owned(mut payload: Vec<u8>, cdc: &CdcOptions) -> Result<Invocation, Unrecognized> {
    let Some(batch) = KinesisBatch::read(&payload) else {
        return read_each(&payload, cdc);
    };
    let Some(texts) = batch.texts_in(&payload) else {
        // An escaped text somewhere: as `read` does.
        if let Some(invocation) = batch.decoded() {
            return Ok(invocation);
        }
        return read_each(&payload, cdc);
    };
    let KinesisBatch {
        mut records,
        resubmit_to,
        ..
    } = batch;
    let Some(lengths) = decode_in_place(&mut payload, &texts) else {
        // A record's data is not base64; the payload is as it came.
        return read_each(&payload, cdc);
    };
    let buffer = Bytes::from(payload);
    for ((record, text), length) in records.iter_mut().zip(texts).zip(lengths) {
        record.data = buffer.slice(text.start..text.start + length);
    }
    Ok(Invocation {
        kind: SourceKind::Kinesis,
        records,
        skipped: Vec::new(),
        resubmit_to,
    })
}

/// The records of an invocation read one by one, each that cannot be read marked malformed
/// (any source).
fn read_each(payload: &[u8], cdc: &CdcOptions) -> Result<Invocation, Unrecognized> {
    let top: Payload<'_> = serde_json::from_slice(payload)
        .map_err(|e| Unrecognized(format!("the invocation is not a JSON object: {e}")))?;
    let resubmit_to = top.floodway;
    if let Some(records) = top.records {
        let kind = records.iter().find_map(|r| {
            match serde_json::from_str::<Sniff<'_>>(r.get())
                .ok()?
                .source?
                .as_ref()
            {
                "aws:kinesis" => Some(SourceKind::Kinesis),
                "aws:dynamodb" => Some(SourceKind::DynamoDb),
                "aws:sqs" => Some(SourceKind::Sqs),
                "aws:sns" => Some(SourceKind::Sns),
                _ => None,
            }
        });
        let Some(kind) = kind else {
            if records.is_empty() {
                // Nothing to do, whatever the source: an empty answer suits every one.
                return Ok(Invocation {
                    kind: SourceKind::Kinesis,
                    records: Vec::new(),
                    skipped: Vec::new(),
                    resubmit_to,
                });
            }
            return Err(Unrecognized(
                "Records of no known eventSource (aws:kinesis, aws:dynamodb, aws:sqs, aws:sns)"
                    .into(),
            ));
        };
        let mut invocation = Invocation {
            kind,
            records: Vec::with_capacity(records.len()),
            skipped: Vec::new(),
            resubmit_to,
        };
        let region = cdc
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok());
        let mut names = Names::default();
        for (i, raw) in records.iter().enumerate() {
            let i = i as u64;
            let record = match kind {
                SourceKind::Kinesis => kinesis(i, raw, &mut names),
                SourceKind::Sqs => sqs(i, raw),
                SourceKind::Sns => sns(i, raw),
                SourceKind::DynamoDb => match dynamodb(i, raw, cdc, region.as_deref()) {
                    Ok(record) => record,
                    Err(skipped) => {
                        invocation.skipped.push(skipped);
                        continue;
                    }
                },
                SourceKind::EventBridge => unreachable!("not a Records source"),
            };
            invocation.records.push(record);
        }
        return Ok(invocation);
    }
    if top.detail_type.is_some() {
        let mut record = eventbridge(payload);
        if resubmit_to.as_ref().is_some_and(|r| r.assembled) {
            record = record.assembled();
        }
        return Ok(Invocation {
            kind: SourceKind::EventBridge,
            records: vec![record],
            skipped: Vec::new(),
            resubmit_to,
        });
    }
    Err(Unrecognized(
        "neither `Records` (Kinesis, DynamoDB Streams, SQS, SNS) nor an EventBridge event (`detail-type`)"
            .into(),
    ))
}

/// A record of `raw` as a `T` (`what` it should be, for the error), or the malformed record
/// of source `source` (`<source>:unknown`) that says why it is not one.
fn parse<'a, T: Deserialize<'a>>(
    raw: &'a RawValue,
    i: u64,
    source: &str,
    name: &str,
    what: &str,
) -> Result<T, Box<Record>> {
    serde_json::from_str(raw.get()).map_err(|e| {
        let record = malformed(
            format!("{source}:unknown"),
            i,
            raw,
            name,
            format!("not {what}: {e}"),
        );
        // Named in an answer by what names it to Lambda, where the record still says it:
        // an index in the batch is no identifier Lambda knows (it would fail the batch).
        Box::new(match identity(raw) {
            Some(id) => record.with_sequence(id),
            None => record,
        })
    })
}

/// What names a record to Lambda, read as loosely as can be from one that did not parse: its
/// sequence number (Kinesis, DynamoDB Streams) or message id (SQS).
fn identity(raw: &RawValue) -> Option<String> {
    #[derive(Deserialize)]
    struct Outer<'a> {
        #[serde(rename = "messageId", borrow, default)]
        message_id: Option<&'a RawValue>,
        #[serde(borrow, default)]
        kinesis: Option<&'a RawValue>,
        #[serde(borrow, default)]
        dynamodb: Option<&'a RawValue>,
    }
    #[derive(Deserialize)]
    struct Inner<'a> {
        #[serde(rename = "sequenceNumber", borrow, default)]
        kinesis: Option<&'a RawValue>,
        #[serde(rename = "SequenceNumber", borrow, default)]
        dynamodb: Option<&'a RawValue>,
    }
    let outer: Outer<'_> = serde_json::from_str(raw.get()).ok()?;
    let sequence = |part: Option<&RawValue>| {
        let inner: Inner<'_> = serde_json::from_str(part?.get()).ok()?;
        loose(inner.kinesis.or(inner.dynamodb))
    };
    sequence(outer.kinesis)
        .or_else(|| sequence(outer.dynamodb))
        .or_else(|| loose(outer.message_id))
}

/// A record that could not be read: its JSON as it came, faulted with `name` and `why`.
fn malformed(source: String, i: u64, raw: &RawValue, name: &str, why: String) -> Record {
    Record::new(
        source,
        "malformed",
        i,
        Bytes::copy_from_slice(raw.get().as_bytes()),
    )
    .with_malformed(name, why)
}

/// A string, number or boolean as text (`"5"` and `5` alike); `None` for null or absent.
fn loose(raw: Option<&RawValue>) -> Option<String> {
    loose_str(raw.map(RawValue::get)).map(Cow::into_owned)
}

/// [`loose`], borrowed from the payload when the text has no escapes (a sequence number
/// always).
fn loose_str(raw: Option<&str>) -> Option<Cow<'_, str>> {
    let text = raw?;
    if let Some(quoted) = text.strip_prefix('"') {
        match quoted.strip_suffix('"') {
            Some(plain) if !plain.contains('\\') => Some(Cow::Borrowed(plain)),
            _ => serde_json::from_str::<String>(text).ok().map(Cow::Owned),
        }
    } else if text == "null" || text.starts_with('{') || text.starts_with('[') {
        None
    } else {
        Some(Cow::Borrowed(text))
    }
}

/// The name after the first `/` of an ARN (`arn:aws:kinesis:...:stream/orders` → `orders`).
fn arn_name(arn: Option<&str>) -> &str {
    arn.and_then(|a| a.split('/').nth(1)).unwrap_or("unknown")
}

/// The name after the last `:` of an ARN (`arn:aws:sqs:...:orders` → `orders`).
fn arn_tail(arn: Option<&str>) -> &str {
    arn.and_then(|a| a.rsplit(':').next()).unwrap_or("unknown")
}

/// A Kinesis invocation in one pass: every record well formed, as Lambda sends them.
struct KinesisPayload<'a> {
    records: Vec<KinesisRecord<'a>>,
    floodway: Option<Resubmission>,
}

/// A [`KinesisPayload`] whose records are read into a vector of the given capacity.
struct SizedPayload(usize);

impl<'de> serde::de::DeserializeSeed<'de> for SizedPayload {
    type Value = KinesisPayload<'de>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for SizedPayload {
    type Value = KinesisPayload<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a Kinesis invocation")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut top = KinesisPayload {
            records: Vec::new(),
            floodway: None,
        };
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match &*key {
                "Records" => top.records = map.next_value_seed(SizedRecords(self.0))?,
                "floodway" => top.floodway = map.next_value()?,
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(top)
    }
}

/// The records of a [`SizedPayload`].
struct SizedRecords(usize);

impl<'de> serde::de::DeserializeSeed<'de> for SizedRecords {
    type Value = Vec<KinesisRecord<'de>>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for SizedRecords {
    type Value = Vec<KinesisRecord<'de>>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kinesis records")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut records = Vec::with_capacity(self.0);
        while let Some(record) = seq.next_element()? {
            records.push(record);
        }
        Ok(records)
    }
}

/// The fast path for the commonest invocation: a Kinesis batch parsed straight into typed
/// records borrowed from the payload, without first splitting it into raw records; each
/// record read but for its bytes, and the base64 text they are decoded from.
struct KinesisBatch<'a> {
    /// Without their bytes (`data` empty).
    records: Vec<Record>,
    texts: Vec<Cow<'a, [u8]>>,
    resubmit_to: Option<Resubmission>,
}

impl<'a> KinesisBatch<'a> {
    /// `None` when anything is unusual (another source, a record missing its data): the
    /// tolerant reader then reads the records one by one.
    fn read(payload: &'a [u8]) -> Option<Self> {
        // Room for the records as Lambda sends them (each well over 768 bytes of the
        // payload), rather than a vector doubling its way there.
        let capacity = payload.len() / 768 + 1;
        let mut batch = KinesisBatch {
            records: Vec::with_capacity(capacity),
            texts: Vec::with_capacity(capacity),
            resubmit_to: None,
        };
        let mut names = Names::default();
        // Each record made as the scanner finds it: a second pass over the invocation, once
        // scanned, read each record's names from memory again (the handler ran 7% faster
        // without it).
        if kinesis_scan(payload, |record| batch.take(&mut names, record)).is_none() {
            let top = kinesis_serde(payload, capacity)?;
            batch.records.clear();
            batch.texts.clear();
            for record in top.records {
                batch.take(&mut names, record)?;
            }
            batch.resubmit_to = top.floodway;
        }
        // The records are the invocation's while it runs: room made for several times as many
        // (records far larger than Lambda's smallest) is given back.
        if batch.records.capacity() > 2 * batch.records.len() {
            batch.records.shrink_to_fit();
        }
        (!batch.records.is_empty()).then_some(batch)
    }

    /// Adds a record; `None` for one of another source.
    fn take(&mut self, names: &mut Names, record: KinesisRecord<'a>) -> Option<()> {
        if record.source.as_deref() != Some("aws:kinesis") {
            return None;
        }
        let i = self.records.len() as u64;
        self.records.push(names.kinesis(i, &record, Bytes::new()));
        self.texts.push(record.kinesis.data.0);
        Some(())
    }

    /// The invocation, every record's data decoded into one buffer, each record holding its
    /// slice of it: one allocation for the invocation instead of one per record. `None` when
    /// a record's data is not base64.
    fn decoded(self) -> Option<Invocation> {
        let decoded: usize = self.texts.iter().map(|t| t.len().div_ceil(4) * 3).sum();
        let mut buffer = Vec::with_capacity(decoded);
        let mut ends = Vec::with_capacity(self.texts.len());
        for text in &self.texts {
            decode_base64(text, &mut buffer).ok()?;
            ends.push(buffer.len());
        }
        let buffer = Bytes::from(buffer);
        let mut records = self.records;
        let mut start = 0;
        for (record, end) in records.iter_mut().zip(ends) {
            record.data = buffer.slice(start..end);
            start = end;
        }
        Some(Invocation {
            kind: SourceKind::Kinesis,
            records,
            skipped: Vec::new(),
            resubmit_to: self.resubmit_to,
        })
    }

    /// Where each record's base64 text lies in `payload`, when every one is there as written
    /// (no escapes).
    fn texts_in(&self, payload: &[u8]) -> Option<Vec<std::ops::Range<usize>>> {
        let base = payload.as_ptr() as usize;
        self.texts
            .iter()
            .map(|text| {
                let Cow::Borrowed(text) = text else {
                    return None;
                };
                let start = (text.as_ptr() as usize).checked_sub(base)?;
                (start + text.len() <= payload.len()).then_some(start..start + text.len())
            })
            .collect()
    }
}

/// Standard base64 (padded, canonical), decoded onto the end of `out` with SIMD where the
/// processor has it (the handler measured 0-8% faster than with the scalar decoder over three
/// alternating passes, BENCHMARKS.md). Accepts exactly what `base64`'s `STANDARD` engine
/// accepts (a property test holds them together); on an error, `out` is as it was.
fn decode_base64(text: &[u8], out: &mut Vec<u8>) -> Result<(), base64_simd::Error> {
    base64_simd::STANDARD.decode_append(text, out)
}

/// Decodes each of `texts`, base64 in `payload`, where it lies (bytes are shorter than their
/// text): each one's length. Each goes through a small buffer first, so a text that is not
/// base64 is found before anything is written over it; the ones before it are then encoded
/// back (the decoder takes canonical base64 only, so each comes back as it was written), and
/// `payload` is left as it came.
fn decode_in_place(payload: &mut [u8], texts: &[std::ops::Range<usize>]) -> Option<Vec<usize>> {
    let mut bytes = Vec::new();
    let mut lengths = Vec::with_capacity(texts.len());
    for text in texts {
        bytes.clear();
        if decode_base64(&payload[text.clone()], &mut bytes).is_err() {
            for (text, &length) in texts.iter().zip(&lengths) {
                bytes.clear();
                base64_simd::STANDARD
                    .encode_append(&payload[text.start..text.start + length], &mut bytes);
                payload[text.clone()].copy_from_slice(&bytes);
            }
            return None;
        }
        payload[text.start..text.start + bytes.len()].copy_from_slice(&bytes);
        lengths.push(bytes.len());
    }
    Some(lengths)
}

/// A Kinesis invocation read by serde_json into typed records borrowed from it.
fn kinesis_serde(payload: &[u8], capacity: usize) -> Option<KinesisPayload<'_>> {
    let mut deserializer = serde_json::Deserializer::from_slice(payload);
    let top =
        serde::de::DeserializeSeed::deserialize(SizedPayload(capacity), &mut deserializer).ok()?;
    deserializer.end().ok()?;
    Some(top)
}

/// The records [`kinesis_scan`] finds, for tests to hold them to serde_json's.
#[cfg(test)]
fn kinesis_scanned(payload: &[u8], capacity: usize) -> Option<Vec<KinesisRecord<'_>>> {
    let mut records = Vec::with_capacity(capacity);
    kinesis_scan(payload, |record| {
        records.push(record);
        Some(())
    })?;
    Some(records)
}

/// The records of a Kinesis invocation found by Floodway's JSON scanner (`floodway::scan`),
/// as [`kinesis_serde`] reads them, each given to `each` as it is found (while its text is in
/// the cache): one pass that notes the few members a record needs and checks the rest is
/// JSON, with the data's end found by a vectorized search. `None` for anything it does not
/// accept outright (an escape in a name, a string or the data, a repeated member, a
/// resubmission's `floodway` member, any syntax error), and when `each` answers `None`:
/// serde_json then reads the invocation. A property test holds the two to the same records.
fn kinesis_scan<'a>(
    payload: &'a [u8],
    mut each: impl FnMut(KinesisRecord<'a>) -> Option<()>,
) -> Option<()> {
    use floodway::scan;
    let b = payload;
    let mut read = false;
    let end = scan::object(b, scan::ws(b, 0), |key, at| match key {
        b"Records" if !read => {
            read = true;
            scan::array(b, at, |at| {
                let (record, end) = kinesis_record_scanned(b, at)?;
                each(record)?;
                Some(end)
            })
        }
        b"Records" | b"floodway" => None,
        _ => scan::skip_value(b, at),
    })?;
    (read && scan::ws(b, end) == b.len()).then_some(())
}

/// One record of [`kinesis_scan`] at `at`, and the position after it.
fn kinesis_record_scanned(b: &[u8], at: usize) -> Option<(KinesisRecord<'_>, usize)> {
    use floodway::scan;
    // Each member once (`Some`), its value `None` for null; a repeat sends the invocation to
    // serde_json.
    let mut source = None;
    let mut event_id = None;
    let mut arn = None;
    let mut kinesis = false;
    let mut data = None;
    let mut sequence = None;
    let end = scan::object(b, at, |key, at| {
        let slot = match key {
            b"eventSource" | b"EventSource" => &mut source,
            b"eventID" => &mut event_id,
            b"eventSourceARN" => &mut arn,
            b"kinesis" if !kinesis => {
                kinesis = true;
                return scan::object(b, at, |key, at| match key {
                    b"data" if data.is_none() => {
                        let (text, end) = scan::unescaped_string(b, at)?;
                        data = Some(text);
                        Some(end)
                    }
                    b"sequenceNumber" if sequence.is_none() => {
                        let end = scan::skip_value(b, at)?;
                        sequence = Some(std::str::from_utf8(&b[at..end]).ok()?);
                        Some(end)
                    }
                    b"data" | b"sequenceNumber" => None,
                    _ => scan::skip_value(b, at),
                });
            }
            b"kinesis" => return None,
            _ => return scan::skip_value(b, at),
        };
        if slot.is_some() {
            return None;
        }
        let (value, end) = match b.get(at..at + 4) {
            Some(b"null") => (None, at + 4),
            _ => {
                let (text, end) = scan::plain_string(b, at)?;
                (Some(Cow::Borrowed(std::str::from_utf8(text).ok()?)), end)
            }
        };
        *slot = Some(value);
        Some(end)
    })?;
    let record = KinesisRecord {
        source: source.flatten(),
        event_id: event_id.flatten(),
        arn: arn.flatten(),
        kinesis: KinesisData {
            data: Base64Text(Cow::Borrowed(data?)),
            sequence: sequence.filter(|raw| *raw != "null"),
        },
    };
    Some((record, end))
}

/// The source and shard names of the records read so far: the records of one invocation
/// share a handful, so each is allocated once rather than once per record, and found without
/// a search when a record names the same as the one before it.
#[derive(Default)]
struct Names {
    source: Option<std::sync::Arc<str>>,
    /// The stream ARN `source` was named from.
    arn: Option<String>,
    shard: Option<std::sync::Arc<str>>,
}

impl Names {
    fn intern(slot: &mut Option<std::sync::Arc<str>>, name: &str) -> std::sync::Arc<str> {
        match slot {
            Some(kept) if **kept == *name => kept.clone(),
            _ => slot.insert(std::sync::Arc::from(name)).clone(),
        }
    }

    /// The source named by a record's ARN.
    fn source(&mut self, arn: Option<&str>) -> std::sync::Arc<str> {
        if let (Some(kept), Some(source)) = (&self.arn, &self.source) {
            if arn == Some(kept.as_str()) {
                return source.clone();
            }
        }
        let name = arn_name(arn);
        let source = match &self.source {
            Some(kept) if kept.strip_prefix("kinesis:") == Some(name) => kept.clone(),
            _ => std::sync::Arc::from(format!("kinesis:{name}")),
        };
        self.arn = arn.map(str::to_owned);
        self.source.insert(source).clone()
    }

    /// The shard named by a record's event id (`shardId-000000000000:4954...`).
    fn shard(&mut self, event_id: Option<&str>) -> std::sync::Arc<str> {
        if let (Some(kept), Some(id)) = (&self.shard, event_id) {
            if id
                .strip_prefix(&**kept)
                .is_some_and(|rest| rest.starts_with(':'))
            {
                return kept.clone();
            }
        }
        let shard = event_id
            .and_then(|id| id.split(':').next())
            .unwrap_or("shardId-unknown");
        Self::intern(&mut self.shard, shard)
    }

    /// A record of `record`, carrying `data`.
    fn kinesis(&mut self, i: u64, record: &KinesisRecord<'_>, data: Bytes) -> Record {
        let source = self.source(record.arn.as_deref());
        let shard = self.shard(record.event_id.as_deref());
        let mut out = Record::new(source, shard, i, data);
        out.sequence = loose_str(record.kinesis.sequence).map(|s| std::sync::Arc::from(&*s));
        out
    }
}

#[derive(Deserialize)]
struct KinesisRecord<'a> {
    #[serde(rename = "eventSource", alias = "EventSource", borrow, default)]
    source: Option<Cow<'a, str>>,
    #[serde(rename = "eventID", borrow, default)]
    event_id: Option<Cow<'a, str>>,
    #[serde(rename = "eventSourceARN", borrow, default)]
    arn: Option<Cow<'a, str>>,
    #[serde(borrow)]
    kinesis: KinesisData<'a>,
}

#[derive(Deserialize)]
struct KinesisData<'a> {
    #[serde(borrow)]
    data: Base64Text<'a>,
    /// The JSON text of the sequence number.
    #[serde(
        rename = "sequenceNumber",
        borrow,
        default,
        deserialize_with = "raw_text"
    )]
    sequence: Option<&'a str>,
}

/// A value's JSON text (`None` for null).
fn raw_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de str>, D::Error> {
    Ok(Option::<&'de RawValue>::deserialize(d)?.map(RawValue::get))
}

/// Base64 text read as the bytes of a JSON string. The longest string of a Kinesis record is
/// its data; read as bytes, serde_json finds its end with a vectorized search and skips the
/// UTF-8 and control-character checks, which base64 decoding makes anyway (it refuses every
/// byte they would).
struct Base64Text<'a>(Cow<'a, [u8]>);

impl Base64Text<'_> {
    fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Base64Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Text<'a> {
            type Value = Cow<'a, [u8]>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("base64 text")
            }

            fn visit_borrowed_bytes<E>(self, v: &'de [u8]) -> Result<Self::Value, E> {
                Ok(Cow::Borrowed(v))
            }

            fn visit_bytes<E>(self, v: &[u8]) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v.to_vec()))
            }

            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Cow::Borrowed(v.as_bytes()))
            }

            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v.as_bytes().to_vec()))
            }
        }
        deserializer
            .deserialize_bytes(Text(std::marker::PhantomData))
            .map(Base64Text)
    }
}

/// A Kinesis record: the shard (from `eventID`) is the partition, the sequence number the
/// position.
fn kinesis(i: u64, raw: &RawValue, names: &mut Names) -> Record {
    let record: KinesisRecord<'_> = match parse(
        raw,
        i,
        "kinesis",
        "MalformedKinesisRecord",
        "a Kinesis record",
    ) {
        Ok(r) => r,
        Err(bad) => return *bad,
    };
    match base64::engine::general_purpose::STANDARD.decode(record.kinesis.data.as_bytes()) {
        Ok(data) => names.kinesis(i, &record, Bytes::from(data)),
        // Faulted as it came, with its shard and sequence number: were its fault not stored,
        // it would be reported by them.
        Err(e) => names
            .kinesis(i, &record, Bytes::copy_from_slice(raw.get().as_bytes()))
            .with_malformed(
                "MalformedKinesisRecord",
                format!("kinesis.data is not base64: {e}"),
            ),
    }
}

#[derive(Deserialize)]
struct SqsMessage<'a> {
    #[serde(rename = "messageId", borrow, default)]
    message_id: Option<&'a RawValue>,
    #[serde(borrow)]
    body: Cow<'a, str>,
    #[serde(borrow, default)]
    attributes: Option<SqsAttributes<'a>>,
    #[serde(rename = "eventSourceARN", borrow, default)]
    arn: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct SqsAttributes<'a> {
    #[serde(rename = "MessageGroupId", borrow, default)]
    group: Option<&'a RawValue>,
    #[serde(rename = "ApproximateReceiveCount", borrow, default)]
    receive_count: Option<&'a RawValue>,
}

/// An SNS notification as SQS delivers it without raw message delivery.
#[derive(Deserialize)]
struct Notification<'a> {
    #[serde(rename = "Type", borrow)]
    kind: Cow<'a, str>,
    #[serde(rename = "Message", borrow)]
    message: Cow<'a, str>,
}

/// The event an SQS body carries: the body, or the message of the SNS notification it is.
fn unwrap_notification(body: &str) -> String {
    if body.starts_with('{') && body.contains("\"TopicArn\"") {
        if let Ok(n) = serde_json::from_str::<Notification<'_>>(body) {
            if n.kind == "Notification" {
                return n.message.into_owned();
            }
        }
    }
    body.to_owned()
}

/// An SQS message: the body (or the SNS notification's message in it) is the record; a FIFO
/// queue's message group is the partition and the order key (a standard queue has no order:
/// each message is its own partition); the receive count is the attempt.
fn sqs(i: u64, raw: &RawValue) -> Record {
    let m: SqsMessage<'_> = match parse(raw, i, "sqs", "MalformedSqsMessage", "an SQS message") {
        Ok(m) => m,
        Err(bad) => return *bad,
    };
    let queue = arn_tail(m.arn.as_deref());
    let id = loose(m.message_id).unwrap_or_else(|| i.to_string());
    let attributes = m.attributes.as_ref();
    let group = attributes.and_then(|a| loose(a.group));
    let attempt = attributes
        .and_then(|a| loose(a.receive_count))
        .and_then(|c| c.parse().ok())
        .unwrap_or(1);
    let data = Bytes::from(unwrap_notification(&m.body));
    let record = Record::new(
        format!("sqs:{queue}"),
        group.clone().unwrap_or_else(|| id.clone()),
        i,
        data,
    )
    .with_sequence(id)
    .with_attempt(attempt);
    match group {
        Some(group) => record.with_order_key(group),
        None => record,
    }
}

#[derive(Deserialize)]
struct SnsRecord<'a> {
    #[serde(rename = "Sns", borrow)]
    sns: SnsMessage<'a>,
}

#[derive(Deserialize)]
struct SnsMessage<'a> {
    #[serde(rename = "Message", borrow)]
    message: Cow<'a, str>,
    #[serde(rename = "MessageId", borrow, default)]
    message_id: Option<&'a RawValue>,
    #[serde(rename = "TopicArn", borrow, default)]
    topic: Option<Cow<'a, str>>,
}

/// An SNS notification: its message is the record; each is its own partition (SNS to Lambda
/// keeps no order).
fn sns(i: u64, raw: &RawValue) -> Record {
    let r: SnsRecord<'_> = match parse(
        raw,
        i,
        "sns",
        "MalformedSnsNotification",
        "an SNS notification",
    ) {
        Ok(r) => r,
        Err(bad) => return *bad,
    };
    let topic = arn_tail(r.sns.topic.as_deref());
    let id = loose(r.sns.message_id).unwrap_or_else(|| i.to_string());
    Record::new(
        format!("sns:{topic}"),
        id.clone(),
        i,
        Bytes::from(r.sns.message.into_owned()),
    )
    .with_sequence(id)
}

#[derive(Deserialize)]
struct EventBridgeEnvelope<'a> {
    #[serde(borrow)]
    detail: &'a RawValue,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    source: Option<Cow<'a, str>>,
}

/// An EventBridge event: its `detail` is the Floodway event (as `aws-lambda-stream`
/// publishes it, with the event type as `detail-type`).
fn eventbridge(payload: &[u8]) -> Record {
    match serde_json::from_slice::<EventBridgeEnvelope<'_>>(payload) {
        Ok(e) if e.detail.get().starts_with('{') => {
            let source = e.source.as_deref().unwrap_or("unknown");
            let sequence = loose(e.id).unwrap_or_default();
            Record::new(
                format!("eventbridge:{source}"),
                source.to_owned(),
                0,
                detail_with_id(e.detail.get(), e.id),
            )
            .with_sequence(sequence)
        }
        Ok(_) => Record::new("eventbridge:unknown", "malformed", 0, payload.to_vec())
            .with_malformed("MalformedEventBridgeEvent", "detail is not a JSON object"),
        Err(e) => Record::new("eventbridge:unknown", "malformed", 0, payload.to_vec())
            .with_malformed(
                "MalformedEventBridgeEvent",
                format!("not an EventBridge event: {e}"),
            ),
    }
}

/// An EventBridge event's detail, given the envelope's `id` when it has none of its own (as
/// aws-lambda-stream reads `detail.id || id`: an event put by another producer has an
/// envelope id only).
fn detail_with_id(detail: &str, envelope_id: Option<&RawValue>) -> Bytes {
    #[derive(Deserialize)]
    struct Id<'a> {
        #[serde(borrow, default)]
        id: Option<&'a RawValue>,
    }
    let has_id = serde_json::from_str::<Id<'_>>(detail).map_or(true, |d| d.id.is_some());
    let envelope_id = envelope_id.filter(|id| id.get().starts_with('"'));
    match (has_id, envelope_id) {
        (false, Some(id)) => {
            // `{"id":<envelope id>,` before the detail's own members.
            let rest = detail[1..].trim_start();
            let comma = if rest.starts_with('}') { "" } else { "," };
            Bytes::from(format!("{{\"id\":{}{comma}{rest}", id.get()))
        }
        _ => Bytes::copy_from_slice(detail.as_bytes()),
    }
}

/// How DynamoDB stream records become events.
#[derive(Debug, Clone)]
pub struct CdcOptions {
    /// The attribute naming the kind of row (`discriminator`; `sort_key` when absent): the
    /// event type is `{discriminator}-{created|updated|deleted|undeleted}`.
    pub discriminator: String,
    /// The key attribute whose value is the partition key (`pk`); all key attributes joined by
    /// `|` when the keys lack it.
    pub partition_key: String,
    /// The attribute with the row's time in ms (`timestamp`): a created or updated row's new
    /// image gives the event time; otherwise (a removal) the stream record's time does.
    pub timestamp: String,
    /// The attribute marking a soft delete (`deleted`): a row written with it true is a
    /// `-deleted` event, one written with it cleared after it was set an `-undeleted` one.
    pub deleted: String,
    /// This function's region: records a global table replicated from another region (by
    /// `aws:rep:updateregion`, or an `awsregion` attribute the writer sets) are skipped.
    /// `None`: `AWS_REGION`.
    pub region: Option<String>,
    /// Keep removals by TTL expiry (skipped by default: nobody deleted anything).
    pub keep_ttl_deletes: bool,
    /// The event type's prefix instead of the discriminator (aws-lambda-stream's
    /// `eventTypePrefix`): `{prefix}-created`, ...
    pub event_type_prefix: Option<String>,
    /// The attribute naming the kind of row when `discriminator` is absent (`sk`;
    /// aws-lambda-stream's `skFn`).
    pub sort_key: String,
    /// Skip rows marked `latched: true` (aws-lambda-stream's `outLatched`: a row a listener
    /// wrote from an event must not become an event again). On by default.
    pub skip_latched: bool,
    /// Skip `MODIFY` records whose new image is the old one (a write that changed nothing).
    /// On by default.
    pub skip_unchanged: bool,
}

impl Default for CdcOptions {
    fn default() -> Self {
        CdcOptions {
            discriminator: "discriminator".into(),
            partition_key: "pk".into(),
            timestamp: "timestamp".into(),
            deleted: "deleted".into(),
            region: None,
            keep_ttl_deletes: false,
            event_type_prefix: None,
            sort_key: "sk".into(),
            skip_latched: true,
            skip_unchanged: true,
        }
    }
}

/// A record DynamoDB Streams delivered and CDC skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skipped {
    /// Written by a global-table replica in another region.
    Replica(String),
    /// Removed by TTL expiry.
    TtlDelete(String),
    /// Marked `latched` by the listener that wrote it.
    Latched(String),
    /// A `MODIFY` that changed nothing, or a global table's own bookkeeping write (the
    /// replica region attribute added to a row that had none).
    Unchanged(String),
}

#[derive(Deserialize)]
struct DynamoRecord<'a> {
    #[serde(rename = "eventID", borrow, default)]
    event_id: Option<&'a RawValue>,
    #[serde(rename = "eventName", borrow)]
    event_name: Cow<'a, str>,
    #[serde(rename = "awsRegion", borrow, default)]
    region: Option<Cow<'a, str>>,
    #[serde(rename = "eventSourceARN", borrow, default)]
    arn: Option<Cow<'a, str>>,
    #[serde(rename = "userIdentity", default)]
    user_identity: Option<UserIdentity>,
    dynamodb: Change,
}

#[derive(Deserialize)]
struct UserIdentity {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(rename = "principalId", default)]
    principal: Option<String>,
}

#[derive(Deserialize)]
struct Change {
    #[serde(rename = "ApproximateCreationDateTime", default)]
    created: Option<Box<RawValue>>,
    #[serde(rename = "Keys", default)]
    keys: Option<Value>,
    #[serde(rename = "NewImage", default)]
    new: Option<Value>,
    #[serde(rename = "OldImage", default)]
    old: Option<Value>,
    #[serde(rename = "SequenceNumber", default)]
    sequence: Option<Box<RawValue>>,
}

/// Whether the double `f` read from the decimal `text` is the same number: the significant
/// digits of the text (those a double always keeps, up to 15, or the ones it prints back).
fn holds_exactly(text: &str, f: f64) -> bool {
    fn significant(text: &str) -> String {
        let mantissa = text.split(['e', 'E']).next().unwrap_or_default();
        let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
        digits
            .trim_start_matches('0')
            .trim_end_matches('0')
            .to_owned()
    }
    let digits = significant(text);
    digits.len() <= 15 || digits == significant(&format!("{f:e}"))
}

/// A DynamoDB item (attribute name to typed value, as streams deliver it) as plain JSON, the
/// way `@aws-sdk/util-dynamodb`'s `unmarshall` reads it: numbers as numbers (an integer too
/// large for 64 bits, or a decimal with more digits than a double keeps, as its text, where
/// `unmarshall` refuses it, rather than rounded), sets and
/// lists as arrays, binary as base64 text.
///
/// # Errors
/// What is not a typed value, by its path.
pub fn unmarshall(item: &Value) -> Result<Value, String> {
    fn attribute(path: &str, value: &Value) -> Result<Value, String> {
        let Value::Object(typed) = value else {
            return Err(format!("{path} is not a typed value"));
        };
        let mut entries = typed.iter();
        let (Some((kind, inner)), None) = (entries.next(), entries.next()) else {
            return Err(format!("{path} must have exactly one type"));
        };
        let number = |n: &Value| -> Result<Value, String> {
            let text = n
                .as_str()
                .ok_or_else(|| format!("{path}: N must be a string"))?;
            if let Ok(n) = text.parse::<i64>() {
                return Ok(Value::from(n));
            }
            if let Ok(n) = text.parse::<u64>() {
                return Ok(Value::from(n));
            }
            let integer = text.bytes().all(|b| b.is_ascii_digit() || b == b'-');
            // A decimal with more digits than a double holds (DynamoDB keeps 38) stays text,
            // as an integer too large does: rounded, it would be another number, unsaid.
            Ok(text
                .parse::<f64>()
                .ok()
                .filter(|f| !integer && holds_exactly(text, *f))
                .and_then(serde_json::Number::from_f64)
                .map_or_else(|| Value::String(text.to_owned()), Value::Number))
        };
        let list = || -> Result<&Vec<Value>, String> {
            inner
                .as_array()
                .ok_or_else(|| format!("{path}: {kind} must be an array"))
        };
        match kind.as_str() {
            "S" | "B" => match inner {
                Value::String(_) => Ok(inner.clone()),
                _ => Err(format!("{path}: {kind} must be a string")),
            },
            "N" => number(inner),
            "BOOL" => match inner {
                Value::Bool(_) => Ok(inner.clone()),
                _ => Err(format!("{path}: BOOL must be true or false")),
            },
            "NULL" => Ok(Value::Null),
            "SS" | "BS" => Ok(Value::Array(list()?.clone())),
            "NS" => list()?
                .iter()
                .map(number)
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array),
            "L" => list()?
                .iter()
                .enumerate()
                .map(|(i, v)| attribute(&format!("{path}[{i}]"), v))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array),
            "M" => map(path, inner),
            other => Err(format!("{path}: unknown type {other}")),
        }
    }
    fn map(path: &str, value: &Value) -> Result<Value, String> {
        let Value::Object(attributes) = value else {
            return Err(if path.is_empty() {
                "not a map of attributes".to_owned()
            } else {
                format!("{path} is not a map of attributes")
            });
        };
        attributes
            .iter()
            .map(|(name, v)| {
                let at = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}.{name}")
                };
                Ok((name.clone(), attribute(&at, v)?))
            })
            .collect::<Result<Map<String, Value>, String>>()
            .map(Value::Object)
    }
    map("", item)
}

fn truthy(value: Option<&Value>) -> bool {
    matches!(value, Some(Value::Bool(true)))
}

/// Whether JavaScript would take `value` for true, as aws-lambda-stream's `outLatched` reads
/// `latched`: a latch another writer set as `1` or `"true"` holds as well.
fn js_truthy(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(_) | Value::Object(_)) => true,
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A DynamoDB stream record as a change event, the way users of `aws-lambda-stream` know them
/// (see [`CdcOptions`]): the old and new images under `raw` (`new`, `old`, each left out when
/// the record lacks it), the keys under `keys`, the stream's event id as the id. A replica's or TTL record is skipped (`Err`).
fn dynamodb(
    i: u64,
    raw: &RawValue,
    options: &CdcOptions,
    region: Option<&str>,
) -> Result<Record, (String, Skipped)> {
    let name = "MalformedDynamoDbRecord";
    let r: DynamoRecord<'_> = match parse(raw, i, "dynamodb", name, "a DynamoDB stream record") {
        Ok(r) => r,
        Err(bad) => return Ok(*bad),
    };
    let table = arn_name(r.arn.as_deref()).to_owned();
    let source = format!("dynamodb:{table}");
    let event_id = loose(r.event_id).unwrap_or_else(|| format!("{table}-{i}"));
    let sequence = loose(r.dynamodb.sequence.as_deref()).unwrap_or_else(|| i.to_string());
    // A record read this far is named as the stream names it, malformed or not: were its
    // fault not stored, it is reported by its sequence number, in its place in the stream.
    let malformed = |source: String, i, raw, name, why| {
        let mut record = malformed(source, i, raw, name, why);
        record.partition = "stream".into();
        record.with_sequence(sequence.clone())
    };
    let image = |which: &str, item: &Option<Value>| match item {
        None => Ok(Value::Null),
        Some(item) => unmarshall(item).map_err(|e| format!("dynamodb.{which}: {e}")),
    };
    let images = (|| {
        Ok::<_, String>((
            image("NewImage", &r.dynamodb.new)?,
            image("OldImage", &r.dynamodb.old)?,
            image("Keys", &r.dynamodb.keys)?,
        ))
    })();
    let (new, old, keys) = match images {
        Ok(images) => images,
        Err(why) => return Ok(malformed(source, i, raw, name, why)),
    };
    let empty = |v: &Value| v.as_object().is_none_or(Map::is_empty);
    // What a Floodway row store keeps for order tolerance is not the row's.
    let (mut new, mut old) = (new, old);
    for image in [&mut new, &mut old] {
        if let Some(map) = image.as_object_mut() {
            map.remove(floodway::rows::STORE_ATTRIBUTE);
        }
    }
    let (new, old) = (
        if empty(&new) { Value::Null } else { new },
        if empty(&old) { Value::Null } else { old },
    );
    if let Some(region) = region {
        let written_in = |row: &Value| {
            row.get("aws:rep:updateregion")
                .or_else(|| row.get("awsregion"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let writer = written_in(&new).or_else(|| written_in(&old));
        if writer.is_some_and(|w| w != region) {
            return Err((sequence, Skipped::Replica(event_id)));
        }
    }
    let ttl = r.user_identity.as_ref().is_some_and(|u| {
        u.kind.as_deref() == Some("Service")
            && u.principal.as_deref() == Some("dynamodb.amazonaws.com")
    });
    if ttl && !options.keep_ttl_deletes {
        return Err((sequence, Skipped::TtlDelete(event_id)));
    }
    let row = if new.is_null() { &old } else { &new };
    if options.skip_latched && js_truthy(row.get("latched")) {
        return Err((sequence, Skipped::Latched(event_id)));
    }
    if r.event_name == "MODIFY" && options.skip_unchanged {
        let marked = |row: &Value| {
            row.get("awsregion").is_some() || row.get("aws:rep:updateregion").is_some()
        };
        // aws-lambda-stream's `outGlobalTableExtraModify`: the replica marker written after
        // the row, and nothing else changed (a row written before without the marker and
        // updated now by the service, which adds it, is a change).
        let unmarked = |row: &Value| {
            let mut row = row.clone();
            if let Some(map) = row.as_object_mut() {
                map.retain(|k, _| k != "awsregion" && !k.starts_with("aws:rep:"));
            }
            row
        };
        let bookkeeping =
            marked(&new) && !old.is_null() && !marked(&old) && unmarked(&new) == unmarked(&old);
        // Unchanged only when both images say so: a stream without images (KEYS_ONLY)
        // carries none, and its every change must go through.
        let same = !new.is_null() && new == old;
        if same || bookkeeping {
            return Err((sequence, Skipped::Unchanged(event_id)));
        }
    }
    let now_deleted = truthy(new.get(&options.deleted));
    let was_deleted = truthy(old.get(&options.deleted));
    let suffix = match r.event_name.as_ref() {
        "REMOVE" => "deleted",
        _ if now_deleted => "deleted",
        _ if was_deleted => "undeleted",
        "INSERT" => "created",
        "MODIFY" => "updated",
        other => {
            let why = format!("eventName {other:?} is none of INSERT, MODIFY, REMOVE");
            return Ok(malformed(source, i, raw, name, why));
        }
    };
    let discriminator = match &options.event_type_prefix {
        Some(prefix) => prefix.clone(),
        None => row
            .get(&options.discriminator)
            .or_else(|| row.get(&options.sort_key))
            // Without images (KEYS_ONLY), the sort key is in the keys.
            .or_else(|| keys.get(&options.sort_key))
            .map(text)
            .unwrap_or_else(|| "row".into())
            .to_lowercase(),
    };
    let partition_key = match keys.get(&options.partition_key) {
        Some(pk) => text(pk),
        None => match &keys {
            Value::Object(map) if !map.is_empty() => {
                let mut parts: Vec<(&String, String)> =
                    map.iter().map(|(k, v)| (k, text(v))).collect();
                parts.sort();
                parts
                    .into_iter()
                    .map(|(_, v)| v)
                    .collect::<Vec<_>>()
                    .join("|")
            }
            _ => event_id.clone(),
        },
    };
    // A removal has no new image: its time is the stream record's, not the last write's
    // (which would tie with that write's event in a latest-wins view). The stream's time is
    // in seconds, as a number or text.
    let stream_time = loose(r.dynamodb.created.as_deref())
        .and_then(|t| t.parse::<f64>().ok())
        .map_or_else(floodway::event::now_millis, |s| (s * 1000.0).round() as i64);
    let timestamp = new
        .get(&options.timestamp)
        .and_then(Value::as_i64)
        .unwrap_or(stream_time);
    // As aws-lambda-stream has them: an image the record lacks is left out.
    let mut raw_images = Map::new();
    for (name, image) in [("new", new), ("old", old)] {
        if !image.is_null() {
            raw_images.insert(name.into(), image);
        }
    }
    let mut event = Event::builder(format!("{discriminator}-{suffix}"), partition_key)
        .id(event_id)
        .timestamp(timestamp)
        .tag("source", source.clone());
    if let Some(region) = r.region.as_deref() {
        event = event.tag("region", region);
    }
    let event = event
        .field("raw", Value::Object(raw_images))
        .field("keys", keys)
        .build();
    // Two images of up to 400 KB each, with their JSON, may pass the 1 MiB an event may
    // have; the invocation's own limit bounds them (aws-lambda-stream takes them too).
    Ok(
        Record::new(source, "stream", i, Bytes::from(event.to_json()))
            .with_sequence(sequence)
            .assembled(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kinesis_data_is_read_with_escapes_and_anything_else_is_malformed() {
        // `?>?` encodes to `Pz4/`: a writer may escape its slash as `\/`.
        let invocation = |data: &str| {
            format!(
                r#"{{"Records":[{{"eventSource":"aws:kinesis","eventID":"shardId-1:1","kinesis":{{"sequenceNumber":"1","data":"{data}"}}}}]}}"#
            )
        };
        for data in ["Pz4/", r"Pz4\/"] {
            let read = read(invocation(data).as_bytes(), &CdcOptions::default()).unwrap();
            assert_eq!(&read.records[0].data[..], b"?>?", "{data}");
            assert!(read.records[0].malformed.is_none());
        }
        for data in ["Pz4é", r"Pz4\u0001", r"Pz4\t"] {
            let read = read(invocation(data).as_bytes(), &CdcOptions::default()).unwrap();
            let malformed = read.records[0].malformed.as_ref().expect(data);
            assert!(
                malformed.message.contains("not base64"),
                "{data}: {malformed:?}"
            );
        }
    }

    /// The names kept from one record to the next are those of the record before: records of
    /// two streams and shards in turn each get their own.
    #[test]
    fn each_record_is_named_by_its_own_stream_and_shard() {
        let record = |stream: &str, shard: &str, sequence: u32| {
            json!({
                "eventSource": "aws:kinesis",
                "eventSourceARN": format!("arn:aws:kinesis:eu-west-1:123456789012:stream/{stream}"),
                "eventID": format!("{shard}:{sequence}"),
                "kinesis": {"sequenceNumber": sequence.to_string(), "data": "e30="},
            })
        };
        let records = vec![
            record("orders", "shardId-000000000000", 1),
            record("orders", "shardId-000000000000", 2),
            record("orders", "shardId-000000000001", 3),
            record("payments", "shardId-000000000001", 4),
            record("payments", "shardId-0000000000", 5),
            record("orders", "shardId-000000000000", 6),
        ];
        let payload = json!({ "Records": records }).to_string();
        let read = read(payload.as_bytes(), &CdcOptions::default()).unwrap();
        let names: Vec<(&str, &str, &str)> = read
            .records
            .iter()
            .map(|r| (&*r.source, &*r.partition, r.sequence.as_deref().unwrap()))
            .collect();
        assert_eq!(
            names,
            [
                ("kinesis:orders", "shardId-000000000000", "1"),
                ("kinesis:orders", "shardId-000000000000", "2"),
                ("kinesis:orders", "shardId-000000000001", "3"),
                ("kinesis:payments", "shardId-000000000001", "4"),
                ("kinesis:payments", "shardId-0000000000", "5"),
                ("kinesis:orders", "shardId-000000000000", "6"),
            ]
        );
    }

    #[test]
    fn an_owned_payload_reads_as_a_borrowed_one_its_records_decoded_where_their_text_was() {
        let record = |i: usize, data: &str| {
            format!(
                r#"{{"eventSource":"aws:kinesis","eventID":"shardId-{s}:{i}","eventSourceARN":"arn:aws:kinesis:us-west-2:1:stream/orders","kinesis":{{"sequenceNumber":"{i}","data":"{data}"}}}}"#,
                s = i % 2
            )
        };
        let b64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
        // Each record's text differs from the others'; the last is empty.
        let texts: Vec<String> = (0..6)
            .map(|i| match i {
                5 => String::new(),
                _ => b64(&format!(
                    r#"{{"id":"{i}","type":"t","n":"{}"}}"#,
                    "x".repeat(i * 7)
                )),
            })
            .collect();
        let good: Vec<String> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| record(i, t))
            .collect();
        let resubmission = r#","floodway":{"pipeline":"p"}"#;
        let batch = |records: &[String], tail: &str| {
            format!(r#"{{"Records":[{}]{tail}}}"#, records.join(","))
        };
        let with = |at: usize, data: &str, tail: &str| {
            let mut records = good.clone();
            records[at] = record(at, data);
            batch(&records, tail)
        };
        let cases = [
            ("well formed", batch(&good, ""), true),
            ("a resubmission", batch(&good, resubmission), true),
            ("an escaped slash", with(2, r"Pz4\/", ""), false),
            ("data that is not base64", with(3, "!!not base64!!", ""), false),
            ("truncated base64", with(4, "eyJpZCI", ""), false),
            (
                "a resubmission whose data is not base64",
                with(3, "!!not base64!!", resubmission),
                false,
            ),
            (
                "no data",
                with(1, "", "").replace(r#","data":"""#, ""),
                false,
            ),
            (
                "SQS",
                r#"{"Records":[{"eventSource":"aws:sqs","messageId":"m","body":"{\"id\":\"1\",\"type\":\"t\"}"}]}"#.to_owned(),
                false,
            ),
        ];
        for (case, payload, in_place) in cases {
            let cdc = CdcOptions::default();
            let borrowed = read(payload.as_bytes(), &cdc).unwrap();
            // Where each record's text begins in the payload, when it is one of `texts`.
            let places: Vec<Option<usize>> = texts
                .iter()
                .map(|t| payload.find(&format!(r#""data":"{t}""#)).map(|at| at + 8))
                .collect();
            let bytes = payload.into_bytes();
            let text = bytes.as_ptr_range();
            let (start, end) = (text.start as usize, text.end as usize);
            let owned = read_owned(bytes, &cdc).unwrap();
            assert_eq!(owned.records, borrowed.records, "{case}");
            assert_eq!(owned.kind, borrowed.kind, "{case}");
            assert_eq!(owned.resubmit_to, borrowed.resubmit_to, "{case}");
            for (i, r) in owned.records.iter().enumerate() {
                if r.data.is_empty() {
                    continue;
                }
                let at = r.data.as_ptr() as usize;
                if in_place {
                    // Decoded where its own text began.
                    assert_eq!(Some(at - start), places[i], "{case}: record {i}");
                } else {
                    assert!(!(start..end).contains(&at), "{case}: record {i}");
                }
            }
        }
    }

    #[test]
    fn items_unmarshall_as_util_dynamodb_reads_them() {
        let item = json!({
            "pk": {"S": "a"}, "n": {"N": "5"}, "f": {"N": "1.5"}, "big": {"N": "123456789012345678901234567890"},
            "fine": {"N": "-0.000123456789012345e-3"}, "precise": {"N": "12345678901234567890.5"},
            "ok": {"BOOL": true}, "none": {"NULL": true}, "ss": {"SS": ["x", "y"]}, "ns": {"NS": ["1", "2"]},
            "l": {"L": [{"S": "v"}, {"N": "3"}]}, "m": {"M": {"inner": {"S": "w"}}}, "b": {"B": "AAE="}
        });
        assert_eq!(
            unmarshall(&item).unwrap(),
            json!({
                "pk": "a", "n": 5, "f": 1.5, "big": "123456789012345678901234567890", "ok": true, "none": null,
                "fine": -0.000000123456789012345, "precise": "12345678901234567890.5",
                "ss": ["x", "y"], "ns": [1, 2], "l": ["v", 3], "m": {"inner": "w"}, "b": "AAE="
            })
        );
    }

    #[test]
    fn a_malformed_attribute_is_named_by_its_path() {
        let err = unmarshall(&json!({"m": {"M": {"x": {"N": 5}}}})).unwrap_err();
        assert_eq!(err, "m.x: N must be a string");
        let err = unmarshall(&json!({"a": {"S": "x", "N": "1"}})).unwrap_err();
        assert_eq!(err, "a must have exactly one type");
        let err = unmarshall(&json!({"a": {"Q": "x"}})).unwrap_err();
        assert_eq!(err, "a: unknown type Q");
    }

    #[test]
    fn loose_fields_take_numbers_and_text() {
        let raw = |s: &str| RawValue::from_string(s.to_owned()).unwrap();
        assert_eq!(loose(Some(&raw("\"12\""))).as_deref(), Some("12"));
        assert_eq!(loose(Some(&raw("12"))).as_deref(), Some("12"));
        assert_eq!(loose(Some(&raw("null"))), None);
        assert_eq!(loose(Some(&raw("{}"))), None);
        assert_eq!(loose(None), None);
        assert_eq!(loose(Some(&raw(r#""a\"b""#))).as_deref(), Some("a\"b"));
        assert_eq!(loose_str(Some("\"12\"")), Some(Cow::Borrowed("12")));
    }

    fn change(name: &str, new: Option<Value>, old: Option<Value>) -> Value {
        let mut change = json!({ "Keys": { "pk": { "S": "1" } }, "SequenceNumber": "1" });
        if let Some(new) = new {
            change["NewImage"] = new;
        }
        if let Some(old) = old {
            change["OldImage"] = old;
        }
        json!({ "eventSource": "aws:dynamodb", "eventID": "d-1", "eventName": name, "dynamodb": change })
    }

    fn row(extra: Value) -> Value {
        let mut row = json!({ "pk": { "S": "1" }, "sk": { "S": "Thing" }, "name": { "S": "n" } });
        for (k, v) in extra.as_object().unwrap() {
            row[k] = v.clone();
        }
        row
    }

    fn types(records: Vec<Value>, options: &CdcOptions) -> (Vec<String>, usize) {
        let payload = serde_json::to_vec(&json!({ "Records": records })).unwrap();
        let invocation = read(&payload, options).unwrap();
        let types = invocation
            .records
            .iter()
            .map(|r| Event::decode(&r.data).unwrap().event_type().to_owned())
            .collect();
        (types, invocation.skipped.len())
    }

    #[test]
    fn change_data_capture_takes_aws_lambda_stream_options() {
        let options = CdcOptions {
            region: Some("us-west-2".into()),
            ..CdcOptions::default()
        };
        let latched = json!({ "latched": { "BOOL": true } });
        let records = vec![
            change("INSERT", Some(row(json!({}))), None),
            change("INSERT", Some(row(latched.clone())), None),
            change("MODIFY", Some(row(json!({}))), Some(row(json!({})))),
            change(
                "MODIFY",
                Some(row(json!({ "awsregion": { "S": "us-west-2" } }))),
                Some(row(json!({}))),
            ),
            change(
                "MODIFY",
                Some(row(json!({ "name": { "S": "m" } }))),
                Some(row(json!({}))),
            ),
            // A row written without the marker, updated by the service that adds it: a change.
            change(
                "MODIFY",
                Some(row(
                    json!({ "name": { "S": "m" }, "awsregion": { "S": "us-west-2" } }),
                )),
                Some(row(json!({}))),
            ),
        ];
        // The sort key names the type when there is no discriminator; a latched row, a write
        // that changed nothing and a global table's bookkeeping write are skipped.
        assert_eq!(
            types(records.clone(), &options),
            (
                vec![
                    "thing-created".into(),
                    "thing-updated".into(),
                    "thing-updated".into()
                ],
                3
            )
        );
        let keep_all = CdcOptions {
            skip_latched: false,
            skip_unchanged: false,
            event_type_prefix: Some("widget".into()),
            ..options
        };
        let (all, skipped) = types(records, &keep_all);
        assert_eq!((all.len(), skipped), (6, 0));
        assert!(all.iter().all(|t| t.starts_with("widget-")), "{all:?}");
    }

    /// A stream without images (KEYS_ONLY): every change goes through, named by the sort key
    /// in its keys; and a latch set as another writer sets it (`1`, `"true"`) holds.
    #[test]
    fn changes_without_images_go_through_and_latches_are_read_as_javascript_does() {
        let keys_only = |name: &str| {
            let mut record = change(name, None, None);
            record["dynamodb"]["Keys"]["sk"] = json!({ "S": "Thing" });
            record
        };
        let records = vec![
            keys_only("INSERT"),
            keys_only("MODIFY"),
            keys_only("REMOVE"),
        ];
        assert_eq!(
            types(records, &CdcOptions::default()),
            (
                vec![
                    "thing-created".into(),
                    "thing-updated".into(),
                    "thing-deleted".into()
                ],
                0
            )
        );
        let latched = |latch: Value| change("INSERT", Some(row(json!({ "latched": latch }))), None);
        let records = vec![
            latched(json!({ "N": "1" })),
            latched(json!({ "S": "true" })),
            latched(json!({ "NULL": true })),
            latched(json!({ "BOOL": false })),
            latched(json!({ "N": "0" })),
        ];
        let (kept, skipped) = types(records, &CdcOptions::default());
        assert_eq!((kept.len(), skipped), (3, 2), "{kept:?}");
    }

    mod base64_decoding {
        use super::*;
        use proptest::prelude::*;

        /// The SIMD decoder answers as the `base64` crate's standard engine does, appending
        /// to what the buffer holds, and leaves the buffer as it was on an error.
        fn agrees(text: &[u8]) {
            let expected = base64::engine::general_purpose::STANDARD.decode(text);
            let mut out = b"kept".to_vec();
            let got = decode_base64(text, &mut out);
            match expected {
                Ok(bytes) => {
                    assert!(got.is_ok(), "{:?} refused", String::from_utf8_lossy(text));
                    assert_eq!(&out[..4], b"kept");
                    assert_eq!(out[4..], bytes[..]);
                }
                Err(_) => {
                    assert!(got.is_err(), "{:?} accepted", String::from_utf8_lossy(text));
                    assert_eq!(out, b"kept");
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(4000))]

            #[test]
            fn encoded_bytes(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
                agrees(base64::engine::general_purpose::STANDARD.encode(bytes).as_bytes());
            }

            /// Encoded text with one byte replaced, inserted or cut: padding in the middle,
            /// trailing bits that are not zero, lengths that are not a multiple of four,
            /// characters outside the alphabet.
            #[test]
            fn damaged_text(
                bytes in prop::collection::vec(any::<u8>(), 0..200),
                at in any::<prop::sample::Index>(),
                byte in prop::sample::select(b"AQgw+/=-_ \n\"\0\xff".to_vec()),
                how in 0..3u8,
            ) {
                let mut text = base64::engine::general_purpose::STANDARD.encode(bytes).into_bytes();
                let i = at.index(text.len() + 1);
                match how {
                    0 if i < text.len() => text[i] = byte,
                    1 => text.insert(i, byte),
                    _ => text.truncate(i),
                }
                agrees(&text);
            }
        }
    }

    /// The scanned fast path against serde_json's, on generated and damaged invocations.
    mod scanned {
        use super::*;
        use proptest::prelude::*;

        type Seen = (
            Option<String>,
            Option<String>,
            Option<String>,
            Vec<u8>,
            Option<String>,
        );

        fn seen(records: &[KinesisRecord<'_>]) -> Vec<Seen> {
            records
                .iter()
                .map(|r| {
                    (
                        r.source.as_deref().map(str::to_owned),
                        r.event_id.as_deref().map(str::to_owned),
                        r.arn.as_deref().map(str::to_owned),
                        r.kinesis.data.as_bytes().to_vec(),
                        r.kinesis.sequence.map(str::to_owned),
                    )
                })
                .collect()
        }

        /// Whenever the scanner answers, serde_json reads the same records.
        fn agrees(text: &str) {
            if let Some(records) = kinesis_scanned(text.as_bytes(), 1) {
                let top = kinesis_serde(text.as_bytes(), 1).unwrap_or_else(|| {
                    panic!("serde_json refused what the scanner read: {text:?}")
                });
                assert!(top.floodway.is_none());
                assert_eq!(seen(&records), seen(&top.records), "{text:?}");
            }
        }

        /// The JSON text of a string member: plain, escaped, null or not a string.
        fn text_value() -> impl Strategy<Value = String> {
            prop_oneof![
                4 => "[a-zA-Z0-9:/._-]{0,20}".prop_map(|s| format!("\"{s}\"")),
                1 => any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
                1 => Just("null".to_owned()),
                1 => Just("5".to_owned()),
            ]
        }

        fn data_value() -> impl Strategy<Value = String> {
            prop_oneof![
                6 => prop::collection::vec(any::<u8>(), 0..40).prop_map(|bytes| {
                    format!("\"{}\"", base64::engine::general_purpose::STANDARD.encode(bytes))
                }),
                1 => prop::collection::vec(any::<u8>(), 0..40).prop_map(|bytes| {
                    let text = base64::engine::general_purpose::STANDARD.encode(bytes);
                    format!("\"{}\"", text.replace('/', "\\/"))
                }),
                1 => Just("null".to_owned()),
                1 => Just("\"not base64!\"".to_owned()),
            ]
        }

        fn sequence_value() -> impl Strategy<Value = String> {
            prop_oneof![
                "[0-9]{1,30}".prop_map(|s| format!("\"{s}\"")),
                "[1-9][0-9]{0,15}",
                Just("null".to_owned()),
                Just("{\"n\": 1}".to_owned()),
            ]
        }

        fn join(mut members: Vec<(String, String)>, shuffle: &[usize], space: &str) -> String {
            for (i, &j) in shuffle.iter().enumerate() {
                let (a, b) = (i % members.len().max(1), j % members.len().max(1));
                if a < members.len() && b < members.len() {
                    members.swap(a, b);
                }
            }
            let members: Vec<String> = members
                .into_iter()
                .map(|(k, v)| format!("{space}\"{k}\"{space}:{space}{v}"))
                .collect();
            format!("{{{}{space}}}", members.join(","))
        }

        fn record() -> impl Strategy<Value = String> {
            let kinesis = (
                data_value(),
                prop::option::of(sequence_value()),
                any::<bool>(),
                prop::collection::vec(0usize..4, 0..4),
            )
                .prop_map(|(data, sequence, extra, shuffle)| {
                    let mut members = vec![("data".to_owned(), data)];
                    if let Some(sequence) = sequence {
                        members.push(("sequenceNumber".into(), sequence));
                    }
                    if extra {
                        members.push(("partitionKey".into(), "\"o-1\"".into()));
                        members.push(("approximateArrivalTimestamp".into(), "1.7e9".into()));
                    }
                    join(members, &shuffle, "")
                });
            (
                prop::sample::select(vec!["eventSource", "EventSource"]),
                text_value(),
                prop::option::of(text_value()),
                prop::option::of(text_value()),
                prop::option::of(kinesis),
                any::<bool>(),
                prop::collection::vec(0usize..8, 0..6),
                prop::sample::select(vec!["", " ", "\n  "]),
            )
                .prop_map(|(name, source, id, arn, kinesis, twice, shuffle, space)| {
                    let mut members = vec![(name.to_owned(), source)];
                    if let Some(id) = id {
                        members.push(("eventID".into(), id));
                    }
                    if let Some(arn) = arn {
                        members.push(("eventSourceARN".into(), arn));
                    }
                    if let Some(kinesis) = kinesis {
                        members.push(("kinesis".into(), kinesis));
                    }
                    members.push(("eventVersion".into(), "\"1.0\"".into()));
                    if twice {
                        members.push(("eventID".into(), "\"again\"".into()));
                    }
                    join(members, &shuffle, space)
                })
        }

        fn invocation() -> impl Strategy<Value = String> {
            (
                prop::collection::vec(record(), 0..4),
                prop::sample::select(vec![
                    "",
                    "\"floodway\":{\"pipeline\":\"p\"},",
                    "\"x\":[1,{}],",
                ]),
            )
                .prop_map(|(records, before)| {
                    format!("{{{before}\"Records\":[{}]}}", records.join(","))
                })
        }

        #[test]
        fn reads_an_invocation_as_serde_json_does() {
            let text = r#"{"Records":[{"kinesis":{"kinesisSchemaVersion":"1.0","partitionKey":"o-1","sequenceNumber":"4959","data":"Pz4/","approximateArrivalTimestamp":1.7e9},"eventSource":"aws:kinesis","eventVersion":"1.0","eventID":"shardId-000:4959","eventName":"aws:kinesis:record","awsRegion":"us-east-1","eventSourceARN":"arn:aws:kinesis:us-east-1:1:stream/orders"}]}"#;
            let records = kinesis_scanned(text.as_bytes(), 1).expect("read by the scanner");
            assert_eq!(records[0].kinesis.data.as_bytes(), b"Pz4/");
            assert_eq!(records[0].kinesis.sequence, Some("\"4959\""));
            agrees(text);
            // Left to serde_json: an escaped slash in the data, a resubmission, a repeat.
            for other in [
                text.replace("Pz4/", r"Pz4\/"),
                text.replace(
                    "{\"Records\"",
                    "{\"floodway\":{\"pipeline\":\"p\"},\"Records\"",
                ),
                text.replace("\"eventVersion\"", "\"eventID\":\"x\",\"eventVersion\""),
            ] {
                assert!(kinesis_scanned(other.as_bytes(), 1).is_none(), "{other}");
                agrees(&other);
            }
        }

        proptest! {
            #[test]
            fn agrees_with_serde_json(text in invocation()) {
                agrees(&text);
                if !text.contains('\\') && !text.contains("floodway") && !text.contains("again") {
                    if let Some(top) = kinesis_serde(text.as_bytes(), 1) {
                        let counts = |name: &str| text.matches(&format!("\"{name}\"")).count();
                        let repeated = counts("eventSource") + counts("EventSource") > top.records.len();
                        prop_assert!(repeated || kinesis_scanned(text.as_bytes(), 1).is_some(), "gave up on {text:?}");
                    }
                }
            }

            #[test]
            fn agrees_with_serde_json_on_damaged_invocations(
                text in invocation(),
                cut in any::<usize>(),
                insert in any::<usize>(),
                byte in prop::sample::select(b"{}[]\",:\\ 0-.eEtfnu\x01x".to_vec()),
            ) {
                for damaged in floodway::scan::damaged(&text, cut, insert, byte) {
                    agrees(&damaged);
                }
            }
        }
    }
}
