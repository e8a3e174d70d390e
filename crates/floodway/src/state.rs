//! The contract of keyed state: rows by key, written latest-wins with an inbox, read by key or
//! by prefix, and expiring. Views are keyed state, as is the state later features keep
//! (correlation, timers). The embedded hub's SQLite views, DynamoDB and the in-memory store
//! implement it; `floodway::testing::conformance` holds the scenarios every store passes.
//!
//! A write carries the [`Version`] of the event that makes it. It applies only when newer
//! than the row's version (ties broken by event id), so events in any order give the same
//! rows; and an event applied once is not applied again (an inbox written in the same
//! transaction, or the row's own version where that suffices), so a redelivery changes
//! nothing. A row may expire: from then on it is not read, and [`KeyedState::expire`] (or the
//! store's own time to live) removes it.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::error::Error;
use crate::event::{now_millis, Event};
use crate::hub::HubFuture;
use crate::idempotence::Version;
use crate::uow::Batch;

/// One write of keyed state.
#[derive(Debug, Clone, PartialEq)]
pub struct StateWrite {
    /// The row's key.
    pub key: String,
    /// The version of the event that writes it.
    pub version: Version,
    /// The row's new value.
    pub value: Value,
    /// When the row expires (ms since the epoch), if ever.
    pub expires_at: Option<i64>,
}

impl StateWrite {
    /// A write of `value` at `key` by the event of `version`, never expiring.
    pub fn new(key: impl Into<String>, version: Version, value: Value) -> Self {
        StateWrite {
            key: key.into(),
            version,
            value,
            expires_at: None,
        }
    }

    /// The row expires at `at` (ms since the epoch).
    #[must_use]
    pub fn expiring_at(mut self, at: i64) -> Self {
        self.expires_at = Some(at);
        self
    }
}

/// A stored row.
#[derive(Debug, Clone, PartialEq)]
pub struct StateRow {
    /// The key.
    pub key: String,
    /// The version of the event that wrote it.
    pub version: Version,
    /// The value.
    pub value: Value,
    /// When it expires (ms since the epoch), if ever.
    pub expires_at: Option<i64>,
}

impl From<&StateWrite> for StateRow {
    /// The row a write leaves.
    fn from(w: &StateWrite) -> Self {
        StateRow {
            key: w.key.clone(),
            version: w.version.clone(),
            value: w.value.clone(),
            expires_at: w.expires_at,
        }
    }
}

impl StateRow {
    /// Whether the row has expired at `now` (ms since the epoch).
    pub fn expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// What a batch of writes did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Rows inserted or updated.
    pub written: usize,
    /// Writes older than the row they met, or than a newer write of their key in the same
    /// batch (a store may apply only the newest write of each key, [`newest_per_key`], as the
    /// embedded views and DynamoDB do): nothing changed.
    pub stale: usize,
    /// Events applied before (found in the inbox, meeting the row's version of their own
    /// event, or twice in one batch): nothing changed. A store that cannot tell a repeat from
    /// an older event (DynamoDB's conditional write) counts a repeat across batches as stale.
    pub duplicates: usize,
}

impl std::ops::Add for Applied {
    type Output = Applied;

    fn add(self, other: Applied) -> Applied {
        Applied {
            written: self.written + other.written,
            stale: self.stale + other.stale,
            duplicates: self.duplicates + other.duplicates,
        }
    }
}

/// The newest of each key's writes in a batch, in key order, and what the others count as: a
/// write that a newer one of its key in the batch supersedes is stale, as it would be once
/// that one is written; one of the same version (the same event again) is a duplicate.
///
/// Latest-wins makes the rows the same as writing every write in turn, so a store may write
/// these alone: one write per key instead of one per event (a view of orders meets each order
/// several times in a batch), in key order (neighbouring rows one after another).
pub fn newest_per_key<T>(
    writes: &[T],
    key: impl Fn(&T) -> &str,
    version: impl Fn(&T) -> &Version,
) -> (Vec<&T>, Applied) {
    let mut sorted: Vec<&T> = writes.iter().collect();
    // Stable: of two writes of one version (one event writing a key twice), the first in the
    // batch stays first and is kept, as writing them in turn would keep it.
    sorted.sort_by(|a, b| key(a).cmp(key(b)).then_with(|| version(b).cmp(version(a))));
    let mut superseded = Applied::default();
    let mut newest: Vec<&T> = Vec::with_capacity(sorted.len());
    for w in sorted {
        match newest.last() {
            Some(&n) if key(n) == key(w) && version(n) == version(w) => {
                superseded.duplicates += 1;
            }
            Some(&n) if key(n) == key(w) => superseded.stale += 1,
            _ => newest.push(w),
        }
    }
    (newest, superseded)
}

