//! The configuration file: a hub and the processors to run on it.
//!
//! ```toml
//! [hub]
//! path = "floodway.db"        # created if missing
//! partitions = 8              # of a new hub
//! durability = "immediate"    # or "relaxed"
//! retention_max_age = "7d"    # delete older events (optional; `floodway run` applies it)
//! retention_max_bytes = 1073741824   # per partition (optional)
//! retention_keep_unread = true # never delete what a subscription has not read (default)
//! lease = "10s"               # a subscription's lease: one process owns it at a time
//! lease_wait = "15s"          # how long `floodway run` waits for one held by another process
//!
//! [[processors]]
//! kind = "materialize"        # events of chosen types into a latest-wins view
//! name = "orders-view"        # also the subscription's name
//! types = ["order-*"]
//! view = "orders"
//! key = "partitionKey"        # "partitionKey", "id", or a JSON pointer like "/order/id"
//! value = "/order"            # a JSON pointer; absent: the whole event
//! redact = ["customer.email"] # fields that appear nowhere in faults (any processor kind)
//!
//! [[processors]]
//! kind = "materialize"        # with key = { pk, sk }: rows by update requests (docs/rows.md)
//! name = "order-rows"
//! types = ["order-submitted", "order-paid", "order-cancelled"]  # not its own order-* changes
//! view = "order_rows"
//! key = { pk = "/order/id", sk = "order" }   # each a JSON pointer, partitionKey, id, or text
//! set = { status = "/order/status", source = { value = "web" } }
//! remove = ["draft"]
//! add = { events = 1 }        # a number to a counter, an array's elements to a set
//! delete_on = ["order-cancelled"]
//! ttl = "33d"
//! discriminator = "order"
//! latest = "field"            # or "row"
//! stale = "drop"              # or "fault"
//! outbox = true               # `floodway run` publishes order-created|updated|deleted
//!
//! [[processors]]
//! kind = "http"               # events to an external API
//! name = "notify"
//! types = ["order-paid"]
//! url = "https://api.example.com/orders/{/order/id}"  # {/json/pointer}: the event's value
//! method = "POST"             # GET, POST, PUT, PATCH or DELETE
//! headers = { Authorization = { env = "API_TOKEN" }, X-Tenant = "{/tenant}" }
//!                             # a value (a template), or a secret: { env = ".." } or { file = ".." }
//! body = "event"              # the whole event; "none"; or a JSON pointer like "/order"
//! treat_as = { "409" = "success", "404" = "poison" }  # or a class: "4xx" = "transient"
//! ca_file = "ca.pem"          # trust this CA instead of the system's roots (https)
//! client_cert = "client.pem"  # mTLS: a certificate chain and its key
//! client_key = "client.key"
//! response_headers = ["etag"] # copied into response events
//! rate_limit = 500            # calls per second, optional
//! burst = 10
//! concurrency = "adaptive"    # or a fixed number
//! timeout_ms = 5000
//! max_attempts = 5
//! respond_as = "payment-notified" # publish responses as events of this type, optional
//! enrich = [{ view = "customers", pk = "/order/customerId", sk = "customer", into = "customer", external = true }]
//!                             # rows read into the event first (also on forward processors)
//!
//! [[processors]]
//! kind = "forward"            # events into another hub
//! name = "archive"
//! types = ["*"]
//! to = "archive.db"
//! compress_over = 10240       # fields over 10 KiB gzipped as aws-lambda-stream does (optional)
//!
//! [[processors]]
//! kind = "fault-monitor"      # fault events into the fault store
//! name = "faults"
//! ```
//!
//! With a `[hub.nats]` table the hub is a NATS JetStream stream instead, and `[hub] path` is
//! the local store of views and faults (`partitions` and the retention settings then apply to
//! the stream):
//!
//! ```toml
//! [hub]
//! path = "stores.db"
//! partitions = 8
//!
//! [hub.nats]
//! servers = ["nats://127.0.0.1:4222"]
//! stream = "ORDERS"           # created if missing (default FLOODWAY)
//! subject = "orders"          # events on orders.<partition>, faults on orders.faults
//! replicas = 1                # 3 on a cluster (given, an existing stream is updated)
//! duplicate_window = "2m"     # a re-publish of an event id inside it is stored once
//! instance = "0/2"            # static assignment: this process reads partitions p % 2 == 0
//! sharing = "exclusive"       # or "pinned": all instances pull, the server pins one per partition
//! pinned_ttl = "10s"          # how long a silent pinned instance keeps its partitions
//! acks = "auto"               # cumulative (one ack per run of settled records) with exclusive sharing, each with pinned; or "each", "cumulative"
//! ack_wait = "30s"
//! max_ack_pending = 1000      # per partition
//! fast_ingest = true          # sinks publish in fast-ingest batches (sets allow_batched: 2.14+ servers only from then on)
//! ```
//!
//! A *forward* processor writes to another embedded hub (`to = "other.db"`) or to a NATS
//! stream (`to_nats = { servers = [...], stream = "ARCHIVE", subject = "archive" }`).
//!
//! Unknown keys and bad values are errors that name them.

mod values;

pub use values::{ConcurrencyConfig, HttpBody, HttpMethod, HttpOutcome, HumanDuration, Instance};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the format.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong and where.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The hub.
    pub hub: HubConfig,
    /// Envelope encryption: where data keys come from.
    pub encryption: Option<EncryptionConfig>,
    /// The processors to run.
    #[serde(default)]
    pub processors: Vec<ProcessorConfig>,
}

/// The `[encryption]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    /// A master key file (32 bytes, or their base64), relative to the configuration file:
    /// it wraps the data keys that encrypt fields (`floodway::encryption::KeyFile`).
    pub key_file: PathBuf,
}

/// The `[hub]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// The hub file, relative to the configuration file.
    pub path: PathBuf,
    /// Partitions of a new hub.
    pub partitions: Option<u32>,
    /// `immediate` (default) or `relaxed`.
    #[serde(default)]
    pub durability: DurabilityConfig,
    /// Delete events published longer ago than this (`7d`, `12h`); `floodway run` applies it
    /// every minute.
    pub retention_max_age: Option<HumanDuration>,
    /// Per partition, delete the oldest events beyond this many bytes (on NATS: in the whole
    /// stream).
    pub retention_max_bytes: Option<u64>,
    /// Never delete an event a subscription has not checkpointed past (default true; the
    /// embedded hub only).
    #[serde(default = "default_true")]
    pub retention_keep_unread: bool,
    /// How long a subscription's lease lasts unless renewed (default `10s`): one process owns
    /// a subscription at a time; one killed loses it after this (at once if it ran on this
    /// machine).
    pub lease: Option<HumanDuration>,
    /// How long `floodway run` waits for a subscription that another process holds before it
    /// gives up with an error naming that process (default `15s`, or 1.5 times a longer `lease`).
    pub lease_wait: Option<HumanDuration>,
    /// The hub is a NATS JetStream stream; `path` is then the local store of views and faults.
    pub nats: Option<NatsConfig>,
}

/// A NATS JetStream hub: `[hub.nats]`, or a forward processor's `to_nats`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URLs.
    #[serde(default = "default_servers")]
    pub servers: Vec<String>,
    /// The stream (default `FLOODWAY`).
    #[serde(default = "default_stream")]
    pub stream: String,
    /// The subject prefix (default `floodway`).
    #[serde(default = "default_subject")]
    pub subject: String,
    /// Partitions of a new stream (a forward target; the hub's come from `[hub] partitions`).
    pub partitions: Option<u32>,
    /// Replicas of the stream (a new one: 1); given, an existing stream is updated to it.
    pub replicas: Option<usize>,
    /// A re-publish of an event id inside this window is stored once (a new stream: `2m`);
    /// given, an existing stream is updated to it.
    pub duplicate_window: Option<HumanDuration>,
    /// `i/n`: this process reads the partitions `p` with `p % n == i`.
    pub instance: Option<Instance>,
    /// `exclusive` (default) or `pinned`.
    #[serde(default)]
    pub sharing: SharingConfig,
    /// How long a silent pinned instance keeps its partitions (default `10s`).
    #[serde(default = "default_pinned_ttl")]
    pub pinned_ttl: HumanDuration,
    /// `auto` (default: `cumulative` with exclusive sharing, `each` with pinned), `each` or
    /// `cumulative`.
    #[serde(default)]
    pub acks: AcksConfig,
    /// How long JetStream waits for an ack before redelivering (default `30s`); a processor
    /// that held a record longer than that without an in-progress ack (frozen, suspended)
    /// stops rather than process what another reader may have been given.
    #[serde(default = "default_ack_wait")]
    pub ack_wait: HumanDuration,
    /// Per partition, records delivered and not acked at most (default 1000).
    #[serde(default = "default_max_ack_pending")]
    pub max_ack_pending: i64,
    /// Sinks publish in JetStream's fast-ingest batches, one ack a batch (default `true`; on
    /// nats-server 2.14 or newer, which then get `allow_batched` set on the stream, and the
    /// stream needs 2.14 or newer from then on).
    #[serde(default = "default_true")]
    pub fast_ingest: bool,
}

