//! A subscription has one owner at a time (invariant 7): a lease in the hub file, taken when
//! the subscription is opened, renewed while it is used, released when it is closed, taken over
//! only when its holder is gone; checkpoints never move backward.
//!
//! The holders in the tests of other processes are this test binary run again as a child
//! (`lease_holder_process`), frozen with SIGSTOP or killed with SIGKILL.

use std::time::{Duration, Instant};

use floodway::testing::generate;
use floodway::testing::processes::{
    calls_since, run_then_exit, slow_printing_processor, two_threads, TestProcess,
};
use floodway::{Checkpoint, Checkpointer, Source};
use floodway_embedded::{Hub, HubError, HubOptions, SubscriptionOptions};

const CHILD_HUB: &str = "FLOODWAY_TEST_LEASE_HUB";
const CHILD_LEASE_MS: &str = "FLOODWAY_TEST_LEASE_MS";

mod common;
use common::{bounded, open_with, partitions};

fn options(lease: Duration, wait: Duration) -> HubOptions {
    HubOptions {
        lease,
        lease_wait: wait,
        ..HubOptions::default()
    }
}

fn checkpoint(partition: u32, offset: u64) -> Checkpoint {
    Checkpoint {
        partition: partition.to_string().into(),
        offset,
    }
}

/// Not a test of its own: the holding process of the tests below, when the environment names
/// a hub. It holds the subscription `orders`, commits what it reads, and when the reader stops
/// it prints why, tries one more commit, and exits with status 3.
#[test]
fn lease_holder_process() {
    let Ok(path) = std::env::var(CHILD_HUB) else {
        return;
    };
    let lease: u64 = std::env::var(CHILD_LEASE_MS).unwrap().parse().unwrap();
    let runtime = two_threads();
    runtime.block_on(async move {
        let hub = Hub::open(&path, options(Duration::from_millis(lease), Duration::ZERO)).unwrap();
        let live = SubscriptionOptions {
            poll: Duration::from_millis(20),
            ..Default::default()
        };
        let (mut reader, mut checkpointer) = hub.subscribe("orders", live).unwrap().split();
        println!("holding");
        loop {
            match reader.next_batch(100).await {
                Ok(Some(batch)) => {
                    // The last record read of each partition.
                    let mut last = std::collections::BTreeMap::new();
                    for r in &batch {
                        last.insert(r.partition.clone(), r.offset);
                    }
                    let cps: Vec<Checkpoint> = last
                        .into_iter()
                        .map(|(partition, offset)| Checkpoint { partition, offset })
                        .collect();
                    if let Err(err) = checkpointer.commit(&cps).await {
                        println!("commit refused: {err}");
                    }
                }
                Ok(None) => println!("the live reader ended"),
                Err(err) => {
                    println!("reader stopped: {err}");
                    break;
                }
            }
        }
        match checkpointer.commit(&[checkpoint(0, 1_000_000)]).await {
            Ok(()) => println!("commit accepted"),
            Err(err) => println!("commit refused: {err}"),
        }
        std::process::exit(3);
    });
}

/// Starts a holding process on the hub at `path` and waits until it holds `orders`.
fn spawn_holder(path: &std::path::Path, lease: Duration) -> TestProcess {
    let lease = lease.as_millis().to_string();
    TestProcess::spawn(
        "lease_holder_process",
        &[
            (CHILD_HUB, path.as_os_str()),
            (CHILD_LEASE_MS, lease.as_ref()),
        ],
        "holding",
    )
}

#[tokio::test]
async fn a_second_opener_is_refused_with_the_holder_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    let hub = Hub::open(&path, HubOptions::default()).unwrap();
    hub.publish(&generate::orders(100, 1)).await.unwrap();
    let held = hub.subscribe("orders", bounded()).unwrap();

    // The same handle, another handle on the file (another connection): both refused, with
    // the holding process named.
    let other = Hub::open(&path, options(Duration::from_secs(10), Duration::ZERO)).unwrap();
    for opener in [&hub, &other] {
        let err = opener.subscribe("orders", bounded()).unwrap_err();
        match &err {
            HubError::Held {
                subscription,
                holder,
                ..
            } => {
                assert_eq!(subscription, "orders");
                assert_eq!(holder.pid, std::process::id());
                assert!(!holder.host.is_empty());
            }
            other => panic!("{other:?}"),
        }
        let message = err.to_string();
        assert!(
            message.contains(&format!("process {}", std::process::id())),
            "{message}"
        );
        assert!(message.contains("one owner at a time"), "{message}");
    }
    // A waiting opener waits its time, then is refused the same way.
    let waiting = Hub::open(
        &path,
        options(Duration::from_secs(10), Duration::from_millis(300)),
    )
    .unwrap();
    let started = Instant::now();
    let err = waiting
        .subscribe_waiting("orders", bounded())
        .await
        .unwrap_err();
    assert!(matches!(err, HubError::Held { .. }), "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    // Other subscriptions, and transient readers of this one, are not affected.
    drop(other.subscribe("another", bounded()).unwrap());
    let peek = SubscriptionOptions {
        transient: true,
        ..bounded()
    };
    drop(other.subscribe("orders", peek).unwrap());

    // Closing releases the lease at once.
    drop(held);
    drop(other.subscribe("orders", bounded()).unwrap());
}

