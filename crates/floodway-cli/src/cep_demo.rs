//! `floodway cep demo`: control services on the real clock. Orders are submitted over a few
//! seconds; most are paid within the window (some payments arrive before their order, some
//! twice), the others never are. A *cep* processor makes each paid order ready and expires
//! the others when their timers fire; a materialize processor counts each order's outcomes.
//! At the end every order must have exactly one outcome, and each expiry must have come
//! within a second of its time.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use floodway::hub::ReadOptions;
use floodway::rows::RowKey;
use floodway::Event;
use floodway_processors::{build_all, run_all, start_background, Config};

/// Options of `floodway cep demo`.
#[derive(clap::Args)]
pub(crate) struct CepDemoArgs {
    /// How many orders.
    #[arg(long, default_value_t = 2_000)]
    orders: usize,
    /// Per mille of orders that are paid (within the window).
    #[arg(long, default_value_t = 700)]
    paid: u32,
    /// The window a payment has, e.g. 5s.
    #[arg(long, default_value = "5s")]
    window: humantime::Duration,
    /// Seconds over which the orders are submitted.
    #[arg(long, default_value_t = 3)]
    over: u64,
    /// Where to keep the hub (default: a temporary directory, deleted at the end).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Seed of the orders.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn config(hub: &std::path::Path, window: Duration) -> anyhow::Result<Config> {
    let text = format!(
        r#"
[hub]
path = "{}"
partitions = 4

[[processors]]
kind = "cep"
name = "orders-cep"
types = ["order-submitted", "payment-captured"]
correlate = [{{ key = "/order/id" }}]
ttl = "1h"

[[processors.rules]]
name = "ready"
kind = "all"
types = ["order-submitted", "payment-captured"]
emit = "order-ready"

[[processors.rules]]
name = "expired"
kind = "absence"
first = "order-submitted"
then = "payment-captured"
within = "{}ms"
emit = "order-expired"

[[processors]]
kind = "materialize"
name = "outcomes"
types = ["order-ready", "order-expired"]
view = "outcomes"
key = {{ pk = "partitionKey", sk = "outcome" }}
set = {{ type = "/type" }}
add = {{ n = 1 }}
"#,
        hub.display(),
        window.as_millis()
    );
    let config =
        Config::parse(&text).map_err(|e| anyhow::anyhow!("the demo's configuration: {e}"))?;
    config
        .check()
        .map_err(|e| anyhow::anyhow!("the demo's configuration: {e}"))?;
    Ok(config)
}

fn order(ty: &str, id: String, order: usize, at: i64) -> Event {
    Event::builder(ty, format!("o-{order}"))
        .id(id)
        .timestamp(at)
        .field("order", serde_json::json!({ "id": format!("o-{order}") }))
        .build()
}

