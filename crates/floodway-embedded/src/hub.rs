//! The hub: a partitioned, durable event log in one SQLite file.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use floodway::event::{now_millis, partition_for};
use floodway::Event;
use rusqlite::Connection;
use tokio::sync::{oneshot, Notify};

use crate::error::{HubError, OpenError};
use crate::schema;
use crate::segment::{Filling, Segment};

/// Partitions of a new hub unless told otherwise.
pub const DEFAULT_PARTITIONS: u32 = 8;

/// When a publish is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Each commit is synced to disk before `publish` returns (SQLite `synchronous=FULL`): a
    /// published event survives a power loss.
    #[default]
    Immediate,
    /// Commits survive a crash of the process but may be lost with the machine
    /// (`synchronous=NORMAL` in WAL mode): several times the write rate on slow disks.
    Relaxed,
}

/// How a hub is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// Create the file if it does not exist (default true).
    pub create: bool,
    /// Partitions of a new hub (default 8); an existing hub must have this many if set.
    pub partitions: Option<u32>,
    /// When a publish is durable (default [`Durability::Immediate`]).
    pub durability: Durability,
    /// How long an idempotency key is remembered (default 10 minutes).
    pub dedupe_window: Duration,
    /// Events published in one commit at most (default 10,000): publishers waiting together are
    /// committed together (group commit), up to this many events.
    pub max_commit: usize,
}

impl Default for HubOptions {
    fn default() -> Self {
        HubOptions {
            create: true,
            partitions: None,
            durability: Durability::Immediate,
            dedupe_window: Duration::from_secs(600),
            max_commit: 10_000,
        }
    }
}

/// What a publish did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishReceipt {
    /// Where each stored event went, `(partition, offset)`, in the order given; `None` for an
    /// event skipped as a duplicate.
    pub positions: Vec<Option<(u32, u64)>>,
    /// Events skipped because their id was published within the dedupe window.
    pub duplicates: usize,
}

impl PublishReceipt {
    /// Events stored.
    pub fn stored(&self) -> usize {
        self.positions.len() - self.duplicates
    }
}

struct Row {
    partition: u32,
    id: String,
    data: Bytes,
}

struct WriteRequest {
    rows: Vec<Row>,
    dedupe: bool,
    reply: oneshot::Sender<Result<PublishReceipt, HubError>>,
}

/// Takes turns among this process's write transactions on one hub file.
///
/// SQLite lets one writer at a time into a file and makes the others wait in its busy
/// handler, which sleeps 1, 2, 5, 10... ms between tries: with commits a few milliseconds
/// apart, a writer kept waiting loses several commits' worth of time each time. Writers of one
/// process (the publisher, views, checkpoints, the fault store) therefore queue on this lock
/// instead and go in as soon as the previous one commits; other processes still meet the busy
/// handler.
#[derive(Clone, Default)]
pub(crate) struct WriteGate(Arc<Mutex<()>>);

