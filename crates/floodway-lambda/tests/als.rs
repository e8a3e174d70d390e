//! Interop with aws-lambda-stream, the Node library Floodway services share hubs with, run by
//! Node from npm (pinned in `interop/als`, installed into `target/als` by `scripts/test`):
//! the invocations its own test helpers build go through Floodway's handler, and the events
//! Floodway reads out of them are compared field by field with those aws-lambda-stream reads.
//!
//! Without Node or the installed packages these tests fail and say what is missing.

use base64::Engine as _;

use floodway::memory::{MemoryFaultSink, MemorySink};
use floodway::{Pipeline, Processor};
use floodway_lambda::Handler;
use serde_json::{json, Value};

/// Runs `interop/als/<script>` with Node and aws-lambda-stream.
fn node(script: &str, input: &Value) -> Value {
    floodway_lambda::testing::run_script(script, input)
}

/// A handler whose one pipeline keeps every event; its sink and fault sink.
fn keeping_all() -> (Handler, MemorySink, MemoryFaultSink) {
    let (sink, faults) = (MemorySink::new(), MemoryFaultSink::new());
    let processor = Processor::builder("interop")
        .fault_sink(faults.clone())
        .pipeline(Pipeline::builder("all").sink(sink.clone()).unwrap())
        .build()
        .unwrap();
    (Handler::new(processor), sink, faults)
}

/// Events in the order of their ids.
fn by_id(events: &Value) -> Vec<Value> {
    let mut events = events.as_array().unwrap().clone();
    events.sort_by_key(|e| e["id"].as_str().unwrap().to_owned());
    events
}

/// The events Floodway reads out of `invocation`, as JSON (as a step sees them); no record
/// may fail or fault.
async fn floodway_reads(invocation: &Value) -> Vec<Value> {
    let (handler, sink, faults) = keeping_all();
    let answer = handler.handle(invocation.clone(), None).await.unwrap();
    if let Some(failures) = answer.get("batchItemFailures") {
        assert_eq!(failures, &json!([]), "{answer}");
    }
    assert!(faults.faults().is_empty(), "{:?}", faults.faults());
    // As a pipeline reads them: compressed fields revived.
    by_id(
        &sink
            .events()
            .iter()
            .map(floodway::Event::to_value)
            .collect(),
    )
}

/// Events as Node services publish them: tags, nested entities, numbers, text with escapes
/// and non-ASCII characters, an array, a null.
fn events() -> Vec<Value> {
    (0..6)
        .map(|i| {
            json!({
                "id": format!("1111111{i}-1111-1111-1111-111111111111"),
                "type": if i % 2 == 0 { "thing-created" } else { "thing-updated" },
                "timestamp": 1_548_967_022_000_i64 + i,
                "partitionKey": format!("2222222{}-2222-2222-2222-222222222222", i % 3),
                "tags": { "region": "us-east-1", "source": "svc-a", "pipeline": "p1" },
                "thing": {
                    "id": format!("2222222{}-2222-2222-2222-222222222222", i % 3),
                    "name": format!("Thing \"{i}\" – ünïcode ✓"),
                    "count": i,
                    "price": i as f64 + 0.25,
                    "labels": ["a", "b"],
                    "note": null,
                },
            })
        })
        .collect()
}

/// An event with a field over aws-lambda-stream's compression threshold (10 KiB).
fn large_event() -> Value {
    json!({
        "id": "33333333-3333-3333-3333-333333333333",
        "type": "document-stored",
        "timestamp": 1_548_967_022_500_i64,
        "partitionKey": "d-1",
        "tags": { "source": "svc-a" },
        "document": { "title": "big", "text": "lorem ipsum dolor sit amet ".repeat(600) },
        "small": { "n": 1 },
    })
}

/// Rows written to a table, in `toDynamodbRecords`' input shape: an insert with the row's own
/// time, an update of it, a soft delete, an undelete, and a removal.
fn rows() -> Vec<Value> {
    let row = |name: &str, deleted: Option<bool>| {
        let mut row = json!({
            "pk": "1", "sk": "thing", "discriminator": "thing", "name": name,
            "n": 1.5, "flag": true, "list": [1, "a"], "map": { "x": null }
        });
        if let Some(deleted) = deleted {
            row["deleted"] = json!(deleted);
        }
        row
    };
    let keys = json!({ "pk": "1", "sk": "thing" });
    vec![
        json!({ "timestamp": 1_548_967_022, "keys": keys, "newImage": row("N1", None) }),
        json!({ "timestamp": 1_548_967_023, "keys": keys, "newImage": row("N2", None), "oldImage": row("N1", None) }),
        json!({ "timestamp": 1_548_967_024, "keys": keys, "newImage": row("N2", Some(true)), "oldImage": row("N2", None) }),
        json!({ "timestamp": 1_548_967_025, "keys": keys, "newImage": row("N2", Some(false)), "oldImage": row("N2", Some(true)) }),
        json!({ "timestamp": 1_548_967_026, "keys": keys, "oldImage": row("N2", Some(false)) }),
    ]
}

