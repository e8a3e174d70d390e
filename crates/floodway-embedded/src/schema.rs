//! The hub file: opening it, its tables, and its format version.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::error::OpenError;
use crate::options::Durability;

/// What a hub file says it is.
pub(crate) const FORMAT: &str = "floodway-hub";
/// The version of the tables this build writes.
/// Version 3 keeps the views in a file of their own ([`views_path`]); version 2 keeps them in
/// the hub file, and stores the log in segments (`crate::segment`); version 1 had a row per
/// event. A build that reads only version 2 refuses a version 3 hub rather than write views
/// where this one would never read them.
pub(crate) const VERSION: i64 = 3;

/// The version that keeps its views in the hub file, which `floodway hub upgrade` brings to
/// [`VERSION`] (`crate::upgrade`).
pub(crate) const VIEWS_IN_HUB: i64 = 2;

/// The oldest version this build reads (and keeps as it is).
const OLDEST_READ: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE floodway_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
-- The log, in segments: a row holds the events `offset..=last` of a partition (offsets from
-- 1), all published in one commit; `data` is each event's length (4 bytes, little-endian) and
-- JSON text.
CREATE TABLE events (
    partition INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    last INTEGER NOT NULL,
    published INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (partition, offset)
);
-- The last offset given out per partition: it never goes back, even when retention empties
-- a partition, so checkpoints stay meaningful.
CREATE TABLE partitions (
    partition INTEGER PRIMARY KEY,
    last_offset INTEGER NOT NULL,
    bytes INTEGER NOT NULL DEFAULT 0 -- event data held, kept by publish and retention
);
-- Ids of events published with an idempotency key, for the dedupe window (pruned by time:
-- `dedupe_by_time`).
CREATE TABLE dedupe (id TEXT PRIMARY KEY, published INTEGER NOT NULL) WITHOUT ROWID;
-- Per subscription and partition, the offset through which everything is done.
CREATE TABLE subscriptions (
    name TEXT NOT NULL,
    partition INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    PRIMARY KEY (name, partition)
) WITHOUT ROWID;
-- Fault events, by id, with what people filter them by.
CREATE TABLE faults (
    id TEXT PRIMARY KEY,
    processor TEXT NOT NULL,
    pipeline TEXT NOT NULL,
    step TEXT NOT NULL,
    name TEXT NOT NULL,
    class TEXT NOT NULL,
    message TEXT NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    seen INTEGER NOT NULL,
    status TEXT NOT NULL,
    fault TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX faults_by_time ON faults (last_seen);
-- Resubmissions of faults and how they ended.
CREATE TABLE resubmissions (
    fault TEXT NOT NULL,
    at INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL,
    PRIMARY KEY (fault, at)
) WITHOUT ROWID;
-- Events applied to each row table (the inbox), written in its transaction: `crate::rows`.
";

/// The inbox, by the start (ms since the epoch) of the inbox window each event was applied in,
/// so that the oldest windows are a prefix of the table, deleted in key order.
const INBOX: &str = "
CREATE TABLE inbox (
    bucket INTEGER NOT NULL DEFAULT 0,
    view TEXT NOT NULL,
    event TEXT NOT NULL,
    PRIMARY KEY (bucket, view, event)
) WITHOUT ROWID;
";

/// Tables and indexes added to the format after its first files were written: created when a
/// file without them is opened (an older build of the same format ignores them).
const ADDED: &str = "
-- Who owns each subscription (`crate::lease`).
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,   -- host/pid/random, one per opened subscription
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    process TEXT NOT NULL,  -- pid namespace and start time: tells a process gone from a live one
    acquired INTEGER NOT NULL,
    expires INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedupe_by_time ON dedupe (published);
-- Resubmissions under way: one claimant per fault until its resubmission is recorded or
-- `until` (ms since the epoch) passes (`crate::faults`).
CREATE TABLE IF NOT EXISTS fault_claims (
    fault TEXT PRIMARY KEY,
    claimant TEXT NOT NULL,
    until INTEGER NOT NULL
) WITHOUT ROWID;
";

/// Brings a hub file of this format up to what this build writes.
fn add_missing(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    let inbox: i64 = tx.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'inbox'",
        [],
        |r| r.get(0),
    )?;
    let bucketed: i64 = tx.query_row(
        "SELECT count(*) FROM pragma_table_info('inbox') WHERE name = 'bucket'",
        [],
        |r| r.get(0),
    )?;
    if inbox > 0 && bucketed == 0 {
        // An inbox without windows, which nothing pruned. Its rows only told a duplicate from a
        // stale event: the views' latest-wins versions turn both away, so it starts empty.
        tx.execute_batch("DROP TABLE inbox;")?;
    }
    if bucketed == 0 {
        tx.execute_batch(INBOX)?;
    }
    // Views kept inbox rows too, until their rows' versions took that work over. What they
    // left is deleted once (the row tables' entries are named `rows:<table>`).
    let cleared: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM floodway_meta WHERE key = 'views_inbox')",
        [],
        |r| r.get(0),
    )?;
    if !cleared {
        tx.execute_batch(
            "DELETE FROM inbox WHERE view NOT LIKE 'rows:%'; \
             INSERT INTO floodway_meta (key, value) VALUES ('views_inbox', 'none');",
        )?;
    }
    tx.execute_batch(ADDED)
}

