//! Subscriptions: named readers of the log with their own checkpoints.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use floodway::error::{CommitError, SourceError};
use floodway::event::now_millis;
use floodway::{Checkpoint, Checkpointer, Record, Source};
use rusqlite::{Connection, OptionalExtension};

use crate::error::HubError;
use crate::hub::Hub;
use crate::lease::{Lease, Standing};
use crate::segment::Segment;
use crate::store::WriteGate;

/// Where a subscription without a checkpoint starts (one with a checkpoint resumes from it
/// unless [`SubscriptionOptions::reset`]): the contract's start positions.
pub use floodway::hub::StartAt;

/// How a subscription reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionOptions {
    /// Where to start without a checkpoint.
    pub start: StartAt,
    /// Ignore a stored checkpoint and start at `start` (a reset of the subscription).
    pub reset: bool,
    /// Wait for new events at the end of the log (a live stream), or end there (a bounded
    /// read, for replays and tests).
    pub follow: bool,
    /// How often to look for events published by other processes when idle (default 50 ms;
    /// events published through the same `Hub` handle wake the reader at once).
    pub poll: Duration,
    /// Read only events published at or before this time (ms since the epoch), then end: a
    /// time range, for replays.
    pub until: Option<i64>,
    /// A reader that leaves no trace (`hub tail`, a replay): its starting place is not stored,
    /// its commits store nothing, and it takes no lease (it does not keep others out).
    /// Otherwise the place a new subscription starts from is stored at once, so that a restart
    /// before its first commit starts from the same place (not from a later end of the log).
    pub transient: bool,
}

impl Default for SubscriptionOptions {
    fn default() -> Self {
        SubscriptionOptions {
            start: StartAt::Beginning,
            reset: false,
            follow: true,
            poll: Duration::from_millis(50),
            until: None,
            transient: false,
        }
    }
}

/// A named subscription to a hub: a [`Source`] of its records and a [`Checkpointer`] of its
/// progress (split with [`Subscription::split`] to hand both to a processor).
///
/// A subscription has one owner at a time: opening one takes its lease (see
/// [`HubOptions::lease`](crate::HubOptions::lease)), which is held until both halves are
/// dropped. A transient subscription takes none.
#[derive(Debug)]
pub struct Subscription {
    reader: SubscriptionReader,
    checkpointer: SubscriptionCheckpointer,
}

/// The reading half of a [`Subscription`].
pub struct SubscriptionReader {
    hub: Hub,
    follow: bool,
    poll: Duration,
    lease: Option<Arc<Lease>>,
    /// Moved into a blocking task for each read, so that a read in progress never runs on
    /// the runtime's workers (and never meets a runtime shutting down half-way).
    state: Arc<Mutex<ReadState>>,
}

struct ReadState {
    source: Arc<str>,
    conn: Connection,
    /// Per partition, the offset of the last record delivered.
    cursors: Vec<u64>,
    until: i64,
    next_partition: usize,
    /// Per partition, the segment read part-way, so the next read goes on where this one
    /// stopped without reading it again.
    open: Vec<Option<Segment>>,
}

impl std::fmt::Debug for SubscriptionReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionReader")
            .field("cursors", &self.cursors())
            .finish_non_exhaustive()
    }
}

/// The committing half of a [`Subscription`].
pub struct SubscriptionCheckpointer {
    inner: Arc<CheckpointerInner>,
}

struct CheckpointerInner {
    name: String,
    conn: Mutex<Connection>,
    gate: WriteGate,
    /// `None` for a transient subscription, which stores nothing.
    lease: Option<Arc<Lease>>,
    busy_retry: Duration,
}

/// How a checkpoint is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    /// Where a new subscription starts: only partitions without a checkpoint.
    Start,
    /// A reset: replaces what was stored, backward too.
    Reset,
    /// A commit: moves a checkpoint forward only.
    Advance,
}

impl std::fmt::Debug for SubscriptionCheckpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionCheckpointer")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

fn check_name(name: &str) -> Result<(), HubError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let rule = "1-128 letters, digits, `-`, `_` or `.`";
    crate::store::check_name("subscription", name, 128, allowed, rule)
}

