//! A catalogue of malformed records, each beside a good one in the same invocation: the good
//! record is delivered, the malformed one becomes exactly one fault that says what is wrong,
//! and the answer reports nothing for it (a reported record would be retried until it
//! expires, blocking its shard). Only an invocation of no known source fails as a whole,
//! with a readable error type.

use base64::Engine as _;
use floodway::fault::FaultDetails;
use floodway::memory::{MemoryFaultSink, MemorySink};
use floodway::{Pipeline, Processor};
use floodway_lambda::{Handler, HandlerError};
use serde_json::{json, Value};

const GOOD: &str =
    r#"{"id":"good","type":"thing-created","timestamp":1,"partitionKey":"k","thing":{"a":1}}"#;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn kinesis(i: usize, data: Value) -> Value {
    json!({
        "eventSource": "aws:kinesis",
        "eventID": format!("shardId-000000000000:{i}"),
        "kinesis": { "sequenceNumber": i.to_string(), "data": data },
    })
}

fn sqs(i: usize, body: Value) -> Value {
    json!({ "eventSource": "aws:sqs", "messageId": format!("m-{i}"), "body": body })
}

fn dynamodb(i: usize, name: &str, change: Value) -> Value {
    json!({ "eventSource": "aws:dynamodb", "eventID": format!("d-{i}"), "eventName": name, "dynamodb": change })
}

fn good_row() -> Value {
    json!({
        "Keys": { "pk": { "S": "1" } },
        "NewImage": { "pk": { "S": "1" }, "discriminator": { "S": "thing" } },
        "SequenceNumber": "1",
    })
}

/// `bad` after a good record of the same source.
fn with_good(bad: Value) -> Value {
    let source = bad["eventSource"]
        .as_str()
        .or_else(|| bad["EventSource"].as_str())
        .unwrap_or("aws:kinesis");
    let good = match source {
        "aws:sqs" => sqs(0, json!(GOOD)),
        "aws:dynamodb" => dynamodb(0, "INSERT", good_row()),
        "aws:sns" => {
            json!({ "EventSource": "aws:sns", "Sns": { "MessageId": "n-0", "Message": GOOD } })
        }
        _ => kinesis(0, json!(b64(GOOD.as_bytes()))),
    };
    json!({ "Records": [good, bad] })
}

/// Runs `invocation` through a pipeline that passes every event on; the answer, what was
/// delivered, and the faults' error names and messages.
async fn run(invocation: Value) -> (Value, usize, Vec<(String, String)>) {
    run_through(Pipeline::builder("all"), invocation).await
}

/// [`run`] through `pipeline`.
async fn run_through(
    pipeline: floodway::pipeline::PipelineBuilder,
    invocation: Value,
) -> (Value, usize, Vec<(String, String)>) {
    let (sink, faults) = (MemorySink::new(), MemoryFaultSink::new());
    let processor = Processor::builder("catalogue")
        .fault_sink(faults.clone())
        .pipeline(pipeline.sink(sink.clone()).unwrap())
        .build()
        .unwrap();
    let answer = Handler::new(processor)
        .handle(invocation, None)
        .await
        .unwrap();
    let faults = faults
        .faults()
        .iter()
        .map(|f| {
            let details: FaultDetails = f.payload().unwrap();
            (details.err.name, details.err.message)
        })
        .collect();
    (answer, sink.events().len(), faults)
}

