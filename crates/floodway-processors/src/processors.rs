//! The ready-made processors, as library builders.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use floodway::cep::SharedRule;
use floodway::hub::{ReadOptions, SharedHub, Stream};
use floodway::idempotence::Version;
use floodway::layer::limit::concurrency::{Aimd, ConcurrencyLimiter};
use floodway::layer::limit::rate::RateLimiter;
use floodway::layer::retry::RetryPolicy;
use floodway::layer::Resilience;
use floodway::rows::{Lookup, RowKey, RowSink, Update};
use floodway::runtime::RunReport;
use floodway::Publisher;
use floodway::{
    sink_fn, Batch, BatchConfig, BuildError, Error, Event, Pipeline, Processor, RunError,
};
use floodway_embedded::{CepTimers, FaultStore, Hub, HubError, HubOptions, OpenError};
use floodway_http::{HttpConfigError, HttpSink, HttpSinkConfig, Secret};
use floodway_nats::NatsHub;
use serde_json::Value;
use tower::util::BoxCloneSyncService;

use crate::config::{
    ConcurrencyConfig, Config, EnrichConfig, FieldValue, HeaderConfig, HumanDuration,
    ProcessorConfig, RuleConfig, StalePolicy, ViewKey, DEFAULT_CEP_TTL,
};
use crate::hubs::{Hubs, HubsError};

/// A processor could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// A pipeline or processor setting is invalid.
    #[error("processor `{name}`: {source}")]
    Build {
        /// The processor.
        name: String,
        /// Why.
        #[source]
        source: BuildError,
    },
    /// The HTTP settings are invalid.
    #[error("processor `{name}`: {source}")]
    Http {
        /// The processor.
        name: String,
        /// Why.
        #[source]
        source: HttpConfigError,
    },
    /// A hub could not be opened.
    #[error("processor `{name}`: {source}")]
    Open {
        /// The processor.
        name: String,
        /// Why.
        #[source]
        source: OpenError,
    },
    /// A NATS hub could not be reached or does not fit.
    #[error("processor `{name}`: {source}")]
    Nats {
        /// The processor.
        name: String,
        /// Why.
        #[source]
        source: HubsError,
    },
    /// The hub failed.
    #[error("processor `{name}`: {source}")]
    Hub {
        /// The processor.
        name: String,
        /// Why.
        #[source]
        source: HubError,
    },
    /// The configuration's hubs could not be opened (`[hub]`, `[hub.nats]`, `[encryption]`):
    /// no processor's fault.
    #[error("the hub: {source}")]
    Hubs {
        /// Why.
        #[source]
        source: HubsError,
    },
    /// What runs beside the processors (the outbox's relay) could not start.
    #[error("{what}: {source}")]
    Beside {
        /// What.
        what: String,
        /// Why.
        #[source]
        source: HubError,
    },
    /// A setting needs another.
    #[error("processor `{name}`: {message}")]
    Config {
        /// The processor.
        name: String,
        /// What is missing.
        message: String,
    },
}

/// Where a materialized row's key comes from.
fn key_of(spec: &str, event: &Event) -> Result<String, Error> {
    match spec {
        "partitionKey" => Ok(event.partition_key().to_owned()),
        "id" => Ok(event.id().to_owned()),
        pointer => match event.json_at(pointer) {
            // A string written without escapes is its own text between the quotes.
            Some(text) if text.len() >= 2 && text.starts_with('"') && !text.contains('\\') => {
                Ok(text[1..text.len() - 1].to_owned())
            }
            Some(text) => match serde_json::from_str::<Value>(&text) {
                Ok(Value::String(s)) => Ok(s),
                Ok(Value::Number(n)) => Ok(n.to_string()),
                _ => Err(Error::poison_msg(
                    "InvalidKey",
                    format!(
                        "{pointer} of event {} is {text}, not a string or number",
                        event.id()
                    ),
                )),
            },
            None => Err(Error::poison_msg(
                "MissingKey",
                format!("event {} has no {pointer}", event.id()),
            )),
        },
    }
}

/// The JSON text of a materialized row's value.
fn value_of(spec: Option<&str>, event: &Event) -> Result<String, Error> {
    let pointer = spec.unwrap_or("");
    event
        .json_at(pointer)
        .map(|text| text.into_owned())
        .ok_or_else(|| {
            Error::poison_msg(
                "MissingValue",
                format!("event {} has no {pointer}", event.id()),
            )
        })
}

fn with_types(
    mut builder: floodway::pipeline::PipelineBuilder,
    types: &[String],
) -> floodway::pipeline::PipelineBuilder {
    for t in types {
        builder = builder.event_type(t);
    }
    builder
}

/// How a processor treats sensitive fields.
#[derive(Debug, Clone, Default)]
pub struct Protect {
    /// Fields (dotted paths) that appear nowhere in its faults.
    pub redact: Vec<String>,
    /// Decrypt events that carry encryption metadata (`eem`) first, with the hub's keys.
    pub decrypt: bool,
    /// Encrypt the members of these names before publishing (a forward processor).
    pub encrypt: Vec<String>,
    /// Rows read into each event after decryption (an *http* or *forward* processor).
    pub enrich: Vec<EnrichConfig>,
}

/// The start of a processor's pipeline: its types, what it redacts, its decryption and its
/// enrichments.
fn start(
    hubs: &Hubs,
    name: &str,
    types: &[String],
    protect: &Protect,
) -> Result<floodway::pipeline::PipelineBuilder, SetupError> {
    let mut pipeline =
        with_types(Pipeline::builder(name), types).redact(protect.redact.iter().cloned());
    if protect.decrypt {
        pipeline = pipeline.decrypt(keys_of(hubs, name, "decrypt")?);
    }
    for enrich in &protect.enrich {
        let table = hubs
            .store
            .rows(&enrich.view)
            .map_err(|source| SetupError::Hub {
                name: name.into(),
                source,
            })?;
        let (pk, sk) = (enrich.pk.clone(), enrich.sk.clone());
        let step = Lookup::new(Arc::new(table)).enrich(
            move |e: &Event| {
                let sk = sk.as_deref().map(|sk| key_part(sk, e)).transpose()?;
                Ok((key_part(&pk, e)?, sk))
            },
            enrich.into.clone(),
        );
        pipeline = pipeline.then(step).named("enrich");
    }
    Ok(pipeline)
}

/// The hub's data keys, which `setting` of processor `name` needs.
fn keys_of(
    hubs: &Hubs,
    name: &str,
    setting: &str,
) -> Result<Arc<dyn floodway::encryption::KeyProvider>, SetupError> {
    hubs.keys.clone().ok_or_else(|| SetupError::Config {
        name: name.into(),
        message: format!(
            "`{setting}` needs keys: add `[encryption] key_file = \"<file of 32 bytes or their base64>\"`"
        ),
    })
}

/// A processor of one pipeline whose faults are published to the hub as `fault` events.
fn publishing_faults(hubs: &Hubs, name: &str, pipeline: Pipeline) -> Result<Processor, SetupError> {
    publishing_faults_holding(hubs, name, pipeline, None, None)
}

