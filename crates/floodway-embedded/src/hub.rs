//! The hub: a partitioned, durable event log in one SQLite file.

use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use floodway::event::{now_millis, partition_for};
use floodway::Event;
use rusqlite::{Connection, OptionalExtension};
use tokio::sync::{oneshot, Notify};

use crate::error::{HubError, OpenError};
use crate::faults::FaultStore;
use crate::log::{
    delete_step, prune_dedupe, retention_cut, Row, WriteRequest, Writer, RETENTION_SEGMENTS,
};
pub use crate::log::{PublishReceipt, RetentionReport};
pub use crate::options::{Durability, HubOptions, Retention, DEFAULT_PARTITIONS};
use crate::schema;
use crate::segment::Segment;
use crate::store::Store;
use crate::view::ViewStore;

pub(crate) struct HubInner {
    pub(crate) store: Store,
    pub(crate) partitions: u32,
    writer: Mutex<Option<mpsc::Sender<WriteRequest>>>,
    /// Woken after every commit of this process, so local subscribers read at once.
    pub(crate) published: Arc<Notify>,
}

impl Drop for HubInner {
    fn drop(&mut self) {
        // Dropping the sender ends the writer thread after it drains.
        self.writer.lock().map(|mut w| w.take()).ok();
    }
}

/// A handle to a hub file; cheap to clone, shareable between tasks.
///
/// Several processes may open the same file: a publisher beside a running processor, say.
/// Writers take turns (SQLite's write lock), and offsets are assigned inside each commit, so
/// they stay unique and increasing per partition whoever writes.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use floodway::Event;
/// use floodway_embedded::{Hub, HubOptions};
///
/// let dir = tempfile::tempdir().unwrap();
/// let hub = Hub::open(dir.path().join("hub.db"), HubOptions::default()).unwrap();
/// let event = Event::builder("order-submitted", "o-1").build();
/// let receipt = hub.publish(&[event]).await.unwrap();
/// assert_eq!(receipt.stored(), 1);
/// # });
/// ```
#[derive(Clone)]
pub struct Hub {
    pub(crate) inner: Arc<HubInner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("path", &self.inner.store.path)
            .field("partitions", &self.inner.partitions)
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// Opens the hub at `path`, creating it if `options.create` allows.
    ///
    /// # Errors
    /// An [`OpenError`] that says what is wrong with the file: missing, not a database, another
    /// application's database, a newer format, another partition count.
    pub fn open(path: impl AsRef<Path>, options: HubOptions) -> Result<Hub, OpenError> {
        let path = path.as_ref().to_owned();
        if options.max_commit == 0 {
            return Err(OpenError::Setting("max_commit must be at least 1".into()));
        }
        if options.lease < Duration::from_millis(30) {
            return Err(OpenError::Setting(format!(
                "lease must be at least 30 ms, not {:?}",
                options.lease
            )));
        }
        let schema::Opened {
            conn,
            partitions,
            checkpoints,
            views,
        } = schema::open(
            &path,
            options.create,
            options.partitions,
            options.durability,
            options.busy_timeout,
            options.page_cache_kib,
            options.dedupe_window,
        )?;
        let (tx, rx) = mpsc::channel();
        let inner = Arc::new(HubInner {
            store: Store::new(path, options, checkpoints, views),
            partitions,
            writer: Mutex::new(Some(tx)),
            published: Arc::new(Notify::new()),
        });
        let writer = Writer {
            conn,
            gate: inner.store.gate.clone(),
            requests: rx,
            published: inner.published.clone(),
            max_commit: inner.store.options.max_commit,
            dedupe_window_ms: crate::log::millis(inner.store.options.dedupe_window),
            busy_retry: inner.store.options.busy_retry,
            next_prune: 0,
        };
        std::thread::Builder::new()
            .name("floodway-hub-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| OpenError::Setting(format!("cannot start the writer thread: {e}")))?;
        Ok(Hub { inner })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.inner.store.path
    }

    /// The number of partitions (fixed when the hub was created).
    pub fn partitions(&self) -> u32 {
        self.inner.partitions
    }

    /// The partition of a partition key.
    pub fn partition_of(&self, partition_key: &str) -> u32 {
        partition_for(partition_key, self.inner.partitions)
    }

    /// A new connection to the file for everything but publishing (see [`Store::connect`]).
    pub(crate) fn connect(&self) -> Result<Connection, HubError> {
        self.inner.store.connect()
    }

    /// The file as the stores beside the log use it.
    pub(crate) fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Publishes events; when it returns they are committed (durably, per the hub's
    /// [`Durability`]). Events are partitioned by `partitionKey`.
    ///
    /// # Errors
    /// When the hub's storage fails.
    pub async fn publish(&self, events: &[Event]) -> Result<PublishReceipt, HubError> {
        self.write(events, false).await
    }

    /// Publishes events, skipping any whose id was published (this way) within the dedupe
    /// window: the event id is the idempotency key.
    ///
    /// # Errors
    /// When the hub's storage fails.
    pub async fn publish_idempotent(&self, events: &[Event]) -> Result<PublishReceipt, HubError> {
        self.write(events, true).await
    }

    /// Publishes already-encoded records (JSON lines checked by the caller).
    pub(crate) async fn write(
        &self,
        events: &[Event],
        dedupe: bool,
    ) -> Result<PublishReceipt, HubError> {
        if events.is_empty() {
            return Ok(PublishReceipt::default());
        }
        // An event without an id or a type is refused, not stored: no processor could read
        // it, and with the empty id as the idempotency key every such event after the first
        // would be taken for a repeat of it and dropped without a word.
        if let Some(e) = events
            .iter()
            .find(|e| e.id().is_empty() || e.event_type().is_empty())
        {
            return Err(HubError::Invalid(format!(
                "an event needs an id and a type (id `{}`, type `{}`, partition key `{}`)",
                e.id(),
                e.event_type(),
                e.partition_key()
            )));
        }
        let rows = events
            .iter()
            .map(|e| Row {
                partition: self.partition_of(e.partition_key()),
                // The id is needed only to remember it as an idempotency key.
                id: if dedupe {
                    e.id().to_owned()
                } else {
                    String::new()
                },
                data: e.to_bytes(),
            })
            .collect();
        let (reply, answer) = oneshot::channel();
        let sender = self
            .inner
            .writer
            .lock()
            .map_err(|_| HubError::Closed)?
            .clone()
            .ok_or(HubError::Closed)?;
        sender
            .send(WriteRequest {
                rows,
                dedupe,
                reply,
            })
            .map_err(|_| HubError::Closed)?;
        answer.await.map_err(|_| HubError::Closed)?
    }

    /// Partitions, sizes and subscription lag.
    ///
    /// # Errors
    /// When the hub's storage fails.
    pub fn stats(&self) -> Result<HubStats, HubError> {
        let conn = self.connect()?;
        // Point lookups per partition: stats stay cheap however large the log is.
        let mut partitions = Vec::new();
        for p in 0..self.inner.partitions {
            let (first, last, bytes): (Option<i64>, i64, i64) = conn.query_row(
                "SELECT (SELECT min(offset) FROM events WHERE partition = ?1), last_offset, bytes \
                 FROM partitions WHERE partition = ?1",
                [p],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            let first = first.unwrap_or(last + 1);
            if last == 0 {
                continue;
            }
            partitions.push(PartitionStats {
                partition: p,
                events: (last + 1 - first).max(0) as u64,
                first_offset: first as u64,
                last_offset: last as u64,
                bytes: bytes as u64,
            });
        }
        let mut subscriptions: Vec<SubscriptionStats> = Vec::new();
        {
            let mut stmt = conn.prepare(
                "SELECT name, partition, offset FROM subscriptions ORDER BY name, partition",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, u32>(1)?,
                    r.get::<_, i64>(2)? as u64,
                ))
            })?;
            for row in rows {
                let (name, partition, offset) = row?;
                if subscriptions.last().is_none_or(|s| s.name != name) {
                    subscriptions.push(SubscriptionStats {
                        name: name.clone(),
                        lag: 0,
                        partitions: Vec::new(),
                        holder: None,
                    });
                }
                let s = subscriptions.last_mut().expect("pushed above");
                s.partitions.push((partition, offset));
            }
        }
        // Lag over every partition, those without a checkpoint included; who owns it.
        let now = now_millis();
        for s in &mut subscriptions {
            s.lag = self.lag_on(&conn, &s.name)?;
            s.holder = crate::lease::holder(&conn, &s.name)?
                .filter(|(h, process)| crate::lease::in_force(h, process, now))
                .map(|(h, _)| h);
        }
        let size = |path: &Path| std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let store = &self.inner.store;
        let mut file_bytes = size(&store.path);
        if store.views_path() != store.path {
            file_bytes += size(store.views_path());
        }
        Ok(HubStats {
            partitions,
            subscriptions,
            file_bytes,
        })
    }

