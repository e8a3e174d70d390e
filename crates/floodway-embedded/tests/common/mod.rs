//! Helpers shared by the hub's integration tests: opening a hub, reading it, and the orders
//! view a test processor keeps and what it must hold.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use floodway::idempotence::{MemoryView, Version};
use floodway::{BatchConfig, Event, Pipeline};
use floodway_embedded::{Hub, HubOptions, SubscriptionOptions};
use serde_json::Value;

/// The hub `hub.db` in `dir`, opened with the defaults.
pub(crate) fn open(dir: &tempfile::TempDir) -> Hub {
    open_with(dir.path(), HubOptions::default())
}

/// A hub of its own (in the returned directory), with `n` generated orders of `seed`
/// published to it.
pub(crate) async fn with_orders(n: usize, seed: u64) -> (tempfile::TempDir, Hub, Vec<Event>) {
    let dir = tempfile::tempdir().unwrap();
    let hub = open(&dir);
    let events = floodway::testing::generate::orders(n, seed);
    hub.publish(&events).await.unwrap();
    (dir, hub, events)
}

/// The hub `hub.db` in `dir`, opened with `options`.
pub(crate) fn open_with(dir: &Path, options: HubOptions) -> Hub {
    Hub::open(dir.join("hub.db"), options).unwrap()
}

/// The hub `hub.db` in `dir`, opened with `options`, and the path of its file (for a look
/// at it with SQLite itself).
pub(crate) fn open_file(dir: &Path, options: HubOptions) -> (Hub, PathBuf) {
    (open_with(dir, options), dir.join("hub.db"))
}

/// The defaults, but for `partitions` partitions.
pub(crate) fn partitions(partitions: u32) -> HubOptions {
    HubOptions {
        partitions: Some(partitions),
        ..HubOptions::default()
    }
}

/// A subscription that reads what there is and ends.
pub(crate) fn bounded() -> SubscriptionOptions {
    SubscriptionOptions {
        follow: false,
        ..Default::default()
    }
}

/// A pipeline keeping the latest order state per order in the view `orders`, in batches of 50.
pub(crate) fn orders_view(hub: &Hub) -> floodway::Pipeline {
    Pipeline::builder("orders")
        .event_type("order-*")
        .batch(BatchConfig::count(50))
        .sink(hub.view("orders").unwrap().sink(
            |e| Ok(e.partition_key().to_owned()),
            |e| Ok(e.field("order").cloned().unwrap_or(Value::Null)),
        ))
        .unwrap()
}

/// The orders view `events` call for: latest-wins per order.
pub(crate) fn expected_view(events: &[Event]) -> MemoryView<Value> {
    let mut view = MemoryView::new();
    for e in events
        .iter()
        .filter(|e| e.event_type().starts_with("order-"))
    {
        view.apply(
            e.partition_key(),
            Version::of(e),
            e.field("order").cloned().unwrap_or(Value::Null),
        );
    }
    view
}

/// The orders view as the hub holds it.
pub(crate) fn stored_view(hub: &Hub) -> MemoryView<Value> {
    let mut view = MemoryView::new();
    for row in hub.view("orders").unwrap().rows().unwrap() {
        view.apply(&row.key, row.version, row.value);
    }
    view
}