fn sqlite_error(path: &Path, source: rusqlite::Error) -> OpenError {
    match &source {
        rusqlite::Error::SqliteFailure(e, detail)
            if matches!(
                e.code,
                rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt
            ) =>
        {
            OpenError::NotADatabase {
                path: path.to_owned(),
                detail: detail.clone().unwrap_or_else(|| e.to_string()),
            }
        }
        _ => OpenError::Sqlite {
            path: path.to_owned(),
            source,
        },
    }
}

/// WAL pages after which a commit asks for a checkpoint (32 MiB of 4 KiB pages).
pub(crate) const CHECKPOINT_PAGES: i32 = 8192;

/// Opens a connection to an existing hub file, with the settings every connection uses.
pub(crate) fn connect(
    path: &Path,
    durability: Durability,
    busy_timeout: Duration,
    page_cache_kib: u32,
    checkpoints: &WalCheckpoints,
) -> Result<Connection, OpenError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags).map_err(|e| sqlite_error(path, e))?;
    configure(
        &mut conn,
        durability,
        busy_timeout,
        page_cache_kib,
        Some(checkpoints),
    )
    .map_err(|e| sqlite_error(path, e))?;
    Ok(conn)
}

/// Copies the WAL back into the database file on a thread of its own, so that no writer does
/// it while the others wait for their turn (SQLite's automatic checkpoint runs inside the commit
/// that crosses the threshold). Commits on this process's connections wake it once the WAL
/// holds [`CHECKPOINT_PAGES`]; it runs a passive checkpoint, which never blocks readers or
/// writers. Every process that writes to the hub has one; SQLite lets one checkpoint run at a
/// time, and one that finds another running simply skips.
#[derive(Clone)]
pub(crate) struct WalCheckpoints {
    wake: mpsc::SyncSender<()>,
}

impl WalCheckpoints {
    /// Starts the checkpointing thread for the hub file at `path`; it ends when the last
    /// connection holding a handle is gone.
    pub(crate) fn start(path: &Path) -> Result<WalCheckpoints, OpenError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn =
            Connection::open_with_flags(path, flags).map_err(|e| sqlite_error(path, e))?;
        // A checkpoint copies WAL frames into the file: it needs no page cache of its own.
        configure(
            &mut conn,
            Durability::Immediate,
            Duration::from_secs(10),
            2 * 1024,
            None,
        )
        .map_err(|e| sqlite_error(path, e))?;
        let (wake, woken) = mpsc::sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("floodway-hub-checkpoint".into())
            .spawn(move || {
                while woken.recv().is_ok() {
                    if let Err(err) =
                        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::warn!(error = %err, "hub WAL checkpoint failed");
                    }
                }
            })
            .map_err(|e| OpenError::Setting(format!("cannot start the checkpoint thread: {e}")))?;
        Ok(WalCheckpoints { wake })
    }

    fn install(&self, conn: &mut Connection) -> rusqlite::Result<()> {
        let wake = self.wake.clone();
        conn.wal_hook(Some(
            move |_: &mut rusqlite::hooks::Wal, pages: std::ffi::c_int| {
                if pages >= CHECKPOINT_PAGES {
                    // Full means a checkpoint is already asked for.
                    let _ = wake.try_send(());
                }
                Ok(())
            },
        ))
    }
}

