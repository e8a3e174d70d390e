//! Single-table rows written by update requests ([`floodway::rows`]), with the inbox and,
//! when asked, the outbox in the same transaction.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use floodway::event::now_millis;
use floodway::hub::HubFuture;
use floodway::idempotence::Version;
use floodway::rows::{merge_with, Outcome, Row, RowKey, RowMeta, RowQuery, RowStore, Update};
use floodway::Event;
use rusqlite::{Connection, OptionalExtension as _, Transaction};

use crate::error::HubError;
use crate::inbox::Inbox;
use crate::outbox;
use crate::store::{Store, WriteGate};

/// A table of rows in the hub file: by `(pk, sk)`, each with its fields, its kind, the
/// versions that keep it order-tolerant ([`floodway::rows`]) and its expiry. Updates apply
/// with the inbox in one transaction; with [`RowTable::with_outbox`], every change of what a
/// row shows is written, in the same transaction, to the hub's outbox as a change event
/// (`{discriminator}-created|updated|deleted`), which an [`OutboxRelay`](crate::OutboxRelay)
/// publishes. A deleted row stays as a tombstone (not read) so an older write cannot bring it
/// back.
#[derive(Clone)]
pub struct RowTable {
    name: Arc<str>,
    table: Arc<str>,
    conn: Arc<Mutex<Connection>>,
    gate: WriteGate,
    inbox: Inbox,
    busy_retry: Duration,
    outbox: bool,
}

impl std::fmt::Debug for RowTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowTable")
            .field("name", &self.name)
            .field("outbox", &self.outbox)
            .finish_non_exhaustive()
    }
}

/// The prefix of row tables in the file.
pub(crate) const TABLE_PREFIX: &str = "rows_";

/// What a service writes in one transaction: rows, and events for the outbox.
#[derive(Debug, Default)]
pub struct RowTx {
    updates: Vec<Update>,
    emits: Vec<Event>,
}

impl RowTx {
    /// Applies an update (a put is [`Update::put`]).
    pub fn update(&mut self, update: Update) -> &mut Self {
        self.updates.push(update);
        self
    }

    /// Writes the whole row `key`: these fields and no others, latest-wins by `version`.
    pub fn put(
        &mut self,
        key: RowKey,
        version: Version,
        fields: serde_json::Map<String, serde_json::Value>,
    ) -> &mut Self {
        self.update(Update::put(key, version, fields))
    }

    /// Deletes the row `key`, by `version`.
    pub fn delete(&mut self, key: RowKey, version: Version) -> &mut Self {
        self.update(
            Update::new(key, version)
                .latest(floodway::rows::Latest::Row)
                .delete_row(),
        )
    }

    /// Publishes `event` through the outbox once the transaction commits.
    pub fn emit(&mut self, event: Event) -> &mut Self {
        self.emits.push(event);
        self
    }
}

fn check_name(name: &str) -> Result<(), HubError> {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    let rule = "1-64 lowercase letters, digits or `_`";
    crate::store::check_name("row table", name, 64, allowed, rule)
}

