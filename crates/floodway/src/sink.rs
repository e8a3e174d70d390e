//! Sinks: the side effects at the end of pipelines, as `tower::Service`s.
//!
//! # The sink contract
//!
//! A sink is a `Service<Batch, Error = floodway::Error>` that is `Clone`, whose response says
//! what it delivered: a [`Delivery`] naming the entries that failed and why, or `()` for a
//! sink that delivers all or nothing. The pipeline clones it per call to run calls
//! concurrently, so shared state belongs behind an `Arc`.
//!
//! - `Ok(Delivery)` with failed entries: the others are delivered. The pipeline's
//!   [`Resilience`](crate::layer::Resilience) stack retries the failed entries only (a
//!   transient one within the retry policy and its budget; a throttled one also tells
//!   adaptive concurrency to back off); a poison one is faulted alone, without bisection.
//! - `Err(error)`: the whole call failed. It is retried as a whole; a batch whose retries are
//!   spent is bisected so that a poison event is faulted alone.
//!
//! The sink classifies its errors ([`Error::transient`], [`Error::throttled`],
//! [`Error::poison`]); the stack decides when to retry, and the runtime what to fault.
//!
//! A sink is written one of two ways, the two of `tower`: a closure through [`sink_fn`] (per
//! batch) or [`each_fn`] (per event, concurrently, each failure its own), or a type that
//! implements `Service<Batch>` with [`impl_sink!`](crate::impl_sink) (and a fault sink,
//! `Service<Event>`, with [`impl_fault_sink!`](crate::impl_fault_sink)).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::stream::{self, StreamExt};
use tower::util::{service_fn, ServiceFn};
use tower::Service;

use crate::error::Error;
use crate::event::Event;
use crate::hub::SharedHub;
use crate::layer::BoxFuture;
use crate::uow::{Batch, Uow};

/// What a sink call delivered: every entry of its batch, or all but the failed ones, each with
/// its error. Indices are positions in the batch the sink was given.
///
/// ```
/// use floodway::sink::Delivery;
/// use floodway::Error;
///
/// let mut delivery = Delivery::complete();
/// delivery.fail(2, Error::throttled_msg("ProvisionedThroughputExceeded", "slow down"));
/// assert_eq!(delivery.failed().len(), 1);
/// ```
#[derive(Debug, Default)]
#[must_use]
pub struct Delivery {
    failed: Vec<(usize, Error)>,
}

impl Delivery {
    /// Every entry delivered.
    pub fn complete() -> Self {
        Delivery { failed: Vec::new() }
    }

    /// A delivery where these entries failed (a repeated index keeps its first error).
    pub fn with_failed(failed: impl IntoIterator<Item = (usize, Error)>) -> Self {
        let mut delivery = Delivery::complete();
        for (index, error) in failed {
            delivery.fail(index, error);
        }
        delivery
    }

    /// Records that the entry at `index` failed with `error`; a second failure of the same
    /// entry is ignored.
    pub fn fail(&mut self, index: usize, error: Error) {
        if !self.failed.iter().any(|(i, _)| *i == index) {
            self.failed.push((index, error));
        }
    }

    /// The failed entries, with their errors.
    pub fn failed(&self) -> &[(usize, Error)] {
        &self.failed
    }

    /// Whether every entry was delivered.
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty()
    }

    /// The failed entries, owned.
    pub fn into_failed(self) -> Vec<(usize, Error)> {
        self.failed
    }
}

impl From<()> for Delivery {
    /// A sink that answers `()` delivered everything.
    fn from((): ()) -> Self {
        Delivery::complete()
    }
}

/// The sink contract, as a bound: a cloneable `Service<Batch>` answering a [`Delivery`] (or
/// `()`), whose calls can move between tasks.
pub trait Sink:
    Service<Batch, Response: Into<Delivery>, Error = Error, Future: Send + 'static>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<T> Sink for T where
    T: Service<Batch, Response: Into<Delivery>, Error = Error, Future: Send + 'static>
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// A sink from an async closure over a [`Batch`]: all or nothing when it answers `()`, or
/// entry by entry when it answers a [`Delivery`].
///
/// ```
/// use floodway::{sink_fn, Batch, Error};
/// let sink = sink_fn(|batch: Batch| async move {
///     println!("{} events", batch.len());
///     Ok::<_, Error>(())
/// });
/// ```
pub fn sink_fn<F, Fut, R>(f: F) -> ServiceFn<F>
where
    F: FnMut(Batch) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<R, Error>> + Send + 'static,
    R: Into<Delivery>,
{
    service_fn(f)
}

