//! The `floodway` command.

/// `println!` that exits quietly when stdout is a closed pipe.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::util::say(format_args!($($arg)*))
    };
}

mod cep_cmd;
mod cep_demo;
mod console;
mod demo;
mod faults_cmd;
mod hub_cmd;
mod lambda_cmd;
mod outbox_cmd;
mod replay_cmd;
mod run_cmd;
mod tally;
mod util;
mod view_cmd;

use clap::{Parser, Subcommand};

/// mimalloc instead of the system allocator: the run loop allocates and frees many small
/// objects per event, and the processor benchmark runs about a fifth faster with it
/// (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Floodway: stream processors that keep working when things go wrong.
///
/// Events live in a hub (an SQLite file, its views in a second one beside it); processors read
/// it through named subscriptions and run pipelines over every event. Poison events become
/// faults that you can list, fix and resubmit; outages are waited out; nothing is lost.
///
/// Start with `floodway demo`. Logs go to stderr; set RUST_LOG=debug for more.
#[derive(Parser)]
#[command(name = "floodway", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Watch the failure design work: poison events, throttling, an outage, faults and
    /// their resubmission, on a fresh hub file with a real HTTP service on 127.0.0.1.
    ///
    /// Three processors run: `orders-view` keeps a latest-wins view of orders, `notify` calls a
    /// payment-notification service that throttles above its capacity and goes down for a
    /// while, and `faults` stores what could not be processed. At the end the view is checked
    /// against the events, the cause of the poison events is fixed, and their faults are
    /// resubmitted.
    ///
    /// Example: floodway demo --events 20000 --dir demo
    Demo(demo::DemoArgs),
    /// Run the processors of a configuration file until stopped (Ctrl-C or SIGTERM drain
    /// in-flight work and commit).
    ///
    /// Example: floodway run floodway.toml --metrics 127.0.0.1:9464
    Run(run_cmd::RunArgs),
    /// Publish, read and inspect the hub.
    #[command(subcommand)]
    Hub(hub_cmd::HubCommand),
    /// List, inspect and resubmit faults.
    #[command(subcommand)]
    Faults(faults_cmd::FaultsCommand),
    /// Read the views in the hub's store: list them, get a row, query rows by key prefix.
    #[command(subcommand)]
    View(view_cmd::ViewCommand),
    /// The transactional outbox: what is pending and what was published.
    #[command(subcommand)]
    Outbox(outbox_cmd::OutboxCommand),
    /// Complex event processing: a correlation key's events, timers and emitted events; a
    /// demo of control services on the real clock.
    #[command(subcommand)]
    Cep(cep_cmd::CepCommand),
    /// Run a processor as an AWS Lambda function: for real (`handler`), or locally against the
    /// embedded hub through a simulated event-source mapping (`run`).
    #[command(subcommand)]
    Lambda(lambda_cmd::LambdaCommand),
    /// Re-deliver the events published in a time range to one processor, without moving its
    /// subscription.
    ///
    /// Example: floodway replay --config floodway.toml --processor orders-view --from 2h
    Replay(replay_cmd::ReplayArgs),
    /// Serve the web console of a configuration's hub and faults: the flow (lag per
    /// subscription and partition; live rates with --metrics-url), the faults grouped by
    /// cause, resubmission and replay. `floodway run --console` serves it beside the
    /// processors, with their live rates and pause/resume.
    ///
    /// Example: floodway console --config floodway.toml --metrics-url http://127.0.0.1:9464/metrics
    Console(console::ConsoleArgs),
}

fn main() {
    let cli = Cli::parse();
    if let Err(err) = run(cli) {
        // A reader that closed the pipe (`| head`) has what it wanted.
        let closed = err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe);
        if closed {
            std::process::exit(0);
        }
        // The chain of causes, without a backtrace: this is for people, not debuggers.
        eprintln!("error: {}", causes(&err));
        std::process::exit(1);
    }
}

/// An error and its causes, each once: a cause its error's message already quotes (most
/// do, so that they read whole when logged) is not repeated.
fn causes(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn run(cli: Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Run(args) => run_cmd::run(args).await,
            Command::Hub(command) => hub_cmd::run(command).await,
            Command::Faults(command) => faults_cmd::run(command).await,
            Command::View(command) => view_cmd::run(command).await,
            Command::Outbox(command) => outbox_cmd::run(command).await,
            Command::Cep(command) => cep_cmd::run(command).await,
            Command::Replay(args) => replay_cmd::replay(args).await,
            Command::Lambda(command) => lambda_cmd::run(command).await,
            Command::Console(args) => console::run(args).await,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cause quoted by its error's message is said once; one that is not is added.
    #[test]
    fn causes_are_said_once() {
        let inner = std::io::Error::other("hub.db has 4 partitions, not 8");
        let quoted = anyhow::Error::new(inner).context("the hub: hub.db has 4 partitions, not 8");
        assert_eq!(causes(&quoted), "the hub: hub.db has 4 partitions, not 8");
        let plain = anyhow::Error::new(std::io::Error::other("disk full")).context("saving");
        assert_eq!(causes(&plain), "saving: disk full");
    }
}
