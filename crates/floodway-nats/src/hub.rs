//! The hub on JetStream: one stream, partitioned subjects, idempotent publishing.
//!
//! Events are published to `{subject}.{partition}`, the partition chosen from `partitionKey`
//! with the same hash as the embedded hub ([`floodway::event::partition_for`]), so a key lands
//! in the same partition number on both. Fault events go to `{subject}.faults`. The stream
//! holds `{subject}.*` and remembers its partition count in its metadata, so every client
//! agrees on it.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::{ConnectOptions, HeaderMap};
use bytes::Bytes;
use floodway::event::{key_hash, partition_for, partition_of_hash, KeyHashMap};
use floodway::Event;
use futures_util::StreamExt;

use crate::error::NatsError;

/// Metadata key holding a stream's partition count.
const PARTITIONS_KEY: &str = "floodway.partitions";
/// Partitions of a new stream when the settings do not say.
pub const DEFAULT_PARTITIONS: u32 = floodway::hub::DEFAULT_PARTITIONS;

/// How to reach the server and what the stream looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsHubOptions {
    /// Server URLs (`nats://127.0.0.1:4222`); several for a cluster.
    pub servers: Vec<String>,
    /// The JetStream stream's name.
    pub stream: String,
    /// The subject prefix: events on `{subject}.{partition}`, faults on `{subject}.faults`.
    pub subject: String,
    /// Partitions of a new stream (default 8); must match an existing one when given.
    pub partitions: Option<u32>,
    /// Replicas of the stream (1, or 3 on a cluster). For this and the limits below, `None`
    /// leaves an existing stream as it is (a new one gets 1 replica, no limits, a 2 minute
    /// duplicate window); a value given updates an existing stream to it.
    pub replicas: Option<usize>,
    /// Delete events older than this.
    pub max_age: Option<Duration>,
    /// Delete the oldest events beyond this many bytes in the stream.
    pub max_bytes: Option<i64>,
    /// A publish repeating an event id within this window is stored once.
    pub duplicate_window: Option<Duration>,
    /// Keep the stream in memory instead of files (tests).
    pub memory: bool,
    /// How long a request (publish ack, stream info) may take (default 10 s).
    pub request_timeout: Duration,
    /// Let sinks publish in JetStream's fast-ingest batches (default on): one ack a batch
    /// instead of one a message, on servers 2.14 or newer, which then get `allow_batched` set
    /// on the stream. Such a stream needs 2.14 or newer on every server that holds it (the
    /// server marks it so): no going back to an older server. Off, or on an older server,
    /// every publish is acked message by message, and the stream is left as it is.
    pub fast_ingest: bool,
}

impl Default for NatsHubOptions {
    fn default() -> Self {
        NatsHubOptions {
            servers: vec!["nats://127.0.0.1:4222".into()],
            stream: "FLOODWAY".into(),
            subject: "floodway".into(),
            partitions: None,
            replicas: None,
            max_age: None,
            max_bytes: None,
            duplicate_window: None,
            memory: false,
            request_timeout: Duration::from_secs(10),
            fast_ingest: true,
        }
    }
}

/// What a publish stored: the contract's receipt.
pub use floodway::hub::PublishReceipt;

/// A connection to the JetStream hub. Cheap to clone.
#[derive(Debug, Clone)]
pub struct NatsHub {
    pub(crate) inner: std::sync::Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) stream: String,
    pub(crate) subject: String,
    pub(crate) partitions: u32,
    /// Whether the stream takes message schedules (NATS 2.12 or newer).
    pub(crate) schedules: bool,
    /// The most a message may be, headers and payload: the server's `max_payload`, or the
    /// stream's own `max_msg_size` when lower (as it was at connect).
    pub(crate) max_message: std::sync::atomic::AtomicUsize,
    pub(crate) servers: String,
    /// `{subject}.{partition}`, built once.
    pub(crate) partition_subjects: Vec<async_nats::Subject>,
    /// `{subject}.faults`.
    pub(crate) fault_subject: async_nats::Subject,
    /// Whether sinks publish in fast-ingest batches (`fast_ingest.rs`): the settings ask for
    /// it and the stream takes them; cleared when the server says it no longer does.
    pub(crate) fast_ingest: std::sync::atomic::AtomicBool,
    /// How long a publish may wait for its ack.
    pub(crate) request_timeout: Duration,
}

/// A name usable as a stream, consumer or subject token.
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), NatsError> {
    let bad = name.is_empty()
        || name
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'));
    if bad {
        return Err(NatsError::Config(format!(
            "{what} `{name}` cannot be used on NATS: use letters, digits, `-` and `_`"
        )));
    }
    Ok(())
}

