//! A deterministic model of what Lambda's event-source mappings do, to test handlers without
//! AWS and to run AWS-shaped processors locally.
//!
//! **Streams** (Kinesis, DynamoDB Streams), per shard, one batch in flight at a time, in
//! order:
//! 1. a batch is the next `batch_size` records after the checkpoint; records older than
//!    `maximum_record_age` are sent to the on-failure destination instead of the function;
//! 2. the function answers with `batchItemFailures`: the records before the first reported
//!    sequence are done (the checkpoint moves past them) and the batch is retried from it; an
//!    identifier not in the batch fails the whole batch (as Lambda does);
//! 3. a function error or timeout retries the batch, split in two halves first when
//!    `bisect_on_error` is on;
//! 4. every retry of a batch counts; past `maximum_retry_attempts` the batch's records go to
//!    the on-failure destination and the checkpoint moves past them;
//! 5. a record older than the stream's `retention` is gone (given up as `RecordExpired`), so
//!    even unbounded retries end.
//!
//! **Queues** (SQS standard): batches of up to `batch_size` visible messages; each delivery
//! increments the receive count; a message reported in `batchItemFailures` (or all of them on
//! a function error) becomes visible again after `visibility_timeout`, the others are deleted;
//! a message received `max_receive_count` times and failing again moves to the dead-letter
//! queue; an identifier not in the batch fails all of it; messages older than the queue's
//! retention are dropped.
//!
//! Time is tokio's: on a paused clock retries, timeouts and record ages cost no real time.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::handler::Handler;
use crate::runtime_api::{InvokeError, LocalRuntime};

/// Something Lambda invokes.
pub trait Function: Send {
    /// Invokes with `payload`, allowing `timeout`.
    fn invoke(
        &mut self,
        payload: Value,
        timeout: Duration,
    ) -> impl Future<Output = Result<Value, InvokeError>> + Send;
}

/// The handler in this process.
#[derive(Debug, Clone)]
pub struct InProcess(pub Handler);

impl Function for InProcess {
    async fn invoke(&mut self, payload: Value, timeout: Duration) -> Result<Value, InvokeError> {
        let deadline_ms = u64::try_from(floodway::event::now_millis())
            .unwrap_or(0)
            .saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        match tokio::time::timeout(timeout, self.0.handle(payload, Some(deadline_ms))).await {
            Ok(Ok(answer)) => Ok(answer),
            // The body a function process posts, as the Runtime API would report it.
            Ok(Err(e)) => Err(InvokeError::Function(e.to_json().to_string())),
            Err(_) => Err(InvokeError::Timeout(timeout)),
        }
    }
}

impl Function for LocalRuntime {
    async fn invoke(&mut self, payload: Value, timeout: Duration) -> Result<Value, InvokeError> {
        LocalRuntime::invoke(self, &payload, timeout).await
    }
}

/// Which stream a mapping reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamKind {
    /// A Kinesis stream: records carry data, wrapped as Lambda wraps them.
    Kinesis {
        /// The stream's name.
        stream: String,
    },
    /// A DynamoDB stream: each record's data is the stream record's JSON as DynamoDB
    /// Streams delivers it.
    DynamoDb,
}

/// A record of a shard.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamRecord {
    /// Its sequence number (increasing within the shard).
    pub sequence: u64,
    /// The partition key.
    pub partition_key: String,
    /// The data (Kinesis), or the whole stream record (DynamoDB).
    pub data: Bytes,
    /// When it arrived in the stream.
    pub arrived: Instant,
}

/// A stream event-source mapping's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamMapping {
    /// Records per invocation at most (default 100).
    pub batch_size: usize,
    /// Split a failing batch in two before retrying it (default true, as Floodway expects).
    pub bisect_on_error: bool,
    /// Retries of a batch before it is given up (`None`: until the records expire).
    pub maximum_retry_attempts: Option<u32>,
    /// Records older than this are given up (`None`: never).
    pub maximum_record_age: Option<Duration>,
    /// The function answers with `batchItemFailures` (default true, as Floodway expects).
    pub report_batch_item_failures: bool,
    /// The function's timeout (default 60 s).
    pub function_timeout: Duration,
    /// The pause before a retry (default 1 s; at least 1 ms, so that time moves).
    pub retry_delay: Duration,
    /// How long the stream keeps a record (default 24 h, Kinesis' default): a record older
    /// than this is gone, given up as `RecordExpired`, whatever the other settings say.
    pub retention: Duration,
}

