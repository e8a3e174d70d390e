//! Ordering, backpressure, rate limits, shutdown and batch mode, on tokio's paused clock.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use floodway::error::SourceError;
use floodway::layer::limit::rate::RateLimiter;
use floodway::layer::Resilience;
use floodway::memory::{MemoryCheckpointer, MemorySink, MemorySource};
use floodway::runtime::Stopped;
use floodway::testing::{generate, TestKit};
use floodway::{
    sink_fn, Batch, Error, Event, Pipeline, Processor, Record, RunError, RunReport, Settlement,
    Source,
};
use tokio::time::Instant;

mod common;
use common::{build, events, processor, run, run_pipeline};

/// Runs `processor` over `source` to its end, committing to the kit's checkpointer.
async fn run_source(
    kit: &TestKit,
    processor: &Processor,
    source: impl Source,
) -> Result<RunReport, RunError> {
    processor
        .run(source, kit.checkpointer().clone(), std::future::pending())
        .await
}

/// Runs `processor` in a task of its own until the sender is used (or dropped): the sender
/// and the run's task.
fn spawn_run(
    processor: Processor,
    source: impl Source,
    checkpointer: impl floodway::Checkpointer + 'static,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<RunReport, RunError>>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(async move {
        processor
            .run(source, checkpointer, async {
                stopped.await.ok();
            })
            .await
    });
    (stop, run)
}

/// Delivers its records, then (if `live`) waits forever like an idle stream; counts pulls.
struct CountingSource {
    records: VecDeque<Record>,
    live: bool,
    pulled: Arc<AtomicU64>,
    /// Says it is [`Source::buffered`] (it is: its records are in memory).
    buffered: bool,
}

impl Source for CountingSource {
    async fn next_batch(&mut self, max: usize) -> Result<Option<Vec<Record>>, SourceError> {
        if self.records.is_empty() {
            if self.live {
                std::future::pending::<()>().await;
            }
            return Ok(None);
        }
        let n = max.min(self.records.len());
        self.pulled.fetch_add(n as u64, Ordering::SeqCst);
        Ok(Some(self.records.drain(..n).collect()))
    }

    fn buffered(&self) -> bool {
        self.buffered
    }
}

impl CountingSource {
    fn new(events: &[Event], live: bool, pulled: &Arc<AtomicU64>) -> Self {
        CountingSource {
            records: records(events),
            live,
            pulled: pulled.clone(),
            buffered: false,
        }
    }
}

