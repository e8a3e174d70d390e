//! Subscriptions: one durable pull consumer per partition, acknowledged per record.
//!
//! A subscription named `orders-view` reading partitions 0..8 owns the consumers
//! `orders-view_0` .. `orders-view_7`, each filtered on its partition's subject. A task per
//! partition pulls from its consumer and hands records to the processor through one bounded
//! channel, so a slow processor stops the pulls (and the server stops at `max_ack_pending`).
//!
//! Acknowledgement follows the core's settlements ([`Checkpointer::settle`]): a record every
//! pipeline is done with is acked; a record whose fault event is stored is terminated (`+TERM`),
//! so JetStream never redelivers a poison event. While records are in the processor (retrying
//! in place, or held by an open breaker), in-progress acks (`+WPI`) keep JetStream from
//! redelivering them. Records the processor lets go of unfinished (it stopped: drained,
//! timed out, or failed) are nak'd with a delay that grows with their delivery count, never
//! an immediate nak that would burn `max_deliver` in milliseconds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PriorityPolicy};
use async_nats::jetstream::AckKind;
use async_nats::Subject;
use floodway::error::{CommitError, SourceError};
use floodway::{Checkpoint, Checkpointer, Record, Settlement, Source};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::error::NatsError;
use crate::hub::{check_name, NatsHub};

/// How long a pull request waits at the server.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// The priority group name used by pinned sharing.
const GROUP: &str = "floodway";

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
    /// Per partition, records delivered and not yet acked at most (backpressure).
    pub max_ack_pending: i64,
    /// How long JetStream waits for an ack before redelivering (in-progress acks are sent
    /// every third of it).
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

/// A record handed to the processor and not yet settled.
#[derive(Debug)]
struct Pending {
    reply: Subject,
    partition: Arc<str>,
    delivered: u32,
}

/// Records in the processor, by stream sequence; `None` once the subscription has closed.
type Outstanding = Arc<Mutex<Option<HashMap<u64, Pending>>>>;

enum Item {
    Record(Record),
    End,
    Failed(NatsError),
}

enum AckOp {
    Ack(u64),
    Term(u64),
    Flush(oneshot::Sender<()>),
}

/// A subscription to the JetStream hub: a [`Source`] and a [`Checkpointer`] (split with
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
    _tasks: JoinSet<()>,
}

/// The acknowledging half of a [`NatsSubscription`].
#[derive(Debug)]
pub struct NatsCheckpointer {
    ops: Option<mpsc::UnboundedSender<AckOp>>,
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
        // Every consumer first, so that bad settings fail here before anything is pulled, and
        // a start at the end means the end as of this call.
        let mut consumers = Vec::with_capacity(partitions.len());
        for (partition, subject) in partitions {
            let config = consumer_config(name, &partition, subject.clone(), &options)?;
            let mut consumer = open_consumer(&stream, &config).await?;
            if !options.transient && options.sharing == Sharing::Exclusive {
                consumer = restart_at_ack_floor(&stream, consumer, &config).await?;
            }
            consumers.push((partition, subject, config, consumer));
        }
        let outstanding: Outstanding = Arc::new(Mutex::new(Some(HashMap::new())));
        // Unbounded on purpose: every message is registered (kept alive with in-progress acks,
        // nak'd at close) the moment it arrives, and the server's `max_ack_pending` bounds how
        // many there are, per partition.
        let (tx, rx) = mpsc::unbounded_channel();
        let mut tasks = JoinSet::new();
        let live = consumers.len();
        for (partition, subject, config, consumer) in consumers {
            // Where this consumer stands: what it holds is below its ack floor, so a consumer
            // recreated later (after someone deleted it) goes on from there.
            let last = if config.durable_name.is_some() {
                consumer.cached_info().ack_floor.stream_sequence
            } else {
                0
            };
            let reader = PartitionReader {
                client: self.inner.client.clone(),
                stream: stream.clone(),
                subject,
                config,
                consumer: Some(consumer),
                partition: partition.into(),
                source: source.clone().into(),
                options: options.clone(),
                outstanding: outstanding.clone(),
                tx: tx.clone(),
                last,
                target: None,
            };
            tasks.spawn(reader.run());
        }
        let (ops, ops_rx) = mpsc::unbounded_channel();
        let (closed_tx, closed) = watch::channel(false);
        tokio::spawn(acker(
            self.inner.client.clone(),
            ops_rx,
            outstanding,
            options.clone(),
            closed_tx,
        ));
        Ok(NatsSubscription {
            reader: NatsReader {
                rx,
                live,
                follow: options.follow,
                source,
                _tasks: tasks,
            },
            checkpointer: NatsCheckpointer { ops: Some(ops) },
            closed,
        })
    }
}

