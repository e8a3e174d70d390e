//! Gathers units of work into batches by count, bytes and time; groups and compacts them.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use tokio::time::Instant;

use crate::pipeline::step::{panic_error, StepFailure};
use crate::pipeline::Batching;
use crate::uow::{Batch, Uow};

/// A batch ready for the sink: `items` go to the sink; every member is done when it is.
pub(crate) struct Flushed {
    /// The members, when they are not the items (a compacted batch sends fewer).
    compacted: Option<Vec<Uow>>,
    pub(crate) items: Batch,
}

impl Flushed {
    /// The units of work that are done when the batch is.
    pub(crate) fn members(&self) -> &[Uow] {
        self.compacted.as_deref().unwrap_or(self.items.items())
    }

    /// The members as a shared batch, when they are the items (no compaction).
    pub(crate) fn shared_members(&self) -> Option<Batch> {
        self.compacted.is_none().then(|| self.items.clone())
    }
}

pub(crate) struct Batcher {
    batching: Batching,
    items: Vec<Uow>,
    bytes: usize,
    deadline: Option<Instant>,
}

impl Batcher {
    pub(crate) fn new(batching: Batching) -> Self {
        Batcher {
            batching,
            items: Vec::new(),
            bytes: 0,
            deadline: None,
        }
    }

    /// Adds a unit of work; returns the batches to send if that filled one.
    pub(crate) fn push(&mut self, uow: Uow) -> Flush {
        let config = self.batching.config;
        let size = uow.event().encoded_len();
        let mut out = Flush::default();
        if !self.items.is_empty() && self.bytes + size > config.max_bytes {
            out = self.flush();
        }
        if self.items.is_empty() {
            // A window too long to add to the clock means no time limit.
            self.deadline = Instant::now().checked_add(config.max_wait);
        }
        self.bytes += size;
        self.items.push(uow);
        if self.items.len() >= config.max_count || self.bytes >= config.max_bytes {
            let more = self.flush();
            out.batches.extend(more.batches);
            out.failed.extend(more.failed);
        }
        out
    }

    /// When the open batch must be sent.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Sends the open batch now: grouped, then compacted, each as the pipeline says.
    pub(crate) fn flush(&mut self) -> Flush {
        self.deadline = None;
        self.bytes = 0;
        let mut out = Flush::default();
        if self.items.is_empty() {
            return out;
        }
        if self.batching.group.is_none() && self.batching.compact.is_none() {
            // The batch as it came, moved out in one allocation: the open batch's vector
            // keeps its room for the next one.
            out.batches.push(Flushed {
                compacted: None,
                items: Batch::collect(self.items.drain(..)),
            });
            return out;
        }
        let items = std::mem::take(&mut self.items);
        let groups = match &self.batching.group {
            None => vec![items],
            Some(key) => {
                let keyed = keyed(items, key.as_ref(), "group", &mut out.failed);
                group_in_order(keyed)
            }
        };
        for members in groups {
            let (compacted, items) = match &self.batching.compact {
                None => (None, members),
                Some(key) => {
                    let keyed = keyed(members, key.as_ref(), "compact", &mut out.failed);
                    let items = compact(&keyed);
                    let members: Vec<Uow> = keyed.into_iter().map(|(_, u)| u).collect();
                    if members.is_empty() {
                        continue;
                    }
                    (Some(members), items)
                }
            };
            if !items.is_empty() {
                out.batches.push(Flushed {
                    compacted,
                    items: Batch::new(items),
                });
            }
        }
        out
    }
}

/// What a flush produced: batches for the sink, and units of work whose key function failed.
#[derive(Default)]
pub(crate) struct Flush {
    pub(crate) batches: Vec<Flushed>,
    pub(crate) failed: Vec<StepFailure>,
}

/// Each unit of work with its key; a key function that panics faults its unit of work.
fn keyed(
    items: Vec<Uow>,
    key: &(dyn Fn(&Uow) -> String + Send + Sync),
    step: &str,
    failed: &mut Vec<StepFailure>,
) -> Vec<(String, Uow)> {
    let mut out = Vec::with_capacity(items.len());
    for uow in items {
        match catch_unwind(AssertUnwindSafe(|| key(&uow))) {
            Ok(k) => out.push((k, uow)),
            Err(payload) => failed.push(StepFailure {
                uow,
                step: step.into(),
                error: panic_error(&*payload),
            }),
        }
    }
    out
}

/// Splits units of work into groups by key without reordering any partition key: a unit of
/// work joins its group's latest batch only if no later batch already holds its partition
/// key; otherwise it starts a new batch. Batches run in the order returned, so the events of a
/// partition key reach the sink in source order even when they fall into different groups.
fn group_in_order(keyed: Vec<(String, Uow)>) -> Vec<Vec<Uow>> {
    let mut groups: Vec<Vec<Uow>> = Vec::new();
    let mut latest_of_group: HashMap<String, usize> = HashMap::new();
    let mut last_of_partition_key: HashMap<u64, usize> = HashMap::new();
    for (group, uow) in keyed {
        // The key the source orders by (an SQS FIFO group), which is the partition key for
        // most sources, and the partition key a step gave the event.
        let keys = [Some(uow.order), uow.rekeyed()];
        let floor = keys
            .iter()
            .flatten()
            .filter_map(|k| last_of_partition_key.get(k).copied())
            .max();
        let index = match latest_of_group.get(&group) {
            Some(&g) if floor.is_none_or(|f| g >= f) => g,
            _ => {
                groups.push(Vec::new());
                let g = groups.len() - 1;
                latest_of_group.insert(group, g);
                g
            }
        };
        groups[index].push(uow);
        for k in keys.into_iter().flatten() {
            last_of_partition_key.insert(k, index);
        }
    }
    groups
}