impl NatsHub {
    /// Connects and creates the stream, or checks that the existing one fits: the same subjects
    /// and partition count. Replicas, limits and the duplicate window of an existing stream are
    /// updated to the options'.
    ///
    /// # Errors
    /// An unreachable server, or a stream that does not fit.
    pub async fn connect(options: &NatsHubOptions) -> Result<NatsHub, NatsError> {
        check_name("stream", &options.stream)?;
        for token in options.subject.split('.') {
            check_name("subject", token)?;
        }
        if options.partitions == Some(0) {
            return Err(NatsError::Config("partitions must be at least 1".into()));
        }
        // As shown in messages, stats and the console: without user names and passwords.
        let servers = options
            .servers
            .iter()
            .map(|s| without_credentials(s))
            .collect::<Vec<_>>()
            .join(",");
        let addrs = options
            .servers
            .iter()
            .map(|s| s.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| NatsError::Config(format!("bad NATS server URL in `{servers}`: {e}")))?;
        let client = ConnectOptions::new()
            .name("floodway")
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(options.request_timeout))
            .connect(addrs)
            .await
            .map_err(|e| NatsError::Connect {
                servers: servers.clone(),
                message: format!("{e} (is nats-server running with -js?)"),
            })?;
        // No domain: pull requests are sent to the default API prefix (`pull.rs`).
        // When the connection's unawaited acks are all taken (5,000, shared by every
        // publisher of the hub: sinks, fault sinks, the relay, schedules), a publish fails at
        // once, a throttle (held while others get through, never faulted), and is tried again:
        // waiting instead would hang every publisher that holds acks of its own while it waits.
        // An ack not awaited (a publish given up half way) keeps its place among those the
        // connection lets wait until it comes or times out: within the request timeout, not
        // async-nats's 30 s, so that after a connection broke the places come back soon.
        let mut js = jetstream::ContextBuilder::new()
            .backpressure_on_inflight(false)
            .ack_timeout(options.request_timeout)
            .build(client.clone());
        js.set_timeout(options.request_timeout);
        // Message schedules (timers kept by the stream) need NATS 2.12: an older server is
        // not asked for them.
        let schedules = at_least(&client.server_info().version, (2, 12));
        // Fast-ingest batches need NATS 2.14.
        let batched = options.fast_ingest && at_least(&client.server_info().version, (2, 14));
        let StreamFacts {
            partitions,
            schedules,
            batched: takes_batches,
            max_message_size,
        } = ensure_stream(&js, options, schedules, batched).await?;
        // The server's limit on a message, or the stream's own when it is lower.
        let max_payload = client.server_info().max_payload;
        let max_message = match usize::try_from(max_message_size) {
            Ok(stream_max) if stream_max > 0 => stream_max.min(max_payload),
            _ => max_payload,
        };
        Ok(NatsHub {
            inner: std::sync::Arc::new(Inner {
                client,
                js,
                stream: options.stream.clone(),
                subject: options.subject.clone(),
                partitions,
                schedules,
                max_message: max_message.into(),
                servers,
                partition_subjects: (0..partitions)
                    .map(|p| format!("{}.{p}", options.subject).into())
                    .collect(),
                fault_subject: format!("{}.faults", options.subject).into(),
                // Another instance may have set it: this one's settings decide.
                fast_ingest: (batched && takes_batches).into(),
                request_timeout: options.request_timeout,
            }),
        })
    }

    /// The stream's name.
    pub fn stream(&self) -> &str {
        &self.inner.stream
    }

    /// The number of partitions.
    pub fn partitions(&self) -> u32 {
        self.inner.partitions
    }

    /// Whether the stream keeps timers ([`NatsHub::schedule`]): its server is NATS 2.12 or
    /// newer, which takes message schedules.
    pub fn keeps_timers(&self) -> bool {
        self.inner.schedules
    }

    /// Whether sinks publish in fast-ingest batches ([`NatsHub::publish_fast`]): the settings
    /// ask for it, and the stream takes them (until the server says it no longer does).
    pub fn publishes_in_batches(&self) -> bool {
        self.inner
            .fast_ingest
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The servers this hub connects to, as shown: without user names and passwords.
    pub fn servers(&self) -> &str {
        &self.inner.servers
    }

    /// The partition of a partition key.
    pub fn partition_of(&self, partition_key: &str) -> u32 {
        partition_for(partition_key, self.inner.partitions)
    }

    /// The subject of a partition.
    pub fn partition_subject(&self, partition: u32) -> String {
        format!("{}.{partition}", self.inner.subject)
    }

    /// The subject of fault events.
    pub fn fault_subject(&self) -> String {
        format!("{}.faults", self.inner.subject)
    }

    /// The underlying client, for what Floodway does not wrap.
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// The subject an event goes to: its partition's (by `hash`, its partition key's
    /// [`key_hash`]), or the fault subject for `fault` events.
    pub(crate) fn subject_of(&self, event: &Event, hash: u64) -> async_nats::Subject {
        if event.is_fault() {
            self.inner.fault_subject.clone()
        } else {
            let partition = partition_of_hash(hash, self.inner.partitions) as usize;
            self.inner.partition_subjects[partition].clone()
        }
    }

    /// Publishes events with their ids as `Nats-Msg-Id`: a repeat inside the duplicate window
    /// is stored once. When this returns, the server has acknowledged every one (stored on
    /// the stream's replicas).
    ///
    /// Publishes are pipelined in a way that keeps each partition key's order in the stream:
    /// the first event of every key is sent without waiting (those of keys with more events
    /// first; at most 1,024 unacknowledged at once), and each later event of a key as soon
    /// as the one before it is acknowledged. A later
    /// event of a key is sent only after the earlier one is stored, so a message lost on the
    /// way (its ack never comes) cannot be overtaken by the next one of its key; the retry
    /// then stores it, and what follows, in order. A batch of distinct keys is fully
    /// pipelined; the later events of a key ride along while the rest of the batch is
    /// acknowledged.
    ///
    /// Without the need for a receipt, [`NatsHub::publish_fast`] stores the same with one
    /// ack a batch.
    ///
    /// # Errors
    /// When an acknowledgement does not come, or the connection's unawaited acknowledgements
    /// are all taken by other publishers (retrying is safe: duplicates are skipped, and
    /// nothing after the first failure of a key was sent).
    pub async fn publish(&self, events: &[Event]) -> Result<PublishReceipt, NatsError> {
        let payloads = self.payloads(events)?;
        self.publish_each(events, &payloads).await
    }

    /// The encoded events, each within the stream's message limit (a fault too large is
    /// stored without its record's bytes).
    ///
    /// # Errors
    /// An event that is not a fault over the limit.
    pub(crate) fn payloads(&self, events: &[Event]) -> Result<Vec<Bytes>, NatsError> {
        let mut payloads = Vec::with_capacity(events.len());
        for event in events {
            // Room for the headers (the id among them) below the limit.
            let max = self
                .inner
                .max_message
                .load(std::sync::atomic::Ordering::Relaxed)
                .saturating_sub(HEADER_ROOM + event.id().len());
            let mut payload = event.to_bytes();
            if payload.len() > max {
                if !event.is_fault() {
                    return Err(NatsError::TooLarge {
                        id: event.id().to_owned(),
                        size: payload.len(),
                        max: Some(max),
                    });
                }
                // A fault of a large record: stored without the record's bytes and the
                // decoded event, rather than not at all (which would stop the processor).
                payload = Bytes::from(floodway::fault::fit(event, max).to_json());
            }
            payloads.push(payload);
        }
        Ok(payloads)
    }

    /// Publishes `events` (encoded as `payloads`) message by message, each acked: see
    /// [`NatsHub::publish`].
    pub(crate) async fn publish_each(
        &self,
        events: &[Event],
        payloads: &[Bytes],
    ) -> Result<PublishReceipt, NatsError> {
        // Each key hashed once: for its partition, and to chain its events.
        let hashes: Vec<u64> = events.iter().map(|e| key_hash(e.partition_key())).collect();
        let send = |i: usize| {
            let event = &events[i];
            self.publish_raw(
                self.subject_of(event, hashes[i]),
                event.id(),
                payloads[i].clone(),
            )
        };
        let (next, first) = chains(&hashes);
        // Acks are awaited in the order sent, so the keys with more events to come are
        // acknowledged first and their next events sent early, while the rest is in flight.
        // At most `ACKS_IN_FLIGHT` at once: the client lets a few thousand acks wait (shared
        // by every publisher of the connection) and then holds the next send until one is
        // awaited, which a call holding them all would never do.
        let mut first = first.into_iter();
        let mut pending = std::collections::VecDeque::with_capacity(ACKS_IN_FLIGHT);
        let mut receipt = PublishReceipt::default();
        loop {
            while pending.len() < ACKS_IN_FLIGHT {
                let Some(i) = first.next() else { break };
                pending.push_back((i, send(i).await?));
            }
            let Some((i, ack)) = pending.pop_front() else {
                break;
            };
            let ack = match ack.await {
                Ok(ack) => ack,
                Err(e) => return Err(self.refused(&events[i], e).await),
            };
            if ack.duplicate {
                receipt.duplicates += 1;
            } else {
                receipt.stored += 1;
            }
            if let Some(j) = next[i] {
                pending.push_back((j, send(j).await?));
            }
        }
        Ok(receipt)
    }

    /// Sends one message with an id; the returned future resolves to the server's ack.
    pub(crate) async fn publish_raw(
        &self,
        subject: async_nats::Subject,
        id: &str,
        payload: Bytes,
    ) -> Result<jetstream::context::PublishAckFuture, NatsError> {
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
        self.inner
            .js
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(|e| match e.kind() {
                jetstream::context::PublishErrorKind::MaxAckPending => NatsError::Busy,
                _ => NatsError::js("publish", e),
            })
    }

    /// The newest messages that `keep` accepts, oldest first, with their publish times (ms):
    /// at most `limit`, looking back through at most `limit * 20` messages.
    ///
    /// # Errors
    /// When the server does not answer.
    pub async fn newest(
        &self,
        limit: usize,
        keep: impl Fn(&[u8]) -> bool,
    ) -> Result<Vec<(i64, Bytes)>, NatsError> {
        let mut stream = self.stream_handle().await?;
        let state = stream
            .info()
            .await
            .map_err(|e| NatsError::js("stream info", e))?
            .state
            .clone();
        let mut found = Vec::new();
        let mut sequence = state.last_sequence;
        let mut looked = 0;
        while found.len() < limit && sequence >= state.first_sequence.max(1) && looked < limit * 20
        {
            looked += 1;
            match stream.get_raw_message(sequence).await {
                // Published events only, not the schedules of timers.
                Ok(message)
                    if !message
                        .subject
                        .as_str()
                        .starts_with(&format!("{}.schedule-", self.inner.subject))
                        && keep(&message.payload) =>
                {
                    let ms = message.time.unix_timestamp_nanos() / 1_000_000;
                    found.push((i64::try_from(ms).unwrap_or(i64::MAX), message.payload));
                }
                // Deleted by a limit, or filtered out.
                Ok(_) | Err(_) => {}
            }
            sequence -= 1;
        }
        found.reverse();
        Ok(found)
    }

    /// The stream's handle, fetched from the server.
    pub(crate) async fn stream_handle(
        &self,
    ) -> Result<async_nats::jetstream::stream::Stream, NatsError> {
        self.inner
            .js
            .get_stream(&self.inner.stream)
            .await
            .map_err(|e| NatsError::js("stream info", e))
    }

    /// The message stored at stream sequence `sequence` (a record's offset on this hub);
    /// `None` when a limit has deleted it. Resubmission reads a fault's record back this way
    /// when the fault does not carry it (its pipeline redacts fields).
    ///
    /// # Errors
    /// When the server does not answer.
    pub async fn record_at(&self, sequence: u64) -> Result<Option<Bytes>, NatsError> {
        self.record_where(sequence, None).await
    }

    /// The message at stream sequence `sequence` if it is in `partition`; `None` when there
    /// is none, or another subject's (a stream made again numbers its messages from 1 again:
    /// a fault's position may now name another partition's event, a fault or a schedule).
    ///
    /// # Errors
    /// When the server does not answer.
    pub async fn record_in(
        &self,
        partition: u32,
        sequence: u64,
    ) -> Result<Option<Bytes>, NatsError> {
        let subject = self.partition_subject(partition);
        self.record_where(sequence, Some(&subject)).await
    }

    async fn record_where(
        &self,
        sequence: u64,
        subject: Option<&str>,
    ) -> Result<Option<Bytes>, NatsError> {
        let stream = self.stream_handle().await?;
        match stream.get_raw_message(sequence).await {
            Ok(message) if subject.is_some_and(|s| message.subject.as_str() != s) => Ok(None),
            Ok(message) => Ok(Some(message.payload)),
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
            {
                Ok(None)
            }
            Err(e) => Err(NatsError::js("get message", e)),
        }
    }

    /// Publishes each `(id, partition, payload, at)` into its partition once, at `at` (ms
    /// since the epoch), through a JetStream message schedule (NATS 2.12 or newer) named by
    /// `id`: the schedule's own message is stored under `{subject}.schedule-{id}` (one per
    /// subject: scheduling `id` again replaces it), and at its time the server publishes the
    /// payload to the partition, where whichever instance reads the partition then receives
    /// it. Up to 1,024 are sent before the oldest acknowledgement is awaited. A time before
    /// 1970 is due at once; one more than a century ahead is set a century ahead (RFC 3339
    /// cannot write years after 9999, and the server fires at once what its clock's
    /// durations cannot reach).
    ///
    /// # Errors
    /// When the server does not take one (a server older than 2.12 has no schedules).
    pub async fn schedule(&self, timers: &[(String, u32, Bytes, i64)]) -> Result<(), NatsError> {
        let mut acks = std::collections::VecDeque::with_capacity(ACKS_IN_FLIGHT);
        let now = floodway::event::now_millis();
        for (id, partition, payload, at) in timers {
            // As `publish`: a bounded number of acks waiting.
            if acks.len() >= ACKS_IN_FLIGHT {
                if let Some(ack) = acks.pop_front() {
                    let ack: jetstream::context::PublishAckFuture = ack;
                    ack.await.map_err(|e| NatsError::js("schedule", e))?;
                }
            }
            let token: String = id
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            // A time RFC 3339 cannot write (an event stamped in microseconds is in the year
            // 56,000) would refuse the whole chunk, and every later batch with it; and
            // nats-server fires at once a schedule further ahead than its clock's durations
            // reach (about 290 years). Before 1970 is due now; more than a century ahead is
            // a century ahead.
            let at = (*at).clamp(0, now.saturating_add(LONGEST_SCHEDULE_MS));
            let when = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at) * 1_000_000)
                .map_err(|e| NatsError::Config(format!("schedule time {at}: {e}")))?
                .format(&time::format_description::well_known::Rfc3339)
                .map_err(|e| NatsError::Config(format!("schedule time {at}: {e}")))?;
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Schedule", format!("@at {when}").as_str());
            headers.insert(
                "Nats-Schedule-Target",
                self.partition_subject(*partition).as_str(),
            );
            let subject = format!("{}.schedule-{token}", self.inner.subject);
            acks.push_back(
                self.inner
                    .js
                    .publish_with_headers(subject, headers, payload.clone())
                    .await
                    .map_err(|e| NatsError::js("schedule", e))?,
            );
        }
        for ack in acks {
            ack.await.map_err(|e| NatsError::js("schedule", e))?;
        }
        Ok(())
    }

    /// The messages of `partition` after stream sequence `after` (from `since`, ms since the
    /// epoch, when `None`) and before `before`, with their sequences: one request when there
    /// are none, else an ephemeral consumer read to `before`.
    ///
    /// # Errors
    /// When the server does not answer, a delivery is lost on the way, or the read stops
    /// short of `before` for 5 s (the caller tries again).
    pub async fn missed(
        &self,
        partition: u32,
        after: Option<u64>,
        before: u64,
        since: i64,
    ) -> Result<Vec<(u64, Bytes)>, NatsError> {
        use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
        let stream = self.stream_handle().await?;
        let subject = self.partition_subject(partition);
        let deliver_policy = match after {
            Some(after) => {
                let next = stream
                    .raw_message_builder()
                    .sequence(after + 1)
                    .next_by_subject(subject.clone())
                    .send()
                    .await;
                match next {
                    Ok(m) if m.sequence < before => DeliverPolicy::ByStartSequence {
                        start_sequence: m.sequence,
                    },
                    Ok(_) => return Ok(Vec::new()),
                    Err(e)
                        if e.kind()
                            == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
                    {
                        return Ok(Vec::new())
                    }
                    Err(e) => return Err(NatsError::js("get message", e)),
                }
            }
            None => DeliverPolicy::ByStartTime {
                start_time: time::OffsetDateTime::from_unix_timestamp_nanos(
                    i128::from(since.max(0)) * 1_000_000,
                )
                .map_err(|e| NatsError::Config(format!("start time {since}: {e}")))?,
            },
        };
        // An ephemeral consumer read with the subscriptions' own pulls (async-nats's pull
        // stream can stall on its count of what its requests owe: `pull.rs`),
        // checked for deliveries lost on the way as an ordered consumer would be.
        let consumer = stream
            .create_consumer(pull::Config {
                filter_subject: subject,
                deliver_policy,
                ack_policy: AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                memory_storage: true,
                ..Default::default()
            })
            .await
            .map_err(|e| NatsError::js("create consumer", e))?;
        // Nothing there (a quiet partition, nothing since `since`): a read would wait for
        // what never comes, and fail.
        if consumer.cached_info().num_pending == 0 {
            let _ = stream.delete_consumer(&consumer.cached_info().name).await;
            return Ok(Vec::new());
        }
        let read = read_to(&self.inner.client, &consumer, partition, before).await;
        // Gone anyway once idle for the inactive threshold.
        let _ = stream.delete_consumer(&consumer.cached_info().name).await;
        read
    }

    /// Messages and bytes per partition, and every subscription's lag.
    ///
    /// # Errors
    /// When the server does not answer.
    pub async fn stats(&self) -> Result<NatsStats, NatsError> {
        let stream = self.stream_handle().await?;
        // Subject by subject: the stream's other subjects (a schedule each for pending
        // timers, perhaps a million) are not listed.
        let subjects: Vec<String> = (0..self.inner.partitions)
            .map(|p| self.partition_subject(p))
            .chain([self.fault_subject().to_string()])
            .collect();
        let mut info = None;
        let mut counts: HashMap<String, u64> = HashMap::new();
        for subject in subjects {
            let mut per_subject = stream
                .info_with_subjects(subject)
                .await
                .map_err(|e| NatsError::js("stream info", e))?;
            info.get_or_insert_with(|| per_subject.info.clone());
            while let Some(entry) = per_subject.next().await {
                let (subject, count) = entry.map_err(|e| NatsError::js("stream info", e))?;
                counts.insert(subject, count as u64);
            }
        }
        let info = info.ok_or_else(|| NatsError::Config("a stream without subjects".into()))?;
        let partitions = (0..self.inner.partitions)
            .map(|p| counts.get(&self.partition_subject(p)).copied().unwrap_or(0))
            .collect();
        let faults = counts.get(&self.fault_subject()).copied().unwrap_or(0);
        let mut subscriptions: BTreeMap<String, SubscriptionStats> = BTreeMap::new();
        let mut consumers = stream.consumers();
        while let Some(consumer) = consumers.next().await {
            let consumer = consumer.map_err(|e| NatsError::js("consumer list", e))?;
            if consumer.config.durable_name.is_none() {
                continue;
            }
            let Some((name, partition)) = consumer.name.rsplit_once('_') else {
                continue;
            };
            let entry = subscriptions.entry(name.to_owned()).or_default();
            entry.consumers += 1;
            entry.pending += consumer.num_pending;
            entry.ack_pending += consumer.num_ack_pending as u64;
            entry.redelivered += consumer.num_redelivered as u64;
            entry
                .partitions
                .push((partition.to_owned(), consumer.num_pending));
        }
        // In partition order, whatever order the server listed the consumers in.
        for s in subscriptions.values_mut() {
            s.partitions
                .sort_by_key(|(p, _)| (p.parse::<u32>().unwrap_or(u32::MAX), p.clone()));
        }
        Ok(NatsStats {
            stream: self.inner.stream.clone(),
            messages: info.state.messages,
            bytes: info.state.bytes,
            first_sequence: info.state.first_sequence,
            last_sequence: info.state.last_sequence,
            replicas: info.config.num_replicas,
            partitions,
            faults,
            subscriptions: subscriptions.into_iter().collect(),
        })
    }
}

