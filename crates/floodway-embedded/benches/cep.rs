//! Complex event processing in the hub file: `cargo bench -p floodway-embedded --bench cep`.
//!
//! Events through collect, correlate and one rule (every order's submission and payment make
//! it ready), 1,000 per transaction, against inserting the same events into a table of the
//! same key by hand on raw SQLite (the storage floor of collecting them); and timers with one
//! million pending: how fast a backlog of due timers fires, and how late timers fire, at p50,
//! p99 and the worst, while they fall due at 10,000 a second. Medians of three runs for the
//! throughputs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use floodway::cep::{KindRule, RuleKind, SharedRule};
use floodway::Event;
use floodway_embedded::{CepTimers, Hub, HubOptions};

/// The allocator the `floodway` command uses (and BENCHMARKS.md recommends for services).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../../floodway/benches/common/mod.rs"]
#[macro_use]
mod common;

/// Each order submitted then paid: `n` events over `n / 2` keys.
fn orders(n: usize, at: i64) -> Vec<(Vec<String>, Event)> {
    (0..n)
        .map(|i| {
            let order = format!("o-{}", i / 2);
            let ty = if i % 2 == 0 {
                "order-submitted"
            } else {
                "payment-captured"
            };
            let e = Event::builder(ty, order.clone())
                .id(format!("e-{i}"))
                .timestamp(at + i as i64)
                .field("order", serde_json::json!({"id": order, "amount": i % 500}))
                .build();
            (vec![order], e)
        })
        .collect()
}

fn ready() -> Vec<SharedRule> {
    vec![Arc::new(KindRule::new(
        "ready",
        RuleKind::All {
            types: vec!["order-submitted".into(), "payment-captured".into()],
        },
        "order-ready",
    ))]
}

fn expiry(within: i64) -> Vec<SharedRule> {
    vec![Arc::new(KindRule::new(
        "expired",
        RuleKind::Absence {
            first: "a".into(),
            then: None,
            within,
        },
        "a-expired",
    ))]
}

