//! Publishing from pipelines into a hub: a sink for batches and a fault sink.

use std::sync::Arc;

use floodway::Publisher;

use crate::hub::Hub;

impl Hub {
    /// A sink (and fault sink) that publishes into this hub with the event id as the
    /// idempotency key, so a redelivered event is stored once.
    pub fn publisher(&self) -> Publisher {
        Publisher::new(Arc::new(self.clone()))
    }
}
