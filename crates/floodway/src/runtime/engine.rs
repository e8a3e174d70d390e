//! The run loop: one task that pulls, dispatches, completes and commits.
//!
//! Everything that touches run state happens in this one task, so the state needs no locks;
//! units of work run as futures polled by it (a `FuturesUnordered`). A source pulls in a task
//! of its own behind a channel of one batch, so pulling never blocks completions; a buffered
//! source ([`Source::buffered`](crate::Source::buffered)) is pulled by the loop itself, raced
//! with completions and dropped whenever one comes first.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use smallvec::SmallVec;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::error::{CommitError, Error, RunError, SourceError};
use crate::event::KeyHashMap;
use crate::event::{now_millis, Event};
use crate::pipeline::step::{run_sync, StepFailure};
use crate::pipeline::{Pipeline, PipelineCore};
use crate::runtime::batcher::{Batcher, Flush, Flushed};
use crate::runtime::scheduler::{FxMap, Keys, Scheduler};
use crate::runtime::unit::{
    fault_now, faulted_now, scheduled, BoxUnit, PipeEnv, Timers, UnitCtx, UnitOutput, Work,
};
use crate::runtime::{PipelineReport, ProcessorInner, RunReport, Stopped};
use crate::source::{Checkpoint, Checkpointer, Pulled, Settlement, Source};
use crate::uow::{Batch, Delivered, Record, Ticket, Uow};

use super::ledger::Ledger;

struct Pipe {
    pipeline: Pipeline,
    core: Arc<PipelineCore>,
    sched: Scheduler<Work>,
    batcher: Option<Batcher>,
    /// Pre-batch work not yet finished: the batcher may still receive its outputs.
    upstream: usize,
    /// The keys of that work, with how much of it each has. A unit of work done with its
    /// steps whose key has some waits its turn behind it in the scheduler rather than go
    /// into the batcher ahead of it (a synchronous step's retry makes such work while the
    /// same key's next events pass the step at once).
    escalated: KeyHashMap<u32>,
    /// Shared with every unit of the pipeline: one reference to clone per unit.
    env: Arc<PipeEnv>,
    tally: Tally,
}

/// What a pipeline did: the run report, and the same counts as metrics.
struct Tally {
    report: PipelineReport,
    taken: metrics::Counter,
    filtered: metrics::Counter,
    delivered: metrics::Counter,
    faulted: metrics::Counter,
}

impl Tally {
    fn new(processor: &str, pipeline: &str) -> Self {
        let counter = |outcome: &'static str| {
            metrics::counter!(
                "floodway_events_total",
                "processor" => processor.to_owned(),
                "pipeline" => pipeline.to_owned(),
                "outcome" => outcome
            )
        };
        Tally {
            report: PipelineReport {
                name: pipeline.to_owned(),
                ..PipelineReport::default()
            },
            taken: counter("taken"),
            filtered: counter("filtered"),
            delivered: counter("delivered"),
            faulted: counter("faulted"),
        }
    }

    fn taken(&mut self) {
        self.report.taken += 1;
        self.taken.increment(1);
    }

    fn filtered(&mut self, n: u64) {
        self.report.filtered += n;
        self.filtered.increment(n);
    }

    fn delivered(&mut self, n: u64) {
        self.report.delivered += n;
        self.delivered.increment(n);
    }

    fn faulted(&mut self, n: u64) {
        self.report.faults += n;
        self.faulted.increment(n);
    }
}

pub(crate) struct Engine<'p, C> {
    proc: &'p ProcessorInner,
    /// Shared with every unit: one reference to clone per unit.
    ctx: Arc<UnitCtx>,
    pipes: Vec<Pipe>,
    ledger: Ledger,
    units: FuturesUnordered<BoxUnit>,
    /// Fault units raised while dispatching, launched with the ready work.
    faults_due: Vec<BoxUnit>,
    checkpointer: C,
    report: RunReport,
    committed: HashMap<Arc<str>, u64>,
    /// Registered once per run: the loop sets them at every turn.
    in_flight: metrics::Gauge,
    lag_seconds: metrics::Gauge,
}

