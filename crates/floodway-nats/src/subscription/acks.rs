//! Acknowledging: settlements become acks and terminations; what is let go unfinished is
//! nak'd with a delay.

use std::collections::HashMap;
use std::sync::Arc;

use super::options::SubscriptionOptions;
use super::{AckOp, NatsCheckpointer, Outstanding, Pending};
use async_nats::jetstream::AckKind;
use async_nats::Subject;
use floodway::error::CommitError;
use floodway::{Checkpoint, Checkpointer, Record, Settlement};
use tokio::sync::{mpsc, oneshot, watch};

impl Checkpointer for NatsCheckpointer {
    async fn commit(&mut self, _checkpoints: &[Checkpoint]) -> Result<(), CommitError> {
        // Acks are per record; a commit makes sure those settled so far have left.
        let (done, flushed) = oneshot::channel();
        if let Some(ops) = &self.ops {
            if ops.send(AckOp::Flush(done)).is_ok() {
                let _ = flushed.await;
            }
        }
        Ok(())
    }

    fn settle(&mut self, record: &Record, settlement: Settlement) {
        let op = match settlement {
            Settlement::Faulted => AckOp::Term(record.offset),
            _ => AckOp::Ack(record.offset),
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
    let mut progress = tokio::time::interval(options.ack_wait / 3);
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    progress.tick().await;
    let take = |sequence: u64| -> Option<Subject> {
        outstanding
            .lock()
            .ok()?
            .as_mut()?
            .remove(&sequence)
            .map(|p| p.reply)
    };
    loop {
        tokio::select! {
            op = ops.recv() => match op {
                Some(AckOp::Ack(sequence)) => {
                    if let Some(reply) = take(sequence) {
                        send(&client, reply, AckKind::Ack).await;
                    }
                }
                Some(AckOp::Term(sequence)) => {
                    if let Some(reply) = take(sequence) {
                        send(&client, reply, AckKind::Term).await;
                    }
                }
                Some(AckOp::Flush(done)) => {
                    let _ = client.flush().await;
                    let _ = done.send(());
                }
                None => break,
            },
            _ = progress.tick() => {
                let replies: Vec<Subject> = match outstanding.lock().ok().as_deref() {
                    Some(Some(map)) => map.values().map(|p| p.reply.clone()).collect(),
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
    let left = outstanding
        .lock()
        .ok()
        .and_then(|mut o| o.take())
        .unwrap_or_default();
    let mut delivered: HashMap<Arc<str>, u32> = HashMap::new();
    for p in left.values() {
        let d = delivered.entry(p.partition.clone()).or_default();
        *d = (*d).max(p.delivered);
    }
    let mut left: Vec<(u64, Pending)> = left.into_iter().collect();
    left.sort_by_key(|(sequence, _)| *sequence);
    if !left.is_empty() {
        tracing::info!(
            records = left.len(),
            "returning unfinished records to JetStream"
        );
    }
    for (_, p) in left {
        let delay = options.nak_delay_for(delivered[&p.partition]);
        send(&client, p.reply, AckKind::Nak(Some(delay))).await;
    }
    let _ = client.flush().await;
    let _ = closed.send(true);
}

pub(super) async fn send(client: &async_nats::Client, reply: Subject, kind: AckKind) {
    if let Err(e) = client.publish(reply, kind.into()).await {
        // The server redelivers after the ack wait; the sinks are idempotent.
        tracing::debug!(error = %e, "could not send an ack");
    }
}
