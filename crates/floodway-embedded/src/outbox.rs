//! The transactional outbox: events written in the same transaction as the rows they come
//! from, and the relay that publishes them.
//!
//! A [`RowTable`](crate::RowTable) with the outbox on writes each change of what a row shows
//! (and each event a service emits in its transaction) to the `outbox` table, in the
//! transaction that changes the row: both land or neither does. The [`OutboxRelay`] reads the
//! outbox in order, publishes a batch to the hub idempotently (the event's id, derived from the
//! row and the event that changed it, is the idempotency key), and only then deletes the batch
//! and counts it as published. A crash between publishing and deleting publishes the batch
//! again, which the hub's dedupe window and the readers (the views' versions, the row tables'
//! inboxes) absorb: at least once,
//! exactly once in a view downstream, in order per row (the relay is one sequence, and one
//! process at a time relays: it holds a lease).

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use floodway::event::{now_millis, DEFAULT_MAX_EVENT_SIZE};
use floodway::{ErrorClass, Event, SharedHub};
use rusqlite::{Connection, Transaction};

use crate::error::HubError;
use crate::lease::{Lease, Standing};
use crate::store::Store;

/// Makes the outbox's tables if missing.
pub(crate) fn create(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, \
         source TEXT NOT NULL, event TEXT NOT NULL, created INTEGER NOT NULL); \
         CREATE TABLE IF NOT EXISTS outbox_sources (source TEXT PRIMARY KEY, \
         published INTEGER NOT NULL, last_published INTEGER) WITHOUT ROWID;",
    )
}

/// Adds `events` from `source` to the outbox, in `tx`.
///
/// # Errors
/// [`HubError::Invalid`] (poison) for an event the relay could not publish: over the 1 MiB an
/// event may have, or without an id or a type. Refused here, with the transaction that made
/// it, rather than stored where it would stop the relay, and every event after it, for good.
pub(crate) fn add<'e>(
    tx: &Transaction<'_>,
    source: &str,
    events: impl Iterator<Item = &'e Event>,
    now: i64,
) -> Result<(), HubError> {
    let mut insert = None;
    for event in events {
        let text = event.to_json();
        if text.len() > DEFAULT_MAX_EVENT_SIZE
            || event.id().is_empty()
            || event.event_type().is_empty()
        {
            return Err(HubError::Invalid(format!(
                "event `{}` of type `{}` cannot go through the outbox: {}",
                event.id(),
                event.event_type(),
                if text.len() > DEFAULT_MAX_EVENT_SIZE {
                    format!(
                        "{} bytes, over the {DEFAULT_MAX_EVENT_SIZE} an event may have",
                        text.len()
                    )
                } else {
                    "an event needs an id and a type".to_owned()
                }
            )));
        }
        let stmt = match &mut insert {
            Some(stmt) => stmt,
            None => insert.insert(tx.prepare_cached(
                "INSERT INTO outbox (source, event, created) VALUES (?1, ?2, ?3)",
            )?),
        };
        stmt.execute((source, text, now))?;
    }
    Ok(())
}

/// How far one source's changes are.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutboxSource {
    /// The source (`rows:{table}`).
    pub source: String,
    /// Written, not yet published.
    pub pending: u64,
    /// When the oldest pending one was written (ms since the epoch).
    pub oldest_pending: Option<i64>,
    /// Published so far.
    pub published: u64,
    /// When the relay last published one (ms since the epoch).
    pub last_published: Option<i64>,
}

/// The outbox at a glance (`floodway outbox stats`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutboxStats {
    /// Per source, by name.
    pub sources: Vec<OutboxSource>,
    /// Who relays, if anyone holds the relay's lease now.
    pub relay: Option<crate::LeaseHolder>,
}

impl OutboxStats {
    /// Pending events over all sources.
    pub fn pending(&self) -> u64 {
        self.sources.iter().map(|s| s.pending).sum()
    }

    /// Published events over all sources.
    pub fn published(&self) -> u64 {
        self.sources.iter().map(|s| s.published).sum()
    }
}

/// The lease the relay holds (not a valid subscription name, so it cannot clash with one).
const RELAY_LEASE: &str = "outbox:relay";

/// The hub file's outbox: what is pending and what was published.
pub struct Outbox {
    store: Store,
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").finish_non_exhaustive()
    }
}

/// One pending event.
#[derive(Debug, Clone)]
pub struct Pending {
    /// Its place in the outbox.
    pub seq: i64,
    /// Its source.
    pub source: String,
    /// The event.
    pub event: Event,
}

