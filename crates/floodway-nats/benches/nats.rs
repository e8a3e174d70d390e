//! JetStream benchmarks: `cargo bench -p floodway-nats --bench nats`.
//!
//! Against a local `nats-server` (file storage, in a temporary directory), in the same run:
//! - consume: a raw async-nats pull consumer acking every ~400-byte message (and raw consumers
//!   one per partition, as Floodway reads; and those acking cumulatively, one ack per 100
//!   messages), against a Floodway processor consuming the same messages through one
//!   pipeline into a counting sink, acking cumulatively (the default with exclusive sharing)
//!   or each record on its own (`acks = "each"`, as with pinned sharing);
//! - publish: raw async-nats publishes with `Nats-Msg-Id`, pipelined 1,000 at a time and all
//!   acked, to one subject (and to each event's partition subject of a stream of as many
//!   partitions, as Floodway publishes), against Floodway publishing the same as a sink does
//!   (fast-ingest batches, one ack a batch) and with a receipt (each message acked), and
//!   against raw async-nats in fast-ingest batches (the limit).
//!
//! A second table gives each case's CPU per message, the client's (this process) and the
//! server's, and how many cores the two kept busy: the throughput rows say how fast, this one
//! what each side paid for a message, and whether the two cores were the limit. The profile
//! modes print the same per run.
//!
//! `FLOODWAY_BENCH_EVENTS` sets the message count (default 100,000); each measurement runs
//! seven times ([`RUNS`]) and the median is reported. For profilers,
//! `FLOODWAY_BENCH_PROFILE=consume` (`=consume-each` with per-record acks; or `=raw`,
//! `=raw-partitions` for raw consumers per partition acking every message, or `=cumulative`
//! for raw consumers per partition acking cumulatively) runs only
//! Floodway's (or raw async-nats's) consuming, on 4 partitions (`FLOODWAY_BENCH_PARTITIONS`
//! to change), ten times; `=publish`, raw and Floodway publishing (4 partitions) taking
//! turns, ten times each; `=fast-ingest`, raw async-nats publishing each message acked
//! against raw fast-ingest batches of 1,000 (nats-server 2.14+) to the partition subjects
//! of a 4-partition stream, taking turns, ten times.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull;
use bytes::Bytes;
use floodway::memory::MemoryFaultSink;
use floodway::testing::generate;
use floodway::{sink_fn, Batch, Error, Event, Pipeline, Processor};
use floodway_nats::testing::NatsServer;
use floodway_nats::{Acks, NatsHub, NatsHubOptions, Partitions, Sharing, SubscriptionOptions};
use futures_util::StreamExt;

/// The allocator the `floodway` command uses (and BENCHMARKS.md recommends for services); raw
/// async-nats runs with it too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../../floodway/benches/common/mod.rs"]
#[macro_use]
mod common;

const RUNS: usize = 7;

/// A row: the medians of the two sides' runs, and the median over runs of the ratio within a
/// run (the two sides of a run see the same machine state; this shared machine drifts).
fn row(name: &str, ours: &[f64], reference: &[f64], goal: &str) {
    let (least, most) = common::ratio_range(ours, reference);
    out!(
        "| {name} | {:.0} msg/s | {:.0} msg/s | {:.2} ({least:.2}-{most:.2}) | {goal} |",
        common::median(ours.to_vec()),
        common::median(reference.to_vec()),
        common::median_ratio(ours, reference)
    );
}

async fn hub(server: &NatsServer, stream: &str, partitions: u32) -> NatsHub {
    NatsHub::connect(&NatsHubOptions {
        servers: vec![server.url()],
        stream: stream.into(),
        subject: stream.to_lowercase(),
        partitions: Some(partitions),
        ..NatsHubOptions::default()
    })
    .await
    .unwrap()
}

/// The CPU spent while one case ran, over its runs: this process's (the client's) and the
/// server's, with the messages, and the cores the two kept busy in each run.
#[derive(Clone, Default)]
struct Spent {
    client_ms: u64,
    server_ms: u64,
    messages: u64,
    cores: Vec<f64>,
}