pub(crate) async fn run(args: CepDemoArgs) -> anyhow::Result<()> {
    if args.orders == 0 || args.paid > 1000 {
        bail!("--orders must be at least 1 and --paid at most 1000");
    }
    let window: Duration = args.window.into();
    if window < Duration::from_millis(100) {
        bail!("--window must be at least 100ms");
    }
    let (_temp, hub_path) = crate::util::fresh_demo_hub(args.dir.as_deref(), "control.db")?;
    let config = config(&hub_path, window)?;
    let (hubs, processors) = build_all(&config).await?;
    let hub = hubs.store.clone();
    say!(
        "{} orders submitted over {} s on {}; {}‰ paid within {:?}, the others expire",
        args.orders,
        args.over,
        hub_path.display(),
        args.paid,
        window
    );

    // The relay and the timers, as `floodway run` has them.
    let background = start_background(&hubs, &config)?;
    let (stop_processors, processors_stopped) = tokio::sync::oneshot::channel::<()>();
    let events = hubs.events.clone();
    let running = tokio::spawn(async move {
        run_all(&events, processors, ReadOptions::default(), async move {
            let _ = processors_stopped.await;
        })
        .await
    });

    // The orders, on the real clock: each submitted at its moment; a paid one's payment
    // within the window (every fifth before its order, every tenth twice).
    let mut rng = fastrand::Rng::with_seed(args.seed);
    let started = Instant::now();
    let start_ms = floodway::event::now_millis();
    let spread = args.over * 1000;
    let mut plan: Vec<(u64, Event)> = Vec::new();
    let mut paid = 0;
    for i in 0..args.orders {
        let at = spread * i as u64 / args.orders as u64;
        plan.push((
            at,
            order("order-submitted", format!("s-{i}"), i, start_ms + at as i64),
        ));
        if rng.u32(..1000) < args.paid {
            paid += 1;
            let delay = rng.u64(..(window.as_millis() as u64 * 8 / 10).max(1));
            let (pay_at, time) = if i % 5 == 0 {
                // Arrives first, but its time is after the order's.
                (at.saturating_sub(50), start_ms + (at + delay) as i64)
            } else {
                (at + delay, start_ms + (at + delay) as i64)
            };
            let payment = order("payment-captured", format!("p-{i}"), i, time);
            if i % 10 == 0 {
                plan.push((pay_at + 100, payment.clone()));
            }
            plan.push((pay_at, payment));
        }
    }
    plan.sort_by_key(|(at, _)| *at);
    let expired_wanted = args.orders - paid;
    let table = hub.rows("outcomes")?;
    let count = |table: &floodway_embedded::RowTable| -> anyhow::Result<(usize, usize, usize)> {
        let (mut ready, mut expired, mut twice) = (0, 0, 0);
        let mut after: Option<RowKey> = None;
        loop {
            let page = table.scan(after.as_ref(), 1_000)?;
            for row in &page {
                match row.fields.get("type").and_then(|t| t.as_str()) {
                    Some("order-ready") => ready += 1,
                    Some("order-expired") => expired += 1,
                    _ => {}
                }
                if row.fields.get("n").and_then(serde_json::Value::as_u64) != Some(1) {
                    twice += 1;
                }
            }
            match page.last() {
                Some(last) if page.len() == 1_000 => after = Some(last.key.clone()),
                _ => break,
            }
        }
        Ok((ready, expired, twice))
    };
    let mut next = 0;
    let mut report = Instant::now();
    loop {
        let elapsed = started.elapsed().as_millis() as u64;
        let due: Vec<Event> = plan[next..]
            .iter()
            .take_while(|(at, _)| *at <= elapsed)
            .map(|(_, e)| e.clone())
            .collect();
        if !due.is_empty() {
            next += due.len();
            hubs.events.publish(&due, true).await?;
        }
        if report.elapsed() >= Duration::from_secs(1) || next == plan.len() {
            let (ready, expired, _) = count(&table)?;
            let pending = hub.cep("orders-cep")?.pending_timers()?;
            if report.elapsed() >= Duration::from_secs(1) {
                say!(
                    "{:>5.1} s  published {:>6}/{}  ready {:>5}/{}  expired {:>5}/{}  timers pending {}",
                    started.elapsed().as_secs_f64(),
                    next,
                    plan.len(),
                    ready,
                    paid,
                    expired,
                    expired_wanted,
                    pending
                );
                report = Instant::now();
            }
            if next == plan.len() && ready + expired >= args.orders {
                break;
            }
        }
        if started.elapsed() > Duration::from_secs(args.over) + window + Duration::from_secs(60) {
            bail!("the outcomes did not all come within a minute of the last timer");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A moment for a repeat to show, then stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ready, expired, twice) = count(&table)?;
    let _ = stop_processors.send(());
    running
        .await?
        .map_err(|(name, e)| anyhow::anyhow!("processor `{name}` stopped: {e}"))?;
    background
        .stop()
        .await
        .map_err(|(what, e)| anyhow::anyhow!("{what} stopped: {e}"))?;

    // How late the expiries came: their publication against their time.
    let mut late: Vec<i64> = hub
        .newest(usize::MAX, |b| {
            Event::decode(b).is_ok_and(|e| e.event_type() == "order-expired")
        })?
        .into_iter()
        .filter_map(|(published, bytes)| Some(published - Event::decode(&bytes).ok()?.timestamp()))
        .collect();
    late.sort_unstable();
    say!("\noutcomes");
    say!("  ready    {ready} (paid: {paid})");
    say!("  expired  {expired} (not paid: {expired_wanted})");
    say!("  an order with more than one outcome: {twice}");
    if let (Some(p50), Some(p99)) = (
        late.get(late.len() / 2),
        late.get((late.len().saturating_sub(1)) * 99 / 100),
    ) {
        say!(
            "  expiries published after their time: p50 {p50} ms, p99 {p99} ms, max {} ms",
            late.last().copied().unwrap_or(0)
        );
    }
    let key = "o-1";
    let state = hub.cep("orders-cep")?.show(key)?;
    say!(
        "  {key}: {} events, {} timers pending, {} emitted (`floodway cep show` shows a key)",
        state.events.len(),
        state.timers.len(),
        state.fired.len()
    );
    if ready != paid || expired != expired_wanted || twice > 0 {
        bail!("the outcomes are not what the orders call for");
    }
    if late.last().is_some_and(|l| *l > 1_000) {
        bail!("an expiry came more than a second after its time");
    }
    say!("every order has exactly one outcome, and every expiry came within a second of its time");
    Ok(())
}