/// How instances share partitions on NATS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SharingConfig {
    /// Each partition read by one instance (static assignment with `instance`).
    #[default]
    Exclusive,
    /// Consumer priority groups with a pinned client per partition.
    Pinned,
}

/// How a NATS subscription acknowledges settled records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AcksConfig {
    /// Cumulative with exclusive sharing, each record on its own with pinned sharing.
    #[default]
    Auto,
    /// Each record on its own; instances given the same partitions read side by side.
    Each,
    /// One ack per run of settled records of a partition; exclusive sharing only, with one
    /// reader per partition at a time (an instance waits while another reads its partitions).
    Cumulative,
}

fn default_true() -> bool {
    true
}
fn default_servers() -> Vec<String> {
    vec!["nats://127.0.0.1:4222".into()]
}
fn default_stream() -> String {
    "FLOODWAY".into()
}
fn default_subject() -> String {
    "floodway".into()
}
fn default_pinned_ttl() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(10))
}
fn default_ack_wait() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(30))
}
fn default_max_ack_pending() -> i64 {
    1000
}

impl NatsConfig {
    /// Checks what the format cannot.
    ///
    /// # Errors
    /// The first bad value, named.
    pub fn check(&self, table: &str) -> Result<(), String> {
        if self.servers.is_empty() {
            return Err(format!("{table} servers is empty: give at least one URL"));
        }
        if self.ack_wait.get() < std::time::Duration::from_secs(1) {
            return Err(format!("{table} ack_wait must be at least 1s"));
        }
        if self.pinned_ttl.get() < std::time::Duration::from_secs(1) {
            return Err(format!("{table} pinned_ttl must be at least 1s"));
        }
        if self.acks == AcksConfig::Cumulative && self.sharing == SharingConfig::Pinned {
            return Err(format!(
                "{table} acks = \"cumulative\" needs sharing = \"exclusive\": instances \
                 sharing a pinned consumer would ack what another holds"
            ));
        }
        if self.max_ack_pending < 1 {
            return Err(format!("{table} max_ack_pending must be at least 1"));
        }
        if self.replicas == Some(0) {
            return Err(format!("{table} replicas must be at least 1"));
        }
        Ok(())
    }

    /// Checks that a stream only published to (a forward processor's target) is given no
    /// settings of reading, which would do nothing there.
    fn publishing_only(&self, table: &str) -> Result<(), String> {
        let plain: NatsConfig = toml::from_str("").map_err(|e| e.to_string())?;
        let reading = [
            ("instance", self.instance.is_some()),
            ("sharing", self.sharing != plain.sharing),
            ("pinned_ttl", self.pinned_ttl != plain.pinned_ttl),
            ("acks", self.acks != plain.acks),
            ("ack_wait", self.ack_wait != plain.ack_wait),
            (
                "max_ack_pending",
                self.max_ack_pending != plain.max_ack_pending,
            ),
        ];
        match reading.iter().find(|(_, set)| *set) {
            Some((setting, _)) => Err(format!(
                "{table} sets `{setting}`, a setting of reading a stream: a forward processor \
                 only publishes to it"
            )),
            None => Ok(()),
        }
    }
}

/// When a publish is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DurabilityConfig {
    /// Synced to disk at each commit.
    #[default]
    Immediate,
    /// Survives a process crash, not a power loss.
    Relaxed,
}

/// A header of the *http* processor: a value, or a secret read from the environment or a
/// file (never written to logs or faults).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum HeaderConfig {
    /// A value, a template over the event.
    Value(String),
    /// `{ env = "VAR" }`.
    Env {
        /// The environment variable.
        env: String,
    },
    /// `{ file = "path" }`, relative to the configuration file.
    File {
        /// The file.
        file: PathBuf,
    },
}

