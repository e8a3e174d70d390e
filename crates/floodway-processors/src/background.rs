//! What runs beside a configuration's processors: the outbox's relay, the CEP processors'
//! timers, and the deletion of expired rows and CEP events. `floodway run` and the demos start
//! and stop them the same way.

use std::time::Duration;

use floodway::event::now_millis;
use floodway_embedded::{CepReport, HubError, OutboxRelay, RelayReport};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::{Config, ProcessorConfig, ViewKey};
use crate::hubs::Hubs;
use crate::processors::{cep_timers, SetupError};

type Task<T> = (oneshot::Sender<()>, JoinHandle<Result<T, HubError>>);

/// The tasks beside the processors, until [`Background::stop`].
#[derive(Debug)]
pub struct Background {
    hubs: Hubs,
    /// What failed first, once a task has.
    failed: tokio::sync::watch::Receiver<Option<String>>,
    relay: Option<Task<RelayReport>>,
    timers: Vec<(String, Task<CepReport>)>,
    expiry: Option<Aborted>,
}

/// A task that ends with its handle: the expiry stops when [`Background`] is stopped, even
/// on an early return with an error, or dropped without being stopped.
#[derive(Debug)]
struct Aborted(JoinHandle<()>);

impl Drop for Aborted {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the tasks did.
#[derive(Debug, Default)]
pub struct BackgroundReport {
    /// The relay's, when one ran.
    pub relay: Option<RelayReport>,
    /// Each CEP processor's timers.
    pub timers: Vec<(String, CepReport)>,
}

/// Runs `run` until the sender is used or dropped; a failure is said at once (what it would
/// have done waits in the hub file for the next run) and to `failed`, and returned when
/// stopped.
fn spawn<T, F, Fut>(
    what: String,
    failed: &tokio::sync::watch::Sender<Option<String>>,
    run: F,
) -> Task<T>
where
    T: Send + 'static,
    F: FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
    Fut: std::future::Future<Output = Result<T, HubError>> + Send + 'static,
{
    let (stop, stopped) = oneshot::channel::<()>();
    let work = run(Box::pin(async move {
        let _ = stopped.await;
    }));
    let failed = failed.clone();
    let task = tokio::spawn(async move {
        let report = work.await;
        if let Err(err) = &report {
            tracing::error!(error = %err, "{what} stopped; its work waits in the hub file");
            failed.send_if_modified(|first| {
                let news = first.is_none();
                if news {
                    *first = Some(format!("{what} stopped: {err}"));
                }
                news
            });
        }
        report
    });
    (stop, task)
}

/// Starts what `config`'s processors need beside them: the outbox's relay when a processor
/// writes to the outbox (a cep processor always does) or the outbox holds events, each cep
/// processor's timers (each under its lease), and once a minute the deletion of rows and CEP
/// events past their time to live.
///
/// # Errors
/// A hub failure, or a rule that does not build.
pub fn start_background(hubs: &Hubs, config: &Config) -> Result<Background, SetupError> {
    let hub_err = |source| SetupError::Beside {
        what: "the outbox relay".into(),
        source,
    };
    let outboxed = config.processors.iter().any(|p| {
        matches!(
            p,
            ProcessorConfig::Materialize { outbox: true, .. } | ProcessorConfig::Cep { .. }
        )
    });
    // Events left in the outbox at the start (by a processor since taken out of the
    // configuration, or a service's own transaction) are relayed too: else nothing would ever
    // publish them. Counted, not read: a damaged one fails the relay, not the start.
    let left = !outboxed
        && hubs
            .store
            .outbox()
            .and_then(|outbox| outbox.stats())
            .map_err(hub_err)?
            .pending()
            > 0;
    if left {
        tracing::info!("the outbox holds events no configured processor writes: relaying them");
    }
    let outboxed = outboxed || left;
    let (failing, failed) = tokio::sync::watch::channel(None);
    let relay = match outboxed {
        true => {
            let relay = OutboxRelay::new(&hubs.store).map_err(hub_err)?;
            let to = hubs.events.clone();
            Some(spawn("the outbox relay".into(), &failing, move |stop| {
                relay.run(to, stop)
            }))
        }
        false => None,
    };
    let timers = cep_timers(hubs, config)?
        .into_iter()
        .map(|(name, timers)| {
            let task = spawn(format!("the timers of `{name}`"), &failing, move |stop| {
                timers.run(stop)
            });
            (name, task)
        })
        .collect();
    let mut expiring_rows = Vec::new();
    let mut expiring_cep = Vec::new();
    for p in &config.processors {
        match p {
            ProcessorConfig::Materialize {
                view,
                key: ViewKey::Row { .. },
                ttl: Some(_),
                ..
            } => expiring_rows.push(view.clone()),
            ProcessorConfig::Cep { name, .. } => expiring_cep.push(name.clone()),
            _ => {}
        }
    }
    let expiry = (!expiring_rows.is_empty() || !expiring_cep.is_empty()).then(|| {
        let store = hubs.store.clone();
        Aborted(tokio::spawn(async move {
            // Expired rows and events are not read; this only takes them out of the file,
            // without a change event (DynamoDB's TTL deletions are stream records, which
            // change data capture skips by default).
            let mut every = tokio::time::interval(Duration::from_secs(60));
            loop {
                every.tick().await;
                let (store, rows, cep) =
                    (store.clone(), expiring_rows.clone(), expiring_cep.clone());
                let expired = tokio::task::spawn_blocking(move || {
                    let now = now_millis();
                    let mut n = 0;
                    for name in &rows {
                        n += store.rows(name)?.expire(now)?;
                    }
                    for name in &cep {
                        n += store.cep(name)?.expire(now)?;
                    }
                    Ok::<_, HubError>(n)
                })
                .await;
                match expired {
                    Ok(Ok(0)) => {}
                    Ok(Ok(n)) => tracing::info!(rows = n, "expired rows and events deleted"),
                    Ok(Err(err)) => tracing::warn!(error = %err, "deleting expired rows failed"),
                    Err(err) => tracing::warn!(error = %err, "deleting expired rows failed"),
                }
            }
        }))
    });
    Ok(Background {
        hubs: hubs.clone(),
        failed,
        relay,
        timers,
        expiry,
    })
}

/// Stops a task and takes its report.
async fn finish<T>((stop, task): Task<T>) -> Result<T, HubError> {
    let _ = stop.send(());
    task.await
        .map_err(|e| HubError::Invalid(format!("the task failed: {e}")))?
}

impl Background {
    /// Resolves once a task has failed (the relay, a processor's timers), with what failed
    /// and why; pending while they run. The processors would go on without them (events in
    /// the outbox never published, timers never fired), so `floodway run` stops when this
    /// resolves, and exits with the error.
    pub fn failure(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let mut failed = self.failed.clone();
        async move {
            let first = match failed.wait_for(Option::is_some).await {
                Ok(first) => first.clone(),
                Err(_) => None,
            };
            match first {
                Some(what) => what,
                // Every task is gone without failing: nothing more to wait for.
                None => std::future::pending().await,
            }
        }
    }

    /// Stops the timers, then the relay once the outbox is empty or after 5 s (what is left
    /// waits for the next run), and the expiry.
    ///
    /// # Errors
    /// What stopped a task, naming it.
    pub async fn stop(self) -> Result<BackgroundReport, (String, HubError)> {
        let mut report = BackgroundReport::default();
        for (name, task) in self.timers {
            let fired = finish(task)
                .await
                .map_err(|e| (format!("the timers of `{name}`"), e))?;
            report.timers.push((name, fired));
        }
        if let Some(relay) = self.relay {
            let relay_err = |e| ("the outbox relay".to_owned(), e);
            let outbox = self.hubs.store.outbox().map_err(relay_err)?;
            let until = tokio::time::Instant::now() + Duration::from_secs(5);
            while !relay.1.is_finished()
                && tokio::time::Instant::now() < until
                && !outbox.pending(1).map_err(relay_err)?.is_empty()
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            report.relay = Some(finish(relay).await.map_err(relay_err)?);
        }
        drop(self.expiry);
        Ok(report)
    }
}
