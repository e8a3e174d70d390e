//! Pipelines: a filter, steps and a sink.
//!
//! A pipeline sees every event of its processor's source and takes those its filter accepts.
//! Steps transform what it took: [`map`](PipelineBuilder::map),
//! [`flat_map`](PipelineBuilder::flat_map) (split), [`validate`](PipelineBuilder::validate),
//! [`filter`](PipelineBuilder::filter) on content, async [`then`](PipelineBuilder::then)
//! (enrich), and [`batch`](PipelineBuilder::batch) with optional
//! [`group_by`](PipelineBuilder::group_by) and [`compact`](PipelineBuilder::compact). The sink
//! performs the side effect.
//!
//! ```
//! use floodway::{pipeline::Pipeline, sink_fn, Batch, Error};
//!
//! let pipeline = Pipeline::builder("notify-shipping")
//!     .types(["order-submitted", "order-cancelled"])
//!     .filter(|uow| uow.event().field("order").is_some())
//!     .map(|mut uow| {
//!         uow.event_mut().set_tag("pipeline", "notify-shipping");
//!         Ok(uow)
//!     })
//!     .sink(sink_fn(|batch: Batch| async move {
//!         for event in batch.events() {
//!             println!("{}", event.id());
//!         }
//!         Ok::<_, Error>(())
//!     }))
//!     .unwrap();
//! assert_eq!(pipeline.name(), "notify-shipping");
//! ```

mod filter;
pub(crate) mod step;

pub use filter::TypeFilter;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tower::Service;

use crate::error::{BuildError, Error};
use crate::event::Event;
use crate::layer::{BoxFuture, Resilience};
use crate::sink::{Attempt, Entries, Sink};
use crate::uow::Uow;
use step::{Step, StepKind};

/// The type-erased sink stack a pipeline calls: the resilience layers around the sink, each
/// call delivering what is still pending of one batch. Called through a shared reference:
/// a call clones one `Arc` and boxes one future.
pub(crate) type BoxSink = Arc<dyn Fn(Attempt) -> BoxFuture<()> + Send + Sync>;

pub(crate) type KeyFn = Arc<dyn Fn(&Uow) -> String + Send + Sync>;

/// How a pipeline gathers units of work into batches before its sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Flush when this many units of work are gathered.
    pub max_count: usize,
    /// Flush when the events' encoded size reaches this many bytes.
    pub max_bytes: usize,
    /// Flush a batch this long after its first unit of work arrived.
    pub max_wait: Duration,
}

impl BatchConfig {
    /// Batches of up to `max_count`, at most 5 MiB, waiting at most 100 ms.
    pub fn count(max_count: usize) -> Self {
        BatchConfig {
            max_count,
            max_bytes: 5 * 1024 * 1024,
            max_wait: Duration::from_millis(100),
        }
    }

    /// Sets the byte limit.
    #[must_use]
    pub fn max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Sets the time window.
    #[must_use]
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }
}

#[derive(Clone)]
pub(crate) struct Batching {
    pub(crate) config: BatchConfig,
    pub(crate) group: Option<KeyFn>,
    pub(crate) compact: Option<KeyFn>,
}

/// What a processor needs of a pipeline while it runs; shared by its units of work.
pub(crate) struct PipelineCore {
    pub(crate) name: Arc<str>,
    pub(crate) steps: Vec<Step>,
    pub(crate) batching: Option<Batching>,
    pub(crate) sink: BoxSink,
    pub(crate) parallelism: usize,
    pub(crate) redact: Vec<String>,
}