/// One `[[processors]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ProcessorConfig {
    /// Events of chosen types into a latest-wins view.
    Materialize {
        /// The processor and its subscription.
        name: String,
        /// Event types (exact or `*` patterns).
        types: Vec<String>,
        /// The view.
        view: String,
        /// `partitionKey` (default), `id`, or a JSON pointer: a latest-wins view of one value
        /// per key. A table `{ pk = "/order/id", sk = "order" }` (each a JSON pointer,
        /// `partitionKey`, `id`, or text): a table of rows written by update requests
        /// (`set`, `remove`, `add`, `delete`, `ttl`, ...).
        #[serde(default)]
        key: ViewKey,
        /// A JSON pointer to the value; the whole event when absent.
        value: Option<String>,
        /// Rows written per transaction at most: default 20,000 for a view, 5,000 for a row
        /// table (whose transactions hold the hub file's write lock, which publishing waits
        /// for; a view has a file of its own). A view of many keys changes pages all over its
        /// table; large transactions write each changed page once for many rows (BENCHMARKS.md,
        /// embedded hub).
        #[serde(default)]
        batch: Option<usize>,
        /// How long a transaction waits for more rows before it is written, whatever its size
        /// (default 100 ms for a view, 20 ms for a row table): under light load, how far the
        /// view may be behind; while catching up, what lets transactions grow to `batch`. On
        /// NATS, where a subscription holds at most `max_ack_pending` messages per partition
        /// unacknowledged, a view's `batch` larger than that (over the partitions the instance
        /// reads) cannot fill, and the default is 20 ms.
        #[serde(default)]
        batch_wait: Option<HumanDuration>,
        /// Fields (dotted paths, e.g. `customer.email`) that appear nowhere in this
        /// processor's faults: redacted in the event, left out with the record (resubmission
        /// reads it back from the hub), scrubbed from error messages.
        #[serde(default)]
        redact: Vec<String>,
        /// Decrypt events that carry encryption metadata (`eem`, as aws-lambda-stream
        /// services write them) before the first step; needs `[encryption]`.
        #[serde(default)]
        decrypt: bool,
        /// Rows: fields to set, each from a JSON pointer (`"/order/status"`) or a value
        /// (`{ value = "paid" }`, a number, true or false). With none of `set`, `remove`, `add`
        /// and `delete`, the fields of `value` (or of the event) are set.
        #[serde(default)]
        set: BTreeMap<String, FieldValue>,
        /// Rows: fields to remove.
        #[serde(default)]
        remove: Vec<String>,
        /// Rows: numbers to add to counters, or arrays of elements to add to sets.
        #[serde(default)]
        add: BTreeMap<String, FieldValue>,
        /// Rows: arrays of elements to delete from sets.
        #[serde(default)]
        delete: BTreeMap<String, FieldValue>,
        /// Rows: event types (or `*` patterns) that delete the row instead.
        #[serde(default)]
        delete_on: Vec<String>,
        /// Rows: how long a row lives after the event that last wrote it (`"33d"`).
        ttl: Option<HumanDuration>,
        /// Rows: the kind of row, named by its change events (`order-created`, ...).
        discriminator: Option<String>,
        /// Rows: `"field"` (default: each field is latest-wins on its own) or `"row"` (the
        /// whole update applies only over an older row).
        #[serde(default)]
        latest: floodway::rows::Latest,
        /// Rows: what an update older than what it meets does: `"drop"` (default) or
        /// `"fault"`.
        #[serde(default)]
        stale: StalePolicy,
        /// Rows: write each change of a row to the outbox in the same transaction;
        /// `floodway run` publishes them to the hub as `{discriminator}-created|updated|deleted`
        /// events.
        #[serde(default)]
        outbox: bool,
    },
    /// Events to an external HTTP API.
    Http {
        /// The processor and its subscription.
        name: String,
        /// Event types (exact or `*` patterns).
        types: Vec<String>,
        /// `http://` or `https://` URL, a template over the event (`{/json/pointer}`).
        url: String,
        /// `GET`, `POST` (default), `PUT`, `PATCH` or `DELETE`.
        #[serde(default)]
        method: HttpMethod,
        /// Headers: a value (a template over the event) or a secret.
        #[serde(default)]
        headers: BTreeMap<String, HeaderConfig>,
        /// `"event"` (the default for POST, PUT, PATCH), `"none"` (the default for GET and
        /// DELETE), or a JSON pointer.
        body: Option<HttpBody>,
        /// Statuses (`"409"`, `"4xx"`) treated as `success`, `poison`, `transient`,
        /// `throttled` or `fatal`.
        #[serde(default)]
        treat_as: BTreeMap<String, HttpOutcome>,
        /// PEM certificates trusted instead of the system's roots, relative to the file.
        ca_file: Option<PathBuf>,
        /// A PEM client certificate chain for mTLS, relative to the file.
        client_cert: Option<PathBuf>,
        /// The client certificate's PEM private key, relative to the file.
        client_key: Option<PathBuf>,
        /// Response headers copied into response events.
        #[serde(default)]
        response_headers: Vec<String>,
        /// Calls per second at most.
        rate_limit: Option<u32>,
        /// Calls allowed at once after a quiet period (default 1); only with `rate_limit`.
        burst: Option<u32>,
        /// `"adaptive"` (default) or a fixed number of calls at once.
        #[serde(default)]
        concurrency: ConcurrencyConfig,
        /// Each attempt's deadline in milliseconds (default 10,000).
        #[serde(default = "default_timeout")]
        timeout_ms: u64,
        /// Attempts per event at most (default 5).
        #[serde(default = "default_attempts")]
        max_attempts: u32,
        /// Publish each response as an event of this type.
        respond_as: Option<String>,
        /// Rows read into each event before the call, e.g.
        /// `[{ view = "customers", pk = "/order/customerId", sk = "customer", into = "customer" }]`.
        #[serde(default)]
        enrich: Vec<EnrichConfig>,
        /// Calls in flight at most (the pipeline's parallelism, default 64).
        #[serde(default = "default_parallelism")]
        parallelism: usize,
        /// Fields (dotted paths, e.g. `customer.email`) that appear nowhere in this
        /// processor's faults: redacted in the event, left out with the record (resubmission
        /// reads it back from the hub), scrubbed from error messages.
        #[serde(default)]
        redact: Vec<String>,
        /// Decrypt events that carry encryption metadata (`eem`, as aws-lambda-stream
        /// services write them) before the first step; needs `[encryption]`.
        #[serde(default)]
        decrypt: bool,
    },
    /// Events into another hub.
    Forward {
        /// The processor and its subscription.
        name: String,
        /// Event types (exact or `*` patterns).
        types: Vec<String>,
        /// Another embedded hub's file, relative to the configuration file.
        to: Option<PathBuf>,
        /// A NATS JetStream stream.
        to_nats: Option<NatsConfig>,
        /// Fields (dotted paths, e.g. `customer.email`) that appear nowhere in this
        /// processor's faults: redacted in the event, left out with the record (resubmission
        /// reads it back from the hub), scrubbed from error messages.
        #[serde(default)]
        redact: Vec<String>,
        /// Decrypt events that carry encryption metadata (`eem`, as aws-lambda-stream
        /// services write them) before the first step; needs `[encryption]`.
        #[serde(default)]
        decrypt: bool,
        /// Encrypt the members of these names (at any depth, as aws-kms-ee does) before
        /// publishing, for readers holding the same keys; needs `[encryption]`.
        #[serde(default)]
        encrypt: Vec<String>,
        /// Compress payload fields over this many bytes as aws-lambda-stream does (its
        /// default is 10240), for Node services reading the other hub; off when absent.
        compress_over: Option<usize>,
        /// Rows read into each event before it is forwarded (as for *http*).
        #[serde(default)]
        enrich: Vec<EnrichConfig>,
    },
    /// Complex event processing: events of chosen types collected per correlation key, rules
    /// evaluated over each key's set, timers for what must (or must not) happen in time; what
    /// the rules emit goes through the outbox to the hub.
    Cep {
        /// The processor and its subscription.
        name: String,
        /// Event types collected (exact or `*` patterns).
        types: Vec<String>,
        /// The correlation keys an event joins: `[{ key = "/order/id" }]` (a JSON pointer,
        /// `partitionKey` or `id`), with an optional `suffix` so one event joins several sets.
        /// Default: the partition key.
        #[serde(default)]
        correlate: Vec<CorrelateConfig>,
        /// How long an event stays in its sets after its own time (default 1 day); at least
        /// every rule's window.
        ttl: Option<HumanDuration>,
        /// The rules.
        rules: Vec<RuleConfig>,
        /// Events per transaction at most (default 1,000).
        #[serde(default = "default_cep_batch")]
        batch: usize,
        /// Fields (dotted paths) that appear nowhere in this processor's faults.
        #[serde(default)]
        redact: Vec<String>,
        /// Decrypt events that carry encryption metadata first; needs `[encryption]`.
        #[serde(default)]
        decrypt: bool,
    },
    /// Fault events into the fault store.
    FaultMonitor {
        /// The processor and its subscription.
        name: String,
    },
}

/// How long a *cep* processor keeps events by default.
pub const DEFAULT_CEP_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The key of a *materialize* processor's view.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum ViewKey {
    /// One value per key: `partitionKey`, `id`, or a JSON pointer.
    Single(String),
    /// Rows by update requests: the partition and sort keys, each `partitionKey`, `id`, a
    /// JSON pointer, or text.
    Row {
        /// The partition key.
        pk: String,
        /// The sort key.
        sk: String,
    },
}

impl Default for ViewKey {
    fn default() -> Self {
        ViewKey::Single("partitionKey".into())
    }
}

impl From<&str> for ViewKey {
    fn from(key: &str) -> Self {
        ViewKey::Single(key.into())
    }
}

/// A field's value in an update: from the event, or given.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum FieldValue {
    /// A JSON pointer into the event.
    Pointer(String),
    /// A whole number.
    Integer(i64),
    /// A number.
    Float(f64),
    /// True or false.
    Bool(bool),
    /// `{ value = ... }`: any value, text included.
    Value {
        /// The value.
        value: serde_json::Value,
    },
}

/// A row (or a partition's rows) of a table of rows, read into a field of each event; reads
/// of one key within a second share one read of the store.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichConfig {
    /// The table (a *materialize* processor's view with `key = { pk, sk }`).
    pub view: String,
    /// The partition key: `partitionKey`, `id`, a JSON pointer, or text.
    pub pk: String,
    /// The sort key, the same way; absent: every row of the partition, as an array.
    pub sk: Option<String>,
    /// The event's field to set (the row's image, or `null` when there is none).
    pub into: String,
    /// The table is written by another configuration's processor (not checked here).
    #[serde(default)]
    pub external: bool,
}

/// A correlation key of a *cep* processor.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorrelateConfig {
    /// A JSON pointer, `partitionKey` or `id`.
    pub key: String,
    /// Appended to the key (`{key}.{suffix}`), so one event can join several sets.
    pub suffix: Option<String>,
}

/// A rule of a *cep* processor.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// The rule's name, unique in its processor.
    pub name: String,
    /// `all` (every one of `types`), `sequence` (`first` then `then` within `within`),
    /// `threshold` (`count` of `type` within `within`) or `absence` (`first` not followed by
    /// `then` within `within`; without `then`, an expiry `within` after `first`).
    pub kind: String,
    /// `all`: the types.
    #[serde(default)]
    pub types: Vec<String>,
    /// `sequence`, `absence`: the first type.
    pub first: Option<String>,
    /// `sequence`, `absence`: the type that follows.
    pub then: Option<String>,
    /// `threshold`: the type counted.
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    /// `threshold`: how many.
    pub count: Option<usize>,
    /// `sequence`, `threshold`, `absence`: the window.
    pub within: Option<HumanDuration>,
    /// The type of the event it emits.
    pub emit: String,
    /// Conditions on the events it counts: `{ "/order/amount" = 100 }`.
    #[serde(default, rename = "where")]
    pub conditions: BTreeMap<String, serde_json::Value>,
}

