//! Rows and the outbox: `cargo bench -p floodway-embedded --bench rows`.
//!
//! Update requests applied to a row table in batched transactions, against the same
//! read-modify-write done by hand on raw SQLite (read the row, set its fields in a JSON map,
//! write it back, record the event in an inbox: the work without Floodway's versions, change
//! events or outbox); the same with the outbox on; and the outbox relay publishing the
//! changes, against publishing the same events to the hub directly. Medians of three runs.

use std::time::Instant;

use floodway::idempotence::Version;
use floodway::rows::{RowKey, Update};
use floodway::testing::generate;
use floodway::Event;
use floodway_embedded::{Hub, HubOptions, OutboxRelay};
use serde_json::{Map, Value};

/// The allocator the `floodway` command uses (and BENCHMARKS.md recommends for services).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../../floodway/benches/common/mod.rs"]
#[macro_use]
mod common;

/// Updates per transaction.
const BATCH: usize = 5_000;

/// Each order event as an update of its order's row: status and channel set, events counted.
fn updates(events: &[Event]) -> Vec<Update> {
    events
        .iter()
        .filter(|e| e.event_type().starts_with("order-"))
        .map(|e| {
            let order = &e.fields()["order"];
            Update::new(RowKey::new(e.partition_key(), "order"), Version::of(e))
                .set("status", order["status"].clone())
                .set("channel", order["channel"].clone())
                .add("events", 1)
                .discriminator("order")
        })
        .collect()
}

/// The same work by hand: per update, read the row's fields, set and add them in a JSON map,
/// write the row back and the event id into an inbox; `BATCH` per transaction.
fn raw_sqlite(path: &std::path::Path, updates: &[Update]) -> f64 {
    let mut conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
         CREATE TABLE rows (pk TEXT NOT NULL, sk TEXT NOT NULL, fields TEXT NOT NULL,
           PRIMARY KEY (pk, sk)) WITHOUT ROWID;
         CREATE TABLE inbox (event TEXT PRIMARY KEY) WITHOUT ROWID;",
    )
    .unwrap();
    let started = Instant::now();
    for chunk in updates.chunks(BATCH) {
        let tx = conn.transaction().unwrap();
        {
            let mut read = tx
                .prepare_cached("SELECT fields FROM rows WHERE pk = ?1 AND sk = ?2")
                .unwrap();
            let mut write = tx
                .prepare_cached("INSERT OR REPLACE INTO rows VALUES (?1, ?2, ?3)")
                .unwrap();
            let mut inbox = tx
                .prepare_cached("INSERT OR IGNORE INTO inbox VALUES (?1)")
                .unwrap();
            for u in chunk {
                if inbox.execute([&u.version.id]).unwrap() == 0 {
                    continue;
                }
                let fields: Option<String> =
                    read.query_row((&u.key.pk, &u.key.sk), |r| r.get(0)).ok();
                let mut map: Map<String, Value> = fields
                    .map(|f| serde_json::from_str(&f).unwrap())
                    .unwrap_or_default();
                for (f, v) in &u.set {
                    map.insert(f.clone(), v.clone());
                }
                for (f, n) in &u.add {
                    let sum = map.get(f).and_then(Value::as_i64).unwrap_or(0) + n.as_i64().unwrap();
                    map.insert(f.clone(), sum.into());
                }
                write
                    .execute((&u.key.pk, &u.key.sk, Value::Object(map).to_string()))
                    .unwrap();
            }
        }
        tx.commit().unwrap();
    }
    updates.len() as f64 / started.elapsed().as_secs_f64()
}

/// Floodway's row table, `BATCH` updates per transaction.
fn floodway_rows(path: &std::path::Path, updates: &[Update], outbox: bool) -> (f64, Hub) {
    let hub = Hub::open(path, HubOptions::default()).unwrap();
    let mut table = hub.rows("orders").unwrap();
    if outbox {
        table = table.with_outbox();
    }
    let started = Instant::now();
    for chunk in updates.chunks(BATCH) {
        table.apply(chunk).unwrap();
    }
    (updates.len() as f64 / started.elapsed().as_secs_f64(), hub)
}

