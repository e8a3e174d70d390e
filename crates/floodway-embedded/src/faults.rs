//! The fault store: fault events by id, what people filter them by, and resubmissions.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use floodway::event::now_millis;
use floodway::fault::FaultDetails;
use floodway::layer::BoxFuture;
use floodway::{Error, Event};
use rusqlite::{Connection, OptionalExtension};

use crate::error::HubError;
use crate::store::{Store, WriteGate};

use floodway::fault_store::ResubmitOutcome;
pub use floodway::fault_store::{FaultFilter, FaultStatus, Resubmission, StoredFault};
use floodway::hub::HubFuture;

/// Fault events by id, in the hub file. Clones share one connection.
///
/// It is also a fault sink (`tower::Service<Event>`): give it to a processor to store faults
/// directly, or run a fault monitor that stores the `fault` events of the hub.
#[derive(Clone)]
pub struct FaultStore {
    conn: Arc<Mutex<Connection>>,
    gate: WriteGate,
    busy_retry: std::time::Duration,
}

impl std::fmt::Debug for FaultStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultStore").finish_non_exhaustive()
    }
}

/// What storing a fault event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stored {
    /// First time this fault was stored.
    New,
    /// The fault was stored before and is raised again: its count and last-seen time moved.
    Again,
    /// This very raise was stored before (the same fault event): nothing changed.
    Repeated,
}

/// How long the store remembers the raises it counted (ms).
const RAISE_MEMORY_MS: i64 = 24 * 3_600 * 1_000;

/// The table of counted raises, made when a store is opened (files of this format written
/// before it existed get it then).
const RAISES_TABLE: &str = "CREATE TABLE IF NOT EXISTS fault_raises (\
    raise_id TEXT PRIMARY KEY, fault TEXT NOT NULL, at INTEGER NOT NULL) WITHOUT ROWID;\
    CREATE INDEX IF NOT EXISTS fault_raises_at ON fault_raises (at);";

const COLUMNS: &str =
    "id, processor, pipeline, step, name, class, message, first_seen, last_seen, seen, status, fault";

fn row_to_fault(r: &rusqlite::Row<'_>) -> rusqlite::Result<(StoredFault, String)> {
    let text: String = r.get(11)?;
    Ok((
        StoredFault {
            id: r.get(0)?,
            processor: r.get(1)?,
            pipeline: r.get(2)?,
            step: r.get(3)?,
            name: r.get(4)?,
            class: r.get(5)?,
            message: r.get(6)?,
            first_seen: r.get(7)?,
            last_seen: r.get(8)?,
            seen: r.get::<_, i64>(9)? as u64,
            status: FaultStatus::parse(&r.get::<_, String>(10)?),
            fault: Event::builder("fault", "").build(),
        },
        text,
    ))
}

fn decode(parts: (StoredFault, String)) -> Result<StoredFault, HubError> {
    let (mut fault, text) = parts;
    // Whatever its size: the store takes a fault of any size (a monitor's own fault of a
    // fault too large to read among them), and one it cannot read would break every list.
    fault.fault =
        Event::decode_with_limit(text.as_bytes(), usize::MAX).map_err(|e| HubError::Corrupt {
            what: "fault event",
            detail: e.to_string(),
        })?;
    Ok(fault)
}

impl FaultStore {
    /// The fault store in the hub file, its table made on first use.
    pub(crate) fn open(store: &Store) -> Result<FaultStore, HubError> {
        let conn = store.connect()?;
        {
            let _turn = store.gate.enter();
            conn.execute_batch(RAISES_TABLE)?;
        }
        Ok(FaultStore {
            conn: Arc::new(Mutex::new(conn)),
            gate: store.gate.clone(),
            busy_retry: store.options.busy_retry,
        })
    }
}

impl FaultStore {
    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>, HubError> {
        self.conn.lock().map_err(|_| HubError::Closed)
    }

    /// Stores a fault event; a fault stored before counts once more (see
    /// [`store_all`](Self::store_all)).
    ///
    /// # Errors
    /// A poison error when `fault` is not a fault event; a storage failure.
    pub fn store(&self, fault: &Event) -> Result<Stored, HubError> {
        Ok(self.store_all(std::slice::from_ref(fault))?[0])
    }

    /// Stores fault events in one transaction, each by its
    /// [fault id](floodway::fault::fault_id): the first raise of a fault adds it, a later
    /// raise counts once more, moves its last-seen time and, if it was raised after its last
    /// successful resubmission, opens it again with its latest error. A raise is counted once
    /// however often it is stored (a fault monitor that stores a batch again after a failure,
    /// a fault event delivered twice): raises are remembered by their event id for a day.
    ///
    /// # Errors
    /// A poison error when an event is not a fault event (nothing is stored); a storage
    /// failure.
    pub fn store_all(&self, faults: &[Event]) -> Result<Vec<Stored>, HubError> {
        let mut rows = Vec::with_capacity(faults.len());
        for fault in faults {
            if !fault.is_fault() {
                return Err(HubError::Invalid(format!(
                    "event {} is of type `{}`, not a fault",
                    fault.id(),
                    fault.event_type()
                )));
            }
            let fault = floodway::fault::normalized(fault);
            let details: FaultDetails = fault.payload().map_err(|e| {
                HubError::Invalid(format!("fault {} is malformed: {e}", fault.id()))
            })?;
            rows.push((fault, details));
        }
        let now = now_millis();
        let mut conn = self.conn()?;
        // The turn is taken per try, so this process's other writers go on between tries.
        crate::busy::retry("fault store", self.busy_retry, || {
            let _turn = self.gate.enter();
            Self::store_rows(&mut conn, &rows, now)
        })
    }