impl Default for StreamMapping {
    fn default() -> Self {
        StreamMapping {
            batch_size: 100,
            bisect_on_error: true,
            maximum_retry_attempts: Some(10),
            maximum_record_age: None,
            report_batch_item_failures: true,
            function_timeout: Duration::from_secs(60),
            retry_delay: Duration::from_secs(1),
            retention: Duration::from_secs(24 * 3600),
        }
    }
}

/// How one invocation went.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every record done.
    Success,
    /// Done up to (not including) this sequence.
    Partial(u64),
    /// The function failed or timed out.
    Error(String),
}

/// One invocation.
#[derive(Debug, Clone, PartialEq)]
pub struct Invocation {
    /// The first record's sequence.
    pub first: u64,
    /// The last record's sequence.
    pub last: u64,
    /// How many records.
    pub records: usize,
    /// How it went.
    pub outcome: Outcome,
}

/// Records given up, as the on-failure destination receives them (metadata only, as Lambda
/// sends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GivenUp {
    /// The shard.
    pub shard: String,
    /// The first sequence.
    pub first: u64,
    /// The last sequence.
    pub last: u64,
    /// How many records.
    pub records: usize,
    /// `RetryAttemptsExhausted` or `RecordAgeExceeded`.
    pub reason: String,
}

/// What happened on a shard.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardReport {
    /// Every invocation, in order.
    pub invocations: Vec<Invocation>,
    /// The on-failure destination.
    pub given_up: Vec<GivenUp>,
    /// The sequence the checkpoint passed last.
    pub checkpoint: Option<u64>,
}

fn kinesis_payload(stream: &str, shard: &str, records: &[StreamRecord]) -> Value {
    let base64 = base64::engine::general_purpose::STANDARD;
    let records: Vec<Value> = records
        .iter()
        .map(|r| {
            json!({
                "kinesis": {
                    "kinesisSchemaVersion": "1.0",
                    "partitionKey": r.partition_key,
                    "sequenceNumber": r.sequence.to_string(),
                    "data": base64.encode(&r.data),
                    "approximateArrivalTimestamp": floodway::event::now_millis() as f64 / 1000.0,
                },
                "eventSource": "aws:kinesis",
                "eventVersion": "1.0",
                "eventID": format!("{shard}:{}", r.sequence),
                "eventName": "aws:kinesis:record",
                "invokeIdentityArn": "arn:aws:iam::000000000000:role/floodway",
                "awsRegion": "local",
                "eventSourceARN": format!("arn:aws:kinesis:local:000000000000:stream/{stream}"),
            })
        })
        .collect();
    json!({ "Records": records })
}

fn dynamodb_payload(records: &[StreamRecord]) -> Value {
    let records: Vec<Value> = records
        .iter()
        .map(|r| serde_json::from_slice(&r.data).unwrap_or(Value::Null))
        .collect();
    json!({ "Records": records })
}

/// The identifiers of a `batchItemFailures` answer (an empty list: none failed); `None` when
/// one is not a non-empty string, which Lambda takes for a failure of the whole batch.
fn reported_failures(answer: &Value) -> Option<Vec<String>> {
    let Some(failures) = answer.get("batchItemFailures").and_then(Value::as_array) else {
        return Some(Vec::new());
    };
    failures
        .iter()
        .map(|f| {
            f.get("itemIdentifier")
                .and_then(Value::as_str)
                .filter(|id| !id.is_empty())
                .map(str::to_owned)
        })
        .collect()
}

/// The first failed identifier of a `batchItemFailures` answer, if any; `""` (in no batch)
/// when the answer is not one Lambda takes.
fn first_failure(answer: &Value) -> Option<String> {
    match reported_failures(answer) {
        Some(ids) => ids
            .into_iter()
            .min_by_key(|id| id.parse::<u64>().unwrap_or(u64::MAX)),
        None => Some(String::new()),
    }
}

