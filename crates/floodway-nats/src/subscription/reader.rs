//! Reading: a task per partition pulls from its consumer and hands records to the processor.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::AckKind;
use floodway::error::SourceError;
use floodway::{Record, Source};
use futures_util::FutureExt;
use tokio::sync::{mpsc, oneshot};

use super::acks::send;
use super::consumer::{
    claim, cumulative, find_consumer, open_consumer, remake, Claim, TAKEOVER_ABSENCE,
};
use super::lease::{Leases, LEASE_LOOK};
use super::options::{Sharing, SubscriptionOptions, GROUP, PULL_EXPIRES};
use super::{AckOp, Budget, Item, NatsReader, Outstanding, Pending};
use crate::error::NatsError;
use crate::pull::{Delivery, Pull};

/// Pulls one partition's consumer into the subscription's channel.
pub(super) struct PartitionReader {
    pub(super) client: async_nats::Client,
    pub(super) stream: async_nats::jetstream::stream::Stream,
    pub(super) subject: String,
    pub(super) config: pull::Config,
    pub(super) consumer: Option<async_nats::jetstream::consumer::Consumer<pull::Config>>,
    pub(super) partition: Arc<str>,
    pub(super) source: Arc<str>,
    pub(super) options: Arc<SubscriptionOptions>,
    pub(super) outstanding: Outstanding,
    pub(super) tx: mpsc::UnboundedSender<Item>,
    /// The stream sequence of the last record read.
    pub(super) last: u64,
    /// For a bounded read: the last sequence of the partition when the read began.
    pub(super) target: Option<u64>,
    /// When the consumer read was made: one made again (someone deleted it) delivers anew
    /// what this reader holds, and takes acks only for its own deliveries.
    pub(super) made: time::OffsetDateTime,
    /// The consumer acks cumulatively.
    pub(super) cumulative: bool,
    /// With cumulative acks: the consumer sequence of the last delivery read. Every delivery
    /// of an exclusive consumer comes to this reader, so the next one is the one after.
    pub(super) delivered: u64,
    /// The next pull starts by making the consumer again (a delivery was lost).
    pub(super) remake: bool,
    /// The consumer is the one the subscription opened, not looked at since.
    pub(super) opened: bool,
    /// Where the consumer is made again, when not where this reader stands: a consumer taken
    /// over for cumulative acks from a reader that is gone starts at its ack floor + 1.
    pub(super) resume_at: Option<u64>,
    /// The acker, to pause and resume the partition's acks.
    pub(super) acks: mpsc::WeakUnboundedSender<AckOp>,
    /// A transient read's room for records handed over and not yet taken.
    pub(super) budget: Budget,
    /// With pinned sharing, the pin this reader holds, kept from one pull to the next.
    pub(super) pin: crate::pull::PinCell,
    /// With cumulative acks, the subscription's leases: the partition is read only while
    /// its lease is held (`lease.rs`).
    pub(super) leases: Option<Leases>,
    /// Told when the partition's lease is found lost.
    pub(super) lost: Arc<tokio::sync::Notify>,
}

