//! Helpers shared by the command's tests.

use std::path::Path;
use std::process::{Command, Output};

/// Runs the `floodway` binary in `dir` and waits for it.
pub(crate) fn floodway(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_floodway"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("the floodway binary runs")
}

/// What a run printed, stdout then stderr.
pub(crate) fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Starts `floodway run` and stops it (SIGTERM) once `done` says the work is done.
#[allow(dead_code)]
pub(crate) fn run_until(dir: &Path, config: &str, done: impl Fn() -> bool) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_floodway"))
        .current_dir(dir)
        .args(["run", config])
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !done() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "run did not finish its work"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "run exits cleanly on SIGTERM: {status}");
}

/// The open faults of `orders-view`.
#[allow(dead_code)]
pub(crate) fn open_faults(dir: &Path) -> usize {
    let out = floodway(
        dir,
        &[
            "faults",
            "list",
            "--config",
            "floodway.toml",
            "--status",
            "open",
            "--limit",
            "1000",
        ],
    );
    text(&out)
        .lines()
        .filter(|l| l.contains("orders-view/"))
        .count()
}

/// The lag of every subscription summed, once both of the test's two exist.
#[allow(dead_code)]
pub(crate) fn lag(dir: &Path) -> Option<u64> {
    let out = floodway(dir, &["hub", "stats", "--config", "floodway.toml"]);
    let t = text(&out);
    let lags: Vec<u64> = t
        .lines()
        .skip_while(|l| !l.starts_with("subscription"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    (lags.len() == 2).then(|| lags.iter().sum())
}

/// The id of the first listed fault whose error is `error`.
#[allow(dead_code)]
pub(crate) fn fault_id_of(d: &Path, error: &str) -> String {
    let list = text(&floodway(
        d,
        &["faults", "list", "--config", "floodway.toml"],
    ));
    list.lines()
        .find(|l| l.contains(error))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {error} fault in {list}"))
        .to_owned()
}

/// The processors of the command's end-to-end scenario, after the `[hub]` table: a view
/// keyed by `key` and the fault monitor.
#[allow(dead_code)]
pub(crate) fn processors(key: &str) -> String {
    format!(
        r#"
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

/// The command end to end, the same on every hub: publish (one line is not an event, a
/// second publish stores nothing), run until the three orders without a `ref` are faults,
/// show one, resubmit before the fix (fails, and the raise is counted) and after it
/// (succeeds, once), tail, and replay the whole log to the view with nothing applied twice.
/// `config(key)` writes the configuration for a view keyed by `key`.
#[allow(dead_code)]
pub(crate) fn publish_run_resubmit_replay(d: &Path, config: impl Fn(&str) -> String) {
    std::fs::write(d.join("floodway.toml"), config("/order/ref")).unwrap();
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
    lines.insert(7, "{not an event".into());
    std::fs::write(d.join("orders.jsonl"), lines.join("\n")).unwrap();
    let publish = [
        "hub",
        "publish",
        "--config",
        "floodway.toml",
        "orders.jsonl",
    ];
    let out = floodway(d, &publish);
    assert!(!out.status.success(), "a rejected line fails the command");
    assert!(
        text(&out).contains("line 8: event is not valid JSON"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("published 40 events"), "{}", text(&out));
    // Publishing again stores nothing: the ids are in the dedupe window.
    let out = floodway(d, &publish);
    assert!(
        text(&out).contains("(40 duplicates skipped"),
        "{}",
        text(&out)
    );

    run_until(d, "floodway.toml", || {
        lag(d) == Some(0) && open_faults(d) == 3
    });
    let id = fault_id_of(d, "MissingKey");
    let show = ["faults", "show", "--config", "floodway.toml", id.as_str()];
    let shown = text(&floodway(d, &show));
    assert!(shown.contains("has no /order/ref"), "{shown}");
    assert!(shown.contains("never resubmitted"), "{shown}");

    // Resubmitting before the fix fails again and says so; the fault store counts the raise.
    let resubmit = ["faults", "resubmit", "--config", "floodway.toml"];
    let out = floodway(d, &resubmit);
    assert!(
        text(&out).contains("0 succeeded, 3 failed"),
        "{}",
        text(&out)
    );
    run_until(d, "floodway.toml", || {
        text(&floodway(d, &show)).contains("seen 2 times")
    });

    // The fix: key the view by the order id. A dry run changes nothing.
    std::fs::write(d.join("floodway.toml"), config("/order/id")).unwrap();
    let out = floodway(d, &[&resubmit[..], &["--dry-run"]].concat());
    assert_eq!(
        text(&out).matches("would resubmit").count(),
        3,
        "{}",
        text(&out)
    );
    let out = floodway(d, &resubmit);
    assert!(
        text(&out).contains("3 succeeded, 0 failed"),
        "{}",
        text(&out)
    );
    // Resolved faults are not resubmitted again.
    let out = floodway(d, &resubmit);
    assert!(
        text(&out).contains("0 faults to resubmit"),
        "{}",
        text(&out)
    );
    let shown = text(&floodway(d, &show));
    assert!(shown.contains("status     resolved"), "{shown}");
    assert!(
        shown.contains(": failed (") && shown.contains(": succeeded ("),
        "{shown}"
    );

    let tail = text(&floodway(
        d,
        &[
            "hub",
            "tail",
            "--config",
            "floodway.toml",
            "--type",
            "order-*",
            "-n",
            "3",
        ],
    ));
    assert_eq!(tail.lines().count(), 3, "{tail}");
    assert!(
        tail.lines().all(|l| l.contains("order-submitted")),
        "{tail}"
    );

    // Replaying the whole log to the view applies nothing twice (a hub that keeps fault
    // events with the others replays them too; the view does not take them).
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
    assert!(
        text(&out).contains("40 delivered, 0 faults"),
        "{}",
        text(&out)
    );
}
