//! Core benchmarks: `cargo bench -p floodway --bench core`.
//!
//! Prints a table of what was measured on this machine, with the baselines measured in the
//! same run. Throughput runs on one core (a current-thread runtime). Set
//! `FLOODWAY_BENCH_EVENTS` to change the number of events per throughput run;
//! `FLOODWAY_BENCH_ALIGNED=1` to save the throughput rows as the table of a build with its code
//! aligned (`scripts/bench` builds one beside the usual build; see BENCHMARKS.md, "The layout
//! of a build, measured"), without the chart;
//! `FLOODWAY_BENCH_ONLY=throughput` for the throughput rows only, `=adaptive` for the simulated
//! adaptive-concurrency row only, `=stages` for what each stage of an event's work costs
//! without the run loop (nanoseconds an event, beside the plain per-event work).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use floodway::layer::limit::concurrency::Aimd;
use floodway::layer::limit::rate::RateLimiter;
use floodway::layer::retry::{Backoff, RetryPolicy};
use floodway::layer::Resilience;
use floodway::memory::{MemoryFaultSink, MemorySource};
use floodway::testing::generate;
use floodway::{sink_fn, Batch, BatchConfig, Error, Event, Pipeline, Processor, Record, Source};

/// The allocator the `floodway` command uses (and BENCHMARKS.md recommends for services).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[macro_use]
mod common;
#[path = "common/orders.rs"]
mod orders;

struct Row {
    name: String,
    value: String,
    baseline: String,
    ratio: String,
    goal: String,
}

fn row(name: &str, value: String, baseline: String, ratio: String, goal: &str) -> Row {
    Row {
        name: name.into(),
        value,
        baseline,
        ratio,
        goal: goal.into(),
    }
}

fn records_from_lines(lines: &[String]) -> Vec<Record> {
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| Record::new("bench", "0", i as u64 + 1, l.clone()))
        .collect()
}

fn order_lines(n: usize) -> Vec<String> {
    generate::orders(n, 42).iter().map(Event::to_json).collect()
}

#[derive(Clone)]
struct OrderRef(#[allow(dead_code)] String);

/// The processor of the second shape: one pipeline filters, maps and sinks each event alone;
/// one batches every event by 25 and sinks. Both sinks count what they receive, and so does the
/// fault sink: like a sink that ships events elsewhere, none keeps them in the process.
fn each_processor(
    resilience: &Resilience,
    counted: Arc<AtomicU64>,
    faults: Arc<AtomicU64>,
) -> Processor {
    let each = {
        let counted = counted.clone();
        sink_fn(move |batch: Batch| {
            counted.fetch_add(batch.len() as u64, Ordering::Relaxed);
            std::future::ready(Ok::<_, Error>(()))
        })
    };
    let batched = sink_fn(move |batch: Batch| {
        counted.fetch_add(batch.len() as u64, Ordering::Relaxed);
        std::future::ready(Ok::<_, Error>(()))
    });
    Processor::builder("bench")
        .fault_sink(floodway::fault_sink_fn(move |_fault: Event| {
            faults.fetch_add(1, Ordering::Relaxed);
            std::future::ready(Ok::<_, Error>(()))
        }))
        .pipeline(
            Pipeline::builder("each")
                .event_type("order-*")
                .map(|mut uow| {
                    let order = OrderRef(uow.event().partition_key().to_owned());
                    uow.insert(order);
                    Ok(uow)
                })
                .resilience(resilience.clone())
                .sink(each)
                .unwrap(),
        )
        .pipeline(
            Pipeline::builder("batched")
                .batch(BatchConfig::count(25))
                .resilience(resilience.clone())
                .sink(batched)
                .unwrap(),
        )
        .build()
        .unwrap()
}

/// Processor `name` of the one `pipeline`, its faults kept in memory.
fn single(name: &str, pipeline: Pipeline) -> Processor {
    Processor::builder(name)
        .fault_sink(MemoryFaultSink::new())
        .pipeline(pipeline)
        .build()
        .unwrap()
}

/// Commits and nothing else: what a log-backed checkpointer does per record.
#[derive(Default)]
struct Commits(u64);

impl floodway::Checkpointer for Commits {
    async fn commit(
        &mut self,
        checkpoints: &[floodway::Checkpoint],
    ) -> Result<(), floodway::error::CommitError> {
        self.0 += checkpoints.len() as u64;
        Ok(())
    }
}

fn one_core() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The two workloads: the order workload ([`orders`]), and every `order-*` event sunk alone.
#[derive(Clone, Copy)]
enum Shape {
    Orders,
    Each,
}

/// Events per second through the processor of `shape` in one run, and what it counted:
/// `[first sink, second sink, faults]`.
fn floodway_run(
    rt: &tokio::runtime::Runtime,
    shape: Shape,
    records: &[Record],
    resilience: &Resilience,
) -> (f64, [u64; 3]) {
    let orders = Arc::new(orders::Counts::default());
    let counted = Arc::new(AtomicU64::new(0));
    let faults = Arc::new(AtomicU64::new(0));
    let p = match shape {
        Shape::Orders => orders::processor(&orders, resilience),
        Shape::Each => each_processor(resilience, counted.clone(), faults.clone()),
    };
    let source = MemorySource::new(records.to_vec());
    let started = Instant::now();
    let report = rt
        .block_on(p.run(source, Commits::default(), std::future::pending()))
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(report.done, records.len() as u64);
    let counts = match shape {
        Shape::Orders => orders.get(),
        Shape::Each => [
            counted.load(Ordering::Relaxed),
            0,
            faults.load(Ordering::Relaxed),
        ],
    };
    (records.len() as f64 / secs, counts)
}

/// The envelope as a hand-written pipeline would parse it: borrowed where it can be.
#[derive(serde::Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    #[allow(dead_code)]
    id: std::borrow::Cow<'a, str>,
    #[serde(rename = "type", borrow)]
    ty: std::borrow::Cow<'a, str>,
    #[allow(dead_code)]
    timestamp: i64,
    #[serde(rename = "partitionKey", borrow)]
    partition_key: std::borrow::Cow<'a, str>,
}

