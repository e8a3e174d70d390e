//! The JetStream hub as an [`EventHub`]: what processors and the command use.

use std::time::Duration;

use floodway::hub::{
    EventHub, HubFuture, HubStats, HubSubscription, PartitionStats, PublishFuture, ReadOptions,
    Retention, RetentionReport, Stream, SubscriptionStats, Unsupported,
};
use floodway::{Error, Event};

use crate::hub::NatsHub;
use crate::subscription::{Acks, Partitions, Sharing, SubscriptionOptions};

/// How this process reads a stream's partitions: which ones, shared how with other
/// instances, with what acknowledgement settings, and whether it reads the fault subject.
#[derive(Debug, Clone)]
pub struct InstanceReads {
    /// Partitions of this instance.
    pub partitions: Partitions,
    /// How instances share them.
    pub sharing: Sharing,
    /// How settled records are acknowledged.
    pub acks: Acks,
    /// Ack wait (the subscription default when `None`).
    pub ack_wait: Option<Duration>,
    /// Max ack pending per partition (the subscription default when `None`).
    pub max_ack_pending: Option<i64>,
    /// Whether this instance reads the fault subject (the first instance does; the others
    /// would scatter faults across their stores).
    pub reads_faults: bool,
}

impl Default for InstanceReads {
    /// Every partition, exclusively, with the fault subject.
    fn default() -> Self {
        InstanceReads {
            partitions: Partitions::All,
            sharing: Sharing::Exclusive,
            acks: Acks::Auto,
            ack_wait: None,
            max_ack_pending: None,
            reads_faults: true,
        }
    }
}

/// A JetStream hub read as [`InstanceReads`] says: an [`EventHub`].
#[derive(Debug, Clone)]
pub struct NatsEventHub {
    /// The connection and stream.
    pub hub: NatsHub,
    /// How this process reads it.
    pub reads: InstanceReads,
}

impl NatsEventHub {
    /// `hub`, read as `reads` says.
    pub fn new(hub: NatsHub, reads: InstanceReads) -> Self {
        NatsEventHub { hub, reads }
    }

    fn options(&self, options: ReadOptions) -> SubscriptionOptions {
        let defaults = SubscriptionOptions::default();
        SubscriptionOptions {
            start: options.start,
            follow: options.follow,
            until: options.until,
            transient: options.transient,
            partitions: match (options.stream, self.reads.reads_faults) {
                (Stream::Faults, true) => Partitions::Faults,
                // The fault monitor of the first instance stores them all.
                (Stream::Faults, false) => Partitions::Only(Vec::new()),
                (Stream::Events, _) => self.reads.partitions.clone(),
            },
            sharing: self.reads.sharing,
            acks: self.reads.acks,
            ack_wait: self.reads.ack_wait.unwrap_or(defaults.ack_wait),
            max_ack_pending: self
                .reads
                .max_ack_pending
                .unwrap_or(defaults.max_ack_pending),
            ..defaults
        }
    }
}

impl EventHub for NatsEventHub {
    fn describe(&self) -> String {
        format!(
            "NATS stream {} at {}",
            self.hub.stream(),
            self.hub.servers()
        )
    }

    /// JetStream always skips a repeated id inside the stream's duplicate window: a publish
    /// without `dedupe` is refused.
    fn publish<'a>(&'a self, events: &'a [Event], dedupe: bool) -> PublishFuture<'a> {
        Box::pin(async move {
            if !dedupe {
                return Err(Error::fatal_msg(
                    "DedupeAlways",
                    "NATS JetStream always skips a repeated event id inside the stream's \
                     duplicate window: publishing without deduplication is not available",
                ));
            }
            Ok(self.hub.publish(events).await?)
        })
    }

