//! Complex event processing through the command, on the real clock: orders paid in time are
//! ready, the others expire when their timers fire, and every outcome is emitted exactly once
//! although `floodway run` is killed with SIGKILL while timers are pending.

use std::collections::BTreeMap;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use floodway::rows::RowKey;
use floodway::Event;

mod common;
use common::{floodway, open_hub, says, start, text};

/// The order story with its correlation key in the order, not the partition key.
fn config() -> String {
    common::order_outcomes("4s").replace(
        "ttl = \"1h\"",
        "correlate = [{ key = \"/order/id\" }]\nttl = \"1h\"",
    )
}

fn kill_after(mut child: Child, after: Duration) {
    std::thread::sleep(after);
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
}

#[test]
fn orders_are_ready_or_expire_once_through_kills() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("floodway.toml"), common::embedded(4, "", &config())).unwrap();
    let now = floodway::event::now_millis();
    let n = 120;
    let mut lines = Vec::new();
    for i in 0..n {
        let order = serde_json::json!({ "id": format!("o-{i}") });
        lines.push(
            Event::builder("order-submitted", format!("o-{i}"))
                .id(format!("s-{i}"))
                .timestamp(now)
                .field("order", order.clone())
                .build()
                .to_json(),
        );
        if i % 2 == 0 {
            // Paid within the window; every third payment arrives before its order.
            let paid = Event::builder("payment-captured", format!("o-{i}"))
                .id(format!("p-{i}"))
                .timestamp(now + 500)
                .field("order", order)
                .build()
                .to_json();
            if i % 3 == 0 {
                lines.insert(lines.len() - 1, paid);
            } else {
                lines.push(paid);
            }
        }
    }
    common::publish(d, "orders.jsonl", &lines);

    // Runs killed at random moments, some before the timers are due, some after.
    let mut rng = fastrand::Rng::with_seed(3);
    for i in 0..5 {
        let run = start(d, &["run", "floodway.toml"], Stdio::null(), Stdio::null());
        let wait = if i == 0 {
            1_500
        } else {
            300 + rng.u64(..1_500)
        };
        kill_after(run, Duration::from_millis(wait));
    }
    let hub = open_hub(d);
    let cep = hub.cep("orders-cep").unwrap();
    let pending = cep.pending_timers().unwrap();
    let out = floodway(
        d,
        &["cep", "show", "--config", "floodway.toml", "--key", "o-1"],
    );
    says(&out, "order-submitted");
    says(&out, "s-1");

    // A last run until every order has its outcome.
    let outcomes = hub.rows("outcomes").ok();
    let last = start(
        d,
        &["run", "floodway.toml"],
        Stdio::null(),
        Stdio::inherit(),
    );
    let started = Instant::now();
    let done = || {
        let Ok(table) = hub.rows("outcomes") else {
            return false;
        };
        (0..n).all(|i| {
            table
                .get(&RowKey::new(format!("o-{i}"), "outcome"))
                .ok()
                .flatten()
                .is_some()
        })
    };
    while !(done() && started.elapsed() > Duration::from_secs(1)) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "every order has an outcome ({pending} timers were pending after the kills)"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Give a repeat the time to show.
    std::thread::sleep(Duration::from_millis(500));
    common::stop(last);
    drop(outcomes);

    let table = hub.rows("outcomes").unwrap();
    for i in 0..n {
        let row = table
            .get(&RowKey::new(format!("o-{i}"), "outcome"))
            .unwrap()
            .unwrap();
        let want = if i % 2 == 0 {
            "order-ready"
        } else {
            "order-expired"
        };
        assert_eq!(row.fields["type"], want, "o-{i}");
        assert_eq!(row.fields["n"], 1, "o-{i}: one outcome, applied once");
    }
    // In the log, each outcome once.
    let mut logged: BTreeMap<String, usize> = BTreeMap::new();
    for (_, bytes) in hub
        .newest(usize::MAX, |b| {
            Event::decode(b).is_ok_and(|e| {
                e.event_type().starts_with("order-") && e.event_type() != "order-submitted"
            })
        })
        .unwrap()
    {
        let e = Event::decode(&bytes).unwrap();
        *logged.entry(e.partition_key().to_owned()).or_default() += 1;
        if e.event_type() == "order-expired" {
            let late = e.timestamp() - now;
            assert_eq!(late, 4_000, "an expiry is timed at its timer");
            assert_eq!(
                e.field("triggers").unwrap()[0]["id"],
                format!("s-{}", &e.partition_key()[2..])
            );
        }
    }
    assert_eq!(logged.len(), n);
    assert!(logged.values().all(|c| *c == 1), "{logged:?}");
    assert_eq!(cep.pending_timers().unwrap(), 0);
    let out = floodway(
        d,
        &["cep", "show", "--config", "floodway.toml", "--key", "o-1"],
    );
    assert!(out.status.success(), "{}", text(&out));
    says(&out, "emitted (1)");
}

#[test]
fn bad_rules_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (bad, says_what) in [
        (
            config().replace("within = \"4s\"", "within = \"2h\""),
            "looks 7200s back, longer than the ttl",
        ),
        (
            config().replace("emit = \"order-ready\"", "emit = \"order-submitted\""),
            "emits `order-submitted`, which its types take in again",
        ),
        (
            config().replace("kind = \"absence\"", "kind = \"never\""),
            "kind `never` is none of all, sequence, threshold, absence",
        ),
    ] {
        std::fs::write(d.join("floodway.toml"), common::embedded(1, "", &bad)).unwrap();
        let out = floodway(d, &["run", "floodway.toml"]);
        assert!(!out.status.success());
        says(&out, says_what);
    }
}
