//! Steps: the transformations between a pipeline's filter and its sink.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use smallvec::SmallVec;
use tower::util::BoxCloneSyncService;
use tower::ServiceExt;

use crate::error::{BuildError, Error, ErrorClass};
use crate::layer::retry::Backoff;
use crate::layer::{BoxFuture, Resilience};
use crate::uow::Uow;
use crate::Event;

pub(crate) type MapFn = Arc<dyn Fn(Uow) -> Result<Uow, Error> + Send + Sync>;
pub(crate) type MapEventFn = Arc<dyn Fn(&Event) -> Result<Event, Error> + Send + Sync>;
pub(crate) type CheckFn = Arc<dyn Fn(&Event) -> Result<(), Error> + Send + Sync>;
pub(crate) type FlatMapFn = Arc<dyn Fn(Uow) -> Result<Vec<Uow>, Error> + Send + Sync>;
pub(crate) type PredicateFn = Arc<dyn Fn(&Uow) -> bool + Send + Sync>;
pub(crate) type AsyncFn = Arc<dyn Fn(Uow) -> BoxFuture<Uow> + Send + Sync>;

#[derive(Clone)]
pub(crate) enum StepKind {
    Map(MapFn),
    /// A map that reads the event and makes a new one: the unit of work is not handed over,
    /// so it goes on without being copied.
    MapEvent(MapEventFn),
    /// A check of the event that passes the unit of work on as it is, or fails it.
    Check(CheckFn),
    FlatMap(FlatMapFn),
    Filter(PredicateFn),
    Async(AsyncFn),
}

/// What a step passes on: none (filtered out), one, or several (split).
pub(crate) type Outputs = SmallVec<[Uow; 1]>;

/// What a synchronous step made of a unit of work. A step that keeps the unit of work (a
/// filter that holds, a check that passes, a map of its event, which replaced the event in
/// place) says so rather than give back a copy: the walk moves the unit of work on, where a
/// copy would take a reference to its record and its event and give both back (atomic counts,
/// a few nanoseconds each, per event and step).
enum Passed {
    /// The unit of work itself.
    Same,
    /// Other units of work: a map's, a split's, or none (filtered out).
    Outputs(Outputs),
}

impl Passed {
    /// What passes on from `uow`, as units of work.
    fn into_outputs(self, uow: Uow) -> Outputs {
        match self {
            Passed::Same => smallvec::smallvec![uow],
            Passed::Outputs(outputs) => outputs,
        }
    }
}

/// A step's call wrapped in its resilience stack.
type Guarded = BoxCloneSyncService<Uow, Outputs, Error>;

#[derive(Clone)]
pub(crate) struct Step {
    pub(crate) name: Arc<str>,
    pub(crate) kind: StepKind,
    /// The stack the step's calls go through (set when the pipeline is built).
    pub(crate) resilience: Resilience,
    guard: Option<Guard>,
}

/// A step's resilience: the guarded call and, for a synchronous step, how many calls have
/// succeeded on its fast path.
#[derive(Clone)]
struct Guard {
    call: Guarded,
    successes: Arc<Successes>,
}

/// The successes of a synchronous step's fast path, counted only while some unit of work whose
/// retries may be spent watches them: every event passes the fast path, and an atomic add per
/// event and step costs more than the step's bookkeeping besides.
#[derive(Default)]
struct Successes {
    /// Units of work of a synchronous step in [`Step::call_guarded`], judged by the successes
    /// counted meanwhile.
    watching: AtomicU64,
    count: AtomicU64,
}

