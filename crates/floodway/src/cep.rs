//! Complex event processing, the book's control services: events collected per correlation
//! key, rules evaluated over each key's set as events join it, and timers for what must
//! happen within a time (or must not).
//!
//! This module is the pure part, shared by every store: what a rule makes of a set
//! ([`Rule::evaluate`]), which timers an event sets ([`Rule::timers`]) and what a due timer
//! makes ([`Rule::fire`]). Sets are read in event-time order whatever order the events
//! arrived in, and an emitted event's id is derived from the rule, the key and the events that
//! triggered it, so a redelivery, or the same set evaluated again, emits the same event (which
//! the store emits once).
//!
//! The rule kinds (each over the events of a set, after its `where` conditions):
//!
//! - [`RuleKind::All`]: every one of some types has happened;
//! - [`RuleKind::Sequence`]: `first` then `then` within a window;
//! - [`RuleKind::Threshold`]: `count` events of a type within a sliding window;
//! - [`RuleKind::Absence`]: `first` not followed by `then` within a window (a timer).
//!
//! Anything else is a [`Rule`] of one's own.

use std::fmt::Debug;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::event::Event;

/// An event as a set holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Collected {
    /// Its id.
    pub id: String,
    /// Its type.
    pub event_type: String,
    /// Its time (ms since the epoch).
    pub timestamp: i64,
    /// The whole event.
    pub event: Event,
}

impl Collected {
    /// `event` as collected.
    pub fn of(event: &Event) -> Self {
        Collected {
            id: event.id().to_owned(),
            event_type: event.event_type().to_owned(),
            timestamp: event.timestamp(),
            event: event.clone(),
        }
    }

    fn order(&self) -> (i64, &str) {
        (self.timestamp, &self.id)
    }
}

/// What a rule decided: an event to emit, made of the events that triggered it.
#[derive(Debug, Clone, PartialEq)]
pub struct Firing {
    /// The rule.
    pub rule: String,
    /// The event's type.
    pub event_type: String,
    /// Its time: the last trigger's, or the timer's.
    pub timestamp: i64,
    /// The events that triggered it, in time order.
    pub triggers: Vec<Collected>,
    /// What makes the firing one of its own, when not its triggers: its id is then derived
    /// from this, so that the same set evaluated again after a late event (an earlier
    /// event arriving after a later one) emits nothing new where the triggers it picks have
    /// changed. The built-in kinds fire once per key for `all` (`""`), once per `then` event
    /// for `sequence`, once per window-ending event for `threshold` and once per `first`
    /// event for `absence`. `None`: by the triggers.
    pub anchor: Option<String>,
}

impl Firing {
    /// The event, keyed by `key` (the correlation key's value), its id derived from the
    /// processor, the rule, the key and the anchor or else the triggers.
    pub fn to_event(&self, processor: &str, key: &str) -> Event {
        let what = match &self.anchor {
            Some(anchor) => format!("anchor:{anchor}"),
            None => {
                let mut ids: Vec<&str> = self.triggers.iter().map(|t| t.id.as_str()).collect();
                ids.sort_unstable();
                ids.join(",")
            }
        };
        let id =
            crate::rows::change_id(processor, &crate::rows::RowKey::new(key, &self.rule), &what);
        let triggers: Vec<Value> = self
            .triggers
            .iter()
            .map(|t| json!({"id": t.id, "type": t.event_type, "timestamp": t.timestamp}))
            .collect();
        Event::builder(self.event_type.clone(), key.to_owned())
            .id(id)
            .timestamp(self.timestamp)
            .tag("source", processor.to_owned())
            .field("triggers", Value::Array(triggers))
            .field("rule", self.rule.clone())
            .build()
    }
}

/// A timer a rule sets: due at `due` (ms since the epoch), for the rule, about one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timer {
    /// When it is due.
    pub due: i64,
    /// The rule that set it.
    pub rule: String,
    /// The event it is about.
    pub trigger: String,
}