/// Aborts the source task when the run ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    /// Aborts the task and waits until it is gone, so that the source (and whatever it holds:
    /// a subscription's lease, a connection) is dropped before the run returns.
    async fn stop(&mut self) {
        self.0.abort();
        let _ = (&mut self.0).await;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Records pulled together: `range` of `records`, shared by the units of work made of them
/// ([`Delivered`]).
struct Pull {
    records: Arc<Vec<Record>>,
    range: Range<usize>,
}

impl From<Vec<Record>> for Pull {
    fn from(records: Vec<Record>) -> Self {
        let range = 0..records.len();
        Pull {
            records: Arc::new(records),
            range,
        }
    }
}

/// Where the run loop takes the source's batches from.
enum Feed<S> {
    /// A task of its own reads the next batch ahead and hands it over.
    Task(mpsc::Receiver<Pulled>, AbortOnDrop),
    /// The loop pulls the source itself ([`Source::buffered`]); `None` once stopped.
    Inline(Option<S>),
    /// Records the caller holds (batch mode): pulled as ranges of them, each record shared
    /// where it is rather than copied out (`None` once stopped).
    Shared(Option<(Arc<Vec<Record>>, usize)>),
}

/// A source that never exists: the type of a feed of shared records, which has none.
enum NoSource {}

impl Source for NoSource {
    async fn next_batch(&mut self, _max: usize) -> Pulled {
        match *self {}
    }
}

impl<S: Source> Feed<S> {
    /// The next batch; `None` when the source is gone without ending its stream (it
    /// panicked, in its task or here).
    async fn next(&mut self, max: usize) -> Option<Result<Option<Pull>, SourceError>> {
        let pulled = match self {
            Feed::Task(rx, _) => rx.recv().await?,
            Feed::Inline(slot) => {
                let source = slot.as_mut()?;
                match std::panic::AssertUnwindSafe(source.next_batch(max))
                    .catch_unwind()
                    .await
                {
                    Ok(pulled) => pulled,
                    Err(_) => {
                        // As a task that panicked: the source is dropped, and the run ends.
                        *slot = None;
                        return None;
                    }
                }
            }
            Feed::Shared(shared) => {
                let (records, next) = shared.as_mut()?;
                let rest = records.len() - *next;
                if rest == 0 {
                    return Some(Ok(None));
                }
                // `max` at a time, as any source gives them: a batch of 10,000 records is
                // worked on `max_in_flight` at a time, not all at once, which bounds the
                // memory of a Lambda invocation and keeps what is worked on in the caches.
                let range = *next..*next + max.clamp(1, rest);
                *next = range.end;
                return Some(Ok(Some(Pull {
                    records: records.clone(),
                    range,
                })));
            }
        };
        Some(pulled.map(|records| records.map(Pull::from)))
    }

    /// Reads nothing more (the loop is draining): the source's task ends, dropping the source,
    /// at its next hand-over; a source the loop pulls is dropped now (a JetStream reader stops
    /// pulling what the draining processor would not take).
    fn close(&mut self) {
        match self {
            Feed::Task(rx, _) => rx.close(),
            Feed::Inline(source) => drop(source.take()),
            Feed::Shared(shared) => drop(shared.take()),
        }
    }

    /// Drops the source (and whatever it holds: a subscription's lease, a connection), once
    /// its task, if it has one, is gone.
    async fn stop(&mut self) {
        match self {
            Feed::Task(_, task) => task.stop().await,
            Feed::Inline(source) => drop(source.take()),
            Feed::Shared(shared) => drop(shared.take()),
        }
    }
}

/// The keys of a batch's members, with repeats: each one's order key, and the key its event
/// has now when a step changed it.
fn member_keys(members: &[Uow]) -> impl Iterator<Item = u64> + '_ {
    members
        .iter()
        .flat_map(|m| std::iter::once(m.order).chain(m.rekeyed()))
}

/// The keys of a batch's members, without repeats.
fn keys_of(members: &[Uow]) -> Keys {
    let mut keys: Vec<u64> = Vec::with_capacity(members.len());
    keys.extend(member_keys(members));
    keys.sort_unstable();
    keys.dedup();
    if keys.len() == 1 {
        Keys::One(keys[0])
    } else {
        Keys::Many(keys)
    }
}

/// Queues a batch that cannot start at once. Its members' keys may have pre-batch work of
/// later records waiting: the batch goes before that, or a key slow before the batch would
/// hold up every key batched with it for as long as its backlog.
fn submit_batch(sched: &mut Scheduler<Work>, keys: Keys, batch: Work) {
    sched.submit_ahead(keys, batch, |w| matches!(w, Work::Pre { .. }));
}

/// The keys a unit started without taking them takes if it does not finish at once: its
/// keys, or the members of a batch started without working them out ([`Keys::Kept`]).
enum Claim {
    Keys(Keys),
    Members(Batch),
}

