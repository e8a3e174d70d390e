//! The embedded hub through the command: `cargo bench -p floodway-cli --bench command`.
//!
//! The same work done twice in one run, through the library and through the `floodway`
//! binary, so the ratio is what the command adds:
//!
//! - **publish**: a file of generated order events (JSON lines) into a fresh hub: the library's
//!   `Hub::publish` in chunks of 1,000 (the events decoded beforehand) against
//!   `floodway hub publish FILE`, which reads, decodes and publishes as it goes; with the
//!   command's peak memory, for this file and for one five times larger;
//! - **materialize**: the published events into a view, with one configuration file, each
//!   over a hub the library published: the library builds and runs its processors
//!   (`build_all`, `run_all`), against `floodway run CONFIG`. Both follow the hub as a service
//!   does (so the last batch of each waits its time limit, as it would in production) and both
//!   are timed until their metrics say every order event is in the view, polled every 5 ms;
//!   the command's time starts with its process.

#[path = "../../floodway/benches/common/mod.rs"]
#[macro_use]
mod common;

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use floodway::hub::ReadOptions;
use floodway::testing::generate;
use floodway::Event;
use floodway_embedded::{Hub, HubOptions};
use floodway_processors::config::Config;

const RUNS: usize = 3;

fn floodway() -> Command {
    Command::new(env!("CARGO_BIN_EXE_floodway"))
}

/// The configuration: the hub file `hub` and one view of every order event.
fn config(hub: &str) -> String {
    format!(
        r#"[hub]
path = "{hub}"
partitions = 8

[[processors]]
kind = "materialize"
name = "orders-view"
types = ["order-*"]
view = "orders"
key = "/order/id"
value = "/order"
"#
    )
}

/// Runs `command` to its end; its wall time and peak memory (VmHWM, sampled every 5 ms).
fn timed(mut command: Command) -> (Duration, u64) {
    let started = Instant::now();
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut peak = 0;
    loop {
        peak = peak.max(common::status_kib(child.id(), "VmHWM:"));
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).ok();
            assert!(status.success(), "{err}");
            return (started.elapsed(), peak);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The sum of `floodway_events_total{outcome="delivered"}` at a Prometheus endpoint.
fn delivered(addr: &str) -> Option<u64> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    Some(delivered_in(&body))
}

