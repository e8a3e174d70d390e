//! Rows in the hub file: any permutation and repetition of a set of update requests leaves
//! the same rows (a property test through SQLite), and the outbox holds one change per change
//! of a row, written with it.

use floodway::idempotence::Version;
use floodway::rows::{Latest, Outcome, RowKey, RowQuery, Update};
use floodway_embedded::{Hub, HubOptions};
use proptest::prelude::*;
use serde_json::{json, Map};

fn version(t: i64, i: usize) -> Version {
    Version {
        timestamp: t,
        id: format!("e{i}"),
    }
}

/// Requests of every kind over three rows of partition `pk`: `a` per field (sets, removes, set
/// elements, deletions), `b` per row (whole-row puts and deletions), `c` counters beside
/// values.
fn requests(pk: &str, ops: &[(u8, i64, u8, i64, u8)]) -> Vec<Update> {
    ops.iter()
        .enumerate()
        .map(|(i, &(row, t, field, n, op))| {
            let sk = ["a", "b", "c"][row as usize];
            let key = RowKey::new(pk, sk);
            let u = Update::new(key.clone(), version(t, i));
            let f = format!("f{field}");
            match (row, op) {
                (0, 0) => u.set(f, n).discriminator(format!("d{n}")),
                (0, 1) => u.remove(f),
                (0, 2) => u.add("tags", json!([n])),
                (0, 3) => u.delete("tags", json!([n])),
                (0, _) => u.delete_row(),
                (1, 4) => u.delete_row().latest(Latest::Row),
                (1, _) => {
                    let mut fields = Map::new();
                    fields.insert(f, n.into());
                    Update::put(key, version(t, i), fields)
                }
                (_, 0 | 1) => u.add("count", n),
                _ => u.set(f, n),
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn any_order_and_repetition_give_the_same_rows(
        ops in prop::collection::vec((0..3u8, 0..4i64, 0..3u8, 0..3i64, 0..5u8), 1..16),
        seed in any::<u64>(),
        batch in 1..6usize,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let hub = Hub::open(dir.path().join("rows.db"), HubOptions::default()).unwrap();
        let table = hub.rows("t").unwrap();
        let mut sorted = requests("sorted", &ops);
        sorted.sort_by(|a, b| a.version.cmp(&b.version));
        for u in &sorted {
            table.apply(std::slice::from_ref(u)).unwrap();
        }
        let mut shuffled = requests("shuffled", &ops);
        let mut rng = fastrand::Rng::with_seed(seed);
        rng.shuffle(&mut shuffled);
        let repeats: Vec<Update> = (0..3).map(|_| shuffled[rng.usize(..shuffled.len())].clone()).collect();
        shuffled.extend(repeats);
        for chunk in shuffled.chunks(batch) {
            let outcomes = table.apply(chunk).unwrap();
            prop_assert!(outcomes.iter().all(|o| !matches!(o, Outcome::Faulted(_))));
        }
        let rows = |pk: &str| -> Vec<_> {
            table
                .query(&RowQuery::partition(pk, 10))
                .unwrap()
                .into_iter()
                .map(|r| (r.key.sk.clone(), r.fields, r.discriminator, r.version))
                .collect()
        };
        prop_assert_eq!(rows("shuffled"), rows("sorted"));
    }
}

#[test]
fn the_outbox_holds_each_change_with_its_row() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::open(dir.path().join("rows.db"), HubOptions::default()).unwrap();
    let table = hub.rows("orders").unwrap().with_outbox();
    let key = || RowKey::new("o1", "order");
    let outcomes = table
        .apply(&[
            Update::new(key(), version(1, 1))
                .set("status", "placed")
                .discriminator("order"),
            Update::new(key(), version(2, 2)).set("status", "paid"),
            // The same value again: the row's time moves, what it shows does not.
            Update::new(key(), version(3, 3)).set("status", "paid"),
            Update::new(key(), version(4, 4)).delete_row(),
        ])
        .unwrap();
    assert_eq!(
        outcomes,
        [
            Outcome::Written { changed: true },
            Outcome::Written { changed: true },
            Outcome::Written { changed: false },
            Outcome::Written { changed: true },
        ]
    );
    let pending = hub.outbox().unwrap().pending(10).unwrap();
    let types: Vec<&str> = pending.iter().map(|p| p.event.event_type()).collect();
    assert_eq!(types, ["order-created", "order-updated", "order-deleted"]);
    let updated = &pending[1].event;
    assert_eq!(updated.partition_key(), "o1");
    assert_eq!(updated.fields()["raw"]["old"]["status"], "placed");
    assert_eq!(updated.fields()["raw"]["new"]["status"], "paid");
    assert_eq!(updated.fields()["keys"], json!({"pk": "o1", "sk": "order"}));
    assert!(pending[2].event.fields()["raw"].get("new").is_none());
    // A service's transaction: a row and an event of its own, together.
    let placed = floodway::Event::builder("order-placed", "o2").build();
    let (_, outcomes) = table
        .transaction(|tx| {
            tx.put(RowKey::new("o2", "order"), version(5, 5), Map::new())
                .emit(placed.clone());
            Ok::<_, floodway_embedded::HubError>(())
        })
        .unwrap();
    assert_eq!(outcomes, [Outcome::Written { changed: true }]);
    let stats = hub.outbox().unwrap().stats().unwrap();
    assert_eq!(stats.pending(), 5);
    // A transaction that fails writes nothing.
    let failed: Result<((), _), floodway_embedded::HubError> = table.transaction(|tx| {
        tx.emit(placed.clone());
        Err(floodway_embedded::HubError::Invalid("no".into()))
    });
    assert!(failed.is_err());
    assert_eq!(hub.outbox().unwrap().stats().unwrap().pending(), 5);
    // So does one with an update the store refuses: its event is not emitted either.
    let mut bad = Map::new();
    bad.insert("timestamp".into(), json!(1));
    let refused = table.transaction(|tx| {
        tx.put(RowKey::new("o3", "order"), version(6, 6), bad.clone())
            .emit(placed.clone());
        Ok::<_, floodway_embedded::HubError>(())
    });
    assert!(refused.is_err());
    assert_eq!(hub.outbox().unwrap().stats().unwrap().pending(), 5);
    assert!(table.get(&RowKey::new("o3", "order")).unwrap().is_none());
    // An event the relay could not publish is refused with its transaction, as poison,
    // rather than stored where it would stop the relay: one without an id, one over 1 MiB,
    // and a row's change over 1 MiB (its old and new rows side by side).
    let nameless = floodway::Event::builder("order-placed", "o4")
        .id("")
        .build();
    let huge = floodway::Event::builder("order-placed", "o4")
        .field("note", "x".repeat(1024 * 1024))
        .build();
    for event in [nameless, huge] {
        let refused = table.transaction(|tx| {
            tx.put(RowKey::new("o4", "order"), version(7, 7), Map::new())
                .emit(event.clone());
            Ok::<_, floodway_embedded::HubError>(())
        });
        let err = refused.unwrap_err();
        assert!(
            matches!(err, floodway_embedded::HubError::Invalid(_)),
            "{err}"
        );
        assert!(
            err.to_string().contains("cannot go through the outbox"),
            "{err}"
        );
    }
    let mut big = Map::new();
    big.insert("note".into(), json!("y".repeat(700 * 1024)));
    let key = RowKey::new("o5", "order");
    table
        .apply(&[Update::new(key.clone(), version(8, 8)).set("note", big["note"].clone())])
        .unwrap();
    let refused =
        table.apply(&[Update::new(key.clone(), version(9, 9)).set("note", "z".repeat(700 * 1024))]);
    assert!(matches!(
        refused,
        Err(floodway_embedded::HubError::Invalid(_))
    ));
    assert!(table.get(&RowKey::new("o4", "order")).unwrap().is_none());
    // What was stored before is all there, each event one the relay can publish.
    let pending = hub.outbox().unwrap().pending(100).unwrap();
    assert_eq!(pending.len(), 6, "the five before and o5's creation");
}

/// Row tables `x` and `x_expires` live side by side (tables and indexes share SQLite's names),
/// also in a file made by a build that named the first one's index `rows_x_expires`.
#[test]
fn a_row_table_named_like_anothers_index_opens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rows.db");
    let hub = Hub::open(&path, HubOptions::default()).unwrap();
    hub.rows("x").unwrap();
    let earlier = rusqlite::Connection::open(&path).unwrap();
    earlier
        .execute_batch(
            "DROP INDEX \"rows_x.expires\"; \
             CREATE INDEX rows_x_expires ON rows_x (expires) WHERE expires IS NOT NULL",
        )
        .unwrap();
    // Opened first, the table named like the old index; then the one it indexed.
    let expiring = hub.rows("x_expires").unwrap();
    hub.rows("x").unwrap();
    let count = |name: &str| -> i64 {
        earlier
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .unwrap()
    };
    assert_eq!(count("rows_x_expires"), 1, "the table, no longer the index");
    assert_eq!(count("rows_x.expires"), 1);
    assert_eq!(count("rows_x_expires.expires"), 1);
    drop(expiring);
}
