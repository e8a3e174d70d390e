//! The durable consumers of a subscription: their configuration, creation or update, and a
//! restart at the ack floor.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PriorityPolicy};

use super::options::{Sharing, StartAt, SubscriptionOptions, GROUP};
use crate::error::NatsError;

pub(super) fn consumer_config(
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
        config.ack_policy = if options.acks.cumulative(options.sharing) {
            AckPolicy::All
        } else {
            AckPolicy::Explicit
        };
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

/// Whether a consumer takes cumulative acks.
pub(super) fn cumulative(
    consumer: &async_nats::jetstream::consumer::Consumer<pull::Config>,
) -> bool {
    consumer.cached_info().config.ack_policy == AckPolicy::All
}

/// The JetStream error code of a consumer request's failure, when the server gave one.
pub(super) fn code_of(error: &async_nats::jetstream::stream::ConsumerError) -> Option<u64> {
    match error.kind() {
        async_nats::jetstream::stream::ConsumerErrorKind::JetStream(e) => Some(e.error_code().0),
        _ => None,
    }
}

/// Errors that trying again does not fix: the stream is gone, or the server refuses the
/// settings (its answers of HTTP class 400 about a consumer's configuration, listed one by
/// one). Its 500s (10012 and 10104, a consumer's store failing; 10096, 10119, 10194 and
/// 10195, a stream or consumer offline or not valid for now) and the races of instances
/// making one consumer (10148 already exists, 10149 does not exist) are tried again.
pub(super) fn permanent(code: Option<u64>) -> bool {
    // 10059 stream not found; 10013 name in use; 10026 maximum consumers reached; 10082 to
    // 10095, 10098 to 10103, 10105 to 10108 and 10112 to 10116 settings refused; 10121 max
    // ack pending over the server's limit; 10125 max request batch over its limit; 10126
    // replicas; 10127 name with path separators; 10131 to 10139 filters; 10153 inactive
    // threshold over the limit; 10159 to 10162, 10178, 10196 and 10197 priority groups and
    // policies; 10181 to 10184 ack, replay and backoff settings.
    matches!(
        code,
        Some(
            10013
            | 10026
            | 10059
            | 10082..=10095
            | 10098..=10103
            | 10105..=10108
            | 10112..=10116
            | 10121
            | 10125..=10127
            | 10131..=10139
            | 10153
            | 10159..=10162
            | 10178
            | 10181..=10184
            | 10196
            | 10197,
        )
    )
}

/// Finds a durable consumer as it is, or creates it from `config` when it is missing: a look
/// at one another reader may hold, whose settings are not touched.
pub(super) async fn find_consumer(
    stream: &async_nats::jetstream::stream::Stream,
    config: &pull::Config,
) -> Result<async_nats::jetstream::consumer::Consumer<pull::Config>, NatsError> {
    let name = config.durable_name.clone().unwrap_or_default();
    stream
        .get_or_create_consumer(&name, config.clone())
        .await
        .map_err(|e| {
            if permanent(code_of(&e)) {
                NatsError::Config(format!("consumer `{name}`: {e}"))
            } else {
                NatsError::js("create consumer", e)
            }
        })
}

/// Creates a consumer, or finds a durable one and brings its changeable settings (ack wait,
/// max ack pending) in line; a setting it cannot change is a configuration error.
pub(super) async fn open_consumer(
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
    let consumer = find_consumer(stream, config).await?;
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
    if current.ack_policy != config.ack_policy
        && config.priority_policy == PriorityPolicy::PinnedClient
    {
        // Exclusive sharing makes such a consumer again (`restart_at_ack_floor`); instances
        // sharing a pinned one cannot.
        return Err(NatsError::Config(format!(
            "consumer `{name}` exists with another ack policy ({:?}) than the settings' \
             ({:?}): delete it (`nats consumer rm`) or use another subscription name",
            current.ack_policy, config.ack_policy
        )));
    }
    if current.ack_wait != config.ack_wait
        || current.max_ack_pending != config.max_ack_pending
        || current.priority_timeout != config.priority_timeout
    {
        // Only the changeable settings move; where it starts and how it is acked stay the
        // server's (an exclusive consumer with another ack policy is made again by
        // `restart_at_ack_floor`).
        let update = pull::Config {
            deliver_policy: current.deliver_policy,
            ack_policy: current.ack_policy,
            ..config.clone()
        };
        // A setting refused is a configuration error; a timeout or an answer lost (a
        // leader election) is tried again like any other.
        return stream.update_consumer(update).await.map_err(|e| {
            use async_nats::jetstream::stream::ConsumerUpdateErrorKind as Kind;
            let code = match e.kind() {
                Kind::JetStream(js) => Some(js.error_code().0),
                _ => None,
            };
            if permanent(code) || matches!(e.kind(), Kind::InvalidConsumerType | Kind::InvalidName)
            {
                NatsError::Config(format!("cannot update consumer `{name}`: {e}"))
            } else {
                NatsError::js("update consumer", e)
            }
        });
    }
    Ok(consumer)
}

/// What a subscription does with a partition's consumer once it is open.
#[derive(Debug)]
pub(super) enum Opened {
    /// Read it.
    Ready(Box<async_nats::jetstream::consumer::Consumer<pull::Config>>),
    /// Leave it to the reader to take, once no one else reads it ([`claim`]): acks are or would
    /// be cumulative, and another reader may hold it. `floor` is where its acks stand.
    Claim {
        /// The stream sequence of its ack floor.
        floor: u64,
    },
}

/// Starts a durable consumer over from its ack floor when it holds messages delivered and
/// not acknowledged: an earlier owner stopped (its naks carry a delay) or died (its messages
/// wait out the ack wait), and JetStream would deliver newer messages of the same keys to
/// the new owner before those. Made again at the first unacknowledged sequence, the consumer
/// delivers in stream order; messages a consumer acked per record above its floor come again,
/// as duplicates, which at-least-once processing and idempotent sinks absorb. Only for
/// exclusive sharing, and only when no live reader pulls from the consumer
/// ([`read_elsewhere`]): with per-record acks two instances given the same partitions share
/// it instead. Where acks are or would be cumulative (the settings', or the consumer's as it
/// stands), the reader takes it ([`Opened::Claim`]) unless it is free to read as it is.
///
/// A consumer whose ack policy is not the settings' (acks switched between each and
/// cumulative) is made again the same way, since JetStream cannot change it in place.
pub(super) async fn restart_at_ack_floor(
    stream: &async_nats::jetstream::stream::Stream,
    mut consumer: async_nats::jetstream::consumer::Consumer<pull::Config>,
    config: &pull::Config,
) -> Result<Opened, NatsError> {
    let Some(name) = &config.durable_name else {
        return Ok(Opened::Ready(Box::new(consumer)));
    };
    let info = consumer
        .info()
        .await
        .map_err(|e| NatsError::js("consumer info", e))?
        .clone();
    if config.ack_policy == AckPolicy::All || info.config.ack_policy == AckPolicy::All {
        return Ok(match judge(&mut consumer, &info, config).await? {
            Claim::Free { .. } => Opened::Ready(Box::new(consumer)),
            Claim::Remake { .. } | Claim::Held => Opened::Claim {
                floor: info.ack_floor.stream_sequence,
            },
        });
    }
    let policy_changes = info.config.ack_policy != config.ack_policy;
    if info.num_ack_pending == 0 && !policy_changes {
        return Ok(Opened::Ready(Box::new(consumer)));
    }
    if !policy_changes && read_elsewhere(&mut consumer, &info).await? {
        // Its unacknowledged messages are another live reader's (two instances given the
        // same partitions): starting the consumer over would take it from under that
        // reader and deliver what it holds a second time.
        tracing::info!(
            consumer = %name,
            unacked = info.num_ack_pending,
            "another reader is pulling from the consumer; not starting it over"
        );
        return Ok(Opened::Ready(Box::new(consumer)));
    }
    let start = if info.num_ack_pending == 0 {
        // Nothing held: it goes on where it would have delivered next.
        info.delivered.stream_sequence + 1
    } else {
        info.ack_floor.stream_sequence + 1
    };
    tracing::info!(
        consumer = %name,
        unacked = info.num_ack_pending,
        start,
        "{}",
        if policy_changes {
            "making the consumer again with the ack policy of the settings"
        } else {
            "restarting the consumer at its first unacknowledged message, to keep per-key order"
        }
    );
    Ok(Opened::Ready(Box::new(
        remake(stream, name, start, config).await?,
    )))
}

/// What a reader acking cumulatively may do with a durable consumer it did not make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Claim {
    /// Read it as it is: no one pulls from it, and nothing it delivered is unacknowledged.
    Free {
        /// The consumer sequence of its last delivery, as judged.
        delivered: u64,
    },
    /// Make it again from `start`: its ack floor + 1 when a reader that is gone left
    /// `pending` messages unacknowledged (they come again, in order), or where it would have
    /// delivered next when only its ack policy is not the settings'.
    Remake {
        /// The stream sequence it starts at.
        start: u64,
        /// Its messages delivered and not acknowledged.
        pending: usize,
    },
    /// Another live reader pulls from it: look again later.
    Held,
}

