//! The embedded hub: publishing, partitions, subscriptions, retention, bad files.

use std::collections::HashMap;
use std::time::Duration;

use floodway::memory::{MemoryFaultSink, MemorySink};
use floodway::testing::generate;
use floodway::{Event, Pipeline, Processor};
use floodway_embedded::{Hub, HubOptions, OpenError, Retention, StartAt, SubscriptionOptions};

mod common;
use common::{bounded, open, open_with, partitions, with_orders};

async fn read_all(
    hub: &Hub,
    name: &str,
    options: SubscriptionOptions,
) -> Vec<(String, u64, Event)> {
    use floodway::Source;
    let (mut reader, _) = hub.subscribe(name, options).unwrap().split();
    let mut out = Vec::new();
    while let Some(batch) = reader.next_batch(100).await.unwrap() {
        for r in batch {
            out.push((
                r.partition.to_string(),
                r.offset,
                Event::decode(&r.data).unwrap(),
            ));
        }
    }
    out
}

#[tokio::test]
async fn events_are_partitioned_by_key_with_increasing_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let hub = open(&dir);
    let events = generate::orders(2_000, 1);
    let receipt = hub.publish(&events).await.unwrap();
    assert_eq!(receipt.stored(), 2_000);
    let got = read_all(&hub, "all", bounded()).await;
    assert_eq!(got.len(), 2_000);
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
    for (partition, offset, event) in &got {
        assert_eq!(
            partition,
            &hub.partition_of(event.partition_key()).to_string()
        );
        let prev = last.insert(partition.clone(), *offset).unwrap_or(0);
        assert_eq!(*offset, prev + 1, "offsets are gapless per partition");
        by_key
            .entry(event.partition_key().to_owned())
            .or_default()
            .push(event.id().to_owned());
    }
    // Per key, the log keeps publish order.
    let mut want: HashMap<String, Vec<String>> = HashMap::new();
    for e in &events {
        want.entry(e.partition_key().to_owned())
            .or_default()
            .push(e.id().to_owned());
    }
    assert_eq!(by_key, want);
    // Events round-trip byte for byte.
    let bytes: HashMap<&str, String> = events.iter().map(|e| (e.id(), e.to_json())).collect();
    for (_, _, e) in &got {
        assert_eq!(e.to_json(), bytes[e.id()]);
    }
}

#[tokio::test]
async fn idempotent_publish_stores_a_duplicate_once() {
    let dir = tempfile::tempdir().unwrap();
    let hub = open(&dir);
    let events = generate::orders(10, 2);
    let first = hub.publish_idempotent(&events).await.unwrap();
    assert_eq!((first.stored(), first.duplicates), (10, 0));
    let again = hub.publish_idempotent(&events[5..]).await.unwrap();
    assert_eq!((again.stored(), again.duplicates), (0, 5));
    assert!(again.positions.iter().all(Option::is_none));
    assert_eq!(read_all(&hub, "s", bounded()).await.len(), 10);
    // A plain publish does not deduplicate.
    hub.publish(&events[..1]).await.unwrap();
    assert_eq!(read_all(&hub, "t", bounded()).await.len(), 11);
    // Events without an id are refused (poison), not stored once and then taken for repeats.
    let no_id = |key: &str| Event::builder("order-paid", key).id("").build();
    let refused = hub
        .publish_idempotent(&[no_id("k1"), no_id("k2")])
        .await
        .unwrap_err();
    assert!(
        matches!(refused, floodway_embedded::HubError::Invalid(_)),
        "{refused}"
    );
    assert!(hub.publish(&[no_id("k3")]).await.is_err());
    assert_eq!(read_all(&hub, "u", bounded()).await.len(), 11);
}

/// A dedupe window too long to count is "for ever", not an overflow that stops the writer.
#[tokio::test]
async fn a_dedupe_window_of_no_end_remembers_ids() {
    let dir = tempfile::tempdir().unwrap();
    let hub = open_with(
        dir.path(),
        HubOptions {
            dedupe_window: Duration::MAX,
            lease_wait: Duration::MAX,
            ..HubOptions::default()
        },
    );
    let events = generate::orders(3, 2);
    hub.publish_idempotent(&events).await.unwrap();
    let again = hub.publish_idempotent(&events).await.unwrap();
    assert_eq!((again.stored(), again.duplicates), (0, 3));
    let subscription = hub
        .subscribe_waiting("s", SubscriptionOptions::default())
        .await;
    assert!(subscription.is_ok());
}

/// Two processes with different idempotency windows: the one with the shorter window does
/// not forget the other's keys before the other's window is over (its publishing and its
/// retention prune by the longest window the hub was opened with).
#[tokio::test]
async fn a_shorter_dedupe_window_does_not_forget_a_longer_ones_keys() {
    let dir = tempfile::tempdir().unwrap();
    let with_window = |window: Duration| HubOptions {
        dedupe_window: window,
        ..HubOptions::default()
    };
    let long = open_with(dir.path(), with_window(Duration::from_secs(3_600)));
    let short = open_with(dir.path(), with_window(Duration::from_millis(1)));
    let events = generate::orders(3, 2);
    long.publish_idempotent(&events).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    // The short window's publishing and retention both prune.
    short
        .publish_idempotent(&generate::orders(3, 9))
        .await
        .unwrap();
    short
        .apply_retention(&floodway_embedded::Retention::default())
        .unwrap();
    let again = long.publish_idempotent(&events).await.unwrap();
    assert_eq!((again.stored(), again.duplicates), (0, 3));
}

