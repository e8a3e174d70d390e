//! Single-table rows written by update requests: the contract of the views real services keep.
//!
//! A row has a key of a partition key and a sort key ([`RowKey`]), so one partition holds
//! several kinds of row (an order and its items), told apart by a discriminator. An
//! [`Update`] sets fields, removes fields, adds to counters and to sets, deletes elements of
//! sets, deletes the row, and sets the row's time to live, as DynamoDB's update expressions do.
//!
//! # Order and repetition
//!
//! Every update carries the [`Version`] `(timestamp, id)` of the event that makes it, and
//! [`merge`] applies it by one of two rules ([`Latest`]):
//!
//! - **per field** (the default): each field remembers the version that last wrote it, and a
//!   write of a field applies only when newer. Events that write different fields (the status
//!   from one, the address from another) all land whatever their order; removed fields and
//!   deleted rows leave their version behind, so an older write does not bring them back.
//!   Adds to a number are commutative and apply once per event; an element added to or deleted
//!   from a set is latest-wins on its own.
//! - **per row**: the whole request applies only when newer than the row (aws-lambda-stream's
//!   `timestamp` condition).
//!
//! An update none of whose writes applies is *stale*, and its [`Stale`] policy says what
//! happens: nothing (drop), a fault, or another request instead (a fallback, e.g. into a
//! history row). A store applies each event's update at most once: an inbox, written in the
//! same transaction as the row, recognises a redelivery.
//!
//! With this, any permutation and duplication of a set of updates leaves the same rows,
//! provided a field is written by `set`/`remove` or by numeric `add` but not both (a counter
//! and a value do not commute), and a counter is not in a row also deleted. The property tests
//! below and every store's conformance test hold it.
//!
//! # Changes
//!
//! Every update that changes what a row shows yields a [`Change`]: the row's image before and
//! after, as Floodway's DynamoDB change events carry them (`raw.old`, `raw.new`). A store with
//! an outbox writes the change event in the same transaction as the row.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::Error;
use crate::event::{now_millis, Event};
use crate::hub::HubFuture;
use crate::idempotence::Version;
use crate::uow::Batch;

/// A row's key: the partition key and the sort key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RowKey {
    /// The partition key.
    pub pk: String,
    /// The sort key.
    pub sk: String,
}

impl RowKey {
    /// The key `pk`, `sk`.
    pub fn new(pk: impl Into<String>, sk: impl Into<String>) -> Self {
        RowKey {
            pk: pk.into(),
            sk: sk.into(),
        }
    }
}

impl std::fmt::Display for RowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.pk, self.sk)
    }
}

/// Which writes are compared by version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Latest {
    /// Each field keeps the version that wrote it.
    #[default]
    Field,
    /// The whole request applies only over an older row.
    Row,
}

/// What a stale update does.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Stale {
    /// Nothing (adds to counters still apply: they do not depend on order).
    #[default]
    Drop,
    /// The event becomes a fault (poison): someone should look.
    Fault,
    /// This request applies instead (its own staleness drops it).
    Fallback(Box<Update>),
}

/// A request to change one row; see the [module docs](self).
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// The row.
    pub key: RowKey,
    /// The version of the event that makes it.
    pub version: Version,
    /// Fields to set.
    pub set: Vec<(String, Value)>,
    /// Fields to remove.
    pub remove: Vec<String>,
    /// Numbers to add to counters, or arrays of elements to add to sets.
    pub add: Vec<(String, Value)>,
    /// Arrays of elements to delete from sets.
    pub delete: Vec<(String, Value)>,
    /// Remove every field not set by this request (a whole-row put).
    pub replace: bool,
    /// Delete the row.
    pub delete_row: bool,
    /// When the row expires (ms since the epoch).
    pub expires_at: Option<i64>,
    /// The kind of row (the change events' type is `{discriminator}-created`, ...).
    pub discriminator: Option<String>,
    /// Per field or per row.
    pub latest: Latest,
    /// When stale.
    pub stale: Stale,
}

impl Update {
    /// An update of `key` by the event of `version` that changes nothing yet.
    pub fn new(key: RowKey, version: Version) -> Self {
        Update {
            key,
            version,
            set: Vec::new(),
            remove: Vec::new(),
            add: Vec::new(),
            delete: Vec::new(),
            replace: false,
            delete_row: false,
            expires_at: None,
            discriminator: None,
            latest: Latest::Field,
            stale: Stale::Drop,
        }
    }

    /// A whole-row write: these fields and no others, latest-wins per row.
    pub fn put(key: RowKey, version: Version, fields: Map<String, Value>) -> Self {
        let mut update = Update::new(key, version).latest(Latest::Row);
        update.set = fields.into_iter().collect();
        update.replace = true;
        update
    }

    /// Sets `field` to `value`.
    #[must_use]
    pub fn set(mut self, field: impl Into<String>, value: impl Into<Value>) -> Self {
        self.set.push((field.into(), value.into()));
        self
    }

    /// Removes `field`.
    #[must_use]
    pub fn remove(mut self, field: impl Into<String>) -> Self {
        self.remove.push(field.into());
        self
    }

    /// Adds a number to a counter, or an array's elements to a set.
    #[must_use]
    pub fn add(mut self, field: impl Into<String>, value: impl Into<Value>) -> Self {
        self.add.push((field.into(), value.into()));
        self
    }

    /// Deletes an array's elements from a set.
    #[must_use]
    pub fn delete(mut self, field: impl Into<String>, value: impl Into<Value>) -> Self {
        self.delete.push((field.into(), value.into()));
        self
    }

    /// Deletes the row.
    #[must_use]
    pub fn delete_row(mut self) -> Self {
        self.delete_row = true;
        self
    }

    /// The row expires at `at` (ms since the epoch).
    #[must_use]
    pub fn expiring_at(mut self, at: i64) -> Self {
        self.expires_at = Some(at);
        self
    }

    /// The kind of row.
    #[must_use]
    pub fn discriminator(mut self, discriminator: impl Into<String>) -> Self {
        self.discriminator = Some(discriminator.into());
        self
    }

    /// Per field or per row.
    #[must_use]
    pub fn latest(mut self, latest: Latest) -> Self {
        self.latest = latest;
        self
    }

    /// What a stale update does.
    #[must_use]
    pub fn on_stale(mut self, stale: Stale) -> Self {
        self.stale = stale;
        self
    }

    /// The inbox's name for this update: its event and its row, so one event may update
    /// several rows. The three are joined by U+001F; where one of them holds that character
    /// itself, each is written with its length first, so that two rows never share a name
    /// (`a\u{1f}b`, `c` and `a`, `b\u{1f}c` would), while every other name stays as stored.
    pub fn inbox_id(&self) -> String {
        let parts = [&*self.version.id, &*self.key.pk, &*self.key.sk];
        if parts.iter().any(|p| p.contains('\u{1f}')) {
            // Two separators first: no name of the plain form starts so and holds a third.
            let mut id = String::from("\u{1f}\u{1f}");
            for part in parts {
                id.push_str(&format!("{}:{part}", part.len()));
            }
            return id;
        }
        format!(
            "{}\u{1f}{}\u{1f}{}",
            self.version.id, self.key.pk, self.key.sk
        )
    }

