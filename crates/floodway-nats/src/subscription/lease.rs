//! Leases: which instance reads a partition of a subscription acking cumulatively.
//!
//! A cumulative ack covers every record before it, so such a partition must have one reader
//! at a time (`consumer::claim`). Looking at the consumer cannot decide between two instances
//! that start at the same moment: each finds no one reading and both read. So a reader first
//! takes the partition's lease, a key in the JetStream bucket `floodway_readers` made with
//! the server's compare-and-set (a create that fails when the key is there), which only one
//! instance wins. The bucket's `max_age` is the lease's time to live: a task of the holder's
//! subscription writes the key again every [`RENEW_EVERY`], and a key not written for [`LEASE_TTL`] (its
//! holder died, or lost the server) expires, and another instance takes it. The holder acks
//! only while its lease is valid by its own clock (from when it asked for the last renewal,
//! which the server applied later), and lets go of the partition when a renewal finds the key
//! another's. At close, once its last acks are sent, it deletes the key, so that the next
//! instance takes over without waiting for the expiry.
//!
//! The lease orders instances that keep it; the look at the consumer (`consumer::claim`)
//! stays behind it, for a holder whose lease ran out while it was frozen (it comes back still
//! pulling, and the next holder waits for it to stop) and for instances that take no lease.

use std::hash::BuildHasher;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bytes::Bytes;

use crate::error::NatsError;

/// The bucket of leases.
pub(super) const BUCKET: &str = "floodway_readers";

/// How long a lease lasts without being written again: the bucket's `max_age`.
pub(super) const LEASE_TTL: Duration = Duration::from_secs(6);

/// How often the holder writes its leases again.
pub(super) const RENEW_EVERY: Duration = Duration::from_secs(2);

/// How long before the server could let the lease go the holder stops acking: an ack handed
/// to the connection just before must reach the server before another holder can read.
const MARGIN: Duration = Duration::from_secs(1);

/// How often a reader without its partition's lease tries to take it.
pub(super) const LEASE_LOOK: Duration = Duration::from_secs(1);

/// A subscription's leases: the bucket, the subscription's keys, and who holds them here.
#[derive(Clone)]
pub(super) struct Leases {
    kv: kv::Store,
    /// `{stream}.{subscription}.`, escaped for a key.
    prefix: String,
    /// This subscription's own mark, written as the keys' value.
    holder: Bytes,
}

impl std::fmt::Debug for Leases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leases")
            .field("prefix", &self.prefix)
            .field("holder", &self.holder)
            .finish()
    }
}

/// A lease held.
#[derive(Debug, Clone)]
pub(super) struct Held {
    /// The key's revision as this holder last wrote it.
    pub(super) revision: u64,
    /// Until when this holder may ack: when it asked for that write, plus the time to live,
    /// less the margin.
    pub(super) valid_until: Instant,
}

impl Held {
    fn from(revision: u64, asked: Instant) -> Held {
        Held {
            revision,
            valid_until: asked + LEASE_TTL - MARGIN,
        }
    }

    /// Whether the holder may still ack.
    pub(super) fn valid(&self, now: Instant) -> bool {
        now < self.valid_until
    }
}

/// What a renewal found.
#[derive(Debug)]
pub(super) enum Renewal {
    /// Written again.
    Renewed(Held),
    /// The key is another's now (or gone): the partition is no longer this holder's.
    Lost,
    /// The server did not answer; the lease stands until it runs out.
    Failed(NatsError),
}

impl Leases {
    /// The bucket, made when missing (with the hub stream's replicas), and the keys of
    /// subscription `name` on stream `stream`.
    ///
    /// # Errors
    /// When the bucket can be neither found nor made (an account without the right to make
    /// streams: acks per record take no leases), or was made with another term or history
    /// than these (a key that never expires would keep a partition from every reader).
    pub(super) async fn open(
        js: &async_nats::jetstream::Context,
        stream: &str,
        name: &str,
        replicas: usize,
    ) -> Result<Leases, NatsError> {
        let kv = match js.get_key_value(BUCKET).await {
            Ok(kv) => kv,
            Err(_) => match js
                .create_key_value(kv::Config {
                    bucket: BUCKET.into(),
                    description: "Which Floodway instance reads each partition of a \
                                  subscription acking cumulatively"
                        .into(),
                    history: 1,
                    max_age: LEASE_TTL,
                    storage: async_nats::jetstream::stream::StorageType::File,
                    num_replicas: replicas.max(1),
                    ..Default::default()
                })
                .await
            {
                Ok(kv) => kv,
                // Another instance made it meanwhile.
                Err(made) => js.get_key_value(BUCKET).await.map_err(|e| {
                    NatsError::js(
                        "make the bucket of leases",
                        format!(
                            "cumulative acks keep a lease per partition in the bucket \
                             `{BUCKET}`, which could not be made ({made}) nor found ({e}): \
                             allow the account to make it, or ack per record (`acks = \
                             \"each\"`)"
                        ),
                    )
                })?,
            },
        };
        let status = kv
            .status()
            .await
            .map_err(|e| NatsError::js("read the bucket of leases", e))?;
        let config = &status.info.config;
        if config.max_age != LEASE_TTL || config.max_messages_per_subject != 1 {
            return Err(NatsError::Config(format!(
                "the bucket `{BUCKET}` keeps values for {:?} with a history of {}, where the \
                 leases of cumulative acks need {LEASE_TTL:?} and 1: delete it (`nats kv rm \
                 {BUCKET}`), and it is made again",
                config.max_age, config.max_messages_per_subject
            )));
        }
        let mark = std::collections::hash_map::RandomState::new().hash_one((
            std::process::id(),
            std::time::SystemTime::now(),
            name,
        ));
        Ok(Leases {
            kv,
            prefix: format!("{}.{}.", key_part(stream), key_part(name)),
            holder: Bytes::from(format!("{}-{mark:016x}", std::process::id())),
        })
    }