impl Applied {
    /// Counts one write that met no inbox entry: written, or stale.
    pub fn count(&mut self, written: bool) {
        if written {
            self.written += 1;
        } else {
            self.stale += 1;
        }
    }
}

/// A read of the rows whose keys start with `prefix`, in key order, after `after`, at most
/// `limit`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// Keys start with this.
    pub prefix: String,
    /// Keys come after this one (the last key of the previous page).
    pub after: Option<String>,
    /// Rows at most.
    pub limit: usize,
}

impl Scan {
    /// Up to `limit` rows whose keys start with `prefix`.
    pub fn prefix(prefix: impl Into<String>, limit: usize) -> Self {
        Scan {
            prefix: prefix.into(),
            after: None,
            limit,
        }
    }

    /// The page after `key`.
    #[must_use]
    pub fn after(mut self, key: impl Into<String>) -> Self {
        self.after = Some(key.into());
        self
    }

    /// Whether `key` is in the range (prefix and after; not the limit).
    pub fn admits(&self, key: &str) -> bool {
        key.starts_with(&self.prefix) && self.after.as_deref().is_none_or(|a| key > a)
    }
}

/// Keyed state; see the [module docs](self).
pub trait KeyedState: Send + Sync + Debug + 'static {
    /// The state's name (a view's name).
    fn name(&self) -> &str;

    /// Applies writes, latest-wins, each event at most once; all or nothing where the store
    /// has transactions.
    fn apply<'a>(&'a self, writes: &'a [StateWrite]) -> HubFuture<'a, Applied>;

    /// The row at `key`, unless absent or expired.
    fn get<'a>(&'a self, key: &'a str) -> HubFuture<'a, Option<StateRow>>;

    /// The rows `scan` selects, in key order, without expired ones.
    fn scan<'a>(&'a self, scan: &'a Scan) -> HubFuture<'a, Vec<StateRow>>;

    /// Removes the rows expired at `now` (ms since the epoch); returns how many.
    fn expire(&self, now: i64) -> HubFuture<'_, u64>;
}

/// Keyed state shared by the processors and the command.
pub type SharedState = Arc<dyn KeyedState>;

/// Where keyed state lives: opens it by name.
pub trait StateStore: Send + Sync + Debug + 'static {
    /// The state `name`, created on first use.
    fn open<'a>(&'a self, name: &'a str) -> HubFuture<'a, SharedState>;
}

/// How a [`StateSink`] makes a row of an event: its key, its value, and when it expires.
pub type RowFn = Arc<dyn Fn(&Event) -> Result<StateWrite, Error> + Send + Sync>;

/// A sink writing each event of a batch as a row of keyed state, all of a batch in one
/// [`KeyedState::apply`]; an event whose row cannot be made is poison on its own.
#[derive(Clone)]
pub struct StateSink {
    state: SharedState,
    row: RowFn,
}

impl Debug for StateSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateSink")
            .field("state", &self.state.name())
            .finish_non_exhaustive()
    }
}

impl StateSink {
    /// A sink into `state`, with rows made by `row`.
    pub fn new<F>(state: SharedState, row: F) -> Self
    where
        F: Fn(&Event) -> Result<StateWrite, Error> + Send + Sync + 'static,
    {
        StateSink {
            state,
            row: Arc::new(row),
        }
    }

    async fn write(&self, batch: Batch) -> Result<crate::Delivery, Error> {
        let mut delivery = crate::Delivery::complete();
        let mut writes = Vec::with_capacity(batch.len());
        for (i, event) in batch.events().enumerate() {
            match (self.row)(event) {
                Ok(write) => writes.push(write),
                Err(err) if batch.len() == 1 => return Err(err),
                Err(err) => delivery.fail(i, err),
            }
        }
        self.state
            .apply(&writes)
            .await
            .map_err(|e| crate::error::keeping_class(e, "StateWrite"))?;
        Ok(delivery)
    }
}

crate::impl_sink!(StateSink, write);

/// Keyed state in memory, for tests: the contract's reference.
#[derive(Debug, Default)]
pub struct MemoryState {
    name: String,
    inner: Mutex<MemoryRows>,
}

#[derive(Debug, Default)]
struct MemoryRows {
    rows: BTreeMap<String, StateRow>,
    inbox: HashSet<String>,
}

impl MemoryState {
    /// Empty state named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        MemoryState {
            name: name.into(),
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryRows> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the rows, given the time now.
    fn read<T>(&self, f: impl FnOnce(&BTreeMap<String, StateRow>, i64) -> T) -> T {
        f(&self.lock().rows, now_millis())
    }
}

impl KeyedState for MemoryState {
    fn name(&self) -> &str {
        &self.name
    }