fn consumer_config(
    name: &str,
    partition: &str,
    subject: String,
    options: &SubscriptionOptions,
) -> Result<pull::Config, NatsError> {
    let deliver_policy = match options.start {
        StartAt::Beginning => DeliverPolicy::All,
        StartAt::End => DeliverPolicy::New,
        StartAt::Time(ms) => DeliverPolicy::ByStartTime {
            start_time: time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                .map_err(|e| NatsError::Config(format!("start time {ms}: {e}")))?,
        },
    };
    let mut config = pull::Config {
        filter_subject: subject,
        deliver_policy,
        max_batch: 0,
        ..Default::default()
    };
    if options.transient {
        config.ack_policy = AckPolicy::None;
        config.inactive_threshold = Duration::from_secs(30);
        config.memory_storage = true;
    } else {
        let consumer = format!("{name}_{partition}");
        config.durable_name = Some(consumer.clone());
        config.name = Some(consumer);
        config.ack_policy = AckPolicy::Explicit;
        config.ack_wait = options.ack_wait;
        config.max_ack_pending = options.max_ack_pending;
        config.max_deliver = -1;
        if let Sharing::Pinned { ttl } = options.sharing {
            config.priority_policy = PriorityPolicy::PinnedClient;
            config.priority_groups = vec![GROUP.into()];
            config.priority_timeout = ttl;
        }
    }
    Ok(config)
}

/// The JetStream error code of a consumer request's failure, when the server gave one.
fn code_of(error: &async_nats::jetstream::stream::ConsumerError) -> Option<u64> {
    match error.kind() {
        async_nats::jetstream::stream::ConsumerErrorKind::JetStream(e) => Some(e.error_code().0),
        _ => None,
    }
}

/// Errors that trying again does not fix: the stream is gone, access is denied, or the
/// request is invalid.
fn permanent(code: Option<u64>) -> bool {
    // 10059 stream not found, 10100 / 10101 consumer config invalid / name in use with
    // another config, 10012 / 10013 consumer setting not allowed, 10148 / 10149 priority
    // groups.
    matches!(
        code,
        Some(10059 | 10012 | 10013 | 10100 | 10101 | 10148 | 10149 | 10150)
    )
}

