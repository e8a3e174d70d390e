//! Fault events: the record of a unit of work that cannot be processed.
//!
//! A fault is a normal event of type `fault`, so it travels through the same hub as every other
//! event and a fault monitor stores it. Its **fault id** (`faultId`, read it with [`fault_id`])
//! is a stable hash of where the record came from and where it failed (source, partition,
//! position, processor, pipeline, step, the part of a split record, the record's bytes; not
//! the event as the steps left it, which an enrichment may change from run to run): a fault
//! raised twice, after a crash and redelivery, or by a replay, is stored as one fault raised
//! twice.
//!
//! The event's own `id` names this **raise**: it is new every time the fault is raised. Hubs
//! publish idempotently by event id within a dedupe window, so a raise published twice (a
//! retried publish) is stored once, while a fault raised again inside the window still
//! reaches the fault store, which counts it, updates its last error and reopens it if it was
//! resolved (aws-lambda-stream gives every fault event a fresh id too).
//!
//! ```json
//! {
//!   "id": "51aa...", "faultId": "9f0c...",
//!   "type": "fault", "timestamp": 1700000000000, "partitionKey": "o-1",
//!   "tags": {"processor": "orders", "pipeline": "materialize", "step": "validate-2",
//!            "source": "hub:floodway.db"},
//!   "err": {"name": "InvalidPayload", "message": "...", "class": "poison", "attempts": 1},
//!   "uow": {
//!     "record": {"source": "hub:floodway.db", "partition": "3", "offset": 1042, "attempt": 1,
//!                "encoding": "utf8", "data": "{\"id\":...}"},
//!     "event": {"id": "...", "type": "order-submitted", "customer": {"email": "[REDACTED]"}}
//!   }
//! }
//! ```
//!
//! `uow.record` is the source record verbatim (UTF-8 text, or base64 when it is not UTF-8), so
//! that resubmission replays exactly what failed; `uow.event` is the decoded event with the
//! pipeline's sensitive fields redacted, for people to read.

use std::borrow::Cow;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::error::Error;
use crate::event::{now_millis, stable_id, Event, FAULT_EVENT_TYPE};
use crate::uow::Record;

/// Where a fault was raised.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FaultOrigin<'a> {
    pub(crate) processor: &'a str,
    pub(crate) pipeline: &'a str,
    pub(crate) step: &'a str,
}

/// The pipeline name used for faults raised before any pipeline saw the record (decoding).
pub const DECODE_PIPELINE: &str = "*";

/// The placeholder for redacted values.
pub const REDACTED: &str = "[REDACTED]";

fn redact(value: &mut Value, path: &str) {
    let parts: Vec<&str> = path.split('.').collect();
    at_path(value, &parts, &mut |v| *v = Value::String(REDACTED.into()));
}

/// Calls `f` with every value at the path `parts` (the names of a dotted path) in `value`,
/// going into each element of an array met on the way (`lines.card`: the card of every line).
fn at_path(value: &mut Value, parts: &[&str], f: &mut impl FnMut(&mut Value)) {
    match (value, parts.split_first()) {
        (v, None) => f(v),
        (Value::Array(items), Some(_)) => {
            for item in items {
                at_path(item, parts, f);
            }
        }
        (Value::Object(map), Some((first, rest))) => {
            if let Some(next) = map.get_mut(*first) {
                at_path(next, rest, f);
            }
        }
        _ => {}
    }
}

/// The fault id of a fault event: the same for every raise of one failure (see the
/// [module docs](self)). A fault event without one (written by an older Floodway or by
/// another library) is its own fault: its event id.
pub fn fault_id(fault: &Event) -> &str {
    // Read where it is written, without parsing the fault's other fields (the failed event
    // and record among them): a plain string borrowed from the fault's text.
    if let Some(std::borrow::Cow::Borrowed(text)) = fault.json_at("/faultId") {
        let plain = text.strip_prefix('"').and_then(|t| t.strip_suffix('"'));
        if let Some(id) = plain.filter(|id| !id.contains('\\')) {
            return id;
        }
    }
    fault
        .field("faultId")
        .and_then(Value::as_str)
        .unwrap_or_else(|| fault.id())
}

/// `message` with every redacted value of `event` replaced by the placeholder.
fn scrub<'m>(message: &'m str, event: &Event, paths: &[String]) -> std::borrow::Cow<'m, str> {
    let mut out = std::borrow::Cow::Borrowed(message);
    let mut value = event.to_value();
    for path in paths {
        let parts: Vec<&str> = path.split('.').collect();
        let mut found = Vec::new();
        at_path(&mut value, &parts, &mut |v| {
            collect_scalars(Some(v), &mut found)
        });
        if let std::borrow::Cow::Owned(scrubbed) = scrub_texts(&out, &found) {
            out = std::borrow::Cow::Owned(scrubbed);
        }
    }
    out
}

/// Appends `value` with everything but unreserved characters (RFC 3986) percent-encoded: as
/// the HTTP sink writes a field into a URL, and as a server echoing the URL shows it.
pub fn percent_encode(value: &str, out: &mut String) {
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
}

