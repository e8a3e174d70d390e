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
        let answer = handler
            .handle_bytes(payload.get().as_bytes(), None)
            .await
            .unwrap();
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
        let err = handler
            .handle_bytes(payload.get().as_bytes(), None)
            .await
            .unwrap_err();
        assert_eq!(err.error_type(), "ResubmissionNotTaken");
        assert!(err.to_string().contains(why), "{err}");
    }
    // Still taken: it runs (and fails again, as before).
    let answer = handler_with(Pipeline::builder("strict"), &MemoryFaultSink::new())
        .handle_bytes(payload.get().as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(answer["floodway"]["faulted"], 1);
}

fn base64_of(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// A handler whose pipeline `strict` rejects every event until `fixed` is set.
struct Fixable {
    handler: Handler,
    faults: MemoryFaultSink,
    sink: MemorySink,
    fixed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Fixable {
    fn new() -> Fixable {
        let (faults, sink) = (MemoryFaultSink::new(), MemorySink::new());
        let fixed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gate = fixed.clone();
        let processor = Processor::builder("things")
            .fault_sink(faults.clone())
            .pipeline(
                Pipeline::builder("strict")
                    .validate(
                        move |_| match gate.load(std::sync::atomic::Ordering::SeqCst) {
                            true => Ok(()),
                            false => Err(Error::poison_msg("Rejected", "not yet")),
                        },
                    )
                    .sink(sink.clone())
                    .unwrap(),
            )
            .build()
            .unwrap();
        Fixable {
            handler: Handler::new(processor),
            faults,
            sink,
            fixed,
        }
    }

    /// Fixes the handler and resubmits the first fault through it: nothing faults again.
    async fn resubmitted_fixed(&self) {
        let payload = resubmission_payload(&self.faults.faults()[0]).unwrap();
        self.fixed.store(true, std::sync::atomic::Ordering::SeqCst);
        let answer = self
            .handler
            .handle_bytes(payload.get().as_bytes(), None)
            .await
            .unwrap();
        assert_eq!(answer["floodway"]["faulted"], 0, "{answer}");
    }
}

/// An EventBridge event's text goes back as it was: a number beyond a double and an escape
/// a JSON tree would not keep come back byte for byte, and are processed.
#[tokio::test]
async fn a_resubmitted_event_keeps_its_text() {
    let things = Fixable::new();
    let detail = r#"{"id":"e1","type":"thing-created","timestamp":1,"partitionKey":"k","n":123456789012345678901234,"x":"\ud800"}"#;
    let invocation = format!(
        r#"{{"version":"0","id":"eb-1","detail-type":"thing-created","source":"custom.things","detail":{detail}}}"#
    );
    things
        .handler
        .handle_bytes(invocation.as_bytes(), None)
        .await
        .unwrap();
    let payload = resubmission_payload(&things.faults.faults()[0]).unwrap();
    assert!(
        payload.get().contains(r#""n":123456789012345678901234"#),
        "{payload}"
    );
    things.resubmitted_fixed().await;
    assert_eq!(things.sink.events().len(), 1);
    assert!(things.sink.events()[0]
        .to_json()
        .contains("123456789012345678901234"));
}

/// A faulted change of a large item (two images of about 400 KB: over the 1 MiB an event may
/// have) is resubmitted as it was first read: without the event size limit.
#[tokio::test]
async fn a_faulted_change_of_a_large_item_can_be_resubmitted() {
    let things = Fixable::new();
    use base64::Engine as _;
    let blob = |byte: u8| json!({ "B": base64::engine::general_purpose::STANDARD.encode(vec![byte; 399_000]) });
    let image =
        |byte: u8| json!({ "pk": { "S": "1" }, "sk": { "S": "thing" }, "blob": blob(byte) });
    let invocation = json!({ "Records": [{
        "eventSource": "aws:dynamodb",
        "eventSourceARN": "arn:aws:dynamodb:us-east-1:1:table/things/stream/x",
        "eventID": "d-1",
        "eventName": "MODIFY",
        "dynamodb": {
            "Keys": { "pk": { "S": "1" }, "sk": { "S": "thing" } },
            "NewImage": image(1),
            "OldImage": image(2),
            "SequenceNumber": "900",
        },
    }]});
    things.handler.handle(invocation, None).await.unwrap();
    things.resubmitted_fixed().await;
    let delivered = things.sink.events();
    assert_eq!(delivered.len(), 1);
    assert!(delivered[0].encoded_len() > 1 << 20);
}