impl RowTable {
    /// The table `name` in the hub file, made on first use.
    pub(crate) fn open(store: &Store, name: &str) -> Result<RowTable, HubError> {
        check_name(name)?;
        let conn = store.connect()?;
        let table = format!("{TABLE_PREFIX}{name}");
        crate::busy::retry("rows", store.options.busy_retry, || {
            let _turn = store.gate.enter();
            // In a file made by an earlier build, this table's name may be another row
            // table's index (`rows_x_expires`, of `rows_x`): that index goes, and its table
            // makes it again under its new name when it is opened.
            let index: Option<String> = conn
                .query_row(
                    "SELECT name FROM sqlite_master WHERE type = 'index' AND name = ?1",
                    [&table],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(index) = index {
                conn.execute_batch(&format!("DROP INDEX \"{index}\""))?;
            }
            conn.execute_batch(&format!(
                "CREATE TABLE IF NOT EXISTS {table} (pk TEXT NOT NULL, sk TEXT NOT NULL, \
                 disc TEXT, time INTEGER NOT NULL, event TEXT NOT NULL, fields TEXT NOT NULL, \
                 meta TEXT NOT NULL, expires INTEGER, live INTEGER NOT NULL, \
                 PRIMARY KEY (pk, sk)) WITHOUT ROWID; \
                 CREATE INDEX IF NOT EXISTS \"{table}.expires\" ON {table} (expires) \
                 WHERE expires IS NOT NULL;"
            ))?;
            // The index's name has a character no table name has: tables and indexes share
            // one namespace, and `{table}_expires`, its name in files made by earlier
            // builds, is the table of the row table `{name}_expires`.
            let earlier: Option<String> = conn
                .query_row(
                    "SELECT name FROM sqlite_master WHERE type = 'index' AND name = ?1 \
                     AND tbl_name = ?2",
                    (format!("{table}_expires"), &table),
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(index) = earlier {
                conn.execute_batch(&format!("DROP INDEX \"{index}\""))?;
            }
            outbox::create(&conn)?;
            Ok(())
        })?;
        Ok(RowTable {
            name: name.into(),
            inbox: Inbox::new(&format!("rows:{name}"), store.options.inbox_window),
            table: table.into(),
            conn: Arc::new(Mutex::new(conn)),
            gate: store.gate.clone(),
            busy_retry: store.options.busy_retry,
            outbox: false,
        })
    }

    /// The same table, writing its changes to the outbox.
    #[must_use]
    pub fn with_outbox(mut self) -> Self {
        self.outbox = true;
        self
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The source its change events name (`rows:{name}`).
    pub fn source(&self) -> String {
        format!("rows:{}", self.name)
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>, HubError> {
        self.conn.lock().map_err(|_| HubError::Closed)
    }

    /// Applies updates in one transaction; an outcome per update.
    ///
    /// # Errors
    /// A storage failure (then nothing was written).
    pub fn apply(&self, updates: &[Update]) -> Result<Vec<Outcome>, HubError> {
        crate::busy::retry("rows", self.busy_retry, || {
            self.try_apply(updates, &[], false)
        })
    }

    /// Runs `f` to gather writes and events, then applies them all in one transaction: the
    /// rows, their changes (with the outbox on) and the events go together or not at all.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let hub = floodway_embedded::Hub::open(dir.path().join("h.db"), Default::default()).unwrap();
    /// use floodway::rows::RowKey;
    /// use floodway::idempotence::Version;
    /// let orders = hub.rows("orders").unwrap();
    /// let version = Version { timestamp: 1, id: "cmd-1".into() };
    /// let placed = floodway::Event::builder("order-placed", "o1").build();
    /// orders.transaction(|tx| {
    ///     let fields = serde_json::json!({"status": "placed"});
    ///     tx.put(RowKey::new("o1", "order"), version, fields.as_object().unwrap().clone());
    ///     tx.emit(placed);
    ///     Ok::<_, floodway::Error>(())
    /// }).unwrap();
    /// # assert_eq!(hub.outbox().unwrap().stats().unwrap().pending(), 1);
    /// ```
    ///
    /// # Errors
    /// `f`'s error, an update that would fault (invalid, or stale under
    /// [`Stale::Fault`](floodway::rows::Stale::Fault)), or a storage failure; then nothing is
    /// written.
    pub fn transaction<T, E, F>(&self, f: F) -> Result<(T, Vec<Outcome>), E>
    where
        F: FnOnce(&mut RowTx) -> Result<T, E>,
        E: From<HubError>,
    {
        let mut tx = RowTx::default();
        let value = f(&mut tx)?;
        let outcomes = crate::busy::retry("rows", self.busy_retry, || {
            self.try_apply(&tx.updates, &tx.emits, true)
        })?;
        Ok((value, outcomes))
    }

    /// Refuses a transaction that would fault an update: all or nothing.
    fn refuse_faults(outcomes: &[Outcome]) -> Result<(), HubError> {
        match outcomes.iter().find_map(|o| match o {
            Outcome::Faulted(why) => Some(why),
            _ => None,
        }) {
            Some(why) => Err(HubError::Invalid(format!(
                "the transaction writes nothing: an update is refused: {why}"
            ))),
            None => Ok(()),
        }
    }

    fn try_apply(
        &self,
        updates: &[Update],
        emits: &[Event],
        all_or_nothing: bool,
    ) -> Result<Vec<Outcome>, HubError> {
        let mut conn = self.conn()?;
        let _turn = self.gate.enter();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let now = now_millis();
        let source = self.source();
        let mut outcomes = Vec::with_capacity(updates.len());
        let pruned = {
            let mut inbox = self.inbox.begin(&tx, now)?;
            let mut writer = Writer::new(&tx, &self.table)?;
            let mut changes = Vec::new();
            for u in updates {
                let mut merged = merge_with(writer.read(&u.key)?.as_ref(), u, now, self.outbox);
                let outcome = merged.outcome.clone();
                if matches!(outcome, Outcome::Faulted(_)) {
                    // An update applied before and overwritten since reads as stale: the
                    // inbox knows it for a repeat (looked up only: a resubmission after a
                    // fix must still be applied).
                    let repeat = inbox.seen(&u.inbox_id())?;
                    outcomes.push(if repeat { Outcome::Duplicate } else { outcome });
                    continue;
                }
                if !inbox.first_time(&u.inbox_id())? {
                    outcomes.push(Outcome::Duplicate);
                    continue;
                }
                loop {
                    if let Some(row) = &merged.row {
                        writer.write(row)?;
                    }
                    if let Some(change) = merged.change.take() {
                        if self.outbox {
                            changes.push(change.to_event(&source));
                        }
                    }
                    match merged.fallback.take() {
                        Some(f) => {
                            merged =
                                merge_with(writer.read(&f.key)?.as_ref(), &f, now, self.outbox);
                        }
                        None => break,
                    }
                }
                outcomes.push(outcome);
            }
            drop(writer);
            if all_or_nothing {
                // A service's transaction: refused whole (rolled back when `tx` drops).
                Self::refuse_faults(&outcomes)?;
            }
            outbox::add(&tx, &source, changes.iter().chain(emits), now)?;
            inbox.prune(&tx, updates.len())?
        };
        tx.commit()?;
        pruned.commit();
        Ok(outcomes)
    }

    /// The row at `key`, unless absent, deleted or expired.
    ///
    /// # Errors
    /// A storage failure, or a stored row that is not JSON.
    pub fn get(&self, key: &RowKey) -> Result<Option<Row>, HubError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM {} WHERE pk = ?1 AND sk = ?2 AND live = 1 \
             AND (expires IS NULL OR expires > ?3)",
            self.table
        ))?;
        let mut rows = stmt.query((&key.pk, &key.sk, now_millis()))?;
        let row = rows.next()?.map(parse_row).transpose();
        row
    }

    /// The rows `query` selects, in sort-key order, live and unexpired.
    ///
    /// # Errors
    /// A storage failure, or a stored row that is not JSON.
    pub fn query(&self, query: &RowQuery) -> Result<Vec<Row>, HubError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM {} WHERE pk = ?1 AND sk >= ?2 \
             AND substr(sk, 1, length(?2)) = ?2 AND (?3 IS NULL OR sk > ?3) AND live = 1 \
             AND (expires IS NULL OR expires > ?4) ORDER BY sk LIMIT ?5",
            self.table
        ))?;
        let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
        let rows = parse_rows(stmt.query((
            &query.pk,
            &query.sk_prefix,
            &query.after,
            now_millis(),
            limit,
        ))?);
        rows
    }

    /// Every live row, by key, from the one after `after` on, at most `limit`.
    ///
    /// # Errors
    /// A storage failure, or a stored row that is not JSON.
    pub fn scan(&self, after: Option<&RowKey>, limit: usize) -> Result<Vec<Row>, HubError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM {} WHERE (?1 IS NULL OR (pk, sk) > (?1, ?2)) AND live = 1 \
             AND (expires IS NULL OR expires > ?3) ORDER BY pk, sk LIMIT ?4",
            self.table
        ))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let (pk, sk) = (after.map(|k| &k.pk), after.map(|k| &k.sk));
        let rows = parse_rows(stmt.query((pk, sk, now_millis(), limit))?);
        rows
    }

    /// Deletes the rows expired at `now` (ms since the epoch), 1,000 per transaction so that
    /// writers wait little; returns how many.
    ///
    /// # Errors
    /// A storage failure.
    pub fn expire(&self, now: i64) -> Result<u64, HubError> {
        let mut total = 0;
        loop {
            let deleted = crate::busy::retry("rows", self.busy_retry, || {
                let conn = self.conn()?;
                let _turn = self.gate.enter();
                let table = &self.table;
                Ok(conn.execute(
                    &format!(
                        "DELETE FROM {table} WHERE (pk, sk) IN (SELECT pk, sk FROM {table} \
                         WHERE expires <= ?1 LIMIT 1000)"
                    ),
                    [now],
                )?)
            })?;
            total += deleted as u64;
            if deleted < 1_000 {
                return Ok(total);
            }
        }
    }
}