/// The type of the event a hub delivers when a timer it keeps is due (a JetStream message
/// schedule, an EventBridge Scheduler schedule): [`Timer::to_event`].
pub const TIMER_DUE: &str = "timer-due";

impl Timer {
    /// The event that says this timer of `key` is due, for the processor `processor`: type
    /// [`TIMER_DUE`], keyed by `key`, timed at the due time, with the timer under `timer`. Its
    /// id is stable: the same timer gives the same event.
    pub fn to_event(&self, processor: &str, key: &str) -> Event {
        self.to_event_in(processor, key, key)
    }

    /// [`Timer::to_event`] with `partition_key` as the event's partition key: that of the
    /// event that set the timer, so that it reaches the partition whose reader holds the
    /// set (a correlation key with a suffix, or other than the partition key, is not it).
    pub fn to_event_in(&self, processor: &str, key: &str, partition_key: &str) -> Event {
        let id = crate::rows::change_id(
            &format!("timer:{processor}"),
            &crate::rows::RowKey::new(key, &self.rule),
            &self.trigger,
        );
        Event::builder(TIMER_DUE, partition_key.to_owned())
            .id(id)
            .timestamp(self.due)
            .tag("source", format!("cep:{processor}"))
            .field(
                "timer",
                json!({
                    "processor": processor,
                    "key": key,
                    "rule": self.rule,
                    "trigger": self.trigger,
                    "due": self.due,
                }),
            )
            .build()
    }

    /// The processor, key and timer a [`TIMER_DUE`] event names; `None` for any other event.
    pub fn of_event(event: &Event) -> Option<(String, String, Timer)> {
        if event.event_type() != TIMER_DUE {
            return None;
        }
        let timer = event.field("timer")?;
        let text = |name: &str| timer.get(name).and_then(Value::as_str).map(str::to_owned);
        Some((
            text("processor")?,
            text("key")?,
            Timer {
                due: timer.get("due").and_then(Value::as_i64)?,
                rule: text("rule")?,
                trigger: text("trigger")?,
            },
        ))
    }
}

/// A rule over a correlated set.
pub trait Rule: Send + Sync + Debug {
    /// Its name (unique within its processor).
    fn name(&self) -> &str;

    /// What it makes of `set` (in time order) now that `added` joined it. The same set and
    /// event give the same firings: those already emitted are not emitted again.
    fn evaluate(&self, set: &[Collected], added: &Collected) -> Vec<Firing>;

    /// The timers `added` sets.
    fn timers(&self, _added: &Collected) -> Vec<Timer> {
        Vec::new()
    }

    /// What a due timer makes of `set`.
    fn fire(&self, _set: &[Collected], _timer: &Timer) -> Vec<Firing> {
        Vec::new()
    }
}

/// A rule shared by processors.
pub type SharedRule = Arc<dyn Rule>;

/// A rule made of a closure over the set and the event that joined it, for what the
/// configuration's kinds do not say (it sets no timers).
///
/// ```
/// use floodway::cep::{rule_fn, Firing};
/// // Two payments for one order: a refund is due.
/// let twice = rule_fn("paid-twice", |set, added| {
///     let paid: Vec<_> = set.iter().filter(|c| c.event_type == "payment-captured").collect();
///     if paid.len() == 2 && added.event_type == "payment-captured" {
///         vec![Firing {
///             rule: "paid-twice".into(),
///             event_type: "refund-due".into(),
///             timestamp: added.timestamp,
///             triggers: paid.into_iter().cloned().collect(),
///             anchor: None,
///         }]
///     } else {
///         Vec::new()
///     }
/// });
/// # let _ = twice;
/// ```
pub fn rule_fn<F>(name: impl Into<String>, evaluate: F) -> SharedRule
where
    F: Fn(&[Collected], &Collected) -> Vec<Firing> + Send + Sync + 'static,
{
    struct FnRule<F> {
        name: String,
        evaluate: F,
    }
    impl<F> Debug for FnRule<F> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("FnRule")
                .field("name", &self.name)
                .finish_non_exhaustive()
        }
    }
    impl<F> Rule for FnRule<F>
    where
        F: Fn(&[Collected], &Collected) -> Vec<Firing> + Send + Sync,
    {
        fn name(&self) -> &str {
            &self.name
        }
        fn evaluate(&self, set: &[Collected], added: &Collected) -> Vec<Firing> {
            (self.evaluate)(set, added)
        }
    }
    Arc::new(FnRule {
        name: name.into(),
        evaluate,
    })
}

