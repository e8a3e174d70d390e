//! A kit for testing pipelines: feed recorded events, run a processor to the end, and look at
//! what each pipeline emitted and which faults were raised.
//!
//! ```
//! use floodway::testing::{generate, TestKit};
//! use floodway::{memory::MemorySink, pipeline::Pipeline};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let kit = TestKit::new();
//! let submitted = MemorySink::new();
//! let processor = kit
//!     .processor("orders")
//!     .pipeline(
//!         Pipeline::builder("submitted")
//!             .event_type("order-submitted")
//!             .sink(submitted.clone())
//!             .unwrap(),
//!     )
//!     .build()
//!     .unwrap();
//!
//! let events = generate::orders(100, 7);
//! let mut input = generate::to_jsonl(&events);
//! input.push_str("this line is not an event\n");
//! let report = kit.run_jsonl(&processor, &input).await.unwrap();
//!
//! let expected = events.iter().filter(|e| e.event_type() == "order-submitted").count();
//! assert_eq!(submitted.len(), expected);
//! assert_eq!(kit.faults().len(), 1, "the bad line became one fault");
//! assert_eq!(report.done, 101);
//! assert_eq!(kit.checkpoint("0"), Some(101));
//! # });
//! ```

pub mod conformance;

/// Other processes, for tests of what befalls one frozen, killed or left behind: the test
/// binary run again as a child that runs one test (which does its part when the environment
/// tells it to, and nothing otherwise).
pub mod processes {
    use std::ffi::OsStr;
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Child, Command, ExitStatus, Stdio};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// How long a child may take to say it is ready, and its output to end once it exited.
    const PATIENCE: Duration = Duration::from_secs(60);

    /// A child running one test of this test binary. Dropped, it is killed (a frozen one
    /// too) and reaped: a failing test leaves nothing running.
    pub struct TestProcess {
        child: Child,
        /// Its lines, standard error's marked `stderr: `, read by a thread for each stream.
        lines: mpsc::Receiver<String>,
    }

    impl TestProcess {
        /// Runs this test binary again as a child running only the test `test`, with `env`,
        /// and waits until it prints a line holding `ready`.
        ///
        /// # Panics
        /// When the child cannot be started, or is not ready within a minute (saying what it
        /// printed).
        pub fn spawn(test: &str, env: &[(&str, &OsStr)], ready: &str) -> TestProcess {
            let mut child = Command::new(std::env::current_exe().expect("the test binary"))
                // More than one test thread whatever the environment says: with one, the
                // harness writes the test's name on the line its first output goes to.
                .args(["--exact", test, "--nocapture", "--test-threads=2"])
                .envs(env.iter().copied())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("the test binary runs again");
            let (tx, lines) = mpsc::channel();
            let stdout = child.stdout.take().expect("its output");
            let stderr = child.stderr.take().expect("its errors");
            forward(stdout, "", tx.clone());
            forward(stderr, "stderr: ", tx);
            let process = TestProcess { child, lines };
            let deadline = Instant::now() + PATIENCE;
            let mut seen = String::new();
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match process.lines.recv_timeout(left) {
                    Ok(line) if line.contains(ready) => return process,
                    Ok(line) => {
                        seen.push_str(&line);
                        seen.push('\n');
                    }
                    Err(_) => panic!("{test} did not print `{ready}`; it printed:\n{seen}"),
                }
            }
        }

        /// Its process id.
        pub fn id(&self) -> u32 {
            self.child.id()
        }

        /// Sends it `signal` (`-STOP`, `-CONT`).
        ///
        /// # Panics
        /// When `kill` fails.
        pub fn signal(&self, signal: &str) {
            let status = Command::new("kill")
                .args([signal, &self.id().to_string()])
                .status()
                .expect("kill runs");
            assert!(status.success(), "kill {signal} {}", self.id());
        }

        /// Kills it with SIGKILL (it releases nothing) and reaps it.
        pub fn kill(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }

        /// How it ended, once it ends; `None` when it still ran after `limit` (it is then
        /// killed).
        ///
        /// # Panics
        /// When its status cannot be read.
        pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
            let deadline = Instant::now() + limit;
            loop {
                if let Some(status) = self.child.try_wait().expect("the child's status") {
                    return Some(status);
                }
                if Instant::now() > deadline {
                    self.kill();
                    return None;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        /// What it printed after it was ready, up to the end of its output (it ended, or
        /// was killed): at most a minute's wait for that end.
        pub fn output(&mut self) -> String {
            let deadline = Instant::now() + PATIENCE;
            let mut out = String::new();
            while let Ok(line) = self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                out.push_str(&line);
                out.push('\n');
            }
            out
        }
    }

    impl Drop for TestProcess {
        fn drop(&mut self) {
            self.kill();
        }
    }

    /// Sends each line of `stream`, marked with `mark`, until it ends or nobody listens.
    fn forward(stream: impl Read + Send + 'static, mark: &'static str, tx: mpsc::Sender<String>) {
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if tx.send(format!("{mark}{line}")).is_err() {
                    break;
                }
            }
        });
    }

    /// The processor of a process to be frozen: its one pipeline's sink takes 100 ms a call
    /// and prints the wall-clock time each call starts (`sink call at <ms> with <n>`), so
    /// that its source reads ahead of it, with `in_flight` records at most under way and
    /// pulled at once, and no commit due for a minute (thawed, its first act is to take more
    /// work).
    ///
    /// # Panics
    /// Never: the processor is valid.
    pub fn slow_printing_processor(in_flight: usize) -> crate::Processor {
        let sink = crate::sink_fn(|batch: crate::Batch| async move {
            let at = crate::event::now_millis();
            println!("sink call at {at} with {}", batch.len());
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, crate::Error>(())
        });
        crate::Processor::builder("frozen")
            .fault_sink(crate::memory::MemoryFaultSink::new())
            .max_in_flight(in_flight)
            .pull_batch(in_flight)
            .commit_interval(Duration::from_secs(60))
            .pipeline(crate::Pipeline::builder("all").sink(sink).expect("a sink"))
            .build()
            .expect("a valid processor")
    }

    /// Runs `processor` until its run ends, prints why (`run ended: ...`), and ends the
    /// process with status 3.
    pub async fn run_then_exit(
        processor: crate::Processor,
        source: impl crate::Source,
        checkpointer: impl crate::Checkpointer,
    ) {
        match processor
            .run(source, checkpointer, std::future::pending())
            .await
        {
            Ok(report) => println!("run ended: {report:?}"),
            Err(err) => println!("run ended: {err}"),
        }
        std::process::exit(3);
    }

    /// A runtime of two worker threads, as a process holding a subscription runs.
    ///
    /// # Panics
    /// When the runtime cannot be built.
    pub fn two_threads() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime")
    }

    /// How many of the sink calls `output` tells of ([`slow_printing_processor`]) started at
    /// or after `since` (ms since the epoch).
    pub fn calls_since(output: &str, since: i64) -> usize {
        output
            .lines()
            .filter_map(|l| Some(&l[l.find("sink call at ")? + "sink call at ".len()..]))
            .filter_map(|l| l.split_whitespace().next()?.parse::<i64>().ok())
            .filter(|at| *at >= since)
            .count()
    }
}

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, RunError};
use crate::event::Event;
use crate::memory::{MemoryCheckpointer, MemoryFaultSink, MemorySink, MemorySource};
use crate::runtime::{Processor, ProcessorBuilder, RunReport};
use crate::sink::Delivery;
use crate::uow::{Batch, Uow};

