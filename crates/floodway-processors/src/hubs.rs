//! The hub processors read and publish to (embedded or NATS JetStream), and the local store
//! of views and faults.

use std::task::{Context, Poll};
use std::time::Duration;

use floodway::error::{CommitError, SourceError};
use floodway::layer::BoxFuture;
use floodway::{Batch, Checkpoint, Checkpointer, Error, Event, Record, Settlement, Source};
use floodway_embedded::{
    Hub, HubPublisher, StartAt, SubscriptionCheckpointer, SubscriptionOptions, SubscriptionReader,
};
use floodway_nats::{
    NatsCheckpointer, NatsError, NatsHub, NatsHubOptions, NatsPublisher, NatsReader, Partitions,
    Sharing,
};

use crate::config::{HubConfig, NatsConfig, SharingConfig};

/// Where events are published and read.
#[derive(Debug, Clone)]
pub enum EventHub {
    /// The embedded SQLite hub.
    Embedded(Hub),
    /// A NATS JetStream stream, with how this process shares its partitions.
    Nats(NatsHub, NatsRead),
}

/// How this process reads a NATS hub.
#[derive(Debug, Clone)]
pub struct NatsRead {
    /// Partitions of this instance.
    pub partitions: Partitions,
    /// How instances share them.
    pub sharing: Sharing,
    /// Ack wait.
    pub ack_wait: Option<Duration>,
    /// Max ack pending per partition.
    pub max_ack_pending: Option<i64>,
    /// Whether this instance reads the fault subject (the first instance does; the others
    /// would scatter faults across their stores).
    pub reads_faults: bool,
}

/// The hubs processors work with: the event hub and the local store of views and faults
/// (the same file when the hub is embedded).
#[derive(Debug, Clone)]
pub struct Hubs {
    /// Where events are.
    pub events: EventHub,
    /// Where views and faults are stored.
    pub store: Hub,
}

impl Default for NatsRead {
    fn default() -> Self {
        NatsRead {
            partitions: Partitions::All,
            sharing: Sharing::Exclusive,
            ack_wait: None,
            max_ack_pending: None,
            reads_faults: true,
        }
    }
}

impl From<Hub> for Hubs {
    fn from(hub: Hub) -> Hubs {
        Hubs {
            events: EventHub::Embedded(hub.clone()),
            store: hub,
        }
    }
}

impl NatsConfig {
    /// The hub options these settings describe; `partitions` and the retention settings come
    /// from `[hub]` when this is the hub itself.
    ///
    /// # Errors
    /// A bad duration.
    pub fn hub_options(&self, hub: Option<&HubConfig>) -> Result<NatsHubOptions, String> {
        let parse = |what: &str, text: &str| {
            humantime::parse_duration(text).map_err(|e| format!("{what} `{text}`: {e}"))
        };
        let mut options = NatsHubOptions {
            servers: self.servers.clone(),
            stream: self.stream.clone(),
            subject: self.subject.clone(),
            partitions: self.partitions,
            replicas: self.replicas,
            duplicate_window: self
                .duplicate_window
                .as_deref()
                .map(|w| parse("duplicate_window", w))
                .transpose()?,
            ..NatsHubOptions::default()
        };
        if let Some(hub) = hub {
            options.partitions = options.partitions.or(hub.partitions);
            options.max_age = hub
                .retention_max_age
                .as_deref()
                .map(|a| parse("retention_max_age", a))
                .transpose()?;
            options.max_bytes = hub
                .retention_max_bytes
                .map(|b| i64::try_from(b).unwrap_or(i64::MAX));
        }
        Ok(options)
    }

    /// How this process reads the hub's partitions.
    ///
    /// # Errors
    /// A bad duration or instance.
    pub fn read(&self, partitions: u32) -> Result<NatsRead, String> {
        let parse = |what: &str, text: &str| {
            humantime::parse_duration(text).map_err(|e| format!("{what} `{text}`: {e}"))
        };
        let instance = self.instance()?;
        Ok(NatsRead {
            partitions: match instance {
                Some((i, n)) => Partitions::instance(i, n, partitions),
                None => Partitions::All,
            },
            reads_faults: instance.is_none_or(|(i, _)| i == 0),
            sharing: match self.sharing {
                SharingConfig::Exclusive => Sharing::Exclusive,
                SharingConfig::Pinned => Sharing::Pinned {
                    ttl: parse("pinned_ttl", &self.pinned_ttl)?,
                },
            },
            ack_wait: Some(parse("ack_wait", &self.ack_wait)?),
            max_ack_pending: Some(self.max_ack_pending),
        })
    }
}

