//! An [`EventHub`] in memory: the contract's reference implementation, for tests and examples.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::error::{CommitError, SourceError};
use crate::event::{now_millis, partition_for, Event};
use crate::hub::{
    EventHub, HubFuture, HubStats, HubSubscription, PartitionStats, PublishFuture, PublishReceipt,
    ReadOptions, StartAt, SubscriptionStats,
};
use crate::source::{Checkpoint, Checkpointer, Source};
use crate::uow::Record;

/// A hub in memory: partitions by partition key, idempotent publish (ids are remembered for
/// the hub's life), named subscriptions whose checkpoints it keeps. Cheap to clone; clones
/// share the hub. Fault events are kept with the others, as on the embedded hub.
///
/// ```
/// # let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
/// # rt.block_on(async {
/// use floodway::hub::{EventHub, ReadOptions};
/// use floodway::memory::MemoryHub;
/// use floodway::{Event, Source};
/// let hub = MemoryHub::new(4);
/// let e = Event::builder("order-paid", "o-1").build();
/// let receipt = hub.publish(&[e.clone(), e], true).await.unwrap();
/// assert_eq!((receipt.stored, receipt.duplicates), (1, 1));
/// let mut sub = hub.subscribe("s", ReadOptions::default().bounded()).await.unwrap();
/// assert_eq!(sub.reader.next_batch(10).await.unwrap().unwrap().len(), 1);
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct MemoryHub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    partitions: u32,
    state: Mutex<State>,
    published: Notify,
    /// Signalled when a reader lets its subscription go.
    released: Notify,
}

/// A subscription held by one reader, let go when both halves of it are dropped.
#[derive(Debug)]
struct Hold {
    hub: MemoryHub,
    name: String,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.hub.inner.state.lock().unwrap().held.remove(&self.name);
        self.hub.inner.released.notify_waiters();
    }
}

/// How long a reader waits for a subscription another reader holds before it is refused.
const HOLD_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct State {
    /// Per partition, `(published at, data)`; offset `n` is element `n - 1`.
    logs: Vec<Vec<(i64, Vec<u8>)>>,
    ids: HashSet<String>,
    /// Per subscription, the checkpoint of each partition.
    checkpoints: HashMap<String, Vec<u64>>,
    /// Subscriptions a reader holds: one reader at a time, as a lease gives it.
    held: HashSet<String>,
}

impl MemoryHub {
    /// A hub of `partitions` partitions (at least 1).
    pub fn new(partitions: u32) -> Self {
        let partitions = partitions.max(1);
        MemoryHub {
            inner: Arc::new(Inner {
                partitions,
                state: Mutex::new(State {
                    logs: vec![Vec::new(); partitions as usize],
                    ..State::default()
                }),
                published: Notify::new(),
                released: Notify::new(),
            }),
        }
    }

    /// Partitions.
    pub fn partitions(&self) -> u32 {
        self.inner.partitions
    }
}

impl State {
    /// Where a reader starts in each partition: after its checkpoint, or at `start`.
    fn start(&mut self, name: &str, options: &ReadOptions) -> Vec<u64> {
        if !options.reset {
            if let Some(checkpoints) = self.checkpoints.get(name) {
                return checkpoints.clone();
            }
        }
        let cursors: Vec<u64> = self
            .logs
            .iter()
            .map(|log| match options.start {
                StartAt::Beginning => 0,
                StartAt::End => log.len() as u64,
                StartAt::Time(t) => log.iter().take_while(|(at, _)| *at < t).count() as u64,
            })
            .collect();
        // A new subscription's starting place is kept at once, so that a restart before its
        // first commit starts from the same place.
        if !options.transient {
            self.checkpoints.insert(name.to_owned(), cursors.clone());
        }
        cursors
    }
}

impl EventHub for MemoryHub {
    fn describe(&self) -> String {
        format!("in-memory hub ({} partitions)", self.inner.partitions)
    }