#[tokio::test]
async fn concurrent_publishers_are_group_committed() {
    let dir = tempfile::tempdir().unwrap();
    let hub = open(&dir);
    let mut tasks = Vec::new();
    for t in 0..8 {
        let hub = hub.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                let e = Event::builder("tick", format!("k{t}"))
                    .id(format!("{t}-{i}"))
                    .build();
                hub.publish(&[e]).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let got = read_all(&hub, "all", bounded()).await;
    assert_eq!(got.len(), 400);
    // Each publisher's events stay in order within its key's partition.
    for t in 0..8 {
        let seq: Vec<u32> = got
            .iter()
            .filter(|(_, _, e)| e.partition_key() == format!("k{t}"))
            .map(|(_, _, e)| e.id().split('-').nth(1).unwrap().parse().unwrap())
            .collect();
        assert_eq!(seq, (0..50).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn two_handles_on_one_file_share_it_like_two_processes() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(&dir);
    let b = Hub::open(dir.path().join("hub.db"), HubOptions::default()).unwrap();
    let (ea, eb) = (generate::orders(300, 3), generate::orders(300, 4));
    let (ra, rb) = tokio::join!(a.publish(&ea), b.publish(&eb));
    assert_eq!(ra.unwrap().stored() + rb.unwrap().stored(), 600);
    let got = read_all(&b, "all", bounded()).await;
    assert_eq!(got.len(), 600);
    let mut seen = std::collections::HashSet::new();
    for (p, o, _) in &got {
        assert!(seen.insert((p.clone(), *o)), "offset {p}/{o} used twice");
    }
}

#[tokio::test]
async fn a_subscription_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    let hub = open(&dir);
    hub.publish(&generate::orders(1_000, 5)).await.unwrap();
    let sink = MemorySink::new();
    let processor = Processor::builder("p")
        .fault_sink(MemoryFaultSink::new())
        .pipeline(Pipeline::builder("all").sink(sink.clone()).unwrap())
        .build()
        .unwrap();
    let (reader, cp) = hub.subscribe("views", bounded()).unwrap().split();
    let report = processor
        .run(reader, cp, std::future::pending())
        .await
        .unwrap();
    assert_eq!(report.done, 1_000);
    drop(hub);

    let hub = Hub::open(&path, HubOptions::default()).unwrap();
    let stats = hub.stats().unwrap();
    assert_eq!(stats.subscriptions[0].name, "views");
    assert_eq!(stats.subscriptions[0].lag, 0);
    hub.publish(&generate::orders(10, 6)).await.unwrap();
    assert_eq!(hub.stats().unwrap().subscriptions[0].lag, 10);
    let rest = read_all(&hub, "views", bounded()).await;
    assert_eq!(rest.len(), 10, "only what came after the checkpoint");
    // A reset starts over and is remembered.
    let all = read_all(
        &hub,
        "views",
        SubscriptionOptions {
            reset: true,
            ..bounded()
        },
    )
    .await;
    assert_eq!(all.len(), 1_010);
}

#[tokio::test]
async fn reads_and_checkpoints_fall_inside_segments() {
    use floodway::{Checkpoint, Checkpointer, Source};
    let dir = tempfile::tempdir().unwrap();
    let hub = open_with(dir.path(), partitions(1));
    // One commit of 2,500 events: three segments (1,000 events each at most).
    hub.publish(&generate::orders(2_500, 12)).await.unwrap();
    let (mut reader, mut cp) = hub.subscribe("s", bounded()).unwrap().split();
    // Small reads go on where the last one stopped, inside and across segments.
    let mut offsets = Vec::new();
    while offsets.len() < 1_234 {
        let batch = reader.next_batch(7).await.unwrap().unwrap();
        offsets.extend(batch.iter().map(|r| r.offset));
    }
    assert_eq!(offsets, (1..=offsets.len() as u64).collect::<Vec<_>>());
    let through = offsets.len() as u64;
    cp.commit(&[Checkpoint {
        partition: "0".into(),
        offset: through,
    }])
    .await
    .unwrap();
    drop((reader, cp));
    // A subscription resumed from a checkpoint in the middle of a segment starts after it.
    let rest = read_all(&hub, "s", bounded()).await;
    assert_eq!(rest.first().unwrap().1, through + 1);
    assert_eq!(rest.last().unwrap().1, 2_500);
    assert_eq!(rest.len() as u64, 2_500 - through);
    // The newest events come from the last segments, newest last.
    let newest = hub.newest(3, |_| true).unwrap();
    let ids: Vec<String> = newest
        .iter()
        .map(|(_, data)| Event::decode(data).unwrap().id().to_owned())
        .collect();
    assert_eq!(ids, ["e-12-2497", "e-12-2498", "e-12-2499"]);
}

#[tokio::test]
async fn a_subscription_can_start_at_the_end_or_at_a_time() {
    let (_dir, hub, _) = with_orders(100, 7).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cut = floodway::event::now_millis();
    tokio::time::sleep(Duration::from_millis(20)).await;
    hub.publish(&generate::orders(30, 8)).await.unwrap();
    let from_time = read_all(
        &hub,
        "t",
        SubscriptionOptions {
            start: StartAt::Time(cut),
            ..bounded()
        },
    )
    .await;
    assert_eq!(from_time.len(), 30);
    let from_end = read_all(
        &hub,
        "e",
        SubscriptionOptions {
            start: StartAt::End,
            ..bounded()
        },
    )
    .await;
    assert!(from_end.is_empty());
}

#[tokio::test]
async fn a_following_reader_wakes_for_new_events() {
    use floodway::Source;
    let dir = tempfile::tempdir().unwrap();
    let hub = open(&dir);
    let (mut reader, _) = hub
        .subscribe(
            "live",
            SubscriptionOptions {
                poll: Duration::from_secs(3600),
                ..Default::default()
            },
        )
        .unwrap()
        .split();
    let waiting = tokio::spawn(async move { reader.next_batch(10).await.unwrap().unwrap().len() });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiting.is_finished());
    hub.publish(&generate::orders(3, 9)).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("woken by the publish, not the hour-long poll")
        .unwrap();
    assert_eq!(got, 3);
}

#[tokio::test]
async fn retention_deletes_by_age_and_by_size() {
    let dir = tempfile::tempdir().unwrap();
    let hub = open_with(dir.path(), partitions(1));
    let events = generate::orders(100, 10);
    // Ten commits, ten segments: retention deletes whole segments.
    for chunk in events.chunks(10) {
        hub.publish(chunk).await.unwrap();
    }
    let size: u64 = events.iter().map(|e| e.encoded_len() as u64).sum();
    let report = hub
        .apply_retention(&Retention {
            max_bytes_per_partition: Some(size / 2),
            ..Default::default()
        })
        .unwrap();
    assert!(
        (40..=60).contains(&report.deleted) && report.deleted.is_multiple_of(10),
        "{report:?}"
    );
    // A transient reader: a stored subscription would hold back what it has not read.
    let peek = SubscriptionOptions {
        transient: true,
        ..bounded()
    };
    let left = read_all(&hub, "r", peek).await;
    assert_eq!(left.len(), 100 - report.deleted);
    assert_eq!(left.last().unwrap().1, 100, "the newest stay");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let report = hub
        .apply_retention(&Retention {
            max_age: Some(Duration::from_millis(5)),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(report.deleted, left.len());
    // Offsets keep growing after retention emptied a partition.
    let r = hub.publish(&generate::orders(1, 11)).await.unwrap();
    assert_eq!(r.positions[0], Some((0, 101)));
}

#[test]
fn bad_files_are_named_not_panicked_on() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, vec![0x42u8; 8192]).unwrap();
    match Hub::open(&garbage, HubOptions::default()) {
        Err(OpenError::NotADatabase { .. }) => {}
        other => panic!("{other:?}"),
    }
    let foreign = dir.path().join("foreign.db");
    rusqlite::Connection::open(&foreign)
        .unwrap()
        .execute_batch("CREATE TABLE customers (id INTEGER PRIMARY KEY);")
        .unwrap();
    let err = Hub::open(&foreign, HubOptions::default()).unwrap_err();
    assert!(matches!(err, OpenError::Foreign { .. }), "{err:?}");
    assert!(err.to_string().contains("not a Floodway hub"));
    let existing = HubOptions {
        create: false,
        ..HubOptions::default()
    };
    let missing = Hub::open(dir.path().join("missing.db"), existing).unwrap_err();
    assert!(matches!(missing, OpenError::NotFound { .. }));
    let path = dir.path().join("hub.db");
    drop(Hub::open(&path, HubOptions::default()).unwrap());
    let err = Hub::open(&path, partitions(3)).unwrap_err();
    assert!(err.to_string().contains("has 8 partitions, not 3"), "{err}");
}

#[tokio::test]
async fn a_new_subscription_remembers_where_it_started_even_before_its_first_commit() {
    let (_dir, hub, _) = with_orders(50, 12).await;
    let from_end = SubscriptionOptions {
        start: StartAt::End,
        ..bounded()
    };
    // Started at the end, then gone before any commit (a crash).
    drop(hub.subscribe("late", from_end).unwrap());
    hub.publish(&generate::orders(20, 13)).await.unwrap();
    // The restart starts where the first start did, not at the new end.
    assert_eq!(read_all(&hub, "late", from_end).await.len(), 20);
    // A transient reader leaves nothing behind.
    let transient = SubscriptionOptions {
        transient: true,
        ..bounded()
    };
    assert_eq!(read_all(&hub, "peek", transient).await.len(), 70);
    let names: Vec<String> = hub
        .stats()
        .unwrap()
        .subscriptions
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert!(!names.contains(&"peek".to_owned()), "{names:?}");
}
