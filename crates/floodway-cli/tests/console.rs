//! The web console against a real hub file and a real `floodway` process: its API over HTTP,
//! and its pages in headless Chromium (clicks, typing, live updates, screenshots).

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

#[path = "common/browser.rs"]
mod browser;
mod common;
#[path = "common/console.rs"]
mod console;

use browser::Browser;
use common::{order_line, publish, run_until};
use console::{finished, free_port, http, poll, Served};

/// An order of every 13 lacks the `ref` that the view is keyed by: its event becomes a fault.
fn missing_ref(i: u32) -> bool {
    i % 13 == 5
}

/// Orders `range` as event lines.
fn orders(range: std::ops::Range<u32>) -> Vec<String> {
    range
        .map(|i| {
            let order = if missing_ref(i) {
                format!(r#"{{"id":"o-{i}","total":{i}}}"#)
            } else {
                format!(r#"{{"id":"o-{i}","ref":"r-{i}","total":{i}}}"#)
            };
            order_line(
                i,
                "submitted",
                1_700_000_000_000 + i64::from(i),
                i,
                "",
                &order,
            )
        })
        .collect()
}

/// Writes the configuration: the orders view keyed by `key` and the fault monitor.
fn configure(d: &Path, key: &str) {
    let config = common::embedded(4, "", &common::processors(key));
    std::fs::write(d.join("floodway.toml"), config).unwrap();
}

fn faults_among(n: u32) -> usize {
    (0..n).filter(|i| missing_ref(*i)).count()
}

/// The flow page while events stream in; pause and resume; faults filtered, grouped, shown;
/// the fix deployed and the group resubmitted from the page, with its outcomes live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_flow_live_pauses_filters_faults_and_resubmits_a_group_after_a_fix() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    configure(d, "/order/ref");
    publish(d, "orders-0.jsonl", &orders(0..300));
    // Port 9000 taken (here, or already by something else): `run --console` listens where it
    // is told and nowhere else (the metrics exporter's default would be 0.0.0.0:9000).
    let _taken = std::net::TcpListener::bind("127.0.0.1:9000");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let run = Served::start(d, &["run", "floodway.toml", "--console", &addr], port).await;
    let mut browser = Browser::start().await;
    browser.goto(&run.url("#/flow")).await;

    // Events stream in while the page watches; its rates and charts move.
    let root = d.to_owned();
    let publisher = std::thread::spawn(move || {
        for batch in 1..10u32 {
            publish(
                &root,
                &format!("orders-{batch}.jsonl"),
                &orders(batch * 300..(batch + 1) * 300),
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let pipeline =
        r#"document.querySelector('[data-testid=pipeline][data-pipeline="orders-view"]')"#;
    browser
        .wait_for(
            &format!("Number({pipeline}?.dataset.deliveredRate) > 0"),
            "a delivery rate above zero",
        )
        .await;
    let rising = r#"(() => { const l = document.querySelector('[data-testid=pipeline][data-pipeline="orders-view"] ~ svg polyline[data-series="delivered/s"]');
        if (!l) return false; const ys = l.getAttribute('points').split(' ').map(p => p.split(',')[1]);
        return new Set(ys).size > 1; })()"#;
    browser.wait_for(rising, "the delivery chart to move").await;
    publisher.join().unwrap();
    browser
        .wait_for(
            &format!("Number({pipeline}?.dataset.taken) === 3000"),
            "every published event taken",
        )
        .await;
    browser.screenshot("flow").await;

    // Pause: the processor takes nothing new and its lag holds; resume: it drains.
    let card = r#"document.querySelector('[data-testid=processor][data-processor="orders-view"]')"#;
    let lag = r#"Number(document.querySelector('[data-testid=subscription][data-name="orders-view"]')?.dataset.lag)"#;
    browser
        .wait_for(&format!("{lag} === 0"), "orders-view to read every event")
        .await;
    browser.click(r#"[data-pause="orders-view"]"#).await;
    browser.click("#modal-confirm").await;
    browser
        .wait_for(
            &format!("{card}.querySelector('.badge').textContent === 'paused'"),
            "orders-view paused",
        )
        .await;
    publish(d, "orders-10.jsonl", &orders(3000..3300));
    browser
        .wait_for(&format!("{lag} === 300"), "the lag of the paused processor")
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        browser.eval(lag).await,
        json!(300),
        "a paused processor took events"
    );
    browser.click(r#"[data-pause="orders-view"]"#).await;
    browser.click("#modal-confirm").await;
    browser
        .wait_for(&format!("{lag} === 0"), "the resumed processor to catch up")
        .await;
    let missing = faults_among(3300);

    // Faults: grouped by cause, filtered, listed, shown.
    browser.goto(&run.url("#/faults")).await;
    let group = "document.querySelector('[data-testid=group]')";
    browser
        .wait_for(
            &format!("Number({group}?.dataset.open) === {missing}"),
            "one group of every missing ref",
        )
        .await;
    browser.choose("select[name=class]", "transient").await;
    browser.click("#filters button[type=submit]").await;
    browser
        .wait_for(
            "document.querySelector('[data-testid=no-faults]')",
            "no transient faults",
        )
        .await;
    browser.choose("select[name=class]", "poison").await;
    browser.type_into("input[name=error]", "MissingKey").await;
    browser.click("#filters button[type=submit]").await;
    browser
        .wait_for(
            &format!("Number({group}?.dataset.open) === {missing}"),
            "the group again",
        )
        .await;
    browser.screenshot("faults").await;
    browser.click("[data-view=all]").await;
    browser
        .wait_for(
            &format!("document.querySelectorAll('[data-testid=fault]').length === {missing}"),
            "every fault listed",
        )
        .await;
    browser.screenshot("fault-list").await;
    browser.click("[data-testid=fault] td:nth-child(3)").await;
    let message = browser
        .wait_for(
            "document.querySelector('[data-testid=fault-message]')?.textContent",
            "a fault's page",
        )
        .await;
    assert!(
        message.as_str().unwrap().contains("has no /order/ref"),
        "{message}"
    );
    let event = browser
        .eval("document.querySelector('[data-testid=fault-event]').textContent")
        .await;
    assert!(event.as_str().unwrap().contains(r#""id": "o-"#), "{event}");
    // A time as the page shows it, with the browser's offset, is a filter the console
    // takes: copied into "since", it lists the fault it was shown for.
    let shown = browser
        .eval(
            "[...document.querySelectorAll('dt')].find(d => d.textContent === 'last seen')\
             .nextElementSibling.textContent",
        )
        .await;
    let shown = shown.as_str().unwrap().to_owned();
    assert!(
        shown.ends_with("-05:00") || shown.ends_with("-04:00"),
        "New York's offset: {shown}"
    );
    let listed = browser
        .eval(&format!(
            "fetch('/api/faults?since=' + encodeURIComponent({shown:?}))\
             .then(r => r.json()).then(j => j.faults.map(f => f.id))\
             .then(ids => ids.includes(location.hash.split('/').pop()))"
        ))
        .await;
    assert_eq!(listed, json!(true), "since {shown}");
    browser.screenshot("fault").await;
    // Away from the page before its server stops, so that its stream is not cut.
    browser.goto("about:blank").await;
    run.stop();

    // The fix: the view keyed by the order's id. Deployed, then the group resubmitted.
    configure(d, "/order/id");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let run = Served::start(d, &["run", "floodway.toml", "--console", &addr], port).await;
    browser.goto(&run.url("#/faults")).await;
    browser.click("[data-resubmit-group]").await;
    let planned = browser
        .wait_for(
            "document.querySelector('[data-testid=dry-run]')?.textContent",
            "the dry run",
        )
        .await;
    assert!(
        planned
            .as_str()
            .unwrap()
            .contains(&format!("sends {missing} records")),
        "{planned}"
    );
    browser.screenshot("resubmit-dry-run").await;
    browser.click("#modal-confirm").await;
    let summary = "document.querySelector('#job-summary')";
    browser
        .wait_for(
            &format!("{summary}?.dataset.state === 'done'"),
            "the resubmission to finish",
        )
        .await;
    assert_eq!(
        browser
            .eval(&format!(
                "[{summary}.dataset.succeeded, {summary}.dataset.failed]"
            ))
            .await,
        json!([missing.to_string(), "0"])
    );
    assert_eq!(
        browser
            .eval(
                "document.querySelectorAll('[data-testid=outcome][data-outcome=succeeded]').length"
            )
            .await,
        json!(missing.min(100))
    );
    browser.screenshot("resubmit-done").await;
    browser.click("#modal-buttons [data-close]").await;
    browser
        .wait_for(
            "document.querySelector('[data-testid=no-faults]')",
            "no open faults left",
        )
        .await;
    browser.goto(&run.url("#/actions")).await;
    let audit = browser
        .wait_for(
            "document.querySelector('[data-testid=audit]')?.textContent",
            "the resubmission in the audit log",
        )
        .await;
    assert!(audit.as_str().unwrap().contains("resubmit"), "{audit}");
    // A replay of the whole log to the fixed view, from the page: every order delivered,
    // none faulted.
    browser.type_into("#replay input[name=from]", "1d").await;
    browser.click("#replay button[type=submit]").await;
    let planned = browser
        .wait_for(
            "document.querySelector('[data-testid=dry-run]')?.textContent",
            "the replay's dry run",
        )
        .await;
    assert!(
        planned.as_str().unwrap().contains("to orders-view"),
        "{planned}"
    );
    browser.click("#modal-confirm").await;
    browser
        .wait_for(
            &format!("{summary}?.dataset.state === 'done'"),
            "the replay to finish",
        )
        .await;
    let (done, failed) = (
        browser
            .eval(&format!("Number({summary}.dataset.done)"))
            .await,
        browser.eval(&format!("{summary}.dataset.failed")).await,
    );
    assert!(
        done.as_u64().unwrap() >= 3300,
        "every order replayed: {done}"
    );
    assert_eq!(failed, json!("0"));
    browser.click("#modal-buttons [data-close]").await;
    // The audit log, newest first, with the first run's actions: it outlives the process.
    let actions = "[...document.querySelectorAll('[data-testid=audit] td:nth-child(3)')].map(td => td.textContent).join(' ')";
    browser
        .wait_for(
            &format!("{actions} === 'replay resubmit resume pause'"),
            "every action in the audit log",
        )
        .await;
    browser.screenshot("actions").await;
    assert!(
        browser.errors().is_empty(),
        "the pages reported errors: {:?}",
        browser.errors()
    );
    run.stop();
    let hub = common::open_hub(d);
    for i in (0..3300).filter(|i| missing_ref(*i)) {
        let row = hub.view("orders").unwrap().get(&format!("o-{i}")).unwrap();
        assert!(
            row.is_some(),
            "order o-{i} is in the view after its resubmission"
        );
    }
}

/// The hub and faults of the scenario, processed by `floodway run`: `n` orders, of which
/// those missing a ref are open faults.
fn processed(d: &Path, n: u32) {
    configure(d, "/order/ref");
    publish(d, "orders.jsonl", &orders(0..n));
    run_until(d, "floodway.toml", || {
        common::lag(d) == Some(0) && common::open_faults(d) == faults_among(n)
    });
}

/// Every action through the API is guarded (host, CSRF, origin, confirmation, read-only),
/// checks the fault again before sending it, and is recorded with the fault and in the audit
/// log, which outlives the console.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_api_guards_and_records_every_action() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    processed(d, 100);
    let served = Served::console(d, &[]).await;
    let port = served.port;
    let (status, session) = http(port, "GET", "/api/session", &[], None).await;
    assert_eq!(status, 200, "{session}");
    assert_eq!(session["can_pause"], json!(false));
    let csrf = session["csrf"].as_str().unwrap();
    let page = [("x-floodway-csrf", csrf)];
    let post = |path: &'static str, body: Value| async move {
        http(port, "POST", path, &[("x-floodway-csrf", csrf)], Some(body)).await
    };

    // Another host name (DNS rebinding) is refused; so are actions without the page's token
    // or from another origin.
    let evil = [("host", "evil.example:80")];
    assert_eq!(http(port, "GET", "/api/faults", &evil, None).await.0, 421);
    let (_, list) = http(port, "GET", "/api/faults?status=open", &[], None).await;
    assert_eq!(list["total"], json!(faults_among(100)), "{list}");
    let (_, any) = http(port, "GET", "/api/faults?status=any", &[], None).await;
    assert_eq!(any["total"], list["total"], "{any}");
    let (status, unknown) = http(port, "GET", "/api/faults?status=all", &[], None).await;
    assert_eq!(
        status, 400,
        "a status it does not know is refused: {unknown}"
    );
    let ids: Vec<&str> = list["faults"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    let one = json!({ "ids": [ids[0], ids[0]] });
    let (status, _) = http(port, "POST", "/api/resubmit", &[], Some(one.clone())).await;
    assert_eq!(status, 403);
    let elsewhere = [page[0], ("origin", "http://evil.example")];
    let (status, _) = http(port, "POST", "/api/resubmit", &elsewhere, Some(one.clone())).await;
    assert_eq!(status, 403);

    // A standalone console does not run the processors: it cannot pause them.
    let (status, answer) = post(
        "/api/processors/orders-view/pause",
        json!({ "confirm": true }),
    )
    .await;
    assert_eq!(status, 409, "{answer}");

    // A dry run (an id given twice is sent once), then its confirmation, once. Before the fix
    // the resubmission fails, and the fault says so.
    let (status, plan) = post("/api/resubmit", one).await;
    assert_eq!(status, 200, "{plan}");
    assert_eq!(plan["send"].as_array().unwrap().len(), 1, "{plan}");
    let confirm = json!({ "confirm": plan["plan"] });
    let (status, _) = post("/api/replay", confirm.clone()).await;
    assert_eq!(status, 409, "a resubmission's plan is not a replay's");
    let (status, job) = post("/api/resubmit", confirm.clone()).await;
    assert_eq!(status, 200, "{job}");
    let (status, _) = post("/api/resubmit", confirm).await;
    assert_eq!(status, 409, "a plan is carried out once");
    let job = finished(port, &[], &job["job"]).await;
    assert_eq!(
        (job["succeeded"].clone(), job["failed"].clone()),
        (json!(0), json!(1))
    );
    let (_, fault) = http(port, "GET", &format!("/api/faults/{}", ids[0]), &[], None).await;
    assert_eq!(
        fault["resubmissions"][0]["outcome"],
        json!("failed"),
        "{fault}"
    );
    assert!(fault["event"]["order"]["id"].is_string(), "{fault}");
    assert_eq!(fault["record"]["source"], json!("hub:hub.db"), "{fault}");

    // Replay: a processor that is not there is named; a dry run counts the events; the job
    // re-delivers them all.
    let (status, answer) = post("/api/replay", json!({ "processor": "nope", "from": "1d" })).await;
    assert_eq!(status, 400);
    assert!(
        answer["error"].as_str().unwrap().contains("nope"),
        "{answer}"
    );
    let (status, plan) = post(
        "/api/replay",
        json!({ "processor": "orders-view", "from": "1d" }),
    )
    .await;
    assert_eq!(status, 200, "{plan}");
    let events = plan["events"].as_u64().unwrap();
    assert!(events >= 100, "{plan}");
    let (_, job) = post("/api/replay", json!({ "confirm": plan["plan"] })).await;
    let job = finished(port, &[], &job["job"]).await;
    assert_eq!(
        (job["state"].clone(), job["done"].clone()),
        (json!("done"), json!(events))
    );
    // The orders the view takes, the same faults again, and the rest (the fault events the
    // log holds beside them) skipped: not counted as succeeded.
    let faulted = u64::try_from(faults_among(100)).unwrap();
    assert_eq!(
        (
            job["succeeded"].clone(),
            job["failed"].clone(),
            job["skipped"].clone()
        ),
        (json!(100 - faulted), json!(faulted), json!(events - 100)),
        "{job}"
    );

    // A fault resolved between the dry run and its confirmation (here by the command, after
    // the fix) is not sent again.
    let (_, plan) = post("/api/resubmit", json!({ "ids": [ids[1]] })).await;
    let fixed = common::embedded(4, "", &common::processors("/order/id"));
    std::fs::write(d.join("fixed.toml"), fixed).unwrap();
    let out = common::floodway(d, &["faults", "resubmit", "--config", "fixed.toml"]);
    common::says(&out, "0 failed");
    let (_, job) = post("/api/resubmit", json!({ "confirm": plan["plan"] })).await;
    let job = finished(port, &[], &job["job"]).await;
    assert_eq!(
        (job["succeeded"].clone(), job["skipped"].clone()),
        (json!(0), json!(1)),
        "{job}"
    );
    assert_eq!(
        job["outcomes"][0]["detail"],
        json!("resolved since the dry run"),
        "{job}"
    );
    served.stop();

    // Read-only: everything shown, nothing done; the audit log of the console before.
    let served = Served::console(d, &["--read-only"]).await;
    let port = served.port;
    let (status, groups) = http(port, "GET", "/api/faults/groups", &[], None).await;
    assert_eq!(status, 200);
    assert_eq!(
        groups["groups"][0]["faults"],
        json!(faults_among(100)),
        "{groups}"
    );
    let (_, session) = http(port, "GET", "/api/session", &[], None).await;
    let csrf = session["csrf"].as_str().unwrap();
    let page = [("x-floodway-csrf", csrf)];
    let (status, answer) = http(
        port,
        "POST",
        "/api/resubmit",
        &page,
        Some(json!({ "ids": [ids[2]] })),
    )
    .await;
    assert_eq!(status, 403);
    assert!(
        answer["error"].as_str().unwrap().contains("read-only"),
        "{answer}"
    );
    let (_, actions) = http(port, "GET", "/api/actions", &[], None).await;
    let done: Vec<&str> = actions["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    assert_eq!(done, ["resubmit", "replay", "resubmit"], "{actions}");
    assert!(d.join("hub.db.console.jsonl").exists());
    served.stop();
}

/// Off loopback the console needs a token: it will not start without a token file, and with
/// one the API and the pages refuse whoever has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_off_loopback_is_refused_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    processed(d, 40);
    let port = free_port();
    let listen = format!("0.0.0.0:{port}");
    let out = common::floodway(
        d,
        &["console", "--config", "floodway.toml", "--listen", &listen],
    );
    assert!(!out.status.success());
    common::says(&out, "--token-file");

    std::fs::write(d.join("tokens"), "alice:0123456789abcdef-alice\n").unwrap();
    let served = Served::start(
        d,
        &[
            "console",
            "--config",
            "floodway.toml",
            "--listen",
            &listen,
            "--token-file",
            "tokens",
        ],
        port,
    )
    .await;
    let (status, _) = http(port, "GET", "/api/faults", &[], None).await;
    assert_eq!(status, 401);
    let (status, _) = http(
        port,
        "GET",
        "/api/faults",
        &[("authorization", "Bearer wrong")],
        None,
    )
    .await;
    assert_eq!(status, 401);
    let bearer = [("authorization", "Bearer 0123456789abcdef-alice")];
    let (status, session) = http(port, "GET", "/api/session", &bearer, None).await;
    assert_eq!((status, session["user"].clone()), (200, json!("alice")));
    // An action is recorded under the token's name.
    let csrf = session["csrf"].as_str().unwrap();
    let acting = [bearer[0], ("x-floodway-csrf", csrf)];
    let group = json!({ "filter": { "status": "open" } });
    let (status, plan) = http(port, "POST", "/api/resubmit", &acting, Some(group)).await;
    assert_eq!(status, 200, "{plan}");
    let confirm = json!({ "confirm": plan["plan"] });
    let (status, _) = http(port, "POST", "/api/resubmit", &acting, Some(confirm)).await;
    assert_eq!(status, 200);
    let done = poll(port, "/api/actions", &bearer, |a| {
        a["jobs"][0]["state"] == json!("done")
    })
    .await;
    assert_eq!(done["audit"][0]["who"], json!("alice"), "{done}");
    assert_eq!(done["jobs"][0]["failed"], json!(faults_among(40)), "{done}");

    // In the browser: the sign-in form; a wrong token is refused; the right one opens it.
    let mut browser = Browser::start().await;
    browser.goto(&served.url("#/faults")).await;
    browser
        .wait_for("document.querySelector('#login-token')", "the sign-in form")
        .await;
    let refused: Value = browser
        .eval("fetch('/api/faults').then(r => r.status)")
        .await;
    assert_eq!(refused, json!(401));
    browser.type_into("#login-token", "not-the-token").await;
    browser.click("#login-submit").await;
    browser
        .wait_for(
            "document.querySelector('#login-error').textContent.includes('unknown token')",
            "the wrong token refused",
        )
        .await;
    browser.screenshot("sign-in").await;
    browser
        .type_into("#login-token", "0123456789abcdef-alice")
        .await;
    browser.click("#login-submit").await;
    browser
        .wait_for(
            "document.querySelector('#who').textContent === 'alice'",
            "signed in as alice",
        )
        .await;
    browser
        .wait_for(
            &format!(
                "Number(document.querySelector('[data-testid=group]')?.dataset.open) === {}",
                faults_among(40)
            ),
            "the faults, once signed in",
        )
        .await;
    // Signing out: the sign-in page again, and nothing answers until one signs in again.
    browser.click("#sign-out").await;
    browser
        .wait_for(
            "document.querySelector('#login-token')",
            "the sign-in form again",
        )
        .await;
    let refused: Value = browser
        .eval("fetch('/api/faults').then(r => r.status)")
        .await;
    assert_eq!(refused, json!(401));
    served.stop();
}
