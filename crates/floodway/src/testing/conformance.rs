//! The conformance suites of the contracts: one set of scenarios, written once, that every
//! implementation must pass. For [`EventHub`](crate::EventHub): the in-memory kit, the
//! embedded hub, NATS JetStream. For [`FaultStore`]: the in-memory store, the embedded hub's
//! and DynamoDB. For [`KeyedState`](crate::state::KeyedState): the in-memory state, the
//! embedded hub's views and DynamoDB.
//!
//! A backend's test file generates one test per scenario with
//! [`hub_conformance_tests!`](crate::hub_conformance_tests), given an async function that
//! opens a fresh, empty hub (and whatever must live as long as it: a temporary directory, a
//! server).
//!
//! ```ignore
//! async fn fresh() -> (floodway::SharedHub, tempfile::TempDir) { ... }
//! floodway::hub_conformance_tests!(fresh);
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{Error, RunError};
use crate::event::{now_millis, Event};
use crate::fault_store::{FaultFilter, FaultStatus, FaultStore, ResubmitOutcome};
use crate::hub::{HubSubscription, ReadOptions, SharedHub, StartAt, Stream};
use crate::idempotence::Version;
use crate::pipeline::Pipeline;
use crate::rows::{Latest, Outcome, Row, RowKey, RowQuery, SharedRows, Stale, Update};
use crate::runtime::{FaultSink, Processor, RunReport};
use crate::sink::{sink_fn, Publisher};
use crate::source::{Checkpoint, Checkpointer, Source};
use crate::state::{Applied, Scan, SharedState, StateRow, StateWrite};
use crate::uow::{Batch, Record};
use serde_json::Value;

/// A fault store shared by a scenario.
pub type SharedFaultStore = std::sync::Arc<dyn FaultStore>;

/// `n` events over `keys` partition keys, ids `{prefix}-{i}`, each with its index in its key's
/// sequence in field `seq`.
pub fn events(prefix: &str, n: usize, keys: usize) -> Vec<Event> {
    let mut seq = vec![0u64; keys.max(1)];
    (0..n)
        .map(|i| {
            let k = i % keys.max(1);
            seq[k] += 1;
            Event::builder("order-paid", format!("key-{k}"))
                .id(format!("{prefix}-{i}"))
                .field("seq", seq[k])
                .build()
        })
        .collect()
}

fn ids<'a>(events: impl IntoIterator<Item = &'a Event>) -> Vec<String> {
    events.into_iter().map(|e| e.id().to_owned()).collect()
}

/// Reads a bounded subscription to its end.
async fn read_all(sub: &mut HubSubscription) -> Vec<Record> {
    let mut out = Vec::new();
    while let Some(batch) = sub.reader.next_batch(100).await.expect("read") {
        out.extend(batch);
    }
    out
}

/// Reads a following subscription until `n` records came (or 20 s passed).
async fn read_n(sub: &mut HubSubscription, n: usize) -> Vec<Record> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while out.len() < n {
        let batch = tokio::time::timeout_at(deadline, sub.reader.next_batch(100))
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} records within 20 s", out.len()))
            .expect("read");
        out.extend(batch.expect("a following read does not end"));
    }
    out
}