impl<'p, C: Checkpointer> Engine<'p, C> {
    pub(crate) fn new(proc: &'p ProcessorInner, checkpointer: C) -> Self {
        let ctx = Arc::new(UnitCtx {
            processor: proc.name.clone(),
            fault_sink: proc.fault_sink.clone(),
            redact_all: {
                let mut all: Vec<String> = proc
                    .pipelines
                    .iter()
                    .flat_map(|p| p.core.redact.iter().cloned())
                    .collect();
                all.sort();
                all.dedup();
                all.into()
            },
        });
        let pipes = proc
            .pipelines
            .iter()
            .filter(|p| p.enabled)
            .enumerate()
            .map(|(index, p)| Pipe {
                pipeline: p.clone(),
                core: p.core.clone(),
                sched: Scheduler::new(p.core.parallelism),
                batcher: p.core.batching.clone().map(Batcher::new),
                upstream: 0,
                escalated: KeyHashMap::default(),
                env: Arc::new(PipeEnv {
                    ctx: ctx.clone(),
                    core: p.core.clone(),
                    index,
                    timers: Timers {
                        steps: metrics::histogram!(
                            "floodway_step_duration_seconds",
                            "processor" => proc.name.to_string(),
                            "pipeline" => p.core.name.to_string()
                        ),
                        sink: metrics::histogram!(
                            "floodway_sink_duration_seconds",
                            "processor" => proc.name.to_string(),
                            "pipeline" => p.core.name.to_string()
                        ),
                    },
                }),
                tally: Tally::new(&proc.name, &p.core.name),
            })
            .collect();
        Engine {
            proc,
            ctx,
            pipes,
            ledger: Ledger::default(),
            units: FuturesUnordered::new(),
            faults_due: Vec::new(),
            checkpointer,
            report: RunReport::default(),
            committed: HashMap::new(),
            in_flight: metrics::gauge!("floodway_in_flight", "processor" => proc.name.to_string()),
            lag_seconds: metrics::gauge!("floodway_lag_seconds", "processor" => proc.name.to_string()),
        }
    }

    pub(crate) async fn run<S: Source>(
        self,
        mut source: S,
        shutdown: impl Future<Output = ()> + Send,
        deadline: Option<Instant>,
    ) -> Result<(RunReport, C), RunError> {
        let config = self.proc.config;
        // A pulled batch is dispatched whole: one larger than the work allowed in flight
        // would overrun it.
        let pull = config.pull_batch.min(config.max_in_flight);
        let feed = if source.buffered() {
            Feed::Inline(Some(source))
        } else {
            let (tx, rx) = mpsc::channel::<Pulled>(1);
            let task = AbortOnDrop(tokio::spawn(async move {
                loop {
                    let batch = source.next_batch(pull).await;
                    let more = matches!(batch, Ok(Some(_)));
                    if tx.send(batch).await.is_err() || !more {
                        break;
                    }
                }
            }));
            Feed::Task(rx, task)
        };
        self.run_feed(feed, shutdown, deadline).await
    }

    /// Runs over `records` the caller holds (batch mode), each record shared where it is.
    pub(crate) async fn run_shared(
        self,
        records: Arc<Vec<Record>>,
        shutdown: impl Future<Output = ()> + Send,
        deadline: Option<Instant>,
    ) -> Result<(RunReport, C), RunError> {
        let feed = Feed::<NoSource>::Shared(Some((records, 0)));
        self.run_feed(feed, shutdown, deadline).await
    }

    async fn run_feed<S: Source>(
        mut self,
        mut feed: Feed<S>,
        shutdown: impl Future<Output = ()> + Send,
        deadline: Option<Instant>,
    ) -> Result<(RunReport, C), RunError> {
        let stopped = match self.drive(&mut feed, shutdown, deadline).await {
            Ok(stopped) => stopped,
            Err(err) => {
                // Keep what is done: the checkpoint cannot pass the record that failed.
                if let Err(commit) = self.commit().await {
                    tracing::warn!(processor = %self.proc.name, error = %commit, "final commit failed");
                }
                feed.stop().await;
                return Err(err);
            }
        };
        feed.stop().await;
        self.commit().await?;
        self.report.stopped = stopped;
        self.report.pipelines = self.pipes.iter().map(|p| p.tally.report.clone()).collect();
        let mut checkpoints: Vec<Checkpoint> = self
            .committed
            .iter()
            .map(|(partition, offset)| Checkpoint {
                partition: partition.clone(),
                offset: *offset,
            })
            .collect();
        checkpoints.sort_by(|a, b| a.partition.cmp(&b.partition));
        self.report.checkpoints = checkpoints;
        tracing::info!(
            processor = %self.proc.name,
            received = self.report.received,
            done = self.report.done,
            faults = self.report.faults(),
            ?stopped,
            "run ended"
        );
        Ok((self.report, self.checkpointer))
    }