/// `events` as the records of partition `0`, at offsets from 1.
fn records(events: &[Event]) -> VecDeque<Record> {
    (1..)
        .zip(events)
        .map(|(offset, e)| Record::new("test", "0", offset, e.to_json()))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn same_key_runs_in_order_while_keys_run_concurrently() {
    let kit = TestKit::new();
    let order: Arc<Mutex<HashMap<String, Vec<u64>>>> = Arc::default();
    let running = Arc::new(AtomicUsize::new(0));
    let max_running = Arc::new(AtomicUsize::new(0));
    let per_key_running: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let sink = {
        let (order, running, max_running, per_key_running) = (
            order.clone(),
            running.clone(),
            max_running.clone(),
            per_key_running.clone(),
        );
        sink_fn(move |batch: Batch| {
            let (order, running, max_running, per_key_running) = (
                order.clone(),
                running.clone(),
                max_running.clone(),
                per_key_running.clone(),
            );
            async move {
                let event = batch.events().next().unwrap().clone();
                let key = event.partition_key().to_owned();
                {
                    let mut pk = per_key_running.lock().unwrap();
                    let n = pk.entry(key.clone()).or_default();
                    assert_eq!(*n, 0, "two events of key {key} ran at once");
                    *n += 1;
                }
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                max_running.fetch_max(now, Ordering::SeqCst);
                // Varied latency, so later events of other keys overtake earlier ones.
                let n: u64 = event.id()[2..].parse().unwrap();
                tokio::time::sleep(Duration::from_millis(1 + (n * 7919) % 13)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                *per_key_running.lock().unwrap().get_mut(&key).unwrap() -= 1;
                order.lock().unwrap().entry(key).or_default().push(n);
                Ok::<_, Error>(())
            }
        })
    };
    let pipeline = Pipeline::builder("all").parallelism(8).sink(sink).unwrap();
    run_pipeline(&kit, pipeline, &events(600, 20))
        .await
        .unwrap();
    let order = order.lock().unwrap();
    assert_eq!(order.len(), 20);
    for (key, seq) in order.iter() {
        let mut sorted = seq.clone();
        sorted.sort_unstable();
        assert_eq!(seq, &sorted, "key {key} out of order");
        assert_eq!(seq.len(), 30);
    }
    assert_eq!(
        max_running.load(Ordering::SeqCst),
        8,
        "keys ran concurrently up to parallelism"
    );
}

/// A sink that answers some calls at once and makes the others wait, recording the order in
/// which each key's events were delivered and failing the run if two calls holding one key
/// overlap.
#[derive(Clone, Default)]
struct MixedSink {
    order: Arc<Mutex<HashMap<String, Vec<u64>>>>,
    busy: Arc<Mutex<HashMap<String, usize>>>,
}

impl MixedSink {
    fn sink(&self) -> impl floodway::Sink {
        let this = self.clone();
        sink_fn(move |batch: Batch| {
            let this = this.clone();
            async move {
                let events: Vec<(String, u64)> = batch
                    .events()
                    .map(|e| (e.partition_key().to_owned(), e.id()[2..].parse().unwrap()))
                    .collect();
                let mut held: Vec<String> = events.iter().map(|(k, _)| k.clone()).collect();
                held.sort_unstable();
                held.dedup();
                for key in &held {
                    let mut busy = this.busy.lock().unwrap();
                    let n = busy.entry(key.clone()).or_default();
                    assert_eq!(*n, 0, "two calls holding key {key} ran at once");
                    *n += 1;
                }
                // A call whose first event's number is a multiple of 3 answers at once; the
                // others wait a varied time, so that later work of other keys overtakes them.
                let first = events[0].1;
                if !first.is_multiple_of(3) {
                    tokio::time::sleep(Duration::from_millis(1 + (first * 7919) % 13)).await;
                }
                let mut busy = this.busy.lock().unwrap();
                for key in held {
                    *busy.get_mut(&key).unwrap() -= 1;
                }
                let mut order = this.order.lock().unwrap();
                for (key, n) in events {
                    order.entry(key).or_default().push(n);
                }
                Ok::<_, Error>(())
            }
        })
    }

    /// Asserts `events` events of `keys` keys were delivered, each once and in its key's
    /// order.
    fn assert_in_order(&self, events: usize, keys: usize) {
        let order = self.order.lock().unwrap();
        assert_eq!(order.len(), keys);
        for (key, seq) in order.iter() {
            let mut sorted = seq.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(seq, &sorted, "key {key} out of order or repeated");
        }
        assert_eq!(order.values().map(Vec::len).sum::<usize>(), events);
    }
}

#[tokio::test(start_paused = true)]
async fn order_holds_when_some_calls_answer_at_once() {
    // Work that may start at once starts as it is dispatched, and takes its keys only when
    // its call does not answer at once: mix both kinds of calls on few keys, one event at a
    // time and in batches that share keys.
    let kit = TestKit::new();
    let single = MixedSink::default();
    let pipeline = Pipeline::builder("single")
        .parallelism(4)
        .sink(single.sink())
        .unwrap();
    run_pipeline(&kit, pipeline, &events(600, 7)).await.unwrap();
    single.assert_in_order(600, 7);

    let kit = TestKit::new();
    let batches = MixedSink::default();
    let pipeline = Pipeline::builder("batched")
        .parallelism(3)
        .batch(floodway::BatchConfig::count(4))
        .sink(batches.sink())
        .unwrap();
    run_pipeline(&kit, pipeline, &events(600, 7)).await.unwrap();
    batches.assert_in_order(600, 7);
}

/// Runs 2,000 events from a source ([`Source::buffered`] or not) through a slow sink with
/// these bounds; answers the most records that were pulled and not yet delivered at any time.
async fn pulled_not_delivered(max_in_flight: usize, pull_batch: usize, buffered: bool) -> u64 {
    let kit = TestKit::new();
    let pulled = Arc::new(AtomicU64::new(0));
    let max_gap = Arc::new(AtomicU64::new(0));
    let sink = {
        let (pulled, max_gap) = (pulled.clone(), max_gap.clone());
        let delivered = Arc::new(AtomicU64::new(0));
        sink_fn(move |batch: Batch| {
            let (pulled, delivered, max_gap) = (pulled.clone(), delivered.clone(), max_gap.clone());
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                let d = delivered.fetch_add(batch.len() as u64, Ordering::SeqCst);
                max_gap.fetch_max(pulled.load(Ordering::SeqCst) - d, Ordering::SeqCst);
                Ok::<_, Error>(())
            }
        })
    };
    let pipeline = Pipeline::builder("slow").parallelism(4).sink(sink).unwrap();
    let processor = build(
        kit.processor("p")
            .max_in_flight(max_in_flight)
            .pull_batch(pull_batch),
        pipeline,
    );
    let source = CountingSource {
        buffered,
        ..CountingSource::new(&events(2_000, 50), false, &pulled)
    };
    let report = run_source(&kit, &processor, source).await.unwrap();
    assert_eq!(report.done, 2_000);
    max_gap.load(Ordering::SeqCst)
}

#[tokio::test(start_paused = true)]
async fn a_slow_sink_slows_the_source_and_in_flight_work_stays_bounded() {
    let gap = pulled_not_delivered(100, 10, false).await;
    // In flight, plus one pulled batch waiting in the channel and one being handed over.
    assert!(
        gap <= 100 + 2 * 10,
        "{gap} records pulled and not delivered"
    );
    assert!(gap >= 50, "the limit was reached: {gap}");
}

#[tokio::test(start_paused = true)]
async fn a_buffered_source_is_pulled_by_the_loop_only_when_the_work_fits() {
    // No task reads ahead: what is pulled is in flight, and never more than allowed.
    let gap = pulled_not_delivered(100, 10, true).await;
    assert!(gap <= 100, "{gap} records pulled and not delivered");
    assert!(gap >= 50, "the limit was reached: {gap}");
    // Read ahead by a task, the same source goes past it.
    let ahead = pulled_not_delivered(100, 10, false).await;
    assert!(ahead > 100, "{ahead} records pulled and not delivered");
}

/// A live, buffered source: records as they are sent, ending when the sender is dropped.
/// Counts the pulls dropped while they waited, and says when it is dropped itself.
struct ChannelSource {
    rx: tokio::sync::mpsc::UnboundedReceiver<Record>,
    dropped_pulls: Arc<AtomicU64>,
    dropped: Arc<std::sync::atomic::AtomicBool>,
}

/// Counts a pull dropped before it was ready.
struct PullGuard<'a>(&'a AtomicU64, bool);