#[tokio::test]
async fn each_malformed_record_is_one_precise_fault_and_never_fails_the_invocation() {
    let long = format!(
        r#"{{"id":"big","type":"t","timestamp":1,"partitionKey":"k","blob":"{}"}}"#,
        "x".repeat(1 << 20)
    );
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "kinesis data is truncated base64",
            with_good(kinesis(1, json!("eyJpZCI"))),
            "MalformedKinesisRecord",
            "kinesis.data is not base64",
        ),
        (
            "kinesis data is not base64",
            with_good(kinesis(1, json!("!!not base64!!"))),
            "MalformedKinesisRecord",
            "kinesis.data is not base64",
        ),
        (
            "kinesis data is not JSON",
            with_good(kinesis(1, json!(b64(b"hello")))),
            "DecodeEventError",
            "not valid JSON",
        ),
        (
            "kinesis data is truncated JSON",
            with_good(kinesis(1, json!(b64(&GOOD.as_bytes()[..30])))),
            "DecodeEventError",
            "not valid JSON",
        ),
        (
            "an event that is a JSON array",
            with_good(kinesis(1, json!(b64(b"[1,2]")))),
            "DecodeEventError",
            "not an object",
        ),
        (
            "an event without a type",
            with_good(kinesis(
                1,
                json!(b64(br#"{"id":"x","timestamp":1,"partitionKey":"k"}"#)),
            )),
            "DecodeEventError",
            "lacks the required field `type`",
        ),
        (
            "an event without an id",
            with_good(kinesis(
                1,
                json!(b64(br#"{"type":"t","timestamp":1,"partitionKey":"k"}"#)),
            )),
            "DecodeEventError",
            "lacks the required field `id`",
        ),
        (
            "a timestamp of the wrong type",
            with_good(kinesis(
                1,
                json!(b64(
                    br#"{"id":"x","type":"t","timestamp":"yesterday","partitionKey":"k"}"#
                )),
            )),
            "DecodeEventError",
            "field `timestamp` must be",
        ),
        (
            "data that is not UTF-8",
            with_good(kinesis(1, json!(b64(&[0x7b, 0xff, 0xfe, 0x7d])))),
            "DecodeEventError",
            "not valid UTF-8",
        ),
        (
            "a record over the size limit",
            with_good(kinesis(1, json!(b64(long.as_bytes())))),
            "DecodeEventError",
            "over the limit",
        ),
        (
            "a Kinesis record without its kinesis part",
            with_good(json!({ "eventSource": "aws:kinesis", "eventID": "shardId-0:1" })),
            "MalformedKinesisRecord",
            "missing field `kinesis`",
        ),
        (
            "kinesis data that is a number",
            with_good(kinesis(1, json!(42))),
            "MalformedKinesisRecord",
            "invalid type: integer `42`",
        ),
        (
            "a record that is not an object",
            json!({ "Records": [kinesis(0, json!(b64(GOOD.as_bytes()))), "just text"] }),
            "MalformedKinesisRecord",
            "not a Kinesis record",
        ),
        (
            "an SQS message without a body",
            with_good(json!({ "eventSource": "aws:sqs", "messageId": "m-1" })),
            "MalformedSqsMessage",
            "missing field `body`",
        ),
        (
            "an SQS body that is null",
            with_good(sqs(1, Value::Null)),
            "MalformedSqsMessage",
            "invalid type: null",
        ),
        (
            "an SQS body that is not JSON",
            with_good(sqs(1, json!("<xml/>"))),
            "DecodeEventError",
            "not valid JSON",
        ),
        (
            "an SNS notification in SQS whose message is not an event",
            with_good(sqs(
                1,
                json!(
                    r#"{"Type":"Notification","TopicArn":"arn:aws:sns:r:1:t","Message":"plain words"}"#
                ),
            )),
            "DecodeEventError",
            "not valid JSON",
        ),
        (
            "a DynamoDB record without its change",
            with_good(
                json!({ "eventSource": "aws:dynamodb", "eventID": "d-1", "eventName": "INSERT" }),
            ),
            "MalformedDynamoDbRecord",
            "missing field `dynamodb`",
        ),
        (
            "a DynamoDB image with a number that is not text",
            with_good(dynamodb(
                1,
                "INSERT",
                json!({ "Keys": { "pk": { "S": "1" } }, "NewImage": { "n": { "N": 5 } } }),
            )),
            "MalformedDynamoDbRecord",
            "dynamodb.NewImage: n: N must be a string",
        ),
        (
            "a DynamoDB record of an unknown event name",
            with_good(dynamodb(1, "UPSERT", good_row())),
            "MalformedDynamoDbRecord",
            "eventName \"UPSERT\" is none of INSERT, MODIFY, REMOVE",
        ),
        (
            "DynamoDB keys that are not a map",
            with_good(dynamodb(1, "INSERT", json!({ "Keys": "pk" }))),
            "MalformedDynamoDbRecord",
            "dynamodb.Keys: not a map of attributes",
        ),
        (
            "an SNS notification without a message",
            with_good(json!({ "EventSource": "aws:sns", "Sns": { "MessageId": "n-1" } })),
            "MalformedSnsNotification",
            "missing field `Message`",
        ),
    ];
    assert!(cases.len() >= 20);
    for (case, invocation, name, message) in cases {
        let (answer, delivered, faults) = run(invocation).await;
        // Streams and SQS report no item; SNS succeeds (`null`).
        assert!(
            answer.is_null() || answer["batchItemFailures"] == json!([]),
            "{case}: reports nothing: {answer}"
        );
        assert_eq!(delivered, 1, "{case}: the good record is delivered");
        assert_eq!(faults.len(), 1, "{case}: one fault: {faults:?}");
        let (got_name, got_message) = &faults[0];
        assert_eq!(got_name, name, "{case}: {got_message}");
        assert!(
            got_message.contains(message),
            "{case}: `{got_message}` does not say `{message}`"
        );
    }
}

#[tokio::test]
async fn a_malformed_eventbridge_event_is_faulted_and_the_invocation_succeeds() {
    for (invocation, message) in [
        (
            json!({ "detail-type": "thing-created", "source": "s", "detail": "text" }),
            "detail is not a JSON object",
        ),
        (
            json!({ "detail-type": "thing-created", "source": "s" }),
            "missing field `detail`",
        ),
    ] {
        let (answer, delivered, faults) = run(invocation).await;
        assert_eq!(answer, Value::Null);
        assert_eq!(delivered, 0);
        assert_eq!(faults.len(), 1);
        assert_eq!(faults[0].0, "MalformedEventBridgeEvent");
        assert!(faults[0].1.contains(message), "{faults:?}");
    }
}

/// An event put on the bus by another producer, its detail without an `id`: read with the
/// envelope's id, as aws-lambda-stream reads `detail.id || id`, not faulted.
#[tokio::test]
async fn an_eventbridge_detail_without_an_id_takes_the_envelopes() {
    let detail = json!({ "type": "thing-created", "timestamp": 1, "partitionKey": "k", "n": 1 });
    let invocation =
        json!({ "id": "eb-1", "detail-type": "thing-created", "source": "svc", "detail": detail });
    let (answer, delivered, faults) = run(invocation).await;
    assert_eq!((answer, delivered), (Value::Null, 1), "{faults:?}");
    assert!(faults.is_empty(), "{faults:?}");
    // The record's event carries that id; a detail with its own keeps it.
    let payload = |detail: Value| {
        serde_json::to_vec(
            &json!({ "id": "eb-2", "detail-type": "t", "source": "svc", "detail": detail }),
        )
        .unwrap()
    };
    let read = |detail: Value| {
        let invocation =
            floodway_lambda::sources::read(&payload(detail), &Default::default()).unwrap();
        floodway::Event::decode(&invocation.records[0].data)
            .unwrap()
            .id()
            .to_owned()
    };
    assert_eq!(
        read(json!({ "type": "t", "timestamp": 1, "partitionKey": "k" })),
        "eb-2"
    );
    assert_eq!(
        read(json!({ "id": "own", "type": "t", "timestamp": 1, "partitionKey": "k" })),
        "own"
    );
}

#[tokio::test]
async fn an_invocation_of_no_known_source_fails_with_a_readable_error_type() {
    let processor = Processor::builder("p")
        .fault_sink(MemoryFaultSink::new())
        .pipeline(Pipeline::builder("all").sink(MemorySink::new()).unwrap())
        .build()
        .unwrap();
    let handler = Handler::new(processor);
    for (invocation, says) in [
        (
            json!({ "Records": [{ "eventSource": "aws:s3", "s3": {} }] }),
            "Records of no known eventSource",
        ),
        (json!({ "hello": "world" }), "neither `Records`"),
        (json!([1, 2, 3]), "not a JSON object"),
    ] {
        let err = handler.handle(invocation, None).await.unwrap_err();
        assert!(matches!(err, HandlerError::Unrecognized(_)));
        assert_eq!(err.error_type(), "UnrecognizedEvent");
        assert!(err.to_string().contains(says), "{err}");
        // What the function posts to Lambda.
        let message = err.to_string();
        assert_eq!(
            err.to_json(),
            json!({ "errorType": "UnrecognizedEvent", "errorMessage": message })
        );
    }
    // An empty batch is no error, whatever its source.
    let answer = handler
        .handle(json!({ "Records": [] }), None)
        .await
        .unwrap();
    assert_eq!(answer, json!({ "batchItemFailures": [] }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_process_reports_the_readable_error_type_to_lambda() {
    let runtime = floodway_lambda::LocalRuntime::start().await.unwrap();
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_floodway-example-handler"));
    let _function = floodway_lambda::FunctionProcess::spawn(binary, &[], &runtime, &[]).unwrap();
    let timeout = std::time::Duration::from_secs(30);
    let err = runtime
        .invoke(&json!({ "hello": "world" }), timeout)
        .await
        .unwrap_err();
    let floodway_lambda::InvokeError::Function(body) = err else {
        panic!("{err:?}");
    };
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["errorType"], "UnrecognizedEvent", "{body}");
    assert!(
        body["errorMessage"]
            .as_str()
            .unwrap()
            .contains("neither `Records`"),
        "{body}"
    );
    // A malformed record in a real Kinesis batch is faulted, and the batch succeeds.
    let answer = runtime
        .invoke(&with_good(kinesis(1, json!("!!"))), timeout)
        .await
        .unwrap();
    assert_eq!(answer["batchItemFailures"], json!([]), "{answer}");
}

#[tokio::test]
async fn a_bad_compressed_field_is_one_precise_fault_for_a_pipeline_that_reads_it() {
    let bad = r#"{"id":"bad","type":"thing-created","timestamp":1,"partitionKey":"k","thing":"COMPRESSEDnot-gzip"}"#;
    let invocation = with_good(kinesis(1, json!(b64(bad.as_bytes()))));
    #[derive(serde::Deserialize)]
    struct Typed {
        #[allow(dead_code)]
        thing: serde_json::Map<String, Value>,
    }
    let typed = Pipeline::builder("typed").validate_as::<Typed>();
    let (answer, delivered, faults) = run_through(typed, invocation.clone()).await;
    assert_eq!(answer["batchItemFailures"], json!([]));
    assert_eq!((delivered, faults.len()), (1, 1));
    assert_eq!(faults[0].0, "CompressedFieldError");
    assert!(
        faults[0]
            .1
            .contains("`thing` is marked COMPRESSED but is not base64"),
        "{}",
        faults[0].1
    );
    // A pipeline that only passes events on forwards it as it came, unread.
    let (answer, delivered, faults) = run(invocation).await;
    assert_eq!(answer["batchItemFailures"], json!([]));
    assert_eq!((delivered, faults.len()), (2, 0));
}

#[tokio::test]
async fn a_bad_ciphertext_is_one_precise_fault_for_a_pipeline_that_decrypts() {
    use floodway::encryption::{encrypt_event, KeyFile, KeyProvider};
    let keys: std::sync::Arc<dyn KeyProvider> =
        std::sync::Arc::new(KeyFile::new("k", &[3; 32]).unwrap());
    let clear = floodway::Event::decode(
        br#"{"id":"sealed","type":"thing-created","timestamp":1,"partitionKey":"k","thing":{"email":"a@example.com"}}"#,
    )
    .unwrap();
    let sealed = encrypt_event(&*keys, &clear, &["email".to_owned()])
        .await
        .unwrap();
    // The ciphertext of `email` cut short, as a bad copy would leave it.
    let mut value = sealed.to_value();
    let cipher = value["thing"]["email"].as_str().unwrap().to_owned();
    value["thing"]["email"] = json!(cipher[..cipher.len() - 8]);
    let bad = value.to_string();
    let invocation = with_good(kinesis(1, json!(b64(bad.as_bytes()))));
    let clear = Pipeline::builder("clear").decrypt(keys);
    let (answer, delivered, faults) = run_through(clear, invocation).await;
    assert_eq!(answer["batchItemFailures"], json!([]));
    assert_eq!(
        (delivered, faults.len()),
        (1, 1),
        "the good record, one fault"
    );
    assert_eq!(faults[0].0, "DecryptionError");
    // Eight base64 characters short is still base64, of a ciphertext cut mid-block.
    assert!(
        faults[0].1.contains("not an encrypted value"),
        "{}",
        faults[0].1
    );
}

#[tokio::test]
async fn unreadable_records_of_two_invocations_are_two_faults() {
    // Each is the first record of its invocation, with nothing that says where it came from:
    // only its bytes tell the two apart.
    let faults = MemoryFaultSink::new();
    let processor = Processor::builder("catalogue")
        .fault_sink(faults.clone())
        .pipeline(Pipeline::builder("all").sink(MemorySink::new()).unwrap())
        .build()
        .unwrap();
    let handler = Handler::new(processor);
    for detail in [json!("text"), json!([1])] {
        let invocation = json!({ "detail-type": "thing-created", "source": "s", "detail": detail });
        assert_eq!(handler.handle(invocation, None).await.unwrap(), Value::Null);
    }
    let ids: Vec<String> = faults
        .faults()
        .iter()
        .map(|f| floodway::fault::fault_id(f).to_owned())
        .collect();
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1], "two records, two faults");
}

/// A handler whose fault store is gone: a record that cannot be read stays unfinished, and
/// the answer must name it.
fn faults_down() -> Handler {
    let processor = Processor::builder("p")
        .fault_sink(floodway::sink::fault_sink_fn(|_fault| async {
            Err(floodway::Error::fatal_msg(
                "FaultsDown",
                "the fault store is gone",
            ))
        }))
        .pipeline(Pipeline::builder("all").sink(MemorySink::new()).unwrap())
        .build()
        .unwrap();
    Handler::new(processor)
}

/// A good DynamoDB change, then one malformed past its envelope (a number that is not text),
/// sequence number 700.
fn good_then_malformed_change() -> Value {
    let bad = json!({
        "Keys": { "pk": { "S": "2" } },
        "NewImage": { "n": { "N": 5 } },
        "SequenceNumber": "700",
    });
    json!({ "Records": [dynamodb(0, "INSERT", good_row()), dynamodb(1, "INSERT", bad)]})
}

/// A DynamoDB record that is malformed past its envelope, whose fault cannot be stored: the
/// answer names it by its sequence number (an identifier not in the batch would fail the
/// whole batch, done records included), and the good record before it is not reported.
#[tokio::test]
async fn a_malformed_change_whose_fault_is_not_stored_is_reported_by_its_sequence_number() {
    let invocation = good_then_malformed_change();
    let answer = faults_down().handle(invocation, None).await.unwrap();
    assert_eq!(
        answer,
        json!({ "batchItemFailures": [{ "itemIdentifier": "700" }] })
    );
}

/// A change of a large item (two images of about 400 KB, over the 1 MiB an event may have
/// once together) is a change event like any other, as aws-lambda-stream takes it: not a
/// fault that could not be resubmitted.
#[tokio::test]
async fn a_change_of_a_large_item_is_processed_not_faulted() {
    let faults = MemoryFaultSink::new();
    let sink = MemorySink::new();
    let processor = Processor::builder("p")
        .fault_sink(faults.clone())
        .pipeline(Pipeline::builder("all").sink(sink.clone()).unwrap())
        .build()
        .unwrap();
    let blob = |byte: u8| json!({ "B": b64(&vec![byte; 399_000]) });
    let image =
        |byte: u8| json!({ "pk": { "S": "1" }, "sk": { "S": "thing" }, "blob": blob(byte) });
    let change = json!({
        "Keys": { "pk": { "S": "1" }, "sk": { "S": "thing" } },
        "NewImage": image(1),
        "OldImage": image(2),
        "SequenceNumber": "900",
    });
    let invocation = json!({ "Records": [dynamodb(0, "MODIFY", change)] });
    let answer = Handler::new(processor)
        .handle(invocation, None)
        .await
        .unwrap();
    assert!(faults.faults().is_empty(), "{answer}");
    let delivered = sink.events();
    assert_eq!(delivered.len(), 1);
    assert!(delivered[0].encoded_len() > 1 << 20);
    assert_eq!(delivered[0].event_type(), "thing-updated");
}

/// Records that do not even parse as their kind, whose faults cannot be stored: named by the
/// sequence number or message id they still carry, not by their index in the batch (which
/// Lambda knows as no record of it, and fails the whole batch for).
#[tokio::test]
async fn an_unparsable_record_whose_fault_is_not_stored_is_reported_by_what_it_still_says() {
    let kinesis = json!({ "Records": [{
        "eventSource": "aws:kinesis",
        "eventID": "shardId-000000000001:49590338271490256608559692538361571095921575989136588898",
        "kinesis": { "sequenceNumber": "49590338271490256608559692538361571095921575989136588898", "data": 5 },
    }]});
    let answer = faults_down().handle(kinesis, None).await.unwrap();
    assert_eq!(
        answer["batchItemFailures"],
        json!([{ "itemIdentifier": "49590338271490256608559692538361571095921575989136588898" }])
    );
    let sqs = json!({ "Records": [{ "eventSource": "aws:sqs", "messageId": "m-7", "body": null }]});
    let answer = faults_down().handle(sqs, None).await.unwrap();
    assert_eq!(
        answer["batchItemFailures"],
        json!([{ "itemIdentifier": "m-7" }])
    );
}

/// A mapping without `ReportBatchItemFailures` ignores `batchItemFailures` and takes the
/// whole batch as done: told so, the handler fails the invocation instead, so that Lambda
/// retries it and the unfinished record is not lost; a batch finished whole answers as before.
#[tokio::test]
async fn without_reported_item_failures_an_unfinished_record_fails_the_invocation() {
    let invocation = good_then_malformed_change();
    let err = faults_down()
        .item_failures(false)
        .handle(invocation, None)
        .await
        .unwrap_err();
    assert_eq!(err.error_type(), "EventNotFinished");
    assert!(err.to_string().contains("700"), "{err}");
    let done = json!({ "Records": [dynamodb(0, "INSERT", good_row())] });
    let answer = faults_down()
        .item_failures(false)
        .handle(done, None)
        .await
        .unwrap();
    assert_eq!(answer, json!({ "batchItemFailures": [] }));
}
