//! `floodway replay`: re-deliver a time range of the log to one processor.

use std::future::Future;
use std::path::PathBuf;

use anyhow::bail;
use floodway::error::CommitError;
use floodway::hub::{BoxSource, ReadOptions, StartAt, Stream};
use floodway::runtime::{RunReport, Stopped};
use floodway::{Checkpoint, Checkpointer, Record, Source};
use floodway_processors::processors::reads_faults;
use floodway_processors::{build_all, from_config, Config, Hubs, ProcessorConfig};

use crate::util::{counter, parse_time, progress, shutdown_signal};

/// Options of `floodway replay`.
#[derive(clap::Args)]
pub(crate) struct ReplayArgs {
    /// The configuration file.
    #[arg(long, short, value_name = "FILE")]
    config: PathBuf,
    /// The processor to re-deliver to.
    #[arg(long)]
    processor: String,
    /// Events published from this time (ms, RFC 3339 with its zone, or a duration ago like 2h).
    #[arg(long, value_name = "TIME")]
    from: String,
    /// Up to this time (default: now).
    #[arg(long, value_name = "TIME")]
    to: Option<String>,
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

    fn buffered(&self) -> bool {
        self.reader.buffered()
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
    // On NATS, an instance reads its share of the partitions, and so does its replay.
    if let Some(instance) = config.hub.nats.as_ref().and_then(|n| n.instance) {
        let (i, n) = (instance.index, instance.count);
        if matches!(entry, ProcessorConfig::FaultMonitor { .. }) && i != 0 {
            bail!(
                "instance {i}/{n} does not read fault events (instance 0 does): replay the \
                 fault monitor with instance 0's configuration"
            );
        }
        eprintln!(
            "replaying the partitions of instance {i}/{n} (p % {n} == {i}): replay with each \
             instance's configuration for every partition"
        );
    }
    let (hubs, _) = build_all(&Config {
        processors: Vec::new(),
        ..config.clone()
    })
    .await?;
    // A hub that does not count by time (JetStream), or a fault monitor (it reads the fault
    // events, which the count does not cover): a counter without a total.
    let total = match entry {
        ProcessorConfig::FaultMonitor { .. } => None,
        _ => hubs
            .events
            .count_published(from, to)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    };
    let bar = match total {
        Some(total) => progress(total, "replaying"),
        None => counter("replaying"),
    };
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
    let delivered = report.pipelines.iter().map(|p| p.delivered).sum::<u64>();
    if report.stopped != Stopped::SourceEnded {
        // Cut short (Ctrl-C): a script must not go on as if the range was replayed.
        bail!(
            "replay to `{}` stopped ({:?}) before the end of the range: {} events read, {} \
             delivered, {} faults; running it again replays the whole range (the events \
             replayed already are delivered again, which idempotent sinks apply once)",
            args.processor,
            report.stopped,
            report.received,
            delivered,
            report.faults()
        );
    }
    say!(
        "replayed {} events to `{}`: {} delivered, {} faults",
        report.received,
        args.processor,
        delivered,
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