impl Drop for PullGuard<'_> {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Source for ChannelSource {
    async fn next_batch(&mut self, max: usize) -> Result<Option<Vec<Record>>, SourceError> {
        let mut guard = PullGuard(&self.dropped_pulls, false);
        let first = self.rx.recv().await;
        guard.1 = true;
        let Some(first) = first else {
            return Ok(None);
        };
        let mut batch = vec![first];
        while batch.len() < max {
            match self.rx.try_recv() {
                Ok(record) => batch.push(record),
                Err(_) => break,
            }
        }
        Ok(Some(batch))
    }

    fn buffered(&self) -> bool {
        true
    }
}

impl Drop for ChannelSource {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

impl ChannelSource {
    fn new() -> (Self, tokio::sync::mpsc::UnboundedSender<Record>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let source = ChannelSource {
            rx,
            dropped_pulls: Arc::default(),
            dropped: Arc::default(),
        };
        (source, tx)
    }
}

#[tokio::test(start_paused = true)]
async fn a_buffered_source_pulled_while_work_completes_loses_nothing_to_pulls_dropped() {
    // Records arrive a few at a time while calls of varied length complete: the loop drops
    // its pull whenever a completion comes first.
    let kit = TestKit::new();
    let sink = MixedSink::default();
    let processor = build(
        kit.processor("p"),
        Pipeline::builder("mixed")
            .parallelism(4)
            .sink(sink.sink())
            .unwrap(),
    );
    let (source, tx) = ChannelSource::new();
    let dropped_pulls = source.dropped_pulls.clone();
    let feeding = tokio::spawn(async move {
        for (i, record) in records(&events(600, 7)).into_iter().enumerate() {
            tx.send(record).unwrap();
            if i % 5 == 4 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    let report = run_source(&kit, &processor, source).await.unwrap();
    feeding.await.unwrap();
    assert_eq!(report.stopped, Stopped::SourceEnded);
    assert_eq!(report.done, 600);
    sink.assert_in_order(600, 7);
    assert!(
        dropped_pulls.load(Ordering::SeqCst) > 0,
        "no pull was dropped: the race was not run"
    );
}

#[tokio::test(start_paused = true)]
async fn a_buffered_source_is_dropped_when_the_drain_begins() {
    // As a source's task ends at shutdown: a JetStream reader stops pulling what the
    // draining processor would not take.
    let sink = sink_fn(|_batch: Batch| async {
        tokio::time::sleep(Duration::from_secs(10)).await;
        Ok::<_, Error>(())
    });
    let processor = build(
        Processor::builder("p")
            .fault_sink(floodway::memory::MemoryFaultSink::new())
            .drain_timeout(Duration::MAX),
        Pipeline::builder("slow").sink(sink).unwrap(),
    );
    let (source, tx) = ChannelSource::new();
    let dropped = source.dropped.clone();
    for record in records(&events(5, 1)) {
        tx.send(record).unwrap();
    }
    let (stop, run) = spawn_run(processor, source, MemoryCheckpointer::default());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!dropped.load(Ordering::SeqCst));
    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(!run.is_finished(), "the drain waits for the sink");
    assert!(
        dropped.load(Ordering::SeqCst),
        "the source is dropped as the drain begins"
    );
    let report = run.await.unwrap().unwrap();
    assert_eq!((report.stopped, report.done), (Stopped::Shutdown, 5));
    drop(tx);
}

#[tokio::test(start_paused = true)]
async fn a_pull_larger_than_the_work_in_flight_allowed_asks_for_no_more_than_that() {
    // The default pull of 512 against 50 in flight: each pull asks for 50.
    let gap = pulled_not_delivered(50, 512, false).await;
    assert!(gap <= 50 + 2 * 50, "{gap} records pulled and not delivered");
    assert!(gap >= 25, "the limit was reached: {gap}");
}

#[tokio::test(start_paused = true)]
async fn the_rate_limit_is_never_exceeded_in_any_window() {
    let kit = TestKit::new();
    let calls: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let sink = {
        let calls = calls.clone();
        sink_fn(move |_batch: Batch| {
            calls.lock().unwrap().push(Instant::now());
            async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                Ok::<_, Error>(())
            }
        })
    };
    // Two pipelines share one limiter: together they stay under it.
    let limiter = RateLimiter::per_second(50).unwrap().with_burst(5).unwrap();
    let resilience = Resilience::default().rate_limit(limiter);
    let processor = ["a", "b"]
        .into_iter()
        .fold(kit.processor("p"), |builder, name| {
            builder.pipeline(
                Pipeline::builder(name)
                    .parallelism(16)
                    .resilience(resilience.clone())
                    .sink(sink.clone())
                    .unwrap(),
            )
        })
        .build()
        .unwrap();
    let started = Instant::now();
    run(&kit, &processor, &events(300, 100)).await.unwrap();
    let calls = calls.lock().unwrap();
    assert_eq!(calls.len(), 600);
    let window = Duration::from_secs(1);
    for (i, t) in calls.iter().enumerate() {
        let in_window = calls[i..].iter().take_while(|u| **u - *t < window).count();
        assert!(
            in_window <= 50 + 5,
            "{in_window} calls in a window starting at call {i}"
        );
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rate = 600.0 / elapsed;
    assert!(rate > 48.0 && rate <= 55.0, "achieved {rate:.1}/s");
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_in_flight_work_and_commits() {
    let checkpointer = MemoryCheckpointer::default();
    let pulled = Arc::new(AtomicU64::new(0));
    let delivered = MemorySink::new();
    let slow = {
        let delivered = delivered.clone();
        sink_fn(move |batch: Batch| {
            let mut delivered = delivered.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                tower::Service::call(&mut delivered, batch).await
            }
        })
    };
    let processor = build(
        Processor::builder("p")
            .fault_sink(floodway::memory::MemoryFaultSink::new())
            .max_in_flight(100)
            .pull_batch(20)
            // Drain fully, and commit only at the end: no limit, not an overflow.
            .drain_timeout(Duration::MAX)
            .commit_interval(Duration::MAX),
        Pipeline::builder("slow").parallelism(4).sink(slow).unwrap(),
    );
    let source = CountingSource::new(&events(1_000, 10), true, &pulled);
    let (stop, run) = spawn_run(processor, source, checkpointer.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.send(()).unwrap();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.stopped, Stopped::Shutdown);
    assert!(report.done > 0 && report.done < 1_000);
    assert_eq!(
        report.done, report.received,
        "everything received was drained"
    );
    assert_eq!(delivered.len() as u64, report.done);
    assert_eq!(checkpointer.checkpoint("0"), Some(report.done));
}

#[tokio::test(start_paused = true)]
async fn batch_mode_reports_what_did_not_finish_before_the_deadline() {
    let kit = TestKit::new();
    let sink = sink_fn(|batch: Batch| async move {
        if batch.events().any(|e| e.partition_key() == "k1") {
            // This target never answers for k1.
            std::future::pending::<()>().await;
        }
        if batch.events().any(|e| e.id() == "e-2") {
            return Err(Error::poison_msg("Invalid", "bad"));
        }
        Ok(())
    });
    let processor = processor(
        &kit,
        Pipeline::builder("all")
            .resilience(Resilience::none())
            .sink(sink)
            .unwrap(),
    );
    let input: Vec<Record> = records(&events(9, 3)).into_iter().collect();
    let deadline = Instant::now() + Duration::from_secs(3);
    let report = processor.process_batch(input, Some(deadline)).await;
    assert!(report.fatal.is_none());
    assert_eq!(report.report.stopped, Stopped::Deadline);
    let unfinished: Vec<u64> = report.unfinished().map(|r| r.offset).collect();
    assert_eq!(unfinished, vec![2, 5, 8], "the k1 events");
    assert_eq!(report.first_unfinished_per_partition()[0].offset, 2);
    assert_eq!(report.outcomes[2].settlement, Some(Settlement::Faulted));
    assert_eq!(report.outcomes[0].settlement, Some(Settlement::Done));
    assert_eq!(kit.faults().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn disabled_pipelines_see_nothing_and_filters_route_by_type() {
    let kit = TestKit::new();
    let (paid, shipped, off) = (MemorySink::new(), MemorySink::new(), MemorySink::new());
    let processor = kit
        .processor("p")
        .pipeline(
            Pipeline::builder("paid")
                .event_type("order-paid")
                .sink(paid.clone())
                .unwrap(),
        )
        .pipeline(
            Pipeline::builder("shipped-or-delivered")
                .event_type("*-shipped")
                .event_type("order-delivered")
                .sink(shipped.clone())
                .unwrap(),
        )
        .pipeline(
            Pipeline::builder("off")
                .enabled(false)
                .sink(off.clone())
                .unwrap(),
        )
        .build()
        .unwrap();
    let input = generate::orders(2_000, 3);
    let report = kit
        .run(&processor, MemorySource::from_events(&input, 4))
        .await
        .unwrap();
    let count = |f: &dyn Fn(&str) -> bool| input.iter().filter(|e| f(e.event_type())).count();
    assert_eq!(paid.len(), count(&|t| t == "order-paid"));
    assert_eq!(
        shipped.len(),
        count(&|t| t == "order-shipped" || t == "order-delivered")
    );
    assert!(off.is_empty());
    assert_eq!(report.pipelines.len(), 2, "disabled pipelines do not run");
    assert_eq!(report.done, 2_000);
    let total: u64 = (0..4).filter_map(|p| kit.checkpoint(&p.to_string())).sum();
    assert_eq!(total, 2_000, "every partition checkpointed to its end");
}

/// Panics on its second pull; says it is buffered if `.1`; notes whether it was pulled from a
/// task of its own (`.2`).
struct PanickingSource(u32, bool, Arc<std::sync::atomic::AtomicBool>);

impl Source for PanickingSource {
    async fn next_batch(&mut self, _max: usize) -> Result<Option<Vec<Record>>, SourceError> {
        // The run below is not in a task: only a source task has an id.
        self.2
            .store(tokio::task::try_id().is_some(), Ordering::SeqCst);
        self.0 += 1;
        assert!(self.0 < 2, "source bug");
        Ok(Some(records(&events(5, 1)).into_iter().collect()))
    }

    fn buffered(&self) -> bool {
        self.1
    }
}

#[tokio::test(start_paused = true)]
async fn a_source_that_panics_is_an_error_not_the_end_of_the_stream() {
    // Pulled by a task of its own, or by the processor's loop.
    for buffered in [false, true] {
        let kit = TestKit::new();
        let processor = processor(
            &kit,
            Pipeline::builder("all").sink(MemorySink::new()).unwrap(),
        );
        let in_task = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let source = PanickingSource(0, buffered, in_task.clone());
        let err = run_source(&kit, &processor, source).await.unwrap_err();
        assert_eq!(
            in_task.load(Ordering::SeqCst),
            !buffered,
            "a buffered source is pulled by the processor's loop"
        );
        assert!(err.to_string().contains("did it panic"), "{err}");
        assert_eq!(kit.checkpoint("0"), Some(5), "what was done is kept");
    }
}

#[tokio::test(start_paused = true)]
async fn a_step_returning_a_foreign_unit_of_work_cannot_confuse_the_accounting() {
    let kit = TestKit::new();
    let sink = MemorySink::new();
    let pipeline = Pipeline::builder("rewrite")
        .map(|uow| {
            // A new unit of work, not derived from the one given.
            let event = uow.event().derive("thing-rewritten").build();
            Ok(floodway::Uow::detached(event))
        })
        .sink(sink.clone())
        .unwrap();
    let report = run_pipeline(&kit, pipeline, &events(50, 5)).await.unwrap();
    assert_eq!(report.done, 50);
    assert_eq!(sink.len(), 50);
    assert_eq!(kit.checkpoint("0"), Some(50));
}

#[test]
fn processors_that_could_never_work_are_refused() {
    let kit = TestKit::new();
    let cases = [
        (
            kit.processor("p"),
            Pipeline::builder("off").enabled(false),
            "all disabled",
        ),
        (
            kit.processor("p").max_in_flight(100),
            Pipeline::builder("big").batch(floodway::BatchConfig::count(500)),
            "lower max_count",
        ),
    ];
    for (processor, pipeline, refusal) in cases {
        let err = processor
            .pipeline(pipeline.sink(MemorySink::new()).unwrap())
            .build()
            .unwrap_err();
        assert!(err.to_string().contains(refusal), "{err}");
    }
}

/// A live stream: each record becomes available at its own instant (on tokio's clock), and a
/// pull returns what has arrived, waiting for the next arrival when nothing has.
struct PacedSource {
    records: VecDeque<(Instant, Record)>,
}

impl Source for PacedSource {
    async fn next_batch(&mut self, max: usize) -> Result<Option<Vec<Record>>, SourceError> {
        let Some((first, _)) = self.records.front() else {
            return Ok(None);
        };
        tokio::time::sleep_until(*first).await;
        let now = Instant::now();
        let mut out = Vec::new();
        while out.len() < max && self.records.front().is_some_and(|(at, _)| *at <= now) {
            out.push(self.records.pop_front().unwrap().1);
        }
        Ok(Some(out))
    }
}

/// 200 events a second for 10 s; every fourth is of the hot key, whose calls take 100 ms, so
/// its backlog grows by 40 events a second, far past the 100 records in flight; the cold keys'
/// calls take 1 ms. The calls are the sink's, or (`batched`) an async step's before a batch of
/// 8 (or 10 ms). Answers the cold events' p99 latency from their arrival to the sink, and the
/// longest.
async fn hot_and_cold(batched: bool) -> (Duration, Duration) {
    let start = Instant::now();
    let input: Vec<Event> = (0..2_000u32)
        .map(|i| {
            let key = if i % 4 == 0 {
                "hot".to_owned()
            } else {
                format!("cold-{}", i % 50)
            };
            Event::builder("thing-happened", key)
                .id(format!("e-{i}"))
                .timestamp(i64::from(i))
                .build()
        })
        .collect();
    let source = PacedSource {
        records: (0..2_000u64)
            .map(|i| start + Duration::from_millis(i * 5))
            .zip(records(&input))
            .collect(),
    };
    async fn call(event: &Event) {
        let hot = event.partition_key() == "hot";
        tokio::time::sleep(Duration::from_millis(if hot { 100 } else { 1 })).await;
    }
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let sink = {
        let latencies = latencies.clone();
        sink_fn(move |batch: Batch| {
            let latencies = latencies.clone();
            async move {
                if !batched {
                    call(batch.events().next().unwrap()).await;
                }
                for event in batch.events().filter(|e| e.partition_key() != "hot") {
                    let arrived = start + Duration::from_millis(event.timestamp() as u64 * 5);
                    latencies.lock().unwrap().push(arrived.elapsed());
                }
                Ok::<_, Error>(())
            }
        })
    };
    let pipeline = Pipeline::builder("calls").parallelism(16);
    let pipeline = match batched {
        false => pipeline,
        true => pipeline
            .then(|uow| async move {
                call(uow.event()).await;
                Ok(uow)
            })
            .batch(floodway::BatchConfig::count(8).max_wait(Duration::from_millis(10))),
    };
    let kit = TestKit::new();
    let processor = build(
        kit.processor("p")
            .max_in_flight(100)
            .max_buffered(4_000)
            .pull_batch(10),
        pipeline.sink(sink).unwrap(),
    );
    let report = run_source(&kit, &processor, source).await.unwrap();
    assert_eq!(report.done, 2_000);
    let mut cold = latencies.lock().unwrap().clone();
    assert_eq!(cold.len(), 1_500);
    cold.sort();
    (cold[cold.len() * 99 / 100], *cold.last().unwrap())
}

#[tokio::test(start_paused = true)]
async fn one_slow_key_delays_only_its_own_events() {
    let (p99, max) = hot_and_cold(false).await;
    assert!(
        p99 < Duration::from_millis(50),
        "cold keys waited for the hot one: p99 {p99:?}, max {max:?}"
    );
}

/// The same with the slow calls before a batch: a batch holding a hot event waits for the
/// hot key's call under way, not for its whole backlog of calls (submitted before the batch
/// only because the batch waited to fill), and neither do the cold events batched with it.
#[tokio::test(start_paused = true)]
async fn one_slow_key_before_a_batch_delays_it_by_one_call_not_its_backlog() {
    let (p99, max) = hot_and_cold(true).await;
    // One hot call (100 ms) and the batch's wait, not seconds of backlog.
    assert!(
        p99 < Duration::from_millis(250),
        "cold keys waited for the hot one's backlog: p99 {p99:?}, max {max:?}"
    );
}

/// A batch larger than `max_in_flight` (a Lambda invocation of 10,000 records on a processor
/// allowed 512) runs through without waiting on any timer: each pull is taken as soon as the
/// records before it are done, whatever the bound and the pipelines' batch sizes.
#[tokio::test(start_paused = true)]
async fn batch_mode_runs_a_batch_larger_than_the_in_flight_bound_without_waiting() {
    for (max_in_flight, pull_batch) in [(512, 512), (256, 512), (100, 30), (4096, 512)] {
        let counted = Arc::new(AtomicUsize::new(0));
        let pipeline = |name: &str, batch: usize| {
            let counted = counted.clone();
            Pipeline::builder(name)
                .map_event(|e: &Event| Ok(e.derive("copied").build()))
                .batch(floodway::BatchConfig::count(batch))
                .sink(sink_fn(move |batch: Batch| {
                    counted.fetch_add(batch.len(), Ordering::Relaxed);
                    std::future::ready(Ok::<_, Error>(()))
                }))
                .unwrap()
        };
        let processor = Processor::builder("big")
            .max_in_flight(max_in_flight)
            .pull_batch(pull_batch)
            .fault_sink(floodway::memory::MemoryFaultSink::new())
            .pipeline(pipeline("tens", 10))
            .pipeline(pipeline("twenty-fives", 25))
            .build()
            .unwrap();
        let input: Vec<Record> = records(&events(2_000, 7)).into_iter().collect();
        let started = Instant::now();
        let report = processor.process_batch(input, None).await;
        assert_eq!(report.report.done, 2_000, "{max_in_flight}/{pull_batch}");
        assert_eq!(counted.load(Ordering::Relaxed), 4_000);
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "{max_in_flight} in flight, pulls of {pull_batch}: no timer waited on"
        );
    }
}

/// A checkpointer whose ownership falls in doubt after the first batch, and stays there.
#[derive(Clone, Default)]
struct InDoubt {
    asked: Arc<AtomicUsize>,
    committed: Arc<Mutex<Vec<floodway::Checkpoint>>>,
}

impl floodway::Checkpointer for InDoubt {
    async fn commit(
        &mut self,
        checkpoints: &[floodway::Checkpoint],
    ) -> Result<(), floodway::error::CommitError> {
        self.committed
            .lock()
            .unwrap()
            .extend_from_slice(checkpoints);
        Ok(())
    }

    async fn owned(&mut self) -> Result<(), floodway::error::CommitError> {
        if self.asked.fetch_add(1, Ordering::SeqCst) > 0 {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

/// While the processor waits to know whether it still owns what it read, the work under way
/// goes on (its sink calls finish, its checkpoints are committed) and a shutdown is heard: the
/// wait holds up only the batch it is about.
#[tokio::test(start_paused = true)]
async fn a_batch_waiting_for_ownership_holds_up_nothing_else() {
    let sunk = Arc::new(AtomicU64::new(0));
    let slow = {
        let sunk = sunk.clone();
        sink_fn(move |batch: Batch| {
            let sunk = sunk.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                sunk.fetch_add(batch.len() as u64, Ordering::SeqCst);
                Ok::<_, Error>(())
            }
        })
    };
    let processor = build(
        Processor::builder("p")
            .fault_sink(floodway::memory::MemoryFaultSink::new())
            .max_in_flight(20)
            .pull_batch(20),
        Pipeline::builder("slow")
            .parallelism(20)
            .sink(slow)
            .unwrap(),
    );
    let source = CountingSource::new(&events(100, 10), true, &Arc::new(AtomicU64::new(0)));
    let checkpointer = InDoubt::default();
    let (stop, run) = spawn_run(processor, source, checkpointer.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The first batch was done and committed while the second waited.
    assert_eq!(sunk.load(Ordering::SeqCst), 20);
    assert_eq!(
        checkpointer
            .committed
            .lock()
            .unwrap()
            .last()
            .map(|c| c.offset),
        Some(20)
    );
    stop.send(()).unwrap();
    let report = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the shutdown was heard")
        .unwrap()
        .unwrap();
    assert_eq!(report.stopped, Stopped::Shutdown);
    assert_eq!(report.done, 20);
}

/// Record data that counts how many copies of it are alive.
struct Counted(Vec<u8>, Arc<AtomicUsize>);

impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.1.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Makes its records as they are pulled (none waits in it), each one's data counted alive.
struct CountedSource {
    events: VecDeque<Event>,
    pulled: Arc<AtomicUsize>,
    alive: Arc<AtomicUsize>,
}

impl Source for CountedSource {
    async fn next_batch(&mut self, max: usize) -> Result<Option<Vec<Record>>, SourceError> {
        if self.events.is_empty() {
            std::future::pending::<()>().await;
        }
        let n = max.min(self.events.len());
        let pull = self
            .events
            .drain(..n)
            .map(|e| {
                let offset = self.pulled.fetch_add(1, Ordering::SeqCst) as u64 + 1;
                self.alive.fetch_add(1, Ordering::SeqCst);
                let data =
                    bytes::Bytes::from_owner(Counted(e.to_bytes().to_vec(), self.alive.clone()));
                Record::new("test", "0", offset, data)
            })
            .collect();
        Ok(Some(pull))
    }
}

/// Records stay in the pull they came in: a record that never finishes holds its own pull's
/// records, and no other's, while the processor pulls on up to its memory bound behind it.
#[tokio::test(start_paused = true)]
async fn a_stuck_record_holds_its_own_pull_and_no_other() {
    let kit = TestKit::new();
    let alive = Arc::new(AtomicUsize::new(0));
    let input: Vec<Event> = (0..1_000u32)
        .map(|i| {
            let key = if i == 3 {
                "stuck".to_owned()
            } else {
                format!("k-{i}")
            };
            Event::builder("thing-happened", key)
                .id(format!("e-{i}"))
                .timestamp(1)
                .build()
        })
        .collect();
    let pulled = Arc::new(AtomicUsize::new(0));
    let source = CountedSource {
        events: input.into(),
        pulled: pulled.clone(),
        alive: alive.clone(),
    };
    let sunk = Arc::new(AtomicUsize::new(0));
    let sink = {
        let sunk = sunk.clone();
        sink_fn(move |batch: Batch| {
            let stuck = batch.events().any(|e| e.partition_key() == "stuck");
            let sunk = sunk.clone();
            async move {
                if stuck {
                    std::future::pending::<()>().await;
                }
                sunk.fetch_add(batch.len(), Ordering::SeqCst);
                Ok::<_, Error>(())
            }
        })
    };
    let pipeline = Pipeline::builder("p")
        .resilience(Resilience::none())
        .sink(sink)
        .unwrap();
    let processor = build(
        kit.processor("p")
            .max_in_flight(50)
            .max_buffered(200)
            .pull_batch(10),
        pipeline,
    );
    let (stop, run) = spawn_run(processor, source, kit.checkpointer().clone());
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Pulled up to the bound of records held behind the stuck one (the fourth), every other
    // record taken in done.
    let sunk = sunk.load(Ordering::SeqCst);
    assert!((190..=200).contains(&sunk), "{sunk} records done");
    // Alive: the pulls read but not yet taken in, and the stuck record's pull of 10.
    let read_ahead = pulled.load(Ordering::SeqCst) - sunk - 1;
    assert_eq!(alive.load(Ordering::SeqCst), read_ahead + 10);
    stop.send(()).unwrap();
    run.abort();
}
