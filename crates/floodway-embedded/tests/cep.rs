//! Complex event processing in the hub file: sets in event-time order whatever the arrival
//! order, each emitted event once through repeats, timers that fire once, late or not, and
//! emitted events written to the outbox with what made them.

use std::sync::Arc;
use std::time::Duration;

use floodway::cep::{KindRule, RuleKind, SharedRule};
use floodway::Event;
use floodway_embedded::{Hub, HubOptions};

fn rules() -> Vec<SharedRule> {
    vec![
        Arc::new(KindRule::new(
            "ready",
            RuleKind::All {
                types: vec!["order-submitted".into(), "payment-captured".into()],
            },
            "order-ready",
        )),
        Arc::new(KindRule::new(
            "expired",
            RuleKind::Absence {
                first: "order-submitted".into(),
                then: Some("payment-captured".into()),
                within: 15 * 60_000,
            },
            "order-expired",
        )),
    ]
}

fn event(id: &str, ty: &str, order: &str, t: i64) -> (Vec<String>, Event) {
    let e = Event::builder(ty, order).id(id).timestamp(t).build();
    (vec![order.to_owned()], e)
}

fn emitted(hub: &Hub) -> Vec<(String, String)> {
    hub.outbox()
        .unwrap()
        .pending(1_000)
        .unwrap()
        .into_iter()
        .map(|p| {
            (
                p.event.event_type().to_owned(),
                p.event.partition_key().to_owned(),
            )
        })
        .collect()
}

#[test]
fn out_of_order_and_repeated_events_emit_once() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::open(dir.path().join("cep.db"), HubOptions::default()).unwrap();
    let table = hub.cep("orders-cep").unwrap();
    let now = floodway::event::now_millis();
    let ttl = Some(Duration::from_secs(3600));
    // The payment arrives first, then the order, then both again (a redelivery).
    let paid = event("p1", "payment-captured", "o1", now - 1_000);
    let placed = event("s1", "order-submitted", "o1", now - 2_000);
    let first = table
        .collect(std::slice::from_ref(&paid), &rules(), ttl)
        .unwrap();
    assert_eq!((first.collected, first.emitted), (1, 0));
    let second = table
        .collect(std::slice::from_ref(&placed), &rules(), ttl)
        .unwrap();
    assert_eq!(
        (second.collected, second.emitted, second.timers_set),
        (1, 1, 1)
    );
    let again = table.collect(&[placed, paid], &rules(), ttl).unwrap();
    assert_eq!((again.duplicates, again.emitted), (2, 0));
    assert_eq!(emitted(&hub), [("order-ready".into(), "o1".into())]);
    let ready = &hub.outbox().unwrap().pending(1).unwrap()[0].event;
    let triggers = ready.field("triggers").unwrap();
    assert_eq!(triggers[0]["id"], "s1", "in event-time order");
    assert_eq!(ready.timestamp(), now - 1_000, "the last trigger's time");

    // Its timer fires after its time and finds the payment: nothing more.
    assert_eq!(table.pending_timers().unwrap(), 1);
    let due = now - 2_000 + 15 * 60_000;
    let early = table.fire_due(due - 1, &rules(), ttl, 100).unwrap();
    assert_eq!(early.timers_fired, 0);
    let fired = table.fire_due(due, &rules(), ttl, 100).unwrap();
    assert_eq!((fired.timers_fired, fired.emitted), (1, 0));
    assert_eq!(table.pending_timers().unwrap(), 0);
    let state = table.show("o1").unwrap();
    assert_eq!(state.events.len(), 2);
    assert_eq!(state.fired.len(), 1);
}

