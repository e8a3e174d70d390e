//! The order workload the core and Lambda benchmarks share: two pipelines, each taking one
//! event type, deriving a new event from a typed read of the payload and batching it (by 10,
//! by 25) into a counting sink; and the same work per event in plain Rust, their reference.
#![allow(dead_code)]

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use floodway::layer::Resilience;
use floodway::{fault_sink_fn, sink_fn, Batch, BatchConfig, Error, Event, Pipeline, Processor};
use serde::{Deserialize, Serialize};

/// The pipelines: name, the type each takes, the type it derives, its batch size.
const PIPELINES: [(&str, &str, &str, usize); 2] = [
    ("accepted", "order-submitted", "order-accepted", 10),
    ("confirmed", "order-paid", "order-confirmed", 25),
];

/// What a run counted: events into each pipeline's sink, and faults.
#[derive(Default)]
pub(crate) struct Counts {
    sunk: [AtomicU64; 2],
    faults: AtomicU64,
}

impl Counts {
    /// `[first sink, second sink, faults]`, to compare with [`Plain::counts`].
    pub(crate) fn get(&self) -> [u64; 3] {
        [
            self.sunk[0].load(Ordering::Relaxed),
            self.sunk[1].load(Ordering::Relaxed),
            self.faults.load(Ordering::Relaxed),
        ]
    }
}

#[derive(Deserialize)]
struct Submitted<'a> {
    #[serde(borrow)]
    order: OrderIn<'a>,
}

#[derive(Serialize)]
struct Confirmed<'a> {
    order: OrderIn<'a>,
}

/// The order as the step reads it: its strings borrowed from the event where they have no
/// escapes, as the plain reference borrows them.
#[derive(Deserialize, Serialize)]
struct OrderIn<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(rename = "customerId", borrow)]
    customer_id: Cow<'a, str>,
    total: u64,
}

/// The map step of both pipelines: the new event carries the order's id, customer and total.
pub(crate) fn confirm(event: &Event, new_type: &str) -> Result<Event, Error> {
    let Submitted { order } = event.payload()?;
    Ok(event
        .derive(new_type)
        .payload(&Confirmed { order })?
        .build())
}

/// The processor, written with the public API, its sinks wrapped in `resilience`.
pub(crate) fn processor(counts: &Arc<Counts>, resilience: &Resilience) -> Processor {
    let mut builder = Processor::builder("bench").fault_sink({
        let counts = counts.clone();
        fault_sink_fn(move |_f: Event| {
            counts.faults.fetch_add(1, Ordering::Relaxed);
            std::future::ready(Ok::<_, Error>(()))
        })
    });
    for (slot, (name, from, to, size)) in PIPELINES.into_iter().enumerate() {
        let counts = counts.clone();
        builder = builder.pipeline(
            Pipeline::builder(name)
                .event_type(from)
                .map_event(move |e| confirm(e, to))
                .batch(BatchConfig::count(size))
                .resilience(resilience.clone())
                .sink(sink_fn(move |batch: Batch| {
                    counts.sunk[slot].fetch_add(batch.len() as u64, Ordering::Relaxed);
                    std::future::ready(Ok::<_, Error>(()))
                }))
                .unwrap(),
        );
    }
    builder.build().unwrap()
}

/// The type the pipeline taking `ty` derives, if one takes it.
pub(crate) fn derived_type(ty: &str) -> Option<&'static str> {
    PIPELINES.iter().find(|p| p.1 == ty).map(|p| p.2)
}

/// The typed read of the map step alone: the order's id length, to keep the read.
pub(crate) fn read_order(event: &Event) -> Result<usize, Error> {
    let Submitted { order } = event.payload()?;
    Ok(order.id.len())
}

// ---- the same work in plain Rust ----

#[derive(Deserialize)]
struct Incoming<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    ty: &'a str,
    timestamp: i64,
    #[serde(rename = "partitionKey")]
    partition_key: &'a str,
    #[serde(borrow)]
    order: Option<OrderRef<'a>>,
}

#[derive(Deserialize, Serialize)]
struct OrderRef<'a> {
    id: &'a str,
    #[serde(rename = "customerId")]
    customer_id: &'a str,
    total: u64,
}

#[derive(Serialize)]
struct Outgoing<'a> {
    id: String,
    #[serde(rename = "type")]
    ty: &'a str,
    timestamp: i64,
    #[serde(rename = "partitionKey")]
    partition_key: &'a str,
    order: OrderRef<'a>,
}

/// The workload in plain Rust, one event at a time: a typed borrowed parse, the new event
/// (with the same stable id as Floodway's) serialized and batched, what cannot be read counted
/// as a fault. No retries, timeouts, per-key order, faults published or metrics.
#[derive(Default)]
pub(crate) struct Plain {
    batches: [Vec<Vec<u8>>; 2],
    /// The offset of the first record in each batch not yet sunk.
    since: [Option<u64>; 2],
    /// `[first sink, second sink, faults]`, as [`Counts::get`].
    pub(crate) counts: [u64; 3],
}

impl Plain {
    /// Takes the bytes of the event at `offset`; returns the size of the batch it filled, if it
    /// filled one, for the caller to sink.
    pub(crate) fn event(&mut self, offset: u64, data: &[u8]) -> Option<usize> {
        let Ok(event) = serde_json::from_slice::<Incoming<'_>>(data) else {
            self.counts[2] += 1;
            return None;
        };
        let slot = PIPELINES.iter().position(|p| p.1 == event.ty)?;
        let (_, _, to, size) = PIPELINES[slot];
        let Some(order) = event.order else {
            self.counts[2] += 1;
            return None;
        };
        let out = Outgoing {
            id: floodway::event::stable_id(&[event.id, to]),
            ty: to,
            timestamp: event.timestamp,
            partition_key: event.partition_key,
            order,
        };
        let batch = &mut self.batches[slot];
        if batch.is_empty() {
            self.since[slot] = Some(offset);
        }
        batch.push(serde_json::to_vec(&out).unwrap());
        if batch.len() < size {
            return None;
        }
        self.counts[slot] += size as u64;
        batch.clear();
        self.since[slot] = None;
        Some(size)
    }

    /// The offset to commit once the batches filled so far are sunk, `last` being the offset
    /// of the last event read: just before the first event of a batch not yet sunk, if any.
    pub(crate) fn committable(&self, last: u64) -> u64 {
        self.since
            .iter()
            .flatten()
            .min()
            .map_or(last, |first| first - 1)
    }

    /// Counts the batches not yet full as sunk, as a flush at the end does; returns their sizes.
    pub(crate) fn flush(&mut self) -> [usize; 2] {
        let mut sizes = [0; 2];
        for (slot, batch) in self.batches.iter_mut().enumerate() {
            sizes[slot] = batch.len();
            self.counts[slot] += batch.len() as u64;
            batch.clear();
            self.since[slot] = None;
        }
        sizes
    }
}
