//! Steps: the transformations between a pipeline's filter and its sink.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use futures_util::FutureExt;
use smallvec::SmallVec;

use crate::error::Error;
use crate::layer::BoxFuture;
use crate::uow::Uow;

pub(crate) type MapFn = Arc<dyn Fn(Uow) -> Result<Uow, Error> + Send + Sync>;
pub(crate) type FlatMapFn = Arc<dyn Fn(Uow) -> Result<Vec<Uow>, Error> + Send + Sync>;
pub(crate) type PredicateFn = Arc<dyn Fn(&Uow) -> bool + Send + Sync>;
pub(crate) type AsyncFn = Arc<dyn Fn(Uow) -> BoxFuture<Uow> + Send + Sync>;

#[derive(Clone)]
pub(crate) enum StepKind {
    Map(MapFn),
    FlatMap(FlatMapFn),
    Filter(PredicateFn),
    Async(AsyncFn),
}

#[derive(Clone)]
pub(crate) struct Step {
    pub(crate) name: Arc<str>,
    pub(crate) kind: StepKind,
}

/// A failure of one unit of work at one step.
pub(crate) struct StepFailure {
    pub(crate) uow: Uow,
    pub(crate) step: Arc<str>,
    pub(crate) error: Error,
}

/// The message of a caught panic.
pub(crate) fn panic_error(payload: &(dyn std::any::Any + Send)) -> Error {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-string payload".to_owned());
    Error::poison_msg("Panic", message)
}

/// Runs an async call, turning a panic into a poison error.
pub(crate) async fn guarded<T>(fut: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(result) => result,
        Err(payload) => Err(panic_error(&*payload)),
    }
}

/// The result of running steps over one unit of work: what reached the end (or stopped at an
/// async step, with the index to resume from) and what failed.
#[derive(Default)]
pub(crate) struct StepOutput {
    pub(crate) ready: SmallVec<[(Uow, usize); 1]>,
    pub(crate) failed: Vec<StepFailure>,
}

/// Applies one synchronous step: the units of work it passes on (none when filtered out).
fn apply_sync(kind: &StepKind, uow: &Uow) -> Result<SmallVec<[Uow; 1]>, Error> {
    let result = catch_unwind(AssertUnwindSafe(|| match kind {
        StepKind::Map(f) => f(uow.clone()).map(|u| smallvec::smallvec![u]),
        StepKind::FlatMap(f) => f(uow.clone()).map(SmallVec::from_vec),
        StepKind::Filter(f) => Ok(if f(uow) {
            smallvec::smallvec![uow.clone()]
        } else {
            SmallVec::new()
        }),
        StepKind::Async(_) => Ok(smallvec::smallvec![uow.clone()]),
    }));
    result.unwrap_or_else(|payload| Err(panic_error(&*payload)))
}

/// Runs steps from `from` over `uow`, depth first so outputs keep source order. With
/// `run_async` false it stops each unit of work at the first async step, which is returned with
/// its index to resume from.
async fn run(steps: &[Step], uow: Uow, from: usize, run_async: bool) -> StepOutput {
    let mut out = StepOutput::default();
    let mut stack: SmallVec<[(Uow, usize); 1]> = SmallVec::new();
    stack.push((uow, from));
    while let Some((uow, i)) = stack.pop() {
        let Some(step) = steps.get(i) else {
            out.ready.push((uow, i));
            continue;
        };
        let result = match &step.kind {
            StepKind::Async(_) if !run_async => {
                out.ready.push((uow, i));
                continue;
            }
            StepKind::Async(f) => guarded(f(uow.clone()))
                .await
                .map(|u| smallvec::smallvec![u]),
            kind => apply_sync(kind, &uow),
        };
        match result {
            Ok(next) => stack.extend(next.into_iter().rev().map(|mut u| {
                // Whatever a step returns stays accountable to the record it came from.
                if u.ticket != uow.ticket || !Arc::ptr_eq(&u.record, &uow.record) {
                    u.ticket = uow.ticket;
                    u.record = uow.record.clone();
                }
                (u, i + 1)
            })),
            Err(error) => out.failed.push(StepFailure {
                uow,
                step: step.name.clone(),
                error,
            }),
        }
    }
    out
}

/// Runs the synchronous steps from `from` until the end or the first async step.
pub(crate) fn run_sync(steps: &[Step], uow: Uow, from: usize) -> StepOutput {
    // No async step is awaited, so the future completes on its first poll.
    run(steps, uow, from, false)
        .now_or_never()
        .unwrap_or_default()
}

/// Runs every step from `from`, async ones included, to the end.
pub(crate) async fn run_all(steps: &[Step], uow: Uow, from: usize) -> StepOutput {
    run(steps, uow, from, true).await
}
