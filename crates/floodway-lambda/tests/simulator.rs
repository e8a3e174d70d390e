//! Handlers under the event-source-mapping simulator, on tokio's paused clock: partial-batch
//! checkpointing, deadlines, bisection, retries, record age, SQS redelivery and dead letters,
//! and the DynamoDB change-data-capture rules.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use floodway::memory::MemoryFaultSink;
use floodway::{sink_fn, Batch, Error, Event, Pipeline, Processor};
use floodway_lambda::simulator::{GivenUp, Outcome};
use floodway_lambda::{
    Function, Handler, InProcess, InvokeError, QueueMapping, QueueMessage, StreamKind,
    StreamMapping, StreamRecord,
};
use serde_json::{json, Value};
use tokio::time::Instant;

mod common;
use common::{dynamodb_shard, handler, run_cdc, CDC_TYPES};

fn orders(n: u64) -> Vec<Event> {
    (0..n)
        .map(|i| {
            Event::builder("order-paid", format!("o-{}", i % 7))
                .id(format!("e-{i}"))
                .timestamp(1_700_000_000_000 + i as i64)
                .field("n", i)
                .build()
        })
        .collect()
}

fn shard(events: &[Event]) -> Vec<StreamRecord> {
    common::shard_from(1000, events)
}

type Deliveries = Arc<Mutex<HashMap<String, u32>>>;

/// A processor whose sink faults `n % 10 == 3` (poison), is down until `down_until` (an
/// outage: every other call fails transiently), and counts every delivery it accepts.
fn processor(deliveries: &Deliveries, faults: &MemoryFaultSink, down_until: Instant) -> Processor {
    let deliveries = deliveries.clone();
    let sink = sink_fn(move |batch: Batch| {
        let deliveries = deliveries.clone();
        async move {
            for e in batch.events() {
                let n = e.field("n").and_then(Value::as_u64).unwrap_or(0);
                if n % 10 == 3 {
                    return Err(Error::poison_msg("Rejected", format!("order {n}")));
                }
                if Instant::now() < down_until {
                    return Err(Error::transient_msg("Unavailable", "down"));
                }
            }
            let mut d = deliveries.lock().unwrap();
            for e in batch.events() {
                *d.entry(e.id().to_owned()).or_default() += 1;
            }
            Ok::<_, Error>(())
        }
    });
    Processor::builder("orders")
        .fault_sink(faults.clone())
        .pipeline(Pipeline::builder("notify").sink(sink).unwrap())
        .build()
        .unwrap()
}

/// A handler around [`processor`], with delivery counts and a fault sink of its own.
fn handler_down_until(down_until: Instant) -> (Handler, Deliveries, MemoryFaultSink) {
    let deliveries: Deliveries = Arc::default();
    let faults = MemoryFaultSink::new();
    let handler = Handler::new(processor(&deliveries, &faults, down_until));
    (handler, deliveries, faults)
}

/// A deadline 5 s from now, in epoch milliseconds, as Lambda gives it.
fn deadline() -> Option<u64> {
    Some(u64::try_from(floodway::event::now_millis()).unwrap() + 5_000)
}

/// An SQS record of a FIFO queue carrying `event`, in message group `group`.
fn fifo_message(i: usize, event: &Event, group: &str) -> Value {
    json!({
        "messageId": format!("m-{i}"),
        "body": event.to_json(),
        "attributes": { "ApproximateReceiveCount": "1", "MessageGroupId": group },
        "messageAttributes": {},
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:local:000000000000:orders.fifo",
    })
}

fn kinesis() -> StreamKind {
    StreamKind::Kinesis {
        stream: "orders".into(),
    }
}

#[tokio::test(start_paused = true)]
async fn poison_is_faulted_and_transient_is_reported_from_the_failing_record() {
    let events = orders(50);
    // The target is down for 25 s: longer than a 10 s invocation.
    let (handler, deliveries, faults) =
        handler_down_until(Instant::now() + Duration::from_secs(25));
    let mapping = StreamMapping {
        batch_size: 25,
        function_timeout: Duration::from_secs(10),
        maximum_retry_attempts: None,
        ..StreamMapping::default()
    };
    let report = mapping
        .run_shard(
            &kinesis(),
            "shardId-000000000000",
            &shard(&events),
            &mut InProcess(handler),
        )
        .await;

    // Every invocation answered before its timeout: none is a function error.
    assert!(
        report
            .invocations
            .iter()
            .all(|i| !matches!(i.outcome, Outcome::Error(_))),
        "{report:#?}"
    );
    // The outage held the first invocation, which reported its first record (the breaker
    // held everything; nothing transient was faulted); the next started from it.
    assert_eq!(
        report.invocations[0].outcome,
        Outcome::Partial(1000),
        "{report:#?}"
    );
    assert_eq!(report.invocations[1].first, 1000, "{report:#?}");
    assert!(report.given_up.is_empty());
    assert_eq!(report.checkpoint, Some(1049));
    // Poison: five faults, never reported, never delivered.
    let faulted: Vec<String> = faults.faults().iter().map(|f| f.id().to_owned()).collect();
    assert_eq!(faulted.len(), 5);
    let d = deliveries.lock().unwrap();
    for e in &events {
        let n = e.field("n").and_then(Value::as_u64).unwrap();
        let times = d.get(e.id()).copied().unwrap_or(0);
        if n % 10 == 3 {
            assert_eq!(times, 0, "{}", e.id());
        } else {
            assert!(times >= 1, "{}", e.id());
        }
    }
}

