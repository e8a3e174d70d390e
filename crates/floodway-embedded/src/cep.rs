//! Complex event processing in the hub file: each processor's collected events by correlation
//! key, its timers by due time, and what it emitted, written with the emitted events (into the
//! outbox) in one transaction.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use floodway::cep::{in_time_order, Collected, Firing, SharedRule, Timer};
use floodway::event::now_millis;
use floodway::Event;
use rusqlite::{Connection, OptionalExtension, Transaction};

use crate::error::HubError;
use crate::outbox;
use crate::store::{Store, WriteGate};

/// One processor's collected events, timers and emitted events in the hub file:
///
/// - `cep_{name}_events`: each event under each of its correlation keys, once (by id), until
///   its time to live (from its own time) has passed and no pending timer of its key needs
///   it ([`CepTable::expire`]); a set is read by key and put in event-time order as it is
///   read;
/// - `cep_{name}_timers`: by due time, so the due ones are a range at the start of the index
///   however many are pending;
/// - `cep_{name}_fired`: the ids of the events emitted per key, so a set evaluated again emits
///   nothing twice (until the key's events expire).
///
/// Emitted events go to the hub's outbox in the transaction that collects the event or fires
/// the timer that made them, and the outbox's relay publishes them: a crash loses none and
/// repeats none (their ids are stable, and the hub dedupes).
#[derive(Clone)]
pub struct CepTable {
    name: Arc<str>,
    conn: Arc<Mutex<Connection>>,
    gate: WriteGate,
    busy_retry: Duration,
    hub_timers: bool,
}

impl std::fmt::Debug for CepTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CepTable")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// What one call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CepReport {
    /// Events collected (an event under two keys counts twice).
    pub collected: usize,
    /// Events met again (collected before): nothing done.
    pub duplicates: usize,
    /// Events emitted (into the outbox).
    pub emitted: usize,
    /// Timers set.
    pub timers_set: usize,
    /// Timers fired.
    pub timers_fired: usize,
}

/// A timer to hand to the hub ([`CepTable::pending_schedules`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingTimer {
    /// The correlation key whose set it is about.
    pub key: String,
    /// The timer.
    pub timer: Timer,
    /// The partition key of the event that set it.
    pub partition_key: String,
}

impl PendingTimer {
    /// The event the hub delivers when it is due, for processor `processor`.
    pub fn to_event(&self, processor: &str) -> Event {
        self.timer
            .to_event_in(processor, &self.key, &self.partition_key)
    }
}

/// A key's state, for people (`floodway cep show`).
#[derive(Debug, Clone, Default)]
pub struct CepKey {
    /// Its events, in time order.
    pub events: Vec<Collected>,
    /// Its pending timers, by due time.
    pub timers: Vec<Timer>,
    /// The ids of the events emitted for it.
    pub fired: Vec<String>,
}

fn check_name(name: &str) -> Result<(), HubError> {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    let rule = "1-48 lowercase letters, digits or `_`";
    crate::store::check_name("cep processor table", name, 48, allowed, rule)
}

