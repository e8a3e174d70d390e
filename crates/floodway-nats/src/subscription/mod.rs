//! Subscriptions: one durable pull consumer per partition, acknowledged per record.
//!
//! A subscription named `orders-view` reading partitions 0..8 owns the consumers
//! `orders-view_0` .. `orders-view_7`, each filtered on its partition's subject. A task per
//! partition pulls from its consumer and hands records to the processor through one bounded
//! channel, so a slow processor stops the pulls (and the server stops at `max_ack_pending`).
//!
//! Acknowledgement follows the core's settlements ([`Checkpointer::settle`](floodway::Checkpointer::settle)): a record every
//! pipeline is done with is acked; a record whose fault event is stored is terminated (`+TERM`),
//! so JetStream never redelivers a poison event. While records are in the processor (retrying
//! in place, or held by an open breaker), in-progress acks (`+WPI`) keep JetStream from
//! redelivering them. Records the processor lets go of unfinished (it stopped: drained,
//! timed out, or failed) are nak'd with a delay that grows with their delivery count, never
//! an immediate nak that would burn `max_deliver` in milliseconds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Subject;
use floodway::Record;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::error::NatsError;
use crate::hub::{check_name, NatsHub};

mod acks;
mod consumer;
mod options;
mod reader;

use acks::acker;
use consumer::{consumer_config, open_consumer, restart_at_ack_floor};
pub use options::{Partitions, Sharing, StartAt, SubscriptionOptions};
use reader::PartitionReader;

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
