//! Publishing from pipelines into the JetStream hub: a sink for batches and a fault sink.

use std::sync::Arc;

use floodway::Publisher;

use crate::event_hub::{InstanceReads, NatsEventHub};
use crate::hub::NatsHub;

impl NatsHub {
    /// A sink (and fault sink) that publishes into this hub with the event id as
    /// `Nats-Msg-Id`, so a redelivered event is stored once (within the duplicate window);
    /// `fault` events go to the fault subject, where the fault monitor reads them.
    pub fn publisher(&self) -> Publisher {
        Publisher::new(Arc::new(NatsEventHub::new(
            self.clone(),
            InstanceReads::default(),
        )))
    }
}
