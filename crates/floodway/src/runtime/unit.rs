//! What runs for each scheduled piece of work: steps, the sink call, and faults.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use metrics::Histogram;
use smallvec::{smallvec, SmallVec};
use tokio::time::Instant;
use tower::ServiceExt;
use tracing::Instrument;

use crate::error::{Error, ErrorClass, RunError};
use crate::event::Event;
use crate::fault::{fault_event, FaultOrigin};
use crate::layer::retry::Backoff;
use crate::pipeline::step::{guarded, run_all, StepFailure, StepOutput};
use crate::pipeline::PipelineCore;
use crate::runtime::batcher::Flushed;
use crate::runtime::scheduler::Keys;
use crate::runtime::FaultSink;
use crate::sink::{Attempt, Unresolved};
use crate::uow::{Batch, Delivered, Record, Ticket, Uow};

/// Work waiting in a pipeline's scheduler.
pub(crate) enum Work {
    /// Remaining steps from `from`, then the sink (a pipeline without batching).
    Single { uow: Uow, from: usize },
    /// Remaining steps from `from`; the outputs go on to the batcher.
    Pre { uow: Uow, from: usize },
    /// A batch for the sink.
    Batch(Flushed),
}

/// The latency histograms of a pipeline, registered once per run.
pub(crate) struct Timers {
    pub(crate) sink: Histogram,
    pub(crate) steps: Histogram,
}

/// What every unit of a pipeline shares, behind one reference counted once per unit.
pub(crate) struct PipeEnv {
    pub(crate) ctx: Arc<UnitCtx>,
    pub(crate) core: Arc<PipelineCore>,
    /// The pipeline's position among the run's pipelines.
    pub(crate) index: usize,
    pub(crate) timers: Timers,
}

/// What the processor shares with every unit.
pub(crate) struct UnitCtx {
    pub(crate) processor: Arc<str>,
    pub(crate) fault_sink: FaultSink,
    /// Every field any pipeline redacts: a record that cannot be decoded may hold any of them.
    pub(crate) redact_all: Arc<[String]>,
}

/// How a unit ended.
pub(crate) struct Outcome {
    /// Pieces to finish, with whether each was faulted.
    pub(crate) finished: SmallVec<[(Ticket, bool); 1]>,
    /// Outputs of pre-batch steps, for the batcher.
    pub(crate) children: Vec<Uow>,
    /// Units of work the sink accepted.
    pub(crate) delivered: u64,
    /// Fault events published.
    pub(crate) faults: u64,
    /// Units of work a filter after an async step dropped (those before it are counted at
    /// dispatch).
    pub(crate) filtered: u64,
    /// Whether this was pre-batch work.
    pub(crate) pre: bool,
}

pub(crate) struct UnitOutput {
    pub(crate) pipeline: usize,
    pub(crate) slot: Option<(u64, Keys)>,
    pub(crate) result: Result<Outcome, RunError>,
}

pub(crate) type BoxUnit = Pin<Box<dyn Future<Output = UnitOutput> + Send>>;

async fn publish_fault(
    ctx: &UnitCtx,
    pipeline: &str,
    step: &str,
    (record, part): (&Record, u64),
    event: Option<&Event>,
    err: &Error,
    redact: &[String],
) -> Result<(), RunError> {
    let origin = FaultOrigin {
        processor: &ctx.processor,
        pipeline,
        step,
    };
    let fault = fault_event(origin, record, part, event, err, redact);
    let fault_id = crate::fault::fault_id(&fault).to_owned();
    // Debug, not warn: the fault event itself is the record, and a burst of poison events
    // must not become a burst of log lines.
    tracing::debug!(
        pipeline,
        step,
        partition = %record.partition,
        offset = record.offset,
        fault = %fault_id,
        error = %err,
        "fault"
    );
    metrics::counter!(
        "floodway_faults_total",
        "processor" => ctx.processor.to_string(),
        "pipeline" => pipeline.to_owned(),
        "class" => err.class().as_str()
    )
    .increment(1);
    match guarded(ctx.fault_sink.clone().oneshot(fault)).await {
        Ok(()) => Ok(()),
        Err(cause) => Err(RunError::FaultSink {
            fault_id,
            pipeline: pipeline.to_owned(),
            cause,
        }),
    }
}

/// The event and error a fault of `uow` shows: the event as it was before a step decrypted
/// it, and the error with the decrypted values scrubbed from its message (`None`: the error
/// as it is).
fn as_faulted<'a>(uow: &'a Uow, err: &Error) -> (&'a Arc<Event>, Option<Error>) {
    let Some(before) = uow.get::<crate::encryption::Undecrypted>() else {
        return (&uow.event, None);
    };
    let message = crate::fault::scrub_texts(err.message(), &before.secrets).into_owned();
    (&before.event, Some(err.echo(message)))
}

/// A failure outside a scheduled unit (a batch's key function) as [`fault_now`] takes it,
/// shown as [`as_faulted`] shows it.
pub(crate) fn faulted_now(failure: StepFailure) -> FailureItem {
    let (event, error) = as_faulted(&failure.uow, &failure.error);
    let (event, error) = (event.clone(), error.unwrap_or(failure.error));
    (
        failure.uow.record.clone(),
        failure.uow.part,
        Some(event),
        failure.step,
        error,
    )
}