    /// Deletes events older than `max_age` and, per partition, the oldest beyond `max_bytes` of
    /// event data, whole segments at a time, and unless told otherwise
    /// ([`Retention::keep_unread`]) none that a subscription has not checkpointed past; forgets
    /// idempotency keys older than the dedupe window.
    ///
    /// It deletes in short transactions (a few hundred segments or 32 MiB at most each), so
    /// the processors writing beside it, in this process or another, wait for it briefly.
    ///
    /// # Errors
    /// When the hub's storage fails.
    pub fn apply_retention(&self, retention: &Retention) -> Result<RetentionReport, HubError> {
        Ok(self.retain(retention, RETENTION_SEGMENTS)?.0)
    }

    /// [`Hub::apply_retention`], `segments` at most per transaction; also returns the number
    /// of deleting transactions.
    pub(crate) fn retain(
        &self,
        retention: &Retention,
        segments: usize,
    ) -> Result<(RetentionReport, usize), HubError> {
        let mut conn = self.connect()?;
        let limit = self.inner.store.options.busy_retry;
        let mut report = RetentionReport::default();
        let mut behind = std::collections::BTreeSet::new();
        let mut transactions = 0;
        for p in 0..self.inner.partitions {
            // What the limits ask for, read outside the deleting transactions.
            let Some(wanted) = retention_cut(&conn, p, retention)? else {
                continue;
            };
            loop {
                let step = crate::busy::retry("retention", limit, || {
                    let _turn = self.inner.store.gate.enter();
                    let tx =
                        conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                    let step = delete_step(&tx, p, wanted, retention.keep_unread, segments)?;
                    tx.commit()?;
                    Ok(step)
                })?;
                transactions += 1;
                report.deleted += step.deleted as usize;
                if !step.more {
                    if step.through < wanted {
                        // Held back for subscriptions that have not read what the limits
                        // would delete.
                        let first: Option<i64> = conn.query_row(
                            "SELECT min(offset) FROM events WHERE partition = ?1",
                            [p],
                            |r| r.get(0),
                        )?;
                        let first = first.unwrap_or(wanted + 1);
                        report.kept_unread += (wanted - step.through.max(first - 1)).max(0) as u64;
                        behind.extend(step.behind);
                    }
                    break;
                }
            }
        }
        // Idempotency keys past the window (publishing forgets them too, as it goes).
        let window = crate::log::millis(self.inner.store.options.dedupe_window);
        loop {
            let (forgotten, _) = crate::busy::retry("retention", limit, || {
                let _turn = self.inner.store.gate.enter();
                let tx =
                    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let done = prune_dedupe(&tx, window, 5_000, now_millis())?;
                tx.commit()?;
                Ok(done)
            })?;
            report.forgotten += forgotten;
            if forgotten < 5_000 {
                break;
            }
        }
        report.behind = behind.into_iter().collect();
        if report.deleted > 0 {
            tracing::info!(deleted = report.deleted, "retention deleted events");
        }
        if report.kept_unread > 0 {
            tracing::warn!(
                kept = report.kept_unread,
                subscriptions = %report.behind.join(", "),
                "retention kept events that its limits would delete, because these \
                 subscriptions have not read them: the hub stays over its limits until they do. \
                 A subscription whose processor no longer runs holds them forever: remove it \
                 (`floodway hub unsubscribe`), or set retention_keep_unread = false to delete by \
                 the limits alone"
            );
        }
        Ok((report, transactions))
    }
}

