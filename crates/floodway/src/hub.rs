//! The contract every event hub implements: the embedded SQLite log, NATS JetStream, the
//! in-memory kit. Processors and the command hold a hub as an [`EventHub`] trait object
//! ([`SharedHub`]) and never ask which backend it is.
//!
//! A hub stores events in partitions (by partition key) and publishes idempotently: an event
//! whose id was published within the hub's dedupe window is stored once. A named subscription
//! reads it from a start position into a [`Source`] and learns what is done through a
//! [`Checkpointer`]; its progress is stored by the hub, so a restart resumes.
//!
//! The trait is object-safe: its futures are boxed, and a subscription's halves are boxed
//! behind [`BoxSource`] and [`BoxCheckpointer`]. The cost is one allocation per call that
//! reads a batch, which is noise beside the batch itself.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{BoxError, CommitError, Error, SourceError};
use crate::event::Event;
use crate::source::{Checkpoint, Checkpointer, Pulled, Settlement, Source};
use crate::uow::Record;

/// Partitions of a new hub, when nobody says.
pub const DEFAULT_PARTITIONS: u32 = 8;

/// Where a subscription starts when it has no progress stored (or when it is reset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartAt {
    /// From the first event held.
    #[default]
    Beginning,
    /// From events published from now on.
    End,
    /// From events published at or after this time (ms since the epoch).
    Time(i64),
}

/// What a subscription reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stream {
    /// The events (on a hub that keeps fault events beside them, those too).
    #[default]
    Events,
    /// The fault events, for a fault monitor (on a hub that keeps them with the events, the
    /// same as `Events`: the monitor picks them out by type).
    Faults,
}

/// How a subscription reads, on any hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadOptions {
    /// Where to start without stored progress.
    pub start: StartAt,
    /// Ignore stored progress and start at `start` (a reset of the subscription).
    pub reset: bool,
    /// Wait for new events at the end (a live stream), or end there (a bounded read, for
    /// replays and tests).
    pub follow: bool,
    /// Read only events published at or before this time (ms since the epoch), then end.
    pub until: Option<i64>,
    /// A reader that leaves no trace (`hub tail`, a replay): no progress stored, no lease,
    /// no acknowledgements.
    pub transient: bool,
    /// The events or the fault events.
    pub stream: Stream,
}

impl Default for ReadOptions {
    /// From the beginning, following, durable, the events.
    fn default() -> Self {
        ReadOptions {
            start: StartAt::Beginning,
            reset: false,
            follow: true,
            until: None,
            transient: false,
            stream: Stream::Events,
        }
    }
}

impl ReadOptions {
    /// A bounded read: ends at the last event held instead of waiting for more.
    #[must_use]
    pub fn bounded(mut self) -> Self {
        self.follow = false;
        self
    }
}

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PublishReceipt {
    /// Events stored.
    pub stored: usize,
    /// Events skipped as repeats of an id published within the dedupe window.
    pub duplicates: usize,
}

/// What a hub holds and how far its subscriptions are, for people (`floodway hub stats`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HubStats {
    /// The hub in a line: where it is, its partitions, its size.
    pub description: String,
    /// Its partitions.
    pub partitions: Vec<PartitionStats>,
    /// Fault events held apart from the partitions (JetStream's fault subject); `None` on a
    /// hub that keeps them with the events.
    pub faults: Option<u64>,
    /// Its durable subscriptions.
    pub subscriptions: Vec<SubscriptionStats>,
    /// When the newest event was published (ms since the epoch), if the hub knows cheaply.
    pub newest_published: Option<i64>,
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PartitionStats {
    /// Its name.
    pub partition: String,
    /// Events held.
    pub events: u64,
    /// The first and last offsets held, on a hub with offsets per partition.
    pub offsets: Option<(u64, u64)>,
    /// Bytes of event data, when the hub counts them per partition.
    pub bytes: Option<u64>,
}

/// One subscription.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubscriptionStats {
    /// Its name.
    pub name: String,
    /// Events published and not yet done.
    pub lag: u64,
    /// The lag per partition, `(partition, lag)`, where the hub tells them apart (empty on
    /// one that does not).
    pub partitions: Vec<(String, u64)>,
    /// Where it is, in the hub's own terms (checkpoints per partition; consumers, unacked,
    /// redelivered).
    pub progress: String,
    /// The process that owns it now and since when (ms since the epoch), on a hub that
    /// leases subscriptions.
    pub owner: Option<(String, i64)>,
}

/// A boxed future of a hub operation.
pub type HubFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send + 'a>>;

/// The future of [`EventHub::publish`].
pub type PublishFuture<'a> =
    Pin<Box<dyn Future<Output = Result<PublishReceipt, Error>> + Send + 'a>>;

