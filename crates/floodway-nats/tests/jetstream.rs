//! The JetStream hub against real `nats-server` processes on loopback.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use floodway::idempotence::{MemoryView, Version};
use floodway::memory::{MemoryFaultSink, MemorySink};
use floodway::runtime::RunReport;
use floodway::testing::{generate, ScriptedSink};
use floodway::{sink_fn, Batch, Error, Event, Pipeline, Processor, Sink};
use floodway_nats::testing::{NatsCluster, NatsServer};
use floodway_nats::{
    Acks, NatsHub, NatsHubOptions, NatsSubscription, Partitions, Sharing, StartAt,
    SubscriptionOptions, SubscriptionStats,
};

fn options(urls: Vec<String>) -> NatsHubOptions {
    NatsHubOptions {
        servers: urls,
        stream: "ORDERS".into(),
        subject: "orders".into(),
        partitions: Some(4),
        // Acks lost in a cut connection are given up on (and the batch retried) sooner.
        request_timeout: Duration::from_secs(3),
        ..NatsHubOptions::default()
    }
}

/// A `nats-server` of its own, and a hub on it.
async fn hub_on_new_server() -> (NatsServer, NatsHub) {
    let server = NatsServer::start();
    let hub = NatsHub::connect(&options(vec![server.url()]))
        .await
        .unwrap();
    (server, hub)
}

/// Processor `name` of the one `pipeline`, its faults published to `hub`.
fn hub_processor(hub: &NatsHub, name: &str, pipeline: Pipeline) -> Processor {
    Processor::builder(name)
        .fault_sink(hub.publisher())
        .pipeline(pipeline)
        .build()
        .unwrap()
}

/// Pipeline `p`, straight into `sink`.
fn into(sink: impl Sink) -> Pipeline {
    Pipeline::builder("p").sink(sink).unwrap()
}

/// Processor `name` whose sink never answers for the batches `hangs` picks (counted in the
/// returned counter) and delivers the rest; at shutdown it waits 100 ms for what hangs.
fn hanging_processor(
    hub: &NatsHub,
    name: &str,
    hangs: fn(&Batch) -> bool,
) -> (Processor, Arc<AtomicUsize>) {
    let hung = Arc::new(AtomicUsize::new(0));
    let sink = {
        let hung = hung.clone();
        sink_fn(move |batch: Batch| {
            let hang = hangs(&batch);
            if hang {
                hung.fetch_add(1, Ordering::SeqCst);
            }
            async move {
                if hang {
                    std::future::pending::<()>().await;
                }
                Ok::<_, Error>(())
            }
        })
    };
    let processor = Processor::builder(name)
        .fault_sink(hub.publisher())
        .drain_timeout(Duration::from_millis(100))
        .pipeline(into(sink))
        .build()
        .unwrap();
    (processor, hung)
}

/// Subscription `name`, with the given ack wait and otherwise the defaults.
async fn subscribe_with_ack_wait(
    hub: &NatsHub,
    name: &str,
    ack_wait: Duration,
) -> NatsSubscription {
    let options = SubscriptionOptions {
        ack_wait,
        ..Default::default()
    };
    hub.subscribe(name, options).await.unwrap()
}

/// The state of subscription `name`.
async fn subscription_stats(hub: &NatsHub, name: &str) -> SubscriptionStats {
    let stats = hub.stats().await.unwrap();
    stats
        .subscriptions
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap()
        .1
}