impl Successes {
    /// Counts a success, if anyone watches. A success that finds nobody watching came, in the
    /// one order of sequentially consistent operations, before a watcher registered and read
    /// its starting count: it could not have counted for that watcher anyway.
    fn note(&self) {
        if self.watching.load(Ordering::SeqCst) != 0 {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Starts watching: the count now, and the watch, which ends when dropped.
    fn watch(&self) -> (u64, Watch<'_>) {
        self.watching.fetch_add(1, Ordering::SeqCst);
        (self.count.load(Ordering::SeqCst), Watch(self))
    }

    /// The count now, to compare with a watch's starting count.
    fn now(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// A watch of a step's successes, ended when dropped (the unit of work decided, or its future
/// dropped).
struct Watch<'a>(&'a Successes);

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        self.0.watching.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Step {
    pub(crate) fn new(name: Arc<str>, kind: StepKind) -> Self {
        Step {
            name,
            kind,
            resilience: Resilience::default(),
            guard: None,
        }
    }

    /// Wraps the step's call in its resilience stack; `pipeline` labels it in metrics.
    ///
    /// An async step's calls all go through the stack, breaker included. A synchronous step
    /// runs bare and only its failures reach the stack, so a breaker there would never see
    /// the successes it needs to tell poison from an outage; its stack has no breaker and
    /// [`call_guarded`](Self::call_guarded) judges by the fast path's successes instead.
    pub(crate) fn build_guard(&mut self, pipeline: &str) -> Result<(), BuildError> {
        let label = format!("{pipeline}/{}", self.name);
        let resilience = match self.kind {
            StepKind::Async(_) => self.resilience.clone(),
            _ => self.resilience.clone().no_breaker(),
        };
        let kind = self.kind.clone();
        let call = tower::service_fn(move |mut uow: Uow| -> BoxFuture<Outputs> {
            match &kind {
                StepKind::Async(f) => {
                    let fut = f(uow);
                    Box::pin(async move { fut.await.map(|u| smallvec::smallvec![u]) })
                }
                sync => {
                    let result = apply_sync(sync, &mut uow).map(|passed| passed.into_outputs(uow));
                    Box::pin(async move { result })
                }
            }
        });
        self.guard = Some(Guard {
            call: resilience.apply(&label, call)?,
            successes: Arc::default(),
        });
        Ok(())
    }

    /// Runs the step through its resilience stack until it succeeds or its failure is
    /// decided. An outage the stack passes on is held here, never faulted. For a synchronous
    /// step whose retries are spent: if the step has succeeded for other units of work since
    /// this one first failed, the step works and this unit is the problem (the error goes on,
    /// to be faulted), unless it was throttled (what the step calls is busy, and would take
    /// it another time: held, as the breaker holds a throttled call); if not, it is held like
    /// an outage and tried again.
    async fn call_guarded(&self, mut uow: Uow) -> Result<Outputs, Error> {
        let Some(guard) = &self.guard else {
            // Steps are always guarded once built; a bare call keeps the step's own answer.
            return match &self.kind {
                StepKind::Async(f) => guarded(f(uow)).await.map(|u| smallvec::smallvec![u]),
                sync => apply_sync(sync, &mut uow).map(|passed| passed.into_outputs(uow)),
            };
        };
        let judged = !matches!(self.kind, StepKind::Async(_));
        // Only a synchronous step is judged by its fast path's successes (an async step's
        // calls all go through its stack, breaker included).
        let watch = judged.then(|| guard.successes.watch());
        let before = watch.as_ref().map_or(0, |(count, _)| *count);
        let mut waits = 0;
        loop {
            match guarded(guard.call.clone().oneshot(uow.clone())).await {
                Err(err) if err.class() == ErrorClass::Outage => {}
                Err(err) if judged && err.class() == ErrorClass::Transient => {
                    if guard.successes.now() > before && !err.is_throttle() {
                        return Err(err);
                    }
                    // Held: what the target asked for, or the backoff if longer.
                    let asked = err.retry_after().unwrap_or_default();
                    tokio::time::sleep(held_wait(waits).max(asked)).await;
                    waits += 1;
                    continue;
                }
                result => return result,
            }
            // Held: wait, then try again.
            tokio::time::sleep(held_wait(waits)).await;
            waits += 1;
        }
    }

    /// Counts a success of a synchronous step's fast path: evidence, for a unit of work
    /// whose retries are spent, that the step works.
    fn note_success(&self) {
        if let Some(guard) = &self.guard {
            guard.successes.note();
        }
    }
}

/// How long a held unit of work waits before its `waits`-th try again: 1 s, doubling up to 30 s.
fn held_wait(waits: u32) -> Duration {
    Backoff::exponential(Duration::from_secs(1), Duration::from_secs(30)).ceiling(waits)
}

/// Whether a synchronous step's error goes to its resilience stack rather than straight to
/// a fault: transient errors are retried and outages held, as for any call.
fn escalates(err: &Error) -> bool {
    matches!(err.class(), ErrorClass::Transient | ErrorClass::Outage)
}

/// A failure of one unit of work at one step.
pub(crate) struct StepFailure {
    pub(crate) uow: Uow,
    pub(crate) step: Arc<str>,
    pub(crate) error: Error,
}

/// The message of a caught panic.
pub(crate) fn panic_error(payload: &(dyn std::any::Any + Send)) -> Error {
    Error::panicked(payload)
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

/// Applies one synchronous step: what it passes on (nothing when filtered out). A map of the
/// event replaces `uow`'s event once it has the new one (the new event is moved once, into
/// the place of the old); on an error or a panic `uow` is as it was.
fn apply_sync(kind: &StepKind, uow: &mut Uow) -> Result<Passed, Error> {
    let result = catch_unwind(AssertUnwindSafe(|| match kind {
        StepKind::Map(f) => f(uow.clone()).map(|u| Passed::Outputs(smallvec::smallvec![u])),
        StepKind::MapEvent(f) => f(uow.event()).map(|event| {
            uow.set_event(event);
            Passed::Same
        }),
        StepKind::Check(f) => f(uow.event()).map(|()| Passed::Same),
        StepKind::FlatMap(f) => f(uow.clone()).and_then(|mut parts| {
            ids_apart(&parts)?;
            for (place, part) in parts.iter_mut().enumerate() {
                part.part = uow.part_at(place);
            }
            Ok(Passed::Outputs(SmallVec::from_vec(parts)))
        }),
        StepKind::Filter(f) => Ok(if f(uow) {
            Passed::Same
        } else {
            Passed::Outputs(SmallVec::new())
        }),
        StepKind::Async(_) => Ok(Passed::Same),
    }));
    result.unwrap_or_else(|payload| Err(panic_error(&*payload)))
}

/// Refuses a split that gave two different events one id: a hub keeps the first of events
/// with one id and drops the rest as repeats, and a sink keyed by id writes one over the other
/// (events of one type derived from one event with [`Event::derive`](crate::Event::derive)).
/// Parts carrying equal events (one event sent on by several units of work) pass.
fn ids_apart(parts: &[Uow]) -> Result<(), Error> {
    // One event shared by several parts (an `Arc` cloned) is no clash, and is not compared
    // field by field.
    let clash = |a: &Uow, b: &Uow| {
        !Arc::ptr_eq(&a.event, &b.event)
            && a.event().id() == b.event().id()
            && a.event() != b.event()
    };
    let found = if parts.len() <= 16 {
        parts
            .iter()
            .enumerate()
            .find_map(|(i, a)| parts[i + 1..].iter().find(|b| clash(a, b)).map(|_| a))
    } else {
        // Sorted by id, the parts of one id are side by side: each is checked against the
        // first of its run.
        let mut by_id: Vec<&Uow> = parts.iter().collect();
        by_id.sort_unstable_by(|a, b| a.event().id().cmp(b.event().id()));
        let mut first = by_id[0];
        by_id[1..].iter().copied().find(|part| {
            if part.event().id() != first.event().id() {
                first = part;
                return false;
            }
            clash(first, part)
        })
    };
    match found {
        None => Ok(()),
        Some(part) => Err(Error::poison_msg(
            "DuplicateEventId",
            format!(
                "a split gave two different events the id {} (type {}): a hub keeps only the \
                 first; derive each with Event::derive_part",
                part.event().id(),
                part.event().event_type()
            ),
        )),
    }
}

/// Applies a step synchronously where it can: what it passed on, or its error; `None` when the
/// step must be called through its resilience stack (an async step, or a synchronous one that
/// failed transiently: its retries wait).
fn apply(step: &Step, uow: &mut Uow) -> Option<Result<Passed, Error>> {
    match &step.kind {
        StepKind::Async(_) => None,
        kind => match apply_sync(kind, uow) {
            Ok(next) => {
                step.note_success();
                Some(Ok(next))
            }
            Err(err) if escalates(&err) => None,
            Err(err) => Some(Err(err)),
        },
    }
}

/// `output`, a unit of work a step returned for `from`, kept accountable to the record `from`
/// came from, whatever the step did to it.
fn accountable(mut output: Uow, from: &Uow) -> Uow {
    if output.ticket != from.ticket || !output.record.same(&from.record) {
        output.ticket = from.ticket;
        output.record = from.record.clone();
    }
    output
}

/// A depth-first walk of units of work through steps: outputs go on the stack in reverse, so
/// they keep source order.
struct Walk<'s> {
    steps: &'s [Step],
    out: StepOutput,
    stack: SmallVec<[(Uow, usize); 1]>,
}

impl<'s> Walk<'s> {
    fn new(steps: &'s [Step], uow: Uow, from: usize) -> Self {
        let mut walk = Walk::empty(steps);
        walk.stack.push((uow, from));
        walk
    }

    /// A walk with nothing on it yet, for a unit of work whose step has already run
    /// ([`follow`](Self::follow) puts what the step passed on).
    fn empty(steps: &'s [Step]) -> Self {
        Walk {
            steps,
            out: StepOutput::default(),
            stack: SmallVec::new(),
        }
    }

    /// The next unit of work and the step it is at; those past the last step are ready.
    fn next(&mut self) -> Option<(Uow, usize, &'s Step)> {
        while let Some((uow, i)) = self.stack.pop() {
            match self.steps.get(i) {
                Some(step) => return Some((uow, i, step)),
                None => self.out.ready.push((uow, i)),
            }
        }
        None
    }

    /// Stops `uow` at step `i`, to resume from there.
    fn park(&mut self, uow: Uow, i: usize) {
        self.out.ready.push((uow, i));
    }

    /// Goes on after step `i` gave `result` for `uow`: its outputs onto the stack, or its
    /// failure into the output.
    fn follow(&mut self, (uow, i, step): (Uow, usize, &Step), result: Result<Passed, Error>) {
        match result {
            Ok(Passed::Same) => self.stack.push((uow, i + 1)),
            Ok(Passed::Outputs(next)) => self.stack.extend(
                next.into_iter()
                    .rev()
                    .map(|u| (accountable(u, &uow), i + 1)),
            ),
            Err(error) => self.out.failed.push(StepFailure {
                uow,
                step: step.name.clone(),
                error,
            }),
        }
    }
}

/// Runs the synchronous steps from `from` until the end, the first async step, or a
/// synchronous step that failed transiently: those units of work are returned with the index
/// to resume from, to run as scheduled work. Nothing here awaits, so nothing here is a future.
pub(crate) fn run_sync(steps: &[Step], mut uow: Uow, from: usize) -> StepOutput {
    // Most steps pass one unit of work on (a map, a check, a filter that holds): those are
    // run in a plain loop. The walk's stack is taken up only when a step passes on anything
    // else (a split, none) or fails; a step that must wait parks the unit where it is.
    let mut i = from;
    while let Some(step) = steps.get(i) {
        let result = match apply(step, &mut uow) {
            Some(Ok(Passed::Same)) => {
                i += 1;
                continue;
            }
            None => break,
            Some(Ok(Passed::Outputs(next))) => match next.into_inner() {
                Ok([one]) => {
                    uow = accountable(one, &uow);
                    i += 1;
                    continue;
                }
                Err(next) => Ok(Passed::Outputs(next)),
            },
            Some(Err(error)) => Err(error),
        };
        let mut walk = Walk::empty(steps);
        walk.follow((uow, i, step), result);
        return walk_sync(walk);
    }
    let mut out = StepOutput::default();
    out.ready.push((uow, i));
    out
}

/// Runs `walk` to its end over synchronous steps, parking what must wait.
fn walk_sync(mut walk: Walk<'_>) -> StepOutput {
    while let Some((mut uow, i, step)) = walk.next() {
        match apply(step, &mut uow) {
            Some(result) => walk.follow((uow, i, step), result),
            None => walk.park(uow, i),
        }
    }
    walk.out
}

/// Runs every step from `from`, async ones included, to the end.
pub(crate) async fn run_all(steps: &[Step], uow: Uow, from: usize) -> StepOutput {
    let mut walk = Walk::new(steps, uow, from);
    while let Some((mut uow, i, step)) = walk.next() {
        let result = match apply(step, &mut uow) {
            Some(result) => result,
            None => step.call_guarded(uow.clone()).await.map(Passed::Outputs),
        };
        walk.follow((uow, i, step), result);
    }
    walk.out
}
