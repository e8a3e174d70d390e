//! Per-key ordering with concurrency across keys.
//!
//! Work is submitted in source order with the partition keys it touches (one for a unit of
//! work, the set of its members' keys for a batch). An item may start when, for each of its
//! keys, no earlier item with that key is unfinished, and fewer than `parallelism` items run.
//! A slow key delays only the items that share it, never the others (no head-of-line blocking
//! across keys, unlike hashing keys onto a fixed number of lanes).
//!
//! Keys are 64-bit hashes of the partition keys. Two keys that collide are ordered as if they
//! were one: that costs a little concurrency, never correctness.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use crate::event::KeyHashMap;

/// A hash of a partition key.
pub(crate) type KeyHash = u64;

/// The keys an item touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Keys {
    One(KeyHash),
    Many(Vec<KeyHash>),
    /// Kept by the scheduler, not carried with the item: an item started by
    /// [`Scheduler::try_start_with`] before its keys were worked out, which took them with
    /// [`Scheduler::claim_kept`] if it did not finish at once.
    Kept,
}

impl Keys {
    pub(crate) fn as_slice(&self) -> &[KeyHash] {
        match self {
            Keys::One(k) => std::slice::from_ref(k),
            Keys::Many(ks) => ks,
            Keys::Kept => &[],
        }
    }
}

/// A fast hasher for the run loop's small keys (partition names, offsets), after the one in
/// rustc (`FxHasher`): a multiply and a rotate per word. Not for keys an attacker picks; the run
/// loop's keys come from its own source.
#[derive(Default)]
pub(crate) struct FxHasher(u64);

impl FxHasher {
    const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(Self::SEED);
    }
}

impl Hasher for FxHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.add(u64::from_le_bytes(chunk.try_into().unwrap_or_default()));
        }
        let mut last = [0u8; 8];
        let rest = chunks.remainder();
        last[..rest.len()].copy_from_slice(rest);
        self.add(u64::from_le_bytes(last));
    }
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

/// A map with [`FxHasher`].
pub(crate) type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

struct KeyQueue {
    /// The item holding the key.
    head: u64,
    /// Items waiting for it, in order.
    rest: VecDeque<u64>,
}

struct Waiting<T> {
    item: T,
    keys: Keys,
    blockers: usize,
}

/// Orders items per key and bounds how many run.
pub(crate) struct Scheduler<T> {
    parallelism: usize,
    running: usize,
    next_id: u64,
    keys: KeyHashMap<KeyQueue>,
    waiting: KeyHashMap<Waiting<T>>,
    ready: VecDeque<(u64, Keys, T)>,
    /// The keys of running items started without them ([`Keys::Kept`]) and claimed.
    kept: KeyHashMap<Keys>,
}

impl<T> Scheduler<T> {
    pub(crate) fn new(parallelism: usize) -> Self {
        Scheduler {
            parallelism: parallelism.max(1),
            running: 0,
            next_id: 0,
            keys: KeyHashMap::default(),
            waiting: KeyHashMap::default(),
            ready: VecDeque::new(),
            kept: KeyHashMap::default(),
        }
    }

    /// Submits an item; `keys` must not repeat a key.
    pub(crate) fn submit(&mut self, keys: Keys, item: T) {
        self.enqueue(keys, item, None::<fn(&T) -> bool>);
    }

    /// Submits an item ahead of the items waiting at the end of each of its key queues that
    /// `behind` picks (`keys` must not repeat a key): a batch is ordered after earlier
    /// batches, not after the pre-batch work of later records of its keys, which was submitted
    /// before it only because the batch waited to fill. Items `behind` picks must hold one
    /// key each: then no two items wait for each other in different orders in two queues.
    pub(crate) fn submit_ahead(&mut self, keys: Keys, item: T, behind: impl Fn(&T) -> bool) {
        self.enqueue(keys, item, Some(behind));
    }

