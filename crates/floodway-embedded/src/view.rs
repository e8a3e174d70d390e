//! Latest-wins views: a table per view, each row remembering the version of the event that
//! wrote it, which turns redeliveries away.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use floodway::event::now_millis;
use floodway::idempotence::Version;

use floodway::hub::HubFuture;
use floodway::state::{newest_per_key, Applied, KeyedState, Scan, StateRow, StateWrite};
use floodway::{Batch, Delivery, Error, Event};
use rusqlite::{Connection, OptionalExtension};
use serde_json::Value;

use crate::error::HubError;
use crate::store::{Store, WriteGate};

/// A materialized view in the hub's views file ([`Hub::views_path`](crate::Hub::views_path)):
/// rows by key, each remembering the `(timestamp, id)` of the event that last wrote it. A write
/// applies only if it is newer (ties broken by id), so a redelivered event changes nothing. Any
/// order and any duplicates of a set of events give the same rows.
///
/// The row's version is the view's inbox: it is written in the same statement as the value,
/// and a redelivery always meets a version at least its own (an expiring row is deleted only
/// once its event's expiry has passed, and a redelivery would write it expired). A redelivery
/// that meets its own event's version counts as a duplicate; one that meets a later event's
/// counts as stale. The row tables (`crate::rows`), whose updates add and append, keep an
/// inbox of event ids as well.
#[derive(Clone)]
pub struct ViewStore {
    name: Arc<str>,
    table: Arc<str>,
    pub(crate) conn: Arc<Mutex<Connection>>,
    gate: WriteGate,
    busy_retry: Duration,
    /// The hub file, when the views are in it (a version 2 hub): every write checks that no
    /// other process has moved them out since (`crate::upgrade`).
    in_hub: Option<Arc<std::path::Path>>,
}

impl std::fmt::Debug for ViewStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewStore")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// One write to a view: the contract's [`StateWrite`].
pub type ViewWrite = StateWrite;

/// A stored row: the contract's [`StateRow`].
pub type ViewRow = StateRow;

fn check_name(name: &str) -> Result<(), HubError> {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    let rule = "1-64 lowercase letters, digits or `_`";
    crate::store::check_name("view", name, 64, allowed, rule)
}

impl ViewStore {
    /// The view `name` in the views file, its table made on first use.
    pub(crate) fn open(store: &Store, name: &str) -> Result<ViewStore, HubError> {
        check_name(name)?;
        let mut conn = store.connect_views()?;
        let in_hub: Option<Arc<std::path::Path>> =
            (!store.views_apart()).then(|| store.path.as_path().into());
        let table = format!("view_{name}");
        let options = &store.options;
        let exists: i64 = conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [&table],
            |r| r.get(0),
        )?;
        // `expires` came later: a view made before gets the column on first use.
        let expires: i64 = conn.query_row(
            "SELECT count(*) FROM pragma_table_info(?1) WHERE name = 'expires'",
            [&table],
            |r| r.get(0),
        )?;
        // In the hub file, the table is made (or found) under the write lock, after checking
        // the views are still there: a move that commits between a look and a `CREATE` would
        // leave the view made again where the hub no longer reads it.
        if exists == 0 || expires == 0 || in_hub.is_some() {
            crate::busy::retry("view", options.busy_retry, || {
                let _turn = store.views_gate().enter();
                let tx =
                    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                if let Some(hub) = &in_hub {
                    still_in_hub(&tx, hub)?;
                }
                tx.execute_batch(&format!(
                    "CREATE TABLE IF NOT EXISTS {table} (key TEXT PRIMARY KEY, \
                     time INTEGER NOT NULL, event TEXT NOT NULL, value TEXT NOT NULL, \
                     expires INTEGER) WITHOUT ROWID;"
                ))?;
                let has: i64 = tx.query_row(
                    "SELECT count(*) FROM pragma_table_info(?1) WHERE name = 'expires'",
                    [&table],
                    |r| r.get(0),
                )?;
                if has == 0 {
                    tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN expires INTEGER"))?;
                }
                tx.commit()?;
                Ok(())
            })?;
        }
        Ok(ViewStore {
            name: name.into(),
            table: table.into(),
            conn: Arc::new(Mutex::new(conn)),
            gate: store.views_gate().clone(),
            busy_retry: options.busy_retry,
            in_hub,
        })
    }
}

/// An error unless the hub file `hub` (opened as one that keeps its views in it) still does:
/// another process may have moved them into their own file since (`floodway hub upgrade`),
/// where writing here would put them where the hub no longer reads them.
fn still_in_hub(conn: &Connection, hub: &std::path::Path) -> Result<(), HubError> {
    let version = crate::schema::meta(conn, "version")?;
    if version.as_deref() == Some(&crate::schema::VIEWS_IN_HUB.to_string()) {
        return Ok(());
    }
    Err(HubError::Changed(format!(
        "the views of the hub {} were moved into {} after this process opened it: open the \
         hub again",
        hub.display(),
        crate::schema::views_path(hub).display()
    )))
}

