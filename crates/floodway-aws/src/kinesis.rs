//! Kinesis `PutRecords`: events as records keyed by their partition key.

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use aws_sdk_kinesis::Client;
use floodway::{Error, Event};

use crate::classify::{classify, classify_code};
use crate::{chunks, first_error, send_failed_again};

/// Records per call.
const MAX_RECORDS: usize = 500;
/// Bytes per call (data and partition keys).
const MAX_BYTES: usize = 5 * 1024 * 1024;
/// Bytes per record.
const MAX_RECORD: usize = 1024 * 1024;

/// Publishes events to a stream, 500 records and 5 MiB per call, each with the event's
/// partition key (so a key keeps its order within its shard); records the service failed
/// (throughput exceeded, internal) are sent again a few times before the batch fails, each
/// with the records of its key that came after it (so the key's order holds).
/// Also a fault sink.
#[derive(Debug, Clone)]
pub struct KinesisSink {
    client: Client,
    stream: String,
    attempts: u32,
}

impl KinesisSink {
    /// A sink to the stream named `stream`.
    pub fn new(config: &aws_config::SdkConfig, stream: impl Into<String>) -> Self {
        KinesisSink {
            client: Client::new(config),
            stream: stream.into(),
            attempts: 3,
        }
    }

    /// Rounds of sending failed records again within one call (default 3).
    #[must_use]
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    async fn write(&self, events: Vec<Event>) -> Result<(), Error> {
        let mut entries = Vec::with_capacity(events.len());
        for e in &events {
            let data = match e.source_bytes() {
                Some(b) => b.to_vec(),
                None => e.to_json().into_bytes(),
            };
            if data.len() + e.partition_key().len() > MAX_RECORD {
                return Err(Error::poison_msg(
                    "RecordTooLarge",
                    format!(
                        "event {} is {} bytes, over Kinesis' 1 MiB: use a claim check",
                        e.id(),
                        data.len()
                    ),
                ));
            }
            let key = if e.partition_key().is_empty() {
                e.id()
            } else {
                e.partition_key()
            };
            entries.push(
                PutRecordsRequestEntry::builder()
                    .partition_key(key)
                    .data(Blob::new(data))
                    .build()
                    .map_err(|e| Error::poison_msg("AwsRequest", e.to_string()))?,
            );
        }
        let size = |e: &PutRecordsRequestEntry| {
            e.data().as_ref().len() + e.partition_key().map_or(0, str::len)
        };
        for chunk in chunks(entries, MAX_RECORDS, MAX_BYTES, size) {
            let client = self.client.clone();
            let stream = self.stream.clone();
            let failed = send_failed_again(chunk, self.attempts, |records| {
                let (client, stream) = (client.clone(), stream.clone());
                async move {
                    let keys: Vec<String> = records
                        .iter()
                        .map(|r| r.partition_key().unwrap_or_default().to_owned())
                        .collect();
                    let out = client
                        .put_records()
                        .stream_name(stream)
                        .set_records(Some(records))
                        .send()
                        .await
                        .map_err(classify)?;
                    let failed: Vec<(usize, Error)> = out
                        .records()
                        .iter()
                        .enumerate()
                        .filter_map(|(i, r)| {
                            r.error_code().map(|code| {
                                (
                                    i,
                                    classify_code(code, r.error_message().unwrap_or_default()),
                                )
                            })
                        })
                        .collect();
                    Ok(with_later_of_same_key(failed, &keys))
                }
            })
            .await?;
            first_error(failed)?;
        }
        Ok(())
    }
}

/// The failed records and every later record of a failed record's key: sent again together,
/// in order, so a key's records keep their order in the shard (the later ones are stored
/// twice; readers are idempotent).
fn with_later_of_same_key(failed: Vec<(usize, Error)>, keys: &[String]) -> Vec<(usize, Error)> {
    let mut out: Vec<(usize, Error)> = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let cause = failed
            .iter()
            .find(|(j, _)| *j == i)
            .or_else(|| failed.iter().find(|(j, _)| *j < i && keys[*j] == *key));
        if let Some((_, e)) = cause {
            let again =
                Error::transient_msg(e.name().to_owned(), e.to_string()).with_class(e.class());
            out.push((i, again));
        }
    }
    out
}

crate::batch_sink!(KinesisSink);
crate::event_sink!(KinesisSink, MAX_RECORD - 1024);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_record_takes_the_later_records_of_its_key_along() {
        let keys: Vec<String> = ["a", "b", "a", "c", "a", "b"]
            .iter()
            .map(|k| (*k).to_owned())
            .collect();
        let failed = vec![(2, Error::throttled_msg("T", "slow"))];
        let again: Vec<usize> = with_later_of_same_key(failed, &keys)
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        assert_eq!(again, vec![2, 4]);
    }
}
