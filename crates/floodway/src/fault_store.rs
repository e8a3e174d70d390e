//! The contract of a fault store: where fault events are kept by fault id, listed and
//! filtered, and where resubmissions are recorded. The embedded hub's SQLite store and the
//! in-memory store implement it; `floodway::testing::conformance` holds the scenarios every
//! store passes.
//!
//! A fault is one failure (its [fault id](crate::fault::fault_id)); each time it is raised a
//! fault event with a new event id is published. A store counts each raise once however often
//! it is stored, moves the last-seen time, and opens a fault again when it is raised after its
//! last successful resubmission.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use crate::error::Error;
use crate::event::{now_millis, Event};
use crate::fault::FaultDetails;
use crate::hub::HubFuture;

/// Where a fault stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultStatus {
    /// Not resubmitted, or resubmitted and failed again.
    Open,
    /// Resubmitted and processed.
    Resolved,
}

impl FaultStatus {
    /// Its name: `open` or `resolved`.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultStatus::Open => "open",
            FaultStatus::Resolved => "resolved",
        }
    }

    /// From its name (anything but `resolved` is open).
    pub fn parse(s: &str) -> FaultStatus {
        match s {
            "resolved" => FaultStatus::Resolved,
            _ => FaultStatus::Open,
        }
    }
}

/// A stored fault.
#[derive(Debug, Clone)]
pub struct StoredFault {
    /// The fault's id (deterministic: the same failure stores once).
    pub id: String,
    /// The processor that raised it.
    pub processor: String,
    /// The pipeline that failed (`*` for records that could not be decoded).
    pub pipeline: String,
    /// The step that failed.
    pub step: String,
    /// The error's name.
    pub name: String,
    /// The error's class.
    pub class: String,
    /// The error's message.
    pub message: String,
    /// When it was first stored (ms since the epoch).
    pub first_seen: i64,
    /// When it was last stored.
    pub last_seen: i64,
    /// How many times it was raised.
    pub seen: u64,
    /// Where it stands.
    pub status: FaultStatus,
    /// The fault event.
    pub fault: Event,
}

impl StoredFault {
    /// The fault's details: the error and the source record.
    ///
    /// # Errors
    /// When the stored event is not a fault event.
    pub fn details(&self) -> Result<FaultDetails, Error> {
        self.fault.payload()
    }
}

/// Which faults to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultFilter {
    /// Only this processor's.
    pub processor: Option<String>,
    /// Only this pipeline's.
    pub pipeline: Option<String>,
    /// Only errors of this name.
    pub error: Option<String>,
    /// Only faults last seen at or after this time (ms).
    pub since: Option<i64>,
    /// Only faults last seen before this time (ms).
    pub until: Option<i64>,
    /// Only faults with this status.
    pub status: Option<FaultStatus>,
    /// At most this many (newest first); all when `None`.
    pub limit: Option<usize>,
}

/// How a resubmission ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resubmission {
    /// When (ms since the epoch).
    pub at: i64,
    /// `succeeded` or `failed` ([`ResubmitOutcome::as_str`]).
    pub outcome: String,
    /// What happened.
    pub detail: String,
}

/// How a resubmission ended, as [`FaultStore::record_resubmission_of`] records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResubmitOutcome {
    /// The pipeline processed the record: the fault is resolved.
    Succeeded,
    /// It failed again.
    Failed,
}

impl ResubmitOutcome {
    /// Its name: `succeeded` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            ResubmitOutcome::Succeeded => "succeeded",
            ResubmitOutcome::Failed => "failed",
        }
    }
}