fn configure(
    conn: &mut Connection,
    durability: Durability,
    busy_timeout: Duration,
    page_cache_kib: u32,
    checkpoints: Option<&WalCheckpoints>,
) -> rusqlite::Result<()> {
    // Several processes share the file: wait for each other's write locks (and, past this,
    // the writes retry: `crate::busy`).
    conn.busy_timeout(busy_timeout)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "journal mode {mode}: the hub needs WAL"
        )));
    }
    let sync = match durability {
        Durability::Immediate => "FULL",
        Durability::Relaxed => "NORMAL",
    };
    // 32 MiB of page cache per connection by default (SQLite's is 2 MiB): views, row tables and
    // the inbox are written in key order, not insertion order, and must not go to disk for
    // every row (`HubOptions::page_cache_kib`). The WAL is checkpointed every 32 MiB rather
    // than every 4 MiB, so a page written many times in a burst is copied to the database
    // once, and trimmed back to 64 MiB afterwards; the checkpoints run on their own thread
    // (`WalCheckpoints`), not in a writer's commit.
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {sync}; PRAGMA cache_size = -{page_cache_kib}; \
         PRAGMA temp_store = MEMORY; PRAGMA journal_size_limit = 67108864;"
    ))?;
    // The hook replaces SQLite's automatic checkpoint; a connection without one (the
    // checkpointing thread's own) checkpoints nothing by itself.
    match checkpoints {
        Some(checkpoints) => checkpoints.install(conn)?,
        None => conn.execute_batch("PRAGMA wal_autocheckpoint = 0;")?,
    }
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

/// A hub file, opened.
pub(crate) struct Opened {
    /// The writing connection.
    pub(crate) conn: Connection,
    /// The partition count.
    pub(crate) partitions: u32,
    /// The file's checkpointing thread.
    pub(crate) checkpoints: WalCheckpoints,
    /// The file of the hub's views and its checkpointing thread, for a hub made with one
    /// ([`views_path`]); `None` for a hub that keeps its views in its own file.
    pub(crate) views: Option<(std::path::PathBuf, WalCheckpoints)>,
}

/// The `floodway_meta` key of the longest idempotency window (ms) the hub was opened with
/// (written when it is opened; the log prunes its keys by it).
pub(crate) const DEDUPE_WINDOW_KEY: &str = "dedupe_window_ms";

