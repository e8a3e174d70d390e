//! Acknowledging: settlements become acks (cumulative where the consumer takes them) and
//! terminations; what is let go unfinished is nak'd with a delay.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

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

impl Checkpointer for NatsCheckpointer {
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
    closed: watch::Sender<bool>,
) {
    // A transient read's ack wait is not checked (it takes no acks): kept above zero here.
    let mut progress =
        tokio::time::interval((options.ack_wait / 3).max(Duration::from_millis(100)));
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    progress.tick().await;
    let mut taken = Vec::with_capacity(OPS_AT_ONCE);
    let mut sends: Vec<(Subject, AckKind)> = Vec::new();
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