impl ViewStore {
    /// The view's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>, HubError> {
        self.conn.lock().map_err(|_| HubError::Closed)
    }

    /// Applies writes in one transaction, by the latest-wins rule.
    ///
    /// # Errors
    /// A storage failure (then nothing was written).
    pub fn apply(&self, writes: &[ViewWrite]) -> Result<Applied, HubError> {
        let values: Vec<String> = writes.iter().map(|w| w.value.to_string()).collect();
        let rows: Vec<JsonWrite<'_>> = writes
            .iter()
            .zip(&values)
            .map(|(w, value)| JsonWrite {
                key: &w.key,
                version: &w.version,
                value,
                expires_at: w.expires_at,
            })
            .collect();
        self.apply_rows(&rows)
    }

    /// Applies writes whose values are JSON text already, as [`ViewStore::apply`] does.
    ///
    /// # Errors
    /// A storage failure (then nothing was written).
    pub fn apply_json<S: AsRef<str>>(
        &self,
        writes: &[(&str, &Version, S)],
    ) -> Result<Applied, HubError> {
        let rows: Vec<JsonWrite<'_>> = writes
            .iter()
            .map(|(key, version, value)| JsonWrite {
                key,
                version,
                value: value.as_ref(),
                expires_at: None,
            })
            .collect();
        self.apply_rows(&rows)
    }

    /// Applies the newest write of each key, in key order ([`newest_per_key`]): one upsert per
    /// key, consecutive upserts on the same or neighbouring pages of the view's b-tree, and the
    /// sorting done before the transaction, so the write lock is held for the upserts alone.
    fn apply_rows(&self, writes: &[JsonWrite<'_>]) -> Result<Applied, HubError> {
        let (newest, superseded) = newest_per_key(writes, |w| w.key, |w| w.version);
        let applied = crate::busy::retry("view", self.busy_retry, || self.try_apply(&newest))?;
        Ok(applied + superseded)
    }

    fn try_apply(&self, writes: &[&JsonWrite<'_>]) -> Result<Applied, HubError> {
        let mut conn = self.conn()?;
        let _turn = self.gate.enter();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if let Some(hub) = &self.in_hub {
            still_in_hub(&tx, hub)?;
        }
        let mut applied = Applied::default();
        {
            let table = &self.table;
            let mut upsert = tx.prepare_cached(&format!(
                "INSERT INTO {table} (key, time, event, value, expires) \
                 VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (key) DO UPDATE SET time = excluded.time, event = excluded.event, \
                 value = excluded.value, expires = excluded.expires \
                 WHERE (excluded.time, excluded.event) > ({table}.time, {table}.event)"
            ))?;
            let mut version =
                tx.prepare_cached(&format!("SELECT time, event FROM {table} WHERE key = ?1"))?;
            for w in writes {
                let (timestamp, id) = (w.version.timestamp, &w.version.id);
                if upsert.execute((w.key, timestamp, id, w.value, w.expires_at))? != 0 {
                    applied.written += 1;
                    continue;
                }
                // Not newer than the row: the row's own event again is a duplicate.
                let again = version
                    .query_row([w.key], |r| {
                        Ok(r.get::<_, i64>(0)? == timestamp && r.get_ref(1)?.as_str()? == id)
                    })
                    .optional()?
                    .unwrap_or(false);
                if again {
                    applied.duplicates += 1;
                } else {
                    applied.stale += 1;
                }
            }
        }
        tx.commit()?;
        Ok(applied)
    }

    /// One row.
    ///
    /// # Errors
    /// A storage failure, or a stored value that is not JSON.
    pub fn get(&self, key: &str) -> Result<Option<ViewRow>, HubError> {
        let conn = self.conn()?;
        let row = conn
            .query_row(
                &format!(
                    "SELECT key, time, event, value, expires FROM {} WHERE key = ?1 \
                     AND (expires IS NULL OR expires > ?2)",
                    self.table
                ),
                (key, now_millis()),
                read_row,
            )
            .optional()?;
        row.map(to_row).transpose()
    }

    /// Every row, by key.
    ///
    /// # Errors
    /// A storage failure, or a stored value that is not JSON.
    pub fn rows(&self) -> Result<Vec<ViewRow>, HubError> {
        self.scan_rows(&Scan::prefix("", usize::MAX))
    }

    /// The rows `scan` selects, in key order, without expired ones.
    ///
    /// # Errors
    /// A storage failure, or a stored value that is not JSON.
    pub fn scan_rows(&self, scan: &Scan) -> Result<Vec<ViewRow>, HubError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT key, time, event, value, expires FROM {} \
             WHERE key >= ?1 AND substr(key, 1, length(?1)) = ?1 AND (?2 IS NULL OR key > ?2) \
             AND (expires IS NULL OR expires > ?3) ORDER BY key LIMIT ?4",
            self.table
        ))?;
        let limit = i64::try_from(scan.limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map((&scan.prefix, &scan.after, now_millis(), limit), read_row)?;
        rows.map(|r| to_row(r?)).collect()
    }

    /// Deletes the rows expired at `now` (ms since the epoch); returns how many.
    ///
    /// # Errors
    /// A storage failure.
    pub fn expire(&self, now: i64) -> Result<u64, HubError> {
        crate::busy::retry("view", self.busy_retry, || {
            let conn = self.conn()?;
            let _turn = self.gate.enter();
            let deleted = conn.execute(
                &format!("DELETE FROM {} WHERE expires <= ?1", self.table),
                [now],
            )?;
            Ok(deleted as u64)
        })
    }

    /// Number of rows.
    ///
    /// # Errors
    /// A storage failure.
    pub fn len(&self) -> Result<u64, HubError> {
        let conn = self.conn()?;
        let n: i64 = conn.query_row(&format!("SELECT count(*) FROM {}", self.table), [], |r| {
            r.get(0)
        })?;
        Ok(n as u64)
    }

    /// Whether the view has no rows.
    ///
    /// # Errors
    /// A storage failure.
    pub fn is_empty(&self) -> Result<bool, HubError> {
        Ok(self.len()? == 0)
    }

    /// A sink that writes each event of a batch into this view, keyed and valued by the given
    /// functions; a batch is one transaction.
    ///
    /// A transaction writes every page its rows touch, whole: when the keys are spread over a
    /// large view, each batch touches many of its pages, and fewer, larger batches write them
    /// fewer times (the hub benchmark's materializing processor batches 50,000 events or
    /// 250 ms; BENCHMARKS.md measures four transactions per run against five).
    pub fn sink<K, V>(&self, key: K, value: V) -> ViewSink
    where
        K: Fn(&Event) -> Result<String, Error> + Send + Sync + 'static,
        V: Fn(&Event) -> Result<Value, Error> + Send + Sync + 'static,
    {
        self.sink_json(key, move |e| value(e).map(|v| v.to_string()))
    }

    /// As [`ViewStore::sink`], with values given as JSON text (e.g. from [`Event::json_at`]),
    /// which spares building and printing a JSON tree per event.
    pub fn sink_json<K, V>(&self, key: K, value: V) -> ViewSink
    where
        K: Fn(&Event) -> Result<String, Error> + Send + Sync + 'static,
        V: Fn(&Event) -> Result<String, Error> + Send + Sync + 'static,
    {
        ViewSink {
            store: self.clone(),
            key: Arc::new(key),
            value: Arc::new(value),
        }
    }
}