/// A sink from an async closure over one unit of work, called for the entries of a batch
/// concurrently (at most `concurrency` at a time); each entry that fails is reported alone,
/// so only it is retried or faulted.
///
/// ```
/// use floodway::{sink::each_fn, Error, Uow};
/// let sink = each_fn(8, |uow: Uow| async move {
///     println!("{}", uow.event().id());
///     Ok::<_, Error>(())
/// });
/// ```
pub fn each_fn<F, Fut>(concurrency: usize, f: F) -> EachFn<F>
where
    F: Fn(Uow) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Error>> + Send + 'static,
{
    EachFn {
        f: Arc::new(f),
        concurrency: concurrency.max(1),
    }
}

/// The sink of [`each_fn`].
pub struct EachFn<F> {
    f: Arc<F>,
    concurrency: usize,
}

impl<F> Clone for EachFn<F> {
    fn clone(&self) -> Self {
        EachFn {
            f: self.f.clone(),
            concurrency: self.concurrency,
        }
    }
}

impl<F> std::fmt::Debug for EachFn<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EachFn")
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl<F, Fut> Service<Batch> for EachFn<F>
where
    F: Fn(Uow) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Error>> + Send + 'static,
{
    type Response = Delivery;
    type Error = Error;
    type Future = BoxFuture<Delivery>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, batch: Batch) -> Self::Future {
        let f = self.f.clone();
        let concurrency = self.concurrency;
        Box::pin(async move { deliver_each(&batch, concurrency, |uow| f(uow.clone())).await })
    }
}