/// Whether this reader may take a durable consumer where acks are or would be cumulative
/// (the settings' ack policy or the consumer's is `all`). One reader's cumulative ack covers
/// every record before it, so a partition must have one reader at a time: an ack of a reader
/// that took a consumer another was reading would cover what the other still holds, and that
/// other's crash would lose it. So a reader takes a consumer only when no one pulls from it
/// ([`read_elsewhere`]; a live reader always has a request waiting, as it polls without
/// pause), and one that holds unacknowledged messages (its reader gone), or is acked another
/// way, only by making it again (at its ack floor + 1), so that this reader is delivered all
/// of them and its acks cover only what it settled itself. The caller makes it again only
/// once it has found no one there for a while ([`TAKEOVER_ABSENCE`]).
pub(super) async fn claim(
    consumer: &mut async_nats::jetstream::consumer::Consumer<pull::Config>,
    config: &pull::Config,
) -> Result<Claim, NatsError> {
    let info = consumer
        .info()
        .await
        .map_err(|e| NatsError::js("consumer info", e))?
        .clone();
    judge(consumer, &info, config).await
}

/// [`claim`], from a look already taken.
async fn judge(
    consumer: &mut async_nats::jetstream::consumer::Consumer<pull::Config>,
    info: &async_nats::jetstream::consumer::Info,
    config: &pull::Config,
) -> Result<Claim, NatsError> {
    let held = if info.num_ack_pending > 0 {
        read_elsewhere(consumer, info).await?
    } else {
        info.num_waiting > 0
    };
    if held {
        return Ok(Claim::Held);
    }
    let policy_changes = info.config.ack_policy != config.ack_policy;
    if info.num_ack_pending == 0 && !policy_changes {
        return Ok(Claim::Free {
            delivered: info.delivered.consumer_sequence,
        });
    }
    let start = if info.num_ack_pending == 0 {
        info.delivered.stream_sequence + 1
    } else {
        info.ack_floor.stream_sequence + 1
    };
    Ok(Claim::Remake {
        start,
        pending: info.num_ack_pending,
    })
}