    /// Checks what the stores cannot hold: an add or delete that is neither a number nor an
    /// array, a field named twice, reserved names.
    ///
    /// # Errors
    /// Poison, naming the field.
    pub fn check(&self) -> Result<(), Error> {
        let bad = |why: String| Err(Error::poison_msg("InvalidUpdate", why));
        // Every update is checked on its way to a store: a few names are compared without
        // allocating, many through a set (a whole event copied field by field may have a
        // hundred thousand).
        // A set's elements may be added and deleted by one update (tags added and removed);
        // anything else names a field once.
        let names = || {
            self.set
                .iter()
                .map(|(f, _)| f)
                .chain(&self.remove)
                .chain(self.add.iter().map(|(f, _)| f))
        };
        let mut seen = names()
            .nth(16)
            .is_some()
            .then(std::collections::HashSet::<&str>::new);
        for (i, field) in names().enumerate() {
            if field.is_empty() {
                return bad("a field has no name".into());
            }
            if RESERVED.contains(&field.as_str()) {
                return bad(format!("{field} is the row's own; it cannot be written"));
            }
            let twice = match &mut seen {
                Some(seen) => !seen.insert(field),
                None => names().take(i).any(|f| f == field),
            };
            if twice {
                return bad(format!("{field} is written twice by one update"));
            }
        }
        for (field, value) in &self.add {
            if !(value.is_number() || value.is_array()) {
                return bad(format!(
                    "add to {field}: {value} is neither a number nor a set"
                ));
            }
        }
        for (field, value) in &self.delete {
            if field.is_empty() || RESERVED.contains(&field.as_str()) {
                return bad(format!("{field} is the row's own; it cannot be written"));
            }
            if self.set.iter().any(|(f, _)| f == field) || self.remove.contains(field) {
                return bad(format!("{field} is written twice by one update"));
            }
            if !value.is_array() {
                return bad(format!("delete from {field}: {value} is not a set"));
            }
        }
        Ok(())
    }
}

/// The attribute in which a store without columns of its own (a DynamoDB item) keeps what
/// makes a row order-tolerant; change data capture leaves it out of the images.
pub const STORE_ATTRIBUTE: &str = "floodway";

/// Names a row's image uses for itself.
pub const RESERVED: [&str; 9] = [
    "pk",
    "sk",
    "discriminator",
    "timestamp",
    "ttl",
    STORE_ATTRIBUTE,
    "awsregion",
    "latched",
    "deleted",
];

/// The versions a row keeps: per field (removed ones too), per element of a set, and of its
/// deletion.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RowMeta {
    /// The version that last wrote each field.
    #[serde(default, rename = "f", skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, Version>,
    /// Per set field, the version that last added or deleted each element (by its JSON text),
    /// and whether it is in.
    #[serde(default, rename = "e", skip_serializing_if = "BTreeMap::is_empty")]
    pub elements: BTreeMap<String, BTreeMap<String, (Version, bool)>>,
    /// The version that deleted the row, if one did.
    #[serde(default, rename = "d", skip_serializing_if = "Option::is_none")]
    pub deleted: Option<Version>,
}

/// A stored row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Its key.
    pub key: RowKey,
    /// Its kind.
    pub discriminator: Option<String>,
    /// Its fields.
    pub fields: Map<String, Value>,
    /// The newest version applied to it.
    pub version: Version,
    /// When it expires (ms since the epoch).
    pub expires_at: Option<i64>,
    /// The versions it keeps to stay order-tolerant.
    pub meta: RowMeta,
}

impl Row {
    /// The versions to store: those equal to the row's own version are left out for what
    /// the row holds (most fields were written by its latest event), and
    /// [`Row::restore_meta`] puts them back. A tombstone's versions are always kept.
    pub fn stored_meta(&self) -> RowMeta {
        let held = |name: &str| match name {
            "discriminator" => self.discriminator.is_some(),
            "ttl" => self.expires_at.is_some(),
            // A field holding set elements gets no version back: it keeps its own.
            field => self.fields.contains_key(field) && !self.meta.elements.contains_key(field),
        };
        RowMeta {
            fields: self
                .meta
                .fields
                .iter()
                .filter(|(name, v)| **v != self.version || !held(name))
                .map(|(name, v)| (name.clone(), v.clone()))
                .collect(),
            elements: self.meta.elements.clone(),
            deleted: self.meta.deleted.clone(),
        }
    }

    /// Puts back the versions [`Row::stored_meta`] left out.
    pub fn restore_meta(&mut self) {
        let version = &self.version;
        let meta = &mut self.meta;
        let names = self
            .fields
            .keys()
            .filter(|f| !meta.elements.contains_key(*f))
            .map(String::as_str)
            .chain(self.discriminator.is_some().then_some("discriminator"))
            .chain(self.expires_at.is_some().then_some("ttl"));
        for name in names {
            if !meta.fields.contains_key(name) {
                meta.fields.insert(name.to_owned(), version.clone());
            }
        }
    }

    fn empty(key: RowKey) -> Row {
        Row {
            key,
            discriminator: None,
            fields: Map::new(),
            version: Version {
                timestamp: i64::MIN,
                id: String::new(),
            },
            expires_at: None,
            meta: RowMeta::default(),
        }
    }

    /// Whether the row shows anything: it has fields, or it was written and not deleted
    /// since.
    pub fn live(&self) -> bool {
        !self.fields.is_empty()
            || (self.version.timestamp != i64::MIN
                && self.meta.deleted.as_ref().is_none_or(|d| self.version > *d))
    }

    /// Whether it has expired at `now` (ms since the epoch).
    pub fn expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// The row as an item: its fields, with `pk`, `sk`, `discriminator`, `timestamp` (ms) and
    /// `ttl` (s) as a DynamoDB single table holds them; `None` when it shows nothing.
    pub fn image(&self) -> Option<Value> {
        if !self.live() {
            return None;
        }
        let mut item = self.fields.clone();
        item.insert("pk".into(), self.key.pk.clone().into());
        item.insert("sk".into(), self.key.sk.clone().into());
        if let Some(d) = &self.discriminator {
            item.insert("discriminator".into(), d.clone().into());
        }
        item.insert("timestamp".into(), self.version.timestamp.into());
        if let Some(at) = self.expires_at {
            item.insert("ttl".into(), at.div_euclid(1000).into());
        }
        Some(Value::Object(item))
    }
}

/// What an update did to its row.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Applied (`changed`: what the row shows changed).
    Written {
        /// Whether what the row shows changed.
        changed: bool,
    },
    /// Older than what it met: nothing changed (or its fallback applied).
    Stale,
    /// Applied before (the inbox knew it): nothing changed.
    Duplicate,
    /// Stale under [`Stale::Fault`], or invalid: nothing changed; the event is poison.
    Faulted(String),
}