/// The name of processor `processor`'s state tables: two processors whose names give the same
/// one would share their state.
pub fn table_name(processor: &str) -> String {
    processor
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

impl CepTable {
    /// The state of the processor whose tables are named `name`, made on first use.
    pub(crate) fn open(store: &Store, name: &str) -> Result<CepTable, HubError> {
        check_name(name)?;
        let conn = store.connect()?;
        crate::busy::retry("cep", store.options.busy_retry, || {
            let _turn = store.gate.enter();
            conn.execute_batch(&format!(
                "CREATE TABLE IF NOT EXISTS cep_{name}_events (key TEXT NOT NULL, \
                 id TEXT NOT NULL, time INTEGER NOT NULL, type TEXT NOT NULL, \
                 event TEXT NOT NULL, expires INTEGER, PRIMARY KEY (key, id)) WITHOUT ROWID; \
                 CREATE TABLE IF NOT EXISTS cep_{name}_timers (due INTEGER NOT NULL, \
                 key TEXT NOT NULL, rule TEXT NOT NULL, trigger TEXT NOT NULL, \
                 PRIMARY KEY (due, key, rule, trigger)) WITHOUT ROWID; \
                 CREATE INDEX IF NOT EXISTS \"cep_{name}_timers.key\" \
                 ON cep_{name}_timers (key); \
                 CREATE TABLE IF NOT EXISTS cep_{name}_fired (key TEXT NOT NULL, \
                 id TEXT NOT NULL, expires INTEGER, PRIMARY KEY (key, id)) WITHOUT ROWID; \
                 CREATE TABLE IF NOT EXISTS cep_{name}_schedule (key TEXT NOT NULL, \
                 rule TEXT NOT NULL, trigger TEXT NOT NULL, due INTEGER NOT NULL, \
                 partition_key TEXT NOT NULL, PRIMARY KEY (key, rule, trigger)) WITHOUT ROWID; \
                 CREATE TABLE IF NOT EXISTS cep_{name}_progress (partition TEXT PRIMARY KEY, \
                 position INTEGER NOT NULL) WITHOUT ROWID;"
            ))?;
            outbox::create(&conn)?;
            Ok(())
        })?;
        Ok(CepTable {
            name: name.into(),
            conn: Arc::new(Mutex::new(conn)),
            gate: store.gate.clone(),
            busy_retry: store.options.busy_retry,
            hub_timers: false,
        })
    }

    /// The same table, its timers kept by the event hub ([`EventHub::schedule`]): each timer
    /// a rule sets is also written to a list of timers to hand to the hub
    /// ([`CepTable::pending_schedules`], [`CepTable::scheduled`]), and fires when the hub
    /// delivers it ([`CepTable::fire_timer`]) rather than by [`CepTimers`].
    ///
    /// [`EventHub::schedule`]: floodway::hub::EventHub::schedule
    ///
    /// The first time a table is used this way, the timers pending in it (set while it fired
    /// its own) are queued for the hub too.
    ///
    /// # Errors
    /// A storage failure.
    pub fn with_hub_timers(mut self) -> Result<Self, HubError> {
        self.write(|tx| {
            let name = &self.name;
            tx.execute_batch(&format!(
                "CREATE TABLE IF NOT EXISTS cep_{name}_hub_timers (since INTEGER NOT NULL)"
            ))?;
            let since: Option<i64> = tx
                .query_row(
                    &format!("SELECT since FROM cep_{name}_hub_timers"),
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            if since.is_none() {
                tx.execute(
                    &format!(
                        "INSERT OR IGNORE INTO cep_{name}_schedule \
                         (key, rule, trigger, due, partition_key) \
                         SELECT t.key, t.rule, t.trigger, t.due, coalesce((SELECT \
                         json_extract(e.event, '$.partitionKey') FROM cep_{name}_events e \
                         WHERE e.key = t.key AND e.id = t.trigger), t.key) \
                         FROM cep_{name}_timers t"
                    ),
                    [],
                )?;
                tx.execute(
                    &format!("INSERT INTO cep_{name}_hub_timers (since) VALUES (?1)"),
                    [now_millis()],
                )?;
            }
            Ok(())
        })?;
        self.hub_timers = true;
        Ok(self)
    }

    /// The source its emitted events name (`cep:{name}`).
    pub fn source(&self) -> String {
        format!("cep:{}", self.name)
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>, HubError> {
        // A rule that panicked inside a transaction left the lock poisoned; the transaction
        // rolled back as it unwound, so the connection is as good as before (the panic is
        // the event's fault, not the processor's end).
        Ok(self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Runs `work` in one write transaction, taken at once and in turn with the store's other
    /// writers, tried again while another process holds the file; commits what it wrote.
    fn write<T>(
        &self,
        mut work: impl FnMut(&Transaction<'_>) -> Result<T, HubError>,
    ) -> Result<T, HubError> {
        crate::busy::retry("cep", self.busy_retry, || {
            let mut conn = self.conn()?;
            let _turn = self.gate.enter();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let out = work(&tx)?;
            tx.commit()?;
            Ok(out)
        })
    }

    /// Collects each event under each of its keys, evaluates `rules` over each key's set as
    /// the event joins it, sets the timers the rules ask for, and writes what they emit to
    /// the outbox: one transaction. An event collected before under a key is skipped there.
    /// `ttl`: how long an event stays in its sets after its own time.
    ///
    /// # Errors
    /// A storage failure (then nothing was written).
    pub fn collect(
        &self,
        entries: &[(Vec<String>, Event)],
        rules: &[SharedRule],
        ttl: Option<Duration>,
    ) -> Result<CepReport, HubError> {
        self.collect_at(entries, rules, ttl, &[])
    }

    /// [`CepTable::collect`], recording in the same transaction how far each partition has
    /// been read here (`(partition, position)`: the highest is kept), which
    /// [`CepTable::positions`] gives back to find what another instance read meanwhile.
    ///
    /// # Errors
    /// A storage failure (then nothing was written).
    pub fn collect_at(
        &self,
        entries: &[(Vec<String>, Event)],
        rules: &[SharedRule],
        ttl: Option<Duration>,
        progress: &[(String, u64)],
    ) -> Result<CepReport, HubError> {
        self.write(|tx| {
            let now = now_millis();
            let mut report = CepReport::default();
            let emitted = self.collect_in(tx, entries, rules, ttl, now, &mut report)?;
            report.emitted = self.emit(tx, emitted, now)?;
            self.record_progress(tx, progress)?;
            Ok(report)
        })
    }

    /// Catches up on what another instance read from a partition before this one: `missed`
    /// are those records' events in log order (with the correlation keys of those to collect;
    /// none for the others), `progress` the partition's position after them. Events this
    /// processor emitted are marked emitted (so they are not emitted again), timers it fired
    /// (their [`TIMER_DUE`](floodway::cep::TIMER_DUE) events) are not set again, and the rest
    /// are collected and evaluated as [`CepTable::collect`] does, emitting what was not
    /// emitted (an instance that died before its outbox was relayed loses nothing) and
    /// setting their timers: one transaction.
    ///
    /// # Errors
    /// A storage failure (then nothing was written).
    pub fn restore(
        &self,
        missed: &[(Vec<String>, Event)],
        rules: &[SharedRule],
        ttl: Option<Duration>,
        progress: &[(String, u64)],
    ) -> Result<CepReport, HubError> {
        let source = self.source();
        self.write(|tx| {
            let now = now_millis();
            let name = &self.name;
            let mut fired_timers = Vec::new();
            {
                let mut fired = tx.prepare_cached(&format!(
                    "INSERT OR IGNORE INTO cep_{name}_fired (key, id, expires) VALUES (?1, ?2, ?3)"
                ))?;
                for (_, event) in missed {
                    if let Some((processor, key, timer)) = floodway::cep::Timer::of_event(event) {
                        if table_name(&processor) == *self.name {
                            fired_timers.push((key, timer));
                        }
                    } else if event.tag("source") == Some(source.as_str()) {
                        let expires =
                            ttl.map(|t| event.timestamp().saturating_add(crate::log::millis(t)));
                        fired.execute((event.partition_key(), event.id(), expires))?;
                    }
                }
            }
            let collect: Vec<(Vec<String>, Event)> = missed
                .iter()
                .filter(|(keys, _)| !keys.is_empty())
                .cloned()
                .collect();
            let mut report = CepReport::default();
            let mut emitted = self.collect_in(tx, &collect, rules, ttl, now, &mut report)?;
            // The timers the other instance fired, fired again here: what they emitted may
            // have died in its outbox (what it published is marked, and not emitted twice).
            for (key, timer) in &fired_timers {
                report.timers_set -= self.drop_timer(tx, key, timer)?.min(report.timers_set);
                emitted.extend(self.fire_in(tx, key, timer, rules, ttl)?);
                report.timers_fired += 1;
            }
            report.emitted = self.emit(tx, emitted, now)?;
            self.record_progress(tx, progress)?;
            Ok(report)
        })
    }

    /// How far each partition has been read here, as recorded by [`CepTable::collect_at`].
    ///
    /// # Errors
    /// A storage failure.
    pub fn positions(&self) -> Result<HashMap<String, u64>, HubError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT partition, position FROM cep_{}_progress",
            self.name
        ))?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        rows.map(|r| {
            let (p, position) = r?;
            Ok((p, u64::try_from(position).unwrap_or(0)))
        })
        .collect()
    }

    fn record_progress(
        &self,
        tx: &Transaction<'_>,
        progress: &[(String, u64)],
    ) -> Result<(), HubError> {
        let mut stmt = tx.prepare_cached(&format!(
            "INSERT INTO cep_{}_progress (partition, position) VALUES (?1, ?2) \
             ON CONFLICT (partition) DO UPDATE SET position = max(position, excluded.position)",
            self.name
        ))?;
        for (partition, position) in progress {
            stmt.execute((partition, i64::try_from(*position).unwrap_or(i64::MAX)))?;
        }
        Ok(())
    }

    /// Deletes a timer (and its entry for the hub); how many rows of the timers it deleted.
    fn drop_timer(
        &self,
        tx: &Transaction<'_>,
        key: &str,
        timer: &Timer,
    ) -> Result<usize, HubError> {
        let name = &self.name;
        let deleted = tx
            .prepare_cached(&format!(
                "DELETE FROM cep_{name}_timers WHERE due = ?1 AND key = ?2 AND rule = ?3 \
                 AND trigger = ?4"
            ))?
            .execute((timer.due, key, &timer.rule, &timer.trigger))?;
        tx.prepare_cached(&format!(
            "DELETE FROM cep_{name}_schedule WHERE key = ?1 AND rule = ?2 AND trigger = ?3"
        ))?
        .execute((key, &timer.rule, &timer.trigger))?;
        Ok(deleted)
    }

    /// Fires `timer` of `key` now, as the hub delivered it: its rule makes what it will of
    /// the key's set, the timer is deleted, and what fired goes to the outbox (once: a timer
    /// delivered twice emits nothing new), in one transaction.
    ///
    /// # Errors
    /// A storage failure (then nothing was written).
    pub fn fire_timer(
        &self,
        key: &str,
        timer: &Timer,
        rules: &[SharedRule],
        ttl: Option<Duration>,
    ) -> Result<CepReport, HubError> {
        self.write(|tx| {
            let now = now_millis();
            let mut report = CepReport::default();
            self.drop_timer(tx, key, timer)?;
            report.timers_fired = 1;
            let firings = self.fire_in(tx, key, timer, rules, ttl)?;
            report.emitted = self.emit(tx, firings, now)?;
            Ok(report)
        })
    }

    /// What `timer` of `key` makes of the key's set now, to emit.
    fn fire_in(
        &self,
        tx: &Transaction<'_>,
        key: &str,
        timer: &Timer,
        rules: &[SharedRule],
        ttl: Option<Duration>,
    ) -> Result<Vec<(String, Firing, Option<i64>)>, HubError> {
        let Some(rule) = timer_rule(rules, key, timer) else {
            return Ok(Vec::new());
        };
        // Its trigger may be past its own time to live: a timer still sees it.
        let set = read_set(tx, &self.name, key, i64::MIN)?;
        Ok(firings(rule, &set, key, timer, ttl))
    }

    /// Timers set and not yet handed to the hub (with hub timers), at most `limit`: each
    /// with its key and the partition key of the event that set it (where the hub is to
    /// deliver it: [`Timer::to_event_in`](floodway::cep::Timer::to_event_in)).
    ///
    /// # Errors
    /// A storage failure.
    pub fn pending_schedules(&self, limit: usize) -> Result<Vec<PendingTimer>, HubError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT key, rule, trigger, due, partition_key FROM cep_{}_schedule LIMIT ?1",
            self.name
        ))?;
        let rows = stmt.query_map([limit as i64], |r| {
            Ok(PendingTimer {
                key: r.get(0)?,
                timer: Timer {
                    rule: r.get(1)?,
                    trigger: r.get(2)?,
                    due: r.get(3)?,
                },
                partition_key: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forgets timers the hub now keeps.
    ///
    /// # Errors
    /// A storage failure.
    pub fn scheduled(&self, timers: &[PendingTimer]) -> Result<(), HubError> {
        crate::busy::retry("cep", self.busy_retry, || {
            let mut conn = self.conn()?;
            let _turn = self.gate.enter();
            let tx = conn.transaction()?;
            {
                let mut stmt = tx.prepare_cached(&format!(
                    "DELETE FROM cep_{}_schedule WHERE key = ?1 AND rule = ?2 AND trigger = ?3",
                    self.name
                ))?;
                for t in timers {
                    stmt.execute((&t.key, &t.timer.rule, &t.timer.trigger))?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Collects `entries` in `tx` (see [`CepTable::collect`]); what fired, to emit.
    fn collect_in(
        &self,
        tx: &Transaction<'_>,
        entries: &[(Vec<String>, Event)],
        rules: &[SharedRule],
        ttl: Option<Duration>,
        now: i64,
        report: &mut CepReport,
    ) -> Result<Vec<(String, Firing, Option<i64>)>, HubError> {
        let name = &self.name;
        let mut emitted = Vec::new();
        {
            let mut insert = tx.prepare_cached(&format!(
                "INSERT OR IGNORE INTO cep_{name}_events (key, time, id, type, event, expires) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
            ))?;
            let mut timer = tx.prepare_cached(&format!(
                "INSERT OR IGNORE INTO cep_{name}_timers (due, key, rule, trigger) \
                 VALUES (?1, ?2, ?3, ?4)"
            ))?;
            let mut schedule = tx.prepare_cached(&format!(
                "INSERT OR REPLACE INTO cep_{name}_schedule \
                 (key, rule, trigger, due, partition_key) VALUES (?1, ?2, ?3, ?4, ?5)"
            ))?;
            let mut sets: HashMap<&str, Vec<Collected>> = HashMap::new();
            for (keys, event) in entries {
                let expires = ttl.map(|t| event.timestamp().saturating_add(crate::log::millis(t)));
                if expires.is_some_and(|at| at <= now) {
                    // Past its time to live already: it would join no set.
                    continue;
                }
                let added = Collected::of(event);
                let text = event.to_json();
                for key in keys {
                    let fresh = insert.execute((
                        key,
                        event.timestamp(),
                        event.id(),
                        event.event_type(),
                        &text,
                        expires,
                    ))? == 1;
                    if !fresh {
                        report.duplicates += 1;
                        continue;
                    }
                    report.collected += 1;
                    let set = match sets.get_mut(key.as_str()) {
                        Some(set) => {
                            set.push(added.clone());
                            in_time_order(set);
                            set
                        }
                        None => sets
                            .entry(key.as_str())
                            .or_insert(read_set(tx, name, key, now)?),
                    };
                    for rule in rules {
                        for firing in rule.evaluate(set, &added) {
                            // Its last trigger may be later than the event just collected.
                            let expires = remembered_until(&firing, ttl);
                            emitted.push((key.clone(), firing, expires));
                        }
                        for t in rule.timers(&added) {
                            let set = timer.execute((t.due, key, &t.rule, &t.trigger))?;
                            report.timers_set += set;
                            if set == 1 && self.hub_timers {
                                schedule.execute((
                                    key,
                                    &t.rule,
                                    &t.trigger,
                                    t.due,
                                    event.partition_key(),
                                ))?;
                            }
                        }
                    }
                }
            }
        }
        Ok(emitted)
    }

    /// Writes what fired to the outbox, each event once per key; returns how many.
    fn emit(
        &self,
        tx: &Transaction<'_>,
        firings: Vec<(String, Firing, Option<i64>)>,
        now: i64,
    ) -> Result<usize, HubError> {
        let name = &self.name;
        let source = self.source();
        let mut fired = tx.prepare_cached(&format!(
            "INSERT OR IGNORE INTO cep_{name}_fired (key, id, expires) VALUES (?1, ?2, ?3)"
        ))?;
        let mut events = Vec::new();
        for (key, firing, expires) in firings {
            let event = firing.to_event(&source, &key);
            if fired.execute((&key, event.id(), expires))? == 1 {
                events.push(event);
            }
        }
        outbox::add(tx, &source, events.iter(), now)?;
        Ok(events.len())
    }

    /// Fires the timers due at `now` (at most `limit`, the earliest first): each rule makes
    /// what it will of its key's set, the timer is deleted, and what fired goes to the
    /// outbox, in one transaction. A timer of a rule no longer configured is dropped.
    ///
    /// # Errors
    /// A storage failure (then nothing was written).
    pub fn fire_due(
        &self,
        now: i64,
        rules: &[SharedRule],
        ttl: Option<Duration>,
        limit: usize,
    ) -> Result<CepReport, HubError> {
        self.write(|tx| {
            let name = &self.name;
            let due: Vec<(String, Timer)> = {
                let mut stmt = tx.prepare_cached(&format!(
                    "SELECT due, key, rule, trigger FROM cep_{name}_timers WHERE due <= ?1 \
                     ORDER BY due LIMIT ?2"
                ))?;
                let rows = stmt.query_map((now, limit as i64), |r| {
                    Ok((
                        r.get::<_, String>(1)?,
                        Timer {
                            due: r.get(0)?,
                            rule: r.get(2)?,
                            trigger: r.get(3)?,
                        },
                    ))
                })?;
                rows.collect::<Result<_, _>>()?
            };
            let mut report = CepReport::default();
            let mut emissions = Vec::new();
            let mut sets: HashMap<String, Vec<Collected>> = HashMap::new();
            {
                let mut delete = tx.prepare_cached(&format!(
                    "DELETE FROM cep_{name}_timers WHERE due = ?1 AND key = ?2 AND rule = ?3 \
                     AND trigger = ?4"
                ))?;
                for (key, timer) in due {
                    delete.execute((timer.due, &key, &timer.rule, &timer.trigger))?;
                    report.timers_fired += 1;
                    let Some(rule) = timer_rule(rules, &key, &timer) else {
                        continue;
                    };
                    if !sets.contains_key(&key) {
                        // Its trigger may be past its own time to live: a timer still sees it.
                        let set = read_set(tx, name, &key, i64::MIN)?;
                        sets.insert(key.clone(), set);
                    }
                    emissions.extend(firings(rule, &sets[&key], &key, &timer, ttl));
                }
            }
            report.emitted = self.emit(tx, emissions, now)?;
            Ok(report)
        })
    }

    /// When the earliest pending timer is due, if any is pending.
    ///
    /// # Errors
    /// A storage failure.
    pub fn next_due(&self) -> Result<Option<i64>, HubError> {
        let conn = self.conn()?;
        Ok(conn.query_row(
            &format!("SELECT min(due) FROM cep_{}_timers", self.name),
            [],
            |r| r.get(0),
        )?)
    }

    /// How many timers are pending.
    ///
    /// # Errors
    /// A storage failure.
    pub fn pending_timers(&self) -> Result<u64, HubError> {
        let conn = self.conn()?;
        let n: i64 = conn.query_row(
            &format!("SELECT count(*) FROM cep_{}_timers", self.name),
            [],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    /// The state of `key`: its events, pending timers and what it emitted.
    ///
    /// # Errors
    /// A storage failure, or a stored event that does not parse.
    pub fn show(&self, key: &str) -> Result<CepKey, HubError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let name = &self.name;
        let events = read_set(&tx, name, key, now_millis())?;
        let mut timers = Vec::new();
        {
            let mut stmt = tx.prepare(&format!(
                "SELECT due, rule, trigger FROM cep_{name}_timers WHERE key = ?1 ORDER BY due"
            ))?;
            for row in stmt.query_map([key], |r| {
                Ok(Timer {
                    due: r.get(0)?,
                    rule: r.get(1)?,
                    trigger: r.get(2)?,
                })
            })? {
                timers.push(row?);
            }
        }
        let fired = {
            let mut stmt = tx.prepare(&format!(
                "SELECT id FROM cep_{name}_fired WHERE key = ?1 ORDER BY id"
            ))?;
            let ids = stmt.query_map([key], |r| r.get::<_, String>(0))?;
            ids.collect::<Result<Vec<_>, _>>()?
        };
        Ok(CepKey {
            events,
            timers,
            fired,
        })
    }

    /// Deletes the events and emitted ids past their time to live at `now`; returns how many.
    /// What a pending timer of the key will read stays until it fires (a processor behind,
    /// or started after a stop, fires timers due long ago; an absence rule whose answer was
    /// deleted would fire wrongly): the events expiring at or after the key's earliest due
    /// time. Older ones go, whatever timers come later.
    ///
    /// # Errors
    /// A storage failure.
    pub fn expire(&self, now: i64) -> Result<u64, HubError> {
        let name = &self.name;
        crate::busy::retry("cep", self.busy_retry, || {
            let conn = self.conn()?;
            let _turn = self.gate.enter();
            // A timer due at `d` reads its trigger (at `d - within`) and what followed it,
            // all expiring at `d` or later (the time to live is at least the window): an
            // event expiring before its key's earliest pending timer is needed by none.
            let mut n = conn.execute(
                &format!(
                    "DELETE FROM cep_{name}_events WHERE expires <= ?1 \
                     AND expires < coalesce((SELECT min(due) FROM cep_{name}_timers t \
                       WHERE t.key = cep_{name}_events.key), ?2) \
                     AND expires < coalesce((SELECT min(due) FROM cep_{name}_schedule s \
                       WHERE s.key = cep_{name}_events.key), ?2)"
                ),
                [now, i64::MAX],
            )?;
            n += conn.execute(
                &format!("DELETE FROM cep_{name}_fired WHERE expires <= ?1"),
                [now],
            )?;
            Ok(n as u64)
        })
    }
}

/// The rule `timer` belongs to, if it is still configured (a timer of a rule since removed is
/// dropped, with a warning).
fn timer_rule<'r>(rules: &'r [SharedRule], key: &str, timer: &Timer) -> Option<&'r SharedRule> {
    let rule = rules.iter().find(|r| r.name() == timer.rule);
    if rule.is_none() {
        tracing::warn!(rule = %timer.rule, key, "a timer of a rule no longer configured: dropped");
    }
    rule
}

/// What `rule` makes of `set` as `timer` of `key` fires: each emission with its expiry.
fn firings(
    rule: &SharedRule,
    set: &[Collected],
    key: &str,
    timer: &Timer,
    ttl: Option<Duration>,
) -> Vec<(String, Firing, Option<i64>)> {
    rule.fire(set, timer)
        .into_iter()
        .map(|firing| {
            let expires = remembered_until(&firing, ttl);
            (key.to_owned(), firing, expires)
        })
        .collect()
}

/// Until when what `firing` emitted is remembered: as long as its events may make it again
/// (its time, the last trigger's, plus the time to live).
fn remembered_until(firing: &Firing, ttl: Option<Duration>) -> Option<i64> {
    ttl.map(|t| firing.timestamp.saturating_add(crate::log::millis(t)))
}

/// The set of `key`: its events unexpired at `now`, in time order.
fn read_set(
    tx: &Transaction<'_>,
    name: &str,
    key: &str,
    now: i64,
) -> Result<Vec<Collected>, HubError> {
    // A set is small: sorted here rather than kept in time order by a second index.
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT event FROM cep_{name}_events WHERE key = ?1 \
         AND (expires IS NULL OR expires > ?2)"
    ))?;
    let rows = stmt.query_map((key, now), |r| r.get::<_, String>(0))?;
    let mut set = rows
        .map(|text| {
            let event = Event::decode(text?.as_bytes()).map_err(|e| HubError::Corrupt {
                what: "collected event",
                detail: e.to_string(),
            })?;
            Ok(Collected::of(&event))
        })
        .collect::<Result<Vec<_>, HubError>>()?;
    in_time_order(&mut set);
    Ok(set)
}

/// Whether a hub file holds a CEP processor's tables named `name`.
pub(crate) fn exists(conn: &Connection, name: &str) -> Result<bool, HubError> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [format!("cep_{name}_events")],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// Fires a CEP processor's timers as they fall due, under a lease: one process at a time
/// (the one that runs the processor). A timer due while no process ran fires at the next
/// start; a timer whose emitted event cannot be published yet (the hub is down) waits in the
/// outbox, not here.
pub struct CepTimers {
    table: CepTable,
    store: Store,
    rules: Vec<SharedRule>,
    ttl: Option<Duration>,
    poll: Duration,
    /// The subscription of the processor whose timers these are, when it reads this file's
    /// log: a timer fires only once it has read every event published before the timer's
    /// time (see [`CepTimers::following`]).
    follows: Option<String>,
}

impl std::fmt::Debug for CepTimers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CepTimers")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl CepTimers {
    /// The timers of `table`, for `rules`, looked at every 100 ms at most.
    pub fn new(
        hub: &crate::Hub,
        table: CepTable,
        rules: Vec<SharedRule>,
        ttl: Option<Duration>,
    ) -> Self {
        CepTimers {
            table,
            store: hub.store().clone(),
            rules,
            ttl,
            poll: Duration::from_millis(100),
            follows: None,
        }
    }

    /// Fires a timer only once subscription `name` (the processor's, reading this file's
    /// log) has read every event published before the timer's time: a processor behind (a
    /// backlog, a restart after downtime) would otherwise fire an absence whose awaited event
    /// is already in the log, unread. On NATS the stream keeps the timers and delivers each
    /// into its partition in the stream's order, which holds the same by construction.
    #[must_use]
    pub fn following(mut self, name: impl Into<String>) -> Self {
        self.follows = Some(name.into());
        self
    }

    /// The time up to which timers may fire at `now`: `now`, or just before the oldest
    /// event the followed subscription has not read (looked up through `conn`).
    fn fire_until(&self, conn: Option<&rusqlite::Connection>, now: i64) -> Result<i64, HubError> {
        let (Some(name), Some(conn)) = (&self.follows, conn) else {
            return Ok(now);
        };
        Ok(match crate::log::first_unread_published(conn, name)? {
            Some(published) => now.min(published.saturating_sub(1)),
            None => now,
        })
    }

    /// Fires due timers until `stop` completes. It first takes the processor's timer lease,
    /// waiting while another process holds it.
    ///
    /// # Errors
    /// A storage failure, or the lease lost to another process.
    pub async fn run(
        self,
        stop: impl std::future::Future<Output = ()> + Send,
    ) -> Result<CepReport, HubError> {
        let mut stop = std::pin::pin!(stop);
        let mut total = CepReport::default();
        let follower = match self.follows {
            Some(_) => Some(crate::blocking(|| self.store.connect())?),
            None => None,
        };
        let name = format!("cep:{}", self.table.name);
        let lease = loop {
            match crate::blocking(|| crate::lease::Lease::acquire(&self.store, &name)) {
                Ok(lease) => break lease,
                Err(HubError::Held { .. }) => {
                    tokio::select! {
                        () = &mut stop => return Ok(total),
                        () = tokio::time::sleep(self.store.options.lease / 3) => {}
                    }
                }
                Err(e) => return Err(e),
            }
        };
        loop {
            if let crate::lease::Standing::Lost(reason) = lease.standing() {
                return Err(lease.lost_error(reason));
            }
            let now = now_millis();
            let until = crate::blocking(|| self.fire_until(follower.as_ref(), now))?;
            let table = self.table.clone();
            let rules = self.rules.clone();
            let ttl = self.ttl;
            let report =
                tokio::task::spawn_blocking(move || table.fire_due(until, &rules, ttl, 1_000))
                    .await
                    .map_err(|e| HubError::Task(format!("the timer task failed: {e}")))??;
            total.timers_fired += report.timers_fired;
            total.emitted += report.emitted;
            if report.timers_fired == 1_000 {
                continue; // more are due
            }
            let next = crate::blocking(|| self.table.next_due())?;
            // A timer already due but held back (the processor is behind) is looked at again
            // after a poll, not at once.
            let wait = next.map_or(self.poll, |at| {
                match u64::try_from(at.saturating_sub(now_millis())) {
                    Ok(ms) if ms > 0 => Duration::from_millis(ms).min(self.poll),
                    _ if until < now => self.poll,
                    _ => Duration::ZERO,
                }
            });
            tokio::select! {
                () = &mut stop => return Ok(total),
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}
