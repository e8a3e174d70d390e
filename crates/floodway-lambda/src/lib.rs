//! Floodway on AWS Lambda.
//!
//! - [`Handler`]: an invocation's records (Kinesis, DynamoDB Streams as change data capture,
//!   SQS, SNS, SQS carrying SNS, EventBridge) through the same processor and pipelines as the other runtimes,
//!   answered with `ReportBatchItemFailures`; [`serve`] is a function's `main`.
//! - [`sources`]: the payloads as records, read tolerantly (a record that cannot be read is
//!   faulted alone), and the CDC rules.
//! - [`simulator`]: a deterministic model of Lambda's event-source mappings (batching,
//!   partial-batch checkpointing, bisect on error, retries, record age, on-failure
//!   destination, per-shard order; SQS visibility and dead-letter queue), driving handlers in
//!   this process or real handler binaries through [`runtime_api`], a local Lambda Runtime
//!   API.
//!
//! This crate does not use the AWS SDK, so the `floodway` command can run AWS-shaped
//! processors locally without compiling it.

pub mod handler;
pub mod resubmit;
pub mod runtime_api;
mod serve;
pub mod simulator;
pub mod sources;
pub mod testing;

pub use handler::{Handler, HandlerError};
pub use resubmit::resubmission_payload;
pub use runtime_api::{FunctionProcess, InvokeError, LocalRuntime, RuntimeRequest};
pub use serve::{serve, ServeError};
pub use simulator::{
    Function, InProcess, QueueMapping, QueueMessage, ShardReport, StreamKind, StreamMapping,
    StreamRecord,
};
pub use sources::CdcOptions;
