//! HTTP gateway benchmark: `cargo bench -p floodway-http --bench gateway`.
//!
//! Does the adaptive concurrency limiter find and hold a real service's capacity?
//!
//! **The service** is a loopback HTTP/1.1 server (hyper) that takes `capacity` requests at
//! once: a request arriving while `capacity` are in flight is answered 429 at once (no
//! `Retry-After`); the others sleep a latency drawn from a distribution and are answered 200.
//! The distributions: a fixed 20 ms; log-normal with a median of 20 ms and sigma 0.25, 0.5 or
//! 1.0; bimodal, 95% at 20 ms and 5% at 200 ms. The server counts successes and 429s per
//! 100 ms window and records its own latencies: the time each admitted request held its slot
//! (the drawn sleep as the timer served it, about a millisecond longer than drawn).
//!
//! **The client** is Floodway's own path: a [`Processor`] with one [`Pipeline`] whose sink is
//! [`HttpSink`] posting to the server, behind the resilience stack (default retries and
//! breaker, a 10 s timeout) with the limiter under test, and a pipeline parallelism of four
//! times the capacity (at least 64), so that the limiter, not the pipeline, is the bound. The
//! source never runs dry (one distinct partition key per event); the processor is stopped
//! after the run. A thin service around the sink times each successful attempt (client
//! latency), and the limit is sampled every 100 ms.
//!
//! **Scenarios**: capacities 4, 16 and 64 with each distribution, each run with the adaptive
//! limiter (`ConcurrencyLimiter::adaptive(Aimd::default(), ..)`) and, as the reference, with a
//! fixed limit equal to the capacity: a warm-up, then a measured window. A capacity change:
//! capacity 16 with log-normal sigma 0.5, halved to 8, then restored to 16. And a service
//! that queues: the same server, but a request arriving while `capacity` are in flight waits
//! for a slot (first come, first served) instead of being refused, as a database or most HTTP
//! servers do, saying nothing of its load but by its latency (capacities 4, 16 and 64,
//! log-normal sigma 0.25 and 0.5).
//!
//! **Runtimes**: the client runs on a multi-thread tokio runtime with two workers (the
//! machine's two cores), as a deployed processor would. The server runs on a current-thread
//! runtime of its own, on its own OS thread, so that its sleeps and accept loop never wait in
//! the client's task queues: the service's latency is what the server means it to be, and
//! whatever the client adds (HTTP, scheduling, the limiter) shows as client latency above the
//! service's. They still share the two cores.
//!
//! Environment:
//! - `FLOODWAY_BENCH_SECONDS`: the measured window of a steady scenario (default 5 s); the
//!   warm-up is 0.6 of it (3 s by default) and each phase of the capacity change twice it
//!   (10 s by default). `FLOODWAY_BENCH_SECONDS=1` is a quick check of the harness, not a
//!   result: its 0.6 s warm-up is shorter than the adaptive limit's climb from 4 to 64
//!   (about 2.5 s), so the capacity-64 rows then measure the climb.
//! - `FLOODWAY_BENCH_ONLY`: run only the scenarios whose name contains this (e.g. `c16`,
//!   `lognormal0.5`, `bimodal`, `change`).
//! - `FLOODWAY_BENCH_TRACE`: when set, print each run's 500 ms windows to stderr (limit,
//!   goodput, throttled share, service latency), to see how the limit moves.
//!
//! Prints three markdown tables (steady scenarios, capacity change, a queueing service) with
//! the goals beside the results; progress goes to stderr.

#[path = "../../floodway/benches/common/mod.rs"]
#[macro_use]
mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use floodway::error::{CommitError, SourceError};
use floodway::layer::limit::concurrency::{Aimd, ConcurrencyLimiter};
use floodway::layer::Resilience;
use floodway::{
    fault_sink_fn, Batch, Checkpoint, Checkpointer, Delivery, Error, Event, Pipeline, Processor,
    Record, Source,
};
use floodway_http::{HttpSink, HttpSinkConfig};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tower::ServiceExt;

/// The recording window.
const SLOT: Duration = Duration::from_millis(100);
/// The window of the capacity-change criteria, in slots (500 ms).
const CHANGE_WINDOW: usize = 5;
/// The service's median latency, in seconds.
const MEDIAN: f64 = 0.020;

// ---------------------------------------------------------------------------------------------
// Recording

