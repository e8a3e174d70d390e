//! How a hub file is opened and kept: the settings every part of the crate reads.

use std::time::Duration;

/// Partitions of a new hub unless told otherwise.
pub const DEFAULT_PARTITIONS: u32 = floodway::hub::DEFAULT_PARTITIONS;

/// When a publish is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Each commit is synced to disk before `publish` returns (SQLite `synchronous=FULL`): a
    /// published event survives a power loss.
    #[default]
    Immediate,
    /// Commits survive a crash of the process but may be lost with the machine
    /// (`synchronous=NORMAL` in WAL mode): several times the write rate on slow disks.
    Relaxed,
}

/// How a hub is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// Create the file if it does not exist (default true).
    pub create: bool,
    /// Partitions of a new hub (default 8); an existing hub must have this many if set.
    pub partitions: Option<u32>,
    /// When a publish is durable (default [`Durability::Immediate`]).
    pub durability: Durability,
    /// How long an idempotency key is remembered (default 10 minutes): an id published again
    /// within this window of its first publish is stored once. The hub remembers the longest
    /// window it was opened with, and every process keeps keys at least that long, so that one
    /// with a shorter window (`floodway hub publish` with the defaults, say) does not forget
    /// another's keys early.
    pub dedupe_window: Duration,
    /// Events published in one commit at most (default 10,000): publishers waiting together are
    /// committed together (group commit), up to this many events.
    pub max_commit: usize,
    /// How long a connection waits for another process's write lock inside SQLite before a
    /// write finds the file busy (default 10 s).
    pub busy_timeout: Duration,
    /// How long a write that found the file busy is tried again, with backoff and a warning
    /// per try, before it fails (default 2 minutes): publish commits, checkpoint commits, view
    /// writes, leases and retention. A lock held that long is not a passing contention.
    pub busy_retry: Duration,
    /// How long a subscription's lease lasts unless renewed (default 10 s): its holder renews
    /// it every third of this; another process takes the subscription over only once it has
    /// expired (or at once if its holder is a process of this machine that is gone).
    pub lease: Duration,
    /// How long [`Hub::subscribe_waiting`](crate::Hub::subscribe_waiting) waits for a
    /// subscription held by another process (default 15 s: longer than a
    /// [`lease`](Self::lease), so a holder that died where this process cannot see it, in
    /// another container, has lost its lease by then).
    pub lease_wait: Duration,
    /// How long a row table's inbox remembers the ids of the events applied: one to two of
    /// these windows (default 10 minutes). An event delivered again later is still applied
    /// once where its updates are latest-wins; an addition or an append would be applied
    /// again. Views keep no inbox: their rows' versions turn every redelivery away.
    pub inbox_window: Duration,
    /// Whether the records processed against this file are acknowledged somewhere else (a
    /// JetStream ack, a Lambda response) rather than by a checkpoint in this file (default
    /// false). Then views, row tables and faults commit synced (`synchronous=FULL`): an
    /// external ack follows right after a commit, and a power loss must not take back a view
    /// write whose record will never be delivered again. With checkpoints in the file, WAL
    /// order makes unsynced commits safe (see [`Hub::connect`](crate::Hub)); views in a file
    /// of their own ([`Hub::views_path`](crate::Hub::views_path)) always commit synced.
    pub external_acks: bool,
    /// SQLite's page cache per connection, in KiB (default 32 MiB). Views, row tables and
    /// the inbox are written in key order, not insertion order, and must not go to disk for
    /// every row; a process that only appends to the log (`floodway hub publish`) needs
    /// little, and sets less to hold its memory down.
    pub page_cache_kib: u32,
}

impl Default for HubOptions {
    fn default() -> Self {
        HubOptions {
            create: true,
            partitions: None,
            durability: Durability::Immediate,
            dedupe_window: Duration::from_secs(600),
            max_commit: 10_000,
            busy_timeout: Duration::from_secs(10),
            busy_retry: Duration::from_secs(120),
            lease: Duration::from_secs(10),
            lease_wait: Duration::from_secs(15),
            inbox_window: Duration::from_secs(600),
            external_acks: false,
            page_cache_kib: 32 * 1024,
        }
    }
}

pub use floodway::hub::Retention;
