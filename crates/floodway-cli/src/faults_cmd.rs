//! `floodway faults`: list, show, resubmit.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use floodway::layer::limit::rate::RateLimiter;
use floodway::Processor;
use std::sync::Arc;

use floodway::fault_store::{FaultFilter, FaultStatus, FaultStore, ResubmitOutcome};
use floodway_processors::{from_config, Config, Hubs};

use crate::util::{parse_time, progress, HubArgs};

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct FilterArgs {
    /// Only faults of this processor.
    #[arg(long)]
    processor: Option<String>,
    /// Only faults of this pipeline.
    #[arg(long)]
    pipeline: Option<String>,
    /// Only errors of this name (e.g. HttpStatus, DecodeEventError).
    #[arg(long)]
    error: Option<String>,
    /// Only faults last seen since this time (ms, RFC 3339, or a duration ago like 1h).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Only faults last seen before this time.
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
    /// Only `open` or `resolved` faults.
    #[arg(long, value_parser = ["open", "resolved"])]
    status: Option<String>,
}

impl FilterArgs {
    fn filter(&self, limit: Option<usize>) -> anyhow::Result<FaultFilter> {
        Ok(FaultFilter {
            processor: self.processor.clone(),
            pipeline: self.pipeline.clone(),
            error: self.error.clone(),
            since: self.since.as_deref().map(parse_time).transpose()?,
            until: self.until.as_deref().map(parse_time).transpose()?,
            status: self.status.as_deref().map(|s| match s {
                "resolved" => FaultStatus::Resolved,
                _ => FaultStatus::Open,
            }),
            limit,
        })
    }
}