/// Opens (creating it if asked) a hub file, and the file of its views when it has one.
pub(crate) fn open(
    path: &Path,
    create: bool,
    partitions: Option<u32>,
    durability: Durability,
    busy_timeout: Duration,
    page_cache_kib: u32,
    dedupe_window: Duration,
) -> Result<Opened, OpenError> {
    if !path.exists() && !create {
        return Err(OpenError::NotFound {
            path: path.to_owned(),
        });
    }
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let mut conn = Connection::open_with_flags(path, flags).map_err(|e| sqlite_error(path, e))?;
    configure(&mut conn, durability, busy_timeout, page_cache_kib, None)
        .map_err(|e| sqlite_error(path, e))?;
    let err = |e| sqlite_error(path, e);
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(err)?;
    let has_meta = has_table(&tx, "floodway_meta").map_err(err)?;
    let (found, own_views) = if has_meta {
        let meta = |key: &str| meta(&tx, key);
        if meta("format").map_err(err)?.as_deref() != Some(FORMAT) {
            return Err(OpenError::Foreign {
                path: path.to_owned(),
            });
        }
        let version: i64 = meta("version")
            .map_err(err)?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if !(OLDEST_READ..=VERSION).contains(&version) {
            return Err(OpenError::Version {
                path: path.to_owned(),
                found: version,
                supported: VERSION,
            });
        }
        let stored: u32 = meta("partitions")
            .map_err(err)?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if stored == 0 {
            return Err(OpenError::NotADatabase {
                path: path.to_owned(),
                detail: "the hub's partition count is missing".into(),
            });
        }
        if let Some(asked) = partitions.filter(|a| *a != stored) {
            return Err(OpenError::Partitions {
                path: path.to_owned(),
                found: stored,
                asked,
            });
        }
        // Version 2 keeps its views in this file; version 3 beside it.
        let own_views = version == VERSION;
        if !own_views {
            tracing::info!(
                hub = %path.display(),
                "this hub keeps its views in the hub file (format version {version}), where \
                 views and publishing wait for each other; `floodway hub upgrade` moves them \
                 into a file of their own"
            );
        }
        if own_views {
            let token =
                meta(VIEWS_FILE_KEY)
                    .map_err(err)?
                    .ok_or_else(|| OpenError::NotADatabase {
                        path: path.to_owned(),
                        detail: "the token of the hub's views file is missing".into(),
                    })?;
            open_views(path, &token, false, busy_timeout)?;
        }
        (stored, own_views)
    } else {
        let tables: i64 = tx
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
                [],
                |r| r.get(0),
            )
            .map_err(err)?;
        if tables > 0 {
            return Err(OpenError::Foreign {
                path: path.to_owned(),
            });
        }
        let count = partitions.unwrap_or(crate::options::DEFAULT_PARTITIONS);
        if count == 0 || count > 4096 {
            return Err(OpenError::Setting(format!(
                "partitions must be between 1 and 4096, not {count}"
            )));
        }
        tx.execute_batch(SCHEMA).map_err(err)?;
        for p in 0..count {
            tx.execute(
                "INSERT INTO partitions (partition, last_offset) VALUES (?1, 0)",
                [p],
            )
            .map_err(err)?;
        }
        // The views file is made before the hub's commit, which another process opening the
        // new hub waits for: whoever sees the hub sees its views file.
        let token = format!("{:016x}", random());
        open_views(path, &token, true, busy_timeout)?;
        for (key, value) in [
            ("format", FORMAT.to_owned()),
            ("version", VERSION.to_string()),
            ("partitions", count.to_string()),
            (VIEWS_FILE_KEY, token),
        ] {
            tx.execute(
                "INSERT INTO floodway_meta (key, value) VALUES (?1, ?2)",
                (key, value),
            )
            .map_err(err)?;
        }
        (count, true)
    };
    add_missing(&tx).map_err(err)?;
    // The longest idempotency window any process opened the hub with: every process prunes
    // keys by it, so that one with a shorter window does not forget another's keys early.
    tx.execute(
        "INSERT INTO floodway_meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE \
         SET value = excluded.value \
         WHERE CAST(floodway_meta.value AS INTEGER) < CAST(excluded.value AS INTEGER)",
        (
            DEDUPE_WINDOW_KEY,
            i64::try_from(dedupe_window.as_millis())
                .unwrap_or(i64::MAX)
                .to_string(),
        ),
    )
    .map_err(err)?;
    tx.commit().map_err(err)?;
    // The file is a hub: start checkpointing it, and let the writing connection take part.
    let checkpoints = WalCheckpoints::start(path)?;
    checkpoints.install(&mut conn).map_err(err)?;
    let views = if own_views {
        let views = views_path(path);
        let checkpoints = WalCheckpoints::start(&views)?;
        Some((views, checkpoints))
    } else {
        None
    };
    Ok(Opened {
        conn,
        partitions: found,
        checkpoints,
        views,
    })
}

/// The meta key of a hub whose views are in a file of their own; its value is the token the
/// views file carries too, so that a hub never opens another hub's views.
pub(crate) const VIEWS_FILE_KEY: &str = "views_file";

/// What a views file says it is.
pub(crate) const VIEWS_FORMAT: &str = "floodway-views";

