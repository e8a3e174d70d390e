//! What the console does, not only shows: resubmit faults, replay a time range, pause and
//! resume a processor. Each is asked for twice: a dry run says what would happen and returns a
//! plan; only a confirmation naming that plan acts. Long actions run as jobs whose progress
//! and outcomes stream to the pages; every action is recorded with who asked and when.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use floodway::event::now_millis;
use floodway::fault_store::{FaultStatus, ResubmitOutcome, StoredFault};
use floodway::layer::limit::rate::RateLimiter;
use serde::Serialize;

use super::{Console, Scope};
use crate::faults_cmd::resubmit_one;

/// How long a dry run's plan waits for its confirmation.
const PLAN_LIFETIME: Duration = Duration::from_secs(600);

/// Outcomes kept per job for the page (the counts cover all of them).
const OUTCOMES_KEPT: usize = 500;

/// What a confirmed plan does.
pub(crate) enum Plan {
    /// Resubmit these faults.
    Resubmit(Vec<StoredFault>),
    /// Replay `(from, to)` to a processor.
    Replay {
        processor: String,
        from: i64,
        to: i64,
        events: Option<u64>,
    },
}

/// Plans kept waiting for their confirmation at most; the oldest goes first.
const PLANS_KEPT: usize = 32;

impl Plan {
    /// The action it is (`resubmit` or `replay`): a plan is confirmed only as that action.
    pub(crate) fn action(&self) -> &'static str {
        match self {
            Plan::Resubmit(_) => "resubmit",
            Plan::Replay { .. } => "replay",
        }
    }
}

/// Plans waiting for their confirmation.
#[derive(Default)]
pub(crate) struct Plans {
    plans: HashMap<String, (Instant, Plan)>,
}

impl Plans {
    /// Keeps `plan` under a new id, which the confirmation must name.
    pub(crate) fn keep(&mut self, plan: Plan) -> String {
        self.plans.retain(|_, (at, _)| at.elapsed() < PLAN_LIFETIME);
        if self.plans.len() >= PLANS_KEPT {
            let oldest = self
                .plans
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                self.plans.remove(&oldest);
            }
        }
        let id = super::random_hex(8);
        self.plans.insert(id.clone(), (Instant::now(), plan));
        id
    }

    /// The plan `id` of `action`, once: a plan is confirmed at most once.
    pub(crate) fn take(&mut self, id: &str, action: &str) -> Option<Plan> {
        if self.plans.get(id)?.1.action() != action {
            return None;
        }
        let (at, plan) = self.plans.remove(id)?;
        (at.elapsed() < PLAN_LIFETIME).then_some(plan)
    }
}

/// One action, as the audit log records it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub(crate) struct Recorded {
    pub(crate) at: i64,
    pub(crate) who: String,
    pub(crate) action: String,
    pub(crate) detail: String,
}

/// The audit log's entries shown at most (the file keeps them all).
const AUDIT_SHOWN: usize = 1000;

impl Recorded {
    /// The last entries of the audit log at `path` (none when it does not exist yet).
    pub(crate) fn read(path: &Path) -> anyhow::Result<Vec<Recorded>> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "cannot read the audit log {}: {e}",
                    path.display()
                ))
            }
        };
        let mut entries: Vec<Recorded> = text
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect();
        let skip = entries.len().saturating_sub(AUDIT_SHOWN);
        entries.drain(..skip);
        Ok(entries)
    }

    /// Appends this entry to the audit log at `path`.
    fn append(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write as _;
        let mut line = serde_json::to_vec(self)?;
        line.push(b'\n');
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?
            .write_all(&line)
    }
}

/// How one resubmitted fault ended.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Outcome {
    pub(crate) fault: String,
    pub(crate) outcome: &'static str,
    pub(crate) detail: String,
}

/// A long action and how far it is.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Job {
    pub(crate) id: String,
    pub(crate) kind: &'static str,
    pub(crate) title: String,
    pub(crate) who: String,
    pub(crate) started: i64,
    pub(crate) finished: Option<i64>,
    /// `running`, `done` or `failed`.
    pub(crate) state: &'static str,
    /// What it will go through, when known.
    pub(crate) total: Option<u64>,
    pub(crate) done: u64,
    pub(crate) succeeded: u64,
    pub(crate) failed: u64,
    /// Not sent: resolved meanwhile, sent by another job, or not sendable.
    pub(crate) skipped: u64,
    /// Why it stopped, when it failed.
    pub(crate) error: Option<String>,
    /// The latest outcomes, oldest first.
    pub(crate) outcomes: Vec<Outcome>,
}

/// The jobs of this console, newest last.
#[derive(Default)]
pub(crate) struct Jobs {
    pub(crate) jobs: Vec<Arc<Mutex<Job>>>,
}