/// Holds a fault sink and a checkpointer for the processors a test builds.
#[derive(Debug, Clone, Default)]
pub struct TestKit {
    faults: MemoryFaultSink,
    checkpointer: MemoryCheckpointer,
}

impl TestKit {
    /// A new kit.
    pub fn new() -> Self {
        Self::default()
    }

    /// A processor builder whose fault sink is the kit's.
    pub fn processor(&self, name: &str) -> ProcessorBuilder {
        Processor::builder(name).fault_sink(self.faults.clone())
    }

    /// Runs `processor` over `source` to its end.
    ///
    /// # Errors
    /// As [`Processor::run`].
    pub async fn run(
        &self,
        processor: &Processor,
        source: MemorySource,
    ) -> Result<RunReport, RunError> {
        processor
            .run(source, self.checkpointer.clone(), std::future::pending())
            .await
    }

    /// Runs `processor` over JSON lines (partition `0`, offsets from 1) to their end.
    ///
    /// # Errors
    /// As [`Processor::run`].
    pub async fn run_jsonl(
        &self,
        processor: &Processor,
        jsonl: &str,
    ) -> Result<RunReport, RunError> {
        self.run(processor, MemorySource::from_jsonl(jsonl)).await
    }

    /// The fault events raised so far.
    pub fn faults(&self) -> Vec<Event> {
        self.faults.faults()
    }