/// What to keep of a hub's log (a hub whose storage keeps its own limits, as a JetStream
/// stream does, is told them where it is configured).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// Delete events published longer ago than this.
    pub max_age: Option<Duration>,
    /// Per partition, delete the oldest events beyond this many bytes of event data.
    pub max_bytes_per_partition: Option<u64>,
    /// Never delete an event that a subscription has not checkpointed past (default true):
    /// the limits then wait for the slowest subscription, and retention warns that the hub is
    /// over them and names the subscriptions behind. False deletes by the limits alone; a
    /// reader that finds events gone logs a warning and counts them.
    pub keep_unread: bool,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age: None,
            max_bytes_per_partition: None,
            keep_unread: true,
        }
    }
}

/// What retention deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Events deleted.
    pub deleted: usize,
    /// Idempotency keys forgotten.
    pub forgotten: usize,
    /// Events the limits would have deleted, kept because a subscription has not read them.
    pub kept_unread: u64,
    /// The subscriptions that have not read them.
    pub behind: Vec<String>,
}

/// What a hub refuses because it does it another way (a JetStream stream keeps its own
/// retention limits and its subscriptions as consumers): the message says which way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unsupported(pub String);

/// An event hub; see the [module docs](self).
pub trait EventHub: Send + Sync + Debug + 'static {
    /// A line naming the hub, for people (a file, a stream and its servers).
    fn describe(&self) -> String;

    /// Stores `events`. With `dedupe`, a repeat of an id published within the dedupe window
    /// is stored once; without, every event is stored (a hub that always deduplicates
    /// refuses). Errors are classified as a sink's are (a hub down is transient, an event the
    /// hub cannot take is poison).
    fn publish<'a>(&'a self, events: &'a [Event], dedupe: bool) -> PublishFuture<'a>;

    /// Stores `events` as [`publish`](Self::publish) does, for a caller that needs to know
    /// only that every one is stored, not which were repeats (a sink). A hub with a faster
    /// way that cannot tell the two apart takes it (JetStream's fast-ingest batches); the
    /// others publish.
    fn publish_without_receipt<'a>(
        &'a self,
        events: &'a [Event],
        dedupe: bool,
    ) -> Pin<Box<dyn Future<Output = Result<(), Error>> + Send + 'a>> {
        Box::pin(async move { self.publish(events, dedupe).await.map(|_| ()) })
    }

    /// Opens the subscription `name`.
    fn subscribe<'a>(
        &'a self,
        name: &'a str,
        options: ReadOptions,
    ) -> HubFuture<'a, HubSubscription>;

    /// The newest `n` events (their encoded bytes) that `keep` accepts, oldest first.
    fn newest<'a>(
        &'a self,
        n: usize,
        keep: &'a (dyn Fn(&[u8]) -> bool + Send + Sync),
    ) -> HubFuture<'a, Vec<Vec<u8>>>;

    /// The record at `offset` of `partition`, as a fault names them; `None` when it is gone
    /// (retention) or not a position of this hub.
    fn record_at<'a>(&'a self, partition: &'a str, offset: u64) -> HubFuture<'a, Option<Vec<u8>>>;

    /// Events published between `from` and `until` (ms since the epoch), when the hub can
    /// count them cheaply (for progress bars); `None` otherwise.
    fn count_published(&self, from: i64, until: i64) -> HubFuture<'_, Option<u64>>;

    /// What the hub holds and how far its subscriptions are.
    fn stats(&self) -> HubFuture<'_, HubStats>;

    /// Deletes now what `retention` lets go. A hub that keeps its own limits refuses, saying
    /// where they are set.
    fn apply_retention<'a>(&'a self, retention: &'a Retention) -> HubFuture<'a, RetentionReport> {
        let _ = retention;
        Box::pin(async move {
            Err(Unsupported(format!(
                "{} keeps its own retention limits",
                self.describe()
            ))
            .into())
        })
    }

    /// Whether the hub keeps timers ([`EventHub::schedule`]).
    fn schedules(&self) -> bool {
        false
    }

    /// Publishes each event once, at its time (ms since the epoch), into its partition:
    /// timers the hub keeps, so they survive the process that set them and are delivered to
    /// whichever instance reads the partition when they are due. Scheduling an event id
    /// again replaces its schedule. A hub without timers refuses ([`EventHub::schedules`]).
    fn schedule<'a>(&'a self, timers: &'a [(Event, i64)]) -> HubFuture<'a, ()> {
        let _ = timers;
        Box::pin(
            async move { Err(Unsupported(format!("{} keeps no timers", self.describe())).into()) },
        )
    }

    /// The records of `partition` after position `after` and before position `before`, in
    /// order (from `since`, ms since the epoch, when `after` is `None`): what another
    /// instance took from a partition before this one read it, for a processor whose state is
    /// built from what it reads to catch up on after a failover. A hub whose partitions are
    /// read by one process's state (the embedded hub: one file) has none to give.
    fn missed<'a>(
        &'a self,
        partition: &'a str,
        after: Option<u64>,
        before: u64,
        since: i64,
    ) -> HubFuture<'a, Vec<(u64, Vec<u8>)>> {
        let _ = (partition, after, before, since);
        Box::pin(async move { Ok(Vec::new()) })
    }

    /// Removes the subscription `name` and its progress; `false` if there was none. A hub
    /// that keeps subscriptions elsewhere refuses, saying how to remove one.
    fn unsubscribe<'a>(&'a self, name: &'a str) -> HubFuture<'a, bool> {
        Box::pin(async move {
            let why = format!(
                "{}: subscription `{name}` cannot be removed here",
                self.describe()
            );
            Err(Unsupported(why).into())
        })
    }
}