/// The forms a text can be echoed in by a service it was sent to: as it is, percent-encoded
/// (a URL's path, echoed by a 404 page), and as JSON strings write it: with `\u` escapes for
/// what is not ASCII (Python's and Django's answers), and with `/` as `\/` (PHP's).
pub fn echoed_forms(text: &str) -> Vec<String> {
    let mut forms = vec![text.to_string()];
    let mut encoded = String::new();
    percent_encode(text, &mut encoded);
    let json = Value::from(text).to_string();
    let json = &json[1..json.len() - 1];
    let mut ascii = String::new();
    for c in json.chars() {
        match c.is_ascii() {
            true => ascii.push(c),
            false => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    ascii.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    let slashed = [json.replace('/', "\\/"), ascii.replace('/', "\\/")];
    for form in [encoded, json.to_string(), ascii]
        .into_iter()
        .chain(slashed)
    {
        if !forms.contains(&form) {
            forms.push(form);
        }
    }
    forms
}

/// `message` with every one of `texts` (but empty ones) replaced by the placeholder, in every
/// form a service may echo it in ([`echoed_forms`]): the longest first, so that a secret
/// containing another (`ann@x.com` and `ann`) goes whole.
pub(crate) fn scrub_texts<'m>(message: &'m str, texts: &[String]) -> std::borrow::Cow<'m, str> {
    let mut out = std::borrow::Cow::Borrowed(message);
    let forms: Vec<String> = texts
        .iter()
        .filter(|t| !t.is_empty())
        .flat_map(|t| echoed_forms(t))
        .collect();
    let mut texts: Vec<&String> = forms.iter().collect();
    texts.sort_by_key(|t| std::cmp::Reverse(t.len()));
    for text in texts {
        if out.contains(text.as_str()) {
            out = std::borrow::Cow::Owned(out.replace(text.as_str(), REDACTED));
        }
    }
    out
}

/// The texts of the scalars in a value (an object's or array's, recursively).
pub(crate) fn collect_scalars(value: Option<&Value>, out: &mut Vec<String>) {
    match value {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => out.push(s.clone()),
        Some(Value::Array(items)) => items.iter().for_each(|v| collect_scalars(Some(v), out)),
        Some(Value::Object(map)) => map.values().for_each(|v| collect_scalars(Some(v), out)),
        Some(other) => out.push(other.to_string()),
    }
}

/// The source record, as a fault event carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRecord {
    /// The source.
    pub source: String,
    /// The partition.
    pub partition: String,
    /// The offset in the partition.
    pub offset: u64,
    /// The source's own record id, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<String>,
    /// The delivery attempt.
    pub attempt: u32,
    /// `utf8` or `base64`.
    pub encoding: String,
    /// The data, in that encoding; empty when the record is [redacted](Self::redacted).
    #[serde(default)]
    pub data: String,
    /// Whether the record's bytes were left out because the pipeline redacts fields: a
    /// redacted field appears nowhere in a fault, so the record is read back from its source
    /// by position when it is resubmitted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub redacted: bool,
    /// The size the fault had when its record's bytes were left out to fit a store with a
    /// size limit ([`fit`]); resubmission then reads the record back from its source by
    /// position, as for a redacted one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncated: Option<u64>,
}

/// A fault event in Floodway's shape: a Floodway fault as it is, and a fault event
/// aws-lambda-stream raised rewritten, so that fault stores keep both side by side and
/// `faults list` and `show` read both.
///
/// An aws-lambda-stream fault has no `faultId`, names its function in `tags.functionname`,
/// and keeps the Lambda record it failed verbatim in `uow.record`. The rewrite keeps its id,
/// time, tags, error and event, and adds what Floodway's faults carry: the function as the
/// processor, a fault id that is the same for every raise of one record in one pipeline, the
/// class `poison` (aws-lambda-stream faults what it does not retry), and the record in
/// Floodway's form (Kinesis data decoded, an SQS body, an SNS message, an EventBridge detail,
/// a DynamoDB record's change event), so that it can be resubmitted.
pub fn normalized(fault: &Event) -> std::borrow::Cow<'_, Event> {
    use std::borrow::Cow;
    if fault.field("faultId").is_some() {
        return Cow::Borrowed(fault);
    }
    let Some(uow) = fault.field("uow") else {
        return Cow::Borrowed(fault);
    };
    let record = &uow["record"];
    if !record.is_object() || record.get("encoding").is_some() {
        return Cow::Borrowed(fault);
    }
    let err = fault.field("err").cloned().unwrap_or(Value::Null);
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let pipeline = uow["pipeline"]
        .as_str()
        .or_else(|| fault.tag("pipeline"))
        .unwrap_or("unknown")
        .to_owned();
    let processor = fault.tag("functionname").unwrap_or("unknown").to_owned();
    let record = lambda_record(record, uow.get("event"));
    let id = stable_id(&[
        "aws-lambda-stream",
        &record.source,
        &record.partition,
        record.sequence.as_deref().unwrap_or_default(),
        &processor,
        &pipeline,
    ]);
    let mut tags = fault.tags().cloned().unwrap_or_default();
    tags.insert("processor".into(), Value::String(processor));
    tags.insert("pipeline".into(), Value::String(pipeline));
    tags.insert("step".into(), Value::String("unknown".into()));
    tags.entry("source")
        .or_insert_with(|| Value::String(record.source.clone()));
    let rewritten = serde_json::json!({
        "id": fault.id(),
        "faultId": id,
        "type": FAULT_EVENT_TYPE,
        "timestamp": fault.timestamp(),
        "partitionKey": fault.partition_key(),
        "tags": tags,
        "err": {
            "name": text(&err["name"]),
            "message": text(&err["message"]),
            "class": "poison",
            "attempts": 1,
            "stack": err.get("stack").cloned().unwrap_or(Value::Null),
        },
        "uow": { "record": record, "event": uow.get("event").cloned().unwrap_or(Value::Null) },
    });
    match Event::from_value(rewritten) {
        Ok(event) => Cow::Owned(event),
        Err(_) => Cow::Borrowed(fault),
    }
}