#[derive(clap::Subcommand)]
pub(crate) enum FaultsCommand {
    /// List stored faults, newest first.
    ///
    /// Example: floodway faults list --pipeline notify --since 1h
    List {
        #[command(flatten)]
        hub: HubArgs,
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Show one fault: the error, the source record, and its resubmissions.
    ///
    /// Example: floodway faults show 9f0c2d...
    Show {
        #[command(flatten)]
        hub: HubArgs,
        /// The fault's id.
        id: String,
    },
    /// Send the records of faults back to the processor and pipeline that failed them.
    ///
    /// Needs the configuration file, to build the processors. Only open faults are
    /// resubmitted, at most `--rate` per second; each outcome is recorded with the fault, and
    /// a fault that succeeds is resolved, so running it again does not apply an event twice.
    ///
    /// Example: floodway faults resubmit --config floodway.toml --pipeline orders-view --dry-run
    Resubmit {
        /// The configuration file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        #[command(flatten)]
        filter: FilterArgs,
        /// Resubmissions per second at most.
        #[arg(long, default_value_t = 100)]
        rate: u32,
        /// Say what would be resubmitted, and do nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

pub(crate) async fn run(command: FaultsCommand) -> anyhow::Result<()> {
    match command {
        FaultsCommand::List { hub, filter, limit } => list(hub, filter, limit).await,
        FaultsCommand::Show { hub, id } => show(hub, id).await,
        FaultsCommand::Resubmit {
            config,
            filter,
            rate,
            dry_run,
        } => resubmit(config, filter, rate, dry_run).await,
    }
}

async fn list(hub: HubArgs, filter: FilterArgs, limit: usize) -> anyhow::Result<()> {
    let store = open_store(&hub)?;
    let faults = store
        .list_faults(&filter.filter(Some(limit))?)
        .await
        .map_err(anyhow_err)?;
    say!("{}", floodway::fault_report::table(&faults).trim_end());
    Ok(())
}

async fn show(hub: HubArgs, id: String) -> anyhow::Result<()> {
    let store = open_store(&hub)?;
    let Some(fault) = store.fault(&id).await.map_err(anyhow_err)? else {
        bail!("no fault with id {id}: `floodway faults list` shows the ids");
    };
    let history = store
        .resubmissions_of(&fault.id)
        .await
        .map_err(anyhow_err)?;
    say!(
        "{}",
        floodway::fault_report::page(&fault, &history)?.trim_end()
    );
    Ok(())
}

async fn resubmit(
    config_path: PathBuf,
    filter: FilterArgs,
    rate: u32,
    dry_run: bool,
) -> anyhow::Result<()> {
    let config = Config::load(&config_path)?;
    if !config.hub.path.exists() {
        bail!(
            "{} does not exist: no faults were stored there yet",
            config.hub.path.display()
        );
    }
    let hubs = Hubs::open(&config.hub).await?;
    let outcome = resubmit_faults(&hubs, &config, filter.filter(None)?, rate, dry_run).await?;
    if !dry_run {
        say!(
            "resubmitted: {} succeeded, {} failed",
            outcome.succeeded,
            outcome.failed
        );
    }
    Ok(())
}

/// How long one resubmitted record may take.
const RESUBMIT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// How a resubmission went.
pub(crate) struct Resubmitted {
    pub(crate) succeeded: u64,
    pub(crate) failed: u64,
}

/// The fault store of the hub file these arguments name.
fn open_store(hub: &HubArgs) -> anyhow::Result<Arc<dyn FaultStore>> {
    Ok(Arc::new(hub.open()?.fault_store()?))
}

fn anyhow_err(e: floodway::BoxError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// Sends the records of the open faults matching `filter` back to the processor and pipeline
/// that failed them, at most `rate` per second, and records each outcome with its fault.
pub(crate) async fn resubmit_faults(
    hubs: &Hubs,
    config: &Config,
    mut filter: FaultFilter,
    rate: u32,
    dry_run: bool,
) -> anyhow::Result<Resubmitted> {
    let store: Arc<dyn FaultStore> = Arc::new(hubs.store.fault_store()?);
    // Only open faults: a resolved one was applied already.
    filter.status = Some(FaultStatus::Open);
    let faults = store.list_faults(&filter).await.map_err(anyhow_err)?;
    let mut processors: HashMap<String, Processor> = HashMap::new();
    let mut plan = Vec::new();
    let mut skipped = 0;
    for fault in faults {
        if fault.pipeline == floodway::fault::DECODE_PIPELINE {
            skipped += 1;
            continue;
        }
        if !processors.contains_key(&fault.processor) {
            let Some(entry) = config
                .processors
                .iter()
                .find(|p| p.name() == fault.processor)
            else {
                eprintln!(
                    "fault {}: processor `{}` is not configured; skipped",
                    fault.id, fault.processor
                );
                skipped += 1;
                continue;
            };
            processors.insert(fault.processor.clone(), from_config(hubs, entry).await?);
        }
        plan.push(fault);
    }
    say!(
        "{} faults to resubmit ({} skipped: undecodable records or unknown processors)",
        plan.len(),
        skipped
    );
    let mut outcome = Resubmitted {
        succeeded: 0,
        failed: 0,
    };
    if dry_run {
        for f in &plan {
            say!(
                "would resubmit {} to {}/{} ({}: {})",
                f.id,
                f.processor,
                f.pipeline,
                f.name,
                f.message
            );
        }
        return Ok(outcome);
    }
    let limiter = RateLimiter::per_second(rate.max(1))?;
    let bar = progress(plan.len() as u64, "resubmitting");
    for fault in plan {
        limiter.acquire().await;
        let processor = processors.get(&fault.processor).context("built above")?;
        let (result, _) = floodway::fault_store::resubmit(
            &*store,
            &*hubs.events,
            processor,
            &fault,
            RESUBMIT_DEADLINE,
        )
        .await
        .map_err(anyhow_err)?;
        match result {
            ResubmitOutcome::Succeeded => outcome.succeeded += 1,
            ResubmitOutcome::Failed => outcome.failed += 1,
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(outcome)
}
