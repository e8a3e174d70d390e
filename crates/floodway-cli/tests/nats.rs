//! The `floodway` command with its hub on NATS JetStream (a real server on loopback): publish,
//! run, stats, tail, faults and their resubmission, replay.

use floodway_nats::testing::NatsServer;

mod common;
#[path = "common/console.rs"]
mod console;
use common::{floodway, says, text};

#[test]
fn the_command_runs_on_nats() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let url = server.url();
    common::publish_run_resubmit_replay(d, |key| {
        format!(
            "[hub]\npath = \"stores.db\"\npartitions = 4\n\n[hub.nats]\nservers = [\"{url}\"]\nstream = \"SHOP\"\nsubject = \"shop\"\n{}",
            common::processors(key)
        )
    });

    // Stats by URL, without a config file.
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

    // The console of a NATS hub: lag per partition from the consumers, faults from the
    // store, through the same contracts as the embedded hub.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let served = console::Served::console(d, &[]).await;
        let port = served.port;
        let (_, session) = console::http(port, "GET", "/api/session", &[], None).await;
        assert!(
            session["hub"]
                .as_str()
                .unwrap()
                .contains("NATS stream SHOP"),
            "{session}"
        );
        let flow = console::poll(port, "/api/flow", &[], |f| {
            f["samples"].as_array().is_some_and(|s| !s.is_empty())
        })
        .await;
        let sample = &flow["samples"][0];
        let view = sample["subscriptions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "orders-view")
            .unwrap_or_else(|| panic!("{sample}"));
        assert_eq!(view["partitions"].as_array().unwrap().len(), 4, "{view}");
        assert_eq!(view["lag"], 0, "{view}");
        let (_, groups) =
            console::http(port, "GET", "/api/faults/groups?status=resolved", &[], None).await;
        assert_eq!(
            groups["groups"][0]["cause"]["name"], "MissingKey",
            "{groups}"
        );
        served.stop();
    });

    // A server that is not there is named, with what to check.
    let out = floodway(d, &["hub", "stats", "--nats", "nats://127.0.0.1:1"]);
    assert!(!out.status.success());
    says(&out, "cannot connect to NATS at nats://127.0.0.1:1");

    // An instance replays its share of the partitions, and says so; one that reads no
    // fault events refuses to replay the fault monitor.
    let config = std::fs::read_to_string(d.join("floodway.toml")).unwrap();
    let second = config.replace(
        "subject = \"shop\"\n",
        "subject = \"shop\"\ninstance = \"1/2\"\n",
    );
    assert_ne!(second, config);
    std::fs::write(d.join("second.toml"), second).unwrap();
    let replay = |processor: &str| {
        let args = [
            "replay",
            "--config",
            "second.toml",
            "--processor",
            processor,
            "--from",
            "1d",
        ];
        floodway(d, &args)
    };
    let out = replay("orders-view");
    assert!(out.status.success(), "{}", text(&out));
    says(
        &out,
        "replaying the partitions of instance 1/2 (p % 2 == 1)",
    );
    let out = replay("faults");
    assert!(!out.status.success());
    says(&out, "instance 1/2 does not read fault events");
}