/// A Lambda record (Kinesis, SQS, SNS, DynamoDB Streams, or an EventBridge event) in the form
/// of a Floodway fault's record: the bytes a Floodway handler would have read from it.
fn lambda_record(record: &Value, event: Option<&Value>) -> FaultRecord {
    let at = |pointer: &str| record.pointer(pointer).and_then(Value::as_str);
    let name_in = |arn: Option<&str>, sep: char| {
        arn.and_then(|a| match sep {
            '/' => a.split('/').nth(1),
            _ => a.rsplit(sep).next(),
        })
        .unwrap_or("unknown")
        .to_owned()
    };
    let json = |v: Option<&Value>| v.map(Value::to_string).unwrap_or_default().into_bytes();
    let source = at("/eventSource").or_else(|| at("/EventSource"));
    let (source, partition, sequence, data): (String, String, Option<String>, Vec<u8>) =
        match source {
            Some("aws:kinesis") => (
                format!("kinesis:{}", name_in(at("/eventSourceARN"), '/')),
                at("/eventID")
                    .and_then(|id| id.split(':').next())
                    .unwrap_or("shardId-unknown")
                    .to_owned(),
                at("/kinesis/sequenceNumber").map(str::to_owned),
                at("/kinesis/data")
                    .and_then(|d| base64::engine::general_purpose::STANDARD.decode(d).ok())
                    .unwrap_or_default(),
            ),
            Some("aws:sqs") => {
                let id = at("/messageId").unwrap_or("unknown").to_owned();
                (
                    format!("sqs:{}", name_in(at("/eventSourceARN"), ':')),
                    at("/attributes/MessageGroupId").map_or_else(|| id.clone(), str::to_owned),
                    Some(id),
                    at("/body").unwrap_or_default().as_bytes().to_vec(),
                )
            }
            Some("aws:sns") => {
                let id = at("/Sns/MessageId").unwrap_or("unknown").to_owned();
                (
                    format!("sns:{}", name_in(at("/Sns/TopicArn"), ':')),
                    id.clone(),
                    Some(id),
                    at("/Sns/Message").unwrap_or_default().as_bytes().to_vec(),
                )
            }
            Some("aws:dynamodb") => (
                format!("dynamodb:{}", name_in(at("/eventSourceARN"), '/')),
                "stream".to_owned(),
                at("/dynamodb/SequenceNumber").map(str::to_owned),
                // What a Floodway handler reads from a stream record: its change event.
                match event {
                    Some(e) if e.is_object() => json(Some(e)),
                    _ => json(Some(record)),
                },
            ),
            _ if record.get("detail-type").is_some() => {
                let from = at("/source").unwrap_or("unknown").to_owned();
                (
                    format!("eventbridge:{from}"),
                    from,
                    at("/id").map(str::to_owned),
                    json(record.get("detail")),
                )
            }
            _ => (
                "unknown".to_owned(),
                "unknown".to_owned(),
                None,
                json(Some(record)),
            ),
        };
    let (encoding, data) = match String::from_utf8(data) {
        Ok(text) => ("utf8", text),
        Err(e) => (
            "base64",
            base64::engine::general_purpose::STANDARD.encode(e.as_bytes()),
        ),
    };
    FaultRecord {
        source,
        partition,
        offset: 0,
        sequence,
        attempt: 1,
        encoding: encoding.to_owned(),
        data,
        redacted: false,
        truncated: None,
    }
}

/// Bytes of an error message a trimmed fault keeps at most.
const TRIMMED_MESSAGE: usize = 4096;

