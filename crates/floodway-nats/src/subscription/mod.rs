//! Subscriptions: one durable pull consumer per partition, acknowledged as the core settles.
//!
//! A subscription named `orders-view` reading partitions 0..8 owns the consumers
//! `orders-view_0` .. `orders-view_7`, each filtered on its partition's subject. A task per
//! partition pulls from its consumer (its own pull requests, counted where their replies are
//! read: `../pull.rs` says why) and hands records to the processor through one channel; what a
//! slow processor holds is bounded by the server, which stops delivering at
//! `max_ack_pending`.
//!
//! Acknowledgement follows the core's settlements ([`Checkpointer::settle`](floodway::Checkpointer::settle)).
//! With exclusive sharing (the default, [`Acks::Auto`]) a consumer acks as a checkpoint
//! moves: when a record and every record before it in its partition are settled, one ack
//! covers them all (a faulted record once its fault event is stored); the reader checks that
//! no delivery went missing on the way, which such an ack would cover, and a partition has
//! one reader at a time: the holder of its lease (`lease.rs`), which also waits while another
//! pulls from the consumer (`consumer::claim`). With pinned sharing, or [`Acks::Each`], each
//! record is acked on its own, and a record whose fault event is stored is terminated
//! (`+TERM`), so JetStream never redelivers it, poison included.
//! While records are held (in the processor, retrying in place or held by an open breaker, or
//! settled behind one that is), in-progress acks (`+WPI`) keep JetStream from redelivering
//! them; a subscription that held a record longer than the ack wait without one has lapsed
//! (JetStream hands such records to another reader), and its checkpointer then fails the
//! processor's check before each dispatch (`acks::KeptAlive`). Records the processor lets go of unfinished (it stopped: drained, timed out, or
//! failed) are nak'd with a delay that grows with their delivery count, never an immediate
//! nak that would burn `max_deliver` in milliseconds; with cumulative acks, settled records
//! held behind them are nak'd too, and come again.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy};
use async_nats::Subject;
use floodway::Record;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinSet;

use crate::error::NatsError;
use crate::hub::{check_name, NatsHub};

mod acks;
mod consumer;
mod lease;
mod options;
mod reader;

use acks::{acker, KeptAlive};
use consumer::{consumer_config, cumulative, open_consumer, restart_at_ack_floor, Opened};
pub use options::{Acks, Partitions, Sharing, StartAt, SubscriptionOptions};
use reader::PartitionReader;

/// A record handed to the processor and not yet acknowledged.
#[derive(Debug)]
struct Pending {
    reply: Subject,
    /// How many times JetStream has delivered it.
    delivered: u32,
    /// Its delivery's sequence in the consumer.
    delivery: u64,
    /// Settled, and waiting for an earlier record to be (cumulative acks only).
    settled: bool,
    /// Delivered after a record that comes after it in the stream (a redelivery).
    behind: bool,
    /// When it arrived: held unkept past the ack wait from then, it may be another reader's.
    received: std::time::Instant,
}

/// What the subscription holds of one partition's consumer.
#[derive(Debug, Default)]
struct Lane {
    /// The consumer's ack policy is `all`: an ack covers every record before it.
    cumulative: bool,
    /// Records delivered and not yet acknowledged, by stream sequence.
    records: BTreeMap<u64, Pending>,
    /// How many of `records` are `behind`.
    behind: usize,
    /// No acks now: the reader is finding its consumer again, and an ack worked out for the
    /// consumer that was must not reach one made in its place.
    paused: bool,
    /// The reader is gone (the processor dropped its source and drains what it holds): no
    /// cumulative acks until the subscription closes, and then one, only if the consumer is
    /// still the one these records came from. With its reader gone, the consumer has no pull
    /// request waiting, so another instance may take it over and make it again meanwhile,
    /// where an ack of a delivery of the old one would move the new one's ack floor past its
    /// own deliveries, and the server would ignore that reader's acks from then on.
    orphaned: bool,
    /// The consumer these records came from, to look at before that last ack.
    consumer: Option<async_nats::jetstream::consumer::Consumer<pull::Config>>,
    /// Acks wait for the partition's lease (cumulative acks): without one held and valid,
    /// another instance may be reading the partition (`lease.rs`).
    leased: bool,
    /// The partition's lease, while this subscription holds it.
    lease: Option<lease::Held>,
    /// Told when the lease is found lost, for the reader to let the partition go, or when
    /// `foreign` is set.
    lost: Arc<tokio::sync::Notify>,
    /// The consumer sequence of the last delivery of `consumer` its reader read: the ack
    /// floor, which only this reader's acks move, cannot pass it.
    delivered: u64,
    /// Someone else's ack moved the consumer's ack floor past this reader's deliveries (a
    /// late ack of an instance that read the partition before): the reader makes the
    /// consumer again where it stands.
    foreign: bool,
}