/// Rows and the outbox on NATS: the rows and the outbox live in the local store, the relay
/// publishes the changes to the stream, and a second processor counts them from there.
#[test]
fn the_outbox_publishes_to_nats() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let url = server.url();
    let config = format!(
        "[hub]\npath = \"stores.db\"\npartitions = 4\n\n[hub.nats]\nservers = [\"{url}\"]\nstream = \"ROWS\"\nsubject = \"rows\"\n{}",
        common::ORDER_ROWS_AND_CHANGES
    );
    std::fs::write(d.join("floodway.toml"), config).unwrap();
    let events = floodway::testing::generate::orders(2_000, 3);
    let lines: Vec<String> = events.iter().map(floodway::Event::to_json).collect();
    common::publish(d, "orders.jsonl", &lines);
    let mut per_order = std::collections::BTreeMap::<String, u64>::new();
    for e in events
        .iter()
        .filter(|e| e.event_type().starts_with("order-"))
    {
        *per_order.entry(e.partition_key().to_owned()).or_default() += 1;
    }
    let store = || {
        let options = floodway_embedded::HubOptions {
            create: false,
            ..Default::default()
        };
        floodway_embedded::Hub::open(d.join("stores.db"), options)
    };
    let counted = |hub: &floodway_embedded::Hub| -> Option<u64> {
        let changes = hub.rows("changes").ok()?;
        let mut total = 0;
        for (order, n) in &per_order {
            let key = floodway::rows::RowKey::new(order.clone(), "count");
            let row = changes.get(&key).ok()??;
            if row.fields["changes"] != *n {
                return None;
            }
            total += n;
        }
        Some(total)
    };
    common::run_until(d, "floodway.toml", || {
        store().ok().as_ref().and_then(counted).is_some()
    });
    let hub = store().unwrap();
    let total = counted(&hub).unwrap();
    let stats = hub.outbox().unwrap().stats().unwrap();
    assert_eq!((stats.pending(), stats.published()), (0, total));
    let out = floodway(d, &["outbox", "stats", "--config", "floodway.toml"]);
    says(&out, "rows:order_rows");
}

/// A cep processor on NATS: its sets and timers in the local store, what it emits published
/// to the stream by the relay and read back from there.
#[test]
fn control_services_run_on_nats() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let url = server.url();
    let config = format!(
        "[hub]\npath = \"stores.db\"\npartitions = 2\n\n[hub.nats]\nservers = [\"{url}\"]\nstream = \"CEP\"\nsubject = \"cep\"\n{}",
        common::order_outcomes("2s")
    );
    std::fs::write(d.join("floodway.toml"), config).unwrap();
    let now = floodway::event::now_millis();
    let n = 40;
    let mut lines = Vec::new();
    for i in 0..n {
        let e = |ty: &str, id: String, t: i64| {
            floodway::Event::builder(ty, format!("o-{i}"))
                .id(id)
                .timestamp(t)
                .build()
                .to_json()
        };
        lines.push(e("order-submitted", format!("s-{i}"), now));
        if i % 2 == 0 {
            lines.push(e("payment-captured", format!("p-{i}"), now + 100));
        }
    }
    common::publish(d, "orders.jsonl", &lines);
    let store = || {
        let options = floodway_embedded::HubOptions {
            create: false,
            ..Default::default()
        };
        floodway_embedded::Hub::open(d.join("stores.db"), options)
    };
    let outcome = |hub: &floodway_embedded::Hub, i: usize| {
        hub.rows("outcomes")
            .ok()?
            .get(&floodway::rows::RowKey::new(format!("o-{i}"), "outcome"))
            .ok()?
    };
    common::run_until(d, "floodway.toml", || {
        store()
            .ok()
            .is_some_and(|hub| (0..n).all(|i| outcome(&hub, i).is_some()))
    });
    let hub = store().unwrap();
    for i in 0..n {
        let row = outcome(&hub, i).unwrap();
        let want = if i % 2 == 0 {
            "order-ready"
        } else {
            "order-expired"
        };
        assert_eq!(row.fields["type"], want, "o-{i}");
        assert_eq!(row.fields["n"], 1, "o-{i}");
    }
}

/// A one-partition stream named after `subject` on `server`, as a relay's target, and a local
/// store (in a directory of its own) whose outbox it is.
async fn relay_setup(
    server: &NatsServer,
    subject: &str,
) -> (
    floodway::SharedHub,
    tempfile::TempDir,
    floodway_embedded::Hub,
) {
    let options = floodway_nats::NatsHubOptions {
        servers: vec![server.url()],
        stream: subject.to_uppercase(),
        subject: subject.into(),
        partitions: Some(1),
        ..Default::default()
    };
    let nats = floodway_nats::NatsHub::connect(&options).await.unwrap();
    let target: floodway::SharedHub =
        std::sync::Arc::new(floodway_nats::NatsEventHub::new(nats, Default::default()));
    let dir = tempfile::tempdir().unwrap();
    let store =
        floodway_embedded::Hub::open(dir.path().join("stores.db"), Default::default()).unwrap();
    (target, dir, store)
}

