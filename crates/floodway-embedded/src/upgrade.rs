//! Bringing a hub made by an earlier build up to this build's format: a version 2 hub keeps its
//! views in the hub file, where a view's transaction and publishing wait for each other's
//! write lock; version 3 keeps them in a file of their own (`schema::views_path`).
//!
//! The move is made so that a crash at any point leaves a hub that opens with all its views:
//! 1. the views file's token is stored in the hub's meta (the hub is still version 2, which
//!    ignores it), so that a move tried again recognizes the views file it left;
//! 2. holding the hub's write lock (no view or lease changes meanwhile), the views are copied
//!    into the views file in one transaction, synced;
//! 3. in the same hold, the hub's view tables are dropped and its version set to 3, synced.
//!
//! Before 3 commits, the hub is version 2 and reads its views from the hub file (a copy left
//! in the views file is ignored, and replaced by the next try); after, it is version 3 and
//! reads the copy. A process that opened the hub as version 2 writes its views into the hub
//! file, so every process using the hub must be stopped first; the move is refused while a
//! subscription's lease is in force, a safety net only (a process that reads views, or a
//! NATS hub's processors, hold none). Such a process's view opens and writes check, under the
//! write lock, that the views are still in the hub file, and fail rather than write where the
//! hub no longer reads them (`crate::view`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use crate::error::OpenError;
use crate::schema::{self, meta, VERSION, VIEWS_FILE_KEY, VIEWS_FORMAT};

/// What [`crate::Hub::upgrade`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Upgrade {
    /// The hub already had this build's format: nothing was changed.
    Current {
        /// The file that holds its views.
        views_file: PathBuf,
    },
    /// The hub's views were moved into a file of their own.
    MovedViews {
        /// The new views file.
        views_file: PathBuf,
        /// Each view moved, with its row count, in name order.
        views: Vec<(String, u64)>,
    },
}

