//! The processing conformance scenarios through Lambda: the records of a Kinesis shard, handed
//! to the handler by the simulated event-source mapping (batches, `batchItemFailures`,
//! retries, bisection), faults into memory.

use floodway::hub::HubFuture;
use floodway::memory::MemoryFaultSink;
use floodway::runtime::FaultSink;
use floodway::testing::conformance::Runner;
use floodway::{Event, Processor};
use floodway_lambda::simulator::{InProcess, StreamKind, StreamMapping};
use floodway_lambda::Handler;

mod common;

/// One Kinesis shard, read by a mapping with its default settings.
struct LambdaRunner {
    faults: MemoryFaultSink,
}

impl Runner for LambdaRunner {
    fn fault_sink(&self) -> FaultSink {
        FaultSink::new(self.faults.clone())
    }

    fn deliver<'a>(&'a self, events: &'a [Event], processor: &'a Processor) -> HubFuture<'a, ()> {
        Box::pin(async move {
            let records = common::shard_from(1, events);
            let kind = StreamKind::Kinesis {
                stream: "conformance".into(),
            };
            let mut function = InProcess(Handler::new(processor.clone()));
            let report = StreamMapping::default()
                .run_shard(&kind, "shardId-000000000000", &records, &mut function)
                .await;
            if !report.given_up.is_empty() {
                return Err(format!("records given up: {:?}", report.given_up).into());
            }
            Ok(())
        })
    }

    fn faults(&self) -> HubFuture<'_, Vec<Event>> {
        Box::pin(async move { Ok(self.faults.faults()) })
    }
}

async fn fresh() -> (Box<dyn Runner>, ()) {
    let runner = LambdaRunner {
        faults: MemoryFaultSink::new(),
    };
    (Box::new(runner), ())
}

floodway::processing_conformance_tests!(fresh);
