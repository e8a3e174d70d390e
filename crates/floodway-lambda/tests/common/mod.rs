//! Helpers shared by the Lambda tests, here and in the AWS crate's tests against moto.
#![allow(dead_code)]

use bytes::Bytes;
use floodway::memory::{MemoryFaultSink, MemorySink};
use floodway::{Event, Pipeline, Processor};
use floodway_lambda::{Handler, InProcess, StreamKind, StreamMapping, StreamRecord};
use serde_json::Value;

/// The event types the change-data-capture rules make of a row created, updated, deleted
/// (flag set), undeleted (flag cleared) and removed.
pub(crate) const CDC_TYPES: [&str; 5] = [
    "thing-created",
    "thing-updated",
    "thing-deleted",
    "thing-undeleted",
    "thing-deleted",
];

/// Events as one Kinesis shard's records, numbered from `first`, arrived now.
pub(crate) fn shard_from(first: u64, events: &[Event]) -> Vec<StreamRecord> {
    let now = tokio::time::Instant::now();
    (first..)
        .zip(events)
        .map(|(sequence, e)| StreamRecord {
            sequence,
            partition_key: e.partition_key().to_owned(),
            data: Bytes::from(e.to_json()),
            arrived: now,
        })
        .collect()
}

/// DynamoDB stream records, in the JSON shape Lambda delivers, as one shard's records
/// numbered from 1.
pub(crate) fn dynamodb_shard(records: &[Value]) -> Vec<StreamRecord> {
    (1..)
        .zip(records)
        .map(|(sequence, r)| StreamRecord {
            sequence,
            partition_key: String::new(),
            data: Bytes::from(serde_json::to_vec(r).unwrap()),
            arrived: tokio::time::Instant::now(),
        })
        .collect()
}

/// Runs `records` of a DynamoDB stream through a handler whose pipeline keeps the `thing-*`
/// events; asserts nothing was given up and returns the events kept and the checkpoint.
pub(crate) async fn run_cdc(records: &[StreamRecord]) -> (Vec<Event>, Option<u64>) {
    run_cdc_keeping(records, "thing-*").await
}

/// [`run_cdc`], keeping the events of types `pattern`.
pub(crate) async fn run_cdc_keeping(
    records: &[StreamRecord],
    pattern: &str,
) -> (Vec<Event>, Option<u64>) {
    let sink = MemorySink::new();
    let pipeline = Pipeline::builder("changes")
        .event_type(pattern)
        .sink(sink.clone())
        .unwrap();
    let report = StreamMapping::default()
        .run_shard(
            &StreamKind::DynamoDb,
            "shard",
            records,
            &mut InProcess(handler("cdc", pipeline)),
        )
        .await;
    assert!(report.given_up.is_empty(), "{report:?}");
    (sink.events(), report.checkpoint)
}

/// A handler around processor `name` of the one `pipeline`, its faults kept in memory.
pub(crate) fn handler(name: &str, pipeline: Pipeline) -> Handler {
    Handler::new(
        Processor::builder(name)
            .fault_sink(MemoryFaultSink::new())
            .pipeline(pipeline)
            .build()
            .unwrap(),
    )
}
