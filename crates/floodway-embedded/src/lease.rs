//! Leases: a subscription has one owner at a time (invariant 7 of the design).
//!
//! Opening a (non-transient) subscription takes its lease: a row of the `leases` table naming
//! the holder (host, process id, a random part) and when the lease expires. A thread of the
//! holder renews it every third of the lease time; closing the subscription deletes the row.
//! Another opener is refused while the lease is held, and takes it over once it has expired,
//! or at once when its holder is a process of this machine that no longer runs (a holder
//! killed with SIGKILL releases nothing). Every process that shares a hub file runs on one
//! machine (SQLite's WAL needs shared memory), so the expiry times in the file are read
//! against one clock.
//!
//! The holder stops on its own side too: its reader hands out nothing once a full lease time
//! has passed without a renewal (until a renewal shows the row is still its own), and stops
//! with [`HubError::LeaseLost`] when a renewal or a commit finds another holder; each
//! checkpoint commit checks the holder in its own transaction, so a process that lost the
//! subscription never writes a checkpoint.

use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use floodway::event::now_millis;
use rusqlite::{Connection, OptionalExtension};

use crate::error::HubError;
pub use crate::error::LeaseHolder;
use crate::store::{Store, WriteGate};

/// This process, as its leases name it.
struct Me {
    host: String,
    pid: u32,
    /// What tells this process from an earlier one with the same id: its pid namespace and
    /// start time (Linux); empty where unknown.
    process: String,
}

fn me() -> &'static Me {
    static ME: OnceLock<Me> = OnceLock::new();
    ME.get_or_init(|| {
        let pid = std::process::id();
        Me {
            host: host_name(),
            pid,
            process: match (pid_namespace(), start_time(pid)) {
                (Some(ns), Some(start)) => format!("{ns} {start}"),
                _ => String::new(),
            },
        }
    })
}

fn host_name() -> String {
    for path in ["/proc/sys/kernel/hostname", "/etc/hostname"] {
        if let Ok(name) = std::fs::read_to_string(path) {
            let name = name.trim();
            if !name.is_empty() {
                return name.to_owned();
            }
        }
    }
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn pid_namespace() -> Option<String> {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .map(|link| link.to_string_lossy().into_owned())
}

/// The start time of process `pid` (clock ticks after boot), from `/proc/<pid>/stat`.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces; the fields after it start with the
    // third (state), and the start time is the twenty-second.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether a holder is known to be gone: a process of this machine and pid namespace that
/// no longer runs (its id is free, or taken by a process started later).
fn gone(holder: &LeaseHolder, process: &str) -> bool {
    let me = me();
    if holder.host != me.host || me.process.is_empty() {
        return false;
    }
    let Some((namespace, started)) = process.split_once(' ') else {
        return false;
    };
    if !me.process.starts_with(&format!("{namespace} ")) {
        return false;
    }
    match start_time(holder.pid) {
        Some(now) => now.to_string() != started,
        // Unreadable: no such process, or one this process may not look at (`hidepid`, another
        // user's). Only a process that surely does not exist is gone.
        None => no_such_process(holder.pid),
    }
}

/// Whether `kill -0 pid` says there is no such process (an existing process that may not be
/// signalled is alive). Its message is read in the C locale: translated, it would say nothing
/// here, and a dead holder would be waited out.
fn no_such_process(pid: u32) -> bool {
    match std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .env("LC_ALL", "C")
        .env_remove("LANGUAGE")
        .output()
    {
        Ok(out) if out.status.success() => false,
        Ok(out) => String::from_utf8_lossy(&out.stderr)
            .to_ascii_lowercase()
            .contains("no such process"),
        Err(_) => false,
    }
}

/// The holder of `name`'s lease as stored, with its process fingerprint.
pub(crate) fn holder(
    conn: &Connection,
    name: &str,
) -> rusqlite::Result<Option<(LeaseHolder, String)>> {
    conn.query_row(
        "SELECT holder, host, pid, acquired, expires, process FROM leases WHERE name = ?1",
        [name],
        |r| {
            Ok((
                LeaseHolder {
                    id: r.get(0)?,
                    host: r.get(1)?,
                    pid: r.get(2)?,
                    acquired: r.get(3)?,
                    expires: r.get(4)?,
                },
                r.get(5)?,
            ))
        },
    )
    .optional()
}

/// Whether `holder` holds its lease now: not expired, and not known to be gone.
pub(crate) fn in_force(holder: &LeaseHolder, process: &str, now: i64) -> bool {
    holder.expires > now && !gone(holder, process)
}

/// The error for a subscription held by `holder`.
pub(crate) fn held(name: &str, holder: LeaseHolder, now: i64) -> HubError {
    let expires_in = Duration::from_millis((holder.expires - now).max(0) as u64);
    HubError::Held {
        subscription: name.to_owned(),
        holder: Box::new(holder),
        expires_in,
    }
}

/// How a lease stands, as its holder sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Standing {
    /// Renewed within the lease time.
    Held,
    /// Not renewed for a whole lease time (the file was locked, say): another process may
    /// take it over; nothing is handed out until a renewal shows it is still this one's.
    Unsure,
    /// Another holder has it, or it was removed.
    Lost(String),
}

