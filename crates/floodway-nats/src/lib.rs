//! Floodway on NATS JetStream: the distributed engine.
//!
//! The same processors that run on the embedded hub run here, scaled across processes and
//! hosts, with the same failure semantics:
//!
//! - [`NatsHub`]: one JetStream stream with a subject per partition (`{subject}.{n}`, the
//!   partition chosen from `partitionKey` exactly as the embedded hub does) and a fault subject
//!   (`{subject}.faults`); publishing is pipelined, with the event id as `Nats-Msg-Id` so a
//!   re-publish inside the duplicate window is stored once. Sinks publish in JetStream's
//!   fast-ingest batches, one ack a batch ([`NatsHub::publish_fast`], nats-server 2.14+).
//! - [`NatsSubscription`]: a durable pull consumer per partition; a record is acked when every
//!   pipeline is done with it, terminated once its fault is stored, kept alive with in-progress
//!   acks while it is worked on, and nak'd with a growing delay when the processor lets go of
//!   it unfinished. `max_ack_pending` and the fetch size bound the work in flight. With
//!   exclusive sharing (the default) acks are cumulative, as a checkpoint moves: one ack per
//!   run of settled records, each partition read by one instance at a time (the holder of
//!   its lease, a key in the JetStream bucket `floodway_readers`); with pinned sharing, with
//!   [`Acks::Each`], or on a consumer made so before, each record is acked on its own.
//! - Per-key order across instances: partitions are assigned statically
//!   ([`Partitions::instance`]) or shared through consumer priority groups with a pinned
//!   client ([`Sharing::Pinned`]); see ARCHITECTURE.md for the trade-offs.
//! - [`NatsHub::publisher`]: a sink and fault sink publishing into the hub.
//!
//! ```no_run
//! # async fn run(processor: floodway::Processor) -> Result<(), Box<dyn std::error::Error>> {
//! use floodway_nats::{NatsHub, NatsHubOptions, SubscriptionOptions};
//!
//! let hub = NatsHub::connect(&NatsHubOptions::default()).await?;
//! let subscription = hub.subscribe(processor.name(), SubscriptionOptions::default()).await?;
//! let closed = subscription.closed();
//! let (reader, checkpointer) = subscription.split();
//! processor.run(reader, checkpointer, async { /* until stopped */ }).await?;
//! closed.await; // unfinished records returned to JetStream
//! # Ok(()) }
//! ```

mod error;
mod event_hub;
mod fast_ingest;
mod hub;
mod publisher;
mod pull;
mod subscription;
pub mod testing;

pub use error::NatsError;
pub use event_hub::{InstanceReads, NatsEventHub};
pub use hub::{
    NatsHub, NatsHubOptions, NatsStats, PublishReceipt, SubscriptionStats, DEFAULT_PARTITIONS,
};
pub use subscription::{
    Acks, NatsCheckpointer, NatsReader, NatsSubscription, Partitions, Sharing, StartAt,
    SubscriptionOptions,
};