/// What [`NatsHub::stats`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsStats {
    /// The stream.
    pub stream: String,
    /// Messages held.
    pub messages: u64,
    /// Bytes held.
    pub bytes: u64,
    /// The first sequence held.
    pub first_sequence: u64,
    /// The last sequence stored.
    pub last_sequence: u64,
    /// Replicas.
    pub replicas: usize,
    /// Messages held per partition.
    pub partitions: Vec<u64>,
    /// Fault events held.
    pub faults: u64,
    /// Subscriptions (durable consumers grouped by subscription name).
    pub subscriptions: Vec<(String, SubscriptionStats)>,
}

/// One subscription's state across its partitions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriptionStats {
    /// Its consumers (one per partition it reads).
    pub consumers: usize,
    /// Messages not yet delivered (the lag).
    pub pending: u64,
    /// Delivered, not yet acknowledged.
    pub ack_pending: u64,
    /// Delivered more than once.
    pub redelivered: u64,
    /// `(partition, pending)` per consumer.
    pub partitions: Vec<(String, u64)>,
}

/// Whether a server's version (`2.12.1`, `2.14.0-beta`) is at least `wanted`.
fn at_least(version: &str, wanted: (u64, u64)) -> bool {
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u64>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= wanted
}

/// The stream's settings `held` with `allow` applied, as the server holds them after the
/// update; refused (no right to change the stream, a setting it cannot have), `held` as it
/// was, with a warning that it goes `without` what it would have allowed.
async fn allow_on_stream(
    js: &jetstream::Context,
    held: stream::Config,
    without: &str,
    allow: impl FnOnce(&mut stream::Config),
) -> stream::Config {
    let mut wanted = held.clone();
    allow(&mut wanted);
    match js.update_stream(&wanted).await {
        Ok(info) => info.config,
        Err(e) => {
            tracing::warn!(stream = %held.name, error = %e, "the stream cannot take {without}");
            held
        }
    }
}