/// The file beside the hub file `hub` that holds its views (`<hub>-views`, with its own
/// `-wal` and `-shm`), for hubs made by a build that keeps them apart.
///
/// SQLite lets one writer into a file at a time: in the hub's own file a view's transaction
/// (tens of thousands of upserts, 100-200 ms) held up publishing, and publishing held up the
/// view. In a file of their own the two write at once, each with its own WAL.
pub(crate) fn views_path(hub: &Path) -> std::path::PathBuf {
    let mut name = hub.as_os_str().to_owned();
    name.push("-views");
    name.into()
}

/// Marks the main database of `conn` as the views file of the hub whose token is `token`.
pub(crate) fn mark_views_file(conn: &Connection, token: &str) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS main.floodway_meta \
         (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;",
    )?;
    for (key, value) in [("format", VIEWS_FORMAT), ("hub", token)] {
        conn.execute(
            "INSERT OR REPLACE INTO main.floodway_meta (key, value) VALUES (?1, ?2)",
            (key, value),
        )?;
    }
    Ok(())
}

/// Whether the file of `conn` has the table `name`.
pub(crate) fn has_table(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [name],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
}

/// The value of `key` in a file's `floodway_meta`.
pub(crate) fn meta(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        "SELECT value FROM floodway_meta WHERE key = ?1",
        [key],
        |r| r.get(0),
    )
    .optional()
}

/// Checks (with `create`, makes) the views file of the hub at `hub`, whose token is `token`.
fn open_views(
    hub: &Path,
    token: &str,
    create: bool,
    busy_timeout: Duration,
) -> Result<(), OpenError> {
    let path = views_path(hub);
    let problem = |problem: String| OpenError::ViewsFile {
        path: path.clone(),
        problem,
    };
    if !create && !path.exists() {
        return Err(problem(format!(
            "missing: the views of the hub {} are kept in this file beside it (a hub is both \
             files, with their -wal files); restore it from where the hub file came from",
            hub.display()
        )));
    }
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let err = |e| sqlite_error(&path, e);
    let mut conn = Connection::open_with_flags(&path, flags).map_err(err)?;
    conn.busy_timeout(busy_timeout).map_err(err)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(problem(format!("journal mode {mode}: views need WAL")));
    }
    // Checking reads only, and waits for no view's transaction.
    let behavior = if create {
        rusqlite::TransactionBehavior::Immediate
    } else {
        rusqlite::TransactionBehavior::Deferred
    };
    let tx = conn.transaction_with_behavior(behavior).map_err(err)?;
    let tables: i64 = tx
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
            [],
            |r| r.get(0),
        )
        .map_err(err)?;
    // A file without the meta table (another application's) answers an error: not ours.
    let stored = |key: &str| meta(&tx, key).ok().flatten();
    // At creation, a file holding nothing but a views file's meta was left by a creation
    // that did not finish (the hub's commit comes after this file's): it is taken over.
    let unused = tables == 1 && stored("format").as_deref() == Some(VIEWS_FORMAT);
    if create && (tables == 0 || unused) {
        mark_views_file(&tx, token).map_err(err)?;
        return tx.commit().map_err(err);
    }
    let belongs = stored("format").as_deref() == Some(VIEWS_FORMAT)
        && stored("hub").as_deref() == Some(token);
    if create {
        return Err(problem(format!(
            "a file holding views or other tables is already here where the new hub {} would \
             keep its views (left by an earlier hub at that path?): move it away, with its -wal \
             and -shm files, or make the hub elsewhere",
            hub.display()
        )));
    }
    if !belongs {
        return Err(problem(format!(
            "not the views file of the hub {}: it belongs to another hub, or to none; put \
             the hub's own views file here",
            hub.display()
        )));
    }
    Ok(())
}

/// A random number for tokens and lease holders: the standard library's random hash keys,
/// mixed with the time.
pub(crate) fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    hasher.finish()
}