/// Calls `attempt` every `pause` until it succeeds, for `patience` at the most.
async fn retry<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
    what: &str,
    patience: Duration,
    pause: Duration,
    mut attempt: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + patience;
    loop {
        match attempt().await {
            Ok(value) => break value,
            Err(e) => {
                assert!(Instant::now() < deadline, "{what} never recovered: {e}");
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// The consumer `name`'s state once the server has taken every ack sent to it (or after 10 s).
async fn settled_consumer(hub: &NatsHub, name: &str) -> async_nats::jetstream::consumer::Info {
    let js = async_nats::jetstream::new(hub.client().clone());
    let stream = js.get_stream(hub.stream()).await.unwrap();
    let mut consumer = stream
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(name)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = consumer.info().await.unwrap().clone();
        if info.num_ack_pending == 0 || Instant::now() > deadline {
            return info;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Events `{prefix}-NNNN` of keys `k{i}` for `i` in `range`, those that land in `partition`.
fn of_partition(
    hub: &NatsHub,
    partition: u32,
    prefix: &str,
    range: std::ops::Range<usize>,
) -> Vec<Event> {
    range
        .map(|i| {
            Event::builder("step", format!("k{i}"))
                .id(format!("{prefix}-{i:04}"))
                .build()
        })
        .filter(|e| hub.partition_of(e.partition_key()) == partition)
        .collect()
}

/// Cumulative acks on one partition, with an ack wait long enough that nothing comes back by
/// it during a test: what comes back comes from the subscription's own doing.
fn cumulative_on(partition: u32) -> SubscriptionOptions {
    SubscriptionOptions {
        partitions: Partitions::Only(vec![partition]),
        acks: Acks::Cumulative,
        ack_wait: Duration::from_secs(60),
        ..Default::default()
    }
}

/// The ids of `events`, in order.
fn ids(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.id().to_owned()).collect()
}

/// The ids of `runs` of events, one run after the other.
fn ids_of(runs: &[&[Event]]) -> Vec<String> {
    runs.iter().flat_map(|run| ids(run)).collect()
}

/// Runs a processor over a subscription until `done` says so (or 60 s pass), then waits for
/// the subscription to let go of what is left.
async fn run_until<F>(processor: &Processor, sub: NatsSubscription, done: F) -> RunReport
where
    F: Fn() -> bool + Send + 'static,
{
    let closed = sub.closed();
    let (reader, checkpointer) = sub.split();
    let stop = async move {
        while !done() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        processor.run(reader, checkpointer, stop),
    )
    .await
    .expect("the processor finished within 60 s")
    .expect("the processor ran");
    tokio::time::timeout(Duration::from_secs(10), closed)
        .await
        .expect("the subscription closed");
    report
}

/// Runs a processor over a bounded subscription until it ends.
async fn run_to_end(processor: &Processor, sub: NatsSubscription) {
    let (reader, checkpointer) = sub.split();
    processor
        .run(reader, checkpointer, std::future::pending())
        .await
        .unwrap();
}

/// A processor of one pipeline that keeps what it gets.
fn collecting(name: &str) -> (Processor, MemorySink) {
    let sink = MemorySink::new();
    let processor = Processor::builder(name)
        .fault_sink(MemoryFaultSink::new())
        .pipeline(into(sink.clone()))
        .build()
        .unwrap();
    (processor, sink)
}

/// Every event of a bounded read of the hub (a transient reader).
async fn read_all(hub: &NatsHub, partitions: Partitions) -> Vec<Event> {
    let sink = MemorySink::new();
    let processor = Processor::builder("reader")
        .fault_sink(MemoryFaultSink::new())
        .pipeline(Pipeline::builder("all").sink(sink.clone()).unwrap())
        .pipeline(
            Pipeline::builder("faults")
                .event_type(floodway::event::FAULT_EVENT_TYPE)
                .sink(sink.clone())
                .unwrap(),
        )
        .build()
        .unwrap();
    let sub = hub
        .subscribe(
            "reader",
            SubscriptionOptions {
                follow: false,
                transient: true,
                partitions,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    run_to_end(&processor, sub).await;
    sink.events()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_is_partitioned_and_idempotent() {
    let (server, hub) = hub_on_new_server().await;
    let events = generate::orders(400, 1);
    let first = hub.publish(&events).await.unwrap();
    assert_eq!((first.stored, first.duplicates), (400, 0));
    let again = hub.publish(&events[..100]).await.unwrap();
    assert_eq!((again.stored, again.duplicates), (0, 100));

    let stats = hub.stats().await.unwrap();
    assert_eq!(stats.messages, 400);
    assert_eq!(stats.partitions.iter().sum::<u64>(), 400);
    assert!(stats.partitions.iter().all(|n| *n > 0), "{stats:?}");
    for (p, count) in stats.partitions.iter().enumerate() {
        let expected = events
            .iter()
            .filter(|e| hub.partition_of(e.partition_key()) == p as u32)
            .count() as u64;
        assert_eq!(*count, expected, "partition {p}");
    }
    // Every event comes back byte for byte, and each key from one partition only.
    let read = read_all(&hub, Partitions::All).await;
    assert_eq!(read.len(), 400);
    let by_id: HashMap<&str, &Event> = events.iter().map(|e| (e.id(), e)).collect();
    for e in &read {
        assert_eq!(e.to_json(), by_id[e.id()].to_json());
    }

    // A second client agrees on the partitions; a conflicting setting is refused, by name.
    let mut other = options(vec![server.url()]);
    other.partitions = None;
    assert_eq!(NatsHub::connect(&other).await.unwrap().partitions(), 4);
    other.partitions = Some(6);
    let err = NatsHub::connect(&other).await.unwrap_err().to_string();
    assert!(err.contains("has 4 partitions"), "{err}");
}

/// One call with more distinct keys than the client lets acks wait (5,000 by default): it
/// holds that many unawaited and would then wait for a free slot for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_of_more_keys_than_acks_may_wait_finishes() {
    let (_server, hub) = hub_on_new_server().await;
    let events: Vec<Event> = (0..6_000)
        .map(|i| Event::builder("thing-noted", format!("k-{i}")).build())
        .collect();
    let receipt = tokio::time::timeout(Duration::from_secs(60), hub.publish(&events))
        .await
        .expect("the publish finishes")
        .unwrap();
    assert_eq!((receipt.stored, receipt.duplicates), (6_000, 0));

    // Eight calls at once, each holding up to 1,024 acks: more than the connection lets wait.
    // None hangs: a call that finds them all taken fails (a throttle: the connection is
    // busy), and its retry stores what it has to.
    let batches: Vec<Vec<Event>> = (0..8)
        .map(|b| {
            (0..1_500)
                .map(|i| Event::builder("thing-noted", format!("b{b}-{i}")).build())
                .collect()
        })
        .collect();
    let calls = batches.iter().map(|batch| {
        let hub = hub.clone();
        async move {
            for _ in 0..50 {
                match hub.publish(batch).await {
                    Ok(receipt) => return receipt.stored + receipt.duplicates,
                    Err(err) => {
                        assert!(Error::from(err).is_throttle());
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            panic!("never published");
        }
    });
    let published = tokio::time::timeout(
        Duration::from_secs(60),
        futures_util::future::join_all(calls),
    )
    .await
    .expect("no publish hangs");
    assert_eq!(published.iter().sum::<usize>(), 8 * 1_500);
}

/// Publishes finding every ack the connection lets wait taken (a slow link: acks come late)
/// fail as throttles, held rather than faulted, and go through when tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_finding_every_ack_taken_is_a_throttle() {
    let server = NatsServer::start();
    let proxy = floodway_nats::testing::Proxy::start(server.port()).await;
    let hub = NatsHub::connect(&options(vec![proxy.url()])).await.unwrap();
    proxy.set_delay(Duration::from_millis(20));
    let batches: Vec<Vec<Event>> = (0..6)
        .map(|b| {
            (0..1_024)
                .map(|i| Event::builder("thing-noted", format!("b{b}-{i}")).build())
                .collect()
        })
        .collect();
    let busy = Arc::new(AtomicUsize::new(0));
    let calls = batches.iter().map(|batch| {
        let (hub, busy) = (hub.clone(), busy.clone());
        async move {
            loop {
                match hub.publish(batch).await {
                    Ok(receipt) => return receipt.stored + receipt.duplicates,
                    Err(err) => {
                        let err = Error::from(err);
                        assert!(err.is_throttle(), "{err}");
                        busy.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50 + fastrand::u64(..200))).await;
                    }
                }
            }
        }
    });
    let published = tokio::time::timeout(
        Duration::from_secs(120),
        futures_util::future::join_all(calls),
    )
    .await
    .expect("no publish hangs");
    assert_eq!(published.iter().sum::<usize>(), 6 * 1_024);
    assert!(
        busy.load(Ordering::SeqCst) > 0,
        "no call found the acks taken"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_classes_end_to_end() {
    let (_server, hub) = hub_on_new_server().await;
    let events = generate::orders(300, 2);
    hub.publish(&events).await.unwrap();
    // Two messages that are not envelopes at all, from some other client.
    for (i, body) in ["not json", r#"{"no":"envelope"}"#].iter().enumerate() {
        hub.client()
            .publish(format!("orders.{i}"), body.as_bytes().to_vec().into())
            .await
            .unwrap();
    }
    hub.client().flush().await.unwrap();

    // The sink fails every 7th call transiently (retried in place) and rejects orders with a
    // total divisible by 10 as poison.
    let sink = ScriptedSink::new(|call| {
        if call.number % 7 == 0 {
            return Err(Error::transient_msg("Unavailable", "try again"));
        }
        match call
            .batch
            .events()
            .find_map(|e| e.field("order").and_then(|o| o["total"].as_u64()))
        {
            Some(t) if t % 10 == 0 => Err(Error::poison_msg("Rejected", format!("total {t}"))),
            _ => Ok(()),
        }
    });
    let poison = events
        .iter()
        .filter(|e| {
            e.field("order")
                .and_then(|o| o["total"].as_u64())
                .is_some_and(|t| t % 10 == 0)
        })
        .count();
    let processor = hub_processor(
        &hub,
        "shop",
        Pipeline::builder("notify").sink(sink.clone()).unwrap(),
    );
    let sub = hub
        .subscribe("shop", SubscriptionOptions::default())
        .await
        .unwrap();
    let delivered = sink.delivered().clone();
    let expected_ok = events.len() - poison;
    let report = run_until(&processor, sub, move || delivered.len() >= expected_ok).await;
    assert!(sink.failures() > 0);
    assert_eq!(report.faults(), (poison + 2) as u64, "{report:?}");

    // Every fault is on the fault subject: the poison orders and the two foreign messages.
    let faults = read_all(&hub, Partitions::Faults).await;
    assert_eq!(faults.len(), poison + 2);
    assert!(faults.iter().all(Event::is_fault));

    // Everything was acked or terminated: nothing pending, nothing waiting for an ack, and
    // no message was redelivered (poison is terminated, transient failures retried in place).
    let shop = subscription_stats(&hub, "shop").await;
    assert_eq!(shop.consumers, 4);
    assert_eq!(
        (shop.pending, shop.ack_pending, shop.redelivered),
        (0, 0, 0)
    );
}

/// When each partition's consumer was made, by partition.
async fn consumers_made(hub: &NatsHub, name: &str) -> Vec<time::OffsetDateTime> {
    let js = async_nats::jetstream::new(hub.client().clone());
    let stream = js.get_stream(hub.stream()).await.unwrap();
    let mut made = Vec::new();
    for p in 0..hub.partitions() {
        let mut consumer: async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer(&format!("{name}_{p}")).await.unwrap();
        made.push(consumer.info().await.unwrap().created);
    }
    made
}

/// When consumer `name` was made.
async fn consumer_made(hub: &NatsHub, name: &str) -> time::OffsetDateTime {
    let js = async_nats::jetstream::new(hub.client().clone());
    let stream = js.get_stream(hub.stream()).await.unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer(name).await.unwrap();
    consumer.info().await.unwrap().created
}

/// Two instances given the same partitions (exclusive sharing, a rolling deploy) share each
/// partition's consumer: the second to subscribe finds messages the first holds
/// unacknowledged and, the first pulling still, leaves the consumer as it is instead of
/// starting it over at its ack floor, which would take it from under the first and deliver
/// what the first holds a second time. (Found by the conformance scenario of two readers at
/// once, which delivered one partition twice in about one run in ten on a busy machine.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_leaves_a_consumer_another_is_reading_as_it_is() {
    let (_server, hub) = hub_on_new_server().await;
    hub.publish(&generate::orders(40, 5)).await.unwrap();
    let (processor, hung) = hanging_processor(&hub, "twin", |_| true);
    let sub = subscribe_with_ack_wait(&hub, "twin", Duration::from_secs(60)).await;
    let closed = sub.closed();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let first = tokio::spawn(async move {
        let (reader, checkpointer) = sub.split();
        let stopped = async move {
            let _ = stopped.await;
        };
        processor.run(reader, checkpointer, stopped).await
    });
    retry(
        "the first instance holds records",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || {
            let hung = hung.load(Ordering::SeqCst);
            async move {
                if hung > 0 {
                    Ok(())
                } else {
                    Err("not yet")
                }
            }
        },
    )
    .await;
    let held = subscription_stats(&hub, "twin").await.ack_pending;
    assert!(held > 0, "the first instance holds records unacknowledged");
    let made = consumers_made(&hub, "twin").await;

    let second = subscribe_with_ack_wait(&hub, "twin", Duration::from_secs(60)).await;
    assert_eq!(
        consumers_made(&hub, "twin").await,
        made,
        "no consumer was made again under the first instance"
    );
    drop(second);
    let _ = stop.send(());
    first.await.unwrap().unwrap();
    tokio::time::timeout(Duration::from_secs(10), closed)
        .await
        .expect("the first subscription closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_records_come_back_at_once_not_after_the_ack_wait() {
    let (_server, hub) = hub_on_new_server().await;
    hub.publish(&generate::orders(20, 3)).await.unwrap();
    let opts = SubscriptionOptions {
        ack_wait: Duration::from_secs(60),
        nak_delay: Duration::from_millis(300),
        ..Default::default()
    };

    // A sink that never answers: at shutdown nothing is finished.
    let (processor, started) = hanging_processor(&hub, "slow", |_| true);
    let sub = hub.subscribe("slow", opts.clone()).await.unwrap();
    let first = run_until(&processor, sub, move || started.load(Ordering::SeqCst) > 0).await;
    assert_eq!(first.faults(), 0);

    // The next run gets all 20 again, long before the ack wait.
    let sink = MemorySink::new();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let pipeline = {
        let attempts = attempts.clone();
        Pipeline::builder("p")
            .map(move |uow| {
                attempts.lock().unwrap().push(uow.record().attempt);
                Ok(uow)
            })
            .sink(sink.clone())
            .unwrap()
    };
    let processor = hub_processor(&hub, "slow", pipeline);
    let began = Instant::now();
    let sub = hub.subscribe("slow", opts).await.unwrap();
    let delivered = sink.clone();
    run_until(&processor, sub, move || delivered.len() >= 20).await;
    assert!(
        began.elapsed() < Duration::from_secs(30),
        "redelivered after {:?}: the nak did not take",
        began.elapsed()
    );
    // The new owner started the consumer over at its first unacknowledged message (per-key
    // order), so they come as fresh deliveries: the stopped owner's pull requests did not
    // pass for a live reader's.
    assert_eq!(*attempts.lock().unwrap(), vec![1; 20]);
}

/// Events `seq` 0.. per key, to check order; the processing instance is remembered per event.
fn sequenced(keys: usize, per_key: usize) -> Vec<Event> {
    let mut events = Vec::new();
    for s in 0..per_key {
        for k in 0..keys {
            events.push(
                Event::builder("step", format!("k-{k}"))
                    .id(format!("k-{k}-{s}"))
                    .field("seq", s)
                    .build(),
            );
        }
    }
    events
}

type Seen = Arc<Mutex<BTreeMap<String, Vec<(u64, usize)>>>>;

fn recording_processor(hub: &NatsHub, instance: usize, seen: &Seen) -> Processor {
    let seen = seen.clone();
    let sink = sink_fn(move |batch: Batch| {
        let seen = seen.clone();
        async move {
            // Take a little time so that work overlaps across keys.
            tokio::time::sleep(Duration::from_millis(1)).await;
            let mut seen = seen.lock().unwrap();
            for e in batch.events() {
                let seq = e.field("seq").and_then(|v| v.as_u64()).unwrap();
                seen.entry(e.partition_key().to_owned())
                    .or_default()
                    .push((seq, instance));
            }
            Ok::<_, Error>(())
        }
    });
    hub_processor(
        hub,
        "steps",
        Pipeline::builder("p").parallelism(16).sink(sink).unwrap(),
    )
}

fn check_order(seen: &Seen, keys: usize, per_key: usize) {
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), keys);
    for (key, steps) in seen.iter() {
        let seqs: Vec<u64> = steps.iter().map(|(s, _)| *s).collect();
        let mut dedup = seqs.clone();
        dedup.dedup();
        assert_eq!(
            dedup,
            (0..per_key as u64).collect::<Vec<_>>(),
            "key {key} out of order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_with_static_assignment_keep_per_key_order() {
    let (_server, hub) = hub_on_new_server().await;
    let (keys, per_key) = (40, 25);
    hub.publish(&sequenced(keys, per_key)).await.unwrap();
    let seen: Seen = Arc::default();
    let mut runs = Vec::new();
    for instance in 0..2u32 {
        let hub = hub.clone();
        let seen = seen.clone();
        runs.push(tokio::spawn(async move {
            let processor = recording_processor(&hub, instance as usize, &seen);
            let sub = hub
                .subscribe(
                    "steps",
                    SubscriptionOptions {
                        partitions: Partitions::instance(instance, 2, hub.partitions()),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            let done = seen.clone();
            run_until(&processor, sub, move || {
                done.lock().unwrap().values().map(Vec::len).sum::<usize>() >= keys * per_key
            })
            .await
        }));
    }
    for run in runs {
        run.await.unwrap();
    }
    check_order(&seen, keys, per_key);
    // Each key was handled by one instance, and both instances worked.
    let seen = seen.lock().unwrap();
    let mut instances = HashSet::new();
    for steps in seen.values() {
        let owners: HashSet<usize> = steps.iter().map(|(_, i)| *i).collect();
        assert_eq!(owners.len(), 1);
        instances.extend(owners);
    }
    assert_eq!(instances.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_sharing_fails_over_to_the_standby_instance() {
    let (_server, hub) = hub_on_new_server().await;
    let (keys, per_key) = (20, 10);
    let events = sequenced(keys, per_key);
    let half = events.len() / 2;
    hub.publish(&events[..half]).await.unwrap();
    let pinned = SubscriptionOptions {
        sharing: Sharing::Pinned {
            ttl: Duration::from_secs(2),
        },
        // A record caught in the handover comes back after this.
        ack_wait: Duration::from_secs(3),
        ..Default::default()
    };
    let seen: Seen = Arc::default();
    let count = {
        let seen = seen.clone();
        move || seen.lock().unwrap().values().map(Vec::len).sum::<usize>()
    };

    // Instance 0 takes the pins and the first half, then stops.
    let first = recording_processor(&hub, 0, &seen);
    let sub = hub.subscribe("steps", pinned.clone()).await.unwrap();
    let c = count.clone();
    run_until(&first, sub, move || c() >= half).await;

    // Instance 1 stood by; once the pins expire it takes over and does the rest.
    hub.publish(&events[half..]).await.unwrap();
    let second = recording_processor(&hub, 1, &seen);
    let seen2 = seen.clone();
    let sub = hub.subscribe("steps", pinned).await.unwrap();
    let c = count.clone();
    run_until(&second, sub, move || {
        c() >= keys * per_key && complete(&seen2, keys, per_key)
    })
    .await;
    // Nothing lost; the first instance kept per-key order; the standby did the rest. Around
    // the handover a record may come back after later ones (ARCHITECTURE.md).
    assert!(complete(&seen, keys, per_key));
    let seen = seen.lock().unwrap();
    for steps in seen.values() {
        let first: Vec<u64> = steps
            .iter()
            .filter(|(_, i)| *i == 0)
            .map(|(s, _)| *s)
            .collect();
        assert!(first.windows(2).all(|w| w[0] < w[1]), "{first:?}");
        assert!(steps.iter().any(|(_, i)| *i == 1), "the standby took over");
    }
}

/// A pinned reader whose pull ended (its heartbeats missed while the connection stalled)
/// asks again with its pin: the server passes over a request without it while the pin
/// stands, so the partition stood still until the pin's time to live ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_reader_keeps_its_pin_from_one_pull_to_the_next() {
    let server = NatsServer::start();
    let proxy = Arc::new(floodway_nats::testing::Proxy::start(server.port()).await);
    let hub = NatsHub::connect(&options(vec![proxy.url()])).await.unwrap();
    let pinned = SubscriptionOptions {
        sharing: Sharing::Pinned {
            ttl: Duration::from_secs(20),
        },
        ..Default::default()
    };
    let (processor, sink) = collecting("pinned");
    let sub = hub.subscribe("pinned", pinned).await.unwrap();
    let late = Arc::new(Mutex::new(None::<Duration>));
    let dance = {
        let (hub, proxy, sink, late) = (hub.clone(), proxy.clone(), sink.clone(), late.clone());
        tokio::spawn(async move {
            let has = |id: &str| sink.events().iter().any(|e| e.id() == id);
            let wait_for = |id: &'static str| {
                let has = &has;
                async move {
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while !has(id) && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            };
            let event = |id: &str| Event::builder("step", "pinned-key").id(id).build();
            hub.publish(&[event("before")]).await.unwrap();
            wait_for("before").await;
            // The connection stalls past two heartbeats (1.25 s apart): the pull ends, and a
            // new one starts.
            proxy.set_delay(Duration::from_secs(4));
            tokio::time::sleep(Duration::from_millis(4500)).await;
            proxy.set_delay(Duration::ZERO);
            tokio::time::sleep(Duration::from_millis(500)).await;
            let published = Instant::now();
            // Its ack may come late, behind what the stall held back: tried again, a
            // repeat is stored once.
            let after = [event("after")];
            retry(
                "publishing",
                Duration::from_secs(30),
                Duration::from_millis(100),
                || hub.publish(&after),
            )
            .await;
            wait_for("after").await;
            *late.lock().unwrap() = Some(published.elapsed());
        })
    };
    let done = late.clone();
    run_until(&processor, sub, move || done.lock().unwrap().is_some()).await;
    dance.await.unwrap();
    let late = late.lock().unwrap().unwrap();
    assert!(
        late < Duration::from_secs(10),
        "the next record came {late:?} after it was published (the pin's time to live is 20 s)"
    );
}

/// A transient read (a replay, `hub tail`) takes no acks, so the server forgets what it sent:
/// a delivery lost on the way is noticed by its consumer sequence, and the read goes on from
/// it with a consumer made again, not without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_read_gets_a_delivery_lost_on_the_way() {
    let server = NatsServer::start();
    let proxy = floodway_nats::testing::Proxy::start(server.port()).await;
    let hub = NatsHub::connect(&options(vec![proxy.url()])).await.unwrap();
    let partition = hub.partition_of("k0");
    let events = of_partition(&hub, partition, "lost", 0..1_600);
    hub.publish(&events).await.unwrap();
    proxy.drop_next_delivery_containing(events[events.len() / 2].id().as_bytes());
    let read = read_all(&hub, Partitions::All).await;
    assert_eq!(proxy.dropped(), 1);
    let ids: HashSet<&str> = read.iter().map(Event::id).collect();
    let missing: Vec<&str> = events
        .iter()
        .map(Event::id)
        .filter(|id| !ids.contains(id))
        .collect();
    assert!(missing.is_empty(), "never read: {missing:?}");
}

/// Whether every key has every step.
fn complete(seen: &Seen, keys: usize, per_key: usize) -> bool {
    let seen = seen.lock().unwrap();
    seen.len() == keys
        && seen.values().all(|steps| {
            let got: HashSet<u64> = steps.iter().map(|(s, _)| *s).collect();
            got.len() == per_key
        })
}

/// Publishes `events` in batches, retrying a batch until the hub takes it.
async fn publish_through_faults(hub: &NatsHub, events: &[Event]) {
    for chunk in events.chunks(100) {
        let (patience, pause) = (Duration::from_secs(60), Duration::from_millis(100));
        retry("publishing", patience, pause, || hub.publish(chunk)).await;
    }
}

type View = Arc<Mutex<MemoryView<String>>>;
type Deliveries = Arc<Mutex<HashMap<String, usize>>>;

/// A processor keeping the latest event id per key in a latest-wins view, counting the
/// deliveries of each event.
fn view_processor(hub: &NatsHub, view: &View, deliveries: &Deliveries) -> Processor {
    let (view, deliveries) = (view.clone(), deliveries.clone());
    let sink = sink_fn(move |batch: Batch| {
        let (view, deliveries) = (view.clone(), deliveries.clone());
        async move {
            let mut view = view.lock().unwrap();
            let mut deliveries = deliveries.lock().unwrap();
            for e in batch.events() {
                view.apply(e.partition_key(), Version::of(e), e.id().to_owned());
                *deliveries.entry(e.id().to_owned()).or_default() += 1;
            }
            Ok::<_, Error>(())
        }
    });
    hub_processor(hub, "view", into(sink))
}

fn ticks(n: i64, keys: i64) -> Vec<Event> {
    (0..n)
        .map(|i| {
            Event::builder("tick", format!("k-{}", i % keys))
                .id(format!("t-{i}"))
                .timestamp(1_700_000_000_000 + i)
                .build()
        })
        .collect()
}

/// Nothing lost (every event delivered) and the view is the latest event per key.
fn check_view(events: &[Event], view: &View, deliveries: &Deliveries) {
    let deliveries = deliveries.lock().unwrap();
    assert!(
        events.iter().all(|e| deliveries.contains_key(e.id())),
        "every event delivered"
    );
    let mut latest: HashMap<&str, &str> = HashMap::new();
    for e in events {
        latest.insert(e.partition_key(), e.id());
    }
    let view = view.lock().unwrap();
    assert_eq!(view.len(), latest.len());
    for (key, id) in latest {
        assert_eq!(view.get(key).unwrap().1, id, "key {key}");
    }
}

/// The hub's stream holds `n` messages: each event stored once.
async fn assert_stored_once_each(hub: &NatsHub, n: u64) {
    assert_eq!(hub.stats().await.unwrap().messages, n, "stored once each");
}

/// Runs the view processor while events are published, killing a server in the middle.
async fn view_through_a_kill(hub: &NatsHub, events: Vec<Event>, acks: Acks, kill: impl FnOnce()) {
    let (view, deliveries): (View, Deliveries) = Default::default();
    let processor = view_processor(hub, &view, &deliveries);
    let options = SubscriptionOptions {
        ack_wait: Duration::from_secs(2),
        acks,
        ..Default::default()
    };
    let sub = hub.subscribe("view", options).await.unwrap();
    let publisher = {
        let hub = hub.clone();
        let events = events.clone();
        tokio::spawn(async move { publish_through_faults(&hub, &events).await })
    };
    let done = deliveries.clone();
    let ids: HashSet<String> = events.iter().map(|e| e.id().to_owned()).collect();
    let run = tokio::spawn(async move {
        run_until(&processor, sub, move || {
            let seen = done.lock().unwrap();
            ids.iter().all(|id| seen.contains_key(id))
        })
        .await
    });
    while deliveries.lock().unwrap().len() < events.len() / 6 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    kill();
    publisher.await.unwrap();
    run.await.unwrap();
    check_view(&events, &view, &deliveries);
}

/// A server killed (SIGKILL) under a subscription acking `acks`, and back on the same port
/// and store after half a second: nothing is lost, nothing stored twice.
async fn server_killed_mid_stream(acks: Acks) {
    let server = Arc::new(Mutex::new(NatsServer::start()));
    let url = server.lock().unwrap().url();
    let hub = NatsHub::connect(&options(vec![url])).await.unwrap();
    let events = ticks(3000, 300);
    let restarted = server.clone();
    view_through_a_kill(&hub, events, acks, move || {
        restarted.lock().unwrap().kill();
        std::thread::sleep(Duration::from_millis(500));
        restarted.lock().unwrap().restart();
    })
    .await;
    assert_stored_once_each(&hub, 3000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_stream_loses_nothing() {
    server_killed_mid_stream(Acks::Each).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_stream_loses_nothing_with_cumulative_acks() {
    server_killed_mid_stream(Acks::Cumulative).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_killed_mid_stream_loses_nothing() {
    let mut cluster = NatsCluster::start(3);
    let mut opts = options(cluster.urls());
    opts.replicas = Some(3);
    // The cluster needs a moment to elect its meta leader.
    let (patience, pause) = (Duration::from_secs(30), Duration::from_millis(200));
    let hub = retry("the cluster", patience, pause, || NatsHub::connect(&opts)).await;
    assert_eq!(hub.stats().await.unwrap().replicas, 3);
    // Kill the first node (the one the client most likely talks to) for good.
    view_through_a_kill(&hub, ticks(2000, 200), Acks::Each, || {
        cluster.nodes[0].kill();
    })
    .await;
    // The cluster may still be moving leaders: ask until it answers.
    let stats = retry("the cluster", patience, pause, || hub.stats()).await;
    assert_eq!(stats.messages, 2000, "stored once each");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_at_the_end_or_a_time() {
    let (_server, hub) = hub_on_new_server().await;
    let old = generate::orders(40, 4);
    hub.publish(&old).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cut = floodway::event::now_millis();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let new = generate::orders(40, 5);

    let from_end = hub
        .subscribe(
            "late",
            SubscriptionOptions {
                start: StartAt::End,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    hub.publish(&new).await.unwrap();
    let (processor, sink) = collecting("late");
    let delivered = sink.clone();
    run_until(&processor, from_end, move || delivered.len() >= 40).await;
    let ids: HashSet<String> = ids(&sink.events()).into_iter().collect();
    assert!(new.iter().all(|e| ids.contains(e.id())));
    assert_eq!(ids.len(), 40);

    let (processor, sink) = collecting("timed");
    let sub = hub
        .subscribe(
            "timed",
            SubscriptionOptions {
                start: StartAt::Time(cut),
                follow: false,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    run_to_end(&processor, sub).await;
    assert_eq!(sink.len(), 40);
}

/// A slow server, then every connection cut twice, under a subscription acking `acks`:
/// nothing is lost, nothing stored twice.
async fn network_drops_and_a_slow_server(acks: Acks) {
    let server = NatsServer::start();
    let proxy = floodway_nats::testing::Proxy::start(server.port()).await;
    let hub = NatsHub::connect(&options(vec![proxy.url()])).await.unwrap();
    let proxy = Arc::new(proxy);
    let trouble = proxy.clone();
    view_through_a_kill(&hub, ticks(3000, 300), acks, move || {
        // Slow: every chunk of traffic waits 100 ms, for a second.
        trouble.set_delay(Duration::from_millis(100));
        std::thread::sleep(Duration::from_secs(1));
        trouble.set_delay(Duration::ZERO);
        // Dropped: every connection cut, twice.
        trouble.cut();
        std::thread::sleep(Duration::from_millis(300));
        trouble.cut();
    })
    .await;
    assert_stored_once_each(&hub, 3000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_drops_and_a_slow_server_are_survived() {
    network_drops_and_a_slow_server(Acks::Each).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_drops_and_a_slow_server_are_survived_with_cumulative_acks() {
    network_drops_and_a_slow_server(Acks::Cumulative).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_holds_records_with_in_progress_acks_and_faults_nothing() {
    let (_server, hub) = hub_on_new_server().await;
    hub.publish(&generate::orders(200, 6)).await.unwrap();
    // The target is down for the first 3 s: three times the ack wait.
    let sink = ScriptedSink::new(|call| {
        if call.elapsed < Duration::from_secs(3) {
            Err(Error::transient_msg("ConnectionRefused", "down"))
        } else {
            Ok(())
        }
    });
    let processor = hub_processor(&hub, "held", into(sink.clone()));
    let sub = subscribe_with_ack_wait(&hub, "held", Duration::from_secs(1)).await;
    let delivered = sink.delivered().clone();
    let report = run_until(&processor, sub, move || delivered.len() >= 200).await;
    assert!(sink.failures() > 0, "the outage was met");
    assert_eq!(report.faults(), 0, "an outage faults nothing");
    let held = subscription_stats(&hub, "held").await;
    assert_eq!(
        (held.pending, held.ack_pending, held.redelivered),
        (0, 0, 0),
        "nothing redelivered: in-progress acks kept the records"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_stop_acks_nothing_unfinished_and_a_restart_resumes() {
    let (_server, hub) = hub_on_new_server().await;
    let mut events = sequenced(4, 5);
    // One event the pipeline rejects: its fault must be stored before it is let go.
    events[7].fields_mut().insert("bad".into(), true.into());
    hub.publish(&events).await.unwrap();
    let opts = SubscriptionOptions {
        nak_delay: Duration::from_millis(100),
        ..Default::default()
    };
    let pipeline = |sink: MemorySink| {
        Pipeline::builder("p")
            .validate(|e| match e.field("bad") {
                Some(_) => Err(Error::poison_msg("Bad", "marked bad")),
                None => Ok(()),
            })
            .sink(sink)
            .unwrap()
    };

    // The fault sink is down: the processor stops (fatal) instead of losing the fault.
    let broken = floodway::fault_sink_fn(|_fault: Event| async {
        Err::<(), _>(Error::transient_msg("Unavailable", "fault store down"))
    });
    let sink = MemorySink::new();
    let processor = Processor::builder("fatal")
        .fault_sink(broken)
        .fault_resilience(floodway::layer::Resilience::none())
        .pipeline(pipeline(sink.clone()))
        .build()
        .unwrap();
    let sub = hub.subscribe("fatal", opts.clone()).await.unwrap();
    let closed = sub.closed();
    let (reader, checkpointer) = sub.split();
    let stopped = tokio::time::timeout(
        Duration::from_secs(60),
        processor.run(reader, checkpointer, std::future::pending()),
    )
    .await
    .expect("stopped within 60 s");
    assert!(stopped.is_err(), "a fault that cannot be stored is fatal");
    closed.await;

    // A restart with the fault sink back: what the first run did not finish comes back; the
    // bad event is faulted once, and every other event has reached the sink.
    let faults = MemoryFaultSink::new();
    let processor = Processor::builder("fatal")
        .fault_sink(faults.clone())
        .pipeline(pipeline(sink.clone()))
        .build()
        .unwrap();
    let sub = hub.subscribe("fatal", opts).await.unwrap();
    let (done, seen) = (sink.clone(), faults.clone());
    run_until(&processor, sub, move || {
        seen.faults().len() == 1
            && ids(&done.events())
                .into_iter()
                .collect::<HashSet<_>>()
                .len()
                == 19
    })
    .await;
    assert_eq!(faults.faults().len(), 1);
    assert_eq!(faults.faults()[0].tag("pipeline"), Some("p"));
}

/// A stream's own message limit below the server's (set by hand): an event over it is
/// poison whether the hub read the limit when it connected or learns it from the server's
/// refusal, the headers count (a long id), and a fault that large is stored, trimmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_over_the_streams_own_limit_are_poison() {
    let (server, before) = hub_on_new_server().await;
    let js = async_nats::jetstream::new(before.client().clone());
    let mut stream = js.get_stream("ORDERS").await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    config.max_message_size = 64 * 1024;
    js.update_stream(&config).await.unwrap();
    let after = NatsHub::connect(&options(vec![server.url()]))
        .await
        .unwrap();
    let big = Event::builder("blob", "k")
        .field("data", "x".repeat(100 * 1024))
        .build();
    for hub in [&before, &after] {
        let err = hub.publish(std::slice::from_ref(&big)).await.unwrap_err();
        assert!(
            err.to_string().contains("more than the stream takes"),
            "{err}"
        );
        assert_eq!(Error::from(err).class(), floodway::ErrorClass::Poison);
    }
    // Under the limit alone, over it with its id in the headers.
    let long_id = Event::builder("blob", "k")
        .id("i".repeat(1_000))
        .field("data", "x".repeat(64 * 1024 - 1_400))
        .build();
    assert!(long_id.encoded_len() < 64 * 1024);
    let err = after.publish(&[long_id]).await.unwrap_err();
    assert_eq!(Error::from(err).class(), floodway::ErrorClass::Poison);

    // A step making an event that large: faulted, and the fault stored, trimmed, whether the
    // hub read the limit at connect or learns it from the refusal of the fault itself.
    for (i, hub) in [&after, &before].into_iter().enumerate() {
        let processor = hub_processor(
            hub,
            "grow",
            Pipeline::builder("grow")
                .map(|mut uow| {
                    uow.event_mut()
                        .fields_mut()
                        .insert("data".into(), "x".repeat(100 * 1024).into());
                    Ok(uow)
                })
                .sink(hub.publisher())
                .unwrap(),
        );
        let small = Event::builder("blob", "k").id(format!("small-{i}")).build();
        let record = floodway::Record::new("nats", "0", i as u64 + 1, small.to_json());
        let report = processor.process_batch(vec![record], None).await;
        assert!(report.fatal.is_none(), "{report:?}");
        let faults = read_all(hub, Partitions::Faults).await;
        assert_eq!(faults.len(), i + 1);
        assert!(faults.iter().all(|f| f.encoded_len() < 64 * 1024));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_cannot_work_are_refused_by_name() {
    let (server, hub) = hub_on_new_server().await;

    // An event over the server's max_payload is poison, named with the limit.
    let huge = Event::builder("blob", "k")
        .field("data", "x".repeat(2 << 20))
        .build();
    let err = hub.publish(&[huge]).await.unwrap_err();
    assert!(
        err.to_string().contains("more than the stream takes"),
        "{err}"
    );
    assert_eq!(Error::from(err).class(), floodway::ErrorClass::Poison);

    // A consumer cannot switch between exclusive and pinned sharing in place.
    drop(
        hub.subscribe("shared", SubscriptionOptions::default())
            .await
            .unwrap(),
    );
    let pinned = SubscriptionOptions {
        sharing: Sharing::Pinned {
            ttl: Duration::from_secs(5),
        },
        ..Default::default()
    };
    let err = hub.subscribe("shared", pinned.clone()).await.unwrap_err();
    assert!(err.to_string().contains("another sharing"), "{err}");

    // Nor can instances share a consumer that acks cumulatively (one made by hand).
    let js = async_nats::jetstream::new(hub.client().clone());
    let stream = js.get_stream("ORDERS").await.unwrap();
    for p in 0..4 {
        stream
            .create_consumer(async_nats::jetstream::consumer::pull::Config {
                durable_name: Some(format!("byhand_{p}")),
                filter_subject: hub.partition_subject(p),
                ack_policy: async_nats::jetstream::consumer::AckPolicy::All,
                priority_policy: async_nats::jetstream::consumer::PriorityPolicy::PinnedClient,
                priority_groups: vec!["floodway".into()],
                priority_timeout: Duration::from_secs(5),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let err = hub.subscribe("byhand", pinned.clone()).await.unwrap_err();
    assert!(err.to_string().contains("another ack policy"), "{err}");
    // And pinned sharing cannot ack cumulatively at all.
    let cumulative = SubscriptionOptions {
        acks: Acks::Cumulative,
        ..pinned
    };
    let err = hub.subscribe("other", cumulative).await.unwrap_err();
    assert!(err.to_string().contains("need exclusive sharing"), "{err}");

    // Looking at a stream with default options changes nothing about it.
    let mut strict = options(vec![server.url()]);
    strict.stream = "STRICT".into();
    strict.subject = "strict".into();
    strict.max_age = Some(Duration::from_secs(3600));
    NatsHub::connect(&strict).await.unwrap();
    let looker = NatsHubOptions {
        servers: vec![server.url()],
        stream: "STRICT".into(),
        subject: "strict".into(),
        ..NatsHubOptions::default()
    };
    NatsHub::connect(&looker).await.unwrap();
    let js = async_nats::jetstream::new(hub.client().clone());
    let mut stream = js.get_stream("STRICT").await.unwrap();
    assert_eq!(
        stream.info().await.unwrap().config.max_age,
        Duration::from_secs(3600)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_lost_on_the_way_is_retried_without_breaking_its_keys_order() {
    let server = NatsServer::start();
    let proxy = floodway_nats::testing::Proxy::start(server.port()).await;
    let hub = NatsHub::connect(&options(vec![proxy.url()])).await.unwrap();
    // Four events of key k among events of other keys, published in one pipelined batch; the
    // proxy loses the second of k on its way to the server.
    let mut batch = Vec::new();
    for i in 1..=4 {
        batch.push(
            Event::builder("thing-happened", "k")
                .id(format!("k-e{i}"))
                .field("n", i)
                .build(),
        );
        batch.push(
            Event::builder("thing-happened", format!("other-{i}"))
                .id(format!("other-e{i}"))
                .build(),
        );
    }
    proxy.drop_next_publish_containing(b"\"k-e2\"");
    let first = hub.publish(&batch).await;
    assert_eq!(proxy.dropped(), 1);
    assert!(first.is_err(), "the lost message's ack never came");
    // The retry a sink makes: the whole batch again.
    hub.publish(&batch).await.unwrap();
    let stored = read_all(&hub, Partitions::All).await;
    let k: Vec<&str> = stored
        .iter()
        .filter(|e| e.partition_key() == "k")
        .map(Event::id)
        .collect();
    assert_eq!(
        k,
        ["k-e1", "k-e2", "k-e3", "k-e4"],
        "k's order in the stream"
    );
    assert_eq!(stored.len(), 8, "each stored once");
}

/// Subscription `steps` with a minute's ack wait, left with e2 and e3 of key `k` unfinished
/// by an instance whose sink hung on e2; a newer e4 of the key then published. Its options.
async fn steps_left_unfinished(hub: &NatsHub, acks: Acks) -> SubscriptionOptions {
    let step = |i: u32| {
        Event::builder("step", "k")
            .id(format!("k-e{i}"))
            .field("seq", i)
            .build()
    };
    hub.publish(&[step(1), step(2), step(3)]).await.unwrap();
    let opts = SubscriptionOptions {
        ack_wait: Duration::from_secs(60),
        acks,
        ..Default::default()
    };
    let (processor, blocked) = hanging_processor(hub, "steps", |batch| {
        batch.events().any(|e| e.id() == "k-e2")
    });
    let sub = hub.subscribe("steps", opts.clone()).await.unwrap();
    run_until(&processor, sub, move || blocked.load(Ordering::SeqCst) > 0).await;
    hub.publish(&[step(4)]).await.unwrap();
    opts
}

/// What a new instance of `steps` delivers until e4.
async fn steps_read_to_e4(hub: &NatsHub, opts: SubscriptionOptions) -> Vec<String> {
    let sink = MemorySink::new();
    let processor = hub_processor(hub, "steps", into(sink.clone()));
    let sub = hub.subscribe("steps", opts).await.unwrap();
    let delivered = sink.clone();
    run_until(&processor, sub, move || {
        delivered.events().iter().any(|e| e.id() == "k-e4")
    })
    .await;
    ids(&sink.events())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_instance_keeps_per_key_order_for_what_its_predecessor_left_unfinished() {
    let (_server, hub) = hub_on_new_server().await;
    // The first instance's sink hangs on e2: at its stop, e2 and e3 are unfinished; a newer
    // event of the key arrives, and a new instance starts at once.
    let opts = steps_left_unfinished(&hub, Acks::Auto).await;
    assert_eq!(
        steps_read_to_e4(&hub, opts).await,
        ["k-e2", "k-e3", "k-e4"],
        "the key's order"
    );
}

/// A subscription dropped (a shutdown) while it starts a consumer over at its ack floor, once
/// the consumer is deleted and before it is made again: the consumer is still made again
/// where it stood, not left deleted for the next start to make from the settings' start.
/// With per-record acks the subscription starts it over as it opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_dropped_while_starting_a_consumer_over_loses_no_place() {
    use futures_util::StreamExt;
    let (_server, hub) = hub_on_new_server().await;
    let opts = steps_left_unfinished(&hub, Acks::Each).await;
    // The next start deletes the consumer to make it again at e2; it is dropped the moment
    // the delete goes out.
    let mut deletes = hub
        .client()
        .subscribe("$JS.API.CONSUMER.DELETE.ORDERS.>")
        .await
        .unwrap();
    hub.client().flush().await.unwrap();
    tokio::select! {
        made = hub.subscribe("steps", opts.clone()) => panic!("no delete: {:?}", made.is_ok()),
        _ = deletes.next() => {}
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(steps_read_to_e4(&hub, opts).await, ["k-e2", "k-e3", "k-e4"]);
}

/// The same with cumulative acks, where the partition's reader starts the consumer over once
/// it has found no one reading it for a while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_dropped_while_starting_a_consumer_over_loses_no_place() {
    use futures_util::StreamExt;
    let (_server, hub) = hub_on_new_server().await;
    let opts = steps_left_unfinished(&hub, Acks::Auto).await;
    let mut deletes = hub
        .client()
        .subscribe("$JS.API.CONSUMER.DELETE.ORDERS.>")
        .await
        .unwrap();
    hub.client().flush().await.unwrap();
    let sub = hub.subscribe("steps", opts.clone()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), deletes.next())
        .await
        .expect("the reader starts the consumer over");
    drop(sub);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(steps_read_to_e4(&hub, opts).await, ["k-e2", "k-e3", "k-e4"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_deleted_under_a_reader_is_made_again_where_it_stood() {
    let (_server, hub) = hub_on_new_server().await;
    hub.publish(&generate::orders(10, 1)).await.unwrap();
    // A reader that starts at the end: the 10 events before it are not its business.
    let (processor, sink) = collecting("late");
    let sub = hub
        .subscribe(
            "late",
            SubscriptionOptions {
                start: StartAt::End,
                partitions: Partitions::Only(vec![0, 1, 2, 3]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let delivered = sink.clone();
    let hub2 = hub.clone();
    let run =
        tokio::spawn(
            async move { run_until(&processor, sub, move || delivered.len() >= 20).await },
        );
    // Someone deletes every consumer of the subscription, then 20 events are published
    // before the reader notices.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let js = async_nats::jetstream::new(hub2.client().clone());
    let stream = js.get_stream("ORDERS").await.unwrap();
    for p in 0..4 {
        stream.delete_consumer(&format!("late_{p}")).await.unwrap();
    }
    let later = generate::orders(20, 2);
    hub2.publish(&later).await.unwrap();
    run.await.unwrap();
    let mut got = ids(&sink.events());
    let mut want = ids(&later);
    got.sort();
    want.sort();
    assert_eq!(got, want, "nothing published meanwhile was skipped");
}

/// With exclusive sharing, one ack covers a run of settled records of a partition, and moves
/// the consumer's ack floor past all of them: nothing is left to come again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_are_cumulative_and_leave_nothing_to_come_again() {
    let (_server, hub) = hub_on_new_server().await;
    let n = 2000;
    let events = generate::orders(n, 3);
    hub.publish(&events).await.unwrap();
    // Every ack the subscription sends, seen by a plain subscriber of the ack subjects.
    let acks = Arc::new(AtomicUsize::new(0));
    let mut watch = hub.client().subscribe("$JS.ACK.ORDERS.>").await.unwrap();
    let counted = acks.clone();
    let watcher = tokio::spawn(async move {
        use futures_util::StreamExt;
        while watch.next().await.is_some() {
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });
    let sink = MemorySink::new();
    let processor = Processor::builder("cumulative")
        .fault_sink(MemoryFaultSink::new())
        .pipeline(
            Pipeline::builder("p")
                .batch(floodway::BatchConfig::count(100).max_wait(Duration::from_millis(5)))
                .sink(sink.clone())
                .unwrap(),
        )
        .build()
        .unwrap();
    let sub = hub
        .subscribe(
            "cumulative",
            SubscriptionOptions {
                acks: Acks::Cumulative,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let delivered = sink.clone();
    run_until(&processor, sub, move || delivered.len() >= n).await;
    let mut infos = Vec::new();
    for p in 0..4 {
        infos.push(settled_consumer(&hub, &format!("cumulative_{p}")).await);
    }
    watcher.abort();

    let mut got = ids(&sink.events());
    let mut want = ids(&events);
    got.sort();
    want.sort();
    assert_eq!(got, want, "every event once");
    let acks = acks.load(Ordering::SeqCst);
    assert!(
        acks > 0 && acks <= n / 4,
        "{acks} acks for {n} records: one per run of settled records, not one each"
    );
    for (p, info) in infos.iter().enumerate() {
        assert_eq!(
            info.config.ack_policy,
            async_nats::jetstream::consumer::AckPolicy::All
        );
        assert_eq!(
            info.num_ack_pending, 0,
            "partition {p}: nothing left unacked"
        );
        assert_eq!(info.num_redelivered, 0, "partition {p}: nothing came again");
        assert_eq!(
            info.ack_floor.stream_sequence, info.delivered.stream_sequence,
            "partition {p}: the floor is at the last record delivered"
        );
    }
}

/// A record held unfinished while the reader finds its consumer again (the server restarted
/// under it) is still held: the cumulative acks of the records settled after it stop below
/// it, and the next instance gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_held_through_a_server_restart_is_not_passed_by_an_ack() {
    let mut server = NatsServer::start();
    let hub = NatsHub::connect(&options(vec![server.url()]))
        .await
        .unwrap();
    let partition = hub.partition_of("held");
    hub.publish(&[Event::builder("step", "held").id("held-1").build()])
        .await
        .unwrap();
    hub.publish(&of_partition(&hub, partition, "later", 0..200))
        .await
        .unwrap();
    let options = cumulative_on(partition);
    let (processor, hung) = hanging_processor(&hub, "held", |batch| {
        batch.events().any(|e| e.id() == "held-1")
    });
    let sub = hub.subscribe("held", options.clone()).await.unwrap();
    let stop = Arc::new(AtomicUsize::new(0));
    let stopped = stop.clone();
    let run = tokio::spawn(async move {
        run_until(&processor, sub, move || stopped.load(Ordering::SeqCst) > 0).await
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while hung.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the first record never reached the sink"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Down long enough for the pull's heartbeats to be missed: the reader pulls anew.
    server.kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    server.restart();
    // More of the partition, settled after the restart.
    let more = of_partition(&hub, partition, "later", 200..400);
    let (patience, pause) = (Duration::from_secs(30), Duration::from_millis(200));
    retry("publishing after the restart", patience, pause, || {
        hub.publish(&more)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(1, Ordering::SeqCst);
    run.await.unwrap();

    let (processor, sink) = collecting("held");
    let sub = hub.subscribe("held", options).await.unwrap();
    let delivered = sink.clone();
    run_until(&processor, sub, move || {
        delivered.events().iter().any(|e| e.id() == "held-1")
    })
    .await;
}

/// A delivery lost between the server and the reader (the server counts it delivered) leaves
/// a gap in the consumer's delivery sequence: the reader makes its consumer again where it
/// stands, so the cumulative acks of the records after it do not cover it, and it comes
/// again at once rather than after the ack wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_lost_on_the_way_is_not_covered_by_an_ack() {
    let server = NatsServer::start();
    let proxy = floodway_nats::testing::Proxy::start(server.port()).await;
    let hub = NatsHub::connect(&options(vec![proxy.url()])).await.unwrap();
    let partition = hub.partition_of("k0");
    let events = of_partition(&hub, partition, "d", 0..400);
    hub.publish(&events).await.unwrap();
    let lost = events[events.len() / 3].id().to_owned();
    proxy.drop_next_delivery_containing(lost.as_bytes());
    let (processor, sink) = collecting("lossy");
    let sub = hub
        .subscribe("lossy", cumulative_on(partition))
        .await
        .unwrap();
    let closed = sub.closed();
    let (reader, checkpointer) = sub.split();
    let delivered = sink.clone();
    let want: HashSet<String> = ids(&events).into_iter().collect();
    let stop = async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let got: HashSet<String> = ids(&delivered.events()).into_iter().collect();
            if want.is_subset(&got) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    processor.run(reader, checkpointer, stop).await.unwrap();
    closed.await;
    assert_eq!(
        proxy.dropped(),
        1,
        "the delivery of {lost} was lost on the way"
    );
    let got: HashSet<String> = ids(&sink.events()).into_iter().collect();
    let missing: Vec<String> = ids(&events)
        .into_iter()
        .filter(|id| !got.contains(id))
        .collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
}

/// A record the processor holds while the consumer is made again twice in a row (two lost
/// deliveries, the second its own redelivery) is not passed: the second start is where the
/// first one stood, not after the last record read, so it comes again, and the next instance
/// gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_record_survives_two_restarts_of_its_consumer_in_a_row() {
    let server = NatsServer::start();
    let proxy = floodway_nats::testing::Proxy::start(server.port()).await;
    let hub = NatsHub::connect(&options(vec![proxy.url()])).await.unwrap();
    let partition = hub.partition_of("held");
    let later = of_partition(&hub, partition, "later", 0..400);
    hub.publish(&[Event::builder("step", "held").id("held-x").build()])
        .await
        .unwrap();
    hub.publish(&later).await.unwrap();
    // A later record's delivery is lost, then the held record's redelivery.
    proxy.drop_next_delivery_containing(later[later.len() / 2].id().as_bytes());
    proxy.drop_delivery_containing(b"held-x", 1);
    let options = cumulative_on(partition);
    let (processor, hung) = hanging_processor(&hub, "twice", |batch| {
        batch.events().any(|e| e.id() == "held-x")
    });
    let sub = hub.subscribe("twice", options.clone()).await.unwrap();
    let closed = sub.closed();
    let (reader, checkpointer) = sub.split();
    let stop = async {
        let deadline = Instant::now() + Duration::from_secs(20);
        while (proxy.dropped() < 2 || hung.load(Ordering::SeqCst) == 0) && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Both losses happened: the consumer is made again twice, and the records after the
        // held one are delivered, settled and acked meanwhile (its own new copy waits behind
        // the hung one, its key's order).
        tokio::time::sleep(Duration::from_millis(1500)).await;
    };
    processor.run(reader, checkpointer, stop).await.unwrap();
    closed.await;
    assert_eq!(proxy.dropped(), 2, "two deliveries lost on the way");

    let (processor, sink) = collecting("twice");
    let sub = hub.subscribe("twice", options).await.unwrap();
    let closed = sub.closed();
    let (reader, checkpointer) = sub.split();
    let delivered = sink.clone();
    let stop = async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !delivered.events().iter().any(|e| e.id() == "held-x") && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    processor.run(reader, checkpointer, stop).await.unwrap();
    closed.await;
    assert!(
        sink.events().iter().any(|e| e.id() == "held-x"),
        "the held record came to the next instance"
    );
}

/// Consumers acked per record are made again when the settings switch to cumulative acks:
/// one left by an instance that died holding records goes on from its ack floor, so the
/// unacked records come again and nothing before them does; one left with everything acked
/// goes on after its last delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_acked_per_record_are_made_again_to_ack_cumulatively() {
    use futures_util::StreamExt;
    let (_server, hub) = hub_on_new_server().await;
    let events: Vec<Event> = generate::orders(300, 4)
        .into_iter()
        .filter(|e| hub.partition_of(e.partition_key()) < 2)
        .collect();
    hub.publish(&events).await.unwrap();
    let js = async_nats::jetstream::new(hub.client().clone());
    let stream = js.get_stream("ORDERS").await.unwrap();
    // The old instance took ten records of each partition and died, having acked five of
    // partition 0's and all of partition 1's.
    let mut acked = HashSet::new();
    for (p, acks) in [(0u32, 5), (1, 10)] {
        let old = stream
            .create_consumer(async_nats::jetstream::consumer::pull::Config {
                durable_name: Some(format!("migrating_{p}")),
                name: Some(format!("migrating_{p}")),
                filter_subject: hub.partition_subject(p),
                ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: 1000,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut messages = old
            .fetch()
            .max_messages(10)
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .unwrap();
        let mut taken = Vec::new();
        while let Some(m) = messages.next().await {
            taken.push(m.unwrap());
        }
        assert_eq!(taken.len(), 10);
        for m in &taken[..acks] {
            m.double_ack().await.unwrap();
            let event = Event::decode_bytes(m.payload.clone(), 1 << 20).unwrap();
            acked.insert(event.id().to_owned());
        }
    }
    let (processor, sink) = collecting("migrating");
    let sub = hub
        .subscribe(
            "migrating",
            SubscriptionOptions {
                partitions: Partitions::Only(vec![0, 1]),
                acks: Acks::Cumulative,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut want: Vec<String> = ids(&events)
        .into_iter()
        .filter(|id| !acked.contains(id))
        .collect();
    let delivered = sink.clone();
    let total = want.len();
    run_until(&processor, sub, move || delivered.len() >= total).await;
    let mut got = ids(&sink.events());
    got.sort();
    want.sort();
    assert_eq!(got, want, "everything not acked before, once each");
    for p in 0..2 {
        let info = settled_consumer(&hub, &format!("migrating_{p}")).await;
        assert_eq!(
            info.config.ack_policy,
            async_nats::jetstream::consumer::AckPolicy::All,
            "partition {p}"
        );
        assert_eq!(info.num_ack_pending, 0, "partition {p}");
    }
}

/// Calls `check` every 50 ms until it holds, for 20 s at the most.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    retry(
        what,
        Duration::from_secs(20),
        Duration::from_millis(50),
        || {
            let held = check();
            async move {
                if held {
                    Ok(())
                } else {
                    Err("not yet")
                }
            }
        },
    )
    .await;
}

/// With cumulative acks a partition has one reader at a time: a second instance given the
/// same partition (a rolling deploy that starts the new process before the old one stops)
/// reads nothing while the first pulls, and takes over once the first is gone, from the ack
/// floor, so what the first held unacknowledged comes to it. Sharing the consumer, the
/// second's cumulative acks would cover what the first holds, and the first's crash would
/// lose it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_cumulative_acks_a_second_instance_waits_for_the_first_to_go() {
    second_instance_waits(cumulative_on(1)).await;
}

/// The same with a second instance acking per record (its settings changed, or an older
/// release rolled back to): its per-record acks on the first's consumer would be cumulative
/// ones, so it waits too, and then makes the consumer again with its own ack policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_acking_per_record_waits_for_a_cumulative_first() {
    second_instance_waits(SubscriptionOptions {
        acks: Acks::Each,
        ..cumulative_on(1)
    })
    .await;
}

async fn second_instance_waits(second_options: SubscriptionOptions) {
    let server = NatsServer::start();
    let hub = NatsHub::connect(&options(vec![server.url()]))
        .await
        .unwrap();
    let events = of_partition(&hub, 1, "w", 0..80);
    hub.publish(&events).await.unwrap();

    // The first instance, on a connection of its own (its process), holds what it reads.
    let first_hub = NatsHub::connect(&options(vec![server.url()]))
        .await
        .unwrap();
    let (processor, hung) = hanging_processor(&first_hub, "twin", |_| true);
    let sub = first_hub.subscribe("twin", cumulative_on(1)).await.unwrap();
    let first = tokio::spawn(async move {
        let (reader, checkpointer) = sub.split();
        processor
            .run(reader, checkpointer, std::future::pending())
            .await
    });
    eventually("the first instance holds records", || {
        hung.load(Ordering::SeqCst) > 0
    })
    .await;
    let made = consumer_made(&hub, "twin_1").await;

    // The second subscribes, and waits.
    let (second, sink) = collecting("twin");
    let sub = hub.subscribe("twin", second_options).await.unwrap();
    let delivered = sink.clone();
    let n = events.len();
    let run =
        tokio::spawn(async move { run_until(&second, sub, move || delivered.len() >= n).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sink.len(), 0, "nothing read while the first instance pulls");
    assert_eq!(
        consumer_made(&hub, "twin_1").await,
        made,
        "its consumer left as it is"
    );

    // The first instance's process dies, holding records it never settled.
    first.abort();
    let _ = first.await;
    drop(first_hub);
    run.await.unwrap();
    assert_eq!(
        ids(&sink.events()),
        ids(&events),
        "every record once, in order"
    );
    assert_ne!(
        consumer_made(&hub, "twin_1").await,
        made,
        "made again at its ack floor"
    );
    assert_eq!(settled_consumer(&hub, "twin_1").await.num_ack_pending, 0);
}

/// Two instances of a service started at the same moment, acking cumulatively (the default):
/// each finds every consumer with no one reading it, and without more both would read. The
/// partitions' leases let one instance read each partition: every record is delivered once,
/// round after round, and the leases are let go when the instances close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_starting_at_once_read_each_record_once() {
    let server = NatsServer::start();
    let hub = NatsHub::connect(&options(vec![server.url()]))
        .await
        .unwrap();
    let events: Vec<Event> = (0..400)
        .map(|i| {
            Event::builder("step", format!("k{}", i % 40))
                .id(format!("e-{i:04}"))
                .build()
        })
        .collect();
    hub.publish(&events).await.unwrap();
    let twins = [
        NatsHub::connect(&options(vec![server.url()]))
            .await
            .unwrap(),
        NatsHub::connect(&options(vec![server.url()]))
            .await
            .unwrap(),
    ];
    let js = async_nats::jetstream::new(hub.client().clone());
    for round in 0..4 {
        let name = format!("twins{round}");
        let sinks = [MemorySink::new(), MemorySink::new()];
        let (a, b) = tokio::join!(
            twins[0].subscribe(&name, SubscriptionOptions::default()),
            twins[1].subscribe(&name, SubscriptionOptions::default()),
        );
        let runs = [a.unwrap(), b.unwrap()]
            .into_iter()
            .zip(&sinks)
            .map(|(sub, sink)| {
                let processor = Processor::builder(&name)
                    .fault_sink(MemoryFaultSink::new())
                    .pipeline(into(sink.clone()))
                    .build()
                    .unwrap();
                let sinks = sinks.clone();
                tokio::spawn(async move {
                    // Run a while past the last record: a duplicate would come meanwhile.
                    let done = move || sinks.iter().map(MemorySink::len).sum::<usize>() >= 400;
                    let stop = async move {
                        while !done() {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    };
                    let closed = sub.closed();
                    let (reader, checkpointer) = sub.split();
                    processor.run(reader, checkpointer, stop).await.unwrap();
                    closed.await;
                })
            })
            .collect::<Vec<_>>();
        for run in runs {
            tokio::time::timeout(Duration::from_secs(60), run)
                .await
                .expect("both instances finish")
                .unwrap();
        }
        let mut got: Vec<String> = sinks.iter().flat_map(|s| ids(&s.events())).collect();
        got.sort();
        assert_eq!(got, ids(&events), "round {round}: every record once");
        // Each partition read by one of them.
        for partition in 0..4 {
            let readers = sinks
                .iter()
                .filter(|s| {
                    s.events()
                        .iter()
                        .any(|e| hub.partition_of(e.partition_key()) == partition)
                })
                .count();
            assert_eq!(readers, 1, "round {round}: partition {partition}");
        }
        // The leases were let go at close.
        let leases = js.get_key_value("floodway_readers").await.unwrap();
        for partition in 0..4 {
            let entry = leases
                .entry(format!("ORDERS.{name}.{partition}"))
                .await
                .unwrap();
            assert!(
                entry.is_none_or(|e| e.operation != async_nats::jetstream::kv::Operation::Put),
                "round {round}: partition {partition}'s lease let go"
            );
        }
    }
}

/// A reader whose lease another instance took (its own ran out while it could not reach
/// the server) stops reading the partition and acks nothing more of it; once that lease runs
/// out in turn, unwritten, it takes the lease back and reads on, every record in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_whose_lease_another_took_stops_until_it_runs_out() {
    let server = NatsServer::start();
    let hub = NatsHub::connect(&options(vec![server.url()]))
        .await
        .unwrap();
    let first = of_partition(&hub, 1, "a", 0..40);
    hub.publish(&first).await.unwrap();
    let (processor, sink) = collecting("leased");
    let sub = hub.subscribe("leased", cumulative_on(1)).await.unwrap();
    let delivered = sink.clone();
    let later = of_partition(&hub, 1, "b", 40..80);
    let n = first.len() + later.len();
    let run =
        tokio::spawn(async move { run_until(&processor, sub, move || delivered.len() >= n).await });
    eventually("the first records are read", || sink.len() == first.len()).await;
    let floor = settled_consumer(&hub, "leased_1")
        .await
        .ack_floor
        .stream_sequence;

    // Another instance holds the lease now.
    let js = async_nats::jetstream::new(hub.client().clone());
    let leases = js.get_key_value("floodway_readers").await.unwrap();
    let taken = Instant::now();
    leases
        .put("ORDERS.leased.1", "another".into())
        .await
        .unwrap();
    // Past the reader's next renewal, which finds the lease another's.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    hub.publish(&later).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sink.len(), first.len(), "nothing read without the lease");
    let info = hub_consumer_info(&hub, "leased_1").await;
    assert_eq!(info.num_waiting, 0, "no pull request waiting");
    assert_eq!(info.delivered.stream_sequence, floor, "nothing delivered");

    // The other instance's lease runs out unwritten (6 s): the reader takes it back.
    run.await.unwrap();
    assert!(
        taken.elapsed() >= Duration::from_secs(6),
        "not before the other's lease ran out"
    );
    assert_eq!(
        ids(&sink.events()),
        ids_of(&[&first, &later]),
        "every record once, in order"
    );
    assert_eq!(settled_consumer(&hub, "leased_1").await.num_ack_pending, 0);
}

/// A consumer made acking each record on its own (an earlier release's default) keeps doing
/// so under the default settings: switching makes the consumer again, which is safe only with
/// the instances acking per record stopped, so it takes `Acks::Cumulative`. A subscription
/// made anew acks cumulatively.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_acking_per_record_keeps_doing_so_by_default() {
    use async_nats::jetstream::consumer::AckPolicy;
    let (_server, hub) = hub_on_new_server().await;
    let events = of_partition(&hub, 1, "p", 0..40);
    hub.publish(&events).await.unwrap();
    let on_one = |acks| SubscriptionOptions {
        partitions: Partitions::Only(vec![1]),
        follow: false,
        acks,
        ..Default::default()
    };
    let (processor, sink) = collecting("kept");
    run_to_end(
        &processor,
        hub.subscribe("kept", on_one(Acks::Each)).await.unwrap(),
    )
    .await;
    assert_eq!(sink.len(), events.len());
    let more = of_partition(&hub, 1, "q", 40..80);
    hub.publish(&more).await.unwrap();
    run_to_end(
        &processor,
        hub.subscribe("kept", on_one(Acks::Auto)).await.unwrap(),
    )
    .await;
    let policy = hub_consumer_info(&hub, "kept_1").await.config.ack_policy;
    assert_eq!(policy, AckPolicy::Explicit, "kept acking per record");
    run_to_end(
        &processor,
        hub.subscribe("fresh", on_one(Acks::Auto)).await.unwrap(),
    )
    .await;
    let policy = hub_consumer_info(&hub, "fresh_1").await.config.ack_policy;
    assert_eq!(
        policy,
        AckPolicy::All,
        "a new subscription acks cumulatively"
    );
    let expected = ids_of(&[&events, &more, &events, &more]);
    assert_eq!(
        ids(&sink.events()),
        expected,
        "each subscription reads every record once"
    );
}

/// A bucket of leases made with another term (a key that never expired would keep its
/// partition from every reader) is refused by name, and cumulative acks with it; acks per
/// record take no lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_of_leases_with_another_term_is_refused() {
    let (_server, hub) = hub_on_new_server().await;
    let js = async_nats::jetstream::new(hub.client().clone());
    js.create_key_value(async_nats::jetstream::kv::Config {
        bucket: "floodway_readers".into(),
        history: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let refused = hub
        .subscribe("termless", SubscriptionOptions::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("floodway_readers") && refused.contains("nats kv rm"),
        "{refused}"
    );
    let each = SubscriptionOptions {
        acks: Acks::Each,
        ..Default::default()
    };
    hub.subscribe("termless", each).await.unwrap();
}

/// A bounded read waiting for a partition's lease ends once the holder has acked the
/// partition to the read's target, without the lease: two instances of one bounded read that
/// split the partitions between them would otherwise each wait for the other's to close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_read_ends_on_a_partition_another_holds_once_it_is_acked_to_the_end() {
    use async_nats::jetstream::consumer::PullConsumer;
    use futures_util::StreamExt;
    let (_server, hub) = hub_on_new_server().await;
    let zero = of_partition(&hub, 0, "z", 0..60);
    let one = of_partition(&hub, 1, "o", 0..60);
    hub.publish(&zero).await.unwrap();
    hub.publish(&one).await.unwrap();
    // Another instance holds partition 1's lease.
    let js = async_nats::jetstream::new(hub.client().clone());
    drop(
        hub.subscribe("warm", SubscriptionOptions::default())
            .await
            .unwrap(),
    );
    let leases = js.get_key_value("floodway_readers").await.unwrap();
    leases
        .put("ORDERS.bounded.1", "another".into())
        .await
        .unwrap();
    let (processor, sink) = collecting("bounded");
    let bounded = SubscriptionOptions {
        partitions: Partitions::Only(vec![0, 1]),
        follow: false,
        ..Default::default()
    };
    let sub = hub.subscribe("bounded", bounded).await.unwrap();
    let run = tokio::spawn(async move { run_to_end(&processor, sub).await });
    eventually("partition 0 is read", || sink.len() == zero.len()).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(!run.is_finished(), "partition 1 is not read to its end yet");
    // The other instance reads partition 1 to its end and acks it.
    leases
        .put("ORDERS.bounded.1", "another".into())
        .await
        .unwrap();
    let stream = js.get_stream(hub.stream()).await.unwrap();
    let consumer: PullConsumer = stream.get_consumer("bounded_1").await.unwrap();
    let mut got = consumer
        .fetch()
        .max_messages(one.len())
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .unwrap();
    let mut last = None;
    while let Some(message) = got.next().await {
        last = Some(message.unwrap());
    }
    let last = last.expect("partition 1's records");
    last.double_ack().await.unwrap();
    tokio::time::timeout(Duration::from_secs(4), run)
        .await
        .expect("the bounded read ends before the other's lease runs out")
        .unwrap();
    assert_eq!(
        ids(&sink.events()),
        ids(&zero),
        "partition 1 read by the other"
    );
    let entry = leases.entry("ORDERS.bounded.1").await.unwrap().unwrap();
    assert_eq!(&entry.value[..], b"another", "its lease left as it is");
}

/// A late ack of an instance that read the partition before (held in its client through a
/// long outage, and sent once it is back) lands on the consumer made again since under the
/// same name, and moves its ack floor past this reader's deliveries: the server would
/// ignore this reader's acks from then on. The reader sees the floor pass its deliveries and
/// makes the consumer again where it stands; every record is read and acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_of_another_past_the_readers_deliveries_makes_the_consumer_again() {
    let (_server, hub) = hub_on_new_server().await;
    let first = of_partition(&hub, 1, "f", 0..40);
    hub.publish(&first).await.unwrap();
    // A sink that holds every batch until the gate opens.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let got = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = {
        let (gate, got) = (gate.clone(), got.clone());
        sink_fn(move |batch: Batch| {
            let (gate, got) = (gate.clone(), got.clone());
            let ids: Vec<String> = batch.events().map(|e| e.id().to_owned()).collect();
            async move {
                gate.acquire().await.unwrap().forget();
                got.lock().unwrap().extend(ids);
                Ok::<_, Error>(())
            }
        })
    };
    let processor = Processor::builder("foreign")
        .fault_sink(MemoryFaultSink::new())
        .pipeline(into(sink))
        .build()
        .unwrap();
    let sub = hub.subscribe("foreign", cumulative_on(1)).await.unwrap();
    let later = of_partition(&hub, 1, "g", 40..80);
    let n = first.len() + later.len();
    let done = got.clone();
    let run = tokio::spawn(async move {
        run_until(&processor, sub, move || done.lock().unwrap().len() >= n).await
    });
    let holding = retry(
        "the reader holds the first records",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async {
            let info = hub_consumer_info(&hub, "foreign_1").await;
            if info.num_ack_pending == first.len() {
                Ok(info)
            } else {
                Err("not yet")
            }
        },
    )
    .await;
    // The late ack: of a delivery of the consumer that was, far past this one's.
    let ack = format!(
        "$JS.ACK.ORDERS.foreign_1.1.{}.1000000.0.0",
        holding.delivered.stream_sequence
    );
    hub.client().publish(ack, "+ACK".into()).await.unwrap();
    hub.client().flush().await.unwrap();
    retry(
        "the server takes the late ack",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || async {
            let info = hub_consumer_info(&hub, "foreign_1").await;
            if info.ack_floor.consumer_sequence == 1_000_000 {
                Ok(())
            } else {
                Err("not yet")
            }
        },
    )
    .await;
    gate.add_permits(1 << 20);
    retry(
        "the consumer made again",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || async {
            let js = async_nats::jetstream::new(hub.client().clone());
            let stream = js
                .get_stream(hub.stream())
                .await
                .map_err(|e| e.to_string())?;
            let info = stream
                .consumer_info("foreign_1")
                .await
                .map_err(|e| e.to_string())?;
            if info.created == holding.created {
                Err("not yet".to_string())
            } else {
                Ok(())
            }
        },
    )
    .await;
    hub.publish(&later).await.unwrap();
    run.await.unwrap();
    assert_eq!(
        *got.lock().unwrap(),
        ids_of(&[&first, &later]),
        "every record once, in order"
    );
    let settled = settled_consumer(&hub, "foreign_1").await;
    assert_eq!(
        settled.num_ack_pending, 0,
        "this reader's acks are taken again"
    );
    assert!(settled.ack_floor.consumer_sequence < 1_000_000);
}

/// Consumer `name` as the server has it now.
async fn hub_consumer_info(hub: &NatsHub, name: &str) -> async_nats::jetstream::consumer::Info {
    let js = async_nats::jetstream::new(hub.client().clone());
    let stream = js.get_stream(hub.stream()).await.unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer(name).await.unwrap();
    consumer.info().await.unwrap().clone()
}

/// What another instance does to take consumer `name` of `partition` over: deletes it and
/// makes it again from the stream's start, acking cumulatively; returns the new consumer.
async fn made_again_by_another(
    hub: &NatsHub,
    name: &str,
    partition: u32,
) -> async_nats::jetstream::consumer::PullConsumer {
    use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
    let js = async_nats::jetstream::new(hub.client().clone());
    let stream = js.get_stream(hub.stream()).await.unwrap();
    stream.delete_consumer(name).await.unwrap();
    stream
        .create_consumer(pull::Config {
            durable_name: Some(name.into()),
            name: Some(name.into()),
            filter_subject: hub.partition_subject(partition),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::All,
            ack_wait: Duration::from_secs(60),
            max_deliver: -1,
            ..Default::default()
        })
        .await
        .unwrap()
}

/// A reader acking cumulatively whose consumer another instance made again does not read the
/// new one while that instance pulls from it (it would ack past what the other holds): it
/// waits, and once the other is gone makes the consumer again at its ack floor, getting what
/// the other held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_whose_consumer_another_made_again_waits_for_it_to_go() {
    use futures_util::StreamExt;

    let (_server, hub) = hub_on_new_server().await;
    let early = of_partition(&hub, 2, "a", 0..40);
    hub.publish(&early).await.unwrap();
    let (processor, sink) = collecting("taken");
    let sub = hub.subscribe("taken", cumulative_on(2)).await.unwrap();
    let delivered = sink.clone();
    let late = of_partition(&hub, 2, "b", 40..80);
    let n = 2 * early.len() + late.len();
    let run =
        tokio::spawn(async move { run_until(&processor, sub, move || delivered.len() >= n).await });
    let read = sink.clone();
    eventually("the reader has the early events", || {
        read.len() == early.len()
    })
    .await;

    // Another instance makes the consumer again from the start, and reads without acking.
    let other = made_again_by_another(&hub, "taken_2", 2).await;
    let mut messages = other.messages().await.unwrap();
    for _ in 0..early.len() {
        messages.next().await.unwrap().unwrap();
    }
    hub.publish(&late).await.unwrap();
    for _ in 0..late.len() {
        messages.next().await.unwrap().unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        sink.len(),
        early.len(),
        "nothing read from the consumer while the other instance pulls"
    );

    // The other instance stops, leaving everything unacknowledged.
    drop(messages);
    run.await.unwrap();
    assert_eq!(
        ids(&sink.events()),
        ids_of(&[&early, &early, &late]),
        "the early events again, then the late ones, in order"
    );
    assert_eq!(settled_consumer(&hub, "taken_2").await.num_ack_pending, 0);
}

/// A processor stopping with cumulative acks drains what it holds after its reader is gone,
/// and its pull requests with it: another instance may make the consumer again meanwhile.
/// The acks of what it settles then are not sent to the new consumer, where the old one's
/// delivery sequences would move the ack floor past the new reader's own deliveries (and the
/// server would ignore that reader's acks from then on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_reader_does_not_ack_into_a_consumer_made_again() {
    use futures_util::StreamExt;

    let (_server, hub) = hub_on_new_server().await;
    let events = of_partition(&hub, 3, "d", 0..40);
    hub.publish(&events).await.unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let called = Arc::new(AtomicUsize::new(0));
    let sink = {
        let (gate, called) = (gate.clone(), called.clone());
        sink_fn(move |_batch: Batch| {
            let (gate, called) = (gate.clone(), called.clone());
            async move {
                called.fetch_add(1, Ordering::SeqCst);
                let _permit = gate.acquire().await;
                Ok::<_, Error>(())
            }
        })
    };
    let processor = Processor::builder("draining")
        .fault_sink(MemoryFaultSink::new())
        .drain_timeout(Duration::from_secs(30))
        .pipeline(into(sink))
        .build()
        .unwrap();
    let sub = hub.subscribe("draining", cumulative_on(3)).await.unwrap();
    let closed = sub.closed();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(async move {
        let (reader, checkpointer) = sub.split();
        let stopped = async move {
            let _ = stopped.await;
        };
        processor.run(reader, checkpointer, stopped).await
    });
    let seen = called.clone();
    eventually("the sink holds a batch", move || {
        seen.load(Ordering::SeqCst) > 0
    })
    .await;

    // The processor stops: its reader goes, and it drains the batch the sink holds.
    let _ = stop.send(());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Another instance makes the consumer again and reads everything, acking nothing yet.
    let other = made_again_by_another(&hub, "draining_3", 3).await;
    let mut messages = other.messages().await.unwrap();
    for _ in 0..events.len() {
        messages.next().await.unwrap().unwrap();
    }

    // The drained batch settles, and the subscription closes.
    gate.add_permits(1_000);
    run.await.unwrap().unwrap();
    tokio::time::timeout(Duration::from_secs(10), closed)
        .await
        .expect("the subscription closed");
    hub.client().flush().await.unwrap();
    let mut other = other;
    let info = other.info().await.unwrap();
    assert_eq!(
        (info.ack_floor.consumer_sequence, info.num_ack_pending),
        (0, events.len()),
        "no ack of the old consumer's deliveries reached the new one"
    );
}

/// A delivery lost on the way while reading what a partition missed is an error (the caller
/// tries again), not a gap in what it hands back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_lost_while_reading_what_a_partition_missed_is_an_error() {
    let server = NatsServer::start();
    let proxy = floodway_nats::testing::Proxy::start(server.port()).await;
    let hub = NatsHub::connect(&options(vec![proxy.url()])).await.unwrap();
    let partition = hub.partition_of("k0");
    let events = of_partition(&hub, partition, "m", 0..200);
    hub.publish(&events).await.unwrap();
    let whole = hub.missed(partition, None, u64::MAX, 0).await.unwrap();
    assert_eq!(whole.len(), events.len());
    proxy.drop_next_delivery_containing(events[events.len() / 2].id().as_bytes());
    let err = hub
        .missed(partition, None, u64::MAX, 0)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("lost on the way"), "{err}");
    assert_eq!(
        hub.missed(partition, None, u64::MAX, 0).await.unwrap(),
        whole
    );
}

/// What the hub gives a processor taking over a partition: the messages another instance
/// read (`missed`, one request when there are none), and timers the stream keeps (JetStream
/// message schedules) delivered into the key's partition once, at their time, a timer
/// scheduled again replacing the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_keeps_timers_and_gives_what_a_partition_missed() {
    let (_server, hub) = hub_on_new_server().await;
    let events: Vec<Event> = (0..5)
        .map(|i| {
            Event::builder("order-submitted", "k")
                .id(format!("e{i}"))
                .build()
        })
        .collect();
    hub.publish(&events).await.unwrap();
    let p = hub.partition_of("k");
    let all = hub.missed(p, None, u64::MAX, 0).await.unwrap();
    let ids: Vec<String> = all
        .iter()
        .map(|(_, b)| Event::decode(b).unwrap().id().to_owned())
        .collect();
    assert_eq!(ids, ["e0", "e1", "e2", "e3", "e4"]);
    let seq: Vec<u64> = all.iter().map(|(s, _)| *s).collect();
    // Read back by position, in its partition only.
    assert!(hub.record_in(p, seq[0]).await.unwrap().is_some());
    let other = (p + 1) % hub.partitions();
    assert!(hub.record_in(other, seq[0]).await.unwrap().is_none());
    let between = hub.missed(p, Some(seq[1]), seq[4], 0).await.unwrap();
    assert_eq!(
        between.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        [seq[2], seq[3]]
    );
    assert!(hub
        .missed(p, Some(seq[3]), seq[4], 0)
        .await
        .unwrap()
        .is_empty());
    assert!(hub
        .missed(p, Some(seq[4]), seq[4] + 100, 0)
        .await
        .unwrap()
        .is_empty());
    // Nothing since a time after the last message (a quiet partition older than a cep
    // processor's ttl): nothing, at once, not a read that waits and fails.
    let quiet = tokio::time::timeout(
        Duration::from_secs(3),
        hub.missed(p, None, u64::MAX, floodway::event::now_millis() + 60_000),
    )
    .await
    .expect("at once")
    .unwrap();
    assert!(quiet.is_empty());
    // Timers at times a schedule cannot name (after the year 9999) or the server's clock
    // cannot reach are taken, a century ahead, not refused with their chunk or fired at
    // once (the deliveries counted below would show them).
    let timers: Vec<(String, u32, bytes::Bytes, i64)> = [253_402_300_800_000, i64::MAX]
        .iter()
        .enumerate()
        .map(|(i, at)| (format!("odd-{i}"), p, bytes::Bytes::from_static(b"{}"), *at))
        .collect();
    hub.schedule(&timers).await.unwrap();

    // A timer scheduled twice (the second replaces the first), due in 1.5 s.
    let timer = floodway::cep::Timer {
        due: floodway::event::now_millis() + 1_500,
        rule: "expired".into(),
        trigger: "e0".into(),
    };
    let due = timer.to_event("orders-cep", "k");
    let shared: floodway::SharedHub = Arc::new(floodway_nats::NatsEventHub::new(
        hub.clone(),
        Default::default(),
    ));
    assert!(shared.schedules());
    shared
        .schedule(&[(due.clone(), timer.due + 60_000)])
        .await
        .unwrap();
    shared.schedule(&[(due, timer.due)]).await.unwrap();
    let found = loop {
        let found = hub.missed(p, Some(seq[4]), u64::MAX, 0).await.unwrap();
        if !found.is_empty() || floodway::event::now_millis() > timer.due + 5_000 {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(found.len(), 1, "delivered once");
    let delivered = Event::decode(&found[0].1).unwrap();
    assert_eq!(
        floodway::cep::Timer::of_event(&delivered),
        Some(("orders-cep".into(), "k".into(), timer.clone()))
    );
    let stored = hub.record_at(found[0].0).await.unwrap();
    assert!(stored.is_some());
    let late = floodway::event::now_millis() - timer.due;
    assert!((0..1_000).contains(&late), "found {late} ms after its time");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        hub.missed(p, Some(seq[4]), u64::MAX, 0)
            .await
            .unwrap()
            .len(),
        1,
        "once, and the replaced schedule never"
    );
}

/// Whether the hub's stream takes fast-ingest batches, as the server holds its settings.
async fn allows_batches(hub: &NatsHub) -> bool {
    let js = async_nats::jetstream::new(hub.client().clone());
    let mut stream = js.get_stream(hub.stream()).await.unwrap();
    stream.info().await.unwrap().config.allow_batch_publish
}

/// `n` events of 50 keys, `e-{i}` with field `n` = i, in that order.
fn numbered_events(n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| {
            Event::builder("thing-happened", format!("k-{}", i % 50))
                .id(format!("e-{i}"))
                .field("n", i as u64)
                .build()
        })
        .collect()
}

/// Reads the whole stream and checks that it holds `n` events of [`numbered_events`], each
/// once, and every key's in the order published.
async fn holds_each_once_in_order(hub: &NatsHub, n: usize) {
    let stored = read_all(hub, Partitions::All).await;
    let ids: HashSet<&str> = stored.iter().map(Event::id).collect();
    assert_eq!((stored.len(), ids.len()), (n, n), "each stored once");
    let mut last: HashMap<&str, u64> = HashMap::new();
    for event in &stored {
        let number = event
            .field("n")
            .and_then(serde_json::Value::as_u64)
            .unwrap();
        if let Some(before) = last.insert(event.partition_key(), number) {
            assert!(before < number, "{} after {before}", event.id());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_ingest_batches_store_every_event_once_and_in_order() {
    let (_server, hub) = hub_on_new_server().await;
    assert!(allows_batches(&hub).await, "set on the stream at connect");
    let events = numbered_events(2_500);
    // Three batches of about 833.
    hub.publish_fast(&events).await.unwrap();
    assert_eq!(hub.stats().await.unwrap().messages, 2_500);
    // Repeats inside the duplicate window are skipped, in a batch as message by message; the
    // ids went with the batch.
    hub.publish_fast(&events[..1_200]).await.unwrap();
    let again = hub.publish(&events[2_000..]).await.unwrap();
    assert_eq!((again.stored, again.duplicates), (0, 500));
    // Through the contract, as a sink publishes; a handful goes message by message.
    let contract = floodway_nats::NatsEventHub::new(hub.clone(), Default::default());
    floodway::hub::EventHub::publish_without_receipt(&contract, &events[..3], true)
        .await
        .unwrap();
    assert_eq!(hub.stats().await.unwrap().messages, 2_500);
    holds_each_once_in_order(&hub, 2_500).await;
}

/// Publishes `n` [`numbered_events`] in fast-ingest batches through a loopback proxy that
/// loses the message of event `e-{lost}` on its way to the server, and checks that the
/// stream then holds every event once, each key's in order. Answers how long the publish
/// took; the hub's request timeout is 10 s.
async fn fast_ingest_losing(n: usize, lost: usize) -> Duration {
    let server = NatsServer::start();
    let proxy = floodway_nats::testing::Proxy::start(server.port()).await;
    let hub = NatsHub::connect(&NatsHubOptions {
        request_timeout: Duration::from_secs(10),
        ..options(vec![proxy.url()])
    })
    .await
    .unwrap();
    let events = numbered_events(n);
    proxy.drop_next_publish_containing(format!("\"e-{lost}\"").as_bytes());
    let started = Instant::now();
    hub.publish_fast(&events).await.unwrap();
    let took = started.elapsed();
    assert_eq!(proxy.dropped(), 1);
    holds_each_once_in_order(&hub, n).await;
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_ingest_batch_that_loses_a_message_is_finished_message_by_message() {
    // The 501st message of the first of two batches of 750: the server stores the 500 before
    // it and ends the batch there; the rest of it, the lost one first, goes message by
    // message, and then the second batch.
    fast_ingest_losing(1_500, 500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_ingest_batch_that_loses_its_last_message_is_asked_where_it_stands() {
    // Two batches of 600; the first one's commit: no ack comes. After a second of silence
    // the server is asked, ends the batch before the lost message and acks the 599 stored;
    // without asking, the publish would wait out the 10 s request timeout first.
    let took = fast_ingest_losing(1_200, 599).await;
    assert!(
        took >= Duration::from_secs(1),
        "a second of silence: {took:?}"
    );
    assert!(
        took < Duration::from_secs(8),
        "asked, not timed out: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fast_ingest_every_publish_goes_message_by_message() {
    let server = NatsServer::start();
    let hub = NatsHub::connect(&NatsHubOptions {
        fast_ingest: false,
        ..options(vec![server.url()])
    })
    .await
    .unwrap();
    assert!(!allows_batches(&hub).await, "the stream left as it was");
    assert!(!hub.publishes_in_batches());
    let events = numbered_events(1_100);
    hub.publish_fast(&events[..600]).await.unwrap();

    // A hub that set it, on a stream someone then takes it off: the server refuses the
    // batch, and the events go message by message (this time and from then on).
    let fast = NatsHub::connect(&options(vec![server.url()]))
        .await
        .unwrap();
    assert!(
        allows_batches(&fast).await,
        "set on a stream made without it"
    );
    // An instance with other settings updates the stream, and the setting stays.
    NatsHub::connect(&NatsHubOptions {
        duplicate_window: Some(Duration::from_secs(180)),
        fast_ingest: false,
        ..options(vec![server.url()])
    })
    .await
    .unwrap();
    assert!(
        allows_batches(&fast).await,
        "kept by another instance's update"
    );
    assert!(fast.publishes_in_batches());
    assert!(
        !hub.publishes_in_batches(),
        "its own settings decide, not the stream's"
    );
    // An operator takes it off.
    let js = async_nats::jetstream::new(hub.client().clone());
    let mut stream = js.get_stream("ORDERS").await.unwrap();
    let config = stream.info().await.unwrap().config.clone();
    js.update_stream(async_nats::jetstream::stream::Config {
        allow_batch_publish: false,
        ..config
    })
    .await
    .unwrap();
    assert!(!allows_batches(&fast).await);
    fast.publish_fast(&events[600..]).await.unwrap();
    assert!(
        !fast.publishes_in_batches(),
        "the server said it no longer takes them"
    );
    fast.publish_fast(&events).await.unwrap();
    holds_each_once_in_order(&fast, 1_100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_refuses_timers_still_takes_fast_ingest_batches() {
    let server = NatsServer::start();
    // A hub's stream as an operator made it, denying purges: the server refuses message
    // schedules on it, and takes batches.
    let client = async_nats::connect(server.url()).await.unwrap();
    async_nats::jetstream::new(client)
        .create_stream(async_nats::jetstream::stream::Config {
            name: "ORDERS".into(),
            subjects: vec!["orders.*".into()],
            metadata: HashMap::from([("floodway.partitions".to_owned(), "4".to_owned())]),
            deny_purge: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let hub = NatsHub::connect(&options(vec![server.url()]))
        .await
        .unwrap();
    assert!(!hub.keeps_timers());
    assert!(hub.publishes_in_batches());
    hub.publish_fast(&numbered_events(100)).await.unwrap();
    holds_each_once_in_order(&hub, 100).await;
}