fn main() {
    let n = common::events_wanted(200_000);
    let rt = common::two_workers();
    eprintln!("generating {n} events...");
    let events = generate::orders(n, 9);
    let updates = updates(&events);
    let u = updates.len();
    let tmp = tempfile::tempdir_in(".").unwrap();
    out!("| measurement | result | baseline | ratio | goal |");
    out!("|---|---|---|---|---|");
    let (mut raw, mut rows, mut outboxed, mut relayed, mut direct) =
        (vec![], vec![], vec![], vec![], vec![]);
    for run in 0..3 {
        eprintln!("run {}: raw SQLite read-modify-write...", run + 1);
        raw.push(raw_sqlite(
            &tmp.path().join(format!("raw-{run}.db")),
            &updates,
        ));
        eprintln!("run {}: row table...", run + 1);
        rows.push(floodway_rows(&tmp.path().join(format!("rows-{run}.db")), &updates, false).0);
        eprintln!("run {}: row table with the outbox...", run + 1);
        let (rate, hub) =
            floodway_rows(&tmp.path().join(format!("outbox-{run}.db")), &updates, true);
        outboxed.push(rate);
        let pending = hub.outbox().unwrap().stats().unwrap().pending() as usize;
        assert_eq!(pending, u, "every update changed its row");
        // The changes as they are in the outbox, published straight to another hub: the
        // reference for the relay.
        let changes: Vec<Event> = hub
            .outbox()
            .unwrap()
            .pending(usize::MAX)
            .unwrap()
            .into_iter()
            .map(|p| p.event)
            .collect();
        eprintln!("run {}: relay...", run + 1);
        let shared: floodway::SharedHub = std::sync::Arc::new(hub.clone());
        let relay = OutboxRelay::new(&hub).unwrap();
        let started = Instant::now();
        rt.block_on(async {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(relay.run(shared, async move {
                let _ = stopped.await;
            }));
            let outbox = hub.outbox().unwrap();
            while !outbox.pending(1).unwrap().is_empty() {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            let _ = stop.send(());
            task.await.unwrap().unwrap();
        });
        relayed.push(u as f64 / started.elapsed().as_secs_f64());
        let other = Hub::open(
            tmp.path().join(format!("direct-{run}.db")),
            HubOptions::default(),
        )
        .unwrap();
        let started = Instant::now();
        rt.block_on(async {
            for chunk in changes.chunks(500) {
                other.publish_idempotent(chunk).await.unwrap();
            }
        });
        direct.push(u as f64 / started.elapsed().as_secs_f64());
    }
    let (raw, rows, outboxed, relayed, direct) = (
        common::median(raw),
        common::median(rows),
        common::median(outboxed),
        common::median(relayed),
        common::median(direct),
    );
    let line = |name: &str, value: f64, baseline: f64, of: &str, goal: &str| {
        out!(
            "| {name} | {value:.0} updates/s | {baseline:.0} {of} | {:.2} | {goal} |",
            value / baseline
        );
    };
    out!(
        "| raw SQLite read-modify-write of the same rows, inbox, {BATCH} per commit (baseline) | {raw:.0} updates/s | - | 1.00 | - |"
    );
    line(
        &format!("{u} update requests (set 2 fields, add 1) into a row table, {BATCH} per commit"),
        rows,
        raw,
        "raw",
        ">= 100,000 updates/s",
    );
    line(
        "same, each change written to the outbox in the same transaction",
        outboxed,
        rows,
        "without",
        "-",
    );
    line(
        "outbox relay: the changes published to the hub, idempotently, then deleted",
        relayed,
        direct,
        "published directly",
        "-",
    );
    common::chart::save_table("rows");
    common::chart::bars(
        "rows",
        "Update requests and the outbox on the embedded hub",
        "per second",
        &[
            common::chart::Group {
                label: "update requests".into(),
                bars: vec![
                    ("Floodway".into(), rows),
                    ("with the outbox".into(), outboxed),
                    ("raw SQLite".into(), raw),
                ],
            },
            common::chart::Group {
                label: "outbox relay".into(),
                bars: vec![
                    ("Floodway relay".into(), relayed),
                    ("hub publish".into(), direct),
                ],
            },
        ],
    );
}