impl StreamMapping {
    /// Feeds one shard's records through `function` until every record is done or given up.
    pub async fn run_shard<F: Function>(
        &self,
        kind: &StreamKind,
        shard: &str,
        records: &[StreamRecord],
        function: &mut F,
    ) -> ShardReport {
        let mut report = ShardReport::default();
        let mut position = 0usize;
        // Spans of the shard still to do, in order: (start, end, retries so far).
        let mut spans: VecDeque<(usize, usize, u32)> = VecDeque::new();
        let give_up = |report: &mut ShardReport, span: &[StreamRecord], reason: &str| {
            if let (Some(first), Some(last)) = (span.first(), span.last()) {
                report.given_up.push(GivenUp {
                    shard: shard.to_owned(),
                    first: first.sequence,
                    last: last.sequence,
                    records: span.len(),
                    reason: reason.into(),
                });
            }
        };
        loop {
            let (start, end, retries) = match spans.pop_front() {
                Some(span) => span,
                None if position < records.len() => (
                    position,
                    (position + self.batch_size.max(1)).min(records.len()),
                    0,
                ),
                None => break,
            };
            // Records too old go to the destination without an invocation; records past the
            // stream's retention are gone.
            let mut start = start;
            let (max_age, reason) = match self.maximum_record_age {
                Some(age) if age < self.retention => (age, "RecordAgeExceeded"),
                _ => (self.retention, "RecordExpired"),
            };
            {
                let now = Instant::now();
                let old = records[start..end]
                    .iter()
                    .take_while(|r| now.duration_since(r.arrived) > max_age)
                    .count();
                if old > 0 {
                    give_up(&mut report, &records[start..start + old], reason);
                    start += old;
                    report.checkpoint = Some(records[start - 1].sequence);
                    position = position.max(start);
                    if start == end {
                        continue;
                    }
                }
            }
            let batch = &records[start..end];
            let payload = match kind {
                StreamKind::Kinesis { stream } => kinesis_payload(stream, shard, batch),
                StreamKind::DynamoDb => dynamodb_payload(batch),
            };
            let answer = function.invoke(payload, self.function_timeout).await;
            let failed_at = match &answer {
                Ok(answer) if self.report_batch_item_failures => {
                    first_failure(answer).map(|id| {
                        batch
                            .iter()
                            .position(|r| r.sequence.to_string() == id)
                            // An identifier not in the batch fails all of it.
                            .unwrap_or(0)
                    })
                }
                Ok(_) => None,
                Err(_) => Some(0),
            };
            let outcome = match (&answer, failed_at) {
                (Err(e), _) => Outcome::Error(e.to_string()),
                (Ok(_), None) => Outcome::Success,
                (Ok(_), Some(i)) => Outcome::Partial(batch[i].sequence),
            };
            report.invocations.push(Invocation {
                first: batch[0].sequence,
                last: batch[batch.len() - 1].sequence,
                records: batch.len(),
                outcome,
            });
            let Some(i) = failed_at else {
                report.checkpoint = Some(batch[batch.len() - 1].sequence);
                position = position.max(end);
                continue;
            };
            let done = start + i;
            if i > 0 {
                report.checkpoint = Some(records[done - 1].sequence);
            }
            if self
                .maximum_retry_attempts
                .is_some_and(|max| retries >= max)
            {
                give_up(&mut report, &records[done..end], "RetryAttemptsExhausted");
                report.checkpoint = Some(records[end - 1].sequence);
                position = position.max(end);
                continue;
            }
            tokio::time::sleep(self.retry_delay.max(Duration::from_millis(1))).await;
            if answer.is_err() && self.bisect_on_error && end - done > 1 {
                // Splitting a batch does not count towards the retry quota (as Lambda's
                // bisection): only retries of a span that is not split do.
                let mid = done + (end - done) / 2;
                spans.push_front((mid, end, retries));
                spans.push_front((done, mid, retries));
            } else {
                spans.push_front((done, end, retries + 1));
            }
        }
        report
    }
}

/// A message on a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueMessage {
    /// Its id.
    pub id: String,
    /// The body.
    pub body: String,
}

/// An SQS event-source mapping's settings (standard queue).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueMapping {
    /// Messages per invocation at most (default 10).
    pub batch_size: usize,
    /// How long a received message stays invisible (default 30 s).
    pub visibility_timeout: Duration,
    /// Receives before a failing message moves to the dead-letter queue (`None`: no DLQ).
    pub max_receive_count: Option<u32>,
    /// The function answers with `batchItemFailures` (default true).
    pub report_batch_item_failures: bool,
    /// The function's timeout (default 30 s).
    pub function_timeout: Duration,
    /// How long the queue keeps a message (default 4 days, SQS' default): an older one is
    /// dropped, reported in [`QueueReport::expired`].
    pub message_retention: Duration,
}

impl Default for QueueMapping {
    fn default() -> Self {
        QueueMapping {
            batch_size: 10,
            visibility_timeout: Duration::from_secs(30),
            max_receive_count: Some(5),
            report_batch_item_failures: true,
            function_timeout: Duration::from_secs(30),
            message_retention: Duration::from_secs(4 * 24 * 3600),
        }
    }
}

