//! Helpers shared by the command's tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use floodway_embedded::{Hub, HubOptions};

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

/// Asserts that a run printed `what`.
pub(crate) fn says(out: &Output, what: &str) {
    assert!(text(out).contains(what), "{}", text(out));
}

/// Starts the `floodway` binary in `dir`, its output going where `stdout` and `stderr` say.
pub(crate) fn start(dir: &Path, args: &[&str], stdout: Stdio, stderr: Stdio) -> Child {
    Command::new(env!("CARGO_BIN_EXE_floodway"))
        .current_dir(dir)
        .args(args)
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("the floodway binary runs")
}

/// A `floodway` process that is killed if the test ends without stopping it, so that a failed
/// assertion leaves nothing running.
pub(crate) struct Process {
    child: Option<Child>,
}

impl Process {
    /// Starts the `floodway` binary in `dir`, as [`start`] does.
    pub(crate) fn start(dir: &Path, args: &[&str], stdout: Stdio, stderr: Stdio) -> Process {
        Process {
            child: Some(start(dir, args, stdout, stderr)),
        }
    }

    /// Kills it (SIGKILL) and waits for it.
    pub(crate) fn kill(mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Stops it with SIGTERM; it must exit cleanly.
    pub(crate) fn stop(mut self) {
        stop(self.child.take().expect("running"));
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends `signal` (`-TERM`, `-STOP`, ...) to `child`.
pub(crate) fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Stops `child` with SIGTERM; it must exit cleanly.
pub(crate) fn stop(mut child: Child) {
    signal(&child, "-TERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "exits cleanly on SIGTERM: {status}");
}

/// Starts `floodway run` and stops it (SIGTERM) once `done` says the work is done.
pub(crate) fn run_until(dir: &Path, config: &str, done: impl Fn() -> bool) {
    let mut child = start(dir, &["run", config], Stdio::inherit(), Stdio::inherit());
    let started = std::time::Instant::now();
    while !done() {
        if started.elapsed() > std::time::Duration::from_secs(60) {
            // Nothing outlives the test.
            let _ = child.kill();
            let _ = child.wait();
            panic!("run did not finish its work");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    stop(child);
}

/// Writes `lines` to `file` in `dir` and publishes it to the configured hub.
pub(crate) fn publish(dir: &Path, file: &str, lines: &[String]) {
    std::fs::write(dir.join(file), lines.join("\n")).unwrap();
    let out = floodway(dir, &["hub", "publish", "--config", "floodway.toml", file]);
    assert!(out.status.success(), "{}", text(&out));
}

/// An order event's JSON line: `e-{i}` of type `order-{kind}` at `timestamp`, partition key
/// `o-{key}`, with `fields` (JSON members, each followed by a comma) before the order.
pub(crate) fn order_line(
    i: impl std::fmt::Display,
    kind: &str,
    timestamp: i64,
    key: impl std::fmt::Display,
    fields: &str,
    order: &str,
) -> String {
    format!(
        r#"{{"id":"e-{i}","type":"order-{kind}","timestamp":{timestamp},"partitionKey":"o-{key}",{fields}"order":{order}}}"#
    )
}

/// Replays the whole log of the configured hub to `orders-view`.
pub(crate) fn replay(dir: &Path) -> Output {
    let out = floodway(
        dir,
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
    out
}

/// The hub `hub.db` in `dir`, which must exist.
pub(crate) fn open_hub(dir: &Path) -> Hub {
    let options = HubOptions {
        create: false,
        ..HubOptions::default()
    };
    Hub::open(dir.join("hub.db"), options).unwrap()
}

/// The newest `n` fault events the hub holds.
pub(crate) fn fault_events(hub: &Hub, n: usize) -> Vec<(i64, Vec<u8>)> {
    hub.newest(n, |bytes| {
        floodway::Event::decode(bytes).is_ok_and(|e| e.is_fault())
    })
    .unwrap()
}

/// The `[hub]` table of the embedded hub `hub.db` with `partitions` partitions and `extra`
/// settings (lines), then `processors`.
pub(crate) fn embedded(partitions: u32, extra: &str, processors: &str) -> String {
    format!("[hub]\npath = \"hub.db\"\npartitions = {partitions}\n{extra}{processors}")
}

/// The processor `orders-view`: events of `types` into the view `orders`, keyed by `key`.
pub(crate) fn orders_view(types: &str, key: &str) -> String {
    format!(
        r#"
[[processors]]
kind = "materialize"
name = "orders-view"
types = {types}
view = "orders"
key = "{key}"
value = "/order"
"#
    )
}

/// The fault monitor `faults`.
pub(crate) const FAULT_MONITOR: &str = r#"
[[processors]]
kind = "fault-monitor"
name = "faults"
"#;

/// The open faults of `orders-view`.
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
pub(crate) fn processors(key: &str) -> String {
    orders_view(r#"["order-*"]"#, key) + FAULT_MONITOR
}

/// The command end to end, the same on every hub: publish (one line is not an event, a
/// second publish stores nothing), run until the three orders without a `ref` are faults,
/// show one, resubmit before the fix (fails, and the raise is counted) and after it
/// (succeeds, once), tail, and replay the whole log to the view with nothing applied twice.
/// `config(key)` writes the configuration for a view keyed by `key`.
pub(crate) fn publish_run_resubmit_replay(d: &Path, config: impl Fn(&str) -> String) {
    std::fs::write(d.join("floodway.toml"), config("/order/ref")).unwrap();
    let mut lines = Vec::new();
    for i in 0..40 {
        let order = if i % 13 == 5 {
            format!(r#"{{"id":"o-{i}","total":{i}}}"#)
        } else {
            format!(r#"{{"id":"o-{i}","ref":"r-{i}","total":{i}}}"#)
        };
        lines.push(order_line(
            i,
            "submitted",
            1_700_000_000_000 + i,
            i,
            "",
            &order,
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
    says(&out, "line 8: event is not valid JSON");
    says(&out, "published 40 events");
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
    says(&out, "0 succeeded, 3 failed");
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
    says(&out, "3 succeeded, 0 failed");
    // Resolved faults are not resubmitted again.
    let out = floodway(d, &resubmit);
    says(&out, "0 faults to resubmit");
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
    let out = replay(d);
    says(&out, "40 delivered, 0 faults");

    // The view, read: listed, a row (the one resubmitted, keyed by the order id after the
    // fix), rows by prefix a page at a time, and a view that is not there named with those
    // that are.
    let view = |args: &[&str]| {
        let mut all = vec!["view"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--config", "floodway.toml"]);
        floodway(d, &all)
    };
    let out = view(&["list"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "orders");
    let out = view(&["get", "orders", "o-5"]);
    says(&out, "key      o-5");
    says(&out, "event e-5");
    says(&out, r#""id": "o-5""#);
    let out = view(&["query", "orders", "--prefix", "r-1", "--limit", "3"]);
    let page = String::from_utf8_lossy(&out.stdout).into_owned();
    let keys: Vec<&str> = page.lines().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(keys, ["r-1", "r-10", "r-11"], "{page}");
    says(&out, "the next page: --after 'r-11'");
    let out = view(&[
        "query", "orders", "--prefix", "r-1", "--after", "r-11", "--json",
    ]);
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let keys: Vec<&str> = rows.iter().map(|r| r["key"].as_str().unwrap()).collect();
    // r-1 and r-10..r-19 but the orders without a ref (i % 13 == 5: 18).
    assert_eq!(
        keys,
        ["r-12", "r-13", "r-14", "r-15", "r-16", "r-17", "r-19"]
    );
    assert_eq!(rows[0]["value"]["id"], "o-12");
    let out = view(&["get", "orders", "nope"]);
    assert!(!out.status.success());
    says(&out, "view `orders` has no row `nope`");
    let out = view(&["get", "order", "o-5"]);
    assert!(!out.status.success());
    says(&out, "it has orders");
}

/// Runs `orders-view` with `floodway lambda run` and `options`; what it said.
pub(crate) fn lambda_run(d: &Path, options: &[&str]) -> String {
    let run = [
        "lambda",
        "run",
        "--config",
        "floodway.toml",
        "--processor",
        "orders-view",
    ];
    let out = floodway(d, &[&run[..], options].concat());
    assert!(out.status.success(), "{}", text(&out));
    text(&out)
}

/// Orders into rows (status, channel, a count of events) whose changes go to the outbox as
/// `orderrow-*` events; a second processor counts each change into a row per order
/// downstream (`changes`, with the count of the last change seen).
pub(crate) const ORDER_ROWS_AND_CHANGES: &str = r#"
[[processors]]
kind = "materialize"
name = "order-rows"
types = ["order-*"]
view = "order_rows"
key = { pk = "/order/id", sk = "order" }
set = { status = "/order/status", channel = "/order/channel" }
add = { events = 1 }
discriminator = "orderrow"
ttl = "4000d"
outbox = true

[[processors]]
kind = "materialize"
name = "changes"
types = ["orderrow-*"]
view = "changes"
key = { pk = "partitionKey", sk = "count" }
add = { changes = 1 }
set = { last = "/raw/new/events" }
"#;

/// A cep processor of orders: ready when paid, expired when not paid `within`.
pub(crate) fn order_cep(within: &str) -> String {
    format!(
        r#"
[[processors]]
kind = "cep"
name = "orders-cep"
types = ["order-submitted", "payment-captured"]
ttl = "1h"

[[processors.rules]]
name = "ready"
kind = "all"
types = ["order-submitted", "payment-captured"]
emit = "order-ready"

[[processors.rules]]
name = "expired"
kind = "absence"
first = "order-submitted"
then = "payment-captured"
within = "{within}"
emit = "order-expired"
"#
    )
}

/// [`order_cep`] and a materialize processor counting each order's outcomes in the rows
/// table `outcomes`.
pub(crate) fn order_outcomes(within: &str) -> String {
    format!(
        r#"{}
[[processors]]
kind = "materialize"
name = "outcomes"
types = ["order-ready", "order-expired"]
view = "outcomes"
key = {{ pk = "partitionKey", sk = "outcome" }}
set = {{ type = "/type" }}
add = {{ n = 1 }}
"#,
        order_cep(within)
    )
}
