//! The `floodway` command.

mod demo;

use clap::{Parser, Subcommand};

/// Floodway: stream processors that keep working when things go wrong.
#[derive(Parser)]
#[command(name = "floodway", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Watch the failure design work: poison events, throttling, an outage, faults and
    /// their resubmission, on generated order events, in memory.
    ///
    /// Three pipelines run over the events: one keeps a latest-wins view of orders, one calls
    /// a simulated payment-notification service that throttles above its capacity and goes
    /// down for a while, and the fault monitor stores what could not be processed. At the end
    /// the view is checked against the events, the cause of the poison events is fixed, and
    /// their faults are resubmitted.
    Demo(demo::DemoArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.command {
        Command::Demo(args) => runtime.block_on(demo::run(args)),
    }
}