/// What [`fault_now`] faults: the record, the part of it, the event as shown, the step and
/// the error.
pub(crate) type FailureItem = (Delivered, u64, Option<Arc<Event>>, Arc<str>, Error);

/// Publishes the faults of step failures; a fatal step error stops the processor.
async fn fault_failures(
    ctx: &UnitCtx,
    core: &PipelineCore,
    failures: Vec<StepFailure>,
) -> Result<u64, RunError> {
    let mut faults = 0;
    for f in failures {
        if f.error.class() == ErrorClass::Fatal {
            return Err(RunError::Fatal {
                pipeline: core.name.to_string(),
                step: f.step.to_string(),
                cause: f.error,
            });
        }
        let (event, error) = as_faulted(&f.uow, &f.error);
        publish_fault(
            ctx,
            &core.name,
            &f.step,
            (&f.uow.record, f.uow.part),
            Some(event),
            error.as_ref().unwrap_or(&f.error),
            &core.redact,
        )
        .await?;
        faults += 1;
    }
    Ok(faults)
}

/// Calls the sink until the batch is delivered or its failure is decided. Entries the sink
/// reports failed are retried (by the stack) and faulted one by one; a batch of several that
/// fails as a whole is bisected so that a single poison event is faulted alone and the rest
/// delivered. Returns the units of work that failed for good, with their errors.
async fn send(
    core: &PipelineCore,
    sink_seconds: &Histogram,
    batch: Batch,
) -> Result<Vec<(Uow, Error)>, RunError> {
    let call = |attempt: Attempt| async move {
        let started = Instant::now();
        let result = guarded((core.sink)(attempt)).await;
        sink_seconds.record(started.elapsed().as_secs_f64());
        result
    };
    let mut failed = Vec::new();
    // The halves of bisected batches wait here; the common case never allocates it.
    let mut stack = Vec::new();
    let mut next = Some(batch);
    while let Some(batch) = next.take().or_else(|| stack.pop()) {
        let attempt = Attempt::new(batch);
        let mut outage_wait = 0;
        loop {
            match call(attempt.clone()).await {
                Ok(()) => {}
                Err(err) if err.class() == ErrorClass::Fatal => {
                    return Err(RunError::Fatal {
                        pipeline: core.name.to_string(),
                        step: "sink".into(),
                        cause: err,
                    })
                }
                Err(err) if err.class() == ErrorClass::Outage => {
                    // The target is down: hold what is pending, never fault it.
                    let backoff =
                        Backoff::exponential(Duration::from_secs(1), Duration::from_secs(30));
                    // Half the pause and a random half more: the units held this way do not
                    // go again together, in waves.
                    let ceiling = backoff.ceiling(outage_wait);
                    let pause = ceiling / 2 + ceiling.mul_f64(fastrand::f64() / 2.0);
                    Box::pin(tokio::time::sleep(pause)).await;
                    outage_wait += 1;
                    continue;
                }
                Err(err) => match attempt.unresolved() {
                    // Each entry's own error, with the attempts the stack made for it.
                    Unresolved::Entries(entries) => {
                        failed.extend(entries.into_iter().map(|(uow, e)| {
                            let attempts = e.attempts().max(err.attempts());
                            (uow, e.with_attempts(attempts))
                        }));
                    }
                    Unresolved::Whole(batch) if batch.len() > 1 => {
                        tracing::debug!(pipeline = %core.name, size = batch.len(), error = %err, "bisecting failed batch");
                        let (left, right) = batch.split();
                        stack.push(right);
                        stack.push(left);
                    }
                    Unresolved::Whole(batch) => failed.push((batch.items()[0].clone(), err)),
                },
            }
            break;
        }
        failed.extend(attempt.settled());
    }
    Ok(failed)
}

/// Runs the remaining steps; the time of those that include an async step is recorded
/// (synchronous steps run inline at dispatch and cost too little to time one by one).
async fn steps(core: &PipelineCore, timer: &Histogram, uow: Uow, from: usize) -> StepOutput {
    if from >= core.steps.len() {
        // Every step ran at dispatch: the common case of synchronous steps.
        return StepOutput {
            ready: smallvec![(uow, from)],
            failed: Vec::new(),
        };
    }
    let started = Instant::now();
    // Boxed: most units have no step left, and their future need not hold room for these.
    let out = Box::pin(run_all(&core.steps, uow, from)).await;
    timer.record(started.elapsed().as_secs_f64());
    out
}