    /// The run loop; returns why it ended, or the error that stopped it.
    async fn drive<S: Source>(
        &mut self,
        feed: &mut Feed<S>,
        shutdown: impl Future<Output = ()> + Send,
        deadline: Option<Instant>,
    ) -> Result<Stopped, RunError> {
        let config = self.proc.config;
        tokio::pin!(shutdown);
        let mut source_done = false;
        let mut stopping: Option<Instant> = None;
        // A pulled batch waiting for the checkpointer to say this process still owns what
        // it read (`Checkpointer::owned`): asked beside everything else the loop waits on, so
        // that a wait for it holds up nothing under way.
        let mut awaiting: Option<Pull> = None;
        let mut next_commit = after(config.commit_interval);
        let far = || Instant::now() + std::time::Duration::from_secs(86_400 * 365);

        loop {
            self.start_ready()?;
            if source_done || stopping.is_some() {
                self.flush_batchers(false)?;
                self.start_ready()?;
            }
            if (source_done || stopping.is_some()) && self.is_idle() {
                return Ok(if source_done {
                    Stopped::SourceEnded
                } else {
                    Stopped::Shutdown
                });
            }
            // A pulled batch is dispatched whole, so pull only when it fits. While no
            // pipeline is at its parallelism, records parked behind a busy key do not count
            // as in flight: a slow key delays only its own records, up to the memory bound
            // (every record held). A target that is slow for every key still slows the
            // source down: its pipeline fills its slots and its parked records count again.
            let parked = if self.pipes.iter().any(|p| p.sched.saturated()) {
                0
            } else {
                self.pipes
                    .iter()
                    .map(|p| p.sched.parked())
                    .max()
                    .unwrap_or(0)
            };
            let active = self.ledger.undone().saturating_sub(parked);
            let pull = config.pull_batch.min(config.max_in_flight);
            let can_pull = !source_done
                && stopping.is_none()
                && awaiting.is_none()
                && active + pull <= config.max_in_flight
                && self.ledger.held() + pull
                    <= config
                        .max_buffered
                        .max(config.max_in_flight.saturating_mul(4));
            if !can_pull
                && awaiting.is_none()
                && !source_done
                && stopping.is_none()
                && self.is_idle_but_batches()
            {
                // Pulling stopped at the in-flight bound and nothing runs that could make room:
                // the open batches hold every record in flight. Send them now rather than wait
                // for a time limit that may be long, or none.
                self.flush_batchers(false)?;
                self.start_ready()?;
                if !self.is_idle_but_batches() {
                    // The batches went out, and may have finished at once (a sink answering
                    // synchronously): look again at what can be pulled, rather than wait
                    // with pulling off for the next timer (the commit's, a second away).
                    continue;
                }
            }
            let batch_deadline = self
                .pipes
                .iter()
                .filter_map(|p| p.batcher.as_ref()?.deadline())
                .min();
            self.in_flight.set(self.ledger.undone() as f64);

            tokio::select! {
                biased;
                Some(output) = self.units.next(), if !self.units.is_empty() => {
                    self.complete(output)?;
                    // Take every completion that is ready before anything else.
                    while let Some(Some(output)) = self.units.next().now_or_never() {
                        self.complete(output)?;
                    }
                }
                () = tokio::time::sleep_until(deadline.unwrap_or_else(far)), if deadline.is_some() => {
                    return Ok(Stopped::Deadline);
                }
                () = tokio::time::sleep_until(stopping.unwrap_or_else(far)), if stopping.is_some() => {
                    return Ok(Stopped::DrainTimeout);
                }
                () = &mut shutdown, if stopping.is_none() => {
                    tracing::info!(processor = %self.proc.name, "stopping: draining in-flight work");
                    stopping = Some(after(config.drain_timeout));
                    feed.close();
                }
                () = tokio::time::sleep_until(batch_deadline.unwrap_or_else(far)), if batch_deadline.is_some() => {
                    self.flush_batchers(true)?;
                }
                () = tokio::time::sleep_until(next_commit) => {
                    self.commit().await?;
                    next_commit = after(config.commit_interval);
                }
                owned = self.checkpointer.owned(), if awaiting.is_some() && stopping.is_none() => {
                    owned?;
                    if let Some(records) = awaiting.take() {
                        self.dispatch(records)?;
                    }
                }
                pulled = feed.next(pull), if can_pull => match pulled {
                    // Read while this process owned its subscription: acted on only while it
                    // still does (a batch can wait through a takeover, and is then left to
                    // the new owner).
                    Some(Ok(Some(records))) => awaiting = Some(records),
                    Some(Ok(None)) => source_done = true,
                    None => {
                        return Err(RunError::Source(SourceError {
                            source_name: self.proc.name.to_string(),
                            cause: "the source stopped without ending its stream (did it panic?)"
                                .into(),
                        }))
                    }
                    Some(Err(err)) => return Err(RunError::Source(err)),
                },
            }
        }
    }