impl Outbox {
    pub(crate) fn open(store: &Store) -> Result<Outbox, HubError> {
        let conn = store.connect()?;
        crate::busy::retry("outbox", store.options.busy_retry, || {
            let _turn = store.gate.enter();
            create(&conn)?;
            Ok(())
        })?;
        Ok(Outbox {
            store: store.clone(),
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>, HubError> {
        self.conn.lock().map_err(|_| HubError::Closed)
    }

    /// The oldest pending events, in order, at most `limit`.
    ///
    /// # Errors
    /// A storage failure, or a stored event that does not parse.
    pub fn pending(&self, limit: usize) -> Result<Vec<Pending>, HubError> {
        self.pending_within(limit, usize::MAX)
    }

    /// The oldest pending events, in order, at most `limit` and, past the first, at most
    /// `max_bytes` of their text in all: what a relay holds at once (row changes carry both
    /// images of a row, up to 1 MiB an event).
    ///
    /// # Errors
    /// A storage failure, or a stored event that does not parse.
    pub fn pending_within(&self, limit: usize, max_bytes: usize) -> Result<Vec<Pending>, HubError> {
        let conn = self.conn()?;
        let mut stmt =
            conn.prepare_cached("SELECT seq, source, event FROM outbox ORDER BY seq LIMIT ?1")?;
        let mut rows = stmt.query([limit as i64])?;
        let (mut out, mut bytes) = (Vec::new(), 0usize);
        while let Some(row) = rows.next()? {
            let text = row.get_ref(2)?.as_str().map_err(rusqlite::Error::from)?;
            bytes = bytes.saturating_add(text.len());
            if bytes > max_bytes && !out.is_empty() {
                break;
            }
            let event = Event::decode(text.as_bytes()).map_err(|e| HubError::Corrupt {
                what: "outbox event",
                detail: e.to_string(),
            })?;
            out.push(Pending {
                seq: row.get(0)?,
                source: row.get(1)?,
                event,
            });
        }
        Ok(out)
    }

    /// Marks `published` (a prefix of what [`Outbox::pending`] gave) as published: deletes it
    /// and counts it per source, checking `lease` still holds the relay.
    fn mark(&self, published: &[Pending], lease: Option<&Lease>) -> Result<(), HubError> {
        let Some(last) = published.last() else {
            return Ok(());
        };
        let mut per_source: std::collections::BTreeMap<&str, u64> = Default::default();
        for p in published {
            *per_source.entry(&p.source).or_default() += 1;
        }
        crate::busy::retry("outbox", self.store.options.busy_retry, || {
            let mut conn = self.conn()?;
            let _turn = self.store.gate.enter();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            if let Some(lease) = lease {
                lease.check(&tx)?;
            }
            tx.execute("DELETE FROM outbox WHERE seq <= ?1", [last.seq])?;
            let now = now_millis();
            for (source, n) in &per_source {
                tx.execute(
                    "INSERT INTO outbox_sources (source, published, last_published) \
                     VALUES (?1, ?2, ?3) ON CONFLICT (source) DO UPDATE SET \
                     published = published + excluded.published, \
                     last_published = excluded.last_published",
                    (source, *n as i64, now),
                )?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// What is pending and published, per source.
    ///
    /// # Errors
    /// A storage failure.
    pub fn stats(&self) -> Result<OutboxStats, HubError> {
        let conn = self.conn()?;
        let mut sources: std::collections::BTreeMap<String, OutboxSource> = Default::default();
        let mut pending =
            conn.prepare("SELECT source, count(*), min(created) FROM outbox GROUP BY source")?;
        for row in pending.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Option<i64>>(2)?,
            ))
        })? {
            let (source, n, oldest) = row?;
            let s = sources.entry(source.clone()).or_default();
            s.source = source;
            s.pending = n as u64;
            s.oldest_pending = oldest;
        }
        let mut published =
            conn.prepare("SELECT source, published, last_published FROM outbox_sources")?;
        for row in published.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Option<i64>>(2)?,
            ))
        })? {
            let (source, n, last) = row?;
            let s = sources.entry(source.clone()).or_default();
            s.source = source;
            s.published = n as u64;
            s.last_published = last;
        }
        let now = now_millis();
        let relay = crate::lease::holder(&conn, RELAY_LEASE)?
            .filter(|(h, process)| crate::lease::in_force(h, process, now))
            .map(|(h, _)| h);
        Ok(OutboxStats {
            sources: sources.into_values().collect(),
            relay,
        })
    }
}

/// What a relay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RelayReport {
    /// Events published.
    pub published: u64,
    /// Of those, events the hub already held (a batch published again after a crash).
    pub duplicates: u64,
    /// Publishes that failed and were tried again.
    pub retries: u64,
}

/// Publishes the outbox to a hub: in order, a batch at a time, idempotently by event id, and
/// deletes a batch only once it is published (at least once, in order per row); one process
/// at a time relays, holding a lease.
#[derive(Debug)]
pub struct OutboxRelay {
    outbox: Outbox,
    batch: usize,
    max_bytes: usize,
    poll: Duration,
}

/// The most of events' text a relay takes from the outbox at once, past the first event.
const RELAY_BYTES: usize = 8 << 20;

