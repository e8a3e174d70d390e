//! A minimal Lambda function built with Floodway: the benchmark's pipeline shape (one
//! pipeline mapping and sinking each order event, one batching all events by 25), with sinks
//! and a fault sink that count. It takes Kinesis, DynamoDB Streams, SQS and EventBridge events.
//!
//! A real function replaces the counting sinks with AWS sinks (`floodway-aws`) or a
//! configured processor (`floodway lambda handler`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use floodway::{fault_sink_fn, sink_fn, Batch, BatchConfig, Error, Event, Pipeline, Processor};

fn counting(
    counter: &Arc<AtomicU64>,
) -> impl Fn(Batch) -> std::future::Ready<Result<(), Error>> + Clone {
    let counter = counter.clone();
    move |batch: Batch| {
        counter.fetch_add(batch.len() as u64, Ordering::Relaxed);
        std::future::ready(Ok(()))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let counted = Arc::new(AtomicU64::new(0));
    let faults = Arc::new(AtomicU64::new(0));
    let processor = Processor::builder("example")
        .fault_sink(fault_sink_fn({
            let faults = faults.clone();
            move |fault: Event| {
                faults.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(fault = %fault.id(), "fault");
                std::future::ready(Ok::<_, Error>(()))
            }
        }))
        .pipeline(
            Pipeline::builder("each")
                .event_type("order-*")
                .sink(sink_fn(counting(&counted)))?,
        )
        .pipeline(
            Pipeline::builder("batched")
                .batch(BatchConfig::count(25))
                .sink(sink_fn(counting(&counted)))?,
        )
        .build()?;
    floodway_lambda::serve(floodway_lambda::Handler::new(processor)).await?;
    Ok(())
}