/// The same events into a table keyed as the sets are, by hand: the storage floor.
fn raw_sqlite(path: &std::path::Path, events: &[(Vec<String>, Event)]) -> f64 {
    let mut conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
         CREATE TABLE events (key TEXT NOT NULL, time INTEGER NOT NULL, id TEXT NOT NULL,
           type TEXT NOT NULL, event TEXT NOT NULL, PRIMARY KEY (key, time, id)) WITHOUT ROWID;",
    )
    .unwrap();
    let started = Instant::now();
    for chunk in events.chunks(1_000) {
        let tx = conn.transaction().unwrap();
        {
            let mut insert = tx
                .prepare_cached("INSERT OR IGNORE INTO events VALUES (?1, ?2, ?3, ?4, ?5)")
                .unwrap();
            for (keys, e) in chunk {
                insert
                    .execute((&keys[0], e.timestamp(), e.id(), e.event_type(), e.to_json()))
                    .unwrap();
            }
        }
        tx.commit().unwrap();
    }
    events.len() as f64 / started.elapsed().as_secs_f64()
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let n = common::events_wanted(200_000);
    let pending = common::events_wanted(1_000_000).max(n);
    let rt = common::two_workers();
    let tmp = tempfile::tempdir_in(".").unwrap();
    let now = floodway::event::now_millis();
    let events = orders(n, now);
    out!("| measurement | result | baseline | ratio | goal |");
    out!("|---|---|---|---|---|");

    let (mut raw, mut cep) = (vec![], vec![]);
    for run in 0..3 {
        eprintln!("run {}: raw SQLite...", run + 1);
        raw.push(raw_sqlite(
            &tmp.path().join(format!("raw-{run}.db")),
            &events,
        ));
        eprintln!("run {}: collect, correlate, one rule...", run + 1);
        let hub = Hub::open(
            tmp.path().join(format!("cep-{run}.db")),
            HubOptions::default(),
        )
        .unwrap();
        let table = hub.cep("orders").unwrap();
        let rules = ready();
        let started = Instant::now();
        let mut emitted = 0;
        for chunk in events.chunks(1_000) {
            emitted += table
                .collect(chunk, &rules, Some(Duration::from_secs(3600)))
                .unwrap()
                .emitted;
        }
        cep.push(n as f64 / started.elapsed().as_secs_f64());
        assert_eq!(emitted, n / 2, "every order ready once");
    }
    let (raw, cep) = (common::median(raw), common::median(cep));
    out!("| raw SQLite insert of the same events by key, 1,000 per commit (baseline) | {raw:.0} ev/s | - | 1.00 | - |");
    out!(
        "| collect + correlate + one rule (all of two types), {n} events over {} keys, 1,000 per transaction, the emitted events into the outbox | {cep:.0} ev/s | {raw:.0} ev/s raw | {:.2} | >= 50,000 ev/s |",
        n / 2,
        cep / raw
    );

    // Timers: `pending` set, of which 100,000 fall due over 10 s and the rest in an hour.
    eprintln!("setting {pending} timers...");
    let hub = Hub::open(tmp.path().join("timers.db"), HubOptions::default()).unwrap();
    let table = hub.cep("timers").unwrap();
    let soon = 100_000.min(pending);
    let setting = Instant::now();
    // Due times are event time + within: events at now + offset, within 5 s for the soon ones.
    let base = floodway::event::now_millis();
    let lead = 40_000; // room to set them all before the first falls due
    let events: Vec<(Vec<String>, Event)> = (0..pending)
        .map(|i| {
            let t = if i < soon {
                base + lead + (i as i64 * 10_000) / soon as i64
            } else {
                base + 3_600_000 + i as i64
            };
            let e = Event::builder("a", format!("k-{i}"))
                .id(format!("a-{i}"))
                .timestamp(t)
                .build();
            (vec![format!("k-{i}")], e)
        })
        .collect();
    for chunk in events.chunks(5_000) {
        table.collect(chunk, &expiry(0), None).unwrap();
    }
    drop(events);
    let set_rate = pending as f64 / setting.elapsed().as_secs_f64();
    assert_eq!(table.pending_timers().unwrap(), pending as u64);
    let first_due = base + lead;
    let wait = first_due - floodway::event::now_millis();
    assert!(
        wait > 0,
        "setting the timers took longer than the lead: raise it"
    );
    eprintln!("firing {soon} timers due over 10 s, {pending} pending...");
    rt.block_on(async {
        let timers = CepTimers::new(&hub, table.clone(), expiry(0), None);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(timers.run(async move {
            let _ = stopped.await;
        }));
        while table.pending_timers().unwrap() > (pending - soon) as u64 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = stop.send(());
        task.await.unwrap().unwrap();
    });
    // Lateness: when each expiry reached the outbox against its timer's time.
    let conn = rusqlite::Connection::open(tmp.path().join("timers.db")).unwrap();
    let mut late: Vec<i64> = conn
        .prepare("SELECT created - json_extract(event, '$.timestamp') FROM outbox")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    late.sort_unstable();
    assert_eq!(late.len(), soon);
    out!(
        "| timers: {soon} falling due over 10 s with {pending} pending; lateness of the emitted event | p50 {} ms, p99 {} ms, max {} ms | due time | - | fire within 1 s |",
        percentile(&late, 0.5),
        percentile(&late, 0.99),
        late[late.len() - 1]
    );

    // A backlog: timers all due at once (a process that was down), fired as fast as it goes.
    eprintln!("a backlog of due timers...");
    let backlog = soon;
    let hub = Hub::open(tmp.path().join("backlog.db"), HubOptions::default()).unwrap();
    let table = hub.cep("backlog").unwrap();
    let past = floodway::event::now_millis() - 60_000;
    let events: Vec<(Vec<String>, Event)> = (0..backlog)
        .map(|i| {
            let e = Event::builder("a", format!("k-{i}"))
                .id(format!("a-{i}"))
                .timestamp(past)
                .build();
            (vec![format!("k-{i}")], e)
        })
        .collect();
    for chunk in events.chunks(5_000) {
        table.collect(chunk, &expiry(0), None).unwrap();
    }
    let started = Instant::now();
    let mut fired = 0;
    loop {
        let r = table
            .fire_due(floodway::event::now_millis(), &expiry(0), None, 1_000)
            .unwrap();
        fired += r.timers_fired;
        if r.timers_fired == 0 {
            break;
        }
    }
    let fire_rate = fired as f64 / started.elapsed().as_secs_f64();
    out!(
        "| timers set (collect with an absence rule), {pending} | {set_rate:.0} timers/s | - | - | - |"
    );
    out!(
        "| a backlog of {backlog} due timers fired (each: its set read, the timer deleted, the expiry into the outbox) | {fire_rate:.0} timers/s | {cep:.0} ev/s collected | {:.2} | - |",
        fire_rate / cep
    );
    common::chart::save_table("cep");
}