/// [`publishing_faults`], holding up to `in_flight` records when set (the default otherwise),
/// committing its checkpoints every `commit` when set (the default otherwise).
fn publishing_faults_holding(
    hubs: &Hubs,
    name: &str,
    pipeline: Pipeline,
    in_flight: Option<usize>,
    commit: Option<std::time::Duration>,
) -> Result<Processor, SetupError> {
    let builder = Processor::builder(name);
    let builder = match in_flight {
        Some(n) => builder.max_in_flight(n),
        None => builder,
    };
    let builder = match commit {
        Some(every) => builder.commit_interval(every),
        None => builder,
    };
    builder
        .fault_sink(Publisher::new(hubs.events.clone()))
        .pipeline(pipeline)
        .build()
        .map_err(|source| SetupError::Build {
            name: name.into(),
            source,
        })
}

/// Where the *materialize* processor writes: the view, how rows are keyed and valued, and
/// how many rows a transaction writes at most.
#[derive(Debug, Clone, Copy)]
pub struct ViewTarget<'a> {
    /// The view's name.
    pub view: &'a str,
    /// `partitionKey`, `id`, or a JSON pointer.
    pub key: &'a str,
    /// A JSON pointer to the value; the whole event when `None`.
    pub value: Option<&'a str>,
    /// Rows per transaction at most.
    pub batch: usize,
    /// How long a transaction waits for more rows before it is written.
    pub wait: Duration,
}

/// How long a *materialize* processor's transaction waits for more rows, by default: long
/// enough that a processor catching up writes its rows by the ten thousand (each transaction
/// writes every page it changed, and pages are shared by many rows), short enough that a view
/// is at most a tenth of a second behind under light load.
pub const DEFAULT_BATCH_WAIT: Duration = Duration::from_millis(100);

/// The short window: of processors whose output should follow soon (*cep*, *forward*, the
/// fault monitor), of row tables (in the hub file, whose write lock publishing waits for), and
/// of views on a hub that lets a subscription hold fewer records unacknowledged than a batch
/// takes (NATS, `max_ack_pending`): such a batch never fills by count, and every transaction
/// would wait out a longer window while the server holds the rest back.
pub const SHORT_BATCH_WAIT: Duration = Duration::from_millis(20);

/// Rows per transaction of a *materialize* processor writing a view, by default.
pub const DEFAULT_VIEW_BATCH: usize = 20_000;

/// Updates per transaction of a *materialize* processor writing a row table, by default
/// (written after [`SHORT_BATCH_WAIT`] under light load).
pub const DEFAULT_ROWS_BATCH: usize = 5_000;

/// The time window of a *materialize* processor writing `batch` rows per transaction into a
/// view on `hubs`: `asked`, else the default for the hub ([`DEFAULT_BATCH_WAIT`],
/// [`SHORT_BATCH_WAIT`]).
fn transaction_wait(hubs: &Hubs, batch: usize, asked: Option<HumanDuration>) -> Duration {
    match asked {
        Some(wait) => wait.get(),
        None if hubs.unacked.is_some_and(|held| held < batch) => SHORT_BATCH_WAIT,
        None => DEFAULT_BATCH_WAIT,
    }
}

/// A view's transactions hold up to 64 MiB of events (the count is the limit that matters;
/// this one keeps a batch of large events in bounds).
const VIEW_BATCH_BYTES: usize = 64 << 20;

/// The *materialize* processor: events of `types` into the latest-wins view `view`.
///
/// # Errors
/// An invalid type pattern or view name, or a hub failure.
pub fn materialize(
    hubs: &Hubs,
    name: &str,
    types: &[String],
    target: ViewTarget<'_>,
    protect: &Protect,
) -> Result<Processor, SetupError> {
    let ViewTarget {
        view,
        key,
        value,
        batch,
        wait,
    } = target;
    let hub_err = |source| SetupError::Hub {
        name: name.into(),
        source,
    };
    let store = hubs.store.view(view).map_err(hub_err)?;
    let (key, value) = (key.to_owned(), value.map(str::to_owned));
    let sink = store.sink_json(
        move |e| key_of(&key, e),
        move |e| value_of(value.as_deref(), e),
    );
    let batching = BatchConfig::count(batch)
        .max_bytes(VIEW_BATCH_BYTES)
        .max_wait(wait);
    batched(hubs, name, types, protect, batching, sink, None)
}

/// A processor whose sink writes transactions as `batching` says, with room for two in
/// flight: one being written while the next fills.
fn batched<S: floodway::Sink>(
    hubs: &Hubs,
    name: &str,
    types: &[String],
    protect: &Protect,
    batching: BatchConfig,
    sink: S,
    commit: Option<std::time::Duration>,
) -> Result<Processor, SetupError> {
    let batch = batching.max_count;
    let pipeline = start(hubs, name, types, protect)?
        .batch(batching)
        .sink(sink)
        .map_err(|source| SetupError::Build {
            name: name.into(),
            source,
        })?;
    let in_flight = (2 * batch).max(floodway::runtime::ProcessorConfig::default().max_in_flight);
    publishing_faults_holding(hubs, name, pipeline, Some(in_flight), commit)
}

/// How a *materialize* processor with a row key makes each event's update.
#[derive(Debug, Clone)]
pub struct RowTarget {
    /// The table's name.
    pub table: String,
    /// The partition and sort keys: `partitionKey`, `id`, a JSON pointer, or text.
    pub pk: String,
    /// The sort key, the same way.
    pub sk: String,
    /// A JSON pointer to the fields set when no field is named; the whole event when `None`.
    pub value: Option<String>,
    /// Fields to set.
    pub set: Vec<(String, FieldValue)>,
    /// Fields to remove.
    pub remove: Vec<String>,
    /// Counters and sets to add to.
    pub add: Vec<(String, FieldValue)>,
    /// Sets to delete elements from.
    pub delete: Vec<(String, FieldValue)>,
    /// Event types that delete the row.
    pub delete_on: Vec<String>,
    /// How long a row lives after the event that last wrote it.
    pub ttl: Option<Duration>,
    /// The kind of row.
    pub discriminator: Option<String>,
    /// Per field or per row.
    pub latest: floodway::rows::Latest,
    /// A stale update is a fault (else dropped).
    pub fault_when_stale: bool,
    /// Write changes to the outbox.
    pub outbox: bool,
    /// Updates per transaction at most.
    pub batch: usize,
    /// How long a transaction waits for more updates before it is written.
    pub wait: Duration,
}

/// A part of a row's key: `partitionKey`, `id`, a JSON pointer, or text.
fn key_part(spec: &str, event: &Event) -> Result<String, Error> {
    if spec == "partitionKey" || spec == "id" || spec.starts_with('/') {
        key_of(spec, event)
    } else {
        Ok(spec.to_owned())
    }
}