fn stream_config(
    options: &NatsHubOptions,
    partitions: u32,
    schedules: bool,
    batched: bool,
) -> stream::Config {
    stream::Config {
        name: options.stream.clone(),
        subjects: vec![format!("{}.*", options.subject)],
        storage: if options.memory {
            stream::StorageType::Memory
        } else {
            stream::StorageType::File
        },
        num_replicas: options.replicas.unwrap_or(1),
        max_age: options.max_age.unwrap_or_default(),
        max_bytes: options.max_bytes.unwrap_or(-1),
        duplicate_window: options.duplicate_window.unwrap_or(Duration::from_secs(120)),
        metadata: HashMap::from([(PARTITIONS_KEY.to_owned(), partitions.to_string())]),
        description: Some("Floodway event hub".into()),
        // Timers kept by the hub (`schedule`): NATS 2.12 or newer.
        allow_message_schedules: schedules,
        // Fast-ingest batches (`fast_ingest.rs`): NATS 2.14 or newer.
        allow_batch_publish: batched,
        ..Default::default()
    }
}

/// What the hub keeps of its stream's settings.
struct StreamFacts {
    partitions: u32,
    /// Whether it takes message schedules (a server older than 2.12 leaves the setting out).
    schedules: bool,
    /// Whether it takes fast-ingest batches (`allow_batched`, 2.14 and newer).
    batched: bool,
    /// Its own limit on a message (headers and payload), if it has one (`-1` or `0`: none).
    max_message_size: i32,
}