/// A change of what a row shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The row.
    pub key: RowKey,
    /// Its kind.
    pub discriminator: Option<String>,
    /// The version of the update that made it.
    pub version: Version,
    /// The row's image before, if it showed anything.
    pub old: Option<Value>,
    /// After, if it shows anything.
    pub new: Option<Value>,
    /// The row was deleted before (a write over its tombstone).
    pub undeleted: bool,
}

impl Change {
    /// `created`, `updated`, `deleted`, or `undeleted` (written again after a deletion, as
    /// DynamoDB change data capture names a write over a tombstone).
    pub fn kind(&self) -> &'static str {
        match (&self.old, &self.new) {
            (None, _) if self.undeleted => "undeleted",
            (None, _) => "created",
            (Some(_), None) => "deleted",
            (Some(_), Some(_)) => "updated",
        }
    }

    /// The change as an event of `{discriminator}-{kind}` (`row-` without one), keyed by the
    /// row's partition key, with the images under `raw.new` and `raw.old` and the key under
    /// `keys`, as Floodway's DynamoDB change events are. Its id is derived from the row and
    /// the update's event, so a change made twice is the same event.
    pub fn to_event(&self, source: &str) -> Event {
        let kind = self.kind();
        let prefix = self
            .discriminator
            .as_deref()
            .unwrap_or("row")
            .to_lowercase();
        let id = change_id(source, &self.key, &self.version.id);
        let mut raw = Map::new();
        if let Some(new) = &self.new {
            raw.insert("new".into(), new.clone());
        }
        if let Some(old) = &self.old {
            raw.insert("old".into(), old.clone());
        }
        let keys = serde_json::json!({"pk": self.key.pk, "sk": self.key.sk});
        Event::builder(format!("{prefix}-{kind}"), self.key.pk.clone())
            .id(id)
            .timestamp(self.version.timestamp)
            .tag("source", source.to_owned())
            .field("raw", Value::Object(raw))
            .field("keys", keys)
            .build()
    }
}