/// A write whose value is JSON text.
struct JsonWrite<'a> {
    key: &'a str,
    version: &'a Version,
    value: &'a str,
    expires_at: Option<i64>,
}

type RawRow = (String, i64, String, String, Option<i64>);

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn to_row((key, time, event, value, expires_at): RawRow) -> Result<ViewRow, HubError> {
    Ok(ViewRow {
        key,
        version: Version {
            timestamp: time,
            id: event,
        },
        value: serde_json::from_str(&value).map_err(|e| HubError::Corrupt {
            what: "view value",
            detail: e.to_string(),
        })?,
        expires_at,
    })
}

/// Runs a store call on a blocking thread (SQLite waits on the disk and the write lock), so
/// the runtime's threads go on with other work.
async fn blocking<T, F>(store: &ViewStore, f: F) -> Result<T, floodway::BoxError>
where
    T: Send + 'static,
    F: FnOnce(ViewStore) -> Result<T, HubError> + Send + 'static,
{
    let store = store.clone();
    match tokio::task::spawn_blocking(move || f(store)).await {
        Ok(result) => Ok(result?),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(Box::new(e)),
    }
}

impl KeyedState for ViewStore {
    fn name(&self) -> &str {
        &self.name
    }

    fn apply<'a>(&'a self, writes: &'a [StateWrite]) -> HubFuture<'a, Applied> {
        let writes = writes.to_vec();
        Box::pin(blocking(self, move |s| s.apply(&writes)))
    }

    fn get<'a>(&'a self, key: &'a str) -> HubFuture<'a, Option<StateRow>> {
        let key = key.to_owned();
        Box::pin(blocking(self, move |s| s.get(&key)))
    }

    fn scan<'a>(&'a self, scan: &'a Scan) -> HubFuture<'a, Vec<StateRow>> {
        let scan = scan.clone();
        Box::pin(blocking(self, move |s| s.scan_rows(&scan)))
    }