/// Creates the stream or checks the existing one.
async fn ensure_stream(
    js: &jetstream::Context,
    options: &NatsHubOptions,
    schedules: bool,
    batched: bool,
) -> Result<StreamFacts, NatsError> {
    let existing = match js.get_stream(&options.stream).await {
        Ok(mut stream) => Some(
            stream
                .info()
                .await
                .map_err(|e| NatsError::js("stream info", e))?
                .config
                .clone(),
        ),
        Err(e) => match e.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(inner)
                if inner.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                None
            }
            _ => return Err(NatsError::js("stream info", e)),
        },
    };
    let Some(current) = existing else {
        let partitions = options.partitions.unwrap_or(DEFAULT_PARTITIONS);
        return match js
            .create_stream(stream_config(options, partitions, schedules, batched))
            .await
        {
            Ok(stream) => Ok(StreamFacts {
                partitions,
                schedules: stream.cached_info().config.allow_message_schedules,
                batched: stream.cached_info().config.allow_batch_publish,
                max_message_size: stream.cached_info().config.max_message_size,
            }),
            Err(e) => match e.kind() {
                // Another process created it first: check theirs instead.
                jetstream::context::CreateStreamErrorKind::JetStream(inner)
                    if inner.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST =>
                {
                    Box::pin(ensure_stream(js, options, schedules, batched)).await
                }
                // The server refused the settings (a subject another stream holds, a
                // duplicate window longer than the max age, too many replicas).
                jetstream::context::CreateStreamErrorKind::JetStream(inner) => {
                    Err(NatsError::Config(format!(
                        "cannot create stream `{}`: {inner}",
                        options.stream
                    )))
                }
                _ => Err(NatsError::js("create stream", e)),
            },
        };
    };
    let stored = current
        .metadata
        .get(PARTITIONS_KEY)
        .and_then(|p| p.parse::<u32>().ok())
        .ok_or_else(|| {
            NatsError::Config(format!(
                "stream `{}` exists but was not created by Floodway (no `{PARTITIONS_KEY}` \
                 in its metadata): choose another stream name",
                options.stream
            ))
        })?;
    if let Some(wanted) = options.partitions {
        if wanted != stored {
            return Err(NatsError::Config(format!(
                "stream `{}` has {stored} partitions, the settings say {wanted}: partitions \
                 cannot change (keys would move); remove `partitions` or use a new stream",
                options.stream
            )));
        }
    }
    let wanted_subject = format!("{}.*", options.subject);
    if current.subjects != [wanted_subject.clone()] {
        return Err(NatsError::Config(format!(
            "stream `{}` holds subjects {:?}, the settings say `{wanted_subject}`",
            options.stream, current.subjects
        )));
    }
    // Only what the settings give changes; everything else stays as the stream has it.
    let mut update = current.clone();
    if let Some(replicas) = options.replicas {
        update.num_replicas = replicas;
    }
    if let Some(max_age) = options.max_age {
        update.max_age = max_age;
    }
    if let Some(max_bytes) = options.max_bytes {
        update.max_bytes = max_bytes;
    }
    if let Some(window) = options.duplicate_window {
        update.duplicate_window = window;
    }
    // As the server holds it.
    let mut held = current.clone();
    if update != current {
        held = js
            .update_stream(&update)
            .await
            .map_err(|e| {
                NatsError::Config(format!("cannot update stream `{}`: {e}", options.stream))
            })?
            .config;
    }
    // What the hub would use and a stream made before it did lacks is allowed now, each on
    // its own: a stream may refuse one and take the other (message schedules cannot go with
    // `discard: new` or `deny_purge`). Like the update above, each writes back the settings
    // as read: JetStream has no compare-and-set for a stream's settings.
    if schedules && !held.allow_message_schedules {
        held = allow_on_stream(
            js,
            held,
            "message schedules: timers stay in each instance's store",
            |c| {
                c.allow_message_schedules = true;
            },
        )
        .await;
    }
    if batched && !held.allow_batch_publish {
        held = allow_on_stream(
            js,
            held,
            "fast-ingest batches: sinks publish message by message",
            |c| {
                c.allow_batch_publish = true;
            },
        )
        .await;
    }
    Ok(StreamFacts {
        partitions: stored,
        schedules: held.allow_message_schedules,
        batched: held.allow_batch_publish,
        max_message_size: held.max_message_size,
    })
}

