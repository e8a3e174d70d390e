//! Rows written by update requests and the transactional outbox, through the command, with
//! real processes killed with SIGKILL between the writes and the relay.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use floodway::rows::{RowKey, RowQuery};
use floodway::Event;
use serde_json::Value;

mod common;
use common::{floodway, open_hub, says, start, text};

fn config() -> String {
    common::embedded(4, "", common::ORDER_ROWS_AND_CHANGES)
}

fn kill_after(mut child: Child, after: Duration) {
    std::thread::sleep(after);
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
}

fn outbox_stats(d: &Path) -> Value {
    let out = floodway(
        d,
        &["outbox", "stats", "--config", "floodway.toml", "--json"],
    );
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn changes_are_published_once_in_order_through_kills() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("floodway.toml"), config()).unwrap();
    let events = floodway::testing::generate::orders(6_000, 11);
    let lines: Vec<String> = events.iter().map(Event::to_json).collect();
    common::publish(d, "orders.jsonl", &lines);
    let mut per_order: BTreeMap<String, u64> = BTreeMap::new();
    for e in events
        .iter()
        .filter(|e| e.event_type().starts_with("order-"))
    {
        *per_order.entry(e.partition_key().to_owned()).or_default() += 1;
    }

    // Runs killed at random moments: between a row's transaction and the relay's publish,
    // between the publish and the outbox's delete, in the middle of the downstream count.
    let mut rng = fastrand::Rng::with_seed(5);
    for i in 0..8 {
        let run = start(d, &["run", "floodway.toml"], Stdio::null(), Stdio::null());
        let wait = if i == 0 {
            2_500
        } else {
            300 + rng.u64(..1_700)
        };
        kill_after(run, Duration::from_millis(wait));
    }
    let killed = outbox_stats(d);
    assert!(
        killed["published"].as_u64().unwrap() > 0,
        "killed runs had published: {killed}"
    );

    // A last run, until everything is through.
    let hub = open_hub(d);
    let last = start(
        d,
        &["run", "floodway.toml"],
        Stdio::null(),
        Stdio::inherit(),
    );
    let started = Instant::now();
    loop {
        let stats = hub.stats().unwrap();
        let caught_up =
            stats.subscriptions.len() == 2 && stats.subscriptions.iter().all(|s| s.lag == 0);
        let outbox = hub.outbox().unwrap().stats().unwrap();
        if caught_up && outbox.pending() == 0 && started.elapsed() > Duration::from_secs(2) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the last run catches up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    common::stop(last);

    // Every order's row counts each of its events once.
    let rows = hub.rows("order_rows").unwrap();
    let changes = hub.rows("changes").unwrap();
    let mut total = 0;
    for (order, n) in &per_order {
        let row = rows
            .get(&RowKey::new(order.clone(), "order"))
            .unwrap()
            .unwrap();
        assert_eq!(row.fields["events"], *n, "{order}");
        assert_eq!(row.discriminator.as_deref(), Some("orderrow"));
        assert!(row.expires_at.is_some());
        // Downstream, every change counted exactly once, the last one last.
        let count = changes
            .get(&RowKey::new(order.clone(), "count"))
            .unwrap()
            .unwrap();
        assert_eq!(count.fields["changes"], *n, "{order}: {count:?}");
        assert_eq!(count.fields["last"], *n, "{order}");
        total += n;
    }
    // In the log: each change once, and per order in the order the row changed.
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    let mut published = 0;
    // (Oldest first, and a partition's events in their order.)
    let logged = hub
        .newest(usize::MAX, |bytes| {
            Event::decode(bytes).is_ok_and(|e| e.event_type().starts_with("orderrow-"))
        })
        .unwrap();
    for (_, bytes) in logged {
        let e = Event::decode(&bytes).unwrap();
        published += 1;
        let n = e.fields()["raw"]["new"]["events"].as_u64().unwrap();
        let last = seen.entry(e.partition_key().to_owned()).or_default();
        assert_eq!(
            n,
            *last + 1,
            "{}: changes in order, none twice",
            e.partition_key()
        );
        *last = n;
        let kind = if n == 1 {
            "orderrow-created"
        } else {
            "orderrow-updated"
        };
        assert_eq!(e.event_type(), kind);
    }
    assert_eq!(published, total);
    let stats = outbox_stats(d);
    assert_eq!(stats["pending"], 0);
    assert!(stats["published"].as_u64().unwrap() >= total, "{stats}");

    // The command reads the rows.
    let some = per_order.keys().next().unwrap();
    let out = floodway(
        d,
        &[
            "view",
            "get",
            "--config",
            "floodway.toml",
            "order_rows",
            some,
            "order",
        ],
    );
    says(&out, "\"discriminator\": \"orderrow\"");
    let out = floodway(
        d,
        &[
            "view",
            "query",
            "--config",
            "floodway.toml",
            "changes",
            "--limit",
            "3",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
    says(&out, "the next page: --after");
    let out = floodway(d, &["view", "list", "--config", "floodway.toml"]);
    says(&out, "order_rows (rows by pk and sk)");
    let q = RowQuery::partition(some.clone(), 10);
    assert_eq!(rows.query(&q).unwrap().len(), 1);
}

/// Paging through a row table whose partition keys hold a `/`: the hint names the next page
/// in a form that cannot be misread, and following it goes on.
#[test]
fn rows_page_on_when_a_partition_key_holds_a_slash() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let hub = floodway_embedded::Hub::open(d.join("hub.db"), Default::default()).unwrap();
    let table = hub.rows("t").unwrap();
    table
        .transaction(|tx| {
            for i in 0..5 {
                let version = floodway::idempotence::Version {
                    timestamp: 1,
                    id: format!("e{i}"),
                };
                let fields = serde_json::json!({ "n": i }).as_object().unwrap().clone();
                tx.put(
                    RowKey::new("tenant/42", format!("order-{i}")),
                    version,
                    fields,
                );
            }
            Ok::<_, floodway_embedded::HubError>(())
        })
        .unwrap();
    drop((table, hub));
    let page = |after: Option<&str>| {
        let mut args = vec!["view", "query", "--hub", "hub.db", "t", "--limit", "2"];
        if let Some(after) = after {
            args.extend(["--after", after]);
        }
        let out = floodway(d, &args);
        assert!(out.status.success(), "{}", text(&out));
        text(&out)
    };
    let first = page(None);
    assert!(
        first.contains("order-0") && first.contains("order-1"),
        "{first}"
    );
    let hint = first
        .split("--after '")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .unwrap()
        .to_owned();
    assert_eq!(hint, r#"["tenant/42","order-1"]"#);
    let second = page(Some(&hint));
    assert!(
        second.contains("order-2") && second.contains("order-3"),
        "{second}"
    );
    assert!(!second.contains("order-0"), "{second}");
}

#[test]
fn an_outbox_that_feeds_itself_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let looped = config().replace(
        r#"discriminator = "orderrow""#,
        r#"discriminator = "order""#,
    );
    std::fs::write(d.join("floodway.toml"), looped).unwrap();
    let out = floodway(d, &["run", "floodway.toml"]);
    assert!(!out.status.success());
    says(
        &out,
        "its outbox publishes `order-created` events, which its types take in again",
    );
    let stray = common::embedded(
        1,
        "",
        "[[processors]]\nkind = \"materialize\"\nname = \"v\"\ntypes = [\"a\"]\nview = \"v\"\noutbox = true\n",
    );
    std::fs::write(d.join("floodway.toml"), stray).unwrap();
    let out = floodway(d, &["run", "floodway.toml"]);
    says(&out, "are settings of rows");
    let out = floodway(d, &["outbox", "stats", "--hub", "missing.db"]);
    assert!(!out.status.success());
}

/// A run whose outbox relay fails stops, and says why, rather than go on writing changes
/// that nothing publishes.
#[test]
fn a_run_whose_relay_fails_stops_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("floodway.toml"), config()).unwrap();
    let run = start(d, &["run", "floodway.toml"], Stdio::null(), Stdio::piped());
    let file = rusqlite::Connection::open(d.join("hub.db")).unwrap();
    file.busy_timeout(Duration::from_secs(10)).unwrap();
    let has_outbox = || {
        file.query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = 'outbox'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap_or(0)
            > 0
    };
    let started = Instant::now();
    while !has_outbox() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no outbox made"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The relay's storage fails under it (as a damaged or replaced file would).
    file.execute_batch("DROP TABLE outbox").unwrap();
    let stopped = Instant::now();
    let out = run.wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    says(&out, "the outbox relay stopped");
    says(&out, "stopping the processors");
    assert!(stopped.elapsed() < Duration::from_secs(30));
}

