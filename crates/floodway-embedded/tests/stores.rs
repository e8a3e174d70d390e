//! The fault store and latest-wins views.

use std::time::Duration;

use floodway::idempotence::Version;
use floodway::{Error, Event, Pipeline, Processor};
use floodway_embedded::{
    FaultFilter, FaultStatus, Hub, StartAt, Stored, SubscriptionOptions, ViewWrite,
};
use proptest::prelude::*;
use serde_json::json;

mod common;
use common::{expected_view, open, stored_view, with_orders};

fn bounded(start: StartAt) -> SubscriptionOptions {
    SubscriptionOptions {
        start,
        follow: false,
        ..Default::default()
    }
}

/// A processor whose `strict` pipeline rejects events with an odd total, faulting into the
/// hub's fault store, and whose `orders` pipeline keeps the latest order state per order.
fn processor(hub: &Hub) -> Processor {
    Processor::builder("shop")
        .fault_sink(hub.fault_store().unwrap())
        .pipeline(
            Pipeline::builder("strict")
                .event_type("order-paid")
                .validate(
                    |e| match e.field("order").and_then(|o| o["total"].as_u64()) {
                        Some(t) if t % 2 == 1 => {
                            Err(Error::poison_msg("OddTotal", format!("total {t}")))
                        }
                        _ => Ok(()),
                    },
                )
                .sink(floodway::memory::MemorySink::new())
                .unwrap(),
        )
        .pipeline(common::orders_view(hub))
        .build()
        .unwrap()
}

