//! Handlers: one invocation's records through a processor, answered with
//! `ReportBatchItemFailures`.
//!
//! | outcome of a record | Kinesis, DynamoDB Streams | SQS | SNS, EventBridge |
//! |---|---|---|---|
//! | done (or filtered out) | not reported | not reported | success |
//! | poison, or a record that cannot be read: its fault event is stored | not reported | not reported | success |
//! | unfinished: transient until the deadline, or a fatal error | the first per shard is reported (Lambda retries from it) | reported | an error (Lambda retries the event) |
//!
//! A poison record never blocks a shard and a transient one is never faulted. Records are read
//! one by one and tolerantly ([`sources`]): only an invocation of no known
//! source fails as a whole, with the `errorType` `UnrecognizedEvent`. The handler
//! stops `margin` before the invocation's deadline and reports what is left instead of timing
//! out (a timeout would retry the whole batch).

use std::sync::Arc;
use std::time::Duration;

use floodway::runtime::BatchReport;
use floodway::{Processor, Record};
use serde_json::{json, Value};

use crate::sources::{self, CdcOptions, Resubmission, SourceKind};

/// An invocation that could not be handled; Lambda sees [`HandlerError::error_type`] as the
/// `errorType` and the message as the `errorMessage`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandlerError {
    /// The payload is no event source this handler knows.
    #[error("unrecognized event: {0}")]
    Unrecognized(String),
    /// An SNS or EventBridge event was not finished (before the deadline, or with a fatal
    /// error), or a batch's record was not and the mapping does not report batch item
    /// failures ([`Handler::item_failures`]): Lambda retries the invocation.
    #[error("record {0} not finished: the invocation fails so that Lambda retries it")]
    Unfinished(String),
    /// A resubmission names a pipeline this processor does not have.
    #[error("resubmission to pipeline `{pipeline}`, which processor `{processor}` does not have")]
    UnknownPipeline {
        /// The pipeline named.
        pipeline: String,
        /// This processor.
        processor: String,
    },
    /// A resubmission to a pipeline that would not run it (disabled, or no longer taking the
    /// event's type): nothing would be done, yet it would count as done.
    #[error("resubmission to pipeline `{pipeline}` not run: {why}")]
    NotTaken {
        /// The pipeline named.
        pipeline: String,
        /// Why it would not run.
        why: &'static str,
    },
}

impl HandlerError {
    /// The error's type as Lambda reports it: `UnrecognizedEvent`, `EventNotFinished`,
    /// `UnknownPipeline` or `ResubmissionNotTaken`.
    pub fn error_type(&self) -> &'static str {
        match self {
            HandlerError::Unrecognized(_) => "UnrecognizedEvent",
            HandlerError::Unfinished(_) => "EventNotFinished",
            HandlerError::UnknownPipeline { .. } => "UnknownPipeline",
            HandlerError::NotTaken { .. } => "ResubmissionNotTaken",
        }
    }

    /// The body a function posts for this error (`errorType`, `errorMessage`).
    pub fn to_json(&self) -> Value {
        json!({ "errorType": self.error_type(), "errorMessage": self.to_string() })
    }
}

/// Runs a processor's pipelines over each invocation's records.
#[derive(Debug, Clone)]
pub struct Handler {
    processor: Arc<Processor>,
    margin: Duration,
    cdc: CdcOptions,
    item_failures: bool,
}

impl Handler {
    /// A handler running `processor` (its fault sink stores the faults: EventBridge, Kinesis,
    /// a hub). It answers Kinesis, DynamoDB and SQS batches with `batchItemFailures` unless
    /// the environment says the mapping does not take them: `FLOODWAY_BATCH_ITEM_FAILURES`
    /// set to `false` (see [`Handler::item_failures`]).
    pub fn new(processor: Processor) -> Handler {
        let item_failures = !matches!(
            std::env::var("FLOODWAY_BATCH_ITEM_FAILURES")
                .unwrap_or_default()
                .to_ascii_lowercase()
                .as_str(),
            "false" | "0" | "off" | "no"
        );
        Handler {
            processor: Arc::new(processor),
            margin: Duration::from_millis(1_000),
            cdc: CdcOptions::default(),
            item_failures,
        }
    }