/// A fault store; see the [module docs](self).
pub trait FaultStore: Send + Sync + Debug + 'static {
    /// Stores fault events (raises); see the [module docs](self) for how raises count.
    fn store_faults<'a>(&'a self, faults: &'a [Event]) -> HubFuture<'a, ()>;

    /// The faults `filter` selects, newest (last seen) first.
    fn list_faults<'a>(&'a self, filter: &'a FaultFilter) -> HubFuture<'a, Vec<StoredFault>>;

    /// One fault.
    fn fault<'a>(&'a self, id: &'a str) -> HubFuture<'a, Option<StoredFault>>;

    /// Records a resubmission of fault `id` and how it ended; a success resolves it.
    fn record_resubmission_of<'a>(
        &'a self,
        id: &'a str,
        outcome: ResubmitOutcome,
        detail: &'a str,
    ) -> HubFuture<'a, ()>;

    /// A fault's resubmissions, oldest first.
    fn resubmissions_of<'a>(&'a self, id: &'a str) -> HubFuture<'a, Vec<Resubmission>>;

    /// Claims fault `id` for one resubmission by `claimant` (see [`claimant`]) for `lease`,
    /// the longest the resubmission may take: true when the fault is open and no other
    /// claimant holds a claim on it that has not expired. Recording the resubmission
    /// ([`record_resubmission_of`](Self::record_resubmission_of)) releases this process's
    /// claim ([`claimant`]; not one another took after this one's expired), so that
    /// two resubmitters (two consoles, a console and the command) never send one fault at
    /// once, and neither sends a fault the other has just resolved. A store that cannot claim
    /// answers true, as this default does.
    fn claim_resubmission<'a>(
        &'a self,
        id: &'a str,
        claimant: &'a str,
        lease: std::time::Duration,
    ) -> HubFuture<'a, bool> {
        let _ = (id, claimant, lease);
        Box::pin(async { Ok(true) })
    }
}

/// This process's name as a claimant of resubmissions ([`FaultStore::claim_resubmission`]):
/// its pid and a random number, the same for the life of the process.
pub fn claimant() -> &'static str {
    static CLAIMANT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CLAIMANT.get_or_init(|| format!("{}-{:016x}", std::process::id(), fastrand::u64(..)))
}

/// How long a claim on a fault's resubmission lasts unless its resubmission is recorded first:
/// longer than any resubmission takes (a Lambda function runs up to 15 minutes).
pub const CLAIM_LEASE: std::time::Duration = std::time::Duration::from_secs(16 * 60);

impl FaultFilter {
    /// Whether `fault` passes this filter (all but `limit`).
    pub fn admits(&self, fault: &StoredFault) -> bool {
        let is = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        is(&self.processor, &fault.processor)
            && is(&self.pipeline, &fault.pipeline)
            && is(&self.error, &fault.name)
            && self.since.is_none_or(|t| fault.last_seen >= t)
            && self.until.is_none_or(|t| fault.last_seen < t)
            && self.status.is_none_or(|s| s == fault.status)
    }
}

/// A fault store in memory: the contract's reference implementation, for tests.
#[derive(Debug, Clone, Default)]
pub struct MemoryFaultStore {
    state: Arc<Mutex<MemoryFaults>>,
}

#[derive(Debug, Default)]
struct MemoryFaults {
    faults: HashMap<String, StoredFault>,
    raises: HashSet<String>,
    resubmissions: HashMap<String, Vec<Resubmission>>,
    /// Fault id to claimant and until when (ms since the epoch).
    claims: HashMap<String, (String, i64)>,
}

impl MemoryFaultStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl FaultStore for MemoryFaultStore {
    fn store_faults<'a>(&'a self, faults: &'a [Event]) -> HubFuture<'a, ()> {
        Box::pin(async move {
            let mut parsed = Vec::with_capacity(faults.len());
            for fault in faults {
                if !fault.is_fault() {
                    return Err(format!("event {} is not a fault", fault.id()).into());
                }
                let fault = crate::fault::normalized(fault);
                let details: FaultDetails = fault.payload().map_err(|e: Error| e.to_string())?;
                parsed.push((fault, details));
            }
            let mut state = self.state.lock().unwrap();
            let now = now_millis();
            for (fault, details) in parsed {
                if !state.raises.insert(fault.id().to_owned()) {
                    continue;
                }
                let id = crate::fault::fault_id(&fault).to_owned();
                let resolved_at = state
                    .resubmissions
                    .get(&id)
                    .into_iter()
                    .flatten()
                    .filter(|r| r.outcome == "succeeded")
                    .map(|r| r.at)
                    .max()
                    .unwrap_or(0);
                let tag = |name: &str| fault.tag(name).unwrap_or("").to_owned();
                let fresh = StoredFault {
                    id: id.clone(),
                    processor: tag("processor"),
                    pipeline: tag("pipeline"),
                    step: tag("step"),
                    name: details.err.name.clone(),
                    class: details.err.class.clone(),
                    message: details.err.message.clone(),
                    first_seen: now,
                    last_seen: now,
                    seen: 1,
                    status: FaultStatus::Open,
                    fault: (*fault).clone(),
                };
                match state.faults.get_mut(&id) {
                    None => {
                        state.faults.insert(id, fresh);
                    }
                    Some(stored) => {
                        stored.seen += 1;
                        stored.last_seen = now;
                        if fault.timestamp() > resolved_at {
                            let (first_seen, seen) = (stored.first_seen, stored.seen);
                            *stored = StoredFault {
                                first_seen,
                                seen,
                                ..fresh
                            };
                        }
                    }
                }
            }
            Ok(())
        })
    }