/// The sum of `floodway_events_total{outcome="delivered"}` in Prometheus's text format.
fn delivered_in(text: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with("floodway_events_total") && l.contains("outcome=\"delivered\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A child process, killed if the benchmark fails while it runs.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `floodway run` in `dir` until `expected` events are delivered; seconds from the start.
fn command_run(dir: &Path, expected: u64) -> f64 {
    let addr = format!("127.0.0.1:{}", floodway_nats::testing::free_port());
    let started = Instant::now();
    let mut child = Running(
        floodway()
            .current_dir(dir)
            .args(["run", "floodway.toml", "--metrics", &addr])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let took = loop {
        if delivered(&addr).is_some_and(|n| n >= expected) {
            break started.elapsed();
        }
        assert!(child.0.try_wait().unwrap().is_none(), "floodway run exited");
        assert!(started.elapsed() < Duration::from_secs(300), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    };
    Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    child.0.wait().unwrap();
    took.as_secs_f64()
}

/// The library over the same configuration in `dir`, following the hub as `floodway run`
/// does, until this process's metrics (`metrics`) count `expected` more events delivered;
/// seconds from building the processors.
fn library_run(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    metrics: &metrics_exporter_prometheus::PrometheusHandle,
    expected: u64,
) -> f64 {
    let text = std::fs::read_to_string(dir.join("floodway.toml")).unwrap();
    let hub = dir.join("hub.db");
    let config = Config::parse(&text.replace("\"hub.db\"", &format!("{hub:?}"))).unwrap();
    let before = delivered_in(&metrics.render());
    rt.block_on(async {
        let started = Instant::now();
        let (hubs, processors) = floodway_processors::build_all(&config).await.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(async move {
            let stopped = async {
                stopped.await.ok();
            };
            floodway_processors::run_all(&hubs.events, processors, ReadOptions::default(), stopped)
                .await
        });
        while delivered_in(&metrics.render()) < before + expected {
            assert!(!run.is_finished(), "the processors stopped");
            assert!(started.elapsed() < Duration::from_secs(300), "no progress");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let took = started.elapsed().as_secs_f64();
        let _ = stop.send(());
        run.await.unwrap().unwrap();
        took
    })
}

/// Publishes `events` into a new hub in `dir` through the library, 1,000 at a time; seconds.
fn library_publish(rt: &tokio::runtime::Runtime, dir: &Path, events: &[Event]) -> f64 {
    let hub = Hub::open(dir.join("hub.db"), HubOptions::default()).unwrap();
    let started = Instant::now();
    rt.block_on(async {
        for chunk in events.chunks(1_000) {
            hub.publish(chunk).await.unwrap();
        }
    });
    started.elapsed().as_secs_f64()
}

fn main() {
    let n = common::events_wanted(200_000);
    let rt = common::two_workers();
    // As `floodway run --metrics` records them, for the library's runs.
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    metrics::set_global_recorder(recorder).unwrap();
    let tmp = tempfile::tempdir_in(".").unwrap();
    eprintln!("generating {n} events...");
    let events = generate::orders(n, 5);
    let orders = events
        .iter()
        .filter(|e| e.event_type().starts_with("order-"))
        .count() as u64;
    let file = tmp.path().join("events.jsonl");
    std::fs::write(&file, generate::to_jsonl(&events)).unwrap();
    let big = tmp.path().join("big.jsonl");
    std::fs::write(&big, generate::to_jsonl(&generate::orders(5 * n, 6))).unwrap();
    let size = |p: &Path| std::fs::metadata(p).unwrap().len() as f64 / (1 << 20) as f64;
    let decoded: Vec<Event> = events
        .iter()
        .map(|e| Event::decode(e.to_json().as_bytes()).unwrap())
        .collect();

    let mut rows = Vec::new();
    let (mut lib_pub, mut cmd_pub, mut lib_run, mut cmd_run) = (vec![], vec![], vec![], vec![]);
    let mut publish_peak = 0;
    for run in 0..RUNS {
        eprintln!("run {} of {RUNS}...", run + 1);
        let lib = tmp.path().join(format!("lib{run}"));
        let cmd = tmp.path().join(format!("cmd{run}"));
        for dir in [&lib, &cmd] {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join("floodway.toml"), config("hub.db")).unwrap();
        }
        // Publish: the library, then the command, into fresh hubs.
        lib_pub.push(n as f64 / library_publish(&rt, &lib, &decoded));
        let mut publish = floodway();
        publish
            .current_dir(&cmd)
            .args(["hub", "publish", "--hub", "hub.db"])
            .arg(&file);
        let (took, peak) = timed(publish);
        cmd_pub.push(n as f64 / took.as_secs_f64());
        publish_peak = publish_peak.max(peak);
        // Materialize: the library and the command, each over a hub the library published
        // (one published idempotently, as `hub publish` does by default, holds a dedupe table
        // beside the segments and reads slower: BENCHMARKS.md), taking turns at going first,
        // each after the writes before it are on disk (the kernel's writeback of one run's
        // files would otherwise run during the next).
        let cmd = tmp.path().join(format!("run{run}"));
        std::fs::create_dir_all(&cmd).unwrap();
        std::fs::write(cmd.join("floodway.toml"), config("hub.db")).unwrap();
        library_publish(&rt, &cmd, &decoded);
        let settle = || assert!(Command::new("sync").status().unwrap().success());
        for first in [run % 2 == 0, run % 2 == 1] {
            settle();
            if first {
                lib_run.push(orders as f64 / library_run(&rt, &lib, &metrics, orders));
            } else {
                cmd_run.push(orders as f64 / command_run(&cmd, orders));
            }
        }
    }
    let mut big_publish = floodway();
    let big_dir = tmp.path().join("big");
    std::fs::create_dir_all(&big_dir).unwrap();
    big_publish
        .current_dir(&big_dir)
        .args(["hub", "publish", "--hub", "hub.db"])
        .arg(&big);
    let (_, big_peak) = timed(big_publish);

    let (lib_pub, cmd_pub, lib_run, cmd_run) = (
        common::median(lib_pub),
        common::median(cmd_pub),
        common::median(lib_run),
        common::median(cmd_run),
    );
    let mib = |kib: u64| kib as f64 / 1024.0;
    rows.push(format!(
        "| publish {n} events: library `Hub::publish`, chunks of 1,000 (reference) | {lib_pub:.0} ev/s | - | 1.00 | - |"
    ));
    rows.push(format!(
        "| publish {n} events: `floodway hub publish` of a {:.0} MiB file | {cmd_pub:.0} ev/s | {lib_pub:.0} ev/s library | {:.2} | - |",
        size(&file),
        cmd_pub / lib_pub
    ));
    rows.push(format!(
        "| peak memory of `floodway hub publish`: {:.0} MiB file; {:.0} MiB file | {:.1} MiB; {:.1} MiB | - | - | <= 64 MiB whatever the size |",
        size(&file),
        size(&big),
        mib(publish_peak),
        mib(big_peak)
    ));
    rows.push(format!(
        "| materialize {orders} order events: library, the configuration's processors (reference) | {lib_run:.0} ev/s | - | 1.00 | - |"
    ));
    rows.push(format!(
        "| materialize {orders} order events: `floodway run`, from the process's start | {cmd_run:.0} ev/s | {lib_run:.0} ev/s library | {:.2} | >= 0.90 of the library |",
        cmd_run / lib_run
    ));
    out!("{n} generated events, embedded hub of 8 partitions, median of {RUNS} runs\n");
    out!("| measurement | result | reference | ratio | goal |");
    out!("|---|---|---|---|---|");
    for row in rows {
        out!("{row}");
    }
    common::chart::save_table("command");
    common::chart::bars(
        "command",
        "Embedded hub: the floodway command beside the library, same work",
        "events per second",
        &[
            common::chart::Group {
                label: "publish a file".into(),
                bars: vec![
                    ("floodway command".into(), cmd_pub),
                    ("library".into(), lib_pub),
                ],
            },
            common::chart::Group {
                label: "materialize into a view".into(),
                bars: vec![
                    ("floodway command".into(), cmd_run),
                    ("library".into(), lib_run),
                ],
            },
        ],
    );
}