    /// Whether the event-source mapping reports batch item failures (`FunctionResponseTypes`
    /// holding `ReportBatchItemFailures`; default true). Without it Lambda ignores the
    /// answer's `batchItemFailures` and takes the whole batch as done, so a batch with any
    /// record unfinished fails the invocation instead, and Lambda retries all of it (records
    /// done are done again: the sinks are idempotent).
    #[must_use]
    pub fn item_failures(mut self, reported: bool) -> Handler {
        self.item_failures = reported;
        self
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

    async fn run(
        &self,
        processor: &Processor,
        records: Vec<Record>,
        deadline_ms: Option<u64>,
    ) -> BatchReport {
        let report = processor
            .process_batch(records, self.stop_at(deadline_ms))
            .await;
        if let Some(fatal) = &report.fatal {
            tracing::error!(error = %fatal, "the processor stopped; unfinished records are reported for retry");
        }
        report
    }

    /// An invocation as JSON; the answer as JSON (see [`Handler::handle_bytes`]).
    ///
    /// # Errors
    /// As [`Handler::handle_bytes`].
    pub async fn handle(
        &self,
        payload: Value,
        deadline_ms: Option<u64>,
    ) -> Result<Value, HandlerError> {
        let bytes =
            serde_json::to_vec(&payload).map_err(|e| HandlerError::Unrecognized(e.to_string()))?;
        drop(payload);
        self.handle_owned(bytes, deadline_ms).await
    }

    /// An invocation from its bytes, of any source [`sources::read`] knows; the answer as
    /// JSON:
    ///
    /// - Kinesis, DynamoDB Streams: `batchItemFailures` with the first unfinished record of
    ///   each shard (Lambda retries from it);
    /// - SQS: every unfinished message, and on a FIFO queue every later message of its group
    ///   too (a later message must not overtake it);
    /// - SNS, EventBridge: `null`, or an error when a record is unfinished (Lambda retries the
    ///   invocation).
    ///
    /// A resubmission (see [`crate::resubmission_payload`]) runs only the pipeline it names,
    /// and its answer tells how many faults it raised (`floodway.faulted`).
    ///
    /// # Errors
    /// A payload of no known source, an unfinished SNS or EventBridge event, or a
    /// resubmission to a pipeline this processor lacks.
    pub async fn handle_bytes(
        &self,
        payload: &[u8],
        deadline_ms: Option<u64>,
    ) -> Result<Value, HandlerError> {
        let invocation = self.read(payload)?;
        self.run_invocation(invocation, deadline_ms).await
    }

    /// [`Handler::handle_bytes`] on a payload it owns, what [`serve`](crate::serve) does: a
    /// Kinesis batch's records are decoded into the payload's own buffer
    /// ([`sources::read_owned`]), so its text and its records' bytes are never in memory side
    /// by side; any other payload is dropped as soon as its records are read, before they run.
    ///
    /// # Errors
    /// As [`Handler::handle_bytes`].
    pub async fn handle_owned(
        &self,
        payload: Vec<u8>,
        deadline_ms: Option<u64>,
    ) -> Result<Value, HandlerError> {
        let invocation =
            sources::read_owned(payload, &self.cdc).map_err(|e| HandlerError::Unrecognized(e.0))?;
        self.run_invocation(invocation, deadline_ms).await
    }

    fn read(&self, payload: &[u8]) -> Result<sources::Invocation, HandlerError> {
        sources::read(payload, &self.cdc).map_err(|e| HandlerError::Unrecognized(e.0))
    }

    async fn run_invocation(
        &self,
        invocation: sources::Invocation,
        deadline_ms: Option<u64>,
    ) -> Result<Value, HandlerError> {
        if !invocation.skipped.is_empty() {
            tracing::debug!(
                skipped = invocation.skipped.len(),
                "replica and TTL records skipped"
            );
        }
        let kind = invocation.kind;
        let Some(Resubmission {
            pipeline, fault, ..
        }) = invocation.resubmit_to
        else {
            let report = self
                .run(&self.processor, invocation.records, deadline_ms)
                .await;
            let answer = answer(kind, &report)?;
            if !self.item_failures {
                if let Some(first) = answer["batchItemFailures"][0]["itemIdentifier"].as_str() {
                    return Err(HandlerError::Unfinished(first.to_owned()));
                }
            }
            return Ok(answer);
        };
        // A resubmitted fault: only the pipeline that failed it runs, and the resubmitter is
        // told whether the record faulted again (the answer of a direct invocation is ours
        // to shape).
        let only = self
            .processor
            .only(&pipeline)
            .ok_or_else(|| HandlerError::UnknownPipeline {
                pipeline: pipeline.clone(),
                processor: self.processor.name().to_owned(),
            })?;
        // A record the pipeline would not take counts as done: the resubmitter would close
        // the fault with nothing run.
        for record in &invocation.records {
            if let Err(why) = self.processor.only_taking(&pipeline, record) {
                return Err(HandlerError::NotTaken { pipeline, why });
            }
        }
        let mut records = invocation.records;
        if let Some(fault) = fault {
            // Failing again, it raises that fault again, not one named by the reshaped record.
            let fault: Arc<str> = fault.into();
            for record in &mut records {
                record.resubmits = Some(fault.clone());
            }
        }
        let report = self.run(&only, records, deadline_ms).await;
        let mut answer = answer(kind, &report)?;
        if !answer.is_object() {
            answer = json!({});
        }
        answer["floodway"] = json!({ "faulted": report.report.faults() });
        Ok(answer)
    }
}

/// The answer to an invocation of `kind` whose records ended as `report` says.
fn answer(kind: SourceKind, report: &BatchReport) -> Result<Value, HandlerError> {
    let failures: Vec<String> = match kind {
        SourceKind::Kinesis | SourceKind::DynamoDb => report
            .first_unfinished_per_partition()
            .iter()
            .map(|r| r.position())
            .collect(),
        SourceKind::Sqs => {
            let mut held: std::collections::HashSet<Arc<str>> = std::collections::HashSet::new();
            let mut failed = Vec::new();
            for outcome in &report.outcomes {
                // A standard queue's messages are each their own partition; a FIFO queue's
                // share their group's.
                let partition = &outcome.record.partition;
                if outcome.settlement.is_none() || held.contains(partition) {
                    held.insert(partition.clone());
                    failed.push(outcome.record.position());
                }
            }
            failed
        }
        SourceKind::Sns | SourceKind::EventBridge => {
            return match report.unfinished().next() {
                None => Ok(Value::Null),
                Some(record) => Err(HandlerError::Unfinished(record.position())),
            };
        }
    };
    let failures: Vec<Value> = failures
        .into_iter()
        .map(|id| json!({ "itemIdentifier": id }))
        .collect();
    Ok(json!({ "batchItemFailures": failures }))
}