    /// The transaction of [`store_all`](Self::store_all).
    fn store_rows(
        conn: &mut Connection,
        rows: &[(std::borrow::Cow<'_, Event>, FaultDetails)],
        now: i64,
    ) -> Result<Vec<Stored>, HubError> {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut stored = Vec::with_capacity(rows.len());
        {
            let mut raise = tx.prepare_cached(
                "INSERT INTO fault_raises (raise_id, fault, at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (raise_id) DO NOTHING",
            )?;
            let mut resolved = tx.prepare_cached(
                "SELECT coalesce(max(at), 0) FROM resubmissions \
                 WHERE fault = ?1 AND outcome = 'succeeded'",
            )?;
            let mut upsert = tx.prepare_cached(
                // ?10: whether this fault was raised after its last successful resubmission.
                // Then it is open again, with its latest error; a copy of an older one only
                // counts.
                "INSERT INTO faults (id, processor, pipeline, step, name, class, message, \
                 first_seen, last_seen, seen, status, fault) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, 1, 'open', ?9) \
                 ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen, seen = seen + 1, \
                 status = iif(?10, 'open', status), name = iif(?10, excluded.name, name), \
                 class = iif(?10, excluded.class, class), \
                 message = iif(?10, excluded.message, message), \
                 fault = iif(?10, excluded.fault, fault) \
                 RETURNING seen",
            )?;
            for (fault, details) in rows {
                let id = floodway::fault::fault_id(fault);
                if raise.execute((fault.id(), id, now))? == 0 {
                    stored.push(Stored::Repeated);
                    continue;
                }
                let tag = |name: &str| fault.tag(name).unwrap_or("").to_owned();
                let resolved_at: i64 = resolved.query_row([id], |r| r.get(0))?;
                let seen: i64 = upsert.query_row(
                    (
                        id,
                        tag("processor"),
                        tag("pipeline"),
                        tag("step"),
                        &details.err.name,
                        &details.err.class,
                        &details.err.message,
                        now,
                        fault.to_json(),
                        fault.timestamp() > resolved_at,
                    ),
                    |r| r.get(0),
                )?;
                stored.push(if seen == 1 {
                    Stored::New
                } else {
                    Stored::Again
                });
            }
            // Redeliveries of a raise come within minutes; a day of memory is plenty.
            tx.prepare_cached("DELETE FROM fault_raises WHERE at < ?1")?
                .execute([now - RAISE_MEMORY_MS])?;
        }
        tx.commit()?;
        Ok(stored)
    }

    /// One fault.
    ///
    /// # Errors
    /// A storage failure.
    pub fn get(&self, id: &str) -> Result<Option<StoredFault>, HubError> {
        let conn = self.conn()?;
        let row = conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM faults WHERE id = ?1"),
                [id],
                row_to_fault,
            )
            .optional()?;
        row.map(decode).transpose()
    }

    /// Faults matching `filter`, newest first.
    ///
    /// # Errors
    /// A storage failure.
    pub fn list(&self, filter: &FaultFilter) -> Result<Vec<StoredFault>, HubError> {
        let conn = self.conn()?;
        let mut sql = format!("SELECT {COLUMNS} FROM faults WHERE 1 = 1");
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        let mut add = |clause: &str, value: rusqlite::types::Value| {
            args.push(value);
            sql.push_str(&format!(" AND {clause} ?{}", args.len()));
        };
        if let Some(v) = &filter.processor {
            add("processor =", v.clone().into());
        }
        if let Some(v) = &filter.pipeline {
            add("pipeline =", v.clone().into());
        }
        if let Some(v) = &filter.error {
            add("name =", v.clone().into());
        }
        if let Some(v) = filter.since {
            add("last_seen >=", v.into());
        }
        if let Some(v) = filter.until {
            add("last_seen <", v.into());
        }
        if let Some(v) = filter.status {
            add("status =", v.as_str().to_owned().into());
        }
        sql.push_str(" ORDER BY last_seen DESC, id");
        if let Some(limit) = filter.limit {
            sql.push_str(&format!(" LIMIT {limit}"));
        }
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args), row_to_fault)?;
        rows.map(|r| decode(r?)).collect()
    }

    /// Records a resubmission of a fault and how it ended; a success resolves the fault.
    ///
    /// # Errors
    /// A storage failure.
    pub fn record_resubmission(
        &self,
        id: &str,
        outcome: &str,
        detail: &str,
    ) -> Result<(), HubError> {
        let mut conn = self.conn()?;
        crate::busy::retry("fault store", self.busy_retry, || {
            let _turn = self.gate.enter();
            Self::resubmission_row(&mut conn, id, outcome, detail)
        })
    }

    /// The transaction of [`record_resubmission`](Self::record_resubmission).
    fn resubmission_row(
        conn: &mut Connection,
        id: &str,
        outcome: &str,
        detail: &str,
    ) -> Result<(), HubError> {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Two resubmissions in one millisecond keep their order.
        let last: Option<i64> = tx.query_row(
            "SELECT max(at) FROM resubmissions WHERE fault = ?1",
            [id],
            |r| r.get(0),
        )?;
        let at = now_millis().max(last.map_or(0, |l| l + 1));
        tx.execute(
            "INSERT INTO resubmissions (fault, at, outcome, detail) VALUES (?1, ?2, ?3, ?4)",
            (id, at, outcome, detail),
        )?;
        if outcome == "succeeded" {
            tx.execute("UPDATE faults SET status = 'resolved' WHERE id = ?1", [id])?;
        }
        // This process's claim, not another's taken since this one's expired.
        tx.execute(
            "DELETE FROM fault_claims WHERE fault = ?1 AND claimant = ?2",
            (id, floodway::fault_store::claimant()),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Claims fault `id` for a resubmission by `claimant` until `lease` from now: true when
    /// it is open and no other claimant's claim is live (see
    /// [`FaultStore::claim_resubmission`](floodway::fault_store::FaultStore::claim_resubmission)).
    ///
    /// # Errors
    /// When SQLite fails.
    pub fn claim_resubmission(
        &self,
        id: &str,
        claimant: &str,
        lease: std::time::Duration,
    ) -> Result<bool, HubError> {
        let mut conn = self.conn()?;
        let lease = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        crate::busy::retry("fault store", self.busy_retry, || {
            let _turn = self.gate.enter();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let open: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM faults WHERE id = ?1 AND status = 'open')",
                [id],
                |r| r.get(0),
            )?;
            if !open {
                return Ok(false);
            }
            let now = now_millis();
            let claimed = tx.execute(
                "INSERT INTO fault_claims (fault, claimant, until) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (fault) DO UPDATE SET claimant = excluded.claimant, \
                 until = excluded.until \
                 WHERE fault_claims.until <= ?4 OR fault_claims.claimant = excluded.claimant",
                (id, claimant, now.saturating_add(lease), now),
            )? == 1;
            tx.commit()?;
            Ok(claimed)
        })
    }

    /// A fault's resubmissions, oldest first.
    ///
    /// # Errors
    /// A storage failure.
    pub fn resubmissions(&self, id: &str) -> Result<Vec<Resubmission>, HubError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(
            "SELECT at, outcome, detail FROM resubmissions WHERE fault = ?1 ORDER BY at",
        )?;
        let rows = stmt.query_map([id], |r| {
            Ok(Resubmission {
                at: r.get(0)?,
                outcome: r.get(1)?,
                detail: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

impl tower::Service<Event> for FaultStore {
    type Response = ();
    type Error = Error;
    type Future = BoxFuture<()>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, fault: Event) -> Self::Future {
        let result = crate::blocking(|| self.store(&fault));
        Box::pin(async move { result.map(|_| ()).map_err(Error::from) })
    }
}

/// The contract, on the hub file: the calls run on a blocking thread's terms (see
/// `crate::blocking`), as the rest of the hub's storage does.
impl floodway::fault_store::FaultStore for FaultStore {
    fn store_faults<'a>(&'a self, faults: &'a [Event]) -> HubFuture<'a, ()> {
        Box::pin(async move {
            crate::blocking(|| self.store_all(faults))?;
            Ok(())
        })
    }

    fn list_faults<'a>(&'a self, filter: &'a FaultFilter) -> HubFuture<'a, Vec<StoredFault>> {
        Box::pin(async move { Ok(crate::blocking(|| self.list(filter))?) })
    }

    fn fault<'a>(&'a self, id: &'a str) -> HubFuture<'a, Option<StoredFault>> {
        Box::pin(async move { Ok(crate::blocking(|| self.get(id))?) })
    }

    fn record_resubmission_of<'a>(
        &'a self,
        id: &'a str,
        outcome: ResubmitOutcome,
        detail: &'a str,
    ) -> HubFuture<'a, ()> {
        Box::pin(async move {
            crate::blocking(|| self.record_resubmission(id, outcome.as_str(), detail))?;
            Ok(())
        })
    }

    fn resubmissions_of<'a>(&'a self, id: &'a str) -> HubFuture<'a, Vec<Resubmission>> {
        Box::pin(async move { Ok(crate::blocking(|| self.resubmissions(id))?) })
    }

    fn claim_resubmission<'a>(
        &'a self,
        id: &'a str,
        claimant: &'a str,
        lease: std::time::Duration,
    ) -> HubFuture<'a, bool> {
        Box::pin(async move {
            Ok(crate::blocking(|| {
                FaultStore::claim_resubmission(self, id, claimant, lease)
            })?)
        })
    }
}