/// A function that crashes on any batch holding sequence 1013.
struct Crashing;

impl Function for Crashing {
    async fn invoke(&mut self, payload: Value, _timeout: Duration) -> Result<Value, InvokeError> {
        let holds = payload["Records"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["kinesis"]["sequenceNumber"] == "1013");
        if holds {
            Err(InvokeError::Function("Runtime.ExitError".into()))
        } else {
            Ok(json!({ "batchItemFailures": [] }))
        }
    }
}

/// A function that crashes on every invocation.
struct AlwaysCrashing;

impl Function for AlwaysCrashing {
    async fn invoke(&mut self, _payload: Value, _timeout: Duration) -> Result<Value, InvokeError> {
        Err(InvokeError::Function("Runtime.ExitError".into()))
    }
}

#[tokio::test(start_paused = true)]
async fn bisection_isolates_a_crashing_record_and_retries_give_up_on_it() {
    let events = orders(32);
    let mapping = StreamMapping {
        batch_size: 16,
        // Fewer retries than halvings of 16 records: splitting does not use them up.
        maximum_retry_attempts: Some(2),
        ..StreamMapping::default()
    };
    let kind = kinesis();
    let report = mapping
        .run_shard(&kind, "shard-1", &shard(&events), &mut Crashing)
        .await;
    assert_eq!(
        report.given_up,
        vec![GivenUp {
            shard: "shard-1".into(),
            first: 1013,
            last: 1013,
            records: 1,
            reason: "RetryAttemptsExhausted".into(),
        }]
    );
    assert_eq!(report.checkpoint, Some(1031));
    // The halves that did not hold it succeeded; per-shard order held.
    let firsts: Vec<u64> = report.invocations.iter().map(|i| i.first).collect();
    assert!(firsts.windows(2).all(|w| w[0] <= w[1]), "{firsts:?}");

    // Without bisection, the whole batch of 16 is given up.
    let plain = StreamMapping {
        bisect_on_error: false,
        ..mapping
    };
    let report = plain
        .run_shard(&kind, "shard-1", &shard(&events), &mut Crashing)
        .await;
    assert_eq!(report.given_up.len(), 1);
    assert_eq!(report.given_up[0].records, 16);
    assert_eq!(report.invocations.len(), 3 + 1);
}

#[tokio::test(start_paused = true)]
async fn records_older_than_the_maximum_age_are_given_up_unread() {
    let events = orders(10);
    let records = shard(&events);
    tokio::time::advance(Duration::from_secs(120)).await;
    let mapping = StreamMapping {
        maximum_record_age: Some(Duration::from_secs(60)),
        ..StreamMapping::default()
    };
    let report = mapping
        .run_shard(&kinesis(), "s", &records, &mut Crashing)
        .await;
    assert!(report.invocations.is_empty());
    assert_eq!(report.given_up[0].reason, "RecordAgeExceeded");
    assert_eq!(report.given_up[0].records, 10);
}

#[tokio::test(start_paused = true)]
async fn sqs_redelivers_what_failed_and_dead_letters_what_keeps_failing() {
    let events = orders(30);
    let (handler, deliveries, faults) =
        handler_down_until(Instant::now() + Duration::from_secs(45));
    let messages: Vec<QueueMessage> = events
        .iter()
        .map(|e| QueueMessage {
            id: format!("m-{}", e.id()),
            body: e.to_json(),
        })
        .collect();
    let mapping = QueueMapping {
        function_timeout: Duration::from_secs(10),
        visibility_timeout: Duration::from_secs(30),
        max_receive_count: Some(5),
        ..QueueMapping::default()
    };
    let report = mapping
        .run(
            "arn:aws:sqs:local:000000000000:orders",
            messages.clone(),
            &mut InProcess(handler),
        )
        .await;
    // Poison messages were faulted and deleted; the transient one came back after the
    // visibility timeout and succeeded once the target was up; nothing was dead-lettered.
    assert_eq!(
        faults.faults().len(),
        3,
        "{report:?} {:?}",
        deliveries.lock().unwrap()
    );
    assert!(report.dead_letters.is_empty(), "{report:?}");
    assert_eq!(report.deleted.len(), 30);
    assert_eq!(deliveries.lock().unwrap().get("e-20"), Some(&1));

    // A function that always crashes: every message is dead-lettered after 5 receives.
    let report = QueueMapping {
        max_receive_count: Some(5),
        ..QueueMapping::default()
    }
    .run("arn", messages[..3].to_vec(), &mut AlwaysCrashing)
    .await;
    assert_eq!(report.dead_letters.len(), 3);
    assert!(report.dead_letters.iter().all(|(_, n)| *n == 5));

    // No visibility timeout and no dead-letter queue: received again and again as time
    // passes, until the queue's retention ends it (not for ever, on a clock that stands).
    let report = QueueMapping {
        visibility_timeout: Duration::ZERO,
        max_receive_count: None,
        message_retention: Duration::from_secs(60),
        function_timeout: Duration::MAX,
        ..QueueMapping::default()
    }
    .run("arn", messages[..1].to_vec(), &mut AlwaysCrashing)
    .await;
    assert_eq!(report.expired.len(), 1, "{report:?}");
}