#[tokio::test]
async fn a_waiting_opener_gets_the_subscription_when_its_holder_closes_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    let hub = Hub::open(
        &path,
        options(Duration::from_secs(10), Duration::from_secs(20)),
    )
    .unwrap();
    let held = hub.subscribe("orders", bounded()).unwrap();
    let closer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(held);
    });
    let started = Instant::now();
    let sub = hub.subscribe_waiting("orders", bounded()).await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "{waited:?}: got it when it was released, long before its lease would expire"
    );
    closer.await.unwrap();
    drop(sub);
}

#[test]
fn a_killed_holder_is_taken_over_at_once_on_its_machine() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    drop(Hub::open(&path, HubOptions::default()).unwrap());
    // A long lease: only seeing that the holder is gone can explain a quick takeover.
    let mut child = spawn_holder(&path, Duration::from_secs(60));
    let hub = Hub::open(&path, HubOptions::default()).unwrap();
    let err = hub.subscribe("orders", bounded()).unwrap_err();
    assert!(
        err.to_string().contains(&format!("process {}", child.id())),
        "{err}"
    );
    child.kill(); // SIGKILL: no release
    let started = Instant::now();
    drop(hub.subscribe("orders", bounded()).unwrap());
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_frozen_holder_is_taken_over_when_its_lease_expires_and_then_stops() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    let lease = Duration::from_millis(1_500);
    drop(Hub::open(&path, HubOptions::default()).unwrap());
    let mut child = spawn_holder(&path, lease);
    let runtime = two_threads();
    let hub = Hub::open(&path, options(lease, Duration::from_secs(30))).unwrap();
    runtime.block_on(async {
        // The holder reads and commits while it runs.
        hub.publish(&generate::orders(200, 2)).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while hub.lag("orders").unwrap() > 0 {
            assert!(
                Instant::now() < deadline,
                "the holder commits what it reads"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    // Frozen: alive, but no longer renewing. Until its lease expires it keeps the subscription.
    child.signal("-STOP");
    let frozen = Instant::now();
    let err = hub.subscribe("orders", bounded()).unwrap_err();
    assert!(matches!(err, HubError::Held { ref holder, .. } if holder.pid == child.id()));
    let sub = runtime
        .block_on(hub.subscribe_waiting("orders", bounded()))
        .unwrap();
    let waited = frozen.elapsed();
    assert!(
        waited >= lease / 2 && waited <= lease + Duration::from_secs(1),
        "taken over when the lease expired: {waited:?} (lease {lease:?})"
    );
    // The new owner commits; the old one, thawed, finds it has lost the subscription: its
    // reader stops with an error and its checkpointer refuses to commit.
    let (_reader, mut checkpointer) = sub.split();
    runtime
        .block_on(checkpointer.commit(&[checkpoint(0, 0)]))
        .unwrap();
    child.signal("-CONT");
    let status = child.wait(Duration::from_secs(10));
    let rest = child.output();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(3),
        "the old holder stopped ({status:?}): {rest}"
    );
    assert!(rest.contains("reader stopped:"), "{rest}");
    assert!(
        rest.contains("subscription `orders` is no longer owned by this process"),
        "{rest}"
    );
    assert!(
        rest.contains(&format!("process {} on host", std::process::id())),
        "names the new holder: {rest}"
    );
    assert!(rest.contains("commit refused"), "{rest}");
    assert!(!rest.contains("commit accepted"), "{rest}");
    // Its refused commit changed nothing.
    let stats = hub.stats().unwrap();
    let orders = stats
        .subscriptions
        .iter()
        .find(|s| s.name == "orders")
        .unwrap();
    assert!(
        orders.partitions.iter().all(|(_, offset)| *offset <= 200),
        "{orders:?}"
    );
}

const CHILD_PROCESSOR_HUB: &str = "FLOODWAY_TEST_PROCESSOR_HUB";

/// Not a test of its own: a processor holding the subscription `orders` (lease 1.5 s), whose
/// sink takes 100 ms a call and prints the wall-clock time each call starts, so that the
/// source reads ahead of it, and which commits once a minute; when its run ends it prints why
/// and exits with status 3.
#[test]
fn processor_holder_process() {
    let Ok(path) = std::env::var(CHILD_PROCESSOR_HUB) else {
        return;
    };
    let runtime = two_threads();
    runtime.block_on(async move {
        let lease = Duration::from_millis(1_500);
        let hub = Hub::open(&path, options(lease, Duration::ZERO)).unwrap();
        let live = SubscriptionOptions {
            poll: Duration::from_millis(20),
            ..Default::default()
        };
        let (reader, checkpointer) = hub.subscribe("orders", live).unwrap().split();
        println!("holding");
        run_then_exit(slow_printing_processor(50), reader, checkpointer).await;
    });
}

/// A processor frozen past its lease and taken over does not process, once thawed, the
/// batches it read before (waiting to be dispatched): only what was under way finishes, and
/// its run ends (invariant 7). Without the check, the two buffered batches (100 records)
/// were processed by both owners.
#[test]
fn a_processor_taken_over_while_frozen_dispatches_nothing_it_read_before() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    let lease = Duration::from_millis(1_500);
    let hub = Hub::open(&path, options(lease, Duration::from_secs(30))).unwrap();
    let runtime = two_threads();
    runtime
        .block_on(hub.publish(&generate::orders(3_000, 5)))
        .unwrap();
    // Under way: its sink has been called, and its source has read ahead.
    let mut child = TestProcess::spawn(
        "processor_holder_process",
        &[(CHILD_PROCESSOR_HUB, path.as_os_str())],
        "sink call",
    );
    std::thread::sleep(Duration::from_millis(300));
    child.signal("-STOP");
    let sub = runtime
        .block_on(hub.subscribe_waiting("orders", bounded()))
        .unwrap();
    let thawed = floodway::event::now_millis();
    child.signal("-CONT");
    let status = child.wait(Duration::from_secs(20));
    drop(sub);
    let rest = child.output();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(3),
        "its run ended ({status:?}): {rest}"
    );
    assert!(rest.contains("no longer owned by this process"), "{rest}");
    let after = calls_since(&rest, thawed);
    // What was dispatched before the freeze may still start its call (at most the 50 in
    // flight); nothing read and not yet dispatched does.
    assert!(after < 50, "{after} sink calls after the takeover:\n{rest}");
}

