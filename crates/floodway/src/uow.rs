//! Records, units of work and batches.

use std::any::{Any, TypeId};
use std::sync::Arc;

use bytes::Bytes;

use crate::event::Event;

/// One record as a source delivered it: where it came from and its bytes, verbatim.
///
/// `offset` orders records within a partition; checkpoints are offsets. Sources whose native
/// position is not a number (a Kinesis sequence number, an SQS message id) keep it in
/// `sequence` and number their records in delivery order.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Record {
    /// The source, e.g. `memory`, `sqlite:orders`, `kinesis:orders-stream`.
    pub source: Arc<str>,
    /// The partition (shard, subject partition, queue) within the source.
    pub partition: Arc<str>,
    /// The position within the partition; increases in delivery order.
    pub offset: u64,
    /// The source's own id for the record, when it is not `offset`.
    pub sequence: Option<Arc<str>>,
    /// Delivery attempt, 1 for the first delivery.
    pub attempt: u32,
    /// The source's count of deliveries in this partition when it counts them for every
    /// reader of the partition together (JetStream's consumer sequence): a record delivered
    /// right after the last one a reader saw (`+ 1`) had no delivery to another reader
    /// before it. `None` where the source keeps no such count.
    pub delivery: Option<u64>,
    /// The raw bytes.
    pub data: Bytes,
    /// The key the source orders by, when it is not the event's `partitionKey`: records with
    /// the same order key run one after another in each pipeline (an SQS FIFO queue's message
    /// group). `None`: the event's partition key.
    pub order_key: Option<Arc<str>>,
    /// What is wrong with the record, when its source could not read it (a Lambda record
    /// missing its data, data that is not base64): such a record is faulted as it is, with
    /// this error, before any pipeline sees it, and never fails its batch.
    pub malformed: Option<Arc<Malformed>>,
    /// The fault this record is resubmitted for: a fault it raises is that fault raised
    /// again, whatever the record's source and position now read (a resubmission rebuilds
    /// the record, and may reshape it).
    pub resubmits: Option<Arc<str>>,
    /// The source assembled the record from its own data within a limit it keeps (a Lambda
    /// reader's DynamoDB change event, holding two item images, within its invocation's
    /// size): the processor's `max_event_size` does not apply to it.
    pub assembled: bool,
}

/// What is wrong with a record its source could not read; see [`Record::malformed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    /// The error's name, e.g. `MalformedKinesisRecord`.
    pub name: String,
    /// What is wrong, precisely.
    pub message: String,
}

impl Record {
    /// A first-delivery record.
    pub fn new(
        source: impl Into<Arc<str>>,
        partition: impl Into<Arc<str>>,
        offset: u64,
        data: impl Into<Bytes>,
    ) -> Self {
        Record {
            source: source.into(),
            partition: partition.into(),
            offset,
            sequence: None,
            attempt: 1,
            delivery: None,
            data: data.into(),
            order_key: None,
            malformed: None,
            resubmits: None,
            assembled: false,
        }
    }

    /// Marks the record as the resubmission of fault `fault_id` (see [`Record::resubmits`]).
    #[must_use]
    pub fn resubmitting(mut self, fault_id: impl Into<Arc<str>>) -> Self {
        self.resubmits = Some(fault_id.into());
        self
    }

    /// Marks the record as one its source could not read: it is faulted as it is (a poison
    /// error named `name`, saying `message`), before any pipeline sees it.
    #[must_use]
    pub fn with_malformed(mut self, name: impl Into<String>, message: impl Into<String>) -> Self {
        self.malformed = Some(Arc::new(Malformed {
            name: name.into(),
            message: message.into(),
        }));
        self
    }

    /// Marks the record as assembled by its source (see [`Record::assembled`]).
    #[must_use]
    pub fn assembled(mut self) -> Self {
        self.assembled = true;
        self
    }

    /// Sets the key the source orders by (see [`Record::order_key`]).
    #[must_use]
    pub fn with_order_key(mut self, key: impl Into<Arc<str>>) -> Self {
        self.order_key = Some(key.into());
        self
    }

    /// Sets the source's own record id.
    #[must_use]
    pub fn with_sequence(mut self, sequence: impl Into<Arc<str>>) -> Self {
        self.sequence = Some(sequence.into());
        self
    }

    /// Sets the delivery attempt.
    #[must_use]
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self
    }

    /// Sets the source's count of deliveries in the partition (see [`Record::delivery`]).
    #[must_use]
    pub fn with_delivery(mut self, delivery: u64) -> Self {
        self.delivery = Some(delivery);
        self
    }

    /// The record's position as the source names it: `sequence` if set, else `offset`.
    pub fn position(&self) -> String {
        match &self.sequence {
            Some(s) => s.to_string(),
            None => self.offset.to_string(),
        }
    }
}

