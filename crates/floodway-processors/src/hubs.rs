//! The hub processors read and publish to (embedded or NATS JetStream), and the local store
//! of views and faults.

use std::sync::Arc;

use floodway::hub::SharedHub;
use floodway_embedded::Hub;
use floodway_nats::{
    Acks, InstanceReads, NatsError, NatsEventHub, NatsHub, NatsHubOptions, Partitions, Sharing,
};

use crate::config::{AcksConfig, HubConfig, HumanDuration, NatsConfig, SharingConfig};

/// The hubs processors work with: the event hub (any backend) and the local store of views
/// and faults (the same file when the hub is embedded).
#[derive(Debug, Clone)]
pub struct Hubs {
    /// Where events are.
    pub events: SharedHub,
    /// Where views and faults are stored.
    pub store: Hub,
    /// The data keys of envelope encryption, when `[encryption]` gives them.
    pub keys: Option<Arc<dyn floodway::encryption::KeyProvider>>,
    /// How many records a subscription of `events` may hold unacknowledged at most, when the
    /// hub bounds them (NATS: `max_ack_pending` per partition, times the partitions this
    /// instance reads); `None` on the embedded hub, where only a processor's own in-flight
    /// bound applies.
    pub unacked: Option<usize>,
}

impl From<Hub> for Hubs {
    fn from(hub: Hub) -> Hubs {
        Hubs {
            events: Arc::new(hub.clone()),
            store: hub,
            keys: None,
            unacked: None,
        }
    }
}

impl NatsConfig {
    /// The hub options these settings describe; `partitions` and the retention settings come
    /// from `[hub]` when this is the hub itself.
    pub fn hub_options(&self, hub: Option<&HubConfig>) -> NatsHubOptions {
        let mut options = NatsHubOptions {
            servers: self.servers.clone(),
            stream: self.stream.clone(),
            subject: self.subject.clone(),
            partitions: self.partitions,
            replicas: self.replicas,
            duplicate_window: self.duplicate_window.map(HumanDuration::get),
            fast_ingest: self.fast_ingest,
            ..NatsHubOptions::default()
        };
        if let Some(hub) = hub {
            options.partitions = options.partitions.or(hub.partitions);
            options.max_age = hub.retention_max_age.map(HumanDuration::get);
            options.max_bytes = hub
                .retention_max_bytes
                .map(|b| i64::try_from(b).unwrap_or(i64::MAX));
        }
        options
    }

    /// How this process reads the hub's `partitions`.
    pub fn read(&self, partitions: u32) -> InstanceReads {
        InstanceReads {
            partitions: match self.instance {
                Some(i) => Partitions::instance(i.index, i.count, partitions),
                None => Partitions::All,
            },
            reads_faults: self.instance.is_none_or(|i| i.index == 0),
            sharing: match self.sharing {
                SharingConfig::Exclusive => Sharing::Exclusive,
                SharingConfig::Pinned => Sharing::Pinned {
                    ttl: self.pinned_ttl.get(),
                },
            },
            acks: match self.acks {
                AcksConfig::Auto => Acks::Auto,
                AcksConfig::Each => Acks::Each,
                AcksConfig::Cumulative => Acks::Cumulative,
            },
            ack_wait: Some(self.ack_wait.get()),
            max_ack_pending: Some(self.max_ack_pending),
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

    /// Opens the hubs of a configuration file: its `[hub]` as [`open`](Self::open) does,
    /// and the keys of its `[encryption]`.
    ///
    /// # Errors
    /// As [`open`](Self::open), or a key file that cannot be read.
    pub async fn for_config(config: &crate::config::Config) -> Result<Hubs, HubsError> {
        let mut hubs = Self::open(&config.hub).await?;
        hubs.keys = Self::keys(config)?;
        Ok(hubs)
    }

    /// The keys `[encryption]` names, if any.
    ///
    /// # Errors
    /// A key file that cannot be read or holds no key.
    pub fn keys(
        config: &crate::config::Config,
    ) -> Result<Option<Arc<dyn floodway::encryption::KeyProvider>>, HubsError> {
        let Some(encryption) = &config.encryption else {
            return Ok(None);
        };
        let keys = floodway::encryption::KeyFile::open(&encryption.key_file)
            .map_err(|e| HubsError::Config(format!("[encryption] key_file: {e}")))?;
        Ok(Some(Arc::new(keys)))
    }

    /// As [`open`](Self::open); `external_acks` says that what the processors do against the
    /// file is acknowledged elsewhere (a JetStream ack, a Lambda response), so the file's
    /// views, row tables and faults commit synced ([`floodway_embedded::HubOptions::external_acks`]).
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
        let (events, unacked): (SharedHub, _) = match &config.nats {
            None => (Arc::new(store.clone()), None),
            Some(nats) => {
                let hub = NatsHub::connect(&nats.hub_options(Some(config))).await?;
                let reads = nats.read(hub.partitions());
                // Over the partitions this instance reads.
                let read = match &reads.partitions {
                    floodway_nats::Partitions::Only(share) => share.len(),
                    _ => hub.partitions() as usize,
                };
                let unacked = usize::try_from(nats.max_ack_pending)
                    .unwrap_or(0)
                    .saturating_mul(read);
                (Arc::new(NatsEventHub::new(hub, reads)), Some(unacked))
            }
        };
        Ok(Hubs {
            events,
            store,
            keys: None,
            unacked,
        })
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
