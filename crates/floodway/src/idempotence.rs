//! Idempotence and order tolerance: the rules every backend's stores follow.
//!
//! Delivery is at-least-once, so every effect must be safe to apply twice, and events may
//! arrive out of order (retries, resubmission, parallel keys), so a view must not let an older
//! event overwrite a newer one. Two contracts make the end state exactly-once:
//!
//! - an **inbox** remembers which event ids were applied, written in the same transaction as
//!   the effect where the store allows it ([`Inbox`]);
//! - a **latest-wins** row remembers the [`Version`] `(timestamp, id)` of the event that last
//!   wrote it and takes a write only from a newer one ([`decide`]). Ties on timestamp break by
//!   id, so the winner does not depend on arrival order.
//!
//! Property (tested here with proptest, and by every backend): any permutation of a set of
//! events, with any duplicates, yields the same view as the sorted, de-duplicated set.

use std::collections::{HashMap, HashSet};

use crate::event::Event;

/// The version of a row: the `(timestamp, id)` of the event that wrote it. Stored as
/// `{"t": timestamp, "i": id}`.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Version {
    /// Event time in milliseconds.
    #[serde(rename = "t")]
    pub timestamp: i64,
    /// Event id, the tie-breaker.
    #[serde(rename = "i")]
    pub id: String,
}

impl Version {
    /// The version an event writes.
    pub fn of(event: &Event) -> Self {
        Version {
            timestamp: event.timestamp(),
            id: event.id().to_owned(),
        }
    }
}

/// What a latest-wins write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The row did not exist.
    Inserted,
    /// The row held an older version.
    Updated,
    /// The row holds this version or a newer one: nothing changed.
    Stale,
}

/// The latest-wins rule: whether a write of `incoming` over a row at `current` applies.
pub fn decide(current: Option<&Version>, incoming: &Version) -> Applied {
    match current {
        None => Applied::Inserted,
        Some(v) if incoming > v => Applied::Updated,
        Some(_) => Applied::Stale,
    }
}

/// Remembers which events were applied.
pub trait Inbox {
    /// Records `event_id`; true if it was not there (the effect should be applied).
    fn first_delivery(&mut self, event_id: &str) -> bool;
}

/// An in-memory inbox.
#[derive(Debug, Clone, Default)]
pub struct MemoryInbox {
    seen: HashSet<String>,
}

impl Inbox for MemoryInbox {
    fn first_delivery(&mut self, event_id: &str) -> bool {
        self.seen.insert(event_id.to_owned())
    }
}

/// An in-memory latest-wins view: the reference implementation of the rule.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MemoryView<V> {
    rows: HashMap<String, (Version, V)>,
}

impl<V> MemoryView<V> {
    /// An empty view.
    pub fn new() -> Self {
        MemoryView {
            rows: HashMap::new(),
        }
    }

    /// Writes `value` at `key` if `version` is newer than the row's.
    pub fn apply(&mut self, key: &str, version: Version, value: V) -> Applied {
        let applied = decide(self.rows.get(key).map(|(v, _)| v), &version);
        if applied != Applied::Stale {
            self.rows.insert(key.to_owned(), (version, value));
        }
        applied
    }

    /// A row.
    pub fn get(&self, key: &str) -> Option<&(Version, V)> {
        self.rows.get(key)
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_events() -> impl Strategy<Value = Vec<(String, i64, String, u32)>> {
        // key, timestamp, id, value; few keys and timestamps so ties happen.
        proptest::collection::vec(("[a-c]", 0i64..5, "[a-z]{1,2}", any::<u32>()), 0..40)
    }

    proptest! {
        #[test]
        fn any_permutation_with_duplicates_gives_the_sorted_unique_result(
            events in arb_events(),
            dup_picks in proptest::collection::vec(any::<usize>(), 0..20),
            seed in any::<u64>(),
        ) {
            // An id is one event: its key, time and value are fixed by its first occurrence.
            let mut by_id: HashMap<String, (String, i64, u32)> = HashMap::new();
            for (k, t, id, v) in &events {
                by_id.entry(id.clone()).or_insert((k.clone(), *t, *v));
            }
            let mut unique: Vec<(String, (String, i64, u32))> = by_id.into_iter().collect();
            unique.sort_by(|a, b| (a.1.1, &a.0).cmp(&(b.1.1, &b.0)));

            let mut expected = MemoryView::new();
            for (id, (k, t, v)) in &unique {
                expected.apply(k, Version { timestamp: *t, id: id.clone() }, *v);
            }

            let mut delivered: Vec<(String, (String, i64, u32))> = unique.clone();
            for p in dup_picks {
                if !unique.is_empty() {
                    delivered.push(unique[p % unique.len()].clone());
                }
            }
            let mut rng = fastrand::Rng::with_seed(seed);
            rng.shuffle(&mut delivered);

            let mut inbox = MemoryInbox::default();
            let mut view = MemoryView::new();
            for (id, (k, t, v)) in &delivered {
                if inbox.first_delivery(id) {
                    view.apply(k, Version { timestamp: *t, id: id.clone() }, *v);
                }
            }
            prop_assert_eq!(view, expected);
        }
    }

    #[test]
    fn ties_break_by_id() {
        let mut view = MemoryView::new();
        let v = |id: &str| Version {
            timestamp: 1,
            id: id.into(),
        };
        assert_eq!(view.apply("k", v("b"), 2), Applied::Inserted);
        assert_eq!(view.apply("k", v("a"), 1), Applied::Stale);
        assert_eq!(view.apply("k", v("c"), 3), Applied::Updated);
        assert_eq!(view.apply("k", v("c"), 3), Applied::Stale);
        assert_eq!(view.get("k").unwrap().1, 3);
    }
}