/// What happened on a queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueReport {
    /// Invocations made.
    pub invocations: usize,
    /// Message ids deleted (done), in order.
    pub deleted: Vec<String>,
    /// Message ids moved to the dead-letter queue, with their receive counts.
    pub dead_letters: Vec<(String, u32)>,
    /// Message ids dropped at the end of the queue's retention.
    pub expired: Vec<String>,
}

impl QueueMapping {
    /// Feeds `messages` through `function` until the queue is empty.
    pub async fn run<F: Function>(
        &self,
        arn: &str,
        messages: Vec<QueueMessage>,
        function: &mut F,
    ) -> QueueReport {
        let mut report = QueueReport::default();
        // (message, receives, visible at)
        let sent = Instant::now();
        let mut queue: Vec<(QueueMessage, u32, Instant)> =
            messages.into_iter().map(|m| (m, 0, sent)).collect();
        while !queue.is_empty() {
            let now = Instant::now();
            if now.duration_since(sent) > self.message_retention {
                report.expired.extend(queue.drain(..).map(|(m, _, _)| m.id));
                break;
            }
            let visible: Vec<usize> = (0..queue.len())
                .filter(|i| queue[*i].2 <= now)
                .take(self.batch_size.max(1))
                .collect();
            if visible.is_empty() {
                let next = queue.iter().map(|m| m.2).min().unwrap_or(now);
                tokio::time::sleep_until(next).await;
                continue;
            }
            let mut records = Vec::new();
            for &i in &visible {
                queue[i].1 += 1;
                // At least a millisecond: a message failing at once, with no visibility
                // timeout, would otherwise be received again without time passing, for ever.
                let hidden = self.visibility_timeout.max(Duration::from_millis(1));
                queue[i].2 = floodway::clock::later(now, hidden);
                let (m, receives, _) = &queue[i];
                records.push(json!({
                    "messageId": m.id,
                    "receiptHandle": format!("{}-{receives}", m.id),
                    "body": m.body,
                    "attributes": { "ApproximateReceiveCount": receives.to_string() },
                    "messageAttributes": {},
                    "eventSource": "aws:sqs",
                    "eventSourceARN": arn,
                    "awsRegion": "local",
                }));
            }
            report.invocations += 1;
            let answer = function
                .invoke(json!({ "Records": records }), self.function_timeout)
                .await;
            let failed: Vec<String> = match &answer {
                Err(_) => visible.iter().map(|i| queue[*i].0.id.clone()).collect(),
                Ok(a) if self.report_batch_item_failures => {
                    let reported = reported_failures(a);
                    let in_batch: Vec<String> =
                        visible.iter().map(|i| queue[*i].0.id.clone()).collect();
                    // An identifier missing, empty or not in the batch fails all of it, as
                    // Lambda does.
                    let reported = reported.unwrap_or_else(|| vec![String::new()]);
                    if reported.iter().any(|id| !in_batch.contains(id)) {
                        in_batch
                    } else {
                        reported
                    }
                }
                Ok(_) => Vec::new(),
            };
            let mut keep = Vec::with_capacity(queue.len());
            for (i, entry) in queue.into_iter().enumerate() {
                if !visible.contains(&i) {
                    keep.push(entry);
                } else if !failed.contains(&entry.0.id) {
                    report.deleted.push(entry.0.id);
                } else if self.max_receive_count.is_some_and(|max| entry.1 >= max) {
                    report.dead_letters.push((entry.0.id, entry.1));
                } else {
                    keep.push(entry);
                }
            }
            queue = keep;
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_lambda_would_not_take_fails_the_whole_batch() {
        let answer = |failures: Value| json!({ "batchItemFailures": failures });
        assert_eq!(first_failure(&json!({})), None);
        assert_eq!(first_failure(&answer(json!([]))), None);
        assert_eq!(
            first_failure(&answer(
                json!([{ "itemIdentifier": "9" }, { "itemIdentifier": "4" }])
            )),
            Some("4".to_owned())
        );
        // Null, missing, empty or not a string: in no batch, so the whole batch failed.
        for bad in [
            json!([{ "itemIdentifier": null }]),
            json!([{}]),
            json!([{ "itemIdentifier": "" }]),
            json!([{ "itemIdentifier": 4 }]),
            json!([{ "itemIdentifier": "4" }, { "itemIdentifier": null }]),
        ] {
            assert_eq!(
                first_failure(&answer(bad.clone())),
                Some(String::new()),
                "{bad}"
            );
            assert_eq!(reported_failures(&answer(bad.clone())), None, "{bad}");
        }
    }
}
