//! Kinesis `PutRecords`: events as records keyed by their partition key.

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use aws_sdk_kinesis::Client;
use floodway::{Batch, Delivery, Error};

use crate::classify::{classify, failed_entries};
use crate::{deliver_in_chunks, KINESIS};

/// Publishes events to a stream, 500 records and 5 MiB per call, each with the event's
/// partition key (so a key keeps its order within its shard; a key over Kinesis' 256
/// characters is sent as a stable id of it, the event's id when it is empty). The records the service failed
/// (throughput exceeded, internal) are reported, each with the records of its key that came
/// after it (in its call, and held back from later calls), so that only those are sent again
/// and a key's order holds (a later record may be stored twice; readers are idempotent). A record over
/// 1 MiB is poison (use a claim check). Also a fault sink.
#[derive(Debug, Clone)]
pub struct KinesisSink {
    client: Client,
    stream: String,
}

impl KinesisSink {
    /// A sink to the stream named `stream`.
    pub fn new(config: &aws_config::SdkConfig, stream: impl Into<String>) -> Self {
        KinesisSink {
            client: Client::new(config),
            stream: stream.into(),
        }
    }

    async fn write(&self, batch: Batch) -> Result<Delivery, Error> {
        let mut delivery = Delivery::complete();
        let mut entries = Vec::with_capacity(batch.len());
        for (i, e) in batch.events().enumerate() {
            let data = e.to_bytes();
            let key = record_key(if e.partition_key().is_empty() {
                e.id()
            } else {
                e.partition_key()
            });
            if data.len() + key.len() > KINESIS.entry {
                delivery.fail(
                    i,
                    Error::poison_msg(
                        "RecordTooLarge",
                        format!(
                            "event {} is {} bytes, over Kinesis' 1 MiB: use a claim check",
                            e.id(),
                            data.len()
                        ),
                    ),
                );
                continue;
            }
            let entry = PutRecordsRequestEntry::builder()
                .partition_key(key)
                .data(Blob::new(data))
                .build();
            match entry {
                Ok(entry) => entries.push((i, entry)),
                Err(err) => delivery.fail(i, Error::poison_msg("AwsRequest", err.to_string())),
            }
        }
        let size = |e: &PutRecordsRequestEntry| {
            e.data().as_ref().len() + e.partition_key().map_or(0, str::len)
        };
        let key = |e: &PutRecordsRequestEntry| e.partition_key().unwrap_or_default().to_owned();
        deliver_in_chunks(
            delivery,
            entries,
            (KINESIS.entries, KINESIS.bytes),
            size,
            Some(&key),
            |records| {
                let (client, stream) = (self.client.clone(), self.stream.clone());
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
                    let failed = failed_entries(
                        out.records()
                            .iter()
                            .map(|r| (r.error_code(), r.error_message())),
                    );
                    Ok(with_later_of_same_key(failed, &keys))
                }
            },
        )
        .await
    }
}

/// The partition key of a record: the event's, or, over Kinesis' 256 characters, a stable id
/// of it (the same key always maps to the same one, so its records stay in one shard, in
/// order; readers take the key from the event, not the record).
fn record_key(key: &str) -> String {
    match key.chars().count() > 256 {
        true => floodway::event::stable_id(&[key]),
        false => key.to_owned(),
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
            out.push((i, e.copied()));
        }
    }
    out
}

floodway::impl_sink!(KinesisSink, write);
floodway::impl_fault_sink!(KinesisSink, write, KINESIS.entry - 1024);

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
