//! Acknowledging: settlements become acks (cumulative where the consumer takes them) and
//! terminations; what is let go unfinished is nak'd with a delay.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::lease::{Held, Leases, Renewal, RENEW_EVERY};
use super::options::SubscriptionOptions;
use super::{AckOp, Lane, NatsCheckpointer, Outstanding};
use crate::error::NatsError;
use async_nats::jetstream::AckKind;
use async_nats::Subject;
use floodway::error::CommitError;
use floodway::{Checkpoint, Checkpointer, Record, Settlement};
use tokio::sync::{mpsc, oneshot, watch};

/// Settlements taken in one go: under load they queue while acks are sent, and one
/// cumulative ack then covers a partition's share of them.
const OPS_AT_ONCE: usize = 1024;

/// Whether what this process holds is still its own. JetStream hands a record to another
/// reader of the consumer once its ack wait runs out with no ack and no in-progress ack; the
/// acker sends those for every record held, a third of the ack wait apart. A record held
/// longer than that without one (the process frozen, suspended, its runtime starved) may be
/// another reader's by now: the subscription has lapsed, for good.
#[derive(Debug)]
pub(super) struct KeptAlive {
    ack_wait: Duration,
    outstanding: Outstanding,
    state: Mutex<Rounds>,
}

#[derive(Debug)]
struct Rounds {
    /// When the last round of in-progress acks started (or the subscription, before any).
    last: Instant,
    lapse: Option<Lapse>,
}

/// A lapse: the wait that went past the limit, and which records it may have cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Lapse {
    waited: Duration,
    /// Records received before this went unkept past the limit; later ones are this
    /// process's still.
    stale_before: Instant,
}

impl Lapse {
    /// Whether a record received at `received` may be another reader's.
    pub(super) fn covers(&self, received: Instant) -> bool {
        received < self.stale_before
    }
}

impl KeptAlive {
    pub(super) fn new(ack_wait: Duration, outstanding: Outstanding) -> KeptAlive {
        KeptAlive {
            ack_wait,
            outstanding,
            state: Mutex::new(Rounds {
                last: Instant::now(),
                lapse: None,
            }),
        }
    }

    /// The longest a record may go without an in-progress ack: the ack wait, less a tenth for
    /// the time an ack takes to reach the server (the server counts from the delivery).
    fn limit(&self) -> Duration {
        self.ack_wait - self.ack_wait / 10
    }

    fn rounds(&self) -> std::sync::MutexGuard<'_, Rounds> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes a lapse if a record received at `oldest` (the earliest of those held at `now`)
    /// has gone unkept past the limit: the last round was longer ago than that, and so was
    /// its receipt. A record received during a long wait is young, and a process that held
    /// nothing through one (idle, suspended) lost nothing.
    fn note(&self, rounds: &mut Rounds, now: Instant, oldest: Option<Instant>) {
        if rounds.lapse.is_some() {
            return;
        }
        let Some(stale_before) = now.checked_sub(self.limit()) else {
            return;
        };
        match oldest {
            Some(oldest) if rounds.last < stale_before && oldest < stale_before => {
                rounds.lapse = Some(Lapse {
                    // How long the earliest record held went without one.
                    waited: now.saturating_duration_since(rounds.last.max(oldest)),
                    stale_before,
                });
            }
            _ => {}
        }
    }

    /// A round of in-progress acks starts at `now` for the records held, the earliest
    /// received at `oldest`: answers the lapse, this round's or an earlier one's.
    pub(super) fn round(&self, now: Instant, oldest: Option<Instant>) -> Option<Lapse> {
        let mut rounds = self.rounds();
        self.note(&mut rounds, now, oldest);
        rounds.last = now;
        rounds.lapse
    }

    /// The lapse noted by a round, if any.
    pub(super) fn lapsed(&self) -> Option<Lapse> {
        self.rounds().lapse
    }

