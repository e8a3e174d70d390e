//! Lambda benchmarks: `cargo bench -p floodway-lambda --bench lambda`.
//!
//! The workload, the same for every contender: 100,000 Kinesis records of generated order
//! events (300-500 bytes) in invocations of 10,000, once clean and once with 1% poison; two
//! pipelines, each taking one event type, mapping it to a new event and batching (10, 25) into
//! a counting sink. The invocations are generated once, here, and written under
//! `target/bench/lambda/` so the Node library reads the very same bytes.
//!
//! - **Floodway**: a handler written with the public API (`Handler::handle_bytes`,
//!   `map_event`, `Event::derive`), on one core (a current-thread runtime);
//! - **the limit**: the same work in plain Rust with no framework: the invocation parsed into
//!   borrowed types, each record base64-decoded, parsed into a typed struct, the new event
//!   built and serialized, batched and counted;
//! - **aws-lambda-stream** (`interop/als/bench.js`, run by Node on the same files) when it is
//!   installed (`scripts/test` or `scripts/bench` install it into `target/als`);
//! - peak memory of a function process (this benchmark started again as a Lambda function
//!   behind the local Runtime API) over one 10,000-record invocation, against its size;
//! - cold start and the example handler's binary size.
//!
//! Every throughput is the median of `RUNS` runs, the contenders taking turns in each run.

#[path = "../../floodway/benches/common/mod.rs"]
#[macro_use]
mod common;
#[path = "../../floodway/benches/common/orders.rs"]
mod orders;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use floodway::layer::Resilience;
use floodway::testing::generate;
use floodway::Event;
use floodway_lambda::{FunctionProcess, Handler, LocalRuntime};
use serde::Deserialize;
use serde_json::{json, Value};

/// As a function built for speed would: see docs/lambda.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const INVOCATIONS: usize = 10;
const PER_INVOCATION: usize = 10_000;
const RUNS: usize = 5;
const POISON_PER_MILLE: u32 = 10;
/// Set in the environment of this benchmark started again as a Lambda function.
const FUNCTION_ROLE: &str = "FLOODWAY_BENCH_FUNCTION";

/// The events: generated orders, and in the poison variant about 1% replaced by an event of a
/// type a pipeline takes but without the `order` its map step reads.
fn events(poison: bool) -> Vec<Event> {
    let mut events = generate::orders(INVOCATIONS * PER_INVOCATION, 11);
    // Sizes spread over 300-500 bytes: each event padded with a note to a size drawn for it.
    let mut sizes = fastrand::Rng::with_seed(13);
    for e in &mut events {
        let target = sizes.usize(300..=500);
        let len = e.encoded_len();
        if len + 12 < target {
            e.fields_mut()
                .insert("note".into(), "n".repeat(target - len - 11).into());
        }
    }
    if poison {
        let mut rng = fastrand::Rng::with_seed(12);
        for (i, e) in events.iter_mut().enumerate() {
            if rng.u32(..1000) < POISON_PER_MILLE {
                let ty = if i % 2 == 0 {
                    "order-submitted"
                } else {
                    "order-paid"
                };
                *e = Event::builder(ty, e.partition_key())
                    .id(format!("poison-{i}"))
                    .timestamp(e.timestamp())
                    .tag("source", "web")
                    .field("note", "this order event lost its order")
                    .build();
            }
        }
    }
    events
}

/// One Kinesis invocation of `events`, shaped as Lambda delivers it.
fn invocation(events: &[Event], first: usize) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let records: Vec<Value> = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let seq = format!("4959{:020}", first + i);
            json!({
                "kinesis": {
                    "kinesisSchemaVersion": "1.0",
                    "partitionKey": e.partition_key(),
                    "sequenceNumber": seq,
                    "data": b64.encode(e.to_json()),
                    "approximateArrivalTimestamp": 1_700_000_000.5,
                },
                "eventSource": "aws:kinesis",
                "eventVersion": "1.0",
                "eventID": format!("shardId-000000000000:{seq}"),
                "eventName": "aws:kinesis:record",
                "invokeIdentityArn": "arn:aws:iam::000000000000:role/bench",
                "awsRegion": "eu-west-1",
                "eventSourceARN": "arn:aws:kinesis:eu-west-1:000000000000:stream/orders",
            })
        })
        .collect();
    serde_json::to_vec(&json!({ "Records": records })).unwrap()
}

fn invocations(events: &[Event]) -> Vec<Vec<u8>> {
    events
        .chunks(PER_INVOCATION)
        .enumerate()
        .map(|(i, chunk)| invocation(chunk, i * PER_INVOCATION))
        .collect()
}

// ---- Floodway, through the public API ----