/// Creates a consumer, or finds a durable one and brings its changeable settings (ack wait,
/// max ack pending) in line; a setting it cannot change is a configuration error.
async fn open_consumer(
    stream: &async_nats::jetstream::stream::Stream,
    config: &pull::Config,
) -> Result<async_nats::jetstream::consumer::Consumer<pull::Config>, NatsError> {
    let Some(name) = &config.durable_name else {
        return stream.create_consumer(config.clone()).await.map_err(|e| {
            if permanent(code_of(&e)) {
                NatsError::Config(format!("cannot create a consumer: {e}"))
            } else {
                NatsError::js("create consumer", e)
            }
        });
    };
    let consumer = stream
        .get_or_create_consumer(name, config.clone())
        .await
        .map_err(|e| {
            if permanent(code_of(&e)) {
                NatsError::Config(format!("consumer `{name}`: {e}"))
            } else {
                NatsError::js("create consumer", e)
            }
        })?;
    let current = consumer.cached_info().config.clone();
    if current.priority_policy != config.priority_policy
        || current.priority_groups != config.priority_groups
    {
        let wanted = if config.priority_policy == PriorityPolicy::PinnedClient {
            "pinned"
        } else {
            "exclusive"
        };
        return Err(NatsError::Config(format!(
            "consumer `{name}` exists with another sharing than `{wanted}` (or the server is \
             older than 2.11 and has no priority groups): delete it (`nats consumer rm`) or \
             use another subscription name"
        )));
    }
    if current.ack_wait != config.ack_wait
        || current.max_ack_pending != config.max_ack_pending
        || current.priority_timeout != config.priority_timeout
    {
        // Only the changeable settings move; where it starts stays the server's.
        let update = pull::Config {
            deliver_policy: current.deliver_policy,
            ..config.clone()
        };
        return stream
            .update_consumer(update)
            .await
            .map_err(|e| NatsError::Config(format!("cannot update consumer `{name}`: {e}")));
    }
    Ok(consumer)
}

