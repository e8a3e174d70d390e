//! Errors of the embedded hub.

use std::path::PathBuf;

use floodway::{Error, ErrorClass};

/// Why a hub file could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The file does not exist and creating it was not asked for.
    #[error(
        "no hub at {path}: `floodway hub publish` or `floodway run` creates one (check the path)"
    )]
    NotFound {
        /// The path.
        path: PathBuf,
    },
    /// The file is not an SQLite database, or is damaged.
    #[error("{path} is not a Floodway hub (not an SQLite database, or a damaged one): {detail}")]
    NotADatabase {
        /// The path.
        path: PathBuf,
        /// What SQLite said.
        detail: String,
    },
    /// The file is an SQLite database of something else.
    #[error("{path} is an SQLite database but not a Floodway hub (it has tables of its own); use another file")]
    Foreign {
        /// The path.
        path: PathBuf,
    },
    /// The hub was written by another version of Floodway.
    #[error("{path} has hub format version {found}; this Floodway reads version {supported}: {}", upgrade_advice(*.found, *.supported))]
    Version {
        /// The path.
        path: PathBuf,
        /// The version in the file.
        found: i64,
        /// The version this build reads.
        supported: i64,
    },
    /// The hub exists with another number of partitions than asked for.
    #[error("{path} has {found} partitions, not {asked}: a hub's partitions are fixed when it is created")]
    Partitions {
        /// The path.
        path: PathBuf,
        /// In the file.
        found: u32,
        /// Asked for.
        asked: u32,
    },
    /// The file that holds the hub's views is missing, or is not this hub's.
    #[error("{path}: {problem}")]
    ViewsFile {
        /// The views file's path.
        path: PathBuf,
        /// What is wrong, and what to do.
        problem: String,
    },
    /// A process owns a subscription of the hub, where the change asked for needs every
    /// process using the hub stopped ([`crate::Hub::upgrade`]).
    #[error(
        "{path} is in use: subscription `{subscription}` is owned by {holder}; stop the \
         processes using the hub, then try again"
    )]
    InUse {
        /// The hub's path.
        path: PathBuf,
        /// A subscription whose lease is in force.
        subscription: String,
        /// Who holds it.
        holder: Box<LeaseHolder>,
    },
    /// A setting is out of range.
    #[error("invalid hub setting: {0}")]
    Setting(String),
    /// SQLite failed otherwise.
    #[error("opening {path}: {source}")]
    Sqlite {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: rusqlite::Error,
    },
}

/// An operation on an open hub failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// The hub's writer has stopped (the hub is closing).
    #[error("the hub's writer has stopped")]
    Closed,
    /// A task or thread of the hub's own failed (a panic, a thread that could not start):
    /// fatal, not a fault of the event at hand.
    #[error("{0}")]
    Task(String),
    /// SQLite failed.
    #[error("hub storage: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored value could not be read back.
    #[error("hub storage holds an unreadable {what}: {detail}")]
    Corrupt {
        /// What was being read.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A name or setting is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// Another process (or another subscription object of this one) owns the subscription:
    /// a subscription has one owner at a time.
    #[error(
        "subscription `{subscription}` is in use by {holder} (its lease is renewed while it \
         runs; unrenewed, it would expire in {expires_in:.1?}): a subscription has one owner at \
         a time; stop that process, or give this one another name"
    )]
    Held {
        /// The subscription.
        subscription: String,
        /// Who holds it.
        holder: Box<LeaseHolder>,
        /// How long its lease lasts unless renewed.
        expires_in: std::time::Duration,
    },
    /// The hub's format changed after this process opened it (another process upgraded it,
    /// `floodway hub upgrade`): open the hub again.
    #[error("{0}")]
    Changed(String),
    /// This process no longer owns the subscription: another process took it over (after this
    /// one failed to renew its lease), or it was removed. Nothing more is read or committed
    /// through it.
    #[error("subscription `{subscription}` is no longer owned by this process: {reason}")]
    LeaseLost {
        /// The subscription.
        subscription: String,
        /// What happened.
        reason: String,
    },
}

impl HubError {
    /// Whether the hub file was locked by another writer for longer than the busy timeout.
    pub fn is_busy(&self) -> bool {
        matches!(
            self,
            HubError::Sqlite(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                )
        )
    }

    /// The class of this error for the runtime: a busy or locked database is transient,
    /// everything else fatal (the storage itself is in trouble).
    pub fn class(&self) -> ErrorClass {
        match self {
            HubError::Sqlite(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) =>
            {
                ErrorClass::Transient
            }
            HubError::Invalid(_) => ErrorClass::Poison,
            _ => ErrorClass::Fatal,
        }
    }
}

impl From<HubError> for Error {
    fn from(err: HubError) -> Self {
        let class = err.class();
        Error::new(class, err)
    }
}

fn upgrade_advice(found: i64, supported: i64) -> &'static str {
    if found > supported {
        "upgrade Floodway"
    } else {
        "it was written by an older Floodway: keep using that version for it, or publish its \
         events into a new hub"
    }
}

/// The process holding a subscription's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    /// The holder's id: host, process id and a random part (one per opened subscription).
    pub id: String,
    /// The host name of the holding process.
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// When it took the lease (ms since the epoch).
    pub acquired: i64,
    /// When its lease expires unless renewed (ms since the epoch).
    pub expires: i64,
}

impl std::fmt::Display for LeaseHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "process {} on host {}", self.pid, self.host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_the_runtimes_classes() {
        // A task of the hub's own failing is not the event's fault: fatal, never poison.
        let task = HubError::Task("commit task: panicked".into());
        assert_eq!(task.class(), ErrorClass::Fatal);
        assert_eq!(Error::from(task).class(), ErrorClass::Fatal);
        assert_eq!(HubError::Invalid("x".into()).class(), ErrorClass::Poison);
        let busy = HubError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        ));
        assert_eq!(busy.class(), ErrorClass::Transient);
    }
}
