//! What a subscription reads and how: start, partitions, sharing, acknowledgement settings.

use std::time::Duration;

/// How long a pull request waits at the server.
pub(super) const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// The priority group name used by pinned sharing.
pub(super) const GROUP: &str = "floodway";

/// Where a subscription without stored progress starts: the contract's own type.
pub use floodway::hub::StartAt;

/// Which subjects a subscription reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Partitions {
    /// Every partition.
    #[default]
    All,
    /// These partitions only: static assignment across instances.
    Only(Vec<u32>),
    /// The fault subject (the fault monitor).
    Faults,
}

impl Partitions {
    /// The share of instance `index` of `count`: partitions `p` with `p % count == index`.
    pub fn instance(index: u32, count: u32, partitions: u32) -> Partitions {
        Partitions::Only(
            (0..partitions)
                .filter(|p| count > 0 && p % count == index)
                .collect(),
        )
    }
}

/// How instances share a partition's consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sharing {
    /// Each partition is read by one instance by construction (static assignment, or one
    /// instance in all).
    #[default]
    Exclusive,
    /// Every instance pulls every partition; the server pins one client per partition and
    /// delivers only to it, moving the pin to another instance when the pinned one has not
    /// pulled for `ttl` (consumer priority groups, NATS 2.11+).
    Pinned {
        /// How long a silent pinned client keeps its pin.
        ttl: Duration,
    },
}

/// How a subscription acknowledges what it settles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Acks {
    /// Cumulatively with exclusive sharing, each record on its own with pinned sharing, where
    /// instances share a consumer. A consumer made acking each record (the default of earlier
    /// releases) keeps acking so: switching makes it again, which is safe only with the
    /// instances acking per record stopped, so it takes [`Acks::Cumulative`].
    #[default]
    Auto,
    /// Each record on its own (JetStream's `explicit` ack policy): a record settled is acked
    /// at once, whatever is still open before it. Two instances given the same partitions
    /// (a rolling deploy) share their consumers and read side by side.
    Each,
    /// Cumulatively (JetStream's `all` ack policy), as a Kafka offset or the embedded hub's
    /// checkpoint: one ack covers a partition's run of settled records (consuming ran at
    /// 1.4-1.9x the rate of per-record acks in the benchmark, BENCHMARKS.md). For exclusive
    /// sharing only: a partition then has one reader at a time, and an instance given
    /// partitions another live instance reads (a rolling deploy) waits for it to stop before
    /// it reads them: each partition has a lease, which one instance holds at a time (a key
    /// in the JetStream bucket `floodway_readers`, written again every 2 s and let go after
    /// 6 s without). A slow record holds its partition's `max_ack_pending` window.
    Cumulative,
}

impl Acks {
    /// Whether a subscription shared so acks cumulatively.
    pub fn cumulative(self, sharing: Sharing) -> bool {
        match self {
            Acks::Auto => sharing == Sharing::Exclusive,
            Acks::Each => false,
            Acks::Cumulative => true,
        }
    }
}

/// How a subscription reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionOptions {
    /// Where to start without stored progress.
    pub start: StartAt,
    /// Wait for new events (a live stream), or end at the last event held (a bounded read).
    pub follow: bool,
    /// Read only events published at or before this time (ms since the epoch), then end.
    pub until: Option<i64>,
    /// A reader that leaves no trace (`hub tail`, a replay): ephemeral consumers, no acks.
    pub transient: bool,
    /// Which partitions.
    pub partitions: Partitions,
    /// How instances share them.
    pub sharing: Sharing,
    /// How settled records are acknowledged.
    pub acks: Acks,
    /// Per partition, records delivered and not yet acked at most (backpressure); for a
    /// transient read, which acks nothing, records read and not yet taken by the processor.
    pub max_ack_pending: i64,
    /// How long JetStream waits for an ack before redelivering (in-progress acks are sent
    /// every third of it). A record held longer than that without one has lapsed: the
    /// checkpointer then fails, and the processor stops.
    pub ack_wait: Duration,
    /// Records per pull request.
    pub fetch: usize,
    /// The delay of a nak after the first delivery; doubles with each delivery up to
    /// `nak_max_delay`.
    pub nak_delay: Duration,
    /// The longest nak delay.
    pub nak_max_delay: Duration,
}

impl Default for SubscriptionOptions {
    fn default() -> Self {
        SubscriptionOptions {
            start: StartAt::Beginning,
            follow: true,
            until: None,
            transient: false,
            partitions: Partitions::All,
            sharing: Sharing::Exclusive,
            acks: Acks::Auto,
            max_ack_pending: 1000,
            ack_wait: Duration::from_secs(30),
            fetch: 200,
            nak_delay: Duration::from_millis(500),
            nak_max_delay: Duration::from_secs(60),
        }
    }
}

impl SubscriptionOptions {
    /// The delay of a nak for a record delivered `delivered` times.
    pub fn nak_delay_for(&self, delivered: u32) -> Duration {
        let doublings = delivered.saturating_sub(1).min(20);
        self.nak_delay
            .saturating_mul(1 << doublings)
            .min(self.nak_max_delay)
    }
}