/// Runs the remaining steps of a unit of work; then, for a pipeline without batching, sends
/// each output to the sink, or (`pre`) hands the outputs on to the batcher.
async fn run_steps(
    ctx: &UnitCtx,
    core: &PipelineCore,
    timers: &Timers,
    (uow, from): (Uow, usize),
    pre: bool,
) -> Result<Outcome, RunError> {
    let ticket = uow.ticket;
    let out = steps(core, &timers.steps, uow, from).await;
    let filtered = u64::from(out.ready.is_empty() && out.failed.is_empty());
    // Faults are rare: their futures are boxed, to keep every unit's future small (it is
    // moved onto the heap once per unit).
    let mut faults = if out.failed.is_empty() {
        0
    } else {
        Box::pin(fault_failures(ctx, core, out.failed)).await?
    };
    let mut outcome = Outcome {
        finished: SmallVec::new(),
        children: Vec::new(),
        delivered: 0,
        faults: 0,
        filtered,
        pre,
    };
    if pre {
        outcome.children = out.ready.into_iter().map(|(u, _)| u).collect();
    } else {
        for (uow, _) in out.ready {
            let failed = send(core, &timers.sink, Batch::one(uow)).await?;
            if failed.is_empty() {
                outcome.delivered += 1;
            } else {
                faults += Box::pin(fault_sink_failures(ctx, core, &failed)).await?;
            }
        }
    }
    outcome.finished = smallvec![(ticket, faults > 0)];
    outcome.faults = faults;
    Ok(outcome)
}

/// Publishes the faults of units of work the sink failed for good.
async fn fault_sink_failures(
    ctx: &UnitCtx,
    core: &PipelineCore,
    failed: &[(Uow, Error)],
) -> Result<u64, RunError> {
    for (uow, err) in failed {
        let (event, error) = as_faulted(uow, err);
        publish_fault(
            ctx,
            &core.name,
            "sink",
            (&uow.record, uow.part),
            Some(event),
            error.as_ref().unwrap_or(err),
            &core.redact,
        )
        .await?;
    }
    Ok(failed.len() as u64)
}

async fn run_batch(
    ctx: &UnitCtx,
    core: &PipelineCore,
    sink_seconds: &Histogram,
    flushed: Flushed,
) -> Result<Outcome, RunError> {
    let failed = send(core, sink_seconds, flushed.items.clone()).await?;
    if !failed.is_empty() {
        Box::pin(fault_sink_failures(ctx, core, &failed)).await?;
    }
    let is_faulted = |m: &Uow| {
        failed
            .iter()
            .any(|(f, _)| f.ticket == m.ticket && Arc::ptr_eq(&f.event, &m.event))
    };
    Ok(Outcome {
        finished: flushed
            .members()
            .iter()
            .map(|m| (m.ticket, !failed.is_empty() && is_faulted(m)))
            .collect(),
        children: Vec::new(),
        delivered: (flushed.items.len() - failed.len()) as u64,
        faults: failed.len() as u64,
        // Compacted away: a later event of their key went in their stead.
        filtered: (flushed.members().len() - flushed.items.len()) as u64,
        pre: false,
    })
}

/// The future of scheduled work.
pub(crate) fn scheduled(env: Arc<PipeEnv>, id: u64, keys: Keys, work: Work) -> BoxUnit {
    let core = &env.core;
    let span = match &work {
        Work::Single { uow, .. } | Work::Pre { uow, .. } => tracing::debug_span!(
            "uow",
            pipeline = %core.name,
            partition = %uow.record.partition,
            offset = uow.record.offset,
            event = %uow.event.id(),
        ),
        Work::Batch(f) => {
            tracing::debug_span!("batch", pipeline = %core.name, size = f.items.len())
        }
    };
    let unit = async move {
        let (ctx, core, timers) = (&*env.ctx, &*env.core, &env.timers);
        let result = match work {
            Work::Single { uow, from } => run_steps(ctx, core, timers, (uow, from), false).await,
            Work::Pre { uow, from } => run_steps(ctx, core, timers, (uow, from), true).await,
            Work::Batch(flushed) => run_batch(ctx, core, &timers.sink, flushed).await,
        };
        UnitOutput {
            pipeline: env.index,
            slot: Some((id, keys)),
            result,
        }
    };
    Box::pin(unit.instrument(span))
}

/// The future that faults a record (part `part` of it) before any scheduled work (decode or
/// sync-step failure).
pub(crate) fn fault_now(
    ctx: Arc<UnitCtx>,
    pipeline: usize,
    core: Option<Arc<PipelineCore>>,
    failure: FailureItem,
    ticket: Ticket,
) -> BoxUnit {
    Box::pin(async move {
        let (record, part, event, step, error) = failure;
        let (name, redact): (&str, &[String]) = match &core {
            Some(c) => (&c.name, &c.redact),
            None => (crate::fault::DECODE_PIPELINE, &ctx.redact_all),
        };
        let result = if error.class() == ErrorClass::Fatal {
            Err(RunError::Fatal {
                pipeline: name.to_owned(),
                step: step.to_string(),
                cause: error,
            })
        } else {
            publish_fault(
                &ctx,
                name,
                &step,
                (&record, part),
                event.as_deref(),
                &error,
                redact,
            )
            .await
            .map(|()| Outcome {
                finished: smallvec![(ticket, true)],
                children: Vec::new(),
                delivered: 0,
                faults: 1,
                filtered: 0,
                pre: false,
            })
        };
        UnitOutput {
            pipeline,
            slot: None,
            result,
        }
    })
}