    fn is_idle(&self) -> bool {
        self.units.is_empty()
            && self.faults_due.is_empty()
            && self
                .pipes
                .iter()
                .all(|p| p.sched.is_empty() && p.batcher.as_ref().is_none_or(Batcher::is_empty))
    }

    /// Whether nothing runs or waits to run, while some batcher may hold an open batch.
    fn is_idle_but_batches(&self) -> bool {
        self.units.is_empty()
            && self.faults_due.is_empty()
            && self.pipes.iter().all(|p| p.sched.is_empty())
            && self
                .pipes
                .iter()
                .any(|p| p.batcher.as_ref().is_some_and(|b| !b.is_empty()))
    }

    async fn commit(&mut self) -> Result<(), RunError> {
        let moved = self.ledger.take_checkpoints();
        if moved.is_empty() {
            return Ok(());
        }
        let committed = self.checkpointer.commit(&moved).await;
        if committed.is_err() {
            // Not stored: the next commit takes them again (their records would be
            // processed again after a restart, not lost, but needlessly).
            self.ledger.moved_again(&moved);
        }
        committed?;
        for cp in moved {
            self.committed.insert(cp.partition, cp.offset);
        }
        Ok(())
    }

    /// Decodes and dispatches pulled records; work that can start at once starts here.
    fn dispatch(&mut self, pull: Pull) -> Result<(), RunError> {
        let max_size = self.proc.config.max_event_size;
        self.report.received += pull.range.len() as u64;
        let mut newest: Option<i64> = None;
        // Shared as pulled: a unit of work holds its record's place in the pull.
        let Pull {
            records: batch,
            range,
        } = pull;
        for at in range {
            let record = &batch[at];
            let limit = if record.assembled {
                usize::MAX
            } else {
                max_size
            };
            // Matched as it comes: an event is large, and mapping the result would copy it.
            let event = match &record.malformed {
                Some(m) => {
                    let err = Error::poison_msg(m.name.clone(), m.message.clone());
                    self.decode_fault(Delivered::new(&batch, at), err);
                    continue;
                }
                None => match Event::decode_bytes(record.data.clone(), limit) {
                    Ok(event) => event,
                    Err(err) => {
                        self.decode_fault(Delivered::new(&batch, at), err.into());
                        continue;
                    }
                },
            };
            newest = Some(event.timestamp());
            // The pipelines that do not take the event count it filtered now. A record no
            // pipeline takes (most of a hub's events, for most processors) is done as it is
            // seen, and never shared.
            let mut takers: SmallVec<[usize; 16]> = SmallVec::new();
            for (index, pipe) in self.pipes.iter_mut().enumerate() {
                if pipe.pipeline.accepts(&event) {
                    takers.push(index);
                } else {
                    pipe.tally.filtered(1);
                }
            }
            let Some((&last, others)) = takers.split_last() else {
                self.ledger.admit_done(record);
                self.report.done += 1;
                self.checkpointer.settle(record, Settlement::Done);
                continue;
            };
            let (record, event) = (Delivered::new(&batch, at), Arc::new(event));
            let ticket = self.ledger.admit(record.clone(), takers.len() as u32);
            // The last pipeline takes the record and event for its unit of work, the others
            // a reference each: one atomic count fewer on each, per record, than copying
            // them for every pipeline and dropping the originals here.
            for &index in others {
                self.dispatch_to(index, Cow::Borrowed(&record), Cow::Borrowed(&event), ticket)?;
            }
            self.dispatch_to(last, Cow::Owned(record), Cow::Owned(event), ticket)?;
        }
        if let Some(ts) = newest {
            self.lag_seconds
                .set((now_millis() - ts).max(0) as f64 / 1000.0);
        }
        Ok(())
    }

    /// Faults a record that could not be read (`err`), before any pipeline sees it.
    fn decode_fault(&mut self, record: Delivered, err: Error) {
        let ticket = self.ledger.admit(record.clone(), 1);
        self.report.decode_faults += 1;
        let failure = (record, 0, None, Arc::from("decode"), err);
        self.faults_due.push(fault_now(
            self.ctx.clone(),
            usize::MAX,
            None,
            failure,
            ticket,
        ));
    }

