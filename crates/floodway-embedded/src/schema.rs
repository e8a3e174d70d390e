//! The hub file: opening it, its tables, and its format version.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::error::OpenError;
use crate::hub::Durability;

/// What a hub file says it is.
pub(crate) const FORMAT: &str = "floodway-hub";
/// The version of the tables this build reads and writes.
pub(crate) const VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE floodway_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
-- The log: one row per event, ordered per partition by offset (from 1).
CREATE TABLE events (
    partition INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    id TEXT NOT NULL,
    type TEXT NOT NULL,
    time INTEGER NOT NULL,
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
-- Ids of events published with an idempotency key, for the dedupe window.
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
-- Events applied to each view (the inbox), written in the view's transaction.
CREATE TABLE inbox (view TEXT NOT NULL, event TEXT NOT NULL, PRIMARY KEY (view, event)) WITHOUT ROWID;
";

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

/// Opens a connection to an existing hub file, with the settings every connection uses.
pub(crate) fn connect(path: &Path, durability: Durability) -> Result<Connection, OpenError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| sqlite_error(path, e))?;
    configure(&conn, durability).map_err(|e| sqlite_error(path, e))?;
    Ok(conn)
}

fn configure(conn: &Connection, durability: Durability) -> rusqlite::Result<()> {
    // Several processes share the file: wait for each other's write locks.
    conn.busy_timeout(Duration::from_secs(10))?;
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
    // 32 MiB of page cache per connection (SQLite's default is 2 MiB): views and the inbox are
    // written in key order, not insertion order, and must not go to disk for every row. The WAL
    // is checkpointed every 32 MiB rather than every 4 MiB, so a page written many times in a
    // burst is copied to the database once, and trimmed back to 64 MiB afterwards.
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {sync}; PRAGMA cache_size = -32768; PRAGMA temp_store = MEMORY; \
         PRAGMA wal_autocheckpoint = 8192; PRAGMA journal_size_limit = 67108864;"
    ))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

/// Opens (creating it if asked) a hub file; returns the connection and the partition count.
pub(crate) fn open(
    path: &Path,
    create: bool,
    partitions: Option<u32>,
    durability: Durability,
) -> Result<(Connection, u32), OpenError> {
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
    configure(&conn, durability).map_err(|e| sqlite_error(path, e))?;
    let err = |e| sqlite_error(path, e);
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(err)?;
    let has_meta: bool = tx
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'floodway_meta'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map_err(err)?
        > 0;
    let found = if has_meta {
        let meta = |key: &str| -> rusqlite::Result<Option<String>> {
            tx.query_row(
                "SELECT value FROM floodway_meta WHERE key = ?1",
                [key],
                |r| r.get(0),
            )
            .optional()
        };
        if meta("format").map_err(err)?.as_deref() != Some(FORMAT) {
            return Err(OpenError::Foreign {
                path: path.to_owned(),
            });
        }
        let version: i64 = meta("version")
            .map_err(err)?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if version != VERSION {
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
        stored
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
        let count = partitions.unwrap_or(crate::hub::DEFAULT_PARTITIONS);
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
        for (key, value) in [
            ("format", FORMAT.to_owned()),
            ("version", VERSION.to_string()),
            ("partitions", count.to_string()),
        ] {
            tx.execute(
                "INSERT INTO floodway_meta (key, value) VALUES (?1, ?2)",
                (key, value),
            )
            .map_err(err)?;
        }
        count
    };
    tx.commit().map_err(err)?;
    Ok((conn, found))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durability_sets_the_sync_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        drop(open(&path, true, None, Durability::Immediate).unwrap());
        for (durability, expected) in [(Durability::Immediate, 2), (Durability::Relaxed, 1)] {
            let conn = connect(&path, durability).unwrap();
            let mode: i64 = conn
                .query_row("PRAGMA synchronous", [], |r| r.get(0))
                .unwrap();
            assert_eq!(mode, expected, "{durability:?}");
            let journal: String = conn
                .query_row("PRAGMA journal_mode", [], |r| r.get(0))
                .unwrap();
            assert_eq!(journal, "wal");
        }
    }
}