/// A change's event id: a digest of where it happened and which event made it.
pub fn change_id(source: &str, key: &RowKey, event_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut digest = Sha256::new();
    for part in [source, &key.pk, &key.sk, event_id] {
        digest.update(part.len().to_le_bytes());
        digest.update(part.as_bytes());
    }
    let hash = digest.finalize();
    let hex: String = hash[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// What [`merge`] made of an update and a row.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    /// The row to store (`None`: leave it as it was).
    pub row: Option<Row>,
    /// What happened.
    pub outcome: Outcome,
    /// What the row shows changed, if it did.
    pub change: Option<Change>,
    /// A stale update's fallback, for another row: the store applies it next.
    pub fallback: Option<Update>,
}

/// Applies `update` to `row` (`None`, or expired at `now`: no row), by the rules of the
/// [module docs](self). The same function serves every store, so they agree.
pub fn merge(row: Option<&Row>, update: &Update, now: i64) -> Merged {
    merge_with(row, update, now, true)
}

/// [`merge`], making the [`Change`] only when `changes` asks (a store without an outbox has
/// no use for the images).
pub fn merge_with(row: Option<&Row>, update: &Update, now: i64, changes: bool) -> Merged {
    if let Err(e) = update.check() {
        return Merged {
            row: None,
            outcome: Outcome::Faulted(e.to_string()),
            change: None,
            fallback: None,
        };
    }
    let before = row.filter(|r| !r.expired(now));
    let mut next = before
        .cloned()
        .unwrap_or_else(|| Row::empty(update.key.clone()));
    let applied = apply(&mut next, update);
    if !applied && before.is_some_and(|b| wrote(b, update)) {
        // This very event wrote the row before: a repeat, not a stale event.
        return Merged {
            row: None,
            outcome: Outcome::Duplicate,
            change: None,
            fallback: None,
        };
    }
    let (next, outcome) = if applied {
        (next, Outcome::Written { changed: false })
    } else {
        match &update.stale {
            Stale::Drop => {
                // Counters do not depend on order: they apply all the same.
                let mut counted = before
                    .cloned()
                    .unwrap_or_else(|| Row::empty(update.key.clone()));
                add_counters(&mut counted, update);
                (counted, Outcome::Stale)
            }
            Stale::Fault => {
                return Merged {
                    row: None,
                    outcome: Outcome::Faulted(format!(
                        "stale: row {} holds writes newer than event {} ({})",
                        update.key, update.version.id, update.version.timestamp
                    )),
                    change: None,
                    fallback: None,
                }
            }
            Stale::Fallback(other) => {
                let mut other = other.as_ref().clone();
                other.stale = Stale::Drop;
                if let Err(e) = other.check() {
                    return Merged {
                        row: None,
                        outcome: Outcome::Faulted(format!("its fallback: {e}")),
                        change: None,
                        fallback: None,
                    };
                }
                if other.key != update.key {
                    return Merged {
                        row: None,
                        outcome: Outcome::Stale,
                        change: None,
                        fallback: Some(other),
                    };
                }
                let mut merged = merge_with(row, &other, now, changes);
                if matches!(merged.outcome, Outcome::Written { .. }) {
                    merged.outcome = Outcome::Stale;
                }
                return merged;
            }
        }
    };
    // What the row shows: compared without building images, which only a change needs.
    let shows = |r: Option<&Row>| {
        r.filter(|r| r.live())
            .map(|r| (r.fields.clone(), r.discriminator.clone(), r.expires_at))
    };
    let changed = match (before, outcome == Outcome::Stale && !counted(update)) {
        // A stale request without counters leaves the row as it was.
        (_, true) => false,
        (Some(b), _) if b.live() && next.live() => {
            b.fields != next.fields
                || b.discriminator != next.discriminator
                || b.expires_at != next.expires_at
        }
        _ => shows(before).is_some() || shows(Some(&next)).is_some(),
    };
    let change = (changed && changes).then(|| Change {
        key: update.key.clone(),
        discriminator: next
            .discriminator
            .clone()
            .or_else(|| before.and_then(|b| b.discriminator.clone())),
        version: update.version.clone(),
        old: before.and_then(Row::image),
        new: next.image(),
        undeleted: before.is_some_and(|b| !b.live() && b.meta.deleted.is_some()),
    });
    let stored = match outcome {
        Outcome::Stale => before != Some(&next),
        _ => true,
    };
    let outcome = match outcome {
        Outcome::Written { .. } => Outcome::Written { changed },
        other => other,
    };
    Merged {
        row: stored.then_some(next),
        outcome,
        change,
        fallback: None,
    }
}

/// Whether the row holds a write of this very update (the version is the event's): what the
/// versions alone say of a repeat, without an inbox.
fn wrote(row: &Row, u: &Update) -> bool {
    let v = &u.version;
    row.version == *v
        || row.meta.deleted.as_ref() == Some(v)
        || u.set
            .iter()
            .map(|(f, _)| f)
            .chain(&u.remove)
            .chain(u.add.iter().map(|(f, _)| f))
            .any(|f| row.meta.fields.get(f) == Some(v))
        || u.add.iter().chain(&u.delete).any(|(f, _)| {
            row.meta
                .elements
                .get(f)
                .is_some_and(|e| e.values().any(|(ev, _)| ev == v))
        })
}

/// Whether a request adds to a counter.
fn counted(u: &Update) -> bool {
    u.add.iter().any(|(_, n)| n.is_number())
}

/// Applies the order-dependent writes; false when none of them applies (stale). A request of
/// counters only is never stale.
fn apply(row: &mut Row, u: &Update) -> bool {
    let v = &u.version;
    let newer_than_delete = row.meta.deleted.as_ref().is_none_or(|d| v > d);
    let orders = !u.set.is_empty()
        || !u.remove.is_empty()
        || u.discriminator.is_some()
        || u.expires_at.is_some()
        || u.replace
        || u.delete_row
        || !u.delete.is_empty()
        || u.add.iter().any(|(_, a)| a.is_array());
    if u.latest == Latest::Row {
        let newer = row.version.timestamp == i64::MIN || *v > row.version;
        if !(newer && newer_than_delete) {
            return !orders && {
                add_counters(row, u);
                true
            };
        }
    } else if !newer_than_delete {
        return !orders;
    }
    // A put (a whole row, maybe of no fields) applies by itself once it is newer.
    let mut any = !orders || (u.replace && u.latest == Latest::Row);
    if u.delete_row {
        // Everything written before goes; what was written after stays (per field).
        let keep = |fv: Option<&Version>| u.latest == Latest::Field && fv.is_some_and(|fv| fv > v);
        let fields = std::mem::take(&mut row.fields);
        for (name, value) in fields {
            if keep(row.meta.fields.get(&name)) {
                row.fields.insert(name, value);
            }
        }
        row.meta.fields.retain(|_, fv| &*fv > v);
        if !row.meta.fields.contains_key("discriminator") {
            row.discriminator = None;
        }
        if !row.meta.fields.contains_key("ttl") {
            row.expires_at = None;
        }
        for elements in row.meta.elements.values_mut() {
            elements.retain(|_, (ev, _)| &*ev > v);
        }
        row.meta.elements.retain(|_, e| !e.is_empty());
        for field in row.meta.elements.keys() {
            set_field_from_elements(&mut row.fields, field, &row.meta.elements[field]);
        }
        row.meta.deleted = Some(v.clone());
        bump(row, v);
        return true;
    }
    let mut write = |row: &mut Row, field: &str, value: Option<&Value>| {
        let current = row.meta.fields.get(field);
        if u.latest == Latest::Field && current.is_some_and(|c| c >= v) {
            return;
        }
        match value {
            Some(value) => row.fields.insert(field.to_owned(), value.clone()),
            None => row.fields.remove(field),
        };
        row.meta.fields.insert(field.to_owned(), v.clone());
        any = true;
    };
    for (field, value) in &u.set {
        write(row, field, Some(value));
    }
    for field in &u.remove {
        write(row, field, None);
    }
    if u.replace {
        let set: std::collections::HashSet<&str> = u.set.iter().map(|(f, _)| f.as_str()).collect();
        let others: Vec<String> = row
            .fields
            .keys()
            .filter(|f| !set.contains(f.as_str()))
            .cloned()
            .collect();
        for field in others {
            write(row, &field, None);
        }
    }
    for (field, value, present) in u
        .add
        .iter()
        .filter_map(|(f, a)| a.as_array().map(|a| (f, a, true)))
        .chain(
            u.delete
                .iter()
                .filter_map(|(f, d)| d.as_array().map(|d| (f, d, false))),
        )
    {
        let elements = row.meta.elements.entry(field.clone()).or_default();
        for element in value {
            let text = element.to_string();
            if elements.get(&text).is_some_and(|(ev, _)| ev >= v) {
                continue;
            }
            elements.insert(text, (v.clone(), present));
            any = true;
        }
        let elements = row.meta.elements[field].clone();
        set_field_from_elements(&mut row.fields, field, &elements);
    }
    // The kind and the time to live are latest-wins too, each by the version that set it.
    for (name, given) in [
        ("discriminator", u.discriminator.is_some()),
        ("ttl", u.expires_at.is_some()),
    ] {
        let newer = given && row.meta.fields.get(name).is_none_or(|at| v > at);
        if newer {
            row.meta.fields.insert(name.to_owned(), v.clone());
            if name == "ttl" {
                row.expires_at = u.expires_at;
            } else {
                row.discriminator.clone_from(&u.discriminator);
            }
            any = true;
        }
    }
    if !any {
        return false;
    }
    add_counters(row, u);
    bump(row, v);
    true
}

fn set_field_from_elements(
    fields: &mut Map<String, Value>,
    field: &str,
    elements: &BTreeMap<String, (Version, bool)>,
) {
    let members: Vec<Value> = elements
        .iter()
        .filter(|(_, (_, present))| *present)
        .filter_map(|(text, _)| serde_json::from_str(text).ok())
        .collect();
    if members.is_empty() {
        fields.remove(field);
    } else {
        fields.insert(field.to_owned(), Value::Array(members));
    }
}

/// Adds the numeric adds (once per event: the inbox sees to that).
fn add_counters(row: &mut Row, u: &Update) {
    let mut any = false;
    for (field, n) in u.add.iter().filter(|(_, n)| n.is_number()) {
        let sum = match (row.fields.get(field), n) {
            (Some(Value::Number(a)), b) => add_numbers(a, b.as_number()),
            (_, b) => b.clone(),
        };
        row.fields.insert(field.clone(), sum);
        let fv = row
            .meta
            .fields
            .entry(field.clone())
            .or_insert(u.version.clone());
        if u.version > *fv {
            *fv = u.version.clone();
        }
        any = true;
    }
    if any {
        if row.discriminator.is_none() && u.discriminator.is_some() {
            row.discriminator.clone_from(&u.discriminator);
            row.meta
                .fields
                .entry("discriminator".into())
                .or_insert_with(|| u.version.clone());
        }
        bump(row, &u.version);
    }
}

fn add_numbers(a: &serde_json::Number, b: Option<&serde_json::Number>) -> Value {
    let Some(b) = b else {
        return Value::Number(a.clone());
    };
    match (a.as_i64(), b.as_i64()) {
        (Some(x), Some(y)) if x.checked_add(y).is_some() => Value::from(x + y),
        // Past what a double holds, the count stays at its greatest (not null, which the
        // next add would take for no count and start again from).
        _ => {
            let sum = a.as_f64().unwrap_or(0.0) + b.as_f64().unwrap_or(0.0);
            serde_json::Number::from_f64(sum.clamp(f64::MIN, f64::MAX))
                .map_or(Value::Null, Value::Number)
        }
    }
}

fn bump(row: &mut Row, v: &Version) {
    if row.version.timestamp == i64::MIN || *v > row.version {
        row.version = v.clone();
    }
}

/// A read of one partition's rows, in sort-key order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowQuery {
    /// The partition key.
    pub pk: String,
    /// Sort keys start with this.
    pub sk_prefix: String,
    /// Sort keys come after this (the last of the previous page).
    pub after: Option<String>,
    /// Rows at most.
    pub limit: usize,
}

