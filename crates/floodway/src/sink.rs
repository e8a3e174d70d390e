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