    fn list_faults<'a>(&'a self, filter: &'a FaultFilter) -> HubFuture<'a, Vec<StoredFault>> {
        Box::pin(async move {
            let state = self.state.lock().unwrap();
            let mut out: Vec<StoredFault> = state
                .faults
                .values()
                .filter(|f| filter.admits(f))
                .cloned()
                .collect();
            out.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then(a.id.cmp(&b.id)));
            out.truncate(filter.limit.unwrap_or(usize::MAX));
            Ok(out)
        })
    }

    fn fault<'a>(&'a self, id: &'a str) -> HubFuture<'a, Option<StoredFault>> {
        Box::pin(async move { Ok(self.state.lock().unwrap().faults.get(id).cloned()) })
    }

    fn record_resubmission_of<'a>(
        &'a self,
        id: &'a str,
        outcome: ResubmitOutcome,
        detail: &'a str,
    ) -> HubFuture<'a, ()> {
        Box::pin(async move {
            let mut state = self.state.lock().unwrap();
            let list = state.resubmissions.entry(id.to_owned()).or_default();
            let at = now_millis().max(list.last().map_or(0, |r| r.at + 1));
            list.push(Resubmission {
                at,
                outcome: outcome.as_str().to_owned(),
                detail: detail.to_owned(),
            });
            if outcome == ResubmitOutcome::Succeeded {
                if let Some(fault) = state.faults.get_mut(id) {
                    fault.status = FaultStatus::Resolved;
                }
            }
            // This process's claim, not another's taken since this one's expired.
            if state.claims.get(id).is_some_and(|(by, _)| by == claimant()) {
                state.claims.remove(id);
            }
            Ok(())
        })
    }

    fn claim_resubmission<'a>(
        &'a self,
        id: &'a str,
        claimant: &'a str,
        lease: std::time::Duration,
    ) -> HubFuture<'a, bool> {
        Box::pin(async move {
            let mut state = self.state.lock().unwrap();
            let open = state
                .faults
                .get(id)
                .is_some_and(|f| f.status == FaultStatus::Open);
            let now = now_millis();
            let free = state
                .claims
                .get(id)
                .is_none_or(|(by, until)| by == claimant || *until <= now);
            if !(open && free) {
                return Ok(false);
            }
            let until = now.saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX));
            state
                .claims
                .insert(id.to_owned(), (claimant.to_owned(), until));
            Ok(true)
        })
    }

    fn resubmissions_of<'a>(&'a self, id: &'a str) -> HubFuture<'a, Vec<Resubmission>> {
        Box::pin(async move {
            Ok(self
                .state
                .lock()
                .unwrap()
                .resubmissions
                .get(id)
                .cloned()
                .unwrap_or_default())
        })
    }
}

/// Sends a fault's record through the pipeline that failed it, once, and records the outcome
/// with the fault: `Succeeded` resolves it. The record comes from the fault, or from `hub` by
/// its position when the fault's pipeline redacts fields. `processor` is the one that failed
/// it (its other pipelines do not see the record); `within` bounds the call, so that a target
/// failing transiently is reported rather than waited out as an outage.
///
/// # Errors
/// Only when the outcome cannot be recorded (the store failed); every failure of the record
/// itself is an outcome, with what went wrong as its detail.
pub async fn resubmit(
    store: &dyn FaultStore,
    hub: &dyn crate::hub::EventHub,
    processor: &crate::runtime::Processor,
    fault: &StoredFault,
    within: std::time::Duration,
) -> Result<(ResubmitOutcome, String), crate::BoxError> {
    let (outcome, detail) = match attempt(hub, processor, fault, within).await {
        Ok(()) => (ResubmitOutcome::Succeeded, "processed".to_owned()),
        Err(why) => (ResubmitOutcome::Failed, why),
    };
    store
        .record_resubmission_of(&fault.id, outcome, &detail)
        .await?;
    Ok((outcome, detail))
}