/// A field's value: `None` when its pointer finds nothing (then the field is left alone, as
/// aws-lambda-stream leaves out undefined values).
fn field_value(value: &FieldValue, event: &Event) -> Result<Option<Value>, Error> {
    Ok(match value {
        FieldValue::Pointer(pointer) => match event.json_at(pointer) {
            Some(text) => Some(
                serde_json::from_str(&text)
                    .map_err(|e| Error::poison_msg("InvalidValue", format!("{pointer}: {e}")))?,
            ),
            None => None,
        },
        FieldValue::Integer(n) => Some((*n).into()),
        FieldValue::Float(n) => Some((*n).into()),
        FieldValue::Bool(b) => Some((*b).into()),
        FieldValue::Value { value } => Some(value.clone()),
    })
}

impl RowTarget {
    /// The update `event` makes.
    fn update(
        &self,
        event: &Event,
        deletes: &[floodway::pipeline::TypeFilter],
    ) -> Result<Update, Error> {
        let key = RowKey::new(key_part(&self.pk, event)?, key_part(&self.sk, event)?);
        let mut u = Update::new(key, Version::of(event)).latest(self.latest);
        if deletes.iter().any(|f| f.matches(event.event_type())) {
            u = u.delete_row();
        } else if self.set.is_empty()
            && self.remove.is_empty()
            && self.add.is_empty()
            && self.delete.is_empty()
        {
            let text = value_of(self.value.as_deref(), event)?;
            let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(&text) else {
                return Err(Error::poison_msg(
                    "InvalidValue",
                    format!(
                        "{} of event {} is not an object of fields",
                        self.value.as_deref().unwrap_or("the event"),
                        event.id()
                    ),
                ));
            };
            // The row's own names (its key, kind, time) are not fields.
            u.set = fields
                .into_iter()
                .filter(|(f, _)| !floodway::rows::RESERVED.contains(&f.as_str()))
                .collect();
        } else {
            for (field, value) in &self.set {
                if let Some(v) = field_value(value, event)? {
                    u = u.set(field, v);
                }
            }
            u.remove.clone_from(&self.remove);
            for (field, value) in &self.add {
                if let Some(v) = field_value(value, event)? {
                    u = u.add(field, v);
                }
            }
            for (field, value) in &self.delete {
                if let Some(v) = field_value(value, event)? {
                    u = u.delete(field, v);
                }
            }
        }
        if let Some(ttl) = self.ttl {
            u = u.expiring_at(event.timestamp().saturating_add(ttl.as_millis() as i64));
        }
        if let Some(d) = &self.discriminator {
            u = u.discriminator(d);
        }
        if self.fault_when_stale {
            u = u.on_stale(floodway::rows::Stale::Fault);
        }
        Ok(u)
    }
}

/// The *materialize* processor with a row key: events of `types` as update requests into the
/// row table `target.table`, with the outbox when asked.
///
/// # Errors
/// An invalid type pattern or table name, or a hub failure.
pub fn materialize_rows(
    hubs: &Hubs,
    name: &str,
    types: &[String],
    target: RowTarget,
    protect: &Protect,
) -> Result<Processor, SetupError> {
    let hub_err = |source| SetupError::Hub {
        name: name.into(),
        source,
    };
    let build = |source| SetupError::Build {
        name: name.into(),
        source,
    };
    let mut table = hubs.store.rows(&target.table).map_err(hub_err)?;
    if target.outbox {
        table = table.with_outbox();
    }
    let deletes = target
        .delete_on
        .iter()
        .map(|t| floodway::pipeline::TypeFilter::parse(t))
        .collect::<Result<Vec<_>, _>>()
        .map_err(build)?;
    let batching = BatchConfig::count(target.batch).max_wait(target.wait);
    let sink = RowSink::new(Arc::new(table), move |e| {
        Ok(vec![target.update(e, &deletes)?])
    });
    batched(hubs, name, types, protect, batching, sink, None)
}

/// Settings of the *cep* processor.
#[derive(Debug, Clone)]
pub struct CepSettings {
    /// The correlation keys: a JSON pointer, `partitionKey` or `id`, each with an optional
    /// suffix.
    pub correlate: Vec<(String, Option<String>)>,
    /// The rules.
    pub rules: Vec<SharedRule>,
    /// How long events stay in their sets.
    pub ttl: Duration,
    /// Events per transaction at most.
    pub batch: usize,
}

/// The correlation keys of `event`.
fn correlation_keys(
    correlate: &[(String, Option<String>)],
    event: &Event,
) -> Result<Vec<String>, Error> {
    if correlate.is_empty() {
        return Ok(vec![event.partition_key().to_owned()]);
    }
    correlate
        .iter()
        .map(|(key, suffix)| {
            let value = key_of(key, event)?;
            Ok(match suffix {
                Some(s) => format!("{value}.{s}"),
                None => value,
            })
        })
        .collect()
}

/// The *cep* processor: events of `types` collected per correlation key, its rules evaluated
/// over each key's set, what they emit written to the outbox in the same transaction (the
/// outbox's relay publishes it). Its timers fire by [`cep_timers`] on the embedded hub.
///
/// On a hub that keeps timers and whose partitions move between instances (NATS), the
/// processor takes its state along: each batch first asks the hub what another instance
/// read from the batch's partitions since this one last did ([`EventHub::missed`]) and
/// catches up on it ([`CepTable::restore`](floodway_embedded::CepTable::restore)); its timers
/// are handed to the hub ([`EventHub::schedule`]) before the batch is acknowledged, and fire
/// when the hub delivers them to whichever instance reads the key's partition then.
///
/// # Errors
/// An invalid type pattern, or a hub failure.
///
/// [`EventHub::missed`]: floodway::hub::EventHub::missed
/// [`EventHub::schedule`]: floodway::hub::EventHub::schedule
pub fn cep(
    hubs: &Hubs,
    name: &str,
    types: &[String],
    settings: CepSettings,
    protect: &Protect,
) -> Result<Processor, SetupError> {
    let mut table = hubs.store.cep(name).map_err(|source| SetupError::Hub {
        name: name.into(),
        source,
    })?;
    let hub_timers = hubs.events.schedules();
    let filters = types
        .iter()
        .map(|t| floodway::pipeline::TypeFilter::parse(t))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| SetupError::Build {
            name: name.into(),
            source,
        })?;
    let CepSettings {
        correlate,
        rules,
        ttl,
        batch,
    } = settings;
    // Where partitions move between instances, every record of a partition comes to the
    // sink (which collects those of `types`), so that how far a partition was read here is
    // exact, and a gap means another instance read it.
    let read: Vec<String> = if hub_timers {
        table = table.with_hub_timers().map_err(|source| SetupError::Hub {
            name: name.into(),
            source,
        })?;
        vec!["*".to_owned()]
    } else {
        types.to_vec()
    };
    let decrypt = match protect.decrypt {
        true => Some(keys_of(hubs, name, "decrypt")?),
        false => None,
    };
    let state = Arc::new(CepState {
        name: name.to_owned(),
        table,
        hub: hubs.events.clone(),
        correlate,
        filters,
        rules,
        ttl,
        decrypt,
        read: std::sync::Mutex::default(),
        delivered: std::sync::Mutex::default(),
    });
    let sink = sink_fn(move |batch: Batch| {
        let state = state.clone();
        async move { state.write(batch).await }
    });
    let batching = BatchConfig::count(batch).max_wait(SHORT_BATCH_WAIT);
    // Its timers fire once it has read what was published before them, as its checkpoint
    // says (`CepTimers::following`): stored often, so that an expiry is not held a second.
    let commit = Some(std::time::Duration::from_millis(100));
    batched(hubs, name, &read, protect, batching, sink, commit)
}

