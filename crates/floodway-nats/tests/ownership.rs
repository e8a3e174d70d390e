//! What a JetStream reader holds is its own until the ack wait runs out without an ack or an
//! in-progress ack; then JetStream hands it to another reader of the consumer. A process that
//! kept nothing alive for that long (frozen, suspended) must not go on to process what it read
//! before: the other reader is processing it too (invariant 7).
//!
//! The frozen process is this test binary run again as a child (`frozen_reader_process`) and
//! stopped with SIGSTOP, against a real `nats-server` on loopback.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use floodway::memory::MemoryFaultSink;
use floodway::testing::generate;
use floodway::testing::processes::{
    calls_since, run_then_exit, slow_printing_processor, two_threads, TestProcess,
};
use floodway::{sink_fn, Batch, Error, Pipeline, Processor};
use floodway_nats::testing::NatsServer;
use floodway_nats::{NatsHub, NatsHubOptions, Sharing, SubscriptionOptions};

const CHILD_URL: &str = "FLOODWAY_TEST_FROZEN_READER_URL";

fn hub_options(url: String) -> NatsHubOptions {
    NatsHubOptions {
        servers: vec![url],
        stream: "ORDERS".into(),
        subject: "orders".into(),
        partitions: Some(2),
        ..NatsHubOptions::default()
    }
}

/// Both instances share the partitions through pins: a silent instance loses its pins after
/// 1 s, and what it holds unacked comes back to the other after the 2 s ack wait.
fn shared() -> SubscriptionOptions {
    SubscriptionOptions {
        sharing: Sharing::Pinned {
            ttl: Duration::from_secs(1),
        },
        ack_wait: Duration::from_secs(2),
        ..Default::default()
    }
}

/// Not a test of its own: a processor reading the subscription `orders`, whose sink takes
/// 100 ms a call and prints the wall-clock time each call starts, so that its reader reads far
/// ahead of it; when its run ends it prints why and exits with status 3
/// ([`slow_printing_processor`], [`run_then_exit`]).
#[test]
fn frozen_reader_process() {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return;
    };
    two_threads().block_on(async move {
        let hub = NatsHub::connect(&hub_options(url)).await.unwrap();
        let (reader, checkpointer) = hub.subscribe("orders", shared()).await.unwrap().split();
        run_then_exit(slow_printing_processor(20), reader, checkpointer).await;
    });
}

/// A processor frozen past its ack wait, its records handed meanwhile to another instance,
/// does not process once thawed what it had read and not yet dispatched: only what was under
/// way finishes, and its run ends saying why.
#[test]
fn a_reader_frozen_past_its_ack_wait_dispatches_nothing_it_read_before() {
    let server = NatsServer::start();
    let runtime = two_threads();
    let hub = runtime
        .block_on(NatsHub::connect(&hub_options(server.url())))
        .unwrap();
    runtime
        .block_on(hub.publish(&generate::orders(2_000, 5)))
        .unwrap();
    let url = server.url();
    let mut child = TestProcess::spawn(
        "frozen_reader_process",
        &[(CHILD_URL, url.as_ref())],
        "sink call",
    );
    std::thread::sleep(Duration::from_millis(300));
    child.signal("-STOP");

    // Another instance: it takes the pins once they lapse, and what the frozen one held once
    // its ack wait runs out.
    let taken = Arc::new(AtomicUsize::new(0));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let other = {
        let taken = taken.clone();
        let sink = sink_fn(move |batch: Batch| {
            taken.fetch_add(batch.len(), Ordering::Relaxed);
            std::future::ready(Ok::<_, Error>(()))
        });
        let processor = Processor::builder("other")
            .fault_sink(MemoryFaultSink::new())
            .pipeline(Pipeline::builder("all").sink(sink).unwrap())
            .build()
            .unwrap();
        let hub = hub.clone();
        runtime.spawn(async move {
            let (reader, checkpointer) = hub.subscribe("orders", shared()).await.unwrap().split();
            processor
                .run(reader, checkpointer, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        })
    };
    // Past the ack wait, with room for the redelivered records to reach the other instance.
    let deadline = Instant::now() + Duration::from_secs(15);
    std::thread::sleep(Duration::from_millis(3_500));
    while taken.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        taken.load(Ordering::Relaxed) > 0,
        "nothing came to the other instance"
    );

    let thawed = floodway::event::now_millis();
    child.signal("-CONT");
    let status = child.wait(Duration::from_secs(10));
    let _ = stop.send(());
    runtime.block_on(other).unwrap();
    let rest = child.output();
    let after = calls_since(&rest, thawed);
    // What was dispatched before the freeze may still start its call (at most the 20 in
    // flight); nothing read and not yet dispatched does.
    assert!(after < 20, "{after} sink calls after the thaw:\n{rest}");
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(3),
        "its run ended ({status:?}): {rest}"
    );
    assert!(rest.contains("ack wait"), "{rest}");
}