impl Spent {
    /// Runs `work` (a case's run over `n` messages, answering its rate) and adds what it spent.
    async fn run(&mut self, server: &NatsServer, n: usize, work: impl Future<Output = f64>) -> f64 {
        let server = server.pid().expect("the server runs");
        let client = std::process::id();
        let (before, served) = (common::cpu_ms(client), common::cpu_ms(server));
        let rate = work.await;
        let client_ms = common::cpu_ms(client).saturating_sub(before);
        let server_ms = common::cpu_ms(server).saturating_sub(served);
        self.client_ms += client_ms;
        self.server_ms += server_ms;
        self.messages += n as u64;
        // Over the time the messages took, not the wait for the last idle pull to end; per
        // run, so that one run that stalled does not speak for the others.
        let seconds = n as f64 / rate;
        self.cores
            .push((client_ms + server_ms) as f64 / 1000.0 / seconds.max(f64::EPSILON));
        rate
    }

    fn micros(ms: u64, messages: u64) -> f64 {
        ms as f64 * 1000.0 / messages.max(1) as f64
    }

    /// The cores kept busy, the median over runs.
    fn cores(&self) -> f64 {
        common::median(self.cores.clone())
    }

    /// A row of the CPU table: this case (Floodway's) beside `reference`.
    fn row(&self, case: &str, reference: &Spent, name: &str) -> String {
        format!(
            "| {case} | {:.2} µs | {:.2} µs | {:.2} µs | {:.2} µs | {:.2} / {:.2} | {name} |",
            Self::micros(self.client_ms, self.messages),
            Self::micros(reference.client_ms, reference.messages),
            Self::micros(self.server_ms, self.messages),
            Self::micros(reference.server_ms, reference.messages),
            self.cores(),
            reference.cores()
        )
    }
}

/// Raw async-nats: one pull consumer over the stream, every message acked.
async fn raw_consume(hub: &NatsHub, name: &str, n: usize) -> f64 {
    raw_consume_from(hub, name, n, &[None], Acks::Each).await
}