impl EventHub {
    /// A sink and fault sink publishing into this hub (the event id as idempotency key).
    pub fn publisher(&self) -> Publisher {
        match self {
            EventHub::Embedded(hub) => Publisher::Embedded(hub.publisher()),
            EventHub::Nats(hub, _) => Publisher::Nats(hub.publisher()),
        }
    }

    /// A line naming the hub, for people.
    pub fn describe(&self) -> String {
        match self {
            EventHub::Embedded(hub) => hub.path().display().to_string(),
            EventHub::Nats(hub, _) => {
                format!("NATS stream {} at {}", hub.stream(), hub.servers())
            }
        }
    }

    /// The record at `offset` of `partition` as a fault names them (`None`: deleted by
    /// retention, or not a position of this hub). Used to resubmit faults that do not carry
    /// their record because their pipeline redacts fields.
    ///
    /// # Errors
    /// A hub failure.
    pub async fn record_at(
        &self,
        partition: &str,
        offset: u64,
    ) -> Result<Option<Vec<u8>>, Box<dyn std::error::Error + Send + Sync>> {
        match self {
            EventHub::Embedded(hub) => match partition.parse::<u32>() {
                Ok(p) => Ok(hub.record_at(p, offset)?),
                Err(_) => Ok(None),
            },
            EventHub::Nats(hub, _) => Ok(hub.record_at(offset).await?.map(|b| b.to_vec())),
        }
    }

    /// Opens the subscription `name`. On NATS, `faults` reads the fault subject instead of the
    /// partitions (the fault monitor). On the embedded hub, a subscription that another process
    /// holds is waited for (`[hub] lease_wait`), then refused with an error naming the holder.
    ///
    /// # Errors
    /// A hub failure.
    pub async fn subscribe(
        &self,
        name: &str,
        options: SubscriptionOptions,
        faults: bool,
    ) -> Result<AnySubscription, Box<dyn std::error::Error + Send + Sync>> {
        match self {
            EventHub::Embedded(hub) => {
                let (reader, checkpointer) = hub.subscribe_waiting(name, options).await?.split();
                Ok(AnySubscription {
                    reader: AnyReader::Embedded(reader),
                    checkpointer: AnyCheckpointer::Embedded(checkpointer),
                    closed: None,
                })
            }
            EventHub::Nats(hub, read) => {
                let defaults = floodway_nats::SubscriptionOptions::default();
                let nats = floodway_nats::SubscriptionOptions {
                    start: match options.start {
                        StartAt::End => floodway_nats::StartAt::End,
                        StartAt::Time(t) => floodway_nats::StartAt::Time(t),
                        _ => floodway_nats::StartAt::Beginning,
                    },
                    follow: options.follow,
                    until: options.until,
                    transient: options.transient,
                    partitions: match (faults, read.reads_faults) {
                        (true, true) => Partitions::Faults,
                        // The fault monitor of instance 0 stores them all.
                        (true, false) => Partitions::Only(Vec::new()),
                        (false, _) => read.partitions.clone(),
                    },
                    sharing: read.sharing,
                    ack_wait: read.ack_wait.unwrap_or(defaults.ack_wait),
                    max_ack_pending: read.max_ack_pending.unwrap_or(defaults.max_ack_pending),
                    ..defaults
                };
                let sub = hub.subscribe(name, nats).await?;
                let closed = Box::pin(sub.closed());
                let (reader, checkpointer) = sub.split();
                Ok(AnySubscription {
                    reader: AnyReader::Nats(reader),
                    checkpointer: AnyCheckpointer::Nats(checkpointer),
                    closed: Some(closed),
                })
            }
        }
    }
}

impl Hubs {
    /// Opens the hubs a `[hub]` table describes: the SQLite file (created if missing), and
    /// the NATS stream when `[hub.nats]` is there.
    ///
    /// # Errors
    /// A file or server that cannot be opened, or a stream that does not fit.
    pub async fn open(config: &HubConfig) -> Result<Hubs, HubsError> {
        Self::open_with(config, config.nats.is_some()).await
    }