    /// The fault sink.
    pub fn fault_sink(&self) -> &MemoryFaultSink {
        &self.faults
    }

    /// The checkpointer.
    pub fn checkpointer(&self) -> &MemoryCheckpointer {
        &self.checkpointer
    }

    /// The committed checkpoint of a partition.
    pub fn checkpoint(&self, partition: &str) -> Option<u64> {
        self.checkpointer.checkpoint(partition)
    }
}

/// What a [`ScriptedSink`]'s script sees of a call.
#[derive(Debug)]
#[non_exhaustive]
pub struct Call<'a> {
    /// 1 for the first call to the sink (or any of its clones), 2 for the next, ...
    pub number: u64,
    /// The batch.
    pub batch: &'a Batch,
    /// Time since the sink was created, on tokio's clock.
    pub elapsed: Duration,
}

type Script = dyn Fn(&Call<'_>) -> Result<Delivery, Error> + Send + Sync;

/// A sink that answers as a script says: for flaky targets, poison events, outages.
///
/// The script sees each call and returns `Ok(())` to accept the batch (it is then kept in
/// [`delivered`](ScriptedSink::delivered) after the sink's latency), a [`Delivery`] naming the
/// entries that failed (the others are kept), or an error to fail the call at once. Clones
/// share the script, the counters and the delivered events.
///
/// ```
/// use std::time::Duration;
/// use floodway::{testing::ScriptedSink, Error};
///
/// // Down for the first ten seconds, then answering in 5 ms.
/// let sink = ScriptedSink::new(|call| {
///     if call.elapsed < Duration::from_secs(10) {
///         Err(Error::transient_msg("ConnectionRefused", "down"))
///     } else {
///         Ok(())
///     }
/// })
/// .with_latency(Duration::from_millis(5));
/// ```
#[derive(Clone)]
pub struct ScriptedSink {
    script: Arc<Script>,
    latency: Duration,
    created: Instant,
    calls: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
    delivered: MemorySink,
}

impl std::fmt::Debug for ScriptedSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptedSink")
            .field("calls", &self.calls())
            .field("failures", &self.failures())
            .finish_non_exhaustive()
    }
}

impl ScriptedSink {
    /// A sink answering per `script`, with no latency.
    pub fn new<F, R>(script: F) -> Self
    where
        F: Fn(&Call<'_>) -> Result<R, Error> + Send + Sync + 'static,
        R: Into<Delivery>,
    {
        ScriptedSink {
            script: Arc::new(move |call: &Call<'_>| script(call).map(Into::into)),
            latency: Duration::ZERO,
            created: Instant::now(),
            calls: Arc::default(),
            failures: Arc::default(),
            delivered: MemorySink::new(),
        }
    }

    /// Each accepted call takes this long (on tokio's clock) before it answers.
    #[must_use]
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// The events of every accepted call.
    pub fn delivered(&self) -> &MemorySink {
        &self.delivered
    }

    /// How many calls were made.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// How many calls the script failed.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::SeqCst)
    }
}

impl ScriptedSink {
    async fn write(&self, batch: Batch) -> Result<Delivery, Error> {
        let call = Call {
            number: self.calls.fetch_add(1, Ordering::SeqCst) + 1,
            batch: &batch,
            elapsed: self.created.elapsed(),
        };
        let answer = (self.script)(&call);
        if answer.is_err() {
            self.failures.fetch_add(1, Ordering::SeqCst);
        }
        let delivery = answer?;
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let kept: Vec<Uow> = batch
            .items()
            .iter()
            .enumerate()
            .filter(|(i, _)| !delivery.failed().iter().any(|(f, _)| f == i))
            .map(|(_, u)| u.clone())
            .collect();
        if !kept.is_empty() {
            self.delivered.write(Batch::new(kept)).await?;
        }
        Ok(delivery)
    }
}

crate::impl_sink!(ScriptedSink, write);

/// Generators of realistic events, deterministic for a seed.
pub mod generate {
    use serde_json::json;

