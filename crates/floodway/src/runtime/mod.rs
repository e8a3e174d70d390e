//! The processor: runs pipelines over a source with bounded memory, per-key order,
//! checkpoints, faults and graceful shutdown.

mod batcher;
mod engine;
mod ledger;
pub(crate) mod scheduler;
mod unit;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::Service;

use crate::error::{BuildError, Error, RunError};
use crate::event::{Event, DEFAULT_MAX_EVENT_SIZE};
use crate::layer::Resilience;
use crate::pipeline::Pipeline;
use crate::source::{Checkpoint, Checkpointer, Settlement, Source};
use crate::uow::Record;

/// Where fault events go: a service that durably stores one fault event.
pub type FaultSink = BoxCloneSyncService<Event, (), Error>;

/// Limits and intervals of a processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessorConfig {
    /// Records being worked on, at most (default 4096): delivered, not done, and not parked
    /// behind an earlier record of the same key. When it is reached the processor stops
    /// pulling.
    pub max_in_flight: usize,
    /// Records held in memory in any state, at most (default 16,384): in flight, parked
    /// behind a slow key, or done and waiting for an earlier record of their partition before
    /// the checkpoint can pass them. This is the memory bound: a slow key delays only the
    /// records that share it until the records held reach it; then the processor stops
    /// pulling. It is at least four times `max_in_flight` (a lower value counts as that).
    /// Records are kept in the pulls they came in, and a pull goes with its last record: up
    /// to one pull's records more than this can be held.
    pub max_buffered: usize,
    /// Records asked of the source per pull (default 512; at most `max_in_flight`).
    pub pull_batch: usize,
    /// How often moved checkpoints are committed (default 1 s); also on stop.
    pub commit_interval: Duration,
    /// Records larger than this are poison (default 1 MiB).
    pub max_event_size: usize,
    /// How long a graceful stop waits for in-flight work (default 30 s).
    pub drain_timeout: Duration,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        ProcessorConfig {
            max_in_flight: 4096,
            max_buffered: 16_384,
            pull_batch: 512,
            commit_interval: Duration::from_secs(1),
            max_event_size: DEFAULT_MAX_EVENT_SIZE,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

pub(crate) struct ProcessorInner {
    pub(crate) name: Arc<str>,
    pub(crate) pipelines: Vec<Pipeline>,
    pub(crate) fault_sink: FaultSink,
    pub(crate) config: ProcessorConfig,
}

/// A stream processor: one source, several pipelines, one fault sink.
///
/// Cheap to clone; [`run`](Processor::run) and [`process_batch`](Processor::process_batch)
/// may be called any number of times (a Lambda function calls `process_batch` per invocation).
#[derive(Clone)]
pub struct Processor {
    inner: Arc<ProcessorInner>,
}

impl std::fmt::Debug for Processor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processor")
            .field("name", &self.inner.name)
            .field("pipelines", &self.inner.pipelines)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Processor`].
#[must_use]
pub struct ProcessorBuilder {
    name: String,
    pipelines: Vec<Pipeline>,
    fault_sink: Option<FaultSink>,
    fault_resilience: Resilience,
    config: ProcessorConfig,
}

impl Processor {
    /// Starts a processor named `name` (it tags the faults it raises).
    pub fn builder(name: impl Into<String>) -> ProcessorBuilder {
        ProcessorBuilder {
            name: name.into(),
            pipelines: Vec::new(),
            fault_sink: None,
            fault_resilience: Resilience::default().no_breaker(),
            config: ProcessorConfig::default(),
        }
    }

    /// The processor's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The pipelines.
    pub fn pipelines(&self) -> &[Pipeline] {
        &self.inner.pipelines
    }

    /// This processor with only the pipeline `name` enabled (same fault sink and settings):
    /// what a resubmitted fault runs through, so that the pipelines that succeeded with the
    /// record do not see it again. `None` if there is no such pipeline.
    pub fn only(&self, name: &str) -> Option<Processor> {
        if !self.inner.pipelines.iter().any(|p| p.name() == name) {
            return None;
        }
        let pipelines = self
            .inner
            .pipelines
            .iter()
            .map(|p| {
                let mut p = p.clone();
                p.enabled = p.enabled && p.name() == name;
                p
            })
            .collect();
        Some(Processor {
            inner: Arc::new(ProcessorInner {
                name: self.inner.name.clone(),
                pipelines,
                fault_sink: self.inner.fault_sink.clone(),
                config: self.inner.config,
            }),
        })
    }

    /// This processor with only the pipeline `name` enabled ([`only`](Self::only)), when that
    /// pipeline would take `record`; else why not: it is not configured, is disabled, or no
    /// longer takes the event's type. A resubmission checks this first, since a record no
    /// pipeline takes counts as done, and "done" would only mean "filtered out".
    ///
    /// # Errors
    /// The reason, for the resubmitter.
    pub fn only_taking(&self, name: &str, record: &Record) -> Result<Processor, &'static str> {
        let gone = "the pipeline is no longer configured";
        let pipeline = self.inner.pipelines.iter().find(|p| p.name() == name);
        let pipeline = pipeline.ok_or(gone)?;
        if !pipeline.is_enabled() {
            return Err("the pipeline is disabled");
        }
        let max = match record.assembled {
            true => usize::MAX,
            false => self.inner.config.max_event_size,
        };
        let taken = Event::decode_bytes(record.data.clone(), max)
            .is_ok_and(|event| pipeline.accepts(&event));
        if !taken {
            return Err("the pipeline no longer takes this event's type");
        }
        self.only(name).ok_or(gone)
    }

    /// The settings.
    pub fn config(&self) -> &ProcessorConfig {
        &self.inner.config
    }

    /// Runs until the source ends or `shutdown` completes, then drains in-flight work (up to
    /// the drain timeout) and commits.
    ///
    /// # Errors
    /// A [`RunError`] when the fault sink, the source or the checkpointer fails or a step
    /// raises a fatal error. The checkpoint is then left below every unfinished record, so a
    /// restart loses nothing.
    pub async fn run<S, C>(
        &self,
        source: S,
        checkpointer: C,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<RunReport, RunError>
    where
        S: Source,
        C: Checkpointer,
    {
        engine::Engine::new(&self.inner, checkpointer)
            .run(source, shutdown, None)
            .await
            .map(|(report, _)| report)
    }

    /// Processes one batch of records (a Lambda invocation) and says how each ended. Work
    /// still unfinished at `deadline` is abandoned and reported as such, so that the caller can
    /// answer before its own deadline.
    pub async fn process_batch(
        &self,
        records: Vec<Record>,
        deadline: Option<Instant>,
    ) -> BatchReport {
        let records = Arc::new(records);
        let collector = engine::SettlementCollector::new(records.clone());
        let result = engine::Engine::new(&self.inner, collector.clone())
            .run_shared(records.clone(), std::future::pending(), deadline)
            .await
            .map(|(report, _)| report);
        let settled = collector.take();
        drop(collector);
        // The source and the collector have ended with the run: the records are the caller's
        // again.
        let records = Arc::try_unwrap(records).unwrap_or_else(|shared| (*shared).clone());
        let outcomes = records
            .into_iter()
            .zip(settled)
            .map(|(record, settlement)| RecordOutcome { record, settlement })
            .collect();
        match result {
            Ok(report) => BatchReport {
                outcomes,
                report,
                fatal: None,
            },
            Err(err) => BatchReport {
                outcomes,
                report: RunReport::default(),
                fatal: Some(err),
            },
        }
    }
}

impl ProcessorBuilder {
    /// Adds a pipeline.
    pub fn pipeline(mut self, pipeline: Pipeline) -> Self {
        self.pipelines.push(pipeline);
        self
    }

    /// Sets where faults go (required): a service that durably stores a fault event. It is
    /// wrapped in retries and a timeout (see [`fault_resilience`](Self::fault_resilience));
    /// if it still fails the processor stops, because a poison record cannot be let go before
    /// its fault is stored.
    pub fn fault_sink<S>(mut self, sink: S) -> Self
    where
        S: Service<Event, Response = (), Error = Error> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        self.fault_sink = Some(BoxCloneSyncService::new(sink));
        self
    }

    /// Sets the fault sink's resilience (default: retries and a timeout, no breaker).
    pub fn fault_resilience(mut self, resilience: Resilience) -> Self {
        self.fault_resilience = resilience;
        self
    }

    /// Sets all limits at once.
    pub fn config(mut self, config: ProcessorConfig) -> Self {
        self.config = config;
        self
    }

    /// Sets [`ProcessorConfig::max_buffered`].
    pub fn max_buffered(mut self, records: usize) -> Self {
        self.config.max_buffered = records;
        self
    }

    /// Sets [`ProcessorConfig::max_in_flight`].
    pub fn max_in_flight(mut self, records: usize) -> Self {
        self.config.max_in_flight = records;
        self
    }

    /// Sets [`ProcessorConfig::pull_batch`].
    pub fn pull_batch(mut self, records: usize) -> Self {
        self.config.pull_batch = records;
        self
    }

    /// Sets [`ProcessorConfig::commit_interval`].
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.config.commit_interval = interval;
        self
    }

    /// Sets [`ProcessorConfig::max_event_size`].
    pub fn max_event_size(mut self, bytes: usize) -> Self {
        self.config.max_event_size = bytes;
        self
    }

    /// Sets [`ProcessorConfig::drain_timeout`].
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.config.drain_timeout = timeout;
        self
    }

    /// Finishes the processor.
    ///
    /// # Errors
    /// No pipelines, duplicate pipeline names, no fault sink, or a zero limit.
    pub fn build(self) -> Result<Processor, BuildError> {
        if self.pipelines.is_empty() {
            return Err(BuildError::NoPipelines(self.name));
        }
        let mut names = std::collections::HashSet::new();
        for p in &self.pipelines {
            if !names.insert(p.name()) {
                return Err(BuildError::DuplicatePipeline(p.name().into()));
            }
        }
        let zero = |setting: &'static str| BuildError::InvalidSetting {
            setting,
            problem: "must be at least 1".into(),
        };
        if self.config.max_in_flight == 0 {
            return Err(zero("max_in_flight"));
        }
        if self.config.pull_batch == 0 {
            return Err(zero("pull_batch"));
        }
        if !self.pipelines.iter().any(Pipeline::is_enabled) {
            return Err(BuildError::InvalidSetting {
                setting: "pipelines",
                problem: format!(
                    "of processor `{}` are all disabled: enable at least one",
                    self.name
                ),
            });
        }
        for p in self.pipelines.iter().filter(|p| p.is_enabled()) {
            if let Some(b) = &p.core.batching {
                if b.config.max_count > self.config.max_in_flight {
                    return Err(BuildError::InvalidSetting {
                        setting: "batch",
                        problem: format!(
                            "of pipeline `{}` waits for {} units of work, but the processor holds \
                             at most {} records in flight: lower max_count or raise max_in_flight",
                            p.name(),
                            b.config.max_count,
                            self.config.max_in_flight
                        ),
                    });
                }
            }
        }
        let sink = self.fault_sink.ok_or_else(|| BuildError::InvalidSetting {
            setting: "fault_sink",
            problem: "is required: faults must be stored durably before a poison record is let \
                      go (in tests, use floodway::memory::MemoryFaultSink)"
                .into(),
        })?;
        let fault_sink = self
            .fault_resilience
            .apply(&format!("{}-faults", self.name), sink)?;
        Ok(Processor {
            inner: Arc::new(ProcessorInner {
                name: self.name.into(),
                pipelines: self.pipelines,
                fault_sink,
                config: self.config,
            }),
        })
    }
}

/// Why a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Stopped {
    /// The source ended and everything was processed.
    #[default]
    SourceEnded,
    /// Shutdown was asked for and in-flight work drained.
    Shutdown,
    /// Shutdown was asked for and the drain timeout passed first.
    DrainTimeout,
    /// The batch deadline passed first.
    Deadline,
}

/// What one pipeline did during a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PipelineReport {
    /// The pipeline.
    pub name: String,
    /// Events its type filter took.
    pub taken: u64,
    /// Events filtered out (by type or content), or compacted away in a batch.
    pub filtered: u64,
    /// Units of work its sink accepted.
    pub delivered: u64,
    /// Fault events it raised.
    pub faults: u64,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Records received from the source.
    pub received: u64,
    /// Records done (every pipeline finished with them).
    pub done: u64,
    /// Faults raised while decoding (before any pipeline).
    pub decode_faults: u64,
    /// Per pipeline.
    pub pipelines: Vec<PipelineReport>,
    /// The last committed checkpoint per partition.
    pub checkpoints: Vec<Checkpoint>,
    /// Why the run ended.
    pub stopped: Stopped,
}

impl RunReport {
    /// All faults raised.
    pub fn faults(&self) -> u64 {
        self.decode_faults + self.pipelines.iter().map(|p| p.faults).sum::<u64>()
    }

    /// One pipeline's report.
    pub fn pipeline(&self, name: &str) -> Option<&PipelineReport> {
        self.pipelines.iter().find(|p| p.name == name)
    }
}

/// How one record of a batch ended.
#[derive(Debug, Clone)]
pub struct RecordOutcome {
    /// The record.
    pub record: Record,
    /// How it settled; `None` if it was not finished (deadline or fatal error).
    pub settlement: Option<Settlement>,
}

/// The result of [`Processor::process_batch`].
#[derive(Debug)]
pub struct BatchReport {
    /// One outcome per record, in the order given.
    pub outcomes: Vec<RecordOutcome>,
    /// Counts.
    pub report: RunReport,
    /// The fatal error that stopped processing, if any.
    pub fatal: Option<RunError>,
}

impl BatchReport {
    /// The records that did not finish.
    pub fn unfinished(&self) -> impl Iterator<Item = &Record> {
        self.outcomes
            .iter()
            .filter(|o| o.settlement.is_none())
            .map(|o| &o.record)
    }

    /// Per partition, the first record (in the order given) that did not finish: what a stream
    /// source must redeliver from.
    pub fn first_unfinished_per_partition(&self) -> Vec<Record> {
        let mut seen = std::collections::HashSet::new();
        self.unfinished()
            .filter(|r| seen.insert(r.partition.clone()))
            .cloned()
            .collect()
    }
}
