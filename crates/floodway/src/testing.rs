//! A kit for testing pipelines: feed recorded events, run a processor to the end, and look at
//! what each pipeline emitted and which faults were raised.
//!
//! ```
//! use floodway::testing::{generate, TestKit};
//! use floodway::{memory::MemorySink, pipeline::Pipeline};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let kit = TestKit::new();
//! let submitted = MemorySink::new();
//! let processor = kit
//!     .processor("orders")
//!     .pipeline(
//!         Pipeline::builder("submitted")
//!             .event_type("order-submitted")
//!             .sink(submitted.clone())
//!             .unwrap(),
//!     )
//!     .build()
//!     .unwrap();
//!
//! let events = generate::orders(100, 7);
//! let mut input = generate::to_jsonl(&events);
//! input.push_str("this line is not an event\n");
//! let report = kit.run_jsonl(&processor, &input).await.unwrap();
//!
//! let expected = events.iter().filter(|e| e.event_type() == "order-submitted").count();
//! assert_eq!(submitted.len(), expected);
//! assert_eq!(kit.faults().len(), 1, "the bad line became one fault");
//! assert_eq!(report.done, 101);
//! assert_eq!(kit.checkpoint("0"), Some(101));
//! # });
//! ```

use crate::error::RunError;
use crate::event::Event;
use crate::memory::{MemoryCheckpointer, MemoryFaultSink, MemorySource};
use crate::runtime::{Processor, ProcessorBuilder, RunReport};

/// Holds a fault sink and a checkpointer for the processors a test builds.
#[derive(Debug, Clone, Default)]
pub struct TestKit {
    faults: MemoryFaultSink,
    checkpointer: MemoryCheckpointer,
}

impl TestKit {
    /// A new kit.
    pub fn new() -> Self {
        Self::default()
    }

    /// A processor builder whose fault sink is the kit's.
    pub fn processor(&self, name: &str) -> ProcessorBuilder {
        Processor::builder(name).fault_sink(self.faults.clone())
    }

    /// Runs `processor` over `source` to its end.
    ///
    /// # Errors
    /// As [`Processor::run`].
    pub async fn run(
        &self,
        processor: &Processor,
        source: MemorySource,
    ) -> Result<RunReport, RunError> {
        processor
            .run(source, self.checkpointer.clone(), std::future::pending())
            .await
    }

    /// Runs `processor` over JSON lines (partition `0`, offsets from 1) to their end.
    ///
    /// # Errors
    /// As [`Processor::run`].
    pub async fn run_jsonl(
        &self,
        processor: &Processor,
        jsonl: &str,
    ) -> Result<RunReport, RunError> {
        self.run(processor, MemorySource::from_jsonl(jsonl)).await
    }

    /// The fault events raised so far.
    pub fn faults(&self) -> Vec<Event> {
        self.faults.faults()
    }

    /// The fault sink.
    pub fn fault_sink(&self) -> &MemoryFaultSink {
        &self.faults
    }

    /// The checkpointer.
    pub fn checkpointer(&self) -> &MemoryCheckpointer {
        &self.checkpointer
    }

    /// The committed checkpoint of a partition.
    pub fn checkpoint(&self, partition: &str) -> Option<u64> {
        self.checkpointer.checkpoint(partition)
    }
}

/// Generators of realistic events, deterministic for a seed.
pub mod generate {
    use serde_json::json;

    use crate::event::Event;

    const STATUSES: [&str; 4] = [
        "order-submitted",
        "order-paid",
        "order-shipped",
        "order-delivered",
    ];
    const CITIES: [&str; 6] = ["Lisbon", "Osaka", "Denver", "Nairobi", "Oslo", "Lima"];
    const SKUS: [&str; 5] = ["SKU-1001", "SKU-2044", "SKU-3310", "SKU-4020", "SKU-7777"];

    /// `n` order events of about 400 bytes: each order goes through submitted, paid, shipped
    /// and delivered in time order, keyed by order id; a few customer updates are mixed in.
    pub fn orders(n: usize, seed: u64) -> Vec<Event> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let base = 1_700_000_000_000i64;
        let orders = (n / 4).max(1);
        let mut stage = vec![0usize; orders];
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let ts = base + i as i64 * 10;
            if rng.u8(..100) < 5 {
                let c = rng.u32(..1000);
                out.push(
                    Event::builder("customer-updated", format!("c-{c}"))
                        .id(format!("e-{seed}-{i}"))
                        .timestamp(ts)
                        .tag("source", "crm")
                        .field(
                            "customer",
                            json!({
                                "id": format!("c-{c}"),
                                "name": format!("Customer {c}"),
                                "email": format!("customer{c}@example.com"),
                                "city": CITIES[rng.usize(..CITIES.len())],
                                "tier": if rng.bool() { "gold" } else { "standard" },
                            }),
                        )
                        .build(),
                );
                continue;
            }
            let o = rng.usize(..orders);
            let s = stage[o].min(STATUSES.len() - 1);
            stage[o] += 1;
            let qty = rng.u32(1..5);
            let price = rng.u32(100..20_000);
            out.push(
                Event::builder(STATUSES[s], format!("o-{o}"))
                    .id(format!("e-{seed}-{i}"))
                    .timestamp(ts)
                    .tag("source", "web")
                    .tag("region", "eu-west-1")
                    .field(
                        "order",
                        json!({
                            "id": format!("o-{o}"),
                            "customerId": format!("c-{}", o % 1000),
                            "status": STATUSES[s].trim_start_matches("order-"),
                            "items": [
                                {"sku": SKUS[rng.usize(..SKUS.len())], "quantity": qty, "price": price},
                                {"sku": SKUS[rng.usize(..SKUS.len())], "quantity": 1, "price": 499},
                            ],
                            "channel": if rng.bool() { "web" } else { "mobile" },
                            "total": qty * price + 499,
                            "currency": "EUR",
                            "shipTo": {"city": CITIES[rng.usize(..CITIES.len())], "country": "PT"},
                        }),
                    )
                    .build(),
            );
        }
        out
    }

    /// Encodes events as JSON lines.
    pub fn to_jsonl(events: &[Event]) -> String {
        let mut out = String::new();
        for e in events {
            out.push_str(&e.to_json());
            out.push('\n');
        }
        out
    }

    /// Replaces about `per_mille` of every 1000 lines with a poison line of varied kinds (not
    /// JSON, missing field, wrong type); returns how many were replaced.
    pub fn poison_lines(lines: &mut [String], per_mille: u32, seed: u64) -> usize {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut count = 0;
        for (i, line) in lines.iter_mut().enumerate() {
            if rng.u32(..1000) < per_mille {
                *line = match i % 3 {
                    0 => format!("{{\"id\":\"bad-{i}\",\"type\":\"order-submitted\""),
                    1 => format!("{{\"id\":\"bad-{i}\",\"type\":\"order-submitted\",\"timestamp\":1}}"),
                    _ => format!("{{\"id\":\"bad-{i}\",\"type\":\"order-submitted\",\"timestamp\":\"now\",\"partitionKey\":\"o\"}}"),
                };
                count += 1;
            }
        }
        count
    }
}
