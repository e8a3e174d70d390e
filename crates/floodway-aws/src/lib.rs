//! Floodway's AWS sinks, each a `tower::Service<Batch>` that takes the core's resilience
//! layers and reports which entries failed, so that the layers retry and the runtime faults
//! only those:
//!
//! | sink | call | per call |
//! |---|---|---|
//! | [`EventBridgeSink`] | `PutEvents` | 10 entries, 256 KiB |
//! | [`KinesisSink`] | `PutRecords` | 500 records, 5 MiB |
//! | [`SqsSink`] | `SendMessageBatch` | 10 messages, 256 KiB |
//! | [`DynamoDbView`] | `UpdateItem`, conditional on the stored `(timestamp, id)` | one per event, concurrently |
//! | [`S3Lake`] | `PutObject` (the event lake) | one per event |
//!
//! [`EventBridgeSink`] and [`KinesisSink`] are also fault sinks (`Service<Event>`);
//! [`DynamoDbFaults`] and [`S3Faults`] store fault events for a fault monitor; [`ClaimCheck`]
//! moves large events to S3 and redeems them on the reading side; [`resubmit`] invokes the
//! function that failed a fault again, with a payload limited to the failing pipeline, and
//! [`LambdaResubmitter`] records how it went (what `floodway faults resubmit
//! --dynamodb-table` runs). [`KmsKeys`] gives data keys from AWS KMS for envelope encryption
//! (`floodway::encryption`, as aws-kms-ee). [`testing`] starts a real `moto_server` for tests.
//!
//! Errors are classified for the core: throttling is a throttle, 5xx and network failures are
//! transient, a request the service rejects for its content is poison, and missing resources
//! or permissions are fatal (fix the configuration).
//!
//! This crate alone compiles the AWS SDK, so the other crates build quickly.

mod claim;
use floodway::Delivery;

mod cep;
mod classify;
mod dynamodb;
mod eventbridge;
mod faults;
mod kinesis;
mod kms;
mod rows;
mod s3;
mod sqs;
pub mod testing;

pub use aws_config::SdkConfig;
pub use cep::{CepSink, DynamoDbCep, Fired, TimerSchedules, TIMER_DUE};
pub use claim::ClaimCheck;
pub use classify::classify;
pub use dynamodb::{DynamoDbState, DynamoDbView};
pub use eventbridge::EventBridgeSink;
pub use faults::{resubmit, DynamoDbFaults, LambdaResubmitter, Resubmitted, S3Faults};
pub use floodway::fault_store::StoredFault;
pub use kinesis::KinesisSink;
pub use kms::KmsKeys;
pub use rows::DynamoDbRows;
pub use s3::S3Lake;
pub use sqs::SqsSink;

/// Loads the AWS configuration from the environment (credentials, region), with an optional
/// endpoint for every service (a local emulator such as moto, or a VPC endpoint).
pub async fn sdk_config(region: Option<&str>, endpoint: Option<&str>) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(region) = region {
        loader = loader.region(aws_config::Region::new(region.to_owned()));
    }
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    loader.load().await
}

/// An S3 client with path-style addressing (which every endpoint, emulators included, takes).
pub(crate) fn s3_client(config: &aws_config::SdkConfig) -> aws_sdk_s3::Client {
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(config)
            .force_path_style(true)
            .build(),
    )
}

/// What one batch call of a service takes at most: entries, their bytes together, and one
/// entry's bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallLimits {
    pub(crate) entries: usize,
    pub(crate) bytes: usize,
    pub(crate) entry: usize,
}

/// `PutEvents`: EventBridge counts each entry's detail, detail-type and source.
pub(crate) const EVENTBRIDGE: CallLimits = CallLimits {
    entries: 10,
    bytes: 256 * 1024,
    entry: 256 * 1024,
};

/// `PutRecords`: data and partition keys.
pub(crate) const KINESIS: CallLimits = CallLimits {
    entries: 500,
    bytes: 5 * 1024 * 1024,
    entry: 1024 * 1024,
};

/// `SendMessageBatch`: message bodies.
pub(crate) const SQS: CallLimits = CallLimits {
    entries: 10,
    bytes: 256 * 1024,
    entry: 256 * 1024,
};

