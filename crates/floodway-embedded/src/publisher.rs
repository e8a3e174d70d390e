//! Publishing from pipelines into a hub: a sink for batches and a fault sink.

use std::task::{Context, Poll};

use floodway::layer::BoxFuture;
use floodway::{Batch, Error, Event};

use crate::hub::Hub;

/// Publishes what it receives into a hub, with the event id as the idempotency key, so a
/// redelivered event is stored once. A `tower::Service` of batches (a pipeline's sink: the
/// *forward* processor) and of single events (a processor's fault sink: faults go to the hub
/// and the fault monitor stores them).
#[derive(Debug, Clone)]
pub struct HubPublisher {
    hub: Hub,
}

impl Hub {
    /// A sink that publishes into this hub.
    pub fn publisher(&self) -> HubPublisher {
        HubPublisher { hub: self.clone() }
    }
}

impl tower::Service<Batch> for HubPublisher {
    type Response = ();
    type Error = Error;
    type Future = BoxFuture<()>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, batch: Batch) -> Self::Future {
        let hub = self.hub.clone();
        Box::pin(async move {
            let events: Vec<Event> = batch.events().cloned().collect();
            hub.publish_idempotent(&events).await?;
            Ok(())
        })
    }
}

impl tower::Service<Event> for HubPublisher {
    type Response = ();
    type Error = Error;
    type Future = BoxFuture<()>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, event: Event) -> Self::Future {
        let hub = self.hub.clone();
        Box::pin(async move {
            hub.publish_idempotent(std::slice::from_ref(&event)).await?;
            Ok(())
        })
    }
}