struct Shared {
    name: String,
    id: String,
    lease: Duration,
    conn: Mutex<Connection>,
    gate: WriteGate,
    state: Mutex<State>,
}

struct State {
    /// When the last successful renewal (or the taking) started.
    renewed: Instant,
    /// The expiry that renewal wrote, at the latest (ms since the epoch): what another
    /// process reads to take over. The monotonic clock above stops while a machine sleeps,
    /// the wall clock does not; the lease stands by both.
    expires: i64,
    lost: Option<String>,
}

/// A subscription's lease, held while this value lives: renewed by a thread of its own,
/// released when dropped.
pub(crate) struct Lease {
    shared: Arc<Shared>,
    /// Dropping it ends the renewing thread.
    _stop: mpsc::Sender<()>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("subscription", &self.shared.name)
            .field("holder", &self.shared.id)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Takes the lease of subscription `name`, or says who holds it.
    pub(crate) fn acquire(store: &Store, name: &str) -> Result<Lease, HubError> {
        let options = &store.options;
        let lease = options.lease;
        let mut conn = store.connect()?;
        let me = me();
        let id = format!("{}/{}/{:016x}", me.host, me.pid, crate::schema::random());
        let started = Instant::now();
        let expires = now_millis().saturating_add(crate::log::millis(lease));
        let taken = crate::busy::retry("lease", options.busy_retry, || {
            // A look first, without the write lock: refusing costs a read.
            let now = now_millis();
            if let Some((h, process)) = holder(&conn, name)? {
                if in_force(&h, &process, now) {
                    return Ok(Err(held(name, h, now)));
                }
            }
            let _turn = store.gate.enter();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let now = now_millis();
            if let Some((h, process)) = holder(&tx, name)? {
                if in_force(&h, &process, now) {
                    return Ok(Err(held(name, h, now)));
                }
                let why = if h.expires <= now {
                    "its lease expired"
                } else {
                    "it no longer runs"
                };
                tracing::warn!(subscription = name, previous = %h, "taking over the subscription: {why}");
            }
            tx.execute(
                "INSERT OR REPLACE INTO leases (name, holder, host, pid, process, acquired, expires) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                (
                    name,
                    &id,
                    &me.host,
                    me.pid,
                    &me.process,
                    now,
                    now.saturating_add(crate::log::millis(lease)),
                ),
            )?;
            tx.commit()?;
            Ok(Ok(()))
        })?;
        taken?;
        // Renewals must keep their rhythm: they wait for the write lock a third of the lease
        // at most, and a renewal that fails is simply tried at the next beat.
        conn.busy_timeout((lease / 3).min(options.busy_timeout))?;
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            id,
            lease,
            conn: Mutex::new(conn),
            gate: store.gate.clone(),
            state: Mutex::new(State {
                renewed: started,
                expires,
                lost: None,
            }),
        });
        let (stop, stopped) = mpsc::channel::<()>();
        let beat = shared.clone();
        std::thread::Builder::new()
            .name("floodway-lease".into())
            .spawn(move || loop {
                match stopped.recv_timeout(beat.lease / 3) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if !beat.renew() {
                            return;
                        }
                    }
                    // Released.
                    _ => return,
                }
            })
            .map_err(|e| HubError::Task(format!("cannot start the lease thread: {e}")))?;
        Ok(Lease {
            shared,
            _stop: stop,
        })
    }

    /// How the lease stands.
    pub(crate) fn standing(&self) -> Standing {
        let state = self.shared.state();
        match &state.lost {
            Some(reason) => Standing::Lost(reason.clone()),
            None if state.renewed.elapsed() < self.shared.lease && now_millis() < state.expires => {
                Standing::Held
            }
            None => Standing::Unsure,
        }
    }

    /// The error of a lost lease.
    pub(crate) fn lost_error(&self, reason: String) -> HubError {
        HubError::LeaseLost {
            subscription: self.shared.name.clone(),
            reason,
        }
    }

    /// Checks, inside a write transaction, that this lease still holds the subscription.
    ///
    /// # Errors
    /// [`HubError::LeaseLost`] if another holder has it (then it stays lost).
    pub(crate) fn check(&self, tx: &Connection) -> Result<(), HubError> {
        if let Standing::Lost(reason) = self.standing() {
            return Err(self.lost_error(reason));
        }
        match holder(tx, &self.shared.name)? {
            Some((h, _)) if h.id == self.shared.id => Ok(()),
            other => {
                let reason = self.shared.lose(other.map(|(h, _)| h));
                Err(self.lost_error(reason))
            }
        }
    }
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Marks the lease lost to `now_held_by`; returns why.
    fn lose(&self, now_held_by: Option<LeaseHolder>) -> String {
        let reason = match now_held_by {
            Some(h) => format!(
                "{h} took it over (this process had not renewed its lease within {:?})",
                self.lease
            ),
            None => "its lease was removed".to_owned(),
        };
        let mut state = self.state();
        if state.lost.is_none() {
            tracing::error!(subscription = %self.name, "{reason}: this process stops consuming it");
            state.lost = Some(reason.clone());
        }
        reason
    }

    /// Renews the lease; false once it is lost.
    fn renew(&self) -> bool {
        let started = Instant::now();
        let expires = now_millis().saturating_add(crate::log::millis(self.lease));
        let renewed = (|| -> Result<Option<Option<LeaseHolder>>, HubError> {
            let conn = self.conn.lock().map_err(|_| HubError::Closed)?;
            let _turn = self.gate.enter();
            let changed = conn.execute(
                "UPDATE leases SET expires = ?1 WHERE name = ?2 AND holder = ?3",
                (
                    now_millis().saturating_add(crate::log::millis(self.lease)),
                    &self.name,
                    &self.id,
                ),
            )?;
            if changed == 1 {
                Ok(None)
            } else {
                Ok(Some(holder(&conn, &self.name)?.map(|(h, _)| h)))
            }
        })();
        match renewed {
            Ok(None) => {
                let mut state = self.state();
                state.renewed = started;
                state.expires = expires;
                true
            }
            Ok(Some(other)) => {
                self.lose(other);
                false
            }
            Err(err) => {
                tracing::warn!(subscription = %self.name, error = %err, "could not renew the subscription's lease; trying again");
                true
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.shared.state().lost.is_some() {
            return;
        }
        let released = (|| -> Result<(), HubError> {
            let conn = self.shared.conn.lock().map_err(|_| HubError::Closed)?;
            let _turn = self.shared.gate.enter();
            conn.execute(
                "DELETE FROM leases WHERE name = ?1 AND holder = ?2",
                (&self.shared.name, &self.shared.id),
            )?;
            Ok(())
        })();
        if let Err(err) = released {
            tracing::warn!(subscription = %self.shared.name, error = %err, lease = ?self.shared.lease, "could not release the subscription's lease; it expires unless renewed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_past_the_expiry_it_wrote_is_not_held_whatever_the_monotonic_clock_says() {
        let dir = tempfile::tempdir().unwrap();
        let hub = crate::Hub::open(dir.path().join("hub.db"), Default::default()).unwrap();
        let lease = Lease::acquire(hub.store(), "s").unwrap();
        assert!(matches!(lease.standing(), Standing::Held));
        // The machine slept: the monotonic clock stood still, the wall clock went past the
        // expiry another process reads to take over.
        lease.shared.state().expires = now_millis() - 1;
        assert!(matches!(lease.standing(), Standing::Unsure));
    }

    #[test]
    fn this_process_is_alive_and_a_finished_one_is_gone() {
        let me = me();
        let holder = |pid| LeaseHolder {
            id: String::new(),
            host: me.host.clone(),
            pid,
            acquired: 0,
            expires: i64::MAX,
        };
        assert!(!gone(&holder(me.pid), &me.process));
        if cfg!(target_os = "linux") {
            assert!(!me.process.is_empty());
            let mut child = std::process::Command::new("true").spawn().unwrap();
            let pid = child.id();
            child.wait().unwrap();
            // The same namespace; a start time no live process with that id has.
            let ns = me.process.split_once(' ').unwrap().0;
            assert!(gone(&holder(pid), &format!("{ns} 1")));
            assert!(gone(&holder(me.pid), &format!("{ns} 1")), "a reused id");
            // Another host, or another namespace: not known.
            let mut elsewhere = holder(pid);
            elsewhere.host = "elsewhere".into();
            assert!(!gone(&elsewhere, &format!("{ns} 1")));
            assert!(!gone(&holder(pid), "pid:[1] 1"));
        }
    }
}
