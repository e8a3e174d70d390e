//! `floodway faults` on faults that Lambda functions stored in DynamoDB (a real `moto_server`):
//! listed, shown and resubmitted by invoking a real `floodway lambda handler` process behind a
//! local Lambda Runtime API, before and after the fix. Needs the `aws` feature.
#![cfg(feature = "aws")]

use std::path::Path;

use floodway::fault_store::{FaultStore as _, ResubmitOutcome};
use floodway::Event;
use floodway_aws::testing::{table, Moto};
use floodway_aws::DynamoDbFaults;
use floodway_lambda::{FunctionProcess, LocalRuntime};

mod common;
#[path = "common/console.rs"]
mod console;
use common::{
    embedded, fault_events, lambda_run, open_hub, order_line, orders_view, publish, text,
};

/// Runs `floodway faults` with `args` against the table `faults` on `moto`; whether it
/// succeeded, and what it said.
async fn faults(dir: &Path, moto: &Moto, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_floodway"))
        .current_dir(dir)
        .arg("faults")
        .args(args)
        .args(["--dynamodb-table", "faults", "--region", "us-east-1"])
        .args(["--aws-endpoint", moto.url()])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .output()
        .await
        .unwrap();
    (out.status.success(), text(&out))
}

/// The function `orders-view` of `dir`'s configuration, deployed: a handler process behind a
/// Lambda API of its own.
async fn deploy(dir: &Path) -> (LocalRuntime, FunctionProcess) {
    let runtime = LocalRuntime::start().await.unwrap();
    let config = dir.join("floodway.toml");
    let args = [
        "lambda",
        "handler",
        "--config",
        config.to_str().unwrap(),
        "--processor",
        "orders-view",
    ];
    let binary = Path::new(env!("CARGO_BIN_EXE_floodway"));
    let function = FunctionProcess::spawn(binary, &args, &runtime, &[]).unwrap();
    (runtime, function)
}