/// A named, independently enabled flow from a filter through steps to a sink.
#[derive(Clone)]
pub struct Pipeline {
    pub(crate) core: Arc<PipelineCore>,
    pub(crate) enabled: bool,
    types: Vec<TypeFilter>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("name", &self.core.name)
            .field("enabled", &self.enabled)
            .field("types", &self.types)
            .field(
                "steps",
                &self.core.steps.iter().map(|s| &s.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Starts a pipeline named `name` (unique within its processor; it tags faults).
    pub fn builder(name: impl Into<String>) -> PipelineBuilder {
        PipelineBuilder {
            name: name.into(),
            enabled: true,
            types: Vec::new(),
            steps: Vec::new(),
            batching: None,
            parallelism: 16,
            redact: Vec::new(),
            resilience: Resilience::default(),
            error: None,
        }
    }

    /// The pipeline's name.
    pub fn name(&self) -> &str {
        &self.core.name
    }

    /// Whether the pipeline runs.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Whether the pipeline takes this event (its type filters; content filters are steps).
    pub fn accepts(&self, event: &Event) -> bool {
        self.types.is_empty() && !event.is_fault()
            || self.types.iter().any(|t| t.matches(event.event_type()))
    }

    /// The names of the steps, in order.
    pub fn step_names(&self) -> impl Iterator<Item = &str> {
        self.core.steps.iter().map(|s| &*s.name)
    }
}

/// Builds a [`Pipeline`]; finish with [`sink`](PipelineBuilder::sink).
#[must_use]
pub struct PipelineBuilder {
    name: String,
    enabled: bool,
    types: Vec<TypeFilter>,
    steps: Vec<Step>,
    batching: Option<Batching>,
    parallelism: usize,
    redact: Vec<String>,
    resilience: Resilience,
    error: Option<BuildError>,
}

impl PipelineBuilder {
    fn step(mut self, kind: &str, step: StepKind) -> Self {
        let name = format!("{kind}-{}", self.steps.len() + 1);
        self.steps.push(Step::new(name.into(), step));
        self
    }

    /// Enables or disables the pipeline (a disabled one sees nothing and holds nothing up).
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// Takes events whose type matches `pattern`: exact, or with `*` wildcards. Call it several
    /// times to take several patterns. Without any, the pipeline takes every event but faults.
    pub fn event_type(mut self, pattern: &str) -> Self {
        match TypeFilter::parse(pattern) {
            Ok(f) => self.types.push(f),
            Err(e) => self.error = self.error.or(Some(e)),
        }
        self
    }

    /// Takes events of any of these exact types.
    pub fn types<I: IntoIterator<Item = S>, S: Into<String>>(mut self, types: I) -> Self {
        self.types.push(TypeFilter::set(types));
        self
    }

    /// Keeps only the units of work for which `predicate` holds (a content filter).
    pub fn filter<F>(self, predicate: F) -> Self
    where
        F: Fn(&Uow) -> bool + Send + Sync + 'static,
    {
        self.step("filter", StepKind::Filter(Arc::new(predicate)))
    }

    /// Transforms each unit of work; an error faults it.
    pub fn map<F>(self, f: F) -> Self
    where
        F: Fn(Uow) -> Result<Uow, Error> + Send + Sync + 'static,
    {
        self.step("map", StepKind::Map(Arc::new(f)))
    }

    /// Replaces each event with the one `f` returns. The unit of work goes on as it is, its
    /// event replaced, without being copied (but for a call retried through the step's
    /// resilience stack): prefer it to [`map`](Self::map) when only the event changes.
    pub fn map_event<F>(self, f: F) -> Self
    where
        F: Fn(&Event) -> Result<Event, Error> + Send + Sync + 'static,
    {
        self.step("map", StepKind::MapEvent(Arc::new(f)))
    }

    /// Compresses each event's payload fields over `threshold` bytes as aws-lambda-stream
    /// does when it publishes ([`crate::compression`]; its default threshold is
    /// [`crate::compression::DEFAULT_THRESHOLD`]), for Node services that read what this
    /// pipeline publishes. Steps after it see the revived values; an event no larger than
    /// `threshold` passes untouched.
    pub fn compress_over(self, threshold: usize) -> Self {
        self.step(
            "compress",
            StepKind::Map(Arc::new(move |mut uow: Uow| {
                if uow.event().encoded_len() > threshold {
                    uow.event_mut().compress_fields(threshold, &[]);
                }
                Ok(uow)
            })),
        )
    }

    /// Splits each unit of work into any number (an empty list drops it).
    pub fn flat_map<F>(self, f: F) -> Self
    where
        F: Fn(Uow) -> Result<Vec<Uow>, Error> + Send + Sync + 'static,
    {
        self.step("split", StepKind::FlatMap(Arc::new(f)))
    }

    /// Checks each event; an error (make it poison) faults the unit of work.
    pub fn validate<F>(self, check: F) -> Self
    where
        F: Fn(&Event) -> Result<(), Error> + Send + Sync + 'static,
    {
        self.step("validate", StepKind::Check(Arc::new(check)))
    }

    /// Checks that each event deserializes into `T` and attaches the typed value to the unit of
    /// work ([`Uow::get::<T>()`](Uow::get)); events that do not fit are faulted.
    pub fn validate_as<T>(self) -> Self
    where
        T: DeserializeOwned + Send + Sync + 'static,
    {
        self.step(
            "validate",
            StepKind::Map(Arc::new(|mut uow: Uow| {
                let value: T = uow.event().payload()?;
                uow.insert(value);
                Ok(uow)
            })),
        )
    }

    /// An async, fallible step, e.g. enriching from another service.
    ///
    /// Its calls get the failure design of a sink: they go through a resilience stack
    /// ([`Resilience::default`] unless set with [`step_resilience`](Self::step_resilience)),
    /// so a transient error is retried in place, a throttle slows the calls down, an outage
    /// is held by the step's circuit breaker (nothing faulted, nothing skipped) and only a
    /// poison error, or retries spent while the service otherwise answers, faults the unit
    /// of work. A fatal error stops the processor.
    ///
    /// Synchronous steps ([`map`](Self::map), [`validate`](Self::validate), ...) run bare;
    /// one that returns a transient or outage error is handed to its stack the same way.
    pub fn then<F, Fut>(self, f: F) -> Self
    where
        F: Fn(Uow) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Uow, Error>> + Send + 'static,
    {
        self.step(
            "then",
            StepKind::Async(Arc::new(move |uow| Box::pin(f(uow)))),
        )
    }

    /// Adds aws-lambda-stream's standard tags to each event (`account`, `region`, `stage`,
    /// `source`, `functionname`, and `pipeline`: this pipeline's name), as its publishers
    /// do; a tag the event has already is kept, and a value `tags` lacks is left out (where
    /// aws-lambda-stream writes `"undefined"`). Put it before a sink that publishes.
    pub fn standard_tags(self, tags: StandardTags) -> Self {
        let pipeline = self.name.clone();
        self.step(
            "tags",
            StepKind::Map(Arc::new(move |mut uow: Uow| {
                let wanted = [
                    ("account", tags.account.as_deref()),
                    ("region", tags.region.as_deref()),
                    ("stage", tags.stage.as_deref()),
                    ("source", tags.source.as_deref()),
                    ("functionname", tags.function_name.as_deref()),
                    ("pipeline", Some(pipeline.as_str())),
                ];
                let missing: Vec<(&str, &str)> = wanted
                    .iter()
                    .filter_map(|(k, v)| Some((*k, (*v)?)))
                    .filter(|(k, _)| uow.event().tags().is_none_or(|t| !t.contains_key(*k)))
                    .collect();
                if !missing.is_empty() {
                    // Changed, the event is written again from its fields: one whose payload
                    // does not read would go on as its envelope alone.
                    uow.event().check_payload()?;
                    let event = uow.event_mut();
                    for (k, v) in missing {
                        event.set_tag(k, v);
                    }
                }
                Ok(uow)
            })),
        )
    }

    /// Drops events tagged `skip: true` (aws-lambda-stream's `outSkip`: a service under test
    /// tags what it publishes so that others leave it alone).
    pub fn out_skip(self) -> Self {
        self.filter(|uow| {
            !uow.event().tags().is_some_and(|t| {
                t.get("skip")
                    .is_some_and(|v| v == &serde_json::Value::Bool(true))
            })
        })
        .named("out-skip")
    }

    /// Drops events whose `source` tag is `source` (aws-lambda-stream's `outSourceIsSelf`:
    /// a service does not materialize what it published itself).
    pub fn out_source(self, source: impl Into<String>) -> Self {
        let source = source.into();
        self.filter(move |uow| uow.event().tag("source") != Some(source.as_str()))
            .named("out-source")
    }

    /// Decrypts the fields of each event that carries encryption metadata (`eem`), as
    /// aws-lambda-stream's `decryptEvent` does, with data keys from `keys` (AWS KMS, a key
    /// file; see [`crate::encryption`]); events without it pass as they are. Runs through
    /// the step's resilience stack (a key service that is down is waited out). A fault of
    /// this unit of work shows the event as it was before decryption, and its message has
    /// the decrypted values scrubbed.
    pub fn decrypt(self, keys: Arc<dyn crate::encryption::KeyProvider>) -> Self {
        self.then(move |mut uow: Uow| {
            let keys = keys.clone();
            async move {
                // A payload that does not read would show no `eem`, and pass on encrypted.
                uow.event().check_payload()?;
                if uow.event().field(crate::encryption::EEM_FIELD).is_none() {
                    return Ok(uow);
                }
                let clear = crate::encryption::decrypt_event(&*keys, uow.event()).await?;
                let before = crate::encryption::Undecrypted {
                    event: uow.event.clone(),
                    secrets: clear.secrets,
                };
                uow.insert(before);
                uow.set_event(clear.event);
                Ok(uow)
            }
        })
        .named("decrypt")
    }

    /// Encrypts the members of each event named by `fields` (names, matched at any depth
    /// as aws-kms-ee matches them: `customer.email` names every member `email`) with a data
    /// key from `keys`, and adds the metadata Node and Rust readers decrypt it with (`eem`).
    /// Put it last, after the steps that read those fields.
    pub fn encrypt<I, S>(mut self, keys: Arc<dyn crate::encryption::KeyProvider>, fields: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let fields: Arc<[String]> = fields.into_iter().map(Into::into).collect();
        // Named at any depth, as aws-kms-ee names them: an envelope field's name would also
        // encrypt the envelope's own (a new random id at every attempt, a key no order
        // keeps, a timestamp no reader takes).
        let last = |f: &str| f.rsplit('.').next().unwrap_or(f).to_owned();
        if let Some(f) = fields
            .iter()
            .find(|f| crate::event::ENVELOPE_FIELDS.contains(&last(f).as_str()))
        {
            self.error = self.error.or(Some(BuildError::InvalidSetting {
                setting: "encrypt",
                problem: format!(
                    "`{f}` names every member `{}`, the envelope's own too (fields are named \
                     at any depth): encrypt a field of another name",
                    last(f)
                ),
            }));
        }
        self.then(move |mut uow: Uow| {
            let (keys, fields) = (keys.clone(), fields.clone());
            async move {
                let sealed = crate::encryption::encrypt_event(&*keys, uow.event(), &fields).await?;
                uow.set_event(sealed);
                Ok(uow)
            }
        })
        .named("encrypt")
    }

    /// A step that is a `tower::Service` taking and returning the unit of work (a client
    /// built with tower layers of its own, say); it runs through the step's resilience stack
    /// like [`then`](Self::then).
    pub fn call<S>(self, service: S) -> Self
    where
        S: Service<Uow, Response = Uow, Error = Error> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        self.step(
            "call",
            StepKind::Async(Arc::new(move |uow| {
                Box::pin(tower::ServiceExt::oneshot(service.clone(), uow))
            })),
        )
    }

    /// Sets the resilience stack of the last step added (default: [`Resilience::default`]:
    /// retries, a 30 s timeout and a circuit breaker of its own). Give steps that call the
    /// same service as a sink the same shared limiter or breaker to treat them as one target.
    pub fn step_resilience(mut self, resilience: Resilience) -> Self {
        match self.steps.last_mut() {
            Some(step) => step.resilience = resilience,
            None => {
                self.error = self.error.or(Some(BuildError::InvalidSetting {
                    setting: "step_resilience",
                    problem: "sets the last step's stack, and there is none yet".into(),
                }))
            }
        }
        self
    }

    /// Renames the last step added (the step named in fault events).
    pub fn named(mut self, name: impl Into<String>) -> Self {
        match self.steps.last_mut() {
            Some(step) => step.name = name.into().into(),
            None => {
                self.error = self.error.or(Some(BuildError::InvalidSetting {
                    setting: "named",
                    problem: "names the last step, and there is none yet".into(),
                }))
            }
        }
        self
    }

    /// Gathers units of work into batches for the sink.
    pub fn batch(mut self, config: BatchConfig) -> Self {
        if config.max_count == 0 || config.max_bytes == 0 {
            self.error = self.error.or(Some(BuildError::InvalidSetting {
                setting: "batch",
                problem: "needs max_count and max_bytes of at least 1".into(),
            }));
        }
        self.batching = Some(Batching {
            config,
            group: self.batching.as_ref().and_then(|b| b.group.clone()),
            compact: self.batching.as_ref().and_then(|b| b.compact.clone()),
        });
        self
    }

    fn batching_mut(&mut self, what: &'static str) -> Option<&mut Batching> {
        if self.batching.is_none() {
            self.error = self.error.take().or(Some(BuildError::InvalidSetting {
                setting: what,
                problem: "works on batches: call `.batch(..)` first".into(),
            }));
        }
        self.batching.as_mut()
    }

    /// Sets a batching setting; without `.batch(..)` first, the build fails naming `what`.
    fn with_batching(mut self, what: &'static str, set: impl FnOnce(&mut Batching)) -> Self {
        if let Some(b) = self.batching_mut(what) {
            set(b);
        }
        self
    }

    /// Splits each batch into one batch per key, in order of first appearance.
    pub fn group_by<F>(self, key: F) -> Self
    where
        F: Fn(&Uow) -> String + Send + Sync + 'static,
    {
        self.with_batching("group_by", |b| b.group = Some(Arc::new(key)))
    }

    /// Keeps only the latest unit of work per key in each batch, by `(timestamp, id)`; the
    /// others are done when it is.
    pub fn compact<F>(self, key: F) -> Self
    where
        F: Fn(&Uow) -> String + Send + Sync + 'static,
    {
        self.with_batching("compact", |b| b.compact = Some(Arc::new(key)))
    }

    /// How many units of work (or batches) may be in the sink at once (default 16); units with
    /// the same partition key always run one after another.
    pub fn parallelism(mut self, parallelism: usize) -> Self {
        if parallelism == 0 {
            self.error = self.error.or(Some(BuildError::InvalidSetting {
                setting: "parallelism",
                problem: "must be at least 1".into(),
            }));
        }
        self.parallelism = parallelism.max(1);
        self
    }

    /// Replaces these fields of the event with `"[REDACTED]"` in fault events. A path is
    /// dotted: `customer.email`; through an array it names the field in every element
    /// (`lines.card`); `partitionKey` also keeps the key out of the fault's own envelope (the
    /// fault is keyed by a hash of it).
    pub fn redact<I: IntoIterator<Item = S>, S: Into<String>>(mut self, paths: I) -> Self {
        self.redact.extend(paths.into_iter().map(Into::into));
        self
    }

    /// Sets the sink's resilience stack (default: [`Resilience::default`]).
    pub fn resilience(mut self, resilience: Resilience) -> Self {
        self.resilience = resilience;
        self
    }

    /// Finishes the pipeline with its sink, wrapped in the resilience stack.
    ///
    /// # Errors
    /// The first inconsistent setting met while building.
    pub fn sink<S: Sink>(self, sink: S) -> Result<Pipeline, BuildError> {
        if let Some(err) = self.error {
            return Err(err);
        }
        if self.name.is_empty() {
            return Err(BuildError::InvalidSetting {
                setting: "name",
                problem: "a pipeline needs a name".into(),
            });
        }
        let stack = self
            .resilience
            .stack(&self.name, Entries::new(sink, &self.name))?;
        let sink: BoxSink = Arc::new(move |attempt| stack.call_shared(attempt));
        let mut steps = self.steps;
        for step in &mut steps {
            step.build_guard(&self.name)?;
        }
        Ok(Pipeline {
            core: Arc::new(PipelineCore {
                name: self.name.into(),
                steps,
                batching: self.batching,
                sink,
                parallelism: self.parallelism,
                redact: self.redact,
            }),
            enabled: self.enabled,
            types: self.types,
        })
    }
}

/// aws-lambda-stream's standard tags; see [`PipelineBuilder::standard_tags`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StandardTags {
    /// `account`: the account's name.
    pub account: Option<String>,
    /// `region`.
    pub region: Option<String>,
    /// `stage`.
    pub stage: Option<String>,
    /// `source`: the publishing service.
    pub source: Option<String>,
    /// `functionname`.
    pub function_name: Option<String>,
}

