//! Accounting of records in flight, and the checkpoint per partition.
//!
//! A record is split into *pieces*: one per pipeline that takes its event at first (a record
//! none takes is done as it is admitted); a pipeline that splits it into several units of work
//! adds pieces, and a pipeline whose step filters a unit of work out finishes that piece. When
//! the last piece is finished (succeeded, filtered, or its fault durably written) the record
//! is done. Per partition, the checkpoint is the offset of the last record such that it and
//! every record delivered before it are done: it never passes an unfinished record, whatever
//! order pieces finish in (invariant 1).

use std::collections::VecDeque;
use std::sync::Arc;

use super::scheduler::FxMap;

use crate::source::{Checkpoint, Settlement};
use crate::uow::{Delivered, Record, Ticket};

struct Slot {
    /// Dropped when the record is done, so that a done record waiting for earlier ones holds
    /// only its slot, and its pull goes once the pull's other records are done too.
    record: Option<Delivered>,
    offset: u64,
    partition: usize,
    pending: u32,
    faulted: bool,
}

struct Partition {
    name: Arc<str>,
    /// Tickets of this partition's records not yet behind the checkpoint, in delivery order.
    order: VecDeque<Ticket>,
    checkpoint: Option<u64>,
    dirty: bool,
}

/// A record that just finished.
pub(crate) struct Finished {
    pub(crate) record: Delivered,
    pub(crate) settlement: Settlement,
}

#[derive(Default)]
pub(crate) struct Ledger {
    base: Ticket,
    slots: VecDeque<Slot>,
    undone: usize,
    partitions: Vec<Partition>,
    partition_index: FxMap<Arc<str>, usize>,
    /// The partition of the last record admitted: a source's batch is mostly of one
    /// partition, found by comparing its name rather than hashing it.
    last: Option<(Arc<str>, usize)>,
}

// The calls made for every record (admitting it, finishing a piece, moving the checkpoint) are
// inlined into the run loop's dispatch and completion, as a build optimized by profile inlines
// them (BENCHMARKS.md, "What the profile inlined, inlined by hand").
impl Ledger {
    /// Registers a delivered record with `pieces` pieces; returns its ticket.
    #[inline(always)]
    pub(crate) fn admit(&mut self, record: Delivered, pieces: u32) -> Ticket {
        self.undone += 1;
        let partition = self.index(&record.partition);
        self.push(partition, record.offset, Some(record), pieces)
    }

    /// Registers a delivered record that is done as it is seen (no pipeline takes it): the
    /// ledger keeps no reference to it, only its slot (the checkpoint of its partition passes
    /// it once the records delivered before it there are done; the slot goes once every slot
    /// before it has).
    #[inline(always)]
    pub(crate) fn admit_done(&mut self, record: &Record) {
        let partition = self.index(&record.partition);
        self.push(partition, record.offset, None, 0);
        self.advance(partition);
    }

    /// Adds the slot of a record (`None`: done) at `offset` of partition `partition` (an
    /// index); returns its ticket.
    #[inline(always)]
    fn push(
        &mut self,
        partition: usize,
        offset: u64,
        record: Option<Delivered>,
        pending: u32,
    ) -> Ticket {
        let ticket = self.base + self.slots.len() as u64;
        self.partitions[partition].order.push_back(ticket);
        self.slots.push_back(Slot {
            offset,
            record,
            partition,
            pending,
            faulted: false,
        });
        ticket
    }

    /// The index of partition `name`; the last one's without a lookup.
    #[inline(always)]
    fn index(&mut self, name: &Arc<str>) -> usize {
        match &self.last {
            Some((last, i)) if last == name => *i,
            _ => self.partition_of(name),
        }
    }

    /// The index of partition `name`, added if new; remembered as the last one seen.
    fn partition_of(&mut self, name: &Arc<str>) -> usize {
        let i = match self.partition_index.get(name) {
            Some(i) => *i,
            None => {
                let i = self.partitions.len();
                self.partitions.push(Partition {
                    name: name.clone(),
                    order: VecDeque::new(),
                    checkpoint: None,
                    dirty: false,
                });
                self.partition_index.insert(name.clone(), i);
                i
            }
        };
        self.last = Some((name.clone(), i));
        i
    }

    fn slot(&mut self, ticket: Ticket) -> &mut Slot {
        let index = (ticket - self.base) as usize;
        &mut self.slots[index]
    }

    /// Adds pieces to an unfinished record (a split).
    pub(crate) fn add_pieces(&mut self, ticket: Ticket, pieces: u32) {
        self.slot(ticket).pending += pieces;
    }

    /// Finishes one piece; returns the record if that was its last.
    #[inline(always)]
    pub(crate) fn finish(&mut self, ticket: Ticket, faulted: bool) -> Option<Finished> {
        let slot = self.slot(ticket);
        debug_assert!(slot.pending > 0, "piece finished twice");
        slot.pending -= 1;
        slot.faulted |= faulted;
        if slot.pending > 0 {
            return None;
        }
        let record = slot.record.take()?;
        let settlement = if slot.faulted {
            Settlement::Faulted
        } else {
            Settlement::Done
        };
        let partition = slot.partition;
        self.undone -= 1;
        self.advance(partition);
        Some(Finished { record, settlement })
    }