/// Sends a batch's entries (each with its position in the batch) in chunks of at most `count`
/// entries and `bytes` bytes, one call of `send` per chunk, which answers the entries of the
/// chunk the service failed. Entries already failed in `delivery` are not given.
///
/// A first chunk that fails as a whole fails the call (nothing was delivered: the stack
/// retries it, or bisects it to find a poison entry), as does a poison or fatal failure of a
/// later one. A later chunk failing for another reason fails its entries and every entry after
/// it, which are not sent: the stack sends again only those. With a `key` (the entries'
/// order key: a partition key, a message group), an entry failed in a chunk also holds back
/// the later entries of its key, not sent, so that none overtakes it; the other keys' entries
/// go on (held back for a key they do not share, they would wait on it, and be faulted with
/// it when its retries give up, never sent).
pub(crate) async fn deliver_in_chunks<T, F, Fut>(
    mut delivery: Delivery,
    entries: Vec<(usize, T)>,
    (count, bytes): (usize, usize),
    size: impl Fn(&T) -> usize,
    key: Option<&(dyn Fn(&T) -> String + Sync)>,
    mut send: F,
) -> Result<Delivery, floodway::Error>
where
    F: FnMut(Vec<T>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<(usize, floodway::Error)>, floodway::Error>>,
{
    let mut chunks = chunks(entries, count, bytes, |(_, t)| size(t)).into_iter();
    let mut sent = false;
    // The keys with an entry failed: their later entries are held back.
    let mut held: std::collections::HashSet<String> = std::collections::HashSet::new();
    while let Some(chunk) = chunks.next() {
        let mut keys = Vec::with_capacity(chunk.len());
        let mut kept = Vec::with_capacity(chunk.len());
        for (p, item) in chunk {
            let k = key.map(|key| key(&item));
            match k {
                Some(k) if held.contains(&k) => delivery.fail(p, not_sent()),
                _ => {
                    keys.push(k);
                    kept.push((p, item));
                }
            }
        }
        if kept.is_empty() {
            continue;
        }
        let (positions, items): (Vec<usize>, Vec<T>) = kept.into_iter().unzip();
        let failed = match send(items).await {
            Ok(failed) => failed,
            Err(e)
                if !sent
                    || matches!(
                        e.class(),
                        floodway::ErrorClass::Poison | floodway::ErrorClass::Fatal
                    ) =>
            {
                return Err(e)
            }
            Err(e) => {
                let rest = positions
                    .into_iter()
                    .chain(chunks.flatten().map(|(p, _)| p));
                for p in rest {
                    delivery.fail(p, e.copied());
                }
                return Ok(delivery);
            }
        };
        sent = true;
        for (i, e) in failed {
            if let Some(&p) = positions.get(i) {
                delivery.fail(p, e);
                if let Some(Some(k)) = keys.get(i) {
                    held.insert(k.clone());
                }
            }
        }
    }
    Ok(delivery)
}

/// The failure of an entry held back behind an earlier failed entry of its key.
fn not_sent() -> floodway::Error {
    floodway::Error::transient_msg(
        "NotSent",
        "an earlier record of its key failed; sent again after it",
    )
}

/// Every item a DynamoDB scan returns, all pages.
pub(crate) async fn scan_items(
    request: aws_sdk_dynamodb::operation::scan::builders::ScanFluentBuilder,
) -> Result<
    Vec<std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>>,
    floodway::Error,
> {
    request
        .into_paginator()
        .items()
        .send()
        .try_collect()
        .await
        .map_err(classify::classify)
}

/// Splits items into chunks of at most `count` items and `bytes` bytes (an item larger than
/// `bytes` goes alone).
pub(crate) fn chunks<T>(
    items: Vec<T>,
    count: usize,
    bytes: usize,
    size: impl Fn(&T) -> usize,
) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut used = 0;
    for item in items {
        let n = size(&item);
        if !current.is_empty() && (current.len() == count || used + n > bytes) {
            out.push(std::mem::take(&mut current));
            used = 0;
        }
        used += n;
        current.push(item);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use floodway::Error;

    type Answer = Result<Vec<(usize, Error)>, Error>;

    /// Delivers entries 0..n in chunks of two, each call answered by `script(call number,
    /// entries)`; returns the outcome and the entries of each call.
    async fn deliver(
        n: usize,
        ordered: bool,
        script: impl Fn(usize, &[usize]) -> Answer,
    ) -> (Result<Delivery, Error>, Vec<Vec<usize>>) {
        let mut calls = Vec::new();
        let entries = (0..n).map(|i| (i, i)).collect();
        // Ordered, the entries alternate between two keys: even and odd.
        let key = |i: &usize| (i % 2).to_string();
        let outcome = deliver_in_chunks(
            Delivery::complete(),
            entries,
            (2, usize::MAX),
            |_| 1,
            ordered.then_some(&key as &(dyn Fn(&usize) -> String + Sync)),
            |items: Vec<usize>| {
                calls.push(items.clone());
                let answer = script(calls.len(), &items);
                async move { answer }
            },
        )
        .await;
        (outcome, calls)
    }

    fn failed_positions(delivery: &Delivery) -> Vec<usize> {
        let mut p: Vec<usize> = delivery.failed().iter().map(|(p, _)| *p).collect();
        p.sort_unstable();
        p
    }

    fn unavailable() -> Error {
        Error::transient_msg("Unavailable", "503")
    }

    #[tokio::test]
    async fn entries_the_service_failed_are_reported_at_their_batch_positions() {
        // The second entry of every chunk is throttled.
        let (delivery, calls) = deliver(5, false, |_, items| {
            Ok(if items.len() > 1 {
                vec![(1, Error::throttled_msg("Throttled", "slow down"))]
            } else {
                Vec::new()
            })
        })
        .await;
        let delivery = delivery.unwrap();
        assert_eq!(calls, vec![vec![0, 1], vec![2, 3], vec![4]]);
        assert_eq!(failed_positions(&delivery), vec![1, 3]);
        assert!(delivery.failed().iter().all(|(_, e)| e.is_throttle()));
    }

    #[tokio::test]
    async fn a_first_chunk_failing_as_a_whole_fails_the_call() {
        let (outcome, _) = deliver(4, false, |_, _| Err(unavailable())).await;
        assert_eq!(outcome.unwrap_err().name(), "Unavailable");
    }

    #[tokio::test]
    async fn a_later_chunk_failing_fails_it_and_what_follows_unsent() {
        let (delivery, calls) = deliver(6, false, |call, _| match call {
            2 => Err(unavailable()),
            _ => Ok(Vec::new()),
        })
        .await;
        assert_eq!(calls.len(), 2, "the chunk after the failed one is not sent");
        assert_eq!(failed_positions(&delivery.unwrap()), vec![2, 3, 4, 5]);
    }

    #[tokio::test]
    async fn a_later_poison_chunk_fails_the_call_so_it_is_bisected() {
        let (outcome, _) = deliver(4, false, |call, _| match call {
            2 => Err(Error::poison_msg("ValidationException", "bad entry")),
            _ => Ok(Vec::new()),
        })
        .await;
        assert_eq!(outcome.unwrap_err().class(), floodway::ErrorClass::Poison);
    }

    #[tokio::test]
    async fn ordered_chunks_hold_back_the_later_entries_of_a_failed_key_only() {
        // Entry 0 (key "even") is throttled: entries 2 and 4 of its key are held back, not
        // sent; the odd key's go on.
        let (delivery, calls) = deliver(6, true, |call, _| match call {
            1 => Ok(vec![(0, Error::throttled_msg("Throttled", "slow down"))]),
            _ => Ok(Vec::new()),
        })
        .await;
        assert_eq!(calls, vec![vec![0, 1], vec![3], vec![5]]);
        let delivery = delivery.unwrap();
        assert_eq!(failed_positions(&delivery), vec![0, 2, 4]);
        let held: Vec<&str> = delivery.failed().iter().map(|(_, e)| e.name()).collect();
        assert_eq!(held.iter().filter(|n| **n == "NotSent").count(), 2);
    }

    #[test]
    fn chunks_respect_count_and_bytes() {
        let sizes = vec![100, 100, 100, 300, 50, 50];
        let out = chunks(sizes, 3, 350, |n| *n);
        assert_eq!(out, vec![vec![100, 100, 100], vec![300, 50], vec![50]]);
    }
}