/// One partition of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionStats {
    /// The partition.
    pub partition: u32,
    /// Events held.
    pub events: u64,
    /// The oldest offset held.
    pub first_offset: u64,
    /// The newest offset.
    pub last_offset: u64,
    /// Bytes of event data.
    pub bytes: u64,
}

/// One subscription's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionStats {
    /// The subscription.
    pub name: String,
    /// Events published and not yet done, over all partitions.
    pub lag: u64,
    /// `(partition, checkpoint)` pairs.
    pub partitions: Vec<(u32, u64)>,
    /// The process that owns it now, if one does.
    pub holder: Option<crate::lease::LeaseHolder>,
}

/// What [`Hub::stats`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubStats {
    /// Partitions holding events.
    pub partitions: Vec<PartitionStats>,
    /// Subscriptions with a checkpoint.
    pub subscriptions: Vec<SubscriptionStats>,
    /// Size of the database file and of its views file when it has one
    /// ([`Hub::views_path`]), without their WALs.
    pub file_bytes: u64,
}

impl Hub {
    /// The newest `n` events that `keep` accepts, oldest first, with their publish times.
    ///
    /// # Errors
    /// When the hub's storage fails.
    pub fn newest(
        &self,
        n: usize,
        mut keep: impl FnMut(&[u8]) -> bool,
    ) -> Result<Vec<(i64, Vec<u8>)>, HubError> {
        let conn = self.connect()?;
        let mut found: Vec<(i64, u32, i64, Vec<u8>)> = Vec::new();
        let mut stmt = conn.prepare(
            "SELECT offset, last, published, data FROM events WHERE partition = ?1 AND offset < ?2 \
             ORDER BY offset DESC LIMIT 8",
        )?;
        for p in 0..self.inner.partitions {
            let mut before = i64::MAX;
            let mut kept = 0;
            while kept < n {
                let rows: Vec<(i64, i64, i64, Vec<u8>)> = stmt
                    .query_map((p, before), |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })?
                    .collect::<Result<_, _>>()?;
                if rows.is_empty() {
                    break;
                }
                for (first, last, published, data) in rows {
                    before = first;
                    let events = Segment::new(first as u64, last as u64, data.into()).events()?;
                    for (offset, event) in events.into_iter().rev() {
                        if kept < n && keep(&event) {
                            found.push((published, p, offset as i64, event.to_vec()));
                            kept += 1;
                        }
                    }
                }
            }
        }
        found.sort_by_key(|(published, p, offset, _)| (*published, *p, *offset));
        let skip = found.len().saturating_sub(n);
        Ok(found
            .into_iter()
            .skip(skip)
            .map(|(published, _, _, data)| (published, data))
            .collect())
    }

    /// How many events held were published in `[from, until]` (ms since the epoch).
    ///
    /// # Errors
    /// When the hub's storage fails.
    pub fn count_published(&self, from: i64, until: i64) -> Result<u64, HubError> {
        let conn = self.connect()?;
        let mut n = 0;
        for p in 0..self.inner.partitions {
            let last = crate::log::offset_before(&conn, p, until.saturating_add(1))?;
            let first = crate::log::offset_before(&conn, p, from)?;
            n += last.saturating_sub(first);
        }
        Ok(n)
    }
}