/// What a *cep* processor's sink works with.
struct CepState {
    name: String,
    table: floodway_embedded::CepTable,
    hub: floodway::SharedHub,
    correlate: Vec<(String, Option<String>)>,
    filters: Vec<floodway::pipeline::TypeFilter>,
    rules: Vec<SharedRule>,
    ttl: Duration,
    /// The keys of the pipeline's decryption, for what catching up reads.
    decrypt: Option<Arc<dyn floodway::encryption::KeyProvider>>,
    /// How far this process has read each partition (caught up on, or in a batch being
    /// written): a batch after another of the same partition still in flight is no gap.
    read: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// The last delivery this process saw of each partition ([`Record::delivery`]).
    ///
    /// [`Record::delivery`]: floodway::Record::delivery
    delivered: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

/// Where a batch starts and ends in one partition: positions, and deliveries when the source
/// counts them.
struct Span {
    first: u64,
    last: u64,
    first_delivery: Option<u64>,
    last_delivery: Option<u64>,
    records: u64,
}

impl Span {
    fn of(record: &floodway::Record) -> Span {
        Span {
            first: record.offset,
            last: record.offset,
            first_delivery: record.delivery,
            last_delivery: record.delivery,
            records: 0,
        }
    }

    /// Whether its deliveries are consecutive and follow `previous`: no other reader had a
    /// delivery of the partition since then.
    fn follows(&self, previous: Option<u64>) -> bool {
        match (previous, self.first_delivery, self.last_delivery) {
            (Some(previous), Some(first), Some(last)) => {
                first == previous + 1 && last - first + 1 == self.records
            }
            _ => false,
        }
    }

    fn add(&mut self, record: &floodway::Record) {
        self.first = self.first.min(record.offset);
        self.last = self.last.max(record.offset);
        self.first_delivery = self.first_delivery.min(record.delivery);
        self.last_delivery = self.last_delivery.max(record.delivery);
        self.records += 1;
    }
}

impl CepState {
    /// Runs a table call on a blocking thread.
    async fn blocking<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(floodway_embedded::CepTable, Vec<SharedRule>) -> Result<T, HubError>
            + Send
            + 'static,
    {
        let (table, rules) = (self.table.clone(), self.rules.clone());
        match tokio::task::spawn_blocking(move || f(table, rules)).await {
            Ok(done) => done.map_err(Error::from),
            // A rule that panics on what it was given: poison (the batch is bisected down
            // to the event), not a call to try again.
            Err(e) if e.is_panic() => Err(Error::panicked(&*e.into_panic())),
            Err(e) => Err(Error::transient_msg("CepTask", e.to_string())),
        }
    }

    /// Whether this processor collects events of type `ty`.
    fn collects(&self, ty: &str) -> bool {
        ty != floodway::cep::TIMER_DUE && self.filters.iter().any(|f| f.matches(ty))
    }

    async fn write(&self, batch: Batch) -> Result<floodway::Delivery, Error> {
        let mut delivery = floodway::Delivery::complete();
        // Where the batch starts and ends in each partition it holds.
        let mut spans: std::collections::BTreeMap<String, Span> = Default::default();
        for uow in batch.items() {
            let record = uow.record();
            spans
                .entry(record.partition.to_string())
                .or_insert_with(|| Span::of(record))
                .add(record);
        }
        self.catch_up(&spans).await?;
        let mut entries = Vec::with_capacity(batch.len());
        let mut timers = Vec::new();
        for (i, event) in batch.events().enumerate() {
            if let Some((processor, key, timer)) = floodway::cep::Timer::of_event(event) {
                if processor == self.name {
                    timers.push((key, timer));
                }
                continue;
            }
            if !self.collects(event.event_type()) {
                continue;
            }
            match correlation_keys(&self.correlate, event) {
                Ok(keys) => entries.push((keys, event.clone())),
                Err(err) if batch.len() == 1 => return Err(err),
                Err(err) => delivery.fail(i, err),
            }
        }
        let progress: Vec<(String, u64)> = spans.iter().map(|(p, s)| (p.clone(), s.last)).collect();
        let ttl = self.ttl;
        self.blocking(move |table, rules| {
            table.collect_at(&entries, &rules, Some(ttl), &progress)?;
            for (key, timer) in &timers {
                table.fire_timer(key, timer, &rules, Some(ttl))?;
            }
            Ok(())
        })
        .await?;
        self.hand_timers_to_the_hub().await?;
        Ok(delivery)
    }

    /// Catches up on what another instance read from these partitions since this one last
    /// did: only where partitions move between instances (a hub that keeps timers), one
    /// request per partition when nothing was missed, the partitions asked at once.
    async fn catch_up(
        &self,
        spans: &std::collections::BTreeMap<String, Span>,
    ) -> Result<(), Error> {
        if !self.hub.schedules() {
            return Ok(());
        }
        let stored = self.blocking(|table, _| table.positions()).await?;
        let since = floodway::event::now_millis() - self.ttl.as_millis() as i64;
        let mut asks = tokio::task::JoinSet::new();
        {
            let read = self
                .read
                .lock()
                .map_err(|_| Error::fatal_msg("CepState", "poisoned"))?;
            let delivered = self
                .delivered
                .lock()
                .map_err(|_| Error::fatal_msg("CepState", "poisoned"))?;
            for (partition, span) in spans {
                let after = match (stored.get(partition), read.get(partition)) {
                    (Some(a), Some(b)) => Some(*a.max(b)),
                    (a, b) => a.or(b).copied(),
                };
                if after.is_some_and(|a| a >= span.first) {
                    continue; // a redelivery of what this instance read
                }
                if after.is_some() && span.follows(delivered.get(partition).copied()) {
                    // Delivered right after the last this instance saw, one after another:
                    // no other reader had anything from the partition in between.
                    continue;
                }
                let (hub, partition, first) = (self.hub.clone(), partition.clone(), span.first);
                asks.spawn(async move {
                    let missed = hub.missed(&partition, after, first, since).await;
                    (partition, missed)
                });
            }
        }
        while let Some(asked) = asks.join_next().await {
            let (partition, missed) =
                asked.map_err(|e| Error::transient_msg("CepCatchUp", e.to_string()))?;
            let missed = missed.map_err(|e| Error::transient_msg("CepCatchUp", e.to_string()))?;
            let Some(last) = missed.last().map(|(s, _)| *s) else {
                continue;
            };
            let mut entries = Vec::with_capacity(missed.len());
            for (_, bytes) in &missed {
                let Ok(mut event) = Event::decode(bytes) else {
                    continue; // not an event: its fault was raised where it was read
                };
                if let Some(keys) = &self.decrypt {
                    match floodway::encryption::decrypt_event(&**keys, &event).await {
                        Ok(clear) => event = clear.event,
                        Err(e) if e.class() == floodway::ErrorClass::Poison => continue, // faulted where it was read
                        Err(e) => return Err(e),
                    }
                }
                let keys = if self.collects(event.event_type()) {
                    correlation_keys(&self.correlate, &event).unwrap_or_default()
                } else {
                    Vec::new()
                };
                entries.push((keys, event));
            }
            tracing::info!(
                processor = %self.name,
                partition = %partition,
                records = missed.len(),
                "catching up on what another instance read from the partition"
            );
            let progress = vec![(partition.clone(), last)];
            let ttl = self.ttl;
            self.blocking(move |table, rules| {
                table.restore(&entries, &rules, Some(ttl), &progress)
            })
            .await?;
        }
        let mut read = self
            .read
            .lock()
            .map_err(|_| Error::fatal_msg("CepState", "poisoned"))?;
        for (partition, span) in spans {
            let at = read.entry(partition.clone()).or_insert(span.last);
            *at = (*at).max(span.last);
        }
        drop(read);
        let mut delivered = self
            .delivered
            .lock()
            .map_err(|_| Error::fatal_msg("CepState", "poisoned"))?;
        for (partition, span) in spans {
            if let Some(last) = span.last_delivery {
                let at = delivered.entry(partition.clone()).or_insert(last);
                *at = (*at).max(last);
            }
        }
        Ok(())
    }

