//! The conformance suites of the event hub, fault store and keyed state contracts on the
//! embedded hub, in a temporary file.

use std::sync::Arc;

use floodway::SharedHub;
use floodway_embedded::{Hub, HubOptions};

async fn fresh() -> (SharedHub, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let options = HubOptions {
        partitions: Some(4),
        ..HubOptions::default()
    };
    let hub = Hub::open(dir.path().join("hub.db"), options).unwrap();
    (Arc::new(hub), dir)
}

floodway::hub_conformance_tests!(fresh);

mod fault_store {
    use floodway::testing::conformance::SharedFaultStore;
    use floodway_embedded::{Hub, HubOptions};

    async fn fresh() -> (SharedFaultStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let hub = Hub::open(dir.path().join("faults.db"), HubOptions::default()).unwrap();
        (std::sync::Arc::new(hub.fault_store().unwrap()), dir)
    }

    floodway::fault_store_conformance_tests!(fresh);
}

mod keyed_state {
    use floodway::state::{SharedState, StateStore};
    use floodway_embedded::{Hub, HubOptions};

    async fn fresh() -> (SharedState, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let hub = Hub::open(dir.path().join("state.db"), HubOptions::default()).unwrap();
        (hub.open("conformance").await.unwrap(), dir)
    }

    floodway::keyed_state_conformance_tests!(fresh);
}

mod rows {
    use floodway::rows::SharedRows;
    use floodway_embedded::{Hub, HubOptions};

    async fn fresh() -> (SharedRows, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let hub = Hub::open(dir.path().join("rows.db"), HubOptions::default()).unwrap();
        (
            std::sync::Arc::new(hub.rows("conformance").unwrap().with_outbox()),
            dir,
        )
    }

    floodway::row_store_conformance_tests!(fresh);
}
