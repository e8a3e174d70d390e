//! The `floodway` command with its hub on NATS JetStream (a real server on loopback): publish,
//! run, stats, tail, faults and their resubmission, replay.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use floodway_nats::testing::NatsServer;

mod common;
use common::{floodway, text};

fn config(url: &str, key: &str) -> String {
    format!(
        r#"
[hub]
path = "stores.db"
partitions = 4

[hub.nats]
servers = ["{url}"]
stream = "SHOP"
subject = "shop"

[[processors]]
kind = "materialize"
name = "orders-view"
types = ["order-*"]
view = "orders"
key = "{key}"
value = "/order"

[[processors]]
kind = "fault-monitor"
name = "faults"
"#
    )
}

/// The lag of every subscription, once both exist.
fn lag(dir: &Path) -> Option<u64> {
    let t = text(&floodway(
        dir,
        &["hub", "stats", "--config", "floodway.toml"],
    ));
    let lags: Vec<u64> = t
        .lines()
        .skip_while(|l| !l.starts_with("subscription"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    (lags.len() == 2).then(|| lags.iter().sum())
}

fn open_faults(dir: &Path) -> usize {
    let out = floodway(
        dir,
        &[
            "faults",
            "list",
            "--config",
            "floodway.toml",
            "--status",
            "open",
        ],
    );
    text(&out)
        .lines()
        .filter(|l| l.contains("orders-view/"))
        .count()
}

#[test]
fn the_command_runs_on_nats() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("floodway.toml"), config(&server.url(), "/order/ref")).unwrap();
    let mut lines = Vec::new();
    for i in 0..40 {
        let order = if i % 13 == 5 {
            format!(r#"{{"id":"o-{i}","total":{i}}}"#)
        } else {
            format!(r#"{{"id":"o-{i}","ref":"r-{i}","total":{i}}}"#)
        };
        lines.push(format!(
            r#"{{"id":"e-{i}","type":"order-submitted","timestamp":{},"partitionKey":"o-{i}","order":{order}}}"#,
            1_700_000_000_000i64 + i
        ));
    }
    std::fs::write(d.join("orders.jsonl"), lines.join("\n")).unwrap();

    let out = floodway(
        d,
        &[
            "hub",
            "publish",
            "--config",
            "floodway.toml",
            "orders.jsonl",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("published 40 events to NATS stream SHOP"),
        "{}",
        text(&out)
    );
    // Publishing again stores nothing: the ids are in the duplicate window.
    let out = floodway(
        d,
        &[
            "hub",
            "publish",
            "--config",
            "floodway.toml",
            "orders.jsonl",
        ],
    );
    assert!(
        text(&out).contains("(40 duplicates skipped"),
        "{}",
        text(&out)
    );

    // Run until everything is consumed and the three poison orders are stored as faults.
    let mut child = Command::new(env!("CARGO_BIN_EXE_floodway"))
        .current_dir(d)
        .args(["run", "floodway.toml"])
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !(lag(d) == Some(0) && open_faults(d) == 3) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "run did not finish its work"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "run exits cleanly on SIGTERM: {status}");

    // Stats by URL, without a config file.
    let url = server.url();
    let stats = text(&floodway(
        d,
        &[
            "hub",
            "stats",
            "--nats",
            &url,
            "--stream",
            "SHOP",
            "--subject",
            "shop",
        ],
    ));
    assert!(stats.contains("NATS stream SHOP"), "{stats}");
    assert!(stats.contains("orders-view"), "{stats}");
    assert!(stats.contains("faults"), "{stats}");
    let tail = text(&floodway(
        d,
        &["hub", "tail", "--config", "floodway.toml", "-n", "3"],
    ));
    assert_eq!(tail.lines().count(), 3, "{tail}");
    assert!(
        tail.lines().all(|l| l.contains("order-submitted")),
        "{tail}"
    );

    // Resubmission: fails before the fix, succeeds after, and never twice.
    let out = floodway(d, &["faults", "resubmit", "--config", "floodway.toml"]);
    assert!(
        text(&out).contains("0 succeeded, 3 failed"),
        "{}",
        text(&out)
    );
    std::fs::write(d.join("floodway.toml"), config(&server.url(), "/order/id")).unwrap();
    let out = floodway(d, &["faults", "resubmit", "--config", "floodway.toml"]);
    assert!(
        text(&out).contains("3 succeeded, 0 failed"),
        "{}",
        text(&out)
    );
    let out = floodway(d, &["faults", "resubmit", "--config", "floodway.toml"]);
    assert!(
        text(&out).contains("0 faults to resubmit"),
        "{}",
        text(&out)
    );

    // Replay the whole stream to the view: 40 orders, nothing applied twice.
    let out = floodway(
        d,
        &[
            "replay",
            "--config",
            "floodway.toml",
            "--processor",
            "orders-view",
            "--from",
            "1d",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("replayed 40 events"), "{}", text(&out));
    assert!(
        text(&out).contains("40 delivered, 0 faults"),
        "{}",
        text(&out)
    );

    // A server that is not there is named, with what to check.
    let out = floodway(d, &["hub", "stats", "--nats", "nats://127.0.0.1:1"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cannot connect to NATS at nats://127.0.0.1:1"),
        "{}",
        text(&out)
    );
}
