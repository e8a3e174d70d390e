//! Publishing in JetStream's fast-ingest batches (nats-server 2.14+, a stream with
//! `allow_batched`): a batch of messages sent without waiting, stored one by one as they come,
//! and acknowledged once, where a plain publish gets an ack a message.
//!
//! The protocol lives in each message's reply subject,
//! `<inbox>.<flow>.fail.<sequence>.<operation>.$FI` (the inbox's last token is the batch's
//! id): the server answers on it with a flow ack at least every `<flow>` messages stored, and
//! with the batch's ack when the commit (the last message) is stored. In the `fail` gap mode a message
//! missing on the way, or one the stream refuses, ends the batch there: the ack then counts
//! the messages before it, and nothing after it is stored. So the batch's ack, or failing
//! that the last flow ack, names a prefix of the batch that is stored (repeats of an id
//! inside the duplicate window are skipped, as on a plain publish), and the rest of the batch
//! is sent again message by message, each acked ([`NatsHub::publish`]), before the next batch
//! goes: the ids skip anything of it that was stored after all, and each key's events stay in
//! their order.
//!
//! What a batch cannot say is how many of its messages were repeats: a publish that must
//! tell (the contract's receipt, `floodway hub publish`'s count) goes message by message.

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use floodway::event::key_hash;
use floodway::Event;
use futures_util::StreamExt;

use crate::error::NatsError;
use crate::hub::NatsHub;

/// Messages in one batch at most; a longer publish is sent as several of about equal size,
/// one after another.
const BATCH: usize = 1_000;
/// Fewer events than this are published message by message: a batch costs a subscription of
/// its own and a few answers, which a handful of per-message acks do not outweigh.
const FEWEST: usize = 8;
/// A flow ack is asked for at least every this many messages (the server sends them more
/// often while several batches are open): how much of a batch is known stored if its ack
/// never comes.
const FLOW: usize = 100;
/// After this long without an answer, the server is asked where the batch stands (a ping).
const SILENCE: Duration = Duration::from_secs(1);

/// The batch operations, as the reply subject carries them.
const START: u8 = 0;
const APPEND: u8 = 1;
const COMMIT: u8 = 2;
const PING: u8 = 4;

/// The server's error code for a stream that does not (or no longer) take batches.
const DISABLED: u64 = 10205;

impl NatsHub {
    /// Publishes `events` as [`NatsHub::publish`] does (ids as `Nats-Msg-Id`, every event
    /// stored when this returns, each key's events in order), in fast-ingest batches where
    /// the stream takes them: one ack for up to 1,000 messages. No receipt: a batch does not
    /// say which of its messages were repeats.
    ///
    /// # Errors
    /// As [`NatsHub::publish`]'s, from the part sent message by message.
    pub async fn publish_fast(&self, events: &[Event]) -> Result<(), NatsError> {
        if events.len() < FEWEST || !self.publishes_in_batches() {
            return self.publish(events).await.map(|_| ());
        }
        let payloads = self.payloads(events)?;
        // Batches of about equal size, so that none is a handful.
        let size = events.len().div_ceil(events.len().div_ceil(BATCH));
        for (events, payloads) in events.chunks(size).zip(payloads.chunks(size)) {
            let stored = if self.publishes_in_batches() {
                self.fast_batch(events, payloads).await
            } else {
                0
            };
            if stored < events.len() {
                // The rest of this batch, before the next batch goes: each key's events stay
                // in order.
                tracing::debug!(
                    stream = %self.inner.stream,
                    unconfirmed = events.len() - stored,
                    "a fast-ingest batch ended early: the rest published message by message"
                );
                self.publish_each(&events[stored..], &payloads[stored..])
                    .await?;
            }
        }
        Ok(())
    }

