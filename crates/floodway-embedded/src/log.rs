//! The log: partitions of segments in the hub file. Appending (the writer thread and its group
//! commits, with the dedupe table), offsets by time, single records, and retention live here,
//! below both the hub handle and the subscriptions that read it.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use bytes::Bytes;
use floodway::event::now_millis;
use rusqlite::{Connection, OptionalExtension};
use tokio::sync::{oneshot, Notify};

use crate::error::HubError;
use crate::options::Retention;
use crate::segment::Filling;
use crate::store::{WriteGate, PRUNE_BATCH};
pub use floodway::hub::RetentionReport;

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

pub(crate) struct Row {
    pub(crate) partition: u32,
    pub(crate) id: String,
    pub(crate) data: Bytes,
}

pub(crate) struct WriteRequest {
    pub(crate) rows: Vec<Row>,
    pub(crate) dedupe: bool,
    pub(crate) reply: oneshot::Sender<Result<PublishReceipt, HubError>>,
}

/// Segments deleted by retention in one transaction at most, and their bytes.
pub(crate) const RETENTION_SEGMENTS: usize = 256;
pub(crate) const RETENTION_BYTES: i64 = 32 << 20;

/// A duration in whole milliseconds, `i64::MAX` for one too long to count (a setting of
/// `Duration::MAX` means "never", not a negative time).
pub(crate) fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The last offset of partition `p` that `retention`'s limits ask to delete (the last event
/// of a segment), if any. Reads only what it deletes: offsets and publish times grow together.
pub(crate) fn retention_cut(
    conn: &Connection,
    p: u32,
    retention: &Retention,
) -> Result<Option<i64>, HubError> {
    let mut through: Option<i64> = None;
    if let Some(age) = retention.max_age {
        let cutoff = now_millis().saturating_sub(millis(age));
        let before = offset_before(conn, p, cutoff)? as i64;
        through = (before > 0).then_some(before);
    }
    if let Some(max_bytes) = retention.max_bytes_per_partition {
        let held: i64 = conn.query_row(
            "SELECT bytes FROM partitions WHERE partition = ?1",
            [p],
            |r| r.get(0),
        )?;
        let mut excess = held.saturating_sub(i64::try_from(max_bytes).unwrap_or(i64::MAX));
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
pub(crate) struct Step {
    pub(crate) deleted: i64,
    /// Whether there may be more to delete.
    pub(crate) more: bool,
    /// The last offset it may delete through (the limits' cut, held back for unread events).
    pub(crate) through: i64,
    /// Subscriptions behind the limits' cut.
    pub(crate) behind: Vec<String>,
}

/// Deletes the oldest segments of partition `p` ending at or before `wanted` (and, with
/// `keep_unread`, at or before every subscription's checkpoint, read in this transaction):
/// `segments` at most, and [`RETENTION_BYTES`] unless a single segment is larger.
pub(crate) fn delete_step(
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

/// Owns the writing connection; commits what publishers hand it, many at a time.
pub(crate) struct Writer {
    pub(crate) conn: Connection,
    pub(crate) gate: WriteGate,
    pub(crate) requests: mpsc::Receiver<WriteRequest>,
    /// Woken after every commit, so this process's readers read at once.
    pub(crate) published: Arc<Notify>,
    pub(crate) max_commit: usize,
    pub(crate) dedupe_window_ms: i64,
    pub(crate) busy_retry: Duration,
    /// When the dedupe table may next hold keys older than the window (ms since the epoch).
    pub(crate) next_prune: i64,
}

/// Deletes up to `limit` idempotency keys older than the hub's longest window (this
/// process's, or a longer one another process opened the hub with), in a transaction of the
/// caller's; returns the keys deleted and when the oldest key left expires (`now + window` if
/// none is left), or `now` if there may be more to delete.
pub(crate) fn prune_dedupe(
    tx: &Connection,
    own_window_ms: i64,
    limit: usize,
    now: i64,
) -> rusqlite::Result<(usize, i64)> {
    // Another process may keep keys longer.
    let longest: Option<String> = tx
        .prepare_cached("SELECT value FROM floodway_meta WHERE key = ?1")?
        .query_row([crate::schema::DEDUPE_WINDOW_KEY], |r| r.get(0))
        .optional()?;
    let window_ms = longest
        .and_then(|v| v.parse::<i64>().ok())
        .map_or(own_window_ms, |l| l.max(own_window_ms));
    let cutoff = now - window_ms;
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
    Ok((
        deleted,
        oldest
            .map_or(now, |t| t.max(cutoff))
            .saturating_add(window_ms),
    ))
}

impl Writer {
    pub(crate) fn run(mut self) {
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
                    {
                        self.published.notify_waiters();
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
        let _turn = self.gate.enter();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Read holding the write lock, which may have taken a while to get (another process
        // writing): publish times then follow offsets across processes, as a start at a time
        // (`offset_before`) expects.
        let now = now_millis();
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
            (_, next_prune) =
                prune_dedupe(&tx, self.dedupe_window_ms, 2 * added + PRUNE_BATCH, now)?;
        }
        tx.commit()?;
        self.next_prune = next_prune;
        Ok(receipts)
    }
}

/// When the oldest event subscription `name` has not read was published (ms since the
/// epoch): `None` when it has read every event held (or has no checkpoint in this file).
/// Index seeks: a partition's segment holding the first offset after its checkpoint.
pub(crate) fn first_unread_published(
    conn: &Connection,
    name: &str,
) -> rusqlite::Result<Option<i64>> {
    let read: Vec<(u32, i64)> = {
        let mut statement =
            conn.prepare_cached("SELECT partition, offset FROM subscriptions WHERE name = ?1")?;
        let rows = statement.query_map([name], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let mut oldest: Option<i64> = None;
    for (partition, done) in read {
        let next = done.saturating_add(1);
        // The segment holding `next`, else the first one after it (retention may have cut
        // below it).
        let holding: Option<(i64, i64)> = conn
            .prepare_cached(
                "SELECT last, published FROM events WHERE partition = ?1 AND offset <= ?2 \
                 ORDER BY offset DESC LIMIT 1",
            )?
            .query_row((partition, next), |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let published = match holding {
            Some((last, published)) if last >= next => Some(published),
            _ => conn
                .prepare_cached(
                    "SELECT published FROM events WHERE partition = ?1 AND offset > ?2 \
                     ORDER BY offset LIMIT 1",
                )?
                .query_row((partition, next), |r| r.get(0))
                .optional()?,
        };
        if let Some(published) = published {
            oldest = Some(oldest.map_or(published, |o: i64| o.min(published)));
        }
    }
    Ok(oldest)
}

/// The last offset published before `time` in a partition (just below the first offset held
/// if every event held is at or after `time`; the partition's last offset when retention
/// has deleted all it held, 0 when nothing was ever published to it).
pub(crate) fn offset_before(conn: &Connection, partition: u32, time: i64) -> rusqlite::Result<u64> {
    // Segments are published in offset order and every event of one shares its publish time:
    // binary search over the segments' first offsets, by point lookups.
    let bounds: Option<(i64, i64)> = conn.query_row(
        "SELECT min(offset), max(offset) FROM events WHERE partition = ?1",
        [partition],
        |r| Ok(r.get::<_, Option<i64>>(0)?.zip(r.get::<_, Option<i64>>(1)?)),
    )?;
    let Some((mut lo, mut hi)) = bounds else {
        // Nothing held: whatever was published is gone, and there is nothing before `time`
        // left to read (starting at 0 would count it all as lag, then as lost).
        let last: Option<i64> = conn
            .query_row(
                "SELECT last_offset FROM partitions WHERE partition = ?1",
                [partition],
                |r| r.get(0),
            )
            .optional()?;
        return Ok(last.map_or(0, |l| l.max(0) as u64));
    };
    // The first segment starting at or after `offset`: (its first offset, last offset, time).
    let segment = |offset: i64| -> rusqlite::Result<Option<(i64, i64, i64)>> {
        conn.query_row(
            "SELECT offset, last, published FROM events WHERE partition = ?1 AND offset >= ?2 \
             ORDER BY offset LIMIT 1",
            (partition, offset),
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
    };
    match segment(lo)? {
        Some((_, _, published)) if published < time => {}
        _ => return Ok(lo as u64 - 1),
    }
    // Invariant: the segment starting at `lo` was published before `time`; find the last such.
    while lo < hi {
        let mid = lo + (hi - lo + 1) / 2;
        match segment(mid)? {
            Some((first, _, published)) if published < time => lo = first,
            _ => hi = mid - 1,
        }
    }
    Ok(segment(lo)?.map_or(lo as u64, |(_, last, _)| last as u64))
}