/// What happened in one 100 ms window.
#[derive(Debug, Default, Clone)]
struct Slot {
    /// 2xx answers sent by the server.
    ok: u64,
    /// 429 answers sent by the server.
    throttled: u64,
    /// How long each 2xx request held its slot at the server (seconds).
    service: Vec<f64>,
    /// How long each successful attempt took at the client, around `HttpSink` (seconds).
    client: Vec<f64>,
    /// Samples of the limiter's limit.
    limits: Vec<usize>,
    /// How long each request waited for a slot at a queueing server (seconds).
    queued: Vec<f64>,
}

/// Slots from a common start, shared by the server, the client and the sampler.
#[derive(Debug)]
struct Recorder {
    start: Instant,
    slots: Mutex<Vec<Slot>>,
}

impl Recorder {
    fn new() -> Arc<Self> {
        Arc::new(Recorder {
            start: Instant::now(),
            slots: Mutex::new(Vec::new()),
        })
    }

    /// Updates the slot of now.
    fn record(&self, f: impl FnOnce(&mut Slot)) {
        let i = (self.start.elapsed().as_nanos() / SLOT.as_nanos()) as usize;
        let mut slots = self.slots.lock().unwrap();
        if slots.len() <= i {
            slots.resize_with(i + 1, Slot::default);
        }
        f(&mut slots[i]);
    }

    fn slots(&self) -> Vec<Slot> {
        self.slots.lock().unwrap().clone()
    }
}

/// Slots `range` taken together.
#[derive(Debug, Default)]
struct Totals {
    ok: u64,
    throttled: u64,
    service: Vec<f64>,
    client: Vec<f64>,
    limits: Vec<usize>,
    queued: Vec<f64>,
}

impl Totals {
    fn of(slots: &[Slot], range: Range<usize>) -> Totals {
        let mut t = Totals::default();
        let clamp = |i: usize| i.min(slots.len());
        for s in &slots[clamp(range.start)..clamp(range.end)] {
            t.ok += s.ok;
            t.throttled += s.throttled;
            t.service.extend(&s.service);
            t.client.extend(&s.client);
            t.limits.extend(&s.limits);
            t.queued.extend(&s.queued);
        }
        t
    }

    /// 429s as a share of every request the server answered.
    fn throttled_share(&self) -> f64 {
        let all = self.ok + self.throttled;
        if all == 0 {
            0.0
        } else {
            self.throttled as f64 / all as f64
        }
    }

    fn mean_service(&self) -> f64 {
        mean(&self.service)
    }

    fn mean_limit(&self) -> f64 {
        let limits: Vec<f64> = self.limits.iter().map(|&l| l as f64).collect();
        mean(&limits)
    }

    fn max_limit(&self) -> usize {
        self.limits.iter().copied().max().unwrap_or(0)
    }
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        f64::NAN
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// The `q` quantile (nearest rank) of `values`, sorting them.
fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = (q * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

fn slots_in(d: Duration) -> usize {
    (d.as_secs_f64() / SLOT.as_secs_f64()).round() as usize
}

// ---------------------------------------------------------------------------------------------
// The service

/// The service's latency distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Dist {
    /// Always 20 ms.
    Fixed,
    /// Log-normal, median 20 ms, this sigma.
    LogNormal(f64),
    /// 95% at 20 ms, 5% at 200 ms.
    Bimodal,
}

impl Dist {
    fn draw(self, rng: &mut fastrand::Rng) -> Duration {
        let secs = match self {
            Dist::Fixed => MEDIAN,
            Dist::LogNormal(sigma) => {
                // Box-Muller: a standard normal from two uniforms.
                let (u1, u2) = (rng.f64().max(1e-12), rng.f64());
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                MEDIAN * (sigma * z).exp()
            }
            Dist::Bimodal => {
                if rng.f64() < 0.05 {
                    MEDIAN * 10.0
                } else {
                    MEDIAN
                }
            }
        };
        Duration::from_secs_f64(secs)
    }

    fn name(self) -> String {
        match self {
            Dist::Fixed => "fixed20ms".into(),
            Dist::LogNormal(sigma) => format!("lognormal{sigma}"),
            Dist::Bimodal => "bimodal".into(),
        }
    }

