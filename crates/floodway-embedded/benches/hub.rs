//! Embedded hub benchmarks: `cargo bench -p floodway-embedded --bench hub`.
//!
//! Durable publish throughput against raw SQLite inserts of the same rows, end-to-end
//! throughput from publish to a materialized view, and consumer lag under a steady load. The
//! hub file lives in a temporary directory on the same disk as the working directory. Each
//! throughput runs three times, in new files each time; the report gives medians, and each
//! ratio is the median over runs of the ratio within a run. For profilers,
//! `FLOODWAY_BENCH_PROFILE=materialize` (or `=e2e`) runs only that case, ten times.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use floodway::memory::MemoryFaultSink;
use floodway::testing::generate;
use floodway::{BatchConfig, Event, Pipeline, Processor};
use floodway_embedded::{Hub, HubOptions, SubscriptionOptions};
use tower::Service;

/// The allocator the `floodway` command uses (and BENCHMARKS.md recommends for services).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../../floodway/benches/common/mod.rs"]
#[macro_use]
mod common;

fn row(name: &str, value: String, baseline: String, ratio: String, goal: &str) {
    out!("| {name} | {value} | {baseline} | {ratio} | {goal} |");
}

/// The same rows, inserted with a prepared statement, 1,000 per transaction, `synchronous=FULL`.
fn raw_sqlite(dir: &std::path::Path, events: &[Event]) -> f64 {
    let conn = rusqlite::Connection::open(dir.join("raw.db")).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE events (partition INTEGER NOT NULL, offset INTEGER NOT NULL, id TEXT NOT NULL,
           type TEXT NOT NULL, time INTEGER NOT NULL, published INTEGER NOT NULL, data BLOB NOT NULL,
           PRIMARY KEY (partition, offset));",
    )
    .unwrap();
    let rows: Vec<(u32, String, String, i64, String)> = events
        .iter()
        .map(|e| {
            (
                floodway::event::partition_for(e.partition_key(), 8),
                e.id().to_owned(),
                e.event_type().to_owned(),
                e.timestamp(),
                e.to_json(),
            )
        })
        .collect();
    let mut offsets = [0i64; 8];
    let started = Instant::now();
    let mut conn = conn;
    for chunk in rows.chunks(1_000) {
        let tx = conn.transaction().unwrap();
        {
            let mut stmt = tx
                .prepare_cached("INSERT INTO events VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")
                .unwrap();
            for (p, id, ty, time, data) in chunk {
                offsets[*p as usize] += 1;
                stmt.execute((p, offsets[*p as usize], id, ty, time, 0i64, data.as_bytes()))
                    .unwrap();
            }
        }
        tx.commit().unwrap();
    }
    rows.len() as f64 / started.elapsed().as_secs_f64()
}

/// Generated order events decoded from JSON, as `hub publish` or a forwarder holds them.
fn decoded_orders(n: usize, seed: u64) -> Vec<Event> {
    generate::orders(n, seed)
        .iter()
        .map(|e| Event::decode_bytes(bytes::Bytes::from(e.to_json()), 1 << 20).unwrap())
        .collect()
}

/// The benchmark's materializing processor; `applied` counts the events whose view
/// transaction has committed.
fn processor(hub: &Hub, applied: Arc<AtomicUsize>) -> Processor {
    let view = hub.view("orders").unwrap();
    // As the ready-made materialize processor does it: the value's JSON text.
    let sink = view.sink_json(
        |e| Ok(e.partition_key().to_owned()),
        |e| {
            Ok(e.json_at("/order")
                .map_or_else(|| "null".into(), |t| t.into_owned()))
        },
    );
    let counted = floodway::sink::sink_fn(move |batch: floodway::Batch| {
        let mut sink = sink.clone();
        let applied = applied.clone();
        async move {
            let n = batch.len();
            let delivery = sink.call(batch).await?;
            applied.fetch_add(n - delivery.failed().len(), Ordering::Relaxed);
            Ok(delivery)
        }
    });
    Processor::builder("bench")
        .max_in_flight(100_000)
        .fault_sink(MemoryFaultSink::new())
        .pipeline(
            Pipeline::builder("orders")
                .event_type("order-*")
                .batch(
                    BatchConfig::count(50_000)
                        .max_bytes(64 << 20)
                        .max_wait(Duration::from_millis(250)),
                )
                .sink(counted)
                .unwrap(),
        )
        .build()
        .unwrap()
}

/// Starts the benchmark processor on a following subscription; send on the channel to stop it.
fn start(
    hub: &Hub,
    applied: Arc<AtomicUsize>,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<floodway::RunReport, floodway::RunError>>,
) {
    let p = processor(hub, applied);
    let (reader, cp) = hub
        .subscribe("orders", SubscriptionOptions::default())
        .unwrap()
        .split();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(async move {
        p.run(reader, cp, async {
            stopped.await.ok();
        })
        .await
    });
    (stop, run)
}