    /// The lapse, noted by a round or under way at `now`: a thawed process may ask before its
    /// acker has run again. The records held are looked at only when a round is overdue.
    fn lapse_at(&self, now: Instant) -> Option<Lapse> {
        {
            let rounds = self.rounds();
            if rounds.lapse.is_some() || now.saturating_duration_since(rounds.last) <= self.limit()
            {
                return rounds.lapse;
            }
        }
        let oldest = oldest_held(&self.outstanding);
        let mut rounds = self.rounds();
        self.note(&mut rounds, now, oldest);
        rounds.lapse
    }

    fn lapsed_error(&self, lapse: Lapse) -> CommitError {
        CommitError {
            cause: format!(
                "this process held records {:.1} s without an in-progress ack, past the ack \
                 wait of {:.1} s (frozen or starved?): what it read may be another reader's \
                 now, so it stops rather than process that twice",
                lapse.waited.as_secs_f64(),
                self.ack_wait.as_secs_f64()
            )
            .into(),
        }
    }
}

/// The reply subjects of the records held.
fn held_replies(outstanding: &Outstanding) -> Vec<Subject> {
    match outstanding.lock().ok().as_deref() {
        Some(Some(lanes)) => lanes
            .values()
            // A lane whose lease is gone keeps nothing alive: another instance may hold the
            // same records by now.
            .filter(|lane| lane.may_ack())
            .flat_map(|lane| lane.records.values().map(|p| p.reply.clone()))
            .collect(),
        _ => Vec::new(),
    }
}

/// The cumulative acks every lane can send now.
fn advance_all(outstanding: &Outstanding) -> Vec<Subject> {
    match outstanding.lock().ok().as_deref_mut() {
        // A lane acking per record has nothing settled held: it acks each record at once.
        Some(Some(lanes)) => lanes.values_mut().filter_map(Lane::advance).collect(),
        _ => Vec::new(),
    }
}

/// Whether the connection is up: a cumulative ack worked out while it is down would wait in
/// the client until it is back, when the partition may be another instance's.
fn connected(client: &async_nats::Client) -> bool {
    client.connection_state() == async_nats::connection::State::Connected
}

/// When the earliest record held was received.
fn oldest_held(outstanding: &Outstanding) -> Option<Instant> {
    match outstanding.lock().ok().as_deref() {
        Some(Some(lanes)) => lanes
            .values()
            .flat_map(|lane| lane.records.values())
            .map(|p| p.received)
            .min(),
        _ => None,
    }
}

impl Checkpointer for NatsCheckpointer {
    /// Fails once the subscription has lapsed (a record it held went longer than the ack wait
    /// without an in-progress ack): the records read before and not yet dispatched are left
    /// to JetStream, which has given them, or will give them, to whichever reader asks.
    async fn owned(&mut self) -> Result<(), CommitError> {
        match &self.alive {
            Some(alive) => match alive.lapse_at(Instant::now()) {
                Some(lapse) => Err(alive.lapsed_error(lapse)),
                None => Ok(()),
            },
            None => Ok(()),
        }
    }

    async fn commit(&mut self, _checkpoints: &[Checkpoint]) -> Result<(), CommitError> {
        // Acks follow settlements; a commit makes sure those sent so far have left.
        let (done, flushed) = oneshot::channel();
        if let Some(ops) = &self.ops {
            if ops.send(AckOp::Flush(done)).is_ok() {
                let _ = flushed.await;
            }
        }
        Ok(())
    }

