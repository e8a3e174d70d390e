//! The hub: a partitioned, durable event log in one SQLite file.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use floodway::event::{now_millis, partition_for};
use floodway::Event;
use rusqlite::{Connection, OptionalExtension};
use tokio::sync::{oneshot, Notify};

use crate::error::{HubError, OpenError};
use crate::schema;
use crate::segment::{Filling, Segment};

/// Partitions of a new hub unless told otherwise.
pub const DEFAULT_PARTITIONS: u32 = floodway::hub::DEFAULT_PARTITIONS;

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
    /// How long a connection waits for another process's write lock inside SQLite before a
    /// write finds the file busy (default 10 s).
    pub busy_timeout: Duration,
    /// How long a write that found the file busy is tried again, with backoff and a warning
    /// per try, before it fails (default 2 minutes): publish commits, checkpoint commits, view
    /// writes, leases and retention. A lock held that long is not a passing contention.
    pub busy_retry: Duration,
    /// How long a subscription's lease lasts unless renewed (default 10 s): its holder renews
    /// it every third of this; another process takes the subscription over only once it has
    /// expired (or at once if its holder is a process of this machine that is gone).
    pub lease: Duration,
    /// How long [`Hub::subscribe_waiting`] waits for a subscription held by another process
    /// (default 15 s: longer than a [`lease`](Self::lease), so a holder that died where this
    /// process cannot see it, in another container, has lost its lease by then).
    pub lease_wait: Duration,
    /// How long a view's inbox remembers the ids of the events applied: one to two of these
    /// windows (default 10 minutes). An event delivered again later is still applied once:
    /// the view row's latest-wins version turns it away.
    pub inbox_window: Duration,
    /// Whether the records processed against this file are acknowledged somewhere else (a
    /// JetStream ack, a Lambda response) rather than by a checkpoint in this file (default
    /// false). Then views, the inbox and faults commit synced (`synchronous=FULL`): an
    /// external ack follows right after a commit, and a power loss must not take back a view
    /// write whose record will never be delivered again. With checkpoints in the file, WAL
    /// order makes unsynced commits safe (see [`Hub::connect`](Hub)).
    pub external_acks: bool,
}