fn ddb_record(seq: u64, name: &str, new: Option<Value>, old: Option<Value>, extra: Value) -> Value {
    let mut record = json!({
        "eventID": format!("ev-{seq}"),
        "eventName": name,
        "eventVersion": "1.1",
        "eventSource": "aws:dynamodb",
        "awsRegion": "eu-west-1",
        "dynamodb": {
            "ApproximateCreationDateTime": 1_700_000_000.0 + seq as f64,
            "Keys": { "pk": { "S": "thing-1" }, "sk": { "S": "A" } },
            "SequenceNumber": seq.to_string(),
            "SizeBytes": 100,
            "StreamViewType": "NEW_AND_OLD_IMAGES"
        },
        "eventSourceARN": "arn:aws:dynamodb:eu-west-1:000000000000:table/things/stream/2026-01-01T00:00:00.000"
    });
    if let Some(new) = new {
        record["dynamodb"]["NewImage"] = new;
    }
    if let Some(old) = old {
        record["dynamodb"]["OldImage"] = old;
    }
    if let Value::Object(extra) = extra {
        for (k, v) in extra {
            record[k] = v;
        }
    }
    record
}

fn image(name: &str, deleted: Option<bool>, timestamp: Option<i64>, region: &str) -> Value {
    let mut image = json!({
        "pk": { "S": "thing-1" },
        "sk": { "S": "A" },
        "discriminator": { "S": "thing" },
        "name": { "S": name },
        "aws:rep:updateregion": { "S": region },
    });
    if let Some(d) = deleted {
        image["deleted"] = json!({ "BOOL": d });
    }
    if let Some(t) = timestamp {
        image["timestamp"] = json!({ "N": t.to_string() });
    }
    image
}

#[tokio::test(start_paused = true)]
async fn dynamodb_changes_become_events_by_the_cdc_rules() {
    std::env::set_var("AWS_REGION", "eu-west-1");
    let here = "eu-west-1";
    let records = [
        ddb_record(
            1,
            "INSERT",
            Some(image("a", None, Some(1_700_000_000_500), here)),
            None,
            json!({}),
        ),
        ddb_record(
            2,
            "MODIFY",
            Some(image("b", None, None, here)),
            Some(image("a", None, None, here)),
            json!({}),
        ),
        ddb_record(
            3,
            "MODIFY",
            Some(image("b", Some(true), None, here)),
            Some(image("b", None, None, here)),
            json!({}),
        ),
        ddb_record(
            4,
            "MODIFY",
            Some(image("b", Some(false), None, here)),
            Some(image("b", Some(true), None, here)),
            json!({}),
        ),
        // Written in another region of the global table: not ours to publish.
        ddb_record(
            5,
            "MODIFY",
            Some(image("c", None, None, "us-east-1")),
            Some(image("b", None, None, here)),
            json!({}),
        ),
        ddb_record(
            6,
            "REMOVE",
            None,
            Some(image("b", None, None, here)),
            json!({}),
        ),
        // Expired by TTL.
        ddb_record(
            7,
            "REMOVE",
            None,
            Some(image("b", None, None, here)),
            json!({ "userIdentity": { "type": "Service", "principalId": "dynamodb.amazonaws.com" } }),
        ),
    ];
    let (events, checkpoint) = run_cdc(&dynamodb_shard(&records)).await;
    assert_eq!(checkpoint, Some(7));
    let types: Vec<&str> = events.iter().map(Event::event_type).collect();
    assert_eq!(types, CDC_TYPES);
    let first = &events[0];
    assert_eq!(first.id(), "ev-1");
    assert_eq!(first.partition_key(), "thing-1");
    assert_eq!(first.timestamp(), 1_700_000_000_500, "the row's timestamp");
    assert_eq!(
        events[1].timestamp(),
        1_700_000_002_000,
        "the stream record's time"
    );
    assert_eq!(first.field("raw").unwrap()["new"]["name"], "a");
    assert_eq!(first.field("raw").unwrap()["old"], Value::Null);
    assert_eq!(events[1].field("raw").unwrap()["old"]["name"], "a");
    assert_eq!(events[4].field("raw").unwrap()["new"], Value::Null);
}