/// An event the outbox takes (up to 1 MiB) but the NATS server does not (its `max_payload`,
/// 1 MiB by default, counts the headers too): the relay fails, naming it, rather than try
/// again for ever with every later change waiting behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_fails_on_an_event_the_hub_refuses() {
    use std::time::Duration;
    let server = NatsServer::start();
    let (target, _dir, store) = relay_setup(&server, "large").await;
    let sized = |note: usize| {
        floodway::Event::builder("order-noted", "o-1")
            .id("e-1")
            .field("note", "x".repeat(note))
            .build()
    };
    // 30 bytes under the outbox's limit: over the server's with the message's headers.
    let big = sized((1 << 20) - 30 - sized(0).encoded_len());
    assert_eq!(big.encoded_len(), (1 << 20) - 30);
    let rows = store.rows("orders").unwrap().with_outbox();
    rows.transaction(|tx| {
        tx.emit(big.clone());
        Ok::<_, floodway_embedded::HubError>(())
    })
    .unwrap();
    let relay = floodway_embedded::OutboxRelay::new(&store).unwrap();
    let stopped = tokio::time::timeout(
        Duration::from_secs(30),
        relay.run(target, std::future::pending()),
    )
    .await
    .expect("the relay stops");
    let err = stopped.unwrap_err().to_string();
    assert!(err.contains("refuses") && err.contains(big.id()), "{err}");
    assert_eq!(store.outbox().unwrap().stats().unwrap().pending(), 1);
}

/// A timer that falls due while its target is down: what it emits waits in the outbox, the
/// relay tries again, and once the server is back the expiry is published, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_due_during_an_outage_of_the_target_is_published_once_it_is_back() {
    use floodway::cep::{KindRule, RuleKind, SharedRule};
    use floodway::hub::ReadOptions;
    use floodway::Source as _;
    use std::sync::Arc;
    use std::time::Duration;
    let mut server = NatsServer::start();
    let (target, _dir, store) = relay_setup(&server, "timers").await;
    let table = store.cep("orders-cep").unwrap();
    let rules: Vec<SharedRule> = vec![Arc::new(KindRule::new(
        "expired",
        RuleKind::Absence {
            first: "order-submitted".into(),
            then: None,
            within: 500,
        },
        "order-expired",
    ))];
    let now = floodway::event::now_millis();
    let placed = floodway::Event::builder("order-submitted", "o-1")
        .id("s-1")
        .timestamp(now)
        .build();
    table
        .collect(&[(vec!["o-1".to_owned()], placed)], &rules, None)
        .unwrap();
    // The target goes down before the timer is due.
    server.kill();
    let timers = floodway_embedded::CepTimers::new(&store, table.clone(), rules, None);
    let relay = floodway_embedded::OutboxRelay::new(&store).unwrap();
    let (stop_timers, timers_stopped) = tokio::sync::oneshot::channel::<()>();
    let (stop_relay, relay_stopped) = tokio::sync::oneshot::channel::<()>();
    let timers = tokio::spawn(timers.run(async move {
        let _ = timers_stopped.await;
    }));
    let relay = tokio::spawn(relay.run(target.clone(), async move {
        let _ = relay_stopped.await;
    }));
    let outbox = store.outbox().unwrap();
    // The timer fires into the outbox; the relay cannot publish it.
    let started = std::time::Instant::now();
    while outbox.pending(1).unwrap().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the timer fires"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        outbox.stats().unwrap().pending(),
        1,
        "waits while the target is down"
    );
    server.restart();
    while !outbox.pending(1).unwrap().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "published once back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_timers.send(());
    let _ = stop_relay.send(());
    assert_eq!(timers.await.unwrap().unwrap().timers_fired, 1);
    // (While the server was down its publish failed and was tried again, or waited for the
    // client to reconnect: either way it is published once.)
    let report = relay.await.unwrap().unwrap();
    assert_eq!(report.published, 1, "{report:?}");
    let read = ReadOptions {
        transient: true,
        ..ReadOptions::default()
    }
    .bounded();
    let mut sub = target.subscribe("check", read).await.unwrap();
    let mut expired = 0;
    while let Some(batch) = sub.reader.next_batch(100).await.unwrap() {
        for r in batch {
            let e = floodway::Event::decode(&r.data).unwrap();
            if e.event_type() == "order-expired" {
                expired += 1;
                assert_eq!(e.timestamp(), now + 500);
            }
        }
    }
    assert_eq!(expired, 1);
}

