//! Handlers: one invocation's records through a processor, answered with
//! `ReportBatchItemFailures`.
//!
//! | outcome of a record | Kinesis, DynamoDB Streams | SQS | EventBridge |
//! |---|---|---|---|
//! | done (or filtered out) | not reported | not reported | success |
//! | poison: its fault event is stored | not reported | not reported | success |
//! | unfinished: transient until the deadline, or a fatal error | the first per shard is reported (Lambda retries from it) | reported | an error (Lambda retries the event) |
//!
//! A poison record never blocks a shard and a transient one is never faulted. The handler
//! stops `margin` before the invocation's deadline and reports what is left instead of timing
//! out (a timeout would retry the whole batch).

use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::event::dynamodb;
use aws_lambda_events::event::eventbridge::EventBridgeEvent;
use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_lambda_events::event::sqs::SqsEvent;
use aws_lambda_events::event::streams::{
    DynamoDbBatchItemFailure, DynamoDbEventResponse, KinesisBatchItemFailure, KinesisEventResponse,
    SqsBatchItemFailure, SqsEventResponse,
};
use floodway::runtime::BatchReport;
use floodway::{Processor, Record};
use serde_json::Value;

use crate::sources::{self, CdcOptions};

/// An invocation that could not be handled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandlerError {
    /// The payload is not an event this handler knows.
    #[error("unrecognized event: {0}")]
    Unrecognized(String),
    /// The EventBridge event was not finished: Lambda retries it.
    #[error("event not finished before the deadline ({0})")]
    Unfinished(String),
}

/// Runs a processor's pipelines over each invocation's records.
#[derive(Debug, Clone)]
pub struct Handler {
    processor: Arc<Processor>,
    margin: Duration,
    cdc: CdcOptions,
    /// Faults raised by this handler's invocations (a resubmission reports its own).
    faulted: Arc<std::sync::atomic::AtomicU64>,
}

impl Handler {
    /// A handler running `processor` (its fault sink stores the faults: EventBridge, Kinesis,
    /// a hub).
    pub fn new(processor: Processor) -> Handler {
        Handler {
            processor: Arc::new(processor),
            margin: Duration::from_millis(1_000),
            faulted: Arc::default(),
            cdc: CdcOptions::default(),
        }
    }

    /// Stop this long before the invocation's deadline (default 1 s) to answer in time.
    #[must_use]
    pub fn margin(mut self, margin: Duration) -> Handler {
        self.margin = margin;
        self
    }

    /// How DynamoDB stream records become events.
    #[must_use]
    pub fn cdc(mut self, options: CdcOptions) -> Handler {
        self.cdc = options;
        self
    }

    /// The processor.
    pub fn processor(&self) -> &Processor {
        &self.processor
    }

    /// When to stop: `margin` before `deadline_ms` (ms since the epoch), on tokio's clock.
    fn stop_at(&self, deadline_ms: Option<u64>) -> Option<tokio::time::Instant> {
        let deadline_ms = deadline_ms?;
        let now_ms = u64::try_from(floodway::event::now_millis()).unwrap_or(0);
        let left = Duration::from_millis(deadline_ms.saturating_sub(now_ms));
        // The margin, but never more than a tenth of the time left: a short timeout must
        // still leave time for work.
        let margin = self.margin.min(left / 10);
        Some(tokio::time::Instant::now() + left.saturating_sub(margin))
    }

    async fn run(&self, records: Vec<Record>, deadline_ms: Option<u64>) -> BatchReport {
        let report = self
            .processor
            .process_batch(records, self.stop_at(deadline_ms))
            .await;
        if let Some(fatal) = &report.fatal {
            tracing::error!(error = %fatal, "the processor stopped; unfinished records are reported for retry");
        }
        self.faulted
            .fetch_add(report.report.faults(), std::sync::atomic::Ordering::Relaxed);
        report
    }

    /// The first unfinished record's sequence per shard.
    fn stream_failures(report: &BatchReport) -> Vec<String> {
        report
            .first_unfinished_per_partition()
            .iter()
            .map(|r| r.position())
            .collect()
    }

