//! The embedded hub as an [`EventHub`]: what processors and the command use.

use floodway::hub::{
    EventHub, HubFuture, HubStats, HubSubscription, PartitionStats, PublishFuture, PublishReceipt,
    ReadOptions, Retention, RetentionReport, SubscriptionStats,
};
use floodway::Event;

use crate::hub::Hub;
use crate::subscription::SubscriptionOptions;
use floodway::state::{SharedState, StateStore};

impl From<ReadOptions> for SubscriptionOptions {
    /// Fault events are in the log with the others: `Stream::Faults` reads the log.
    fn from(options: ReadOptions) -> SubscriptionOptions {
        SubscriptionOptions {
            start: options.start,
            reset: options.reset,
            follow: options.follow,
            until: options.until,
            transient: options.transient,
            ..SubscriptionOptions::default()
        }
    }
}

impl EventHub for Hub {
    fn describe(&self) -> String {
        self.path().display().to_string()
    }

    fn publish<'a>(&'a self, events: &'a [Event], dedupe: bool) -> PublishFuture<'a> {
        Box::pin(async move {
            let receipt = if dedupe {
                self.publish_idempotent(events).await?
            } else {
                Hub::publish(self, events).await?
            };
            Ok(PublishReceipt {
                stored: receipt.stored(),
                duplicates: receipt.duplicates,
            })
        })
    }

    /// A subscription that another process holds is waited for (`HubOptions::lease_wait`),
    /// then refused with an error naming the holder.
    fn subscribe<'a>(
        &'a self,
        name: &'a str,
        options: ReadOptions,
    ) -> HubFuture<'a, HubSubscription> {
        Box::pin(async move {
            let (reader, checkpointer) =
                self.subscribe_waiting(name, options.into()).await?.split();
            Ok(HubSubscription::new(reader, checkpointer))
        })
    }

    fn newest<'a>(
        &'a self,
        n: usize,
        keep: &'a (dyn Fn(&[u8]) -> bool + Send + Sync),
    ) -> HubFuture<'a, Vec<Vec<u8>>> {
        Box::pin(async move {
            let newest = Hub::newest(self, n, keep)?;
            Ok(newest.into_iter().map(|(_, data)| data).collect())
        })
    }

    fn record_at<'a>(&'a self, partition: &'a str, offset: u64) -> HubFuture<'a, Option<Vec<u8>>> {
        Box::pin(async move {
            match partition.parse::<u32>() {
                Ok(p) => Ok(Hub::record_at(self, p, offset)?),
                Err(_) => Ok(None),
            }
        })
    }

    fn count_published(&self, from: i64, until: i64) -> HubFuture<'_, Option<u64>> {
        Box::pin(async move { Ok(Some(Hub::count_published(self, from, until)?)) })
    }

    fn stats(&self) -> HubFuture<'_, HubStats> {
        Box::pin(async move {
            let stats = Hub::stats(self)?;
            let newest = Hub::newest(self, 1, |_| true)?;
            Ok(HubStats {
                description: format!(
                    "hub {} ({} partitions, {:.1} MiB){}",
                    self.path().display(),
                    self.partitions(),
                    stats.file_bytes as f64 / (1024.0 * 1024.0),
                    if self.views_path() == self.path() {
                        "; its views are in the hub file, as an earlier build kept them \
                         (`floodway hub upgrade` moves them into their own)"
                    } else {
                        ""
                    }
                ),
                partitions: stats
                    .partitions
                    .iter()
                    .map(|p| PartitionStats {
                        partition: p.partition.to_string(),
                        events: p.events,
                        offsets: Some((p.first_offset, p.last_offset)),
                        bytes: Some(p.bytes),
                    })
                    .collect(),
                faults: None,
                subscriptions: stats
                    .subscriptions
                    .iter()
                    .map(|s| SubscriptionStats {
                        name: s.name.clone(),
                        lag: s.lag,
                        partitions: stats
                            .partitions
                            .iter()
                            .map(|p| {
                                let done = s
                                    .partitions
                                    .iter()
                                    .find(|(q, _)| *q == p.partition)
                                    .map_or(0, |(_, o)| *o);
                                (p.partition.to_string(), p.last_offset.saturating_sub(done))
                            })
                            .collect(),
                        progress: s
                            .partitions
                            .iter()
                            .map(|(p, o)| format!("{p}:{o}"))
                            .collect::<Vec<_>>()
                            .join(" "),
                        owner: s.holder.as_ref().map(|h| (h.to_string(), h.acquired)),
                    })
                    .collect(),
                newest_published: newest.first().map(|(time, _)| *time),
            })
        })
    }

    fn apply_retention<'a>(&'a self, retention: &'a Retention) -> HubFuture<'a, RetentionReport> {
        let (hub, retention) = (self.clone(), retention.clone());
        Box::pin(async move {
            Ok(tokio::task::spawn_blocking(move || hub.apply_retention(&retention)).await??)
        })
    }

    fn unsubscribe<'a>(&'a self, name: &'a str) -> HubFuture<'a, bool> {
        let (hub, name) = (self.clone(), name.to_owned());
        Box::pin(
            async move { Ok(tokio::task::spawn_blocking(move || hub.unsubscribe(&name)).await??) },
        )
    }
}

impl StateStore for Hub {
    fn open<'a>(&'a self, name: &'a str) -> HubFuture<'a, SharedState> {
        let hub = self.clone();
        let name = name.to_owned();
        Box::pin(async move {
            let view = tokio::task::spawn_blocking(move || hub.view(&name)).await??;
            Ok(std::sync::Arc::new(view) as SharedState)
        })
    }
}