fn decoded(records: &[Record]) -> Vec<Event> {
    records
        .iter()
        .map(|r| Event::decode(&r.data).expect("an event"))
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Checks that each key's events came in their `seq` order.
fn assert_per_key_order(events: &[Event]) {
    let mut last: HashMap<String, u64> = HashMap::new();
    for e in events {
        let seq = e.field("seq").and_then(serde_json::Value::as_u64).unwrap();
        let before = last.insert(e.partition_key().to_owned(), seq).unwrap_or(0);
        assert!(
            seq > before,
            "key {}: {seq} after {before}",
            e.partition_key()
        );
    }
}

async fn subscribe(hub: &SharedHub, name: &str, options: ReadOptions) -> HubSubscription {
    hub.subscribe(name, options)
        .await
        .unwrap_or_else(|e| panic!("subscribe {name}: {e}"))
}

/// Published events read back, each once, in their order per key.
pub async fn publish_and_read_back(hub: SharedHub) {
    let input = events("a", 120, 7);
    let receipt = hub.publish(&input, true).await.unwrap();
    assert_eq!((receipt.stored, receipt.duplicates), (120, 0));
    let mut sub = subscribe(&hub, "read-back", ReadOptions::default().bounded()).await;
    let got = decoded(&read_all(&mut sub).await);
    assert_eq!(sorted(ids(&got)), sorted(ids(&input)));
    assert_per_key_order(&got);
}

/// A repeat of an id is stored once; a publish without dedupe is either stored or refused,
/// never half done.
pub async fn publishing_is_idempotent(hub: SharedHub) {
    let first = events("b", 20, 3);
    hub.publish(&first, true).await.unwrap();
    let mut again = first.clone();
    again.extend(events("c", 5, 3));
    let receipt = hub.publish(&again, true).await.unwrap();
    assert_eq!((receipt.stored, receipt.duplicates), (5, 20));
    let mut sub = subscribe(&hub, "idempotent", ReadOptions::default().bounded()).await;
    assert_eq!(read_all(&mut sub).await.len(), 25);
}

/// A subscription resumes after its committed checkpoints: nothing committed is read again,
/// nothing is skipped.
pub async fn a_subscription_resumes_from_its_checkpoint(hub: SharedHub) {
    let input = events("d", 60, 5);
    hub.publish(&input, true).await.unwrap();
    let first = {
        let mut sub = subscribe(&hub, "resume", ReadOptions::default().bounded()).await;
        let batch = sub.reader.next_batch(25).await.unwrap().unwrap();
        // Every record read, per partition up to the last one: done.
        let mut highest: BTreeMap<Arc<str>, u64> = BTreeMap::new();
        for r in &batch {
            let h = highest.entry(r.partition.clone()).or_default();
            *h = (*h).max(r.offset);
        }
        let checkpoints: Vec<Checkpoint> = highest
            .into_iter()
            .map(|(partition, offset)| Checkpoint { partition, offset })
            .collect();
        for r in &batch {
            sub.checkpointer.settle(r, crate::source::Settlement::Done);
        }
        sub.checkpointer.commit(&checkpoints).await.unwrap();
        if let Some(closed) = sub.closed.take() {
            drop(sub);
            closed.await;
        }
        decoded(&batch)
    };
    let mut sub = subscribe(&hub, "resume", ReadOptions::default().bounded()).await;
    let rest = decoded(&read_all(&mut sub).await);
    let first_ids: HashSet<String> = ids(&first).into_iter().collect();
    assert!(
        rest.iter().all(|e| !first_ids.contains(e.id())),
        "a committed event was read again"
    );
    let mut all = ids(&first);
    all.extend(ids(&rest));
    assert_eq!(sorted(all), sorted(ids(&input)));
}

/// A new subscription starting at the end reads only what is published after it opened.
pub async fn a_subscription_can_start_at_the_end(hub: SharedHub) {
    hub.publish(&events("e", 10, 2), true).await.unwrap();
    let start = ReadOptions {
        start: StartAt::End,
        ..ReadOptions::default()
    };
    let mut sub = subscribe(&hub, "at-end", start).await;
    let later = events("f", 6, 2);
    hub.publish(&later, true).await.unwrap();
    let got = decoded(&read_n(&mut sub, 6).await);
    assert_eq!(sorted(ids(&got)), sorted(ids(&later)));
}

/// A reader that says it is [`buffered`](Source::buffered) is pulled from the processor's own
/// loop, which drops a pull that waits when something else is ready: such a pull, dropped
/// while it waits or as records arrive, takes nothing with it. Reads are cut short every
/// millisecond while events are published: each comes once, in its order per key. (A reader
/// that is not buffered is pulled from a task of its own, and never dropped mid-pull.)
pub async fn a_buffered_reader_loses_nothing_to_a_pull_dropped(hub: SharedHub) {
    let mut sub = subscribe(&hub, "dropped-pulls", ReadOptions::default()).await;
    if !sub.reader.buffered() {
        return;
    }
    let input = events("d", 90, 4);
    let publishing = {
        let (hub, input) = (hub.clone(), input.clone());
        tokio::spawn(async move {
            for chunk in input.chunks(10) {
                hub.publish(chunk, true).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let mut got = Vec::new();
    let (mut dropped, deadline) = (0, tokio::time::Instant::now() + Duration::from_secs(20));
    while got.len() < input.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {} records within 20 s",
            got.len(),
            input.len()
        );
        match tokio::time::timeout(Duration::from_millis(1), sub.reader.next_batch(7)).await {
            Ok(batch) => got.extend(batch.expect("read").expect("a following read")),
            Err(_) => dropped += 1,
        }
    }
    publishing.await.unwrap();
    assert!(dropped > 0, "no pull was dropped");
    let got = decoded(&got);
    assert_eq!(sorted(ids(&got)), sorted(ids(&input)), "each once");
    assert_per_key_order(&got);
}

/// A subscription can start at a time, and a read can end at one (a replay of a range).
pub async fn reads_start_and_end_at_a_time(hub: SharedHub) {
    let before = events("g", 10, 2);
    hub.publish(&before, true).await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let from = now_millis();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let middle = events("h", 10, 2);
    hub.publish(&middle, true).await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let until = now_millis();
    tokio::time::sleep(Duration::from_millis(30)).await;
    hub.publish(&events("i", 10, 2), true).await.unwrap();
    let range = ReadOptions {
        start: StartAt::Time(from),
        until: Some(until),
        transient: true,
        ..ReadOptions::default().bounded()
    };
    let mut sub = subscribe(&hub, "range", range).await;
    let got = decoded(&read_all(&mut sub).await);
    assert_eq!(sorted(ids(&got)), sorted(ids(&middle)));
}

/// What a sink saw, per event id.
#[derive(Default, Clone)]
struct Seen(Arc<Mutex<Vec<Event>>>);

impl Seen {
    fn events(&self) -> Vec<Event> {
        self.0.lock().unwrap().clone()
    }
}

/// A processor over `hub` whose sink records what it gets and answers with `answer`; its
/// faults go to the hub.
fn processor(
    hub: &SharedHub,
    seen: &Seen,
    parallelism: usize,
    answer: impl Fn(&Event) -> Result<(), Error> + Clone + Send + Sync + 'static,
) -> Processor {
    processor_with(hub_faults(hub), seen, parallelism, answer, &[])
}

/// Faults into the hub, where a fault monitor reads them.
fn hub_faults(hub: &SharedHub) -> FaultSink {
    FaultSink::new(Publisher::new(hub.clone()))
}

/// [`processor`] with one call at a time and these fields redacted in its faults.
fn processor_redacting(
    hub: &SharedHub,
    seen: &Seen,
    answer: impl Fn(&Event) -> Result<(), Error> + Clone + Send + Sync + 'static,
    redact: &[&str],
) -> Processor {
    processor_with(hub_faults(hub), seen, 1, answer, redact)
}

fn processor_with(
    faults: FaultSink,
    seen: &Seen,
    parallelism: usize,
    answer: impl Fn(&Event) -> Result<(), Error> + Clone + Send + Sync + 'static,
    redact: &[&str],
) -> Processor {
    let seen = seen.clone();
    let sink = sink_fn(move |batch: Batch| {
        let (seen, answer) = (seen.clone(), answer.clone());
        async move {
            for e in batch.events() {
                answer(e)?;
                // Some calls take longer than others: order must not depend on timing.
                let pause = e.id().len() as u64 % 3;
                tokio::time::sleep(Duration::from_millis(pause)).await;
                seen.0.lock().unwrap().push(e.clone());
            }
            Ok(())
        }
    });
    Processor::builder("conformance")
        .fault_sink(faults)
        .pipeline(
            Pipeline::builder("all")
                .event_type("order-paid")
                .parallelism(parallelism)
                .redact(redact.iter().copied())
                .resilience(
                    crate::layer::Resilience::default()
                        .retry(crate::layer::retry::RetryPolicy::default().max_attempts(3)),
                )
                .sink(sink)
                .unwrap(),
        )
        .build()
        .unwrap()
}

async fn run(hub: &SharedHub, name: &str, processor: &Processor) -> Result<RunReport, RunError> {
    let HubSubscription {
        reader,
        checkpointer,
        closed,
    } = subscribe(hub, name, ReadOptions::default().bounded()).await;
    let result = processor
        .run(reader, checkpointer, std::future::pending())
        .await;
    if let Some(closed) = closed {
        let _ = tokio::time::timeout(Duration::from_secs(5), closed).await;
    }
    result
}

async fn fault_events(hub: &SharedHub) -> Vec<Event> {
    let faults = ReadOptions {
        transient: true,
        stream: Stream::Faults,
        ..ReadOptions::default().bounded()
    };
    let mut sub = subscribe(hub, "fault-reader", faults).await;
    decoded(&read_all(&mut sub).await)
        .into_iter()
        .filter(Event::is_fault)
        .collect()
}

/// Two readers of one subscription at once (two processes of one service) deliver each event
/// once between them: the hub shares the subscription out (JetStream) or lets one reader
/// hold it while the other waits, and takes over where it stopped (a lease). A reader the
/// hub refuses says so; nothing is delivered twice.
pub async fn two_readers_of_one_subscription_deliver_each_event_once(hub: SharedHub) {
    let input = events("w", 120, 6);
    hub.publish(&input, true).await.unwrap();
    let seen = Seen::default();
    let reader = || async {
        let p = processor(&hub, &seen, 4, |_| Ok(()));
        match hub
            .subscribe("shared", ReadOptions::default().bounded())
            .await
        {
            Ok(HubSubscription {
                reader,
                checkpointer,
                closed,
            }) => {
                let report = p.run(reader, checkpointer, std::future::pending()).await;
                if let Some(closed) = closed {
                    let _ = tokio::time::timeout(Duration::from_secs(5), closed).await;
                }
                report.map(|r| r.faults()).map_err(|e| e.to_string())
            }
            Err(refused) => Err(refused.to_string()),
        }
    };
    let (a, b) = tokio::join!(reader(), reader());
    for outcome in [&a, &b] {
        if let Err(why) = outcome {
            assert!(
                why.contains("shared"),
                "a refusal names the subscription: {why}"
            );
        }
    }
    assert!(
        a.is_ok() || b.is_ok(),
        "one reader at least runs: {a:?} {b:?}"
    );
    let got = seen.events();
    assert_eq!(
        sorted(ids(&got)),
        sorted(ids(&input)),
        "every event delivered, none twice"
    );
}

/// A fault is resubmitted once after the fix: its record, read back from the hub by position
/// (the pipeline redacts a field, so the fault does not carry it), goes through the pipeline
/// that failed it and is delivered once; the fault is resolved and not resubmitted again.
pub async fn a_fault_is_resubmitted_once_after_the_fix(hub: SharedHub) {
    let input = events("r", 12, 3);
    hub.publish(&input, true).await.unwrap();
    let seen = Seen::default();
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let answer = {
        let broken = broken.clone();
        move |e: &Event| {
            if e.id() == "r-5" && broken.load(std::sync::atomic::Ordering::SeqCst) {
                Err(Error::poison_msg("Invalid", "r-5 is not valid yet"))
            } else {
                Ok(())
            }
        }
    };
    let p = processor_redacting(&hub, &seen, answer, &["seq"]);
    assert_eq!(run(&hub, "resubmitted", &p).await.unwrap().faults(), 1);
    // What a fault monitor does: the hub's fault events into a store.
    let store = crate::fault_store::MemoryFaultStore::new();
    store.store_faults(&fault_events(&hub).await).await.unwrap();
    let open = FaultFilter {
        status: Some(FaultStatus::Open),
        ..FaultFilter::default()
    };
    let faults = store.list_faults(&open).await.unwrap();
    assert_eq!(faults.len(), 1);
    assert!(faults[0].details().unwrap().uow.record.redacted);
    broken.store(false, std::sync::atomic::Ordering::SeqCst);
    let (outcome, detail) =
        crate::fault_store::resubmit(&store, &*hub, &p, &faults[0], Duration::from_secs(10))
            .await
            .unwrap();
    assert_eq!(outcome, ResubmitOutcome::Succeeded, "{detail}");
    assert!(
        store.list_faults(&open).await.unwrap().is_empty(),
        "resolved"
    );
    let delivered = ids(&seen.events());
    assert_eq!(delivered.iter().filter(|id| *id == "r-5").count(), 1);
    assert_eq!(
        delivered.len(),
        input.len(),
        "the others were not sent again"
    );
    assert_eq!(fault_events(&hub).await.len(), 1, "no new fault");
}

/// A subscription removed starts again from its start; a hub that keeps subscriptions another
/// way refuses with [`Unsupported`](crate::hub::Unsupported), saying how.
pub async fn a_removed_subscription_starts_again(hub: SharedHub) {
    let input = events("u", 12, 3);
    let seen = Seen::default();
    let p = processor(&hub, &seen, 4, |_| Ok(()));
    hub.publish(&input, true).await.unwrap();
    run(&hub, "removed", &p).await.unwrap();
    assert_eq!(seen.events().len(), input.len());
    match hub.unsubscribe("removed").await {
        Ok(removed) => {
            assert!(removed, "the subscription existed");
            run(&hub, "removed", &p).await.unwrap();
            assert_eq!(
                seen.events().len(),
                2 * input.len(),
                "read again from the start"
            );
            assert!(!hub.unsubscribe("never-made").await.unwrap());
        }
        Err(refused) => {
            let why = refused.downcast_ref::<crate::hub::Unsupported>();
            assert!(why.is_some_and(|w| !w.0.is_empty()), "{refused}");
        }
    }
}

/// Per-key order holds through a processor with many calls in flight, and every event is
/// delivered once.
pub async fn per_key_order_holds_under_concurrency(hub: SharedHub) {
    per_key_order_holds_through(Box::new(HubRunner::new(hub, "ordered"))).await;
}

/// A poison event becomes one fault event in the hub; the others are delivered; a transient
/// failure is retried and faults nothing.
pub async fn poison_becomes_one_fault_and_transient_is_retried(hub: SharedHub) {
    poison_becomes_one_fault_through(Box::new(HubRunner::new(hub, "poison"))).await;
}

/// A fatal error stops the processor without passing the failed event; a run after the fix
/// resumes from the checkpoint and delivers it.
pub async fn a_fatal_stop_resumes_after_the_fix(hub: SharedHub) {
    let input = events("m", 30, 3);
    hub.publish(&input, true).await.unwrap();
    let seen = Seen::default();
    let broken = processor(&hub, &seen, 1, |e| match e.id() {
        "m-12" => Err(Error::fatal_msg("Misconfigured", "fix me")),
        _ => Ok(()),
    });
    let err = run(&hub, "fatal", &broken).await.unwrap_err();
    assert!(err.to_string().contains("fix me"), "{err}");
    assert!(!ids(&seen.events()).contains(&"m-12".to_owned()));
    let fixed = processor(&hub, &seen, 1, |_| Ok(()));
    run(&hub, "fatal", &fixed).await.unwrap();
    let got: HashSet<String> = ids(&seen.events()).into_iter().collect();
    assert_eq!(
        got.len(),
        30,
        "every event at least once across the two runs"
    );
    assert!(
        fault_events(&hub).await.is_empty(),
        "a fatal error is not a fault"
    );
}

/// The stats count what was published, and a durable subscription appears with its lag.
pub async fn stats_count_events_and_subscriptions(hub: SharedHub) {
    hub.publish(&events("n", 30, 3), true).await.unwrap();
    {
        let mut sub = subscribe(&hub, "counted", ReadOptions::default().bounded()).await;
        read_all(&mut sub).await;
        if let Some(closed) = sub.closed.take() {
            drop(sub);
            closed.await;
        }
    }
    let stats = hub.stats().await.unwrap();
    let held: u64 = stats.partitions.iter().map(|p| p.events).sum();
    assert_eq!(held, 30, "{stats:?}");
    let counted = stats
        .subscriptions
        .iter()
        .find(|s| s.name == "counted")
        .unwrap_or_else(|| panic!("no `counted` in {stats:?}"));
    assert!(counted.lag <= 30, "{counted:?}");
    assert!(!hub.describe().is_empty());
}

/// Generates one `#[tokio::test]` per conformance scenario; `$fresh` is an async function
/// returning `(SharedHub, guard)`: a fresh, empty hub, and what must live as long as it.
#[macro_export]
macro_rules! hub_conformance_tests {
    ($fresh:path) => {
        $crate::conformance_scenarios!(
            $fresh,
            publish_and_read_back,
            publishing_is_idempotent,
            a_subscription_resumes_from_its_checkpoint,
            a_subscription_can_start_at_the_end,
            reads_start_and_end_at_a_time,
            per_key_order_holds_under_concurrency,
            two_readers_of_one_subscription_deliver_each_event_once,
            a_removed_subscription_starts_again,
            a_fault_is_resubmitted_once_after_the_fix,
            poison_becomes_one_fault_and_transient_is_retried,
            a_fatal_stop_resumes_after_the_fix,
            stats_count_events_and_subscriptions,
            a_buffered_reader_loses_nothing_to_a_pull_dropped
        );
    };
}

/// Records a resubmission of fault `id`; the fault's status after it.
async fn resubmitted(
    store: &dyn FaultStore,
    id: &str,
    outcome: ResubmitOutcome,
    detail: &str,
) -> FaultStatus {
    store
        .record_resubmission_of(id, outcome, detail)
        .await
        .unwrap();
    store.fault(id).await.unwrap().unwrap().status
}

/// A raise of the failure of record `offset` in `pipeline`, with `message`: each call is a
/// new fault event of the same fault.
fn raise(pipeline: &str, offset: u64, err: &Error) -> Event {
    let data = format!(
        r#"{{"id":"o-{offset}","type":"order-paid","timestamp":1,"partitionKey":"k-{offset}"}}"#
    );
    let record = Record::new("memory", "0", offset, data.clone());
    let event = Event::decode(data.as_bytes()).unwrap();
    let origin = crate::fault::FaultOrigin {
        processor: "conformance",
        pipeline,
        step: "sink",
    };
    crate::fault::fault_event(origin, &record, 0, Some(&event), err, &[])
}

fn poison(message: &str) -> Error {
    Error::poison_msg("Invalid", message.to_owned())
}

/// A raise counts once however often it is stored; another raise of the same failure counts
/// again; the store keeps what people look for.
pub async fn a_fault_store_counts_each_raise_once(store: SharedFaultStore) {
    let first = raise("notify", 7, &poison("bad total"));
    store
        .store_faults(&[first.clone(), first.clone()])
        .await
        .unwrap();
    store
        .store_faults(std::slice::from_ref(&first))
        .await
        .unwrap();
    let id = crate::fault::fault_id(&first).to_owned();
    let stored = store.fault(&id).await.unwrap().expect("stored");
    assert_eq!(stored.seen, 1, "one raise, stored three times");
    assert_eq!(
        (
            stored.processor.as_str(),
            stored.pipeline.as_str(),
            stored.name.as_str()
        ),
        ("conformance", "notify", "Invalid")
    );
    assert_eq!(stored.status, FaultStatus::Open);
    assert_eq!(stored.details().unwrap().err.message, "bad total");
    let again = raise("notify", 7, &poison("bad total"));
    assert_ne!(again.id(), first.id());
    store.store_faults(&[again]).await.unwrap();
    assert_eq!(store.fault(&id).await.unwrap().unwrap().seen, 2);
    assert!(store.fault("no-such-fault").await.unwrap().is_none());
    assert!(
        store.store_faults(&events("z", 1, 1)).await.is_err(),
        "an event that is not a fault is refused"
    );
}

/// Filters select by processor, pipeline, error and status; the newest come first.
pub async fn a_fault_store_filters(store: SharedFaultStore) {
    for (pipeline, offset) in [("notify", 1), ("notify", 2), ("view", 3)] {
        store
            .store_faults(&[raise(pipeline, offset, &poison("bad"))])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let transient = raise("view", 4, &Error::transient_msg("Down", "gone"));
    store.store_faults(&[transient]).await.unwrap();
    let all = store.list_faults(&FaultFilter::default()).await.unwrap();
    assert_eq!(all.len(), 4);
    assert!(
        all.windows(2).all(|w| w[0].last_seen >= w[1].last_seen),
        "newest first"
    );
    let of = |filter: FaultFilter| {
        let store = store.clone();
        async move { store.list_faults(&filter).await.unwrap().len() }
    };
    let pipeline = |p: &str| FaultFilter {
        pipeline: Some(p.into()),
        ..FaultFilter::default()
    };
    assert_eq!(of(pipeline("notify")).await, 2);
    assert_eq!(of(pipeline("view")).await, 2);
    let down = FaultFilter {
        error: Some("Down".into()),
        ..FaultFilter::default()
    };
    assert_eq!(of(down).await, 1);
    let limited = FaultFilter {
        limit: Some(3),
        ..FaultFilter::default()
    };
    assert_eq!(of(limited).await, 3);
}

/// A failed resubmission is recorded and leaves the fault open; a successful one resolves
/// it; a raise after that opens it again.
pub async fn a_fault_store_resolves_and_reopens(store: SharedFaultStore) {
    let first = raise("notify", 9, &poison("bad"));
    store
        .store_faults(std::slice::from_ref(&first))
        .await
        .unwrap();
    let id = crate::fault::fault_id(&first).to_owned();
    let status = resubmitted(&*store, &id, ResubmitOutcome::Failed, "still bad").await;
    assert_eq!(status, FaultStatus::Open);
    tokio::time::sleep(Duration::from_millis(3)).await;
    let status = resubmitted(&*store, &id, ResubmitOutcome::Succeeded, "fixed").await;
    assert_eq!(status, FaultStatus::Resolved);
    let open = FaultFilter {
        status: Some(FaultStatus::Open),
        ..FaultFilter::default()
    };
    assert!(store.list_faults(&open).await.unwrap().is_empty());
    let history = store.resubmissions_of(&id).await.unwrap();
    let outcomes: Vec<&str> = history.iter().map(|r| r.outcome.as_str()).collect();
    assert_eq!(outcomes, ["failed", "succeeded"]);
    assert!(history[0].at < history[1].at);
    // Raised again after the fix: open again, counted.
    tokio::time::sleep(Duration::from_millis(3)).await;
    store
        .store_faults(&[raise("notify", 9, &poison("bad again"))])
        .await
        .unwrap();
    let stored = store.fault(&id).await.unwrap().unwrap();
    assert_eq!((stored.status, stored.seen), (FaultStatus::Open, 2));
    assert_eq!(stored.message, "bad again", "with its latest error");
}

/// One resubmitter at a time claims an open fault: another claimant is refused until the
/// resubmission is recorded by the claiming process (or the claim expires); recording
/// releases only this process's claim ([`claimant`](crate::fault_store::claimant)); a
/// resolved fault is claimed by nobody.
pub async fn a_fault_is_claimed_by_one_resubmitter_at_a_time(store: SharedFaultStore) {
    let first = raise("notify", 11, &poison("bad"));
    store
        .store_faults(std::slice::from_ref(&first))
        .await
        .unwrap();
    let id = crate::fault::fault_id(&first).to_owned();
    let lease = Duration::from_secs(60);
    let me = crate::fault_store::claimant();
    let claim = |by: &'static str, lease: Duration| {
        let (store, id) = (store.clone(), id.clone());
        async move { store.claim_resubmission(&id, by, lease).await.unwrap() }
    };
    assert!(claim(me, lease).await, "an open fault is claimed");
    assert!(!claim("another", lease).await, "by one claimant at a time");
    assert!(claim(me, lease).await, "its claimant may claim it again");
    // Recorded, this process's claim is released: failed, the fault is open for anyone.
    resubmitted(&*store, &id, ResubmitOutcome::Failed, "still bad").await;
    assert!(claim("another", Duration::from_millis(1)).await);
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(claim(me, lease).await, "an expired claim is no claim");
    resubmitted(&*store, &id, ResubmitOutcome::Failed, "still bad").await;
    // Another's claim is not released by this process's recording.
    assert!(claim("another", lease).await);
    tokio::time::sleep(Duration::from_millis(3)).await;
    resubmitted(&*store, &id, ResubmitOutcome::Failed, "late").await;
    assert!(!claim(me, lease).await, "another's claim holds");
    tokio::time::sleep(Duration::from_millis(3)).await;
    resubmitted(&*store, &id, ResubmitOutcome::Succeeded, "fixed").await;
    assert!(
        !claim("another", lease).await,
        "a resolved fault is not sent again"
    );
    assert!(!store
        .claim_resubmission("no-such-fault", me, lease)
        .await
        .unwrap());
}

/// Generates one `#[tokio::test]` per fault store scenario; `$fresh` is an async function
/// returning `(SharedFaultStore, guard)`: a fresh, empty store, and what must live as long
/// as it.
#[macro_export]
macro_rules! fault_store_conformance_tests {
    ($fresh:path) => {
        $crate::conformance_scenarios!(
            $fresh,
            a_fault_store_counts_each_raise_once,
            a_fault_store_filters,
            a_fault_store_resolves_and_reopens,
            a_fault_is_claimed_by_one_resubmitter_at_a_time
        );
    };
}

// ---------------------------------------------------------------------------------------------
// Keyed state

fn write(key: &str, timestamp: i64, id: &str) -> StateWrite {
    StateWrite::new(
        key,
        Version {
            timestamp,
            id: id.to_owned(),
        },
        serde_json::json!({ "by": id, "at": timestamp }),
    )
}

/// Writes in any order and in any batches give the newest row per key; a write counts once.
pub async fn keyed_state_is_latest_wins_in_any_order(state: SharedState) {
    // Three keys, five versions each, one tie on timestamp broken by id.
    let mut writes: Vec<StateWrite> = (0..15)
        .map(|i| {
            write(
                &format!("k{}", i % 3),
                100 + (i / 3) as i64,
                &format!("e{i:02}"),
            )
        })
        .collect();
    writes.push(write("k0", 104, "e99"));
    let mut shuffled = writes.clone();
    shuffled.reverse();
    shuffled.swap(1, 7);
    let mut total = Applied::default();
    for chunk in shuffled.chunks(4) {
        let applied = state.apply(chunk).await.unwrap();
        total.written += applied.written;
        total.stale += applied.stale;
        total.duplicates += applied.duplicates;
    }
    assert_eq!(total.written + total.stale + total.duplicates, writes.len());
    assert_eq!(total.duplicates, 0, "no write was repeated");
    for (key, by) in [("k0", "e99"), ("k1", "e13"), ("k2", "e14")] {
        let row = state.get(key).await.unwrap().expect("a row");
        assert_eq!(row.value["by"], by, "{key}");
        assert_eq!(row.version.id, by);
    }
    assert!(state.get("absent").await.unwrap().is_none());
}

/// A batch applied again changes nothing, and says so.
pub async fn keyed_state_applies_an_event_once(state: SharedState) {
    let writes = [write("a", 10, "x1"), write("b", 10, "x2")];
    assert_eq!(state.apply(&writes).await.unwrap().written, 2);
    let again = state.apply(&writes).await.unwrap();
    assert_eq!(again.written, 0);
    assert_eq!(again.stale + again.duplicates, 2);
    // An older event of another id arriving late changes nothing either.
    let late = state.apply(&[write("a", 5, "x0")]).await.unwrap();
    assert_eq!((late.written, late.stale), (0, 1));
    assert_eq!(state.get("a").await.unwrap().unwrap().version.id, "x1");
}

/// A scan reads a prefix in key order, page by page.
pub async fn keyed_state_scans_a_prefix_in_key_order(state: SharedState) {
    let writes: Vec<StateWrite> = ["order#3", "order#1", "customer#1", "order#2", "order#4"]
        .iter()
        .enumerate()
        .map(|(i, k)| write(k, 1, &format!("s{i}")))
        .collect();
    state.apply(&writes).await.unwrap();
    let keys = |rows: Vec<StateRow>| rows.into_iter().map(|r| r.key).collect::<Vec<_>>();
    let first = state.scan(&Scan::prefix("order#", 2)).await.unwrap();
    assert_eq!(keys(first), ["order#1", "order#2"]);
    let next = state
        .scan(&Scan::prefix("order#", 2).after("order#2"))
        .await
        .unwrap();
    assert_eq!(keys(next), ["order#3", "order#4"]);
    let all = state.scan(&Scan::prefix("", 100)).await.unwrap();
    assert_eq!(all.len(), 5);
}

/// An expired row is not read, and expiring removes it.
pub async fn keyed_state_rows_expire(state: SharedState) {
    let now = now_millis();
    state
        .apply(&[
            write("gone", 1, "t1").expiring_at(now - 1_000),
            write("kept", 1, "t2").expiring_at(now + 3_600_000),
            write("forever", 1, "t3"),
        ])
        .await
        .unwrap();
    assert!(state.get("gone").await.unwrap().is_none());
    assert_eq!(
        state.get("kept").await.unwrap().unwrap().expires_at,
        Some(now + 3_600_000)
    );
    let rows = state.scan(&Scan::prefix("", 10)).await.unwrap();
    let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, ["forever", "kept"]);
    assert_eq!(state.expire(now).await.unwrap(), 1);
    assert_eq!(state.expire(now).await.unwrap(), 0);
}

/// Generates one `#[tokio::test]` per keyed state scenario; `$fresh` is an async function
/// returning `(SharedState, guard)`: fresh, empty state, and what must live as long as it.
#[macro_export]
macro_rules! keyed_state_conformance_tests {
    ($fresh:path) => {
        $crate::conformance_scenarios!(
            $fresh,
            keyed_state_is_latest_wins_in_any_order,
            keyed_state_applies_an_event_once,
            keyed_state_scans_a_prefix_in_key_order,
            keyed_state_rows_expire
        );
    };
}

// ---------------------------------------------------------------------------------------------
// Rows by update requests

fn version(timestamp: i64, id: &str) -> Version {
    Version {
        timestamp,
        id: id.to_owned(),
    }
}

/// The updates of one order's story in partition `pk`, in version order: created, paid,
/// an address, items counted and tagged, a tag taken back, a note removed, and a whole-row
/// line written, deleted and written again.
fn story(pk: &str) -> Vec<Update> {
    use serde_json::json;
    let order = || RowKey::new(pk, "order");
    let line = || RowKey::new(pk, "line#1");
    let mut line_fields = serde_json::Map::new();
    line_fields.insert("sku".into(), json!("a"));
    let mut line_again = serde_json::Map::new();
    line_again.insert("sku".into(), json!("b"));
    vec![
        Update::new(order(), version(100, "e1"))
            .set("status", "created")
            .set("note", "fragile")
            .discriminator("order")
            .expiring_at(4_000_000_000_000),
        Update::new(order(), version(101, "e2")).set("status", "paid"),
        Update::new(order(), version(101, "e3")).set("address", "Main St"),
        Update::new(order(), version(102, "e4"))
            .add("items", 2)
            .add("tags", json!(["gift", "rush"])),
        Update::new(order(), version(103, "e5"))
            .add("items", 1)
            .delete("tags", json!(["rush"])),
        Update::new(order(), version(104, "e6")).remove("note"),
        Update::put(line(), version(100, "e7"), line_fields).discriminator("line"),
        Update::new(line(), version(105, "e8"))
            .latest(Latest::Row)
            .delete_row(),
        Update::put(line(), version(106, "e9"), line_again).discriminator("line"),
    ]
}

async fn partition(rows: &SharedRows, pk: &str) -> Vec<(String, Option<Value>)> {
    let query = RowQuery::partition(pk, 100);
    let found = rows.query(&query).await.unwrap();
    found
        .into_iter()
        .map(|r| {
            let mut image = r.image();
            // The partitions differ by key only.
            if let Some(Value::Object(m)) = image.as_mut() {
                m.remove("pk");
            }
            (r.key.sk, image)
        })
        .collect()
}

/// The same updates in any order, in any batches, with repeats, leave the same rows.
pub async fn rows_land_the_same_in_any_order(rows: SharedRows) {
    let sorted = story("sorted");
    let mut outcomes = Vec::new();
    for u in &sorted {
        outcomes.extend(rows.update(std::slice::from_ref(u)).await.unwrap());
    }
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Written { .. })),
        "{outcomes:?}"
    );
    let expected = partition(&rows, "sorted").await;
    assert_eq!(expected.len(), 2, "{expected:?}");
    let order = &expected[1].1.as_ref().unwrap();
    assert_eq!(order["status"], "paid");
    assert_eq!(order["address"], "Main St");
    assert_eq!(order["items"], 3);
    assert_eq!(order["tags"], serde_json::json!(["gift"]));
    assert!(order.get("note").is_none());
    assert_eq!(order["discriminator"], "order");
    assert_eq!(expected[0].1.as_ref().unwrap()["sku"], "b");
    for (n, batch) in [(0u64, 1usize), (1, 3), (2, 9), (3, 2)] {
        let pk = format!("shuffled-{n}");
        let mut updates = story(&pk);
        let len = updates.len();
        // A different permutation each time, and repeats of three updates.
        for i in 0..len {
            updates.swap(i, (i * 7 + n as usize * 5 + 3) % len);
        }
        let repeats: Vec<Update> = updates.iter().take(3).cloned().collect();
        updates.extend(repeats);
        let mut outcomes = Vec::new();
        for chunk in updates.chunks(batch) {
            outcomes.extend(rows.update(chunk).await.unwrap());
        }
        // A repeat changes nothing: the inbox knows it, or (a store whose rows' versions
        // recognise a repeat of anything but a counter) it is stale.
        for repeat in &outcomes[len..] {
            assert!(
                matches!(repeat, Outcome::Duplicate | Outcome::Stale),
                "a repeat: {repeat:?}"
            );
        }
        assert_eq!(partition(&rows, &pk).await, expected, "permutation {n}");
    }
}

