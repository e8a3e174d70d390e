//! `floodway faults`: list, show, resubmit; for every fault store. The faults are in the
//! hub's store (`--hub`, `--config`, `--nats`: the embedded file, also the store of a NATS
//! hub), or in the DynamoDB table of Lambda functions' fault monitor (`--dynamodb-table`,
//! when built with the `aws` feature). Listing and showing go through the `FaultStore`
//! contract alone; resubmission runs the processors locally for a hub, and invokes the
//! function that failed each fault for Lambda.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use floodway::fault_store::{
    claimant, FaultFilter, FaultStatus, FaultStore, ResubmitOutcome, StoredFault, CLAIM_LEASE,
};
use floodway::layer::limit::rate::RateLimiter;
use floodway::Processor;
use floodway_processors::{from_config, Config, Hubs};

use crate::util::{parse_time, printable, progress, HubArgs};
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
    /// Only faults last seen since this time (ms, RFC 3339 with its zone, or a duration ago like 1h).
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

/// Where faults stored by Lambda functions are: a DynamoDB table.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct AwsArgs {
    /// The DynamoDB table of a Lambda fault monitor (`DynamoDbFaults`), instead of the hub's
    /// store. Credentials come from the environment, as for the AWS CLI.
    #[arg(long, value_name = "TABLE")]
    pub(crate) dynamodb_table: Option<String>,
    /// The AWS region, with --dynamodb-table (default: from the environment).
    #[arg(long, requires = "dynamodb_table")]
    region: Option<String>,
    /// Another endpoint for every AWS service (a local emulator), with --dynamodb-table.
    #[arg(long, value_name = "URL", requires = "dynamodb_table")]
    aws_endpoint: Option<String>,
}

