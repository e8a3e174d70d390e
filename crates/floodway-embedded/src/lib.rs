//! Floodway's embedded event hub: a durable, partitioned event log and the stores of the
//! failure design, in one SQLite file, and its views in a second one beside it (`<file>-views`,
//! [`Hub::views_path`]), so that a view's long transactions and publishing write at once.
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
//! | subscriptions with checkpoints per partition, from a checkpoint, the start, the end or a time; one owner at a time (a lease) | [`Subscription`] |
//! | the fault store: faults by id with first/last seen and counts, filters, resubmission history | [`FaultStore`] |
//! | latest-wins views, whose rows' versions turn redeliveries away, in their own file | [`ViewStore`], [`ViewSink`] |
//! | single-table rows by update requests (per-field latest-wins, counters, sets, TTL), the inbox and the outbox in the same transaction | [`RowTable`] |
//! | the transactional outbox and its relay | [`Outbox`], [`OutboxRelay`] |
//! | complex event processing: collected events by correlation key, timers by due time, emitted events through the outbox | [`CepTable`], [`CepTimers`] |
//!
//! Several processes may share the file (WAL mode, offsets assigned inside each commit). How
//! they get along:
//!
//! - **A subscription has one owner at a time.** Opening one takes its lease, a row in the
//!   file naming the process; the holder renews it every third of
//!   [`HubOptions::lease`] (10 s) and releases it when the subscription is dropped. Another
//!   opener is refused with [`HubError::Held`], which names the holder's host and process id
//!   ([`Hub::subscribe_waiting`] waits [`HubOptions::lease_wait`] for it first), and takes the
//!   subscription over once the lease has expired, or at once if the holder was a process of
//!   this machine that is gone. A holder that finds another owner stops with
//!   [`HubError::LeaseLost`]; checkpoints are written only by the owner and never move
//!   backward (but for an explicit [`SubscriptionOptions::reset`]).
//! - **A locked file is waited out.** A write that finds another process holding the write
//!   lock past [`HubOptions::busy_timeout`] is tried again with backoff, a warning each time,
//!   for up to [`HubOptions::busy_retry`] (2 minutes); retention deletes in short
//!   transactions, so it holds the lock briefly.
//! - **Nothing grows without bound by itself.** Idempotency keys are forgotten after the
//!   dedupe window, and a row table's inbox rows after one to two of
//!   [`HubOptions::inbox_window`], by the writes themselves (a bounded batch per transaction,
//!   larger than what the transaction adds), retention or not. The log grows until
//!   [`Retention`] deletes from it, which by default keeps what a subscription has not read
//!   ([`Retention::keep_unread`]).

mod busy;
mod cep;
mod error;
mod event_hub;
mod faults;
mod hub;
mod inbox;
mod lease;
mod log;
mod options;
mod outbox;
mod publisher;
mod rows;
mod schema;
mod segment;
mod store;
mod subscription;
mod upgrade;
mod view;

pub use cep::{table_name as cep_table_name, CepKey, CepReport, CepTable, CepTimers, PendingTimer};
pub use error::{HubError, OpenError};
pub use faults::{FaultFilter, FaultStatus, FaultStore, Resubmission, Stored, StoredFault};
pub use floodway::state::Applied;
pub use hub::{
    Durability, Hub, HubOptions, HubStats, PartitionStats, PublishReceipt, Retention,
    RetentionReport, SubscriptionStats, DEFAULT_PARTITIONS,
};
pub use lease::LeaseHolder;
pub use outbox::{Outbox, OutboxRelay, OutboxSource, OutboxStats, Pending, RelayReport};
pub use rows::{RowTable, RowTx};
pub use subscription::{
    StartAt, Subscription, SubscriptionCheckpointer, SubscriptionOptions, SubscriptionReader,
};
pub use upgrade::Upgrade;
pub use view::{ViewRow, ViewSink, ViewStore, ViewWrite};

/// Runs blocking storage work: in place on a multi-threaded runtime (telling it to move other
/// tasks away), inline elsewhere (the calls are short).
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