impl RowQuery {
    /// Up to `limit` rows of partition `pk`.
    pub fn partition(pk: impl Into<String>, limit: usize) -> Self {
        RowQuery {
            pk: pk.into(),
            sk_prefix: String::new(),
            after: None,
            limit,
        }
    }

    /// Only sort keys starting with `prefix`.
    #[must_use]
    pub fn sk_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.sk_prefix = prefix.into();
        self
    }

    /// The page after sort key `sk`.
    #[must_use]
    pub fn after(mut self, sk: impl Into<String>) -> Self {
        self.after = Some(sk.into());
        self
    }

    /// Whether `key` is in the range (not the limit).
    pub fn admits(&self, key: &RowKey) -> bool {
        key.pk == self.pk
            && key.sk.starts_with(&self.sk_prefix)
            && self.after.as_deref().is_none_or(|a| key.sk.as_str() > a)
    }
}

/// Rows written by update requests; see the [module docs](self).
pub trait RowStore: Send + Sync + Debug + 'static {
    /// The store's name.
    fn name(&self) -> &str;

    /// Applies updates in order, each event's update at most once, all in one transaction
    /// where the store has them; an outcome per update.
    fn update<'a>(&'a self, updates: &'a [Update]) -> HubFuture<'a, Vec<Outcome>>;

    /// The row at `key`, unless absent, deleted or expired.
    fn get<'a>(&'a self, key: &'a RowKey) -> HubFuture<'a, Option<Row>>;

    /// The rows `query` selects, in sort-key order, live and unexpired.
    fn query<'a>(&'a self, query: &'a RowQuery) -> HubFuture<'a, Vec<Row>>;
}

/// A row store shared by processors and services.
pub type SharedRows = Arc<dyn RowStore>;

/// How a [`RowSink`] makes an event's updates (none, one, or several rows).
pub type UpdateFn = Arc<dyn Fn(&Event) -> Result<Vec<Update>, Error> + Send + Sync>;

/// A sink applying each event's updates, all of a batch in one [`RowStore::update`]; an event
/// whose updates cannot be made, or that is stale under [`Stale::Fault`], is poison on its own.
#[derive(Clone)]
pub struct RowSink {
    rows: SharedRows,
    updates: UpdateFn,
}

impl Debug for RowSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowSink")
            .field("rows", &self.rows.name())
            .finish_non_exhaustive()
    }
}

impl RowSink {
    /// A sink into `rows`, with updates made by `updates`.
    pub fn new<F>(rows: SharedRows, updates: F) -> Self
    where
        F: Fn(&Event) -> Result<Vec<Update>, Error> + Send + Sync + 'static,
    {
        RowSink {
            rows,
            updates: Arc::new(updates),
        }
    }

    async fn write(&self, batch: Batch) -> Result<crate::Delivery, Error> {
        let mut delivery = crate::Delivery::complete();
        let mut updates = Vec::with_capacity(batch.len());
        let mut owners = Vec::with_capacity(batch.len());
        for (i, event) in batch.events().enumerate() {
            match (self.updates)(event).and_then(|us| {
                us.iter().try_for_each(Update::check)?;
                Ok(us)
            }) {
                Ok(us) => {
                    owners.extend(std::iter::repeat_n(i, us.len()));
                    updates.extend(us);
                }
                Err(err) if batch.len() == 1 => return Err(err),
                Err(err) => delivery.fail(i, err),
            }
        }
        let outcomes = self
            .rows
            .update(&updates)
            .await
            .map_err(|e| crate::error::keeping_class(e, "RowUpdate"))?;
        let mut failed = std::collections::HashSet::new();
        for (outcome, i) in outcomes.into_iter().zip(owners) {
            if let Outcome::Faulted(why) = outcome {
                if batch.len() == 1 {
                    return Err(Error::poison_msg("StaleEvent", why));
                }
                if failed.insert(i) {
                    delivery.fail(i, Error::poison_msg("StaleEvent", why));
                }
            }
        }
        Ok(delivery)
    }
}

crate::impl_sink!(RowSink, write);

/// Reads rows for steps (an event enriched with related rows, as aws-lambda-stream's `update`
/// flavor queries them), with a cache of what a batch reads: reads of one key (or partition)
/// at the same time, or within the cache's lifetime (1 s by default), share one read of the
/// store. A failed read is not kept: the next one tries again.
#[derive(Clone)]
pub struct Lookup {
    rows: SharedRows,
    lifetime: std::time::Duration,
    capacity: usize,
    cache: Arc<Mutex<std::collections::HashMap<CacheKey, Cached>>>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum CacheKey {
    Get(RowKey),
    Query(String, String),
}

type Cached = (
    tokio::time::Instant,
    Arc<tokio::sync::OnceCell<Arc<Vec<Row>>>>,
);

impl Debug for Lookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lookup")
            .field("rows", &self.rows.name())
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

/// Rows a partition query of [`Lookup`] reads at most: a partition holding more is a poison
/// error for the event that asked, not an array cut short.
pub const LOOKUP_QUERY_LIMIT: usize = 1_000;

impl Lookup {
    /// Reads of `rows`, cached for 1 s, 10,000 keys at most.
    pub fn new(rows: SharedRows) -> Self {
        Lookup {
            rows,
            lifetime: std::time::Duration::from_secs(1),
            capacity: 10_000,
            cache: Arc::default(),
        }
    }

    /// How long a read is reused (zero: only reads at the same time share).
    #[must_use]
    pub fn lifetime(mut self, lifetime: std::time::Duration) -> Self {
        self.lifetime = lifetime;
        self
    }

    async fn cached<F, Fut>(&self, key: CacheKey, read: F) -> Result<Arc<Vec<Row>>, Error>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Vec<Row>, crate::BoxError>>,
    {
        let now = tokio::time::Instant::now();
        let cell = {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            let fresh = |at: &tokio::time::Instant, cell: &tokio::sync::OnceCell<_>| {
                !cell.initialized() || now.duration_since(*at) <= self.lifetime
            };
            if cache.len() >= self.capacity {
                cache.retain(|_, (at, cell)| fresh(at, cell));
                if cache.len() >= self.capacity {
                    cache.clear();
                }
            }
            match cache.get(&key) {
                Some((at, cell)) if fresh(at, cell) => cell.clone(),
                _ => {
                    let cell = Arc::new(tokio::sync::OnceCell::new());
                    cache.insert(key, (now, cell.clone()));
                    cell
                }
            }
        };
        cell.get_or_try_init(|| async {
            read()
                .await
                .map(Arc::new)
                // A store's own class kept: a fatal read (a damaged file) stops the
                // processor, a poison one (a key the store cannot hold) faults the event.
                .map_err(|e| crate::error::keeping_class(e, "RowRead"))
        })
        .await
        .cloned()
    }

    /// The row at `key`, unless absent.
    ///
    /// # Errors
    /// A failed read, of the store's class (a read that failed otherwise is transient).
    pub async fn get(&self, key: &RowKey) -> Result<Option<Row>, Error> {
        let rows = self
            .cached(CacheKey::Get(key.clone()), || async {
                Ok(self.rows.get(key).await?.into_iter().collect())
            })
            .await?;
        Ok(rows.first().cloned())
    }

