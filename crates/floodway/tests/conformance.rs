//! The event hub contract's conformance suite on the in-memory hub.

use std::sync::Arc;

use floodway::memory::MemoryHub;
use floodway::SharedHub;

async fn fresh() -> (SharedHub, ()) {
    (Arc::new(MemoryHub::new(4)), ())
}

floodway::hub_conformance_tests!(fresh);