/// Reads by key and by partition: sort-key order, a prefix, pages, and neither deleted nor
/// expired rows.
pub async fn rows_are_read_by_key_and_partition(rows: SharedRows) {
    let mut updates: Vec<Update> = (0..5)
        .map(|i| {
            Update::new(
                RowKey::new("p", format!("item#{i}")),
                version(1, &format!("i{i}")),
            )
            .set("n", i)
        })
        .collect();
    updates.push(Update::new(RowKey::new("p", "order"), version(1, "o")).set("n", 9));
    updates.push(Update::new(RowKey::new("q", "item#0"), version(1, "q")).set("n", 0));
    updates.push(
        Update::new(RowKey::new("p", "item#5"), version(1, "x"))
            .set("n", 5)
            .expiring_at(1),
    );
    rows.update(&updates).await.unwrap();
    rows.update(&[Update::new(RowKey::new("p", "item#1"), version(2, "d")).delete_row()])
        .await
        .unwrap();
    let sks = |found: Vec<Row>| found.into_iter().map(|r| r.key.sk).collect::<Vec<_>>();
    let all = rows.query(&RowQuery::partition("p", 100)).await.unwrap();
    assert_eq!(sks(all), ["item#0", "item#2", "item#3", "item#4", "order"]);
    let items = RowQuery::partition("p", 2).sk_prefix("item#");
    assert_eq!(sks(rows.query(&items).await.unwrap()), ["item#0", "item#2"]);
    let next = items.after("item#2");
    assert_eq!(sks(rows.query(&next).await.unwrap()), ["item#3", "item#4"]);
    let got = rows.get(&RowKey::new("p", "order")).await.unwrap().unwrap();
    assert_eq!(got.fields["n"], 9);
    assert!(
        rows.get(&RowKey::new("p", "item#1"))
            .await
            .unwrap()
            .is_none(),
        "deleted"
    );
    assert!(
        rows.get(&RowKey::new("p", "item#5"))
            .await
            .unwrap()
            .is_none(),
        "expired"
    );
}

