//! Floodway's embedded event hub: a durable, partitioned event log and the stores of the
//! failure design, in one SQLite file.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use floodway::{memory::{MemoryFaultSink, MemorySink}, testing::generate, Pipeline, Processor};
//! use floodway_embedded::{Hub, HubOptions, SubscriptionOptions};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let hub = Hub::open(dir.path().join("hub.db"), HubOptions::default()).unwrap();
//! hub.publish(&generate::orders(500, 1)).await.unwrap();
//!
//! let orders = MemorySink::new();
//! let processor = Processor::builder("orders")
//!     .fault_sink(MemoryFaultSink::new())
//!     .pipeline(Pipeline::builder("all").event_type("order-*").sink(orders.clone()).unwrap())
//!     .build()
//!     .unwrap();
//! // A bounded read: stop at the end of the log.
//! let options = SubscriptionOptions { follow: false, ..Default::default() };
//! let (reader, checkpoints) = hub.subscribe("orders", options).unwrap().split();
//! let report = processor.run(reader, checkpoints, std::future::pending()).await.unwrap();
//! assert_eq!(report.done, 500);
//! assert_eq!(hub.stats().unwrap().subscriptions[0].lag, 0);
//! # });
//! ```
//!
//! | part | type |
//! |---|---|
//! | the log: partitions by `partitionKey`, group commit, durability setting, idempotent publish, retention | [`Hub`] |
//! | subscriptions with checkpoints per partition, from a checkpoint, the start, the end or a time | [`Subscription`] |
//! | the fault store: faults by id with first/last seen and counts, filters, resubmission history | [`FaultStore`] |
//! | latest-wins views with the inbox in the same transaction | [`ViewStore`], [`ViewSink`] |
//!
//! Several processes may share the file (WAL mode, a busy timeout, offsets assigned inside
//! each commit).

mod error;
mod faults;
mod hub;
mod publisher;
mod schema;
mod segment;
mod subscription;
mod view;

pub use error::{HubError, OpenError};
pub use faults::{FaultFilter, FaultStatus, FaultStore, Resubmission, Stored, StoredFault};
pub use hub::{
    Durability, Hub, HubOptions, HubStats, PartitionStats, PublishReceipt, Retention,
    RetentionReport, SubscriptionStats, DEFAULT_PARTITIONS,
};
pub use publisher::HubPublisher;
pub use subscription::{
    ResetTo, StartAt, Subscription, SubscriptionCheckpointer, SubscriptionOptions,
    SubscriptionReader,
};
pub use view::{Applied, ViewRow, ViewSink, ViewStore, ViewWrite};

/// Runs blocking storage work: in place on a multi-threaded runtime (telling it to move other
/// tasks away), inline elsewhere (the calls are short).
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