    /// Hands a decoded record to pipeline `index`, which takes its event: a unit of work of
    /// `record` and `event` (a copy of each reference, when borrowed).
    fn dispatch_to(
        &mut self,
        index: usize,
        record: Cow<'_, Delivered>,
        event: Cow<'_, Arc<Event>>,
        ticket: Ticket,
    ) -> Result<(), RunError> {
        let pipe = &mut self.pipes[index];
        pipe.tally.taken();
        let uow = Uow::new(record.into_owned(), event.into_owned(), ticket);
        let out = run_sync(&pipe.core.steps, uow, 0);
        let pieces = (out.ready.len() + out.failed.len()) as u32;
        if pieces == 0 {
            pipe.tally.filtered(1);
            self.finish(ticket, false);
            return Ok(());
        }
        self.ledger.add_pieces(ticket, pieces - 1);
        let mut failed = out.failed;
        for (uow, from) in out.ready {
            failed.extend(self.route(index, uow, from, false)?);
        }
        self.raise(index, failed);
        Ok(())
    }

    /// Faults units of work that failed outside a scheduled unit (a synchronous step, a
    /// batch's key function): each fault finishes its unit's piece once it is stored.
    fn raise(&mut self, index: usize, failed: Vec<StepFailure>) {
        let pipe = &mut self.pipes[index];
        for failure in failed {
            pipe.tally.faulted(1);
            let ticket = failure.uow.ticket;
            // Shown as any fault of a step: as it was before decryption, the error scrubbed.
            let item = faulted_now(failure);
            self.faults_due.push(fault_now(
                self.ctx.clone(),
                index,
                Some(pipe.core.clone()),
                item,
                ticket,
            ));
        }
    }

    /// Sends a unit of work of pipeline `index` on: to its scheduler, or to its batcher once
    /// all steps ran and no earlier work of its key is still before the batcher (`turn`: it
    /// comes out of such work, whose turn it was). Returns the units of work a batch flush
    /// could not key.
    fn route(
        &mut self,
        index: usize,
        uow: Uow,
        from: usize,
        turn: bool,
    ) -> Result<Vec<StepFailure>, RunError> {
        let pipe = &mut self.pipes[index];
        let done_with_steps = from >= pipe.core.steps.len();
        match &mut pipe.batcher {
            Some(batcher)
                if done_with_steps
                    && (turn
                        || pipe.escalated.is_empty()
                        || !pipe.escalated.contains_key(&uow.order)) =>
            {
                let flush = batcher.push(uow);
                return self.submit(index, flush);
            }
            Some(_) => {
                pipe.upstream += 1;
                let hash = uow.order;
                *pipe.escalated.entry(hash).or_default() += 1;
                self.schedule(index, Keys::One(hash), Work::Pre { uow, from })?;
            }
            None => {
                let key = match uow.rekeyed() {
                    None => Keys::One(uow.order),
                    Some(now) => Keys::Many(vec![uow.order.min(now), uow.order.max(now)]),
                };
                self.schedule(index, key, Work::Single { uow, from })?;
            }
        }
        Ok(Vec::new())
    }

    /// Schedules flushed batches with the keys of their members.
    fn submit(&mut self, index: usize, flush: Flush) -> Result<Vec<StepFailure>, RunError> {
        for flushed in flush.batches {
            self.schedule_batch(index, flushed)?;
        }
        Ok(flush.failed)
    }

    /// Schedules a flushed batch. One that may start at once starts without its set of keys
    /// ([`Keys::Kept`]): the set (every member's key, sorted, without repeats: an allocation
    /// and a sort per batch) is made only if the batch does not finish at once, so a sink
    /// answering synchronously never needs it while no key is held.
    fn schedule_batch(&mut self, index: usize, flushed: Flushed) -> Result<(), RunError> {
        let Some(members) = flushed.shared_members() else {
            let keys = keys_of(flushed.members());
            return self.schedule(index, keys, Work::Batch(flushed));
        };
        let sched = &mut self.pipes[index].sched;
        match sched.try_start_with(|| member_keys(members.items())) {
            Some(id) => {
                let env = self.pipes[index].env.clone();
                let unit = scheduled(env, id, Keys::Kept, Work::Batch(flushed));
                self.launch(unit, Some((index, id, Claim::Members(members))))
            }
            None => {
                submit_batch(sched, keys_of(members.items()), Work::Batch(flushed));
                Ok(())
            }
        }
    }

