//! Lambda benchmarks: `cargo bench -p floodway-lambda --bench lambda`.
//!
//! - handler throughput on a 10,000-record Kinesis batch (the invocation's JSON parsed, records
//!   decoded, two pipelines shaped like the core benchmark's, the answer built), against the
//!   raw cost of base64-decoding and parsing and re-encoding the same records with serde_json,
//!   measured in the same run, on one core;
//! - peak memory of this process (VmHWM) after those runs;
//! - cold start: from starting the example handler binary to its first answered invocation
//!   through the local Lambda Runtime API (median of 5);
//! - the example handler's release binary size, as built and stripped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use floodway::testing::generate;
use floodway::{fault_sink_fn, sink_fn, Batch, BatchConfig, Error, Event, Pipeline, Processor};
use floodway_lambda::{FunctionProcess, Handler, LocalRuntime};
use serde_json::{json, Value};

const RECORDS: usize = 10_000;
const RUNS: usize = 7;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn payload(events: &[Event]) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let records: Vec<Value> = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            json!({
                "kinesis": {
                    "kinesisSchemaVersion": "1.0",
                    "partitionKey": e.partition_key(),
                    "sequenceNumber": format!("4959{:020}", i),
                    "data": b64.encode(e.to_json()),
                    "approximateArrivalTimestamp": 1_700_000_000.5,
                },
                "eventSource": "aws:kinesis",
                "eventVersion": "1.0",
                "eventID": format!("shardId-000000000000:4959{:020}", i),
                "eventName": "aws:kinesis:record",
                "invokeIdentityArn": "arn:aws:iam::000000000000:role/bench",
                "awsRegion": "eu-west-1",
                "eventSourceARN": "arn:aws:kinesis:eu-west-1:000000000000:stream/orders",
            })
        })
        .collect();
    serde_json::to_vec(&json!({ "Records": records })).unwrap()
}

fn processor(counted: &Arc<AtomicU64>) -> Processor {
    let sink = |counted: Arc<AtomicU64>| {
        sink_fn(move |batch: Batch| {
            counted.fetch_add(batch.len() as u64, Ordering::Relaxed);
            std::future::ready(Ok::<_, Error>(()))
        })
    };
    Processor::builder("bench")
        .fault_sink(fault_sink_fn(|_f: Event| {
            std::future::ready(Ok::<_, Error>(()))
        }))
        .pipeline(
            Pipeline::builder("each")
                .event_type("order-*")
                .sink(sink(counted.clone()))
                .unwrap(),
        )
        .pipeline(
            Pipeline::builder("batched")
                .batch(BatchConfig::count(25))
                .sink(sink(counted.clone()))
                .unwrap(),
        )
        .build()
        .unwrap()
}

/// The raw cost: parse the invocation, and per record base64-decode, parse and re-encode.
fn raw(bytes: &[u8]) -> f64 {
    let started = Instant::now();
    let value: Value = serde_json::from_slice(bytes).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = 0usize;
    for r in value["Records"].as_array().unwrap() {
        let data = b64.decode(r["kinesis"]["data"].as_str().unwrap()).unwrap();
        let event: Value = serde_json::from_slice(&data).unwrap();
        out += serde_json::to_vec(&event).unwrap().len();
    }
    std::hint::black_box(out);
    RECORDS as f64 / started.elapsed().as_secs_f64()
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let events = generate::orders(RECORDS, 11);
    let bytes = payload(&events);
    let counted = Arc::new(AtomicU64::new(0));
    let handler = Handler::new(processor(&counted));
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        base.push(raw(&bytes));
        let started = Instant::now();
        let answer = rt.block_on(async { handler.handle_bytes(&bytes, None).await.unwrap() });
        ours.push(RECORDS as f64 / started.elapsed().as_secs_f64());
        assert_eq!(
            answer["batchItemFailures"].as_array().map(Vec::len),
            Some(0)
        );
    }
    let (ours, base) = (median(ours), median(base));
    println!(
        "{RECORDS}-record Kinesis batch ({:.1} MiB invocation), one core, median of {RUNS}\n",
        bytes.len() as f64 / (1 << 20) as f64
    );
    println!("| measurement | result | baseline | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| handler throughput, 10,000-record Kinesis batch | {ours:.0} records/s | {base:.0} records/s raw serde | {:.2} |",
        ours / base
    );

    // Cold start through the local Runtime API.
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_floodway-example-handler"));
    let mut starts = Vec::new();
    let one = serde_json::from_slice::<Value>(&payload(&events[..1])).unwrap();
    let rt_multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for _ in 0..5 {
        let took = rt_multi.block_on(async {
            let runtime = LocalRuntime::start().await.unwrap();
            let started = Instant::now();
            let _process = FunctionProcess::spawn(binary, &[], &runtime, &[]).unwrap();
            let answer = runtime.invoke(&one, Duration::from_secs(30)).await.unwrap();
            assert_eq!(
                answer["batchItemFailures"].as_array().map(Vec::len),
                Some(0)
            );
            started.elapsed()
        });
        starts.push(took.as_secs_f64() * 1000.0);
    }
    println!(
        "| cold start: process start to first answered invocation (local Runtime API) | {:.1} ms | - | - |",
        median(starts)
    );
    // Peak memory of the function process over a 10,000-record invocation.
    let (peak, idle) = rt_multi.block_on(async {
        let runtime = LocalRuntime::start().await.unwrap();
        let process = FunctionProcess::spawn(binary, &[], &runtime, &[]).unwrap();
        let pid = process.id().unwrap();
        runtime.invoke(&one, Duration::from_secs(30)).await.unwrap();
        let idle = peak_rss_kib(pid);
        let all: Value = serde_json::from_slice(&bytes).unwrap();
        let answer = runtime.invoke(&all, Duration::from_secs(60)).await.unwrap();
        assert_eq!(
            answer["batchItemFailures"].as_array().map(Vec::len),
            Some(0)
        );
        (peak_rss_kib(pid), idle)
    });
    println!(
        "| peak memory of the function process over the 10,000-record invocation | {:.1} MiB | {:.1} MiB after a 1-record invocation | - |",
        peak as f64 / 1024.0,
        idle as f64 / 1024.0
    );
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
    println!(
        "| example handler binary, release | {:.1} MiB as built (debug line tables) | {} | - |",
        size as f64 / (1 << 20) as f64,
        stripped_size
            .map(|s| format!("{:.1} MiB stripped", s as f64 / (1 << 20) as f64))
            .unwrap_or_else(|| "strip not available".into())
    );
}