    /// The spec's goal for this distribution: the least goodput as a share of capacity, and the
    /// most throttled share if it bounds it.
    fn goal(self) -> (f64, Option<f64>) {
        match self {
            Dist::Fixed => (0.90, Some(0.03)),
            Dist::LogNormal(sigma) if sigma <= 0.5 => (0.90, Some(0.03)),
            Dist::LogNormal(_) | Dist::Bimodal => (0.80, None),
        }
    }
}

/// What the server's connections share.
struct ServerState {
    capacity: Arc<AtomicUsize>,
    in_flight: AtomicUsize,
    /// Slots a request waits for, when the server queues rather than refuses.
    queue: Option<tokio::sync::Semaphore>,
    dist: Dist,
    recorder: Arc<Recorder>,
}

/// Gives a server slot back, even when the client goes away mid-request.
struct Admitted(Arc<ServerState>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn response(status: StatusCode, body: &'static [u8]) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body)));
    *response.status_mut() = status;
    response
}

async fn handle(
    request: Request<Incoming>,
    latency: Duration,
    state: Arc<ServerState>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the request as a real service would (and so that the connection can be reused).
    let _ = request.into_body().collect().await;
    let mut slot = None;
    if let Some(queue) = &state.queue {
        let arrived = Instant::now();
        slot = Some(queue.acquire().await.expect("the queue is never closed"));
        let waited = arrived.elapsed().as_secs_f64();
        state.recorder.record(|s| s.queued.push(waited));
    }
    let capacity = state.capacity.load(Ordering::SeqCst);
    if state.in_flight.fetch_add(1, Ordering::SeqCst) >= capacity && slot.is_none() {
        state.in_flight.fetch_sub(1, Ordering::SeqCst);
        state.recorder.record(|s| s.throttled += 1);
        return Ok(response(StatusCode::TOO_MANY_REQUESTS, b"over capacity"));
    }
    let admitted = Admitted(state.clone());
    let started = Instant::now();
    tokio::time::sleep(latency).await;
    let held = started.elapsed().as_secs_f64();
    drop(admitted);
    drop(slot);
    state.recorder.record(|s| {
        s.ok += 1;
        s.service.push(held);
    });
    Ok(response(StatusCode::OK, b"{}"))
}

/// The loopback server, on a thread and runtime of its own; stopped when dropped.
struct Server {
    addr: SocketAddr,
    capacity: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(plan: &Plan, recorder: Arc<Recorder>) -> Server {
        let (dist, seed) = (plan.dist, plan.seed);
        let queue = plan
            .queueing
            .then(|| tokio::sync::Semaphore::new(plan.capacity));
        let capacity = Arc::new(AtomicUsize::new(plan.capacity));
        let state = Arc::new(ServerState {
            capacity: capacity.clone(),
            in_flight: AtomicUsize::new(0),
            queue,
            dist,
            recorder,
        });
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("gateway-server".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                    addr_tx.send(listener.local_addr().unwrap()).unwrap();
                    let accept = async {
                        let mut connections = 0u64;
                        loop {
                            let Ok((stream, _)) = listener.accept().await else {
                                tokio::time::sleep(Duration::from_millis(1)).await;
                                continue;
                            };
                            let _ = stream.set_nodelay(true);
                            connections += 1;
                            // hyper calls the service through `&self`.
                            let rng =
                                Mutex::new(fastrand::Rng::with_seed(seed ^ (connections << 20)));
                            let state = state.clone();
                            let service = service_fn(move |request| {
                                let latency = state.dist.draw(&mut rng.lock().unwrap());
                                handle(request, latency, state.clone())
                            });
                            tokio::spawn(async move {
                                let _ = http1::Builder::new()
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            });
                        }
                    };
                    tokio::select! {
                        () = accept => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime drops every connection.
            })
            .unwrap();
        Server {
            addr: addr_rx.recv().unwrap(),
            capacity,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The client

/// Times each successful attempt of the HTTP sink.
#[derive(Clone)]
struct Timed {
    inner: HttpSink,
    recorder: Arc<Recorder>,
}

impl Timed {
    async fn write(&self, batch: Batch) -> Result<Delivery, Error> {
        let started = Instant::now();
        let result = self.inner.clone().oneshot(batch).await;
        if result.is_ok() {
            let took = started.elapsed().as_secs_f64();
            self.recorder.record(|s| s.client.push(took));
        }
        result
    }
}

floodway::impl_sink!(Timed, write);

/// A source that never runs dry: one event per record, each with a partition key of its own.
#[derive(Default)]
struct Endless {
    next: u64,
}

impl Source for Endless {
    async fn next_batch(&mut self, max: usize) -> Result<Option<Vec<Record>>, SourceError> {
        let start = self.next;
        self.next += max as u64;
        let batch = (start..self.next)
            .map(|i| {
                let event = Event::builder("call-requested", format!("k-{i}"))
                    .id(format!("e-{i}"))
                    .timestamp(i as i64)
                    .field("amount", i % 1000)
                    .build();
                Record::new("bench", "0", i + 1, event.to_json())
            })
            .collect();
        Ok(Some(batch))
    }
}

/// Commits nothing: the source is generated.
struct Discard;

impl Checkpointer for Discard {
    async fn commit(&mut self, _checkpoints: &[Checkpoint]) -> Result<(), CommitError> {
        Ok(())
    }
}

/// The limiter under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limiter {
    Adaptive,
    /// Fixed at the (initial) capacity: the reference.
    Fixed,
}

impl Limiter {
    fn build(self, capacity: usize) -> ConcurrencyLimiter {
        match self {
            Limiter::Adaptive => ConcurrencyLimiter::adaptive(Aimd::default(), "gateway").unwrap(),
            Limiter::Fixed => ConcurrencyLimiter::fixed(capacity).unwrap(),
        }
    }

    fn name(self, capacity: usize) -> String {
        match self {
            Limiter::Adaptive => "adaptive".into(),
            Limiter::Fixed => format!("fixed {capacity}"),
        }
    }
}

/// One run: a service of `capacity` (changed to `.1` at `.0` for each of `changes`), the
/// client against it for `length`.
struct Plan {
    capacity: usize,
    dist: Dist,
    changes: Vec<(Duration, usize)>,
    length: Duration,
    seed: u64,
    /// The server queues requests over its capacity instead of refusing them.
    queueing: bool,
}

/// What a run recorded.
struct Run {
    slots: Vec<Slot>,
    faults: u64,
}

fn run(rt: &tokio::runtime::Runtime, plan: &Plan, limiter: Limiter) -> Run {
    let recorder = Recorder::new();
    let server = Server::start(plan, recorder.clone());
    let url = format!("http://{}/calls", server.addr);
    let limiter = limiter.build(plan.capacity);
    let sink = Timed {
        inner: HttpSink::new(HttpSinkConfig::post(&url).unwrap()),
        recorder: recorder.clone(),
    };
    let resilience = Resilience::default()
        .timeout(Duration::from_secs(10))
        .concurrency(limiter.clone());
    let faults = Arc::new(AtomicU64::new(0));
    let processor = Processor::builder("gateway-bench")
        .fault_sink({
            let faults = faults.clone();
            fault_sink_fn(move |_fault: Event| {
                faults.fetch_add(1, Ordering::Relaxed);
                std::future::ready(Ok::<_, Error>(()))
            })
        })
        // Work still in flight at the end of the run does not matter.
        .drain_timeout(Duration::from_secs(1))
        .pipeline(
            Pipeline::builder("gateway")
                .parallelism((plan.capacity * 4).max(64))
                .resilience(resilience)
                .sink(sink)
                .unwrap(),
        )
        .build()
        .unwrap();
    let start = tokio::time::Instant::from_std(recorder.start);
    rt.block_on(async {
        let sampler = tokio::spawn({
            let recorder = recorder.clone();
            async move {
                let mut tick = tokio::time::interval(SLOT);
                loop {
                    tick.tick().await;
                    let limit = limiter.limit();
                    recorder.record(|s| s.limits.push(limit));
                }
            }
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let control = async {
            for &(at, capacity) in &plan.changes {
                tokio::time::sleep_until(start + at).await;
                server.capacity.store(capacity, Ordering::SeqCst);
            }
            tokio::time::sleep_until(start + plan.length).await;
            let _ = stop.send(());
        };
        let shutdown = async {
            let _ = stopped.await;
        };
        let (report, ()) = tokio::join!(
            processor.run(Endless::default(), Discard, shutdown),
            control
        );
        sampler.abort();
        if let Err(err) = report {
            eprintln!("  the run failed: {err}");
        }
    });
    drop(server);
    if std::env::var_os("FLOODWAY_BENCH_TRACE").is_some() {
        trace(&recorder.slots());
    }
    Run {
        slots: recorder.slots(),
        faults: faults.load(Ordering::Relaxed),
    }
}

/// Prints a run's 500 ms windows to stderr: limit range, 2xx/s, throttled share, service mean.
fn trace(slots: &[Slot]) {
    for (i, w) in windows(slots, 0..slots.len()).iter().enumerate() {
        let secs = (CHANGE_WINDOW as f64) * SLOT.as_secs_f64();
        eprintln!(
            "  {:5.1} s  limit {:>3}..{:<3}  {:5.0} ok/s  {:5.1}% throttled  service mean {:5.1} ms",
            i as f64 * secs,
            w.limits.iter().min().unwrap_or(&0),
            w.max_limit(),
            w.ok as f64 / secs,
            w.throttled_share() * 100.0,
            w.mean_service() * 1000.0,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Steady scenarios

/// What every steady run measures, whatever its server does over its capacity.
struct Measured {
    scenario: String,
    limiter: String,
    goodput: f64,
    capacity_throughput: f64,
    client: (f64, f64),
    service: (f64, f64),
    mean_limit: f64,
    faults: u64,
}

impl Measured {
    fn fraction(&self) -> f64 {
        self.goodput / self.capacity_throughput
    }
}

struct SteadyRow {
    m: Measured,
    throttled: f64,
    goal: (f64, Option<f64>),
}

impl SteadyRow {
    fn met(&self) -> bool {
        let (least, most_throttled) = self.goal;
        self.m.fraction() >= least && most_throttled.is_none_or(|m| self.throttled <= m)
    }
}

/// Runs `plan` (no capacity changes, `warmup` then `measure` long) with `limiter`.
fn steady(
    rt: &tokio::runtime::Runtime,
    name: &str,
    plan: &Plan,
    limiter: Limiter,
    warmup: Duration,
    measure: Duration,
) -> SteadyRow {
    let (m, t) = measured(rt, name, plan, limiter, warmup, measure);
    SteadyRow {
        m,
        throttled: t.throttled_share(),
        goal: plan.dist.goal(),
    }
}

/// Runs `plan` with `limiter`, saying so, and takes its measured window together: the totals
/// and the faults of the run.
fn measured(
    rt: &tokio::runtime::Runtime,
    name: &str,
    plan: &Plan,
    limiter: Limiter,
    warmup: Duration,
    measure: Duration,
) -> (Measured, Totals) {
    eprintln!("{name}, {}...", limiter.name(plan.capacity));
    let run = run(rt, plan, limiter);
    let from = slots_in(warmup);
    let mut t = Totals::of(&run.slots, from..from + slots_in(measure));
    let m = Measured {
        scenario: name.into(),
        limiter: limiter.name(plan.capacity),
        goodput: t.ok as f64 / measure.as_secs_f64(),
        capacity_throughput: plan.capacity as f64 / t.mean_service(),
        client: p50_p99(&mut t.client),
        service: p50_p99(&mut t.service),
        mean_limit: t.mean_limit(),
        faults: run.faults,
    };
    (m, t)
}

/// The median and the 99th percentile of `values`, sorting them.
fn p50_p99(values: &mut [f64]) -> (f64, f64) {
    (quantile(values, 0.5), quantile(values, 0.99))
}

fn print_steady(rows: &[SteadyRow], warmup: Duration, measure: Duration) {
    out!(
        "## Steady capacity\n\n\
         Warm-up {:.1} s, then {:.1} s measured. Goodput: 2xx/s at the server. Capacity \
         throughput: capacity / mean service latency (as the server measured it). Throttled: \
         429s / all requests at the server. Client latency: each successful attempt around \
         `HttpSink`; service latency: the time a request held its server slot.\n\n\
         Goals: goodput >= 90% of capacity throughput with <= 3% throttled for fixed 20 ms and \
         log-normal sigma <= 0.5; >= 80% for sigma 1.0 and bimodal. The fixed limit at the \
         capacity is the reference.\n",
        warmup.as_secs_f64(),
        measure.as_secs_f64()
    );
    out!(
        "| scenario | limiter | goodput | capacity throughput | of capacity | throttled | \
         client p50 / p99 | service p50 / p99 | mean limit | faults | goal | met |"
    );
    out!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let ms = |s: f64| s * 1000.0;
    for r in rows {
        let goal = match r.goal {
            (least, Some(most)) => format!(
                ">= {:.0}%, <= {:.0}% throttled",
                least * 100.0,
                most * 100.0
            ),
            (least, None) => format!(">= {:.0}%", least * 100.0),
        };
        out!(
            "| {} | {} | {:.0}/s | {:.0}/s | {:.1}% | {:.2}% | {:.1} / {:.1} ms | {:.1} / {:.1} ms \
             | {:.1} | {} | {} | {} |",
            r.m.scenario,
            r.m.limiter,
            r.m.goodput,
            r.m.capacity_throughput,
            r.m.fraction() * 100.0,
            r.throttled * 100.0,
            ms(r.m.client.0),
            ms(r.m.client.1),
            ms(r.m.service.0),
            ms(r.m.service.1),
            r.m.mean_limit,
            r.m.faults,
            goal,
            if r.met() { "met" } else { "**missed**" },
        );
    }
    out!();
}

// ---------------------------------------------------------------------------------------------
// A service that queues

/// Goal of a queueing service: goodput at least this share of capacity throughput...
const QUEUE_GOODPUT: f64 = 0.90;
/// ...with the median request waiting at the server no longer than this share of the
/// service's median latency.
const QUEUE_WAIT: f64 = 1.0;

struct QueueRow {
    m: Measured,
    queued: (f64, f64),
}

impl QueueRow {
    fn met(&self) -> bool {
        self.m.fraction() >= QUEUE_GOODPUT && self.queued.0 <= QUEUE_WAIT * self.m.service.0
    }
}

/// Runs `plan` against a queueing server with `limiter`.
fn queued(
    rt: &tokio::runtime::Runtime,
    name: &str,
    plan: &Plan,
    limiter: Limiter,
    warmup: Duration,
    measure: Duration,
) -> QueueRow {
    let (m, mut t) = measured(rt, name, plan, limiter, warmup, measure);
    QueueRow {
        m,
        queued: p50_p99(&mut t.queued),
    }
}

fn print_queued(rows: &[QueueRow], warmup: Duration, measure: Duration) {
    out!(
        "## A service that queues\n\n\
         The server takes `capacity` requests at once and queues the rest (first come, first \
         served), refusing none: only its latency says it is loaded. The pipeline lets four \
         times the capacity (at least 64) call at once, so without a limit that reads latency \
         the queue holds the difference. Warm-up {:.1} s, then {:.1} s measured. Queued: how \
         long a request waited at the server for a slot; client latency includes it.\n\n\
         Goals: goodput >= {:.0}% of capacity throughput, and the median request queued no \
         longer than the median service latency. The fixed limit at the capacity is the \
         reference.\n",
        warmup.as_secs_f64(),
        measure.as_secs_f64(),
        QUEUE_GOODPUT * 100.0,
    );
    out!(
        "| scenario | limiter | goodput | of capacity | queued p50 / p99 | client p50 / p99 | \
         service p50 / p99 | mean limit | faults | met |"
    );
    out!("|---|---|---|---|---|---|---|---|---|---|");
    let ms = |s: f64| s * 1000.0;
    for r in rows {
        out!(
            "| {} | {} | {:.0}/s | {:.1}% | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {:.1} / {:.1} ms \
             | {:.1} | {} | {} |",
            r.m.scenario,
            r.m.limiter,
            r.m.goodput,
            r.m.fraction() * 100.0,
            ms(r.queued.0),
            ms(r.queued.1),
            ms(r.m.client.0),
            ms(r.m.client.1),
            ms(r.m.service.0),
            ms(r.m.service.1),
            r.m.mean_limit,
            r.m.faults,
            if r.met() { "met" } else { "**missed**" },
        );
    }
    out!();
}

// ---------------------------------------------------------------------------------------------
// Capacity change

/// Goals of the capacity change: follow a halving within 5 s, a restoration within 10 s.
const HALVING_GOAL: f64 = 5.0;
const RESTORE_GOAL: f64 = 10.0;

struct ChangeRow {
    limiter: String,
    /// Seconds from the halving until the criterion held for the rest of the halved phase
    /// (the end of the first 500 ms window from which on it held); `None`: not in the phase.
    halving: Option<f64>,
    /// Seconds from the restoration until a 500 ms window reached 90% of capacity throughput.
    restoration: Option<f64>,
    mean_limits: [f64; 3],
    of_capacity: [f64; 3],
    throttled: [f64; 3],
    faults: u64,
}

/// 500 ms windows of `slots` from `phase.start` to `phase.end`.
fn windows(slots: &[Slot], phase: Range<usize>) -> Vec<Totals> {
    (phase.start..phase.end)
        .step_by(CHANGE_WINDOW)
        .map(|w| Totals::of(slots, w..(w + CHANGE_WINDOW).min(phase.end)))
        .collect()
}

fn capacity_change(rt: &tokio::runtime::Runtime, phase: Duration, limiter: Limiter) -> ChangeRow {
    let (full, half) = (16usize, 8usize);
    let dist = Dist::LogNormal(0.5);
    let plan = Plan {
        capacity: full,
        dist,
        changes: vec![(phase, half), (phase * 2, full)],
        length: phase * 3,
        seed: 99,
        queueing: false,
    };
    let run = run(rt, &plan, limiter);
    let p = slots_in(phase);
    let phases = [0..p, p..2 * p, 2 * p..3 * p];
    let all = Totals::of(&run.slots, 0..3 * p);
    let service = all.mean_service();
    let window_secs = (CHANGE_WINDOW as f64) * SLOT.as_secs_f64();

    // Halving: a window follows when it throttles <= 3%, or the limit stayed <= 1.25 x 8.
    let halved = windows(&run.slots, phases[1].clone());
    let follows = |w: &Totals| {
        w.throttled_share() <= 0.03
            || (!w.limits.is_empty() && w.max_limit() as f64 <= 1.25 * half as f64)
    };
    let halving = match halved.iter().rposition(|w| !follows(w)) {
        None => Some(window_secs),
        Some(last_bad) if last_bad + 1 < halved.len() => Some((last_bad + 2) as f64 * window_secs),
        Some(_) => None,
    };

    // Restoration: a window with goodput >= 90% of the restored capacity throughput.
    let target = 0.9 * full as f64 / service;
    let restoration = windows(&run.slots, phases[2].clone())
        .iter()
        .position(|w| w.ok as f64 / window_secs >= target)
        .map(|i| (i + 1) as f64 * window_secs);

    if matches!(limiter, Limiter::Adaptive) {
        chart_change(
            &run.slots,
            &phases,
            [full, half, full],
            service,
            window_secs,
        );
    }

    let per_phase = |f: &dyn Fn(&Totals, usize) -> f64| {
        let caps = [full, half, full];
        [0, 1, 2].map(|i| f(&Totals::of(&run.slots, phases[i].clone()), caps[i]))
    };
    let secs = phase.as_secs_f64();
    ChangeRow {
        limiter: limiter.name(full),
        halving,
        restoration,
        mean_limits: per_phase(&|t, _| t.mean_limit()),
        of_capacity: per_phase(&|t, cap| t.ok as f64 / secs / (cap as f64 / service)),
        throttled: per_phase(&|t, _| t.throttled_share()),
        faults: run.faults,
    }
}

/// Charts of the adaptive limiter through the capacity change, in 500 ms windows: its limit
/// against the capacity, and its goodput against the capacity's throughput.
fn chart_change(
    slots: &[Slot],
    phases: &[Range<usize>; 3],
    caps: [usize; 3],
    service: f64,
    window_secs: f64,
) {
    use common::chart::{lines, Series};
    let (mut limit, mut goodput, mut capacity, mut capacity_rate) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut t = 0.0;
    for (phase, cap) in phases.iter().zip(caps) {
        capacity.push((t, cap as f64));
        capacity_rate.push((t, cap as f64 / service));
        for w in windows(slots, phase.clone()) {
            t += window_secs;
            if !w.limits.is_empty() {
                limit.push((t, w.mean_limit()));
            }
            goodput.push((t, w.ok as f64 / window_secs));
        }
        capacity.push((t, cap as f64));
        capacity_rate.push((t, cap as f64 / service));
    }
    let series = |name: &str, points: Vec<(f64, f64)>, dashed: bool| Series {
        name: name.into(),
        points,
        dashed,
    };
    lines(
        "adaptive-limit",
        "Adaptive concurrency through a capacity change (16, 8, 16; log-normal latency)",
        "seconds",
        "concurrent calls",
        &[
            series("limit (mean per 500 ms)", limit, false),
            series("service capacity", capacity, true),
        ],
    );
    lines(
        "adaptive-goodput",
        "Goodput through the same capacity change",
        "seconds",
        "successful calls per second",
        &[
            series("goodput (per 500 ms)", goodput, false),
            series("capacity throughput", capacity_rate, true),
        ],
    );
}

fn print_change(rows: &[ChangeRow], phase: Duration) {
    out!(
        "## Capacity change\n\n\
         Capacity 16, log-normal sigma 0.5: {p:.1} s at 16, {p:.1} s at 8, {p:.1} s at 16 again. \
         Follows the halving: the time from the change until, in 500 ms windows, the throttled \
         share is <= 3% (or the limit is <= 10) for the rest of the halved phase. Follows the \
         restoration: the time from the restore until a 500 ms window's goodput is >= 90% of \
         the capacity throughput at 16. Both at 500 ms resolution (the end of the window).\n\n\
         Goals: follows a halving within {HALVING_GOAL:.0} s and a restoration within \
         {RESTORE_GOAL:.0} s. The fixed limit at 16 is the reference: it cannot follow a \
         halving (it over-throttles until the restoration).\n",
        p = phase.as_secs_f64()
    );
    out!(
        "| limiter | follows halving | follows restoration | mean limit (16 / 8 / 16) | \
         of capacity (16 / 8 / 16) | throttled (16 / 8 / 16) | faults | goal | met |"
    );
    out!("|---|---|---|---|---|---|---|---|---|");
    let secs = |t: Option<f64>| match t {
        Some(t) => format!("{t:.1} s"),
        None => format!("not within {:.1} s", phase.as_secs_f64()),
    };
    let three = |v: [f64; 3], scale: f64, digits: usize| {
        v.map(|x| format!("{:.*}", digits, x * scale)).join(" / ")
    };
    for r in rows {
        let halving_met = r.halving.is_some_and(|t| t <= HALVING_GOAL);
        let restoration_met = r.restoration.is_some_and(|t| t <= RESTORE_GOAL);
        let met = match (halving_met, restoration_met) {
            (true, true) => "met".to_string(),
            (false, true) => "**missed** (halving)".into(),
            (true, false) => "**missed** (restoration)".into(),
            (false, false) => "**missed** (both)".into(),
        };
        out!(
            "| {} | {} | {} | {} | {}% | {}% | {} | halving <= {HALVING_GOAL:.0} s, \
             restoration <= {RESTORE_GOAL:.0} s | {} |",
            r.limiter,
            secs(r.halving),
            secs(r.restoration),
            three(r.mean_limits, 1.0, 1),
            three(r.of_capacity, 100.0, 1),
            three(r.throttled, 100.0, 2),
            r.faults,
            met,
        );
    }
    out!();
}

// ---------------------------------------------------------------------------------------------

/// The steady scenarios wanted (`{prefix}c{capacity}-{distribution}`, capacities 4, 16 and
/// 64), each with the adaptive limit and the fixed one, as they will run: a name, a plan of
/// `length` (its seed the next of `seed`), a limiter. Says each as it comes.
fn scenarios(
    prefix: &str,
    dists: &[Dist],
    queueing: bool,
    length: Duration,
    seed: &mut u64,
    wanted: &dyn Fn(&str) -> bool,
) -> Vec<(String, Plan, Limiter)> {
    let mut out = Vec::new();
    for capacity in [4usize, 16, 64] {
        for &dist in dists {
            let name = format!("{prefix}c{capacity}-{}", dist.name());
            if !wanted(&name) {
                continue;
            }
            for limiter in [Limiter::Adaptive, Limiter::Fixed] {
                *seed += 1;
                let plan = Plan {
                    capacity,
                    dist,
                    changes: Vec::new(),
                    length,
                    seed: *seed,
                    queueing,
                };
                out.push((name.clone(), plan, limiter));
            }
        }
    }
    out
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let measure: f64 = std::env::var("FLOODWAY_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|s: &f64| *s > 0.0)
        .unwrap_or(5.0);
    let measure = Duration::from_secs_f64(measure);
    let warmup = measure.mul_f64(0.6);
    let phase = measure * 2;
    let only = std::env::var("FLOODWAY_BENCH_ONLY").unwrap_or_default();
    let wanted = |name: &str| name.contains(only.as_str());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let dists = [
        Dist::Fixed,
        Dist::LogNormal(0.25),
        Dist::LogNormal(0.5),
        Dist::LogNormal(1.0),
        Dist::Bimodal,
    ];
    let mut seed = 1u64;
    let steady_rows: Vec<SteadyRow> =
        scenarios("", &dists, false, warmup + measure, &mut seed, &wanted)
            .into_iter()
            .map(|(name, plan, limiter)| steady(&rt, &name, &plan, limiter, warmup, measure))
            .collect();
    let queueing = [Dist::LogNormal(0.25), Dist::LogNormal(0.5)];
    let queue_rows: Vec<QueueRow> = scenarios(
        "queue-",
        &queueing,
        true,
        warmup + measure,
        &mut seed,
        &wanted,
    )
    .into_iter()
    .map(|(name, plan, limiter)| queued(&rt, &name, &plan, limiter, warmup, measure))
    .collect();
    let mut change_rows = Vec::new();
    if wanted("change-c16-lognormal0.5") {
        for limiter in [Limiter::Adaptive, Limiter::Fixed] {
            eprintln!("capacity change, {}...", limiter.name(16));
            change_rows.push(capacity_change(&rt, phase, limiter));
        }
    }
    if !steady_rows.is_empty() {
        print_steady(&steady_rows, warmup, measure);
    }
    if !change_rows.is_empty() {
        print_change(&change_rows, phase);
    }
    if !queue_rows.is_empty() {
        print_queued(&queue_rows, warmup, measure);
    }
    if only.is_empty() {
        common::chart::save_table("gateway");
    }
}