/// A fault event that fits in `max_bytes` when encoded: unchanged if it fits; else without
/// the decoded event (the record's bytes hold it); if that is not enough, without the
/// record's bytes too (`uow.record.truncated` holds the size the fault had); and if even that
/// is not enough, with the error's message cut to its first 4 KiB. For stores with a size
/// limit (a message, an item, an entry): storing a trimmed fault beats not storing it, which
/// would stop the processor. A fault without its record's bytes is resubmitted from its
/// source, which still holds the record (source, partition, position).
pub fn fit(fault: &Event, max_bytes: usize) -> Event {
    let size = fault.encoded_len();
    if size <= max_bytes {
        return fault.clone();
    }
    let mut fault = fault.clone();
    let Some(Value::Object(uow)) = fault.fields_mut().get_mut("uow") else {
        return fault;
    };
    uow.remove("event");
    if fault.encoded_len() <= max_bytes {
        return fault;
    }
    if let Some(Value::Object(uow)) = fault.fields_mut().get_mut("uow") {
        if let Some(Value::Object(record)) = uow.get_mut("record") {
            record.remove("data");
            record.insert("truncated".into(), size.into());
        }
    }
    if fault.encoded_len() <= max_bytes {
        return fault;
    }
    if let Some(Value::Object(err)) = fault.fields_mut().get_mut("err") {
        if let Some(Value::String(message)) = err.get_mut("message") {
            if let Cow::Owned(cut) = clipped(message, TRIMMED_MESSAGE) {
                *message = cut;
            }
        }
    }
    fault
}

/// `text` if it has at most `max_bytes` bytes, else its first `max_bytes` at most (cut at a
/// character's start) followed by ` [cut]`: an error message where space is short.
pub fn clipped(text: &str, max_bytes: usize) -> Cow<'_, str> {
    if text.len() <= max_bytes {
        return Cow::Borrowed(text);
    }
    let mut at = max_bytes;
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    Cow::Owned(format!("{} [cut]", &text[..at]))
}

impl FaultRecord {
    /// Whether the fault carries the record's bytes: not when its pipeline redacts fields,
    /// nor when it was trimmed to fit a store ([`fit`]).
    pub fn carried(&self) -> bool {
        !self.redacted && self.truncated.is_none()
    }

    /// The record's bytes, decoded from their encoding.
    ///
    /// # Errors
    /// When `data` is not valid for `encoding`.
    pub fn bytes(&self) -> Result<Vec<u8>, Error> {
        if !self.carried() {
            let (name, why) = match self.truncated {
                Some(size) => (
                    "RecordTrimmed",
                    format!("the fault was trimmed to fit its store (it had {size} bytes)"),
                ),
                None => ("RecordRedacted", "its pipeline redacts fields".to_owned()),
            };
            return Err(Error::poison_msg(
                name,
                format!(
                    "the fault does not carry the record ({why}): read it from {} partition {} \
                     at {}",
                    self.source,
                    self.partition,
                    self.sequence
                        .clone()
                        .unwrap_or_else(|| self.offset.to_string())
                ),
            ));
        }
        match self.encoding.as_str() {
            "base64" => base64::engine::general_purpose::STANDARD
                .decode(&self.data)
                .map_err(Error::poison),
            _ => Ok(self.data.clone().into_bytes()),
        }
    }
}

/// The fields of a fault event, typed (read one with [`Event::payload`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultDetails {
    /// The error.
    pub err: FaultError,
    /// The unit of work.
    pub uow: FaultUow,
}

/// The error of a fault event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultError {
    /// The error's name.
    pub name: String,
    /// The message.
    pub message: String,
    /// The error class (`poison`, `transient` when retries ran out while the target was
    /// otherwise healthy).
    pub class: String,
    /// Attempts made.
    pub attempts: u32,
}

/// The unit of work of a fault event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultUow {
    /// The source record verbatim.
    pub record: FaultRecord,
    /// The decoded event, redacted; absent when the record could not be decoded.
    #[serde(default)]
    pub event: Option<Value>,
}

/// A fault event as written: serialized in one pass from borrowed parts, then decoded like any
/// other event, so that raising a fault builds no JSON tree (it costs a few microseconds).
#[derive(Serialize)]
struct FaultOut<'a> {
    id: &'a str,
    #[serde(rename = "faultId")]
    fault_id: &'a str,
    #[serde(rename = "type")]
    ty: &'static str,
    timestamp: i64,
    #[serde(rename = "partitionKey")]
    partition_key: &'a str,
    tags: FaultTagsOut<'a>,
    err: FaultErrorOut<'a>,
    uow: FaultUowOut<'a>,
}

#[derive(Serialize)]
struct FaultTagsOut<'a> {
    processor: &'a str,
    pipeline: &'a str,
    step: &'a str,
    source: &'a str,
}

#[derive(Serialize)]
struct FaultErrorOut<'a> {
    name: &'a str,
    message: &'a str,
    class: &'static str,
    attempts: u32,
}

#[derive(Serialize)]
struct FaultUowOut<'a> {
    record: FaultRecordOut<'a>,
    event: Option<EventOut<'a>>,
}

#[derive(Serialize)]
struct FaultRecordOut<'a> {
    source: &'a str,
    partition: &'a str,
    offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    sequence: Option<&'a str>,
    attempt: u32,
    encoding: &'static str,
    data: std::borrow::Cow<'a, str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    redacted: bool,
}

#[derive(Serialize)]
#[serde(untagged)]
enum EventOut<'a> {
    /// The event's source text, embedded as is when nothing needs redacting.
    Raw(&'a RawValue),
    Value(Value),
}

