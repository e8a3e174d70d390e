//! Acknowledging: settlements become acks (cumulative where the consumer takes them) and
//! terminations; what is let go unfinished is nak'd with a delay.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::options::SubscriptionOptions;
use super::{AckOp, Lane, NatsCheckpointer, Outstanding};
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
/// acker sends those for every record held, a third of the ack wait apart. A process that let
/// more than that pass without a round of them (frozen, suspended, its runtime starved) may
/// hold records another reader is processing now: it has lapsed, for good.
#[derive(Debug)]
pub(super) struct KeptAlive {
    ack_wait: Duration,
    state: Mutex<Rounds>,
}

#[derive(Debug)]
struct Rounds {
    /// When the last round of in-progress acks started (or the subscription, before any).
    last: Instant,
    /// Whether it held records then.
    held: bool,
    /// The wait between two rounds that was past the limit, once there was one.
    lapsed: Option<Duration>,
}

impl KeptAlive {
    pub(super) fn new(ack_wait: Duration) -> KeptAlive {
        KeptAlive {
            ack_wait,
            state: Mutex::new(Rounds {
                last: Instant::now(),
                held: false,
                lapsed: None,
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

    /// A round of in-progress acks starts, for records if it `held` any: answers the lapse, if
    /// the wait since the last round (or an earlier wait) was past the limit while it held
    /// records. A process that held none through a long wait (an idle one, suspended) has
    /// nothing another reader could have been given.
    fn round(&self, held: bool) -> Option<Duration> {
        self.round_at(Instant::now(), held)
    }

    fn round_at(&self, now: Instant, held: bool) -> Option<Duration> {
        let limit = self.limit();
        let mut rounds = self.rounds();
        let gap = now.saturating_duration_since(rounds.last);
        if gap > limit && (held || rounds.held) && rounds.lapsed.is_none() {
            rounds.lapsed = Some(gap);
        }
        rounds.last = now;
        rounds.held = held;
        rounds.lapsed
    }

    /// The lapse, if there was one: noted by a round, or under way (a thawed process asks,
    /// holding the batch it asks for, before its acker has run again).
    fn lapse(&self) -> Option<Duration> {
        self.lapse_at(Instant::now())
    }

    fn lapse_at(&self, now: Instant) -> Option<Duration> {
        let rounds = self.rounds();
        rounds.lapsed.or_else(|| {
            let gap = now.saturating_duration_since(rounds.last);
            (gap > self.limit()).then_some(gap)
        })
    }

    fn lapsed_error(&self, gap: Duration) -> CommitError {
        CommitError {
            cause: format!(
                "this process sent JetStream no in-progress ack for {:.1} s, past the ack wait \
                 of {:.1} s (frozen or starved?): what it read may be another reader's now, so \
                 it stops rather than process that twice",
                gap.as_secs_f64(),
                self.ack_wait.as_secs_f64()
            )
            .into(),
        }
    }
}

impl Checkpointer for NatsCheckpointer {
    /// Fails once the subscription has lapsed (it went longer than its ack wait without
    /// keeping what it holds alive): the records read before and not yet dispatched are left
    /// to JetStream, which has given them, or will give them, to whichever reader asks.
    async fn owned(&mut self) -> Result<(), CommitError> {
        match &self.alive {
            Some(alive) => match alive.lapse() {
                Some(gap) => Err(alive.lapsed_error(gap)),
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
                let answers = settle(&outstanding, &mut taken, &mut sends);
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
                let replies: Vec<Subject> = match outstanding.lock().ok().as_deref() {
                    Some(Some(lanes)) => lanes
                        .values()
                        .flat_map(|lane| lane.records.values().map(|p| p.reply.clone()))
                        .collect(),
                    _ => Vec::new(),
                };
                let held = !replies.is_empty();
                if let Some(gap) = alive.as_ref().and_then(|alive| alive.round(held)) {
                    // What it holds may be another reader's now: keeping it alive would hold
                    // that reader's delivery up, not this one's.
                    if !lapse_told {
                        lapse_told = true;
                        tracing::warn!(
                            waited_ms = gap.as_millis() as u64,
                            ack_wait_ms = options.ack_wait.as_millis() as u64,
                            "no in-progress acks for longer than the ack wait: the records read \
                             may be another reader's now, and are left to JetStream"
                        );
                    }
                    continue;
                }
                for reply in replies {
                    send(&client, reply, AckKind::Progress).await;
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
    let left: usize = lanes.values().map(|lane| lane.records.len()).sum();
    if alive.as_ref().is_some_and(|alive| alive.lapse().is_some()) {
        // Their ack wait has run out: JetStream gives them to whoever asks, without a nak, and
        // a nak now could reach another reader's delivery of them.
        let _ = client.flush().await;
        let _ = closed.send(true);
        return;
    }
    if left > 0 {
        tracing::info!(records = left, "returning unfinished records to JetStream");
    }
    for lane in lanes.into_values() {
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
    let _ = closed.send(true);
}

/// Applies settlements taken together: acks and terms to send go to `sends`, a partition's
/// cumulative ack once for all of them. Returns the flushes and barriers asked for (with
/// whether to flush), to answer once those are sent.
fn settle(
    outstanding: &Outstanding,
    taken: &mut Vec<AckOp>,
    sends: &mut Vec<(Subject, AckKind)>,
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
    if let Some(lanes) = lanes {
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
    use super::*;

    const WAIT: Duration = Duration::from_secs(3);

    /// Rounds a third of the ack wait apart keep what is held alive; a round late by more than
    /// the limit while records were held is a lapse, for good; a long wait holding nothing
    /// (an idle process, suspended) is not.
    #[test]
    fn a_subscription_lapses_only_when_it_held_records_past_the_ack_wait() {
        let alive = KeptAlive::new(WAIT);
        let start = alive.rounds().last;
        let at = |ms: u64| start + Duration::from_millis(ms);
        assert_eq!(alive.round_at(at(1_000), true), None);
        assert_eq!(alive.round_at(at(2_000), true), None);
        // The last round held records; a round 2.8 s later (past 0.9 of the wait) finds none
        // held any more, but they went unkept that long.
        assert_eq!(alive.lapse_at(at(4_500)), None);
        assert_eq!(
            alive.round_at(at(4_800), false),
            Some(Duration::from_millis(2_800))
        );
        assert_eq!(
            alive.round_at(at(5_000), false),
            Some(Duration::from_millis(2_800))
        );
        assert_eq!(
            alive.lapse_at(at(5_100)),
            Some(Duration::from_millis(2_800))
        );

        let idle = KeptAlive::new(WAIT);
        let start = idle.rounds().last;
        let at = |ms: u64| start + Duration::from_millis(ms);
        assert_eq!(idle.round_at(at(1_000), false), None);
        // Suspended an hour holding nothing: its first round after is due at once, before a
        // pull (a round trip to the server) brings records.
        assert_eq!(idle.round_at(at(3_601_000), false), None);
        assert_eq!(idle.round_at(at(3_602_000), true), None);
        assert_eq!(idle.lapse_at(at(3_602_500)), None);
        // Asked before a round after a long wait: the batch asked for is held.
        assert_eq!(
            idle.lapse_at(at(3_605_000)),
            Some(Duration::from_millis(3_000))
        );
    }
}