#[derive(clap::Subcommand)]
pub(crate) enum FaultsCommand {
    /// List stored faults, newest first.
    ///
    /// Example: floodway faults list --pipeline notify --since 1h
    ///
    /// Example: floodway faults list --dynamodb-table orders-faults --status open
    #[command(group(clap::ArgGroup::new("store").args(["config", "nats", "dynamodb_table"])))]
    List {
        #[command(flatten)]
        hub: HubArgs,
        #[command(flatten)]
        aws: AwsArgs,
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Show one fault: the error, the source record, and its resubmissions.
    ///
    /// Example: floodway faults show 9f0c2d...
    #[command(group(clap::ArgGroup::new("store").args(["config", "nats", "dynamodb_table"])))]
    Show {
        #[command(flatten)]
        hub: HubArgs,
        #[command(flatten)]
        aws: AwsArgs,
        /// The fault's id.
        id: String,
    },
    /// Send the records of faults back to the processor and pipeline that failed them.
    ///
    /// For a hub (`--config`), the configured processors are built here and each record runs
    /// through the one pipeline that failed it. For Lambda (`--dynamodb-table` and
    /// `--function`), the function is invoked with the record, shaped like its source and
    /// limited to that pipeline. Only open faults are resubmitted, at most `--rate` per
    /// second; each outcome is recorded with the fault, and a fault that succeeds is
    /// resolved, so running it again does not apply an event twice.
    ///
    /// Example: floodway faults resubmit --config floodway.toml --pipeline orders-view --dry-run
    ///
    /// Example: floodway faults resubmit --dynamodb-table orders-faults --function orders
    #[command(group(
        clap::ArgGroup::new("target").args(["config", "dynamodb_table"]).required(true)
    ))]
    Resubmit {
        /// The configuration file of the processors (faults in the store of its hub).
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        aws: AwsArgs,
        /// The Lambda function (name or ARN) that failed the faults, with --dynamodb-table.
        #[arg(long, value_name = "NAME", requires = "dynamodb_table")]
        function: Option<String>,
        /// Another endpoint for Lambda only (such as a local Runtime API), with --function.
        #[arg(long, value_name = "URL", requires = "function")]
        lambda_endpoint: Option<String>,
        #[command(flatten)]
        filter: FilterArgs,
        /// Resubmissions per second at most [default: 100 for a hub, 5 for Lambda, where
        /// each is an invocation].
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        rate: Option<u32>,
        /// Say what would be resubmitted, and do nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

pub(crate) async fn run(command: FaultsCommand) -> anyhow::Result<()> {
    match command {
        FaultsCommand::List {
            hub,
            aws,
            filter,
            limit,
        } => {
            // The filter's mistakes are said before a store is looked for.
            let filter = filter.filter(Some(limit))?;
            list(&open_store(&hub, &aws).await?, filter).await
        }
        FaultsCommand::Show { hub, aws, id } => show(&open_store(&hub, &aws).await?, id).await,
        FaultsCommand::Resubmit {
            config,
            aws,
            function,
            lambda_endpoint,
            filter,
            rate,
            dry_run,
        } => {
            let filter = filter.filter(None)?;
            let outcome = match (config, function) {
                (Some(config), _) => {
                    resubmit_configured(config, filter, rate.unwrap_or(100), dry_run).await?
                }
                (None, Some(function)) => {
                    let to = Lambda {
                        aws,
                        function,
                        endpoint: lambda_endpoint,
                    };
                    resubmit_to_lambda(to, filter, rate.unwrap_or(5), dry_run).await?
                }
                (None, None) => {
                    bail!("--dynamodb-table needs --function: the Lambda function to resubmit to")
                }
            };
            if !dry_run {
                say!(
                    "resubmitted: {} succeeded, {} failed{}",
                    outcome.succeeded,
                    outcome.failed,
                    match outcome.skipped {
                        0 => String::new(),
                        n => format!(", {n} skipped (resolved since, or resubmitted elsewhere)"),
                    }
                );
                // A script must see that a fix did not take.
                if outcome.failed > 0 {
                    bail!(
                        "{} of {} resubmissions failed: `floodway faults show` gives each \
                         fault's latest error",
                        outcome.failed,
                        outcome.failed + outcome.succeeded
                    );
                }
            }
            Ok(())
        }
    }
}

/// The fault store these arguments name.
async fn open_store(hub: &HubArgs, aws: &AwsArgs) -> anyhow::Result<Arc<dyn FaultStore>> {
    match &aws.dynamodb_table {
        Some(table) => dynamodb_store(aws, table).await,
        None => Ok(Arc::new(hub.open()?.fault_store()?)),
    }
}

async fn list(store: &Arc<dyn FaultStore>, filter: FaultFilter) -> anyhow::Result<()> {
    let faults = store.list_faults(&filter).await.map_err(unreadable)?;
    say!("{}", floodway::fault_report::table(&faults).trim_end());
    Ok(())
}

async fn show(store: &Arc<dyn FaultStore>, id: String) -> anyhow::Result<()> {
    let Some(fault) = store.fault(&id).await.map_err(unreadable)? else {
        bail!("no fault with id {id}: `floodway faults list` shows the ids");
    };
    let history = store
        .resubmissions_of(&fault.id)
        .await
        .map_err(unreadable)?;
    say!(
        "{}",
        floodway::fault_report::page(&fault, &history)?.trim_end()
    );
    Ok(())
}

fn unreadable(e: floodway::BoxError) -> anyhow::Error {
    anyhow::anyhow!("cannot read the fault store: {e}")
}

async fn resubmit_configured(
    config_path: PathBuf,
    filter: FaultFilter,
    rate: u32,
    dry_run: bool,
) -> anyhow::Result<Resubmitted> {
    let config = Config::load(&config_path)?;
    // A processor named wrong would match no fault, and "0 resubmitted" read as done.
    if let Some(name) = &filter.processor {
        let names: Vec<&str> = config.processors.iter().map(|p| p.name()).collect();
        if !names.contains(&name.as_str()) {
            bail!(
                "no processor `{name}` in {}: its processors are {}",
                config_path.display(),
                names.join(", ")
            );
        }
    }
    if !config.hub.path.exists() {
        bail!(
            "{} does not exist: no faults were stored there yet",
            config.hub.path.display()
        );
    }
    let hubs = Hubs::for_config(&config).await?;
    resubmit_faults(&hubs, &config, filter, rate, dry_run).await
}

/// A Lambda function to resubmit to, and the table of its faults.
#[cfg_attr(not(feature = "aws"), allow(dead_code))]
struct Lambda {
    aws: AwsArgs,
    function: String,
    endpoint: Option<String>,
}

#[cfg(feature = "aws")]
impl AwsArgs {
    pub(crate) async fn sdk_config(&self) -> floodway_aws::SdkConfig {
        floodway_aws::sdk_config(self.region.as_deref(), self.aws_endpoint.as_deref()).await
    }
}

#[cfg(feature = "aws")]
async fn dynamodb_store(aws: &AwsArgs, table: &str) -> anyhow::Result<Arc<dyn FaultStore>> {
    Ok(Arc::new(floodway_aws::DynamoDbFaults::new(
        &aws.sdk_config().await,
        table,
    )))
}

#[cfg(feature = "aws")]
async fn resubmit_to_lambda(
    to: Lambda,
    mut filter: FaultFilter,
    rate: u32,
    dry_run: bool,
) -> anyhow::Result<Resubmitted> {
    let table = to
        .aws
        .dynamodb_table
        .as_deref()
        .context("--function needs --dynamodb-table")?;
    let config = to.aws.sdk_config().await;
    let store = floodway_aws::DynamoDbFaults::new(&config, table);
    filter.status = Some(FaultStatus::Open);
    let plan = store.list_faults(&filter).await.map_err(unreadable)?;
    // A table may hold the faults of several functions: each goes back to its own.
    let processors: std::collections::BTreeSet<&str> =
        plan.iter().map(|f| f.processor.as_str()).collect();
    if filter.processor.is_none() && processors.len() > 1 {
        bail!(
            "the open faults are of {} processors ({}): say which one's faults go to {} with \
             --processor",
            processors.len(),
            processors.into_iter().collect::<Vec<_>>().join(", "),
            to.function
        );
    }
    say!("{} open faults to resubmit to {}", plan.len(), to.function);
    let lambda = floodway_aws::LambdaResubmitter::new(&config, to.endpoint.as_deref(), to.function);
    resubmit_plan(&store, &plan, rate, dry_run, |fault| {
        Box::pin(lambda.resubmit(&store, fault))
    })
    .await
}

#[cfg(not(feature = "aws"))]
async fn dynamodb_store(_: &AwsArgs, _: &str) -> anyhow::Result<Arc<dyn FaultStore>> {
    Err(without_aws())
}

#[cfg(not(feature = "aws"))]
async fn resubmit_to_lambda(
    _: Lambda,
    _: FaultFilter,
    _: u32,
    _: bool,
) -> anyhow::Result<Resubmitted> {
    Err(without_aws())
}

#[cfg(not(feature = "aws"))]
pub(crate) fn without_aws() -> anyhow::Error {
    anyhow::anyhow!(
        "this floodway was built without AWS support: build it with the `aws` feature \
         (cargo install --path crates/floodway-cli --features aws)"
    )
}

/// How long one resubmitted record may take.
const RESUBMIT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// How a resubmission went.
pub(crate) struct Resubmitted {
    pub(crate) succeeded: u64,
    pub(crate) failed: u64,
    /// Resolved since the list was read, or being resubmitted by another process.
    pub(crate) skipped: u64,
}

/// Resubmits one fault and records how it went; the outcome and its detail.
type Resubmit<'a> = Pin<
    Box<dyn Future<Output = Result<(ResubmitOutcome, String), floodway::BoxError>> + Send + 'a>,
>;

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
    let faults = store.list_faults(&filter).await.map_err(unreadable)?;
    let planned = Planned::of(config, faults);
    for (fault, why) in &planned.skipped {
        eprintln!("fault {}: {}; skipped", fault.id, printable(why));
    }
    say!(
        "{} faults to resubmit ({} skipped: undecodable records or unknown processors)",
        planned.faults.len(),
        planned.skipped.len()
    );
    // A dry run builds no processor: building one can create a hub file or connect to a
    // server, and a dry run does nothing.
    let processors = if dry_run {
        HashMap::new()
    } else {
        planned.processors(hubs, config).await?
    };
    let (store, events, processors) = (&*store, &*hubs.events, &processors);
    resubmit_plan(store, &planned.faults, rate, dry_run, |fault| {
        Box::pin(resubmit_one(store, events, processors, fault))
    })
    .await
}