/// The Floodway handler over `invocations`, records per second: borrowed
/// (`Handler::handle_bytes`), or with `owned` each handed over as `serve` does
/// (`Handler::handle_owned`: a Kinesis batch decoded where its text was), copied before the
/// clock starts.
fn floodway(
    rt: &tokio::runtime::Runtime,
    handler: &Handler,
    invocations: &[Vec<u8>],
    records: usize,
    owned: bool,
) -> f64 {
    let copies = if owned {
        invocations.to_vec()
    } else {
        Vec::new()
    };
    let started = Instant::now();
    rt.block_on(async {
        let mut copies = copies.into_iter();
        for bytes in invocations {
            let answer = match copies.next() {
                Some(copy) => handler.handle_owned(copy, None).await,
                None => handler.handle_bytes(bytes, None).await,
            };
            assert_eq!(
                answer.unwrap()["batchItemFailures"]
                    .as_array()
                    .map(Vec::len),
                Some(0)
            );
        }
    });
    records as f64 / started.elapsed().as_secs_f64()
}

// ---- the limit: the same work in plain Rust ----

#[derive(Deserialize)]
struct KinesisEvent<'a> {
    #[serde(rename = "Records", borrow)]
    records: Vec<KinesisRecord<'a>>,
}

#[derive(Deserialize)]
struct KinesisRecord<'a> {
    #[serde(borrow)]
    kinesis: KinesisData<'a>,
}

#[derive(Deserialize)]
struct KinesisData<'a> {
    data: &'a str,
}

/// The plain-Rust limit: per record, base64 (SIMD) into a reused buffer, then the workload's
/// plain work ([`orders::Plain`]); the batches left flushed at the end of each invocation.
fn limit(invocations: &[Vec<u8>], records: usize) -> (f64, [u64; 3]) {
    // The fastest decoder there is (SIMD), as the handler uses.
    let b64 = base64_simd::STANDARD;
    let started = Instant::now();
    let mut plain = orders::Plain::default();
    let mut data = Vec::with_capacity(1024);
    for bytes in invocations {
        let invocation: KinesisEvent<'_> = serde_json::from_slice(bytes).unwrap();
        for (i, record) in invocation.records.iter().enumerate() {
            data.clear();
            b64.decode_append(record.kinesis.data, &mut data).unwrap();
            plain.event(i as u64, &data);
        }
        plain.flush();
        std::hint::black_box(br#"{"batchItemFailures":[]}"#.to_vec());
    }
    (
        records as f64 / started.elapsed().as_secs_f64(),
        plain.counts,
    )
}

// ---- the Node library ----

/// The `node_modules` holding aws-lambda-stream, if installed.
fn als_modules() -> Option<PathBuf> {
    let dir = std::env::var_os("FLOODWAY_ALS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/als"));
    let modules = dir.join("node_modules");
    modules
        .join("aws-lambda-stream")
        .is_dir()
        .then_some(modules)
}