    use crate::event::Event;

    const STATUSES: [&str; 4] = [
        "order-submitted",
        "order-paid",
        "order-shipped",
        "order-delivered",
    ];
    const CITIES: [&str; 6] = ["Lisbon", "Osaka", "Denver", "Nairobi", "Oslo", "Lima"];
    const SKUS: [&str; 5] = ["SKU-1001", "SKU-2044", "SKU-3310", "SKU-4020", "SKU-7777"];

    /// `n` order events of about 400 bytes: each order goes through submitted, paid, shipped
    /// and delivered in time order, keyed by order id; a few customer updates are mixed in.
    pub fn orders(n: usize, seed: u64) -> Vec<Event> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let base = 1_700_000_000_000i64;
        let orders = (n / 4).max(1);
        let mut stage = vec![0usize; orders];
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let ts = base + i as i64 * 10;
            if rng.u8(..100) < 5 {
                let c = rng.u32(..1000);
                out.push(
                    Event::builder("customer-updated", format!("c-{c}"))
                        .id(format!("e-{seed}-{i}"))
                        .timestamp(ts)
                        .tag("source", "crm")
                        .field(
                            "customer",
                            json!({
                                "id": format!("c-{c}"),
                                "name": format!("Customer {c}"),
                                "email": format!("customer{c}@example.com"),
                                "city": CITIES[rng.usize(..CITIES.len())],
                                "tier": if rng.bool() { "gold" } else { "standard" },
                            }),
                        )
                        .build(),
                );
                continue;
            }
            let o = rng.usize(..orders);
            let s = stage[o].min(STATUSES.len() - 1);
            stage[o] += 1;
            let qty = rng.u32(1..5);
            let price = rng.u32(100..20_000);
            out.push(
                Event::builder(STATUSES[s], format!("o-{o}"))
                    .id(format!("e-{seed}-{i}"))
                    .timestamp(ts)
                    .tag("source", "web")
                    .tag("region", "eu-west-1")
                    .field(
                        "order",
                        json!({
                            "id": format!("o-{o}"),
                            "customerId": format!("c-{}", o % 1000),
                            "status": STATUSES[s].trim_start_matches("order-"),
                            "items": [
                                {"sku": SKUS[rng.usize(..SKUS.len())], "quantity": qty, "price": price},
                                {"sku": SKUS[rng.usize(..SKUS.len())], "quantity": 1, "price": 499},
                            ],
                            "channel": if rng.bool() { "web" } else { "mobile" },
                            "total": qty * price + 499,
                            "currency": "EUR",
                            "shipTo": {"city": CITIES[rng.usize(..CITIES.len())], "country": "PT"},
                        }),
                    )
                    .build(),
            );
        }
        out
    }

    /// Encodes events as JSON lines.
    pub fn to_jsonl(events: &[Event]) -> String {
        let mut out = String::new();
        for e in events {
            out.push_str(&e.to_json());
            out.push('\n');
        }
        out
    }

    /// Replaces about `per_mille` of every 1000 lines with a poison line of varied kinds (not
    /// JSON, missing field, wrong type); returns how many were replaced.
    pub fn poison_lines(lines: &mut [String], per_mille: u32, seed: u64) -> usize {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut count = 0;
        for (i, line) in lines.iter_mut().enumerate() {
            if rng.u32(..1000) < per_mille {
                *line = match i % 3 {
                    0 => format!("{{\"id\":\"bad-{i}\",\"type\":\"order-submitted\""),
                    1 => format!("{{\"id\":\"bad-{i}\",\"type\":\"order-submitted\",\"timestamp\":1}}"),
                    _ => format!("{{\"id\":\"bad-{i}\",\"type\":\"order-submitted\",\"timestamp\":\"now\",\"partitionKey\":\"o\"}}"),
                };
                count += 1;
            }
        }
        count
    }
}