impl Hub {
    /// Opens the subscription `name` (creating it on first use), taking its lease unless it is
    /// transient. Does not wait for a subscription held elsewhere: see
    /// [`Hub::subscribe_waiting`].
    ///
    /// # Errors
    /// [`HubError::Held`] (naming the holder) if another process, or another subscription
    /// object of this one, holds the subscription; an invalid name, or a storage failure.
    pub fn subscribe(
        &self,
        name: &str,
        options: SubscriptionOptions,
    ) -> Result<Subscription, HubError> {
        check_name(name)?;
        // The lease first: the checkpoints read below are then the last owner's last.
        let lease = if options.transient {
            None
        } else {
            Some(Arc::new(Lease::acquire(self.store(), name)?))
        };
        let read = self.connect()?;
        let partitions = self.partitions();
        // Where each partition starts: its stored checkpoint, or where `options` says.
        let starts = |conn: &rusqlite::Connection| -> Result<Vec<u64>, HubError> {
            let mut cursors = Vec::with_capacity(partitions as usize);
            for p in 0..partitions {
                let stored: Option<i64> = conn
                    .query_row(
                        "SELECT offset FROM subscriptions WHERE name = ?1 AND partition = ?2",
                        (name, p),
                        |r| r.get(0),
                    )
                    .optional()?;
                let cursor = match (options.reset, stored) {
                    (false, Some(offset)) => offset as u64,
                    _ => match options.start {
                        StartAt::Beginning => 0,
                        StartAt::End => conn.query_row(
                            "SELECT last_offset FROM partitions WHERE partition = ?1",
                            [p],
                            |r| r.get::<_, i64>(0),
                        )? as u64,
                        StartAt::Time(t) => crate::log::offset_before(conn, p, t)?,
                    },
                };
                cursors.push(cursor);
            }
            Ok(cursors)
        };
        let file = self
            .path()
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let checkpointer = SubscriptionCheckpointer {
            inner: Arc::new(CheckpointerInner {
                name: name.to_owned(),
                conn: Mutex::new(self.connect()?),
                gate: self.inner.store.gate.clone(),
                lease: lease.clone(),
                busy_retry: self.inner.store.options.busy_retry,
            }),
        };
        let cursors = if options.transient {
            starts(&read)?
        } else {
            // A reset is a decision that replaces what was stored; a first start only fills in
            // the partitions that have no checkpoint yet. Worked out in the transaction that
            // stores them: retention, which keeps what the lowest checkpoint has not read,
            // cannot delete between the reading of where to start and its storing.
            let how = if options.reset {
                Store::Reset
            } else {
                Store::Start
            };
            checkpointer
                .inner
                .store_with(how, |tx| {
                    Ok(starts(tx)?
                        .iter()
                        .enumerate()
                        .map(|(p, o)| Checkpoint {
                            partition: p.to_string().into(),
                            offset: *o,
                        })
                        .collect())
                })?
                .iter()
                .map(|cp| cp.offset)
                .collect()
        };
        Ok(Subscription {
            reader: SubscriptionReader {
                hub: self.clone(),
                follow: options.follow && options.until.is_none(),
                poll: options.poll,
                lease,
                state: Arc::new(Mutex::new(ReadState {
                    // The log, not the reader: a replay through another subscription raises the
                    // same faults (fault ids hash the source).
                    source: format!("hub:{file}").into(),
                    conn: read,
                    cursors,
                    until: options.until.unwrap_or(i64::MAX),
                    next_partition: 0,
                    open: (0..partitions).map(|_| None).collect(),
                })),
            },
            checkpointer,
        })
    }
}

impl Hub {
    /// Opens the subscription `name` as [`Hub::subscribe`] does, waiting up to
    /// [`HubOptions::lease_wait`](crate::HubOptions::lease_wait) while another process holds it.
    ///
    /// # Errors
    /// As [`Hub::subscribe`]; [`HubError::Held`] if the subscription is still held at the end
    /// of the wait.
    pub async fn subscribe_waiting(
        &self,
        name: &str,
        options: SubscriptionOptions,
    ) -> Result<Subscription, HubError> {
        let wait = self.inner.store.options.lease_wait;
        // A wait too long for the clock to count (`Duration::MAX`) is a wait of a century.
        let deadline = floodway::clock::later(tokio::time::Instant::now(), wait);
        let mut told = false;
        loop {
            let attempt = {
                let (hub, name) = (self.clone(), name.to_owned());
                let open = move || hub.subscribe(&name, options);
                match tokio::runtime::Handle::try_current() {
                    Ok(_) => tokio::task::spawn_blocking(open)
                        .await
                        .map_err(|e| HubError::Task(format!("opening the subscription: {e}")))?,
                    Err(_) => open(),
                }
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match attempt {
                Err(HubError::Held { holder, .. }) if !left.is_zero() => {
                    if !told {
                        tracing::warn!(
                            subscription = name,
                            holder = %holder,
                            wait = ?wait,
                            "the subscription is held by another process: waiting for it to be \
                             released, or for its lease to expire"
                        );
                        told = true;
                    }
                    tokio::time::sleep(left.min(Duration::from_millis(100))).await;
                }
                other => return other,
            }
        }
    }
}

impl Subscription {
    /// The reader and the checkpointer, for [`floodway::Processor::run`].
    pub fn split(self) -> (SubscriptionReader, SubscriptionCheckpointer) {
        (self.reader, self.checkpointer)
    }
}

impl SubscriptionReader {
    /// Per partition, the offset of the last record delivered.
    pub fn cursors(&self) -> Vec<u64> {
        self.state
            .lock()
            .map(|s| s.cursors.clone())
            .unwrap_or_default()
    }
}

impl ReadState {
    fn read(&mut self, max: usize) -> Result<Vec<Record>, HubError> {
        let partitions = self.cursors.len();
        let share = max.div_ceil(partitions).max(1);
        let mut out = Vec::new();
        // A fair share per partition first, from a rotating first partition so none starves
        // another; then the room left goes to the partitions that had more.
        let mut more: Vec<usize> = Vec::new();
        for pass in 0..2 {
            let order: Vec<usize> = if pass == 0 {
                (0..partitions)
                    .map(|i| (self.next_partition + i) % partitions)
                    .collect()
            } else {
                std::mem::take(&mut more)
            };
            for p in order {
                let left = max - out.len();
                let room = if pass == 0 { left.min(share) } else { left };
                if room == 0 {
                    break;
                }
                if self.read_partition(p, room, &mut out)? {
                    more.push(p);
                }
            }
        }
        self.next_partition = (self.next_partition + 1) % partitions;
        Ok(out)
    }

