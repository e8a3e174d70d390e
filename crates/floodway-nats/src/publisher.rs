//! Publishing from pipelines into the JetStream hub: a sink for batches and a fault sink.

use std::task::{Context, Poll};

use floodway::layer::BoxFuture;
use floodway::{Batch, Error, Event};

use crate::hub::NatsHub;

/// Publishes what it receives into the JetStream hub with the event id as `Nats-Msg-Id`, so a
/// redelivered event is stored once (within the duplicate window). A `tower::Service` of
/// batches (a pipeline's sink: the *forward* processor) and of single events (a processor's
/// fault sink: `fault` events go to the fault subject, where the fault monitor reads them).
#[derive(Debug, Clone)]
pub struct NatsPublisher {
    hub: NatsHub,
}

impl NatsHub {
    /// A sink that publishes into this hub.
    pub fn publisher(&self) -> NatsPublisher {
        NatsPublisher { hub: self.clone() }
    }
}

impl tower::Service<Batch> for NatsPublisher {
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
            hub.publish(&events).await?;
            Ok(())
        })
    }
}

impl tower::Service<Event> for NatsPublisher {
    type Response = ();
    type Error = Error;
    type Future = BoxFuture<()>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, event: Event) -> Self::Future {
        let hub = self.hub.clone();
        Box::pin(async move {
            hub.publish(std::slice::from_ref(&event)).await?;
            Ok(())
        })
    }
}