impl RuleConfig {
    /// The rule, or what is wrong with it.
    ///
    /// # Errors
    /// A setting missing for its kind, or an unknown kind.
    pub fn rule(&self) -> Result<floodway::cep::KindRule, String> {
        use floodway::cep::RuleKind;
        let name = &self.name;
        let need = |what: &str| format!("rule `{name}` ({}) needs `{what}`", self.kind);
        let within = || {
            self.within
                .map(|w| w.get().as_millis() as i64)
                .ok_or_else(|| need("within"))
        };
        // A setting the kind does not read would seem to count and do nothing.
        let given = [
            ("types", !self.types.is_empty()),
            ("first", self.first.is_some()),
            ("then", self.then.is_some()),
            ("type", self.event_type.is_some()),
            ("count", self.count.is_some()),
            ("within", self.within.is_some()),
        ];
        let takes: &[&str] = match self.kind.as_str() {
            "all" => &["types"],
            "sequence" | "absence" => &["first", "then", "within"],
            "threshold" => &["type", "count", "within"],
            _ => &[],
        };
        if let Some((setting, _)) = given
            .iter()
            .find(|(setting, set)| *set && !takes.is_empty() && !takes.contains(setting))
        {
            return Err(format!(
                "rule `{name}` ({}) takes no `{setting}`: it reads {}",
                self.kind,
                takes.join(", ")
            ));
        }
        let kind = match self.kind.as_str() {
            "all" if !self.types.is_empty() => RuleKind::All {
                types: self.types.clone(),
            },
            "all" => return Err(need("types")),
            "sequence" => RuleKind::Sequence {
                first: self.first.clone().ok_or_else(|| need("first"))?,
                then: self.then.clone().ok_or_else(|| need("then"))?,
                within: within()?,
            },
            "threshold" => RuleKind::Threshold {
                event_type: self.event_type.clone().ok_or_else(|| need("type"))?,
                count: self.count.filter(|c| *c > 0).ok_or_else(|| need("count"))?,
                within: within()?,
            },
            "absence" => RuleKind::Absence {
                first: self.first.clone().ok_or_else(|| need("first"))?,
                then: self.then.clone(),
                within: within()?,
            },
            other => {
                return Err(format!(
                    "rule `{name}`: kind `{other}` is none of all, sequence, threshold, absence"
                ))
            }
        };
        let mut rule = floodway::cep::KindRule::new(name.clone(), kind, self.emit.clone());
        for (pointer, value) in &self.conditions {
            rule = rule.when(pointer.clone(), value.clone());
        }
        Ok(rule)
    }
}

/// What a stale update does, in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StalePolicy {
    /// Nothing.
    #[default]
    Drop,
    /// A fault.
    Fault,
}
fn default_cep_batch() -> usize {
    1_000
}
fn default_timeout() -> u64 {
    10_000
}
fn default_attempts() -> u32 {
    5
}
fn default_parallelism() -> usize {
    64
}

impl ProcessorConfig {
    /// The processor's name.
    pub fn name(&self) -> &str {
        match self {
            ProcessorConfig::Materialize { name, .. }
            | ProcessorConfig::Http { name, .. }
            | ProcessorConfig::Forward { name, .. }
            | ProcessorConfig::Cep { name, .. }
            | ProcessorConfig::FaultMonitor { name } => name,
        }
    }
}