    /// Hands the timers set so far to the hub, before the batch that set them is
    /// acknowledged: a process that dies after that loses none.
    async fn hand_timers_to_the_hub(&self) -> Result<(), Error> {
        if !self.hub.schedules() {
            return Ok(());
        }
        loop {
            let pending = self
                .blocking(|table, _| table.pending_schedules(500))
                .await?;
            if pending.is_empty() {
                return Ok(());
            }
            let timers: Vec<(Event, i64)> = pending
                .iter()
                .map(|t| (t.to_event(&self.name), t.timer.due))
                .collect();
            self.hub
                .schedule(&timers)
                .await
                .map_err(|e| Error::transient_msg("CepSchedule", e.to_string()))?;
            let done = pending.len();
            self.blocking(move |table, _| table.scheduled(&pending))
                .await?;
            if done < 500 {
                return Ok(());
            }
        }
    }
}

/// The timers of the configuration's *cep* processors, each to run beside its processor;
/// none on a hub that keeps timers itself (they come back as events: [`cep`]).
///
/// # Errors
/// A hub failure, or a rule that does not build.
pub fn cep_timers(hubs: &Hubs, config: &Config) -> Result<Vec<(String, CepTimers)>, SetupError> {
    let mut timers = Vec::new();
    if hubs.events.schedules() {
        return Ok(timers);
    }
    for p in &config.processors {
        if let ProcessorConfig::Cep {
            name, rules, ttl, ..
        } = p
        {
            let table = hubs.store.cep(name).map_err(|source| SetupError::Hub {
                name: name.clone(),
                source,
            })?;
            let rules = rules_of(name, rules)?;
            let ttl = ttl.map_or(DEFAULT_CEP_TTL, HumanDuration::get);
            timers.push((
                name.clone(),
                // Its timers wait for the processor to read what was published before
                // them (the hub's own log; a subscription kept elsewhere is not seen).
                CepTimers::new(&hubs.store, table, rules, Some(ttl)).following(name.clone()),
            ));
        }
    }
    Ok(timers)
}

fn rules_of(name: &str, rules: &[RuleConfig]) -> Result<Vec<SharedRule>, SetupError> {
    rules
        .iter()
        .map(|r| {
            r.rule()
                .map(|rule| Arc::new(rule) as SharedRule)
                .map_err(|message| SetupError::Config {
                    name: name.into(),
                    message,
                })
        })
        .collect()
}

/// Settings of the *http* processor.
#[derive(Debug, Clone)]
pub struct HttpGateway {
    /// Where to send.
    pub config: HttpSinkConfig,
    /// Calls per second at most, and the burst.
    pub rate_limit: Option<(u32, u32)>,
    /// A fixed number of calls at once; adaptive when `None`.
    pub fixed_concurrency: Option<usize>,
    /// Each attempt's deadline.
    pub timeout: Duration,
    /// Attempts per event.
    pub max_attempts: u32,
    /// Calls in flight at most.
    pub parallelism: usize,
}

/// The *http* processor: events of `types` to an external API.
///
/// # Errors
/// Invalid settings.
pub fn http_gateway(
    hubs: &Hubs,
    name: &str,
    types: &[String],
    gateway: HttpGateway,
    protect: &Protect,
) -> Result<Processor, SetupError> {
    let build = |source| SetupError::Build {
        name: name.into(),
        source,
    };
    let mut resilience = Resilience::default()
        .timeout(gateway.timeout)
        .retry(RetryPolicy::default().max_attempts(gateway.max_attempts));
    if let Some((rate, burst)) = gateway.rate_limit {
        let limiter = RateLimiter::per_second(rate)
            .and_then(|l| l.with_burst(burst))
            .map_err(build)?;
        resilience = resilience.rate_limit(limiter);
    }
    resilience = match gateway.fixed_concurrency {
        Some(n) => resilience.concurrency(ConcurrencyLimiter::fixed(n).map_err(build)?),
        None => resilience.adaptive_concurrency(Aimd::default()),
    };
    let sink = HttpSink::new(gateway.config).with_response_publisher(BoxCloneSyncService::new(
        Publisher::new(hubs.events.clone()),
    ));
    let pipeline = start(hubs, name, types, protect)?
        .parallelism(gateway.parallelism)
        .resilience(resilience)
        .sink(sink)
        .map_err(build)?;
    publishing_faults(hubs, name, pipeline)
}

/// The *forward* processor: events of `types` into another hub (idempotently: a redelivered
/// event is stored there once): another embedded hub, or a NATS stream; with `compress_over`,
/// payload fields over that many bytes are compressed as aws-lambda-stream does.
///
/// # Errors
/// Invalid types.
pub fn forward(
    hubs: &Hubs,
    name: &str,
    types: &[String],
    to: &SharedHub,
    protect: &Protect,
    compress_over: Option<usize>,
) -> Result<Processor, SetupError> {
    let build = |source| SetupError::Build {
        name: name.into(),
        source,
    };
    let mut pipeline = start(hubs, name, types, protect)?;
    if !protect.encrypt.is_empty() {
        pipeline = pipeline.encrypt(
            keys_of(hubs, name, "encrypt")?,
            protect.encrypt.iter().cloned(),
        );
    }
    if let Some(threshold) = compress_over {
        pipeline = pipeline.compress_over(threshold);
    }
    let pipeline = pipeline
        .batch(BatchConfig::count(500).max_wait(SHORT_BATCH_WAIT))
        .sink(Publisher::new(to.clone()))
        .map_err(build)?;
    publishing_faults(hubs, name, pipeline)
}

/// The *fault monitor*: `fault` events of the hub into its fault store.
///
/// # Errors
/// A hub failure.
pub fn fault_monitor(hubs: &Hubs, name: &str) -> Result<Processor, SetupError> {
    let build = |source| SetupError::Build {
        name: name.into(),
        source,
    };
    let store: FaultStore = hubs.store.fault_store().map_err(|source| SetupError::Hub {
        name: name.into(),
        source,
    })?;
    let sink = {
        let store = store.clone();
        sink_fn(move |batch: Batch| {
            let store = store.clone();
            async move {
                // One transaction per batch; a batch stored again (bisected after a failure)
                // counts each raise once.
                // On a blocking thread: a file locked by another process is waited out there,
                // not on the processor's task.
                let faults: Vec<Event> = batch.events().cloned().collect();
                tokio::task::spawn_blocking(move || store.store_all(&faults))
                    .await
                    .map_err(|e| Error::transient_msg("FaultStoreTask", e.to_string()))??;
                Ok::<_, Error>(())
            }
        })
    };
    let pipeline = Pipeline::builder(name)
        .event_type(floodway::event::FAULT_EVENT_TYPE)
        .batch(BatchConfig::count(100).max_wait(SHORT_BATCH_WAIT))
        .sink(sink)
        .map_err(build)?;
    // A fault of the monitor itself (a malformed fault event) goes straight to the store.
    // Faults of any size are read: a hub may hold one larger than events are allowed to be.
    Processor::builder(name)
        .max_event_size(usize::MAX)
        .fault_sink(store)
        .pipeline(pipeline)
        .build()
        .map_err(build)
}

/// Builds the processor a configuration entry describes.
///
/// # Errors
/// Invalid settings, or a hub that cannot be opened.
pub async fn from_config(hubs: &Hubs, config: &ProcessorConfig) -> Result<Processor, SetupError> {
    match config {
        ProcessorConfig::Materialize {
            name,
            types,
            view,
            key,
            value,
            batch,
            batch_wait,
            redact,
            decrypt,
            set,
            remove,
            add,
            delete,
            delete_on,
            ttl,
            discriminator,
            latest,
            stale,
            outbox,
        } => {
            let protect = Protect {
                redact: redact.clone(),
                decrypt: *decrypt,
                ..Protect::default()
            };
            match key {
                ViewKey::Single(key) => materialize(
                    hubs,
                    name,
                    types,
                    ViewTarget {
                        view,
                        key,
                        value: value.as_deref(),
                        batch: batch.unwrap_or(DEFAULT_VIEW_BATCH),
                        wait: transaction_wait(
                            hubs,
                            batch.unwrap_or(DEFAULT_VIEW_BATCH),
                            *batch_wait,
                        ),
                    },
                    &protect,
                ),
                ViewKey::Row { pk, sk } => {
                    let pairs = |m: &std::collections::BTreeMap<String, FieldValue>| {
                        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
                    };
                    let target = RowTarget {
                        table: view.clone(),
                        pk: pk.clone(),
                        sk: sk.clone(),
                        value: value.clone(),
                        set: pairs(set),
                        remove: remove.clone(),
                        add: pairs(add),
                        delete: pairs(delete),
                        delete_on: delete_on.clone(),
                        ttl: ttl.map(HumanDuration::get),
                        discriminator: discriminator.clone(),
                        latest: *latest,
                        fault_when_stale: *stale == StalePolicy::Fault,
                        outbox: *outbox,
                        batch: batch.unwrap_or(DEFAULT_ROWS_BATCH),
                        wait: batch_wait.map_or(SHORT_BATCH_WAIT, HumanDuration::get),
                    };
                    materialize_rows(hubs, name, types, target, &protect)
                }
            }
        }
        ProcessorConfig::Http {
            name,
            types,
            url,
            method,
            rate_limit,
            burst,
            concurrency,
            timeout_ms,
            max_attempts,
            respond_as,
            parallelism,
            redact,
            decrypt,
            headers,
            body,
            treat_as,
            ca_file,
            client_cert,
            client_key,
            response_headers,
            enrich,
        } => {
            let http = |source| SetupError::Http {
                name: name.clone(),
                source,
            };
            let mut sink = HttpSinkConfig::new(url, method.as_str()).map_err(http)?;
            for (header, value) in headers {
                sink = match value {
                    HeaderConfig::Value(v) => sink.header(header, v),
                    HeaderConfig::Env { env } => {
                        sink.secret_header(header, Secret::Env(env.clone()))
                    }
                    HeaderConfig::File { file } => {
                        sink.secret_header(header, Secret::File(file.clone()))
                    }
                }
                .map_err(http)?;
            }
            if let Some(body) = body {
                sink = sink.body(body.0.clone());
            }
            for (status, outcome) in treat_as {
                sink = sink.treat_as(status, outcome.0).map_err(http)?;
            }
            if let Some(ca) = ca_file {
                sink = sink.ca_file(ca).map_err(http)?;
            }
            if let (Some(cert), Some(key)) = (client_cert, client_key) {
                sink = sink.client_identity(cert, key).map_err(http)?;
            }
            sink = sink.response_headers(response_headers).map_err(http)?;
            if let Some(t) = respond_as {
                sink = sink.publish_response_as(t.clone());
            }
            let gateway = HttpGateway {
                config: sink,
                rate_limit: rate_limit.map(|r| (r, burst.unwrap_or(1))),
                fixed_concurrency: match concurrency {
                    ConcurrencyConfig::Fixed(n) => Some(*n),
                    ConcurrencyConfig::Adaptive => None,
                },
                timeout: Duration::from_millis(*timeout_ms),
                max_attempts: *max_attempts,
                parallelism: *parallelism,
            };
            let protect = Protect {
                redact: redact.clone(),
                decrypt: *decrypt,
                enrich: enrich.clone(),
                ..Protect::default()
            };
            http_gateway(hubs, name, types, gateway, &protect)
        }
        ProcessorConfig::Forward {
            name,
            types,
            to,
            to_nats,
            redact,
            decrypt,
            encrypt,
            compress_over,
            enrich,
        } => {
            let other = match (to, to_nats) {
                (Some(to), _) => {
                    let hub = Hub::open(to, HubOptions::default()).map_err(|source| {
                        SetupError::Open {
                            name: name.clone(),
                            source,
                        }
                    })?;
                    Arc::new(hub) as SharedHub
                }
                (None, Some(nats)) => {
                    let nats_err = |source| SetupError::Nats {
                        name: name.clone(),
                        source,
                    };
                    let options = nats.hub_options(None);
                    let hub = NatsHub::connect(&options)
                        .await
                        .map_err(|e| nats_err(HubsError::Nats(e)))?;
                    Arc::new(floodway_nats::NatsEventHub::new(hub, Default::default()))
                }
                (None, None) => {
                    return Err(SetupError::Nats {
                        name: name.clone(),
                        source: HubsError::Config("give `to` or `to_nats`".into()),
                    })
                }
            };
            let protect = Protect {
                redact: redact.clone(),
                decrypt: *decrypt,
                encrypt: encrypt.clone(),
                enrich: enrich.clone(),
            };
            forward(hubs, name, types, &other, &protect, *compress_over)
        }
        ProcessorConfig::Cep {
            name,
            types,
            correlate,
            ttl,
            rules,
            batch,
            redact,
            decrypt,
        } => {
            let settings = CepSettings {
                correlate: correlate
                    .iter()
                    .map(|c| (c.key.clone(), c.suffix.clone()))
                    .collect(),
                rules: rules_of(name, rules)?,
                ttl: ttl.map_or(DEFAULT_CEP_TTL, HumanDuration::get),
                batch: *batch,
            };
            let protect = Protect {
                redact: redact.clone(),
                decrypt: *decrypt,
                ..Protect::default()
            };
            cep(hubs, name, types, settings, &protect)
        }
        ProcessorConfig::FaultMonitor { name } => fault_monitor(hubs, name),
    }
}

/// Opens the configured hubs and builds every configured processor.
///
/// # Errors
/// The first processor that cannot be built, or a hub that cannot be opened.
pub async fn build_all(config: &Config) -> Result<(Hubs, Vec<Processor>), SetupError> {
    let hubs = Hubs::for_config(config)
        .await
        .map_err(|source| SetupError::Hubs { source })?;
    let mut processors = Vec::with_capacity(config.processors.len());
    for p in &config.processors {
        processors.push(from_config(&hubs, p).await?);
    }
    Ok((hubs, processors))
}

/// Whether a processor takes `fault` events (on NATS it then reads the fault subject).
pub fn reads_faults(processor: &Processor) -> bool {
    let probe = Event::builder(floodway::event::FAULT_EVENT_TYPE, "probe").build();
    processor.pipelines().iter().any(|p| p.accepts(&probe))
}

/// Runs processors on a hub, each over the subscription of its name, until `shutdown`
/// completes; then each drains and commits.
///
/// # Errors
/// The first processor that stops with an error (the others are asked to stop).
pub async fn run_all<F>(
    hub: &SharedHub,
    processors: Vec<Processor>,
    options: ReadOptions,
    shutdown: F,
) -> Result<Vec<(String, RunReport)>, (String, RunError)>
where
    F: Future<Output = ()> + Send,
{
    run_all_pausable(hub, processors, options, shutdown, &Pauses::default()).await
}

/// Pauses and resumes processors while [`run_all_pausable`] runs them (the console's pause
/// button). A paused processor reads no new records from its subscription: what it holds
/// finishes and commits (the runtime reads one batch ahead, so a batch already read is still
/// processed), its subscription stays its own (lease, consumers) and its lag grows until it
/// is resumed. Clones share the switches.
#[derive(Debug, Clone, Default)]
pub struct Pauses {
    switches:
        Arc<std::sync::Mutex<std::collections::BTreeMap<String, tokio::sync::watch::Sender<bool>>>>,
}

impl Pauses {
    /// Pauses (`true`) or resumes processor `name`; false when no such processor runs.
    pub fn set(&self, name: &str, paused: bool) -> bool {
        match self.switches.lock().unwrap().get(name) {
            Some(switch) => {
                switch.send_replace(paused);
                true
            }
            None => false,
        }
    }