/// Which faults a resubmission to configured processors sends, and which it cannot.
pub(crate) struct Planned {
    /// The open faults whose processor is configured, in the order given.
    pub(crate) faults: Vec<StoredFault>,
    /// Those it cannot send, and why.
    pub(crate) skipped: Vec<(StoredFault, String)>,
}

impl Planned {
    /// Sorts `faults` into what can be resubmitted to `config`'s processors and what cannot.
    pub(crate) fn of(config: &Config, faults: Vec<StoredFault>) -> Planned {
        let mut planned = Planned {
            faults: Vec::new(),
            skipped: Vec::new(),
        };
        for fault in faults {
            let why = if fault.status == FaultStatus::Resolved {
                "resolved already".to_owned()
            } else if fault.pipeline == floodway::fault::DECODE_PIPELINE {
                "the record could not be decoded: no pipeline can take it".to_owned()
            } else if !config
                .processors
                .iter()
                .any(|p| p.name() == fault.processor)
            {
                format!("processor `{}` is not configured", fault.processor)
            } else {
                planned.faults.push(fault);
                continue;
            };
            planned.skipped.push((fault, why));
        }
        planned
    }

    /// The processors the planned faults go to, built from `config`.
    pub(crate) async fn processors(
        &self,
        hubs: &Hubs,
        config: &Config,
    ) -> anyhow::Result<HashMap<String, Processor>> {
        let mut processors = HashMap::new();
        for fault in &self.faults {
            if processors.contains_key(&fault.processor) {
                continue;
            }
            let entry = config
                .processors
                .iter()
                .find(|p| p.name() == fault.processor)
                .context("planned faults have configured processors")?;
            processors.insert(fault.processor.clone(), from_config(hubs, entry).await?);
        }
        Ok(processors)
    }
}