    /// Moves the checkpoint of `partition` past its records that are done, and drops the slots
    /// of done records that every checkpoint has passed.
    #[inline(always)]
    fn advance(&mut self, partition: usize) {
        let base = self.base;
        let part = &mut self.partitions[partition];
        while let Some(&front) = part.order.front() {
            let slot = &self.slots[(front - base) as usize];
            if slot.record.is_some() {
                break;
            }
            part.order.pop_front();
            part.checkpoint = Some(slot.offset);
            part.dirty = true;
        }
        // Drop done slots from the front once their partition's checkpoint has passed them.
        while let Some(front) = self.slots.front() {
            let behind_checkpoint = self.partitions[front.partition]
                .order
                .front()
                .is_none_or(|t| *t > self.base);
            if front.record.is_some() || !behind_checkpoint {
                break;
            }
            self.slots.pop_front();
            self.base += 1;
        }
    }

    /// The checkpoints that moved since the last call.
    pub(crate) fn take_checkpoints(&mut self) -> Vec<Checkpoint> {
        let mut out = Vec::new();
        for part in &mut self.partitions {
            if std::mem::take(&mut part.dirty) {
                if let Some(offset) = part.checkpoint {
                    out.push(Checkpoint {
                        partition: part.name.clone(),
                        offset,
                    });
                }
            }
        }
        out
    }

    /// Marks the partitions of `checkpoints` as moved again: taken for a commit that failed,
    /// they go with the next one (the final commit, when the run stops on that failure).
    pub(crate) fn moved_again(&mut self, checkpoints: &[Checkpoint]) {
        for part in &mut self.partitions {
            if checkpoints.iter().any(|cp| cp.partition == part.name) {
                part.dirty = true;
            }
        }
    }

    /// Records delivered and not done.
    pub(crate) fn undone(&self) -> usize {
        self.undone
    }

    /// Slots held, done or not (bounded so memory stays flat behind a slow record).
    pub(crate) fn held(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::TestCaseError;
    use std::collections::HashMap;

    #[test]
    fn checkpoints_of_a_failed_commit_go_with_the_next_one() {
        let mut ledger = Ledger::default();
        for (p, offset) in [("0", 1), ("1", 1)] {
            let t = ledger.admit(Delivered::alone(Record::new("t", p, offset, "")), 1);
            ledger.finish(t, false);
        }
        let taken = ledger.take_checkpoints();
        assert_eq!(taken.len(), 2);
        assert!(ledger.take_checkpoints().is_empty(), "taken once");
        ledger.moved_again(&taken);
        assert_eq!(ledger.take_checkpoints(), taken);
    }

    /// Takes the ledger's moved checkpoints and checks each: every record of its partition up
    /// to it is `done` (offsets 10, 20, ...), and it moved forward from `checkpoints`' last.
    fn taken_checkpoints_hold(
        ledger: &mut Ledger,
        done: &[(u8, u64)],
        checkpoints: &mut HashMap<String, u64>,
    ) -> Result<(), TestCaseError> {
        for cp in ledger.take_checkpoints() {
            let part: u8 = cp.partition.parse().unwrap();
            for o in (10..=cp.offset).step_by(10) {
                prop_assert!(
                    done.contains(&(part, o)),
                    "checkpoint {} passed unfinished {}",
                    cp.offset,
                    o
                );
            }
            let prev = checkpoints.insert(cp.partition.to_string(), cp.offset);
            prop_assert!(
                prev.is_none_or(|p| p < cp.offset),
                "checkpoints only move forward"
            );
        }
        Ok(())
    }

    proptest! {
        /// Pieces finish in any order; at every moment each partition's checkpoint is an
        /// offset whose record and all earlier records of the partition are done. A record of
        /// no pieces is one no pipeline takes, done as it is admitted.
        #[test]
        fn checkpoint_never_passes_an_unfinished_record(
            partitions in proptest::collection::vec(0u8..3, 1..80),
            pieces in proptest::collection::vec(0u32..4, 80),
            picks in proptest::collection::vec(any::<usize>(), 400),
        ) {
            let mut ledger = Ledger::default();
            let mut offsets = [0u64; 3];
            let mut open: Vec<(Ticket, u8, u64)> = Vec::new();
            let mut remaining: HashMap<Ticket, u32> = HashMap::new();
            let mut done: Vec<(u8, u64)> = Vec::new();
            for (i, p) in partitions.iter().enumerate() {
                offsets[*p as usize] += 10;
                let rec = Delivered::alone(Record::new("t", p.to_string(), offsets[*p as usize], ""));
                if pieces[i] == 0 {
                    ledger.admit_done(&rec);
                    done.push((*p, offsets[*p as usize]));
                    continue;
                }
                let t = ledger.admit(rec, pieces[i]);
                for _ in 0..pieces[i] {
                    open.push((t, *p, offsets[*p as usize]));
                }
                remaining.insert(t, pieces[i]);
            }
            let mut checkpoints: HashMap<String, u64> = HashMap::new();
            // What records done as they were admitted moved, then each finish.
            taken_checkpoints_hold(&mut ledger, &done, &mut checkpoints)?;
            let mut picks = picks.into_iter().cycle();
            while !open.is_empty() {
                let i = picks.next().unwrap() % open.len();
                let (t, p, off) = open.swap_remove(i);
                let left = remaining.get_mut(&t).unwrap();
                *left -= 1;
                let finished = ledger.finish(t, false);
                prop_assert_eq!(finished.is_some(), *left == 0);
                if *left == 0 {
                    done.push((p, off));
                }
                taken_checkpoints_hold(&mut ledger, &done, &mut checkpoints)?;
            }
            prop_assert_eq!(ledger.undone(), 0);
            prop_assert_eq!(ledger.held(), 0);
            for (p, max) in offsets.iter().enumerate() {
                if *max > 0 {
                    prop_assert_eq!(checkpoints.get(&p.to_string()), Some(max));
                }
            }
        }
    }
}