/// Delivers the entries of a batch one by one, at most `concurrency` at a time, and reports
/// each failure alone: the body of a sink whose target takes one event per call.
///
/// # Errors
/// A batch of one fails as a whole, with its entry's error.
pub async fn deliver_each<'a, F, Fut>(
    batch: &'a Batch,
    concurrency: usize,
    f: F,
) -> Result<Delivery, Error>
where
    F: Fn(&'a Uow) -> Fut,
    Fut: Future<Output = Result<(), Error>> + 'a,
{
    if let [uow] = batch.items() {
        return f(uow).await.map(|()| Delivery::complete());
    }
    let calls: Vec<_> = batch
        .items()
        .iter()
        .enumerate()
        .map(|(i, uow)| {
            let call = f(uow);
            async move { (i, call.await) }
        })
        .collect();
    let results: Vec<(usize, Result<(), Error>)> = stream::iter(calls)
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    Ok(Delivery::with_failed(
        results
            .into_iter()
            .filter_map(|(i, r)| r.err().map(|e| (i, e))),
    ))
}

/// Delivers the entries of a batch one after another, in order, and stops at the first that
/// fails to be tried again: it is reported with its error and every entry after it as not sent
/// (transient), so that a retry sends them again in order: the body of a sink whose target
/// takes one event per call and must see a key's events in order. A poison entry does not
/// stop it: it is faulted, never sent again, so the entries after it cannot overtake it.
///
/// # Errors
/// A failure of the first entry that is not poison, or of a batch's only entry, fails the
/// call as a whole (nothing was delivered), as does a fatal one.
pub async fn deliver_in_order<'a, F, Fut>(batch: &'a Batch, mut f: F) -> Result<Delivery, Error>
where
    F: FnMut(&'a Uow) -> Fut,
    Fut: Future<Output = Result<(), Error>> + 'a,
{
    let mut delivery = Delivery::complete();
    for (i, uow) in batch.items().iter().enumerate() {
        let Err(error) = f(uow).await else { continue };
        match error.class() {
            crate::ErrorClass::Fatal => return Err(error),
            // A batch of one fails as a whole, as `each_fn`'s does.
            _ if batch.len() == 1 => return Err(error),
            crate::ErrorClass::Poison => {
                delivery.fail(i, error);
                continue;
            }
            _ if i == 0 => return Err(error),
            _ => {}
        }
        delivery.fail(i, error);
        for later in i + 1..batch.len() {
            delivery.fail(
                later,
                Error::transient_msg("NotSent", "an earlier entry of the batch failed"),
            );
        }
        break;
    }
    Ok(delivery)
}

/// A fault sink from an async closure over a fault [`Event`].
pub fn fault_sink_fn<F, Fut>(f: F) -> ServiceFn<F>
where
    F: FnMut(Event) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Error>> + Send + 'static,
{
    service_fn(f)
}

/// Implements the sink contract (`tower::Service<Batch>`) for a type from one of its methods,
/// `async fn $method(&self, batch: Batch) -> Result<R, Error>` where `R` is `()` or a
/// [`Delivery`]. The type must be `Clone` (each call runs on a clone).
///
/// ```
/// use floodway::{sink::Delivery, Batch, Error};
///
/// #[derive(Clone)]
/// struct Audit;
///
/// impl Audit {
///     async fn write(&self, batch: Batch) -> Result<Delivery, Error> {
///         Ok(Delivery::complete())
///     }
/// }
///
/// floodway::impl_sink!(Audit, write);
/// ```
#[macro_export]
macro_rules! impl_sink {
    ($sink:ty, $method:ident) => {
        $crate::__ready_service!($sink, $crate::Batch => $crate::sink::Delivery, |sink, batch| {
            ::std::boxed::Box::pin(async move { sink.$method(batch).await.map(Into::into) })
        });
    };
}

/// Implements a fault sink (`tower::Service<Event>`) for a type from one of its methods,
/// `async fn $method(&self, batch: Batch) -> Result<R, Error>`, given the fault as a batch of
/// one; a fault over `$max` bytes is trimmed to fit ([`crate::fault::fit`]).
#[macro_export]
macro_rules! impl_fault_sink {
    ($sink:ty, $method:ident, $max:expr) => {
        $crate::__ready_service!($sink, $crate::Event => (), |sink, event| {
            let fault = $crate::fault::fit(&event, $max);
            let batch = $crate::Batch::one($crate::Uow::detached(fault));
            ::std::boxed::Box::pin(async move {
                let delivery: $crate::sink::Delivery = sink.$method(batch).await?.into();
                match delivery.into_failed().into_iter().next() {
                    None => Ok(()),
                    Some((_, error)) => Err(error),
                }
            })
        });
    };
}

/// A `tower::Service` that is always ready and runs `$body` on a clone of itself (`$this`)
/// with the request (`$req`): what the sink macros expand to.
#[doc(hidden)]
#[macro_export]
macro_rules! __ready_service {
    ($sink:ty, $request:ty => $response:ty, |$this:ident, $req:ident| $body:block) => {
        impl $crate::reexports::tower::Service<$request> for $sink {
            type Response = $response;
            type Error = $crate::Error;
            type Future = $crate::layer::BoxFuture<$response>;

            fn poll_ready(
                &mut self,
                _cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<::std::result::Result<(), $crate::Error>> {
                ::std::task::Poll::Ready(Ok(()))
            }

            fn call(&mut self, $req: $request) -> Self::Future {
                let $this = ::std::clone::Clone::clone(self);
                $body
            }
        }
    };
}

/// Publishes what it receives into a hub, idempotently (the event id is the key): a sink of
/// batches (as in the *forward* processor) and a fault sink (faults go to the hub, where a
/// fault monitor stores them).
#[derive(Debug, Clone)]
pub struct Publisher {
    hub: SharedHub,
}

impl Publisher {
    /// A publisher into `hub`.
    pub fn new(hub: SharedHub) -> Self {
        Publisher { hub }
    }

    /// The hub.
    pub fn hub(&self) -> &SharedHub {
        &self.hub
    }

    async fn publish(&self, batch: Batch) -> Result<(), Error> {
        let events: Vec<Event> = batch.events().cloned().collect();
        self.hub.publish_without_receipt(&events, true).await
    }
}

crate::impl_sink!(Publisher, publish);
// Trimmed to what a processor reads (a fault monitor among them): a hub may take larger
// events (the embedded one does), and a fault nobody can read would be lost to its store.
crate::impl_fault_sink!(Publisher, publish, crate::event::DEFAULT_MAX_EVENT_SIZE);

/// One delivery of a batch through a pipeline's resilience stack: the batch and, shared by
/// every attempt of it, which entries are still to deliver. Each attempt sends only those, so
/// retries, their budget and the metrics count the failed entries, not the batch. Until a sink
/// answers entry by entry, nothing but two flags is touched.
#[derive(Clone)]
pub(crate) struct Attempt {
    batch: Batch,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// Whether the last call failed as a whole (or never answered).
    whole: AtomicBool,
    /// Whether a sink answered entry by entry: then `progress` says what is left.
    partial: AtomicBool,
    progress: std::sync::Mutex<Progress>,
}

#[derive(Default)]
struct Progress {
    /// Positions still to deliver.
    pending: Vec<usize>,
    /// Entries that failed for good (poison), with their errors.
    settled: Vec<(usize, Error)>,
    /// The error of each pending entry, from the last call that answered entry by entry.
    last: Vec<(usize, Error)>,
}

/// What an attempt left undelivered once the stack gave up on it.
pub(crate) enum Unresolved {
    /// The sink said which entries failed, and why.
    Entries(Vec<(Uow, Error)>),
    /// The last call failed as a whole: these entries, no error of their own.
    Whole(Batch),
}

impl Attempt {
    pub(crate) fn new(batch: Batch) -> Self {
        Attempt {
            batch,
            shared: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.shared
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn partial(&self) -> bool {
        self.shared.partial.load(Ordering::Acquire)
    }

    fn pick(&self, positions: &[usize]) -> Batch {
        Batch::new(
            positions
                .iter()
                .map(|&p| self.batch.items()[p].clone())
                .collect(),
        )
    }

    /// The entries to send, and their positions (`None`: the whole batch).
    fn to_send(&self) -> (Batch, Option<Vec<usize>>) {
        self.shared.whole.store(true, Ordering::Release);
        if !self.partial() {
            return (self.batch.clone(), None);
        }
        let pending = self.lock().pending.clone();
        (self.pick(&pending), Some(pending))
    }

    /// Takes in a sink's answer: entries delivered are done, poison ones settled, the rest
    /// stay pending and the call fails with the most telling of their errors (an outage, else
    /// a throttle, else the first) so that the layers above act on it.
    fn record(&self, sent: Sent, delivery: Delivery) -> Result<(), Error> {
        self.shared.whole.store(false, Ordering::Release);
        if delivery.is_complete() && !self.partial() {
            return Ok(());
        }
        let position = |i: usize| match &sent.positions {
            None => (i < self.batch.len()).then_some(i),
            Some(p) => p.get(i).copied(),
        };
        // Some entry of this call delivered: the target is up (a sink whose failing entries
        // are always the same ones must not look like one that is down).
        let delivered = delivery.failed().len() < sent.count;
        let mut progress = self.lock();
        self.shared.partial.store(true, Ordering::Release);
        let mut pending = Vec::new();
        let mut last = Vec::new();
        for (i, error) in delivery.into_failed() {
            let Some(p) = position(i) else { continue };
            match error.class() {
                crate::ErrorClass::Poison => progress.settled.push((p, error)),
                crate::ErrorClass::Fatal => return Err(error),
                _ => {
                    pending.push(p);
                    last.push((p, error));
                }
            }
        }
        pending.sort_unstable();
        let telling = last
            .iter()
            .find(|(_, e)| e.class() == crate::ErrorClass::Outage)
            .or_else(|| last.iter().find(|(_, e)| e.is_throttle()))
            .or_else(|| last.first())
            .map(|(_, e)| {
                let error = e.echo(format!(
                    "{} of {} entries failed; the first: {}",
                    last.len(),
                    sent.count,
                    e.message()
                ));
                if delivered {
                    error.delivered_part()
                } else {
                    error
                }
            });
        progress.pending = pending;
        progress.last = last;
        match telling {
            None => Ok(()),
            Some(error) => {
                metrics::counter!(
                    "floodway_sink_entries_failed_total",
                    "pipeline" => sent.pipeline.to_string(),
                    "class" => error.class().as_str()
                )
                .increment(progress.last.len() as u64);
                Err(error)
            }
        }
    }

    /// The entries that failed for good, with their errors.
    pub(crate) fn settled(&self) -> Vec<(Uow, Error)> {
        if !self.partial() {
            return Vec::new();
        }
        let settled = std::mem::take(&mut self.lock().settled);
        settled
            .into_iter()
            .map(|(p, e)| (self.batch.items()[p].clone(), e))
            .collect()
    }

    /// What is still undelivered after the stack gave up.
    pub(crate) fn unresolved(&self) -> Unresolved {
        let whole = self.shared.whole.load(Ordering::Acquire);
        if !self.partial() {
            return Unresolved::Whole(self.batch.clone());
        }
        let mut progress = self.lock();
        if whole {
            return Unresolved::Whole(self.pick(&progress.pending));
        }
        let last = std::mem::take(&mut progress.last);
        Unresolved::Entries(
            last.into_iter()
                .map(|(p, e)| (self.batch.items()[p].clone(), e))
                .collect(),
        )
    }
}

/// What one call sent: how many entries, where they sit in the batch, for which pipeline.
struct Sent {
    count: usize,
    positions: Option<Vec<usize>>,
    pipeline: Arc<str>,
}

/// Calls a sink with the pending entries of an [`Attempt`]: the innermost piece of a
/// pipeline's sink stack.
#[derive(Clone)]
pub(crate) struct Entries<S> {
    sink: S,
    /// The pipeline, in metrics.
    pipeline: Arc<str>,
}

impl<S> Entries<S> {
    pub(crate) fn new(sink: S, pipeline: &str) -> Self {
        Entries {
            sink,
            pipeline: pipeline.into(),
        }
    }
}

impl<S: Sink> Service<Attempt> for Entries<S> {
    type Response = ();
    type Error = Error;
    type Future = EntriesFuture<tower::util::Oneshot<S, Batch>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, attempt: Attempt) -> Self::Future {
        let (batch, positions) = attempt.to_send();
        let sent = Sent {
            count: batch.len(),
            positions,
            pipeline: self.pipeline.clone(),
        };
        let call =
            (!batch.is_empty()).then(|| tower::ServiceExt::oneshot(self.sink.clone(), batch));
        EntriesFuture {
            call,
            attempt,
            sent: Some(sent),
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Entries`]: the sink's call, then its answer taken in.
    pub(crate) struct EntriesFuture<F> {
        #[pin]
        call: Option<F>,
        attempt: Attempt,
        sent: Option<Sent>,
    }
}

impl<F, R> Future for EntriesFuture<F>
where
    F: Future<Output = Result<R, Error>>,
    R: Into<Delivery>,
{
    type Output = Result<(), Error>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(call) = this.call.as_pin_mut() else {
            return Poll::Ready(Ok(()));
        };
        let delivery: Delivery = match std::task::ready!(call.poll(cx)) {
            Ok(answer) => answer.into(),
            Err(err) => return Poll::Ready(Err(err)),
        };
        let sent = this.sent.take().expect("polled after completion");
        Poll::Ready(this.attempt.record(sent, delivery))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    fn batch(n: usize) -> Batch {
        Batch::new(
            (0..n)
                .map(|i| {
                    Uow::detached(
                        Event::builder("t", format!("k{i}"))
                            .id(format!("e{i}"))
                            .build(),
                    )
                })
                .collect(),
        )
    }

    fn positions(delivery: &Delivery) -> Vec<usize> {
        let mut p: Vec<usize> = delivery.failed().iter().map(|(p, _)| *p).collect();
        p.sort_unstable();
        p
    }

    #[tokio::test]
    async fn each_fn_reports_each_failed_entry_alone() {
        let sink = each_fn(4, |uow: Uow| async move {
            match uow.event().id() {
                "e1" | "e3" => Err(Error::poison_msg("Rejected", "no")),
                _ => Ok(()),
            }
        });
        let delivery = sink.oneshot(batch(5)).await.unwrap();
        assert_eq!(positions(&delivery), vec![1, 3]);
    }

    #[tokio::test]
    async fn a_batch_of_one_fails_as_a_whole() {
        let sink = each_fn(4, |_: Uow| async {
            Err::<(), _>(Error::poison_msg("Rejected", "no"))
        });
        assert!(sink.oneshot(batch(1)).await.is_err());
    }

    #[tokio::test]
    async fn in_order_delivery_stops_at_the_first_failure() {
        let b = batch(5);
        let mut sent = Vec::new();
        let delivery = deliver_in_order(&b, |uow| {
            sent.push(uow.event().id().to_owned());
            let fails = uow.event().id() == "e2";
            async move {
                if fails {
                    Err(Error::transient_msg("Unavailable", "503"))
                } else {
                    Ok(())
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(sent, vec!["e0", "e1", "e2"]);
        assert_eq!(positions(&delivery), vec![2, 3, 4]);
        let first =
            deliver_in_order(&b, |_| async { Err(Error::transient_msg("Down", "x")) }).await;
        assert!(
            first.is_err(),
            "nothing delivered: the call failed as a whole"
        );
    }

    /// A poison entry is faulted, never sent again: the entries after it are sent, and only
    /// the poison ones are reported (none taken for not sent and faulted with them).
    #[tokio::test]
    async fn in_order_delivery_goes_past_poison_entries() {
        let b = batch(5);
        let mut sent = Vec::new();
        let delivery = deliver_in_order(&b, |uow| {
            sent.push(uow.event().id().to_owned());
            let poison = ["e0", "e1", "e3"].contains(&uow.event().id());
            async move {
                if poison {
                    Err(Error::poison_msg("Rejected", "404"))
                } else {
                    Ok(())
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(sent, ["e0", "e1", "e2", "e3", "e4"]);
        assert_eq!(positions(&delivery), vec![0, 1, 3]);
        assert!(delivery
            .failed()
            .iter()
            .all(|(_, e)| e.class() == crate::ErrorClass::Poison));
    }

    #[test]
    fn a_repeated_failure_keeps_the_first_error() {
        let delivery = Delivery::with_failed([
            (1, Error::poison_msg("First", "a")),
            (1, Error::poison_msg("Second", "b")),
        ]);
        assert_eq!(delivery.failed().len(), 1);
        assert_eq!(delivery.failed()[0].1.name(), "First");
    }
}