impl Hub {
    /// Events published and not yet done by the subscription `name`, over all partitions (the
    /// last offsets minus its checkpoints; every event when it has none).
    ///
    /// # Errors
    /// When the hub's storage fails.
    pub fn lag(&self, name: &str) -> Result<u64, HubError> {
        self.lag_on(&self.connect()?, name)
    }

    fn lag_on(&self, conn: &Connection, name: &str) -> Result<u64, HubError> {
        let lag: i64 = conn.query_row(
            "SELECT coalesce(sum(p.last_offset - coalesce(s.offset, 0)), 0) FROM partitions p \
             LEFT JOIN subscriptions s ON s.partition = p.partition AND s.name = ?1",
            [name],
            |r| r.get(0),
        )?;
        Ok(lag.max(0) as u64)
    }
}

impl Hub {
    /// Brings the hub at `path`, made by an earlier build, up to this build's format: a hub of
    /// format version 2 keeps its views in the hub file, where a view's transactions and
    /// publishing wait for each other; its views are moved into a file of their own
    /// ([`Hub::views_path`]), as a hub made by this build keeps them. `each` hears of every
    /// view as it is copied (its name and row count). A hub already in this format is left
    /// as it is. A move cut short (a crash, a full disk) leaves a hub that opens with its
    /// views where they were; upgrading again finishes it.
    ///
    /// # Errors
    /// [`OpenError::InUse`] while a process owns one of the hub's subscriptions: every process
    /// using the hub must be stopped first (one that opened it before the move would go on
    /// writing its views into the hub file); [`OpenError::NotFound`], [`OpenError::Version`],
    /// [`OpenError::Foreign`], a views file of another hub in the way, or a storage failure.
    pub fn upgrade(
        path: impl AsRef<Path>,
        options: &HubOptions,
        each: impl FnMut(&str, u64),
    ) -> Result<crate::Upgrade, OpenError> {
        crate::upgrade::upgrade(path.as_ref(), options.busy_timeout, each)
    }