impl OutboxRelay {
    /// A relay of the outbox of `hub` (the hub file), publishing 500 events (and at most
    /// 8 MiB of them) at a time and looking for more every 20 ms when there were none.
    ///
    /// # Errors
    /// A storage failure.
    pub fn new(hub: &crate::Hub) -> Result<OutboxRelay, HubError> {
        Ok(OutboxRelay {
            outbox: hub.outbox()?,
            batch: 500,
            max_bytes: RELAY_BYTES,
            poll: Duration::from_millis(20),
        })
    }

    /// Events per publish at most.
    #[must_use]
    pub fn batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// How often an empty outbox is looked at again.
    #[must_use]
    pub fn poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// Publishes what is pending to `to` until `stop` completes (then it finishes the batch in
    /// hand). It first takes the relay's lease, waiting while another process holds it; a
    /// publish that fails is tried again with backoff (up to 5 s apart), forever: the outbox
    /// keeps the events meanwhile.
    ///
    /// # Errors
    /// A storage failure of the hub file, or the lease lost to another process.
    pub async fn run(
        self,
        to: SharedHub,
        stop: impl Future<Output = ()> + Send,
    ) -> Result<RelayReport, HubError> {
        let mut stop = std::pin::pin!(stop);
        let mut report = RelayReport::default();
        let store = self.outbox.store.clone();
        let lease = loop {
            match crate::blocking(|| Lease::acquire(&store, RELAY_LEASE)) {
                Ok(lease) => break lease,
                Err(HubError::Held { .. }) => {
                    tokio::select! {
                        () = &mut stop => return Ok(report),
                        () = tokio::time::sleep(store.options.lease / 3) => {}
                    }
                }
                Err(e) => return Err(e),
            }
        };
        let mut backoff = Duration::from_millis(50);
        loop {
            match lease.standing() {
                Standing::Lost(reason) => return Err(lease.lost_error(reason)),
                Standing::Unsure => {
                    // Not renewed for a lease time: another process may be relaying by now.
                    // Nothing is published until the lease is held again, as a subscription's
                    // reader hands nothing out.
                    tokio::select! {
                        () = &mut stop => return Ok(report),
                        () = tokio::time::sleep(self.poll) => continue,
                    }
                }
                Standing::Held => {}
            }
            let pending =
                crate::blocking(|| self.outbox.pending_within(self.batch, self.max_bytes))?;
            if pending.is_empty() {
                tokio::select! {
                    () = &mut stop => return Ok(report),
                    () = tokio::time::sleep(self.poll) => continue,
                }
            }
            let events: Vec<Event> = pending.iter().map(|p| p.event.clone()).collect();
            match to.publish(&events, true).await {
                Ok(receipt) => {
                    crate::blocking(|| self.outbox.mark(&pending, Some(&lease)))?;
                    report.published += events.len() as u64;
                    report.duplicates += receipt.duplicates as u64;
                    metrics::counter!("floodway_outbox_published_total")
                        .increment(events.len() as u64);
                    backoff = Duration::from_millis(50);
                }
                // The hub refuses an event, or is set up wrongly (a NATS server whose
                // `max_payload` is below what the outbox takes): retrying would stop the
                // relay here for good, silently. It fails, and `floodway run` with it,
                // naming the event.
                Err(e) if matches!(e.class(), ErrorClass::Poison | ErrorClass::Fatal) => {
                    return Err(HubError::Invalid(format!(
                        "the hub refuses the outbox's events from {} on ({e}): they stay in \
                         the outbox, and every change after them waits behind them",
                        events.first().map_or("?", Event::id)
                    )));
                }
                Err(e) => {
                    report.retries += 1;
                    tracing::warn!(error = %e, pending = events.len(), "outbox: publish failed; trying again in {backoff:?}");
                    tokio::select! {
                        () = &mut stop => return Ok(report),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
            if std::future::Future::poll(
                stop.as_mut(),
                &mut std::task::Context::from_waker(std::task::Waker::noop()),
            )
            .is_ready()
            {
                return Ok(report);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a relay takes at once is bounded by bytes as well as by count, and always holds
    /// the first event however large.
    #[test]
    fn pending_events_are_taken_within_a_byte_bound() {
        let dir = tempfile::tempdir().unwrap();
        let hub =
            crate::Hub::open(dir.path().join("hub.db"), crate::HubOptions::default()).unwrap();
        let outbox = hub.outbox().unwrap();
        let events: Vec<Event> = (0..20)
            .map(|i| {
                Event::builder("row-updated", "k")
                    .id(format!("e{i}"))
                    .field("image", "x".repeat(900 << 10))
                    .build()
            })
            .collect();
        {
            let mut conn = outbox.conn().unwrap();
            let tx = conn.transaction().unwrap();
            add(&tx, "test", events.iter(), 1).unwrap();
            tx.commit().unwrap();
        }
        let taken = outbox.pending_within(500, RELAY_BYTES).unwrap();
        assert_eq!(taken.len(), 9, "8 MiB of 900 KiB events");
        let one = outbox.pending_within(500, 1).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(outbox.pending(500).unwrap().len(), 20);
    }
}
