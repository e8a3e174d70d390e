//! `floodway-aws`: faults stored on AWS (a `DynamoDbFaults` table), listed and resubmitted to
//! the Lambda function that failed them. Credentials and region come from the environment
//! (as for the AWS CLI).

use std::time::Duration;

use clap::{Parser, Subcommand};
use floodway::fault_store::{FaultFilter, FaultStatus, FaultStore};
use floodway_aws::{resubmit, sdk_config, DynamoDbFaults, Resubmitted};

/// Faults of Floodway functions on AWS: list them, and resubmit them after a fix.
#[derive(Parser)]
#[command(name = "floodway-aws", version, about, long_about)]
struct Cli {
    /// The AWS region (default: from the environment).
    #[arg(long, global = true)]
    region: Option<String>,
    /// Another endpoint for every service (a local emulator).
    #[arg(long, global = true, value_name = "URL")]
    endpoint: Option<String>,
    /// Another endpoint for Lambda only (e.g. `floodway_lambda::LocalRuntime`).
    #[arg(long, global = true, value_name = "URL")]
    lambda_endpoint: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List and resubmit faults.
    #[command(subcommand)]
    Faults(Faults),
}

#[derive(clap::Args)]
struct Filter {
    /// The DynamoDB table of the fault monitor (`DynamoDbFaults`).
    #[arg(long)]
    table: String,
    /// Only faults of this processor.
    #[arg(long)]
    processor: Option<String>,
    /// Only faults of this pipeline.
    #[arg(long)]
    pipeline: Option<String>,
    /// Only errors of this name.
    #[arg(long)]
    error: Option<String>,
}

#[derive(Subcommand)]
enum Faults {
    /// List faults, newest first.
    ///
    /// Example: floodway-aws faults list --table orders-faults --pipeline notify
    List {
        #[command(flatten)]
        filter: Filter,
        /// Resolved faults too.
        #[arg(long)]
        all: bool,
    },
    /// Show one fault: its error, record, event and resubmissions.
    ///
    /// Example: floodway-aws faults show --table orders-faults 3f2a...
    Show {
        /// The DynamoDB table of the fault monitor (`DynamoDbFaults`).
        #[arg(long)]
        table: String,
        /// The fault's id.
        id: String,
    },
    /// Invoke the function that failed each open fault again, with the fault's record, for
    /// the one pipeline that failed it; record the outcome (a success resolves the fault).
    ///
    /// Example: floodway-aws faults resubmit --table orders-faults --function orders --dry-run
    Resubmit {
        #[command(flatten)]
        filter: Filter,
        /// The Lambda function (name or ARN).
        #[arg(long)]
        function: String,
        /// Invocations per second at most.
        #[arg(long, default_value_t = 5)]
        rate: u32,
        /// Say what would be resubmitted, and do nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

impl Filter {
    /// The contract's filter: these fields, and open faults only unless `all`.
    fn faults(&self, all: bool) -> FaultFilter {
        FaultFilter {
            processor: self.processor.clone(),
            pipeline: self.pipeline.clone(),
            error: self.error.clone(),
            status: (!all).then_some(FaultStatus::Open),
            ..FaultFilter::default()
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Err(err) = run(Cli::parse()).await {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = sdk_config(cli.region.as_deref(), cli.endpoint.as_deref()).await;
    match cli.command {
        Command::Faults(Faults::List { filter, all }) => {
            let store = DynamoDbFaults::new(&config, &filter.table);
            let shown = store
                .list_faults(&filter.faults(all))
                .await
                .map_err(|e| anyhow::anyhow!("cannot read the fault table: {e}"))?;
            print!("{}", floodway::fault_report::table(&shown));
            Ok(())
        }
        Command::Faults(Faults::Show { table, id }) => {
            let store = DynamoDbFaults::new(&config, &table);
            let read = |e: floodway::BoxError| anyhow::anyhow!("cannot read the fault table: {e}");
            let Some(fault) = store.fault(&id).await.map_err(read)? else {
                anyhow::bail!("no fault with id {id}: `floodway-aws faults list` shows the ids");
            };
            let history = store.resubmissions_of(&id).await.map_err(read)?;
            print!("{}", floodway::fault_report::page(&fault, &history)?);
            Ok(())
        }
        Command::Faults(Faults::Resubmit {
            filter,
            function,
            rate,
            dry_run,
        }) => {
            let store = DynamoDbFaults::new(&config, &filter.table);
            let plan = store
                .list_faults(&filter.faults(false))
                .await
                .map_err(|e| anyhow::anyhow!("cannot read the fault table: {e}"))?;
            println!("{} open faults to resubmit to {function}", plan.len());
            if dry_run {
                for f in &plan {
                    println!(
                        "would resubmit {} ({}/{}: {})",
                        f.id, f.processor, f.pipeline, f.name
                    );
                }
                return Ok(());
            }
            let mut lambda_config = aws_sdk_lambda::config::Builder::from(&config);
            if let Some(url) = &cli.lambda_endpoint {
                lambda_config = lambda_config.endpoint_url(url);
            }
            let lambda = aws_sdk_lambda::Client::from_conf(lambda_config.build());
            let pause = Duration::from_secs(1) / rate.max(1);
            let (mut succeeded, mut failed) = (0, 0);
            for f in &plan {
                let outcome = match resubmit(&lambda, &function, &f.fault).await {
                    Ok(outcome) => outcome,
                    Err(e) => Resubmitted::Failed(e.to_string()),
                };
                store.record_resubmission(&f.id, &outcome).await?;
                match &outcome {
                    Resubmitted::Succeeded => succeeded += 1,
                    other => {
                        failed += 1;
                        eprintln!("{}: {other:?}", f.id);
                    }
                }
                tokio::time::sleep(pause).await;
            }
            println!("resubmitted: {succeeded} succeeded, {failed} failed");
            Ok(())
        }
    }
}
