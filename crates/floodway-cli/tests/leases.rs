//! One owner per subscription, with real `floodway run` processes: a second run waits for the
//! subscriptions and then refuses, naming the process that holds them; a run killed with
//! SIGKILL is taken over by the next at once; a frozen run (SIGSTOP) is taken over when its
//! lease expires, and stops with an error when it wakes.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use floodway::Event;
use floodway_embedded::{Hub, HubOptions};

mod common;
use common::{floodway, text};

fn config(lease: &str, wait: &str) -> String {
    format!(
        r#"
[hub]
path = "hub.db"
partitions = 4
lease = "{lease}"
lease_wait = "{wait}"

[[processors]]
kind = "materialize"
name = "orders-view"
types = ["order-*"]
view = "orders"
key = "/order/id"
value = "/order"
"#
    )
}

fn publish(dir: &Path, n: usize, seed: u64) {
    let lines: Vec<String> = floodway::testing::generate::orders(n, seed)
        .iter()
        .map(Event::to_json)
        .collect();
    let file = format!("events-{seed}.jsonl");
    std::fs::write(dir.join(&file), lines.join("\n")).unwrap();
    let out = floodway(dir, &["hub", "publish", "--config", "floodway.toml", &file]);
    assert!(out.status.success(), "{}", text(&out));
}

fn run(dir: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_floodway"))
        .current_dir(dir)
        .args(["run", "floodway.toml"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the floodway binary runs")
}

fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits until the subscription has read everything published.
fn caught_up(dir: &Path, within: Duration) -> Duration {
    let hub = Hub::open(
        dir.join("hub.db"),
        HubOptions {
            create: false,
            ..HubOptions::default()
        },
    )
    .unwrap();
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

fn stop(mut child: Child) {
    signal(&child, "-TERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "exits cleanly on SIGTERM: {status}");
}

#[test]
fn a_second_run_waits_then_refuses_naming_the_process_that_holds_the_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("floodway.toml"), config("10s", "2s")).unwrap();
    publish(d, 200, 1);
    let first = run(d);
    caught_up(d, Duration::from_secs(30));
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
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A lease far longer than the test: only seeing the holder gone explains a takeover.
    std::fs::write(d.join("floodway.toml"), config("60s", "120s")).unwrap();
    publish(d, 200, 3);
    let mut first = run(d);
    caught_up(d, Duration::from_secs(30));
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
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("floodway.toml"), config("1s", "30s")).unwrap();
    publish(d, 200, 5);
    let first = run(d);
    caught_up(d, Duration::from_secs(30));
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