    /// The rows of partition `pk` whose sort keys start with `sk_prefix`, in order.
    ///
    /// # Errors
    /// A failed read, of the store's class; poison when there are more than
    /// [`LOOKUP_QUERY_LIMIT`] such rows (an enrichment is not cut short without a word).
    pub async fn query(&self, pk: &str, sk_prefix: &str) -> Result<Arc<Vec<Row>>, Error> {
        let key = CacheKey::Query(pk.to_owned(), sk_prefix.to_owned());
        self.cached(key, || async {
            let query = RowQuery::partition(pk, LOOKUP_QUERY_LIMIT + 1).sk_prefix(sk_prefix);
            let rows = self.rows.query(&query).await?;
            if rows.len() > LOOKUP_QUERY_LIMIT {
                return Err(Error::poison_msg(
                    "LookupTooLarge",
                    format!(
                        "partition {pk} of {} holds more than {LOOKUP_QUERY_LIMIT} rows{}: \
                         too many to read into one event",
                        self.rows.name(),
                        if sk_prefix.is_empty() {
                            String::new()
                        } else {
                            format!(" under {sk_prefix}")
                        }
                    ),
                )
                .into());
            }
            Ok(rows)
        })
        .await
    }

    /// A step (for [`PipelineBuilder::then`](crate::pipeline::PipelineBuilder::then)) that
    /// sets the event's field `into` to the image of the row `key` gives (`null` when there
    /// is none), or with `sk` `None` to the images of the partition's rows.
    pub fn enrich<K>(
        self,
        key: K,
        into: impl Into<String>,
    ) -> impl Fn(crate::Uow) -> futures_util::future::BoxFuture<'static, Result<crate::Uow, Error>>
           + Send
           + Sync
           + 'static
    where
        K: Fn(&Event) -> Result<(String, Option<String>), Error> + Send + Sync + 'static,
    {
        let into: Arc<str> = into.into().into();
        let key = Arc::new(key);
        move |mut uow| {
            let (lookup, key, into) = (self.clone(), key.clone(), into.clone());
            Box::pin(async move {
                let value = match key(uow.event())? {
                    (pk, Some(sk)) => lookup
                        .get(&RowKey::new(pk, sk))
                        .await?
                        .and_then(|r| r.image())
                        .unwrap_or(Value::Null),
                    (pk, None) => Value::Array(
                        lookup
                            .query(&pk, "")
                            .await?
                            .iter()
                            .filter_map(Row::image)
                            .collect(),
                    ),
                };
                // Changed, the event is written again from its fields: one whose payload does
                // not read would go on as its envelope and this field alone.
                uow.event().check_payload()?;
                uow.event_mut().fields_mut().insert(into.to_string(), value);
                Ok(uow)
            })
        }
    }
}

/// Rows in memory, for tests: the contract's reference. With `outbox`, the changes it made,
/// in order.
#[derive(Debug, Default)]
pub struct MemoryRows {
    name: String,
    inner: Mutex<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    rows: BTreeMap<RowKey, Row>,
    inbox: std::collections::HashSet<String>,
    changes: Vec<Change>,
}

impl MemoryRows {
    /// An empty store named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        MemoryRows {
            name: name.into(),
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The changes made so far, in order.
    pub fn changes(&self) -> Vec<Change> {
        self.lock().changes.clone()
    }

    /// Every stored row, tombstones too, by key.
    pub fn stored(&self) -> Vec<Row> {
        self.lock().rows.values().cloned().collect()
    }
}

impl RowStore for MemoryRows {
    fn name(&self) -> &str {
        &self.name
    }

    fn update<'a>(&'a self, updates: &'a [Update]) -> HubFuture<'a, Vec<Outcome>> {
        Box::pin(async move {
            let mut inner = self.lock();
            let now = now_millis();
            let mut outcomes = Vec::with_capacity(updates.len());
            for u in updates {
                let id = u.inbox_id();
                if inner.inbox.contains(&id) {
                    outcomes.push(Outcome::Duplicate);
                    continue;
                }
                let mut merged = merge(inner.rows.get(&u.key), u, now);
                if !matches!(merged.outcome, Outcome::Faulted(_)) {
                    inner.inbox.insert(id);
                }
                let outcome = merged.outcome.clone();
                loop {
                    if let Some(row) = merged.row {
                        inner.rows.insert(row.key.clone(), row);
                    }
                    if let Some(change) = merged.change {
                        inner.changes.push(change);
                    }
                    match merged.fallback {
                        Some(f) => merged = merge(inner.rows.get(&f.key), &f, now),
                        None => break,
                    }
                }
                outcomes.push(outcome);
            }
            Ok(outcomes)
        })
    }

    fn get<'a>(&'a self, key: &'a RowKey) -> HubFuture<'a, Option<Row>> {
        let now = now_millis();
        let row = self
            .lock()
            .rows
            .get(key)
            .filter(|r| r.live() && !r.expired(now))
            .cloned();
        Box::pin(async move { Ok(row) })
    }

