//! `floodway cep`: the state of complex event processing.

use anyhow::bail;
use floodway_processors::{Config, ProcessorConfig};

use crate::util::show_time;

#[derive(clap::Subcommand)]
pub(crate) enum CepCommand {
    /// One correlation key of a *cep* processor: the events in its set (in event-time order),
    /// its pending timers, and the ids of the events it emitted.
    ///
    /// Example: floodway cep show --config floodway.toml --processor orders-cep --key o-1
    Show {
        /// The configuration file.
        #[arg(long, short, value_name = "FILE")]
        config: std::path::PathBuf,
        /// The processor (`kind = "cep"`); the only one when absent.
        #[arg(long)]
        processor: Option<String>,
        /// The correlation key (with its suffix, if the key has one: `o-1.payments`).
        #[arg(long)]
        key: String,
    },
    /// Watch control services work on the real clock: orders submitted over a few seconds,
    /// most paid within the window (some payments before their order, some twice), the others
    /// never; each paid order becomes ready, each unpaid one expires when its timer fires, and
    /// every order ends with exactly one outcome.
    ///
    /// Example: floodway cep demo --orders 2000 --window 5s
    Demo(crate::cep_demo::CepDemoArgs),
}

pub(crate) async fn run(command: CepCommand) -> anyhow::Result<()> {
    let (path, processor, key) = match command {
        CepCommand::Show {
            config,
            processor,
            key,
        } => (config, processor, key),
        CepCommand::Demo(args) => return crate::cep_demo::run(args).await,
    };
    let config = Config::load(&path)?;
    let ceps: Vec<&str> = config
        .processors
        .iter()
        .filter(|p| matches!(p, ProcessorConfig::Cep { .. }))
        .map(ProcessorConfig::name)
        .collect();
    let name = match (processor, ceps.as_slice()) {
        (Some(p), _) if ceps.contains(&p.as_str()) => p,
        (Some(p), _) => bail!(
            "{} has no cep processor `{p}`; it has {}",
            path.display(),
            if ceps.is_empty() {
                "none".to_owned()
            } else {
                ceps.join(", ")
            }
        ),
        (None, [one]) => (*one).to_owned(),
        (None, []) => bail!("{} configures no cep processor", path.display()),
        (None, _) => bail!("give --processor: one of {}", ceps.join(", ")),
    };
    let options = floodway_embedded::HubOptions {
        create: false,
        ..Default::default()
    };
    let hub = floodway_embedded::Hub::open(&config.hub.path, options)?;
    if !hub.has_cep(&name)? {
        bail!(
            "`{name}` has collected nothing yet in {}",
            config.hub.path.display()
        );
    }
    let state = hub.cep(&name)?.show(&key)?;
    say!("key {key} of {name}");
    say!("events ({}):", state.events.len());
    for e in &state.events {
        say!("  {} {:<24} {}", show_time(e.timestamp), e.event_type, e.id);
    }
    say!("pending timers ({}):", state.timers.len());
    for t in &state.timers {
        say!(
            "  {} rule {} (after event {})",
            show_time(t.due),
            t.rule,
            t.trigger
        );
    }
    say!("emitted ({}):", state.fired.len());
    for id in &state.fired {
        say!("  {id}");
    }
    Ok(())
}
