//! Publishing from pipelines into a hub: a sink for batches and a fault sink.

use floodway::layer::BoxFuture;
use floodway::{Event, Publish, Publisher};

use crate::hub::Hub;

/// Publishes into a hub with the event id as the idempotency key, so a redelivered event is
/// stored once: a sink of batches (the *forward* processor) and a fault sink (faults go to the
/// hub and the fault monitor stores them).
pub type HubPublisher = Publisher<Hub>;

impl Publish for Hub {
    fn publish_events(&self, events: Vec<Event>) -> BoxFuture<()> {
        let hub = self.clone();
        Box::pin(async move {
            hub.publish_idempotent(&events).await?;
            Ok(())
        })
    }
}

impl Hub {
    /// A sink that publishes into this hub.
    pub fn publisher(&self) -> HubPublisher {
        Publisher::new(self.clone())
    }
}