    /// Reads up to `room` records of partition `p` into `out`; true if it had more.
    fn read_partition(
        &mut self,
        p: usize,
        room: usize,
        out: &mut Vec<Record>,
    ) -> Result<bool, HubError> {
        let partition: Arc<str> = p.to_string().into();
        let mut taken = 0;
        loop {
            let mut segment = match self.open[p].take() {
                Some(segment) => segment,
                None => match self.next_segment(p)? {
                    Some(segment) => segment,
                    None => return Ok(false),
                },
            };
            while taken < room {
                let Some((offset, data)) = segment.next_event()? else {
                    break;
                };
                if offset <= self.cursors[p] {
                    continue;
                }
                if offset > self.cursors[p] + 1 {
                    // Retention deleted events this reader had not read yet.
                    let skipped = offset - self.cursors[p] - 1;
                    tracing::warn!(source = %self.source, partition = p, skipped, "events deleted by retention before they were read");
                    metrics::counter!("floodway_hub_skipped_total", "source" => self.source.to_string())
                        .increment(skipped);
                }
                self.cursors[p] = offset;
                out.push(Record::new(
                    self.source.clone(),
                    partition.clone(),
                    offset,
                    data,
                ));
                taken += 1;
            }
            if !segment.is_done() {
                self.open[p] = Some(segment);
                return Ok(true);
            }
            if taken == room {
                // Filled its room: it may have more.
                return Ok(true);
            }
        }
    }

    /// The stored segment holding the event after partition `p`'s cursor, or the first one
    /// after it, if published by the end of a bounded read.
    fn next_segment(&self, p: usize) -> Result<Option<Segment>, HubError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT offset, last, data FROM events WHERE partition = ?1 \
             AND offset >= (SELECT coalesce(max(offset), 0) FROM events \
                            WHERE partition = ?1 AND offset <= ?2 + 1) \
             AND last > ?2 AND published <= ?3 ORDER BY offset LIMIT 1",
        )?;
        let found = stmt
            .query_row((p as u32, self.cursors[p] as i64, self.until), |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            })
            .optional()?;
        Ok(found.map(|(first, last, data)| Segment::new(first as u64, last as u64, data.into())))
    }
}

impl SubscriptionReader {
    /// Whether the lease allows handing out records: `Ok(false)` to wait a moment.
    fn may_read(&self) -> Result<bool, SourceError> {
        let Some(lease) = &self.lease else {
            return Ok(true);
        };
        match lease.standing() {
            Standing::Held => Ok(true),
            Standing::Unsure => Ok(false),
            Standing::Lost(reason) => Err(SourceError {
                source_name: self
                    .state
                    .lock()
                    .map(|s| s.source.to_string())
                    .unwrap_or_else(|_| "hub reader".into()),
                cause: Box::new(lease.lost_error(reason)),
            }),
        }
    }
}