const COLUMNS: &str = "pk, sk, disc, time, event, fields, meta, expires, live";

/// A row as selected by [`COLUMNS`], its JSON parsed from the text SQLite holds without
/// copying it first.
fn parse_row(r: &rusqlite::Row<'_>) -> Result<Row, HubError> {
    let text = |i: usize| -> Result<&str, HubError> {
        Ok(r.get_ref(i)?.as_str().map_err(rusqlite::Error::from)?)
    };
    let corrupt = |what: &'static str| {
        move |e: serde_json::Error| HubError::Corrupt {
            what,
            detail: e.to_string(),
        }
    };
    let mut row = Row {
        key: RowKey {
            pk: r.get(0)?,
            sk: r.get(1)?,
        },
        discriminator: r.get(2)?,
        fields: serde_json::from_str(text(5)?).map_err(corrupt("row fields"))?,
        version: Version {
            timestamp: r.get(3)?,
            id: r.get(4)?,
        },
        expires_at: r.get(7)?,
        meta: serde_json::from_str::<RowMeta>(text(6)?).map_err(corrupt("row versions"))?,
    };
    row.restore_meta();
    Ok(row)
}

/// Every row a statement gives.
fn parse_rows(mut rows: rusqlite::Rows<'_>) -> Result<Vec<Row>, HubError> {
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(parse_row(r)?);
    }
    Ok(out)
}

