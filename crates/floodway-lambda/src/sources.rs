//! Lambda event payloads into Floodway records: Kinesis, SQS, EventBridge, and DynamoDB
//! Streams as change data capture.

use aws_lambda_events::event::dynamodb;
use aws_lambda_events::event::eventbridge::EventBridgeEvent;
use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_lambda_events::event::sqs::SqsEvent;
use bytes::Bytes;
use floodway::{Event, Record};
use serde_json::{Map, Value};

/// The name after the last `/` of an ARN (`arn:aws:kinesis:...:stream/orders` → `orders`).
fn arn_name(arn: Option<&str>) -> &str {
    arn.and_then(|a| a.split('/').nth(1)).unwrap_or("unknown")
}

/// Kinesis records, one partition per shard (the shard id from `eventID`), in the order given,
/// with the sequence number as the record's position.
pub fn kinesis_records(event: KinesisEvent) -> Vec<Record> {
    event
        .records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let shard = r
                .event_id
                .as_deref()
                .and_then(|id| id.split(':').next())
                .unwrap_or("shard");
            Record::new(
                format!("kinesis:{}", arn_name(r.event_source_arn.as_deref())),
                shard.to_owned(),
                i as u64,
                Bytes::from(r.kinesis.data.0),
            )
            .with_sequence(r.kinesis.sequence_number.clone())
        })
        .collect()
}

/// SQS messages: the body is the record; a FIFO queue's message group is the partition
/// (standard queues have no order: each message is its own partition); the receive count is
/// the attempt.
pub fn sqs_records(event: &SqsEvent) -> Vec<Record> {
    event
        .records
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let id = m.message_id.clone().unwrap_or_else(|| i.to_string());
            let group = m.attributes.get("MessageGroupId").cloned();
            let partition = group.clone().unwrap_or_else(|| id.clone());
            let attempt = m
                .attributes
                .get("ApproximateReceiveCount")
                .and_then(|c| c.parse().ok())
                .unwrap_or(1);
            let record = Record::new(
                format!("sqs:{}", sqs_queue(m.event_source_arn.as_deref())),
                partition,
                i as u64,
                Bytes::from(m.body.clone().unwrap_or_default()),
            )
            .with_sequence(id)
            .with_attempt(attempt);
            // A FIFO queue orders by message group, whatever the events' partition keys.
            match group {
                Some(group) => record.with_order_key(group),
                None => record,
            }
        })
        .collect()
}

fn sqs_queue(arn: Option<&str>) -> &str {
    arn.and_then(|a| a.rsplit(':').next()).unwrap_or("unknown")
}

/// An EventBridge event: its `detail` is the Floodway event (as `aws-lambda-stream` publishes
/// it, with the event type as `detail-type`).
pub fn eventbridge_record(event: &EventBridgeEvent<Value>) -> Record {
    let data = serde_json::to_vec(&event.detail).unwrap_or_default();
    let id = event.id.clone().unwrap_or_default();
    Record::new(
        format!("eventbridge:{}", event.source),
        event.source.clone(),
        0,
        Bytes::from(data),
    )
    .with_sequence(id)
}

/// How DynamoDB stream records become events.
#[derive(Debug, Clone)]
pub struct CdcOptions {
    /// The attribute naming the kind of row (`discriminator`; `sk` when absent): the event
    /// type is `{discriminator}-{created|updated|deleted|undeleted}`.
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
}

fn image(item: &serde_dynamo::Item) -> Value {
    if item.is_empty() {
        return Value::Null;
    }
    serde_dynamo::from_item::<_, Value>(item.clone()).unwrap_or(Value::Null)
}

fn truthy(value: Option<&Value>) -> bool {
    matches!(value, Some(Value::Bool(true)))
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// DynamoDB stream records as change events, the way users of `aws-lambda-stream` know them
/// (see [`CdcOptions`]): the old and new images under `raw`, the keys under `keys`, the
/// stream's event id as the id. Replica and TTL records are skipped and returned beside the
/// records.
pub fn dynamodb_records(
    event: &dynamodb::Event,
    options: &CdcOptions,
) -> (Vec<Record>, Vec<(String, Skipped)>) {
    let region = options
        .region
        .clone()
        .or_else(|| std::env::var("AWS_REGION").ok());
    let mut records = Vec::new();
    let mut skipped = Vec::new();
    for (i, r) in event.records.iter().enumerate() {
        let sequence = r.change.sequence_number.clone().unwrap_or_default();
        let new = image(&r.change.new_image);
        let old = image(&r.change.old_image);
        if let Some(region) = &region {
            let written_in = |row: &Value| {
                row.get("aws:rep:updateregion")
                    .or_else(|| row.get("awsregion"))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            };
            let writer = written_in(&new).or_else(|| written_in(&old));
            if writer.is_some_and(|w| w != *region) {
                skipped.push((sequence, Skipped::Replica(r.event_id.clone())));
                continue;
            }
        }
        let ttl = r
            .user_identity
            .as_ref()
            .is_some_and(|u| u.type_ == "Service" && u.principal_id == "dynamodb.amazonaws.com");
        if ttl && !options.keep_ttl_deletes {
            skipped.push((sequence, Skipped::TtlDelete(r.event_id.clone())));
            continue;
        }
        let row = if new.is_null() { &old } else { &new };
        let now_deleted = truthy(new.get(&options.deleted));
        let was_deleted = truthy(old.get(&options.deleted));
        let suffix = match r.event_name.as_str() {
            "REMOVE" => "deleted",
            _ if now_deleted => "deleted",
            _ if was_deleted => "undeleted",
            "INSERT" => "created",
            _ => "updated",
        };
        let discriminator = row
            .get(&options.discriminator)
            .or_else(|| row.get("sk"))
            .map(text)
            .unwrap_or_else(|| "row".into())
            .to_lowercase();
        let keys = image(&r.change.keys);
        let partition_key = match keys.get(&options.partition_key) {
            Some(pk) => text(pk),
            None => match &keys {
                Value::Object(map) => {
                    let mut parts: Vec<(&String, String)> =
                        map.iter().map(|(k, v)| (k, text(v))).collect();
                    parts.sort();
                    parts
                        .into_iter()
                        .map(|(_, v)| v)
                        .collect::<Vec<_>>()
                        .join("|")
                }
                _ => r.event_id.clone(),
            },
        };
        // A removal has no new image: its time is the stream record's, not the last write's
        // (which would tie with that write's event in a latest-wins view).
        let timestamp = new
            .get(&options.timestamp)
            .and_then(Value::as_i64)
            .unwrap_or_else(|| r.change.approximate_creation_date_time.timestamp_millis());
        let mut raw = Map::new();
        raw.insert("new".into(), new.clone());
        raw.insert("old".into(), old.clone());
        let event = Event::builder(format!("{discriminator}-{suffix}"), partition_key)
            .id(r.event_id.clone())
            .timestamp(timestamp)
            .tag("source", format!("dynamodb:{}", arn_table(r)))
            .tag("region", r.aws_region.clone())
            .field("raw", Value::Object(raw))
            .field("keys", keys)
            .build();
        records.push(
            Record::new(
                format!("dynamodb:{}", arn_table(r)),
                "stream",
                i as u64,
                Bytes::from(event.to_json()),
            )
            .with_sequence(sequence),
        );
    }
    (records, skipped)
}

fn arn_table(r: &dynamodb::EventRecord) -> &str {
    r.table_name
        .as_deref()
        .unwrap_or_else(|| arn_name(r.event_source_arn.as_deref()))
}