/// A hub shared by the processors and the command.
pub type SharedHub = Arc<dyn EventHub>;

/// A subscription of any hub, in halves for a processor.
pub struct HubSubscription {
    /// The records.
    pub reader: BoxSource,
    /// Their settlements and checkpoints.
    pub checkpointer: BoxCheckpointer,
    /// Resolves when the subscription has handed back what is unfinished, for hubs that
    /// redeliver it elsewhere (JetStream); `None` for a log.
    pub closed: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl HubSubscription {
    /// A subscription of a log: its reader and checkpointer, boxed.
    pub fn new(reader: impl Source, checkpointer: impl Checkpointer + 'static) -> Self {
        HubSubscription {
            reader: BoxSource::new(reader),
            checkpointer: BoxCheckpointer::new(checkpointer),
            closed: None,
        }
    }

    /// With a future that resolves when unfinished records are handed back.
    #[must_use]
    pub fn closing(mut self, closed: impl Future<Output = ()> + Send + 'static) -> Self {
        self.closed = Some(Box::pin(closed));
        self
    }
}

impl Debug for HubSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubSubscription").finish_non_exhaustive()
    }
}

type BatchFuture<'a> = Pin<Box<dyn Future<Output = Pulled> + Send + 'a>>;

/// [`Source`] as an object-safe trait (implemented for every source).
trait DynSource: Send {
    fn next_batch_boxed(&mut self, max: usize) -> BatchFuture<'_>;
    fn buffered_dyn(&self) -> bool;
}

impl<S: Source> DynSource for S {
    fn next_batch_boxed(&mut self, max: usize) -> BatchFuture<'_> {
        Box::pin(self.next_batch(max))
    }

    fn buffered_dyn(&self) -> bool {
        self.buffered()
    }
}

/// Any [`Source`], boxed.
pub struct BoxSource(Box<dyn DynSource>);

impl BoxSource {
    /// Boxes `source`.
    pub fn new(source: impl Source) -> Self {
        BoxSource(Box::new(source))
    }
}

impl Debug for BoxSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BoxSource")
    }
}

impl Source for BoxSource {
    async fn next_batch(&mut self, max: usize) -> Result<Option<Vec<Record>>, SourceError> {
        self.0.next_batch_boxed(max).await
    }

    fn buffered(&self) -> bool {
        self.0.buffered_dyn()
    }
}

type CommitFuture<'a> = Pin<Box<dyn Future<Output = Result<(), CommitError>> + Send + 'a>>;

/// [`Checkpointer`] as an object-safe trait (implemented for every checkpointer).
trait DynCheckpointer: Send {
    fn commit_boxed<'a>(&'a mut self, checkpoints: &'a [Checkpoint]) -> CommitFuture<'a>;
    fn settle_dyn(&mut self, record: &Record, settlement: Settlement);
    fn owned_boxed(&mut self) -> CommitFuture<'_>;
}

impl<C: Checkpointer> DynCheckpointer for C {
    fn commit_boxed<'a>(&'a mut self, checkpoints: &'a [Checkpoint]) -> CommitFuture<'a> {
        Box::pin(self.commit(checkpoints))
    }
    fn settle_dyn(&mut self, record: &Record, settlement: Settlement) {
        self.settle(record, settlement);
    }
    fn owned_boxed(&mut self) -> CommitFuture<'_> {
        Box::pin(self.owned())
    }
}

/// Any [`Checkpointer`], boxed.
pub struct BoxCheckpointer(Box<dyn DynCheckpointer>);

impl BoxCheckpointer {
    /// Boxes `checkpointer`.
    pub fn new(checkpointer: impl Checkpointer + 'static) -> Self {
        BoxCheckpointer(Box::new(checkpointer))
    }
}

impl Debug for BoxCheckpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BoxCheckpointer")
    }
}

impl Checkpointer for BoxCheckpointer {
    async fn commit(&mut self, checkpoints: &[Checkpoint]) -> Result<(), CommitError> {
        self.0.commit_boxed(checkpoints).await
    }

    fn settle(&mut self, record: &Record, settlement: Settlement) {
        self.0.settle_dyn(record, settlement);
    }

    async fn owned(&mut self) -> Result<(), CommitError> {
        self.0.owned_boxed().await
    }
}