impl PartitionReader {
    pub(super) async fn run(mut self) {
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
                // The subscription closed while the reader waited (for a consumer another
                // reader held, a lease, or a server): nothing to report.
                Err(_) if self.tx.is_closed() || self.closed() => return,
                Err(e) => {
                    // No acks until the consumer is found again: while this reader pauses,
                    // it has no pull request waiting, and another instance may take the
                    // consumer over and make it again (`claim`). (A failure before the pull
                    // kept its consumer, which the next pull reads without finding it again.)
                    if self.consumer.is_none() {
                        self.pause(true).await;
                    }
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

    /// Finds this partition's consumer again after a failed pull, or makes it again where
    /// this reader stands when it is gone or lost a delivery; one another reader may hold
    /// (where acks are or would be cumulative) is taken only as [`claim`] allows.
    async fn reopen(
        &mut self,
    ) -> Result<async_nats::jetstream::consumer::Consumer<pull::Config>, NatsError> {
        // The partition's acks wait meanwhile: the ack subject names only the consumer, so an
        // ack worked out for the consumer that was would reach one made in its place, where
        // its delivery sequence would move the ack floor past the new deliveries'.
        self.pause(true).await;
        let mut told = false;
        let mut absent_since: Option<tokio::time::Instant> = None;
        let mut judged: Option<u64> = None;
        let mut wait = TAKEOVER_LOOK;
        loop {
            if self.leases.is_some() && !self.leased() {
                // Lost while this reader waited: the partition is another's for now.
                return Err(self.let_go().await);
            }
            let mut start = None;
            if self.config.durable_name.is_some() || self.last > 0 {
                // A consumer made again (ephemeral, or a durable one someone deleted) goes on
                // where this reader stood, not from its first start (a start at the end would
                // skip what was published meanwhile): at the first record it still holds
                // unsettled, whose acks went to the old consumer and would be lost with this
                // process, else after the last record read. What it holds comes again, as
                // duplicates. One taken over from a reader that is gone starts at its ack
                // floor + 1 instead.
                let held = self.outstanding.lock().ok().and_then(|o| {
                    o.as_ref()?
                        .get(&self.partition)?
                        .records
                        .first_key_value()
                        .map(|(sequence, _)| *sequence)
                });
                let from = match self.resume_at {
                    Some(floor) if self.remake => floor,
                    _ => held.map_or(self.last + 1, |h| h.min(self.last + 1)),
                };
                self.config.deliver_policy = DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                };
                start = Some(from);
            }
            let (mut consumer, made_here) = match (&self.config.durable_name, start) {
                (Some(name), Some(start)) if self.remake => {
                    // Not cut short if the reader is dropped meanwhile (`remake`).
                    let consumer = match remake(&self.stream, name, start, &self.config).await {
                        Ok(consumer) => consumer,
                        Err(e) => {
                            // A takeover is judged afresh: someone may have taken the consumer
                            // meanwhile.
                            if self.resume_at.take().is_some() {
                                self.remake = false;
                            }
                            return Err(e);
                        }
                    };
                    self.resume_at = None;
                    absent_since = None;
                    // Another instance may have made it between the delete and the create,
                    // and the create then found theirs: then it is claimed as any other.
                    let ours = matches!(
                        consumer.cached_info().config.deliver_policy,
                        DeliverPolicy::ByStartSequence { start_sequence } if start_sequence == start
                    );
                    if !ours {
                        self.remake = false;
                    }
                    (consumer, ours)
                }
                (Some(_), _) => (find_consumer(&self.stream, &self.config).await?, false),
                (None, _) => (open_consumer(&self.stream, &self.config).await?, false),
            };
            if !made_here && self.config.durable_name.is_some() {
                let found = consumer.cached_info();
                if found.created != self.made
                    && (self.config.ack_policy == AckPolicy::All
                        || found.config.ack_policy == AckPolicy::All)
                {
                    // A consumer this reader did not make (another instance made it again,
                    // or this one has not read it yet), where acks are or would be
                    // cumulative: taken only when no one else reads it (`claim`).
                    let pause = match claim(&mut consumer, &self.config).await? {
                        // Read as it is only after no one was seen for a while either: a live
                        // reader holding nothing has no request waiting while it pauses after
                        // a failed pull.
                        Claim::Free { delivered } => {
                            let since = *absent_since.get_or_insert_with(tokio::time::Instant::now);
                            if since.elapsed() >= TAKEOVER_ABSENCE {
                                judged = Some(delivered);
                                None
                            } else {
                                Some(TAKEOVER_LOOK)
                            }
                        }
                        Claim::Remake { start, pending } => {
                            let since = *absent_since.get_or_insert_with(tokio::time::Instant::now);
                            if since.elapsed() >= TAKEOVER_ABSENCE {
                                tracing::info!(
                                    partition = %self.partition,
                                    unacked = pending,
                                    start,
                                    "taking the consumer over: no one has read it for {:?}; \
                                     making it again at its first unacknowledged message",
                                    TAKEOVER_ABSENCE
                                );
                                self.resume_at = Some(start);
                                self.remake = true;
                                continue;
                            }
                            Some(TAKEOVER_LOOK)
                        }
                        Claim::Held => {
                            absent_since = None;
                            if !told {
                                tracing::info!(
                                    partition = %self.partition,
                                    "another reader is pulling from the partition's consumer; \
                                     with cumulative acks a partition has one reader at a \
                                     time, so this one waits to take over"
                                );
                                told = true;
                            }
                            let now = wait;
                            wait = (wait * 2).min(TAKEOVER_LOOK_MAX);
                            Some(now)
                        }
                    };
                    if let Some(pause) = pause {
                        if self.tx.is_closed() {
                            return Err(NatsError::js("pull", "the subscription closed"));
                        }
                        tokio::time::sleep(pause).await;
                        continue;
                    }
                }
                // Taken: its changeable settings brought in line, and the settings checked.
                consumer = open_consumer(&self.stream, &self.config).await?;
                if let Some(judged) = judged.take() {
                    // Read from the count judged on: a reader that came back meanwhile (and
                    // had deliveries this one would not see as a gap) sends it round again.
                    let now = consumer.cached_info();
                    if now.num_ack_pending > 0 || now.delivered.consumer_sequence != judged {
                        absent_since = None;
                        continue;
                    }
                }
            }
            let info = consumer.cached_info();
            if info.created != self.made {
                // A consumer made anew (by this reader, or after someone deleted it).
                self.made = info.created;
                self.delivered = info.delivered.consumer_sequence;
                let cumulative = cumulative(&consumer);
                if cumulative || self.cumulative {
                    // What this partition holds was delivered by the consumer that is gone:
                    // the new one delivers it again from `start`, and takes cumulative acks
                    // only for its own deliveries. The reader stands before `start` now, so
                    // that a consumer made again once more starts there too (what the
                    // processor still holds from before has no other way back), or at the
                    // consumer's ack floor when that is further (one taken over from another
                    // reader: what it acked, that reader settled).
                    if let Some(Some(lanes)) = self.outstanding.lock().ok().as_deref_mut() {
                        if let Some(lane) = lanes.get_mut(&self.partition) {
                            lane.clear(cumulative);
                        }
                    }
                    if let Some(start) = start {
                        self.last = (start - 1).max(info.ack_floor.stream_sequence);
                    }
                }
                self.cumulative = cumulative;
            } else if self.cumulative && info.delivered.consumer_sequence > self.delivered {
                // The same consumer delivered while this reader was away, and that never
                // arrived: a cumulative ack of what comes next would cover it.
                tracing::warn!(
                    partition = %self.partition,
                    read = self.delivered,
                    delivered = info.delivered.consumer_sequence,
                    "deliveries were lost on the way; making the consumer again where this \
                     reader stands"
                );
                self.remake = true;
                continue;
            }
            self.remake = false;
            if let Some(Some(lanes)) = self.outstanding.lock().ok().as_deref_mut() {
                if let Some(lane) = lanes.get_mut(&self.partition) {
                    lane.consumer = Some(consumer.clone());
                    lane.delivered = self.delivered;
                    lane.foreign = false;
                }
            }
            self.pause(false).await;
            return Ok(consumer);
        }
    }

    /// Pauses the partition's acks (and waits until those worked out before are handed to
    /// the connection), or resumes them.
    async fn pause(&self, paused: bool) {
        if let Some(Some(lanes)) = self.outstanding.lock().ok().as_deref_mut() {
            if let Some(lane) = lanes.get_mut(&self.partition) {
                lane.paused = paused;
            }
        }
        let Some(acks) = self.acks.upgrade() else {
            return;
        };
        if paused {
            let (done, barrier) = oneshot::channel();
            if acks.send(AckOp::Barrier(done)).is_ok() {
                let _ = barrier.await;
            }
        } else {
            let _ = acks.send(AckOp::Advance(self.partition.clone()));
        }
    }

    /// Whether the subscription holds the partition's lease, still valid.
    fn leased(&self) -> bool {
        let now = std::time::Instant::now();
        matches!(
            self.outstanding.lock().ok().as_deref(),
            Some(Some(lanes)) if lanes
                .get(&self.partition)
                .and_then(|lane| lane.lease.as_ref())
                .is_some_and(|held| held.valid(now))
        )
    }

    /// Whether the subscription has closed (its acker took the lanes).
    fn closed(&self) -> bool {
        !matches!(self.outstanding.lock().ok().as_deref(), Some(Some(_)))
    }

    /// Waits for the partition's lease and takes it. The consumer is then looked at afresh,
    /// as one this reader did not make: another instance may have read it meanwhile.
    /// `Ok(true)` when a bounded read is complete meanwhile: the holder read and acked the
    /// partition to its target (and keeps its lease until its own read ends, which may wait
    /// for partitions this one holds).
    async fn take_lease(&mut self, leases: &Leases) -> Result<bool, NatsError> {
        let mut told = false;
        loop {
            if let (Some(target), Some(name)) = (self.target, &self.config.durable_name) {
                let info = self
                    .stream
                    .consumer_info(name)
                    .await
                    .map_err(|e| NatsError::js("consumer info", e))?;
                if info.ack_floor.stream_sequence >= target {
                    return Ok(true);
                }
            }
            if let Some(held) = leases.take(&self.partition).await? {
                // A loss told before is of a lease that was: not this one's.
                let _ = self.lost.notified().now_or_never();
                // Held paused until the consumer is judged (`reopen`): another instance may
                // have made it again meanwhile.
                let kept = match self.outstanding.lock().ok().as_deref_mut() {
                    Some(Some(lanes)) => lanes.get_mut(&self.partition).map(|lane| {
                        lane.lease = Some(held.clone());
                        lane.paused = true;
                    }),
                    _ => None,
                };
                if kept.is_none() {
                    // The subscription closed meanwhile.
                    leases.release(&self.partition, &held).await;
                    return Err(NatsError::js("pull", "the subscription closed"));
                }
                if told {
                    tracing::info!(partition = %self.partition, "took the partition's lease");
                }
                self.consumer = None;
                self.made = time::OffsetDateTime::UNIX_EPOCH;
                return Ok(false);
            }
            if !told {
                tracing::info!(
                    partition = %self.partition,
                    "another instance holds the partition's lease; with cumulative acks a \
                     partition has one reader at a time, so this one waits to take over"
                );
                told = true;
            }
            if self.tx.is_closed() {
                return Err(NatsError::js("pull", "the subscription closed"));
            }
            tokio::time::sleep(LEASE_LOOK).await;
        }
    }

    /// What the partition's notification says: its lease was lost (the reader lets the
    /// partition go), or another's ack moved its consumer's ack floor past this reader's
    /// deliveries (the consumer is made again where the reader stands, as after a delivery
    /// lost on the way: the server would ignore this reader's acks until its deliveries pass
    /// that floor, and counts what it holds below the floor as acked). `None`: nothing, a
    /// notification of before this pull.
    async fn told(&mut self) -> Option<NatsError> {
        if !self.leased() {
            return Some(self.let_go().await);
        }
        let foreign = match self.outstanding.lock().ok().as_deref_mut() {
            Some(Some(lanes)) => lanes
                .get_mut(&self.partition)
                .is_some_and(|lane| std::mem::take(&mut lane.foreign)),
            _ => false,
        };
        if !foreign {
            return None;
        }
        metrics::counter!("floodway_nats_foreign_acks_total").increment(1);
        self.remake = true;
        Some(NatsError::js(
            "pull",
            "another's ack moved the consumer's ack floor past this reader's deliveries",
        ))
    }

    /// Lets the partition go after its lease was found lost: no acks, and the consumer is
    /// found again, once the lease is taken again, as one this reader did not make.
    async fn let_go(&mut self) -> NatsError {
        self.pause(true).await;
        self.consumer = None;
        self.made = time::OffsetDateTime::UNIX_EPOCH;
        // What was decided for the consumer (made again, at a start) is decided afresh.
        self.remake = false;
        self.resume_at = None;
        NatsError::js("pull", "the partition's lease was lost")
    }

    /// Pulls until the pull ends (an error: missed heartbeats, the consumer deleted) or a
    /// bounded read has nothing more for a while; `Ok(true)` when a bounded read is complete.
    async fn pull(&mut self) -> Result<bool, NatsError> {
        if !self.options.follow && self.target.is_none() {
            match self.last_sequence().await? {
                Some(last) => self.target = Some(last),
                None => return Ok(true),
            }
        }
        if let Some(leases) = self.leases.clone() {
            if !self.leased() && self.take_lease(&leases).await? {
                return Ok(true);
            }
        }
        let mut consumer = match self.consumer.take() {
            Some(mut c) if self.opened && self.config.durable_name.is_some() => {
                // The consumer as the subscription opened it: where acks are or would be
                // cumulative, another instance may have made it again since (taking it over),
                // and this reader must not read that one unclaimed.
                self.opened = false;
                let info = c
                    .info()
                    .await
                    .map_err(|e| NatsError::js("consumer info", e))?;
                let cumulative = self.config.ack_policy == AckPolicy::All
                    || info.config.ack_policy == AckPolicy::All;
                if cumulative && info.created != self.made {
                    self.reopen().await?
                } else {
                    c
                }
            }
            Some(c) => c,
            None => self.reopen().await?,
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
        let mut group = None;
        if let Sharing::Pinned { ttl } = self.options.sharing {
            if !self.options.transient {
                // Pulls well inside the pin's time to live, or the pin is lost between them.
                expires = (ttl / 3).clamp(Duration::from_millis(500), PULL_EXPIRES);
                group = Some((GROUP, self.pin.clone()));
            }
        }
        let mut messages = Pull::start(
            &self.client,
            &consumer,
            self.options.fetch,
            expires,
            expires / 4,
            group,
        )
        .await?;
        // Polled without pause: the channel is unbounded, so pulls (and a pin) keep flowing
        // while the processor is slow, and every message is registered as it arrives.
        let notify = self.lost.clone();
        let lost = self.leases.as_ref().map(|_| notify.notified());
        tokio::pin!(lost);
        loop {
            let next = if self.target.is_some() {
                let bounded = tokio::time::timeout(expires, messages.next());
                let next = match lost.as_mut().as_pin_mut() {
                    Some(told) => tokio::select! {
                        biased;
                        next = bounded => next,
                        () = told => match self.told().await {
                            Some(e) => return Err(e),
                            None => {
                                lost.set(Some(notify.notified()));
                                continue;
                            }
                        },
                    },
                    None => bounded.await,
                };
                match next {
                    Ok(next) => next,
                    // Nothing for a while: see whether the read is complete (another reader
                    // of the subscription may have taken the rest).
                    Err(_) => {
                        drop(messages);
                        self.consumer = Some(consumer);
                        return Ok(false);
                    }
                }
            } else if let Some(told) = lost.as_mut().as_pin_mut() {
                tokio::select! {
                    biased;
                    next = messages.next() => next,
                    () = told => match self.told().await {
                        Some(e) => return Err(e),
                        None => {
                            lost.set(Some(notify.notified()));
                            continue;
                        }
                    },
                }
            } else {
                messages.next().await
            };
            let mut message = next?;
            let info = Delivery::of(&message)?;
            let (sequence, delivered, delivery) = (
                info.stream_sequence,
                u32::try_from(info.delivered).unwrap_or(u32::MAX),
                info.consumer_sequence,
            );
            // With cumulative acks, or a consumer of its own (an ephemeral one: a transient
            // read, which takes no acks, so the server forgets what it sent), every delivery
            // comes to this reader, the next one after the last.
            if self.cumulative || self.config.durable_name.is_none() {
                if delivery != self.delivered + 1 {
                    // A delivery never reached this reader (lost with a connection, or with a
                    // pull given up): an ack of this one would cover it, and a transient read
                    // would go on without it. The consumer starts over where this reader
                    // stands, as an ordered consumer does.
                    tracing::warn!(
                        partition = %self.partition,
                        expected = self.delivered + 1,
                        got = delivery,
                        "a delivery was lost on the way; making the consumer again where this \
                         reader stands"
                    );
                    metrics::counter!("floodway_nats_lost_deliveries_total").increment(1);
                    self.remake = true;
                    return Err(NatsError::js("pull", "a delivery was lost on the way"));
                }
                self.delivered = delivery;
            }
            let past_until = match self.options.until {
                Some(until) => info.published_ms()? > until,
                None => false,
            };
            let past_target = self.target.is_some_and(|t| sequence > t);
            if past_until || past_target {
                // Not ours to read: give it back at once for the next reader.
                if let (false, Some(reply)) = (self.options.transient, message.reply.take()) {
                    send(&self.client, reply, AckKind::Nak(None)).await;
                }
                if past_until {
                    return Ok(true);
                }
                continue;
            }
            if !self.options.transient {
                // Moved, not cloned, here and below: the first clone of a received message's
                // bytes allocates (they become shared).
                let Some(reply) = message.reply.take() else {
                    continue;
                };
                let pending = Pending {
                    reply,
                    delivered,
                    delivery,
                    settled: false,
                    behind: false,
                    received: std::time::Instant::now(),
                };
                let refused = match self.outstanding.lock().ok().as_deref_mut() {
                    Some(Some(lanes)) => match lanes.get_mut(&self.partition) {
                        Some(lane) => {
                            lane.hold(sequence, pending);
                            None
                        }
                        None => Some(pending),
                    },
                    _ => Some(pending),
                };
                if let Some(pending) = refused {
                    // The subscription has closed: give it back with its delay.
                    let delay = self.options.nak_delay_for(delivered);
                    send(&self.client, pending.reply, AckKind::Nak(Some(delay))).await;
                    return Ok(false);
                }
            }
            self.last = sequence;
            let record = Record::new(
                self.source.clone(),
                self.partition.clone(),
                sequence,
                message.payload,
            )
            .with_attempt(delivered.max(1));
            // A durable consumer counts its deliveries for every reader of the partition.
            let record = match self.config.durable_name {
                Some(_) => record.with_delivery(delivery),
                None => record,
            };
            if let Some(budget) = &self.budget {
                // No pull is asked for meanwhile: what the server sends while this waits is
                // what the last request still owes.
                match budget.acquire().await {
                    Ok(permit) => permit.forget(),
                    Err(_) => return Ok(false),
                }
            }
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
    }
}

/// How often a reader waiting to take over a consumer looks at it again: at first, and while
/// it finds no one there.
const TAKEOVER_LOOK: Duration = Duration::from_secs(1);

/// The longest pause between looks while another reader holds the consumer (each look is a
/// request or two to the server, per partition).
const TAKEOVER_LOOK_MAX: Duration = Duration::from_secs(5);

/// Errors that trying again does not fix.
pub(super) fn is_fatal(error: &NatsError) -> bool {
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
        if let Some(budget) = &self.budget {
            budget.add_permits(batch.len());
        }
        if batch.is_empty() && self.live == 0 {
            return Ok(None);
        }
        Ok(Some(batch))
    }

    /// The partitions' readers pull into the channel this drains; it waits only for the
    /// first item, and a wait dropped has taken nothing.
    fn buffered(&self) -> bool {
        true
    }
}
