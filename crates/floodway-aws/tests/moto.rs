//! The AWS sinks against `moto` in server mode on loopback (PyPI `moto[server]`, installed by
//! `scripts/test`), and the Lambda side against real stream records: a Kinesis stream and a
//! DynamoDB table's stream read into the event-source-mapping simulator, through the handler in
//! this process and a real handler binary behind the local Runtime API.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_config::SdkConfig;
use bytes::Bytes;
use floodway::fault_store::{FaultFilter, FaultStatus, FaultStore as _, ResubmitOutcome};
use floodway::memory::{MemoryFaultSink, MemorySink};
use floodway::testing::generate;
use floodway::Uow;
use floodway::{Batch, Error, Event, Pipeline, Processor, Record};
use floodway_aws::testing::{table, Moto};
use floodway_aws::{
    ClaimCheck, DynamoDbFaults, DynamoDbView, EventBridgeSink, KinesisSink, LambdaResubmitter,
    Resubmitted, S3Faults, S3Lake, SqsSink,
};
use floodway_lambda::{
    FunctionProcess, Handler, InProcess, LocalRuntime, StreamKind, StreamMapping, StreamRecord,
};
use serde_json::{json, Value};
use tower::ServiceExt;

#[path = "../../floodway-lambda/tests/common/mod.rs"]
mod lambda;
use lambda::{dynamodb_shard, handler, run_cdc, run_cdc_keeping, CDC_TYPES};

fn batch(events: &[Event]) -> Batch {
    Batch::new(events.iter().cloned().map(Uow::detached).collect())
}

/// Sends the events as one batch; the first entry the sink reports failed is the error.
async fn send<S: floodway::Sink>(sink: S, events: &[Event]) -> Result<(), Error> {
    let delivery: floodway::Delivery = sink.oneshot(batch(events)).await?.into();
    match delivery.into_failed().into_iter().next() {
        None => Ok(()),
        Some((_, error)) => Err(error),
    }
}

/// Every record of one shard from its trim horizon, each made into `$record`. Kinesis and
/// DynamoDB Streams share this API but not its types: `$client` is either's client,
/// `$iterator_type` its `ShardIteratorType`, and `$locate($stream)` names the stream.
macro_rules! read_shard {
    ($client:expr, $iterator_type:ty, $shard:expr, $locate:ident($stream:expr), |$r:ident| $record:expr) => {{
        let mut iterator = $client
            .get_shard_iterator()
            .$locate($stream)
            .shard_id($shard)
            .shard_iterator_type(<$iterator_type>::TrimHorizon)
            .send()
            .await
            .unwrap()
            .shard_iterator()
            .map(str::to_owned);
        let mut records = Vec::new();
        while let Some(it) = iterator {
            let page = $client
                .get_records()
                .shard_iterator(it)
                .send()
                .await
                .unwrap();
            if page.records().is_empty() {
                break;
            }
            records.extend(page.records().iter().map(|$r| $record));
            iterator = page.next_shard_iterator().map(str::to_owned);
        }
        records
    }};
}

/// Every record of a Kinesis stream's shards, as the simulator's shard records.
async fn read_kinesis(config: &SdkConfig, stream: &str) -> Vec<(String, Vec<StreamRecord>)> {
    let client = aws_sdk_kinesis::Client::new(config);
    let shards = client
        .list_shards()
        .stream_name(stream)
        .send()
        .await
        .unwrap();
    let mut out = Vec::new();
    for shard in shards.shards() {
        let records = read_shard!(
            client,
            aws_sdk_kinesis::types::ShardIteratorType,
            shard.shard_id(),
            stream_name(stream),
            |r| StreamRecord {
                sequence: r.sequence_number().parse().unwrap(),
                partition_key: r.partition_key().unwrap_or_default().to_owned(),
                data: Bytes::copy_from_slice(r.data().as_ref()),
                arrived: tokio::time::Instant::now(),
            }
        );
        out.push((shard.shard_id().to_owned(), records));
    }
    out
}