impl Config {
    /// Reads and checks a configuration file; relative paths in it are resolved against the
    /// file's directory.
    ///
    /// # Errors
    /// A [`ConfigError`] that names the file, the key and what is wrong with it.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.hub.path = base.join(&config.hub.path);
        if let Some(encryption) = &mut config.encryption {
            encryption.key_file = base.join(&encryption.key_file);
        }
        for p in &mut config.processors {
            match p {
                ProcessorConfig::Forward { to: Some(to), .. } => *to = base.join(&*to),
                ProcessorConfig::Http {
                    headers,
                    ca_file,
                    client_cert,
                    client_key,
                    ..
                } => {
                    for path in [ca_file, client_cert, client_key].into_iter().flatten() {
                        *path = base.join(&*path);
                    }
                    for header in headers.values_mut() {
                        if let HeaderConfig::File { file } = header {
                            *file = base.join(&*file);
                        }
                    }
                }
                _ => {}
            }
        }
        config.check().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(config)
    }

    /// Parses configuration text.
    ///
    /// # Errors
    /// The parser's message: the line, the key, and what was expected.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| name_the_key(text, &e).unwrap_or_else(|| e.to_string()))
    }

    /// Checks what the format cannot: unique names, values in range.
    ///
    /// # Errors
    /// What is wrong.
    pub fn check(&self) -> Result<(), String> {
        self.hub.leases()?;
        if let Some(nats) = &self.hub.nats {
            nats.check("[hub.nats]")?;
        }
        let mut names = std::collections::HashSet::new();
        let mut states = std::collections::HashMap::new();
        // Row tables by the outbox setting of the first processor writing each.
        let mut outboxes: std::collections::HashMap<&str, (&str, bool)> =
            std::collections::HashMap::new();
        // The processors writing row tables: table, key, types.
        let mut writers: Vec<(&str, &str, &ViewKey, &[String])> = Vec::new();
        for p in &self.processors {
            let name = p.name();
            if let ProcessorConfig::Materialize {
                view,
                key: key @ ViewKey::Row { .. },
                outbox,
                types,
                ..
            } = p
            {
                // A row takes one update per event (its inbox): two processors updating the
                // same rows from the same events would have the second dropped as a repeat.
                for (other, table, their_key, theirs) in &writers {
                    if *table != view || *their_key != key {
                        continue;
                    }
                    let shared = overlap(theirs, types);
                    if let Some(shared) = shared {
                        return Err(format!(
                            "processors `{other}` and `{name}` update the same rows of `{view}` \
                             (the same key) from the same events ({shared}): a row takes one \
                             update per event, and the second would be dropped as a repeat; \
                             update them from one processor"
                        ));
                    }
                }
                writers.push((name, view, key, types));
                if let Some((other, theirs)) = outboxes.insert(view, (name, *outbox)) {
                    if theirs != *outbox {
                        return Err(format!(
                            "processors `{other}` and `{name}` write the row table `{view}`, \
                             one with `outbox = true` and one without: the other's changes \
                             would not be published; set it alike on both"
                        ));
                    }
                }
            }
            if !names.insert(name) {
                return Err(format!(
                    "two processors are named `{name}`: names must be unique"
                ));
            }
            if let ProcessorConfig::Cep { .. } = p {
                let table = floodway_embedded::cep_table_name(name);
                if let Some(other) = states.insert(table.clone(), name) {
                    return Err(format!(
                        "cep processors `{other}` and `{name}` would keep their state in the \
                         same tables (`{table}`): name them apart by more than case and \
                         punctuation"
                    ));
                }
            }
            check_entry(p).map_err(|e| format!("processor `{name}`: {e}"))?;
            let enrich = match p {
                ProcessorConfig::Http { enrich, .. } | ProcessorConfig::Forward { enrich, .. } => {
                    enrich.as_slice()
                }
                _ => &[],
            };
            for e in enrich {
                row_key_part("enrich pk", &e.pk).map_err(|m| format!("processor `{name}`: {m}"))?;
                if let Some(sk) = &e.sk {
                    row_key_part("enrich sk", sk)
                        .map_err(|m| format!("processor `{name}`: {m}"))?;
                }
                if e.into.is_empty()
                    || e.into.contains('/')
                    || floodway::event::ENVELOPE_FIELDS.contains(&e.into.as_str())
                {
                    return Err(format!(
                        "processor `{name}`: enrich `into = \"{}\"` must name a field of the \
                         event's payload: not empty, no `/`, none of {}",
                        e.into,
                        floodway::event::ENVELOPE_FIELDS.join(", ")
                    ));
                }
                let known = self.processors.iter().any(|q| {
                    matches!(q, ProcessorConfig::Materialize { view, key: ViewKey::Row { .. }, .. }
                        if *view == e.view)
                });
                if !known && !e.external {
                    return Err(format!(
                        "processor `{name}`: enrich reads `{}`, which no materialize processor \
                         with `key = {{ pk, sk }}` here writes (a table another configuration \
                         writes: add `external = true`)",
                        e.view
                    ));
                }
            }
            match p {
                ProcessorConfig::Forward { to, to_nats, .. } => match (to, to_nats) {
                    (Some(_), None) => {}
                    (None, Some(nats)) => {
                        let table = format!("processor `{name}`: to_nats");
                        nats.check(&table)?;
                        nats.publishing_only(&table)?;
                    }
                    _ => {
                        return Err(format!(
                            "processor `{name}`: give either `to` (a hub file) or `to_nats`"
                        ))
                    }
                },
                ProcessorConfig::Materialize { batch: Some(0), .. }
                | ProcessorConfig::Cep { batch: 0, .. } => {
                    return Err(format!("processor `{name}`: batch must be at least 1"));
                }
                ProcessorConfig::Cep {
                    types, rules, ttl, ..
                } => {
                    let ttl = ttl.map_or(DEFAULT_CEP_TTL, HumanDuration::get);
                    if types.is_empty() {
                        // Elsewhere no types means all of them; a cep processor keeps what it
                        // collects, so it names it (it would collect nothing).
                        return Err(format!(
                            "processor `{name}`: a cep processor collects the `types` it \
                             names: name the types its rules read"
                        ));
                    }
                    let filters = types
                        .iter()
                        .map(|t| floodway::pipeline::TypeFilter::parse(t))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| format!("processor `{name}`: {e}"))?;
                    let mut seen = std::collections::HashSet::new();
                    for r in rules {
                        r.rule().map_err(|e| format!("processor `{name}`: {e}"))?;
                        // The types a rule reads are exact, and ones the processor collects:
                        // otherwise never in a set (an absence rule would fire for every
                        // first event).
                        let read = r
                            .types
                            .iter()
                            .chain(&r.first)
                            .chain(&r.then)
                            .chain(&r.event_type);
                        for t in read {
                            if t.contains('*') {
                                return Err(format!(
                                    "processor `{name}`: rule `{}` names `{t}`: a rule reads \
                                     exact types, not patterns",
                                    r.name
                                ));
                            }
                            if !filters.iter().any(|f| f.matches(t)) {
                                return Err(format!(
                                    "processor `{name}`: rule `{}` reads `{t}` events, which \
                                     its types do not collect: add it to `types`",
                                    r.name
                                ));
                            }
                        }
                        if let Some(key) = r.conditions.keys().find(|k| !k.starts_with('/')) {
                            return Err(format!(
                                "processor `{name}`: rule `{}`: where `{key}` is not a JSON \
                                 pointer (`/{}`)",
                                r.name,
                                key.replace('.', "/")
                            ));
                        }
                        if !seen.insert(&r.name) {
                            return Err(format!(
                                "processor `{name}`: two rules are named `{}`",
                                r.name
                            ));
                        }
                        if r.within.is_some_and(|w| w.get() > ttl) {
                            return Err(format!(
                                "processor `{name}`: rule `{}` looks {:?} back, longer than \
                                 the ttl ({ttl:?}) keeps events: raise `ttl`",
                                r.name,
                                r.within.map(HumanDuration::get).unwrap_or_default()
                            ));
                        }
                        if filters.iter().any(|f| f.matches(&r.emit)) {
                            return Err(format!(
                                "processor `{name}`: rule `{}` emits `{}`, which its types \
                                 take in again (a loop)",
                                r.name, r.emit
                            ));
                        }
                    }
                    if rules.is_empty() {
                        return Err(format!("processor `{name}`: give at least one rule"));
                    }
                }
                ProcessorConfig::Materialize {
                    key: ViewKey::Single(_),
                    set,
                    remove,
                    add,
                    delete,
                    delete_on,
                    ttl,
                    discriminator,
                    outbox,
                    latest,
                    stale,
                    ..
                } if !set.is_empty()
                    || !remove.is_empty()
                    || !add.is_empty()
                    || !delete.is_empty()
                    || !delete_on.is_empty()
                    || ttl.is_some()
                    || discriminator.is_some()
                    || *outbox
                    || *latest != floodway::rows::Latest::default()
                    || *stale != StalePolicy::default() =>
                {
                    return Err(format!(
                        "processor `{name}`: set, remove, add, delete, delete_on, ttl, \
                         discriminator, outbox, latest and stale are settings of rows: give \
                         the key as `key = {{ pk = \"...\", sk = \"...\" }}`"
                    ));
                }
                ProcessorConfig::Materialize {
                    key: ViewKey::Row { .. },
                    value: Some(_),
                    set,
                    remove,
                    add,
                    delete,
                    ..
                } if !set.is_empty()
                    || !remove.is_empty()
                    || !add.is_empty()
                    || !delete.is_empty() =>
                {
                    return Err(format!(
                        "processor `{name}`: `value` gives the fields to set when there is no \
                         `set`, `remove`, `add` or `delete`; with them it is not read"
                    ));
                }
                ProcessorConfig::Materialize {
                    key: ViewKey::Row { .. },
                    types,
                    outbox: true,
                    discriminator,
                    ..
                } => {
                    // Its own change events must not come back to it: a loop.
                    if types.is_empty() {
                        return Err(format!(
                            "processor `{name}`: with `outbox = true` give `types`: without \
                             them it takes every event, its own changes included (a loop)"
                        ));
                    }
                    let prefix = discriminator.as_deref().unwrap_or("row").to_lowercase();
                    let filters = types
                        .iter()
                        .map(|t| floodway::pipeline::TypeFilter::parse(t))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| format!("processor `{name}`: {e}"))?;
                    if let Some(kind) = ["created", "updated", "deleted"]
                        .into_iter()
                        .find(|k| filters.iter().any(|f| f.matches(&format!("{prefix}-{k}"))))
                    {
                        return Err(format!(
                            "processor `{name}`: its outbox publishes `{prefix}-{kind}` events, \
                             which its types take in again (a loop): narrow `types` or set \
                             another `discriminator`"
                        ));
                    }
                }
                ProcessorConfig::Http {
                    client_cert,
                    client_key,
                    ..
                } if client_cert.is_some() != client_key.is_some() => {
                    return Err(format!(
                        "processor `{name}`: give both client_cert and client_key, or neither"
                    ));
                }
                ProcessorConfig::Http {
                    max_attempts: 0, ..
                } => {
                    return Err(format!(
                        "processor `{name}`: max_attempts must be at least 1"
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Checks of an entry's values that serde cannot make: where the event is read from, and
/// settings that would do something other than what they seem to.
fn check_entry(p: &ProcessorConfig) -> Result<(), String> {
    // A key is `partitionKey`, `id` or a JSON pointer; anything else finds nothing in any
    // event (every event a fault, or a field never set).
    let key = |what: &str, spec: &str| -> Result<(), String> {
        match spec {
            "partitionKey" | "id" => Ok(()),
            pointer if pointer.starts_with('/') => Ok(()),
            other => Err(format!(
                "{what} `{other}` is neither `partitionKey`, `id` nor a JSON pointer (`/{}`)",
                other.replace('.', "/")
            )),
        }
    };
    let pointer = |what: &str, spec: &str| -> Result<(), String> {
        if spec.starts_with('/') {
            Ok(())
        } else {
            Err(format!(
                "{what} `{spec}` is not a JSON pointer (`/{}`; a text value is written \
                 `{{ value = \"{spec}\" }}`)",
                spec.replace('.', "/")
            ))
        }
    };
    let types = match p {
        ProcessorConfig::Materialize { types, .. }
        | ProcessorConfig::Http { types, .. }
        | ProcessorConfig::Forward { types, .. }
        | ProcessorConfig::Cep { types, .. } => types.as_slice(),
        ProcessorConfig::FaultMonitor { .. } => &[],
    };
    if types.iter().any(|t| t == floodway::event::FAULT_EVENT_TYPE) && types.len() > 1 {
        // A processor of faults reads the hub's faults (on NATS, their own subject) and
        // nothing else.
        return Err(format!(
            "types mix `{}` with others: a processor reads either faults or events; give the \
             faults a processor of their own",
            floodway::event::FAULT_EVENT_TYPE
        ));
    }
    let filters = || {
        types
            .iter()
            .map(|t| floodway::pipeline::TypeFilter::parse(t))
            .collect::<Result<Vec<_>, _>>()
    };
    match p {
        ProcessorConfig::Materialize {
            key: view_key,
            value,
            set,
            remove,
            add,
            delete,
            delete_on,
            ..
        } => {
            match view_key {
                ViewKey::Single(spec) => key("key", spec)?,
                ViewKey::Row { pk, sk } => {
                    row_key_part("key.pk", pk)?;
                    row_key_part("key.sk", sk)?;
                }
            }
            // What every event's update would be refused for (each event a fault).
            let mut named = std::collections::HashSet::new();
            // A set's elements may be added and deleted by one update.
            let names = set
                .keys()
                .chain(remove)
                .chain(add.keys())
                .chain(delete.keys().filter(|f| !add.contains_key(*f)));
            for field in names {
                if floodway::rows::RESERVED.contains(&field.as_str()) {
                    return Err(format!(
                        "`{field}` is a row's own; set, remove, add and delete cannot write it"
                    ));
                }
                if !named.insert(field) {
                    return Err(format!(
                        "`{field}` is written twice (by two of set, remove, add and delete)"
                    ));
                }
            }
            // `add` takes numbers (counters) and arrays (set elements); `delete`, arrays.
            for (what, fields, counts) in [("add", add, true), ("delete", delete, false)] {
                for (field, v) in fields {
                    let fits = match v {
                        FieldValue::Pointer(_) => true,
                        FieldValue::Integer(_) | FieldValue::Float(_) => counts,
                        FieldValue::Bool(_) => false,
                        FieldValue::Value { value } => {
                            value.is_array() || (counts && value.is_number())
                        }
                    };
                    if !fits {
                        return Err(format!(
                            "{what}.{field}: {what} takes {}",
                            if counts {
                                "a number or an array of elements"
                            } else {
                                "an array of elements"
                            }
                        ));
                    }
                }
            }
            // A row is deleted by an event it takes.
            let filters = filters().map_err(|e| e.to_string())?;
            for t in delete_on {
                if !filters.is_empty() && !t.contains('*') && !filters.iter().any(|f| f.matches(t))
                {
                    return Err(format!(
                        "delete_on `{t}` is none of its types: such events never reach it"
                    ));
                }
            }
            if let Some(value) = value {
                pointer("value", value)?;
            }
            for (what, fields) in [("set", set), ("add", add), ("delete", delete)] {
                for (field, v) in fields {
                    if let FieldValue::Pointer(spec) = v {
                        pointer(&format!("{what}.{field}"), spec)?;
                    }
                }
            }
        }
        ProcessorConfig::Cep { correlate, .. } => {
            for c in correlate {
                key("correlate key", &c.key)?;
            }
        }
        ProcessorConfig::Http { timeout_ms: 0, .. } => {
            return Err("timeout_ms must be at least 1: every call would time out".into());
        }
        ProcessorConfig::Http {
            rate_limit: None,
            burst: Some(_),
            ..
        } => {
            return Err("`burst` shapes a `rate_limit`, and none is given".into());
        }
        ProcessorConfig::Http {
            respond_as: Some(response),
            ..
        } => {
            let filters = filters().map_err(|e| e.to_string())?;
            if filters.is_empty() || filters.iter().any(|f| f.matches(response)) {
                return Err(format!(
                    "its responses are `{response}` events, which its types take in again \
                     (a loop): narrow `types` or name the responses otherwise"
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

/// A row key's part, or an enrichment's: `partitionKey`, `id`, a JSON pointer, or text; text
/// that looks like a path (`order.id`, `order/id`) is a pointer mistyped, which would put
/// every event in one row.
fn row_key_part(what: &str, spec: &str) -> Result<(), String> {
    // Words of letters joined by `.` or `/`; text with digits (`v1.2`, `2024/01`) is text.
    let words: Vec<&str> = spec.split(['.', '/']).collect();
    let path = words.len() > 1
        && words
            .iter()
            .all(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_alphabetic() || c == '_'));
    if !spec.starts_with('/') && path {
        return Err(format!(
            "{what} `{spec}` looks like a path but is text (every event would go to the row \
             `{spec}`): a JSON pointer starts with /, as `/{}`",
            spec.replace('.', "/")
        ));
    }
    Ok(())
}

impl HubConfig {
    /// The retention this `[hub]` asks for, if any.
    pub fn retention(&self) -> Option<floodway_embedded::Retention> {
        let max_age = self.retention_max_age.map(HumanDuration::get);
        (max_age.is_some() || self.retention_max_bytes.is_some()).then_some(
            floodway_embedded::Retention {
                max_age,
                max_bytes_per_partition: self.retention_max_bytes,
                keep_unread: self.retention_keep_unread,
            },
        )
    }

    /// The lease and the wait for a held subscription, `(lease, lease_wait)`.
    ///
    /// # Errors
    /// A value that is not a duration, or a lease under 100 ms.
    pub fn leases(&self) -> Result<(std::time::Duration, std::time::Duration), String> {
        let defaults = floodway_embedded::HubOptions::default();
        let lease = self.lease.map_or(defaults.lease, HumanDuration::get);
        if lease < std::time::Duration::from_millis(100) {
            return Err(format!(
                "[hub] lease `{lease:?}` is too short: at least 100ms"
            ));
        }
        // By default long enough for a lease left by a process that died to run out; a
        // shorter wait given is kept (a second run then fails fast, and one started after a
        // crash elsewhere fails until the lease runs out).
        let wait = self.lease_wait.map_or(
            defaults.lease_wait.max(lease + lease / 2),
            HumanDuration::get,
        );
        Ok((lease, wait))
    }
}

/// For an error inside a `[[processors]]` entry: the message with the key at fault and its
/// line. serde reads a tagged entry whole before it looks at its fields, so the parser can
/// point only at the entry's header and, for a bad value, cannot name the key. The key is
/// found by taking each one out of the entry in turn: without the culprit the entry reads, or
/// reads but for that very key missing.
fn name_the_key(text: &str, err: &toml::de::Error) -> Option<String> {
    let span = err.span()?;
    let at = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
    if !text[at..].trim_start().starts_with("[[processors]]") {
        return None;
    }
    let doc: toml::Table = text.parse().ok()?;
    let entries = doc.get("processors")?.as_array()?;
    let reads =
        |entry: &toml::Table| toml::Value::Table(entry.clone()).try_into::<ProcessorConfig>();
    // The entry at fault: the first that does not read on its own.
    let (index, entry) = entries
        .iter()
        .filter_map(toml::Value::as_table)
        .enumerate()
        .find(|(_, entry)| reads(entry).is_err())?;
    let culprit = entry.keys().filter(|k| *k != "kind").find(|key| {
        let mut without = entry.clone();
        without.remove(*key);
        match reads(&without) {
            Ok(_) => true,
            Err(e) => e.message().contains(&format!("missing field `{key}`")),
        }
    })?;
    // The key's own line: the first after the entry's header that sets it.
    let header = text.match_indices("[[processors]]").nth(index)?.0;
    let line = text[header..]
        .lines()
        .position(|l| {
            l.trim_start()
                .strip_prefix(culprit.as_str())
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| text[..header].lines().count() + i + 1)?;
    let name = entry
        .get("name")
        .and_then(toml::Value::as_str)
        .unwrap_or("?");
    Some(format!(
        "line {line}: `{culprit}` of processor `{name}`: {}\n  |\n{line:>3} | {}",
        err.message(),
        text.lines().nth(line - 1).unwrap_or_default().trim_end()
    ))
}

/// A type two processors' `types` both take, if any (no types takes every type).
fn overlap(a: &[String], b: &[String]) -> Option<String> {
    let takes = |types: &[String], t: &str| {
        types.is_empty()
            || types
                .iter()
                .any(|p| floodway::pipeline::TypeFilter::parse(p).is_ok_and(|f| f.matches(t)))
    };
    match (a.is_empty(), b.is_empty()) {
        (true, true) => Some("every type".into()),
        _ => a
            .iter()
            .chain(b)
            .find(|t| takes(a, t) && takes(b, t))
            .map(|t| format!("`{t}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
[hub]
path = "floodway.db"
partitions = 4

[[processors]]
kind = "materialize"
name = "orders-view"
types = ["order-*"]
view = "orders"
value = "/order"

[[processors]]
kind = "http"
name = "notify"
types = ["order-paid"]
url = "http://127.0.0.1:9000/notify"
rate_limit = 500
concurrency = 8

[[processors]]
kind = "forward"
name = "archive"
types = ["*"]
to = "archive.db"

[[processors]]
kind = "fault-monitor"
name = "faults"
"#;

    #[test]
    fn the_documented_example_parses() {
        let c = Config::parse(FULL).unwrap();
        assert_eq!(c.hub.partitions, Some(4));
        assert_eq!(c.processors.len(), 4);
        assert!(matches!(
            &c.processors[1],
            ProcessorConfig::Http {
                concurrency: ConcurrencyConfig::Fixed(8),
                rate_limit: Some(500),
                ..
            }
        ));
        c.check().unwrap();
        // The example in the module docs parses too.
        let docs = include_str!("config.rs");
        let start = docs.find("//! ```toml").unwrap();
        let end = start + docs[start..].find("//! ```\n").unwrap();
        let example: String = docs[start..end]
            .lines()
            .skip(1)
            .map(|l| l.trim_start_matches("//!").trim_start_matches(' '))
            .collect::<Vec<_>>()
            .join("\n");
        Config::parse(&example).unwrap().check().unwrap();
    }

    #[test]
    fn a_view_writes_by_the_twenty_thousand_within_a_tenth_of_a_second_unless_told() {
        let batching = |c: &Config| match &c.processors[0] {
            ProcessorConfig::Materialize {
                batch, batch_wait, ..
            } => (*batch, batch_wait.map(HumanDuration::get)),
            other => panic!("{other:?}"),
        };
        assert_eq!(batching(&Config::parse(FULL).unwrap()), (None, None));
        let set = FULL.replace(
            "value = \"/order\"",
            "value = \"/order\"\nbatch = 500\nbatch_wait = \"20ms\"",
        );
        let wait = Some(std::time::Duration::from_millis(20));
        assert_eq!(batching(&Config::parse(&set).unwrap()), (Some(500), wait));
        let err = Config::parse(&FULL.replace(
            "value = \"/order\"",
            "value = \"/order\"\nbatch_wait = \"soon\"",
        ))
        .unwrap_err();
        assert!(err.contains("not a duration"), "{err}");
    }

    #[test]
    fn cumulative_acks_need_exclusive_sharing() {
        let nats = |extra: &str| format!("[hub]\npath = \"x.db\"\n\n[hub.nats]\n{extra}\n");
        let config = Config::parse(&nats("acks = \"cumulative\"")).unwrap();
        assert_eq!(
            config.hub.nats.as_ref().unwrap().acks,
            AcksConfig::Cumulative
        );
        config.check().unwrap();
        let err = Config::parse(&nats("acks = \"cumulative\"\nsharing = \"pinned\""))
            .unwrap()
            .check()
            .unwrap_err();
        assert!(err.contains("needs sharing = \"exclusive\""), "{err}");
        let err = Config::parse(&nats("acks = \"some\"")).unwrap_err();
        assert!(err.contains("acks"), "{err}");
    }

    #[test]
    fn bad_http_settings_are_named() {
        let with = |setting: &str| {
            Config::parse(&FULL.replace("concurrency = 8", setting))
                .unwrap()
                .check()
                .unwrap_err()
        };
        let unparsed =
            |setting: &str| Config::parse(&FULL.replace("concurrency = 8", setting)).unwrap_err();
        // Values are checked as the file is read: the error names the key and its line.
        let err = unparsed("body = \"whole\"");
        assert!(
            err.contains("line 19: `body`") && err.contains("body is"),
            "{err}"
        );
        let err = unparsed("concurrency = \"many\"");
        assert!(
            err.contains("line 19: `concurrency` of processor `notify`"),
            "{err}"
        );
        let err = unparsed("timeout_ms = \"soon\"");
        assert!(err.contains("line 19: `timeout_ms`"), "{err}");
        assert!(err.contains(" 19 | timeout_ms = \"soon\""), "{err}");
        let err = unparsed("timeout = 5");
        assert!(
            err.contains("line 19: `timeout`") && err.contains("unknown field"),
            "{err}"
        );
        // An inline table of the wrong shape (a key mistyped or one too many) is refused,
        // not read without it.
        let err = unparsed("headers = { Authorization = { env = \"T\", file = \"t\" } }");
        assert!(err.contains("line 19") && err.contains("headers"), "{err}");
        assert!(unparsed("headers = { Authorization = { evn = \"T\" } }").contains("line 19"));
        let headers = "headers = { Authorization = { env = \"T\" }, X = \"{/id}\" }";
        Config::parse(&FULL.replace("concurrency = 8", headers)).unwrap();
        let row = "key = { pk = \"/order/id\", sk = \"order\", discriminator = \"order\" }";
        let err = Config::parse(&FULL.replace("value = \"/order\"", row)).unwrap_err();
        assert!(err.contains("`key`"), "{err}");
        let err = unparsed("treat_as = { \"409\" = \"fine\" }");
        assert!(err.contains("treat_as") && err.contains("`fine`"), "{err}");
        let err = unparsed("method = \"FETCH\"");
        assert!(err.contains("method `FETCH`"), "{err}");
        assert!(with("client_cert = \"c.pem\"").contains("client_key"));
        assert!(with("timeout_ms = 0").contains("timeout_ms must be at least 1"));
        let err = Config::parse(&FULL.replace("rate_limit = 500\n", "burst = 10\n"))
            .unwrap()
            .check()
            .unwrap_err();
        assert!(err.contains("`burst` shapes a `rate_limit`"), "{err}");
        // Its responses would come back to it, each calling the API again.
        let err = with("respond_as = \"order-paid\"");
        assert!(
            err.contains("processor `notify`") && err.contains("a loop"),
            "{err}"
        );
        Config::parse(&FULL.replace("concurrency = 8", "respond_as = \"payment-notified\""))
            .unwrap()
            .check()
            .unwrap();
        let c = Config::parse(&FULL.replace(
            "concurrency = 8",
            "headers = { Authorization = { env = \"T\" }, X-Key = { file = \"k\" }, X-A = \"{/a}\" }",
        ))
        .unwrap();
        let ProcessorConfig::Http { headers, .. } = &c.processors[1] else {
            unreachable!()
        };
        assert_eq!(
            headers["Authorization"],
            HeaderConfig::Env { env: "T".into() }
        );
        assert_eq!(headers["X-Key"], HeaderConfig::File { file: "k".into() });
        assert_eq!(headers["X-A"], HeaderConfig::Value("{/a}".into()));
    }

    #[test]
    fn where_an_event_is_read_from_is_checked_as_the_file_is() {
        let with = |from: &str, to: &str| Config::parse(&FULL.replace(from, to)).unwrap().check();
        let view = "value = \"/order\"";
        let err = with(view, "value = \"order\"").unwrap_err();
        assert!(
            err.contains("processor `orders-view`: value `order`"),
            "{err}"
        );
        assert!(err.contains("`/order`"), "{err}");
        let err = with(view, "value = \"/order\"\nkey = \"order.id\"").unwrap_err();
        assert!(
            err.contains("key `order.id`") && err.contains("`/order/id`"),
            "{err}"
        );
        with(view, "value = \"/order\"\nkey = \"id\"").unwrap();
        let rows = "key = { pk = \"/order/id\", sk = \"order\" }";
        let err = with(view, &format!("{rows}\nset = {{ source = \"web\" }}")).unwrap_err();
        assert!(
            err.contains("set.source `web`") && err.contains("{ value = \"web\" }"),
            "{err}"
        );
        with(
            view,
            &format!("{rows}\nset = {{ source = {{ value = \"web\" }} }}"),
        )
        .unwrap();
        let err = with("types = [\"*\"]", "types = [\"*\", \"fault\"]").unwrap_err();
        assert!(
            err.contains("processor `archive`: types mix `fault`"),
            "{err}"
        );
    }

    #[test]
    fn settings_that_would_do_nothing_are_errors() {
        let with = |from: &str, to: &str| Config::parse(&FULL.replace(from, to)).unwrap().check();
        let view = "value = \"/order\"";
        // Settings of rows on a view of one value per key.
        let err = with(view, "value = \"/order\"\nstale = \"fault\"").unwrap_err();
        assert!(err.contains("settings of rows"), "{err}");
        // `value` beside the fields it would give.
        let rows = "key = { pk = \"/order/id\", sk = \"order\" }\nset = { s = \"/order/status\" }";
        let err = with("view = \"orders\"", &format!("view = \"orders\"\n{rows}")).unwrap_err();
        assert!(err.contains("`value` gives the fields to set"), "{err}");
        // Reading settings on a stream a forward processor only publishes to.
        let to = "to = \"archive.db\"";
        let err = with(to, "to_nats = { stream = \"A\", acks = \"cumulative\" }").unwrap_err();
        assert!(err.contains("sets `acks`, a setting of reading"), "{err}");
        with(to, "to_nats = { stream = \"A\", subject = \"a\" }").unwrap();
        // A window on a rule that has none.
        let rule = RuleConfig {
            name: "ready".into(),
            kind: "all".into(),
            types: vec!["a".into()],
            first: None,
            then: None,
            event_type: None,
            count: None,
            within: Some(HumanDuration(std::time::Duration::from_secs(60))),
            emit: "ready".into(),
            conditions: BTreeMap::new(),
        };
        let err = rule.rule().unwrap_err();
        assert!(err.contains("(all) takes no `within`"), "{err}");
    }

    /// Settings with which every event would be a fault, merged into one row, or lost from
    /// what they promise, are errors naming them.
    #[test]
    fn settings_that_would_fault_or_merge_every_event_are_errors() {
        let rows = |extra: &str| {
            let config = format!(
                "[hub]\npath = \"x.db\"\n\n[[processors]]\nkind = \"materialize\"\n\
                 name = \"orders\"\ntypes = [\"order-*\"]\nview = \"orders\"\n{extra}\n"
            );
            Config::parse(&config).unwrap().check()
        };
        let key = "key = { pk = \"/order/id\", sk = \"order\" }";
        rows(key).unwrap();
        let err = rows("key = { pk = \"order.id\", sk = \"order\" }").unwrap_err();
        assert!(err.contains("`/order/id`"), "{err}");
        rows("key = { pk = \"/order/id\", sk = \"v1.2\" }").unwrap();
        // A set's elements added and deleted by one update (docs/rows.md).
        rows(&format!(
            "{key}\nadd = {{ tags = \"/order/tags\" }}\ndelete = {{ tags = \"/order/removedTags\" }}"
        ))
        .unwrap();
        for (extra, says) in [
            (
                "set = { status = \"/s\" }\nremove = [\"status\"]",
                "`status` is written twice",
            ),
            ("set = { deleted = \"/d\" }", "`deleted` is a row's own"),
            ("add = { n = true }", "add.n: add takes a number"),
            (
                "delete = { tags = 1 }",
                "delete.tags: delete takes an array",
            ),
            (
                "delete_on = [\"invoice-voided\"]",
                "delete_on `invoice-voided` is none of its types",
            ),
        ] {
            let err = rows(&format!("{key}\n{extra}")).unwrap_err();
            assert!(err.contains(says), "{extra}: {err}");
        }
        rows(&format!("{key}\ndelete_on = [\"order-cancelled\"]")).unwrap();
        // Two processors writing one table must agree on its outbox.
        let two = format!(
            "{FULL}\n[[processors]]\nkind = \"materialize\"\nname = \"a\"\n\
             types = [\"order-submitted\"]\nview = \"t\"\n{key}\noutbox = true\n\
             \n[[processors]]\nkind = \"materialize\"\nname = \"b\"\n\
             types = [\"order-paid\"]\nview = \"t\"\n{key}\n"
        );
        let err = Config::parse(&two).unwrap().check().unwrap_err();
        assert!(err.contains("`a` and `b` write the row table `t`"), "{err}");
        // Nor update the same rows from the same events.
        let two = |types_b: &str, key_b: &str| {
            Config::parse(&format!(
                "{FULL}\n[[processors]]\nkind = \"materialize\"\nname = \"a\"\n\
                 types = [\"order-*\"]\nview = \"t\"\n{key}\nset = {{ s = \"/s\" }}\n\
                 \n[[processors]]\nkind = \"materialize\"\nname = \"b\"\n\
                 types = {types_b}\nview = \"t\"\n{key_b}\nadd = {{ n = 1 }}\n"
            ))
            .unwrap()
            .check()
        };
        let err = two("[\"order-paid\"]", key).unwrap_err();
        assert!(err.contains("the same rows of `t`"), "{err}");
        assert!(err.contains("`order-paid`"), "{err}");
        two("[\"payment-made\"]", key).unwrap();
        two(
            "[\"order-paid\"]",
            "key = { pk = \"/customer/id\", sk = \"customer\" }",
        )
        .unwrap();
        // A cep rule reads exact types its processor collects, and pointers.
        let cep = |rule: &str| {
            Config::parse(&format!(
                "{FULL}\n[[processors]]\nkind = \"cep\"\nname = \"c\"\n\
                 types = [\"order-submitted\", \"payment-completed\"]\n\
                 [[processors.rules]]\nname = \"late\"\nkind = \"absence\"\n\
                 first = \"order-submitted\"\nwithin = \"15m\"\nemit = \"late\"\n{rule}\n"
            ))
            .unwrap()
            .check()
        };
        cep("then = \"payment-completed\"").unwrap();
        let err = cep("then = \"payment-captured\"").unwrap_err();
        assert!(err.contains("which its types do not collect"), "{err}");
        let err = cep("then = \"payment-*\"").unwrap_err();
        assert!(err.contains("not patterns"), "{err}");
        let err =
            cep("then = \"payment-completed\"\nwhere = { \"order.amount\" = 1 }").unwrap_err();
        assert!(err.contains("`/order/amount`"), "{err}");
        // No types: it would collect nothing.
        let err = Config::parse(&format!(
            "{FULL}\n[[processors]]\nkind = \"cep\"\nname = \"c\"\ntypes = []\n\
             [[processors.rules]]\nname = \"ready\"\nkind = \"all\"\n\
             types = [\"order-submitted\"]\nemit = \"ready\"\n"
        ))
        .unwrap()
        .check()
        .unwrap_err();
        assert!(err.contains("collects the `types` it names"), "{err}");
    }

    #[test]
    fn cep_processors_keep_their_state_apart() {
        let cep = |name: &str| {
            format!(
                "\n[[processors]]\nkind = \"cep\"\nname = \"{name}\"\ntypes = [\"order-*\"]\n\
                 [[processors.rules]]\nname = \"ready\"\nkind = \"all\"\n\
                 types = [\"order-paid\"]\nemit = \"ready\"\n"
            )
        };
        let err = Config::parse(&format!("{FULL}{}{}", cep("orders-cep"), cep("orders_cep")))
            .unwrap()
            .check()
            .unwrap_err();
        assert!(err.contains("`orders-cep` and `orders_cep`"), "{err}");
        Config::parse(&format!(
            "{FULL}{}{}",
            cep("orders-cep"),
            cep("payments-cep")
        ))
        .unwrap()
        .check()
        .unwrap();
    }

    #[test]
    fn the_lease_wait_outlasts_the_lease_unless_told() {
        let hub = |extra: &str| {
            Config::parse(&format!("[hub]\npath = \"x.db\"\n{extra}\n"))
                .unwrap()
                .hub
                .leases()
        };
        let s = std::time::Duration::from_secs;
        assert_eq!(hub("").unwrap(), (s(10), s(15)));
        assert_eq!(hub("lease = \"30s\"").unwrap(), (s(30), s(45)));
        assert_eq!(hub("lease = \"2s\"").unwrap(), (s(2), s(15)));
        assert_eq!(hub("lease_wait = \"1m\"").unwrap(), (s(10), s(60)));
        assert_eq!(
            hub("lease = \"30s\"\nlease_wait = \"2s\"").unwrap(),
            (s(30), s(2))
        );
    }

    #[test]
    fn retention_is_read_from_the_hub_table() {
        let c = Config::parse(&FULL.replace(
            "partitions = 4",
            "partitions = 4\nretention_max_age = \"7d\"\nretention_max_bytes = 1000",
        ))
        .unwrap();
        let r = c.hub.retention().unwrap();
        assert_eq!(r.max_age, Some(std::time::Duration::from_secs(7 * 86_400)));
        assert_eq!(r.max_bytes_per_partition, Some(1000));
        assert!(r.keep_unread, "the default");
        let c = Config::parse(&FULL.replace(
            "partitions = 4",
            "retention_max_bytes = 1000\nretention_keep_unread = false",
        ))
        .unwrap();
        assert!(!c.hub.retention().unwrap().keep_unread);
        let err = Config::parse(&FULL.replace("partitions = 4", "retention_max_age = \"soon\""))
            .unwrap_err();
        assert!(
            err.contains("line 4") && err.contains("retention_max_age = \"soon\""),
            "{err}"
        );
        assert!(Config::parse(FULL).unwrap().hub.retention().is_none());
    }

    #[test]
    fn leases_are_read_from_the_hub_table() {
        let c = Config::parse(FULL).unwrap();
        let defaults = floodway_embedded::HubOptions::default();
        assert_eq!(
            c.hub.leases().unwrap(),
            (defaults.lease, defaults.lease_wait)
        );
        let c =
            Config::parse(&FULL.replace("partitions = 4", "lease = \"2s\"\nlease_wait = \"1m\""))
                .unwrap();
        let second = std::time::Duration::from_secs(1);
        assert_eq!(c.hub.leases().unwrap(), (2 * second, 60 * second));
        let c = Config::parse(&FULL.replace("partitions = 4", "lease = \"1ms\"")).unwrap();
        assert!(c.check().unwrap_err().contains("lease `1ms` is too short"));
        let err =
            Config::parse(&FULL.replace("partitions = 4", "lease_wait = \"soon\"")).unwrap_err();
        assert!(
            err.contains("lease_wait = \"soon\"") && err.contains("not a duration"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let err = Config::parse(&FULL.replace("rate_limit = 500", "rate_limt = 500")).unwrap_err();
        assert!(err.contains("rate_limt"), "{err}");
        let err =
            Config::parse(&FULL.replace("partitions = 4", "partitions = \"four\"")).unwrap_err();
        assert!(err.contains("partitions"), "{err}");
        let err =
            Config::parse(&FULL.replace("kind = \"forward\"", "kind = \"teleport\"")).unwrap_err();
        assert!(err.contains("teleport"), "{err}");
        let err =
            Config::parse(&FULL.replace("concurrency = 8", "concurrency = \"lots\"")).unwrap_err();
        assert!(
            err.contains("concurrency") && err.contains("\"lots\""),
            "{err}"
        );
        let err = Config::parse(&FULL.replace("concurrency = 8", "concurrency = 0")).unwrap_err();
        assert!(err.contains("at least 1"), "{err}");
        let c = Config::parse(&FULL.replace("name = \"archive\"", "name = \"notify\"")).unwrap();
        assert!(c
            .check()
            .unwrap_err()
            .contains("two processors are named `notify`"));
    }
}
