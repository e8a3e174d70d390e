//! `floodway run` and `floodway replay`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use floodway::error::CommitError;
use floodway::hub::{BoxSource, ReadOptions, StartAt, Stream};
use floodway::runtime::RunReport;
use floodway::{Checkpoint, Checkpointer, Record, Source};
use floodway_processors::processors::reads_faults;
use floodway_processors::{
    build_all, from_config, run_all_pausable, Config, Hubs, Pauses, ProcessorConfig,
};
use std::future::Future;

use crate::util::{parse_time, progress, shutdown_signal};

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

/// Options of `floodway replay`.
#[derive(clap::Args)]
pub(crate) struct ReplayArgs {
    /// The configuration file.
    #[arg(long, short, value_name = "FILE")]
    config: PathBuf,
    /// The processor to re-deliver to.
    #[arg(long)]
    processor: String,
    /// Events published from this time (ms, RFC 3339, or a duration ago like 2h).
    #[arg(long, value_name = "TIME")]
    from: String,
    /// Up to this time (default: now).
    #[arg(long, value_name = "TIME")]
    to: Option<String>,
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
    // One recorder for both: the console reads what /metrics serves.
    let metrics = match (args.metrics, args.console) {
        (None, None) => None,
        (addr, _) => {
            let mut builder = metrics_exporter_prometheus::PrometheusBuilder::new();
            if let Some(addr) = addr {
                builder = builder.with_http_listener(addr);
            }
            let (recorder, exporter) = builder
                .build()
                .with_context(|| format!("cannot serve metrics at {addr:?}"))?;
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder)
                .map_err(|e| anyhow::anyhow!("cannot record metrics: {e}"))?;
            if let Some(addr) = addr {
                tokio::spawn(async move {
                    if let Err(err) = exporter.await {
                        tracing::error!(error = ?err, "the metrics endpoint stopped");
                    }
                });
                eprintln!("metrics at http://{addr}/metrics");
            }
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

/// Counts what the reader hands out, for progress.
struct Counted<F> {
    reader: BoxSource,
    counted: F,
}

impl<F: Fn(u64) + Send + 'static> Source for Counted<F> {
    async fn next_batch(
        &mut self,
        max: usize,
    ) -> Result<Option<Vec<Record>>, floodway::error::SourceError> {
        let batch = self.reader.next_batch(max).await?;
        if let Some(records) = &batch {
            (self.counted)(records.len() as u64);
        }
        Ok(batch)
    }
}

/// A replay does not move the processor's subscription.
struct NoCheckpoints;

impl Checkpointer for NoCheckpoints {
    async fn commit(&mut self, _checkpoints: &[Checkpoint]) -> Result<(), CommitError> {
        Ok(())
    }
}

pub(crate) async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let Some(entry) = config
        .processors
        .iter()
        .find(|p| p.name() == args.processor)
    else {
        let names: Vec<&str> = config.processors.iter().map(|p| p.name()).collect();
        bail!(
            "no processor `{}` in {}: it has {}",
            args.processor,
            args.config.display(),
            names.join(", ")
        );
    };
    let from = parse_time(&args.from)?;
    let to = match &args.to {
        Some(t) => parse_time(t)?,
        None => floodway::event::now_millis(),
    };
    if to < from {
        bail!("--to is before --from");
    }
    let (hubs, _) = build_all(&Config {
        processors: Vec::new(),
        ..config.clone()
    })
    .await?;
    // A hub that does not count by time (JetStream): the bar shows progress without a total.
    let total = hubs
        .events
        .count_published(from, to)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .unwrap_or(0);
    let bar = progress(total, "replaying");
    let counted = bar.clone();
    let report = replay_range(
        &hubs,
        entry,
        (from, to),
        move |n| counted.inc(n),
        shutdown_signal(),
    )
    .await?;
    bar.finish_and_clear();
    say!(
        "replayed {} events to `{}`: {} delivered, {} faults",
        report.received,
        args.processor,
        report.pipelines.iter().map(|p| p.delivered).sum::<u64>(),
        report.faults()
    );
    Ok(())
}

/// Re-delivers the events published in `(from, to)` to the processor `entry` configures,
/// through a transient subscription that moves no checkpoint, calling `counted` with the
/// records of each batch read.
pub(crate) async fn replay_range(
    hubs: &Hubs,
    entry: &ProcessorConfig,
    (from, to): (i64, i64),
    counted: impl Fn(u64) + Send + 'static,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<RunReport> {
    let processor = from_config(hubs, entry).await?;
    let name = format!(
        "replay-{}-{}-{}",
        entry.name(),
        std::process::id(),
        fastrand::u32(..)
    );
    let options = ReadOptions {
        start: StartAt::Time(from),
        follow: false,
        until: Some(to),
        transient: true,
        stream: if reads_faults(&processor) {
            Stream::Faults
        } else {
            Stream::Events
        },
        ..ReadOptions::default()
    };
    let sub = hubs
        .events
        .subscribe(&name, options)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let source = Counted {
        reader: sub.reader,
        counted,
    };
    Ok(processor.run(source, NoCheckpoints, shutdown).await?)
}
