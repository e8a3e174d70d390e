//! Sinks: the side effects at the end of pipelines, as `tower::Service`s.
//!
//! A sink is any `Service<Batch, Response = (), Error = floodway::Error>` that is `Clone`: the
//! pipeline clones it per call to run calls concurrently, so shared state belongs behind an
//! `Arc`. The sink classifies its own errors ([`Error::transient`], [`Error::throttled`],
//! [`Error::poison`]); the pipeline's [`Resilience`](crate::layer::Resilience) stack decides
//! when to retry, and the runtime what to fault.

use std::future::Future;

use tower::util::{service_fn, ServiceFn};

use crate::error::Error;
use crate::event::Event;
use crate::uow::Batch;

/// A sink from an async closure over a [`Batch`].
///
/// ```
/// use floodway::{sink_fn, Batch, Error};
/// let sink = sink_fn(|batch: Batch| async move {
///     println!("{} events", batch.len());
///     Ok::<_, Error>(())
/// });
/// ```
pub fn sink_fn<F, Fut>(f: F) -> ServiceFn<F>
where
    F: FnMut(Batch) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Error>> + Send + 'static,
{
    service_fn(f)
}

/// A fault sink from an async closure over a fault [`Event`].
pub fn fault_sink_fn<F, Fut>(f: F) -> ServiceFn<F>
where
    F: FnMut(Event) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Error>> + Send + 'static,
{
    service_fn(f)
}

/// An event hub that stores events idempotently (the event id is the key): the embedded hub,
/// JetStream. [`Publisher`] makes it a sink and a fault sink.
pub trait Publish: Clone + Send + Sync + 'static {
    /// Stores `events`; a repeat of an id inside the hub's dedupe window is stored once.
    fn publish_events(&self, events: Vec<Event>) -> crate::layer::BoxFuture<()>;
}

/// Publishes what it receives into a hub: a `tower::Service` of batches (a pipeline's sink,
/// as in the *forward* processor) and of single events (a processor's fault sink: faults go
/// to the hub, where a fault monitor stores them).
#[derive(Debug, Clone)]
pub struct Publisher<P> {
    hub: P,
}

impl<P: Publish> Publisher<P> {
    /// A publisher into `hub`.
    pub fn new(hub: P) -> Self {
        Publisher { hub }
    }

    /// The hub.
    pub fn hub(&self) -> &P {
        &self.hub
    }
}

impl<P: Publish> tower::Service<Batch> for Publisher<P> {
    type Response = ();
    type Error = Error;
    type Future = crate::layer::BoxFuture<()>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, batch: Batch) -> Self::Future {
        self.hub.publish_events(batch.events().cloned().collect())
    }
}

impl<P: Publish> tower::Service<Event> for Publisher<P> {
    type Response = ();
    type Error = Error;
    type Future = crate::layer::BoxFuture<()>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, event: Event) -> Self::Future {
        self.hub.publish_events(vec![event])
    }
}
