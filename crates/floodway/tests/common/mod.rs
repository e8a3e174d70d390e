//! Helpers shared by the runtime's integration tests.
#![allow(dead_code)]

use floodway::memory::MemorySource;
use floodway::runtime::ProcessorBuilder;
use floodway::testing::TestKit;
use floodway::{BatchConfig, Event, Pipeline, Processor, RunError, RunReport, Sink};

/// Event `i` of key `key`: id `e-{i}`, time `1000 + i`, a field `n`.
pub(crate) fn event(i: u32, key: &str) -> Event {
    Event::builder("thing-happened", key)
        .id(format!("e-{i}"))
        .timestamp(1_000 + i64::from(i))
        .field("n", i)
        .build()
}

/// Events `0..n` over `keys` keys (`k0`, `k1`, ...).
pub(crate) fn events(n: u32, keys: u32) -> Vec<Event> {
    (0..n)
        .map(|i| event(i, &format!("k{}", i % keys)))
        .collect()
}

/// The ids of `events`, in order.
pub(crate) fn ids(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.id().to_owned()).collect()
}

/// Processor `p` of the one `pipeline`, its faults going to `kit`.
pub(crate) fn processor(kit: &TestKit, pipeline: Pipeline) -> Processor {
    build(kit.processor("p"), pipeline)
}

/// The processor `builder` makes of the one `pipeline`.
pub(crate) fn build(builder: ProcessorBuilder, pipeline: Pipeline) -> Processor {
    builder.pipeline(pipeline).build().unwrap()
}

/// Runs `processor` over `input` (one partition, `0`) to its end.
pub(crate) async fn run(
    kit: &TestKit,
    processor: &Processor,
    input: &[Event],
) -> Result<RunReport, RunError> {
    kit.run(processor, MemorySource::from_events(input, 1))
        .await
}

/// Runs processor `p` of the one `pipeline` over `input` (one partition, `0`) to its end.
pub(crate) async fn run_pipeline(
    kit: &TestKit,
    pipeline: Pipeline,
    input: &[Event],
) -> Result<RunReport, RunError> {
    run(kit, &processor(kit, pipeline), input).await
}

/// Pipeline `batched`: batches of `count` into `sink`.
pub(crate) fn batched(count: usize, sink: impl Sink) -> Pipeline {
    Pipeline::builder("batched")
        .batch(BatchConfig::count(count))
        .sink(sink)
        .unwrap()
}
