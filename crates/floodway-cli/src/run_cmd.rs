//! `floodway run`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use floodway::hub::ReadOptions;
use floodway_processors::{build_all, run_all_pausable, Config, Pauses};

use crate::util::shutdown_signal;

/// Options of `floodway run`.
#[derive(clap::Args)]
pub(crate) struct RunArgs {
    /// The configuration file.
    #[arg(value_name = "CONFIG")]
    config: PathBuf,
    /// Serve Prometheus metrics at this address, e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Serve the web console at this address, e.g. 127.0.0.1:7878: the processors' live
    /// flow, their faults, resubmission, replay, pause and resume.
    #[arg(long, value_name = "ADDR")]
    console: Option<SocketAddr>,
    #[command(flatten)]
    access: crate::console::AccessArgs,
}

pub(crate) async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    if config.processors.is_empty() {
        bail!(
            "{} configures no processors: add a [[processors]] entry",
            args.config.display()
        );
    }
    let access = &args.access;
    if args.console.is_none()
        && (access.token_file.is_some() || access.read_only || access.audit_log.is_some())
    {
        bail!(
            "--token-file, --read-only and --audit-log are settings of the console: add \
             --console ADDR"
        );
    }
    // One recorder for both: the console reads what /metrics serves. Without --metrics it
    // is built without a listener (the builder's default would bind 0.0.0.0:9000).
    let metrics = match (args.metrics, args.console) {
        (None, None) => None,
        (Some(addr), _) => {
            let (recorder, exporter) = metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(addr)
                .build()
                .with_context(|| format!("cannot serve metrics at {addr}"))?;
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder)
                .map_err(|e| anyhow::anyhow!("cannot record metrics: {e}"))?;
            tokio::spawn(async move {
                if let Err(err) = exporter.await {
                    tracing::error!(error = ?err, "the metrics endpoint stopped");
                }
            });
            eprintln!("metrics at http://{addr}/metrics");
            Some(handle)
        }
        (None, Some(_)) => {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder)
                .map_err(|e| anyhow::anyhow!("cannot record metrics: {e}"))?;
            // What `build` does for an exporter: histograms drained every 5 s.
            let upkeep = handle.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
                loop {
                    every.tick().await;
                    upkeep.run_upkeep();
                }
            });
            Some(handle)
        }
    };
    let (hubs, processors) = build_all(&config).await?;
    let pauses = Pauses::default();
    let console = match args.console {
        Some(listen) => {
            let faults: std::sync::Arc<dyn floodway::fault_store::FaultStore> =
                std::sync::Arc::new(hubs.store.fault_store()?);
            let scope = crate::console::Scope::Hub {
                hubs: hubs.clone(),
                config: Box::new(config.clone()),
            };
            let console = crate::console::Console::new(
                scope,
                faults,
                metrics.map_or(
                    crate::console::Metrics::None,
                    crate::console::Metrics::InProcess,
                ),
                Some(pauses.clone()),
                &args.access,
                listen,
            )?;
            Some(crate::console::serve(console, listen).await?)
        }
        None => None,
    };
    if let Some(retention) = config.hub.retention() {
        let hub = hubs.events.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                every.tick().await;
                match hub.apply_retention(&retention).await {
                    Ok(r) if r.deleted > 0 => tracing::info!(deleted = r.deleted, "retention"),
                    Ok(_) => {}
                    // The hub applies the limits itself (a JetStream stream's).
                    Err(err) if err.is::<floodway::hub::Unsupported>() => {
                        tracing::debug!(error = %err, "retention");
                        break;
                    }
                    Err(err) => tracing::warn!(error = %err, "retention failed"),
                }
            }
        });
    }
    // Rows past their time to live are not read; once a minute they are deleted, without a
    // change event (DynamoDB's TTL deletions are stream records, which change data capture
    // skips by default).
    let expiring: Vec<String> = config
        .processors
        .iter()
        .filter_map(|p| match p {
            floodway_processors::ProcessorConfig::Materialize {
                view,
                key: floodway_processors::config::ViewKey::Row { .. },
                ttl: Some(_),
                ..
            } => Some(view.clone()),
            _ => None,
        })
        .collect();
    if !expiring.is_empty() {
        let store = hubs.store.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                every.tick().await;
                for name in &expiring {
                    let (store, name) = (store.clone(), name.clone());
                    let expired = tokio::task::spawn_blocking(move || {
                        store.rows(&name)?.expire(floodway::event::now_millis())
                    })
                    .await;
                    match expired {
                        Ok(Ok(n)) if n > 0 => tracing::info!(rows = n, "expired rows deleted"),
                        Ok(Ok(_)) => {}
                        Ok(Err(err)) => {
                            tracing::warn!(error = %err, "deleting expired rows failed")
                        }
                        Err(err) => tracing::warn!(error = %err, "deleting expired rows failed"),
                    }
                }
            }
        });
    }
    // The outbox's relay, when a processor writes to it: stopped after the processors, once
    // the outbox is empty or after 5 s (what is left waits for the next run).
    let relay = if config.processors.iter().any(|p| {
        matches!(
            p,
            floodway_processors::ProcessorConfig::Materialize { outbox: true, .. }
                | floodway_processors::ProcessorConfig::Cep { .. }
        )
    }) {
        let relay = floodway_embedded::OutboxRelay::new(&hubs.store)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let to = hubs.events.clone();
        let task = tokio::spawn(async move {
            let report = relay
                .run(to, async move {
                    let _ = stopped.await;
                })
                .await;
            // Said at once, not only when the command stops.
            if let Err(err) = &report {
                tracing::error!(error = %err, "the outbox relay stopped; changes wait in the outbox");
            }
            report
        });
        Some((stop, task))
    } else {
        None
    };
    // The CEP processors' timers, each under its lease, stopped with the processors; and
    // their events past the time to live deleted once a minute.
    let mut timers = Vec::new();
    for (name, cep) in floodway_processors::cep_timers(&hubs, &config)? {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let timers_of = name.clone();
        let task = tokio::spawn(async move {
            let report = cep
                .run(async move {
                    let _ = stopped.await;
                })
                .await;
            // Said at once: due timers wait in the hub file until a run fires them.
            if let Err(err) = &report {
                tracing::error!(processor = %timers_of, error = %err, "the timers stopped");
            }
            report
        });
        timers.push((name.clone(), stop, task));
        let store = hubs.store.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                every.tick().await;
                let (store, name) = (store.clone(), name.clone());
                let expired = tokio::task::spawn_blocking(move || {
                    store.cep(&name)?.expire(floodway::event::now_millis())
                })
                .await;
                if let Ok(Err(err)) = expired {
                    tracing::warn!(error = %err, "deleting expired CEP events failed");
                }
            }
        });
    }
    let names: Vec<String> = processors.iter().map(|p| p.name().to_owned()).collect();
    eprintln!(
        "running {} on {} (stop with Ctrl-C)",
        names.join(", "),
        hubs.events.describe()
    );
    let reports = run_all_pausable(
        &hubs.events,
        processors,
        ReadOptions::default(),
        shutdown_signal(),
        &pauses,
    )
    .await
    .map_err(|(name, err)| anyhow::anyhow!("processor `{name}` stopped: {err}"))?;
    if let Some(console) = console {
        console.abort();
    }
    for (name, stop, task) in timers {
        let _ = stop.send(());
        let report = task
            .await?
            .map_err(|e| anyhow::anyhow!("the timers of `{name}` stopped: {e}"))?;
        eprintln!("{name}: {} timers fired", report.timers_fired);
    }
    if let Some((stop, task)) = relay {
        let outbox = hubs.store.outbox()?;
        let drained = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !task.is_finished()
            && std::time::Instant::now() < drained
            && !outbox.pending(1)?.is_empty()
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let _ = stop.send(());
        let report = task
            .await?
            .map_err(|e| anyhow::anyhow!("the outbox relay stopped: {e}"))?;
        eprintln!(
            "outbox: {} events published ({} already held by the hub)",
            report.published, report.duplicates
        );
    }
    for (name, report) in reports {
        eprintln!(
            "{name}: {} records done, {} faults, stopped: {:?}",
            report.done,
            report.faults(),
            report.stopped
        );
    }
    Ok(())
}