fn example_handler() -> PathBuf {
    // Built by the floodway-lambda package; the workspace's target directory holds it.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join("floodway-example-handler");
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build -p floodway-lambda --bins`",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_sink_and_stream_through_the_simulator_and_a_real_handler() {
    let (_moto, config) = Moto::configured().await;
    let kinesis = aws_sdk_kinesis::Client::new(&config);
    kinesis
        .create_stream()
        .stream_name("orders")
        .shard_count(2)
        .send()
        .await
        .unwrap();
    // 600 events: two calls (500 + 100); one keyed by more than Kinesis' 256 characters.
    let mut events = generate::orders(600, 21);
    events[550] = Event::builder("order-noted", "k".repeat(300))
        .id("e-long-key")
        .timestamp(events[550].timestamp())
        .build();
    send(KinesisSink::new(&config, "orders"), &events)
        .await
        .unwrap();

    let shards = read_kinesis(&config, "orders").await;
    assert_eq!(shards.iter().map(|(_, r)| r.len()).sum::<usize>(), 600);
    // Per-key order survives: a key lives in one shard, in publish order.
    let kind = StreamKind::Kinesis {
        stream: "orders".into(),
    };
    let sink = MemorySink::new();
    let pipeline = Pipeline::builder("all")
        .event_type("*")
        .sink(sink.clone())
        .unwrap();
    let mapping = StreamMapping {
        batch_size: 100,
        ..StreamMapping::default()
    };
    let mut function = InProcess(handler("orders", pipeline));
    for (shard, records) in &shards {
        let report = mapping
            .run_shard(&kind, shard, records, &mut function)
            .await;
        assert!(report.given_up.is_empty());
        assert_eq!(report.checkpoint, records.last().map(|r| r.sequence));
    }
    let got = sink.events();
    assert_eq!(got.len(), 600);
    let mut last: HashMap<String, i64> = HashMap::new();
    for e in &got {
        let previous = last.insert(e.partition_key().to_owned(), e.timestamp());
        assert!(
            previous.is_none_or(|p| p <= e.timestamp()),
            "order of {}",
            e.partition_key()
        );
    }

    // The same records through a real handler binary and the local Runtime API.
    let mut runtime = LocalRuntime::start().await.unwrap();
    let _function = FunctionProcess::spawn(&example_handler(), &[], &runtime, &[]).unwrap();
    let mut invocations = 0;
    for (shard, records) in &shards {
        let report = mapping.run_shard(&kind, shard, records, &mut runtime).await;
        assert!(report.given_up.is_empty(), "{report:?}");
        invocations += report.invocations.len();
    }
    assert_eq!(
        invocations,
        shards
            .iter()
            .map(|(_, r)| r.len().div_ceil(100))
            .sum::<usize>()
    );
}

/// Creates queue `name`; its URL.
async fn create_queue(sqs: &aws_sdk_sqs::Client, name: &str) -> String {
    let created = sqs.create_queue().queue_name(name).send().await.unwrap();
    created.queue_url().unwrap().to_owned()
}

/// What `read` makes of the bodies of the messages on `queue`, received until there are
/// `n` different ones (or ten receives have been made).
async fn receive(
    sqs: &aws_sdk_sqs::Client,
    queue: &str,
    n: usize,
    read: impl Fn(&str) -> String,
) -> HashSet<String> {
    let mut got = HashSet::new();
    for _ in 0..10 {
        let out = sqs
            .receive_message()
            .queue_url(queue)
            .max_number_of_messages(10)
            .send()
            .await
            .unwrap();
        got.extend(out.messages().iter().map(|m| read(m.body().unwrap())));
        if got.len() == n {
            break;
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventbridge_and_sqs_sinks_deliver_every_event() {
    let (_moto, config) = Moto::configured().await;
    let sqs = aws_sdk_sqs::Client::new(&config);
    let queue = create_queue(&sqs, "orders").await;
    let events = generate::orders(25, 22);
    send(SqsSink::new(&config, &queue), &events).await.unwrap();
    let bodies = receive(&sqs, &queue, 25, str::to_owned).await;
    let sent: HashSet<String> = events.iter().map(Event::to_json).collect();
    assert_eq!(bodies, sent);

    // A FIFO queue takes groups and deduplication ids of letters, digits and punctuation, 1
    // to 128 of them: keys and ids it would refuse are sent as stable ids of themselves.
    let fifo = sqs
        .create_queue()
        .queue_name("orders.fifo")
        .attributes(aws_sdk_sqs::types::QueueAttributeName::FifoQueue, "true")
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_owned();
    let odd: Vec<Event> = [("", "e-1"), ("o 1", "e 2"), (&"k".repeat(200)[..], "e-3")]
        .iter()
        .map(|(key, id)| Event::builder("order-noted", *key).id(*id).build())
        .collect();
    send(SqsSink::new(&config, &fifo), &odd).await.unwrap();
    let bodies = receive(&sqs, &fifo, 3, str::to_owned).await;
    assert_eq!(bodies, odd.iter().map(Event::to_json).collect());

    // EventBridge to a queue through a rule: every event arrives as an entry's detail.
    let events_client = aws_sdk_eventbridge::Client::new(&config);
    let target_queue = create_queue(&sqs, "from-bus").await;
    let arn = sqs
        .get_queue_attributes()
        .queue_url(&target_queue)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes()
        .unwrap()[&aws_sdk_sqs::types::QueueAttributeName::QueueArn]
        .clone();
    events_client
        .create_event_bus()
        .name("floodway")
        .send()
        .await
        .unwrap();
    events_client
        .put_rule()
        .name("all")
        .event_bus_name("floodway")
        .event_pattern(json!({ "source": ["orders"] }).to_string())
        .send()
        .await
        .unwrap();
    events_client
        .put_targets()
        .rule("all")
        .event_bus_name("floodway")
        .targets(
            aws_sdk_eventbridge::types::Target::builder()
                .id("queue")
                .arn(arn)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    // 25 events: three calls of at most 10 entries.
    send(EventBridgeSink::new(&config, "floodway", "orders"), &events)
        .await
        .unwrap();
    let ids = receive(&sqs, &target_queue, 25, |body| {
        let envelope: Value = serde_json::from_str(body).unwrap();
        assert_eq!(envelope["source"], "orders");
        envelope["detail"]["id"].as_str().unwrap().to_owned()
    })
    .await;
    assert_eq!(ids.len(), 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_view_is_latest_wins() {
    let (_moto, config) = Moto::configured().await;
    let dynamo = aws_sdk_dynamodb::Client::new(&config);
    table(&config, "orders", true).await;
    let view = DynamoDbView::new(
        &config,
        "orders",
        |e: &Event| Ok(e.partition_key().to_owned()),
        |e: &Event| Ok(e.field("order").cloned().unwrap_or(Value::Null)),
    )
    .discriminator("order");
    let events = generate::orders(80, 23);
    // Newest first, then everything again: older events and duplicates change nothing.
    let mut shuffled: Vec<Event> = events
        .iter()
        .filter(|e| e.event_type().starts_with("order-"))
        .cloned()
        .collect();
    shuffled.reverse();
    send(view.clone(), &shuffled).await.unwrap();
    send(view.clone(), &shuffled).await.unwrap();
    let mut latest: HashMap<String, &Event> = HashMap::new();
    for e in events
        .iter()
        .filter(|e| e.event_type().starts_with("order-"))
    {
        latest.insert(e.partition_key().to_owned(), e);
    }
    for (key, e) in &latest {
        let item = dynamo
            .get_item()
            .table_name("orders")
            .key(
                "pk",
                aws_sdk_dynamodb::types::AttributeValue::S(key.clone()),
            )
            .send()
            .await
            .unwrap();
        let item = item.item().unwrap();
        assert_eq!(item["eventId"].as_s().unwrap(), e.id(), "key {key}");
    }
}

/// A `moto_server` of its own, its configuration, and a table `name` in it (see [`table`]).
async fn moto_with_table(name: &str) -> (Moto, SdkConfig) {
    let (moto, config) = Moto::configured().await;
    table(&config, name, false).await;
    (moto, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_dynamodb_stream_records_become_change_events() {
    use aws_sdk_dynamodb::types::AttributeValue as A;
    let (_moto, config) = Moto::configured().await;
    let dynamo = aws_sdk_dynamodb::Client::new(&config);
    let stream_arn = table(&config, "things", true).await.unwrap();
    let put = |name: &str, ts: i64, deleted: Option<bool>| {
        let mut item = HashMap::from([
            ("pk".to_owned(), A::S("thing-1".into())),
            ("discriminator".to_owned(), A::S("thing".into())),
            ("name".to_owned(), A::S(name.into())),
            ("timestamp".to_owned(), A::N(ts.to_string())),
        ]);
        if let Some(d) = deleted {
            item.insert("deleted".into(), A::Bool(d));
        }
        dynamo
            .put_item()
            .table_name("things")
            .set_item(Some(item))
            .send()
    };
    put("a", 1_700_000_000_001, None).await.unwrap();
    put("b", 1_700_000_000_002, None).await.unwrap();
    put("b", 1_700_000_000_003, Some(true)).await.unwrap();
    put("b", 1_700_000_000_004, Some(false)).await.unwrap();
    dynamo
        .delete_item()
        .table_name("things")
        .key("pk", A::S("thing-1".into()))
        .send()
        .await
        .unwrap();

    // The stream, as Lambda would deliver it.
    let records = dynamodb_stream(&config, &stream_arn).await;
    assert_eq!(records.len(), 5);
    let stream = dynamodb_shard(&records);
    let (got, _) = run_cdc(&renumber(stream.clone())).await;
    let types: Vec<&str> = got.iter().map(Event::event_type).collect();
    assert_eq!(types, CDC_TYPES);
    assert_eq!(got[0].partition_key(), "thing-1");
    assert_eq!(got[0].timestamp(), 1_700_000_000_001, "the row's timestamp");
    assert_eq!(got[1].field("raw").unwrap()["old"]["name"], "a");
    assert_eq!(got[1].field("raw").unwrap()["new"]["name"], "b");
    assert_eq!(got[4].field("raw").unwrap()["new"], Value::Null);

    // The same stream records through a real handler binary behind the local Runtime API.
    let mut runtime = LocalRuntime::start().await.unwrap();
    let _function = FunctionProcess::spawn(&example_handler(), &[], &runtime, &[]).unwrap();
    let report = StreamMapping::default()
        .run_shard(
            &StreamKind::DynamoDb,
            "shard",
            &renumber(stream),
            &mut runtime,
        )
        .await;
    assert!(report.given_up.is_empty(), "{report:?}");
    assert_eq!(report.checkpoint, Some(5));
    assert!(report
        .invocations
        .iter()
        .all(|i| i.outcome == floodway_lambda::simulator::Outcome::Success));
}

/// Every record of a table's stream, from each shard's trim horizon, in the JSON shape Lambda
/// delivers.
async fn dynamodb_stream(config: &SdkConfig, stream_arn: &str) -> Vec<Value> {
    let streams = aws_sdk_dynamodbstreams::Client::new(config);
    let description = streams
        .describe_stream()
        .stream_arn(stream_arn)
        .send()
        .await
        .unwrap();
    let mut records = Vec::new();
    for shard in description.stream_description().unwrap().shards() {
        records.extend(read_shard!(
            streams,
            aws_sdk_dynamodbstreams::types::ShardIteratorType,
            shard.shard_id().unwrap(),
            stream_arn(stream_arn),
            |r| stream_record_json(r, stream_arn)
        ));
    }
    records
}

/// Gives each DynamoDB stream record the simulator's sequence number.
fn renumber(records: Vec<StreamRecord>) -> Vec<StreamRecord> {
    records
        .into_iter()
        .map(|mut r| {
            let mut value: Value = serde_json::from_slice(&r.data).unwrap();
            value["dynamodb"]["SequenceNumber"] = json!(r.sequence.to_string());
            r.data = Bytes::from(serde_json::to_vec(&value).unwrap());
            r
        })
        .collect()
}

/// A DynamoDB Streams record in the JSON shape Lambda delivers.
fn stream_record_json(r: &aws_sdk_dynamodbstreams::types::Record, arn: &str) -> Value {
    use aws_sdk_dynamodbstreams::types::AttributeValue as A;
    fn attr(v: &A) -> Value {
        match v {
            A::S(s) => json!({ "S": s }),
            A::N(n) => json!({ "N": n }),
            A::Bool(b) => json!({ "BOOL": b }),
            A::Null(_) => json!({ "NULL": true }),
            A::M(m) => {
                json!({ "M": m.iter().map(|(k, v)| (k.clone(), attr(v))).collect::<serde_json::Map<_, _>>() })
            }
            A::L(l) => json!({ "L": l.iter().map(attr).collect::<Vec<_>>() }),
            _ => json!({ "NULL": true }),
        }
    }
    let image = |m: Option<&HashMap<String, A>>| -> Value {
        m.map(|m| Value::Object(m.iter().map(|(k, v)| (k.clone(), attr(v))).collect()))
            .unwrap_or(Value::Null)
    };
    let d = r.dynamodb().unwrap();
    let mut change = json!({
        "ApproximateCreationDateTime": d.approximate_creation_date_time().map_or(0.0, |t| t.as_secs_f64()),
        "Keys": image(d.keys()),
        "SequenceNumber": d.sequence_number().unwrap_or_default(),
        "SizeBytes": d.size_bytes().unwrap_or_default(),
        "StreamViewType": "NEW_AND_OLD_IMAGES",
    });
    if d.new_image().is_some() {
        change["NewImage"] = image(d.new_image());
    }
    if d.old_image().is_some() {
        change["OldImage"] = image(d.old_image());
    }
    json!({
        "eventID": r.event_id().unwrap_or_default(),
        "eventName": r.event_name().map(|n| n.as_str().to_owned()).unwrap_or_default(),
        "eventVersion": "1.1",
        "eventSource": "aws:dynamodb",
        "awsRegion": "us-east-1",
        "dynamodb": change,
        "eventSourceARN": arn,
    })
}

/// How many objects bucket `lake` holds under `prefix`.
async fn objects_in_lake(s3: &aws_sdk_s3::Client, prefix: &str) -> usize {
    let listed = s3
        .list_objects_v2()
        .bucket("lake")
        .prefix(prefix)
        .send()
        .await
        .unwrap();
    listed.contents().len()
}

/// The last fault `processor` raises (into `faults`) for `event`, met as a Kinesis record
/// with sequence number `sequence`.
async fn fault_of(
    processor: &Processor,
    faults: &MemoryFaultSink,
    event: &Event,
    sequence: &str,
) -> Event {
    let record =
        Record::new("kinesis:orders", "shardId-0", 0, event.to_json()).with_sequence(sequence);
    processor.process_batch(vec![record], None).await;
    faults.faults().pop().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_lake_claim_checks_and_fault_stores() {
    let (_moto, config) = Moto::configured().await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&config)
            .force_path_style(true)
            .build(),
    );
    s3.create_bucket().bucket("lake").send().await.unwrap();
    let events = generate::orders(12, 24);
    send(S3Lake::new(&config, "lake", "events"), &events)
        .await
        .unwrap();
    assert_eq!(objects_in_lake(&s3, "events/").await, 12);
    let key = S3Lake::new(&config, "lake", "events").key_of(&events[0]);
    assert!(key.contains("/2023/11/14/"), "{key}");

    // A large event becomes a claim and comes back whole.
    let checks = ClaimCheck::new(&config, "lake", "claims", 1_000);
    let big = Event::builder("document-stored", "d-1")
        .field("text", "x".repeat(5_000))
        .build();
    let claim = checks.store(big.clone()).await.unwrap();
    assert!(claim.to_json().len() < 500);
    assert!(claim.field("s3").is_some());
    let redeemed = checks.redeem(claim).await.unwrap();
    assert_eq!(redeemed.to_json(), big.to_json());
    let small = checks.store(events[1].clone()).await.unwrap();
    assert_eq!(small.to_json(), events[1].to_json());

    // Fault stores: a fault stored twice is one row (raised twice) and one object.
    let faults = MemoryFaultSink::new();
    let processor = Processor::builder("shop")
        .fault_sink(faults.clone())
        .pipeline(
            Pipeline::builder("strict")
                .event_type("*")
                .validate(|_| Err(Error::poison_msg("Rejected", "no")))
                .sink(MemorySink::new())
                .unwrap(),
        )
        .build()
        .unwrap();
    let fault = fault_of(&processor, &faults, &events[0], "4960001").await;
    let dynamo = aws_sdk_dynamodb::Client::new(&config);
    table(&config, "faults", false).await;
    let store = DynamoDbFaults::new(&config, "faults");
    send(store.clone(), std::slice::from_ref(&fault))
        .await
        .unwrap();
    send(store.clone(), std::slice::from_ref(&fault))
        .await
        .unwrap();
    let rows = dynamo.scan().table_name("faults").send().await.unwrap();
    // The fault and the marker of its one raise: stored twice, counted once.
    assert_eq!(rows.items().len(), 2);
    let row = rows
        .items()
        .iter()
        .find(|r| r.contains_key("fault") && r.contains_key("raised"))
        .unwrap();
    assert_eq!(row["raised"].as_n().unwrap(), "1");
    assert_eq!(row["pipeline"].as_s().unwrap(), "strict");
    assert_eq!(row["errorName"].as_s().unwrap(), "Rejected");

    // Resolved, then raised again: a raise whose marker is already there (its transaction
    // went through, the update after it did not: a throttle between the two) still opens
    // the fault again when it is stored once more.
    let id = floodway::fault::fault_id(&fault).to_owned();
    store
        .record_resubmission_of(&id, ResubmitOutcome::Succeeded, "processed")
        .await
        .unwrap();
    assert_eq!(
        store.fault(&id).await.unwrap().unwrap().status,
        FaultStatus::Resolved
    );
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let again = fault_of(&processor, &faults, &events[0], "4960001").await;
    assert_eq!(floodway::fault::fault_id(&again), id);
    dynamo
        .put_item()
        .table_name("faults")
        .item(
            "pk",
            aws_sdk_dynamodb::types::AttributeValue::S(format!("raise#{}", again.id())),
        )
        .item(
            "fault",
            aws_sdk_dynamodb::types::AttributeValue::S(id.clone()),
        )
        .send()
        .await
        .unwrap();
    send(store.clone(), std::slice::from_ref(&again))
        .await
        .unwrap();
    assert_eq!(
        store.fault(&id).await.unwrap().unwrap().status,
        FaultStatus::Open
    );

    // A long history of failed resubmissions with long answers fits the item (400 KB at
    // most): details clipped, the latest thirty kept, the newest last.
    let long = "x".repeat(60 * 1024);
    for i in 0..60 {
        store
            .record_resubmission_of(&id, ResubmitOutcome::Failed, &format!("{i} {long}"))
            .await
            .unwrap_or_else(|e| panic!("{i}: {e}"));
    }
    let history = store.resubmissions_of(&id).await.unwrap();
    assert_eq!(history.len(), 30);
    assert!(
        history[29].detail.starts_with("59 x"),
        "{}",
        &history[29].detail[..8]
    );
    assert!(history[29].detail.len() <= 1024 + 8);
    assert!(history.windows(2).all(|w| w[0].at < w[1].at));
    // Two recorded at once, at the cap: both kept (a rewrite checks the history's last entry,
    // not only its length, which the cap keeps the same).
    let (a, b) = tokio::join!(
        store.record_resubmission_of(&id, ResubmitOutcome::Failed, "from a"),
        store.record_resubmission_of(&id, ResubmitOutcome::Failed, "from b"),
    );
    a.unwrap();
    b.unwrap();
    let history = store.resubmissions_of(&id).await.unwrap();
    let mut last_two: Vec<&str> = history[28..].iter().map(|r| r.detail.as_str()).collect();
    last_two.sort_unstable();
    assert_eq!((history.len(), last_two), (30, vec!["from a", "from b"]));
    // And raising it again still updates it.
    send(store.clone(), std::slice::from_ref(&again))
        .await
        .unwrap();
    assert_eq!(
        store.fault(&id).await.unwrap().unwrap().status,
        FaultStatus::Open
    );
    send(
        S3Faults::new(&config, "lake", "faults"),
        &[fault.clone(), fault.clone()],
    )
    .await
    .unwrap();
    assert_eq!(objects_in_lake(&s3, "faults/shop/strict/").await, 1);
}

/// The DynamoDB fault store claims a fault for one resubmitter at a time, as every store does
/// (the conformance scenario, against moto).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dynamodb_fault_store_claims_a_fault_for_one_resubmitter() {
    let (_moto, config) = Moto::configured().await;
    table(&config, "claims", false).await;
    let store = DynamoDbFaults::new(&config, "claims");
    floodway::testing::conformance::a_fault_is_claimed_by_one_resubmitter_at_a_time(Arc::new(
        store,
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubmission_invokes_the_function_with_only_the_failing_pipeline() {
    // The function: two pipelines; `strict` rejects orders until the fix is in.
    let fixed = Arc::new(Mutex::new(false));
    let each = MemorySink::new();
    let strict = MemorySink::new();
    let faults = MemoryFaultSink::new();
    let gate = fixed.clone();
    let processor = Processor::builder("shop")
        .fault_sink(faults.clone())
        .pipeline(Pipeline::builder("each").sink(each.clone()).unwrap())
        .pipeline(
            Pipeline::builder("strict")
                .validate(move |_| {
                    if *gate.lock().unwrap() {
                        Ok(())
                    } else {
                        Err(Error::poison_msg("Rejected", "not yet"))
                    }
                })
                .sink(strict.clone())
                .unwrap(),
        )
        .build()
        .unwrap();
    let handler = Handler::new(processor);
    let events = generate::orders(1, 25);
    let fault = fault_of(handler.processor(), &faults, &events[0], "4960002").await;
    assert_eq!((each.len(), strict.len()), (1, 0));

    // The function behind a local Lambda API; the SDK's Invoke reaches it.
    let runtime = LocalRuntime::start().await.unwrap();
    let serving = {
        let runtime = runtime.clone();
        let handler = handler.clone();
        tokio::spawn(async move {
            let mut function = InProcess(handler);
            // Answer invocations queued by the Invoke endpoint, as a function process would.
            serve_local(&runtime, &mut function).await;
        })
    };
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(runtime.endpoint())
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            "testing", "testing", None, None, "local",
        ))
        .load()
        .await;
    let lambda = aws_sdk_lambda::Client::new(&config);
    let outcome = floodway_aws::resubmit(&lambda, "shop", &fault)
        .await
        .unwrap();
    assert_eq!(outcome, Resubmitted::FaultedAgain, "not fixed yet");
    *fixed.lock().unwrap() = true;
    let outcome = floodway_aws::resubmit(&lambda, "shop", &fault)
        .await
        .unwrap();
    assert_eq!(outcome, Resubmitted::Succeeded);
    // Only the failing pipeline saw the record again.
    assert_eq!((each.len(), strict.len()), (1, 1));

    // The same through a `LambdaResubmitter`, with the fault stored in DynamoDB (moto): each
    // outcome is recorded with the fault, and the success resolves it.
    *fixed.lock().unwrap() = false;
    let (_moto, aws) = moto_with_table("faults").await;
    let store = DynamoDbFaults::new(&aws, "faults");
    send(store.clone(), std::slice::from_ref(&fault))
        .await
        .unwrap();
    let stored = store
        .fault(floodway::fault::fault_id(&fault))
        .await
        .unwrap()
        .unwrap();
    let resubmitter = LambdaResubmitter::new(&config, None, "shop");
    let (outcome, detail) = resubmitter.resubmit(&store, &stored).await.unwrap();
    assert_eq!(outcome, ResubmitOutcome::Failed);
    assert!(detail.starts_with("faulted again"), "{detail}");
    *fixed.lock().unwrap() = true;
    let (outcome, _) = resubmitter.resubmit(&store, &stored).await.unwrap();
    assert_eq!(outcome, ResubmitOutcome::Succeeded);
    assert_eq!(strict.len(), 2);
    let history = store.resubmissions_of(&stored.id).await.unwrap();
    let outcomes: Vec<&str> = history.iter().map(|r| r.outcome.as_str()).collect();
    assert_eq!(outcomes, ["failed", "succeeded"]);
    let open = FaultFilter {
        status: Some(FaultStatus::Open),
        ..FaultFilter::default()
    };
    assert!(store.list_faults(&open).await.unwrap().is_empty());
    serving.abort();
}

/// Takes invocations from the local runtime's queue and answers them with `function`, the
/// way a function process polls `invocation/next`.
async fn serve_local(runtime: &LocalRuntime, function: &mut InProcess) {
    let client = reqwest_like::Client::new(runtime.address());
    loop {
        let Some((id, payload)) = client.next().await else {
            return;
        };
        let answer =
            floodway_lambda::Function::invoke(function, payload, Duration::from_secs(30)).await;
        client.respond(&id, answer).await;
    }
}

/// A minimal HTTP client for the runtime API (what `lambda_runtime` does in a function).
mod reqwest_like {
    use serde_json::Value;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub(crate) struct Client {
        addr: String,
    }

    impl Client {
        pub(crate) fn new(addr: String) -> Self {
            Client { addr }
        }

        async fn request(
            &self,
            method: &str,
            path: &str,
            body: &[u8],
        ) -> Option<(String, Vec<u8>)> {
            let mut stream = tokio::net::TcpStream::connect(&self.addr).await.ok()?;
            let head = format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                self.addr,
                body.len()
            );
            stream.write_all(head.as_bytes()).await.ok()?;
            stream.write_all(body).await.ok()?;
            let mut out = Vec::new();
            stream.read_to_end(&mut out).await.ok()?;
            let split = out.windows(4).position(|w| w == b"\r\n\r\n")?;
            let headers = String::from_utf8_lossy(&out[..split]).into_owned();
            Some((headers, out[split + 4..].to_vec()))
        }

        pub(crate) async fn next(&self) -> Option<(String, Value)> {
            let (headers, body) = self
                .request("GET", "/2018-06-01/runtime/invocation/next", b"")
                .await?;
            let id = headers
                .lines()
                .find_map(|l| l.strip_prefix("lambda-runtime-aws-request-id: "))?
                .trim()
                .to_owned();
            Some((id, serde_json::from_slice(&body).ok()?))
        }

        pub(crate) async fn respond(
            &self,
            id: &str,
            answer: Result<Value, floodway_lambda::InvokeError>,
        ) {
            let (kind, body) = match answer {
                Ok(v) => ("response", serde_json::to_vec(&v).unwrap_or_default()),
                Err(e) => ("error", e.to_string().into_bytes()),
            };
            let path = format!("/2018-06-01/runtime/invocation/{id}/{kind}");
            let _ = self.request("POST", &path, &body).await;
        }
    }
}

/// A contract's conformance scenarios on DynamoDB (moto), each with a server and a table of
/// its own: `$store::new(config, table)` is the implementation under test.
macro_rules! conformance_on_dynamodb {
    ($module:ident, $($suite:ident)::+, $shared:ty, $store:ty, $table:literal) => {
        mod $module {
            async fn fresh() -> ($shared, super::Moto) {
                let (moto, config) = super::moto_with_table($table).await;
                (std::sync::Arc::new(<$store>::new(&config, $table)), moto)
            }

            $($suite)::+!(fresh);
        }
    };
}

conformance_on_dynamodb!(
    fault_store,
    floodway::fault_store_conformance_tests,
    floodway::testing::conformance::SharedFaultStore,
    floodway_aws::DynamoDbFaults,
    "faults"
);

conformance_on_dynamodb!(
    keyed_state,
    floodway::keyed_state_conformance_tests,
    floodway::state::SharedState,
    floodway_aws::DynamoDbState,
    "state"
);

/// A KMS key under `alias/floodway` in `config`'s region.
async fn master_key(config: &SdkConfig) {
    let kms = aws_sdk_kms::Client::new(config);
    let key = kms.create_key().send().await.unwrap();
    kms.create_alias()
        .alias_name("alias/floodway")
        .target_key_id(key.key_metadata().unwrap().key_id())
        .send()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_encrypted_with_kms_read_both_ways_with_aws_lambda_stream() {
    use floodway::encryption::{decrypt_event, encrypt_event};
    let moto = Moto::start();
    let config = moto.config_in("us-west-2").await;
    master_key(&config).await;
    let env = [
        ("AWS_ENDPOINT_URL_KMS", moto.url()),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
    ];
    let event = json!({
        "id": "e1", "type": "customer-created", "timestamp": 1_548_967_022_000_i64,
        "partitionKey": "c-1", "tags": { "source": "svc-a" },
        "customer": { "id": "c-1", "name": "Ann", "email": "ann@example.com",
                      "address": { "city": "Lisbon", "zip": 1000 } },
    });
    let fields = ["email".to_owned(), "address".to_owned()];
    let keys = floodway_aws::KmsKeys::new(&config, "alias/floodway", &[]);

    // Floodway encrypts with KMS; aws-lambda-stream's decryptEvent reads it.
    let sealed = encrypt_event(&keys, &Event::from_value(event.clone()).unwrap(), &fields)
        .await
        .unwrap();
    let wire = sealed.to_json();
    assert!(
        !wire.contains("ann@example.com") && !wire.contains("Lisbon"),
        "{wire}"
    );
    assert_eq!(
        sealed.field("eem").unwrap()["masterKeyAlias"],
        "alias/floodway"
    );
    let theirs = floodway_lambda::testing::run_script_with(
        "encryption.js",
        &json!({ "decrypt": { "event": sealed.to_value() } }),
        &env,
    );
    assert_eq!(theirs, event);

    // aws-lambda-stream's encryptEvent encrypts with KMS; Floodway reads it, with a reader
    // of its own (no cached key).
    let theirs = floodway_lambda::testing::run_script_with(
        "encryption.js",
        &json!({ "encrypt": { "event": event, "fields": fields, "masterKeyAlias": "alias/floodway" } }),
        &env,
    );
    assert!(theirs["customer"]["email"]
        .as_str()
        .unwrap()
        .starts_with("U2FsdGVkX1"));
    let reader = floodway_aws::KmsKeys::new(&config, "alias/floodway", &[]);
    let ours = decrypt_event(&reader, &Event::from_value(theirs).unwrap())
        .await
        .unwrap();
    assert_eq!(ours.event.to_value(), event);
    assert!(ours.secrets.contains(&"ann@example.com".to_owned()));

    // Two regions, each with its key under the alias: the data key is wrapped for both, and
    // a reader in the other region (Floodway's, and aws-lambda-stream's) unwraps it there.
    let east = moto.config_in("us-east-1").await;
    master_key(&east).await;
    let writer = floodway_aws::KmsKeys::new(&config, "alias/floodway", &["us-east-1".to_owned()]);
    let sealed = encrypt_event(&writer, &Event::from_value(event.clone()).unwrap(), &fields)
        .await
        .unwrap();
    let data_keys = &sealed.field("eem").unwrap()["dataKeys"];
    assert!(
        data_keys["us-west-2"].is_string() && data_keys["us-east-1"].is_string(),
        "{data_keys}"
    );
    let reader = floodway_aws::KmsKeys::new(&east, "alias/floodway", &[]);
    let ours = decrypt_event(&reader, &sealed).await.unwrap();
    assert_eq!(ours.event.to_value(), event);
    let in_east = [
        ("AWS_ENDPOINT_URL_KMS", moto.url()),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", "us-east-1"),
    ];
    let theirs = floodway_lambda::testing::run_script_with(
        "encryption.js",
        &json!({ "decrypt": { "event": sealed.to_value() } }),
        &in_east,
    );
    assert_eq!(theirs, event);
}

mod rows {
    async fn fresh() -> (floodway::rows::SharedRows, super::Moto) {
        let (moto, config) = super::Moto::configured().await;
        floodway_aws::testing::single_table(&config, "rows", false).await;
        (
            std::sync::Arc::new(floodway_aws::DynamoDbRows::new(&config, "rows")),
            moto,
        )
    }

    floodway::row_store_conformance_tests!(fresh);
}

/// On Lambda the table's stream is the outbox: rows written by update requests come out of
/// change data capture as `-created`, `-updated` and `-deleted` events without the store's
/// own attribute, while a listener's latched rows and the inbox's items stay out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_tables_stream_is_its_outbox() {
    use floodway::idempotence::Version;
    use floodway::rows::{Latest, RowKey, RowStore as _, Update};
    let (_moto, config) = Moto::configured().await;
    let stream_arn = floodway_aws::testing::single_table(&config, "shop", true)
        .await
        .unwrap();
    let version = |t: i64, id: &str| Version {
        timestamp: t,
        id: id.into(),
    };
    let key = || RowKey::new("thing-1", "thing");
    let service = floodway_aws::DynamoDbRows::new(&config, "shop");
    for u in [
        Update::new(key(), version(1_700_000_000_001, "c1"))
            .set("name", "a")
            .discriminator("thing"),
        Update::new(key(), version(1_700_000_000_002, "c2"))
            .set("name", "b")
            .add("views", 1),
        // A repeat: changes nothing, writes nothing.
        Update::new(key(), version(1_700_000_000_002, "c2"))
            .set("name", "b")
            .add("views", 1),
        Update::new(key(), version(1_700_000_000_003, "c3"))
            .latest(Latest::Row)
            .delete_row(),
    ] {
        service.update(&[u]).await.unwrap();
    }
    let listener = floodway_aws::DynamoDbRows::new(&config, "shop").latched(true);
    listener
        .update(&[
            Update::new(RowKey::new("thing-2", "thing"), version(5, "l1"))
                .set("name", "from an event")
                .add("seen", 1)
                .discriminator("thing"),
        ])
        .await
        .unwrap();

    let records = dynamodb_stream(&config, &stream_arn).await;
    // Three writes of thing-1, two inbox items (its counter, the listener's), the listener's row.
    assert_eq!(records.len(), 6, "{records:#?}");
    let (got, checkpoint) = run_cdc(&renumber(dynamodb_shard(&records))).await;
    assert_eq!(checkpoint, Some(6));
    let types: Vec<&str> = got.iter().map(Event::event_type).collect();
    assert_eq!(types, ["thing-created", "thing-updated", "thing-deleted"]);
    let raw = got[1].field("raw").unwrap();
    assert_eq!(raw["new"]["name"], "b");
    assert_eq!(raw["new"]["views"], 1);
    assert_eq!(raw["old"]["name"], "a");
    assert_eq!(raw["new"]["awsregion"], "us-east-1");
    assert!(raw["new"].get("floodway").is_none(), "{raw}");
    assert_eq!(got[1].timestamp(), 1_700_000_000_002);
    assert!(got.iter().all(|e| e.partition_key() == "thing-1"));
}

/// Control services on Lambda: sets in aws-lambda-stream's correlation-store layout (a set a
/// Node `correlate` wrote is read as well), each emitted event once across repeats, and a
/// timer fired from the `REMOVE` record of its item on the table's stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_services_keep_their_sets_in_the_correlation_store() {
    use aws_sdk_dynamodb::types::AttributeValue as A;
    use floodway::cep::{KindRule, RuleKind, SharedRule};
    let (_moto, config) = Moto::configured().await;
    let stream_arn = floodway_aws::testing::single_table(&config, "events", true)
        .await
        .unwrap();
    let rules: Vec<SharedRule> = vec![
        Arc::new(KindRule::new(
            "ready",
            RuleKind::All {
                types: vec!["order-submitted".into(), "payment-captured".into()],
            },
            "order-ready",
        )),
        Arc::new(KindRule::new(
            "expired",
            RuleKind::Absence {
                first: "order-submitted".into(),
                then: Some("payment-captured".into()),
                within: 900_000,
            },
            "order-expired",
        )),
    ];
    let ttl = Duration::from_secs(3600);
    let cep = floodway_aws::DynamoDbCep::new(&config, "events", "orders-cep");
    let e = |ty: &str, id: &str, order: &str, t: i64| {
        (
            vec![order.to_owned()],
            Event::builder(ty, order).id(id).timestamp(t).build(),
        )
    };
    // Within the time to live: events past it join no set.
    let t0 = floodway::event::now_millis() - 60_000;
    // o-1 paid (the payment first), o-2 not paid; o-3's order a Node correlate wrote.
    let entries = [
        e("payment-captured", "p1", "o-1", t0 + 10),
        e("order-submitted", "s1", "o-1", t0),
        e("order-submitted", "s2", "o-2", t0),
    ];
    let emitted = cep.collect(&entries, &rules, ttl).await.unwrap();
    let types: Vec<(&str, &str)> = emitted
        .iter()
        .map(|(k, e)| (k.as_str(), e.event_type()))
        .collect();
    assert_eq!(types, [("o-1", "order-ready")]);
    assert_eq!(emitted[0].1.field("triggers").unwrap()[0]["id"], "s1");
    // Not yet marked: a repeat emits it again (at least once); marked, never again.
    assert_eq!(
        cep.collect(&entries[..1], &rules, ttl).await.unwrap().len(),
        1
    );
    cep.mark_emitted(&emitted, ttl).await.unwrap();
    assert!(cep.collect(&entries, &rules, ttl).await.unwrap().is_empty());

    let dynamo = aws_sdk_dynamodb::Client::new(&config);
    let node_event =
        json!({"id": "s3", "type": "order-submitted", "timestamp": t0, "partitionKey": "o-3"});
    dynamo
        .put_item()
        .table_name("events")
        .item("pk", A::S("o-3".into()))
        .item("sk", A::S("s3".into()))
        .item("discriminator", A::S("CORREL".into()))
        .item("timestamp", A::N(t0.to_string()))
        .item("ttl", A::N((t0 / 1000 + 3600).to_string()))
        .item("ruleId", A::S("node-correlate".into()))
        .item("event", floodway_aws_attribute(&node_event))
        .send()
        .await
        .unwrap();
    let paid = cep
        .collect(&[e("payment-captured", "p3", "o-3", t0 + 5)], &rules, ttl)
        .await
        .unwrap();
    assert_eq!(paid.len(), 1, "o-3's set holds the Node-written order");
    // An item past its time to live that the table has not deleted yet (DynamoDB takes up
    // to two days) is in no set: o-4's order expired, its payment makes nothing ready.
    dynamo
        .put_item()
        .table_name("events")
        .item("pk", A::S("o-4".into()))
        .item("sk", A::S("s4".into()))
        .item("discriminator", A::S("CORREL".into()))
        .item("timestamp", A::N(t0.to_string()))
        .item("ttl", A::N((t0 / 1000 - 10).to_string()))
        .item("ruleId", A::S("node-correlate".into()))
        .item(
            "event",
            floodway_aws_attribute(
                &json!({"id": "s4", "type": "order-submitted", "timestamp": t0, "partitionKey": "o-4"}),
            ),
        )
        .send()
        .await
        .unwrap();
    let late = cep
        .collect(&[e("payment-captured", "p4", "o-4", t0 + 5)], &rules, ttl)
        .await
        .unwrap();
    assert!(late.is_empty(), "{late:?}");
    let item = dynamo
        .get_item()
        .table_name("events")
        .key("pk", A::S("o-1".into()))
        .key("sk", A::S("s1".into()))
        .send()
        .await
        .unwrap();
    let item = item.item().unwrap();
    assert_eq!(item["discriminator"], A::S("CORREL".into()));
    assert_eq!(item["ruleId"], A::S("orders-cep".into()));
    assert!(matches!(&item["event"], A::M(m) if m["id"] == A::S("s1".into())));

    // The table's time to live removes the due timers; their REMOVE records fire them.
    for (order, trigger) in [("o-1", "s1"), ("o-2", "s2")] {
        dynamo
            .delete_item()
            .table_name("events")
            .key("pk", A::S(format!("timer#{order}")))
            .key("sk", A::S(format!("expired#{trigger}")))
            .send()
            .await
            .unwrap();
    }
    let records = dynamodb_stream(&config, &stream_arn).await;
    let (removed, _) = run_cdc_keeping(&renumber(dynamodb_shard(&records)), "timer-deleted").await;
    assert_eq!(removed.len(), 2);
    let mut expired = Vec::new();
    for r in &removed {
        expired.extend(
            cep.fire_removed(&r.field("raw").unwrap()["old"], &rules)
                .await
                .unwrap()
                .emitted,
        );
    }
    let fired: Vec<(&str, &str)> = expired
        .iter()
        .map(|(k, e)| (k.as_str(), e.event_type()))
        .collect();
    assert_eq!(fired, [("o-2", "order-expired")], "o-1 was paid in time");
    assert_eq!(expired[0].1.timestamp(), t0 + 900_000);
}

/// Publishes into `published`, checking first that the timer each event fired is still in
/// the table: deleted before its emission is marked, its `REMOVE` record would fire it again
/// and publish it twice.
fn timer_kept(config: &aws_config::SdkConfig, published: MemorySink) -> impl floodway::Sink {
    use aws_sdk_dynamodb::types::AttributeValue as A;
    let dynamo = aws_sdk_dynamodb::Client::new(config);
    floodway::sink_fn(move |batch: floodway::Batch| {
        let (dynamo, published) = (dynamo.clone(), published.clone());
        async move {
            for event in batch.events() {
                let trigger = event.field("triggers").unwrap()[0]["id"].as_str().unwrap();
                let item = dynamo
                    .get_item()
                    .table_name("events")
                    .key("pk", A::S(format!("timer#{}", event.partition_key())))
                    .key("sk", A::S(format!("expired#{trigger}")))
                    .consistent_read(true)
                    .send()
                    .await
                    .unwrap();
                assert!(item.item().is_some(), "timer of {} deleted", event.id());
            }
            tower::ServiceExt::oneshot(published, batch).await
        }
    })
}

/// A JSON value as a DynamoDB attribute, as the Node library's marshall writes it.
fn floodway_aws_attribute(value: &Value) -> aws_sdk_dynamodb::types::AttributeValue {
    use aws_sdk_dynamodb::types::AttributeValue as A;
    match value {
        Value::String(s) => A::S(s.clone()),
        Value::Number(n) => A::N(n.to_string()),
        Value::Bool(b) => A::Bool(*b),
        Value::Object(m) => A::M(
            m.iter()
                .map(|(k, v)| (k.clone(), floodway_aws_attribute(v)))
                .collect(),
        ),
        Value::Array(l) => A::L(l.iter().map(floodway_aws_attribute).collect()),
        Value::Null => A::Null(true),
    }
}

/// The rule both sides run: an order is ready once its set holds the order and its payment.
fn ready_rule() -> floodway::cep::SharedRule {
    Arc::new(floodway::cep::KindRule::new(
        "ready",
        floodway::cep::RuleKind::All {
            types: vec!["order-submitted".into(), "payment-captured".into()],
        },
        "order-ready",
    ))
}

/// aws-lambda-stream (from npm, run by Node) and Floodway on one correlation store: the
/// Node `collect` and `correlate` flavors put a payment in an order's set, Floodway's
/// ready-made Lambda sink (through a real handler) collects the order into the same set and
/// its rule sees the payment; then the Node `evaluate` flavor, fed the table's real stream,
/// reads the set Floodway wrote into and fires on Floodway's item too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_lambda_stream_and_floodway_share_one_correlation_store() {
    let (moto, config) = Moto::configured().await;
    let stream_arn = floodway_aws::testing::event_store(&config, "events").await;
    let env = [
        ("AWS_ENDPOINT_URL_DYNAMODB", moto.url()),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", "us-east-1"),
    ];
    let node = |step: &str, body: Value| {
        let mut input = json!({ "step": step, "table": "events" });
        input
            .as_object_mut()
            .unwrap()
            .extend(body.as_object().unwrap().clone());
        let out = floodway_lambda::testing::run_script_with("cep.js", &input, &env);
        assert_eq!(out["faults"], json!([]), "{step}: {out}");
        out["emitted"].as_array().unwrap().clone()
    };
    let t0 = floodway::event::now_millis() - 60_000;

    // Node: the payment collected (an EVENT item), then correlated from the table's stream.
    let payment = json!({"id": "p1", "type": "payment-captured", "timestamp": t0 + 10,
                         "partitionKey": "o-1", "tags": {"source": "payments"}});
    node("collect", json!({ "events": [payment] }));
    node(
        "correlate",
        json!({ "records": dynamodb_stream(&config, &stream_arn).await }),
    );

    // Floodway: the orders, through a handler whose sink is the ready-made collector.
    let cep = floodway_aws::DynamoDbCep::new(&config, "events", "orders-cep");
    let published = MemorySink::new();
    let collector = floodway_aws::CepSink::collector(
        cep.clone(),
        vec![ready_rule()],
        Duration::from_secs(86_400),
        published.clone(),
    );
    let pipeline = Pipeline::builder("collect")
        .event_type("order-submitted")
        .event_type("payment-captured")
        .sink(collector)
        .unwrap();
    let orders = [
        Event::builder("order-submitted", "o-1")
            .id("s1")
            .timestamp(t0)
            .build(),
        Event::builder("order-submitted", "o-2")
            .id("s2")
            .timestamp(t0)
            .build(),
    ];
    let report = StreamMapping::default()
        .run_shard(
            &StreamKind::Kinesis {
                stream: "orders".into(),
            },
            "shard",
            &lambda::shard_from(1, &orders),
            &mut InProcess(handler("orders-cep", pipeline)),
        )
        .await;
    assert!(report.given_up.is_empty(), "{report:?}");
    let ready = published.events();
    assert_eq!(ready.len(), 1, "{ready:?}");
    assert_eq!(
        (ready[0].event_type(), ready[0].partition_key()),
        ("order-ready", "o-1")
    );
    let triggers: Vec<&str> = ready[0]
        .field("triggers")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        triggers,
        ["s1", "p1"],
        "the set holds the Node-correlated payment"
    );
    let set: Vec<String> = cep
        .set("o-1")
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(set, ["s1", "p1"], "in event-time order");

    // Node: evaluate over the table's stream, Floodway's items among the records.
    let records = dynamodb_stream(&config, &stream_arn).await;
    let floodway_item = records
        .iter()
        .find(|r| {
            r["eventName"] == "INSERT"
                && r["dynamodb"]["NewImage"]["discriminator"]["S"] == "CORREL"
                && r["dynamodb"]["NewImage"]["sk"]["S"] == "s1"
        })
        .expect("Floodway's correlated item on the stream");
    let emitted = node("evaluate", json!({ "records": records }));
    assert!(!emitted.is_empty());
    for e in &emitted {
        assert_eq!(
            (e["type"].as_str(), e["partitionKey"].as_str()),
            (Some("order-ready"), Some("o-1")),
            "{e}"
        );
        let mut ids: Vec<&str> = e["triggers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap())
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, ["p1", "s1"], "{e}");
    }
    let fired_on_ours = format!("{}.ready", floodway_item["eventID"].as_str().unwrap());
    assert!(
        emitted.iter().any(|e| e["id"] == fired_on_ours.as_str()),
        "Node evaluated Floodway's item: {emitted:?}"
    );
}

/// Timers on EventBridge Scheduler: each timer a rule sets gets a one-time schedule whose
/// input is an EventBridge event for the function; delivered to a real handler, the timer
/// fires through the ready-made timer sink, its schedule and item go, and a second delivery
/// (the scheduler retries) publishes nothing new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_fire_from_eventbridge_scheduler() {
    use floodway::cep::{KindRule, RuleKind, SharedRule, Timer};
    use floodway_aws::{CepSink, DynamoDbCep, TimerSchedules};
    let (_moto, config) = Moto::configured().await;
    floodway_aws::testing::single_table(&config, "events", false).await;
    let (function, role) = (
        "arn:aws:lambda:us-east-1:123456789012:function:orders-cep",
        "arn:aws:iam::123456789012:role/scheduler-invokes-orders-cep",
    );
    let cep = DynamoDbCep::new(&config, "events", "orders-cep")
        .with_schedules(TimerSchedules::new(&config, function, role));
    let rules: Vec<SharedRule> = vec![Arc::new(KindRule::new(
        "expired",
        RuleKind::Absence {
            first: "order-submitted".into(),
            then: Some("payment-captured".into()),
            within: 900_000,
        },
        "order-expired",
    ))];
    let ttl = Duration::from_secs(86_400);
    let published = MemorySink::new();
    let processor = Processor::builder("orders-cep")
        .fault_sink(MemoryFaultSink::new())
        .pipeline(
            Pipeline::builder("collect")
                .event_type("order-submitted")
                .event_type("payment-captured")
                .sink(CepSink::collector(
                    cep.clone(),
                    rules.clone(),
                    ttl,
                    published.clone(),
                ))
                .unwrap(),
        )
        .pipeline(
            Pipeline::builder("timers")
                .event_type(floodway_aws::TIMER_DUE)
                .event_type("timer-deleted")
                .sink(CepSink::timers(
                    cep.clone(),
                    rules.clone(),
                    ttl,
                    timer_kept(&config, published.clone()),
                ))
                .unwrap(),
        )
        .build()
        .unwrap();
    let handler = Handler::new(processor);
    let t0 = floodway::event::now_millis();
    let events = [
        Event::builder("order-submitted", "o-1")
            .id("s1")
            .timestamp(t0)
            .build(),
        Event::builder("order-submitted", "o-2")
            .id("s2")
            .timestamp(t0)
            .build(),
        Event::builder("payment-captured", "o-2")
            .id("p2")
            .timestamp(t0 + 10)
            .build(),
    ];
    let report = StreamMapping::default()
        .run_shard(
            &StreamKind::Kinesis {
                stream: "orders".into(),
            },
            "shard",
            &lambda::shard_from(1, &events),
            &mut InProcess(handler.clone()),
        )
        .await;
    assert!(report.given_up.is_empty(), "{report:?}");
    assert!(published.events().is_empty());

    // Each timer's schedule, as EventBridge Scheduler holds it.
    let scheduler = aws_sdk_scheduler::Client::new(&config);
    let schedule_of = |order: &str, trigger: &str| {
        let timer = Timer {
            due: t0 + 900_000,
            rule: "expired".into(),
            trigger: trigger.into(),
        };
        scheduler
            .get_schedule()
            .name(TimerSchedules::name("orders-cep", order, &timer))
            .send()
    };
    let mut inputs = Vec::new();
    for (order, trigger) in [("o-1", "s1"), ("o-2", "s2")] {
        let schedule = schedule_of(order, trigger).await.unwrap();
        assert_eq!(
            schedule.schedule_expression(),
            Some(TimerSchedules::expression(t0 + 900_000).as_str())
        );
        assert_eq!(schedule.schedule_expression_timezone(), Some("UTC"));
        assert_eq!(
            schedule.action_after_completion(),
            Some(&aws_sdk_scheduler::types::ActionAfterCompletion::Delete)
        );
        let target = schedule.target().unwrap();
        assert_eq!((target.arn(), target.role_arn()), (function, role));
        inputs.push(target.input().unwrap().to_owned());
    }

    // The scheduler invokes the function with each input, once due.
    for input in &inputs {
        handler.handle_bytes(input.as_bytes(), None).await.unwrap();
    }
    let fired = published.events();
    let fired: Vec<(&str, &str, i64)> = fired
        .iter()
        .map(|e| (e.event_type(), e.partition_key(), e.timestamp()))
        .collect();
    assert_eq!(
        fired,
        [("order-expired", "o-1", t0 + 900_000)],
        "o-2 was paid in time"
    );
    for (order, trigger) in [("o-1", "s1"), ("o-2", "s2")] {
        let gone = schedule_of(order, trigger).await.unwrap_err();
        assert!(
            gone.as_service_error()
                .is_some_and(|e| e.is_resource_not_found_exception()),
            "{gone:?}"
        );
    }
    // A second delivery finds the expiry emitted already.
    handler
        .handle_bytes(inputs[0].as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(published.events().len(), 1);
    assert_eq!(
        TimerSchedules::expression(1_700_000_000_001),
        "at(2023-11-14T22:13:21)",
        "UTC, to the next whole second"
    );
    assert_eq!(
        TimerSchedules::expression(i64::MAX),
        "at(9999-12-31T23:59:59)",
        "the last second an expression names"
    );

    // An order collected after its timer's time (a backlog caught up): scheduled ahead of
    // now, not in the past.
    let late = t0 - 20 * 60_000;
    let order = Event::builder("order-submitted", "o-3")
        .id("s3")
        .timestamp(late)
        .build();
    let before = floodway::event::now_millis();
    let report = StreamMapping::default()
        .run_shard(
            &StreamKind::Kinesis {
                stream: "orders".into(),
            },
            "shard",
            &lambda::shard_from(10, &[order]),
            &mut InProcess(handler.clone()),
        )
        .await;
    assert!(report.given_up.is_empty(), "{report:?}");
    let timer = Timer {
        due: late + 900_000,
        rule: "expired".into(),
        trigger: "s3".into(),
    };
    let schedule = scheduler
        .get_schedule()
        .name(TimerSchedules::name("orders-cep", "o-3", &timer))
        .send()
        .await
        .unwrap();
    let expression = schedule.schedule_expression().unwrap();
    assert!(
        expression >= TimerSchedules::expression(before).as_str(),
        "{expression} is in the past"
    );
}
