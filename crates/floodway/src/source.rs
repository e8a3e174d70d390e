//! Sources of records and where their progress is committed.
//!
//! A long-running source (the embedded log, a JetStream consumer) implements [`Source`] to
//! deliver records in batches and [`Checkpointer`] to learn what is done. The processor pulls
//! only when it has room, so a slow pipeline slows the source down.

use std::future::Future;
use std::sync::Arc;

use crate::error::{CommitError, SourceError};
use crate::uow::Record;

/// What a pull of a [`Source`] gives: records, `None` when the source has ended, or why it
/// failed.
pub type Pulled = Result<Option<Vec<Record>>, SourceError>;

/// Delivers records.
pub trait Source: Send + 'static {
    /// The next records, at most `max`; `Ok(None)` when the source has ended (a bounded input),
    /// never for a live stream that is merely idle: that one waits.
    ///
    /// Unless the source is [`buffered`](Self::buffered), the processor calls this from a
    /// task of its own, so it need not be cancel-safe.
    ///
    /// Checkpoints assume a partition's records come in increasing offset order: a
    /// checkpoint is the offset of the last record done with every record delivered before
    /// it. A source whose records can come again out of order (JetStream's redeliveries)
    /// acknowledges per record ([`Checkpointer::settle`]) and ignores checkpoints. After an
    /// error the processor stops and drops the source: a batch the error cut short is not
    /// read again from the same source.
    fn next_batch(&mut self, max: usize) -> impl Future<Output = Pulled> + Send;

    /// Whether [`next_batch`](Self::next_batch) only takes records the source already holds,
    /// or waits for the next to arrive, and is cancel-safe (dropped before it is ready, it
    /// has taken nothing). The processor then calls it from its own loop, when it has room,
    /// instead of from a task that reads ahead: no task, and no hand-over from one task to
    /// another, per batch. A source that reads inside `next_batch` (a query, a request) is
    /// not buffered, the default: its task reads the next batch while the processor works.
    fn buffered(&self) -> bool {
        false
    }
}

/// The position in a partition through which every record is done.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Checkpoint {
    /// The partition.
    pub partition: Arc<str>,
    /// The offset of the last record such that it and every record before it are done.
    pub offset: u64,
}

/// How a record ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Settlement {
    /// Every pipeline succeeded with it or filtered it out.
    Done,
    /// At least one pipeline faulted it (its fault event is stored); the rest are done.
    Faulted,
}

/// Learns what is done: per-record settlements as they happen, and checkpoints.
///
/// Invariant 1 of the design holds at this boundary: a record is settled, and a checkpoint
/// passes it, only after every pipeline is done with it.
pub trait Checkpointer: Send {
    /// Commits checkpoints (the latest per partition since the last commit).
    fn commit(
        &mut self,
        checkpoints: &[Checkpoint],
    ) -> impl Future<Output = Result<(), CommitError>> + Send;

    /// Called once per record as soon as it is done, in completion order (which may differ
    /// from source order across partition keys). Sources with per-record acknowledgement
    /// (JetStream) ack or terminate here; logs ignore it.
    fn settle(&mut self, record: &Record, settlement: Settlement) {
        let _ = (record, settlement);
    }

    /// Waits until this process may act on the records it has read: at once for most
    /// checkpointers. One whose ownership of what it reads can pass to another process (a
    /// leased subscription) waits while that is in doubt (its lease not renewed for a lease
    /// time: a process frozen, a machine suspended) and fails once another process holds it,
    /// so that records read before, waiting to be dispatched, are left to the new owner
    /// instead of being processed by both; a JetStream subscription fails once a record it
    /// held went longer than the ack wait without an in-progress ack. The processor asks
    /// before it dispatches each batch.
    fn owned(&mut self) -> impl Future<Output = Result<(), CommitError>> + Send {
        std::future::ready(Ok(()))
    }
}
