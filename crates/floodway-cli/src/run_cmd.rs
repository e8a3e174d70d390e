//! `floodway run` and `floodway replay`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use floodway::error::CommitError;
use floodway::hub::{BoxSource, ReadOptions, StartAt, Stream};
use floodway::{Checkpoint, Checkpointer, Record, Source};
use floodway_processors::processors::reads_faults;
use floodway_processors::{build_all, from_config, run_all, Config};
use indicatif::ProgressBar;

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
    if let Some(addr) = args.metrics {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("cannot serve metrics at {addr}"))?;
        eprintln!("metrics at http://{addr}/metrics");
    }
    let (hubs, processors) = build_all(&config).await?;
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
    let reports = run_all(
        &hubs.events,
        processors,
        ReadOptions::default(),
        shutdown_signal(),
    )
    .await
    .map_err(|(name, err)| anyhow::anyhow!("processor `{name}` stopped: {err}"))?;
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

/// Counts what the reader hands out, for the progress bar.
struct Counted {
    reader: BoxSource,
    bar: ProgressBar,
}

impl Source for Counted {
    async fn next_batch(
        &mut self,
        max: usize,
    ) -> Result<Option<Vec<Record>>, floodway::error::SourceError> {
        let batch = self.reader.next_batch(max).await?;
        if let Some(records) = &batch {
            self.bar.inc(records.len() as u64);
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
    let processor = from_config(&hubs, entry).await?;
    // A hub that does not count by time (JetStream): the bar shows progress without a total.
    let total = hubs
        .events
        .count_published(from, to)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .unwrap_or(0);
    let name = format!("replay-{}-{}", args.processor, std::process::id());
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
    let reader = sub.reader;
    let bar = progress(total, "replaying");
    let source = Counted {
        reader,
        bar: bar.clone(),
    };
    let report = processor
        .run(source, NoCheckpoints, shutdown_signal())
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