    /// A Kinesis batch.
    pub async fn kinesis(
        &self,
        event: KinesisEvent,
        deadline_ms: Option<u64>,
    ) -> KinesisEventResponse {
        let report = self.run(sources::kinesis_records(event), deadline_ms).await;
        let mut response = KinesisEventResponse::default();
        response.batch_item_failures =
            item_failures(&report, |f: &mut KinesisBatchItemFailure, id| {
                f.item_identifier = Some(id);
            });
        response
    }

    /// A DynamoDB Streams batch, as change events (see [`sources::dynamodb_records`]).
    pub async fn dynamodb(
        &self,
        event: &dynamodb::Event,
        deadline_ms: Option<u64>,
    ) -> DynamoDbEventResponse {
        let (records, skipped) = sources::dynamodb_records(event, &self.cdc);
        if !skipped.is_empty() {
            tracing::debug!(skipped = skipped.len(), "replica and TTL records skipped");
        }
        let report = self.run(records, deadline_ms).await;
        let mut response = DynamoDbEventResponse::default();
        response.batch_item_failures =
            item_failures(&report, |f: &mut DynamoDbBatchItemFailure, id| {
                f.item_identifier = Some(id);
            });
        response
    }

    /// An SQS batch: every unfinished message is reported, and on a FIFO queue every later
    /// message of its group too (a later message must not overtake it).
    pub async fn sqs(&self, event: &SqsEvent, deadline_ms: Option<u64>) -> SqsEventResponse {
        let report = self.run(sources::sqs_records(event), deadline_ms).await;
        let mut response = SqsEventResponse::default();
        let mut held: std::collections::HashSet<Arc<str>> = std::collections::HashSet::new();
        for outcome in &report.outcomes {
            // A standard queue's messages are each their own partition; a FIFO queue's share
            // their group's.
            let partition = &outcome.record.partition;
            if outcome.settlement.is_none() || held.contains(partition) {
                held.insert(partition.clone());
                let mut failure = SqsBatchItemFailure::default();
                failure.item_identifier = Some(outcome.record.position());
                response.batch_item_failures.push(failure);
            }
        }
        response
    }

    /// One EventBridge event.
    ///
    /// # Errors
    /// When it did not finish, so that Lambda retries it.
    pub async fn eventbridge(
        &self,
        event: &EventBridgeEvent<Value>,
        deadline_ms: Option<u64>,
    ) -> Result<(), HandlerError> {
        let record = sources::eventbridge_record(event);
        let report = self.run(vec![record], deadline_ms).await;
        let unfinished = report.unfinished().next().map(|r| r.position());
        match unfinished {
            None => Ok(()),
            Some(position) => Err(HandlerError::Unfinished(position)),
        }
    }

    /// Any of the four, recognized by its shape; the answer as JSON.
    ///
    /// # Errors
    /// A payload of another kind, or an unfinished EventBridge event.
    pub async fn handle(
        &self,
        payload: Value,
        deadline_ms: Option<u64>,
    ) -> Result<Value, HandlerError> {
        let bytes =
            serde_json::to_vec(&payload).map_err(|e| HandlerError::Unrecognized(e.to_string()))?;
        self.handle_bytes(&bytes, deadline_ms).await
    }