impl WriteGate {
    /// Waits for this process's turn to write; the turn ends when the guard is dropped.
    pub(crate) fn enter(&self) -> std::sync::MutexGuard<'_, ()> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

pub(crate) struct HubInner {
    pub(crate) path: PathBuf,
    pub(crate) gate: WriteGate,
    checkpoints: schema::WalCheckpoints,
    pub(crate) partitions: u32,
    pub(crate) options: HubOptions,
    writer: Mutex<Option<mpsc::Sender<WriteRequest>>>,
    /// Woken after every commit of this process, so local subscribers read at once.
    pub(crate) published: Notify,
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
            .field("path", &self.inner.path)
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
        let (conn, partitions, checkpoints) = schema::open(
            &path,
            options.create,
            options.partitions,
            options.durability,
        )?;
        let (tx, rx) = mpsc::channel();
        let inner = Arc::new(HubInner {
            path,
            partitions,
            options,
            gate: WriteGate::default(),
            checkpoints,
            writer: Mutex::new(Some(tx)),
            published: Notify::new(),
        });
        let writer = Writer {
            conn,
            gate: inner.gate.clone(),
            requests: rx,
            inner: Arc::downgrade(&inner),
            max_commit: inner.options.max_commit,
            dedupe_window_ms: inner.options.dedupe_window.as_millis() as i64,
        };
        std::thread::Builder::new()
            .name("floodway-hub-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| OpenError::Setting(format!("cannot start the writer thread: {e}")))?;
        Ok(Hub { inner })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The number of partitions (fixed when the hub was created).
    pub fn partitions(&self) -> u32 {
        self.inner.partitions
    }

    /// The partition of a partition key.
    pub fn partition_of(&self, partition_key: &str) -> u32 {
        partition_for(partition_key, self.inner.partitions)
    }

    /// A new connection to the file for everything but publishing: views, the inbox, faults,
    /// checkpoints, reads. Its commits are not synced one by one (`synchronous=NORMAL`): in WAL
    /// mode commits reach the log in order, the publisher's synced commits sync everything
    /// before them, and a power loss keeps a prefix of the log, so a checkpoint never survives
    /// the view writes it covers (the records after the surviving checkpoint are processed
    /// again, and the view and inbox make that harmless). Only `publish` promises durability.
    pub(crate) fn connect(&self) -> Result<Connection, HubError> {
        schema::connect(
            &self.inner.path,
            Durability::Relaxed,
            &self.inner.checkpoints,
        )
        .map_err(|e| match e {
            OpenError::Sqlite { source, .. } => HubError::Sqlite(source),
            other => HubError::Corrupt {
                what: "hub file",
                detail: other.to_string(),
            },
        })
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
                data: match e.source_bytes() {
                    Some(bytes) => bytes.clone(),
                    None => Bytes::from(e.to_json()),
                },
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
                    });
                }
                let s = subscriptions.last_mut().expect("pushed above");
                s.partitions.push((partition, offset));
            }
        }
        // Lag over every partition, those without a checkpoint included.
        for s in &mut subscriptions {
            s.lag = self.lag_on(&conn, &s.name)?;
        }
        let file_bytes = std::fs::metadata(&self.inner.path)
            .map(|m| m.len())
            .unwrap_or(0);
        Ok(HubStats {
            partitions,
            subscriptions,
            file_bytes,
        })
    }

    /// Deletes events older than `max_age` and, per partition, the oldest beyond `max_bytes` of
    /// event data; forgets idempotency keys older than the dedupe window.
    ///
    /// # Errors
    /// When the hub's storage fails.
    pub fn apply_retention(&self, retention: &Retention) -> Result<RetentionReport, HubError> {
        let mut conn = self.connect()?;
        let _turn = self.inner.gate.enter();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut deleted = 0usize;
        // Every step reads only the rows it deletes (offsets and publish times grow together),
        // so retention stays cheap however large the log is.
        for p in 0..self.inner.partitions {
            let mut through: Option<i64> = None;
            if let Some(age) = retention.max_age {
                let cutoff = now_millis() - age.as_millis() as i64;
                let before = crate::subscription::offset_before(&tx, p, cutoff)? as i64;
                through = (before > 0).then_some(before);
            }
            if let Some(max_bytes) = retention.max_bytes_per_partition {
                let held: i64 = tx.query_row(
                    "SELECT bytes FROM partitions WHERE partition = ?1",
                    [p],
                    |r| r.get(0),
                )?;
                let mut excess = held - max_bytes as i64;
                if excess > 0 {
                    // Whole segments, oldest first.
                    let mut stmt = tx.prepare_cached(
                        "SELECT last, length(data) FROM events WHERE partition = ?1 ORDER BY offset",
                    )?;
                    let mut rows = stmt.query([p])?;
                    while let Some(row) = rows.next()? {
                        let (last, len): (i64, i64) = (row.get(0)?, row.get(1)?);
                        through = Some(through.map_or(last, |t| t.max(last)));
                        excess -= len;
                        if excess <= 0 {
                            break;
                        }
                    }
                }
            }
            // `through` is the last event of a segment: the segments starting at or before it
            // end at or before it.
            let Some(through) = through else { continue };
            let (freed, events): (i64, i64) = tx.query_row(
                "SELECT coalesce(sum(length(data)), 0), coalesce(sum(last - offset + 1), 0) \
                 FROM events WHERE partition = ?1 AND offset <= ?2",
                (p, through),
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            tx.execute(
                "DELETE FROM events WHERE partition = ?1 AND offset <= ?2",
                (p, through),
            )?;
            deleted += events as usize;
            tx.execute(
                "UPDATE partitions SET bytes = max(bytes - ?2, 0) WHERE partition = ?1",
                (p, freed),
            )?;
        }
        let cutoff = now_millis() - self.inner.options.dedupe_window.as_millis() as i64;
        let forgotten = tx.execute("DELETE FROM dedupe WHERE published < ?1", [cutoff])?;
        tx.commit()?;
        if deleted > 0 {
            tracing::info!(deleted, "retention deleted events");
        }
        Ok(RetentionReport { deleted, forgotten })
    }
}

/// What to keep of the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    /// Delete events published longer ago than this.
    pub max_age: Option<Duration>,
    /// Per partition, delete the oldest events beyond this many bytes of event data.
    pub max_bytes_per_partition: Option<u64>,
}