/// The latest unit of work per key by `(timestamp, id)`, in order of their position.
fn compact(keyed: &[(String, Uow)]) -> Vec<Uow> {
    let version = |u: &Uow| (u.event().timestamp(), u.event().id().to_owned());
    let mut latest: HashMap<&str, usize> = HashMap::new();
    for (i, (key, uow)) in keyed.iter().enumerate() {
        latest
            .entry(key)
            .and_modify(|j| {
                if version(uow) > version(&keyed[*j].1) {
                    *j = i;
                }
            })
            .or_insert(i);
    }
    let mut keep: Vec<usize> = latest.into_values().collect();
    keep.sort_unstable();
    keep.into_iter().map(|i| keyed[i].1.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;
    use crate::pipeline::BatchConfig;
    use crate::uow::{Delivered, Record};
    use std::sync::Arc;

    fn uow(key: &str, ts: i64, id: &str) -> Uow {
        Uow::detached(Event::builder("t", key).id(id).timestamp(ts).build())
    }

    /// Grouped by event id: `2` in group B, every other in group A.
    fn two_groups() -> Batcher {
        let group = |id: &str| if id == "2" { "B" } else { "A" };
        Batcher::new(Batching {
            config: BatchConfig::count(100),
            group: Some(Arc::new(move |u: &Uow| group(u.event().id()).to_owned())),
            compact: None,
        })
    }

    #[test]
    fn grouping_never_reorders_a_fifo_message_group() {
        // e1 and e3 in group A, e2 in B; the three have different partition keys but one
        // order key (an SQS FIFO message group): e2 must not be overtaken by e3.
        let mut b = two_groups();
        for id in ["1", "2", "3"] {
            let event = Event::builder("t", format!("key-{id}")).id(id).timestamp(1);
            let record = Delivered::alone(Record::new("sqs", "g", 0, "").with_order_key("g"));
            b.push(Uow::new(record, Arc::new(event.build()), 0));
        }
        let order: Vec<Vec<String>> = b.flush().batches.iter().map(ids).collect();
        assert_eq!(order, vec![vec!["1"], vec!["2"], vec!["3"]]);
    }

    fn batching(count: usize) -> Batching {
        Batching {
            config: BatchConfig::count(count),
            group: None,
            compact: None,
        }
    }

    #[test]
    fn flushes_by_count_and_bytes() {
        let mut b = Batcher::new(batching(3));
        assert!(b.push(uow("a", 1, "1")).batches.is_empty());
        assert!(b.push(uow("a", 1, "2")).batches.is_empty());
        let out = b.push(uow("a", 1, "3")).batches;
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].items.len(), 3);
        assert!(b.is_empty() && b.deadline().is_none());

        let size = uow("a", 1, "1").event().encoded_len();
        let mut b = Batcher::new(Batching {
            config: BatchConfig::count(100).max_bytes(size * 2 + 1),
            ..batching(100)
        });
        b.push(uow("a", 1, "1"));
        b.push(uow("a", 1, "2"));
        let out = b.push(uow("a", 1, "3")).batches;
        assert_eq!(out.len(), 1, "the third would pass the byte limit");
        assert_eq!(out[0].items.len(), 2);
        assert_eq!(b.flush().batches[0].items.len(), 1);
    }

    #[test]
    fn groups_and_compacts() {
        let mut b = Batcher::new(Batching {
            config: BatchConfig::count(100),
            group: Some(Arc::new(|u: &Uow| u.event().partition_key().to_owned())),
            compact: Some(Arc::new(|u: &Uow| u.event().partition_key().to_owned())),
        });
        b.push(uow("a", 5, "1"));
        b.push(uow("b", 1, "2"));
        b.push(uow("a", 3, "3"));
        b.push(uow("a", 5, "4"));
        let out = b.flush().batches;
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].members().len(), 3);
        let ids: Vec<_> = out[0].items.events().map(|e| e.id().to_owned()).collect();
        assert_eq!(ids, vec!["4"], "latest by (timestamp, id)");
        assert_eq!(out[1].items.len(), 1);
    }

    fn ids(batch: &Flushed) -> Vec<String> {
        batch
            .members()
            .iter()
            .map(|u| u.event().id().to_owned())
            .collect()
    }

    #[test]
    fn grouping_never_reorders_a_partition_key() {
        // Grouped by a field that is not the partition key: e1 and e3 share group A, e2 is in
        // B, and all three share partition key k. Running A then B would send e3 before e2.
        let mut b = two_groups();
        for id in ["1", "2", "3"] {
            b.push(uow("k", 1, id));
        }
        b.push(uow("other", 1, "4"));
        let out = b.flush().batches;
        let order: Vec<Vec<String>> = out.iter().map(ids).collect();
        assert_eq!(order, vec![vec!["1"], vec!["2"], vec!["3", "4"]]);
    }

    #[test]
    fn a_panicking_key_function_faults_only_its_unit_of_work() {
        let mut b = Batcher::new(Batching {
            config: BatchConfig::count(100),
            group: Some(Arc::new(|u: &Uow| {
                assert_ne!(u.event().id(), "2", "no group for this one");
                u.event().partition_key().to_owned()
            })),
            compact: None,
        });
        for id in ["1", "2", "3"] {
            b.push(uow("k", 1, id));
        }
        let out = b.flush();
        assert_eq!(out.failed.len(), 1);
        assert_eq!(out.failed[0].uow.event().id(), "2");
        assert_eq!(&*out.failed[0].step, "group");
        assert_eq!(ids(&out.batches[0]), vec!["1", "3"]);
    }
}