#[tokio::test]
async fn faults_are_stored_once_counted_again_and_filtered() {
    let (_dir, hub, events) = with_orders(2_000, 21).await;
    let odd = events
        .iter()
        .filter(|e| e.event_type() == "order-paid")
        .filter(|e| e.field("order").unwrap()["total"].as_u64().unwrap() % 2 == 1)
        .count();
    assert!(odd > 10);
    let p = processor(&hub);
    let (reader, cp) = hub
        .subscribe("shop", bounded(StartAt::Beginning))
        .unwrap()
        .split();
    p.run(reader, cp, std::future::pending()).await.unwrap();

    let store = hub.fault_store().unwrap();
    let all = store.list(&FaultFilter::default()).unwrap();
    assert_eq!(all.len(), odd);
    assert!(all
        .iter()
        .all(|f| f.seen == 1 && f.pipeline == "strict" && f.name == "OddTotal"));
    assert_eq!(
        stored_view(&hub),
        expected_view(&events),
        "the other pipeline is unaffected"
    );

    // Replaying the same records raises the same faults: stored once, seen twice.
    let (reader, cp) = hub
        .subscribe(
            "shop",
            SubscriptionOptions {
                reset: true,
                ..bounded(StartAt::Beginning)
            },
        )
        .unwrap()
        .split();
    p.run(reader, cp, std::future::pending()).await.unwrap();
    let again = store.list(&FaultFilter::default()).unwrap();
    assert_eq!(again.len(), odd);
    assert!(again.iter().all(|f| f.seen == 2));
    assert_eq!(
        stored_view(&hub),
        expected_view(&events),
        "replay changed no row"
    );

    let filtered = store
        .list(&FaultFilter {
            pipeline: Some("orders".into()),
            ..Default::default()
        })
        .unwrap();
    assert!(filtered.is_empty());
    let limited = store
        .list(&FaultFilter {
            error: Some("OddTotal".into()),
            limit: Some(3),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(limited.len(), 3);

    let one = &all[0];
    let details = one.details().unwrap();
    let record = Event::decode(&details.uow.record.bytes().unwrap()).unwrap();
    assert_eq!(record.event_type(), "order-paid");
    store
        .record_resubmission(&one.id, "failed", "still odd")
        .unwrap();
    store
        .record_resubmission(&one.id, "succeeded", "fixed")
        .unwrap();
    let history = store.resubmissions(&one.id).unwrap();
    assert_eq!(history.len(), 2);
    assert!(history[0].at < history[1].at);
    assert_eq!(
        store.get(&one.id).unwrap().unwrap().status,
        FaultStatus::Resolved
    );
    let open = store
        .list(&FaultFilter {
            status: Some(FaultStatus::Open),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(open.len(), odd - 1);
    // The same raise stored again (a fault event delivered twice, a batch stored again after
    // a failure) counts once...
    let seen = store.get(&one.id).unwrap().unwrap().seen;
    assert_eq!(store.store(&one.fault).unwrap(), Stored::Repeated);
    assert_eq!(store.get(&one.id).unwrap().unwrap().seen, seen);
    // ...a raise from before the resolution, arriving late, counts and leaves it resolved...
    let mut late = one.fault.clone();
    late.set_id("late-raise");
    assert_eq!(store.store(&late).unwrap(), Stored::Again);
    let again = store.get(&one.id).unwrap().unwrap();
    assert_eq!(again.status, FaultStatus::Resolved);
    assert_eq!(again.seen, seen + 1);
    // ...while the same failure raised after the resolution opens it again.
    let mut raised = one.fault.clone();
    raised.set_id("raise-after-the-fix");
    raised.set_timestamp(floodway::event::now_millis() + 1_000);
    assert_eq!(store.store(&raised).unwrap(), Stored::Again);
    let reopened = store.get(&one.id).unwrap().unwrap();
    assert_eq!(reopened.status, FaultStatus::Open);
    assert_eq!(reopened.seen, seen + 2);
    // A batch of raises is stored in one transaction, each raise once.
    let mut batch = Vec::new();
    for i in 0..3 {
        let mut f = one.fault.clone();
        f.set_id(format!("batch-raise-{i}"));
        batch.push(f);
    }
    batch.push(batch[0].clone());
    assert_eq!(
        store.store_all(&batch).unwrap(),
        [
            Stored::Again,
            Stored::Again,
            Stored::Again,
            Stored::Repeated
        ]
    );
    assert_eq!(store.get(&one.id).unwrap().unwrap().seen, seen + 5);
    assert!(
        store
            .store_all(&[raised.clone(), events[0].clone()])
            .is_err(),
        "a batch with anything but faults stores nothing"
    );
    assert_eq!(store.get(&one.id).unwrap().unwrap().seen, seen + 5);
    assert!(store.store(&events[0]).is_err(), "only fault events go in");
}

#[tokio::test]
async fn a_view_survives_an_abandoned_run_exactly_once() {
    let (_dir, hub, events) = with_orders(3_000, 22).await;
    // A run cut off at a random moment, like a crash: nothing more is committed.
    let p = processor(&hub);
    let (reader, cp) = hub
        .subscribe("shop", bounded(StartAt::Beginning))
        .unwrap()
        .split();
    let run = p.run(reader, cp, std::future::pending());
    let _ = tokio::time::timeout(Duration::from_millis(30), run).await;
    let stats = hub.stats().unwrap();
    assert!(
        stats.subscriptions[0]
            .partitions
            .iter()
            .all(|(_, offset)| *offset == 0),
        "cut before its first commit"
    );
    // The restart redelivers what was not checkpointed; the rows' versions absorb it.
    // (In this process, the cut-off run's reader goes, and releases the subscription, when its
    // aborted task is dropped: the restart waits for that.)
    let (reader, cp) = hub
        .subscribe_waiting("shop", bounded(StartAt::Beginning))
        .await
        .unwrap()
        .split();
    p.run(reader, cp, std::future::pending()).await.unwrap();
    assert_eq!(stored_view(&hub), expected_view(&events));
    assert_eq!(hub.stats().unwrap().subscriptions[0].lag, 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Any permutation of a set of writes, with duplicates, gives the rows of the sorted,
    /// de-duplicated set, in batches whose writes share keys; every write is counted once.
    #[test]
    fn any_order_with_duplicates_gives_the_same_view(
        writes in proptest::collection::vec(("[a-c]", 0i64..4, "[a-f]"), 1..30),
        dups in proptest::collection::vec(any::<usize>(), 0..10),
        seed in any::<u64>(),
    ) {
        // One event per id: its key, time and value are those of its first occurrence.
        let mut unique: Vec<ViewWrite> = Vec::new();
        for (key, time, id) in writes {
            if unique.iter().all(|w| w.version.id != id) {
                let version = Version { timestamp: time, id: id.clone() };
                unique.push(ViewWrite::new(key, version, json!({ "by": id })));
            }
        }
        let mut sorted = unique.clone();
        sorted.sort_by(|a, b| a.version.cmp(&b.version));
        let mut delivered = unique.clone();
        for d in dups {
            delivered.push(unique[d % unique.len()].clone());
        }
        fastrand::Rng::with_seed(seed).shuffle(&mut delivered);

        let dir = tempfile::tempdir().unwrap();
        let hub = open(&dir);
        let a = hub.view("a").unwrap();
        let b = hub.view("b").unwrap();
        a.apply(&sorted).unwrap();
        let mut counted = 0;
        for chunk in delivered.chunks(4) {
            let applied = b.apply(chunk).unwrap();
            counted += applied.written + applied.stale + applied.duplicates;
        }
        prop_assert_eq!(a.rows().unwrap(), b.rows().unwrap());
        prop_assert_eq!(counted, delivered.len());
    }
}