    /// Any of the four from the invocation's bytes, parsed once into its own type (no JSON
    /// tree in between); the answer as JSON.
    ///
    /// # Errors
    /// A payload of another kind, or an unfinished EventBridge event.
    pub async fn handle_bytes(
        &self,
        payload: &[u8],
        deadline_ms: Option<u64>,
    ) -> Result<Value, HandlerError> {
        let bad = |e: serde_json::Error| HandlerError::Unrecognized(e.to_string());
        let probe: Probe = serde_json::from_slice(payload).map_err(bad)?;
        if let Some(resubmission) = &probe.floodway {
            // A resubmitted fault: only the pipeline that failed it runs.
            let only = self.processor.only(&resubmission.pipeline).ok_or_else(|| {
                HandlerError::Unrecognized(format!(
                    "resubmission to pipeline `{}`, which processor `{}` does not have",
                    resubmission.pipeline,
                    self.processor.name()
                ))
            })?;
            let scoped = Handler {
                processor: Arc::new(only),
                faulted: Arc::default(),
                ..self.clone()
            };
            let mut payload: Value = serde_json::from_slice(payload).map_err(bad)?;
            if let Value::Object(map) = &mut payload {
                map.remove("floodway");
            }
            let bytes = serde_json::to_vec(&payload).map_err(bad)?;
            let mut answer = Box::pin(scoped.handle_bytes(&bytes, deadline_ms)).await?;
            // The resubmitter is told whether the record faulted again (the answer of a
            // direct invocation is ours to shape).
            let faulted = scoped.faulted.load(std::sync::atomic::Ordering::Relaxed);
            if !answer.is_object() {
                answer = serde_json::json!({});
            }
            answer["floodway"] = serde_json::json!({ "faulted": faulted });
            return Ok(answer);
        }
        let source = probe
            .records
            .and_then(|r| r.into_iter().next())
            .and_then(|r| r.event_source);
        let answer = |r: Result<Value, serde_json::Error>| r.map_err(bad);
        match source.as_deref() {
            Some("aws:kinesis") => {
                let event: KinesisEvent = serde_json::from_slice(payload).map_err(bad)?;
                answer(serde_json::to_value(self.kinesis(event, deadline_ms).await))
            }
            Some("aws:dynamodb") => {
                let event: dynamodb::Event = serde_json::from_slice(payload).map_err(bad)?;
                answer(serde_json::to_value(
                    self.dynamodb(&event, deadline_ms).await,
                ))
            }
            Some("aws:sqs") => {
                let event: SqsEvent = serde_json::from_slice(payload).map_err(bad)?;
                answer(serde_json::to_value(self.sqs(&event, deadline_ms).await))
            }
            _ if probe.detail_type.is_some() => {
                let event: EventBridgeEvent<Value> =
                    serde_json::from_slice(payload).map_err(bad)?;
                self.eventbridge(&event, deadline_ms).await?;
                Ok(Value::Null)
            }
            _ => Err(HandlerError::Unrecognized(
                "not a Kinesis, DynamoDB Streams, SQS or EventBridge event".into(),
            )),
        }
    }
}

/// Just enough of an invocation to tell its kind (the rest is skipped, not built).
#[derive(serde::Deserialize)]
struct Probe {
    /// Set on a resubmission: the pipeline to run.
    floodway: Option<Resubmission>,
    #[serde(rename = "Records")]
    records: Option<Vec<ProbeRecord>>,
    #[serde(rename = "detail-type")]
    detail_type: Option<serde::de::IgnoredAny>,
}

#[derive(serde::Deserialize)]
struct Resubmission {
    pipeline: String,
}

#[derive(serde::Deserialize)]
struct ProbeRecord {
    #[serde(rename = "eventSource", alias = "EventSource")]
    event_source: Option<String>,
}

/// The `batchItemFailures` of a stream batch, in the response type of its source.
fn item_failures<T: Default>(report: &BatchReport, set: impl Fn(&mut T, String)) -> Vec<T> {
    Handler::stream_failures(report)
        .into_iter()
        .map(|id| {
            let mut failure = T::default();
            set(&mut failure, id);
            failure
        })
        .collect()
}

/// Serves `handler` through the Lambda Runtime API (`AWS_LAMBDA_RUNTIME_API`): the `main` of
/// a function.
///
/// # Errors
/// When the runtime API cannot be reached.
pub async fn serve(handler: Handler) -> Result<(), lambda_runtime::Error> {
    let handler = Arc::new(handler);
    lambda_runtime::run(lambda_runtime::service_fn(
        move |event: lambda_runtime::LambdaEvent<Box<serde_json::value::RawValue>>| {
            let handler = handler.clone();
            async move {
                let deadline = Some(event.context.deadline);
                handler
                    .handle_bytes(event.payload.get().as_bytes(), deadline)
                    .await
                    .map_err(lambda_runtime::Error::from)
            }
        },
    ))
    .await
}
