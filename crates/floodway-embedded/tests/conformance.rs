//! The event hub contract's conformance suite on the embedded hub, in a temporary file.

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