    /// Whether processor `name` is paused; `None` when no such processor runs.
    pub fn is_paused(&self, name: &str) -> Option<bool> {
        self.switches.lock().unwrap().get(name).map(|s| *s.borrow())
    }

    /// The processors that run, and whether each is paused.
    pub fn states(&self) -> Vec<(String, bool)> {
        let switches = self.switches.lock().unwrap();
        switches
            .iter()
            .map(|(n, s)| (n.clone(), *s.borrow()))
            .collect()
    }

    /// The switch of processor `name`, made running when it is new.
    fn switch(&self, name: &str) -> tokio::sync::watch::Receiver<bool> {
        let mut switches = self.switches.lock().unwrap();
        switches
            .entry(name.to_owned())
            .or_insert_with(|| tokio::sync::watch::channel(false).0)
            .subscribe()
    }
}

/// A source that hands out nothing while its processor is paused.
struct Pausable<S> {
    source: S,
    paused: tokio::sync::watch::Receiver<bool>,
    /// What a pull read while the processor was paused, held here until it resumes: a pull
    /// dropped while it waits for that loses nothing, so a buffered source stays one.
    held: Option<floodway::source::Pulled>,
}

impl<S: floodway::Source> floodway::Source for Pausable<S> {
    async fn next_batch(&mut self, max: usize) -> floodway::source::Pulled {
        // The sender lives as long as the `Pauses`; without it, run on.
        let _ = self.paused.wait_for(|paused| !*paused).await;
        if self.held.is_none() {
            self.held = Some(self.source.next_batch(max).await);
        }
        // Paused while this waited for records: they are held, not handed on, until resumed.
        let _ = self.paused.wait_for(|paused| !*paused).await;
        self.held.take().expect("held above, and taken only here")
    }