/// Resubmits `fault` to its processor among `processors` and records how it went.
pub(crate) async fn resubmit_one(
    store: &dyn FaultStore,
    events: &dyn floodway::hub::EventHub,
    processors: &HashMap<String, Processor>,
    fault: &StoredFault,
) -> Result<(ResubmitOutcome, String), floodway::BoxError> {
    let processor = processors
        .get(&fault.processor)
        .ok_or_else(|| format!("processor `{}` is not built", fault.processor))?;
    floodway::fault_store::resubmit(store, events, processor, fault, RESUBMIT_DEADLINE).await
}

/// Resubmits each fault of `plan` with `resubmit`, at most `rate` per second, with progress;
/// or, for a dry run, says what it would resubmit. Each fault is claimed in `store` first, so
/// that one resolved since the plan was read, or being resubmitted by another process (a
/// console, the command run twice), is skipped rather than sent again.
async fn resubmit_plan<'a>(
    store: &dyn FaultStore,
    plan: &'a [StoredFault],
    rate: u32,
    dry_run: bool,
    resubmit: impl Fn(&'a StoredFault) -> Resubmit<'a>,
) -> anyhow::Result<Resubmitted> {
    let mut outcome = Resubmitted {
        succeeded: 0,
        failed: 0,
        skipped: 0,
    };
    if dry_run {
        for f in plan {
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
    let limiter = RateLimiter::per_second(rate)?;
    let bar = progress(plan.len() as u64, "resubmitting");
    // Ctrl-C or SIGTERM stops it between two faults: the one being resubmitted is finished
    // and its outcome recorded (stopped in between, its record could be applied and the
    // fault left open, to be sent again).
    let mut interrupted = std::pin::pin!(crate::util::shutdown_signal());
    for fault in plan {
        tokio::select! {
            biased;
            () = &mut interrupted => {
                bar.finish_and_clear();
                bail!(
                    "interrupted: stopped after {} resubmitted ({} succeeded, {} failed); \
                     the rest are still open",
                    outcome.succeeded + outcome.failed,
                    outcome.succeeded,
                    outcome.failed
                );
            }
            () = limiter.acquire() => {}
        }
        let claimed = store
            .claim_resubmission(&fault.id, claimant(), CLAIM_LEASE)
            .await
            .map_err(unreadable)?;
        if !claimed {
            outcome.skipped += 1;
            let why = match store.fault(&fault.id).await {
                Ok(Some(f)) if f.status == FaultStatus::Resolved => "resolved since it was listed",
                _ => "being resubmitted elsewhere (a console, another run)",
            };
            bar.suspend(|| eprintln!("fault {}: {why}; skipped", fault.id));
            bar.inc(1);
            continue;
        }
        let (result, detail) = resubmit(fault).await.map_err(|e| {
            bar.finish_and_clear();
            anyhow::anyhow!(
                "cannot record a resubmission of {}: {e} (stopped after {} resubmitted: {} \
                 succeeded, {} failed)",
                fault.id,
                outcome.succeeded + outcome.failed,
                outcome.succeeded,
                outcome.failed
            )
        })?;
        match result {
            ResubmitOutcome::Succeeded => outcome.succeeded += 1,
            ResubmitOutcome::Failed => {
                outcome.failed += 1;
                bar.suspend(|| eprintln!("fault {}: {}", fault.id, printable(&detail)));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(outcome)
}
