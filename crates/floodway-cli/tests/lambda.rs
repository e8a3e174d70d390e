//! `floodway lambda run`: a configured processor run as Lambda would run it, through the
//! event-source-mapping simulator and a real `floodway lambda handler` process behind a local
//! Lambda Runtime API.

mod common;
use common::{fault_events, lambda_run, open_hub, order_line, publish};

#[test]
fn a_processor_runs_as_a_lambda_function_against_the_embedded_hub() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let view = common::orders_view(r#"["order-*"]"#, "/order/ref");
    std::fs::write(d.join("floodway.toml"), common::embedded(2, "", &view)).unwrap();
    let lines: Vec<String> = (0..120)
        .map(|i| {
            // Every 25th order lacks its ref: poison for the view's key.
            let order = if i % 25 == 7 {
                format!(r#"{{"id":"o-{i}","total":{i}}}"#)
            } else {
                format!(r#"{{"id":"o-{i}","ref":"r-{}","total":{i}}}"#, i % 40)
            };
            order_line(i, "paid", 1_700_000_000_000 + i, i % 40, "", &order)
        })
        .collect();
    publish(d, "orders.jsonl", &lines);

    // Through a real handler process and the local Runtime API.
    let said = lambda_run(d, &["--batch-size", "50"]);
    assert!(said.contains("120 records"), "{said}");
    assert!(said.contains("0 function errors"), "{said}");
    assert!(said.contains("0 records given up"), "{said}");

    // The view holds the latest order per ref; the poison orders became fault events.
    let hub = open_hub(d);
    let rows = hub.view("orders").unwrap().rows().unwrap();
    assert_eq!(rows.len(), 40);
    assert_eq!(fault_events(&hub, 100).len(), 5);

    // The mapping's checkpoint is kept: a second run finds nothing new but the fault events
    // the first run published (which the view's types do not take).
    let said = lambda_run(d, &["--in-process"]);
    assert!(said.contains("5 records"), "{said}");
}