    fn buffered(&self) -> bool {
        self.source.buffered()
    }
}

/// [`run_all`], with processors that `pauses` can pause and resume.
///
/// # Errors
/// As [`run_all`].
pub async fn run_all_pausable<F>(
    hub: &SharedHub,
    processors: Vec<Processor>,
    options: ReadOptions,
    shutdown: F,
    pauses: &Pauses,
) -> Result<Vec<(String, RunReport)>, (String, RunError)>
where
    F: Future<Output = ()> + Send,
{
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    let mut failure = None;
    let mut stopping = false;
    for processor in processors {
        let name = processor.name().to_owned();
        let paused = pauses.switch(&name);
        let stream = if reads_faults(&processor) {
            Stream::Faults
        } else {
            Stream::Events
        };
        // A subscription may wait for another process's lease: a stop asked for meanwhile
        // is heard, and a failure stops and drains the processors already running, as one
        // of theirs would.
        let subscribed = tokio::select! {
            () = &mut shutdown => None,
            sub = hub.subscribe(&name, ReadOptions { stream, ..options }) => Some(sub),
        };
        let sub = match subscribed {
            Some(Ok(sub)) => sub,
            None => {
                stopping = true;
                let _ = stop_tx.send(true);
                break;
            }
            Some(Err(cause)) => {
                failure = Some((
                    name,
                    RunError::Source(floodway::error::SourceError {
                        source_name: "hub".into(),
                        cause,
                    }),
                ));
                stopping = true;
                let _ = stop_tx.send(true);
                break;
            }
        };
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            let reader = Pausable {
                source: sub.reader,
                paused,
                held: None,
            };
            let result = processor.run(reader, sub.checkpointer, stopped).await;
            if let Some(closed) = sub.closed {
                // Unfinished records go back to JetStream with their nak delay.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(5), closed).await;
            }
            (name, result)
        });
    }
    let mut reports = Vec::new();
    loop {
        tokio::select! {
            () = &mut shutdown, if !stopping => {
                stopping = true;
                let _ = stop_tx.send(true);
            }
            joined = tasks.join_next() => match joined {
                None => break,
                Some(Ok((name, Ok(report)))) => reports.push((name, report)),
                Some(Ok((name, Err(err)))) => {
                    tracing::error!(processor = %name, error = %err, "processor stopped");
                    failure.get_or_insert((name, err));
                    stopping = true;
                    let _ = stop_tx.send(true);
                }
                Some(Err(join)) => {
                    let err = RunError::Source(floodway::error::SourceError {
                        source_name: "processor task".into(),
                        cause: join.to_string().into(),
                    });
                    failure.get_or_insert(("?".into(), err));
                    stopping = true;
                    let _ = stop_tx.send(true);
                }
            }
        }
    }
    match failure {
        Some(f) => Err(f),
        None => Ok(reports),
    }
}