#[tokio::test(start_paused = true)]
async fn eventbridge_events_succeed_fault_or_fail_for_a_retry() {
    let envelope = |e: &Event| {
        json!({
            "version": "0", "id": format!("eb-{}", e.id()), "detail-type": e.event_type(),
            "source": "orders", "account": "000000000000", "time": "2026-11-26T10:00:00Z",
            "region": "local", "resources": [],
            "detail": serde_json::from_str::<Value>(&e.to_json()).unwrap(),
        })
    };
    let events = orders(4);
    let (handler, deliveries, faults) = handler_down_until(Instant::now());
    assert!(handler
        .handle(envelope(&events[1]), deadline())
        .await
        .is_ok());
    assert_eq!(deliveries.lock().unwrap().get("e-1"), Some(&1));
    assert!(
        handler
            .handle(envelope(&events[3]), deadline())
            .await
            .is_ok(),
        "poison is faulted, not retried"
    );
    assert_eq!(faults.faults().len(), 1);

    // The target is down past the deadline: an error, so that EventBridge retries.
    let down = Handler::new(processor(
        &deliveries,
        &faults,
        Instant::now() + Duration::from_secs(3600),
    ));
    let err = down
        .handle(envelope(&events[2]), deadline())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not finished"), "{err}");
    assert_eq!(
        faults.faults().len(),
        1,
        "a transient failure is not faulted"
    );
}

#[tokio::test(start_paused = true)]
async fn unbounded_retries_end_when_the_stream_drops_the_record() {
    let events = orders(3);
    let mapping = StreamMapping {
        maximum_retry_attempts: None,
        maximum_record_age: None,
        retry_delay: Duration::from_secs(60),
        retention: Duration::from_secs(3600),
        ..StreamMapping::default()
    };
    let report = mapping
        .run_shard(&kinesis(), "s", &shard(&events), &mut AlwaysCrashing)
        .await;
    // Bisection split the batch; every part ended as the stream dropped it.
    assert!(report.given_up.iter().all(|g| g.reason == "RecordExpired"));
    assert_eq!(report.given_up.iter().map(|g| g.records).sum::<usize>(), 3);
}

#[tokio::test(start_paused = true)]
async fn on_a_fifo_queue_later_messages_of_a_group_wait_for_an_unfinished_one() {
    // e-1's call takes an hour, longer than the invocation; e-2 shares its message group but
    // not its key.
    let sink = sink_fn(|batch: Batch| async move {
        if batch.events().any(|e| e.id() == "e-1") {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Ok::<_, Error>(())
    });
    let handler = handler("fifo", Pipeline::builder("p").sink(sink).unwrap());
    let events = orders(4);
    let records: Vec<Value> = ["a", "g", "g", "b"]
        .into_iter()
        .enumerate()
        .map(|(i, group)| fifo_message(i, &events[i], group))
        .collect();
    let payload = json!({ "Records": records });
    let answer = handler.handle(payload, deadline()).await.unwrap();
    let reported: Vec<&str> = answer["batchItemFailures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["itemIdentifier"].as_str().unwrap())
        .collect();
    assert_eq!(reported, ["m-1", "m-2"]);
}

#[tokio::test(start_paused = true)]
async fn a_fifo_queue_processes_a_message_group_in_order_whatever_the_partition_keys() {
    // One message group, five events of five different partition keys: the first call is the
    // slowest, so anything run concurrently would finish out of order.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let sink = sink_fn(move |batch: Batch| {
        let log = log.clone();
        async move {
            let id = batch.events().next().unwrap().id().to_owned();
            let n: u64 = id.trim_start_matches("e-").parse().unwrap();
            tokio::time::sleep(Duration::from_millis(100 - n * 10)).await;
            log.lock().unwrap().push(id);
            Ok::<_, Error>(())
        }
    });
    let handler = handler(
        "fifo",
        Pipeline::builder("p").parallelism(8).sink(sink).unwrap(),
    );
    let events = orders(5);
    let records: Vec<Value> = (0..5).map(|i| fifo_message(i, &events[i], "g")).collect();
    let answer = handler
        .handle(json!({ "Records": records }), deadline())
        .await
        .unwrap();
    assert!(answer["batchItemFailures"].as_array().unwrap().is_empty());
    assert_eq!(*seen.lock().unwrap(), ["e-0", "e-1", "e-2", "e-3", "e-4"]);
}