    fn query<'a>(&'a self, query: &'a RowQuery) -> HubFuture<'a, Vec<Row>> {
        let now = now_millis();
        let from = RowKey::new(query.pk.clone(), query.sk_prefix.clone());
        let rows = self
            .lock()
            .rows
            .range(from..)
            .map(|(_, r)| r)
            .take_while(|r| r.key.pk == query.pk && r.key.sk.starts_with(&query.sk_prefix))
            .filter(|r| query.admits(&r.key) && r.live() && !r.expired(now))
            .take(query.limit)
            .cloned()
            .collect();
        Box::pin(async move { Ok(rows) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn v(t: i64, id: &str) -> Version {
        Version {
            timestamp: t,
            id: id.into(),
        }
    }

    fn key() -> RowKey {
        RowKey::new("o1", "order")
    }

    fn fields(row: &Row) -> Value {
        Value::Object(row.fields.clone())
    }

    fn run(updates: &[Update]) -> Option<Row> {
        let mut row: Option<Row> = None;
        for u in updates {
            if let Some(r) = merge(row.as_ref(), u, 0).row {
                row = Some(r);
            }
        }
        row
    }

    #[test]
    fn fields_written_by_different_events_all_land_in_any_order() {
        let status = Update::new(key(), v(2, "b")).set("status", "paid");
        let address = Update::new(key(), v(1, "a")).set("address", "here");
        for order in [[&status, &address], [&address, &status]] {
            let row = run(&order.map(Clone::clone)).unwrap();
            assert_eq!(fields(&row), json!({"status": "paid", "address": "here"}));
            assert_eq!(row.version, v(2, "b"));
        }
    }

    #[test]
    fn per_row_an_older_request_is_stale_and_its_policy_decides() {
        let newer = Update::new(key(), v(2, "b"))
            .set("status", "paid")
            .latest(Latest::Row);
        let older = Update::new(key(), v(1, "a"))
            .set("address", "here")
            .latest(Latest::Row);
        let row = run(std::slice::from_ref(&newer)).unwrap();
        let dropped = merge(Some(&row), &older, 0);
        assert_eq!((dropped.outcome, dropped.row), (Outcome::Stale, None));
        let faulted = merge(Some(&row), &older.clone().on_stale(Stale::Fault), 0);
        assert!(matches!(faulted.outcome, Outcome::Faulted(ref why) if why.contains("stale")));
        let history = Update::new(RowKey::new("o1", "history#a"), v(1, "a")).set("late", true);
        let fallback = merge(
            Some(&row),
            &older.on_stale(Stale::Fallback(Box::new(history.clone()))),
            0,
        );
        assert_eq!((fallback.outcome, fallback.row), (Outcome::Stale, None));
        assert_eq!(fallback.fallback, Some(history));
    }

    #[test]
    fn a_deleted_row_stays_deleted_for_older_writes_and_changes_say_so() {
        let create = Update::new(key(), v(1, "a"))
            .set("status", "new")
            .discriminator("order");
        let delete = Update::new(key(), v(3, "c")).delete_row();
        let late = Update::new(key(), v(2, "b")).set("status", "paid");
        let row = run(std::slice::from_ref(&create)).unwrap();
        let merged = merge(Some(&row), &delete, 0);
        let change = merged.change.unwrap();
        assert_eq!(change.kind(), "deleted");
        assert_eq!(change.to_event("t").event_type(), "order-deleted");
        let deleted = merged.row.unwrap();
        assert!(!deleted.live());
        let after = merge(Some(&deleted), &late, 0);
        assert_eq!((after.outcome, after.change), (Outcome::Stale, None));
        let first = merge(None, &create, 0).change.unwrap();
        assert_eq!(first.kind(), "created");
        assert_eq!(first.new.unwrap()["discriminator"], "order");
    }

    #[test]
    fn expiry_counts_sets_and_an_unchanged_write() {
        let u = Update::new(key(), v(1000, "a"))
            .add("n", 2)
            .add("tags", json!(["x", "y"]))
            .expiring_at(5000);
        let row = run(&[u]).unwrap();
        assert_eq!(row.image().unwrap()["ttl"], 5);
        let u2 = Update::new(key(), v(900, "b"))
            .add("n", 1)
            .delete("tags", json!(["x"]));
        let merged = merge(Some(&row), &u2, 0);
        assert_eq!(
            merged.outcome,
            Outcome::Stale,
            "deleting x at 900 is older than adding it at 1000"
        );
        assert_eq!(
            fields(merged.row.as_ref().unwrap()),
            json!({"n": 3, "tags": ["x", "y"]}),
            "the counter counts all the same"
        );
        assert!(merge(Some(&row), &u2, 6000)
            .row
            .unwrap()
            .expires_at
            .is_none());
        let same = Update::new(key(), v(2000, "c")).add("tags", json!(["y"]));
        let merged = merge(Some(&row), &same, 0);
        assert_eq!(merged.outcome, Outcome::Written { changed: false });
        assert!(merged.change.is_none());
    }

    #[test]
    fn a_repeat_is_known_by_the_versions_it_left() {
        let u = Update::new(key(), v(5, "a"))
            .set("status", "paid")
            .on_stale(Stale::Fault);
        let row = run(std::slice::from_ref(&u)).unwrap();
        assert_eq!(merge(Some(&row), &u, 0).outcome, Outcome::Duplicate);
        let newer = Update::new(key(), v(9, "b")).set("note", "x");
        let row = merge(Some(&row), &newer, 0).row.unwrap();
        assert_eq!(
            merge(Some(&row), &u, 0).outcome,
            Outcome::Duplicate,
            "its field still holds its version"
        );
        let gone = Update::new(key(), v(10, "c")).set("status", "shipped");
        let row = merge(Some(&row), &gone, 0).row.unwrap();
        assert!(
            matches!(merge(Some(&row), &u, 0).outcome, Outcome::Faulted(_)),
            "overtaken: stale, and its policy says so"
        );
    }

    #[test]
    fn invalid_updates_are_faults() {
        for u in [
            Update::new(key(), v(1, "a")).set("pk", 1),
            Update::new(key(), v(1, "a")).add("n", "x"),
            Update::new(key(), v(1, "a")).set("n", 1).remove("n"),
            Update::new(key(), v(1, "a")).set("latched", true),
            Update::new(key(), v(1, "a")).delete("deleted", json!([1])),
        ] {
            assert!(matches!(merge(None, &u, 0).outcome, Outcome::Faulted(_)));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lookups_share_a_read_and_forget_it_after_their_lifetime() {
        #[derive(Debug)]
        struct Counting(MemoryRows, std::sync::atomic::AtomicUsize);
        impl RowStore for Counting {
            fn name(&self) -> &str {
                "counting"
            }
            fn update<'a>(&'a self, u: &'a [Update]) -> HubFuture<'a, Vec<Outcome>> {
                self.0.update(u)
            }
            fn get<'a>(&'a self, key: &'a RowKey) -> HubFuture<'a, Option<Row>> {
                self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Box::pin(async move {
                    // A read that takes a while, as a real store's does.
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    self.0.get(key).await
                })
            }
            fn query<'a>(&'a self, q: &'a RowQuery) -> HubFuture<'a, Vec<Row>> {
                self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                self.0.query(q)
            }
        }
        let store = Arc::new(Counting(MemoryRows::new("c"), Default::default()));
        store
            .update(&[Update::new(RowKey::new("c1", "customer"), v(1, "a")).set("tier", "gold")])
            .await
            .unwrap();
        let lookup = Lookup::new(store.clone());
        let step = lookup.clone().enrich(
            |e: &Event| Ok((e.partition_key().to_owned(), Some("customer".to_owned()))),
            "customer",
        );
        let uows: Vec<crate::Uow> = (0..8)
            .map(|i| {
                crate::Uow::detached(
                    Event::builder("order-paid", "c1")
                        .id(format!("e{i}"))
                        .build(),
                )
            })
            .collect();
        let enriched = futures_util::future::join_all(uows.into_iter().map(&step)).await;
        for uow in enriched {
            assert_eq!(
                uow.unwrap().event().field("customer").unwrap()["tier"],
                "gold"
            );
        }
        assert_eq!(
            store.1.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one read for all"
        );
        tokio::time::advance(std::time::Duration::from_millis(1500)).await;
        let missing = step(crate::Uow::detached(
            Event::builder("order-paid", "c2").build(),
        ))
        .await
        .unwrap();
        assert_eq!(missing.event().field("customer"), Some(&Value::Null));
        lookup.get(&RowKey::new("c1", "customer")).await.unwrap();
        assert_eq!(
            store.1.load(std::sync::atomic::Ordering::SeqCst),
            3,
            "read again later"
        );
        assert_eq!(lookup.query("c1", "").await.unwrap().len(), 1);
    }

    /// A lookup keeps the class of what its store failed with, and refuses to hand out part
    /// of a partition.
    #[tokio::test]
    async fn lookups_keep_the_stores_error_class_and_never_cut_a_partition_short() {
        #[derive(Debug)]
        struct Failing(crate::error::ErrorClass);
        impl RowStore for Failing {
            fn name(&self) -> &str {
                "failing"
            }
            fn update<'a>(&'a self, _: &'a [Update]) -> HubFuture<'a, Vec<Outcome>> {
                Box::pin(async { Ok(Vec::new()) })
            }
            fn get<'a>(&'a self, _: &'a RowKey) -> HubFuture<'a, Option<Row>> {
                let class = self.0;
                Box::pin(async move {
                    Err(Error::fatal_msg("Broken", "the store failed")
                        .with_class(class)
                        .into())
                })
            }
            fn query<'a>(&'a self, _: &'a RowQuery) -> HubFuture<'a, Vec<Row>> {
                Box::pin(async { Err("no connection".into()) })
            }
        }
        use crate::error::ErrorClass;
        for class in [ErrorClass::Fatal, ErrorClass::Poison, ErrorClass::Outage] {
            let lookup = Lookup::new(Arc::new(Failing(class)));
            let err = lookup.get(&key()).await.unwrap_err();
            assert_eq!(err.class(), class, "{err}");
        }
        let lookup = Lookup::new(Arc::new(Failing(ErrorClass::Fatal)));
        let err = lookup.query("o1", "").await.unwrap_err();
        assert_eq!(
            err.class(),
            ErrorClass::Transient,
            "an error of no class: {err}"
        );

        let store = Arc::new(MemoryRows::new("t"));
        let rows: Vec<Update> = (0..=LOOKUP_QUERY_LIMIT)
            .map(|i| Update::new(RowKey::new("big", format!("line-{i:05}")), v(1, "a")).set("n", i))
            .collect();
        store.update(&rows).await.unwrap();
        let lookup = Lookup::new(store.clone());
        let err = lookup.query("big", "").await.unwrap_err();
        assert_eq!(
            (err.class(), err.name()),
            (ErrorClass::Poison, "LookupTooLarge"),
            "{err}"
        );
        let under = lookup.query("big", "line-000").await.unwrap();
        assert_eq!(under.len(), 100, "a prefix under the limit reads whole");
    }

    #[test]
    fn an_update_names_each_field_once_whatever_it_does_to_it() {
        let twice = Update::new(key(), v(1, "a"))
            .set("tags", json!(["a"]))
            .delete("tags", json!(["b"]));
        let err = twice.check().unwrap_err();
        assert!(err.to_string().contains("tags is written twice"), "{err}");
        // Many fields are checked through a set, in linear time.
        let mut many = Update::new(key(), v(1, "a"));
        for i in 0..100_000 {
            many = many.set(format!("f{i}"), i);
        }
        let started = std::time::Instant::now();
        many.check().unwrap();
        let err = many.clone().add("f99999", 1).check().unwrap_err();
        assert!(err.to_string().contains("f99999 is written twice"), "{err}");
        // A set's elements added and deleted by one update: allowed.
        Update::new(key(), v(1, "a"))
            .add("tags", json!(["a"]))
            .delete("tags", json!(["b"]))
            .check()
            .unwrap();
        // Generous: the quadratic check took minutes here.
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
    }

    #[test]
    fn a_count_past_what_a_double_holds_stays_a_number() {
        let add = |id: &str| Update::new(key(), v(1, id)).add("n", 1e308);
        let row = run(&[add("a"), add("b"), add("c")]).unwrap();
        assert_eq!(row.fields["n"], json!(f64::MAX), "{:?}", row.fields);
    }

    #[test]
    fn inbox_ids_of_two_rows_differ_whatever_their_keys_hold() {
        let id = |pk: &str, sk: &str| Update::new(RowKey::new(pk, sk), v(1, "e1")).inbox_id();
        assert_ne!(id("a\u{1f}b", "c"), id("a", "b\u{1f}c"));
        assert_eq!(
            id("o1", "order"),
            "e1\u{1f}o1\u{1f}order",
            "as stored before"
        );
    }

    #[test]
    fn change_ids_are_stable_and_distinct() {
        let a = change_id("s", &key(), "e1");
        assert_eq!(a, change_id("s", &key(), "e1"));
        assert_ne!(a, change_id("s", &RowKey::new("o1", "orderx"), "e1"));
        assert_eq!(a.len(), 36);
    }

    /// Updates of every kind over three rows, within the rules of the module docs: row `r0`
    /// per field (sets, removes, set elements, deletions), row `r1` per row (whole-row puts and
    /// deletions), row `r2` per field with counters beside values.
    fn updates() -> impl Strategy<Value = Vec<Update>> {
        let one = (0..3usize, 0..4i64, 0..3usize, 0..3i64, 0..5u8);
        prop::collection::vec(one, 1..14).prop_map(|ops| {
            ops.into_iter()
                .enumerate()
                .map(|(i, (row, t, field, n, op))| {
                    let key = RowKey::new("p", format!("r{row}"));
                    let version = v(t, &format!("e{i}"));
                    let u = Update::new(key.clone(), version.clone());
                    let f = format!("f{field}");
                    match (row, op) {
                        (0, 0) => u.set(f, n).discriminator(format!("d{n}")),
                        (0, 1) => u.remove(f).expiring_at(4_000_000_000_000 + n * 1000),
                        (0, 2) => u.add("tags", json!([n])),
                        (0, 3) => u.delete("tags", json!([n])),
                        (0, _) => u.delete_row(),
                        (1, 4) => u.delete_row().latest(Latest::Row),
                        (1, _) => {
                            let mut fields = Map::new();
                            fields.insert(f, n.into());
                            Update::put(key, version, fields)
                        }
                        (_, 0 | 1) => u.add("count", n),
                        _ => u.set(f, n),
                    }
                })
                .collect()
        })
    }

    fn apply_all(updates: &[Update]) -> Vec<(RowKey, Value, Option<Value>)> {
        let store = MemoryRows::new("t");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(store.update(updates)).unwrap();
        let stored = store.stored();
        for row in &stored {
            // What a store writes of the versions gives them all back.
            let mut read = row.clone();
            read.meta = row.stored_meta();
            read.restore_meta();
            assert_eq!(read.meta, row.meta);
        }
        stored
            .into_iter()
            .map(|r| (r.key.clone(), fields(&r), r.image()))
            .collect()
    }

    proptest! {
        #[test]
        fn any_order_and_repetition_give_the_same_rows(
            (updates, order, dups) in updates().prop_flat_map(|us| {
                let n = us.len();
                (Just(us), Just((0..n).collect::<Vec<_>>()).prop_shuffle(), prop::collection::vec(0..n, 0..5))
            })
        ) {
            let sorted = {
                let mut s = updates.clone();
                s.sort_by(|a, b| a.version.cmp(&b.version));
                s
            };
            let mut shuffled: Vec<Update> = order.iter().map(|&i| updates[i].clone()).collect();
            for d in dups {
                shuffled.push(updates[d].clone());
            }
            prop_assert_eq!(apply_all(&shuffled), apply_all(&sorted));
        }
    }
}
