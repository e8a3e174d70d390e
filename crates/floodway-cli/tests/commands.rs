//! The `floodway` command on a real hub file: publish, run, faults, resubmit, replay.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;
#[path = "common/console.rs"]
mod console;
use common::{
    fault_events, fault_id_of, floodway, lag, open_faults, open_hub, order_line, publish, replay,
    run_until, says, start, stop, text,
};

/// The scenario's configuration: an embedded hub of 4 partitions, the orders view keyed by
/// `key`, and the fault monitor.
fn config(key: &str) -> String {
    common::embedded(4, "", &common::processors(key))
}

/// Writes the configuration of a view keyed by `/order/ref`, changed by `edit`.
fn configure(d: &Path, edit: impl Fn(String) -> String) -> String {
    let config = edit(config("/order/ref"));
    std::fs::write(d.join("floodway.toml"), &config).unwrap();
    config
}

/// `n` order lines, with `fields` in each; order `missing` lacks its `ref`.
fn orders(n: u32, missing: u32, fields: &str) -> Vec<String> {
    (0..n)
        .map(|i| {
            let order = if i == missing {
                format!(r#"{{"id":"o-{i}"}}"#)
            } else {
                format!(r#"{{"id":"o-{i}","ref":"r-{i}"}}"#)
            };
            order_line(i, "submitted", i.into(), i, fields, &order)
        })
        .collect()
}

/// `n` order lines, none with a `ref` (each a fault for the view keyed by the ref).
fn refless_orders(n: u32) -> Vec<String> {
    (0..n)
        .map(|i| {
            order_line(
                i,
                "submitted",
                i.into(),
                i,
                "",
                &format!(r#"{{"id":"o-{i}"}}"#),
            )
        })
        .collect()
}

/// Publishes `lines` as `orders.jsonl` and runs until every event is read and `faults`
/// faults are open.
fn publish_and_run(d: &Path, lines: &[String], faults: usize) {
    publish(d, "orders.jsonl", lines);
    run_until(d, "floodway.toml", || {
        lag(d) == Some(0) && open_faults(d) == faults
    });
}

/// Resubmits the open faults; the command must say `said`.
fn resubmit(d: &Path, said: &str) {
    let out = floodway(d, &["faults", "resubmit", "--config", "floodway.toml"]);
    says(&out, said);
}

/// The view keyed by the order id: the fix of a view keyed by a ref that some orders lack.
fn fixed(config: &str) -> String {
    config.replace(r#"key = "/order/ref""#, r#"key = "/order/id""#)
}

#[test]
fn the_command_publishes_runs_faults_resubmits_and_replays() {
    let dir = tempfile::tempdir().unwrap();
    common::publish_run_resubmit_replay(dir.path(), config);
}

#[test]
fn a_fault_raised_again_after_its_resolution_is_open_again_within_the_dedupe_window() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = configure(d, |c| c);
    publish_and_run(d, &orders(5, 2, ""), 1);
    let id = fault_id_of(d, "MissingKey");
    let show = || {
        text(&floodway(
            d,
            &["faults", "show", "--config", "floodway.toml", &id],
        ))
    };

    // A fix that resolves it...
    std::fs::write(d.join("floodway.toml"), fixed(&config)).unwrap();
    resubmit(d, "1 succeeded, 0 failed");
    assert!(
        show().contains("status     resolved (seen 1 times"),
        "{}",
        show()
    );

    // ...then the old code again, and a replay of the record seconds later: well inside the
    // hub's dedupe window, the fault is raised again, reaches the store and is open again.
    std::fs::write(d.join("floodway.toml"), &config).unwrap();
    replay(d);
    run_until(d, "floodway.toml", || open_faults(d) == 1);
    let shown = show();
    assert!(shown.contains("status     open (seen 2 times"), "{shown}");
}

#[test]
fn a_redacted_field_appears_nowhere_in_a_fault_and_resubmission_still_works() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = configure(d, |c| {
        c.replace(
            r#"value = "/order""#,
            "value = \"/order\"\nredact = [\"customer.email\"]",
        )
    });
    let email = "ann.lee@example.com";
    let customer = format!(r#""customer":{{"email":"{email}","name":"Ann"}},"#);
    publish_and_run(d, &orders(4, 1, &customer), 1);

    // Neither the stored fault nor the fault event in the hub holds the address.
    let hub = open_hub(d);
    let stored = hub
        .fault_store()
        .unwrap()
        .list(&floodway_embedded::FaultFilter::default())
        .unwrap();
    assert_eq!(stored.len(), 1);
    let fault_text = stored[0].fault.to_json();
    assert!(!fault_text.contains(email), "{fault_text}");
    assert!(fault_text.contains("[REDACTED]"), "{fault_text}");
    let published = fault_events(&hub, 100);
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
    // Nor does the console's page of it.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let served = console::Served::console(d, &[]).await;
        let port = served.port;
        let (status, page) =
            console::http(port, "GET", &format!("/api/faults/{id}"), &[], None).await;
        assert_eq!(status, 200, "{page}");
        let page = page.to_string();
        assert!(!page.contains(email), "{page}");
        assert!(page.contains("[REDACTED]"), "{page}");
        assert!(page.contains(r#""redacted":true"#), "{page}");
        served.stop();
    });

    // After the fix, resubmission reads the record back from the hub by position.
    std::fs::write(d.join("floodway.toml"), fixed(&config)).unwrap();
    resubmit(d, "1 succeeded, 0 failed");
    let hub = open_hub(d);
    let row = hub.view("orders").unwrap().get("o-1").unwrap();
    assert!(row.is_some(), "the resubmitted order is in the view");
}

#[test]
fn mistakes_get_errors_that_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = floodway(d, &["hub", "stats", "--hub", "missing.db"]);
    assert!(!out.status.success());
    says(&out, "no hub at missing.db");
    assert!(!text(&out).contains("backtrace"), "{}", text(&out));
    let bad = config("/order/ref").replace("view = ", "veiw = ");
    std::fs::write(d.join("bad.toml"), bad).unwrap();
    let out = floodway(d, &["run", "bad.toml"]);
    says(&out, "unknown field `veiw`");
    std::fs::write(
        d.join("foreign.db"),
        b"this is not a database at all, not even close",
    )
    .unwrap();
    let out = floodway(d, &["hub", "tail", "--hub", "foreign.db"]);
    says(&out, "is not a Floodway hub");
    let out = floodway(
        d,
        &["faults", "list", "--hub", "x.db", "--since", "last tuesday"],
    );
    assert!(!out.status.success());
    // A time without its zone names no moment: refused, not read as UTC.
    let out = floodway(
        d,
        &[
            "faults",
            "list",
            "--hub",
            "x.db",
            "--since",
            "2026-11-26 10:00:00",
        ],
    );
    says(&out, "has no zone");
    // A processor named wrong matches no fault: said, not reported as nothing to do.
    configure(d, |c| c);
    let out = floodway(
        d,
        &[
            "faults",
            "resubmit",
            "--config",
            "floodway.toml",
            "--processor",
            "ordres",
        ],
    );
    says(&out, "no processor `ordres`");
    let out = floodway(
        d,
        &[
            "faults",
            "resubmit",
            "--config",
            "floodway.toml",
            "--rate",
            "0",
        ],
    );
    assert!(!out.status.success());
}

#[test]
fn run_serves_prometheus_metrics() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    configure(d, |c| c);
    let lines: Vec<String> = (0..20)
        .map(|i| order_line(i, "submitted", i, i, "", &format!(r#"{{"ref":"r-{i}"}}"#)))
        .collect();
    publish(d, "orders.jsonl", &lines);
    // A free port: bind, read it, let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let run = ["run", "floodway.toml", "--metrics", &addr];
    let child = start(d, &run, Stdio::inherit(), Stdio::inherit());
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
    stop(child);
    assert!(body.contains("processor=\"orders-view\""), "{body}");
    assert!(body.contains("floodway_in_flight"), "{body}");
}

#[test]
fn faults_raised_by_aws_lambda_stream_are_stored_and_shown_beside_floodways() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    configure(d, |c| c);
    // Fault events as an aws-lambda-stream function publishes them (run by Node), in the
    // same hub as Floodway's own.
    let events = serde_json::json!({ "events": [
        { "id": "e1", "type": "thing-created", "timestamp": 1, "partitionKey": "k1", "thing": { "n": 1 } },
        { "id": "e2", "type": "thing-created", "timestamp": 2, "partitionKey": "k2", "thing": { "n": 2 } },
    ] });
    let als = floodway_lambda::testing::run_script("faults.js", &events);
    let raised: Vec<String> = als["faults"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.to_string())
        .collect();
    assert_eq!(raised.len(), 2);
    publish(d, "als-faults.jsonl", &raised);
    let als_faults = || {
        let listed = text(&floodway(
            d,
            &["faults", "list", "--config", "floodway.toml"],
        ));
        listed
            .lines()
            .filter(|l| l.contains("svc-a-dev-listener/p1") && l.contains("open"))
            .count()
    };
    // One Floodway fault, and the two of aws-lambda-stream.
    publish(d, "orders.jsonl", &orders(5, 2, ""));
    run_until(d, "floodway.toml", || {
        lag(d) == Some(0) && open_faults(d) == 1 && als_faults() == 2
    });

    let listed = text(&floodway(
        d,
        &["faults", "list", "--config", "floodway.toml"],
    ));
    assert!(listed.contains("svc-a-dev-listener"), "{listed}");
    assert!(listed.contains("orders-view"), "{listed}");
    let id = fault_id_of(d, "svc-a-dev-listener");
    let shown = text(&floodway(
        d,
        &["faults", "show", "--config", "floodway.toml", &id],
    ));
    // The error, the pipeline, and the record as the function read it (the Kinesis data,
    // decoded).
    assert!(shown.contains("boom e"), "{shown}");
    assert!(shown.contains("p1"), "{shown}");
    assert!(shown.contains("kinesis:unknown"), "{shown}");
    assert!(shown.contains(r#""type":"thing-created""#), "{shown}");
    // Raised again (the records retried and failed again), they are the same faults, seen
    // twice.
    let again: Vec<String> = raised
        .iter()
        .map(|f| f.replacen(r#""id":""#, r#""id":"again-"#, 1))
        .collect();
    publish(d, "again.jsonl", &again);
    run_until(d, "floodway.toml", || lag(d) == Some(0));
    assert_eq!(als_faults(), 2);
    let shown = text(&floodway(
        d,
        &["faults", "show", "--config", "floodway.toml", &id],
    ));
    assert!(shown.contains("seen 2 times"), "{shown}");
}

/// Writes `floodway.key` in `d`: the data key `[encryption] key_file` names.
fn write_key_file(d: &Path) {
    std::fs::write(
        d.join("floodway.key"),
        "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n",
    )
    .unwrap();
}

#[test]
fn fields_are_encrypted_on_the_way_to_another_hub_and_decrypted_into_a_view_there() {
    use floodway_embedded::{Hub, HubOptions};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_key_file(d);
    let encryption = "[encryption]\nkey_file = \"floodway.key\"\n";
    std::fs::write(
        d.join("floodway.toml"),
        format!(
            "[hub]\npath = \"hub.db\"\npartitions = 2\n{encryption}\n[[processors]]\nkind = \"forward\"\nname = \"archive\"\ntypes = [\"customer-*\"]\nto = \"archive.db\"\nencrypt = [\"email\"]\n"
        ),
    )
    .unwrap();
    let lines: Vec<String> = (0..6)
        .map(|i| {
            format!(
                r#"{{"id":"c-{i}","type":"customer-created","timestamp":{i},"partitionKey":"c-{i}","customer":{{"name":"N{i}","email":"n{i}@example.com"}}}}"#
            )
        })
        .collect();
    publish(d, "customers.jsonl", &lines);
    let archive = || {
        Hub::open(
            d.join("archive.db"),
            HubOptions {
                create: false,
                ..HubOptions::default()
            },
        )
        .ok()
    };
    let archived = || {
        archive().map_or(Vec::new(), |hub| {
            hub.newest(100, |_| true)
                .unwrap()
                .into_iter()
                .map(|(_, bytes)| String::from_utf8(bytes).unwrap())
                .collect()
        })
    };
    run_until(d, "floodway.toml", || archived().len() == 6);
    for event in archived() {
        assert!(!event.contains("@example.com"), "{event}");
        assert!(event.contains(r#""eem":{"#), "{event}");
    }

    // The archive's own processors read the fields in the clear with the same key.
    let view = "[[processors]]\nkind = \"materialize\"\nname = \"customers\"\ntypes = [\"customer-*\"]\nview = \"customers\"\nvalue = \"/customer\"\ndecrypt = true\n";
    std::fs::write(
        d.join("archive.toml"),
        format!("[hub]\npath = \"archive.db\"\n{encryption}\n{view}"),
    )
    .unwrap();
    let rows = || {
        archive()
            .and_then(|hub| hub.view("customers").ok())
            .and_then(|v| v.rows().ok())
            .unwrap_or_default()
    };
    run_until(d, "archive.toml", || rows().len() == 6);
    let emails: Vec<String> = rows()
        .iter()
        .map(|r| r.value["email"].as_str().unwrap().to_owned())
        .collect();
    assert!(emails.contains(&"n3@example.com".to_owned()), "{emails:?}");

    // Without keys, decryption is refused at start, and says what to add.
    std::fs::write(
        d.join("nokeys.toml"),
        format!("[hub]\npath = \"archive.db\"\n{view}"),
    )
    .unwrap();
    let out = floodway(d, &["run", "nokeys.toml"]);
    assert!(!out.status.success());
    says(&out, "`decrypt` needs keys: add `[encryption] key_file");
}

/// A dry run of `faults resubmit` builds none of the processors it would send to: a forward
/// processor's hub file is not created by it.
#[test]
fn a_dry_run_resubmission_builds_no_processor() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_key_file(d);
    let forward = "[encryption]\nkey_file = \"floodway.key\"\n\n[[processors]]\nkind = \"forward\"\nname = \"archive\"\ntypes = [\"customer-*\"]\nto = \"archive.db\"\nencrypt = [\"email\"]\n";
    std::fs::write(
        d.join("floodway.toml"),
        common::embedded(2, forward, common::FAULT_MONITOR),
    )
    .unwrap();
    // An email that does not read (a lone surrogate) cannot be encrypted: a fault of `archive`.
    let lines = [
        r#"{"id":"c-1","type":"customer-created","timestamp":1,"partitionKey":"c-1","customer":{"email":"\ud800"}}"#.to_owned(),
    ];
    publish(d, "customers.jsonl", &lines);
    let faulted = || {
        let out = floodway(d, &["faults", "list", "--config", "floodway.toml"]);
        text(&out).contains("archive/archive/encrypt: UnreadablePayload")
    };
    run_until(d, "floodway.toml", faulted);
    std::fs::remove_file(d.join("archive.db")).unwrap();

    let out = floodway(
        d,
        &[
            "faults",
            "resubmit",
            "--config",
            "floodway.toml",
            "--dry-run",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    says(&out, "would resubmit");
    assert!(
        !d.join("archive.db").exists(),
        "the dry run made the forward processor's hub"
    );
}

/// `hub publish` streams its input: a file of several chunks is stored whole, a bad line is
/// reported by its number; `--atomic` stores nothing when a line is bad, from a file or from
/// standard input.
#[test]
fn publish_streams_its_input_and_atomic_is_all_or_nothing_from_a_file_or_standard_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut lines = refless_orders(2_500);
    lines[2_399] = "{not an event".into();
    // And a line that is not even UTF-8: one more line that is not an event, not the end of
    // the input (before, it stopped the publish and dropped the lines read with it).
    let mut file = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        match i {
            1_499 => file.extend_from_slice(b"{\"id\":\"\xff\"}"),
            _ => file.extend_from_slice(line.as_bytes()),
        }
        file.push(b'\n');
    }
    std::fs::write(d.join("orders.jsonl"), file).unwrap();
    let count = |d: &Path| {
        let out = floodway(d, &["hub", "stats", "--hub", "hub.db"]);
        text(&out)
            .lines()
            .find_map(|l| l.trim().strip_prefix("all")?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };

    let out = floodway(
        d,
        &[
            "hub",
            "publish",
            "--hub",
            "hub.db",
            "--atomic",
            "orders.jsonl",
        ],
    );
    assert!(!out.status.success());
    says(&out, "line 2400: event is not valid JSON");
    says(&out, "line 1500: ");
    says(
        &out,
        "2 of 2500 lines are not events; nothing was published",
    );
    assert_eq!(count(d), 0, "nothing stored from the file");

    let stdin = std::process::Command::new(env!("CARGO_BIN_EXE_floodway"))
        .current_dir(d)
        .args(["hub", "publish", "--hub", "hub.db", "--atomic", "-"])
        .stdin(std::fs::File::open(d.join("orders.jsonl")).unwrap())
        .output()
        .unwrap();
    assert!(!stdin.status.success());
    says(&stdin, "nothing was published");
    assert_eq!(count(d), 0, "nothing stored from standard input");

    let out = floodway(d, &["hub", "publish", "--hub", "hub.db", "orders.jsonl"]);
    assert!(!out.status.success(), "a rejected line fails the command");
    says(&out, "line 2400: event is not valid JSON");
    says(&out, "line 1500: ");
    says(&out, "published 2498 events");
    says(&out, "2 lines rejected");
    assert_eq!(count(d), 2_498);

    // Output that cannot be written (a full disk) fails the command.
    let full = std::process::Command::new(env!("CARGO_BIN_EXE_floodway"))
        .current_dir(d)
        .args(["hub", "stats", "--hub", "hub.db"])
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    assert!(!full.status.success());
    says(&full, "cannot write the output");
}

/// A publish interrupted midway says the line the events stored go through, and
/// `--from-line` goes on from the next: every event stored once, with deduplication off.
#[test]
fn an_interrupted_publish_says_where_to_go_on_from() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lines: Vec<String> = (0..2_500u32)
        .map(|i| order_line(i, "submitted", i.into(), i, "", r#"{"id":"o"}"#))
        .collect();
    let count = || {
        let out = floodway(d, &["hub", "stats", "--hub", "hub.db"]);
        text(&out)
            .lines()
            .find_map(|l| l.trim().strip_prefix("all")?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Standard input held open after 1,500 lines: the first chunk (1,000) is stored, and
    // the publish waits for more when it is interrupted.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_floodway"))
        .current_dir(d)
        .args(["hub", "publish", "--hub", "hub.db", "--no-dedupe", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for line in &lines[..1_500] {
        writeln!(stdin, "{line}").unwrap();
    }
    stdin.flush().unwrap();
    let started = std::time::Instant::now();
    while count() < 1_000 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "nothing stored"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    common::signal(&child, "-INT");
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    assert!(!out.status.success(), "{}", text(&out));
    says(&out, "interrupted: 1000 events stored");
    says(&out, "through line 1000; go on with --from-line 1001");
    std::fs::write(d.join("orders.jsonl"), lines.join("\n")).unwrap();
    let out = floodway(
        d,
        &[
            "hub",
            "publish",
            "--hub",
            "hub.db",
            "--no-dedupe",
            "--from-line",
            "1001",
            "orders.jsonl",
        ],
    );
    says(&out, "published 1500 events");
    assert_eq!(count(), 2_500, "every event once");
    let out = floodway(
        d,
        &[
            "hub",
            "publish",
            "--hub",
            "hub.db",
            "--from-line",
            "9999",
            "orders.jsonl",
        ],
    );
    says(&out, "the input has 2500 lines, none from line 9999");
}

/// Turns the hub `hub.db` in `d` back into what an earlier build made (format version 2):
/// its views in the hub file, no views file.
fn as_made_before(d: &Path) {
    let hub = rusqlite::Connection::open(d.join("hub.db")).unwrap();
    let views = d.join("hub.db-views");
    hub.execute("ATTACH DATABASE ?1 AS views", [views.to_str().unwrap()])
        .unwrap();
    let tables: Vec<(String, String)> = {
        let mut statement = hub
            .prepare("SELECT name, sql FROM views.sqlite_master WHERE name LIKE 'view_%'")
            .unwrap();
        let rows = statement
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap();
        rows.map(Result::unwrap).collect()
    };
    assert!(!tables.is_empty(), "the run made its view");
    for (table, create) in tables {
        hub.execute_batch(&create).unwrap();
        hub.execute_batch(&format!(
            "INSERT INTO main.{table} SELECT * FROM views.{table}"
        ))
        .unwrap();
    }
    hub.execute_batch(
        "DETACH DATABASE views; \
         DELETE FROM floodway_meta WHERE key = 'views_file'; \
         UPDATE floodway_meta SET value = '2' WHERE key = 'version';",
    )
    .unwrap();
    drop(hub);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(d.join(format!("hub.db-views{suffix}")));
    }
}

/// The keys in the view `orders`.
fn order_keys(d: &Path) -> usize {
    open_hub(d).view("orders").unwrap().rows().unwrap().len()
}

#[test]
fn upgrade_moves_an_earlier_hubs_views_into_their_own_file_once_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    configure(d, |c| fixed(&c));
    publish_and_run(d, &orders(10, 99, ""), 0);
    as_made_before(d);
    assert_eq!(open_hub(d).views_path(), d.join("hub.db"));
    assert_eq!(order_keys(d), 10);
    let stats = floodway(d, &["hub", "stats", "--config", "floodway.toml"]);
    says(&stats, "`floodway hub upgrade` moves them");

    // Refused while a processor runs on the hub: it would go on writing into the hub file.
    // (Once it has materialized what is published after it started, it holds its leases.)
    let running = common::Process::start(
        d,
        &["run", "floodway.toml"],
        Stdio::null(),
        Stdio::inherit(),
    );
    publish(d, "more.jsonl", &orders(15, 99, "")[10..]);
    let started = Instant::now();
    while order_keys(d) < 15 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the run did not materialize"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let refused = floodway(d, &["hub", "upgrade", "--config", "floodway.toml"]);
    assert!(!refused.status.success(), "{}", text(&refused));
    says(&refused, "stop the processes using the hub");
    running.stop();
    assert_eq!(open_hub(d).views_path(), d.join("hub.db"));
    let before = open_hub(d).view("orders").unwrap().rows().unwrap();

    let out = floodway(d, &["hub", "upgrade", "--config", "floodway.toml"]);
    assert!(out.status.success(), "{}", text(&out));
    says(&out, "copied view `orders`: 15 rows");
    says(&out, "moved 1 view(s)");
    assert_eq!(open_hub(d).views_path(), d.join("hub.db-views"));
    // Every row as it was, its version with it; none left in the hub file.
    assert_eq!(open_hub(d).view("orders").unwrap().rows().unwrap(), before);
    let hub = rusqlite::Connection::open(d.join("hub.db")).unwrap();
    let left: i64 = hub
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name LIKE 'view_%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(left, 0);

    // The processors go on from where they were, into the views file.
    publish(d, "last.jsonl", &orders(20, 99, "")[15..]);
    run_until(d, "floodway.toml", || {
        lag(d) == Some(0) && order_keys(d) == 20
    });
    let out = floodway(d, &["hub", "upgrade", "--config", "floodway.toml"]);
    assert!(out.status.success(), "{}", text(&out));
    says(&out, "nothing to do");
    let stats = floodway(d, &["hub", "stats", "--config", "floodway.toml"]);
    assert!(!text(&stats).contains("hub upgrade"), "{}", text(&stats));

    // A NATS hub's processors leave no leases in the file: stopped or not, it takes --force.
    let nats = "[hub]\npath = \"hub.db\"\npartitions = 4\n\n[hub.nats]\nservers = \
                [\"nats://127.0.0.1:1\"]\n";
    std::fs::write(d.join("nats.toml"), nats).unwrap();
    let out = floodway(d, &["hub", "upgrade", "--config", "nats.toml"]);
    assert!(!out.status.success(), "{}", text(&out));
    says(&out, "floodway hub upgrade --force");
    let out = floodway(d, &["hub", "upgrade", "--config", "nats.toml", "--force"]);
    assert!(out.status.success(), "{}", text(&out));
    says(&out, "nothing to do");
}

/// A fault's message quotes its event's id, which can hold any character: printed, its
/// control characters are escaped, never sent to the terminal to obey.
#[test]
fn what_a_fault_quotes_is_printed_without_its_control_characters() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    configure(d, |c| c);
    let mut lines = orders(3, 1, "");
    lines[1] = lines[1].replace(r#""id":"e-1""#, r#""id":"e-1\u001b]0;pwned\u0007""#);
    publish_and_run(d, &lines, 1);
    let listed = floodway(d, &["faults", "list", "--config", "floodway.toml"]);
    let listed = text(&listed);
    assert!(listed.contains(r"e-1\u001b]0;pwned\u0007"), "{listed}");
    let id = listed
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let shown = floodway(d, &["faults", "show", "--config", "floodway.toml", id]);
    for out in [listed.as_bytes(), &shown.stdout] {
        let controls: Vec<u8> = out
            .iter()
            .copied()
            .filter(|b| *b < 0x20 && *b != b'\n' && *b != b'\t')
            .collect();
        assert!(controls.is_empty(), "{controls:?}");
    }
}

/// `n` orders without a ref published and run into `n` faults, then the configuration fixed
/// (the view keyed by the order id): every fault ready to be resubmitted.
fn faults_then_fix(d: &Path, n: u32) {
    let config = configure(d, |c| c);
    publish_and_run(d, &refless_orders(n), n as usize);
    std::fs::write(d.join("floodway.toml"), fixed(&config)).unwrap();
}

/// `faults resubmit` interrupted finishes the fault it is sending and records it, says how
/// many it resubmitted, and leaves the rest open: what it says is what the store holds.
#[test]
fn an_interrupted_resubmission_records_what_it_did_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Forty orders without a ref: forty faults, resubmitted at five a second.
    faults_then_fix(d, 40);
    let child = common::start(
        d,
        &[
            "faults",
            "resubmit",
            "--config",
            "floodway.toml",
            "--rate",
            "5",
        ],
        Stdio::piped(),
        Stdio::piped(),
    );
    std::thread::sleep(Duration::from_millis(1_500));
    common::signal(&child, "-INT");
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let said = text(&out);
    let done: usize = said
        .split("interrupted: stopped after ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{said}"));
    assert!((1..40).contains(&done), "{said}");
    assert_eq!(open_faults(d), 40 - done, "{said}");
}

/// Two `faults resubmit` at once over the same faults: each fault is claimed by one of them,
/// resubmitted once and recorded once; the other skips it and says so.
#[test]
fn two_resubmissions_at_once_send_each_fault_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    faults_then_fix(d, 12);
    let args = [
        "faults",
        "resubmit",
        "--config",
        "floodway.toml",
        "--rate",
        "20",
    ];
    let (a, b) = (
        common::start(d, &args, Stdio::piped(), Stdio::piped()),
        common::start(d, &args, Stdio::piped(), Stdio::piped()),
    );
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let said = format!("{}\n{}", text(&a), text(&b));
    assert!(a.status.success() && b.status.success(), "{said}");
    let succeeded: u64 = [&a, &b]
        .iter()
        .map(|out| {
            text(out)
                .split("resubmitted: ")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{said}"))
        })
        .sum();
    assert_eq!(succeeded, 12, "{said}");
    let store = open_hub(d).fault_store().unwrap();
    for fault in store.list(&Default::default()).unwrap() {
        let history = store.resubmissions(&fault.id).unwrap();
        assert_eq!(history.len(), 1, "fault {}: {history:?}\n{said}", fault.id);
    }
    assert_eq!(open_faults(d), 0);
}