/// Events left in the outbox by a processor since taken out of the configuration (or by a
/// service's own transaction) are published by the next run, whose processors write no
/// outbox: nothing else would ever publish them.
#[test]
fn events_left_in_the_outbox_are_relayed_whatever_the_configuration() {
    use floodway::idempotence::Version;
    use floodway::rows::Update;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let hub = floodway_embedded::Hub::open(d.join("hub.db"), Default::default()).unwrap();
    let table = hub.rows("order_rows").unwrap().with_outbox();
    let updates: Vec<Update> = (0..3)
        .map(|i| {
            let version = Version {
                timestamp: i + 1,
                id: format!("e{i}"),
            };
            Update::new(RowKey::new(format!("o{i}"), "order"), version)
                .set("status", "placed")
                .discriminator("orderrow")
        })
        .collect();
    table.apply(&updates).unwrap();
    drop(table);
    drop(hub);
    let without_outbox = common::orders_view("[\"order-*\"]", "partitionKey");
    std::fs::write(
        d.join("floodway.toml"),
        common::embedded(8, "", &without_outbox),
    )
    .unwrap();
    assert_eq!(outbox_stats(d)["pending"], 3);
    let mut run = start(d, &["run", "floodway.toml"], Stdio::null(), Stdio::piped());
    let started = Instant::now();
    while outbox_stats(d)["pending"] != 0 {
        if started.elapsed() > Duration::from_secs(30) || run.try_wait().unwrap().is_some() {
            let _ = run.kill();
            let out = run.wait_with_output().unwrap();
            panic!("still pending: {}\n{}", outbox_stats(d), text(&out));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    kill_after(run, Duration::ZERO);
    let published = open_hub(d).newest(10, |bytes| {
        Event::decode(bytes).is_ok_and(|e| e.event_type() == "orderrow-created")
    });
    assert_eq!(published.unwrap().len(), 3);
}

/// A forward processor reads each order's customer row into the event on the way.
#[test]
fn forwarded_events_are_enriched_with_rows() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let customers = r#"
[[processors]]
kind = "materialize"
name = "customer-rows"
types = ["customer-*"]
view = "customers"
key = { pk = "/customer/id", sk = "customer" }
set = { tier = "/customer/tier", city = "/customer/city" }
"#;
    std::fs::write(d.join("floodway.toml"), common::embedded(2, "", customers)).unwrap();
    let events = floodway::testing::generate::orders(3_000, 21);
    let (people, orders): (Vec<&Event>, Vec<&Event>) = events
        .iter()
        .partition(|e| e.event_type().starts_with("customer-"));
    let lines: Vec<String> = people.iter().map(|e| e.to_json()).collect();
    common::publish(d, "customers.jsonl", &lines);
    let hub = open_hub(d);
    let started = Instant::now();
    common::run_until(d, "floodway.toml", || {
        let subscriptions = hub.stats().unwrap().subscriptions;
        // Up long enough to take SIGTERM cleanly.
        started.elapsed() > Duration::from_secs(1)
            && subscriptions.len() == 1
            && subscriptions[0].lag == 0
    });

    let forward = r#"
[[processors]]
kind = "forward"
name = "archive"
types = ["order-*"]
to = "archive.db"
enrich = [{ view = "customers", pk = "/order/customerId", sk = "customer", into = "customer" }]
"#;
    let config = common::embedded(2, "", &format!("{customers}{forward}"));
    std::fs::write(d.join("floodway.toml"), config).unwrap();
    let lines: Vec<String> = orders.iter().map(|e| e.to_json()).collect();
    common::publish(d, "orders.jsonl", &lines);
    let archive = || {
        let options = floodway_embedded::HubOptions {
            create: false,
            ..Default::default()
        };
        floodway_embedded::Hub::open(d.join("archive.db"), options).ok()
    };
    common::run_until(d, "floodway.toml", || {
        archive().is_some_and(|a| a.published().unwrap() as usize == orders.len())
    });
    let table = hub.rows("customers").unwrap();
    let forwarded = archive().unwrap().newest(usize::MAX, |_| true).unwrap();
    let mut enriched = 0;
    for (_, bytes) in forwarded {
        let e = Event::decode(&bytes).unwrap();
        let id = e.fields()["order"]["customerId"]
            .as_str()
            .unwrap()
            .to_owned();
        let row = table.get(&RowKey::new(id, "customer")).unwrap();
        let got = e.field("customer").unwrap();
        match row {
            Some(row) => {
                assert_eq!(got["tier"], row.fields["tier"]);
                assert_eq!(got["sk"], "customer");
                enriched += 1;
            }
            None => assert_eq!(*got, Value::Null),
        }
    }
    assert!(enriched > 0);
}
