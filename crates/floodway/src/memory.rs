//! In-memory source, checkpointer and sinks: for tests, examples and benchmarks.

mod hub;

pub use hub::MemoryHub;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::future::{ready, Ready};
use tower::Service;

use crate::error::{CommitError, Error, SourceError};
use crate::event::partition_for;
use crate::event::Event;
use crate::source::{Checkpoint, Checkpointer, Settlement, Source};
use crate::uow::{Batch, Record};

/// A bounded source over records held in memory; it ends when they are all delivered.
///
/// ```
/// use floodway::memory::MemorySource;
/// let source = MemorySource::from_jsonl(
///     "{\"id\":\"1\",\"type\":\"t\",\"timestamp\":1,\"partitionKey\":\"k\"}\nnot json\n",
/// );
/// assert_eq!(source.len(), 2);
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemorySource {
    records: std::collections::VecDeque<Record>,
}

impl MemorySource {
    /// Delivers these records in order.
    pub fn new(records: Vec<Record>) -> Self {
        MemorySource {
            records: records.into(),
        }
    }

    /// One record per non-empty line, in partition `0`, offsets from 1. Lines are kept
    /// verbatim: bad lines become poison records, as they would from a real source.
    pub fn from_jsonl(text: &str) -> Self {
        let records = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, line)| Record::new("memory", "0", i as u64 + 1, line.to_owned()))
            .collect();
        MemorySource::new(records)
    }

    /// Encodes events into records spread over `partitions` partitions by partition key (as
    /// a partitioned hub would), offsets from 1 within each.
    pub fn from_events<'a>(events: impl IntoIterator<Item = &'a Event>, partitions: u32) -> Self {
        let partitions = partitions.max(1);
        let mut offsets: HashMap<u32, u64> = HashMap::new();
        let records = events
            .into_iter()
            .map(|e| {
                let p = partition_for(e.partition_key(), partitions);
                let offset = offsets.entry(p).or_default();
                *offset += 1;
                Record::new("memory", p.to_string(), *offset, e.to_json())
            })
            .collect();
        MemorySource::new(records)
    }

    /// Records not yet delivered.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether every record was delivered.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

impl Source for MemorySource {
    async fn next_batch(&mut self, max: usize) -> Result<Option<Vec<Record>>, SourceError> {
        if self.records.is_empty() {
            return Ok(None);
        }
        let n = max.min(self.records.len());
        Ok(Some(self.records.drain(..n).collect()))
    }

    /// Everything is in memory, and a pull is taken whole or not at all.
    fn buffered(&self) -> bool {
        true
    }
}

/// Remembers committed checkpoints and settlements; clones share them.
#[derive(Debug, Clone, Default)]
pub struct MemoryCheckpointer {
    state: Arc<Mutex<CheckpointState>>,
}

#[derive(Debug, Default)]
struct CheckpointState {
    checkpoints: HashMap<Arc<str>, u64>,
    settled: HashMap<(Arc<str>, u64), Settlement>,
    commits: u64,
}

impl MemoryCheckpointer {
    /// The committed checkpoint of a partition.
    pub fn checkpoint(&self, partition: &str) -> Option<u64> {
        self.state
            .lock()
            .unwrap()
            .checkpoints
            .get(partition)
            .copied()
    }

    /// How a record settled, by partition and offset.
    pub fn settlement(&self, partition: &str, offset: u64) -> Option<Settlement> {
        let state = self.state.lock().unwrap();
        state.settled.get(&(Arc::from(partition), offset)).copied()
    }

    /// How many records settled.
    pub fn settled(&self) -> usize {
        self.state.lock().unwrap().settled.len()
    }

    /// How many commits were made.
    pub fn commits(&self) -> u64 {
        self.state.lock().unwrap().commits
    }
}

impl Checkpointer for MemoryCheckpointer {
    async fn commit(&mut self, checkpoints: &[Checkpoint]) -> Result<(), CommitError> {
        let mut state = self.state.lock().unwrap();
        state.commits += 1;
        for cp in checkpoints {
            let previous = state.checkpoints.insert(cp.partition.clone(), cp.offset);
            if previous.is_some_and(|p| p > cp.offset) {
                return Err(CommitError {
                    cause: format!("checkpoint of {} moved back", cp.partition).into(),
                });
            }
        }
        Ok(())
    }

    fn settle(&mut self, record: &Record, settlement: Settlement) {
        self.state
            .lock()
            .unwrap()
            .settled
            .insert((record.partition.clone(), record.offset), settlement);
    }
}

/// A sink that keeps every batch it receives; clones share them.
#[derive(Debug, Clone, Default)]
pub struct MemorySink {
    batches: Arc<Mutex<Vec<Vec<Event>>>>,
}

impl MemorySink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every event received, in order of arrival.
    pub fn events(&self) -> Vec<Event> {
        self.batches
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .cloned()
            .collect()
    }

    /// The batches received.
    pub fn batches(&self) -> Vec<Vec<Event>> {
        self.batches.lock().unwrap().clone()
    }

    /// How many events were received.
    pub fn len(&self) -> usize {
        self.batches.lock().unwrap().iter().map(Vec::len).sum()
    }

    /// Whether nothing was received.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl MemorySink {
    pub(crate) async fn write(&self, batch: Batch) -> Result<(), Error> {
        let events = batch.events().cloned().collect();
        self.batches.lock().unwrap().push(events);
        Ok(())
    }
}

crate::impl_sink!(MemorySink, write);

/// A fault sink that keeps fault events by [fault id](crate::fault::fault_id) (a fault raised
/// twice is stored once, as the durable fault stores do); clones share them.
#[derive(Debug, Clone, Default)]
pub struct MemoryFaultSink {
    faults: Arc<Mutex<FaultList>>,
}

/// Faults in order of arrival, and where each id is in the list.
type FaultList = (Vec<Event>, HashMap<String, usize>);

impl MemoryFaultSink {
    /// An empty fault sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// The faults stored, in order of first arrival.
    pub fn faults(&self) -> Vec<Event> {
        self.faults.lock().unwrap().0.clone()
    }

    /// How many faults are stored.
    pub fn len(&self) -> usize {
        self.faults.lock().unwrap().0.len()
    }

    /// Whether no fault is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Service<Event> for MemoryFaultSink {
    type Response = ();
    type Error = Error;
    type Future = Ready<Result<(), Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, fault: Event) -> Self::Future {
        let mut guard = self.faults.lock().unwrap();
        let (list, index) = &mut *guard;
        let id = crate::fault::fault_id(&fault).to_owned();
        match index.get(&id) {
            Some(i) => list[*i] = fault,
            None => {
                index.insert(id, list.len());
                list.push(fault);
            }
        }
        ready(Ok(()))
    }
}