/// How long a consumer must be found with no one reading it, look after look, before a reader
/// makes it again to take it over: longer than a live reader goes without a pull request
/// waiting at the server (its pause after a failed pull, at most 3.2 s, is covered by its own
/// pause of acks; two missed heartbeats, 2.5 s, after a request lost with a server).
pub(super) const TAKEOVER_ABSENCE: Duration = Duration::from_secs(3);

/// Whether a live reader pulls from the consumer: it has pull requests waiting at the server,
/// or, looked at again after a moment (a busy reader can have none waiting while it works
/// through what it got), it had some then, or delivered or acked meanwhile. A reader that
/// stopped, or whose process died, has none waiting once the server sees its connection
/// close (a host that vanished keeps its requests counted until they expire).
async fn read_elsewhere(
    consumer: &mut async_nats::jetstream::consumer::Consumer<pull::Config>,
    first: &async_nats::jetstream::consumer::Info,
) -> Result<bool, NatsError> {
    if first.num_waiting > 0 {
        return Ok(true);
    }
    tokio::time::sleep(LIVE_READER_LOOK).await;
    let again = consumer
        .info()
        .await
        .map_err(|e| NatsError::js("consumer info", e))?;
    Ok(again.num_waiting > 0
        || again.delivered.consumer_sequence != first.delivered.consumer_sequence
        || again.ack_floor.consumer_sequence != first.ack_floor.consumer_sequence
        || again.num_ack_pending != first.num_ack_pending)
}

/// How long after the first look at a consumer holding unacknowledged messages the second
/// is taken, to tell a live reader from one that is gone.
const LIVE_READER_LOOK: Duration = Duration::from_millis(150);

/// Deletes the consumer (if it is there) and makes it again, delivering from `start`.
///
/// In a task of its own: between the delete and the create the consumer's position lives only
/// here, and a caller dropped meanwhile (a subscription given up at a shutdown) must not cut
/// that short, or the next start would make the consumer from the settings' start.
pub(super) async fn remake(
    stream: &async_nats::jetstream::stream::Stream,
    name: &str,
    start: u64,
    config: &pull::Config,
) -> Result<async_nats::jetstream::consumer::Consumer<pull::Config>, NatsError> {
    let (stream, name, config) = (stream.clone(), name.to_owned(), config.clone());
    tokio::spawn(async move { remake_now(&stream, &name, start, &config).await })
        .await
        .map_err(|e| NatsError::js("make the consumer again", e))?
}

/// [`remake`], in the caller's task.
async fn remake_now(
    stream: &async_nats::jetstream::stream::Stream,
    name: &str,
    start: u64,
    config: &pull::Config,
) -> Result<async_nats::jetstream::consumer::Consumer<pull::Config>, NatsError> {
    // A delete whose answer is lost may have been done: asked again until the answer says
    // done or not found (10014), so that the create below does not wait on a consumer that
    // is there, nor is skipped for one that is gone.
    let mut pause = Duration::from_millis(100);
    for tries in 0.. {
        match stream.delete_consumer(name).await {
            Ok(_) => break,
            Err(e) if code_of(&e) == Some(10014) => break,
            Err(e) if tries < 20 => {
                tracing::warn!(consumer = %name, error = %e, "deleting the consumer to start it over failed; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(NatsError::js("delete consumer", e)),
        }
    }
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
            // A configuration error too: the consumer is gone, and its position with it, if
            // it is not made again (a cluster's passing refusals can look like settings).
            Err(e) if tries < 20 => {
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