/// The kinds of rules the configuration file writes.
#[derive(Debug, Clone, PartialEq)]
pub enum RuleKind {
    /// Every one of `types` has happened (the first of each triggers).
    All {
        /// The types.
        types: Vec<String>,
    },
    /// An event of `first`, then one of `then` within `within` ms.
    Sequence {
        /// The first type.
        first: String,
        /// The type that follows.
        then: String,
        /// The window (ms).
        within: i64,
    },
    /// `count` events of `event_type` within a sliding window of `within` ms: each event that
    /// completes such a window fires, with the window's events.
    Threshold {
        /// The type.
        event_type: String,
        /// How many.
        count: usize,
        /// The window (ms).
        within: i64,
    },
    /// An event of `first` not followed by one of `then` within `within` ms; with `then`
    /// `None`, simply `within` after `first` (an expiry).
    Absence {
        /// The first type.
        first: String,
        /// The type that should follow.
        then: Option<String>,
        /// The window (ms).
        within: i64,
    },
}

/// A rule of one of the [`RuleKind`]s, over the events that meet its conditions.
#[derive(Debug, Clone, PartialEq)]
pub struct KindRule {
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: RuleKind,
    /// The type of the events it emits.
    pub emit: String,
    /// Conditions an event must meet to count: the value at each JSON pointer.
    pub conditions: Vec<(String, Value)>,
}

impl KindRule {
    /// A rule `name` of `kind`, emitting `emit`.
    pub fn new(name: impl Into<String>, kind: RuleKind, emit: impl Into<String>) -> Self {
        KindRule {
            name: name.into(),
            kind,
            emit: emit.into(),
            conditions: Vec::new(),
        }
    }

    /// Only events whose value at `pointer` is `value` count.
    #[must_use]
    pub fn when(mut self, pointer: impl Into<String>, value: impl Into<Value>) -> Self {
        self.conditions.push((pointer.into(), value.into()));
        self
    }

    fn counts(&self, c: &Collected, event_type: &str) -> bool {
        c.event_type == event_type
            && self.conditions.iter().all(|(pointer, want)| {
                c.event
                    .json_at(pointer)
                    .and_then(|text| serde_json::from_str::<Value>(&text).ok())
                    .is_some_and(|v| v == *want)
            })
    }

    fn firing(&self, timestamp: i64, triggers: Vec<Collected>, anchor: &str) -> Firing {
        Firing {
            rule: self.name.clone(),
            event_type: self.emit.clone(),
            timestamp,
            triggers,
            anchor: Some(anchor.to_owned()),
        }
    }

    /// Whether `then` follows `a` within the window in `set`: at the same millisecond or
    /// later (two events of one millisecond are in either order; their ids say nothing).
    fn followed(&self, set: &[Collected], a: &Collected, then: &str, within: i64) -> bool {
        set.iter()
            .any(|b| self.counts(b, then) && b.id != a.id && within_after(a, b, within))
    }
}

impl Rule for KindRule {
    fn name(&self) -> &str {
        &self.name
    }

