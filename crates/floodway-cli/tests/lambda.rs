//! `floodway lambda run`: a configured processor run as Lambda would run it, through the
//! event-source-mapping simulator and a real `floodway lambda handler` process behind a local
//! Lambda Runtime API.

use floodway_embedded::{Hub, HubOptions};

mod common;
use common::{floodway, text};

const CONFIG: &str = r#"
[hub]
path = "hub.db"
partitions = 2

[[processors]]
kind = "materialize"
name = "orders-view"
types = ["order-*"]
view = "orders"
key = "/order/ref"
value = "/order"
"#;

#[test]
fn a_processor_runs_as_a_lambda_function_against_the_embedded_hub() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("floodway.toml"), CONFIG).unwrap();
    let lines: Vec<String> = (0..120)
        .map(|i| {
            // Every 25th order lacks its ref: poison for the view's key.
            let order = if i % 25 == 7 {
                format!(r#"{{"id":"o-{i}","total":{i}}}"#)
            } else {
                format!(r#"{{"id":"o-{i}","ref":"r-{}","total":{i}}}"#, i % 40)
            };
            format!(
                r#"{{"id":"e-{i}","type":"order-paid","timestamp":{},"partitionKey":"o-{}","order":{order}}}"#,
                1_700_000_000_000i64 + i,
                i % 40
            )
        })
        .collect();
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

    // Through a real handler process and the local Runtime API.
    let out = floodway(
        d,
        &[
            "lambda",
            "run",
            "--config",
            "floodway.toml",
            "--processor",
            "orders-view",
            "--batch-size",
            "50",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("120 records"), "{said}");
    assert!(said.contains("0 function errors"), "{said}");
    assert!(said.contains("0 records given up"), "{said}");

    // The view holds the latest order per ref; the poison orders became fault events.
    let hub = Hub::open(d.join("hub.db"), HubOptions::default()).unwrap();
    let rows = hub.view("orders").unwrap().rows().unwrap();
    assert_eq!(rows.len(), 40);
    let faults = hub
        .newest(100, |data| {
            floodway::Event::decode(data).is_ok_and(|e| e.is_fault())
        })
        .unwrap();
    assert_eq!(faults.len(), 5);

    // The mapping's checkpoint is kept: a second run finds nothing new but the fault events
    // the first run published (which the view's types do not take).
    let out = floodway(
        d,
        &[
            "lambda",
            "run",
            "--config",
            "floodway.toml",
            "--processor",
            "orders-view",
            "--in-process",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("5 records"), "{}", text(&out));
}