    fn expire(&self, now: i64) -> HubFuture<'_, u64> {
        Box::pin(blocking(self, move |s| ViewStore::expire(&s, now)))
    }
}

type KeyFn = dyn Fn(&Event) -> Result<String, Error> + Send + Sync;
type ValueFn = dyn Fn(&Event) -> Result<String, Error> + Send + Sync;

/// Writes batches of events into a [`ViewStore`]; made by [`ViewStore::sink`].
#[derive(Clone)]
pub struct ViewSink {
    store: ViewStore,
    key: Arc<KeyFn>,
    value: Arc<ValueFn>,
}

impl std::fmt::Debug for ViewSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewSink")
            .field("view", &self.store.name)
            .finish_non_exhaustive()
    }
}

impl ViewSink {
    /// Applies a batch in one transaction; an event whose key or value cannot be made is
    /// poison on its own, and the others are applied.
    async fn write(&self, batch: Batch) -> Result<Delivery, Error> {
        let (store, key, value) = (self.store.clone(), self.key.clone(), self.value.clone());
        // On a blocking thread, the rows made there too, so the processor reads and batches
        // the next events while this batch is made into rows and written.
        let write = move || {
            let mut delivery = Delivery::complete();
            let mut writes: Vec<(String, Version, String)> = Vec::with_capacity(batch.len());
            for (i, e) in batch.events().enumerate() {
                match key(e).and_then(|k| Ok((k, Version::of(e), value(e)?))) {
                    Ok(write) => writes.push(write),
                    Err(err) if batch.len() == 1 => return Err(err),
                    Err(err) => delivery.fail(i, err),
                }
            }
            let rows: Vec<JsonWrite<'_>> = writes
                .iter()
                .map(|(key, version, value)| JsonWrite {
                    key,
                    version,
                    value,
                    expires_at: None,
                })
                .collect();
            store.apply_rows(&rows).map_err(Error::from)?;
            Ok(delivery)
        };
        match tokio::runtime::Handle::try_current() {
            Ok(_) => match tokio::task::spawn_blocking(write).await {
                Ok(written) => written,
                // A panic goes on as the sink's own, as if the write had run here.
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => Err(Error::transient(e)),
            },
            Err(_) => write(),
        }
    }
}

floodway::impl_sink!(ViewSink, write);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Hub, HubOptions};

    #[test]
    fn a_view_made_before_expiry_gets_the_column_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let hub = Hub::open(dir.path().join("hub.db"), HubOptions::default()).unwrap();
        hub.store()
            .connect_views()
            .unwrap()
            .execute_batch(
                "CREATE TABLE view_old (key TEXT PRIMARY KEY, time INTEGER NOT NULL, \
                 event TEXT NOT NULL, value TEXT NOT NULL) WITHOUT ROWID; \
                 INSERT INTO view_old VALUES ('k', 5, 'e1', '{\"n\":1}');",
            )
            .unwrap();
        let view = hub.view("old").unwrap();
        let row = view.get("k").unwrap().unwrap();
        assert_eq!((row.value["n"].as_i64(), row.expires_at), (Some(1), None));
        let write = ViewWrite::new(
            "k",
            Version {
                timestamp: 6,
                id: "e2".into(),
            },
            2.into(),
        )
        .expiring_at(1);
        assert_eq!(view.apply(&[write]).unwrap().written, 1);
        assert!(view.get("k").unwrap().is_none(), "expired");
    }

    #[test]
    fn a_repeat_is_a_duplicate_against_its_own_version_and_stale_against_a_later_one() {
        let dir = tempfile::tempdir().unwrap();
        let hub = Hub::open(dir.path().join("hub.db"), HubOptions::default()).unwrap();
        let view = hub.view("orders").unwrap();
        let write = |timestamp: i64, id: &str| {
            let version = Version {
                timestamp,
                id: id.into(),
            };
            ViewWrite::new("k", version, timestamp.into())
        };
        let applied = view.apply(&[write(1, "a"), write(1, "a")]).unwrap();
        let expected = Applied {
            written: 1,
            duplicates: 1,
            stale: 0,
        };
        assert_eq!(applied, expected);
        let applied = view
            .apply(&[write(2, "b"), write(1, "a"), write(2, "b"), write(2, "a")])
            .unwrap();
        let expected = Applied {
            written: 1,
            duplicates: 1,
            stale: 2,
        };
        assert_eq!(applied, expected);
        assert_eq!(view.get("k").unwrap().unwrap().version.id, "b");
        let inbox: i64 = hub
            .connect()
            .unwrap()
            .query_row("SELECT count(*) FROM inbox", [], |r| r.get(0))
            .unwrap();
        assert_eq!(inbox, 0, "the rows' versions are the view's inbox");
    }
}