/// Upgrades the hub at `path` (see the module's docs); `each` hears of each view as it is
/// copied (its name and row count), for progress on large views.
pub(crate) fn upgrade(
    path: &Path,
    busy_timeout: Duration,
    mut each: impl FnMut(&str, u64),
) -> Result<Upgrade, OpenError> {
    if !path.exists() {
        return Err(OpenError::NotFound {
            path: path.to_owned(),
        });
    }
    let views_file = schema::views_path(path);
    let err = |p: &Path| {
        let p = p.to_owned();
        move |source| OpenError::Sqlite {
            path: p.clone(),
            source,
        }
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut hub = Connection::open_with_flags(path, flags).map_err(err(path))?;
    hub.busy_timeout(busy_timeout).map_err(err(path))?;
    hub.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
        .map_err(err(path))?;

    // 1. The token, kept across tries.
    let tx = hub
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(err(path))?;
    if !check(&tx, path)? {
        return Ok(Upgrade::Current { views_file });
    }
    let token = match meta(&tx, VIEWS_FILE_KEY).map_err(err(path))? {
        Some(token) => token,
        None => {
            let token = format!("{:016x}", schema::random());
            tx.execute(
                "INSERT INTO floodway_meta (key, value) VALUES (?1, ?2)",
                (VIEWS_FILE_KEY, &token),
            )
            .map_err(err(path))?;
            token
        }
    };
    tx.commit().map_err(err(path))?;

    // 2. The copy, under the hub's write lock.
    let tx = hub
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(err(path))?;
    if !check(&tx, path)? {
        return Ok(Upgrade::Current { views_file });
    }
    let views: Vec<(String, String)> = {
        let mut statement = tx
            .prepare(
                "SELECT name, sql FROM sqlite_master WHERE type = 'table' \
                 AND name LIKE 'view\\_%' ESCAPE '\\' ORDER BY name",
            )
            .map_err(err(path))?;
        let rows = statement
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(err(path))?;
        rows.collect::<Result<_, _>>().map_err(err(path))?
    };
    let moved = copy_views(path, &views_file, &token, &views, busy_timeout, &mut each)?;

    // 3. The hub without its views, at version 3.
    for (table, _) in &views {
        tx.execute_batch(&format!("DROP TABLE \"{table}\""))
            .map_err(err(path))?;
    }
    tx.execute(
        "UPDATE floodway_meta SET value = ?1 WHERE key = 'version'",
        [VERSION.to_string()],
    )
    .map_err(err(path))?;
    tx.commit().map_err(err(path))?;
    tracing::info!(
        hub = %path.display(),
        views_file = %views_file.display(),
        views = moved.len(),
        "the hub's views are in a file of their own now (format version {VERSION})"
    );
    Ok(Upgrade::MovedViews {
        views_file,
        views: moved,
    })
}

/// Whether the hub in `tx` needs the move: `false` when it has this build's version, an error
/// when it is no hub of a version this build reads, or a subscription's lease is in force.
/// The text of the first column of each row `sql` answers.
fn strings(conn: &Connection, sql: &str) -> rusqlite::Result<Vec<String>> {
    let mut statement = conn.prepare(sql)?;
    let rows = statement.query_map([], |r| r.get(0))?;
    rows.collect()
}

fn check(tx: &rusqlite::Transaction<'_>, path: &Path) -> Result<bool, OpenError> {
    let err = |source| OpenError::Sqlite {
        path: path.to_owned(),
        source,
    };
    if !schema::has_table(tx, "floodway_meta").map_err(err)?
        || meta(tx, "format").map_err(err)?.as_deref() != Some(schema::FORMAT)
    {
        return Err(OpenError::Foreign {
            path: path.to_owned(),
        });
    }
    let version: i64 = meta(tx, "version")
        .map_err(err)?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if version == VERSION {
        return Ok(false);
    }
    if version != schema::VIEWS_IN_HUB {
        return Err(OpenError::Version {
            path: path.to_owned(),
            found: version,
            supported: VERSION,
        });
    }
    if schema::has_table(tx, "leases").map_err(err)? {
        let names = strings(tx, "SELECT name FROM leases ORDER BY name").map_err(err)?;
        let now = floodway::event::now_millis();
        for name in names {
            if let Some((holder, process)) = crate::lease::holder(tx, &name).map_err(err)? {
                if crate::lease::in_force(&holder, &process, now) {
                    return Err(OpenError::InUse {
                        path: path.to_owned(),
                        subscription: name,
                        holder: Box::new(holder),
                    });
                }
            }
        }
    }
    Ok(true)
}

/// Copies the tables `views` (name, `CREATE` statement) of the hub at `hub` into the views file
/// `path` in one transaction, making the file (with `token`) or taking over the one an earlier
/// try left; answers each view's row count.
fn copy_views(
    hub: &Path,
    path: &Path,
    token: &str,
    views: &[(String, String)],
    busy_timeout: Duration,
    each: &mut impl FnMut(&str, u64),
) -> Result<Vec<(String, u64)>, OpenError> {
    let err = |source| OpenError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags).map_err(err)?;
    conn.busy_timeout(busy_timeout).map_err(err)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(OpenError::ViewsFile {
            path: path.to_owned(),
            problem: format!("journal mode {mode}: views need WAL"),
        });
    }
    conn.execute_batch("PRAGMA synchronous = FULL;")
        .map_err(err)?;
    // Read through this connection, so that the copy is one statement per view.
    conn.execute(
        "ATTACH DATABASE ?1 AS hub",
        [hub.to_str().ok_or_else(|| {
            OpenError::Setting(format!("the hub's path {} is not UTF-8", hub.display()))
        })?],
    )
    .map_err(err)?;
    // Deferred: an immediate transaction would ask for the write lock of the attached hub
    // too, which the caller holds. Nothing else writes this file.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Deferred)
        .map_err(err)?;
    let tables = strings(
        &tx,
        "SELECT name FROM main.sqlite_master WHERE type = 'table' ORDER BY name",
    )
    .map_err(err)?;
    if !tables.is_empty() {
        let stored = |key: &str| {
            tx.query_row(
                "SELECT value FROM main.floodway_meta WHERE key = ?1",
                [key],
                |r| r.get::<_, String>(0),
            )
            .ok()
        };
        let ours = stored("format").as_deref() == Some(VIEWS_FORMAT)
            && stored("hub").as_deref() == Some(token);
        if !ours {
            return Err(OpenError::ViewsFile {
                path: path.to_owned(),
                problem: format!(
                    "a file that is not the views file of the hub {} is where its views would \
                     go: move it away (with its -wal and -shm files) and upgrade again",
                    hub.display()
                ),
            });
        }
        // Left by a try that did not finish: its copies are replaced.
        for table in tables.iter().filter(|t| t.starts_with("view_")) {
            tx.execute_batch(&format!("DROP TABLE main.\"{table}\""))
                .map_err(err)?;
        }
    }
    schema::mark_views_file(&tx, token).map_err(err)?;
    let mut moved = Vec::with_capacity(views.len());
    for (table, create) in views {
        // The table as the hub made it (its columns, key and `WITHOUT ROWID`), in this file.
        tx.execute_batch(create).map_err(err)?;
        let rows = tx
            .execute(
                &format!("INSERT INTO main.\"{table}\" SELECT * FROM hub.\"{table}\""),
                [],
            )
            .map_err(err)? as u64;
        let name = table.strip_prefix("view_").unwrap_or(table);
        each(name, rows);
        moved.push((name.to_owned(), rows));
    }
    tx.commit().map_err(err)?;
    conn.execute_batch("DETACH DATABASE hub").map_err(err)?;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Hub, HubOptions, SubscriptionOptions, ViewWrite};

    fn write(key: &str, timestamp: i64) -> ViewWrite {
        let version = floodway::idempotence::Version {
            timestamp,
            id: format!("e-{timestamp}"),
        };
        ViewWrite::new(key, version, timestamp.into())
    }

    fn tables(path: &Path) -> Vec<String> {
        let conn = Connection::open(path).unwrap();
        super::strings(
            &conn,
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name",
        )
        .unwrap()
    }

    fn version(path: &Path) -> String {
        meta(&Connection::open(path).unwrap(), "version")
            .unwrap()
            .unwrap()
    }

    fn keys(hub: &Hub, view: &str) -> Vec<String> {
        let rows = hub.view(view).unwrap().rows().unwrap();
        rows.into_iter().map(|r| r.key).collect()
    }

    /// A hub as a build that kept views in the hub file made it (format version 2), with
    /// two views of 3 and 1 rows.
    fn earlier_hub(dir: &Path) -> PathBuf {
        let path = dir.join("hub.db");
        drop(Hub::open(&path, HubOptions::default()).unwrap());
        schema::as_made_before(&path);
        let hub = Hub::open(&path, HubOptions::default()).unwrap();
        assert_eq!(hub.views_path(), path);
        let orders = hub.view("orders").unwrap();
        orders
            .apply(&[write("o-1", 1), write("o-2", 2), write("o-3", 3)])
            .unwrap();
        hub.view("carts")
            .unwrap()
            .apply(&[write("c-1", 1)])
            .unwrap();
        path
    }

    #[test]
    fn a_hub_made_before_gets_its_views_moved_into_a_file_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = earlier_hub(dir.path());
        let mut heard = Vec::new();
        let done = Hub::upgrade(&path, &HubOptions::default(), |view, rows| {
            heard.push((view.to_owned(), rows));
        })
        .unwrap();
        let views_file = schema::views_path(&path);
        let moved = vec![("carts".to_owned(), 1), ("orders".to_owned(), 3)];
        assert_eq!(
            done,
            Upgrade::MovedViews {
                views_file: views_file.clone(),
                views: moved.clone(),
            }
        );
        assert_eq!(heard, moved);
        assert_eq!(version(&path), VERSION.to_string());
        assert!(!tables(&path).iter().any(|t| t.starts_with("view_")));
        assert_eq!(
            tables(&views_file),
            ["floodway_meta", "view_carts", "view_orders"]
        );

        // Opened again, the hub reads and writes its views in their own file, rows and
        // versions as they were: an older write is still turned away.
        let hub = Hub::open(&path, HubOptions::default()).unwrap();
        assert_eq!(hub.views_path(), views_file);
        assert_eq!(keys(&hub, "orders"), ["o-1", "o-2", "o-3"]);
        let orders = hub.view("orders").unwrap();
        let applied = orders.apply(&[write("o-2", 1), write("o-4", 4)]).unwrap();
        assert_eq!((applied.written, applied.stale), (1, 1));
        assert_eq!(keys(&hub, "orders"), ["o-1", "o-2", "o-3", "o-4"]);
        assert!(!tables(&path).iter().any(|t| t.starts_with("view_")));

        // Once is enough.
        let again = Hub::upgrade(&path, &HubOptions::default(), |_, _| {
            panic!("nothing to copy")
        })
        .unwrap();
        assert_eq!(again, Upgrade::Current { views_file });
    }

    #[test]
    fn a_move_cut_short_leaves_the_views_where_they_were_and_the_next_finishes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = earlier_hub(dir.path());
        // The first two steps, as a move that stopped before the hub's commit leaves them.
        let token = "0123456789abcdef";
        Connection::open(&path)
            .unwrap()
            .execute(
                "INSERT INTO floodway_meta (key, value) VALUES (?1, ?2)",
                (VIEWS_FILE_KEY, token),
            )
            .unwrap();
        let views = vec![(
            "view_orders".to_owned(),
            Connection::open(&path)
                .unwrap()
                .query_row(
                    "SELECT sql FROM sqlite_master WHERE name = 'view_orders'",
                    [],
                    |r| r.get(0),
                )
                .unwrap(),
        )];
        let views_file = schema::views_path(&path);
        copy_views(
            &path,
            &views_file,
            token,
            &views,
            Duration::from_secs(1),
            &mut |_, _| {},
        )
        .unwrap();

        // The hub is still version 2 and keeps using the views in its own file.
        let hub = Hub::open(&path, HubOptions::default()).unwrap();
        assert_eq!(hub.views_path(), path);
        hub.view("orders")
            .unwrap()
            .apply(&[write("o-9", 9)])
            .unwrap();
        drop(hub);

        // The next move replaces the copy left behind, with what was written since.
        let done = Hub::upgrade(&path, &HubOptions::default(), |_, _| {}).unwrap();
        let Upgrade::MovedViews { views, .. } = done else {
            panic!("moved: {done:?}")
        };
        assert_eq!(views, [("carts".to_owned(), 1), ("orders".to_owned(), 4)]);
        let hub = Hub::open(&path, HubOptions::default()).unwrap();
        assert_eq!(keys(&hub, "orders"), ["o-1", "o-2", "o-3", "o-9"]);
        assert_eq!(keys(&hub, "carts"), ["c-1"]);
    }

    #[test]
    fn a_hub_in_use_is_not_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let path = earlier_hub(dir.path());
        let hub = Hub::open(&path, HubOptions::default()).unwrap();
        let orders = hub.view("orders").unwrap();
        let subscription = hub
            .subscribe("materializer", SubscriptionOptions::default())
            .unwrap();
        let err = Hub::upgrade(&path, &HubOptions::default(), |_, _| {}).unwrap_err();
        assert!(
            matches!(&err, OpenError::InUse { subscription, .. } if subscription == "materializer"),
            "{err}"
        );
        assert!(err.to_string().contains("stop the processes"), "{err}");
        assert_eq!(version(&path), "2");
        assert!(tables(&path).contains(&"view_orders".to_owned()));

        // Stopped, it is.
        drop(subscription);
        assert!(matches!(
            Hub::upgrade(&path, &HubOptions::default(), |_, _| {}),
            Ok(Upgrade::MovedViews { .. })
        ));
        // A process that opened the hub before the move does not write views where the hub
        // no longer reads them: neither through a view it had open, nor one it opens now.
        let err = orders.apply(&[write("o-5", 5)]).unwrap_err();
        assert!(matches!(err, crate::HubError::Changed(_)), "{err}");
        let err = hub.view("carts").unwrap_err();
        assert!(err.to_string().contains("open the hub again"), "{err}");
        assert!(!tables(&path).iter().any(|t| t.starts_with("view_")));
        let hub = Hub::open(&path, HubOptions::default()).unwrap();
        assert_eq!(keys(&hub, "orders"), ["o-1", "o-2", "o-3"]);
    }

    #[test]
    fn a_file_of_another_hub_where_the_views_would_go_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = earlier_hub(dir.path());
        let views_file = schema::views_path(&path);
        // Another hub's views file, copied here.
        let other = dir.path().join("other.db");
        drop(Hub::open(&other, HubOptions::default()).unwrap());
        std::fs::copy(schema::views_path(&other), &views_file).unwrap();
        let err = Hub::upgrade(&path, &HubOptions::default(), |_, _| {}).unwrap_err();
        assert!(
            matches!(&err, OpenError::ViewsFile { path, .. } if *path == views_file),
            "{err}"
        );
        assert_eq!(version(&path), "2");
        let hub = Hub::open(&path, HubOptions::default()).unwrap();
        assert_eq!(keys(&hub, "orders"), ["o-1", "o-2", "o-3"]);
    }

    #[test]
    fn no_hub_and_a_foreign_file_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.db");
        assert!(matches!(
            Hub::upgrade(&missing, &HubOptions::default(), |_, _| {}),
            Err(OpenError::NotFound { .. })
        ));
        assert!(!missing.exists());
        let foreign = dir.path().join("foreign.db");
        Connection::open(&foreign)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        assert!(matches!(
            Hub::upgrade(&foreign, &HubOptions::default(), |_, _| {}),
            Err(OpenError::Foreign { .. })
        ));
    }
}