impl Source for SubscriptionReader {
    async fn next_batch(&mut self, max: usize) -> Result<Option<Vec<Record>>, SourceError> {
        loop {
            if !self.may_read()? {
                // Not renewed for a lease time: nothing is handed out until it is again.
                tokio::time::sleep(self.poll).await;
                continue;
            }
            let hub = self.hub.clone();
            let published = hub.inner.published.notified();
            tokio::pin!(published);
            published.as_mut().enable();
            let state = self.state.clone();
            let read = tokio::task::spawn_blocking(move || {
                let closed = |_| SourceError {
                    source_name: "hub reader".into(),
                    cause: Box::new(HubError::Closed),
                };
                let mut state = state.lock().map_err(closed)?;
                state.read(max).map_err(|e| SourceError {
                    source_name: state.source.to_string(),
                    cause: Box::new(e),
                })
            });
            let records = read.await.map_err(|e| SourceError {
                source_name: "hub reader".into(),
                cause: Box::new(e),
            })??;
            // The lease may have been lost while reading, or not renewed for a lease time (a
            // process frozen mid-read): nothing read is handed out until it is held again.
            // The records wait here, since the cursors have passed them.
            while !self.may_read()? {
                tokio::time::sleep(self.poll).await;
            }
            if !records.is_empty() {
                return Ok(Some(records));
            }
            if !self.follow {
                return Ok(None);
            }
            tokio::select! {
                () = &mut published => {}
                () = tokio::time::sleep(self.poll) => {}
            }
        }
    }
}

impl CheckpointerInner {
    fn store(&self, checkpoints: &[Checkpoint], how: Store) -> Result<(), HubError> {
        self.store_with(how, |_| Ok(checkpoints.to_vec())).map(drop)
    }

    /// Stores the checkpoints `checkpoints` works out in the storing transaction (holding the
    /// file's write lock), and returns them.
    fn store_with(
        &self,
        how: Store,
        checkpoints: impl Fn(&rusqlite::Connection) -> Result<Vec<Checkpoint>, HubError>,
    ) -> Result<Vec<Checkpoint>, HubError> {
        let Some(lease) = &self.lease else {
            // A transient subscription leaves no trace.
            let conn = self.conn.lock().map_err(|_| HubError::Closed)?;
            return checkpoints(&conn);
        };
        crate::busy::retry("checkpoint", self.busy_retry, || {
            let mut conn = self.conn.lock().map_err(|_| HubError::Closed)?;
            let _turn = self.gate.enter();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            // Only the owner writes checkpoints, checked in the transaction that writes them.
            lease.check(&tx)?;
            let checkpoints = checkpoints(&tx)?;
            let mut rows = Vec::with_capacity(checkpoints.len());
            for cp in &checkpoints {
                let partition: u32 = cp.partition.parse().map_err(|_| {
                    HubError::Invalid(format!(
                        "partition `{}` is not a hub partition",
                        cp.partition
                    ))
                })?;
                rows.push((partition, cp.offset as i64));
            }
            {
                let mut upsert = tx.prepare_cached(match how {
                    Store::Start => {
                        "INSERT OR IGNORE INTO subscriptions (name, partition, offset, updated) \
                         VALUES (?1, ?2, ?3, ?4)"
                    }
                    Store::Reset => {
                        "INSERT INTO subscriptions (name, partition, offset, updated) \
                         VALUES (?1, ?2, ?3, ?4) ON CONFLICT (name, partition) DO UPDATE SET \
                         offset = excluded.offset, updated = excluded.updated"
                    }
                    // Never backward: a late or repeated commit changes nothing.
                    Store::Advance => {
                        "INSERT INTO subscriptions (name, partition, offset, updated) \
                         VALUES (?1, ?2, ?3, ?4) ON CONFLICT (name, partition) DO UPDATE SET \
                         offset = excluded.offset, updated = excluded.updated \
                         WHERE excluded.offset > subscriptions.offset"
                    }
                })?;
                let now = now_millis();
                for (partition, offset) in &rows {
                    upsert.execute((&self.name, partition, offset, now))?;
                }
            }
            tx.commit()?;
            Ok(checkpoints)
        })
    }
}

impl Checkpointer for SubscriptionCheckpointer {
    async fn owned(&mut self) -> Result<(), CommitError> {
        let Some(lease) = &self.inner.lease else {
            return Ok(());
        };
        loop {
            match lease.standing() {
                Standing::Held => return Ok(()),
                // Not renewed for a lease time: the next renewal says whose it is.
                Standing::Unsure => tokio::time::sleep(Duration::from_millis(20)).await,
                Standing::Lost(reason) => {
                    return Err(CommitError {
                        cause: Box::new(lease.lost_error(reason)),
                    })
                }
            }
        }
    }

    async fn commit(&mut self, checkpoints: &[Checkpoint]) -> Result<(), CommitError> {
        let inner = self.inner.clone();
        let checkpoints = checkpoints.to_vec();
        let store = move || inner.store(&checkpoints, Store::Advance);
        // On a blocking thread: a commit may wait for another process's write lock.
        let stored = match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::task::spawn_blocking(store)
                .await
                .unwrap_or_else(|e| Err(HubError::Task(format!("commit task: {e}")))),
            Err(_) => store(),
        };
        stored.map_err(|e| CommitError { cause: Box::new(e) })
    }
}