/// aws-lambda-stream over the files, `runs` times: its report (records_per_s, runs_s, ...).
fn node(files: &[PathBuf], runs: usize) -> Option<Value> {
    let modules = als_modules()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../interop/als/bench.js");
    let out = std::process::Command::new(std::env::var("FLOODWAY_NODE").unwrap_or("node".into()))
        .arg(script)
        .arg("--runs")
        .arg(runs.to_string())
        .args(files)
        .env("NODE_PATH", modules)
        .env("AWS_REGION", "us-west-2")
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("bench.js failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

// ---- memory ----

/// This benchmark as a Lambda function: the workload's handler served through the Runtime API.
fn function_main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let counts = Arc::new(orders::Counts::default());
    rt.block_on(floodway_lambda::serve(Handler::new(orders::processor(
        &counts,
        &Resilience::default(),
    ))))
    .unwrap();
}

/// Peak memory of this benchmark started as a Lambda function over one 10,000-record
/// invocation, and the invocation's size in MiB.
fn function_memory(rt_multi: &tokio::runtime::Runtime) -> (Row, f64) {
    let clean = invocations(&events(false)[..PER_INVOCATION]);
    let one: Value = serde_json::from_slice(&clean[0]).unwrap();
    let myself = std::env::current_exe().unwrap();
    let (peak, idle) = rt_multi.block_on(async {
        let runtime = LocalRuntime::start().await.unwrap();
        let process =
            FunctionProcess::spawn(&myself, &[], &runtime, &[(FUNCTION_ROLE, "1")]).unwrap();
        let pid = process.id().unwrap();
        let small: Value = serde_json::from_slice(&invocation(&events(false)[..1], 0)).unwrap();
        runtime
            .invoke(&small, Duration::from_secs(30))
            .await
            .unwrap();
        let idle = common::status_kib(pid, "VmHWM:");
        let answer = runtime.invoke(&one, Duration::from_secs(60)).await.unwrap();
        assert_eq!(
            answer["batchItemFailures"].as_array().map(Vec::len),
            Some(0)
        );
        (common::status_kib(pid, "VmHWM:"), idle)
    });
    let mib = |kib: u64| kib as f64 / 1024.0;
    let size_mib = clean[0].len() as f64 / (1 << 20) as f64;
    let row = Row {
        name: format!(
            "peak memory of the function process, one {PER_INVOCATION}-record invocation"
        ),
        result: format!("{:.1} MiB", mib(peak)),
        reference: format!(
            "{size_mib:.1} MiB invocation; {:.1} MiB after a 1-record one",
            mib(idle)
        ),
        ratio: format!(
            "{:.2}x the invocation; {:.2}x above the idle process",
            mib(peak) / size_mib,
            mib(peak.saturating_sub(idle)) / size_mib
        ),
    };
    (row, size_mib)
}

struct Row {
    name: String,
    result: String,
    reference: String,
    ratio: String,
}

fn main() {
    if std::env::var_os(FUNCTION_ROLE).is_some() {
        function_main();
        return;
    }
    // `FLOODWAY_BENCH_MEMORY=1`: only the function's peak memory.
    if std::env::var_os("FLOODWAY_BENCH_MEMORY").is_some() {
        let (row, _) = function_memory(&common::two_workers());
        eprintln!(
            "{}: {} ({}; {})",
            row.name, row.result, row.reference, row.ratio
        );
        return;
    }
    // `FLOODWAY_BENCH_PROFILE=N`: only the Floodway handler, N times over the clean input (to
    // run under a profiler).
    if let Some(n) = std::env::var("FLOODWAY_BENCH_PROFILE")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // The files the last full run wrote, else generated now.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench/lambda");
        let invocations = (0..INVOCATIONS)
            .map(|i| std::fs::read(dir.join(format!("kinesis-clean-{i}.json"))))
            .collect::<Result<Vec<_>, _>>()
            .unwrap_or_else(|_| invocations(&events(false)));
        let handler = Handler::new(orders::processor(
            &Arc::new(orders::Counts::default()),
            &Resilience::default(),
        ));
        if std::env::var_os("FLOODWAY_BENCH_LIMIT").is_some() {
            for _ in 0..n {
                let started = Instant::now();
                for bytes in &invocations {
                    let parsed: KinesisEvent<'_> = serde_json::from_slice(bytes).unwrap();
                    std::hint::black_box(parsed.records.len());
                }
                let parse = started.elapsed();
                let (rate, _) = limit(&invocations, INVOCATIONS * PER_INVOCATION);
                eprintln!("limit {rate:.0} records/s; invocation parse alone {parse:?}");
            }
            return;
        }
        for _ in 0..n {
            // `FLOODWAY_BENCH_OWNED=1`: each invocation handed over as `serve` does
            // (`Handler::handle_owned`), copied before the clock starts.
            let owned = std::env::var_os("FLOODWAY_BENCH_OWNED").is_some();
            let records = INVOCATIONS * PER_INVOCATION;
            let rate = floodway(&rt, &handler, &invocations, records, owned);
            eprintln!("{rate:.0} records/s");
        }
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench/lambda");
    std::fs::create_dir_all(&dir).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let records = INVOCATIONS * PER_INVOCATION;
    let mut rows = Vec::new();
    let mut sizes = Vec::new();
    let mut groups = Vec::new();
    for poison in [false, true] {
        let events = events(poison);
        sizes = events.iter().map(|e| e.to_json().len()).collect::<Vec<_>>();
        let invocations = invocations(&events);
        let variant = if poison { "poison" } else { "clean" };
        let files: Vec<PathBuf> = invocations
            .iter()
            .enumerate()
            .map(|(i, bytes)| {
                let path = dir.join(format!("kinesis-{variant}-{i}.json"));
                std::fs::write(&path, bytes).unwrap();
                path
            })
            .collect();
        let counts = Arc::new(orders::Counts::default());
        let handler = Handler::new(orders::processor(&counts, &Resilience::default()));
        let (mut ours, mut plain) = (Vec::new(), Vec::new());
        let mut limit_counts = [0; 3];
        for _ in 0..RUNS {
            let (rate, counted) = limit(&invocations, records);
            plain.push(rate);
            limit_counts = counted;
            ours.push(floodway(&rt, &handler, &invocations, records, false));
        }
        // Both did the same work.
        assert_eq!(counts.get().map(|c| c / RUNS as u64), limit_counts);
        let (ours, plain) = (common::median(ours), common::median(plain));
        let node = node(&files, RUNS);
        if let Some(node) = &node {
            assert_eq!(node["faults"].as_u64(), Some(limit_counts[2]), "{node}");
            assert_eq!(
                node["counted"]["accepted"].as_u64(),
                Some(limit_counts[0]),
                "{node}"
            );
        }
        let label = if poison {
            format!("with 1% poison ({} faults)", limit_counts[2])
        } else {
            "clean".to_owned()
        };
        rows.push(Row {
            name: format!("plain Rust, the limit, {label}"),
            result: format!("{plain:.0} records/s"),
            reference: "-".into(),
            ratio: "1.00".into(),
        });
        rows.push(Row {
            name: format!("Floodway handler, {label}"),
            result: format!("{ours:.0} records/s"),
            reference: format!("{plain:.0} records/s plain Rust"),
            ratio: format!("{:.2}", ours / plain),
        });
        let mut bars = vec![
            ("Floodway".to_owned(), ours),
            ("plain Rust (limit)".to_owned(), plain),
        ];
        if let Some(node) = &node {
            bars.push((
                "aws-lambda-stream".into(),
                node["records_per_s"].as_f64().unwrap_or(0.0),
            ));
        }
        groups.push(common::chart::Group {
            label: if poison { "1% poison" } else { "clean" }.into(),
            bars,
        });
        match &node {
            Some(node) => {
                let rate = node["records_per_s"].as_f64().unwrap_or(0.0);
                rows.push(Row {
                    name: format!(
                        "aws-lambda-stream {} (Node {}), {label}",
                        node["als"].as_str().unwrap_or("?"),
                        node["node"].as_str().unwrap_or("?")
                    ),
                    result: format!(
                        "{rate:.0} records/s, peak {:.0} MiB",
                        node["peak_rss_mib"].as_f64().unwrap_or(0.0)
                    ),
                    reference: format!("{ours:.0} records/s Floodway"),
                    ratio: format!("Floodway {:.1}x", ours / rate),
                });
            }
            None => rows.push(Row {
                name: format!("aws-lambda-stream, {label}"),
                result: "not installed (run scripts/bench)".into(),
                reference: "-".into(),
                ratio: "-".into(),
            }),
        }
    }
    sizes.sort_unstable();

    // Peak memory of a function process over one invocation.
    let rt_multi = common::two_workers();
    let (memory, size_mib) = function_memory(&rt_multi);
    rows.push(memory);

    // Cold start through the local Runtime API.
    let binary = Path::new(env!("CARGO_BIN_EXE_floodway-example-handler"));
    let mut starts = Vec::new();
    let small: Value = serde_json::from_slice(&invocation(&events(false)[..1], 0)).unwrap();
    for _ in 0..5 {
        let took = rt_multi.block_on(async {
            let runtime = LocalRuntime::start().await.unwrap();
            let started = Instant::now();
            let _process = FunctionProcess::spawn(binary, &[], &runtime, &[]).unwrap();
            runtime
                .invoke(&small, Duration::from_secs(30))
                .await
                .unwrap();
            started.elapsed()
        });
        starts.push(took.as_secs_f64() * 1000.0);
    }
    rows.push(Row {
        name: "cold start: process start to first answered invocation (local Runtime API)".into(),
        result: format!("{:.1} ms", common::median(starts)),
        reference: "-".into(),
        ratio: "-".into(),
    });
    let size = std::fs::metadata(binary).map(|m| m.len()).unwrap_or(0);
    let stripped = std::env::temp_dir().join("floodway-example-handler.stripped");
    let stripped_size = std::fs::copy(binary, &stripped)
        .ok()
        .and_then(|_| {
            std::process::Command::new("strip")
                .arg(&stripped)
                .status()
                .ok()
        })
        .and_then(|_| std::fs::metadata(&stripped).ok())
        .map(|m| m.len());
    let _ = std::fs::remove_file(&stripped);
    rows.push(Row {
        name: "example handler binary, release".into(),
        result: format!("{:.1} MiB as built", size as f64 / (1 << 20) as f64),
        reference: stripped_size
            .map(|s| format!("{:.1} MiB stripped", s as f64 / (1 << 20) as f64))
            .unwrap_or_else(|| "strip not available".into()),
        ratio: "-".into(),
    });

    out!(
        "{INVOCATIONS} Kinesis invocations of {PER_INVOCATION} records ({:.1} MiB each), events of \
         {}-{} bytes (median {}), one core, median of {RUNS} runs\n",
        size_mib,
        sizes[0],
        sizes[sizes.len() - 1],
        sizes[sizes.len() / 2]
    );
    out!("| measurement | result | reference | ratio |");
    out!("|---|---|---|---|");
    for r in rows {
        out!(
            "| {} | {} | {} | {} |",
            r.name,
            r.result,
            r.reference,
            r.ratio
        );
    }
    common::chart::save_table("lambda");
    common::chart::bars(
        "lambda",
        "Lambda handler, 100,000 Kinesis records, one core",
        "records per second",
        &groups,
    );
}
