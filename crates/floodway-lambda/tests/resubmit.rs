//! A resubmitted record that fails again raises the fault it was resubmitted for, whatever
//! shape its resubmission gave it (a FIFO message without its group, a change record or an
//! EventBridge event rebuilt as a new EventBridge event).

use floodway::fault::fault_id;
use floodway::memory::{MemoryFaultSink, MemorySink};
use floodway::{Error, Pipeline, Processor};
use floodway_lambda::{resubmission_payload, Handler};
use serde_json::json;

#[tokio::test]
async fn a_resubmission_that_fails_again_raises_the_same_fault() {
    let faults = MemoryFaultSink::new();
    let processor = Processor::builder("things")
        .fault_sink(faults.clone())
        .pipeline(
            Pipeline::builder("strict")
                .validate(|_| Err(Error::poison_msg("Rejected", "not yet")))
                .sink(MemorySink::new())
                .unwrap(),
        )
        .build()
        .unwrap();
    let handler = Handler::new(processor);
    let event =
        r#"{"id":"e1","type":"thing-created","timestamp":1,"partitionKey":"k","zeta":1,"alpha":2}"#;
    let invocations = [
        json!({ "Records": [{
            "eventSource": "aws:sqs",
            "eventSourceARN": "arn:aws:sqs:us-east-1:1:things.fifo",
            "messageId": "m-1",
            "body": event,
            "attributes": { "MessageGroupId": "g-1", "ApproximateReceiveCount": "1" },
        }]}),
        json!({
            "version": "0",
            "id": "eb-1",
            "detail-type": "thing-created",
            "source": "custom.things",
            "time": "2026-12-01T00:00:00Z",
            "resources": [],
            "detail": serde_json::from_str::<serde_json::Value>(event).unwrap(),
        }),
        json!({ "Records": [{
            "eventSource": "aws:dynamodb",
            "eventSourceARN": "arn:aws:dynamodb:us-east-1:1:table/things/stream/x",
            "eventID": "d-1",
            "eventName": "INSERT",
            "dynamodb": {
                "Keys": { "pk": { "S": "1" } },
                "NewImage": { "pk": { "S": "1" }, "discriminator": { "S": "thing" }, "zeta": { "N": "1" } },
                "SequenceNumber": "100",
            },
        }]}),
    ];
    for invocation in invocations {
        let what = invocation.to_string();
        handler.handle(invocation, None).await.unwrap();
        let first = faults.faults().pop().expect(&what);
        let payload = resubmission_payload(&first).unwrap();
        let answer = handler.handle(payload, None).await.unwrap();
        assert_eq!(answer["floodway"]["faulted"], 1, "{what}");
        let again = faults.faults().pop().unwrap();
        assert_ne!(again.id(), first.id(), "a raise of its own");
        assert_eq!(fault_id(&again), fault_id(&first), "{what}");
    }
}

/// A resubmission to a pipeline that would not run the record (disabled since, or no longer
/// taking its type) fails, instead of answering that nothing faulted: the resubmitter would
/// close the fault with nothing run.
#[tokio::test]
async fn a_resubmission_that_no_pipeline_would_run_is_refused() {
    let event = r#"{"id":"e1","type":"thing-created","timestamp":1,"partitionKey":"k"}"#;
    let kinesis = json!({ "Records": [{
        "eventSource": "aws:kinesis",
        "eventSourceARN": "arn:aws:kinesis:us-east-1:1:stream/s",
        "eventID": "shardId-000000000000:1",
        "kinesis": {
            "partitionKey": "k",
            "sequenceNumber": "1",
            "data": base64_of(event),
            "approximateArrivalTimestamp": 1.0,
        },
    }]});
    let handler_with = |pipeline: floodway::pipeline::PipelineBuilder, faults: &MemoryFaultSink| {
        let processor = Processor::builder("things")
            .fault_sink(faults.clone())
            .pipeline(
                pipeline
                    .validate(|_| Err(Error::poison_msg("Rejected", "not yet")))
                    .sink(MemorySink::new())
                    .unwrap(),
            )
            .pipeline(Pipeline::builder("audit").sink(MemorySink::new()).unwrap())
            .build()
            .unwrap();
        Handler::new(processor)
    };
    let faults = MemoryFaultSink::new();
    handler_with(Pipeline::builder("strict"), &faults)
        .handle(kinesis, None)
        .await
        .unwrap();
    let payload = resubmission_payload(&faults.faults()[0]).unwrap();
    for (changed, why) in [
        (Pipeline::builder("strict").enabled(false), "disabled"),
        (
            Pipeline::builder("strict").event_type("other"),
            "no longer takes",
        ),
    ] {
        let handler = handler_with(changed, &MemoryFaultSink::new());
        let err = handler.handle(payload.clone(), None).await.unwrap_err();
        assert_eq!(err.error_type(), "ResubmissionNotTaken");
        assert!(err.to_string().contains(why), "{err}");
    }
    // Still taken: it runs (and fails again, as before).
    let answer = handler_with(Pipeline::builder("strict"), &MemoryFaultSink::new())
        .handle(payload, None)
        .await
        .unwrap();
    assert_eq!(answer["floodway"]["faulted"], 1);
}

fn base64_of(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}