#[test]
fn a_timer_due_while_nothing_ran_fires_once_at_the_next_look() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cep.db");
    let now = floodway::event::now_millis();
    let ttl = Some(Duration::from_secs(3600));
    {
        let hub = Hub::open(&path, HubOptions::default()).unwrap();
        let table = hub.cep("orders-cep").unwrap();
        let orders: Vec<_> = (0..50)
            .map(|i| {
                event(
                    &format!("s{i}"),
                    "order-submitted",
                    &format!("o{i}"),
                    now - 20 * 60_000,
                )
            })
            .collect();
        let report = table.collect(&orders, &rules(), ttl).unwrap();
        assert_eq!((report.collected, report.timers_set), (50, 50));
        // One order is paid in time.
        let paid = event("p7", "payment-captured", "o7", now - 19 * 60_000);
        table.collect(&[paid], &rules(), ttl).unwrap();
    }
    // The process was down past every timer's time; the next one fires them, once.
    let hub = Hub::open(&path, HubOptions::default()).unwrap();
    let table = hub.cep("orders-cep").unwrap();
    assert_eq!(table.next_due().unwrap(), Some(now - 5 * 60_000));
    let fired = table.fire_due(now, &rules(), ttl, 30).unwrap();
    assert_eq!(fired.timers_fired, 30, "at most the limit at a time");
    let rest = table.fire_due(now, &rules(), ttl, 1_000).unwrap();
    assert_eq!(rest.timers_fired, 20);
    assert_eq!(
        fired.emitted + rest.emitted,
        49,
        "all but the paid order expire"
    );
    assert!(
        table
            .fire_due(now, &rules(), ttl, 1_000)
            .unwrap()
            .timers_fired
            == 0
    );
    let kinds = emitted(&hub);
    assert_eq!(
        kinds.iter().filter(|(t, _)| t == "order-expired").count(),
        49
    );
    assert!(!kinds.contains(&("order-expired".into(), "o7".into())));
}

/// Expiry keeps the events of a key with a pending timer: the timer, firing late (a processor
/// started after a stop longer than the time to live), reads the set as it was: the order
/// not paid expires, the order paid does not.
#[test]
fn expiry_keeps_the_set_of_a_key_with_a_pending_timer() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::open(dir.path().join("cep.db"), HubOptions::default()).unwrap();
    let table = hub.cep("orders-cep").unwrap();
    let now = floodway::event::now_millis();
    // The time to live is the rule's window: the trigger expires when its timer is due.
    let ttl = Some(Duration::from_secs(15 * 60));
    let t0 = now - 1_000;
    let orders = [
        event("s1", "order-submitted", "o1", t0),
        event("s2", "order-submitted", "o2", t0),
    ];
    table.collect(&orders, &rules(), ttl).unwrap();
    table
        .collect(
            &[event("p2", "payment-captured", "o2", t0 + 1)],
            &rules(),
            ttl,
        )
        .unwrap();
    // The expiry runs first, long after everything's time to live.
    let now = now + 16 * 60_000;
    table.expire(now).unwrap();
    assert_eq!(
        table.show("o1").unwrap().events.len(),
        1,
        "the trigger stays"
    );
    assert_eq!(table.show("o2").unwrap().events.len(), 2, "and the answer");
    let fired = table.fire_due(now, &rules(), ttl, 100).unwrap();
    assert_eq!((fired.timers_fired, fired.emitted), (2, 1));
    assert_eq!(
        emitted(&hub)
            .into_iter()
            .filter(|(t, _)| t == "order-expired")
            .collect::<Vec<_>>(),
        [("order-expired".to_owned(), "o1".to_owned())]
    );
    // Fired, the timers no longer keep them.
    table.expire(now).unwrap();
    assert!(table.show("o1").unwrap().events.is_empty());
    assert!(table.show("o2").unwrap().events.is_empty());
}