impl Lane {
    fn new(cumulative: bool) -> Lane {
        Lane {
            cumulative,
            ..Lane::default()
        }
    }

    /// The lane of a consumer being read.
    fn reading(consumer: &async_nats::jetstream::consumer::Consumer<pull::Config>) -> Lane {
        Lane {
            consumer: Some(consumer.clone()),
            delivered: consumer.cached_info().delivered.consumer_sequence,
            ..Lane::new(consumer::cumulative(consumer))
        }
    }

    /// Holds a record just delivered (in place of an earlier delivery of it).
    fn hold(&mut self, sequence: u64, mut pending: Pending) {
        self.delivered = self.delivered.max(pending.delivery);
        pending.behind = self
            .records
            .last_key_value()
            .is_some_and(|(last, _)| *last > sequence);
        if pending.behind {
            self.behind += 1;
        }
        if let Some(earlier) = self.records.insert(sequence, pending) {
            if earlier.behind {
                self.behind -= 1;
            }
        }
    }

    /// Lets go of a record.
    fn take(&mut self, sequence: u64) -> Option<Pending> {
        let pending = self.records.remove(&sequence)?;
        if pending.behind {
            self.behind -= 1;
        }
        Some(pending)
    }

    /// Lets go of everything (the consumer was made again and delivers it anew).
    fn clear(&mut self, cumulative: bool) {
        *self = Lane {
            paused: self.paused,
            orphaned: self.orphaned,
            leased: self.leased,
            lease: self.lease.take(),
            lost: self.lost.clone(),
            ..Lane::new(cumulative)
        };
    }

    /// Whether this subscription may ack the partition cumulatively now: it needs no lease,
    /// or holds one still valid by its own clock.
    fn may_ack(&self) -> bool {
        !self.leased
            || self
                .lease
                .as_ref()
                .is_some_and(|held| held.valid(std::time::Instant::now()))
    }

    /// Whether the first record held is settled (an ack can move the floor).
    fn has_settled_front(&self) -> bool {
        self.records.values().next().is_some_and(|p| p.settled)
    }

    /// With cumulative acks: lets go of the settled records at the front that one ack can
    /// cover, and gives the reply subject to send that ack to.
    ///
    /// JetStream takes an ack of the `all` policy only above the consumer's ack floor in both
    /// stream and delivery sequence, and moves the floor to the acked record's. A redelivered
    /// record has a later delivery sequence than the records after it in the stream that
    /// were delivered before it, so acking it would have the server ignore their acks. The
    /// ack therefore goes to the last settled record whose delivery came before that of
    /// every record still held after it. The reader reads deliveries in order (a gap makes
    /// it start its consumer over), so while no record is `behind`, delivery follows stream
    /// order and that is the last settled record of the run.
    fn advance(&mut self) -> Option<Subject> {
        if self.paused || self.orphaned || !self.may_ack() {
            return None;
        }
        let run = self.records.values().take_while(|p| p.settled).count();
        if run == 0 {
            return None;
        }
        let cover = if self.behind == 0 {
            run
        } else {
            // Least delivery sequence of the records after each one.
            let deliveries: Vec<u64> = self.records.values().map(|p| p.delivery).collect();
            let mut after = u64::MAX;
            let mut cover = 0;
            for i in (0..deliveries.len()).rev() {
                if i < run && deliveries[i] < after {
                    cover = i + 1;
                    break;
                }
                after = after.min(deliveries[i]);
            }
            cover
        };
        let mut reply = None;
        for _ in 0..cover {
            let (sequence, _) = self.records.first_key_value()?;
            let sequence = *sequence;
            reply = self.take(sequence).map(|p| p.reply);
        }
        reply
    }
}