/// `floodway faults resubmit` of the table's faults of `orders-view` to the function behind
/// `runtime`; whether it succeeded (every resubmission did), and what it said.
async fn resubmit(dir: &Path, moto: &Moto, runtime: &LocalRuntime) -> (bool, String) {
    let endpoint = runtime.endpoint();
    let args = [
        "resubmit",
        "--function",
        "orders-view",
        "--processor",
        "orders-view",
        "--lambda-endpoint",
        &endpoint,
    ];
    faults(dir, moto, &args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_stored_by_lambda_functions_are_listed_shown_and_resubmitted_by_invoking_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A view keyed by each order's ref; every tenth order has none: poison for this version.
    let config = |key: &str| embedded(2, "", &orders_view(r#"["order-*"]"#, key));
    std::fs::write(d.join("floodway.toml"), config("/order/ref")).unwrap();
    let lines: Vec<String> = (0..30)
        .map(|i| {
            let order = if i % 10 == 3 {
                format!(r#"{{"id":"o-{i}","total":{i}}}"#)
            } else {
                format!(r#"{{"id":"o-{i}","ref":"r-{i}","total":{i}}}"#)
            };
            order_line(i, "paid", 1_700_000_000_000 + i, i, "", &order)
        })
        .collect();
    publish(d, "orders.jsonl", &lines);
    lambda_run(d, &[]);

    // The function's fault events, stored in DynamoDB as a Lambda fault monitor stores them.
    let raised: Vec<Event> = fault_events(&open_hub(d), 100)
        .iter()
        .map(|(_, bytes)| Event::decode(bytes).unwrap())
        .collect();
    assert_eq!(raised.len(), 3);
    let (moto, aws) = Moto::configured().await;
    table(&aws, "faults", false).await;
    DynamoDbFaults::new(&aws, "faults")
        .store_faults(&raised)
        .await
        .unwrap();
    let ids: Vec<&str> = raised.iter().map(floodway::fault::fault_id).collect();

    let (ok, listed) = faults(d, &moto, &["list", "--status", "open"]).await;
    assert!(ok, "{listed}");
    for id in &ids {
        assert!(listed.contains(id), "{listed}");
    }
    let (ok, planned) = faults(
        d,
        &moto,
        &["resubmit", "--function", "orders-view", "--dry-run"],
    )
    .await;
    assert!(
        ok && planned.matches("would resubmit ").count() == 3,
        "{planned}"
    );

    // A fault of another function in the same table: which function's faults go where must
    // be said, or one function would be given another's.
    let mut other = raised[0].clone();
    other.set_tag("processor", "billing");
    other.set_id("raise-of-billing");
    other
        .fields_mut()
        .insert("faultId".into(), "fault-of-billing".into());
    DynamoDbFaults::new(&aws, "faults")
        .store_faults(std::slice::from_ref(&other))
        .await
        .unwrap();
    let (ok, said) = faults(
        d,
        &moto,
        &["resubmit", "--function", "orders-view", "--dry-run"],
    )
    .await;
    assert!(
        !ok && said.contains("2 processors (billing, orders-view)") && said.contains("--processor"),
        "{said}"
    );
    // Resolved, so out of the way of what follows.
    DynamoDbFaults::new(&aws, "faults")
        .record_resubmission_of("fault-of-billing", ResubmitOutcome::Succeeded, "elsewhere")
        .await
        .unwrap();

    // Resubmitted to the function that failed them: it fails them again until fixed, and the
    // command says so by its exit status.
    let (runtime, function) = deploy(d).await;
    let (ok, said) = resubmit(d, &moto, &runtime).await;
    assert!(!ok, "{said}");
    assert!(said.contains("0 succeeded, 3 failed"), "{said}");
    assert!(said.contains("3 of 3 resubmissions failed"), "{said}");
    assert!(said.contains("faulted again"), "{said}");
    drop(function);

    // The fix, deployed: the view is keyed by the order's id.
    std::fs::write(d.join("floodway.toml"), config("/order/id")).unwrap();
    let (runtime, _function) = deploy(d).await;
    resubmit_from_the_console(d, &moto, &runtime, &ids).await;
    let (ok, said) = resubmit(d, &moto, &runtime).await;
    assert!(ok && said.contains("0 open faults"), "{said}");
    let rows = open_hub(d).view("orders").unwrap().rows().unwrap();
    for i in [3, 13, 23] {
        assert!(rows.iter().any(|r| r.key == format!("o-{i}")), "o-{i}");
    }

    // Each fault shows its two resubmissions, and is resolved.
    let (ok, listed) = faults(d, &moto, &["list", "--status", "resolved"]).await;
    assert!(ok && ids.iter().all(|id| listed.contains(id)), "{listed}");
    let (ok, shown) = faults(d, &moto, &["show", ids[0]]).await;
    assert!(ok && shown.contains("status     resolved"), "{shown}");
    assert_eq!(shown.matches("resubmitted ").count(), 2, "{shown}");
    assert!(
        shown.contains(": failed (") && shown.contains(": succeeded ("),
        "{shown}"
    );
    let (ok, said) = faults(d, &moto, &["show", "no-such-fault"]).await;
    assert!(
        !ok && said.contains("no fault with id no-such-fault"),
        "{said}"
    );
}

/// The console of the table's faults: one group of three, resubmitted from it to the function
/// behind `runtime` after the fix, each a success.
async fn resubmit_from_the_console(d: &Path, moto: &Moto, runtime: &LocalRuntime, ids: &[&str]) {
    use serde_json::json;
    let port = console::free_port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_floodway"))
        .current_dir(d)
        .args(["console", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--dynamodb-table", "faults", "--region", "us-east-1"])
        .args(["--aws-endpoint", moto.url()])
        .args([
            "--function",
            "orders-view",
            "--processor",
            "orders-view",
            "--lambda-endpoint",
            &runtime.endpoint(),
        ])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .spawn()
        .unwrap();
    let served = console::Served::started(child, port).await;
    let (_, session) = console::http(port, "GET", "/api/session", &[], None).await;
    assert_eq!(
        session["resubmits_to"],
        json!("the Lambda function orders-view"),
        "{session}"
    );
    assert_eq!(session["can_replay"], json!(false), "{session}");
    let csrf = session["csrf"].as_str().unwrap().to_owned();
    let (_, groups) = console::http(port, "GET", "/api/faults/groups", &[], None).await;
    let group = &groups["groups"][0];
    assert_eq!(group["open"], json!(3), "{groups}");
    let (status, plan) = console::http(
        port,
        "POST",
        "/api/resubmit",
        &[("x-floodway-csrf", &csrf)],
        Some(json!({ "cause": group["cause"] })),
    )
    .await;
    assert_eq!(status, 200, "{plan}");
    let mut planned: Vec<&str> = plan["send"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    planned.sort_unstable();
    let mut expected = ids.to_vec();
    expected.sort_unstable();
    assert_eq!(planned, expected);
    let (_, job) = console::http(
        port,
        "POST",
        "/api/resubmit",
        &[("x-floodway-csrf", &csrf)],
        Some(json!({ "confirm": plan["plan"] })),
    )
    .await;
    let job = &console::finished(port, &[], &job["job"]).await;
    assert_eq!(
        (job["state"].clone(), job["succeeded"].clone()),
        (json!("done"), json!(3)),
        "{job}"
    );
    served.stop();
}