/// The identity of a record inside one processor run, used to account for its pieces.
pub(crate) type Ticket = u64;

/// A record as the processor holds it: its place in the batch it was pulled from (a source's
/// pull, or in batch mode the caller's records), the batch shared by every unit of work made
/// from it. Sharing the batch costs one allocation per pull rather than one per record, and
/// no record is moved or copied out of its batch to be shared: a record is 152 bytes, and
/// moving it and allocating for it were a measurable part of the processor's work per event
/// (see BENCHMARKS.md). A batch lives while any of its records does: a pull goes with its
/// last record done.
#[derive(Clone)]
pub(crate) struct Delivered {
    batch: Arc<Vec<Record>>,
    index: usize,
}

impl Delivered {
    /// Record `index` of `batch`.
    pub(crate) fn new(batch: &Arc<Vec<Record>>, index: usize) -> Self {
        debug_assert!(index < batch.len());
        Delivered {
            batch: batch.clone(),
            index,
        }
    }

    /// Whether `other` is this very record (not an equal one).
    pub(crate) fn same(&self, other: &Delivered) -> bool {
        self.index == other.index && Arc::ptr_eq(&self.batch, &other.batch)
    }

    /// A record in a batch of its own.
    pub(crate) fn alone(record: Record) -> Self {
        Delivered {
            batch: Arc::new(vec![record]),
            index: 0,
        }
    }
}

impl std::ops::Deref for Delivered {
    type Target = Record;

    fn deref(&self) -> &Record {
        &self.batch[self.index]
    }
}

/// A unit of work: one record in flight through one pipeline.
///
/// Holds the source record, the decoded event (shared between pipelines until a step changes
/// it) and whatever the steps attached as typed values ([`Uow::insert`], [`Uow::get`]).
/// Cloning is cheap.
#[derive(Clone)]
pub struct Uow {
    pub(crate) record: Delivered,
    pub(crate) event: Arc<Event>,
    pub(crate) ticket: Ticket,
    /// Which part of its record this is: 0 for the record's own event, else set by each split
    /// (a step passing on several units of work) from the part split and the output's place,
    /// so that a part's fault is the same fault however often its record runs.
    pub(crate) part: u64,
    /// The hash of the key it is ordered by, as its record came: the record's
    /// [order key](Record::order_key), else the partition key its event had then. A step
    /// changing the partition key does not move it, so a later record of the source's key
    /// never overtakes this one (which may still be retrying in an earlier step); the new key
    /// orders it as well ([`rekeyed`](Self::rekeyed)).
    pub(crate) order: u64,
    extensions: Option<Extensions>,
}

/// Typed values attached by steps: few per unit of work, so a list beats a map. Shared by
/// the clones of a unit of work and copied when one of them inserts (one allocation for the
/// list, one for the value).
type Extensions = Arc<[(TypeId, Arc<dyn Any + Send + Sync>)]>;

impl std::fmt::Debug for Uow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uow")
            .field("partition", &self.record.partition)
            .field("offset", &self.record.offset)
            .field("event", &self.event)
            .finish_non_exhaustive()
    }
}

impl Uow {
    pub(crate) fn new(record: Delivered, event: Arc<Event>, ticket: Ticket) -> Self {
        let order = crate::event::key_hash(
            record
                .order_key
                .as_deref()
                .unwrap_or_else(|| event.partition_key()),
        );
        Uow {
            record,
            event,
            ticket,
            part: 0,
            order,
            extensions: None,
        }
    }

    /// The hash of the event's partition key as it is now, when it orders this unit of work
    /// besides [`order`](Self::order): a step gave the event another key (the record has no
    /// order key of the source's own). Units of work of that key then also run in turn, as
    /// they did before the step.
    pub(crate) fn rekeyed(&self) -> Option<u64> {
        if self.record.order_key.is_some() {
            return None;
        }
        let now = crate::event::key_hash(self.event.partition_key());
        (now != self.order).then_some(now)
    }

    /// The part of a split unit of work at `place` among the outputs of splitting this one.
    pub(crate) fn part_at(&self, place: usize) -> u64 {
        // FNV-1a's prime: parts of parts stay apart.
        self.part
            .wrapping_mul(0x0100_0000_01b3)
            .wrapping_add(place as u64 + 1)
    }

    /// A unit of work outside a processor, for tests of single steps.
    pub fn detached(event: Event) -> Self {
        let data = event.to_json();
        Uow::new(
            Delivered::alone(Record::new("detached", "0", 0, data)),
            Arc::new(event),
            0,
        )
    }