    fn apply<'a>(&'a self, writes: &'a [StateWrite]) -> HubFuture<'a, Applied> {
        Box::pin(async move {
            let mut inner = self.lock();
            let mut applied = Applied::default();
            for w in writes {
                // By event and key: one event may write several keys.
                if !inner
                    .inbox
                    .insert(format!("{}\u{0}{}", w.version.id, w.key))
                {
                    applied.duplicates += 1;
                    continue;
                }
                let newer = inner.rows.get(&w.key).is_none_or(|r| w.version > r.version);
                if newer {
                    inner.rows.insert(w.key.clone(), StateRow::from(w));
                }
                applied.count(newer);
            }
            Ok(applied)
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> HubFuture<'a, Option<StateRow>> {
        let row = self.read(|rows, now| rows.get(key).filter(|r| !r.expired(now)).cloned());
        Box::pin(async move { Ok(row) })
    }

    fn scan<'a>(&'a self, scan: &'a Scan) -> HubFuture<'a, Vec<StateRow>> {
        let rows = self.read(|rows, now| {
            rows.range(scan.prefix.clone()..)
                .map(|(_, r)| r)
                .take_while(|r| r.key.starts_with(&scan.prefix))
                .filter(|r| scan.admits(&r.key) && !r.expired(now))
                .take(scan.limit)
                .cloned()
                .collect()
        });
        Box::pin(async move { Ok(rows) })
    }

    fn expire(&self, now: i64) -> HubFuture<'_, u64> {
        Box::pin(async move {
            let mut inner = self.lock();
            let before = inner.rows.len();
            inner.rows.retain(|_, r| !r.expired(now));
            Ok((before - inner.rows.len()) as u64)
        })
    }
}

/// Keyed state in memory by name, for tests.
#[derive(Debug, Default)]
pub struct MemoryStateStore {
    states: Mutex<BTreeMap<String, SharedState>>,
}

impl StateStore for MemoryStateStore {
    fn open<'a>(&'a self, name: &'a str) -> HubFuture<'a, SharedState> {
        Box::pin(async move {
            let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
            Ok(states
                .entry(name.to_owned())
                .or_insert_with(|| Arc::new(MemoryState::new(name)))
                .clone())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The newest write of each key gives the rows of every write applied in turn, in key
        /// order, and every write is counted once: written there, or superseded here.
        #[test]
        fn the_newest_write_of_each_key_gives_the_rows_of_all_of_them(
            writes in proptest::collection::vec(("[a-c]", 0i64..4, "[a-e]"), 0..30),
        ) {
            // Each write's value is its place in the batch, so that of two writes of one
            // version (an event writing a key twice) the one kept shows.
            let writes: Vec<StateWrite> = writes
                .into_iter()
                .enumerate()
                .map(|(i, (key, timestamp, id))| {
                    StateWrite::new(key, Version { timestamp, id }, Value::from(i))
                })
                .collect();
            type Rows<'w> = BTreeMap<&'w str, (&'w Version, &'w Value)>;
            fn rows<'w>(writes: &[&'w StateWrite]) -> (Rows<'w>, usize) {
                let mut rows = Rows::new();
                let mut written = 0;
                for w in writes {
                    if rows.get(w.key.as_str()).is_none_or(|(v, _)| w.version > **v) {
                        rows.insert(&w.key, (&w.version, &w.value));
                        written += 1;
                    }
                }
                (rows, written)
            }
            let (newest, superseded) = newest_per_key(&writes, |w| &w.key, |w| &w.version);
            let all: Vec<&StateWrite> = writes.iter().collect();
            let (expected, _) = rows(&all);
            let (got, written) = rows(&newest);
            prop_assert_eq!(got, expected);
            prop_assert_eq!(written, newest.len(), "one write per key, each newer than none");
            prop_assert!(newest.windows(2).all(|p| p[0].key < p[1].key), "in key order");
            prop_assert_eq!(newest.len() + superseded.stale + superseded.duplicates, writes.len());
            prop_assert_eq!(superseded.written, 0);
        }
    }
    #[tokio::test]
    async fn one_event_may_write_several_keys() {
        let state = MemoryState::new("s");
        let v = Version {
            timestamp: 1,
            id: "e1".into(),
        };
        let writes = [
            StateWrite::new("a", v.clone(), Value::from(1)),
            StateWrite::new("b", v.clone(), Value::from(2)),
        ];
        let applied = state.apply(&writes).await.unwrap();
        assert_eq!(applied.duplicates, 0);
        assert!(
            state.get("b").await.unwrap().is_some(),
            "not taken for a repeat"
        );
        // The same event again: a repeat, both keys.
        let again = state.apply(&writes).await.unwrap();
        assert_eq!(again.duplicates, 2);
    }
}
