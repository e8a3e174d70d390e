//! `floodway view`: the views in the hub's store, read through the keyed-state contract.

use anyhow::{bail, Context as _};
use floodway::state::{Scan, StateRow, StateStore as _};

use crate::util::{show_time, HubArgs};

#[derive(clap::Subcommand)]
pub(crate) enum ViewCommand {
    /// The views in the hub's store (the embedded file; with NATS, its local store).
    ///
    /// Example: floodway view list --config floodway.toml
    List {
        #[command(flatten)]
        hub: HubArgs,
    },
    /// One row of a view: its key, the version that wrote it (event time and id), when it
    /// expires, and its value. A table of rows (a view keyed by `{ pk, sk }`) takes both keys.
    ///
    /// Example: floodway view get --config floodway.toml orders o-1
    /// Example: floodway view get --config floodway.toml order_rows o-1 order
    Get {
        #[command(flatten)]
        hub: HubArgs,
        /// The view.
        view: String,
        /// The row's key (a table of rows: its partition key).
        key: String,
        /// A table of rows: the row's sort key.
        sk: Option<String>,
    },
    /// Rows of a view in key order: those whose key starts with `--prefix`, a page at a time
    /// (`--after` the last key shown for the next page). A table of rows: the rows of
    /// partition `--pk` whose sort key starts with `--prefix`, or without `--pk` every row.
    ///
    /// Example: floodway view query --config floodway.toml orders --prefix o-1 --limit 20
    /// Example: floodway view query --config floodway.toml order_rows --pk o-1 --prefix item#
    Query {
        #[command(flatten)]
        hub: HubArgs,
        /// The view.
        view: String,
        /// A table of rows: the partition.
        #[arg(long)]
        pk: Option<String>,
        /// Only keys (a table of rows: sort keys) that start with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Only keys after this one (the last key of the page before; a table of rows: a
        /// sort key with --pk, else `PK/SK`).
        #[arg(long, value_name = "KEY")]
        after: Option<String>,
        /// Rows at most.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// One JSON object per row (key, version, expires, value) instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) async fn run(command: ViewCommand) -> anyhow::Result<()> {
    match command {
        ViewCommand::List { hub } => {
            let hub = hub.open()?;
            let views = hub.views()?;
            let tables = hub.row_tables()?;
            if views.is_empty() && tables.is_empty() {
                say!("no views yet: a materialize processor makes its view on first use");
            }
            for view in views {
                say!("{view}");
            }
            for table in tables {
                say!("{table} (rows by pk and sk)");
            }
            Ok(())
        }
        ViewCommand::Get { hub, view, key, sk } => {
            let opened = hub.open()?;
            if opened.row_tables()?.contains(&view) {
                let Some(sk) = sk else {
                    bail!("`{view}` is a table of rows: give the partition key and the sort key");
                };
                let table = opened.rows(&view)?;
                let row_key = floodway::rows::RowKey::new(key, sk);
                let Some(row) = table.get(&row_key)? else {
                    bail!("`{view}` has no row {row_key}: `floodway view query {view} --pk ...` lists them");
                };
                say!("{}", serde_json::to_string_pretty(&rows_json(&row))?);
                return Ok(());
            }
            if let Some(sk) = sk {
                bail!("`{view}` is a view of one value per key: give only the key, not `{sk}`");
            }
            let state = open(&hub, &view).await?;
            let Some(row) = state.get(&key).await.map_err(unreadable)? else {
                bail!("view `{view}` has no row `{key}`: `floodway view query` lists its keys");
            };
            say!("key      {}", row.key);
            say!(
                "version  {} ({}), event {}",
                row.version.timestamp,
                show_time(row.version.timestamp),
                row.version.id
            );
            say!(
                "expires  {}",
                row.expires_at.map_or("never".to_owned(), show_time)
            );
            say!("{}", serde_json::to_string_pretty(&row.value)?);
            Ok(())
        }
        ViewCommand::Query {
            hub,
            view,
            pk,
            prefix,
            after,
            limit,
            json,
        } => {
            let opened = hub.open()?;
            if opened.row_tables()?.contains(&view) {
                let table = opened.rows(&view)?;
                let limit = limit.max(1);
                let rows = match &pk {
                    Some(pk) => {
                        let mut query = floodway::rows::RowQuery::partition(pk.clone(), limit)
                            .sk_prefix(prefix);
                        if let Some(after) = after {
                            query = query.after(after);
                        }
                        table.query(&query)?
                    }
                    None if !prefix.is_empty() => {
                        bail!("--prefix selects sort keys of one partition: give --pk too")
                    }
                    None => {
                        // `pk/sk`, or `["pk","sk"]` where the partition key holds a `/`.
                        let after = match after.as_deref() {
                            Some(a) if a.starts_with('[') => {
                                let (pk, sk): (String, String) = serde_json::from_str(a)
                                    .with_context(|| {
                                        format!("--after `{a}` is not [\"pk\", \"sk\"]")
                                    })?;
                                Some(floodway::rows::RowKey::new(pk, sk))
                            }
                            Some(a) => {
                                let (pk, sk) = a.split_once('/').unwrap_or((a, ""));
                                Some(floodway::rows::RowKey::new(pk, sk))
                            }
                            None => None,
                        };
                        table.scan(after.as_ref(), limit)?
                    }
                };
                for row in &rows {
                    if json {
                        say!("{}", rows_json(row));
                    } else {
                        say!(
                            "{:<32} {} {:<20} {}",
                            row.key.to_string(),
                            show_time(row.version.timestamp),
                            row.version.id,
                            shortened(
                                &serde_json::Value::Object(row.fields.clone()).to_string(),
                                100
                            )
                        );
                    }
                }
                if rows.len() == limit {
                    let last = rows.last().map(|r| match &pk {
                        Some(_) => r.key.sk.clone(),
                        // A `/` in the partition key would be read as the separator, a
                        // leading `[` as the start of the other form.
                        None if r.key.pk.contains('/') || r.key.pk.starts_with('[') => {
                            serde_json::to_string(&(&r.key.pk, &r.key.sk)).unwrap_or_default()
                        }
                        None => r.key.to_string(),
                    });
                    eprintln!(
                        "{} rows shown; the next page: --after '{}'",
                        rows.len(),
                        last.unwrap_or_default()
                    );
                }
                return Ok(());
            }
            let state = open(&hub, &view).await?;
            let mut scan = Scan::prefix(prefix, limit.max(1));
            if let Some(after) = after {
                scan = scan.after(after);
            }
            let rows = state.scan(&scan).await.map_err(unreadable)?;
            for row in &rows {
                if json {
                    say!("{}", row_json(row));
                } else {
                    say!(
                        "{:<24} {} {:<20} {}",
                        row.key,
                        show_time(row.version.timestamp),
                        row.version.id,
                        shortened(&row.value.to_string(), 100)
                    );
                }
            }
            if rows.len() == scan.limit {
                let last = rows.last().map_or("", |r| r.key.as_str());
                eprintln!("{} rows shown; the next page: --after '{last}'", rows.len());
            }
            Ok(())
        }
    }
}

/// The view `name` of the hub's store; an error naming the views there when it has none of
/// that name (opening a view would make it).
async fn open(hub: &HubArgs, name: &str) -> anyhow::Result<floodway::state::SharedState> {
    let hub = hub.open()?;
    let views = hub.views()?;
    if !views.iter().any(|v| v == name) {
        bail!(
            "no view `{name}` in {}: {}",
            hub.path().display(),
            if views.is_empty() {
                "it has none yet".to_owned()
            } else {
                format!("it has {}", views.join(", "))
            }
        );
    }
    hub.open(name).await.map_err(unreadable)
}

fn unreadable(e: floodway::BoxError) -> anyhow::Error {
    anyhow::anyhow!("cannot read the view: {e}")
}

/// A row of a table of rows: its key, kind, version, expiry and fields.
fn rows_json(row: &floodway::rows::Row) -> serde_json::Value {
    serde_json::json!({
        "pk": row.key.pk,
        "sk": row.key.sk,
        "discriminator": row.discriminator,
        "version": { "timestamp": row.version.timestamp, "id": row.version.id },
        "expires": row.expires_at,
        "fields": row.fields,
    })
}

fn row_json(row: &StateRow) -> serde_json::Value {
    serde_json::json!({
        "key": row.key,
        "version": { "timestamp": row.version.timestamp, "id": row.version.id },
        "expires": row.expires_at,
        "value": row.value,
    })
}

/// `text` cut to `max` characters, with an ellipsis when cut.
fn shortened(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}