/// What a set emitted is kept as long as the firing's time to live, not the time to live of
/// the event whose arrival made it: an early event arriving late makes the firing, expires
/// first, and the firing is not made again from what stays.
#[test]
fn an_emission_is_remembered_for_the_firing_time_to_live() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::open(dir.path().join("cep.db"), HubOptions::default()).unwrap();
    let table = hub.cep("orders-cep").unwrap();
    let now = floodway::event::now_millis();
    let ttl = Some(Duration::from_secs(3600));
    let ready = &rules()[..1];
    let minute = 60_000;
    table
        .collect(
            &[event("o", "order-submitted", "o1", now - 30 * minute)],
            ready,
            ttl,
        )
        .unwrap();
    // An earlier payment, arriving after the order: the set fires.
    let report = table
        .collect(
            &[event("p1", "payment-captured", "o1", now - 50 * minute)],
            ready,
            ttl,
        )
        .unwrap();
    assert_eq!(report.emitted, 1);
    // The payment expires, the order stays; a second payment makes no second firing.
    table.expire(now + 15 * minute).unwrap();
    let report = table
        .collect(
            &[event("p2", "payment-captured", "o1", now - 5 * minute)],
            ready,
            ttl,
        )
        .unwrap();
    assert_eq!(report.emitted, 0);
    assert_eq!(emitted(&hub).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timer_task_fires_within_its_poll_of_the_due_time() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::open(dir.path().join("cep.db"), HubOptions::default()).unwrap();
    let table = hub.cep("fast").unwrap();
    let rule: Vec<SharedRule> = vec![Arc::new(KindRule::new(
        "soon",
        RuleKind::Absence {
            first: "a".into(),
            then: None,
            within: 300,
        },
        "a-expired",
    ))];
    let now = floodway::event::now_millis();
    table
        .collect(&[event("a1", "a", "k", now)], &rule, None)
        .unwrap();
    let timers = floodway_embedded::CepTimers::new(&hub, table.clone(), rule, None);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(timers.run(async move {
        let _ = stopped.await;
    }));
    let outbox = hub.outbox().unwrap();
    let started = std::time::Instant::now();
    while outbox.pending(1).unwrap().is_empty() {
        assert!(started.elapsed() < Duration::from_secs(5), "fires");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let late = floodway::event::now_millis() - (now + 300);
    assert!((0..1_000).contains(&late), "fired {late} ms after its time");
    let _ = stop.send(());
    assert_eq!(task.await.unwrap().unwrap().timers_fired, 1);
}

/// A processor behind (a backlog, a restart after downtime): an order's expiry waits until
/// the processor has read what was published before the expiry's time, here the payment
/// that would have stopped it; once read past it, the timer fires (the payment was not
/// collected here, so it expires).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_waits_for_its_processor_to_read_what_came_before_it() {
    use floodway::Checkpointer as _;
    let dir = tempfile::tempdir().unwrap();
    let options = HubOptions {
        partitions: Some(1),
        ..HubOptions::default()
    };
    let hub = Hub::open(dir.path().join("cep.db"), options).unwrap();
    let table = hub.cep("orders").unwrap();
    let rule: Vec<SharedRule> = vec![Arc::new(KindRule::new(
        "expired",
        RuleKind::Absence {
            first: "order-submitted".into(),
            then: Some("payment-captured".into()),
            within: 300,
        },
        "order-expired",
    ))];
    let now = floodway::event::now_millis();
    let (keys, order) = event("s1", "order-submitted", "o1", now);
    let (_, paid) = event("p1", "payment-captured", "o1", now + 50);
    hub.publish(std::slice::from_ref(&order)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    hub.publish(&[paid]).await.unwrap();
    // The processor has read and collected the order, not yet the payment.
    let (_reader, mut read) = hub.subscribe("orders", Default::default()).unwrap().split();
    let through = |offset| {
        [floodway::Checkpoint {
            partition: "0".into(),
            offset,
        }]
    };
    read.commit(&through(1)).await.unwrap();
    table.collect(&[(keys, order)], &rule, None).unwrap();
    let timers =
        floodway_embedded::CepTimers::new(&hub, table.clone(), rule, None).following("orders");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(timers.run(async move {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(emitted(&hub).is_empty(), "held while the payment is unread");
    read.commit(&through(2)).await.unwrap();
    let started = std::time::Instant::now();
    while emitted(&hub).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "fires once read"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        emitted(&hub),
        [("order-expired".to_owned(), "o1".to_owned())]
    );
    let _ = stop.send(());
    assert_eq!(task.await.unwrap().unwrap().timers_fired, 1);
}

/// With the hub keeping the timers (NATS): the timers a batch sets wait to be handed over,
/// fire when delivered (once, however often), and how far each partition was read is kept
/// with the sets.
#[test]
fn hub_kept_timers_are_handed_over_and_fire_once_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::open(dir.path().join("cep.db"), HubOptions::default()).unwrap();
    let table = hub.cep("orders-cep").unwrap().with_hub_timers().unwrap();
    let now = floodway::event::now_millis();
    let ttl = Some(Duration::from_secs(3600));
    let report = table
        .collect_at(
            &[event("s1", "order-submitted", "o-1", now)],
            &rules(),
            ttl,
            &[("0".into(), 7), ("1".into(), 3)],
        )
        .unwrap();
    assert_eq!(report.timers_set, 1);
    table
        .collect_at(&[], &rules(), ttl, &[("0".into(), 5)])
        .unwrap();
    let positions = table.positions().unwrap();
    assert_eq!(
        (positions["0"], positions["1"]),
        (7, 3),
        "the furthest is kept"
    );
    let pending = table.pending_schedules(10).unwrap();
    assert_eq!(pending.len(), 1);
    let floodway_embedded::PendingTimer {
        key,
        timer,
        partition_key,
    } = pending[0].clone();
    assert_eq!((key.as_str(), timer.due), ("o-1", now + 15 * 60_000));
    assert_eq!(
        partition_key, "o-1",
        "delivered to the partition of its trigger"
    );
    table.scheduled(&pending).unwrap();
    assert!(table.pending_schedules(10).unwrap().is_empty());
    // Delivered by the hub, twice: one expiry.
    for _ in 0..2 {
        table.fire_timer(&key, &timer, &rules(), ttl).unwrap();
    }
    assert_eq!(emitted(&hub), [("order-expired".into(), "o-1".into())]);
    assert!(table.show("o-1").unwrap().timers.is_empty());
}

/// Another instance read part of a partition: the one taking over catches up from the log.
/// What the other emitted is not emitted again, a timer it fired is not set again, what it
/// emitted and never published (its outbox died with it: o-3's ready, o-5's expiry) is
/// emitted, and the sets are whole again for what comes next.
#[test]
fn an_instance_taking_over_catches_up_on_what_another_read() {
    let dir = tempfile::tempdir().unwrap();
    let now = floodway::event::now_millis() - 20 * 60_000;
    let ttl = Some(Duration::from_secs(3600));
    // The first instance: o-1 paid (ready), o-2 not (its timer fired: expired), o-3 paid
    // but its ready event never left the outbox, o-5's timer fired but its expiry never left
    // the outbox either.
    let first = Hub::open(dir.path().join("first.db"), HubOptions::default()).unwrap();
    let old = first.cep("orders-cep").unwrap().with_hub_timers().unwrap();
    let read = [
        event("s1", "order-submitted", "o-1", now),
        event("p1", "payment-captured", "o-1", now + 10),
        event("s2", "order-submitted", "o-2", now),
        event("s3", "order-submitted", "o-3", now),
        event("p3", "payment-captured", "o-3", now + 10),
        event("s4", "order-submitted", "o-4", now),
        event("s5", "order-submitted", "o-5", now),
    ];
    old.collect(&read, &rules(), ttl).unwrap();
    // Fires `order`'s timer on the first instance; the timer.
    let fire = |order: &str| {
        let timer = old
            .pending_schedules(10)
            .unwrap()
            .into_iter()
            .find(|t| t.key == order)
            .unwrap()
            .timer;
        old.fire_timer(order, &timer, &rules(), ttl).unwrap();
        timer
    };
    let (o2_timer, o5_timer) = (fire("o-2"), fire("o-5"));
    let out: Vec<Event> = first
        .outbox()
        .unwrap()
        .pending(100)
        .unwrap()
        .into_iter()
        .map(|p| p.event)
        .collect();
    let published = |order: &str| {
        out.iter()
            .find(|e| e.partition_key() == order)
            .unwrap()
            .clone()
    };

    // The log of the partition as the next instance reads it: the inputs, what the first
    // published (not o-3's ready), and the timer the hub delivered for o-2.
    let mut log: Vec<(Vec<String>, Event)> = read.to_vec();
    log.push((vec![], published("o-1")));
    log.push((vec![], published("o-2")));
    log.push((vec![], o2_timer.to_event("orders-cep", "o-2")));
    log.push((vec![], o5_timer.to_event("orders-cep", "o-5")));

    let second = Hub::open(dir.path().join("second.db"), HubOptions::default()).unwrap();
    let new = second.cep("orders-cep").unwrap().with_hub_timers().unwrap();
    let report = new
        .restore(&log, &rules(), ttl, &[("0".into(), 42)])
        .unwrap();
    assert_eq!(report.collected, 7);
    assert_eq!(
        emitted(&second),
        [
            ("order-ready".into(), "o-3".into()),
            ("order-expired".into(), "o-5".into())
        ],
        "only what the first never published"
    );
    assert_eq!(new.positions().unwrap()["0"], 42);
    // o-2's and o-5's timers fired already; o-1's, o-3's and o-4's are to be kept by the hub.
    let mut timers: Vec<String> = new
        .pending_schedules(10)
        .unwrap()
        .into_iter()
        .map(|t| t.key)
        .collect();
    timers.sort();
    assert_eq!(timers, ["o-1", "o-3", "o-4"]);
    // The sets are whole: a payment for o-4 now makes it ready with its order.
    new.collect(
        &[event("p4", "payment-captured", "o-4", now + 20)],
        &rules(),
        ttl,
    )
    .unwrap();
    let ready = second
        .outbox()
        .unwrap()
        .pending(100)
        .unwrap()
        .into_iter()
        .map(|p| p.event)
        .find(|e| e.partition_key() == "o-4")
        .unwrap();
    assert_eq!(ready.event_type(), "order-ready");
    assert_eq!(ready.field("triggers").unwrap()[0]["id"], "s4");
}

/// A table that fired its own timers, then kept by the hub: the timers pending in it are
/// handed over too, each to the partition of the event that set it.
#[test]
fn timers_pending_before_the_hub_kept_them_are_handed_over() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::open(dir.path().join("cep.db"), HubOptions::default()).unwrap();
    let now = floodway::event::now_millis();
    let ttl = Some(Duration::from_secs(3600));
    let table = hub.cep("orders-cep").unwrap();
    let placed = Event::builder("order-submitted", "shop-7")
        .id("s1")
        .timestamp(now)
        .field("order", serde_json::json!({"id": "o-1"}))
        .build();
    table
        .collect(&[(vec!["o-1".to_owned()], placed)], &rules(), ttl)
        .unwrap();
    assert!(table.pending_schedules(10).unwrap().is_empty());
    let table = table.with_hub_timers().unwrap();
    let pending = table.pending_schedules(10).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (pending[0].key.as_str(), pending[0].partition_key.as_str()),
        ("o-1", "shop-7")
    );
    assert_eq!(pending[0].to_event("orders-cep").partition_key(), "shop-7");
    table.scheduled(&pending).unwrap();
    // Once: opened again, nothing is queued twice.
    let again = hub.cep("orders-cep").unwrap().with_hub_timers().unwrap();
    assert!(again.pending_schedules(10).unwrap().is_empty());
}