    fn settle(&mut self, record: &Record, settlement: Settlement) {
        let partition = record.partition.clone();
        let op = match settlement {
            Settlement::Faulted => AckOp::Term(partition, record.offset),
            _ => AckOp::Ack(partition, record.offset),
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
pub(super) async fn acker(
    client: async_nats::Client,
    mut ops: mpsc::UnboundedReceiver<AckOp>,
    outstanding: Outstanding,
    options: Arc<SubscriptionOptions>,
    alive: Option<Arc<KeptAlive>>,
    leases: Option<Leases>,
    closed: watch::Sender<bool>,
) {
    // A transient read's ack wait is not checked (it takes no acks): kept above zero here.
    let mut progress =
        tokio::time::interval((options.ack_wait / 3).max(Duration::from_millis(100)));
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    progress.tick().await;
    let mut taken = Vec::with_capacity(OPS_AT_ONCE);
    let mut sends: Vec<(Subject, AckKind)> = Vec::new();
    let mut lapse_told = false;
    loop {
        tokio::select! {
            n = ops.recv_many(&mut taken, OPS_AT_ONCE) => {
                if n == 0 {
                    break;
                }
                let answers = settle(&outstanding, &mut taken, &mut sends, connected(&client));
                for (reply, kind) in sends.drain(..) {
                    send(&client, reply, kind).await;
                }
                for (done, flush) in answers {
                    if flush {
                        let _ = client.flush().await;
                    }
                    let _ = done.send(());
                }
            },
            _ = progress.tick() => {
                let (replies, oldest) = (held_replies(&outstanding), oldest_held(&outstanding));
                let lapse = alive
                    .as_ref()
                    .and_then(|alive| alive.round(std::time::Instant::now(), oldest));
                if let (Some(lapse), false) = (lapse, lapse_told) {
                    lapse_told = true;
                    tracing::warn!(
                        waited_ms = lapse.waited.as_millis() as u64,
                        ack_wait_ms = options.ack_wait.as_millis() as u64,
                        "records held without in-progress acks for longer than the ack wait: \
                         they may be another reader's now, and the processor stops"
                    );
                }
                // Every record held is kept alive, a lapse or not: those being worked on, or
                // received since, are this process's still; for one another reader holds now,
                // this only holds that reader's delivery a little longer, while the processor
                // stops.
                for reply in replies {
                    send(&client, reply, AckKind::Progress).await;
                }
                // Cumulative acks held back (the connection was down, or a lease lapsed and
                // was taken again) go now.
                if connected(&client) {
                    for reply in advance_all(&outstanding) {
                        send(&client, reply, AckKind::Ack).await;
                    }
                }
            }
        }
    }
    // Closed: nak what the processor let go of. Records of a partition share one delay (the
    // one for the most delivered among them), so their order is kept when they come back.
    let lanes = outstanding
        .lock()
        .ok()
        .and_then(|mut o| o.take())
        .unwrap_or_default();
    let held = leases_held(&lanes);
    // Readers still pulling (a reader kept after its checkpointer went) let go of their
    // partitions: the leases go below.
    for lane in lanes.values() {
        lane.lost.notify_one();
    }
    // After a lapse, the records it may have cost are left as they are: JetStream gives them
    // to whoever asks without a nak (their ack wait has run out), and a nak could reach
    // another reader's delivery of them, which would then come a second time.
    let lapse = alive.as_ref().and_then(|alive| alive.lapsed());
    let mut lanes: Vec<Lane> = lanes
        .into_values()
        .map(|mut lane| {
            if let Some(lapse) = lapse {
                lane.records.retain(|_, p| !lapse.covers(p.received));
            }
            if !lane.may_ack() {
                // Its lease is gone: another instance may be reading the partition, and a
                // nak could reach its delivery of a record. The new holder has them all.
                lane.records.clear();
            }
            lane
        })
        .collect();
    if lapse.is_none() {
        futures_util::future::join_all(lanes.iter_mut().map(|lane| last_ack(&client, lane))).await;
    }
    let left: usize = lanes.iter().map(|lane| lane.records.len()).sum();
    if left > 0 {
        tracing::info!(records = left, "returning unfinished records to JetStream");
    }
    for lane in lanes {
        let delivered = lane
            .records
            .values()
            .map(|p| p.delivered)
            .max()
            .unwrap_or(1);
        let delay = options.nak_delay_for(delivered);
        for p in lane.records.into_values() {
            send(&client, p.reply, AckKind::Nak(Some(delay))).await;
        }
    }
    let _ = client.flush().await;
    // The last acks sent: the next instance may take the partitions now.
    if let Some(leases) = &leases {
        let releases = held
            .iter()
            .map(|(partition, held)| leases.release(partition, held));
        futures_util::future::join_all(releases).await;
    }
    let _ = closed.send(true);
}

/// Keeps a subscription's leases until it closes (the acker takes its lanes), writing them
/// again every [`RENEW_EVERY`] from the start: in a task of its own, so that neither a slow
/// bucket holds acks back nor a blocked connection write holds renewals back.
///
/// Every [`FLOOR_CHECK_EVERY`] renewals it also looks at each partition's ack floor
/// ([`check_floors`]).
pub(super) async fn keep_leases(leases: Leases, outstanding: Outstanding) {
    for round in 1u32.. {
        if !matches!(outstanding.lock().ok().as_deref(), Some(Some(_))) {
            return;
        }
        renew_leases(&leases, &outstanding).await;
        if round.is_multiple_of(FLOOR_CHECK_EVERY) {
            check_floors(&outstanding).await;
        }
        tokio::time::sleep(RENEW_EVERY).await;
    }
}

/// How many renewals apart the ack floors are looked at (10 s).
const FLOOR_CHECK_EVERY: u32 = 5;

/// Looks at the ack floor of each consumer read cumulatively: only this subscription's acks
/// move it, and they cover only what its reader read, so a floor past the reader's last
/// delivery is another's ack. That is a late ack of an instance that read the partition
/// before (its connection or host was down past its lease's term, and the ack waited in its
/// client), landing on the consumer made again since under the same name. The server then
/// ignores this reader's acks until its deliveries pass that floor, and counts what it
/// holds below it as acked; the partition's reader is told to make the consumer again where
/// it stands.
async fn check_floors(outstanding: &Outstanding) {
    let looks: Vec<(Arc<str>, async_nats::jetstream::consumer::PullConsumer)> =
        match outstanding.lock().ok().as_deref() {
            Some(Some(lanes)) => lanes
                .iter()
                .filter(|(_, lane)| lane.cumulative && !lane.paused && !lane.orphaned)
                .filter_map(|(partition, lane)| Some((partition.clone(), lane.consumer.clone()?)))
                .collect(),
            _ => return,
        };
    let infos = looks
        .into_iter()
        .map(|(partition, mut consumer)| async move {
            let made = consumer.cached_info().created;
            let info = tokio::time::timeout(RENEW_EVERY / 2, consumer.info()).await;
            match info {
                Ok(Ok(info)) if info.created == made => {
                    Some((partition, made, info.ack_floor.consumer_sequence))
                }
                _ => None,
            }
        });
    let floors = futures_util::future::join_all(infos).await;
    let Ok(mut guard) = outstanding.lock() else {
        return;
    };
    let Some(lanes) = guard.as_mut() else {
        return;
    };
    for (partition, made, floor) in floors.into_iter().flatten() {
        let Some(lane) = lanes.get_mut(&partition) else {
            continue;
        };
        // Read after the look: the reader's deliveries only grow while the consumer is the
        // same, and every ack it sent was of one of them.
        let same = lane
            .consumer
            .as_ref()
            .is_some_and(|c| c.cached_info().created == made);
        if same && !lane.paused && floor > lane.delivered {
            tracing::warn!(
                partition = %partition,
                floor,
                delivered = lane.delivered,
                "another's ack moved the consumer's ack floor past this reader's deliveries; \
                 making the consumer again where the reader stands"
            );
            lane.foreign = true;
            lane.paused = true;
            lane.lost.notify_one();
        }
    }
}

/// The leases the lanes hold, by partition.
fn leases_held(lanes: &HashMap<Arc<str>, Lane>) -> Vec<(Arc<str>, Held)> {
    lanes
        .iter()
        .filter_map(|(partition, lane)| Some((partition.clone(), lane.lease.clone()?)))
        .collect()
}

/// Writes the leases held again; a lease found another's, or not written again before it
/// runs out, is let go, and the partition's reader told.
async fn renew_leases(leases: &Leases, outstanding: &Outstanding) {
    let held = match outstanding.lock().ok().as_deref() {
        Some(Some(lanes)) => leases_held(lanes),
        _ => return,
    };
    let renewals = held.iter().map(|(partition, held)| async move {
        tokio::time::timeout(RENEW_EVERY / 2, leases.renew(partition, held))
            .await
            .unwrap_or_else(|_| Renewal::Failed(NatsError::js("renew a lease", "timed out")))
    });
    let renewals = futures_util::future::join_all(renewals).await;
    let now = std::time::Instant::now();
    let Ok(mut guard) = outstanding.lock() else {
        return;
    };
    let Some(lanes) = guard.as_mut() else {
        return;
    };
    for ((partition, before), renewal) in held.iter().zip(renewals) {
        let Some(lane) = lanes.get_mut(partition) else {
            continue;
        };
        if lane.lease.as_ref().map(|h| h.revision) != Some(before.revision) {
            continue;
        }
        let lost = match renewal {
            Renewal::Renewed(held) => {
                lane.lease = Some(held);
                false
            }
            Renewal::Lost => {
                tracing::warn!(
                    partition = %partition,
                    "the partition's lease is another instance's now (this one's ran out): \
                     letting the partition go"
                );
                true
            }
            Renewal::Failed(e) if !before.valid(now) => {
                tracing::warn!(
                    partition = %partition,
                    error = %e,
                    "the partition's lease could not be renewed before it ran out: letting \
                     the partition go"
                );
                true
            }
            Renewal::Failed(e) => {
                tracing::debug!(partition = %partition, error = %e, "renewing a lease failed");
                false
            }
        };
        if lost {
            lane.lease = None;
            lane.lost.notify_one();
        }
    }
}

/// An orphaned lane's one cumulative ack, at close, for what was settled after its reader
/// went: sent only if its consumer is still the one its records came from (another instance
/// may have made it again meanwhile; `Lane::orphaned`). What it does not cover is nak'd.
async fn last_ack(client: &async_nats::Client, lane: &mut Lane) {
    if !lane.cumulative || !lane.orphaned || lane.paused || !lane.has_settled_front() {
        return;
    }
    let Some(mut consumer) = lane.consumer.clone() else {
        return;
    };
    let made = consumer.cached_info().created;
    let same = matches!(
        tokio::time::timeout(Duration::from_secs(2), consumer.info()).await,
        Ok(Ok(info)) if info.created == made
    );
    if !same {
        tracing::info!(
            records = lane.records.len(),
            "the consumer was made again since its reader went: what the processor settled \
             since is returned, not acked"
        );
        return;
    }
    lane.orphaned = false;
    if let Some(reply) = lane.advance() {
        send(client, reply, AckKind::Ack).await;
    }
}

/// Applies settlements taken together: acks and terms to send go to `sends`, a partition's
/// cumulative ack once for all of them. Returns the flushes and barriers asked for (with
/// whether to flush), to answer once those are sent.
fn settle(
    outstanding: &Outstanding,
    taken: &mut Vec<AckOp>,
    sends: &mut Vec<(Subject, AckKind)>,
    connected: bool,
) -> Vec<(oneshot::Sender<()>, bool)> {
    let mut answers = Vec::new();
    let mut guard = outstanding.lock().ok();
    let mut lanes = guard.as_deref_mut().and_then(Option::as_mut);
    let mut moved: HashSet<Arc<str>> = HashSet::new();
    for op in taken.drain(..) {
        let (partition, sequence, kind) = match op {
            AckOp::Ack(partition, sequence) => (partition, sequence, AckKind::Ack),
            AckOp::Term(partition, sequence) => (partition, sequence, AckKind::Term),
            AckOp::Flush(done) => {
                answers.push((done, true));
                continue;
            }
            AckOp::Barrier(done) => {
                answers.push((done, false));
                continue;
            }
            AckOp::Advance(partition) => {
                moved.insert(partition);
                continue;
            }
        };
        let Some(lane) = lanes.as_mut().and_then(|l| l.get_mut(&partition)) else {
            continue;
        };
        if lane.cumulative {
            // A faulted record's fault is stored: it is acked with the records around it.
            if let Some(p) = lane.records.get_mut(&sequence) {
                p.settled = true;
                moved.insert(partition);
            }
        } else if let Some(p) = lane.take(sequence) {
            sends.push((p.reply, kind));
        }
    }
    if let (Some(lanes), true) = (lanes, connected) {
        for partition in &moved {
            if let Some(reply) = lanes.get_mut(partition).and_then(Lane::advance) {
                sends.push((reply, AckKind::Ack));
            }
        }
    }
    answers
}

pub(super) async fn send(client: &async_nats::Client, reply: Subject, kind: AckKind) {
    if let Err(e) = client.publish(reply, kind.into()).await {
        // The server redelivers after the ack wait; the sinks are idempotent.
        tracing::debug!(error = %e, "could not send an ack");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::super::Pending;
    use super::*;

    /// An ack wait of 3 s: a record may go 2.7 s without an in-progress ack.
    const WAIT: Duration = Duration::from_secs(3);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// One partition holding a record received at each of `received`.
    fn holding(received: &[Instant]) -> Outstanding {
        let mut lane = Lane::new(false);
        for (i, at) in (1..).zip(received) {
            let pending = Pending {
                reply: format!("reply.{i}").into(),
                delivered: 1,
                delivery: i,
                settled: false,
                behind: false,
                received: *at,
            };
            lane.hold(i, pending);
        }
        Arc::new(Mutex::new(Some(HashMap::from([(Arc::from("0"), lane)]))))
    }

    /// Rounds a third of the ack wait apart keep what is held alive; a round later than the
    /// limit while a record received before the wait is held is a lapse, for good, covering
    /// the records received before the limit; a long wait holding only records received
    /// during it, or nothing (an idle process, suspended), is not.
    #[test]
    fn a_subscription_lapses_only_when_a_record_went_unkept_past_the_ack_wait() {
        let alive = KeptAlive::new(WAIT, holding(&[]));
        let start = alive.rounds().last;
        let at = |n| start + ms(n);
        assert_eq!(alive.round(at(1_000), Some(at(500))), None);
        assert_eq!(alive.round(at(2_000), Some(at(500))), None);
        let lapse = alive.round(at(4_800), Some(at(500))).expect("a lapse");
        assert_eq!(lapse.waited, ms(2_800));
        assert!(lapse.covers(at(2_000)) && !lapse.covers(at(2_200)));
        assert_eq!(alive.round(at(5_000), None), Some(lapse));
        assert_eq!(alive.lapsed(), Some(lapse));

        let young = KeptAlive::new(WAIT, holding(&[]));
        let start = young.rounds().last;
        let at = |n| start + ms(n);
        assert_eq!(young.round(at(1_000), None), None);
        // Suspended an hour holding nothing; records read as it resumes are young.
        assert_eq!(young.round(at(3_601_000), Some(at(3_600_900))), None);
        assert_eq!(young.round(at(3_602_000), Some(at(3_600_900))), None);
        assert_eq!(young.lapsed(), None);

        // A record received after a round, and held past the limit before the next: the
        // lapse says how long it went without one.
        let late = KeptAlive::new(WAIT, holding(&[]));
        let start = late.rounds().last;
        let at = |n| start + ms(n);
        assert_eq!(late.round(at(1_000), None), None);
        let lapse = late.round(at(5_000), Some(at(1_500))).expect("a lapse");
        assert_eq!(lapse.waited, ms(3_500));
    }

    /// Asked before its acker's next round (a thawed process), the subscription looks at the
    /// records it holds: one held since before the limit is a lapse, noted for good; a young
    /// one is not, and a round on time is not looked at.
    #[test]
    fn a_lapse_under_way_is_seen_before_the_next_round() {
        let then = Instant::now();
        let alive = KeptAlive::new(WAIT, holding(&[then]));
        let start = alive.rounds().last;
        assert_eq!(alive.lapse_at(start + ms(2_000)), None);
        let lapse = alive.lapse_at(start + ms(3_000)).expect("a lapse");
        assert_eq!(lapse.waited, ms(3_000));
        assert_eq!(alive.lapsed(), Some(lapse));

        let young = KeptAlive::new(WAIT, holding(&[then + ms(10_000)]));
        let start = young.rounds().last;
        assert_eq!(young.lapse_at(start + ms(11_000)), None);
        assert_eq!(young.lapsed(), None);
    }
}
