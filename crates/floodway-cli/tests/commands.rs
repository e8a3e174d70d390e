//! The `floodway` command on a real hub file: publish, run, faults, resubmit, replay.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{fault_id_of, floodway, lag, open_faults, run_until, text};

/// Publishes `lines` as `orders.jsonl` and runs until every event is read and `faults`
/// faults are open.
fn publish_and_run(d: &Path, lines: &[String], faults: usize) {
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
    run_until(d, "floodway.toml", || {
        lag(d) == Some(0) && open_faults(d) == faults
    });
}

const CONFIG: &str = r#"
[hub]
path = "hub.db"
partitions = 4

[[processors]]
kind = "materialize"
name = "orders-view"
types = ["order-*"]
view = "orders"
key = "/order/ref"
value = "/order"

[[processors]]
kind = "fault-monitor"
name = "faults"
"#;

#[test]
fn the_command_publishes_runs_faults_resubmits_and_replays() {
    let dir = tempfile::tempdir().unwrap();
    common::publish_run_resubmit_replay(dir.path(), |key| {
        format!(
            "[hub]\npath = \"hub.db\"\npartitions = 4\n{}",
            common::processors(key)
        )
    });
}

#[test]
fn a_fault_raised_again_after_its_resolution_is_open_again_within_the_dedupe_window() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("floodway.toml"), CONFIG).unwrap();
    let lines: Vec<String> = (0..5)
        .map(|i| {
            let order = if i == 2 {
                format!(r#"{{"id":"o-{i}"}}"#)
            } else {
                format!(r#"{{"id":"o-{i}","ref":"r-{i}"}}"#)
            };
            format!(
                r#"{{"id":"e-{i}","type":"order-submitted","timestamp":{i},"partitionKey":"o-{i}","order":{order}}}"#
            )
        })
        .collect();
    publish_and_run(d, &lines, 1);
    let id = fault_id_of(d, "MissingKey");
    let show = || {
        text(&floodway(
            d,
            &["faults", "show", "--config", "floodway.toml", &id],
        ))
    };

    // A fix that resolves it...
    let fixed = CONFIG.replace(r#"key = "/order/ref""#, r#"key = "/order/id""#);
    std::fs::write(d.join("floodway.toml"), &fixed).unwrap();
    let out = floodway(d, &["faults", "resubmit", "--config", "floodway.toml"]);
    assert!(
        text(&out).contains("1 succeeded, 0 failed"),
        "{}",
        text(&out)
    );
    assert!(
        show().contains("status     resolved (seen 1 times"),
        "{}",
        show()
    );

    // ...then the old code again, and a replay of the record seconds later: well inside the
    // hub's dedupe window, the fault is raised again, reaches the store and is open again.
    std::fs::write(d.join("floodway.toml"), CONFIG).unwrap();
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
    run_until(d, "floodway.toml", || open_faults(d) == 1);
    let shown = show();
    assert!(shown.contains("status     open (seen 2 times"), "{shown}");
}

#[test]
fn a_redacted_field_appears_nowhere_in_a_fault_and_resubmission_still_works() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = CONFIG.replace(
        r#"value = "/order""#,
        "value = \"/order\"\nredact = [\"customer.email\"]",
    );
    std::fs::write(d.join("floodway.toml"), &config).unwrap();
    let email = "ann.lee@example.com";
    let lines: Vec<String> = (0..4)
        .map(|i| {
            let order = if i == 1 {
                format!(r#"{{"id":"o-{i}"}}"#)
            } else {
                format!(r#"{{"id":"o-{i}","ref":"r-{i}"}}"#)
            };
            format!(
                r#"{{"id":"e-{i}","type":"order-submitted","timestamp":{i},"partitionKey":"o-{i}","customer":{{"email":"{email}","name":"Ann"}},"order":{order}}}"#
            )
        })
        .collect();
    publish_and_run(d, &lines, 1);

    // Neither the stored fault nor the fault event in the hub holds the address.
    let hub =
        floodway_embedded::Hub::open(d.join("hub.db"), floodway_embedded::HubOptions::default())
            .unwrap();
    let stored = hub
        .fault_store()
        .unwrap()
        .list(&floodway_embedded::FaultFilter::default())
        .unwrap();
    assert_eq!(stored.len(), 1);
    let fault_text = stored[0].fault.to_json();
    assert!(!fault_text.contains(email), "{fault_text}");
    assert!(fault_text.contains("[REDACTED]"), "{fault_text}");
    let published = hub
        .newest(100, |bytes| {
            floodway::Event::decode(bytes).is_ok_and(|e| e.is_fault())
        })
        .unwrap();
    assert_eq!(published.len(), 1);
    assert!(!String::from_utf8_lossy(&published[0].1).contains(email));
    drop(hub);
    let id = stored[0].id.clone();
    let shown = text(&floodway(
        d,
        &["faults", "show", "--config", "floodway.toml", &id],
    ));
    assert!(!shown.contains(email), "{shown}");
    assert!(
        shown.contains("not kept: the pipeline redacts fields"),
        "{shown}"
    );

    // After the fix, resubmission reads the record back from the hub by position.
    std::fs::write(
        d.join("floodway.toml"),
        config.replace(r#"key = "/order/ref""#, r#"key = "/order/id""#),
    )
    .unwrap();
    let out = floodway(d, &["faults", "resubmit", "--config", "floodway.toml"]);
    assert!(
        text(&out).contains("1 succeeded, 0 failed"),
        "{}",
        text(&out)
    );
    let hub =
        floodway_embedded::Hub::open(d.join("hub.db"), floodway_embedded::HubOptions::default())
            .unwrap();
    let row = hub.view("orders").unwrap().get("o-1").unwrap();
    assert!(row.is_some(), "the resubmitted order is in the view");
}

#[test]
fn mistakes_get_errors_that_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = floodway(d, &["hub", "stats", "--hub", "missing.db"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no hub at missing.db"),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains("backtrace"), "{}", text(&out));
    std::fs::write(d.join("bad.toml"), CONFIG.replace("view = ", "veiw = ")).unwrap();
    let out = floodway(d, &["run", "bad.toml"]);
    assert!(
        text(&out).contains("unknown field `veiw`"),
        "{}",
        text(&out)
    );
    std::fs::write(
        d.join("foreign.db"),
        b"this is not a database at all, not even close",
    )
    .unwrap();
    let out = floodway(d, &["hub", "tail", "--hub", "foreign.db"]);
    assert!(
        text(&out).contains("is not a Floodway hub"),
        "{}",
        text(&out)
    );
    let out = floodway(
        d,
        &["faults", "list", "--hub", "x.db", "--since", "last tuesday"],
    );
    assert!(!out.status.success());
}

#[test]
fn run_serves_prometheus_metrics() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("floodway.toml"), CONFIG).unwrap();
    let lines: Vec<String> = (0..20)
        .map(|i| {
            format!(
                r#"{{"id":"e-{i}","type":"order-submitted","timestamp":{i},"partitionKey":"o-{i}","order":{{"ref":"r-{i}"}}}}"#
            )
        })
        .collect();
    std::fs::write(d.join("orders.jsonl"), lines.join("\n")).unwrap();
    assert!(floodway(
        d,
        &[
            "hub",
            "publish",
            "--config",
            "floodway.toml",
            "orders.jsonl"
        ]
    )
    .status
    .success());
    // A free port: bind, read it, let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_floodway"))
        .current_dir(d)
        .args(["run", "floodway.toml", "--metrics", &addr])
        .spawn()
        .unwrap();
    let started = Instant::now();
    let body = loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no metrics served"
        );
        std::thread::sleep(Duration::from_millis(200));
        let Ok(mut stream) = std::net::TcpStream::connect(&addr) else {
            continue;
        };
        let _ = stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let mut body = String::new();
        let _ = stream.read_to_string(&mut body);
        if body.contains("floodway_events_total") && body.contains("outcome=\"delivered\"") {
            break body;
        }
    };
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    assert!(body.contains("processor=\"orders-view\""), "{body}");
    assert!(body.contains("floodway_in_flight"), "{body}");
}
