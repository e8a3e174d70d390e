//! Crash safety with real processes: publishers and processors killed with SIGKILL at random
//! moments and restarted. In the end every published event is applied to the view exactly
//! once, and no fault is lost or doubled.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use floodway::idempotence::{MemoryView, Version};
use floodway::Event;
use floodway_embedded::FaultFilter;
use serde_json::Value;

mod common;
use common::{fault_events, open_hub, start};

/// The view keyed by order id takes customer events too, which have none: each is a fault.
fn config() -> String {
    let view = common::orders_view(r#"["order-*", "customer-*"]"#, "/order/id");
    common::embedded(4, "", &(view + common::FAULT_MONITOR))
}

/// Starts the `floodway` binary in `dir`, its output discarded.
fn spawn(dir: &Path, args: &[&str]) -> Child {
    start(dir, args, Stdio::null(), Stdio::null())
}

fn kill_after(mut child: Child, after: Duration) {
    std::thread::sleep(after);
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
}

#[test]
fn killed_publishers_and_processors_lose_nothing_and_apply_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("floodway.toml"), config()).unwrap();
    let events = floodway::testing::generate::orders(12_000, 77);
    let chunks: Vec<&[Event]> = events.chunks(1_500).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let lines: Vec<String> = chunk.iter().map(Event::to_json).collect();
        std::fs::write(d.join(format!("chunk-{i}.jsonl")), lines.join("\n")).unwrap();
    }
    let mut rng = fastrand::Rng::with_seed(7);
    // Each chunk: a publisher and a processor run side by side, and both are killed at random
    // moments; the chunk is then published again in full (the event ids deduplicate it).
    for i in 0..chunks.len() {
        let chunk = format!("chunk-{i}.jsonl");
        let publisher = spawn(d, &["hub", "publish", "--config", "floodway.toml", &chunk]);
        let processor = spawn(d, &["run", "floodway.toml"]);
        let p_wait = Duration::from_millis(rng.u64(..300));
        // Across the 1 s commit interval: some runs die before a commit, some after.
        // The first run always outlives a commit.
        let r_wait = Duration::from_millis(if i == 0 {
            3_000
        } else {
            200 + rng.u64(..2_300)
        });
        let killer = std::thread::spawn(move || kill_after(publisher, p_wait));
        kill_after(processor, r_wait);
        killer.join().unwrap();
        let status = Command::new(env!("CARGO_BIN_EXE_floodway"))
            .current_dir(d)
            .args(["hub", "publish", "--config", "floodway.toml", &chunk])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "chunk {i} publishes in full");
    }
    // A last run, to the end.
    let hub = open_hub(d);
    let before = hub.stats().unwrap();
    assert!(
        before
            .subscriptions
            .iter()
            .any(|s| s.partitions.iter().any(|(_, offset)| *offset > 0)),
        "killed runs had committed progress"
    );
    // This run's errors, if any, are shown.
    let last = start(
        d,
        &["run", "floodway.toml"],
        Stdio::null(),
        Stdio::inherit(),
    );
    let started = Instant::now();
    loop {
        let stats = hub.stats().unwrap();
        // Caught up, and up long enough to have its signal handlers (a SIGTERM at start-up
        // would kill it before it can drain).
        let caught_up =
            stats.subscriptions.len() == 2 && stats.subscriptions.iter().all(|s| s.lag == 0);
        if caught_up && started.elapsed() > Duration::from_secs(2) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the last run catches up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    common::stop(last);

    // Every event was published once.
    let stored: u64 = hub
        .stats()
        .unwrap()
        .partitions
        .iter()
        .map(|p| p.events)
        .sum();
    let customers = events
        .iter()
        .filter(|e| e.event_type() == "customer-updated")
        .count();
    // Fault events: a record processed again after a kill raises its fault again (a raise is
    // an event of its own), but every raise names the one fault of its poison event.
    let raises = fault_events(&hub, usize::MAX);
    let fault_ids: std::collections::HashSet<String> = raises
        .iter()
        .map(|(_, bytes)| {
            let event = floodway::Event::decode(bytes).unwrap();
            floodway::fault::fault_id(&event).to_owned()
        })
        .collect();
    assert_eq!(
        stored as usize - raises.len(),
        events.len(),
        "every event stored once"
    );
    assert_eq!(fault_ids.len(), customers, "one fault per poison event");

    // The view holds exactly the latest order state per order.
    let mut want = MemoryView::new();
    for e in events
        .iter()
        .filter(|e| e.event_type().starts_with("order-"))
    {
        let order = e.field("order").unwrap();
        want.apply(order["id"].as_str().unwrap(), Version::of(e), order.clone());
    }
    let mut got: MemoryView<Value> = MemoryView::new();
    for row in hub.view("orders").unwrap().rows().unwrap() {
        got.apply(&row.key, row.version, row.value);
    }
    assert_eq!(got.len(), want.len());
    assert!(got == want, "the view matches the events");

    // One stored fault per poison event (customer events have no /order/id).
    let faults = hub
        .fault_store()
        .unwrap()
        .list(&FaultFilter::default())
        .unwrap();
    assert_eq!(faults.len(), customers);
}