/// Publishes `events` in batches of 1,000; events per second.
async fn publish_all(hub: &Hub, events: &[Event]) -> f64 {
    let started = Instant::now();
    for chunk in events.chunks(1_000) {
        hub.publish(chunk).await.unwrap();
    }
    events.len() as f64 / started.elapsed().as_secs_f64()
}

/// Runs the materializing processor over the `n` events already published; events per second.
async fn materialize(hub: &Hub, n: usize) -> f64 {
    let p = processor(hub, Arc::default());
    let options = SubscriptionOptions {
        follow: false,
        ..Default::default()
    };
    let (reader, cp) = hub.subscribe("orders", options).unwrap().split();
    let started = Instant::now();
    p.run(reader, cp, std::future::pending()).await.unwrap();
    n as f64 / started.elapsed().as_secs_f64()
}

/// Runs of each throughput measurement; the report gives medians.
const RUNS: usize = 3;

/// One run's throughputs, events per second.
struct Run {
    raw: f64,
    publish: f64,
    materialize: f64,
    synced: f64,
    end_to_end: f64,
}

/// Publishes `events` into a new hub at `path` while the benchmark processor follows it, until
/// every order event is in the view (its transaction committed); events per second.
fn end_to_end(rt: &tokio::runtime::Runtime, path: &std::path::Path, events: &[Event]) -> f64 {
    let hub = Hub::open(path, HubOptions::default()).unwrap();
    let orders = events
        .iter()
        .filter(|e| e.event_type().starts_with("order-"))
        .count();
    let rate = rt.block_on(async {
        let applied = Arc::new(AtomicUsize::new(0));
        let (stop, run) = start(&hub, applied.clone());
        let started = Instant::now();
        let publisher = {
            let hub = hub.clone();
            let events = events.to_vec();
            tokio::spawn(async move { publish_all(&hub, &events).await })
        };
        publisher.await.unwrap();
        while applied.load(Ordering::Relaxed) < orders {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let secs = started.elapsed().as_secs_f64();
        let _ = stop.send(());
        run.await.unwrap().unwrap();
        events.len() as f64 / secs
    });
    let rows = hub.view("orders").unwrap().len().unwrap();
    assert!(rows > 0 && rows as usize <= orders);
    rate
}

/// Every throughput measurement once, each in new files under `dir`.
fn one_run(rt: &tokio::runtime::Runtime, dir: &std::path::Path, events: &[Event]) -> Run {
    let n = events.len();
    eprintln!("raw SQLite inserts...");
    let raw = raw_sqlite(dir, events);
    eprintln!("hub publish...");
    let hub = Hub::open(dir.join("hub.db"), HubOptions::default()).unwrap();
    let publish = rt.block_on(publish_all(&hub, events));
    eprintln!("materialize what is already published...");
    let materialized = rt.block_on(materialize(&hub, n));
    drop(hub);
    eprintln!("materialize with every store commit synced...");
    // As a NATS hub's local file does: its views and faults are synced before the JetStream
    // ack that follows (HubOptions::external_acks).
    let external_acks = HubOptions {
        external_acks: true,
        ..HubOptions::default()
    };
    let hub = Hub::open(dir.join("synced.db"), external_acks).unwrap();
    let synced = rt.block_on(async {
        publish_all(&hub, events).await;
        materialize(&hub, n).await
    });
    drop(hub);
    eprintln!("end to end: publish and materialize...");
    let end_to_end = end_to_end(rt, &dir.join("e2e.db"), events);
    Run {
        raw,
        publish,
        materialize: materialized,
        synced,
        end_to_end,
    }
}

/// A row of the median of `ours` against the median of `reference` (`of` says what it is),
/// with the median over runs of the ratio within a run.
fn compared(name: &str, ours: &[f64], reference: &[f64], of: &str, goal: &str) {
    row(
        name,
        format!("{:.0} ev/s", common::median(ours.to_vec())),
        format!("{:.0} ev/s {of}", common::median(reference.to_vec())),
        format!("{:.2}", common::median_ratio(ours, reference)),
        goal,
    );
}

fn main() {
    let n = common::events_wanted(200_000);
    let rt = common::two_workers();
    eprintln!("generating {n} events...");
    let events = decoded_orders(n, 5);
    let tmp = tempfile::tempdir_in(".").unwrap();
    if let Ok(profile) = std::env::var("FLOODWAY_BENCH_PROFILE") {
        // One case alone, ten times, for profilers: `materialize` or `e2e`.
        for run in 0..10 {
            let dir = tmp.path().join(format!("profile{run}"));
            std::fs::create_dir(&dir).unwrap();
            let rate = if profile == "materialize" {
                let hub = Hub::open(dir.join("hub.db"), HubOptions::default()).unwrap();
                rt.block_on(publish_all(&hub, &events));
                rt.block_on(materialize(&hub, n))
            } else {
                end_to_end(&rt, &dir.join("e2e.db"), &events)
            };
            out!("{profile}: {rate:.0} ev/s");
        }
        return;
    }
    let runs: Vec<Run> = (0..RUNS)
        .map(|run| {
            eprintln!("run {} of {RUNS}", run + 1);
            let dir = tmp.path().join(format!("run{run}"));
            std::fs::create_dir(&dir).unwrap();
            one_run(&rt, &dir, &events)
        })
        .collect();
    let of = |f: fn(&Run) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
    let raw = of(|r| r.raw);
    let publish = of(|r| r.publish);
    let consume = of(|r| r.materialize);
    let e2e = of(|r| r.end_to_end);
    out!("{n} generated order events, 8 partitions, median of {RUNS} runs\n");
    out!("| measurement | result | baseline | ratio | goal |");
    out!("|---|---|---|---|---|");
    row(
        "raw SQLite insert, same rows, 1,000 per commit, synchronous=FULL (baseline)",
        format!("{:.0} ev/s", common::median(raw.clone())),
        "-".into(),
        "1.00".into(),
        "-",
    );
    compared(
        "hub durable publish, batches of 1,000, fsync per commit",
        &publish,
        &raw,
        "raw",
        "-",
    );
    compared(
        &format!("materialize {n} published events into a view (reads, view writes, checkpoints)"),
        &consume,
        &raw,
        "raw insert",
        "-",
    );
    compared(
        "same, store commits synced (external acks: a NATS hub's local file)",
        &of(|r| r.synced),
        &consume,
        "unsynced",
        "-",
    );
    compared(
        &format!("end to end: publish {n} events, each applied to a view"),
        &e2e,
        &raw,
        "raw insert",
        ">= 200,000 ev/s",
    );
    let (raw, publish, consume, e2e) = (
        common::median(raw),
        common::median(publish),
        common::median(consume),
        common::median(e2e),
    );

    eprintln!("lag under a steady load...");
    let hub = Hub::open(tmp.path().join("lag.db"), HubOptions::default()).unwrap();
    let rate = 20_000usize;
    let seconds = 5;
    let (p50, max) = rt.block_on(async {
        let (stop, run) = start(&hub, Arc::default());
        let events = Arc::new(decoded_orders(rate * seconds, 6));
        let publisher = {
            let hub = hub.clone();
            let events = events.clone();
            tokio::spawn(async move {
                // 100 events every 5 ms.
                let mut tick = tokio::time::interval(Duration::from_millis(5));
                for chunk in events.chunks(rate / 200) {
                    tick.tick().await;
                    hub.publish(chunk).await.unwrap();
                }
            })
        };
        let mut samples = Vec::new();
        while !publisher.is_finished() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            samples.push(hub.lag("orders").unwrap());
        }
        let _ = stop.send(());
        run.await.unwrap().unwrap();
        common::chart::lines(
            "lag",
            &format!("Embedded hub: consumer lag at a steady {rate} events/s"),
            "seconds",
            "lag (events)",
            &[
                common::chart::Series {
                    name: "lag, sampled every 100 ms".into(),
                    points: samples
                        .iter()
                        .enumerate()
                        .map(|(i, lag)| ((i + 1) as f64 * 0.1, *lag as f64))
                        .collect(),
                    dashed: false,
                },
                common::chart::Series {
                    name: "one second of events".into(),
                    points: vec![(0.0, rate as f64), (seconds as f64, rate as f64)],
                    dashed: true,
                },
            ],
        );
        samples.sort_unstable();
        (samples[samples.len() / 2], *samples.last().unwrap())
    });
    row(
        &format!("consumer lag at a steady {rate} ev/s for {seconds} s (checkpoint every 1 s)"),
        format!("median {p50} events, max {max}"),
        format!("{rate} events = 1 s"),
        format!("{:.2} s median", p50 as f64 / rate as f64),
        "-",
    );
    common::chart::save_table("hub");
    common::chart::bars(
        "hub",
        "Embedded hub, 8 partitions, every commit synced",
        "events per second",
        &[
            common::chart::Group {
                label: "publish".into(),
                bars: vec![
                    ("Floodway".into(), publish),
                    ("raw SQLite inserts".into(), raw),
                ],
            },
            common::chart::Group {
                label: "materialize".into(),
                bars: vec![
                    ("Floodway".into(), consume),
                    ("raw SQLite inserts".into(), raw),
                ],
            },
            common::chart::Group {
                label: "publish → view, end to end".into(),
                bars: vec![("Floodway".into(), e2e), ("raw SQLite inserts".into(), raw)],
            },
        ],
    );
}
