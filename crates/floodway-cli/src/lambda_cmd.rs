//! `floodway lambda`: run a configured processor as a Lambda function, for real (`handler`,
//! the function's `main`) or locally against the embedded hub through the event-source-mapping
//! simulator (`run`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use floodway::{Checkpoint, Checkpointer, Source};
use floodway_lambda::simulator::Outcome;
use floodway_lambda::{
    FunctionProcess, Handler, InProcess, LocalRuntime, StreamKind, StreamMapping, StreamRecord,
};
use floodway_processors::{from_config, Config, Hubs};

#[derive(clap::Subcommand)]
pub(crate) enum LambdaCommand {
    /// Serve a configured processor through the Lambda Runtime API: the `main` of a function
    /// built from this binary (reads AWS_LAMBDA_RUNTIME_API). It takes Kinesis, DynamoDB
    /// Streams, SQS and EventBridge events and answers with ReportBatchItemFailures.
    ///
    /// Example: floodway lambda handler --config floodway.toml --processor orders-view
    Handler {
        /// The configuration file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// The processor to run.
        #[arg(long)]
        processor: String,
    },
    /// Run a configured processor as Lambda would, locally: the hub's partitions are the
    /// shards of a Kinesis stream, read from the subscription `lambda-<processor>` by a
    /// simulated event-source mapping (batches, partial-batch checkpoints, bisect on error,
    /// retries), and each batch invokes the handler, by default a real `floodway lambda
    /// handler` process through a local Lambda Runtime API on 127.0.0.1.
    ///
    /// Example: floodway lambda run --config floodway.toml --processor orders-view
    Run {
        /// The configuration file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// The processor to run.
        #[arg(long)]
        processor: String,
        /// Records per invocation at most.
        #[arg(long, default_value_t = 100)]
        batch_size: usize,
        /// Retries of a failing batch before it is given up.
        #[arg(long, default_value_t = 10)]
        max_retries: u32,
        /// The function's timeout.
        #[arg(long, value_name = "DURATION", default_value = "60s")]
        function_timeout: String,
        /// Call the handler in this process instead of a function process.
        #[arg(long)]
        in_process: bool,
    },
}

pub(crate) async fn run(command: LambdaCommand) -> anyhow::Result<()> {
    match command {
        LambdaCommand::Handler { config, processor } => {
            let handler = build(&config, &processor).await?;
            floodway_lambda::serve(handler)
                .await
                .map_err(|e| anyhow::anyhow!("the Lambda runtime stopped: {e}"))
        }
        LambdaCommand::Run {
            config,
            processor,
            batch_size,
            max_retries,
            function_timeout,
            in_process,
        } => {
            let timeout = humantime::parse_duration(&function_timeout).with_context(|| {
                format!("--function-timeout `{function_timeout}` is not a duration like 60s")
            })?;
            let mapping = StreamMapping {
                batch_size,
                maximum_retry_attempts: Some(max_retries),
                function_timeout: timeout,
                ..StreamMapping::default()
            };
            simulate(&config, &processor, mapping, in_process).await
        }
    }
}

async fn build(config_path: &Path, name: &str) -> anyhow::Result<Handler> {
    let config = Config::load(config_path)?;
    let Some(entry) = config.processors.iter().find(|p| p.name() == name) else {
        let names: Vec<&str> = config.processors.iter().map(|p| p.name()).collect();
        bail!(
            "no processor `{name}` in {}: it has {}",
            config_path.display(),
            names.join(", ")
        );
    };
    // A function acknowledges its batch by its response: what it wrote to the file before
    // answering must be synced.
    let mut hubs = Hubs::open_with(&config.hub, true).await?;
    hubs.keys = Hubs::keys(&config)?;
    Ok(Handler::new(from_config(&hubs, entry).await?))
}

async fn simulate(
    config_path: &Path,
    name: &str,
    mapping: StreamMapping,
    in_process: bool,
) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let handler = build(config_path, name).await?;
    let hubs = Hubs::open(&config.hub).await?;
    let subscription = format!("lambda-{name}");
    let floodway::hub::HubSubscription {
        mut reader,
        mut checkpointer,
        ..
    } = hubs
        .events
        .subscribe(&subscription, floodway::ReadOptions::default().bounded())
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the hub: {e}"))?;
    // The records after the subscription's checkpoint, as shards.
    let mut shards: BTreeMap<String, Vec<StreamRecord>> = BTreeMap::new();
    let now = tokio::time::Instant::now();
    while let Some(batch) = reader.next_batch(1_000).await? {
        for record in batch {
            let key = floodway::Event::decode(&record.data)
                .map(|e| e.partition_key().to_owned())
                .unwrap_or_default();
            shards
                .entry(record.partition.to_string())
                .or_default()
                .push(StreamRecord {
                    sequence: record.offset,
                    partition_key: key,
                    data: record.data,
                    arrived: now,
                });
        }
    }
    let total: usize = shards.values().map(Vec::len).sum();
    eprintln!(
        "{total} records in {} shards for `{name}` (subscription {subscription})",
        shards.len()
    );
    let kind = StreamKind::Kinesis {
        stream: subscription.clone(),
    };
    let (mut invocations, mut partial, mut errors, mut given_up) = (0, 0, 0, 0);
    // A function process through the local Runtime API, or the handler in this process.
    let mut local = None;
    let mut process = None;
    if !in_process {
        let runtime = LocalRuntime::start().await?;
        let exe = std::env::current_exe().context("cannot find this program's path")?;
        let config_arg = config_path.display().to_string();
        let spawned = FunctionProcess::spawn(
            &exe,
            &[
                "lambda",
                "handler",
                "--config",
                &config_arg,
                "--processor",
                name,
            ],
            &runtime,
            &[("RUST_LOG", "warn")],
        )?;
        process = Some(spawned);
        local = Some(runtime);
    }
    let mut in_proc = InProcess(handler);
    for (partition, records) in &shards {
        let shard = format!("shardId-{partition:0>12}");
        let report = match &mut local {
            Some(runtime) => mapping.run_shard(&kind, &shard, records, runtime).await,
            None => {
                mapping
                    .run_shard(&kind, &shard, records, &mut in_proc)
                    .await
            }
        };
        for i in &report.invocations {
            invocations += 1;
            match i.outcome {
                Outcome::Partial(_) => partial += 1,
                Outcome::Error(_) => errors += 1,
                Outcome::Success => {}
            }
        }
        for g in &report.given_up {
            given_up += g.records;
            eprintln!(
                "shard {}: records {}..={} given up ({})",
                g.shard, g.first, g.last, g.reason
            );
        }
        // The checkpoint stays before the first record given up: locally there is no
        // on-failure destination, and moving past it would lose it.
        let stop = report.given_up.iter().map(|g| g.first).min();
        let checkpoint = match stop {
            Some(first) => records
                .iter()
                .map(|r| r.sequence)
                .filter(|s| *s < first)
                .max(),
            None => report.checkpoint,
        };
        if let Some(offset) = checkpoint {
            checkpointer
                .commit(&[Checkpoint {
                    partition: partition.as_str().into(),
                    offset,
                }])
                .await?;
        }
    }
    drop(process);
    say!(
        "{total} records, {invocations} invocations ({partial} with batch item failures, {errors} function errors), {given_up} records given up"
    );
    if given_up > 0 {
        bail!(
            "{given_up} records were given up; subscription {subscription} stays before them, so a run after the fix takes them again"
        );
    }
    Ok(())
}
