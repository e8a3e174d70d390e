//! Gathers units of work into batches by count, bytes and time; groups and compacts them.

use std::collections::HashMap;

use tokio::time::Instant;

use crate::pipeline::Batching;
use crate::uow::{Batch, Uow};

/// A batch ready for the sink: `items` go to the sink; every member is done when it is.
pub(crate) struct Flushed {
    pub(crate) members: Vec<Uow>,
    pub(crate) items: Batch,
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
    pub(crate) fn push(&mut self, uow: Uow) -> Vec<Flushed> {
        let config = self.batching.config;
        let size = uow.event().encoded_len();
        let mut out = Vec::new();
        if !self.items.is_empty() && self.bytes + size > config.max_bytes {
            out = self.flush();
        }
        if self.items.is_empty() {
            self.deadline = Some(Instant::now() + config.max_wait);
        }
        self.bytes += size;
        self.items.push(uow);
        if self.items.len() >= config.max_count || self.bytes >= config.max_bytes {
            out.extend(self.flush());
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

    /// Sends the open batch now.
    pub(crate) fn flush(&mut self) -> Vec<Flushed> {
        self.deadline = None;
        self.bytes = 0;
        let items = std::mem::take(&mut self.items);
        if items.is_empty() {
            return Vec::new();
        }
        let groups = match &self.batching.group {
            None => vec![items],
            Some(key) => {
                let mut order: Vec<Vec<Uow>> = Vec::new();
                let mut index: HashMap<String, usize> = HashMap::new();
                for uow in items {
                    let k = key(&uow);
                    let i = *index.entry(k).or_insert_with(|| {
                        order.push(Vec::new());
                        order.len() - 1
                    });
                    order[i].push(uow);
                }
                order
            }
        };
        groups
            .into_iter()
            .map(|members| {
                let items = match &self.batching.compact {
                    None => members.clone(),
                    Some(key) => compact(&members, key.as_ref()),
                };
                Flushed {
                    members,
                    items: Batch::new(items),
                }
            })
            .collect()
    }
}

/// The latest unit of work per key by `(timestamp, id)`, in order of their position.
fn compact(members: &[Uow], key: &(dyn Fn(&Uow) -> String + Send + Sync)) -> Vec<Uow> {
    let mut latest: HashMap<String, usize> = HashMap::new();
    for (i, uow) in members.iter().enumerate() {
        let version = |u: &Uow| (u.event().timestamp(), u.event().id().to_owned());
        latest
            .entry(key(uow))
            .and_modify(|j| {
                if version(uow) > version(&members[*j]) {
                    *j = i;
                }
            })
            .or_insert(i);
    }
    let mut keep: Vec<usize> = latest.into_values().collect();
    keep.sort_unstable();
    keep.into_iter().map(|i| members[i].clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;
    use crate::pipeline::BatchConfig;
    use std::sync::Arc;

    fn uow(key: &str, ts: i64, id: &str) -> Uow {
        Uow::detached(Event::builder("t", key).id(id).timestamp(ts).build())
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
        assert!(b.push(uow("a", 1, "1")).is_empty());
        assert!(b.push(uow("a", 1, "2")).is_empty());
        let out = b.push(uow("a", 1, "3"));
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
        let out = b.push(uow("a", 1, "3"));
        assert_eq!(out.len(), 1, "the third would pass the byte limit");
        assert_eq!(out[0].items.len(), 2);
        assert_eq!(b.flush()[0].items.len(), 1);
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
        let out = b.flush();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].members.len(), 3);
        let ids: Vec<_> = out[0].items.events().map(|e| e.id().to_owned()).collect();
        assert_eq!(ids, vec!["4"], "latest by (timestamp, id)");
        assert_eq!(out[1].items.len(), 1);
    }
}
