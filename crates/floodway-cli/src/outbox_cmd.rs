//! `floodway outbox`: the transactional outbox of the hub's store.

use crate::util::{show_time, HubArgs};

#[derive(clap::Subcommand)]
pub(crate) enum OutboxCommand {
    /// What the outbox holds per source: changes written and not yet published, the oldest
    /// of them, how many were published and when last, and which process relays.
    ///
    /// Example: floodway outbox stats --config floodway.toml
    Stats {
        #[command(flatten)]
        hub: HubArgs,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) async fn run(command: OutboxCommand) -> anyhow::Result<()> {
    match command {
        OutboxCommand::Stats { hub, json } => {
            let hub = hub.open()?;
            let stats = hub.outbox()?.stats()?;
            let now = floodway::event::now_millis();
            if json {
                let sources: Vec<serde_json::Value> = stats
                    .sources
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "source": s.source,
                            "pending": s.pending,
                            "oldest_pending": s.oldest_pending,
                            "published": s.published,
                            "last_published": s.last_published,
                        })
                    })
                    .collect();
                let relay = stats.relay.as_ref().map(ToString::to_string);
                say!(
                    "{}",
                    serde_json::json!({
                        "pending": stats.pending(),
                        "published": stats.published(),
                        "relay": relay,
                        "sources": sources,
                    })
                );
                return Ok(());
            }
            if stats.sources.is_empty() {
                say!(
                    "the outbox is empty: a materialize processor with `outbox = true` (or a \
                     service's RowTable::with_outbox) writes to it"
                );
                return Ok(());
            }
            say!(
                "{:<28} {:>10} {:>12} {:>12}  last published",
                "source",
                "pending",
                "oldest (s)",
                "published"
            );
            for s in &stats.sources {
                say!(
                    "{:<28} {:>10} {:>12} {:>12}  {}",
                    s.source,
                    s.pending,
                    s.oldest_pending
                        .map_or("-".to_owned(), |t| format!("{:.1}", (now - t) as f64 / 1e3)),
                    s.published,
                    s.last_published.map_or("never".to_owned(), show_time)
                );
            }
            match &stats.relay {
                Some(holder) => say!("relay: {holder}"),
                None if stats.pending() > 0 => say!(
                    "relay: none running: `floodway run` with a processor that has \
                     `outbox = true` publishes them"
                ),
                None => say!("relay: none running"),
            }
            Ok(())
        }
    }
}
