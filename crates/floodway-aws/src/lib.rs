//! Floodway's AWS sinks, each a `tower::Service<Batch>` that takes the core's resilience
//! layers and, on a partial failure, sends again only what failed:
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
//! function that failed a fault again, with a payload limited to the failing pipeline.
//!
//! Errors are classified for the core: throttling is a throttle, 5xx and network failures are
//! transient, a request the service rejects for its content is poison, and missing resources
//! or permissions are fatal (fix the configuration).
//!
//! This crate alone compiles the AWS SDK, so the other crates build quickly.

mod claim;
/// A `tower::Service<Batch>` from a sink's `async fn write(&self, Vec<Event>)` (or the named
/// method).
macro_rules! batch_sink {
    ($sink:ty) => {
        $crate::batch_sink!($sink, write);
    };
    ($sink:ty, $write:ident) => {
        impl tower::Service<floodway::Batch> for $sink {
            type Response = ();
            type Error = floodway::Error;
            type Future = floodway::layer::BoxFuture<()>;

            fn poll_ready(
                &mut self,
                _cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Result<(), floodway::Error>> {
                std::task::Poll::Ready(Ok(()))
            }

            fn call(&mut self, batch: floodway::Batch) -> Self::Future {
                let sink = self.clone();
                let events: Vec<floodway::Event> = batch.events().cloned().collect();
                Box::pin(async move { sink.$write(events).await })
            }
        }
    };
}

/// A fault sink (`tower::Service<Event>`) from a sink's `async fn write(&self, Vec<Event>)`;
/// a fault over `$max` bytes is stored trimmed ([`floodway::fault::fit`]).
macro_rules! event_sink {
    ($sink:ty, $max:expr) => {
        impl tower::Service<floodway::Event> for $sink {
            type Response = ();
            type Error = floodway::Error;
            type Future = floodway::layer::BoxFuture<()>;

            fn poll_ready(
                &mut self,
                _cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Result<(), floodway::Error>> {
                std::task::Poll::Ready(Ok(()))
            }

            fn call(&mut self, event: floodway::Event) -> Self::Future {
                let sink = self.clone();
                let event = floodway::fault::fit(&event, $max);
                Box::pin(async move { sink.write(vec![event]).await })
            }
        }
    };
}

pub(crate) use {batch_sink, event_sink};

mod classify;
mod dynamodb;
mod eventbridge;
mod faults;
mod kinesis;
mod s3;
mod sqs;

pub use claim::ClaimCheck;
pub use classify::classify;
pub use dynamodb::DynamoDbView;
pub use eventbridge::EventBridgeSink;
pub use faults::{resubmit, DynamoDbFaults, Resubmitted, S3Faults};
pub use floodway::fault_store::StoredFault;
pub use kinesis::KinesisSink;
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

/// Sends `attempts` rounds of a batch call, each round with only the entries the previous one
/// reported failed, waiting a little longer between rounds. Returns the entries still failing
/// after the last round, with the error of each.
pub(crate) async fn send_failed_again<T, F, Fut>(
    mut entries: Vec<T>,
    attempts: u32,
    mut send: F,
) -> Result<Vec<(T, floodway::Error)>, floodway::Error>
where
    T: Clone,
    F: FnMut(Vec<T>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<(usize, floodway::Error)>, floodway::Error>>,
{
    let mut round = 0;
    loop {
        let failed = send(entries.clone()).await?;
        if failed.is_empty() {
            return Ok(Vec::new());
        }
        round += 1;
        let retry: Vec<(T, floodway::Error)> = failed
            .into_iter()
            .filter_map(|(i, e)| entries.get(i).cloned().map(|t| (t, e)))
            .collect();
        // Only throttles and transient errors are worth another round.
        let worth = retry
            .iter()
            .all(|(_, e)| e.class() == floodway::ErrorClass::Transient);
        if round >= attempts || !worth {
            return Ok(retry);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50 << round.min(6))).await;
        entries = retry.into_iter().map(|(t, _)| t).collect();
    }
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

/// The error of the first entry still failing, or success.
pub(crate) fn first_error<T>(failed: Vec<(T, floodway::Error)>) -> Result<(), floodway::Error> {
    match failed.into_iter().next() {
        None => Ok(()),
        Some((_, e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use floodway::Error;

    #[tokio::test(start_paused = true)]
    async fn only_what_failed_is_sent_again() {
        let calls = std::sync::Mutex::new(Vec::new());
        let failed = send_failed_again(vec!["a", "b", "c", "d"], 3, |entries: Vec<&str>| {
            calls.lock().unwrap().push(entries.clone());
            // "b" is throttled once; "d" always fails for an internal reason.
            let round = calls.lock().unwrap().len();
            let failures = entries
                .iter()
                .enumerate()
                .filter(|(_, e)| (**e == "b" && round == 1) || **e == "d")
                .map(|(i, _)| (i, Error::throttled_msg("Throttled", "slow down")))
                .collect();
            async move { Ok(failures) }
        })
        .await
        .unwrap();
        let calls = calls.into_inner().unwrap();
        assert_eq!(
            calls,
            vec![vec!["a", "b", "c", "d"], vec!["b", "d"], vec!["d"]]
        );
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].0, "d");
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_entry_is_not_sent_again() {
        let mut calls = 0;
        let failed = send_failed_again(vec![1, 2], 5, |entries: Vec<i32>| {
            calls += 1;
            let failures = entries
                .iter()
                .enumerate()
                .filter(|(_, e)| **e == 2)
                .map(|(i, _)| (i, Error::poison_msg("Rejected", "bad")))
                .collect();
            async move { Ok(failures) }
        })
        .await
        .unwrap();
        assert_eq!(calls, 1);
        assert_eq!(failed[0].1.class(), floodway::ErrorClass::Poison);
    }

    #[test]
    fn chunks_respect_count_and_bytes() {
        let sizes = vec![100, 100, 100, 300, 50, 50];
        let out = chunks(sizes, 3, 350, |n| *n);
        assert_eq!(out, vec![vec![100, 100, 100], vec![300, 50], vec![50]]);
    }
}