/// The lanes of the partitions read, by partition; `None` once the subscription has closed.
type Outstanding = Arc<Mutex<Option<HashMap<Arc<str>, Lane>>>>;

enum Item {
    Record(Record),
    End,
    Failed(NatsError),
}

enum AckOp {
    Ack(Arc<str>, u64),
    Term(Arc<str>, u64),
    /// Sends what is settled so far and flushes the connection.
    Flush(oneshot::Sender<()>),
    /// Answers once every ack worked out before it is handed to the connection.
    Barrier(oneshot::Sender<()>),
    /// Acks what a partition has settled (its lane was paused).
    Advance(Arc<str>),
}

/// A subscription to the JetStream hub: a [`Source`](floodway::Source) and a [`Checkpointer`](floodway::Checkpointer) (split with
/// [`NatsSubscription::split`] to hand both to a processor).
#[derive(Debug)]
pub struct NatsSubscription {
    reader: NatsReader,
    checkpointer: NatsCheckpointer,
    closed: watch::Receiver<bool>,
}

/// The reading half of a [`NatsSubscription`].
#[derive(Debug)]
pub struct NatsReader {
    rx: mpsc::UnboundedReceiver<Item>,
    live: usize,
    follow: bool,
    source: String,
    /// A transient read's room for records read and not yet taken (see [`Budget`]).
    budget: Budget,
    /// The lanes, to mark orphaned when the reader goes.
    outstanding: Outstanding,
    _tasks: JoinSet<()>,
}

impl Drop for NatsReader {
    /// The partitions' readers stop with it (their pull requests go), while the processor may
    /// still be settling what it holds: the lanes are orphaned ([`Lane::orphaned`]).
    fn drop(&mut self) {
        if let Some(Some(lanes)) = self.outstanding.lock().ok().as_deref_mut() {
            for lane in lanes.values_mut() {
                lane.orphaned = true;
            }
        }
    }
}

/// How many records a transient read's partition readers may hand over that the processor has
/// not taken: a permit for each, given back as the processor takes them. A durable read needs
/// none (`None`), since the server stops delivering at `max_ack_pending`; a transient one acks
/// nothing, and the server bounds nothing for a consumer that takes no acks.
type Budget = Option<Arc<Semaphore>>;

/// The acknowledging half of a [`NatsSubscription`].
#[derive(Debug)]
pub struct NatsCheckpointer {
    ops: Option<mpsc::UnboundedSender<AckOp>>,
    /// Whether what it holds is still its own; `None` for a transient read, which holds
    /// nothing of anyone's.
    alive: Option<Arc<KeptAlive>>,
}

impl std::fmt::Debug for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Item::Record(r) => write!(f, "Record({}:{})", r.partition, r.offset),
            Item::End => f.write_str("End"),
            Item::Failed(e) => write!(f, "Failed({e})"),
        }
    }
}

impl NatsSubscription {
    /// The reader and the checkpointer.
    pub fn split(self) -> (NatsReader, NatsCheckpointer) {
        (self.reader, self.checkpointer)
    }

    /// Resolves when the subscription has let go of everything after both halves were
    /// dropped: acks flushed and unfinished records nak'd. Await it before exiting so that
    /// another instance gets those records after their nak delay, not after `ack_wait`.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut closed = self.closed.clone();
        async move {
            let _ = closed.wait_for(|c| *c).await;
        }
    }
}

