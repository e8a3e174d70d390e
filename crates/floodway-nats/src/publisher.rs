//! Publishing from pipelines into the JetStream hub: a sink for batches and a fault sink.

use floodway::layer::BoxFuture;
use floodway::{Event, Publish, Publisher};

use crate::hub::NatsHub;

/// Publishes into the JetStream hub with the event id as `Nats-Msg-Id`, so a redelivered event
/// is stored once (within the duplicate window): a sink of batches (the *forward* processor)
/// and a fault sink (`fault` events go to the fault subject, where the fault monitor reads
/// them).
pub type NatsPublisher = Publisher<NatsHub>;

impl Publish for NatsHub {
    fn publish_events(&self, events: Vec<Event>) -> BoxFuture<()> {
        let hub = self.clone();
        Box::pin(async move {
            hub.publish(&events).await?;
            Ok(())
        })
    }
}

impl NatsHub {
    /// A sink that publishes into this hub.
    pub fn publisher(&self) -> NatsPublisher {
        Publisher::new(self.clone())
    }
}