impl StandardTags {
    /// From the environment, as aws-lambda-stream reads it: `ACCOUNT_NAME`, `AWS_REGION`,
    /// `STAGE` (or `SERVERLESS_STAGE`), `SERVICE` (or `PROJECT`, `SERVERLESS_PROJECT`),
    /// `AWS_LAMBDA_FUNCTION_NAME`.
    pub fn from_env() -> StandardTags {
        let var = |names: &[&str]| names.iter().find_map(|n| std::env::var(n).ok());
        StandardTags {
            account: var(&["ACCOUNT_NAME"]),
            region: var(&["AWS_REGION"]),
            stage: var(&["STAGE", "SERVERLESS_STAGE"]),
            source: var(&["SERVICE", "PROJECT", "SERVERLESS_PROJECT"]),
            function_name: var(&["AWS_LAMBDA_FUNCTION_NAME"]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MemoryFaultSink, MemorySink};
    use crate::{Processor, Record};

    /// A processor of the one `pipeline`, its faults into `faults`.
    fn processor(pipeline: Pipeline, faults: &MemoryFaultSink) -> Processor {
        Processor::builder("p")
            .fault_sink(faults.clone())
            .pipeline(pipeline)
            .build()
            .unwrap()
    }

    async fn through(pipeline: PipelineBuilder, events: &[&str]) -> Vec<Event> {
        let sink = MemorySink::new();
        let processor = processor(
            pipeline.sink(sink.clone()).unwrap(),
            &MemoryFaultSink::new(),
        );
        let records = events
            .iter()
            .enumerate()
            .map(|(i, e)| Record::new("memory", "0", i as u64, e.to_string()))
            .collect();
        processor.process_batch(records, None).await;
        sink.events()
    }

    /// Events of one type derived from one event share an id under `derive`: a split giving
    /// two different events one id is poison (a hub would keep only the first), and
    /// `derive_part` gives each its own.
    #[tokio::test]
    async fn a_split_giving_different_events_one_id_is_poison() {
        let order =
            r#"{"id":"o1","type":"order-placed","timestamp":1,"partitionKey":"k","lines":[1,2,3]}"#;
        let run = |lines: usize, by_part: bool| async move {
            let sink = MemorySink::new();
            let faults = MemoryFaultSink::new();
            let pipeline = Pipeline::builder("lines")
                .flat_map(move |uow| {
                    Ok((0..lines)
                        .map(|line| {
                            let event = match by_part {
                                true => uow.event().derive_part("line-placed", &line.to_string()),
                                false => uow.event().derive("line-placed"),
                            };
                            uow.with_event(event.field("line", line).build())
                        })
                        .collect())
                })
                .sink(sink.clone())
                .unwrap();
            let processor = processor(pipeline, &faults);
            let record = Record::new("memory", "0", 0, order.to_string());
            processor.process_batch(vec![record], None).await;
            (sink.events(), faults.faults())
        };
        for lines in [3, 40] {
            let (events, faults) = run(lines, false).await;
            assert!(events.is_empty());
            assert_eq!(faults.len(), 1);
            let text = faults[0].to_json();
            assert!(text.contains("DuplicateEventId"), "{text}");
            let (events, faults) = run(lines, true).await;
            assert!(faults.is_empty());
            let ids: std::collections::HashSet<_> = events.iter().map(|e| e.id()).collect();
            assert_eq!(ids.len(), lines);
        }
        // One event sent on twice is no clash.
        let twice = Pipeline::builder("twice").flat_map(|uow| Ok(vec![uow.clone(), uow]));
        assert_eq!(through(twice, &[order]).await.len(), 2);
    }

    /// Steps that pass one unit of work on run in a plain loop, and the walk takes over at the
    /// first step that splits, filters out or fails, with that step's result: each step runs
    /// once per unit of work that reaches it, what reaches the sink keeps source order and
    /// every step's changes, and a failure is the failing step's.
    #[tokio::test]
    async fn steps_run_the_same_through_the_loop_and_the_walk() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let events: Vec<String> = (0..4)
            .map(|i| {
                format!(r#"{{"id":"e{i}","type":"t","timestamp":1,"partitionKey":"k{i}","n":{i}}}"#)
            })
            .collect();
        let n = |e: &Event| {
            e.field("n")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(99)
        };
        let seen = |e: &Event| {
            e.field("seen")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_owned()
        };
        let mark = move |step: &'static str| {
            move |e: &Event| -> Result<Event, Error> {
                let mut next = e.clone();
                next.fields_mut()
                    .insert("seen".into(), format!("{}{step}", seen(e)).into());
                Ok(next)
            }
        };
        // Calls of the steps after the loop's first ones: the check, the split, the filter.
        let calls: Arc<[AtomicUsize; 3]> = Arc::default();
        let sink = MemorySink::new();
        let faults = MemoryFaultSink::new();
        let pipeline = Pipeline::builder("p")
            .map_event(mark("a"))
            // A map that hands back a unit of work of its own.
            .map(move |uow| {
                let event = mark("m")(uow.event())?;
                Ok(uow.with_event(event))
            })
            // Event 3 fails here, after steps of the loop.
            .validate({
                let calls = calls.clone();
                move |e| {
                    calls[0].fetch_add(1, Ordering::Relaxed);
                    match n(e) {
                        3 => Err(Error::poison_msg("Three", "no threes")),
                        _ => Ok(()),
                    }
                }
            })
            .named("no-threes")
            .map_event(mark("b"))
            // Event 2 splits in two, its parts keeping what the loop did: the walk from here.
            .flat_map({
                let calls = calls.clone();
                move |uow| {
                    calls[1].fetch_add(1, Ordering::Relaxed);
                    let event = uow.event();
                    Ok(match n(event) {
                        2 => ["x", "y"]
                            .into_iter()
                            .zip([20, 21])
                            .map(|(part, n)| {
                                let part = event
                                    .derive_part("t", part)
                                    .field("n", n)
                                    .field("seen", seen(event))
                                    .build();
                                uow.with_event(part)
                            })
                            .collect(),
                        _ => vec![uow],
                    })
                }
            })
            // Event 1 and the split's second part are filtered out.
            .filter({
                let calls = calls.clone();
                move |uow| {
                    calls[2].fetch_add(1, Ordering::Relaxed);
                    !matches!(n(uow.event()), 1 | 21)
                }
            })
            .map_event(mark("c"))
            .sink(sink.clone())
            .unwrap();
        let processor = processor(pipeline, &faults);
        let records = events
            .iter()
            .enumerate()
            .map(|(i, e)| Record::new("memory", "0", i as u64 + 1, e.clone()))
            .collect();
        let report = processor.process_batch(records, None).await;
        let sunk: Vec<(u64, String)> = sink.events().iter().map(|e| (n(e), seen(e))).collect();
        assert_eq!(sunk, [(0, "ambc".to_owned()), (20, "ambc".to_owned())]);
        let calls: Vec<usize> = calls.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        assert_eq!(
            calls,
            [4, 3, 4],
            "check, split, filter: once per unit reaching each"
        );
        let faults = faults.faults();
        assert_eq!(faults.len(), 1);
        assert_eq!(faults[0].tag("step"), Some("no-threes"));
        let text = faults[0].to_json();
        assert!(text.contains("no threes") && text.contains("e3"), "{text}");
        assert_eq!(report.unfinished().count(), 0, "every record settled");
        assert_eq!(report.report.done, 4);
    }

    /// Fields are named at any depth, the envelope's too: encrypting `customer.id` would
    /// also encrypt the event's id (a new random one at every attempt).
    #[test]
    fn encrypting_a_field_named_as_the_envelope_is_refused() {
        let keys: Arc<dyn crate::encryption::KeyProvider> =
            Arc::new(crate::encryption::KeyFile::new("k", &[7; 32]).unwrap());
        for fields in [["customer.id"], ["partitionKey"]] {
            let err = Pipeline::builder("p")
                .encrypt(keys.clone(), fields)
                .sink(MemorySink::new())
                .unwrap_err();
            assert!(err.to_string().contains("the envelope's own"), "{err}");
        }
        Pipeline::builder("p")
            .encrypt(keys, ["customer.email"])
            .sink(MemorySink::new())
            .unwrap();
    }

    #[tokio::test]
    async fn aws_lambda_stream_tags_and_filters() {
        let tags = StandardTags {
            account: Some("dev".into()),
            region: Some("us-west-2".into()),
            stage: None,
            source: Some("svc-a".into()),
            function_name: Some("svc-a-dev-listener".into()),
        };
        let plain = r#"{"id":"1","type":"t","timestamp":1,"partitionKey":"k"}"#;
        let own = r#"{"id":"2","type":"t","timestamp":1,"partitionKey":"k","tags":{"source":"svc-b","region":"eu-west-1"}}"#;
        let out = through(
            Pipeline::builder("publish").standard_tags(tags),
            &[plain, own],
        )
        .await;
        let tags_of = |e: &Event| serde_json::Value::Object(e.tags().cloned().unwrap_or_default());
        assert_eq!(
            tags_of(&out[0]),
            serde_json::json!({ "account": "dev", "region": "us-west-2", "source": "svc-a",
                                "functionname": "svc-a-dev-listener", "pipeline": "publish" })
        );
        // The event's own tags win.
        assert_eq!(out[1].tag("source"), Some("svc-b"));
        assert_eq!(out[1].tag("region"), Some("eu-west-1"));
        assert_eq!(out[1].tag("account"), Some("dev"));

        let skipped =
            r#"{"id":"3","type":"t","timestamp":1,"partitionKey":"k","tags":{"skip":true}}"#;
        let out = through(Pipeline::builder("listen").out_skip(), &[plain, skipped]).await;
        assert_eq!(out.iter().map(Event::id).collect::<Vec<_>>(), ["1"]);
        let out = through(Pipeline::builder("view").out_source("svc-b"), &[plain, own]).await;
        assert_eq!(out.iter().map(Event::id).collect::<Vec<_>>(), ["1"]);
    }
}