impl NatsHub {
    /// Opens the subscription `name`: its consumers are created when missing (or updated
    /// when `ack_wait` or `max_ack_pending` changed) and resume from what they have not seen
    /// acked.
    ///
    /// # Errors
    /// A name NATS cannot use, a partition the stream does not have, settings an existing
    /// consumer cannot take, or a server failure.
    pub async fn subscribe(
        &self,
        name: &str,
        options: SubscriptionOptions,
    ) -> Result<NatsSubscription, NatsError> {
        check_name("subscription", name)?;
        if !options.transient && options.ack_wait < Duration::from_secs(1) {
            return Err(NatsError::Config(format!(
                "ack_wait of {:?} is too short: at least 1 s",
                options.ack_wait
            )));
        }
        if let Sharing::Pinned { ttl } = options.sharing {
            if options.acks == Acks::Cumulative && !options.transient {
                return Err(NatsError::Config(
                    "cumulative acks need exclusive sharing: instances sharing a pinned \
                     consumer would ack what another holds (leave acks to `Acks::Auto`, or \
                     set `Acks::Each`)"
                        .into(),
                ));
            }
            if ttl < Duration::from_secs(1) {
                return Err(NatsError::Config(format!(
                    "pinned_ttl of {ttl:?} is too short: at least 1 s"
                )));
            }
        }
        let partitions: Vec<(String, String)> = match &options.partitions {
            Partitions::All => (0..self.inner.partitions)
                .map(|p| (p.to_string(), self.partition_subject(p)))
                .collect(),
            Partitions::Only(list) => {
                if let Some(p) = list.iter().find(|p| **p >= self.inner.partitions) {
                    return Err(NatsError::Config(format!(
                        "partition {p} does not exist: stream `{}` has {}",
                        self.inner.stream, self.inner.partitions
                    )));
                }
                list.iter()
                    .map(|p| (p.to_string(), self.partition_subject(*p)))
                    .collect()
            }
            Partitions::Faults => vec![("faults".into(), self.fault_subject())],
        };
        let stream = self.stream_handle().await?;
        let source = format!("nats:{}", self.inner.stream);
        let options = Arc::new(options);
        // A partition acked cumulatively is read by the holder of its lease (`lease.rs`).
        let leases = if !options.transient && options.acks.cumulative(options.sharing) {
            Some(
                lease::Leases::open(
                    &self.inner.js,
                    &self.inner.stream,
                    name,
                    stream.cached_info().config.num_replicas,
                )
                .await?,
            )
        } else {
            None
        };
        // Every consumer first, so that bad settings fail here before anything is pulled, and
        // a start at the end means the end as of this call. The partitions' consumers are
        // opened at once (a round trip or two each, and a second look where a predecessor
        // left messages unacknowledged), each to its end: one made again is never cut short
        // between its delete and its create by another's failure.
        // A partition whose lease another instance holds is left to its reader, which waits
        // for the lease.
        let opened = partitions.into_iter().map(|(partition, subject)| {
            let (stream, options, leases) = (&stream, &options, &leases);
            async move {
                let mut config = consumer_config(name, &partition, subject.clone(), options)
                    .map_err(|e| (e, None))?;
                if options.acks == Acks::Auto && config.ack_policy == AckPolicy::All {
                    config.ack_policy =
                        auto_policy(stream, &config).await.map_err(|e| (e, None))?;
                }
                let leased = takes_lease(leases.as_ref(), &config);
                // A lease not taken for a failure is left to the reader to take, as one
                // another holds.
                let held = match leases {
                    Some(leases) if leased => {
                        leases.take(&partition).await.unwrap_or_else(|e| {
                            tracing::warn!(partition, error = %e, "taking the partition's lease failed; trying again");
                            None
                        })
                    }
                    _ => None,
                };
                let opening = async {
                    let consumer = open_consumer(stream, &config).await?;
                    Ok::<_, NatsError>(if leased && held.is_none() {
                        Opened::Claim {
                            floor: consumer.cached_info().ack_floor.stream_sequence,
                        }
                    } else if !options.transient && options.sharing == Sharing::Exclusive {
                        restart_at_ack_floor(stream, consumer, &config).await?
                    } else {
                        Opened::Ready(Box::new(consumer))
                    })
                };
                match opening.await {
                    Ok(consumer) => Ok((partition, subject, config, consumer, held)),
                    Err(e) => Err((e, held.map(|held| (partition, held)))),
                }
            }
        });
        let mut consumers = Vec::new();
        let mut failed = None;
        let mut taken = Vec::new();
        for outcome in futures_util::future::join_all(opened).await {
            match outcome {
                Ok(opened) => {
                    if let Some(held) = &opened.4 {
                        taken.push((opened.0.clone(), held.clone()));
                    }
                    consumers.push(opened);
                }
                Err((e, held)) => {
                    taken.extend(held);
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            // The leases taken go at once, not when they run out.
            if let Some(leases) = &leases {
                let releases = taken.iter().map(|(p, held)| leases.release(p, held));
                futures_util::future::join_all(releases).await;
            }
            return Err(e);
        }
        // A lease that ran out while the consumers opened (a slow server) may be another's
        // now: its partition is left to the reader, to take again and look at afresh.
        let now = std::time::Instant::now();
        for (_, _, _, consumer, held) in &mut consumers {
            if held.as_ref().is_some_and(|held| !held.valid(now)) {
                *held = None;
                if let Opened::Ready(ready) = consumer {
                    *consumer = Opened::Claim {
                        floor: ready.cached_info().ack_floor.stream_sequence,
                    };
                }
            }
        }
        let lost: HashMap<String, Arc<tokio::sync::Notify>> = consumers
            .iter()
            .map(|(partition, ..)| (partition.clone(), Arc::default()))
            .collect();
        let lanes = consumers
            .iter_mut()
            .map(|(partition, _, config, consumer, held)| {
                let mut lane = match consumer {
                    Opened::Ready(consumer) => Lane::reading(consumer),
                    Opened::Claim { .. } => Lane::new(config.ack_policy == AckPolicy::All),
                };
                lane.leased = takes_lease(leases.as_ref(), config);
                lane.lease = held.take();
                lane.lost = lost[partition.as_str()].clone();
                (Arc::from(partition.as_str()), lane)
            })
            .collect();
        let outstanding: Outstanding = Arc::new(Mutex::new(Some(lanes)));
        // Unbounded on purpose: every message is registered (kept alive with in-progress acks,
        // nak'd at close) the moment it arrives, and the server's `max_ack_pending` bounds how
        // many there are, per partition. A transient read takes no acks, so the server bounds
        // nothing: its readers wait for room in a budget of as many records instead.
        let (tx, rx) = mpsc::unbounded_channel();
        let (ops, ops_rx) = mpsc::unbounded_channel();
        let mut tasks = JoinSet::new();
        let live = consumers.len();
        let budget: Budget = options.transient.then(|| {
            // A setting of no limit (`-1`, as JetStream reads it) takes the default.
            let per_partition = usize::try_from(options.max_ack_pending)
                .ok()
                .filter(|n| *n > 0)
                .or_else(|| usize::try_from(SubscriptionOptions::default().max_ack_pending).ok())
                .unwrap_or(1);
            let permits = per_partition
                .saturating_mul(live.max(1))
                .min(Semaphore::MAX_PERMITS);
            Arc::new(Semaphore::new(permits))
        });
        for (partition, subject, config, consumer, _) in consumers {
            // Where this consumer stands: what it holds is below its ack floor, so a consumer
            // recreated later (after someone deleted it) goes on from there.
            let (consumer, floor) = match consumer {
                Opened::Ready(consumer) => (Some(*consumer), None),
                Opened::Claim { floor } => (None, Some(floor)),
            };
            let info = consumer.as_ref().map(|c| c.cached_info());
            let cumulative = consumer
                .as_ref()
                .map_or(config.ack_policy == AckPolicy::All, cumulative);
            let last = match (&config.durable_name, info, floor) {
                (_, _, Some(floor)) => floor,
                (Some(_), Some(info), _) => info.ack_floor.stream_sequence,
                _ => 0,
            };
            let leased = takes_lease(leases.as_ref(), &config);
            let reader = PartitionReader {
                client: self.inner.client.clone(),
                stream: stream.clone(),
                subject,
                config,
                partition: Arc::from(partition.as_str()),
                source: source.clone().into(),
                options: options.clone(),
                outstanding: outstanding.clone(),
                tx: tx.clone(),
                last,
                target: None,
                // A consumer held by another reader is looked at again at the first pull, as
                // one this reader did not make.
                made: info.map_or(time::OffsetDateTime::UNIX_EPOCH, |info| info.created),
                cumulative,
                delivered: info.map_or(0, |info| info.delivered.consumer_sequence),
                remake: false,
                opened: consumer.is_some(),
                resume_at: None,
                acks: ops.downgrade(),
                budget: budget.clone(),
                pin: crate::pull::PinCell::default(),
                leases: leases.clone().filter(|_| leased),
                lost: lost[partition.as_str()].clone(),
                consumer,
            };
            tasks.spawn(reader.run());
        }
        let (closed_tx, closed) = watch::channel(false);
        let alive = (!options.transient)
            .then(|| Arc::new(KeptAlive::new(options.ack_wait, outstanding.clone())));
        if let Some(leases) = &leases {
            tokio::spawn(acks::keep_leases(leases.clone(), outstanding.clone()));
        }
        tokio::spawn(acker(
            self.inner.client.clone(),
            ops_rx,
            outstanding.clone(),
            options.clone(),
            alive.clone(),
            leases,
            closed_tx,
        ));
        Ok(NatsSubscription {
            reader: NatsReader {
                rx,
                live,
                follow: options.follow,
                source,
                budget,
                outstanding,
                _tasks: tasks,
            },
            checkpointer: NatsCheckpointer {
                ops: Some(ops),
                alive,
            },
            closed,
        })
    }
}

/// Whether a partition's reader holds a lease to read: its consumer acks cumulatively, and
/// the subscription keeps leases.
fn takes_lease(leases: Option<&lease::Leases>, config: &pull::Config) -> bool {
    leases.is_some() && config.ack_policy == AckPolicy::All
}

/// The ack policy of a partition's consumer when acks are left to [`Acks::Auto`] with
/// exclusive sharing: cumulative, unless the consumer was made acking per record (by an
/// earlier release, whose default that was, or by settings since changed back). Switching
/// makes the consumer again, which is safe only with the instances acking the other way
/// stopped (their late acks would reach the consumer made in its place), so it is left to a
/// setting of `Acks::Cumulative`; a consumer made anew acks cumulatively.
async fn auto_policy(
    stream: &async_nats::jetstream::stream::Stream,
    config: &pull::Config,
) -> Result<AckPolicy, NatsError> {
    let Some(name) = &config.durable_name else {
        return Ok(config.ack_policy);
    };
    match stream.consumer_info(name).await {
        Ok(info) if info.config.ack_policy == AckPolicy::Explicit => {
            tracing::info!(
                consumer = %name,
                "the consumer acks each record on its own, as it was made: kept so (set acks \
                 to cumulative, with the instances of the subscription stopped, to switch)"
            );
            Ok(AckPolicy::Explicit)
        }
        Ok(_) => Ok(AckPolicy::All),
        Err(e) if e.kind() == async_nats::jetstream::context::ConsumerInfoErrorKind::NotFound => {
            Ok(AckPolicy::All)
        }
        Err(e) => Err(NatsError::js("consumer info", e)),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use async_nats::jetstream::consumer::{pull, AckPolicy};
    use async_nats::jetstream::AckKind;
    use futures_util::StreamExt;

    use super::{Lane, Pending, SubscriptionOptions};
    use crate::testing::NatsServer;

    fn pending(reply: &str, delivered: u32, delivery: u64) -> Pending {
        Pending {
            reply: reply.into(),
            delivered,
            delivery,
            settled: false,
            behind: false,
            received: std::time::Instant::now(),
        }
    }

    fn settle(lane: &mut Lane, sequence: u64) {
        lane.records.get_mut(&sequence).unwrap().settled = true;
    }

    fn held(lane: &Lane) -> Vec<u64> {
        lane.records.keys().copied().collect()
    }

    #[test]
    fn one_ack_covers_the_settled_records_at_the_front() {
        let mut lane = Lane::new(true);
        for s in 1..=5 {
            lane.hold(s * 10, pending(&format!("r{s}"), 1, s));
        }
        assert_eq!(lane.advance(), None, "nothing settled");
        settle(&mut lane, 20);
        settle(&mut lane, 40);
        assert_eq!(lane.advance(), None, "the first record is still open");
        settle(&mut lane, 10);
        assert_eq!(lane.advance().as_deref(), Some("r2"));
        assert_eq!(held(&lane), [30, 40, 50]);
        settle(&mut lane, 30);
        assert_eq!(lane.advance().as_deref(), Some("r4"));
        assert_eq!(held(&lane), [50]);
        assert_eq!(lane.advance(), None);
    }

    #[test]
    fn a_redelivered_record_is_acked_only_with_the_records_delivered_before_it() {
        let mut lane = Lane::new(true);
        for s in 1..=5 {
            lane.hold(s, pending(&format!("r{s}"), 1, s));
        }
        // Record 2 comes again, after 3, 4 and 5: delivery 6.
        lane.hold(2, pending("r2 again", 2, 6));
        assert_eq!(lane.behind, 1);
        settle(&mut lane, 1);
        settle(&mut lane, 2);
        assert_eq!(
            lane.advance().as_deref(),
            Some("r1"),
            "an ack of delivery 6 would have the server ignore those of 3, 4 and 5"
        );
        assert_eq!(held(&lane), [2, 3, 4, 5]);
        settle(&mut lane, 3);
        settle(&mut lane, 4);
        assert_eq!(
            lane.advance().as_deref(),
            Some("r4"),
            "delivery 4 is before that of 5, still open: it covers 2 again as well"
        );
        assert_eq!(held(&lane), [5]);
        settle(&mut lane, 5);
        assert_eq!(lane.advance().as_deref(), Some("r5"));
        assert!(lane.records.is_empty());
        assert_eq!(lane.behind, 0);
    }

    #[test]
    fn a_record_delivered_after_later_ones_counts_as_behind_whatever_its_delivery_count() {
        // The server gives back a delivery no pull took with its count lowered again: it comes
        // once more with count 1, and a later delivery sequence than the records after it.
        let mut lane = Lane::new(true);
        for s in 1..=3 {
            lane.hold(s, pending(&format!("r{s}"), 1, s));
        }
        lane.take(1);
        lane.hold(1, pending("r1 again", 1, 4));
        assert_eq!(lane.behind, 1);
        settle(&mut lane, 1);
        assert_eq!(
            lane.advance(),
            None,
            "delivery 4 is after that of 2 and 3, still open"
        );
        settle(&mut lane, 2);
        settle(&mut lane, 3);
        assert_eq!(lane.advance().as_deref(), Some("r3"));
    }

    #[test]
    fn a_paused_lane_acks_nothing_until_resumed() {
        let mut lane = Lane::new(true);
        lane.hold(1, pending("r1", 1, 1));
        settle(&mut lane, 1);
        lane.paused = true;
        lane.clear(true);
        assert!(lane.paused, "clearing keeps the pause");
        lane.hold(1, pending("r1 anew", 1, 1));
        settle(&mut lane, 1);
        assert_eq!(lane.advance(), None);
        lane.paused = false;
        assert_eq!(lane.advance().as_deref(), Some("r1 anew"));
    }

    /// The rules `Lane::advance` keeps are the server's: a cumulative ack is taken only above
    /// the ack floor in both stream and delivery sequence.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cumulative_acks_move_the_servers_floor_past_a_redelivery() {
        let server = NatsServer::start();
        let (client, stream) = crate::testing::numbered_stream(&server.url(), 5).await;
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some("c".into()),
                ack_policy: AckPolicy::All,
                ack_wait: Duration::from_secs(60),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut lane = Lane::new(true);
        let fetch = |n: usize| {
            let consumer = consumer.clone();
            async move {
                let mut messages = consumer
                    .fetch()
                    .max_messages(n)
                    .expires(Duration::from_secs(5))
                    .messages()
                    .await
                    .unwrap();
                let mut got = Vec::new();
                while let Some(m) = messages.next().await {
                    got.push(m.unwrap());
                }
                got
            }
        };
        let first = fetch(5).await;
        assert_eq!(first.len(), 5);
        for m in &first {
            let info = m.info().unwrap();
            lane.hold(
                info.stream_sequence,
                pending(m.reply.as_deref().unwrap(), 1, info.consumer_sequence),
            );
        }
        // Record 2 is given back and comes again, after the others.
        first[1].ack_with(AckKind::Nak(None)).await.unwrap();
        let again = fetch(1).await;
        let info = again[0].info().unwrap();
        assert_eq!((info.stream_sequence, info.consumer_sequence), (2, 6));
        lane.hold(2, pending(again[0].reply.as_deref().unwrap(), 2, 6));
        // Acked and waited for, so the server has taken each before the next.
        let ack = |reply: async_nats::Subject| {
            let client = client.clone();
            async move {
                client.request(reply, AckKind::Ack.into()).await.unwrap();
            }
        };
        settle(&mut lane, 1);
        settle(&mut lane, 2);
        ack(lane.advance().unwrap()).await;
        for s in 3..=5 {
            settle(&mut lane, s);
        }
        ack(lane.advance().unwrap()).await;
        assert!(lane.records.is_empty());
        let info = consumer.clone().info().await.unwrap().clone();
        assert_eq!(info.ack_floor.stream_sequence, 5);
        assert_eq!(
            info.num_ack_pending, 0,
            "every record acked: none comes again"
        );
    }

    /// A transient read takes no acks, so the server stops at nothing: its readers hold no
    /// more records than its budget while the processor takes none, and every record still
    /// comes, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transient_read_holds_no_more_than_its_budget_while_nothing_takes_from_it() {
        use floodway::Source;

        let server = NatsServer::start();
        let hub = crate::NatsHub::connect(&crate::NatsHubOptions {
            servers: vec![server.url()],
            stream: "T".into(),
            subject: "t".into(),
            partitions: Some(2),
            ..crate::NatsHubOptions::default()
        })
        .await
        .unwrap();
        let events = floodway::testing::generate::orders(3_000, 3);
        hub.publish(&events).await.unwrap();
        let subscription = hub
            .subscribe(
                "peek",
                SubscriptionOptions {
                    transient: true,
                    follow: false,
                    max_ack_pending: 100,
                    // Not checked for a read that acks nothing; must not stop the acker.
                    ack_wait: Duration::ZERO,
                    ..SubscriptionOptions::default()
                },
            )
            .await
            .unwrap();
        let closed = subscription.closed();
        let (mut reader, checkpointer) = subscription.split();
        // The readers fill their budgets, then take no more, however long they are let.
        let filled = tokio::time::Instant::now() + Duration::from_secs(10);
        while reader.rx.len() < 200 && tokio::time::Instant::now() < filled {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            reader.rx.len(),
            200,
            "two partitions' budgets of 100, filled and no more"
        );
        let mut read = Vec::new();
        while let Some(batch) = reader.next_batch(64).await.unwrap() {
            assert!(batch.len() <= 64);
            read.extend(batch);
            assert!(reader.rx.len() <= 200);
        }
        assert_eq!(read.len(), events.len(), "nothing lost by waiting");
        for partition in ["0", "1"] {
            let offsets: Vec<u64> = read
                .iter()
                .filter(|r| &*r.partition == partition)
                .map(|r| r.offset)
                .collect();
            assert!(!offsets.is_empty());
            assert!(offsets.windows(2).all(|w| w[0] < w[1]), "in order");
        }
        drop((reader, checkpointer));
        tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .expect("the subscription closes");
    }
}