    /// As [`open`](Self::open); `external_acks` says that what the processors do against the
    /// file is acknowledged elsewhere (a JetStream ack, a Lambda response), so the file's
    /// views, inbox and faults commit synced ([`floodway_embedded::HubOptions::external_acks`]).
    ///
    /// # Errors
    /// A file or server that cannot be opened, or a stream that does not fit.
    pub async fn open_with(config: &HubConfig, external_acks: bool) -> Result<Hubs, HubsError> {
        let (lease, lease_wait) = config.leases().map_err(HubsError::Config)?;
        let options = floodway_embedded::HubOptions {
            lease,
            lease_wait,
            // On NATS this file keeps views and faults only, and records are acked to the
            // server: what precedes an ack is synced.
            external_acks,
            partitions: config.partitions,
            durability: match config.durability {
                crate::config::DurabilityConfig::Immediate => {
                    floodway_embedded::Durability::Immediate
                }
                crate::config::DurabilityConfig::Relaxed => floodway_embedded::Durability::Relaxed,
            },
            ..floodway_embedded::HubOptions::default()
        };
        let store = Hub::open(&config.path, options)?;
        let events = match &config.nats {
            None => EventHub::Embedded(store.clone()),
            Some(nats) => {
                let options = nats.hub_options(Some(config)).map_err(HubsError::Config)?;
                let hub = NatsHub::connect(&options).await?;
                let read = nats.read(hub.partitions()).map_err(HubsError::Config)?;
                EventHub::Nats(hub, read)
            }
        };
        Ok(Hubs { events, store })
    }
}

/// The hubs could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubsError {
    /// The SQLite file.
    #[error(transparent)]
    Open(#[from] floodway_embedded::OpenError),
    /// The NATS server or stream.
    #[error(transparent)]
    Nats(#[from] NatsError),
    /// A bad setting.
    #[error("{0}")]
    Config(String),
}

/// A subscription of either hub.
pub struct AnySubscription {
    /// The records.
    pub reader: AnyReader,
    /// Their settlements and checkpoints.
    pub checkpointer: AnyCheckpointer,
    /// Resolves when a NATS subscription has returned what is unfinished.
    pub closed: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
}

impl std::fmt::Debug for AnySubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnySubscription")
            .field("reader", &self.reader)
            .finish_non_exhaustive()
    }
}

/// The reading half of either hub's subscription.
#[derive(Debug)]
pub enum AnyReader {
    /// Embedded.
    Embedded(SubscriptionReader),
    /// NATS.
    Nats(NatsReader),
}

impl Source for AnyReader {
    async fn next_batch(&mut self, max: usize) -> Result<Option<Vec<Record>>, SourceError> {
        match self {
            AnyReader::Embedded(r) => r.next_batch(max).await,
            AnyReader::Nats(r) => r.next_batch(max).await,
        }
    }
}

/// The checkpointing half of either hub's subscription.
#[derive(Debug)]
pub enum AnyCheckpointer {
    /// Embedded: checkpoints per partition.
    Embedded(SubscriptionCheckpointer),
    /// NATS: acks per record.
    Nats(NatsCheckpointer),
}

impl Checkpointer for AnyCheckpointer {
    async fn commit(&mut self, checkpoints: &[Checkpoint]) -> Result<(), CommitError> {
        match self {
            AnyCheckpointer::Embedded(c) => c.commit(checkpoints).await,
            AnyCheckpointer::Nats(c) => c.commit(checkpoints).await,
        }
    }

    fn settle(&mut self, record: &Record, settlement: Settlement) {
        match self {
            AnyCheckpointer::Embedded(c) => c.settle(record, settlement),
            AnyCheckpointer::Nats(c) => c.settle(record, settlement),
        }
    }
}

/// A publisher into either hub: a sink of batches and a fault sink.
#[derive(Debug, Clone)]
pub enum Publisher {
    /// Embedded.
    Embedded(HubPublisher),
    /// NATS.
    Nats(NatsPublisher),
}

impl tower::Service<Batch> for Publisher {
    type Response = ();
    type Error = Error;
    type Future = BoxFuture<()>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        match self {
            Publisher::Embedded(p) => tower::Service::<Batch>::poll_ready(p, cx),
            Publisher::Nats(p) => tower::Service::<Batch>::poll_ready(p, cx),
        }
    }

    fn call(&mut self, batch: Batch) -> Self::Future {
        match self {
            Publisher::Embedded(p) => p.call(batch),
            Publisher::Nats(p) => p.call(batch),
        }
    }
}

impl tower::Service<Event> for Publisher {
    type Response = ();
    type Error = Error;
    type Future = BoxFuture<()>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        match self {
            Publisher::Embedded(p) => tower::Service::<Event>::poll_ready(p, cx),
            Publisher::Nats(p) => tower::Service::<Event>::poll_ready(p, cx),
        }
    }

    fn call(&mut self, event: Event) -> Self::Future {
        match self {
            Publisher::Embedded(p) => p.call(event),
            Publisher::Nats(p) => p.call(event),
        }
    }
}