    /// Sends one batch and answers how many of its first messages are known stored (all of
    /// them when the batch's ack says so).
    async fn fast_batch(&self, events: &[Event], payloads: &[Bytes]) -> usize {
        let client = &self.inner.client;
        let inbox = client.new_inbox();
        let Ok(mut answers) = client.subscribe(format!("{inbox}.>")).await else {
            return 0;
        };
        let last = events.len();
        for (i, (event, payload)) in events.iter().zip(payloads).enumerate() {
            let sequence = i + 1;
            let operation = match sequence {
                s if s == last => COMMIT,
                1 => START,
                _ => APPEND,
            };
            let subject = self.subject_of(event, key_hash(event.partition_key()));
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, event.id());
            let sent = client
                .publish_with_reply_and_headers(
                    subject,
                    format!("{inbox}.{FLOW}.fail.{sequence}.{operation}.$FI"),
                    headers,
                    payload.clone(),
                )
                .await;
            if sent.is_err() {
                // What went before may be stored; the ids skip it when it is sent again.
                return 0;
            }
        }
        let deadline = tokio::time::Instant::now() + self.inner.request_timeout;
        // The highest sequence a flow ack said was stored.
        let mut stored = 0;
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return stored;
            }
            match tokio::time::timeout(SILENCE.min(deadline - now), answers.next()).await {
                Ok(Some(answer)) => match Answer::read(&answer.payload) {
                    Answer::Done(count) => return count.min(last),
                    Answer::Flow(sequence) => stored = stored.max(sequence.min(last)),
                    Answer::Note => {}
                    Answer::Refused(code) => {
                        if code == Some(DISABLED) {
                            self.inner.fast_ingest.store(false, Ordering::Relaxed);
                            tracing::warn!(
                                stream = %self.inner.stream,
                                "the stream no longer takes fast-ingest batches: publishing \
                                 message by message"
                            );
                        }
                        return stored;
                    }
                },
                Ok(None) => return stored,
                // Silence: ask where the batch stands, on any subject of the stream. A batch
                // short of its last message is then ended where it is (and acked); a
                // finished one answers again.
                Err(_) => {
                    let asked = client
                        .publish_with_reply(
                            self.inner.partition_subjects[0].clone(),
                            format!("{inbox}.{FLOW}.fail.{last}.{PING}.$FI"),
                            Bytes::new(),
                        )
                        .await;
                    if asked.is_err() {
                        return stored;
                    }
                }
            }
        }
    }
}

/// An answer to a batch.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// The batch's ack: its first `n` messages are stored (or were repeats), the rest not.
    Done(usize),
    /// A flow ack: the messages up to this sequence are stored.
    Flow(usize),
    /// A gap or an error within the batch, which its ack follows.
    Note,
    /// The server refused the batch outright (with its error code): where it stands is
    /// unknown beyond the flow acks.
    Refused(Option<u64>),
}

impl Answer {
    fn read(payload: &[u8]) -> Answer {
        let Ok(answer) = serde_json::from_slice::<serde_json::Value>(payload) else {
            return Answer::Refused(None);
        };
        let number = |field: &str| {
            answer
                .get(field)
                .and_then(serde_json::Value::as_u64)
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
        };
        match answer.get("type").and_then(serde_json::Value::as_str) {
            Some("ack") => Answer::Flow(number("seq").unwrap_or(0)),
            Some(_) => Answer::Note,
            None => match (answer.get("error"), answer.get("batch"), number("count")) {
                (None, Some(_), Some(count)) => Answer::Done(count),
                (error, _, _) => Answer::Refused(
                    error
                        .and_then(|e| e.get("err_code"))
                        .and_then(serde_json::Value::as_u64),
                ),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_as_the_server_sends_them() {
        // As nats-server 2.15 sends them.
        assert_eq!(
            Answer::read(br#"{"type":"ack","seq":500,"msgs":500}"#),
            Answer::Flow(500)
        );
        assert_eq!(
            Answer::read(
                br#"{"stream":"P","seq":101000,"batch":"wQMQolKKvCxolS52ndDhDb","count":1000}"#
            ),
            Answer::Done(1000)
        );
        // Every message a repeat: nothing stored, the stream's sequence not given.
        assert_eq!(
            Answer::read(br#"{"stream":"P","seq":0,"batch":"x","count":1000}"#),
            Answer::Done(1000)
        );
        assert_eq!(
            Answer::read(br#"{"type":"gap","last_seq":4,"seq":6}"#),
            Answer::Note
        );
        assert_eq!(
            Answer::read(
                br#"{"type":"err","seq":7,"error":{"code":400,"err_code":10054,"description":"maximum messages exceeded"}}"#
            ),
            Answer::Note
        );
        assert_eq!(
            Answer::read(
                br#"{"error":{"code":400,"err_code":10205,"description":"batch publish is disabled"},"stream":"P","seq":0}"#
            ),
            Answer::Refused(Some(DISABLED))
        );
        assert_eq!(Answer::read(b"not json"), Answer::Refused(None));
    }
}
