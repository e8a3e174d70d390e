//! The inbox of the stores that apply events (views, rows): which events each has applied,
//! written in the store's own transaction, by the window of
//! [`HubOptions::inbox_window`](crate::HubOptions::inbox_window) they were applied in.
//!
//! Windows start at multiples of the window's length. An event is remembered for one to two
//! windows: the writes delete the windows before the previous one as they go, a bounded batch
//! per transaction. A redelivery it remembers counts as a duplicate; a later one meets the
//! row's version, which is at least the event's own, and changes nothing either.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use rusqlite::{CachedStatement, Transaction};

use crate::store::PRUNE_BATCH;

/// One store's inbox (its entries carry the store's name).
#[derive(Clone)]
pub(crate) struct Inbox {
    name: Arc<str>,
    window_ms: i64,
    /// When the inbox may next hold windows to delete (ms since the epoch).
    next_prune: Arc<AtomicI64>,
    /// The last window found to hold no ids of this store: while it is the previous window,
    /// looking an event up there is skipped (a window gets no ids once it is past).
    empty_window: Arc<AtomicI64>,
}

/// The inbox within one transaction.
pub(crate) struct Turn<'tx> {
    inbox: &'tx Inbox,
    now: i64,
    current: i64,
    previous: i64,
    look_back: bool,
    insert: CachedStatement<'tx>,
    seen_before: CachedStatement<'tx>,
}

impl Inbox {
    /// The inbox of store `name`.
    pub(crate) fn new(name: &str, window: std::time::Duration) -> Self {
        Inbox {
            name: name.into(),
            window_ms: crate::log::millis(window).max(1),
            next_prune: Arc::new(AtomicI64::new(0)),
            empty_window: Arc::new(AtomicI64::new(i64::MIN)),
        }
    }

    /// Starts using the inbox in `tx`, at `now` (ms since the epoch).
    pub(crate) fn begin<'tx>(
        &'tx self,
        tx: &'tx Transaction<'_>,
        now: i64,
    ) -> rusqlite::Result<Turn<'tx>> {
        let current = now - now.rem_euclid(self.window_ms);
        let previous = current - self.window_ms;
        // Whether the previous window may hold ids of this store: found out once per window.
        let look_back = self.empty_window.load(Ordering::Relaxed) != previous && {
            let any: bool = tx
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM inbox WHERE bucket = ?1 AND view = ?2)",
                )?
                .query_row((previous, &*self.name), |r| r.get(0))?;
            if !any {
                self.empty_window.store(previous, Ordering::Relaxed);
            }
            any
        };
        Ok(Turn {
            inbox: self,
            now,
            current,
            previous,
            look_back,
            insert: tx.prepare_cached(
                "INSERT OR IGNORE INTO inbox (bucket, view, event) VALUES (?1, ?2, ?3)",
            )?,
            seen_before: tx.prepare_cached(
                "SELECT 1 FROM inbox WHERE bucket = ?1 AND view = ?2 AND event = ?3",
            )?,
        })
    }
}

impl Turn<'_> {
    /// Records `id`; false when it was applied before (a duplicate).
    pub(crate) fn first_time(&mut self, id: &str) -> rusqlite::Result<bool> {
        let name = &*self.inbox.name;
        Ok(self.insert.execute((self.current, name, id))? != 0
            && !(self.look_back && self.seen_before.exists((self.previous, name, id))?))
    }

    /// Whether `id` was applied (in the inbox's windows), without recording it.
    pub(crate) fn seen(&mut self, id: &str) -> rusqlite::Result<bool> {
        let name = &*self.inbox.name;
        Ok(self.seen_before.exists((self.current, name, id))?
            || (self.look_back && self.seen_before.exists((self.previous, name, id))?))
    }

    /// Deletes, once there may be some, the windows before the previous one: a bounded batch,
    /// larger than the `added` ids (so the inbox stays bounded), in key order from the start of
    /// the table. Returns what to pass to [`Pruned::commit`] once `tx` commits.
    pub(crate) fn prune(self, tx: &Transaction<'_>, added: usize) -> rusqlite::Result<Pruned> {
        let due = self.inbox.next_prune.load(Ordering::Relaxed);
        let mut next = due;
        if self.now >= due {
            let limit = 2 * added + PRUNE_BATCH;
            let deleted = tx
                .prepare_cached(
                    "DELETE FROM inbox WHERE (bucket, view, event) IN (SELECT bucket, view, \
                     event FROM inbox WHERE bucket < ?1 ORDER BY bucket, view, event LIMIT ?2)",
                )?
                .execute((self.previous, limit as i64))?;
            // All gone: the next to go is the previous window, when the next one starts.
            next = if deleted < limit {
                self.current + self.inbox.window_ms
            } else {
                self.now
            };
        }
        Ok(Pruned {
            next_prune: self.inbox.next_prune.clone(),
            next,
        })
    }
}

/// When the inbox is next due for pruning, to remember once the transaction commits.
pub(crate) struct Pruned {
    next_prune: Arc<AtomicI64>,
    next: i64,
}

impl Pruned {
    /// The transaction committed.
    pub(crate) fn commit(self) {
        self.next_prune.store(self.next, Ordering::Relaxed);
    }
}