/// Builds the fault event for a record that failed at `origin`: the record's event, or part
/// `part` of it when a step split it ([`Uow::part`](crate::Uow)).
pub(crate) fn fault_event(
    origin: FaultOrigin<'_>,
    record: &Record,
    part: u64,
    event: Option<&Event>,
    err: &Error,
    redacted: &[String],
) -> Event {
    let position = record.position();
    // The record as it came, not the event as the steps left it (an enrichment that reads
    // something else the next time must not make a second fault of one failure), and the
    // part of it, since the parts of a split record may share an id and differ only there.
    // The bytes also tell apart records read from an invocation that could not say where
    // they came from, which share a source, a partition and a position (their index in the
    // batch), and must not share a fault.
    // A resubmitted record that fails again raises the fault it was resubmitted for; a part
    // of it (a split) is named as ever: its own fault, whatever the one resubmitted.
    let id = match &record.resubmits {
        Some(id) if part == 0 => id.to_string(),
        _ => stable_id(&[
            &record.source,
            &record.partition,
            &position,
            origin.processor,
            origin.pipeline,
            origin.step,
            &part.to_string(),
            &String::from_utf8_lossy(&record.data),
        ]),
    };
    let timestamp = now_millis();
    // A raise is named by the fault, the time and a random part: two raises in one
    // millisecond, from two processes, still differ.
    let raise = stable_id(&[&id, &timestamp.to_string(), &fastrand::u64(..).to_string()]);
    // An event whose payload does not read (a lone surrogate, a number out of range) is left
    // out: embedded, it would make the fault itself unreadable, and stop the fault monitor.
    // The record's bytes carry it, escaped.
    let event_out = event.filter(|e| e.check_payload().is_ok()).map(|e| {
        let raw = e
            .source_text()
            .filter(|_| redacted.is_empty())
            .and_then(|text| serde_json::from_str::<&RawValue>(text).ok());
        match raw {
            Some(raw) => EventOut::Raw(raw),
            None => {
                let mut value = e.to_value();
                for path in redacted {
                    redact(&mut value, path);
                }
                EventOut::Value(value)
            }
        }
    });
    // A redacted field appears nowhere in a fault: not in the record's bytes (left out; the
    // source keeps them and resubmission reads them back by position) and not in the error's
    // message (a validation message may quote the value).
    let redacting = !redacted.is_empty();
    let (encoding, data) = match std::str::from_utf8(&record.data) {
        _ if redacting => ("utf8", std::borrow::Cow::Borrowed("")),
        Ok(text) => ("utf8", std::borrow::Cow::Borrowed(text)),
        Err(_) => (
            "base64",
            std::borrow::Cow::Owned(base64::engine::general_purpose::STANDARD.encode(&record.data)),
        ),
    };
    let message = match event {
        // Nothing to look for the redacted values by: the message may quote them.
        Some(e) if redacting && e.check_payload().is_err() => std::borrow::Cow::Borrowed(
            "(withheld: fields are redacted and the event's payload does not read)",
        ),
        Some(e) if redacting => scrub(err.message(), e, redacted),
        _ => std::borrow::Cow::Borrowed(err.message()),
    };
    // The fault goes where its event's key would, unless the key is redacted: then by a hash
    // of it, which spreads faults as the keys do and says nothing of them.
    let key = event.map_or(&*record.partition, Event::partition_key);
    let hidden;
    let partition_key = if redacted.iter().any(|p| p == "partitionKey") {
        hidden = stable_id(&[key]);
        &hidden
    } else {
        key
    };
    let out = FaultOut {
        id: &raise,
        fault_id: &id,
        ty: FAULT_EVENT_TYPE,
        timestamp,
        partition_key,
        tags: FaultTagsOut {
            processor: origin.processor,
            pipeline: origin.pipeline,
            step: origin.step,
            source: &record.source,
        },
        err: FaultErrorOut {
            name: err.name(),
            message: &message,
            class: err.class().as_str(),
            attempts: err.attempts(),
        },
        uow: FaultUowOut {
            record: FaultRecordOut {
                source: &record.source,
                partition: &record.partition,
                offset: record.offset,
                sequence: record.sequence.as_deref(),
                attempt: record.attempt,
                encoding,
                data,
                redacted: redacting,
            },
            event: event_out,
        },
    };
    // One allocation of about the right size: faults may be kept in memory a long time.
    let estimate = out.uow.record.data.len() * 2 + message.len() + 512;
    let mut bytes = Vec::with_capacity(estimate);
    serde_json::to_writer(&mut bytes, &out).unwrap_or_default();
    Event::decode_bytes(bytes.into(), usize::MAX).unwrap_or_else(|_| {
        // Unreachable: the text was just written with every envelope field.
        Event::builder(FAULT_EVENT_TYPE, out.partition_key)
            .id(raise.clone())
            .field("faultId", id.clone())
            .build()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: FaultOrigin<'static> = FaultOrigin {
        processor: "p",
        pipeline: "l",
        step: "validate-1",
    };

    /// The fault of record 7 holding `data`, raised with `err`, `customer.email` redacted.
    fn redacted_fault(data: &str, err: &Error) -> (Record, Event) {
        let record = Record::new("memory", "0", 7, data.to_owned());
        let event = Event::decode(data.as_bytes()).unwrap();
        let fault = fault_event(
            ORIGIN,
            &record,
            0,
            Some(&event),
            err,
            &["customer.email".into()],
        );
        (record, fault)
    }

    #[test]
    fn faults_are_deterministic_redacted_and_carry_the_record() {
        let data = r#"{"id":"e1","type":"t","timestamp":1,"partitionKey":"k","customer":{"email":"a@b","name":"A"}}"#;
        let err = Error::poison_msg("Invalid", "bad");
        let (record, a) = redacted_fault(data, &err);
        let (_, b) = redacted_fault(data, &err);
        let event = Event::decode(data.as_bytes()).unwrap();
        assert_eq!(fault_id(&a), fault_id(&b));
        assert_ne!(a.id(), b.id(), "each raise is an event of its own");
        assert_eq!(a.event_type(), "fault");
        assert_eq!(a.tag("pipeline"), Some("l"));
        let details: FaultDetails = a.payload().unwrap();
        assert_eq!(details.err.class, "poison");
        // Redacting: the record is left out (its source keeps it).
        assert!(details.uow.record.redacted);
        let ev = details.uow.event.unwrap();
        assert_eq!(ev["customer"]["email"], REDACTED);
        assert_eq!(ev["customer"]["name"], "A");
        let other = fault_event(
            FaultOrigin {
                step: "map-2",
                ..ORIGIN
            },
            &record,
            0,
            Some(&event),
            &err,
            &[],
        );
        assert_ne!(fault_id(&a), fault_id(&other));
        // The event as the steps left it does not make another fault; another part does.
        let redact = ["customer.email".to_owned()];
        let mut enriched = event.clone();
        enriched.fields_mut().insert("looked_up".into(), 42.into());
        let c = fault_event(ORIGIN, &record, 0, Some(&enriched), &err, &redact);
        assert_eq!(fault_id(&a), fault_id(&c));
        let d = fault_event(ORIGIN, &record, 2, Some(&event), &err, &redact);
        assert_ne!(fault_id(&a), fault_id(&d));
        // Without redaction the record is carried verbatim.
        let details: FaultDetails = other.payload().unwrap();
        assert_eq!(details.uow.record.bytes().unwrap(), data.as_bytes());
    }

    /// A fault of an event whose payload does not read is itself readable: the event is left
    /// out, the record's bytes carry it.
    #[test]
    fn a_fault_of_an_unreadable_payload_reads() {
        let data = r#"{"id":"c-1","type":"t","timestamp":1,"partitionKey":"k","email":"\ud800"}"#;
        let record = Record::new("hub:h", "0", 1, data);
        let event = Event::decode(data.as_bytes()).unwrap();
        assert!(event.check_payload().is_err());
        let err = Error::poison_msg("UnreadablePayload", "the payload does not read");
        let fault = fault_event(ORIGIN, &record, 0, Some(&event), &err, &[]);
        let again = Event::decode(fault.to_json().as_bytes()).unwrap();
        let details: FaultDetails = again.payload().expect("a fault that reads");
        assert!(details.uow.event.is_none());
        assert_eq!(details.uow.record.bytes().unwrap(), data.as_bytes());
    }

    #[test]
    fn a_fault_is_trimmed_only_as_far_as_its_store_needs() {
        let big = "x".repeat(100_000);
        let data =
            format!(r#"{{"id":"e1","type":"t","timestamp":1,"partitionKey":"k","blob":"{big}"}}"#);
        let record = Record::new("kinesis:s", "shard-1", 7, data.clone()).with_sequence("4952");
        let event = Event::decode(data.as_bytes()).unwrap();
        let fault = fault_event(
            ORIGIN,
            &record,
            0,
            Some(&event),
            &Error::poison_msg("Invalid", "m".repeat(50_000)),
            &[],
        );
        let size = fault.encoded_len();
        assert!(size > 250_000, "{size}");
        assert_eq!(
            fit(&fault, size).to_json(),
            fault.to_json(),
            "fits: unchanged"
        );

        // Without the event it fits: the record's bytes stay, and it can be resubmitted.
        let lighter = fit(&fault, 200_000);
        assert!(lighter.encoded_len() <= 200_000);
        let details: FaultDetails = lighter.payload().unwrap();
        assert!(details.uow.event.is_none());
        assert!(details.uow.record.carried());
        assert_eq!(details.uow.record.bytes().unwrap(), data.as_bytes());

        // Not even then: the bytes go too, and resubmission is told where the record is.
        let trimmed = fit(&fault, 100_000);
        assert!(trimmed.encoded_len() <= 100_000);
        let details: FaultDetails = trimmed.payload().unwrap();
        assert_eq!(details.uow.record.truncated, Some(size as u64));
        assert!(!details.uow.record.carried());
        let err = details.uow.record.bytes().unwrap_err();
        assert_eq!(err.name(), "RecordTrimmed");
        assert!(err.to_string().contains("shard-1 at 4952"), "{err}");
        assert_eq!(
            details.err.message.len(),
            50_000,
            "the message is kept while it fits"
        );

        // A store smaller than the error's message: the message is cut.
        let cut = fit(&fault, 10_000);
        assert!(cut.encoded_len() <= 10_000, "{}", cut.encoded_len());
        let details: FaultDetails = cut.payload().unwrap();
        assert!(details.err.message.ends_with(" [cut]"));
        assert_eq!(fault_id(&cut), fault_id(&fault));
    }

    #[test]
    fn a_redacted_field_appears_nowhere_in_the_fault() {
        let data = r#"{"id":"e1","type":"t","timestamp":1,"partitionKey":"k","customer":{"email":"ann@example.com","name":"Ann"}}"#;
        let err = Error::poison_msg("InvalidEmail", "ann@example.com is not deliverable");
        let (_, fault) = redacted_fault(data, &err);
        let text = fault.to_json();
        assert!(!text.contains("ann@example.com"), "{text}");
        let details: FaultDetails = fault.payload().unwrap();
        assert!(details.uow.record.redacted);
        assert_eq!(details.uow.record.offset, 7);
        assert_eq!(details.err.message, "[REDACTED] is not deliverable");
        let err = details.uow.record.bytes().unwrap_err();
        assert_eq!(err.name(), "RecordRedacted");
        assert_eq!(details.uow.event.unwrap()["customer"]["name"], "Ann");
    }

    #[test]
    fn a_redacted_value_echoed_encoded_by_a_service_appears_nowhere_either() {
        // A 404 page echoing the path the HTTP sink made, and a JSON answer with its own escapes.
        let data = r#"{"id":"e1","type":"t","timestamp":1,"partitionKey":"k","customer":{"email":"ann@x.com","name":"Zoë/Ann"}}"#;
        let record = Record::new("memory", "0", 7, data.to_owned());
        let event = Event::decode(data.as_bytes()).unwrap();
        let err = Error::poison_msg(
            "HttpStatus",
            r#"404 Not Found: Cannot POST /customers/ann%40x.com {"name":"Zo\u00eb\/Ann","n":"Zoë/Ann","p":"Zo%C3%AB%2FAnn"}"#,
        );
        let redacted = ["customer.email".to_owned(), "customer.name".to_owned()];
        let fault = fault_event(ORIGIN, &record, 0, Some(&event), &err, &redacted);
        let details: FaultDetails = fault.payload().unwrap();
        assert_eq!(
            details.err.message,
            r#"404 Not Found: Cannot POST /customers/[REDACTED] {"name":"[REDACTED]","n":"[REDACTED]","p":"[REDACTED]"}"#
        );
        let mut encoded = String::new();
        percent_encode("a b/ë~", &mut encoded);
        assert_eq!(encoded, "a%20b%2F%C3%AB~");
    }

    #[test]
    fn a_redacted_field_in_an_array_or_the_envelope_appears_nowhere_either() {
        let data = r#"{"id":"e1","type":"t","timestamp":1,"partitionKey":"cust-ann","alias":"ann","lines":[{"card":"4111-1111","n":1},{"card":"5500-0000","n":2}]}"#;
        let record = Record::new("memory", "0", 7, data.to_owned());
        let event = Event::decode(data.as_bytes()).unwrap();
        let err = Error::poison_msg("Declined", "card 5500-0000 of cust-ann was declined");
        let redacted = [
            "partitionKey".to_owned(),
            "lines.card".to_owned(),
            "alias".to_owned(),
        ];
        let fault = fault_event(ORIGIN, &record, 0, Some(&event), &err, &redacted);
        let text = fault.to_json();
        // `ann` is inside `cust-ann`: redacted first, it would leave `cust-` in the message.
        for secret in ["4111-1111", "5500-0000", "cust-", "ann"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        let details: FaultDetails = fault.payload().unwrap();
        let ev = details.uow.event.unwrap();
        assert_eq!(ev["lines"][1]["card"], REDACTED);
        assert_eq!(ev["lines"][1]["n"], 2);
        assert_eq!(
            details.err.message,
            "card [REDACTED] of [REDACTED] was declined"
        );
        // Faults of one key still go to one partition.
        let again = fault_event(ORIGIN, &record, 0, Some(&event), &err, &redacted);
        assert_eq!(fault.partition_key(), again.partition_key());
    }

    #[test]
    fn an_undecodable_record_is_left_out_when_fields_are_redacted() {
        let data = r#"{"id":"e1","type":"t","customer":{"email":"ann@example.com"}"#;
        let record = Record::new("memory", "0", 3, data);
        let origin = FaultOrigin {
            processor: "p",
            pipeline: DECODE_PIPELINE,
            step: "decode",
        };
        let err = Error::poison_msg("DecodeEventError", "not JSON");
        let fault = fault_event(origin, &record, 0, None, &err, &["customer.email".into()]);
        assert!(!fault.to_json().contains("ann@example.com"));
        let details: FaultDetails = fault.payload().unwrap();
        assert!(details.uow.record.redacted);
    }

    #[test]
    fn records_that_did_not_decode_share_a_fault_only_with_the_same_bytes() {
        // As a Lambda invocation's unreadable records are named: no shard, no sequence, the
        // index in the batch for a position.
        let origin = FaultOrigin {
            processor: "p",
            pipeline: DECODE_PIPELINE,
            step: "decode",
        };
        let id = |data: &'static str| {
            let record = Record::new("eventbridge:unknown", "malformed", 0, data);
            let fault = fault_event(origin, &record, 0, None, &Error::poison_msg("X", "y"), &[]);
            fault_id(&fault).to_owned()
        };
        assert_ne!(id(r#"{"detail":"a"}"#), id(r#"{"detail":[1]}"#));
        assert_eq!(id(r#"{"detail":"a"}"#), id(r#"{"detail":"a"}"#));
    }

    #[test]
    fn binary_records_are_base64() {
        let record = Record::new("memory", "0", 1, vec![0xff, 0x00, 0x01]);
        let origin = FaultOrigin {
            processor: "p",
            pipeline: DECODE_PIPELINE,
            step: "decode",
        };
        let f = fault_event(origin, &record, 0, None, &Error::poison_msg("X", "y"), &[]);
        let details: FaultDetails = f.payload().unwrap();
        assert_eq!(details.uow.record.encoding, "base64");
        assert_eq!(details.uow.record.bytes().unwrap(), vec![0xff, 0x00, 0x01]);
        assert!(details.uow.event.is_none());
    }

    /// A fault event as aws-lambda-stream raises it, for `record`.
    fn als_fault(record: serde_json::Value, event: serde_json::Value) -> Event {
        Event::from_value(serde_json::json!({
            "id": "59aebfd0-ec41-11f1-b113-f74da297fe34",
            "partitionKey": "3c4ae2eb-6f8c-4604-bc73-c248fb5dfaea",
            "type": "fault",
            "timestamp": 1_795_990_084_685_i64,
            "tags": { "functionname": "svc-a-dev-listener", "pipeline": "p1", "region": "us-west-2" },
            "err": { "name": "Error", "message": "boom", "stack": "Error: boom\n    at ..." },
            "uow": { "pipeline": "p1", "record": record, "event": event },
        }))
        .unwrap()
    }

    #[test]
    fn faults_aws_lambda_stream_raised_take_floodways_shape_with_their_record_read() {
        let event =
            serde_json::json!({ "id": "e1", "type": "t", "timestamp": 1, "partitionKey": "k" });
        let text = event.to_string();
        let cases = [
            (
                serde_json::json!({ "eventSource": "aws:sqs", "messageId": "m-1", "body": text,
                      "eventSourceARN": "arn:aws:sqs:us-west-2:1:orders" }),
                ("sqs:orders", "m-1", Some("m-1"), text.clone()),
            ),
            (
                serde_json::json!({ "EventSource": "aws:sns", "Sns": { "MessageId": "n-1", "Message": text,
                      "TopicArn": "arn:aws:sns:us-west-2:1:topic" } }),
                ("sns:topic", "n-1", Some("n-1"), text.clone()),
            ),
            (
                serde_json::json!({ "version": "0", "id": "eb-1", "detail-type": "t", "source": "svc", "detail": event }),
                ("eventbridge:svc", "svc", Some("eb-1"), text.clone()),
            ),
            (
                serde_json::json!({ "eventSource": "aws:dynamodb", "eventID": "d-1", "eventName": "INSERT",
                      "dynamodb": { "SequenceNumber": "7", "Keys": { "pk": { "S": "1" } } } }),
                ("dynamodb:unknown", "stream", Some("7"), text.clone()),
            ),
        ];
        for (record, (source, partition, sequence, data)) in cases {
            let fault = als_fault(record, event.clone());
            let normal = normalized(&fault);
            let details: FaultDetails = normal.payload().unwrap();
            let r = &details.uow.record;
            assert_eq!(
                (
                    r.source.as_str(),
                    r.partition.as_str(),
                    r.sequence.as_deref()
                ),
                (source, partition, sequence)
            );
            assert_eq!(r.bytes().unwrap(), data.as_bytes());
            assert_eq!(details.err.name, "Error");
            assert_eq!(details.err.class, "poison");
            assert_eq!(normal.tag("processor"), Some("svc-a-dev-listener"));
            assert_eq!(normal.tag("pipeline"), Some("p1"));
            assert_eq!(normal.id(), fault.id(), "the raise keeps its id");
            // Every raise of one record in one pipeline is one fault: a later raise (another
            // id, time and message) has the same fault id.
            let mut again =
                als_fault(fault.field("uow").unwrap()["record"].clone(), event.clone()).to_value();
            again["id"] = serde_json::json!("6b1f0c2e-ec41-11f1-b113-f74da297fe34");
            again["timestamp"] = serde_json::json!(1_795_990_999_000_i64);
            again["err"]["message"] = serde_json::json!("boom again");
            let again = Event::from_value(again).unwrap();
            assert_ne!(again.id(), fault.id());
            assert_eq!(fault_id(&normalized(&again)), fault_id(&normal));
        }
        // A Floodway fault is left as it is.
        let record = Record::new("memory", "0", 1, text.clone());
        let origin = FaultOrigin {
            processor: "p",
            pipeline: "x",
            step: "s",
        };
        let own = fault_event(origin, &record, 0, None, &Error::poison_msg("X", "y"), &[]);
        assert!(matches!(normalized(&own), std::borrow::Cow::Borrowed(_)));
    }
}