/// A stale update under each policy: dropped, a fault (nothing written), or its fallback.
pub async fn rows_apply_the_stale_policy(rows: SharedRows) {
    let key = RowKey::new("p", "order");
    let newer = Update::new(key.clone(), version(10, "new"))
        .set("status", "shipped")
        .latest(Latest::Row);
    rows.update(std::slice::from_ref(&newer)).await.unwrap();
    let older = |id: &str| {
        Update::new(key.clone(), version(5, id))
            .set("status", "paid")
            .latest(Latest::Row)
    };
    let history = Update::new(RowKey::new("p", "late#f"), version(5, "f")).set("status", "paid");
    let outcomes = rows
        .update(&[
            older("d"),
            older("e").on_stale(Stale::Fault),
            older("f").on_stale(Stale::Fallback(Box::new(history))),
        ])
        .await
        .unwrap();
    assert_eq!(outcomes[0], Outcome::Stale);
    assert!(matches!(outcomes[1], Outcome::Faulted(_)), "{outcomes:?}");
    assert_eq!(outcomes[2], Outcome::Stale);
    let row = rows.get(&key).await.unwrap().unwrap();
    assert_eq!(row.fields["status"], "shipped");
    let late = rows
        .get(&RowKey::new("p", "late#f"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(late.fields["status"], "paid");
    // A repeat of the update whose fallback applied applies nothing again.
    let again = Update::new(RowKey::new("p", "late#f"), version(5, "f")).set("status", "x");
    let repeat = older("f").on_stale(Stale::Fallback(Box::new(again)));
    assert_eq!(rows.update(&[repeat]).await.unwrap(), [Outcome::Duplicate]);
    let late = rows
        .get(&RowKey::new("p", "late#f"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(late.fields["status"], "paid");
    // A faulted update is not in the inbox: once fixed, it can be applied.
    let fixed = Update::new(key.clone(), version(11, "e")).set("status", "returned");
    assert_eq!(
        rows.update(&[fixed]).await.unwrap(),
        [Outcome::Written { changed: true }]
    );
    // An update applied, overwritten since, and delivered again (a crash before the
    // checkpoint, a replay): a repeat, not a stale update to fault.
    let again = RowKey::new("p", "again");
    let first = Update::new(again.clone(), version(20, "g"))
        .set("status", "paid")
        .latest(Latest::Row)
        .on_stale(Stale::Fault);
    let later = Update::new(again, version(30, "h"))
        .set("status", "shipped")
        .latest(Latest::Row);
    rows.update(std::slice::from_ref(&first)).await.unwrap();
    rows.update(&[later]).await.unwrap();
    assert_eq!(rows.update(&[first]).await.unwrap(), [Outcome::Duplicate]);
}

/// The inbox remembers an event per row, whatever the row's keys and the event's id hold:
/// counts of two rows whose sort key and event id join to the same text (`a#b` by `c`, `a` by
/// `b#c`) both apply, and a repeat of either does not.
pub async fn rows_keep_the_inbox_entries_of_two_rows_apart(rows: SharedRows) {
    let count = |sk: &str, id: &str| Update::new(RowKey::new("p", sk), version(1, id)).add("n", 1);
    for (sk, id) in [("a#b", "c"), ("a", "b#c"), ("a\\#b", "c"), ("a\\", "#b#c")] {
        let applied = rows.update(&[count(sk, id)]).await.unwrap();
        assert_eq!(
            applied,
            [Outcome::Written { changed: true }],
            "{sk} by {id}"
        );
    }
    for (sk, id) in [("a#b", "c"), ("a", "b#c")] {
        assert_eq!(
            rows.update(&[count(sk, id)]).await.unwrap(),
            [Outcome::Duplicate]
        );
        let row = rows.get(&RowKey::new("p", sk)).await.unwrap().unwrap();
        assert_eq!(row.fields["n"], 1, "{sk}");
    }
}

/// Generates one `#[tokio::test]` per row store scenario; `$fresh` is an async function
/// returning `(SharedRows, guard)`: a fresh, empty store, and what must live as long as it.
#[macro_export]
macro_rules! row_store_conformance_tests {
    ($fresh:path) => {
        $crate::conformance_scenarios!(
            $fresh,
            rows_land_the_same_in_any_order,
            rows_are_read_by_key_and_partition,
            rows_apply_the_stale_policy,
            rows_keep_the_inbox_entries_of_two_rows_apart
        );
    };
}

/// One `#[tokio::test]` per scenario, each given what `$fresh().await` opens (the rest of its
/// answer lives as long as the test): what the suites above expand to.
#[doc(hidden)]
#[macro_export]
macro_rules! conformance_scenarios {
    ($fresh:path, $($scenario:ident),+) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                let (opened, _guard) = $fresh().await;
                $crate::testing::conformance::$scenario(opened).await;
            }
        )+
    };
}

// ---------------------------------------------------------------------------------------------
// Processing, whatever delivers the records

/// How records reach a processor in a processing scenario: a hub's subscription
/// ([`HubRunner`]), or a Lambda event-source mapping (`floodway-lambda`'s simulator).
pub trait Runner: Send + Sync {
    /// Where the processor's faults go.
    fn fault_sink(&self) -> FaultSink;

    /// Delivers `events` to `processor` until every one is done; the error says why not.
    fn deliver<'a>(
        &'a self,
        events: &'a [Event],
        processor: &'a Processor,
    ) -> crate::hub::HubFuture<'a, ()>;

    /// The fault events raised so far.
    fn faults(&self) -> crate::hub::HubFuture<'_, Vec<Event>>;
}