/// Every `order-ready` and `order-expired` event in the stream, by order: for each distinct
/// id, its type, timestamp and how many times the stream holds it.
async fn outcomes_in(
    url: &str,
    stream: &str,
    subject: &str,
) -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, (String, i64, usize)>> {
    use floodway::hub::ReadOptions;
    use floodway::Source as _;
    let options = floodway_nats::NatsHubOptions {
        servers: vec![url.to_owned()],
        stream: stream.into(),
        subject: subject.into(),
        ..Default::default()
    };
    let nats = floodway_nats::NatsHub::connect(&options).await.unwrap();
    let hub = floodway_nats::NatsEventHub::new(nats, Default::default());
    let read = ReadOptions {
        transient: true,
        ..ReadOptions::default()
    }
    .bounded();
    let mut sub = floodway::hub::EventHub::subscribe(&hub, "check", read)
        .await
        .unwrap();
    let mut out: std::collections::BTreeMap<_, std::collections::BTreeMap<_, _>> =
        Default::default();
    while let Some(batch) = sub.reader.next_batch(500).await.unwrap() {
        for r in batch {
            let e = floodway::Event::decode(&r.data).unwrap();
            if matches!(e.event_type(), "order-ready" | "order-expired") {
                out.entry(e.partition_key().to_owned())
                    .or_default()
                    .entry(e.id().to_owned())
                    .or_insert((e.event_type().to_owned(), e.timestamp(), 0))
                    .2 += 1;
            }
        }
    }
    out
}

