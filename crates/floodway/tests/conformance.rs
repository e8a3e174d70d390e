//! The conformance suites of the event hub and fault store contracts, in memory.

use std::sync::Arc;

use floodway::memory::MemoryHub;
use floodway::SharedHub;

async fn fresh() -> (SharedHub, ()) {
    (Arc::new(MemoryHub::new(4)), ())
}

floodway::hub_conformance_tests!(fresh);

mod fault_store {
    use floodway::fault_store::MemoryFaultStore;
    use floodway::testing::conformance::SharedFaultStore;

    async fn fresh() -> (SharedFaultStore, ()) {
        (std::sync::Arc::new(MemoryFaultStore::new()), ())
    }

    floodway::fault_store_conformance_tests!(fresh);
}

mod keyed_state {
    use floodway::state::{MemoryState, SharedState};

    async fn fresh() -> (SharedState, ()) {
        (std::sync::Arc::new(MemoryState::new("conformance")), ())
    }

    floodway::keyed_state_conformance_tests!(fresh);
}

mod rows {
    use floodway::rows::{MemoryRows, SharedRows};

    async fn fresh() -> (SharedRows, ()) {
        (std::sync::Arc::new(MemoryRows::new("conformance")), ())
    }

    floodway::row_store_conformance_tests!(fresh);
}