    /// Queues an item for each of its keys: last, or ahead of the waiting items at the end
    /// that `behind` picks.
    fn enqueue(&mut self, keys: Keys, item: T, behind: Option<impl Fn(&T) -> bool>) {
        let id = self.next_id;
        self.next_id += 1;
        let mut blockers = 0;
        for key in keys.as_slice() {
            match self.keys.entry(*key) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(KeyQueue {
                        head: id,
                        rest: VecDeque::new(),
                    });
                }
                std::collections::hash_map::Entry::Occupied(mut o) => {
                    let rest = &mut o.get_mut().rest;
                    let mut at = rest.len();
                    if let Some(behind) = &behind {
                        while at > 0
                            && self
                                .waiting
                                .get(&rest[at - 1])
                                .is_some_and(|w| behind(&w.item))
                        {
                            at -= 1;
                        }
                    }
                    rest.insert(at, id);
                    blockers += 1;
                }
            }
        }
        if blockers == 0 {
            self.ready.push_back((id, keys, item));
        } else {
            self.waiting.insert(
                id,
                Waiting {
                    item,
                    keys,
                    blockers,
                },
            );
        }
    }

    /// Starts an item at once, without queueing it, when it may start and nothing is ready
    /// before it: a slot is free and no unfinished item holds any of `keys`. Answers the id
    /// it runs under (running until [`Self::complete`]); `None`: submit it.
    ///
    /// The keys are not taken: an item that finishes before anything else is submitted (a
    /// sink answering synchronously) never touches the key table. One that does not finish at
    /// once must be [`Self::claim`]ed before the next submission.
    pub(crate) fn try_start(&mut self, keys: &Keys) -> Option<u64> {
        self.try_start_with(|| keys.as_slice().iter().copied())
    }

    /// As [`Self::try_start`], with the keys (repeats allowed) worked out by `keys` only when
    /// some key is held.
    pub(crate) fn try_start_with<I: IntoIterator<Item = KeyHash>>(
        &mut self,
        keys: impl FnOnce() -> I,
    ) -> Option<u64> {
        if self.running >= self.parallelism || !self.ready.is_empty() {
            return None;
        }
        if !self.keys.is_empty() && keys().into_iter().any(|k| self.keys.contains_key(&k)) {
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.running += 1;
        Some(id)
    }

    /// Takes the keys of an item started by [`Self::try_start`] that did not finish at once.
    pub(crate) fn claim(&mut self, id: u64, keys: &Keys) {
        for key in keys.as_slice() {
            let previous = self.keys.insert(
                *key,
                KeyQueue {
                    head: id,
                    rest: VecDeque::new(),
                },
            );
            debug_assert!(previous.is_none(), "a started item's keys were free");
        }
    }

    /// Takes `keys` (without repeats) for an item started under `id` with [`Keys::Kept`] that
    /// did not finish at once, and keeps them until it completes.
    pub(crate) fn claim_kept(&mut self, id: u64, keys: Keys) {
        self.claim(id, &keys);
        self.kept.insert(id, keys);
    }

    /// The next item that may start, if any; it counts as running until [`Self::complete`].
    pub(crate) fn next(&mut self) -> Option<(u64, Keys, T)> {
        if self.running >= self.parallelism {
            return None;
        }
        let next = self.ready.pop_front()?;
        self.running += 1;
        Some(next)
    }

    /// Marks a started item finished, releasing its keys to the items waiting for them (an
    /// item started by [`Self::try_start`] and never claimed holds none).
    pub(crate) fn complete(&mut self, id: u64, keys: &Keys) {
        self.running -= 1;
        if self.keys.is_empty() {
            // No key is held: nothing waits for one (and no item keeps any).
            debug_assert!(self.kept.is_empty());
            return;
        }
        match keys {
            Keys::Kept => {
                // Started without its keys: it holds those it was claimed with, if it was.
                if let Some(kept) = self.kept.remove(&id) {
                    self.release(id, kept.as_slice());
                }
            }
            _ => self.release(id, keys.as_slice()),
        }
    }

    /// Releases the `keys` item `id` holds to the items waiting for them.
    fn release(&mut self, id: u64, keys: &[KeyHash]) {
        for key in keys {
            let Some(queue) = self.keys.get_mut(key) else {
                continue;
            };
            debug_assert_eq!(queue.head, id, "keys are released by their holder");
            match queue.rest.pop_front() {
                None => {
                    self.keys.remove(key);
                }
                Some(next) => {
                    queue.head = next;
                    if let Some(w) = self.waiting.get_mut(&next) {
                        w.blockers -= 1;
                        if w.blockers == 0 {
                            let w = self.waiting.remove(&next).expect("present");
                            self.ready.push_back((next, w.keys, w.item));
                        }
                    }
                }
            }
        }
    }

    /// Items waiting for an earlier item of one of their keys (parked behind a busy key).
    pub(crate) fn parked(&self) -> usize {
        self.waiting.len()
    }

    /// Whether items that could start wait for a slot: the target, not key order, is what
    /// holds the work up.
    pub(crate) fn saturated(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Items submitted and not completed (waiting, ready or running).
    pub(crate) fn len(&self) -> usize {
        self.running + self.ready.len() + self.waiting.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn same_key_waits_other_keys_run() {
        let mut s = Scheduler::new(10);
        s.submit(Keys::One(1), "a1");
        s.submit(Keys::One(1), "a2");
        s.submit(Keys::One(2), "b1");
        let (ida1, ka1, a1) = s.next().unwrap();
        let (_, _, b1) = s.next().unwrap();
        assert_eq!((a1, b1), ("a1", "b1"));
        assert!(s.next().is_none(), "a2 waits for a1");
        s.complete(ida1, &ka1);
        assert_eq!(s.next().unwrap().2, "a2");
    }

    /// An item started without its keys takes them only if it does not finish at once, and
    /// then holds every one of them until it completes; one that finishes at once holds none.
    #[test]
    fn an_item_started_without_its_keys_holds_them_once_claimed() {
        let mut s: Scheduler<&str> = Scheduler::new(10);
        let never_asked = || -> Vec<KeyHash> { panic!("no key is held: none is looked at") };
        let quick = s.try_start_with(never_asked).unwrap();
        s.complete(quick, &Keys::Kept);
        assert!(s.is_empty());

        // A batch of keys 1, 2 and 1 again, started and not finished at once.
        let batch = s.try_start_with(|| [1, 2, 1]).unwrap();
        s.claim_kept(batch, Keys::Many(vec![1, 2]));
        assert!(s.try_start_with(|| [2, 3]).is_none(), "key 2 is held");
        let started = s.try_start_with(|| [3]).unwrap();
        s.submit(Keys::One(2), "after the batch");
        assert!(s.next().is_none(), "it waits for the batch");
        // One started without its keys and finished at once, while keys are held: it
        // releases none of them.
        s.complete(started, &Keys::Kept);
        assert!(s.next().is_none(), "still waiting for the batch");
        s.complete(batch, &Keys::Kept);
        assert_eq!(s.next().unwrap().2, "after the batch");
    }

    #[test]
    fn batches_wait_for_every_key() {
        let mut s = Scheduler::new(10);
        s.submit(Keys::One(1), "a");
        s.submit(Keys::One(2), "b");
        s.submit(Keys::Many(vec![1, 2]), "ab");
        let (ia, ka, _) = s.next().unwrap();
        let (ib, kb, _) = s.next().unwrap();
        assert!(s.next().is_none());
        s.complete(ia, &ka);
        assert!(s.next().is_none(), "still blocked on key 2");
        s.complete(ib, &kb);
        assert_eq!(s.next().unwrap().2, "ab");
    }

    #[test]
    fn an_item_submitted_ahead_passes_only_what_it_is_ahead_of() {
        let mut s = Scheduler::new(10);
        s.submit(Keys::One(1), "pre-1");
        s.submit(Keys::One(1), "batch-0");
        s.submit(Keys::One(1), "pre-2");
        s.submit(Keys::One(1), "pre-3");
        let is_pre = |i: &&str| i.starts_with("pre");
        s.submit_ahead(Keys::Many(vec![1, 2]), "batch-1", is_pre);
        let mut order = Vec::new();
        while let Some((id, keys, item)) = s.next() {
            order.push(item);
            s.complete(id, &keys);
        }
        // The running item and the batch before it stay ahead; the later pre work waits.
        assert_eq!(order, ["pre-1", "batch-0", "batch-1", "pre-2", "pre-3"]);
    }

    proptest! {
        /// Batches submitted ahead of single-key work never wedge the scheduler, and batches
        /// sharing a key start in submission order, whatever order running items finish in.
        #[test]
        fn items_submitted_ahead_never_wedge(
            items in proptest::collection::vec((any::<bool>(), proptest::collection::btree_set(0u64..4, 1..4)), 1..40),
            picks in proptest::collection::vec(any::<usize>(), 200),
            parallelism in 1usize..4,
        ) {
            let mut s = Scheduler::new(parallelism);
            let mut running: Vec<(u64, Keys, usize)> = Vec::new();
            let mut started = Vec::new();
            let mut picks = picks.into_iter().cycle();
            let mut submitted = 0;
            while submitted < items.len() || !s.is_empty() {
                let pick = picks.next().unwrap();
                if submitted < items.len() && (pick % 3 != 0 || running.is_empty()) {
                    let (batch, keys) = &items[submitted];
                    let keys: Vec<u64> = keys.iter().copied().collect();
                    if *batch {
                        s.submit_ahead(Keys::Many(keys), submitted, |i| !items[*i].0);
                    } else {
                        s.submit(Keys::One(keys[0]), submitted);
                    }
                    submitted += 1;
                } else {
                    prop_assert!(!running.is_empty(), "wedged");
                    let (id, k, _) = running.swap_remove(pick % running.len());
                    s.complete(id, &k);
                }
                while let Some(item) = s.next() {
                    started.push(item.2);
                    running.push(item);
                }
            }
            prop_assert_eq!(started.len(), items.len());
            for key in 0..4 {
                let batches: Vec<usize> = started
                    .iter()
                    .copied()
                    .filter(|i| items[*i].0 && items[*i].1.contains(&key))
                    .collect();
                let mut sorted = batches.clone();
                sorted.sort_unstable();
                prop_assert_eq!(batches, sorted);
            }
        }

        /// Whatever order running items finish in, items sharing a key start in submission
        /// order and never overlap, and at most `parallelism` run at once.
        #[test]
        fn per_key_order_under_random_completion(
            keys in proptest::collection::vec(0u64..5, 1..60),
            picks in proptest::collection::vec(any::<usize>(), 200),
            parallelism in 1usize..6,
        ) {
            let mut s = Scheduler::new(parallelism);
            for (i, k) in keys.iter().enumerate() {
                s.submit(Keys::One(*k), i);
            }
            let mut running: Vec<(u64, Keys, usize)> = Vec::new();
            let mut started: Vec<usize> = Vec::new();
            let mut picks = picks.into_iter().cycle();
            while !s.is_empty() {
                while let Some(item) = s.next() {
                    for r in &running {
                        prop_assert_ne!(keys[r.2], keys[item.2], "same key overlapped");
                    }
                    started.push(item.2);
                    running.push(item);
                }
                prop_assert!(running.len() <= parallelism);
                let i = picks.next().unwrap() % running.len();
                let (id, k, _) = running.swap_remove(i);
                s.complete(id, &k);
            }
            for key in 0..5 {
                let order: Vec<usize> = started.iter().copied().filter(|i| keys[*i] == key).collect();
                let mut sorted = order.clone();
                sorted.sort_unstable();
                prop_assert_eq!(order, sorted);
            }
            prop_assert_eq!(started.len(), keys.len());
        }
    }
}