    fn publish<'a>(&'a self, events: &'a [Event], dedupe: bool) -> PublishFuture<'a> {
        Box::pin(async move {
            let mut receipt = PublishReceipt::default();
            {
                let mut state = self.inner.state.lock().unwrap();
                let now = now_millis();
                for event in events {
                    if !state.ids.insert(event.id().to_owned()) && dedupe {
                        receipt.duplicates += 1;
                        continue;
                    }
                    let p = partition_for(event.partition_key(), self.inner.partitions);
                    state.logs[p as usize].push((now, event.to_json().into_bytes()));
                    receipt.stored += 1;
                }
            }
            self.inner.published.notify_waiters();
            Ok(receipt)
        })
    }

    fn subscribe<'a>(
        &'a self,
        name: &'a str,
        options: ReadOptions,
    ) -> HubFuture<'a, HubSubscription> {
        Box::pin(async move {
            // One reader at a time per durable subscription: a second one waits for the first
            // to let go, then starts where it stopped.
            let hold = if options.transient {
                None
            } else {
                let deadline = tokio::time::Instant::now() + HOLD_WAIT;
                loop {
                    let released = self.inner.released.notified();
                    if self
                        .inner
                        .state
                        .lock()
                        .unwrap()
                        .held
                        .insert(name.to_owned())
                    {
                        break;
                    }
                    if tokio::time::timeout_at(deadline, released).await.is_err() {
                        return Err(
                            format!("subscription `{name}` is held by another reader").into()
                        );
                    }
                }
                Some(Arc::new(Hold {
                    hub: self.clone(),
                    name: name.to_owned(),
                }))
            };
            let cursors = self.inner.state.lock().unwrap().start(name, &options);
            let reader = Reader {
                hub: self.clone(),
                // The log's name, not the subscription's: a replay of a record is the same
                // record, and raises the same fault.
                name: Arc::from("memory"),
                cursors,
                next: 0,
                follow: options.follow,
                until: options.until.unwrap_or(i64::MAX),
                _hold: hold.clone(),
            };
            let checkpointer = Committer {
                hub: self.clone(),
                name: name.to_owned(),
                transient: options.transient,
                _hold: hold,
            };
            Ok(HubSubscription::new(reader, checkpointer))
        })
    }

    fn newest<'a>(
        &'a self,
        n: usize,
        keep: &'a (dyn Fn(&[u8]) -> bool + Send + Sync),
    ) -> HubFuture<'a, Vec<Vec<u8>>> {
        Box::pin(async move {
            let state = self.inner.state.lock().unwrap();
            let mut all: Vec<&(i64, Vec<u8>)> = state
                .logs
                .iter()
                .flatten()
                .filter(|(_, data)| keep(data))
                .collect();
            all.sort_by_key(|(at, _)| *at);
            let skip = all.len().saturating_sub(n);
            Ok(all[skip..].iter().map(|(_, data)| data.clone()).collect())
        })
    }

    fn record_at<'a>(&'a self, partition: &'a str, offset: u64) -> HubFuture<'a, Option<Vec<u8>>> {
        Box::pin(async move {
            let state = self.inner.state.lock().unwrap();
            let Ok(p) = partition.parse::<usize>() else {
                return Ok(None);
            };
            let index = offset.checked_sub(1).map(|o| o as usize);
            Ok(state
                .logs
                .get(p)
                .and_then(|log| log.get(index?))
                .map(|(_, data)| data.clone()))
        })
    }

    fn count_published(&self, from: i64, until: i64) -> HubFuture<'_, Option<u64>> {
        Box::pin(async move {
            let state = self.inner.state.lock().unwrap();
            let n = state
                .logs
                .iter()
                .flatten()
                .filter(|(at, _)| (from..=until).contains(at))
                .count();
            Ok(Some(n as u64))
        })
    }

    fn stats(&self) -> HubFuture<'_, HubStats> {
        Box::pin(async move {
            let state = self.inner.state.lock().unwrap();
            let mut subscriptions: Vec<SubscriptionStats> = state
                .checkpoints
                .iter()
                .map(|(name, cps)| {
                    let partitions: Vec<(String, u64)> = cps
                        .iter()
                        .zip(&state.logs)
                        .enumerate()
                        .map(|(p, (cp, log))| {
                            (p.to_string(), (log.len() as u64).saturating_sub(*cp))
                        })
                        .collect();
                    SubscriptionStats {
                        name: name.clone(),
                        lag: partitions.iter().map(|(_, lag)| lag).sum(),
                        partitions,
                        progress: cps
                            .iter()
                            .enumerate()
                            .map(|(p, cp)| format!("{p}:{cp}"))
                            .collect::<Vec<_>>()
                            .join(" "),
                        owner: None,
                    }
                })
                .collect();
            subscriptions.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(HubStats {
                description: self.describe(),
                partitions: state
                    .logs
                    .iter()
                    .enumerate()
                    .map(|(p, log)| PartitionStats {
                        partition: p.to_string(),
                        events: log.len() as u64,
                        offsets: (!log.is_empty()).then_some((1, log.len() as u64)),
                        bytes: Some(log.iter().map(|(_, d)| d.len() as u64).sum()),
                    })
                    .collect(),
                faults: None,
                subscriptions,
                newest_published: state.logs.iter().flatten().map(|(at, _)| *at).max(),
            })
        })
    }

    fn unsubscribe<'a>(&'a self, name: &'a str) -> HubFuture<'a, bool> {
        Box::pin(async move {
            Ok(self
                .inner
                .state
                .lock()
                .unwrap()
                .checkpoints
                .remove(name)
                .is_some())
        })
    }
}