impl Default for HubOptions {
    fn default() -> Self {
        HubOptions {
            create: true,
            partitions: None,
            durability: Durability::Immediate,
            dedupe_window: Duration::from_secs(600),
            max_commit: 10_000,
            busy_timeout: Duration::from_secs(10),
            busy_retry: Duration::from_secs(120),
            lease: Duration::from_secs(10),
            lease_wait: Duration::from_secs(15),
            inbox_window: Duration::from_secs(600),
            external_acks: false,
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
        if options.lease < Duration::from_millis(30) {
            return Err(OpenError::Setting(format!(
                "lease must be at least 30 ms, not {:?}",
                options.lease
            )));
        }
        let (conn, partitions, checkpoints) = schema::open(
            &path,
            options.create,
            options.partitions,
            options.durability,
            options.busy_timeout,
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
            busy_retry: inner.options.busy_retry,
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
    ///
    /// That argument needs the checkpoint in this file. When records are acknowledged
    /// elsewhere ([`HubOptions::external_acks`]: a NATS hub keeps its views and faults here)
    /// every commit is synced (`synchronous=FULL`) before the ack that follows it. The view
    /// sink commits a batch at a time, so the syncs are grouped by batch.
    pub(crate) fn connect(&self) -> Result<Connection, HubError> {
        let durability = if self.inner.options.external_acks {
            Durability::Immediate
        } else {
            Durability::Relaxed
        };
        schema::connect(
            &self.inner.path,
            durability,
            self.inner.options.busy_timeout,
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
        let limit = self.inner.options.busy_retry;
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
                    let _turn = self.inner.gate.enter();
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
        let window = self.inner.options.dedupe_window.as_millis() as i64;
        loop {
            let (forgotten, _) = crate::busy::retry("retention", limit, || {
                let _turn = self.inner.gate.enter();
                let tx =
                    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let now = now_millis();
                let done = prune_dedupe(&tx, now - window, 5_000, window, now)?;
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

/// Segments deleted by retention in one transaction at most, and their bytes.
const RETENTION_SEGMENTS: usize = 256;
const RETENTION_BYTES: i64 = 32 << 20;

/// The last offset of partition `p` that `retention`'s limits ask to delete (the last event
/// of a segment), if any. Reads only what it deletes: offsets and publish times grow together.
fn retention_cut(
    conn: &Connection,
    p: u32,
    retention: &Retention,
) -> Result<Option<i64>, HubError> {
    let mut through: Option<i64> = None;
    if let Some(age) = retention.max_age {
        let cutoff = now_millis() - age.as_millis() as i64;
        let before = crate::subscription::offset_before(conn, p, cutoff)? as i64;
        through = (before > 0).then_some(before);
    }
    if let Some(max_bytes) = retention.max_bytes_per_partition {
        let held: i64 = conn.query_row(
            "SELECT bytes FROM partitions WHERE partition = ?1",
            [p],
            |r| r.get(0),
        )?;
        let mut excess = held - max_bytes as i64;
        if excess > 0 {
            // Whole segments, oldest first.
            let mut stmt = conn.prepare_cached(
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
    Ok(through)
}

/// What one deleting transaction of retention did.
struct Step {
    deleted: i64,
    /// Whether there may be more to delete.
    more: bool,
    /// The last offset it may delete through (the limits' cut, held back for unread events).
    through: i64,
    /// Subscriptions behind the limits' cut.
    behind: Vec<String>,
}

/// Deletes the oldest segments of partition `p` ending at or before `wanted` (and, with
/// `keep_unread`, at or before every subscription's checkpoint, read in this transaction):
/// `segments` at most, and [`RETENTION_BYTES`] unless a single segment is larger.
fn delete_step(
    tx: &Connection,
    p: u32,
    wanted: i64,
    keep_unread: bool,
    segments: usize,
) -> rusqlite::Result<Step> {
    let mut through = wanted;
    let mut behind = Vec::new();
    if keep_unread {
        let read: Option<i64> = tx.query_row(
            "SELECT min(offset) FROM subscriptions WHERE partition = ?1",
            [p],
            |r| r.get(0),
        )?;
        if let Some(read) = read.filter(|r| *r < wanted) {
            let mut names = tx.prepare_cached(
                "SELECT name FROM subscriptions WHERE partition = ?1 AND offset < ?2",
            )?;
            behind = names
                .query_map((p, wanted), |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            // Whole segments only: the one holding the first unread event stays.
            let holding: Option<(i64, i64)> = tx
                .query_row(
                    "SELECT offset, last FROM events WHERE partition = ?1 AND offset <= ?2 \
                     ORDER BY offset DESC LIMIT 1",
                    (p, read),
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            through = match holding {
                Some((_, last)) if last <= read => last,
                Some((first, _)) => first - 1,
                None => read,
            };
        }
    }
    let mut stmt = tx.prepare_cached(
        "SELECT offset, last, length(data) FROM events WHERE partition = ?1 AND offset <= ?2 \
         ORDER BY offset LIMIT ?3",
    )?;
    let rows: Vec<(i64, i64, i64)> = stmt
        .query_map((p, through, segments as i64), |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<Result<_, _>>()?;
    let (mut cut, mut deleted, mut freed, mut taken) = (None, 0, 0, 0);
    for (offset, last, len) in &rows {
        if taken > 0 && freed + len > RETENTION_BYTES {
            break;
        }
        cut = Some(*offset);
        deleted += last - offset + 1;
        freed += len;
        taken += 1;
    }
    let Some(cut) = cut else {
        return Ok(Step {
            deleted: 0,
            more: false,
            through,
            behind,
        });
    };
    tx.execute(
        "DELETE FROM events WHERE partition = ?1 AND offset <= ?2",
        (p, cut),
    )?;
    tx.execute(
        "UPDATE partitions SET bytes = max(bytes - ?2, 0) WHERE partition = ?1",
        (p, freed),
    )?;
    Ok(Step {
        deleted,
        more: taken == segments || taken < rows.len(),
        through,
        behind,
    })
}

/// What to keep of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// Delete events published longer ago than this.
    pub max_age: Option<Duration>,
    /// Per partition, delete the oldest events beyond this many bytes of event data.
    pub max_bytes_per_partition: Option<u64>,
    /// Never delete an event that a subscription has not checkpointed past (default true):
    /// the limits then wait for the slowest subscription, and retention warns that the hub is
    /// over them and names the subscriptions behind. False deletes by the limits alone; a
    /// reader that finds events gone logs a warning and counts them.
    pub keep_unread: bool,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age: None,
            max_bytes_per_partition: None,
            keep_unread: true,
        }
    }
}

/// What retention deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Events deleted.
    pub deleted: usize,
    /// Idempotency keys forgotten.
    pub forgotten: usize,
    /// Events the limits would have deleted, kept because a subscription has not read them.
    pub kept_unread: u64,
    /// The subscriptions that have not read them.
    pub behind: Vec<String>,
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
    busy_retry: Duration,
    /// When the dedupe table may next hold keys older than the window (ms since the epoch).
    next_prune: i64,
}

/// Rows deleted by one prune of the dedupe table or the inbox, besides twice the rows the same
/// transaction added: pruning outpaces adding, so the table stays bounded.
pub(crate) const PRUNE_BATCH: usize = 1_000;

/// Deletes up to `limit` idempotency keys published before `cutoff`, in a transaction of the
/// caller's; returns the keys deleted and when the oldest key left expires (`now + window` if
/// none is left), or `now` if there may be more to delete.
pub(crate) fn prune_dedupe(
    tx: &Connection,
    cutoff: i64,
    limit: usize,
    window_ms: i64,
    now: i64,
) -> rusqlite::Result<(usize, i64)> {
    let deleted = tx
        .prepare_cached(
            "DELETE FROM dedupe WHERE id IN \
             (SELECT id FROM dedupe WHERE published < ?1 ORDER BY published LIMIT ?2)",
        )?
        .execute((cutoff, limit as i64))?;
    if deleted == limit {
        return Ok((deleted, now));
    }
    let oldest: Option<i64> = tx
        .prepare_cached("SELECT min(published) FROM dedupe")?
        .query_row([], |r| r.get(0))?;
    Ok((deleted, oldest.map_or(now, |t| t.max(cutoff)) + window_ms))
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
            let limit = self.busy_retry;
            match crate::busy::retry("publish", limit, || self.commit(&group)) {
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
        // Idempotency keys older than the window, whether or not retention runs: a bounded
        // batch in the publishing transaction, when some may have expired.
        let mut next_prune = self.next_prune;
        if now >= self.next_prune {
            let added: usize = group
                .iter()
                .filter(|r| r.dedupe)
                .map(|r| r.rows.len())
                .sum();
            (_, next_prune) = prune_dedupe(
                &tx,
                now - self.dedupe_window_ms,
                2 * added + PRUNE_BATCH,
                self.dedupe_window_ms,
                now,
            )?;
        }
        tx.commit()?;
        self.next_prune = next_prune;
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
    /// Removes the subscription `name`: its checkpoints (and so what it holds back from
    /// retention, see [`Retention::keep_unread`]) and its lease. Opening it again starts it
    /// anew. Returns whether it existed.
    ///
    /// # Errors
    /// [`HubError::Held`] while a process owns it; a storage failure.
    pub fn unsubscribe(&self, name: &str) -> Result<bool, HubError> {
        let mut conn = self.connect()?;
        crate::busy::retry("unsubscribe", self.inner.options.busy_retry, || {
            let _turn = self.inner.gate.enter();
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
