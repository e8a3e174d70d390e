//! The hub file as the stores beside the log use it (faults, leases, checkpoints, row tables;
//! the views in their own file beside it): a connection, this process's turn to write, and the
//! settings. The hub hands each store a [`Store`]; no store reaches into the hub.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

use crate::error::{HubError, OpenError};
use crate::options::{Durability, HubOptions};
use crate::schema;

/// Takes turns among this process's write transactions on one hub file.
///
/// SQLite lets one writer at a time into a file and makes the others wait in its busy
/// handler, which sleeps 1, 2, 5, 10... ms between tries: with commits a few milliseconds
/// apart, a writer kept waiting loses several commits' worth of time each time. Writers of one
/// process (the publisher, checkpoints, the fault store, row tables; the views on their own
/// file's) therefore queue on this lock instead and go in as soon as the previous one commits;
/// other processes still meet the busy handler.
#[derive(Clone, Default)]
pub(crate) struct WriteGate(Arc<Mutex<()>>);

impl WriteGate {
    /// Waits for this process's turn to write; the turn ends when the guard is dropped.
    pub(crate) fn enter(&self) -> std::sync::MutexGuard<'_, ()> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The hub file for the stores: cheap to clone.
#[derive(Clone)]
pub(crate) struct Store {
    pub(crate) path: PathBuf,
    pub(crate) gate: WriteGate,
    pub(crate) options: HubOptions,
    checkpoints: Arc<schema::WalCheckpoints>,
    /// The file of the hub's views, when they have their own ([`schema::views_path`]).
    views: Option<Arc<ViewsFile>>,
}

/// The views' own file: its path, this process's turn to write it, its checkpointing thread.
struct ViewsFile {
    path: PathBuf,
    gate: WriteGate,
    checkpoints: schema::WalCheckpoints,
}

impl Store {
    /// The stores' handle on the hub file at `path`, checkpointed by `checkpoints`, and on the
    /// views' own file when there is one (its path and checkpointing thread).
    pub(crate) fn new(
        path: PathBuf,
        options: HubOptions,
        checkpoints: schema::WalCheckpoints,
        views: Option<(PathBuf, schema::WalCheckpoints)>,
    ) -> Self {
        Store {
            path,
            gate: WriteGate::default(),
            options,
            checkpoints: Arc::new(checkpoints),
            views: views.map(|(path, checkpoints)| {
                Arc::new(ViewsFile {
                    path,
                    gate: WriteGate::default(),
                    checkpoints,
                })
            }),
        }
    }

    /// A new connection to the hub file for everything but publishing: row tables, faults,
    /// checkpoints, reads (and the views of a hub that keeps them here). Its commits are not
    /// synced one by one (`synchronous=NORMAL`): in WAL mode commits reach the log in order,
    /// the publisher's synced commits sync everything before them, and a power loss keeps a
    /// prefix of the log, so a checkpoint never survives
    /// the view writes it covers (the records after the surviving checkpoint are processed
    /// again, and the views' versions and the row tables' inbox make that harmless). Only
    /// `publish` promises durability.
    ///
    /// That argument needs the checkpoint in this file. When records are acknowledged
    /// elsewhere ([`HubOptions::external_acks`]: a NATS hub keeps its views and faults here)
    /// every commit is synced (`synchronous=FULL`) before the ack that follows it. The view
    /// sink commits a batch at a time, so the syncs are grouped by batch.
    pub(crate) fn connect(&self) -> Result<Connection, HubError> {
        let durability = if self.options.external_acks {
            Durability::Immediate
        } else {
            Durability::Relaxed
        };
        self.connect_to(&self.path, durability, &self.checkpoints)
    }

    /// A new connection for the views: to their own file when the hub has one, whose commits
    /// are then always synced (`synchronous=FULL`), since the checkpoints that cover them are
    /// in the hub file and the argument of [`Store::connect`] does not reach across files; to
    /// the hub file as [`Store::connect`] otherwise. A view commits a batch at a time, so that
    /// is one sync per batch.
    pub(crate) fn connect_views(&self) -> Result<Connection, HubError> {
        match &self.views {
            Some(views) => self.connect_to(&views.path, Durability::Immediate, &views.checkpoints),
            None => self.connect(),
        }
    }

    /// This process's turn to write the views' file.
    pub(crate) fn views_gate(&self) -> &WriteGate {
        self.views.as_ref().map_or(&self.gate, |v| &v.gate)
    }

    /// Whether the views have a file of their own (a version 3 hub).
    pub(crate) fn views_apart(&self) -> bool {
        self.views.is_some()
    }

    /// The file that holds the views.
    pub(crate) fn views_path(&self) -> &std::path::Path {
        self.views.as_ref().map_or(&self.path, |v| &v.path)
    }

    fn connect_to(
        &self,
        path: &std::path::Path,
        durability: Durability,
        checkpoints: &schema::WalCheckpoints,
    ) -> Result<Connection, HubError> {
        schema::connect(
            path,
            durability,
            self.options.busy_timeout,
            self.options.page_cache_kib,
            checkpoints,
        )
        .map_err(|e| match e {
            OpenError::Sqlite { source, .. } => HubError::Sqlite(source),
            other => HubError::Corrupt {
                what: "hub file",
                detail: other.to_string(),
            },
        })
    }
}

/// Rows deleted by one prune of the dedupe table or the inbox, besides twice the rows the same
/// transaction added: pruning outpaces adding, so the table stays bounded.
pub(crate) const PRUNE_BATCH: usize = 1_000;

/// Checks a name used in the file (a subscription, a view): 1 to `max` characters that
/// `allowed` accepts; the error names `what` and says the `rule`.
pub(crate) fn check_name(
    what: &str,
    name: &str,
    max: usize,
    allowed: impl Fn(char) -> bool,
    rule: &str,
) -> Result<(), HubError> {
    if !name.is_empty() && name.len() <= max && name.chars().all(allowed) {
        Ok(())
    } else {
        Err(HubError::Invalid(format!(
            "{what} name `{name}`: use {rule}"
        )))
    }
}
