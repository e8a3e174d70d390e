//! SQS `SendMessageBatch`: events as message bodies.

use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use aws_sdk_sqs::Client;
use floodway::{Error, Event};

use crate::classify::{classify, classify_code};
use crate::{chunks, first_error, send_failed_again};

/// Messages per call.
const MAX_MESSAGES: usize = 10;
/// Bytes per call.
const MAX_BYTES: usize = 256 * 1024;

/// Sends events to a queue, 10 messages and 256 KiB per call; messages the service failed
/// through no fault of theirs are sent again, alone, a few times; a message the service
/// rejects as the sender's fault is poison. On a FIFO queue the partition key is the message
/// group and the event id the deduplication id.
#[derive(Debug, Clone)]
pub struct SqsSink {
    client: Client,
    queue_url: String,
    fifo: bool,
    attempts: u32,
}

impl SqsSink {
    /// A sink to the queue at `queue_url` (FIFO if it ends in `.fifo`).
    pub fn new(config: &aws_config::SdkConfig, queue_url: impl Into<String>) -> Self {
        let queue_url = queue_url.into();
        SqsSink {
            client: Client::new(config),
            fifo: queue_url.ends_with(".fifo"),
            queue_url,
            attempts: 3,
        }
    }

    async fn write(&self, events: Vec<Event>) -> Result<(), Error> {
        let mut entries = Vec::with_capacity(events.len());
        for (i, e) in events.iter().enumerate() {
            let body = e.to_json();
            if body.len() > MAX_BYTES {
                return Err(Error::poison_msg(
                    "MessageTooLarge",
                    format!(
                        "event {} is {} bytes, over SQS' 256 KiB: use a claim check",
                        e.id(),
                        body.len()
                    ),
                ));
            }
            let mut entry = SendMessageBatchRequestEntry::builder()
                .id(format!("m{i}"))
                .message_body(body);
            if self.fifo {
                entry = entry
                    .message_group_id(e.partition_key())
                    .message_deduplication_id(e.id());
            }
            entries.push(
                entry
                    .build()
                    .map_err(|e| Error::poison_msg("AwsRequest", e.to_string()))?,
            );
        }
        let size = |e: &SendMessageBatchRequestEntry| e.message_body().len();
        for chunk in chunks(entries, MAX_MESSAGES, MAX_BYTES, size) {
            let client = self.client.clone();
            let url = self.queue_url.clone();
            let failed = send_failed_again(chunk, self.attempts, |messages| {
                let (client, url) = (client.clone(), url.clone());
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
                            // The code first: a sender fault such as a KMS key it cannot use is
                            // the configuration's, not the message's.
                            let by_code = classify_code(f.code(), message);
                            let error = if f.sender_fault()
                                && by_code.class() == floodway::ErrorClass::Transient
                            {
                                Error::poison_msg("AwsRejected", format!("{}: {message}", f.code()))
                            } else {
                                by_code
                            };
                            Some((i, error))
                        })
                        .collect())
                }
            })
            .await?;
            first_error(failed)?;
        }
        Ok(())
    }
}

crate::batch_sink!(SqsSink);