/// Records through a hub: published, then read by a subscription of their own.
#[derive(Debug)]
pub struct HubRunner {
    hub: SharedHub,
    subscription: String,
}

impl HubRunner {
    /// Delivers through `hub`, reading with `subscription`.
    pub fn new(hub: SharedHub, subscription: &str) -> Self {
        HubRunner {
            hub,
            subscription: subscription.to_owned(),
        }
    }
}

impl Runner for HubRunner {
    fn fault_sink(&self) -> FaultSink {
        hub_faults(&self.hub)
    }

    fn deliver<'a>(
        &'a self,
        events: &'a [Event],
        processor: &'a Processor,
    ) -> crate::hub::HubFuture<'a, ()> {
        Box::pin(async move {
            self.hub.publish(events, true).await?;
            run(&self.hub, &self.subscription, processor).await?;
            Ok(())
        })
    }

    fn faults(&self) -> crate::hub::HubFuture<'_, Vec<Event>> {
        Box::pin(async move { Ok(fault_events(&self.hub).await) })
    }
}

/// A poison event becomes one fault event; the others are delivered once; a transient
/// failure is retried and faults nothing.
pub async fn poison_becomes_one_fault_through(runner: Box<dyn Runner>) {
    let input = events("k", 40, 4);
    let seen = Seen::default();
    let tries = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
    let p = processor_with(
        runner.fault_sink(),
        &seen,
        4,
        move |e| {
            let mut tries = tries.lock().unwrap();
            let n = tries.entry(e.id().to_owned()).or_default();
            *n += 1;
            match e.id() {
                "k-7" => Err(Error::poison_msg("Invalid", "k-7 is not valid")),
                "k-9" if *n == 1 => Err(Error::transient_msg("Blip", "once")),
                _ => Ok(()),
            }
        },
        &[],
    );
    runner.deliver(&input, &p).await.unwrap();
    let got = ids(&seen.events());
    assert_eq!(sorted(got.clone()).len(), 39, "{got:?}");
    assert!(!got.contains(&"k-7".to_owned()) && got.contains(&"k-9".to_owned()));
    let faults = runner.faults().await.unwrap();
    assert_eq!(faults.len(), 1, "one fault event");
    let details: crate::fault::FaultDetails = faults[0].payload().unwrap();
    assert_eq!(details.err.name, "Invalid");
}

/// Per-key order holds through a processor with many calls in flight, and every event is
/// delivered once.
pub async fn per_key_order_holds_through(runner: Box<dyn Runner>) {
    let input = events("j", 200, 8);
    let seen = Seen::default();
    let p = processor_with(runner.fault_sink(), &seen, 16, |_| Ok(()), &[]);
    runner.deliver(&input, &p).await.unwrap();
    assert!(runner.faults().await.unwrap().is_empty());
    let got = seen.events();
    assert_eq!(sorted(ids(&got)), sorted(ids(&input)));
    assert_per_key_order(&got);
}

/// Generates one `#[tokio::test]` per processing scenario; `$fresh` is an async function
/// returning `(runner, guard)`, the runner a `Box<dyn Runner>`.
#[macro_export]
macro_rules! processing_conformance_tests {
    ($fresh:path) => {
        $crate::conformance_scenarios!(
            $fresh,
            poison_becomes_one_fault_through,
            per_key_order_holds_through
        );
    };
}