/// Runs a fault's record through its pipeline once; the reason when it is not done.
async fn attempt(
    hub: &dyn crate::hub::EventHub,
    processor: &crate::runtime::Processor,
    fault: &StoredFault,
    within: std::time::Duration,
) -> Result<(), String> {
    if fault.pipeline == crate::fault::DECODE_PIPELINE {
        return Err("the record could not be decoded: no pipeline can take it".into());
    }
    let r = fault.details().map_err(|e| e.to_string())?.uow.record;
    let data = if !r.carried() {
        // The fault does not carry the record (redacted, or trimmed to fit its store): read
        // it back from the hub by position.
        hub.record_at(&r.partition, r.offset)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the fault does not carry the record and the hub no longer holds it (retention deleted it)")?
    } else {
        r.bytes().map_err(|e| e.to_string())?
    };
    let record = crate::uow::Record::new(r.source.clone(), r.partition.clone(), r.offset, data)
        .with_attempt(r.attempt + 1)
        .resubmitting(fault.id.as_str());
    let only = processor.only_taking(&fault.pipeline, &record)?;
    let deadline = tokio::time::Instant::now() + within;
    let report = only.process_batch(vec![record], Some(deadline)).await;
    match (
        report.outcomes.first().and_then(|o| o.settlement),
        report.fatal,
    ) {
        (Some(crate::source::Settlement::Done), _) => Ok(()),
        (_, Some(err)) => Err(err.to_string()),
        (Some(_), None) => Err("faulted again: see the fault's latest error".into()),
        (None, None) => {
            Err("not done within the deadline (the target kept failing transiently)".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::memory::{MemoryFaultSink, MemoryHub, MemorySink};
    use crate::{Pipeline, Processor, Record};

    /// Processor `p` with pipeline `strict`, enabled or not, failing every event or none (and
    /// one for other events).
    fn processor(faults: &MemoryFaultSink, enabled: bool, fail: bool) -> Processor {
        Processor::builder("p")
            .fault_sink(faults.clone())
            .pipeline(
                Pipeline::builder("strict")
                    .enabled(enabled)
                    .validate(move |_| match fail {
                        true => Err(Error::poison_msg("Rejected", "not yet")),
                        false => Ok(()),
                    })
                    .sink(MemorySink::new())
                    .unwrap(),
            )
            .pipeline(
                Pipeline::builder("other")
                    .event_type("other")
                    .sink(MemorySink::new())
                    .unwrap(),
            )
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn a_disabled_pipeline_takes_no_resubmission() {
        let faults = MemoryFaultSink::new();
        let event = Event::builder("thing", "k").id("e1").build();
        let record = Record::new("memory", "0", 1, event.to_json());
        processor(&faults, true, true)
            .process_batch(vec![record], None)
            .await;
        let store = MemoryFaultStore::new();
        store.store_faults(&faults.faults()).await.unwrap();
        let fault = store
            .list_faults(&FaultFilter::default())
            .await
            .unwrap()
            .remove(0);
        let hub = MemoryHub::new(1);
        let within = Duration::from_secs(5);
        // Disabled, the pipeline would take nothing and the record count as done.
        let disabled = processor(&faults, false, false);
        let (outcome, detail) = resubmit(&store, &hub, &disabled, &fault, within)
            .await
            .unwrap();
        assert_eq!(outcome, ResubmitOutcome::Failed);
        assert!(detail.contains("disabled"), "{detail}");
        let fixed = processor(&faults, true, false);
        let (outcome, detail) = resubmit(&store, &hub, &fixed, &fault, within)
            .await
            .unwrap();
        assert_eq!(outcome, ResubmitOutcome::Succeeded, "{detail}");
    }
}