/// Raw consuming with one durable pull consumer per subject filter (`None`: the whole
/// stream), each in a task of its own, acking every message (`Acks::Each`, ack policy
/// `explicit`) or every hundredth, covering those before it (`Acks::Cumulative`, ack policy
/// `all`); messages per second until `n`.
async fn raw_consume_from(
    hub: &NatsHub,
    name: &str,
    n: usize,
    subjects: &[Option<String>],
    acks: Acks,
) -> f64 {
    use async_nats::jetstream::consumer::AckPolicy;
    let cumulative = acks.cumulative(Sharing::Exclusive);
    let js = async_nats::jetstream::new(hub.client().clone());
    let stream = js.get_stream(hub.stream()).await.unwrap();
    let mut consumers = Vec::new();
    for (i, subject) in subjects.iter().enumerate() {
        consumers.push(
            stream
                .create_consumer(pull::Config {
                    durable_name: Some(format!("{name}-{i}")),
                    ack_policy: if cumulative {
                        AckPolicy::All
                    } else {
                        AckPolicy::Explicit
                    },
                    max_ack_pending: 4000,
                    filter_subject: subject.clone().unwrap_or_default(),
                    ..Default::default()
                })
                .await
                .unwrap(),
        );
    }
    let seen = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    // The time the last message was acked, taken by the task that acked it: the others may
    // still be waiting out their 200 ms, which is not the work.
    let finished = Arc::new(std::sync::Mutex::new(None));
    let mut tasks = tokio::task::JoinSet::new();
    for consumer in consumers {
        let seen = seen.clone();
        let finished = finished.clone();
        tasks.spawn(async move {
            let mut messages = consumer
                .stream()
                .max_messages_per_batch(200)
                .messages()
                .await
                .unwrap();
            let mut mine = 0u64;
            while seen.load(Ordering::Relaxed) < n as u64 {
                let Ok(Some(message)) =
                    tokio::time::timeout(Duration::from_millis(200), messages.next()).await
                else {
                    continue;
                };
                let message = message.unwrap();
                std::hint::black_box(&message.payload);
                mine += 1;
                if !cumulative || mine.is_multiple_of(100) {
                    message.ack().await.unwrap();
                }
                if seen.fetch_add(1, Ordering::Relaxed) + 1 == n as u64 {
                    *finished.lock().unwrap() = Some(started.elapsed());
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = finished
        .lock()
        .unwrap()
        .unwrap_or_else(|| started.elapsed());
    let rate = n as f64 / elapsed.as_secs_f64();
    hub.client().flush().await.unwrap();
    rate
}

/// A Floodway processor: one pipeline into a counting sink, its subscription acking as
/// `acks` says.
async fn floodway_consume(hub: &NatsHub, name: &str, n: usize, acks: Acks) -> f64 {
    // The sink says when the last message is in: a stop that looked at a counter on a timer
    // would wake the process thousands of times a second, a cost raw async-nats does not pay.
    let reached = Arc::new(tokio::sync::Notify::new());
    let counter = Arc::new(AtomicU64::new(0));
    let all_in = reached.clone();
    let sink = sink_fn(move |batch: Batch| {
        let len = batch.len() as u64;
        let before = counter.fetch_add(len, Ordering::Relaxed);
        if before < n as u64 && before + len >= n as u64 {
            all_in.notify_one();
        }
        std::future::ready(Ok::<_, Error>(()))
    });
    let processor = Processor::builder(name)
        .fault_sink(MemoryFaultSink::new())
        .max_in_flight(4000)
        .pipeline(
            Pipeline::builder("count")
                .event_type("*")
                .batch(floodway::BatchConfig::count(200).max_wait(Duration::from_millis(5)))
                .sink(sink)
                .unwrap(),
        )
        .build()
        .unwrap();
    let sub = hub
        .subscribe(
            name,
            SubscriptionOptions {
                partitions: Partitions::All,
                max_ack_pending: 4000,
                acks,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let closed = sub.closed();
    let (reader, checkpointer) = sub.split();
    let started = Instant::now();
    let stop = async move { reached.notified().await };
    // On the runtime's workers, as the `floodway` command runs its processors (and as the raw
    // loops run their consumers): not on the thread that blocks on the benchmark.
    tokio::spawn(async move { processor.run(reader, checkpointer, stop).await })
        .await
        .unwrap()
        .unwrap();
    let rate = n as f64 / started.elapsed().as_secs_f64();
    closed.await;
    rate
}

/// Raw async-nats publishing with ids, 1,000 in flight, every ack awaited.
async fn raw_publish(hub: &NatsHub, subject: &str, events: &[(String, Bytes)]) -> f64 {
    let subjects = vec![subject.to_owned(); events.len()];
    raw_publish_to(hub, &subjects, events).await
}

/// The same, each message to its own subject (`subjects[i]` for `events[i]`).
async fn raw_publish_to(hub: &NatsHub, subjects: &[String], events: &[(String, Bytes)]) -> f64 {
    let js = async_nats::jetstream::new(hub.client().clone());
    let started = Instant::now();
    for (chunk, subjects) in events.chunks(1_000).zip(subjects.chunks(1_000)) {
        let mut acks = Vec::with_capacity(chunk.len());
        for ((id, payload), subject) in chunk.iter().zip(subjects) {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
            acks.push(
                js.publish_with_headers(subject.clone(), headers, payload.clone())
                    .await
                    .unwrap(),
            );
        }
        for ack in acks {
            ack.await.unwrap();
        }
    }
    events.len() as f64 / started.elapsed().as_secs_f64()
}

/// Raw async-nats publishing with ids in JetStream's fast-ingest batches (nats-server 2.14+,
/// a stream with `allow_batched`, which the hub sets at connect):
/// each 1,000 messages one batch, sent without waiting, its commit's ack awaited; the server
/// stores each message as it comes and acks the batch once (with flow-control acks on the
/// way, which this reads past). The protocol lives in the reply subject,
/// `<prefix>.<batch>.<flow>.<gap mode>.<sequence>.<operation>.$FI`.
async fn raw_fast_ingest(hub: &NatsHub, subjects: &[String], events: &[(String, Bytes)]) -> f64 {
    let client = hub.client();
    let started = Instant::now();
    for (chunk, subjects) in events.chunks(1_000).zip(subjects.chunks(1_000)) {
        let inbox = client.new_inbox();
        let batch = inbox.rsplit('.').next().unwrap();
        let prefix = format!("_FI.{batch}");
        let mut answers = client.subscribe(format!("{prefix}.>")).await.unwrap();
        for (i, ((id, payload), subject)) in chunk.iter().zip(subjects).enumerate() {
            let sequence = i + 1;
            // 0 starts the batch, 1 adds to it, 2 commits it.
            let operation = if sequence == chunk.len() {
                2
            } else {
                usize::from(sequence > 1)
            };
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
            client
                .publish_with_reply_and_headers(
                    subject.clone(),
                    format!("{prefix}.500.fail.{sequence}.{operation}.$FI"),
                    headers,
                    payload.clone(),
                )
                .await
                .unwrap();
        }
        loop {
            let answer = answers.next().await.unwrap();
            let answer: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap();
            assert!(answer.get("error").is_none(), "{answer}");
            if answer.get("batch").is_some() {
                assert_eq!(answer["count"], chunk.len(), "{answer}");
                break;
            }
        }
    }
    events.len() as f64 / started.elapsed().as_secs_f64()
}

/// Floodway publishing as a sink does (`NatsHub::publish_fast`: fast-ingest batches), 1,000
/// events a call.
async fn floodway_publish(hub: &NatsHub, events: &[Event]) -> f64 {
    let started = Instant::now();
    for chunk in events.chunks(1_000) {
        hub.publish_fast(chunk).await.unwrap();
    }
    events.len() as f64 / started.elapsed().as_secs_f64()
}

/// Floodway publishing with a receipt (`NatsHub::publish`: message by message, each acked,
/// as `floodway hub publish` does to count repeats), 1,000 events a call.
async fn floodway_publish_receipted(hub: &NatsHub, events: &[Event]) -> f64 {
    let started = Instant::now();
    for chunk in events.chunks(1_000) {
        hub.publish(chunk).await.unwrap();
    }
    events.len() as f64 / started.elapsed().as_secs_f64()
}

/// Timers kept by the stream: `pending` scheduled an hour ahead, then `due` more spread over
/// the 5 s that follow, all through the hub contract in batches of 1,000 (as the *cep*
/// processor hands them over); a consumer per partition notes how late each due one
/// arrives. Returns the scheduling rate, the same payloads published plainly (the
/// reference), and the lateness of each due timer in ms.
async fn timers(server: &NatsServer, pending: usize, due: usize) -> (f64, f64, Vec<i64>) {
    use floodway::hub::EventHub as _;
    let partitions = 4;
    let hub = hub(server, "TIMERS", partitions).await;
    let shared = floodway_nats::NatsEventHub::new(hub.clone(), Default::default());
    assert!(shared.schedules(), "the server keeps message schedules");
    let js = async_nats::jetstream::new(hub.client().clone());
    let stream = js.get_stream(hub.stream()).await.unwrap();
    let mut readers = Vec::new();
    for p in 0..partitions {
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: hub.partition_subject(p),
                deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::New,
                ..Default::default()
            })
            .await
            .unwrap();
        readers.push(consumer.messages().await.unwrap());
    }
    let timer = |i: usize, at: i64| {
        let t = floodway::cep::Timer {
            due: at,
            rule: "expired".into(),
            trigger: format!("e-{i}"),
        };
        (t.to_event("orders-cep", &format!("o-{i}")), at)
    };
    let now = floodway::event::now_millis();
    let mut all: Vec<(Event, i64)> = (0..pending).map(|i| timer(i, now + 3_600_000)).collect();
    let started = Instant::now();
    for chunk in all.chunks(1_000) {
        shared.schedule(chunk).await.unwrap();
    }
    // The due ones, spread over the 5 s after the last is scheduled.
    let soon = floodway::event::now_millis() + 2_000;
    let due_timers: Vec<(Event, i64)> = (0..due)
        .map(|i| timer(pending + i, soon + (i as i64 * 5_000) / due as i64))
        .collect();
    for chunk in due_timers.chunks(1_000) {
        shared.schedule(chunk).await.unwrap();
    }
    let rate = (pending + due) as f64 / started.elapsed().as_secs_f64();
    all.extend(due_timers);
    let reference_hub = self::hub(server, "PLAINTIMERS", 1).await;
    let payloads: Vec<(String, Bytes)> = all
        .iter()
        .map(|(e, _)| (e.id().to_owned(), Bytes::from(e.to_json())))
        .collect();
    let reference = raw_publish(
        &reference_hub,
        &reference_hub.partition_subject(0),
        &payloads,
    )
    .await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for mut reader in readers {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = reader.next().await {
                let at = floodway::event::now_millis();
                let event = Event::decode(&message.payload).unwrap();
                if tx.send(at - event.timestamp()).is_err() {
                    return;
                }
            }
        });
    }
    let mut late = Vec::with_capacity(due);
    while late.len() < due {
        match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(Some(l)) => late.push(l),
            _ => panic!("{} of {due} timers arrived", late.len()),
        }
    }
    // None of the pending ones, nor a due one twice.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rx.try_recv().is_err(), "a timer came twice or early");
    (rate, reference, late)
}

fn main() {
    let n = common::events_wanted(100_000);
    // `FLOODWAY_BENCH_SELF=1`: every Floodway case replaced by the raw reference it is
    // compared with, run again under its own name: the table then shows how far apart two
    // runs of the same code come out on this machine.
    let same = std::env::var("FLOODWAY_BENCH_SELF").as_deref() == Ok("1");
    let runtime = common::two_workers();
    let server = NatsServer::start();
    runtime.block_on(async {
        // Decoded from JSON, as a forwarder or `hub publish` holds them.
        let events: Vec<Event> = generate::orders(n, 7)
            .iter()
            .map(|e| Event::decode_bytes(Bytes::from(e.to_json()), 1 << 20).unwrap())
            .collect();
        let bytes: usize = events.iter().map(Event::encoded_len).sum();
        out!(
            "{n} events of {} bytes on average, nats-server on loopback (file storage), {} runs each, \
             the cases taking turns; medians, and the ratio is the median over runs of the ratio \
             within a run (in brackets the least and the greatest of those)\n",
            bytes / n,
            RUNS
        );
        // Each event's id and bytes, as raw async-nats publishes them.
        let payloads: Vec<(String, Bytes)> = events
            .iter()
            .map(|e| (e.id().to_owned(), e.source_bytes().unwrap().clone()))
            .collect();
        if std::env::var("FLOODWAY_BENCH_PROFILE").as_deref() == Ok("publish") {
            for run in 0..10 {
                let (mut theirs, mut mine) = (Spent::default(), Spent::default());
                let raw_hub = hub(&server, &format!("RAWPUBP{run}"), 1).await;
                let raw = theirs
                    .run(
                        &server,
                        n,
                        raw_publish(&raw_hub, &raw_hub.partition_subject(0), &payloads),
                    )
                    .await;
                let our_hub = hub(&server, &format!("PUBP{run}"), 4).await;
                let ours = mine
                    .run(&server, n, floodway_publish(&our_hub, &events))
                    .await;
                out!(
                    "publish: raw {raw:.0} msg/s, Floodway {ours:.0} msg/s; CPU per message: \
                     client {:.2} µs and {:.2} µs, server {:.2} µs and {:.2} µs",
                    Spent::micros(theirs.client_ms, theirs.messages),
                    Spent::micros(mine.client_ms, mine.messages),
                    Spent::micros(theirs.server_ms, theirs.messages),
                    Spent::micros(mine.server_ms, mine.messages)
                );
            }
            return;
        }
        if std::env::var("FLOODWAY_BENCH_PROFILE").as_deref() == Ok("fast-ingest") {
            for run in 0..10 {
                let (mut each, mut batched) = (Spent::default(), Spent::default());
                let mut rates = [0.0; 2];
                // Taking turns going first, each into a fresh stream of 4 partitions.
                for k in [run % 2, 1 - run % 2] {
                    let hub = hub(&server, &format!("FAST{run}x{k}"), 4).await;
                    let subjects: Vec<String> = events
                        .iter()
                        .map(|e| hub.partition_subject(hub.partition_of(e.partition_key())))
                        .collect();
                    rates[k] = if k == 0 {
                        each.run(&server, n, raw_publish_to(&hub, &subjects, &payloads))
                            .await
                    } else {
                        batched
                            .run(&server, n, raw_fast_ingest(&hub, &subjects, &payloads))
                            .await
                    };
                }
                out!(
                    "fast-ingest: each acked {:.0} msg/s, batches of 1,000 {:.0} msg/s ({:.2}); \
                     CPU per message: client {:.2} µs and {:.2} µs, server {:.2} µs and {:.2} µs",
                    rates[0],
                    rates[1],
                    rates[1] / rates[0],
                    Spent::micros(each.client_ms, each.messages),
                    Spent::micros(batched.client_ms, batched.messages),
                    Spent::micros(each.server_ms, each.messages),
                    Spent::micros(batched.server_ms, batched.messages)
                );
            }
            return;
        }
        if let Ok(profile) = std::env::var("FLOODWAY_BENCH_PROFILE") {
            let partitions = std::env::var("FLOODWAY_BENCH_PARTITIONS")
                .ok()
                .and_then(|p| p.parse().ok())
                .unwrap_or(4);
            let source = hub(&server, "PROFILE", partitions).await;
            floodway_publish(&source, &events).await;
            for run in 0..10 {
                let mut spent = Spent::default();
                let rate = spent.run(&server, n, async { match profile.as_str() {
                    "raw" => raw_consume(&source, &format!("raw{run}"), n).await,
                    "raw-partitions" => {
                        let subjects: Vec<Option<String>> =
                            (0..partitions).map(|p| Some(source.partition_subject(p))).collect();
                        raw_consume_from(&source, &format!("rawp{run}"), n, &subjects, Acks::Each)
                            .await
                    }
                    "consume-each" => {
                        floodway_consume(&source, &format!("floodwaye{run}"), n, Acks::Each).await
                    }
                    "cumulative" => {
                        let subjects: Vec<Option<String>> =
                            (0..partitions).map(|p| Some(source.partition_subject(p))).collect();
                        raw_consume_from(
                            &source,
                            &format!("rawc{run}"),
                            n,
                            &subjects,
                            Acks::Cumulative,
                        )
                        .await
                    }
                    _ => floodway_consume(&source, &format!("floodway{run}"), n, Acks::Auto).await,
                }}).await;
                out!(
                    "{profile}: {rate:.0} msg/s, CPU per message: client {:.2} µs, server {:.2} µs",
                    Spent::micros(spent.client_ms, spent.messages),
                    Spent::micros(spent.server_ms, spent.messages)
                );
            }
            return;
        }
        out!("| measurement | Floodway | raw async-nats | ratio | goal |");
        out!("|---|---|---|---|---|");

        // For each partition count: publishing, each run into fresh streams so ids are never
        // duplicates; then consuming the same stored messages with fresh consumers each run.
        let mut groups = Vec::new();
        let mut cpu = Vec::new();
        for partitions in [1u32, 4, 16] {
            let mut rates: [Vec<f64>; 5] = Default::default();
            let mut spent: [Spent; 5] = Default::default();
            // The cases take turns going first: the server's state (its page cache, the
            // streams made so far) must not favour one of them.
            for run in 0..RUNS {
                let raw_hub = hub(&server, &format!("RAWPUB{partitions}x{run}"), 1).await;
                let raw_split = hub(&server, &format!("RAWPUBP{partitions}x{run}"), partitions).await;
                let our_hub = hub(&server, &format!("PUB{partitions}x{run}"), partitions).await;
                let receipted =
                    hub(&server, &format!("PUBR{partitions}x{run}"), partitions).await;
                let raw_fast = hub(&server, &format!("RAWFI{partitions}x{run}"), partitions).await;
                // What Floodway's publishing does, by hand: each event to its partition's
                // subject of a stream of as many partitions.
                let subjects: Vec<String> = events
                    .iter()
                    .map(|e| raw_split.partition_subject(raw_split.partition_of(e.partition_key())))
                    .collect();
                let ours: Vec<String> = events
                    .iter()
                    .map(|e| our_hub.partition_subject(our_hub.partition_of(e.partition_key())))
                    .collect();
                let fast: Vec<String> = events
                    .iter()
                    .map(|e| raw_fast.partition_subject(raw_fast.partition_of(e.partition_key())))
                    .collect();
                for case in 0..5 {
                    let k = (case + run) % 5;
                    let rate = spent[k]
                        .run(&server, n, async {
                            match k {
                                0 => {
                                    raw_publish(&raw_hub, &raw_hub.partition_subject(0), &payloads)
                                        .await
                                }
                                1 => raw_publish_to(&raw_split, &subjects, &payloads).await,
                                2 if same => raw_publish_to(&our_hub, &ours, &payloads).await,
                                2 => floodway_publish(&our_hub, &events).await,
                                3 => floodway_publish_receipted(&receipted, &events).await,
                                _ => raw_fast_ingest(&raw_fast, &fast, &payloads).await,
                            }
                        })
                        .await;
                    rates[k].push(rate);
                }
            }
            let [raw, per_partition, ours, with_receipts, raw_batches] = rates;
            cpu.push(spent[2].row(
                &format!("publish, {partitions} partition(s)"),
                &spent[1],
                "raw publishing to the partition subjects",
            ));
            cpu.push(spent[2].row(
                &format!("publish, {partitions} partition(s)"),
                &spent[4],
                "raw in fast-ingest batches to the partition subjects",
            ));
            row(
                &format!(
                    "publish as a sink does (fast-ingest batches), acked, with ids, \
                     {partitions} partition(s)"
                ),
                &ours,
                &raw,
                "ratio >= 1.0",
            );
            row(
                &format!(
                    "same, against raw async-nats publishing to the partition subjects as Floodway \
                     ({partitions})"
                ),
                &ours,
                &per_partition,
                "ratio >= 1.0",
            );
            row(
                &format!(
                    "same, with a receipt (`NatsHub::publish`: each message acked, as `hub \
                     publish` counts repeats), against raw to the partition subjects ({partitions})"
                ),
                &with_receipts,
                &per_partition,
                "-",
            );
            row(
                &format!(
                    "publish as a sink does, against raw async-nats in fast-ingest batches of \
                     1,000 to the partition subjects ({partitions})"
                ),
                &ours,
                &raw_batches,
                "the limit",
            );
            groups.push(common::chart::Group {
                label: format!("publish, {partitions} partition(s)"),
                bars: vec![
                    ("Floodway".into(), common::median(ours)),
                    (
                        "Floodway, with a receipt".into(),
                        common::median(with_receipts),
                    ),
                    ("raw async-nats".into(), common::median(raw)),
                    (
                        "raw, to the partition subjects".into(),
                        common::median(per_partition),
                    ),
                    (
                        "raw, fast-ingest batches".into(),
                        common::median(raw_batches),
                    ),
                ],
            });
            let source = hub(&server, &format!("CONSUME{partitions}"), partitions).await;
            floodway_publish(&source, &events).await;
            let subjects: Vec<Option<String>> = (0..partitions)
                .map(|p| Some(source.partition_subject(p)))
                .collect();
            let mut rates: [Vec<f64>; 5] = Default::default();
            let mut spent: [Spent; 5] = Default::default();
            for run in 0..RUNS {
                for case in 0..5 {
                    let k = (case + run) % 5;
                    let (source, subjects) = (&source, &subjects);
                    let rate = spent[k]
                        .run(&server, n, async move {
                            match k {
                                0 => raw_consume(source, &format!("raw{run}"), n).await,
                                1 => {
                                    raw_consume_from(
                                        source,
                                        &format!("rawp{run}"),
                                        n,
                                        subjects,
                                        Acks::Each,
                                    )
                                    .await
                                }
                                2 => {
                                    raw_consume_from(
                                        source,
                                        &format!("rawc{run}"),
                                        n,
                                        subjects,
                                        Acks::Cumulative,
                                    )
                                    .await
                                }
                                3 if same => {
                                    raw_consume_from(
                                        source,
                                        &format!("samec{run}"),
                                        n,
                                        subjects,
                                        Acks::Cumulative,
                                    )
                                    .await
                                }
                                3 => {
                                    floodway_consume(
                                        source,
                                        &format!("floodway{run}"),
                                        n,
                                        Acks::Auto,
                                    )
                                    .await
                                }
                                _ if same => {
                                    raw_consume_from(
                                        source,
                                        &format!("same{run}"),
                                        n,
                                        subjects,
                                        Acks::Each,
                                    )
                                    .await
                                }
                                _ => {
                                    floodway_consume(
                                        source,
                                        &format!("floodwaye{run}"),
                                        n,
                                        Acks::Each,
                                    )
                                    .await
                                }
                            }
                        })
                        .await;
                    rates[k].push(rate);
                }
            }
            let [raw, per_partition, cumulative, ours, ours_each] = rates;
            cpu.push(spent[3].row(
                &format!("consume + ack, {partitions} partition(s)"),
                &spent[2],
                "raw, a consumer per partition acking cumulatively",
            ));
            cpu.push(spent[4].row(
                &format!("consume, per-record acks, {partitions} partition(s)"),
                &spent[1],
                "raw, a consumer per partition",
            ));
            row(
                &format!(
                    "consume + ack (cumulative acks, the default), {partitions} partition(s), \
                     one pipeline"
                ),
                &ours,
                &raw,
                "ratio >= 1.0",
            );
            row(
                &format!(
                    "same, against raw async-nats with one consumer per partition as Floodway \
                     ({partitions})"
                ),
                &ours,
                &per_partition,
                "ratio >= 1.0",
            );
            row(
                &format!(
                    "same, against raw async-nats with a consumer per partition acking \
                     cumulatively, one ack per 100 messages ({partitions})"
                ),
                &ours,
                &cumulative,
                "the limit",
            );
            row(
                &format!(
                    "consume with per-record acks (`acks = \"each\"`, as with pinned sharing), \
                     {partitions} partition(s), against raw async-nats acking every message"
                ),
                &ours_each,
                &raw,
                "-",
            );
            row(
                &format!(
                    "same, against raw async-nats with one consumer per partition as Floodway \
                     ({partitions})"
                ),
                &ours_each,
                &per_partition,
                "-",
            );
            groups.push(common::chart::Group {
                label: format!("consume, {partitions} partition(s)"),
                bars: vec![
                    ("Floodway".into(), common::median(ours)),
                    ("raw async-nats".into(), common::median(raw)),
                    (
                        "raw, a consumer per partition".into(),
                        common::median(per_partition),
                    ),
                    (
                        "raw, per partition, acking cumulatively".into(),
                        common::median(cumulative),
                    ),
                    (
                        "Floodway, per-record acks".into(),
                        common::median(ours_each),
                    ),
                ],
            });
        }
        let (pending, due) = (common::events_wanted(100_000), 10_000);
        let (rate, reference, mut late) = timers(&server, pending, due).await;
        late.sort_unstable();
        let at = |q: f64| late[((late.len() - 1) as f64 * q) as usize];
        out!(
            "| schedule {} timers kept by the stream (JetStream message schedules), batches of 1,000 | {rate:.0} timers/s | {reference:.0} msg/s, the same payloads published | {:.2} | - |",
            pending + due,
            rate / reference
        );
        out!(
            "| {due} of them due over 5 s, {pending} pending an hour ahead: how late each arrives in its partition | p50 {} ms, p99 {} ms, max {} ms | - | - | within 1 s |",
            at(0.5),
            at(0.99),
            late[late.len() - 1]
        );
        out!();
        out!(
            "CPU per message over a case's {RUNS} runs: this process's (the client's: Floodway, \
             or the raw loop) and nats-server's, read from `/proc` (10 ms steps); and the cores \
             the two kept busy while the case ran (the median of its runs), of the machine's {}",
            std::thread::available_parallelism().map_or(0, usize::from)
        );
        out!();
        out!(
            "| case | Floodway client | reference client | Floodway server | reference server | \
             cores busy, Floodway / reference | reference |"
        );
        out!("|---|---|---|---|---|---|---|");
        for line in cpu {
            out!("{line}");
        }
        common::chart::save_table("nats");
        common::chart::bars(
            "nats",
            "NATS JetStream on loopback: Floodway beside raw async-nats",
            "messages per second",
            &groups,
        );
    });
}