/// A cep processor on NATS keeps working through a failover: two `floodway run` instances
/// share the partitions (pinned), the one holding them is killed with SIGKILL while timers
/// are pending and before some payments arrive, and the standby takes over. It catches up on
/// the sets from the stream, the timers (kept by the stream) fire there, and every order gets
/// exactly one outcome: ready when paid (before the kill or after), expired when not, at its
/// time.
#[test]
fn control_services_fail_over_on_nats_with_pending_timers() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let url = server.url();
    let window_ms = 8_000;
    for instance in ["a", "b"] {
        let config = format!(
            r#"[hub]
path = "{instance}.db"
partitions = 2

[hub.nats]
servers = ["{url}"]
stream = "FAILOVER"
subject = "failover"
sharing = "pinned"
pinned_ttl = "2s"
{}"#,
            common::order_cep(&format!("{window_ms}ms"))
        );
        std::fs::write(d.join(format!("{instance}.toml")), &config).unwrap();
        if instance == "a" {
            std::fs::write(d.join("floodway.toml"), &config).unwrap();
        }
    }
    let quiet = || std::process::Stdio::null();
    // A usually pins both partitions and B waits as the standby; on a loaded machine B may pin
    // one (or both) first. The test kills whichever holds more once every order is collected:
    // the other must take over its partitions and timers.
    let start = |instance: &str| {
        common::Process::start(
            d,
            &["run", &format!("{instance}.toml")],
            quiet(),
            std::process::Stdio::inherit(),
        )
    };
    let a = start("a");
    std::thread::sleep(std::time::Duration::from_millis(1_500));
    let b = start("b");
    std::thread::sleep(std::time::Duration::from_millis(500));

    let n = 40;
    let now = floodway::event::now_millis();
    let line = |ty: &str, id: String, key: usize, t: i64| {
        floodway::Event::builder(ty, format!("o-{key}"))
            .id(id)
            .timestamp(t)
            .build()
            .to_json()
    };
    // Every order, and the payments of a quarter of them, before the kill.
    let mut lines: Vec<String> = (0..n)
        .map(|i| line("order-submitted", format!("s-{i}"), i, now))
        .collect();
    lines.extend(
        (0..n)
            .filter(|i| i % 4 == 0)
            .map(|i| line("payment-captured", format!("p-{i}"), i, now + 100)),
    );
    common::publish(d, "before.jsonl", &lines);
    // The orders an instance has collected whole (and acknowledged: nothing waits for an ack
    // wait to come back).
    let collected = |instance: &str| -> Vec<bool> {
        let options = floodway_embedded::HubOptions {
            create: false,
            ..Default::default()
        };
        let table = floodway_embedded::Hub::open(d.join(format!("{instance}.db")), options)
            .ok()
            .and_then(|hub| hub.cep("orders-cep").ok());
        (0..n)
            .map(|i| {
                table.as_ref().is_some_and(|table| {
                    table.show(&format!("o-{i}")).is_ok_and(|k| {
                        let want = if i % 4 == 0 { 2 } else { 1 };
                        k.events.len() == want && k.timers.len() == 1
                    })
                })
            })
            .collect()
    };
    let started = std::time::Instant::now();
    let (held_by_a, held_by_b) = loop {
        let (in_a, in_b) = (collected("a"), collected("b"));
        if (0..n).all(|i| in_a[i] || in_b[i]) {
            let count = |held: &[bool]| held.iter().filter(|h| **h).count();
            break (count(&in_a), count(&in_b));
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "the instances collect the orders: a {in_a:?}, b {in_b:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (survivor, name) = if held_by_a >= held_by_b {
        a.kill(); // SIGKILL
        (b, "b")
    } else {
        b.kill();
        (a, "a")
    };
    // Another quarter paid after the kill, within the window: only the survivor sees these.
    let late: Vec<String> = (0..n)
        .filter(|i| i % 4 == 2)
        .map(|i| line("payment-captured", format!("p-{i}"), i, now + 200))
        .collect();
    common::publish(d, "after.jsonl", &late);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let outcomes = loop {
        let outcomes = rt.block_on(outcomes_in(&url, "FAILOVER", "failover"));
        if outcomes.len() == n || std::time::Instant::now() > deadline {
            break outcomes;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    };
    // A little longer: nothing more may come (a second outcome, a timer fired twice).
    std::thread::sleep(std::time::Duration::from_millis(1_500));
    let outcomes_after = rt.block_on(outcomes_in(&url, "FAILOVER", "failover"));
    survivor.stop();
    assert_eq!(outcomes, outcomes_after, "nothing after the last outcome");
    assert_eq!(
        outcomes.len(),
        n,
        "every order has an outcome: {outcomes:?}"
    );
    for i in 0..n {
        let of = &outcomes[&format!("o-{i}")];
        assert_eq!(of.len(), 1, "o-{i} has one outcome: {of:?}");
        let (ty, at, copies) = of.values().next().unwrap();
        assert_eq!(*copies, 1, "o-{i}'s outcome is in the stream once");
        if i % 2 == 0 {
            assert_eq!(ty, "order-ready", "o-{i}");
        } else {
            assert_eq!(ty, "order-expired", "o-{i}");
            assert_eq!(*at, now + window_ms, "o-{i} expired at its time");
        }
    }
    // The survivor caught up from the stream: it holds the sets the other collected.
    let store = floodway_embedded::Hub::open(
        d.join(format!("{name}.db")),
        floodway_embedded::HubOptions {
            create: false,
            ..Default::default()
        },
    )
    .unwrap();
    let set = store.cep("orders-cep").unwrap().show("o-2").unwrap();
    let ids: Vec<&str> = set.events.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["s-2", "p-2"]);
}