/// What retention deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Events deleted.
    pub deleted: usize,
    /// Idempotency keys forgotten.
    pub forgotten: usize,
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
}

/// What [`Hub::stats`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubStats {
    /// Partitions holding events.
    pub partitions: Vec<PartitionStats>,
    /// Subscriptions with a checkpoint.
    pub subscriptions: Vec<SubscriptionStats>,
    /// Size of the database file (without its WAL).
    pub file_bytes: u64,
}

/// Owns the writing connection; commits what publishers hand it, many at a time.
struct Writer {
    conn: Connection,
    gate: WriteGate,
    requests: mpsc::Receiver<WriteRequest>,
    inner: std::sync::Weak<HubInner>,
    max_commit: usize,
    dedupe_window_ms: i64,
}

impl Writer {
    fn run(mut self) {
        while let Ok(first) = self.requests.recv() {
            // Group commit: take everything already waiting, up to the commit size.
            let mut group = vec![first];
            let mut events = group[0].rows.len();
            while events < self.max_commit {
                match self.requests.try_recv() {
                    Ok(next) => {
                        events += next.rows.len();
                        group.push(next);
                    }
                    Err(_) => break,
                }
            }
            match self.commit(&group) {
                Ok(receipts) => {
                    for (request, receipt) in group.into_iter().zip(receipts) {
                        let _ = request.reply.send(Ok(receipt));
                    }
                    if let Some(inner) = self.inner.upgrade() {
                        inner.published.notify_waiters();
                    }
                }
                Err(err) => {
                    tracing::error!(error = %err, "hub commit failed");
                    for request in group {
                        // Each publisher gets the error with its class (busy stays transient).
                        let copy = match &err {
                            HubError::Sqlite(rusqlite::Error::SqliteFailure(code, message)) => {
                                HubError::Sqlite(rusqlite::Error::SqliteFailure(
                                    *code,
                                    message.clone(),
                                ))
                            }
                            other => HubError::Corrupt {
                                what: "commit",
                                detail: other.to_string(),
                            },
                        };
                        let _ = request.reply.send(Err(copy));
                    }
                }
            }
        }
    }

    fn commit(&mut self, group: &[WriteRequest]) -> Result<Vec<PublishReceipt>, HubError> {
        let now = now_millis();
        let _turn = self.gate.enter();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Offsets are read inside the transaction: another process may have written since.
        let mut filling: HashMap<u32, Filling> = HashMap::new();
        let mut receipts = Vec::with_capacity(group.len());
        {
            let mut last =
                tx.prepare_cached("SELECT last_offset FROM partitions WHERE partition = ?1")?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO events (partition, offset, last, published, data) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut write = |partition: u32, segment: &mut Filling| -> rusqlite::Result<()> {
                if let Some((first, last, data)) = segment.take() {
                    insert.execute((partition, first as i64, last as i64, now, data))?;
                }
                Ok(())
            };
            let mut dedupe = tx.prepare_cached(
                "INSERT INTO dedupe (id, published) VALUES (?1, ?2) \
                 ON CONFLICT (id) DO UPDATE SET published = excluded.published \
                 WHERE dedupe.published < ?3",
            )?;
            for request in group {
                let mut receipt = PublishReceipt::default();
                for row in &request.rows {
                    if request.dedupe {
                        let changed =
                            dedupe.execute((&row.id, now, now - self.dedupe_window_ms))?;
                        if changed == 0 {
                            receipt.positions.push(None);
                            receipt.duplicates += 1;
                            continue;
                        }
                    }
                    let segment = match filling.entry(row.partition) {
                        Entry::Occupied(o) => o.into_mut(),
                        Entry::Vacant(v) => {
                            let last: i64 = last.query_row([row.partition], |r| r.get(0))?;
                            v.insert(Filling::after(last as u64))
                        }
                    };
                    if segment.full_for(row.data.len()) {
                        write(row.partition, segment)?;
                    }
                    let offset = segment.push(&row.data);
                    receipt.positions.push(Some((row.partition, offset)));
                }
                receipts.push(receipt);
            }
            let mut advance = tx.prepare_cached(
                "UPDATE partitions SET last_offset = ?2, bytes = bytes + ?3 WHERE partition = ?1",
            )?;
            for (partition, segment) in &mut filling {
                write(*partition, segment)?;
                advance.execute((partition, segment.last() as i64, segment.written as i64))?;
            }
        }
        tx.commit()?;
        Ok(receipts)
    }
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
            let last = crate::subscription::offset_before(&conn, p, until.saturating_add(1))?;
            let first = crate::subscription::offset_before(&conn, p, from)?;
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