#[tokio::test]
async fn a_checkpoint_never_moves_backward() {
    let dir = tempfile::tempdir().unwrap();
    let hub = open_with(dir.path(), partitions(2));
    hub.publish(&generate::orders(200, 3)).await.unwrap();
    let (_reader, mut checkpointer) = hub.subscribe("orders", bounded()).unwrap().split();
    checkpointer
        .commit(&[checkpoint(0, 50), checkpoint(1, 40)])
        .await
        .unwrap();
    // An older commit (a late one, a second writer) changes nothing...
    checkpointer
        .commit(&[checkpoint(0, 20), checkpoint(1, 41)])
        .await
        .unwrap();
    let stored = |hub: &Hub| hub.stats().unwrap().subscriptions[0].partitions.clone();
    assert_eq!(stored(&hub), vec![(0, 50), (1, 41)]);
    drop((_reader, checkpointer));
    // ...while a reset, a decision to read again, moves it back on purpose.
    let reset = SubscriptionOptions {
        reset: true,
        ..bounded()
    };
    drop(hub.subscribe("orders", reset).unwrap());
    assert_eq!(stored(&hub), vec![(0, 0), (1, 0)]);
}

#[tokio::test]
async fn stats_name_the_holder_and_a_held_subscription_cannot_be_removed() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::open(dir.path().join("hub.db"), HubOptions::default()).unwrap();
    let held = hub.subscribe("orders", bounded()).unwrap();
    let stats = hub.stats().unwrap();
    let holder = stats.subscriptions[0].holder.as_ref().unwrap();
    assert_eq!(holder.pid, std::process::id());
    assert!(matches!(
        hub.unsubscribe("orders"),
        Err(HubError::Held { .. })
    ));
    drop(held);
    assert!(hub.stats().unwrap().subscriptions[0].holder.is_none());
    assert!(hub.unsubscribe("orders").unwrap());
    assert!(hub.stats().unwrap().subscriptions.is_empty());
    assert!(!hub.unsubscribe("orders").unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_cannot_renew_pauses_until_it_can_and_then_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    let lease = Duration::from_millis(300);
    let hub = Hub::open(&path, options(lease, Duration::ZERO)).unwrap();
    hub.publish(&generate::orders(100, 4)).await.unwrap();
    let (mut reader, _checkpointer) = hub.subscribe("orders", bounded()).unwrap().split();
    // Another process holds the write lock for longer than the lease: no renewal gets through.
    let locker = rusqlite::Connection::open(&path).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();
    tokio::time::sleep(lease * 2).await;
    // Not renewed for a lease time: another process might own it now, so nothing is handed out.
    let read = tokio::spawn(async move {
        let batch = reader.next_batch(10).await.map(|b| b.map(|b| b.len()));
        (batch, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !read.is_finished(),
        "a holder unsure of its lease reads nothing"
    );
    let released = Instant::now();
    locker.execute_batch("COMMIT").unwrap();
    // Nobody took it over: the next renewal finds the lease still its own, and reading goes on.
    let (batch, at) = read.await.unwrap();
    assert_eq!(batch.unwrap(), Some(10));
    assert!(at >= released);
    drop(locker);
    assert!(matches!(
        hub.subscribe("orders", bounded()),
        Err(HubError::Held { .. })
    ));
}