    /// The key of `partition`'s lease.
    pub(super) fn key(&self, partition: &str) -> String {
        format!("{}{}", self.prefix, key_part(partition))
    }

    /// Takes `partition`'s lease; `None` while another holds it.
    ///
    /// # Errors
    /// When the server does not answer.
    pub(super) async fn take(&self, partition: &str) -> Result<Option<Held>, NatsError> {
        let key = self.key(partition);
        let asked = Instant::now();
        match self.kv.create(&key, self.holder.clone()).await {
            Ok(revision) => Ok(Some(Held::from(revision, asked))),
            // This holder's own (a write whose answer was lost) is taken back.
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                match self.ours(&key).await? {
                    Some(revision) => match self.renew_from(&key, revision).await? {
                        Renewal::Renewed(held) => Ok(Some(held)),
                        _ => Ok(None),
                    },
                    None => Ok(None),
                }
            }
            Err(e) => Err(NatsError::js("take a lease", e)),
        }
    }

    /// Writes `partition`'s lease again.
    pub(super) async fn renew(&self, partition: &str, held: &Held) -> Renewal {
        let key = self.key(partition);
        match self.renew_from(&key, held.revision).await {
            Ok(renewal) => renewal,
            Err(e) => Renewal::Failed(e),
        }
    }

    /// Writes `key` again over `revision`, or over a later one of a write whose answer was
    /// lost (the value is still this holder's mark).
    async fn renew_from(&self, key: &str, mut revision: u64) -> Result<Renewal, NatsError> {
        let asked = Instant::now();
        for _ in 0..2 {
            match self.kv.update(key, self.holder.clone(), revision).await {
                Ok(revision) => return Ok(Renewal::Renewed(Held::from(revision, asked))),
                // Another's, or (the same revision read again) from a replica behind.
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    match self.ours(key).await? {
                        Some(later) if later != revision => revision = later,
                        _ => return Ok(Renewal::Lost),
                    }
                }
                Err(e) => return Err(NatsError::js("renew a lease", e)),
            }
        }
        Ok(Renewal::Lost)
    }

    /// Lets `partition`'s lease go (when it is still this holder's: at the revision it
    /// knows, or at a later one of a write whose answer was lost).
    pub(super) async fn release(&self, partition: &str, held: &Held) {
        let key = self.key(partition);
        let mut revision = held.revision;
        for _ in 0..2 {
            let Err(e) = self.kv.delete_expect_revision(&key, Some(revision)).await else {
                return;
            };
            match self.ours(&key).await {
                Ok(Some(later)) if later != revision => revision = later,
                _ => {
                    tracing::debug!(partition, error = %e, "letting a lease go failed; it runs out");
                    return;
                }
            }
        }
    }

    /// The revision of `key` when its value is this holder's mark.
    async fn ours(&self, key: &str) -> Result<Option<u64>, NatsError> {
        match self.kv.entry(key).await {
            Ok(Some(entry))
                if entry.operation == kv::Operation::Put && entry.value == self.holder =>
            {
                Ok(Some(entry.revision))
            }
            Ok(_) => Ok(None),
            Err(e) => Err(NatsError::js("read a lease", e)),
        }
    }
}

/// A name as part of a key: letters, digits, `-` and `_` as they are, any other byte as
/// `=` and its two hex digits (a key takes `[-/_=.a-zA-Z0-9]`, and `.` separates the parts).
fn key_part(name: &str) -> String {
    let mut part = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            part.push(char::from(byte));
        } else {
            part.push_str(&format!("={byte:02X}"));
        }
    }
    part
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_key_parts_that_cannot_meet() {
        assert_eq!(key_part("orders-view_2"), "orders-view_2");
        assert_eq!(key_part("a:b"), "a=3Ab");
        assert_eq!(key_part("a=3Ab"), "a=3D3Ab", "an `=` is escaped too");
        assert_eq!(key_part("é"), "=C3=A9");
    }
}