/// Room left for a message's headers beside its id (`NATS/1.0`, `Nats-Msg-Id: `, line ends).
const HEADER_ROOM: usize = 64;

impl NatsHub {
    /// The error of a publish the server refused. An event over the stream's own message
    /// limit, lowered since the hub read it: the limit is read again, and the event is poison
    /// as one over the limit known before is; a fault event, which is trimmed to fit, is tried
    /// again (transient), within the new limit. Anything else may pass.
    async fn refused(&self, event: &Event, error: jetstream::context::PublishError) -> NatsError {
        let too_large = error.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded
            || std::error::Error::source(&error)
                .and_then(|s| s.downcast_ref::<jetstream::Error>())
                .is_some_and(|e| {
                    e.error_code() == jetstream::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
                });
        if !too_large {
            return NatsError::js("publish", error);
        }
        let limit = match self.stream_handle().await {
            Ok(mut stream) => match stream.info().await {
                Ok(info) => usize::try_from(info.config.max_message_size)
                    .ok()
                    .filter(|m| *m > 0),
                Err(_) => None,
            },
            Err(_) => None,
        };
        if let Some(limit) = limit {
            self.inner.max_message.store(
                limit.min(self.inner.client.server_info().max_payload),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        if event.is_fault() {
            return NatsError::js(
                "publish",
                "a fault over the stream's message limit, lowered since: tried again within it",
            );
        }
        NatsError::TooLarge {
            id: event.id().to_owned(),
            size: event.encoded_len(),
            max: limit,
        }
    }
}

/// Each key's events as a chain, the keys given by their [`key_hash`]es: for every event, the
/// index of the next event of its partition key in the batch; and the first event of every
/// key, those of keys with more events first, each group in batch order. Two keys of the same
/// hash share a chain: the later event waits for the earlier, which keeps both keys' orders.
fn chains(hashes: &[u64]) -> (Vec<Option<usize>>, Vec<usize>) {
    let mut last: KeyHashMap<usize> =
        KeyHashMap::with_capacity_and_hasher(hashes.len(), Default::default());
    let mut next = vec![None; hashes.len()];
    let mut later = vec![false; hashes.len()];
    for (i, hash) in hashes.iter().enumerate() {
        if let Some(before) = last.insert(*hash, i) {
            next[before] = Some(i);
            later[i] = true;
        }
    }
    let heads = (0..hashes.len()).filter(|&i| !later[i]);
    let (mut first, alone): (Vec<usize>, Vec<usize>) = heads.partition(|&i| next[i].is_some());
    first.extend(alone);
    (next, first)
}

/// The messages `consumer` delivers before stream sequence `before` (or up to the partition's
/// last), with their sequences; an error when a delivery went missing on the way or nothing
/// came for 5 s before reaching `before`.
async fn read_to(
    client: &async_nats::Client,
    consumer: &jetstream::consumer::Consumer<jetstream::consumer::pull::Config>,
    partition: u32,
    before: u64,
) -> Result<Vec<(u64, Bytes)>, NatsError> {
    use crate::pull::{Delivery, Pull};
    let expires = Duration::from_secs(5);
    let mut pull = Pull::start(client, consumer, 1_000, expires, expires / 4, None).await?;
    let failed = |message: String| NatsError::JetStream {
        action: "read a partition's missed records",
        message,
    };
    let mut out = Vec::new();
    let mut delivered = 0;
    loop {
        let Ok(message) = tokio::time::timeout(expires, pull.next()).await else {
            return Err(failed(format!(
                "partition {partition} stopped after {} records, before sequence {before}",
                out.len()
            )));
        };
        let message = message?;
        let info = Delivery::of(&message)?;
        let (sequence, pending) = (info.stream_sequence, info.pending);
        if info.consumer_sequence != delivered + 1 {
            return Err(failed(format!(
                "partition {partition}: a delivery was lost on the way (expected {}, got {})",
                delivered + 1,
                info.consumer_sequence
            )));
        }
        delivered = info.consumer_sequence;
        if sequence >= before {
            break;
        }
        out.push((sequence, message.payload));
        if pending == 0 {
            break; // the partition's last (what was at `before` went meanwhile)
        }
    }
    Ok(out)
}

/// Acks one publish call awaits at once at most (see [`NatsHub::publish`]).
const ACKS_IN_FLIGHT: usize = 1024;

/// How far ahead a message schedule is set at most: a century, in ms (see
/// [`NatsHub::schedule`]).
const LONGEST_SCHEDULE_MS: i64 = 100 * 365 * 24 * 3600 * 1000;

/// `url` with the user name and password it may carry (`nats://user:pass@host`) replaced by
/// `***`: the servers are shown in messages, stats and the console.
pub(crate) fn without_credentials(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = url[start..].find('/').map_or(url.len(), |i| start + i);
    match url[start..end].rfind('@') {
        Some(at) => format!("{}***{}", &url[..start], &url[start + at..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_are_shown_without_their_credentials() {
        assert_eq!(
            without_credentials("nats://ann:s3cret@10.0.0.1:4222"),
            "nats://***@10.0.0.1:4222"
        );
        assert_eq!(without_credentials("tls://tok@h/x@y"), "tls://***@h/x@y");
        assert_eq!(
            without_credentials("nats://127.0.0.1:4222"),
            "nats://127.0.0.1:4222"
        );
        assert_eq!(without_credentials("u:p@host:4222"), "***@host:4222");
    }

    #[test]
    fn server_versions_are_compared_by_major_and_minor() {
        assert!(at_least("2.12.0", (2, 12)));
        assert!(at_least("2.15.1", (2, 12)));
        assert!(at_least("3.0.0", (2, 12)));
        assert!(at_least("2.14.0-beta.2", (2, 12)));
        assert!(!at_least("2.11.9", (2, 12)));
        assert!(!at_least("", (2, 12)));
    }

    #[test]
    fn chains_link_each_key_in_batch_order_and_start_with_keys_that_go_on() {
        let events: Vec<Event> = ["a", "b", "a", "c", "a", "b", "d"]
            .iter()
            .map(|k| Event::builder("t", *k).build())
            .collect();
        let hashes: Vec<u64> = events.iter().map(|e| key_hash(e.partition_key())).collect();
        let (next, first) = chains(&hashes);
        assert_eq!(
            next,
            [Some(2), Some(5), Some(4), None, None, None, None],
            "a: 0 -> 2 -> 4; b: 1 -> 5"
        );
        assert_eq!(first, [0, 1, 3, 6], "a and b go on, so they go first");
        // Keys are told apart by their hashes: two keys of one hash form one chain.
        let (next, first) = chains(&[7, 9, 7]);
        assert_eq!(next, [Some(2), None, None]);
        assert_eq!(first, [0, 1]);
    }
}