#[cfg(test)]
mod tests {
    use super::Span;

    /// Records as they are sent; buffered.
    struct Channel(tokio::sync::mpsc::UnboundedReceiver<floodway::Record>);

    impl floodway::Source for Channel {
        async fn next_batch(&mut self, _max: usize) -> floodway::source::Pulled {
            Ok(self.0.recv().await.map(|record| vec![record]))
        }

        fn buffered(&self) -> bool {
            true
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_pull_dropped_while_paused_keeps_what_it_read_for_the_next() {
        use floodway::Source;
        use std::time::Duration;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (pause, paused) = tokio::sync::watch::channel(false);
        let mut reader = super::Pausable {
            source: Channel(rx),
            paused,
            held: None,
        };
        assert!(reader.buffered(), "a buffered source stays one");
        {
            let pull = reader.next_batch(10);
            tokio::pin!(pull);
            let wait = Duration::from_millis(5);
            assert!(tokio::time::timeout(wait, &mut pull).await.is_err());
            // Paused while the pull waits for records: it reads them, and holds them.
            pause.send(true).unwrap();
            tx.send(floodway::Record::new("s", "0", 1, "{}")).unwrap();
            assert!(tokio::time::timeout(wait, &mut pull).await.is_err());
        }
        // The pull was dropped; resumed, the next one hands on what it read.
        pause.send(false).unwrap();
        let batch = tokio::time::timeout(Duration::from_secs(1), reader.next_batch(10))
            .await
            .expect("the batch read while paused")
            .unwrap()
            .unwrap();
        assert_eq!(batch.iter().map(|r| r.offset).collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn a_transaction_waits_briefly_where_the_hub_holds_back_a_batchs_worth() {
        use super::{transaction_wait, DEFAULT_BATCH_WAIT, SHORT_BATCH_WAIT};
        let dir = tempfile::tempdir().unwrap();
        let hub = floodway_embedded::Hub::open(dir.path().join("hub.db"), Default::default());
        let mut hubs = super::Hubs::from(hub.unwrap());
        assert_eq!(transaction_wait(&hubs, 20_000, None), DEFAULT_BATCH_WAIT);
        // NATS, 8 partitions of 1,000 unacknowledged messages each.
        hubs.unacked = Some(8_000);
        assert_eq!(transaction_wait(&hubs, 20_000, None), SHORT_BATCH_WAIT);
        assert_eq!(transaction_wait(&hubs, 5_000, None), DEFAULT_BATCH_WAIT);
        let asked = std::time::Duration::from_millis(250);
        assert_eq!(transaction_wait(&hubs, 20_000, Some(asked.into())), asked);
    }

    #[test]
    fn a_key_is_the_string_or_number_at_its_pointer() {
        let event = floodway::Event::decode(
            br#"{"id":"e-1","type":"t","timestamp":1,"partitionKey":"k",
                "order":{"id":"o-1","esc":"o\u002d2","q":"a\"b","n":12.5,"o":{},"s":""}}"#,
        )
        .unwrap();
        let key = |spec: &str| super::key_of(spec, &event).map_err(|e| e.to_string());
        assert_eq!(key("/order/id").unwrap(), "o-1");
        assert_eq!(key("/order/esc").unwrap(), "o-2", "escapes read");
        assert_eq!(key("/order/q").unwrap(), "a\"b");
        assert_eq!(key("/order/n").unwrap(), "12.5");
        assert_eq!(key("/order/s").unwrap(), "");
        assert_eq!(key("partitionKey").unwrap(), "k");
        assert_eq!(key("id").unwrap(), "e-1");
        assert!(key("/order/o")
            .unwrap_err()
            .contains("not a string or number"));
        assert!(key("/order/missing")
            .unwrap_err()
            .contains("has no /order/missing"));
    }

    /// A rule that panics on what it was given is poison (the batch is bisected down to the
    /// event), not a call to try again; the table goes on working for the next events.
    #[tokio::test]
    async fn a_cep_rule_that_panics_is_poison() {
        let dir = tempfile::tempdir().unwrap();
        let hub =
            floodway_embedded::Hub::open(dir.path().join("hub.db"), Default::default()).unwrap();
        let hubs = super::Hubs::from(hub.clone());
        let broken = floodway::cep::rule_fn("broken", |_, added| {
            assert!(added.id != "e-7", "rule broke on e-7");
            Vec::new()
        });
        let state = super::CepState {
            name: "p".into(),
            table: hub.cep("p").unwrap(),
            hub: hubs.events.clone(),
            correlate: Vec::new(),
            filters: Vec::new(),
            rules: vec![broken],
            ttl: std::time::Duration::from_secs(60),
            decrypt: None,
            read: std::sync::Mutex::default(),
            delivered: std::sync::Mutex::default(),
        };
        let collect = |id: &'static str| {
            let event = floodway::Event::builder("t", "k").id(id).build();
            move |table: floodway_embedded::CepTable, rules: Vec<floodway::cep::SharedRule>| {
                table.collect(&[(vec!["k".to_owned()], event)], &rules, None)
            }
        };
        let err = state.blocking(collect("e-7")).await.unwrap_err();
        assert_eq!(
            (err.class(), err.name()),
            (floodway::ErrorClass::Poison, "Panic")
        );
        assert!(err.message().contains("rule broke on e-7"), "{err}");
        let next = state.blocking(collect("e-8")).await.unwrap();
        assert_eq!(next.collected, 1, "the table works on after the panic");
    }

    fn span(deliveries: &[u64]) -> Span {
        let record = |d: u64| floodway::Record::new("nats:S", "0", 100 + d, "{}").with_delivery(d);
        let mut span = Span::of(&record(deliveries[0]));
        for d in deliveries {
            span.add(&record(*d));
        }
        span
    }

    #[test]
    fn a_batch_follows_on_only_from_consecutive_deliveries() {
        assert!(span(&[8, 9, 10]).follows(Some(7)));
        assert!(span(&[10, 8, 9]).follows(Some(7)), "in any order");
        assert!(!span(&[9, 10]).follows(Some(7)), "8 went to another reader");
        assert!(!span(&[8, 10]).follows(Some(7)), "9 went to another reader");
        assert!(!span(&[8, 9]).follows(None), "nothing seen yet");
        let unnumbered = Span::of(&floodway::Record::new("s", "0", 1, "{}"));
        assert!(!unnumbered.follows(Some(0)), "a source that does not count");
    }
}
