//! Floodway: event-driven stream processors that keep working when things go wrong.
//!
//! A **processor** reads records from a source and runs several **pipelines** over every
//! event: each filters what concerns it, transforms it in steps and hands it to a **sink** (a
//! `tower::Service`) wrapped in resilience layers. Failures are classified and handled by
//! class: transient errors are retried, poison events become **fault events** and the stream
//! flows on, an outage opens the stream circuit breaker and holds the work without faulting
//! it, and a fatal error stops the processor without advancing its checkpoint.
//!
//! ```
//! use floodway::{memory::MemorySink, pipeline::{BatchConfig, Pipeline}, testing::{generate, TestKit}};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let kit = TestKit::new(); // in-memory fault sink and checkpoints
//! let paid = MemorySink::new();
//! let all = MemorySink::new();
//! let processor = kit
//!     .processor("orders")
//!     .pipeline(
//!         Pipeline::builder("paid")
//!             .event_type("order-paid")
//!             .validate(|e| match e.field("order") {
//!                 Some(_) => Ok(()),
//!                 None => Err(floodway::Error::poison_msg("MissingOrder", "no order field")),
//!             })
//!             .sink(paid.clone())
//!             .unwrap(),
//!     )
//!     .pipeline(
//!         Pipeline::builder("archive")
//!             .event_type("order-*")
//!             .batch(BatchConfig::count(25))
//!             .sink(all.clone())
//!             .unwrap(),
//!     )
//!     .build()
//!     .unwrap();
//!
//! let events = generate::orders(1_000, 1);
//! let report = kit.run_jsonl(&processor, &generate::to_jsonl(&events)).await.unwrap();
//! assert_eq!(report.done, 1_000);
//! assert!(all.batches().iter().all(|b| b.len() <= 25));
//! assert!(kit.faults().is_empty());
//! # });
//! ```
//!
//! | part | module |
//! |---|---|
//! | event envelope (compatible with `aws-lambda-stream`), lazy payload decoding | [`event`] |
//! | pipelines: filters, map, split, validate, async steps, batch, group, compact | [`pipeline`] |
//! | processor runtime: backpressure, per-key order, checkpoints, batch mode | [`runtime`] |
//! | error classes: transient, poison, outage, fatal | [`error`] |
//! | retry + budget, timeout, GCRA rate limit, adaptive concurrency, circuit breaker | [`layer`] |
//! | fault events with deterministic ids and redaction | [`fault`] |
//! | idempotence and latest-wins rules | [`idempotence`] |
//! | sources and checkpointers (traits), in-memory implementations | [`source`], [`memory`] |
//! | testing kit, scripted flaky sink, event generators | [`testing`] |
//!
//! Metrics go through the `metrics` facade (install any recorder, e.g. Prometheus); spans and
//! logs through `tracing`. See `ARCHITECTURE.md` in the repository for how a record flows.

pub mod cep;
pub mod clock;
pub mod compression;
pub mod encryption;
mod envelope;
pub mod error;
pub mod event;
pub mod fault;
pub mod fault_report;
pub mod fault_store;
pub mod hub;
pub mod idempotence;
pub mod layer;
pub mod memory;
pub mod pipeline;
pub mod rows;
pub mod runtime;
pub mod scan;
pub mod sink;
pub mod source;
pub mod state;
pub mod testing;
mod uow;

/// What the sink macros name; not part of the API.
#[doc(hidden)]
pub mod reexports {
    pub use tower;
}

/// The README's examples, compiled as doc tests.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

pub use error::{BoxError, BuildError, DecodeEventError, Error, ErrorClass, ResultExt, RunError};
pub use event::{Event, EventBuilder};
pub use hub::{EventHub, ReadOptions, SharedHub};
pub use pipeline::{BatchConfig, Pipeline};
pub use runtime::{Processor, ProcessorConfig, RunReport};
pub use sink::{each_fn, fault_sink_fn, sink_fn, Delivery, Publisher, Sink};
pub use source::{Checkpoint, Checkpointer, Settlement, Source};
pub use uow::{Batch, Malformed, Record, Uow};