    /// Removes the subscription `name`: its checkpoints (and so what it holds back from
    /// retention, see [`Retention::keep_unread`]) and its lease. Opening it again starts it
    /// anew. Returns whether it existed.
    ///
    /// # Errors
    /// [`HubError::Held`] while a process owns it; a storage failure.
    pub fn unsubscribe(&self, name: &str) -> Result<bool, HubError> {
        let mut conn = self.connect()?;
        crate::busy::retry("unsubscribe", self.inner.store.options.busy_retry, || {
            let _turn = self.inner.store.gate.enter();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let now = now_millis();
            if let Some((h, process)) = crate::lease::holder(&tx, name)? {
                if crate::lease::in_force(&h, &process, now) {
                    return Err(crate::lease::held(name, h, now));
                }
            }
            tx.execute("DELETE FROM leases WHERE name = ?1", [name])?;
            let removed = tx.execute("DELETE FROM subscriptions WHERE name = ?1", [name])?;
            tx.commit()?;
            Ok(removed > 0)
        })
    }
}

impl Hub {
    /// Events published so far, over all partitions (including any that retention deleted).
    ///
    /// # Errors
    /// When the hub's storage fails.
    pub fn published(&self) -> Result<u64, HubError> {
        let conn = self.connect()?;
        let n: i64 = conn.query_row(
            "SELECT coalesce(sum(last_offset), 0) FROM partitions",
            [],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }
}

impl Hub {
    /// The hub's fault store.
    ///
    /// # Errors
    /// When the hub file cannot be opened again.
    pub fn fault_store(&self) -> Result<FaultStore, HubError> {
        FaultStore::open(self.store())
    }

    /// The view `name`, created on first use.
    ///
    /// # Errors
    /// An invalid name, or a storage failure.
    pub fn view(&self, name: &str) -> Result<ViewStore, HubError> {
        ViewStore::open(self.store(), name)
    }

    /// The row table `name` ([`floodway::rows`]), created on first use; its changes go to the
    /// outbox once [`RowTable::with_outbox`](crate::RowTable::with_outbox) says so.
    ///
    /// # Errors
    /// An invalid name, or a storage failure.
    pub fn rows(&self, name: &str) -> Result<crate::RowTable, HubError> {
        crate::rows::RowTable::open(self.store(), name)
    }

    /// The names of the row tables in the file, in order.
    ///
    /// # Errors
    /// A storage failure.
    pub fn row_tables(&self) -> Result<Vec<String>, HubError> {
        self.tables_named(crate::rows::TABLE_PREFIX)
    }

    /// The state of the CEP processor `processor` (its collected events, timers and emitted
    /// ids), made on first use.
    ///
    /// # Errors
    /// A name that makes no table name, or a storage failure.
    pub fn cep(&self, processor: &str) -> Result<crate::CepTable, HubError> {
        crate::cep::CepTable::open(self.store(), &crate::cep::table_name(processor))
    }