/// Turns the hub made at `path` into what a build that kept views in the hub file made
/// (format version 2, no views file), for tests.
#[cfg(test)]
pub(crate) fn as_made_before(path: &Path) {
    std::fs::remove_file(views_path(path)).unwrap();
    Connection::open(path)
        .unwrap()
        .execute_batch(&format!(
            "DELETE FROM floodway_meta WHERE key = '{VIEWS_FILE_KEY}'; \
             UPDATE floodway_meta SET value = '{VIEWS_IN_HUB}' WHERE key = 'version';"
        ))
        .unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new hub file changed by `sql` into one an earlier build wrote.
    fn earlier_file(sql: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        drop(reopen(&path, true));
        Connection::open(&path).unwrap().execute_batch(sql).unwrap();
        (dir, path)
    }

    /// The connection `open` gives for the file at `path`.
    fn reopen(path: &Path, create: bool) -> Connection {
        let busy = Duration::from_secs(10);
        let window = Duration::from_secs(600);
        open(
            path,
            create,
            None,
            Durability::Immediate,
            busy,
            2048,
            window,
        )
        .unwrap()
        .conn
    }

    #[test]
    fn a_file_without_the_added_tables_gets_them() {
        // As a file written before leases and pruning existed.
        let (_dir, path) = earlier_file(
            "DROP TABLE leases; DROP INDEX dedupe_by_time; DROP TABLE inbox; \
             CREATE TABLE inbox (view TEXT NOT NULL, event TEXT NOT NULL, \
             PRIMARY KEY (view, event)) WITHOUT ROWID; \
             INSERT INTO inbox VALUES ('orders', 'e-1');",
        );
        let conn = reopen(&path, false);
        let inbox: i64 = conn
            .query_row("SELECT count(*) FROM inbox", [], |r| r.get(0))
            .unwrap();
        assert_eq!(inbox, 0, "the unpruned inbox starts over");
        conn.execute(
            "INSERT INTO inbox (bucket, view, event) VALUES (1, 'orders', 'e-1')",
            [],
        )
        .unwrap();
        let added: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name IN ('leases', 'dedupe_by_time')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(added, 2);
        // Opened again, nothing changes.
        drop(conn);
        let conn = reopen(&path, false);
        let inbox: i64 = conn
            .query_row("SELECT count(*) FROM inbox", [], |r| r.get(0))
            .unwrap();
        assert_eq!(inbox, 1);
    }

    #[test]
    fn what_views_left_in_the_inbox_is_deleted_once() {
        // As a file a build whose views kept an inbox wrote.
        let (_dir, path) = earlier_file(
            "DELETE FROM floodway_meta WHERE key = 'views_inbox'; \
             INSERT INTO inbox (bucket, view, event) VALUES \
             (1, 'orders', 'e-1'), (1, 'rows:carts', 'e-2'), (2, 'orders', 'e-3');",
        );
        let left = |conn: &Connection| -> Vec<String> {
            let mut stmt = conn.prepare("SELECT view FROM inbox").unwrap();
            let views = stmt.query_map([], |r| r.get(0)).unwrap();
            views.map(Result::unwrap).collect()
        };
        let conn = reopen(&path, false);
        assert_eq!(left(&conn), ["rows:carts"], "the row table's entry stays");
        // Once only: an entry named like a view afterwards is not looked for again.
        conn.execute(
            "INSERT INTO inbox (bucket, view, event) VALUES (3, 'orders', 'e-4')",
            [],
        )
        .unwrap();
        drop(conn);
        let conn = reopen(&path, false);
        assert_eq!(left(&conn).len(), 2);
    }

    #[test]
    fn durability_sets_the_sync_mode_and_the_page_cache_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let busy = Duration::from_secs(10);
        let window = Duration::from_secs(600);
        let checkpoints = open(&path, true, None, Durability::Immediate, busy, 2048, window)
            .unwrap()
            .checkpoints;
        for (durability, expected) in [(Durability::Immediate, 2), (Durability::Relaxed, 1)] {
            let conn = connect(&path, durability, busy, 2048, &checkpoints).unwrap();
            let mode: i64 = conn
                .query_row("PRAGMA synchronous", [], |r| r.get(0))
                .unwrap();
            assert_eq!(mode, expected, "{durability:?}");
            let journal: String = conn
                .query_row("PRAGMA journal_mode", [], |r| r.get(0))
                .unwrap();
            assert_eq!(journal, "wal");
            let cache: i64 = conn
                .query_row("PRAGMA cache_size", [], |r| r.get(0))
                .unwrap();
            assert_eq!(cache, -2048, "the page cache in KiB");
        }
    }
}