impl Console {
    /// Records an action: kept for the page, told to everyone watching, and logged.
    pub(crate) fn record(&self, who: &str, action: &str, detail: String) {
        let entry = Recorded {
            at: now_millis(),
            who: who.to_owned(),
            action: action.to_owned(),
            detail,
        };
        eprintln!(
            "console: {} {}: {} ({})",
            entry.who,
            entry.action,
            entry.detail,
            crate::util::show_time(entry.at)
        );
        if let Some(path) = &self.audit_log {
            if let Err(e) = entry.append(path) {
                tracing::error!(error = %e, path = %path.display(), "cannot write the audit log");
            }
        }
        self.publish("audit", &entry);
        let mut audit = self.audit.lock().unwrap();
        if audit.len() == AUDIT_SHOWN {
            audit.remove(0);
        }
        audit.push(entry);
    }

    /// Starts a job of `kind` for `who`; its handle.
    fn start_job(
        &self,
        kind: &'static str,
        title: String,
        who: &str,
        total: Option<u64>,
    ) -> Arc<Mutex<Job>> {
        let job = Arc::new(Mutex::new(Job {
            id: super::random_hex(6),
            kind,
            title,
            who: who.to_owned(),
            started: now_millis(),
            finished: None,
            state: "running",
            total,
            done: 0,
            succeeded: 0,
            failed: 0,
            skipped: 0,
            error: None,
            outcomes: Vec::new(),
        }));
        self.jobs.lock().unwrap().jobs.push(job.clone());
        self.publish("job", &*job.lock().unwrap());
        job
    }

    /// Tells the pages where `job` is.
    fn tell(&self, job: &Mutex<Job>) {
        let snapshot = job.lock().unwrap().clone();
        self.publish("job", &snapshot);
    }