    /// Whether the file holds state of the CEP processor `processor`.
    ///
    /// # Errors
    /// A storage failure.
    pub fn has_cep(&self, processor: &str) -> Result<bool, HubError> {
        crate::cep::exists(&self.connect()?, &crate::cep::table_name(processor))
    }

    /// The hub file's outbox.
    ///
    /// # Errors
    /// A storage failure.
    pub fn outbox(&self) -> Result<crate::Outbox, HubError> {
        crate::outbox::Outbox::open(self.store())
    }

    /// The names of the views in the file, in order.
    ///
    /// # Errors
    /// A storage failure.
    pub fn views(&self) -> Result<Vec<String>, HubError> {
        tables_named(&self.store().connect_views()?, "view_")
    }

    /// The file that holds the hub's views: `<file>-views` beside the hub file for a hub made
    /// by this build (views and publishing then write at once, each in its own file), the hub
    /// file itself for one made before.
    pub fn views_path(&self) -> &Path {
        self.store().views_path()
    }

    /// The names (without `prefix`) of the tables whose names start with `prefix`, in order.
    fn tables_named(&self, prefix: &str) -> Result<Vec<String>, HubError> {
        tables_named(&self.connect()?, prefix)
    }
}

/// The names (without `prefix`) of the tables in `conn`'s file whose names start with
/// `prefix`, in order.
fn tables_named(conn: &Connection, prefix: &str) -> Result<Vec<String>, HubError> {
    let mut stmt = conn.prepare(
        "SELECT substr(name, length(?1) + 1) FROM sqlite_master WHERE type = 'table' \
         AND substr(name, 1, length(?1)) = ?1 ORDER BY name",
    )?;
    let names = stmt.query_map([prefix], |r| r.get(0))?;
    Ok(names.collect::<Result<_, _>>()?)
}

impl Hub {
    /// The record at `offset` of `partition`, as published; `None` when retention has deleted
    /// it or it was never published. Resubmission reads a fault's record back this way when
    /// the fault does not carry it (its pipeline redacts fields).
    ///
    /// # Errors
    /// When the hub's storage fails or the segment holding it is damaged.
    pub fn record_at(&self, partition: u32, offset: u64) -> Result<Option<Vec<u8>>, HubError> {
        let conn = self.connect()?;
        let segment: Option<(i64, i64, Vec<u8>)> = conn
            .query_row(
                "SELECT offset, last, data FROM events WHERE partition = ?1 AND offset <= ?2 \
                 ORDER BY offset DESC LIMIT 1",
                (partition, offset as i64),
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((first, last, data)) = segment else {
            return Ok(None);
        };
        if (last as u64) < offset {
            return Ok(None);
        }
        let events = Segment::new(first as u64, last as u64, data.into()).events()?;
        Ok(events
            .into_iter()
            .find(|(o, _)| *o == offset)
            .map(|(_, bytes)| bytes.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synchronous(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn stores_sync_every_commit_when_the_source_acks_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let local = Hub::open(dir.path().join("local.db"), HubOptions::default()).unwrap();
        // NORMAL (1): the checkpoint in the same file orders everything.
        assert_eq!(synchronous(&local.connect().unwrap()), 1);
        let acked_elsewhere = Hub::open(
            dir.path().join("stores.db"),
            HubOptions {
                external_acks: true,
                ..HubOptions::default()
            },
        )
        .unwrap();
        // FULL (2) for every store on the file: views, the inbox, faults.
        assert_eq!(synchronous(&acked_elsewhere.connect().unwrap()), 2);
        let view = acked_elsewhere.view("orders").unwrap();
        assert_eq!(synchronous(&view.conn.lock().unwrap()), 2);
    }

    /// A publish kept waiting for the file's write lock (another process writing) is stamped
    /// with the time it got the lock, not the time it asked: publish times then follow
    /// offsets, which a start at a time relies on (`log::offset_before` searches by them).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_publish_kept_waiting_for_the_file_is_stamped_when_it_gets_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let hub = Hub::open(&path, HubOptions::default()).unwrap();
        let event = |i: usize| {
            floodway::Event::builder("thing-happened", "k")
                .id(format!("e-{i}"))
                .build()
        };
        let first = hub.publish(&[event(0)]).await.unwrap();
        let (partition, _) = first.positions[0].unwrap();
        // Another process takes the write lock...
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let waiting = {
            let hub = hub.clone();
            tokio::spawn(async move { hub.publish(&(1..=5).map(event).collect::<Vec<_>>()).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        // ...publishes an event of the same partition, and lets go.
        other
            .execute(
                "INSERT INTO events (partition, offset, last, published, data) \
                 SELECT partition, offset + 1, last + 1, ?2, data FROM events \
                 WHERE partition = ?1 AND offset = 1",
                (partition, floodway::event::now_millis()),
            )
            .unwrap();
        other
            .execute(
                "UPDATE partitions SET last_offset = 2 WHERE partition = ?1",
                [partition],
            )
            .unwrap();
        other.execute_batch("COMMIT").unwrap();
        waiting.await.unwrap().unwrap();
        let times: Vec<(i64, i64)> = Connection::open(&path)
            .unwrap()
            .prepare("SELECT offset, published FROM events WHERE partition = ?1 ORDER BY offset")
            .unwrap()
            .query_map([partition], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(times.len(), 3, "three segments: {times:?}");
        assert!(
            times.windows(2).all(|w| w[0].1 <= w[1].1),
            "publish times follow offsets: {times:?}"
        );
    }

    fn tables(path: &Path) -> Vec<String> {
        tables_named(&Connection::open(path).unwrap(), "").unwrap()
    }

    fn write(key: &str, timestamp: i64) -> crate::ViewWrite {
        let version = floodway::idempotence::Version {
            timestamp,
            id: format!("e-{timestamp}"),
        };
        crate::ViewWrite::new(key, version, timestamp.into())
    }

    #[tokio::test]
    async fn a_new_hub_keeps_its_views_in_a_file_of_their_own_and_publishes_beside_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let hub = Hub::open(&path, HubOptions::default()).unwrap();
        assert_eq!(hub.views_path(), dir.path().join("hub.db-views"));
        let view = hub.view("orders").unwrap();
        assert_eq!(view.apply(&[write("o-1", 1)]).unwrap().written, 1);
        assert_eq!(hub.views().unwrap(), ["orders"]);
        assert!(!tables(&path).contains(&"view_orders".to_owned()));
        assert_eq!(tables(hub.views_path()), ["floodway_meta", "view_orders"]);
        // Synced, since the checkpoints that cover its writes are in the other file.
        assert_eq!(synchronous(&view.conn.lock().unwrap()), 2);

        // Another process in the middle of a view transaction: publishing goes on.
        let other = Connection::open(hub.views_path()).unwrap();
        other
            .execute_batch(
                "BEGIN IMMEDIATE; INSERT INTO view_orders (key, time, event, value) \
                 VALUES ('o-2', 2, 'e-2', '2');",
            )
            .unwrap();
        let events = floodway::testing::generate::orders(10, 1);
        let published = tokio::time::timeout(Duration::from_secs(5), hub.publish(&events)).await;
        assert_eq!(published.expect("not held up").unwrap().positions.len(), 10);
        other.execute_batch("COMMIT").unwrap();

        // Opened again (as another process would), the views are where they were.
        drop((view, hub));
        let hub = Hub::open(&path, HubOptions::default()).unwrap();
        let rows = hub.view("orders").unwrap().rows().unwrap();
        let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["o-1", "o-2"]);
    }

    #[test]
    fn a_hub_made_before_keeps_its_views_in_its_own_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        drop(Hub::open(&path, HubOptions::default()).unwrap());
        // As a build that kept views in the hub file made it (format version 2).
        crate::schema::as_made_before(&path);
        let hub = Hub::open(&path, HubOptions::default()).unwrap();
        assert_eq!(hub.views_path(), path);
        let view = hub.view("orders").unwrap();
        assert_eq!(view.apply(&[write("o-1", 1)]).unwrap().written, 1);
        assert!(tables(&path).contains(&"view_orders".to_owned()));
        assert_eq!(hub.views().unwrap(), ["orders"]);
        assert!(!dir.path().join("hub.db-views").exists());
        // NORMAL, as every store on the hub file.
        assert_eq!(synchronous(&view.conn.lock().unwrap()), 1);
    }

    #[test]
    fn a_hub_does_not_open_without_its_own_views_file() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
        let (a_views, b_views) = (dir.path().join("a.db-views"), dir.path().join("b.db-views"));
        for path in [&a, &b] {
            let hub = Hub::open(path, HubOptions::default()).unwrap();
            hub.view("orders")
                .unwrap()
                .apply(&[write("o-1", 1)])
                .unwrap();
        }
        let problem = |path: &Path, create: bool| {
            let options = HubOptions {
                create,
                ..HubOptions::default()
            };
            match Hub::open(path, options) {
                Err(OpenError::ViewsFile { path, problem }) => (path, problem),
                other => panic!("{other:?}"),
            }
        };
        std::fs::rename(&a_views, dir.path().join("elsewhere")).unwrap();
        let (at, missing) = problem(&a, false);
        assert_eq!(at, a_views);
        assert!(
            missing.starts_with("missing: the views of the hub"),
            "{missing}"
        );
        // Another hub's views file.
        std::fs::copy(&b_views, &a_views).unwrap();
        let (_, foreign) = problem(&a, false);
        assert!(
            foreign.starts_with("not the views file of the hub"),
            "{foreign}"
        );
        std::fs::rename(dir.path().join("elsewhere"), &a_views).unwrap();
        assert!(Hub::open(&a, HubOptions::default()).is_ok());
        // A new hub where an earlier one left its views file: nothing is overwritten. The
        // hub of `b` was dropped, but its threads close their connections as they end, and the
        // last to close deletes the write-ahead log: a hub made on the path before then met
        // that log being deleted under its own connections (a disk I/O error, seen once).
        let wal = dir.path().join("b.db-wal");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while wal.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::remove_file(&b).unwrap();
        let (_, left) = problem(&b, true);
        assert!(left.starts_with("a file holding views"), "{left}");
        assert_eq!(tables(&b_views), ["floodway_meta", "view_orders"]);
        // One left by a creation that did not finish (the hub file made, nothing committed
        // in it) is taken over.
        let c = dir.path().join("c.db");
        drop(Hub::open(&c, HubOptions::default()).unwrap());
        for file in ["c.db", "c.db-wal", "c.db-shm"] {
            let _ = std::fs::remove_file(dir.path().join(file));
        }
        std::fs::File::create(&c).unwrap();
        let hub = Hub::open(&c, HubOptions::default()).unwrap();
        hub.view("orders")
            .unwrap()
            .apply(&[write("o-1", 1)])
            .unwrap();
        drop(hub);
        assert!(Hub::open(&c, HubOptions::default()).is_ok());
        // A build that reads only format version 2 refuses this hub: it would write views
        // into the hub file, where this one never reads them.
        let version: String = Connection::open(&a)
            .unwrap()
            .query_row(
                "SELECT value FROM floodway_meta WHERE key = 'version'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(version, "3");
    }

    #[tokio::test]
    async fn retention_deletes_in_bounded_transactions() {
        let dir = tempfile::tempdir().unwrap();
        let hub = Hub::open(
            dir.path().join("hub.db"),
            HubOptions {
                partitions: Some(1),
                ..HubOptions::default()
            },
        )
        .unwrap();
        // 100 commits: 100 segments.
        for chunk in floodway::testing::generate::orders(1_000, 1).chunks(10) {
            hub.publish(chunk).await.unwrap();
        }
        let everything = Retention {
            max_bytes_per_partition: Some(0),
            ..Retention::default()
        };
        let (report, transactions) = hub.retain(&everything, 8).unwrap();
        assert_eq!(report.deleted, 1_000);
        assert_eq!(transactions, 13, "100 segments, 8 per transaction");
        assert_eq!(hub.stats().unwrap().partitions[0].bytes, 0);
    }
}