    /// Hands work to pipeline `index`'s scheduler; work that may start at once (a free slot,
    /// its keys free, nothing ready before it) starts here, and when it is done at once (a
    /// sink answering synchronously) it never enters the scheduler's queues or key table.
    fn schedule(&mut self, index: usize, keys: Keys, work: Work) -> Result<(), RunError> {
        let sched = &mut self.pipes[index].sched;
        match sched.try_start(&keys) {
            Some(id) => self.start(index, id, keys, work, true),
            None if matches!(work, Work::Batch(_)) => {
                submit_batch(sched, keys, work);
                Ok(())
            }
            None => {
                sched.submit(keys, work);
                Ok(())
            }
        }
    }
    /// Flushes the batchers that must: those past their deadline (`due`), or, with no more
    /// input coming, those with no upstream work left.
    fn flush_batchers(&mut self, due: bool) -> Result<(), RunError> {
        let now = Instant::now();
        for index in 0..self.pipes.len() {
            let pipe = &mut self.pipes[index];
            let upstream = pipe.upstream;
            let Some(batcher) = &mut pipe.batcher else {
                continue;
            };
            let flush_now = if due {
                batcher.deadline().is_some_and(|d| d <= now)
            } else {
                upstream == 0
            };
            if flush_now {
                let flush = batcher.flush();
                let failed = self.submit(index, flush)?;
                self.raise(index, failed);
            }
        }
        Ok(())
    }

    /// Starts the work each scheduler lets start. Each unit is polled once right away: one
    /// that completes at once (a sink answering synchronously) is handled without ever
    /// entering the set of pending units, and its completion may let more work start.
    fn start_ready(&mut self) -> Result<(), RunError> {
        for index in 0..self.pipes.len() {
            while let Some((id, keys, work)) = self.pipes[index].sched.next() {
                self.start(index, id, keys, work, false)?;
            }
        }
        for unit in std::mem::take(&mut self.faults_due) {
            self.launch(unit, None)?;
        }
        Ok(())
    }

    /// Starts work the scheduler of pipeline `index` let start under `id`; `unclaimed`: it
    /// was started by `try_start`, and takes its keys only if it is not done at once.
    fn start(
        &mut self,
        index: usize,
        id: u64,
        keys: Keys,
        work: Work,
        unclaimed: bool,
    ) -> Result<(), RunError> {
        // Cheap to clone: one hash, or a batch's few.
        let claim = unclaimed.then(|| (index, id, Claim::Keys(keys.clone())));
        let unit = scheduled(self.pipes[index].env.clone(), id, keys, work);
        self.launch(unit, claim)
    }

    /// Polls a new unit once; one that is not done at once joins the pending units, which
    /// poll it again with a real waker before anything waits, and first takes the keys it
    /// was started without (`claim`: its pipeline, id and keys).
    fn launch(
        &mut self,
        mut unit: BoxUnit,
        claim: Option<(usize, u64, Claim)>,
    ) -> Result<(), RunError> {
        let mut cx = Context::from_waker(Waker::noop());
        match unit.as_mut().poll(&mut cx) {
            Poll::Ready(output) => self.complete(output),
            Poll::Pending => {
                match claim {
                    Some((index, id, Claim::Keys(keys))) => {
                        self.pipes[index].sched.claim(id, &keys)
                    }
                    Some((index, id, Claim::Members(members))) => {
                        let keys = keys_of(members.items());
                        self.pipes[index].sched.claim_kept(id, keys);
                    }
                    None => {}
                }
                self.units.push(unit);
                Ok(())
            }
        }
    }

    fn complete(&mut self, output: UnitOutput) -> Result<(), RunError> {
        let UnitOutput {
            pipeline,
            slot,
            result,
        } = output;
        if let Some((id, keys)) = &slot {
            self.pipes[pipeline].sched.complete(*id, keys);
        }
        let outcome = result?;
        if let Some(pipe) = self.pipes.get_mut(pipeline) {
            if outcome.pre {
                pipe.upstream -= 1;
                for key in slot.iter().flat_map(|(_, keys)| keys.as_slice()) {
                    if let Some(n) = pipe.escalated.get_mut(key) {
                        *n -= 1;
                        if *n == 0 {
                            pipe.escalated.remove(key);
                        }
                    }
                }
            }
            pipe.tally.delivered(outcome.delivered);
            pipe.tally.filtered(outcome.filtered);
            if slot.is_some() {
                pipe.tally.faulted(outcome.faults);
            }
            let from = pipe.core.steps.len();
            let mut failed = Vec::new();
            for child in outcome.children {
                self.ledger.add_pieces(child.ticket, 1);
                failed.extend(self.route(pipeline, child, from, outcome.pre)?);
            }
            self.raise(pipeline, failed);
        }
        for (ticket, faulted) in outcome.finished {
            self.finish(ticket, faulted);
        }
        Ok(())
    }