    fn evaluate(&self, set: &[Collected], added: &Collected) -> Vec<Firing> {
        match &self.kind {
            RuleKind::All { types } => {
                if !types.iter().any(|t| self.counts(added, t)) {
                    return Vec::new();
                }
                let firsts: Option<Vec<Collected>> = types
                    .iter()
                    .map(|t| set.iter().find(|c| self.counts(c, t)).cloned())
                    .collect();
                match firsts {
                    Some(mut triggers) => {
                        triggers.sort_by(|a, b| a.order().cmp(&b.order()));
                        triggers.dedup_by(|a, b| a.id == b.id);
                        let at = triggers.last().map_or(added.timestamp, |t| t.timestamp);
                        vec![self.firing(at, triggers, "")]
                    }
                    None => Vec::new(),
                }
            }
            RuleKind::Sequence {
                first,
                then,
                within,
            } => {
                // Every pair the added event takes part in: the latest `first` before each
                // `then` within the window.
                let mut out = Vec::new();
                for b in set.iter().filter(|b| self.counts(b, then)) {
                    let a = set
                        .iter()
                        .filter(|a| {
                            self.counts(a, first)
                                && a.id != b.id
                                && within_after(a, b, *within)
                                // Two of one type in one millisecond pair once, not each
                                // with the other: by id, as the set is ordered.
                                && !(first == then
                                    && a.timestamp == b.timestamp
                                    && a.order() > b.order())
                        })
                        .max_by(|x, y| x.order().cmp(&y.order()));
                    if let Some(a) = a {
                        if a.id == added.id || b.id == added.id {
                            let triggers = vec![a.clone(), b.clone()];
                            out.push(self.firing(b.timestamp, triggers, &b.id));
                        }
                    }
                }
                out
            }
            RuleKind::Threshold {
                event_type,
                count,
                within,
            } => {
                let of: Vec<&Collected> =
                    set.iter().filter(|c| self.counts(c, event_type)).collect();
                let mut out = Vec::new();
                for (i, end) in of.iter().enumerate() {
                    let window: Vec<&Collected> = of[..=i]
                        .iter()
                        .filter(|c| {
                            // Wide: no overflow at the ends of time.
                            i128::from(c.timestamp)
                                > i128::from(end.timestamp) - i128::from(*within)
                        })
                        .copied()
                        .collect();
                    if window.len() >= *count {
                        let triggers: Vec<Collected> = window[window.len() - count..]
                            .iter()
                            .map(|c| (*c).clone())
                            .collect();
                        if triggers.iter().any(|t| t.id == added.id) {
                            out.push(self.firing(end.timestamp, triggers, &end.id));
                        }
                    }
                }
                out
            }
            RuleKind::Absence { .. } => Vec::new(),
        }
    }

    fn timers(&self, added: &Collected) -> Vec<Timer> {
        match &self.kind {
            RuleKind::Absence { first, within, .. } if self.counts(added, first) => vec![Timer {
                due: added.timestamp.saturating_add(*within),
                rule: self.name.clone(),
                trigger: added.id.clone(),
            }],
            _ => Vec::new(),
        }
    }

    fn fire(&self, set: &[Collected], timer: &Timer) -> Vec<Firing> {
        let RuleKind::Absence {
            first,
            then,
            within,
        } = &self.kind
        else {
            return Vec::new();
        };
        let Some(a) = set
            .iter()
            .find(|c| c.id == timer.trigger && self.counts(c, first))
        else {
            return Vec::new();
        };
        match then {
            Some(then) if self.followed(set, a, then, *within) => Vec::new(),
            _ => vec![self.firing(timer.due, vec![a.clone()], &a.id)],
        }
    }
}

/// Whether `b` is at `a`'s time or after it, by `within` at most.
fn within_after(a: &Collected, b: &Collected, within: i64) -> bool {
    b.timestamp >= a.timestamp && b.timestamp <= a.timestamp.saturating_add(within)
}