/// The same work as the processor of `shape`, written by hand on tokio with no framework: the
/// loop takes batches of 512 records from the front of the input (as the processor pulls its
/// in-memory source, in its own loop), does the shape's work on each record, awaits a counting
/// sink for each batch it fills, and keeps the offset to commit after each pull (just before
/// the first record of a batch not yet sunk, as at-least-once delivery needs). No retries,
/// timeouts, per-key order, faults or metrics: the limit for this work. Returns events per
/// second and what it counted, as [`floodway_run`].
fn plain_rate(rt: &tokio::runtime::Runtime, shape: Shape, records: &[Record]) -> (f64, [u64; 3]) {
    async fn sink(counted: &AtomicU64, n: usize) {
        counted.fetch_add(n as u64, Ordering::Relaxed);
        std::future::ready(()).await;
    }
    // Taken from the front as `MemorySource` does: a deque, not a vector shifted each time.
    let mut records: std::collections::VecDeque<Record> = records.to_vec().into();
    let total = records.len();
    let started = Instant::now();
    let (counts, committed) = rt.block_on(async move {
        let mut pull = move || -> Option<Vec<Record>> {
            let n = records.len().min(512);
            (n > 0).then(|| records.drain(..n).collect())
        };
        let counted = AtomicU64::new(0);
        let mut committed = 0u64;
        let counts = match shape {
            Shape::Orders => {
                let mut plain = orders::Plain::default();
                while let Some(chunk) = pull() {
                    let mut last = committed;
                    for record in chunk {
                        if let Some(n) = plain.event(record.offset, &record.data) {
                            sink(&counted, n).await;
                        }
                        last = record.offset;
                    }
                    committed = plain.committable(last);
                }
                for n in plain.flush() {
                    sink(&counted, n).await;
                }
                plain.counts
            }
            Shape::Each => {
                let (mut each, mut faults) = (0u64, 0u64);
                let mut batch: Vec<Record> = Vec::with_capacity(25);
                let mut last = 0;
                while let Some(chunk) = pull() {
                    for record in chunk {
                        let Ok(envelope) = serde_json::from_slice::<Envelope<'_>>(&record.data)
                        else {
                            faults += 1;
                            continue;
                        };
                        if envelope.ty.starts_with("order-") {
                            let order = OrderRef(envelope.partition_key.into_owned());
                            std::hint::black_box(&order);
                            sink(&counted, 1).await;
                            each += 1;
                        }
                        last = record.offset;
                        batch.push(record);
                        if batch.len() == 25 {
                            sink(&counted, batch.len()).await;
                            batch.clear();
                        }
                    }
                    committed = batch.first().map_or(last, |r| r.offset - 1);
                }
                sink(&counted, batch.len()).await;
                std::hint::black_box(each);
                [counted.load(Ordering::Relaxed), 0, faults]
            }
        };
        (counts, committed)
    });
    std::hint::black_box(committed);
    (total as f64 / started.elapsed().as_secs_f64(), counts)
}