#[tokio::test]
async fn floodway_reads_the_events_aws_lambda_stream_reads_from_its_own_test_invocations() {
    let mut events = events();
    // aws-lambda-stream's helpers compress this one's large field, as its publishers do.
    events.push(large_event());
    let als = node(
        "invocations.js",
        &json!({ "events": events, "rows": rows() }),
    );

    // Kinesis and SQS: the same events, field by field (in order per partition key; events
    // of different keys may reach a sink in another order).
    for source in ["kinesis", "sqs"] {
        let ours = floodway_reads(&als[source]["invocation"]).await;
        assert_eq!(ours, by_id(&als[source]["events"]), "{source}");
    }
    let data = als["kinesis"]["invocation"]["Records"][6]["kinesis"]["data"]
        .as_str()
        .unwrap();
    let wire = base64::engine::general_purpose::STANDARD
        .decode(data)
        .unwrap();
    assert!(
        String::from_utf8(wire)
            .unwrap()
            .contains(r#""document":"COMPRESSED"#),
        "the helpers compressed the large field"
    );
    // SNS (aws-lambda-stream reads no events from SNS): the events published.
    let ours = floodway_reads(&als["sns"]["invocation"]).await;
    assert_eq!(ours, by_id(&Value::Array(events.clone())), "sns");
    // EventBridge: one invocation per event; and with the id on the envelope only, as
    // another producer puts events on the bus (both read `detail.id || id`).
    for source in ["eventbridge", "eventbridge_without_id"] {
        for one in als[source].as_array().unwrap() {
            let ours = floodway_reads(&one["invocation"]).await;
            assert_eq!(Value::Array(ours), one["events"], "{source}");
        }
    }
    assert!(als["eventbridge_without_id"][0]["events"][0]["id"]
        .as_str()
        .unwrap()
        .starts_with("eb-"));
}

#[tokio::test]
async fn dynamodb_change_events_match_aws_lambda_stream_but_for_the_listed_differences() {
    let als = node("invocations.js", &json!({ "events": [], "rows": rows() }));
    let ours = floodway_reads(&als["dynamodb"]["invocation"]).await;
    let theirs = als["dynamodb"]["events"].as_array().unwrap();
    assert_eq!(ours.len(), 5);
    assert_eq!(theirs.len(), 5);
    let types: Vec<&str> = ours.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "thing-created",
            "thing-updated",
            "thing-deleted",
            "thing-undeleted",
            "thing-deleted"
        ]
    );
    for (ours, theirs) in ours.iter().zip(theirs) {
        // The differences, on purpose (docs/lambda.md lists them):
        let mut ours = ours.clone();
        // - Floodway tags the source table (here unknown: the helpers give no ARN);
        assert_eq!(ours["tags"]["source"], "dynamodb:unknown");
        ours["tags"].as_object_mut().unwrap().remove("source");
        // - and keeps the keys beside the images.
        assert_eq!(ours["keys"], json!({ "pk": "1", "sk": "thing" }));
        ours.as_object_mut().unwrap().remove("keys");
        assert_eq!(&ours, theirs);
    }
}

#[tokio::test]
async fn aws_lambda_stream_reads_the_fields_floodway_compresses() {
    let mut event = floodway::Event::from_value(large_event()).unwrap();
    assert_eq!(
        event.compress_fields(floodway::compression::DEFAULT_THRESHOLD, &[]),
        1
    );
    let wire = event.to_json();
    assert!(wire.contains(r#""document":"COMPRESSED"#), "{wire}");
    assert!(wire.len() < 1_000, "{} bytes", wire.len());
    let invocation = json!({ "Records": [{
        "eventSource": "aws:kinesis",
        "eventID": "shardId-000000000000:0",
        "kinesis": { "sequenceNumber": "0", "data": base64::engine::general_purpose::STANDARD.encode(&wire) },
    }] });
    let theirs = node(
        "read.js",
        &json!({ "source": "kinesis", "invocation": invocation }),
    );
    assert_eq!(theirs, json!([large_event()]));
    // And Floodway reads its own compressed event back whole.
    assert_eq!(floodway_reads(&invocation).await, [large_event()]);
}