/// Reads and writes rows inside one transaction, with statements prepared once.
struct Writer<'tx> {
    read: rusqlite::CachedStatement<'tx>,
    write: rusqlite::CachedStatement<'tx>,
}

impl<'tx> Writer<'tx> {
    fn new(tx: &'tx Transaction<'_>, table: &str) -> rusqlite::Result<Self> {
        Ok(Writer {
            read: tx.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM {table} WHERE pk = ?1 AND sk = ?2"
            ))?,
            write: tx.prepare_cached(&format!(
                "INSERT INTO {table} ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                 ON CONFLICT (pk, sk) DO UPDATE SET disc = excluded.disc, time = excluded.time, \
                 event = excluded.event, fields = excluded.fields, meta = excluded.meta, \
                 expires = excluded.expires, live = excluded.live"
            ))?,
        })
    }

    /// The row at `key` as stored (tombstones too).
    fn read(&mut self, key: &RowKey) -> Result<Option<Row>, HubError> {
        let mut rows = self.read.query((&key.pk, &key.sk))?;
        rows.next()?.map(parse_row).transpose()
    }

    fn write(&mut self, row: &Row) -> Result<(), HubError> {
        let fields =
            serde_json::to_string(&row.fields).map_err(|e| HubError::Invalid(e.to_string()))?;
        let meta = serde_json::to_string(&row.stored_meta())
            .map_err(|e| HubError::Invalid(e.to_string()))?;
        self.write.execute((
            &row.key.pk,
            &row.key.sk,
            &row.discriminator,
            row.version.timestamp,
            &row.version.id,
            fields,
            meta,
            row.expires_at,
            row.live(),
        ))?;
        Ok(())
    }
}

/// Runs a table call on a blocking thread (SQLite waits on the disk and the write lock).
async fn blocking<T, F>(table: &RowTable, f: F) -> Result<T, floodway::BoxError>
where
    T: Send + 'static,
    F: FnOnce(RowTable) -> Result<T, HubError> + Send + 'static,
{
    let table = table.clone();
    match tokio::task::spawn_blocking(move || f(table)).await {
        // As the contract's error, with its class (a storage failure is transient, an invalid
        // request poison).
        Ok(result) => Ok(result.map_err(floodway::Error::from)?),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(Box::new(e)),
    }
}

impl RowStore for RowTable {
    fn name(&self) -> &str {
        &self.name
    }

    fn update<'a>(&'a self, updates: &'a [Update]) -> HubFuture<'a, Vec<Outcome>> {
        let updates = updates.to_vec();
        Box::pin(blocking(self, move |t| t.apply(&updates)))
    }

    fn get<'a>(&'a self, key: &'a RowKey) -> HubFuture<'a, Option<Row>> {
        let key = key.clone();
        Box::pin(blocking(self, move |t| t.get(&key)))
    }

    fn query<'a>(&'a self, query: &'a RowQuery) -> HubFuture<'a, Vec<Row>> {
        let query = query.clone();
        Box::pin(blocking(self, move |t| t.query(&query)))
    }
}