/// One measured case.
enum Case<'a> {
    /// Decode and re-encode with serde_json.
    Raw(&'a [Record]),
    /// The same work in a plain tokio pipeline.
    Plain(Shape, &'a [Record]),
    /// Run the benchmark processor.
    Floodway(Shape, &'a [Record], &'a Resilience),
}

/// Rates of every case in every round: cases take turns within a round, so that a ratio of two
/// cases in one round compares them on the same machine state (these machines are shared and
/// noisy). Also returns what each case counted in its last run.
fn rounds(cases: &[Case<'_>], runs: usize) -> (Vec<Vec<f64>>, Vec<[u64; 3]>) {
    let rt = one_core();
    let mut rates = vec![Vec::new(); cases.len()];
    let mut counted = vec![[0; 3]; cases.len()];
    for round in 0..runs {
        eprintln!("  round {} of {runs}", round + 1);
        for (i, case) in cases.iter().enumerate() {
            let rate = match case {
                Case::Raw(records) => raw_rate(records),
                Case::Plain(shape, records) => {
                    let (rate, c) = plain_rate(&rt, *shape, records);
                    counted[i] = c;
                    rate
                }
                Case::Floodway(shape, records, resilience) => {
                    let (rate, c) = floodway_run(&rt, *shape, records, resilience);
                    counted[i] = c;
                    rate
                }
            };
            rates[i].push(rate);
        }
    }
    (rates, counted)
}

fn best(rates: &[f64]) -> f64 {
    rates.iter().copied().fold(0.0, f64::max)
}

/// The raw cost: decode each record into a JSON DOM and encode it again; events per second.
fn raw_rate(records: &[Record]) -> f64 {
    let started = Instant::now();
    let mut bytes = 0usize;
    for r in records {
        let v: serde_json::Value = match serde_json::from_slice(&r.data) {
            Ok(v) => v,
            Err(_) => continue,
        };
        bytes += serde_json::to_vec(&v).unwrap().len();
    }
    std::hint::black_box(bytes);
    records.len() as f64 / started.elapsed().as_secs_f64()
}

/// A source that makes events as it goes, so that memory measures the processor only.
struct Generated {
    next: u64,
    end: u64,
    template: Vec<String>,
}

impl Source for Generated {
    async fn next_batch(
        &mut self,
        max: usize,
    ) -> Result<Option<Vec<Record>>, floodway::error::SourceError> {
        if self.next >= self.end {
            return Ok(None);
        }
        let n = (max as u64).min(self.end - self.next);
        let batch = (self.next..self.next + n)
            .map(|i| {
                let line = &self.template[(i % self.template.len() as u64) as usize];
                Record::new("bench", "0", i + 1, line.clone())
            })
            .collect();
        self.next += n;
        Ok(Some(batch))
    }
}

/// Child process: stream events through a slow sink; print samples of RSS and the peak.
fn memory_child(total: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let samples = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::new(AtomicU64::new(0));
    let slow = {
        let (samples, seen) = (samples.clone(), seen.clone());
        sink_fn(move |batch: Batch| {
            let n = seen.fetch_add(batch.len() as u64, Ordering::Relaxed) + batch.len() as u64;
            if n % (total / 50) < batch.len() as u64 {
                samples
                    .lock()
                    .unwrap()
                    .push(common::status_kib(std::process::id(), "VmRSS:"));
            }
            async move {
                // A slow target: 5 ms per call (virtual time).
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok::<_, Error>(())
            }
        })
    };
    let pipeline = Pipeline::builder("slow")
        .parallelism(32)
        .sink(slow)
        .unwrap();
    let p = single("memory", pipeline);
    let source = Generated {
        next: 0,
        end: total,
        template: order_lines(1_000),
    };
    let report = rt
        .block_on(p.run(source, Commits::default(), std::future::pending()))
        .unwrap();
    assert_eq!(report.done, total);
    let samples = samples.lock().unwrap();
    let list: Vec<String> = samples.iter().map(u64::to_string).collect();
    println!(
        "{} {}",
        common::status_kib(std::process::id(), "VmHWM:"),
        list.join(",")
    );
}

fn memory_row(total: u64) -> Row {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .env("FLOODWAY_BENCH_CHILD", "memory")
        .env("FLOODWAY_BENCH_MEMORY_EVENTS", total.to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace();
    let peak_kib: u64 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    // RSS in KiB at every 2% of the stream.
    let samples: Vec<u64> = parts
        .next()
        .unwrap_or("")
        .split(',')
        .filter_map(|v| v.parse().ok())
        .collect();
    let mib = |kib: u64| kib as f64 / 1024.0;
    common::chart::lines(
        "memory",
        &format!("Processor memory over a {total}-event run (slow sink, 4,096 in flight)"),
        "events processed",
        "RSS (MiB)",
        &[
            common::chart::Series {
                name: "RSS".into(),
                points: samples
                    .iter()
                    .enumerate()
                    .map(|(i, kib)| ((i + 1) as f64 * total as f64 / 50.0, mib(*kib)))
                    .collect(),
                dashed: false,
            },
            common::chart::Series {
                name: "peak".into(),
                points: vec![(0.0, mib(peak_kib)), (total as f64, mib(peak_kib))],
                dashed: true,
            },
        ],
    );
    let tenths: Vec<String> = samples
        .iter()
        .skip(4)
        .step_by(5)
        .map(|k| format!("{}", k / 1024))
        .collect();
    row(
        &format!("peak RSS, {total} events through a slow sink (RSS MiB at each 10%)"),
        format!("{:.1} MiB", mib(peak_kib)),
        format!("[{}]", tenths.join(",")),
        "flat".into(),
        "flat, < 100 MiB",
    )
}

fn rate_limit_row() -> Row {
    let rt = common::two_workers();
    let limit = 2_000u32;
    let seconds = 3.0;
    let calls: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let sink = {
        let calls = calls.clone();
        sink_fn(move |_b: Batch| {
            calls.lock().unwrap().push(Instant::now());
            std::future::ready(Ok::<_, Error>(()))
        })
    };
    // A burst of 10 ms worth of calls absorbs the timer's millisecond resolution.
    let burst = limit / 100;
    let limiter = RateLimiter::per_second(limit)
        .unwrap()
        .with_burst(burst)
        .unwrap();
    let pipeline = Pipeline::builder("limited")
        .parallelism(64)
        .resilience(Resilience::default().rate_limit(limiter))
        .sink(sink)
        .unwrap();
    let p = single("rate", pipeline);
    let n = (f64::from(limit) * seconds) as usize;
    let events = generate::orders(n, 9);
    let started = Instant::now();
    rt.block_on(p.run(
        MemorySource::from_events(&events, 1),
        Commits::default(),
        std::future::pending(),
    ))
    .unwrap();
    let calls = calls.lock().unwrap();
    let elapsed = calls.last().unwrap().duration_since(started).as_secs_f64();
    let achieved = (calls.len() - 1) as f64 / elapsed;
    let window = Duration::from_secs(1);
    let mut max_in_window = 0;
    let mut j = 0;
    for i in 0..calls.len() {
        while j < calls.len() && calls[j] - calls[i] < window {
            j += 1;
        }
        max_in_window = max_in_window.max(j - i);
    }
    row(
        &format!("rate limit {limit}/s, burst {burst}: achieved rate; max calls in any 1 s window"),
        format!("{achieved:.0}/s; {max_in_window}"),
        format!("{limit}/s; bound {}", limit + burst),
        format!("{:.3}", achieved / f64::from(limit)),
        "within 2%, never above",
    )
}

/// A target with an unknown capacity of `capacity` concurrent calls answering in 20 ms; calls
/// above it are throttled (429) at once. Run on tokio's paused clock for 60 virtual seconds.
fn adaptive_row() -> Row {
    let capacity = 40usize;
    let latency = Duration::from_millis(20);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let throttled = Arc::new(AtomicU64::new(0));
    let sink = {
        let (in_flight, ok, throttled) = (in_flight.clone(), ok.clone(), throttled.clone());
        sink_fn(move |_b: Batch| {
            let (in_flight, ok, throttled) = (in_flight.clone(), ok.clone(), throttled.clone());
            async move {
                if in_flight.fetch_add(1, Ordering::SeqCst) >= capacity {
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    throttled.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    return Err(Error::throttled_msg("HttpStatus", "429 Too Many Requests"));
                }
                tokio::time::sleep(latency).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                ok.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
    };
    let resilience = Resilience::default()
        .adaptive_concurrency(Aimd {
            max: 512,
            ..Aimd::default()
        })
        .retry(
            RetryPolicy::default()
                .max_attempts(10)
                .backoff(Backoff::exponential(
                    Duration::from_millis(10),
                    Duration::from_secs(1),
                )),
        );
    let pipeline = Pipeline::builder("calls")
        .parallelism(512)
        .resilience(resilience)
        .sink(sink)
        .unwrap();
    let p = single("adaptive", pipeline);
    let ideal = capacity as f64 / latency.as_secs_f64();
    let n = (ideal * 60.0) as usize;
    let events: Vec<Event> = (0..n)
        .map(|i| {
            Event::builder("call-requested", format!("k{}", i % 5_000))
                .id(i.to_string())
                .timestamp(i as i64)
                .build()
        })
        .collect();
    let (secs, report) = rt.block_on(async {
        let started = tokio::time::Instant::now();
        let report = p
            .run(
                MemorySource::from_events(&events, 1),
                Commits::default(),
                std::future::pending(),
            )
            .await
            .unwrap();
        (started.elapsed().as_secs_f64(), report)
    });
    assert_eq!(report.faults(), 0);
    let goodput = ok.load(Ordering::SeqCst) as f64 / secs;
    let thr = throttled.load(Ordering::SeqCst) as f64;
    let share = thr / (thr + ok.load(Ordering::SeqCst) as f64);
    row(
        "adaptive concurrency vs hidden capacity (simulated, paused clock): goodput; throttled share",
        format!("{goodput:.0}/s; {:.2}%", share * 100.0),
        format!("{ideal:.0}/s"),
        format!("{:.3}", goodput / ideal),
        ">= 0.90 of capacity, < 5% throttled",
    )
}

fn main() {
    if std::env::var("FLOODWAY_BENCH_CHILD").as_deref() == Ok("memory") {
        let total = std::env::var("FLOODWAY_BENCH_MEMORY_EVENTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000);
        memory_child(total);
        return;
    }
    // `cargo bench` passes `--bench`; ignore arguments.
    let n = common::events_wanted(500_000);
    let runs = 7;
    let only_throughput = std::env::var("FLOODWAY_BENCH_ONLY").as_deref() == Ok("throughput");
    eprintln!("generating {n} events...");
    let lines = order_lines(n);
    let avg = lines.iter().map(String::len).sum::<usize>() / lines.len();
    let clean = records_from_lines(&lines);
    let mut poisoned_lines = lines.clone();
    let poisoned = generate::poison_lines(&mut poisoned_lines, 10, 7);
    let poisoned_records = records_from_lines(&poisoned_lines);

    let mut rows = Vec::new();
    if std::env::var("FLOODWAY_BENCH_ONLY").as_deref() == Ok("adaptive") {
        print_table(vec![adaptive_row()]);
        return;
    }
    if std::env::var("FLOODWAY_BENCH_ONLY").as_deref() == Ok("stages") {
        stages(&lines);
        return;
    }
    if let Ok(profile) = std::env::var("FLOODWAY_BENCH_PROFILE") {
        // For profilers: one case only, many times.
        let (shape, records, resilience) = match profile.as_str() {
            "poison" => (Shape::Orders, &poisoned_records, Resilience::default()),
            "default" => (Shape::Orders, &clean, Resilience::default()),
            "each" => (Shape::Each, &clean, Resilience::default()),
            _ => (Shape::Orders, &clean, Resilience::none()),
        };
        let case = match profile.as_str() {
            "plain" => Case::Plain(shape, records),
            _ => Case::Floodway(shape, records, &resilience),
        };
        let (rates, counted) = rounds(&[case], 10);
        let rate = best(&rates[0]);
        let [first, second, faults] = counted[0];
        out!("{profile}: {rate:.0} ev/s (sunk {first} and {second}, {faults} faults)");
        return;
    }
    eprintln!(
        "raw decode + encode; the order workload plain, through floodway without layers, with \
         default layers, with 1% poison; each event sunk alone, plain and through floodway..."
    );
    let (none, default) = (Resilience::none(), Resilience::default());
    let (rates, counted) = rounds(
        &[
            Case::Raw(&clean),
            Case::Plain(Shape::Orders, &clean),
            Case::Floodway(Shape::Orders, &clean, &none),
            Case::Floodway(Shape::Orders, &clean, &default),
            Case::Plain(Shape::Orders, &poisoned_records),
            Case::Floodway(Shape::Orders, &poisoned_records, &default),
            Case::Plain(Shape::Each, &clean),
            Case::Floodway(Shape::Each, &clean, &default),
        ],
        runs,
    );
    let rate = |i: usize| best(&rates[i]);
    // Each case did the same work as its plain reference.
    for (ours, plain) in [(2, 1), (3, 1), (5, 4), (7, 6)] {
        assert_eq!(
            counted[ours], counted[plain],
            "case {ours} against case {plain}"
        );
    }
    assert_eq!(
        counted[5][2] as usize, poisoned,
        "one fault per poison record"
    );
    assert_eq!(counted[7][2], 0);
    rows.push(row(
        &format!("raw serde_json decode + encode, {avg}-byte events (baseline)"),
        format!("{:.0} ev/s", rate(0)),
        "-".into(),
        "1.00".into(),
        "-",
    ));
    let ratio_note =
        |a: usize, b: usize| format!("{:.2}", common::median_ratio(&rates[a], &rates[b]));
    let against = |i: usize, what: &str| format!("{:.0} ev/s {what}", rate(i));
    rows.push(row(
        "plain tokio pipeline, the order workload, no framework (reference)",
        format!("{:.0} ev/s", rate(1)),
        against(0, "raw"),
        ratio_note(1, 0),
        "-",
    ));
    rows.push(row(
        "processor, the order workload, sinks without layers",
        format!("{:.0} ev/s", rate(2)),
        against(1, "plain"),
        ratio_note(2, 1),
        "-",
    ));
    rows.push(row(
        "processor, the order workload, default resilience stack",
        format!("{:.0} ev/s", rate(3)),
        against(1, "plain"),
        ratio_note(3, 1),
        ">= 800,000 ev/s; >= 0.90 of plain",
    ));
    rows.push(row(
        &format!("plain tokio pipeline, the order workload with 1% poison ({poisoned} faults)"),
        format!("{:.0} ev/s", rate(4)),
        against(1, "plain clean"),
        ratio_note(4, 1),
        "-",
    ));
    rows.push(row(
        &format!("processor, the order workload with 1% poison ({poisoned} faults)"),
        format!("{:.0} ev/s", rate(5)),
        against(3, "clean"),
        ratio_note(5, 3),
        ">= 0.97 of clean",
    ));
    rows.push(row(
        "plain tokio pipeline, each order-* event sunk alone, every event batched by 25 \
         (reference)",
        format!("{:.0} ev/s", rate(6)),
        against(0, "raw"),
        ratio_note(6, 0),
        "-",
    ));
    rows.push(row(
        "processor, each order-* event sunk alone, every event batched by 25, default \
         resilience stack",
        format!("{:.0} ev/s", rate(7)),
        against(6, "plain"),
        ratio_note(7, 6),
        "-",
    ));
    // A build with its code aligned (scripts/bench's second core run) reports its table apart
    // and leaves the chart to the build laid out as released.
    let aligned = std::env::var_os("FLOODWAY_BENCH_ALIGNED").is_some();
    if aligned {
        out!(
            "built with every function aligned to 64 bytes and every block not reached by \
             falling through to 32 (`-C llvm-args=-align-all-functions=6 \
             -C llvm-args=-align-all-nofallthru-blocks=5`), the same code as the table above\n"
        );
        print_table(rows);
        common::chart::save_table("core-aligned");
        return;
    }
    common::chart::bars(
        "core",
        "Core processor, one core: Floodway beside a plain tokio pipeline",
        "events per second",
        &[
            common::chart::Group {
                label: "order workload, default stack".into(),
                bars: vec![
                    ("Floodway".into(), rate(3)),
                    ("plain tokio".into(), rate(1)),
                ],
            },
            common::chart::Group {
                label: "order workload, no layers".into(),
                bars: vec![
                    ("Floodway".into(), rate(2)),
                    ("plain tokio".into(), rate(1)),
                ],
            },
            common::chart::Group {
                label: "order workload, 1% poison".into(),
                bars: vec![
                    ("Floodway".into(), rate(5)),
                    ("plain tokio".into(), rate(4)),
                ],
            },
            common::chart::Group {
                label: "each event sunk alone".into(),
                bars: vec![
                    ("Floodway".into(), rate(7)),
                    ("plain tokio".into(), rate(6)),
                ],
            },
        ],
    );
    if only_throughput {
        print_table(rows);
        common::chart::save_table("core-throughput");
        return;
    }
    eprintln!("memory (child process)...");
    rows.push(memory_row(1_000_000));
    eprintln!("rate limit (3 s real time)...");
    rows.push(rate_limit_row());
    eprintln!("adaptive concurrency (simulated)...");
    rows.push(adaptive_row());
    print_table(rows);
    common::chart::save_table("core");
}

/// What each stage of the order workload's per-event work costs, in nanoseconds an event, with
/// no run loop around it: decoding (from a shared copy of the bytes, as the engine decodes),
/// then the map step's typed read, then the derived event (the whole map step); and the plain
/// reference's per-event work (a typed parse of the event, the new event with its stable id
/// serialized and batched). Each over every event, the best of several passes, once over
/// events streamed from memory (all of them) and once over two thousand taken across them,
/// which stay in the cache. What the processor spends an event beyond the third stage is,
/// roughly, the run loop's (and the framework's objects around the event: sharing it, the
/// derived event's shared copy, the type filters).
fn stages(lines: &[String]) {
    use bytes::Bytes;
    fn time(data: &[Bytes], passes: usize, mut work: impl FnMut(&Bytes) -> usize) -> f64 {
        let mut best = f64::MAX;
        let mut kept = 0;
        for _ in 0..passes {
            let started = Instant::now();
            for d in data {
                kept += work(d);
            }
            best = best.min(started.elapsed().as_nanos() as f64 / data.len() as f64);
        }
        std::hint::black_box(kept);
        best
    }
    let limit = 1 << 20;
    let all: Vec<Bytes> = lines.iter().map(|l| Bytes::from(l.clone())).collect();
    // Taken across the whole set, so that its mix of types is the set's.
    let cached: Vec<Bytes> = all
        .iter()
        .step_by((all.len() / 2_000).max(1))
        .cloned()
        .collect();
    let decode = |d: &Bytes| Event::decode_bytes(d.clone(), limit).unwrap();
    type Stage<'a> = (&'a str, Box<dyn Fn(&Bytes) -> usize + 'a>);
    let rows: [Stage<'_>; 4] = [
        ("decode", Box::new(|d| decode(d).event_type().len())),
        (
            "decode, typed read",
            Box::new(|d| {
                let e = decode(d);
                match orders::derived_type(e.event_type()) {
                    Some(_) => orders::read_order(&e).unwrap(),
                    None => 0,
                }
            }),
        ),
        (
            "decode, typed read, derived event (the map step)",
            Box::new(|d| {
                let e = decode(d);
                match orders::derived_type(e.event_type()) {
                    Some(to) => orders::confirm(&e, to).unwrap().id().len(),
                    None => 0,
                }
            }),
        ),
        (
            "plain: typed parse, new event serialized",
            Box::new({
                let plain = std::cell::RefCell::new(orders::Plain::default());
                move |d| plain.borrow_mut().event(0, d).unwrap_or(0)
            }),
        ),
    ];
    out!("| stage | streamed from memory | in cache |");
    out!("|---|---|---|");
    for (name, work) in &rows {
        let streamed = time(&all, 5, work);
        let in_cache = time(&cached, 500, work);
        out!("| {name} | {streamed:.0} ns | {in_cache:.0} ns |");
    }
}

fn print_table(rows: Vec<Row>) {
    out!(
        "throughput: best of the rounds, one core; ratio: median over rounds of the ratio \
         within a round\n"
    );
    out!("| measurement | result | baseline | ratio | goal |");
    out!("|---|---|---|---|---|");
    for r in rows {
        out!(
            "| {} | {} | {} | {} | {} |",
            r.name,
            r.value,
            r.baseline,
            r.ratio,
            r.goal
        );
    }
}
