//! What keeps a hub healthy over time: a write lock held by another process delays the
//! processors but does not stop them; the dedupe table and the row tables' inbox stay bounded
//! without any retention; retention does not delete what a subscription has not read unless
//! told to.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use floodway::idempotence::Version;
use floodway::memory::MemoryFaultSink;
use floodway::rows::{Outcome, RowKey, Update};
use floodway::testing::generate;
use floodway::{Checkpoint, Checkpointer, Event, Processor, Source};
use floodway_embedded::{Hub, HubOptions, Retention};

mod common;
use common::{bounded, expected_view, open_file, open_with, partitions, stored_view};

/// Keeps the latest order state per order in the view `orders`.
fn view_processor(hub: &Hub, faults: &MemoryFaultSink) -> Processor {
    Processor::builder("shop")
        .fault_sink(faults.clone())
        .pipeline(common::orders_view(hub))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_lock_held_past_the_busy_timeout_delays_processors_but_does_not_stop_them() {
    let dir = tempfile::tempdir().unwrap();
    let hold = Duration::from_millis(1_500);
    let options = HubOptions {
        // The lock below is held fifteen times as long.
        busy_timeout: Duration::from_millis(100),
        busy_retry: Duration::from_secs(30),
        ..partitions(2)
    };
    let (hub, path) = open_file(dir.path(), options);
    let events = generate::orders(4_000, 31);
    hub.publish(&events[..3_000]).await.unwrap();

    // Another process's long write transaction (`hub retain` deleting much, say).
    let locker = rusqlite::Connection::open(&path).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let started = Instant::now();
    let release = std::thread::spawn(move || {
        std::thread::sleep(hold);
        locker.execute_batch("COMMIT").unwrap();
    });

    // Publishing, opening a subscription and checkpoint commits all meet it (the view writes
    // go to the views file beside it).
    let publish = {
        let (hub, rest) = (hub.clone(), events[3_000..].to_vec());
        tokio::spawn(async move { hub.publish(&rest).await })
    };
    let faults = MemoryFaultSink::new();
    let processor = view_processor(&hub, &faults);
    let (reader, checkpoints) = hub.subscribe("shop", bounded()).unwrap().split();
    let report = processor
        .run(reader, checkpoints, std::future::pending())
        .await
        .expect("the processor outlasts the lock");
    assert_eq!(publish.await.unwrap().unwrap().stored(), 1_000);
    assert!(started.elapsed() >= hold);
    release.join().unwrap();
    assert_eq!(report.faults(), 0, "a locked file is not a poison event");
    assert!(faults.faults().is_empty());

    // A second run reads what was published during the lock: every event applied once.
    let (reader, checkpoints) = hub.subscribe("shop", bounded()).unwrap().split();
    processor
        .run(reader, checkpoints, std::future::pending())
        .await
        .unwrap();
    assert_eq!(stored_view(&hub), expected_view(&events));
    assert_eq!(hub.lag("shop").unwrap(), 0);
}

/// An update per event: the order's row counts its events.
fn updates_of(events: &[Event]) -> Vec<Update> {
    events
        .iter()
        .map(|e| {
            let key = RowKey::new(e.partition_key(), "order");
            Update::new(key, Version::of(e)).add("events", 1)
        })
        .collect()
}

/// Rows of a table, read through a connection of its own.
fn rows(path: &std::path::Path, table: &str) -> u64 {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| {
        r.get::<_, i64>(0)
    })
    .unwrap() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dedupe_table_and_the_inbox_stay_bounded_without_retention() {
    let dir = tempfile::tempdir().unwrap();
    let window = Duration::from_millis(200);
    let options = HubOptions {
        dedupe_window: window,
        inbox_window: window,
        durability: floodway_embedded::Durability::Relaxed,
        ..partitions(2)
    };
    let (hub, path) = open_file(dir.path(), options);
    let table = hub.rows("orders").unwrap();
    // As a forward processor publishes into its target hub (idempotently, by event id) and a
    // row processor counts them in a row table, with no retention configured.
    let total = total();
    let chunk = 2_000;
    let chunks = total / chunk;
    let mut largest = (0, 0);
    let started = Instant::now();
    for i in 0..chunks {
        let events = generate::orders(chunk, 10_000 + i as u64);
        let receipt = hub.publish_idempotent(&events).await.unwrap();
        assert_eq!(receipt.stored(), chunk);
        let outcomes = table.apply(&updates_of(&events)).unwrap();
        assert!(!outcomes.contains(&Outcome::Duplicate));
        if i % 5 == 4 || i + 1 == chunks {
            largest.0 = largest.0.max(rows(&path, "dedupe"));
            largest.1 = largest.1.max(rows(&path, "inbox"));
        }
    }
    let elapsed = started.elapsed();
    // Idempotency keys: what arrived in the last window, and what the last commits have not
    // pruned yet. The inbox: the current and the previous window, and for a few commits after
    // a window starts, what is left of the one before.
    let rate = total as f64 / elapsed.as_secs_f64();
    let per_window = rate * window.as_secs_f64();
    let keys = (2.0 * per_window) as u64 + 3 * chunk as u64;
    let inbox = (3.0 * per_window) as u64 + 3 * chunk as u64;
    println!(
        "{total} events in {elapsed:?} ({rate:.0}/s): at most {} dedupe keys (bound {keys}) \
         and {} inbox rows (bound {inbox}) held",
        largest.0, largest.1
    );
    assert!(inbox < total as u64 / 4, "the run is long enough to tell");
    assert!(largest.0 <= keys, "dedupe keys: {} > {keys}", largest.0);
    assert!(largest.1 <= inbox, "inbox rows: {} > {inbox}", largest.1);
    // Once a window has passed, the next writes forget everything older, a bounded batch
    // each (a thousand rows and twice their own).
    tokio::time::sleep(window * 2).await;
    let rounds = largest.0.max(largest.1) / 1_000 + 2;
    let mut last = Vec::new();
    for round in 0..rounds {
        let events = generate::orders(10, 1 + round);
        hub.publish_idempotent(&events).await.unwrap();
        table.apply(&updates_of(&events)).unwrap();
        last = events;
    }
    // What is left is these small writes' own rows at most.
    let (keys, inbox) = (rows(&path, "dedupe"), rows(&path, "inbox"));
    assert!(
        keys <= 10 * rounds,
        "{keys} keys after {rounds} small writes"
    );
    assert!(
        inbox <= 10 * rounds,
        "{inbox} inbox rows after {rounds} small writes"
    );
    let updates = updates_of(&last);
    // Within the window, a duplicate is still known as one.
    let again = hub.publish_idempotent(&last).await.unwrap();
    assert_eq!(again.duplicates, 10);
    let outcomes = table.apply(&updates).unwrap();
    assert!(
        outcomes.iter().all(|o| *o == Outcome::Duplicate),
        "{outcomes:?}"
    );
}

/// Events of the bounded-tables test: 100,000 (about 5 s in a debug build), or
/// `FLOODWAY_TEST_EVENTS` (1,000,000 take about 12 s in a release build).
fn total() -> usize {
    std::env::var("FLOODWAY_TEST_EVENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000)
}

/// Collects what `tracing` writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// One partition of ten segments of ten events (offsets 1-100).
async fn ten_segments(dir: &tempfile::TempDir) -> (Hub, u64) {
    let hub = open_with(dir.path(), partitions(1));
    let events = generate::orders(100, 51);
    for chunk in events.chunks(10) {
        hub.publish(chunk).await.unwrap();
    }
    let size = hub.stats().unwrap().partitions[0].bytes;
    (hub, size)
}

async fn commit(hub: &Hub, name: &str, offset: u64) {
    let (_, mut checkpoints) = hub.subscribe(name, bounded()).unwrap().split();
    checkpoints
        .commit(&[Checkpoint {
            partition: "0".into(),
            offset,
        }])
        .await
        .unwrap();
}

async fn offsets(hub: &Hub, name: &str) -> Vec<u64> {
    let (mut reader, _) = hub.subscribe(name, bounded()).unwrap().split();
    let mut out = Vec::new();
    while let Some(batch) = reader.next_batch(100).await.unwrap() {
        out.extend(batch.iter().map(|r| r.offset));
    }
    out
}

#[tokio::test]
async fn retention_keeps_what_a_subscription_has_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, size) = ten_segments(&dir).await;
    commit(&hub, "fast", 100).await;
    // Part-way through the fourth segment (31-40).
    commit(&hub, "slow", 35).await;
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let captured = captured.clone();
            move || captured.clone()
        })
        .with_ansi(false)
        .finish();
    // The size limit asks for the oldest 70-80 events to go.
    let limits = Retention {
        max_bytes_per_partition: Some(size / 4),
        ..Retention::default()
    };
    assert!(limits.keep_unread, "the default");
    let report =
        tracing::subscriber::with_default(subscriber, || hub.apply_retention(&limits)).unwrap();
    assert_eq!(
        report.deleted, 30,
        "only the segments every subscription is past"
    );
    assert!(report.kept_unread >= 40, "{report:?}");
    assert_eq!(report.behind, vec!["slow".to_owned()]);
    let log = captured.text();
    assert!(log.contains("WARN"), "{log}");
    assert!(log.contains("slow"), "{log}");
    assert!(log.contains("retention_keep_unread"), "{log}");
    // The slow subscription reads everything it had not read, without a gap.
    assert_eq!(offsets(&hub, "slow").await, (36..=100).collect::<Vec<_>>());
    // Once it has read them, retention deletes by the limits again.
    commit(&hub, "slow", 100).await;
    let report = hub.apply_retention(&limits).unwrap();
    assert!(
        report.deleted >= 40 && report.kept_unread == 0,
        "{report:?}"
    );
    assert!(report.behind.is_empty());
    // By age, the same.
    commit(&hub, "slow", 95).await; // a commit behind is ignored: it stays at 100
    let by_age = Retention {
        max_age: Some(Duration::ZERO),
        ..Retention::default()
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    let report = hub.apply_retention(&by_age).unwrap();
    assert_eq!(report.kept_unread, 0, "{report:?}");
    assert_eq!(hub.stats().unwrap().partitions[0].events, 0, "all deleted");
    // A subscription from a time, on the partition emptied: nothing before it left to read,
    // so it starts at the end, not at 0 (100 events of lag, then 100 taken for lost).
    let from_now = floodway_embedded::SubscriptionOptions {
        start: floodway::hub::StartAt::Time(floodway::event::now_millis()),
        ..bounded()
    };
    let (mut reader, _) = hub.subscribe("late", from_now).unwrap().split();
    assert_eq!(hub.lag("late").unwrap(), 0);
    assert!(reader.next_batch(100).await.unwrap().is_none());
}

#[tokio::test]
async fn retention_deletes_unread_events_when_told_to() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, size) = ten_segments(&dir).await;
    commit(&hub, "slow", 35).await;
    // Limits too large to count mean "no limit", not a negative one that deletes everything.
    let none = hub
        .apply_retention(&Retention {
            max_bytes_per_partition: Some(u64::MAX),
            max_age: Some(Duration::MAX),
            keep_unread: false,
        })
        .unwrap();
    assert_eq!(none.deleted, 0, "{none:?}");
    let report = hub
        .apply_retention(&Retention {
            max_bytes_per_partition: Some(size / 4),
            keep_unread: false,
            ..Retention::default()
        })
        .unwrap();
    assert!((70..=80).contains(&report.deleted), "{report:?}");
    assert!(report.behind.is_empty());
    assert_eq!(report.kept_unread, 0);
    // The slow reader skips what is gone (and warns, and counts it).
    let read = offsets(&hub, "slow").await;
    assert_eq!(read.first(), Some(&(report.deleted as u64 + 1)));
}