/// Starts a durable consumer over from its ack floor when it holds messages delivered and
/// not acknowledged: an earlier owner stopped (its naks carry a delay) or died (its messages
/// wait out the ack wait), and JetStream would deliver newer messages of the same keys to
/// the new owner before those. Made again at the first unacknowledged sequence, the consumer
/// delivers in stream order; messages acknowledged one by one above the floor come again, as
/// duplicates, which at-least-once processing and idempotent sinks absorb. Only for
/// exclusive sharing: a partition has one reader, so no live reader loses its consumer.
async fn restart_at_ack_floor(
    stream: &async_nats::jetstream::stream::Stream,
    mut consumer: async_nats::jetstream::consumer::Consumer<pull::Config>,
    config: &pull::Config,
) -> Result<async_nats::jetstream::consumer::Consumer<pull::Config>, NatsError> {
    let Some(name) = &config.durable_name else {
        return Ok(consumer);
    };
    let info = consumer
        .info()
        .await
        .map_err(|e| NatsError::js("consumer info", e))?
        .clone();
    if info.num_ack_pending == 0 {
        return Ok(consumer);
    }
    let start = info.ack_floor.stream_sequence + 1;
    tracing::info!(
        consumer = %name,
        unacked = info.num_ack_pending,
        start,
        "restarting the consumer at its first unacknowledged message, to keep per-key order"
    );
    stream
        .delete_consumer(name)
        .await
        .map_err(|e| NatsError::js("delete consumer", e))?;
    let config = pull::Config {
        deliver_policy: DeliverPolicy::ByStartSequence {
            start_sequence: start,
        },
        ..config.clone()
    };
    // Made again at once, and tried again while the server fails transiently: between the
    // delete and the create the consumer's position lives only here.
    let mut pause = Duration::from_millis(100);
    let mut tries = 0;
    loop {
        match open_consumer(stream, &config).await {
            Ok(consumer) => return Ok(consumer),
            Err(e) if tries < 20 && !matches!(e, NatsError::Config(_)) => {
                tracing::warn!(consumer = %name, start, error = %e, "making the consumer again failed; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
                tries += 1;
            }
            Err(e) => {
                tracing::error!(
                    consumer = %name,
                    start,
                    "the consumer was deleted to start over at sequence {start} and could not \
                     be made again: create it starting there before anything reads it"
                );
                return Err(e);
            }
        }
    }
}

/// Pulls one partition's consumer into the subscription's channel.
struct PartitionReader {
    client: async_nats::Client,
    stream: async_nats::jetstream::stream::Stream,
    subject: String,
    config: pull::Config,
    consumer: Option<async_nats::jetstream::consumer::Consumer<pull::Config>>,
    partition: Arc<str>,
    source: Arc<str>,
    options: Arc<SubscriptionOptions>,
    outstanding: Outstanding,
    tx: mpsc::UnboundedSender<Item>,
    /// The stream sequence of the last record read.
    last: u64,
    /// For a bounded read: the last sequence of the partition when the read began.
    target: Option<u64>,
}

impl PartitionReader {
    async fn run(mut self) {
        let mut failures = 0u32;
        loop {
            match self.pull().await {
                Ok(true) => {
                    let _ = self.tx.send(Item::End);
                    return;
                }
                Ok(false) => failures = 0,
                Err(e) if is_fatal(&e) => {
                    let _ = self.tx.send(Item::Failed(e));
                    return;
                }
                Err(e) => {
                    failures += 1;
                    metrics::counter!("floodway_nats_pull_errors_total").increment(1);
                    tracing::warn!(
                        partition = %self.partition, error = %e,
                        "pulling from JetStream failed; trying again"
                    );
                }
            }
            if self.tx.is_closed() {
                return;
            }
            // A short pause that grows while failures repeat (a server restarting).
            let pause = Duration::from_millis(100u64 << failures.min(5));
            tokio::time::sleep(pause).await;
        }
    }

    /// For a bounded read, the partition's last sequence now (`None`: it is empty).
    async fn last_sequence(&self) -> Result<Option<u64>, NatsError> {
        match self
            .stream
            .get_last_raw_message_by_subject(&self.subject)
            .await
        {
            Ok(message) => Ok(Some(message.sequence)),
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
            {
                Ok(None)
            }
            Err(e) => Err(NatsError::js("last message", e)),
        }
    }

    /// Pulls until the stream of messages ends; `Ok(true)` when a bounded read is complete.
    async fn pull(&mut self) -> Result<bool, NatsError> {
        if !self.options.follow && self.target.is_none() {
            match self.last_sequence().await? {
                Some(last) => self.target = Some(last),
                None => return Ok(true),
            }
        }
        let mut consumer = match self.consumer.take() {
            Some(c) => c,
            None => {
                if self.config.durable_name.is_some() || self.last > 0 {
                    // A consumer made again (ephemeral, or a durable one someone deleted) goes
                    // on where this reader stood, not from its first start (a start at the end
                    // would skip what was published meanwhile): at the first record it still
                    // holds unsettled, whose acks went to the old consumer and would be lost
                    // with this process, else after the last record read. What it holds comes
                    // again, as duplicates.
                    let held = self.outstanding.lock().ok().and_then(|o| {
                        o.as_ref()?
                            .iter()
                            .filter(|(_, p)| p.partition == self.partition)
                            .map(|(sequence, _)| *sequence)
                            .min()
                    });
                    let start = held.map_or(self.last + 1, |h| h.min(self.last + 1));
                    self.config.deliver_policy = DeliverPolicy::ByStartSequence {
                        start_sequence: start,
                    };
                }
                open_consumer(&self.stream, &self.config).await?
            }
        };
        if let Some(target) = self.target {
            let info = consumer
                .info()
                .await
                .map_err(|e| NatsError::js("consumer info", e))?;
            // Everything up to the target is acked (or, unacked, delivered nowhere else).
            let settled = info.ack_floor.stream_sequence >= target
                || (self.config.durable_name.is_none() && self.last >= target);
            if settled || (info.num_pending == 0 && info.num_ack_pending == 0) {
                return Ok(true);
            }
        }
        // Short pulls with idle heartbeats: a pull request lost with a server (a restart, a
        // cluster node going away) is noticed within seconds, not at its expiry.
        let mut expires = PULL_EXPIRES;
        let mut builder = consumer
            .stream()
            .max_messages_per_batch(self.options.fetch.max(1));
        if let Sharing::Pinned { ttl } = self.options.sharing {
            if !self.options.transient {
                // Pulls well inside the pin's time to live, or the pin is lost between them.
                expires = (ttl / 3).clamp(Duration::from_millis(500), PULL_EXPIRES);
                builder = builder.group(GROUP);
            }
        }
        let builder = builder.expires(expires).heartbeat(expires / 4);
        let mut messages = builder
            .messages()
            .await
            .map_err(|e| NatsError::js("pull", e))?;
        // Polled without pause: the channel is unbounded, so pulls (and a pin) keep flowing
        // while the processor is slow, and every message is registered as it arrives.
        while let Some(message) = messages.next().await {
            let message = match message {
                Ok(m) => m,
                Err(e) => {
                    use async_nats::jetstream::consumer::pull::MessagesErrorKind as K;
                    return Err(match e.kind() {
                        K::MissingHeartbeat => {
                            NatsError::js("pull", "missed heartbeats; pulling again")
                        }
                        K::ConsumerDeleted => NatsError::js("pull", "consumer deleted; recreating"),
                        _ => NatsError::js("pull", e),
                    });
                }
            };
            let info = message
                .info()
                .map_err(|e| NatsError::js("message info", e))?;
            let (sequence, delivered) = (
                info.stream_sequence,
                u32::try_from(info.delivered).unwrap_or(u32::MAX),
            );
            let past_until = self.options.until.is_some_and(|until| {
                let published = i64::try_from(info.published.unix_timestamp_nanos() / 1_000_000)
                    .unwrap_or(i64::MAX);
                published > until
            });
            let past_target = self.target.is_some_and(|t| sequence > t);
            if past_until || past_target {
                // Not ours to read: give it back at once for the next reader.
                if let (false, Some(reply)) = (self.options.transient, message.reply.clone()) {
                    send(&self.client, reply, AckKind::Nak(None)).await;
                }
                if past_until {
                    return Ok(true);
                }
                continue;
            }
            if !self.options.transient {
                let Some(reply) = message.reply.clone() else {
                    continue;
                };
                let registered = match self.outstanding.lock().ok().as_deref_mut() {
                    Some(Some(map)) => {
                        map.insert(
                            sequence,
                            Pending {
                                reply: reply.clone(),
                                partition: self.partition.clone(),
                                delivered,
                            },
                        );
                        true
                    }
                    _ => false,
                };
                if !registered {
                    // The subscription has closed: give it back with its delay.
                    let delay = self.options.nak_delay_for(delivered);
                    send(&self.client, reply, AckKind::Nak(Some(delay))).await;
                    return Ok(false);
                }
            }
            self.last = sequence;
            let record = Record::new(
                self.source.clone(),
                self.partition.clone(),
                sequence,
                message.message.payload.clone(),
            )
            .with_attempt(delivered.max(1));
            if self.tx.send(Item::Record(record)).is_err() {
                return Ok(false);
            }
            if self.target.is_some_and(|t| sequence >= t) {
                // A bounded read ends at the partition's last record as of its start;
                // records redelivered later (of an earlier, interrupted run) wait for the
                // next read.
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Errors that trying again does not fix.
fn is_fatal(error: &NatsError) -> bool {
    matches!(error, NatsError::Config(_))
}

impl Source for NatsReader {
    async fn next_batch(&mut self, max: usize) -> Result<Option<Vec<Record>>, SourceError> {
        if self.live == 0 && self.follow {
            // No partitions to read (an instance beyond the partition count, a fault
            // subject read elsewhere): idle until the processor stops.
            std::future::pending::<()>().await;
        }
        let mut batch = Vec::new();
        while self.live > 0 && batch.len() < max.max(1) {
            let item = if batch.is_empty() {
                match self.rx.recv().await {
                    Some(item) => item,
                    None => break,
                }
            } else {
                match self.rx.try_recv() {
                    Ok(item) => item,
                    Err(_) => break,
                }
            };
            match item {
                Item::Record(record) => batch.push(record),
                Item::End => self.live -= 1,
                Item::Failed(e) => {
                    return Err(SourceError {
                        source_name: self.source.clone(),
                        cause: Box::new(e),
                    })
                }
            }
        }
        if batch.is_empty() && self.live == 0 {
            return Ok(None);
        }
        Ok(Some(batch))
    }
}

impl Checkpointer for NatsCheckpointer {
    async fn commit(&mut self, _checkpoints: &[Checkpoint]) -> Result<(), CommitError> {
        // Acks are per record; a commit makes sure those settled so far have left.
        let (done, flushed) = oneshot::channel();
        if let Some(ops) = &self.ops {
            if ops.send(AckOp::Flush(done)).is_ok() {
                let _ = flushed.await;
            }
        }
        Ok(())
    }

    fn settle(&mut self, record: &Record, settlement: Settlement) {
        let op = match settlement {
            Settlement::Faulted => AckOp::Term(record.offset),
            _ => AckOp::Ack(record.offset),
        };
        if let Some(ops) = &self.ops {
            let _ = ops.send(op);
        }
    }
}

impl Drop for NatsCheckpointer {
    fn drop(&mut self) {
        self.ops.take();
    }
}

/// Sends acks, terms and in-progress acks; naks what is left when the subscription closes.
async fn acker(
    client: async_nats::Client,
    mut ops: mpsc::UnboundedReceiver<AckOp>,
    outstanding: Outstanding,
    options: Arc<SubscriptionOptions>,
    closed: watch::Sender<bool>,
) {
    let mut progress = tokio::time::interval(options.ack_wait / 3);
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    progress.tick().await;
    let take = |sequence: u64| -> Option<Subject> {
        outstanding
            .lock()
            .ok()?
            .as_mut()?
            .remove(&sequence)
            .map(|p| p.reply)
    };
    loop {
        tokio::select! {
            op = ops.recv() => match op {
                Some(AckOp::Ack(sequence)) => {
                    if let Some(reply) = take(sequence) {
                        send(&client, reply, AckKind::Ack).await;
                    }
                }
                Some(AckOp::Term(sequence)) => {
                    if let Some(reply) = take(sequence) {
                        send(&client, reply, AckKind::Term).await;
                    }
                }
                Some(AckOp::Flush(done)) => {
                    let _ = client.flush().await;
                    let _ = done.send(());
                }
                None => break,
            },
            _ = progress.tick() => {
                let replies: Vec<Subject> = match outstanding.lock().ok().as_deref() {
                    Some(Some(map)) => map.values().map(|p| p.reply.clone()).collect(),
                    _ => Vec::new(),
                };
                for reply in replies {
                    send(&client, reply, AckKind::Progress).await;
                }
            }
        }
    }
    // Closed: nak what the processor let go of. Records of a partition share one delay (the
    // one for the most delivered among them), so their order is kept when they come back.
    let left = outstanding
        .lock()
        .ok()
        .and_then(|mut o| o.take())
        .unwrap_or_default();
    let mut delivered: HashMap<Arc<str>, u32> = HashMap::new();
    for p in left.values() {
        let d = delivered.entry(p.partition.clone()).or_default();
        *d = (*d).max(p.delivered);
    }
    let mut left: Vec<(u64, Pending)> = left.into_iter().collect();
    left.sort_by_key(|(sequence, _)| *sequence);
    if !left.is_empty() {
        tracing::info!(
            records = left.len(),
            "returning unfinished records to JetStream"
        );
    }
    for (_, p) in left {
        let delay = options.nak_delay_for(delivered[&p.partition]);
        send(&client, p.reply, AckKind::Nak(Some(delay))).await;
    }
    let _ = client.flush().await;
    let _ = closed.send(true);
}

async fn send(client: &async_nats::Client, reply: Subject, kind: AckKind) {
    if let Err(e) = client.publish(reply, kind.into()).await {
        // The server redelivers after the ack wait; the sinks are idempotent.
        tracing::debug!(error = %e, "could not send an ack");
    }
}