    /// Carries out a confirmed plan as a job; the job's id.
    pub(crate) fn carry_out(self: &Arc<Self>, plan: Plan, who: &str) -> String {
        match plan {
            Plan::Resubmit(faults) => {
                let title = format!("resubmit {} faults", faults.len());
                self.record(
                    who,
                    "resubmit",
                    format!(
                        "{} faults: {}",
                        faults.len(),
                        faults
                            .iter()
                            .take(20)
                            .map(|f| f.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
                let job = self.start_job("resubmit", title, who, Some(faults.len() as u64));
                let id = job.lock().unwrap().id.clone();
                let console = self.clone();
                tokio::spawn(async move {
                    let result = console.resubmit(&faults, &job).await;
                    console.finish(&job, result);
                });
                id
            }
            Plan::Replay {
                processor,
                from,
                to,
                events,
            } => {
                let title = format!("replay {} to {processor}", super::range_text(from, to));
                self.record(who, "replay", title.clone());
                let job = self.start_job("replay", title, who, events);
                let id = job.lock().unwrap().id.clone();
                let console = self.clone();
                tokio::spawn(async move {
                    let result = console.replay(&processor, (from, to), &job).await;
                    console.finish(&job, result);
                });
                id
            }
        }
    }

    fn finish(&self, job: &Mutex<Job>, result: anyhow::Result<()>) {
        {
            let mut job = job.lock().unwrap();
            job.finished = Some(now_millis());
            match result {
                Ok(()) => job.state = "done",
                Err(e) => {
                    job.state = "failed";
                    job.error = Some(format!("{e:#}"));
                }
            }
        }
        self.tell(job);
    }

    /// Resubmits `faults` to the configured processors, at most 100 a second.
    async fn resubmit(&self, faults: &[StoredFault], job: &Mutex<Job>) -> anyhow::Result<()> {
        let planned = self.plan(faults.to_vec());
        for (fault, why) in &planned.skipped {
            skip(job, &fault.id, why.clone());
        }
        // Each resubmission to Lambda is an invocation: 5 a second, as the command's default.
        let (processors, rate) = match &self.scope {
            Scope::Hub { hubs, config } => (planned.processors(hubs, config).await?, 100),
            Scope::Lambda { .. } => (HashMap::new(), 5),
        };
        let limiter = RateLimiter::per_second(rate)?;
        let mut told = Instant::now();
        for planned in &planned.faults {
            limiter.acquire().await;
            // Not sent by two jobs at once: claimed before the fault is read again, so that a
            // job which read it open while another was sending it cannot send it after.
            let Some(_sending) = Sending::claim(&self.sending, &planned.id) else {
                skip(job, &planned.id, "being resubmitted by another job".into());
                continue;
            };
            // And by no other process (another console, the command): claimed in the store.
            let claimed = self
                .faults
                .claim_resubmission(
                    &planned.id,
                    floodway::fault_store::claimant(),
                    floodway::fault_store::CLAIM_LEASE,
                )
                .await;
            // The fault as it is now, read after the claim: another job, console or the
            // command may have resolved it since the dry run, and a resolved fault is not
            // applied again.
            let now = self.faults.fault(&planned.id).await;
            let fault = match (claimed, now) {
                (Err(e), _) | (_, Err(e)) => Err(format!("cannot read the fault store: {e}")),
                (_, Ok(None)) => Err("no longer in the store".into()),
                (_, Ok(Some(f))) if f.status == FaultStatus::Resolved => {
                    Err("resolved since the dry run".into())
                }
                (Ok(false), _) => {
                    Err("being resubmitted elsewhere (another console, the command)".into())
                }
                (Ok(true), Ok(Some(f))) => Ok(f),
            };
            let fault = match fault {
                Ok(fault) => fault,
                Err(why) => {
                    skip(job, &planned.id, why);
                    continue;
                }
            };
            let fault = &fault;
            let done = match &self.scope {
                Scope::Hub { hubs, .. } => {
                    resubmit_one(&*self.faults, &*hubs.events, &processors, fault).await
                }
                Scope::Lambda { function, .. } => match function {
                    Some((_, invoke)) => invoke(&*self.faults, fault).await,
                    None => Err("no function to resubmit to".into()),
                },
            };
            let (outcome, detail) = match done {
                Ok(done) => done,
                // Its outcome not recorded, the fault stays open though its record may have
                // been applied: the job stops, as the command does, rather than apply every
                // other fault unrecorded.
                Err(e) => {
                    let (succeeded, failed) = {
                        let j = job.lock().unwrap();
                        (j.succeeded, j.failed)
                    };
                    anyhow::bail!(
                        "cannot record a resubmission of {}: {e} (stopped after {} \
                         resubmitted: {succeeded} succeeded, {failed} failed)",
                        fault.id,
                        succeeded + failed
                    );
                }
            };
            {
                let mut j = job.lock().unwrap();
                j.done += 1;
                match outcome {
                    ResubmitOutcome::Succeeded => j.succeeded += 1,
                    ResubmitOutcome::Failed => j.failed += 1,
                }
                if j.outcomes.len() == OUTCOMES_KEPT {
                    j.outcomes.remove(0);
                }
                j.outcomes.push(Outcome {
                    fault: fault.id.clone(),
                    outcome: outcome.as_str(),
                    detail,
                });
            }
            // At most ten updates a second to the pages.
            if told.elapsed() >= Duration::from_millis(100) {
                self.tell(job);
                told = Instant::now();
            }
        }
        Ok(())
    }
}

/// Counts `fault` as skipped in `job`, with why.
fn skip(job: &Mutex<Job>, fault: &str, why: String) {
    let mut j = job.lock().unwrap();
    j.done += 1;
    j.skipped += 1;
    if j.outcomes.len() == OUTCOMES_KEPT {
        j.outcomes.remove(0);
    }
    j.outcomes.push(Outcome {
        fault: fault.to_owned(),
        outcome: "skipped",
        detail: why,
    });
}

/// A fault being resubmitted, released when dropped.
struct Sending<'a> {
    set: &'a Mutex<HashSet<String>>,
    id: String,
}

impl<'a> Sending<'a> {
    /// Claims fault `id`; `None` while another job holds it.
    fn claim(set: &'a Mutex<HashSet<String>>, id: &str) -> Option<Sending<'a>> {
        set.lock().unwrap().insert(id.to_owned()).then(|| Sending {
            set,
            id: id.to_owned(),
        })
    }
}

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        self.set.lock().unwrap().remove(&self.id);
    }
}

impl Console {
    /// Replays `(from, to)` to `processor`.
    async fn replay(
        &self,
        processor: &str,
        range: (i64, i64),
        job: &Mutex<Job>,
    ) -> anyhow::Result<()> {
        let (hubs, config) = self
            .hub()
            .ok_or_else(|| anyhow::anyhow!("no hub to replay from"))?;
        let entry = config
            .processors
            .iter()
            .find(|p| p.name() == processor)
            .ok_or_else(|| anyhow::anyhow!("no processor `{processor}`"))?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
        let counted = move |n: u64| {
            let _ = tx.send(n);
        };
        let replay =
            crate::replay_cmd::replay_range(hubs, entry, range, counted, std::future::pending());
        tokio::pin!(replay);
        let mut every = tokio::time::interval(Duration::from_millis(250));
        let report = loop {
            tokio::select! {
                report = &mut replay => break report?,
                Some(n) = rx.recv() => job.lock().unwrap().done += n,
                _ = every.tick() => self.tell(job),
            }
        };
        let mut j = job.lock().unwrap();
        j.done = report.received;
        // As `floodway replay` counts: what the processor's sinks took, what it faulted, and
        // the rest, the events none of its pipelines takes.
        j.failed = report.faults();
        j.succeeded = report.pipelines.iter().map(|p| p.delivered).sum();
        j.skipped = report.received.saturating_sub(j.succeeded + j.failed);
        Ok(())
    }
}