/// A subscription's reading half: partitions taken in turn.
struct Reader {
    hub: MemoryHub,
    name: Arc<str>,
    cursors: Vec<u64>,
    next: usize,
    follow: bool,
    until: i64,
    _hold: Option<Arc<Hold>>,
}

impl Reader {
    fn take(&mut self, max: usize) -> Vec<Record> {
        let state = self.hub.inner.state.lock().unwrap();
        let mut out = Vec::new();
        let n = self.cursors.len();
        for i in 0..n {
            let p = (self.next + i) % n;
            let log = &state.logs[p];
            let partition: Arc<str> = Arc::from(p.to_string());
            while out.len() < max {
                let Some((at, data)) = log.get(self.cursors[p] as usize) else {
                    break;
                };
                if *at > self.until {
                    break;
                }
                self.cursors[p] += 1;
                out.push(Record::new(
                    self.name.clone(),
                    partition.clone(),
                    self.cursors[p],
                    data.clone(),
                ));
            }
        }
        self.next = (self.next + 1) % n.max(1);
        out
    }
}

impl Source for Reader {
    async fn next_batch(&mut self, max: usize) -> Result<Option<Vec<Record>>, SourceError> {
        let inner = self.hub.inner.clone();
        loop {
            let published = inner.published.notified();
            tokio::pin!(published);
            published.as_mut().enable();
            let records = self.take(max);
            if !records.is_empty() {
                return Ok(Some(records));
            }
            if !self.follow {
                return Ok(None);
            }
            published.await;
        }
    }

    /// The hub's logs are in memory: a pull takes what is there at once, or waits for a
    /// publish with nothing taken.
    fn buffered(&self) -> bool {
        true
    }
}

/// A subscription's checkpoints, kept by the hub.
struct Committer {
    hub: MemoryHub,
    name: String,
    transient: bool,
    _hold: Option<Arc<Hold>>,
}

impl Checkpointer for Committer {
    async fn commit(&mut self, checkpoints: &[Checkpoint]) -> Result<(), CommitError> {
        if self.transient {
            return Ok(());
        }
        let mut state = self.hub.inner.state.lock().unwrap();
        let partitions = state.logs.len();
        let stored = state
            .checkpoints
            .entry(self.name.clone())
            .or_insert_with(|| vec![0; partitions]);
        for cp in checkpoints {
            if let Ok(p) = cp.partition.parse::<usize>() {
                if let Some(slot) = stored.get_mut(p) {
                    *slot = (*slot).max(cp.offset);
                }
            }
        }
        Ok(())
    }
}