/// Sorts a set into event-time order (ties by id), the order rules see it in.
pub fn in_time_order(set: &mut [Collected]) {
    set.sort_by(|a, b| a.order().cmp(&b.order()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str, ty: &str, t: i64) -> Collected {
        Collected::of(
            &Event::builder(ty, "o1")
                .id(id)
                .timestamp(t)
                .field("amount", if id.ends_with('x') { 5 } else { 50 })
                .build(),
        )
    }

    /// Feeds `events` one by one in the given arrival order, keeping the set in time order,
    /// and gathers the ids of what the rule emits (each once).
    fn run(rule: &dyn Rule, events: &[Collected]) -> Vec<String> {
        let mut set: Vec<Collected> = Vec::new();
        let mut emitted = Vec::new();
        for e in events {
            if set.iter().any(|c| c.id == e.id) {
                continue; // a redelivery: collected once
            }
            set.push(e.clone());
            in_time_order(&mut set);
            for f in rule.evaluate(&set, e) {
                let id = f.to_event("p", "o1").id().to_owned();
                if !emitted.contains(&id) {
                    emitted.push(id);
                }
            }
        }
        emitted.sort();
        emitted
    }

    /// `order-ready` once an order is submitted and its payment captured.
    fn ready() -> KindRule {
        KindRule::new(
            "ready",
            RuleKind::All {
                types: vec!["order-submitted".into(), "payment-captured".into()],
            },
            "order-ready",
        )
    }

    /// `ab`: an `a` followed by a `b` within 10 ms.
    fn a_then_b() -> KindRule {
        KindRule::new(
            "seq",
            RuleKind::Sequence {
                first: "a".into(),
                then: "b".into(),
                within: 10,
            },
            "ab",
        )
    }

    /// `count` events `e` within `within` ms.
    fn threshold(count: usize, within: i64) -> KindRule {
        KindRule::new(
            "t",
            RuleKind::Threshold {
                event_type: "e".into(),
                count,
                within,
            },
            "t",
        )
    }

    /// `order-expired` when no payment follows an order within `within` ms.
    fn expired(within: i64) -> KindRule {
        KindRule::new(
            "expired",
            RuleKind::Absence {
                first: "order-submitted".into(),
                then: Some("payment-captured".into()),
                within,
            },
            "order-expired",
        )
    }

    #[test]
    fn all_of_fires_once_whatever_the_order_and_repeats() {
        let rule = ready();
        let a = ev("a", "order-submitted", 1);
        let b = ev("b", "payment-captured", 2);
        let c = ev("c", "payment-captured", 3);
        let one = run(&rule, &[a.clone(), b.clone(), c.clone()]);
        assert_eq!(one.len(), 1);
        assert_eq!(
            run(&rule, &[c.clone(), b.clone(), a.clone(), b.clone()]),
            one
        );
        let f = &rule.evaluate(&[a.clone(), b.clone()], &b)[0];
        assert_eq!(f.timestamp, 2);
        let e = f.to_event("p", "o1");
        assert_eq!(e.event_type(), "order-ready");
        assert_eq!(e.field("triggers").unwrap()[1]["id"], "b");
    }

    #[test]
    fn a_late_event_makes_no_second_firing() {
        // An earlier event arriving after a later one changes which events a rule picks as
        // triggers, but not whether it fired: each kind emits as often as in time order.
        let (a, b, c) = (
            ev("a", "order-submitted", 1),
            ev("b", "payment-captured", 2),
            ev("c", "payment-captured", 3),
        );
        assert_eq!(run(&ready(), &[a.clone(), c.clone(), b.clone()]).len(), 1);
        let (a1, a2, b) = (ev("1", "a", 100), ev("2", "a", 102), ev("3", "b", 105));
        assert_eq!(
            run(&a_then_b(), &[a1.clone(), b.clone(), a2.clone()]).len(),
            run(&a_then_b(), &[a1, a2, b]).len()
        );
        let (e1, e2, e3) = (ev("e1", "e", 0), ev("e2", "e", 20), ev("e3", "e", 50));
        let in_order = run(&threshold(2, 100), &[e1.clone(), e2.clone(), e3.clone()]);
        assert_eq!(in_order.len(), 2);
        assert_eq!(run(&threshold(2, 100), &[e1, e3, e2]), in_order);
    }

    #[test]
    fn events_of_one_millisecond_follow_each_other_whatever_their_ids() {
        // The payment's id sorts before the order's: it still follows it.
        let (order, paid) = (
            ev("z", "order-submitted", 1_000),
            ev("a", "payment-captured", 1_000),
        );
        let absence = expired(60_000);
        let timer = absence.timers(&order).remove(0);
        let set = [paid.clone(), order.clone()];
        assert!(absence.fire(&set, &timer).is_empty());
        let sequence = KindRule::new(
            "paid",
            RuleKind::Sequence {
                first: "order-submitted".into(),
                then: "payment-captured".into(),
                within: 10,
            },
            "order-paid",
        );
        assert_eq!(run(&sequence, &[order, paid]).len(), 1);
    }

    #[test]
    fn two_of_one_type_in_one_millisecond_pair_once() {
        let twice = KindRule::new(
            "twice",
            RuleKind::Sequence {
                first: "a".into(),
                then: "a".into(),
                within: 10,
            },
            "aa",
        );
        assert_eq!(run(&twice, &[ev("1", "a", 5), ev("2", "a", 5)]).len(), 1);
    }

    #[test]
    fn windows_at_the_ends_of_time_do_not_overflow() {
        let absence = expired(60_000);
        let a = ev("a", "order-submitted", i64::MAX - 10);
        let b = ev("b", "payment-captured", i64::MAX);
        let timer = absence.timers(&a).remove(0);
        assert!(absence.fire(&[a, b], &timer).is_empty(), "b follows a");
        let (e1, e2) = (ev("e1", "e", i64::MIN), ev("e2", "e", i64::MIN + 5));
        assert_eq!(run(&threshold(2, 100), &[e1, e2]).len(), 1);
    }

    #[test]
    fn sequences_pair_within_the_window_in_event_time() {
        let rule = a_then_b();
        let (a, b, late) = (ev("1", "a", 100), ev("2", "b", 105), ev("3", "b", 200));
        let fired = run(&rule, &[b.clone(), late.clone(), a.clone()]);
        assert_eq!(fired, run(&rule, &[a, b, late]));
        assert_eq!(fired.len(), 1, "the late b is outside the window");
    }

    #[test]
    fn thresholds_count_in_a_sliding_window_with_conditions() {
        let rule = KindRule::new(
            "locked",
            RuleKind::Threshold {
                event_type: "login-failed".into(),
                count: 3,
                within: 300,
            },
            "account-locked",
        )
        .when("/amount", 50);
        let f = |id: &str, t| ev(id, "login-failed", t);
        // Three within 300 ms (the small one does not count), then a fourth completing another.
        let events = [
            f("1", 0),
            f("2x", 10),
            f("3", 100),
            f("4", 250),
            f("5", 320),
        ];
        let mut shuffled = events.to_vec();
        shuffled.reverse();
        let fired = run(&rule, &events);
        assert_eq!(fired, run(&rule, &shuffled));
        assert_eq!(fired.len(), 2, "{fired:?}");
    }

    #[test]
    fn absence_fires_when_nothing_followed_in_time() {
        let rule = expired(900);
        let a = ev("a", "order-submitted", 1_000);
        let timers = rule.timers(&a);
        assert_eq!(timers[0].due, 1_900);
        assert_eq!(rule.fire(std::slice::from_ref(&a), &timers[0]).len(), 1);
        let paid = ev("b", "payment-captured", 1_500);
        assert!(rule.fire(&[a.clone(), paid], &timers[0]).is_empty());
        let too_late = ev("c", "payment-captured", 2_500);
        let fired = rule.fire(&[a, too_late], &timers[0]);
        assert_eq!(fired[0].timestamp, 1_900);
    }
}
