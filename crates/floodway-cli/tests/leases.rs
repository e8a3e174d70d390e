//! One owner per subscription, with real `floodway run` processes: a second run waits for the
//! subscriptions and then refuses, naming the process that holds them; a run killed with
//! SIGKILL is taken over by the next at once; a frozen run (SIGSTOP) is taken over when its
//! lease expires, and stops with an error when it wakes.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use floodway::Event;

mod common;
use common::{floodway, open_hub, signal, start, stop, text};

/// Publishes `n` generated orders (of `seed`) to the configured hub.
fn publish(dir: &Path, n: usize, seed: u64) {
    let lines: Vec<String> = floodway::testing::generate::orders(n, seed)
        .iter()
        .map(Event::to_json)
        .collect();
    common::publish(dir, &format!("events-{seed}.jsonl"), &lines);
}

/// Starts `floodway run`; its errors can be read from its stderr.
fn run(dir: &Path) -> Child {
    start(
        dir,
        &["run", "floodway.toml"],
        Stdio::null(),
        Stdio::piped(),
    )
}

/// In a new directory: a hub with the given lease settings, the orders view, 200 orders of
/// `seed` published, and a run that has read them all.
fn first_run(lease: &str, wait: &str, seed: u64) -> (tempfile::TempDir, Child) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let leases = format!("lease = \"{lease}\"\nlease_wait = \"{wait}\"\n");
    let view = common::orders_view(r#"["order-*"]"#, "/order/id");
    std::fs::write(d.join("floodway.toml"), common::embedded(4, &leases, &view)).unwrap();
    publish(d, 200, seed);
    let first = run(d);
    caught_up(d, Duration::from_secs(30));
    (dir, first)
}

/// Waits until the subscription has read everything published.
fn caught_up(dir: &Path, within: Duration) -> Duration {
    let hub = open_hub(dir);
    let started = Instant::now();
    loop {
        let stats = hub.stats().unwrap();
        let done = stats
            .subscriptions
            .iter()
            .any(|s| s.name == "orders-view" && s.lag == 0);
        if done {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "caught up within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_second_run_waits_then_refuses_naming_the_process_that_holds_the_subscription() {
    let (dir, first) = first_run("10s", "2s", 1);
    let d = dir.path();
    let stats = text(&floodway(d, &["hub", "stats", "--config", "floodway.toml"]));
    assert!(
        stats.contains(&format!("owned by process {} on host", first.id())),
        "{stats}"
    );

    let started = Instant::now();
    let second = floodway(d, &["run", "floodway.toml"]);
    let waited = started.elapsed();
    let said = text(&second);
    assert!(!second.status.success(), "{said}");
    assert!(
        waited >= Duration::from_secs(2),
        "waited {waited:?}: {said}"
    );
    assert!(said.contains("waiting for it to be released"), "{said}");
    assert!(
        said.contains(&format!(
            "subscription `orders-view` is in use by process {} on host",
            first.id()
        )),
        "{said}"
    );
    assert!(said.contains("one owner at a time"), "{said}");

    // A clean stop releases the subscription: the next run gets it at once.
    stop(first);
    let stats = text(&floodway(d, &["hub", "stats", "--config", "floodway.toml"]));
    assert!(!stats.contains("owned by"), "{stats}");
    let third = run(d);
    publish(d, 50, 2);
    caught_up(d, Duration::from_secs(30));
    stop(third);
}

#[test]
fn a_run_killed_with_sigkill_is_taken_over_by_the_next_at_once() {
    // A lease far longer than the test: only seeing the holder gone explains a takeover.
    let (dir, mut first) = first_run("60s", "120s", 3);
    let d = dir.path();
    first.kill().unwrap(); // SIGKILL: nothing released
    first.wait().unwrap();
    publish(d, 200, 4);
    let second = run(d);
    let took = caught_up(d, Duration::from_secs(30));
    assert!(took < Duration::from_secs(10), "{took:?}");
    stop(second);
}

#[test]
fn a_frozen_run_is_taken_over_when_its_lease_expires_and_stops_when_it_wakes() {
    let (dir, first) = first_run("1s", "30s", 5);
    let d = dir.path();
    signal(&first, "-STOP");
    let frozen = Instant::now();
    let second = run(d);
    publish(d, 200, 6);
    caught_up(d, Duration::from_secs(30));
    let took = frozen.elapsed();
    assert!(took >= Duration::from_millis(500), "{took:?}");

    // Thawed, the first run finds another owner and stops with an error that says so.
    signal(&first, "-CONT");
    let out = first.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("subscription `orders-view` is no longer owned by this process"),
        "{said}"
    );
    assert!(
        said.contains(&format!("process {} on host", second.id())),
        "names the new owner: {said}"
    );
    // The second goes on.
    publish(d, 100, 7);
    caught_up(d, Duration::from_secs(30));
    stop(second);
}