    /// Finishes a piece of the record of `ticket`, settling the record if that was its last
    /// (inlined with the ledger's calls: see [`Ledger`]).
    #[inline(always)]
    fn finish(&mut self, ticket: Ticket, faulted: bool) {
        if let Some(done) = self.ledger.finish(ticket, faulted) {
            self.report.done += 1;
            self.checkpointer.settle(&done.record, done.settlement);
        }
    }
}

/// Collects the settlements of a batch's records (batch mode).
///
/// A record whose offset is its position in the batch (every Lambda source numbers its
/// records so) is settled in a slot of its own: no lock and no hash per record. Any other goes
/// to a map by (partition, offset).
#[derive(Clone)]
pub(crate) struct SettlementCollector {
    records: Arc<Vec<Record>>,
    slots: Arc<[AtomicU8]>,
    others: Arc<Mutex<BySource>>,
}

/// Settlements by (partition, offset).
type BySource = FxMap<(Arc<str>, u64), Settlement>;

/// A settlement as a slot holds it; 0 is a record not settled.
fn slot_code(settlement: Settlement) -> u8 {
    match settlement {
        Settlement::Done => 1,
        Settlement::Faulted => 2,
    }
}

/// The settlement a slot holds, if any.
fn slot_settlement(code: u8) -> Option<Settlement> {
    [Settlement::Done, Settlement::Faulted]
        .into_iter()
        .find(|s| slot_code(*s) == code)
}

impl SettlementCollector {
    /// A collector for `records`, which the run reads.
    pub(crate) fn new(records: Arc<Vec<Record>>) -> Self {
        let slots = (0..records.len()).map(|_| AtomicU8::new(0)).collect();
        SettlementCollector {
            records,
            slots,
            others: Arc::default(),
        }
    }

    /// The slot of the record with this partition and offset, when it has one.
    fn slot(&self, partition: &Arc<str>, offset: u64) -> Option<&AtomicU8> {
        let index = usize::try_from(offset).ok()?;
        let at = self.records.get(index)?;
        let same = at.offset == offset
            && (Arc::ptr_eq(&at.partition, partition) || at.partition == *partition);
        same.then(|| &self.slots[index])
    }

    /// How the record at each position of the batch was settled (`None`: it was not).
    pub(crate) fn take(&self) -> Vec<Option<Settlement>> {
        let others = std::mem::take(&mut *self.others.lock().unwrap_or_else(|p| p.into_inner()));
        self.records
            .iter()
            .map(|record| match self.slot(&record.partition, record.offset) {
                Some(slot) => slot_settlement(slot.load(Ordering::Relaxed)),
                None => others
                    .get(&(record.partition.clone(), record.offset))
                    .copied(),
            })
            .collect()
    }
}

impl Checkpointer for SettlementCollector {
    async fn commit(&mut self, _checkpoints: &[Checkpoint]) -> Result<(), CommitError> {
        Ok(())
    }

    fn settle(&mut self, record: &Record, settlement: Settlement) {
        match self.slot(&record.partition, record.offset) {
            Some(slot) => slot.store(slot_code(settlement), Ordering::Relaxed),
            None => {
                self.others
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert((record.partition.clone(), record.offset), settlement);
            }
        }
    }
}

/// The instant `wait` from now ("drain fully", "never on a timer": `Duration::MAX`).
fn after(wait: std::time::Duration) -> Instant {
    crate::clock::later(Instant::now(), wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(partition: &str, offset: u64) -> Record {
        Record::new("test", partition, offset, "{}")
    }

    #[test]
    fn settlements_come_back_by_position_whatever_the_offsets() {
        // Positional offsets (as Lambda numbers records), then two that are not: an offset
        // beyond the batch, and one naming another record's position in another partition.
        let records = Arc::new(vec![
            record("a", 0),
            record("a", 1),
            record("b", 2),
            record("b", 70),
            record("c", 1),
            record("a", 5),
        ]);
        let mut collector = SettlementCollector::new(records.clone());
        let settle = |c: &mut SettlementCollector, i: usize, s| c.settle(&records[i], s);
        settle(&mut collector, 0, Settlement::Done);
        settle(&mut collector, 2, Settlement::Faulted);
        settle(&mut collector, 3, Settlement::Done);
        settle(&mut collector, 4, Settlement::Faulted);
        // A copy of a record (another allocation of its partition's name) finds its slot.
        collector.settle(&record("a", 5), Settlement::Done);
        assert_eq!(
            collector.take(),
            vec![
                Some(Settlement::Done),
                None,
                Some(Settlement::Faulted),
                Some(Settlement::Done),
                Some(Settlement::Faulted),
                Some(Settlement::Done),
            ]
        );
    }
}