    /// The source record this unit of work came from.
    pub fn record(&self) -> &Record {
        &self.record
    }

    /// The event.
    pub fn event(&self) -> &Event {
        &self.event
    }

    /// The event, to change; it is copied first if other pipelines share it.
    pub fn event_mut(&mut self) -> &mut Event {
        Arc::make_mut(&mut self.event)
    }

    /// Replaces the event (a map step that emits a different event).
    pub fn set_event(&mut self, event: Event) {
        // In the old event's place when nothing else holds it (the common case: one
        // pipeline took the event), saving an allocation and its free.
        match Arc::get_mut(&mut self.event) {
            Some(held) => *held = event,
            None => self.event = Arc::new(event),
        }
    }

    /// The same unit of work carrying another event (used by splitting steps).
    #[must_use]
    pub fn with_event(&self, event: Event) -> Uow {
        let mut uow = self.clone();
        uow.event = Arc::new(event);
        uow
    }

    /// Attaches a typed value, e.g. the request a step prepared for the sink.
    pub fn insert<T: Any + Send + Sync>(&mut self, value: T) {
        let value: Arc<dyn Any + Send + Sync> = Arc::new(value);
        let id = TypeId::of::<T>();
        let old = self.extensions.as_deref().unwrap_or_default();
        // Collected from iterators of known length: straight into one allocation.
        let list: Extensions = if old.iter().any(|(kept, _)| *kept == id) {
            old.iter()
                .map(|(kept, v)| (*kept, (if *kept == id { &value } else { v }).clone()))
                .collect()
        } else {
            old.iter()
                .cloned()
                .chain(std::iter::once((id, value)))
                .collect()
        };
        self.extensions = Some(list);
    }

    /// A value attached by an earlier step.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<&T> {
        let list = self.extensions.as_ref()?;
        let (_, value) = list.iter().find(|(id, _)| *id == TypeId::of::<T>())?;
        value.downcast_ref()
    }
}

/// What a sink receives: one or more units of work that succeed or fail together.
///
/// A pipeline without a batch step hands its sink batches of one. Cloning is cheap.
#[derive(Debug, Clone)]
pub struct Batch {
    items: Arc<[Uow]>,
}

impl Batch {
    /// A batch of the given units of work.
    pub fn new(items: Vec<Uow>) -> Self {
        Batch {
            items: items.into(),
        }
    }

    /// A batch of the units of work `items` yields, in one allocation when it knows how many.
    pub(crate) fn collect(items: impl Iterator<Item = Uow>) -> Self {
        Batch {
            items: items.collect(),
        }
    }

    /// The units of work.
    pub fn items(&self) -> &[Uow] {
        &self.items
    }

    /// The events, in order.
    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.items.iter().map(|u| u.event())
    }

    /// How many units of work.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Total encoded size of the events.
    pub fn encoded_len(&self) -> usize {
        self.events().map(Event::encoded_len).sum()
    }

    /// A batch of one unit of work.
    pub fn one(uow: Uow) -> Self {
        let items: Arc<[Uow]> = Arc::new([uow]);
        Batch { items }
    }

    pub(crate) fn split(&self) -> (Batch, Batch) {
        let mid = self.items.len() / 2;
        (
            Batch::new(self.items[..mid].to_vec()),
            Batch::new(self.items[mid..].to_vec()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record held by its place in a pull reads as that record, and is the same record as
    /// its copies only: not as another of its pull, nor as an equal one of another pull.
    #[test]
    fn a_delivered_record_is_its_place_in_its_pull() {
        let pull = Arc::new(vec![
            Record::new("s", "0", 1, "a"),
            Record::new("s", "0", 2, "b"),
        ]);
        let second = Delivered::new(&pull, 1);
        assert_eq!(second.offset, 2);
        assert_eq!(&second.data[..], b"b");
        assert!(second.same(&second.clone()));
        assert!(!second.same(&Delivered::new(&pull, 0)));
        let again = Arc::new((*pull).clone());
        assert_eq!(*Delivered::new(&again, 1), *second);
        assert!(!second.same(&Delivered::new(&again, 1)));
    }

    #[test]
    fn extensions_are_typed_and_copy_on_write() {
        let mut a = Uow::detached(Event::builder("t", "k").build());
        a.insert(5u32);
        let mut b = a.clone();
        b.insert(6u32);
        b.insert("s");
        assert_eq!(a.get::<u32>(), Some(&5));
        assert_eq!(b.get::<u32>(), Some(&6));
        assert_eq!(a.get::<&str>(), None);
    }
}