    /// In fast-ingest batches where the stream takes them ([`NatsHub::publish_fast`]).
    fn publish_without_receipt<'a>(
        &'a self,
        events: &'a [Event],
        dedupe: bool,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Error>> + Send + 'a>> {
        Box::pin(async move {
            if !dedupe {
                return self.publish(events, dedupe).await.map(|_| ());
            }
            Ok(self.hub.publish_fast(events).await?)
        })
    }

    /// A reset is refused: a durable consumer's position lives on the server, and moving it
    /// back is not done behind the operator's back.
    fn subscribe<'a>(
        &'a self,
        name: &'a str,
        options: ReadOptions,
    ) -> HubFuture<'a, HubSubscription> {
        Box::pin(async move {
            if options.reset && !options.transient {
                return Err(format!(
                    "subscription `{name}`: resetting a subscription is not available on NATS \
                     (its consumers keep their position on the server)"
                )
                .into());
            }
            let subscription = self.hub.subscribe(name, self.options(options)).await?;
            let closed = subscription.closed();
            let (reader, checkpointer) = subscription.split();
            Ok(HubSubscription::new(reader, checkpointer).closing(closed))
        })
    }

    fn newest<'a>(
        &'a self,
        n: usize,
        keep: &'a (dyn Fn(&[u8]) -> bool + Send + Sync),
    ) -> HubFuture<'a, Vec<Vec<u8>>> {
        Box::pin(async move {
            let newest = self.hub.newest(n, keep).await?;
            Ok(newest.into_iter().map(|(_, data)| data.to_vec()).collect())
        })
    }

    /// A stream sequence names the record, checked to be in the partition it was read from.
    fn record_at<'a>(&'a self, partition: &'a str, offset: u64) -> HubFuture<'a, Option<Vec<u8>>> {
        Box::pin(async move {
            let record = match partition.parse::<u32>() {
                Ok(p) => self.hub.record_in(p, offset).await?,
                Err(_) => self.hub.record_at(offset).await?,
            };
            Ok(record.map(|b| b.to_vec()))
        })
    }

    fn schedules(&self) -> bool {
        self.hub.keeps_timers()
    }

    fn schedule<'a>(&'a self, timers: &'a [(Event, i64)]) -> HubFuture<'a, ()> {
        Box::pin(async move {
            if !self.hub.keeps_timers() {
                let why = format!(
                    "{} keeps no timers: message schedules need NATS 2.12 or newer",
                    self.describe()
                );
                return Err(floodway::hub::Unsupported(why).into());
            }
            let timers: Vec<(String, u32, bytes::Bytes, i64)> = timers
                .iter()
                .map(|(event, at)| {
                    (
                        event.id().to_owned(),
                        self.hub.partition_of(event.partition_key()),
                        bytes::Bytes::from(event.to_json()),
                        *at,
                    )
                })
                .collect();
            Ok(self.hub.schedule(&timers).await?)
        })
    }

    fn missed<'a>(
        &'a self,
        partition: &'a str,
        after: Option<u64>,
        before: u64,
        since: i64,
    ) -> HubFuture<'a, Vec<(u64, Vec<u8>)>> {
        Box::pin(async move {
            let Ok(partition) = partition.parse::<u32>() else {
                return Ok(Vec::new());
            };
            let found = self.hub.missed(partition, after, before, since).await?;
            Ok(found.into_iter().map(|(s, b)| (s, b.to_vec())).collect())
        })
    }

    fn count_published(&self, _from: i64, _until: i64) -> HubFuture<'_, Option<u64>> {
        Box::pin(async { Ok(None) })
    }

    fn stats(&self) -> HubFuture<'_, HubStats> {
        Box::pin(async move {
            let stats = self.hub.stats().await?;
            Ok(HubStats {
                description: format!(
                    "NATS stream {} at {} ({} partitions, {} replicas, {:.1} MiB, sequences {}..{})",
                    stats.stream,
                    self.hub.servers(),
                    self.hub.partitions(),
                    stats.replicas,
                    stats.bytes as f64 / (1024.0 * 1024.0),
                    stats.first_sequence,
                    stats.last_sequence
                ),
                partitions: stats
                    .partitions
                    .iter()
                    .enumerate()
                    .map(|(p, events)| PartitionStats {
                        partition: p.to_string(),
                        events: *events,
                        offsets: None,
                        bytes: None,
                    })
                    .collect(),
                faults: Some(stats.faults),
                subscriptions: stats
                    .subscriptions
                    .iter()
                    .map(|(name, s)| SubscriptionStats {
                        name: name.clone(),
                        lag: s.pending,
                        partitions: s.partitions.clone(),
                        progress: format!(
                            "{} consumers, {} unacked, {} redelivered",
                            s.consumers, s.ack_pending, s.redelivered
                        ),
                        owner: None,
                    })
                    .collect(),
                newest_published: None,
            })
        })
    }

    fn apply_retention<'a>(&'a self, _: &'a Retention) -> HubFuture<'a, RetentionReport> {
        Box::pin(async move {
            let why = "on NATS the stream applies retention itself: set retention_max_age / \
                       retention_max_bytes in [hub] and restart `floodway run` (or use `nats \
                       stream edit`)";
            Err(Unsupported(why.into()).into())
        })
    }

    fn unsubscribe<'a>(&'a self, _: &'a str) -> HubFuture<'a, bool> {
        Box::pin(async move {
            let why = "on NATS a subscription is a set of durable consumers: remove them with \
                       `nats consumer rm`";
            Err(Unsupported(why.into()).into())
        })
    }
}
