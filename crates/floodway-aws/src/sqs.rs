//! SQS `SendMessageBatch`: events as message bodies.

use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use aws_sdk_sqs::Client;
use floodway::{Batch, Delivery, Error};

use crate::classify::{classify, classify_code};
use crate::{deliver_in_chunks, SQS};

/// Sends events to a queue, 10 messages and 256 KiB per call, and reports the messages the
/// service failed: through no fault of theirs, they are retried alone; a message the service
/// rejects as the sender's fault, or over 256 KiB, is poison. On a FIFO queue the partition
/// key is the message group and the event id the deduplication id (each sent as a stable id of
/// it when SQS would not take it: empty, over 128 characters, or with characters other than
/// letters, digits and ASCII punctuation).
#[derive(Debug, Clone)]
pub struct SqsSink {
    client: Client,
    queue_url: String,
    fifo: bool,
}

impl SqsSink {
    /// A sink to the queue at `queue_url` (FIFO if it ends in `.fifo`).
    pub fn new(config: &aws_config::SdkConfig, queue_url: impl Into<String>) -> Self {
        let queue_url = queue_url.into();
        SqsSink {
            client: Client::new(config),
            fifo: queue_url.ends_with(".fifo"),
            queue_url,
        }
    }

    async fn write(&self, batch: Batch) -> Result<Delivery, Error> {
        let mut delivery = Delivery::complete();
        let mut entries = Vec::with_capacity(batch.len());
        for (i, e) in batch.events().enumerate() {
            let body = e.to_json();
            if body.len() > SQS.entry {
                delivery.fail(
                    i,
                    Error::poison_msg(
                        "MessageTooLarge",
                        format!(
                            "event {} is {} bytes, over SQS' 256 KiB: use a claim check",
                            e.id(),
                            body.len()
                        ),
                    ),
                );
                continue;
            }
            let mut entry = SendMessageBatchRequestEntry::builder()
                .id(format!("m{i}"))
                .message_body(body);
            if self.fifo {
                entry = entry
                    .message_group_id(fifo_token(e.partition_key()))
                    .message_deduplication_id(fifo_token(e.id()));
            }
            match entry.build() {
                Ok(entry) => entries.push((i, entry)),
                Err(err) => delivery.fail(i, Error::poison_msg("AwsRequest", err.to_string())),
            }
        }
        let size = |e: &SendMessageBatchRequestEntry| e.message_body().len();
        // A FIFO queue keeps a group's order only if no message overtakes a failed one.
        let group =
            |m: &SendMessageBatchRequestEntry| m.message_group_id().unwrap_or_default().to_owned();
        deliver_in_chunks(
            delivery,
            entries,
            (SQS.entries, SQS.bytes),
            size,
            self.fifo
                .then_some(&group as &(dyn Fn(&SendMessageBatchRequestEntry) -> String + Sync)),
            |messages| {
                let (client, url) = (self.client.clone(), self.queue_url.clone());
                async move {
                    let ids: Vec<String> = messages.iter().map(|m| m.id().to_owned()).collect();
                    let out = client
                        .send_message_batch()
                        .queue_url(url)
                        .set_entries(Some(messages))
                        .send()
                        .await
                        .map_err(classify)?;
                    Ok(out
                        .failed()
                        .iter()
                        .filter_map(|f| {
                            let i = ids.iter().position(|id| id == f.id())?;
                            let message = f.message().unwrap_or_default();
                            Some((i, entry_error(f.code(), message, f.sender_fault())))
                        })
                        .collect())
                }
            },
        )
        .await
    }
}

floodway::impl_sink!(SqsSink, write);

/// A message group or deduplication id for `value`: itself when SQS takes it (1 to 128
/// characters, letters, digits and ASCII punctuation), else a stable id of it, so that one key
/// is always one group (in order) and one event id one deduplication id. An empty partition
/// key is a group of its own.
fn fifo_token(value: &str) -> String {
    let taken = (1..=128).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b.is_ascii_punctuation());
    match taken {
        true => value.to_owned(),
        false => floodway::event::stable_id(&[value]),
    }
}

/// The class of an entry SQS did not take: by its code first (a sender fault such as a KMS
/// key it cannot use is the configuration's, not the message's; a throttle, such as
/// `KMS.ThrottlingException` on an encrypted queue, is a throttle whoever SQS blames); an
/// unknown code that SQS calls the sender's fault is the message's (poison), one it does not
/// is its own (transient).
fn entry_error(code: &str, message: &str, sender_fault: bool) -> Error {
    let by_code = classify_code(code, message);
    if !sender_fault && by_code.class() == floodway::ErrorClass::Poison {
        return Error::transient_msg("AwsUnavailable", format!("{code}: {message}"));
    }
    // KMS's own transient codes stay transient, whatever SQS blames (its key is briefly
    // unavailable to SQS, not the message's fault).
    if sender_fault
        && by_code.class() == floodway::ErrorClass::Transient
        && !by_code.is_throttle()
        && !code.starts_with("KMS")
    {
        Error::poison_msg("AwsRejected", format!("{code}: {message}"))
    } else {
        by_code
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use floodway::ErrorClass;

    #[test]
    fn an_entry_throttled_is_a_throttle_whoever_sqs_blames() {
        let e = entry_error("KMS.ThrottlingException", "slow down", true);
        assert!(e.is_throttle(), "{e}");
        let e = entry_error("KMS.DisabledException", "key disabled", true);
        assert_eq!(e.class(), ErrorClass::Fatal);
        let e = entry_error("InternalError", "oops", false);
        assert_eq!(e.class(), ErrorClass::Transient);
        let e = entry_error("InvalidMessageContents", "bad", true);
        assert_eq!(e.class(), ErrorClass::Poison);
        // A code not known here that SQS says is not the sender's: sent again, not faulted.
        let e = entry_error("SomethingNewServerSide", "oops", false);
        assert_eq!(e.class(), ErrorClass::Transient);
        let e = entry_error("KMS.KeyUnavailableException", "key unavailable", true);
        assert_eq!(e.class(), ErrorClass::Transient);
    }
}
