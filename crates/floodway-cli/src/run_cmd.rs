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
    // The outbox's relay, the CEP timers and the expiry of rows, stopped after the
    // processors.
    let background = floodway_processors::start_background(&hubs, &config)?;
    let names: Vec<String> = processors.iter().map(|p| p.name().to_owned()).collect();
    eprintln!(
        "running {} on {} (stop with Ctrl-C)",
        names.join(", "),
        hubs.events.describe()
    );
    // The processors stop on Ctrl-C, or when a task beside them fails: without the relay or
    // the timers they would go on while their work waits in the hub file, unseen.
    let failure = background.failure();
    let stop = async move {
        tokio::select! {
            () = shutdown_signal() => {}
            failed = failure => eprintln!("{failed}; stopping the processors"),
        }
    };
    let reports = run_all_pausable(
        &hubs.events,
        processors,
        ReadOptions::default(),
        stop,
        &pauses,
    )
    .await
    .map_err(|(name, err)| anyhow::anyhow!("processor `{name}` stopped: {err}"))?;
    if let Some(console) = console {
        console.abort();
    }
    let done = background
        .stop()
        .await
        .map_err(|(what, e)| anyhow::anyhow!("{what} stopped: {e}"))?;
    for (name, fired) in &done.timers {
        eprintln!("{name}: {} timers fired", fired.timers_fired);
    }
    if let Some(relay) = done.relay {
        eprintln!(
            "outbox: {} events published ({} already held by the hub)",
            relay.published, relay.duplicates
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
