//! `floodway demo`: the failure design at work on the embedded hub, with a real HTTP service.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use floodway::hub::ReadOptions;
use floodway::idempotence::{MemoryView, Version};
use floodway::testing::generate;
use floodway::Event;
use floodway_embedded::{FaultFilter, Hub};
use floodway_processors::config::{
    ConcurrencyConfig, Config, DurabilityConfig, HttpMethod, HubConfig, ProcessorConfig,
};
use floodway_processors::{build_all, run_all};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::Value;

/// Options of `floodway demo`.
#[derive(clap::Args)]
pub(crate) struct DemoArgs {
    /// How many order events to generate.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Where to keep the hub (default: a temporary directory, deleted at the end).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Per mille of order events whose producer forgot the order id (poison for the view,
    /// fixed and resubmitted at the end).
    #[arg(long, default_value_t = 5)]
    missing: u32,
    /// Per mille of events published twice, as after a producer's retry.
    #[arg(long, default_value_t = 10)]
    duplicates: u32,
    /// Rate limit of calls to the notification service, per second.
    #[arg(long, default_value_t = 4_000)]
    rate: u32,
    /// Calls the notification service takes at once; above that it answers 429.
    #[arg(long, default_value_t = 16)]
    capacity: usize,
    /// Seconds the notification service is down, starting one second in.
    #[arg(long, default_value_t = 2)]
    outage: u64,
    /// Seed of the generated events.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// A payment-notification service on 127.0.0.1: answers in 5 ms at the median with the jitter
/// of a real service (log-normal, sigma 0.5: the p99 is about 3x the median), throttles (429)
/// above its capacity, answers 502 (Bad Gateway) during its outage, and takes the
/// `Idempotency-Key` header, so a redelivered event is acknowledged without a second
/// notification.
struct Service {
    capacity: usize,
    started: Instant,
    outage: (Duration, Duration),
    in_flight: AtomicUsize,
    answered: AtomicU64,
    /// The latencies of answered calls, in microseconds.
    latency_us: AtomicU64,
    /// When the last call was answered, in microseconds since `started`.
    last_answer_us: AtomicU64,
    /// Calls answered in each second since `started`.
    per_second: Mutex<Vec<u64>>,
    throttled: AtomicU64,
    down: AtomicU64,
    repeated: AtomicU64,
    notified: Mutex<HashSet<String>>,
}

impl Service {
    fn answer(&self, key: String) -> (StatusCode, &'static str) {
        let at = self.started.elapsed();
        if at >= self.outage.0 && at < self.outage.1 {
            self.down.fetch_add(1, Ordering::Relaxed);
            return (StatusCode::BAD_GATEWAY, "upstream is down");
        }
        if !self.notified.lock().unwrap().insert(key) {
            self.repeated.fetch_add(1, Ordering::Relaxed);
        }
        self.answered.fetch_add(1, Ordering::Relaxed);
        self.last_answer_us
            .fetch_max(at.as_micros() as u64, Ordering::Relaxed);
        let second = at.as_secs() as usize;
        let mut per_second = self.per_second.lock().unwrap();
        if per_second.len() <= second {
            per_second.resize(second + 1, 0);
        }
        per_second[second] += 1;
        (StatusCode::OK, r#"{"notified":true}"#)
    }
}

/// A log-normal latency with this median and sigma.
fn jittered(median: Duration, sigma: f64) -> Duration {
    // Box-Muller: a standard normal from two uniforms.
    let (u1, u2) = (fastrand::f64().max(1e-12), fastrand::f64());
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    median.mul_f64((sigma * z).exp())
}

async fn serve(service: Arc<Service>) -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let service = service.clone();
            tokio::spawn(async move {
                let handler =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let service = service.clone();
                        async move {
                            let key = req
                                .headers()
                                .get("idempotency-key")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned();
                            let _ = req.into_body().collect().await;
                            let (status, body) = if service.in_flight.fetch_add(1, Ordering::SeqCst)
                                >= service.capacity
                            {
                                service.throttled.fetch_add(1, Ordering::Relaxed);
                                (StatusCode::TOO_MANY_REQUESTS, "slow down")
                            } else {
                                let latency = jittered(Duration::from_millis(5), 0.5);
                                tokio::time::sleep(latency).await;
                                service
                                    .latency_us
                                    .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
                                service.answer(key)
                            };
                            service.in_flight.fetch_sub(1, Ordering::SeqCst);
                            let mut response = Response::new(Full::new(Bytes::from(body)));
                            *response.status_mut() = status;
                            Ok::<_, Infallible>(response)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), handler)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn config(hub: PathBuf, addr: std::net::SocketAddr, rate: u32, key: &str) -> Config {
    Config {
        hub: HubConfig {
            path: hub,
            partitions: Some(8),
            durability: DurabilityConfig::Immediate,
            retention_max_age: None,
            retention_max_bytes: None,
            retention_keep_unread: true,
            lease: None,
            lease_wait: None,
            nats: None,
        },
        encryption: None,
        processors: vec![
            ProcessorConfig::Materialize {
                name: "orders-view".into(),
                types: vec!["order-*".into()],
                view: "orders".into(),
                key: key.into(),
                value: Some("/order".into()),
                batch: Some(500),
                batch_wait: None,
                redact: Vec::new(),
                decrypt: false,
                set: Default::default(),
                remove: Vec::new(),
                add: Default::default(),
                delete: Default::default(),
                delete_on: Vec::new(),
                ttl: None,
                discriminator: None,
                latest: Default::default(),
                stale: Default::default(),
                outbox: false,
            },
            ProcessorConfig::Http {
                name: "notify".into(),
                types: vec!["order-paid".into()],
                url: format!("http://{addr}/notify"),
                method: HttpMethod::Post,
                rate_limit: Some(rate),
                burst: Some((rate / 100).max(1)),
                concurrency: ConcurrencyConfig::Adaptive,
                timeout_ms: 2_000,
                max_attempts: 5,
                respond_as: None,
                enrich: Vec::new(),
                parallelism: 128,
                redact: Vec::new(),
                decrypt: false,
                headers: Default::default(),
                body: None,
                treat_as: Default::default(),
                ca_file: None,
                client_cert: None,
                client_key: None,
                response_headers: Vec::new(),
            },
            ProcessorConfig::FaultMonitor {
                name: "faults".into(),
            },
        ],
    }
}

fn line(label: &str, value: impl std::fmt::Display) {
    say!("  {label:<48} {value}");
}

/// The orders view the events call for: the latest order state per order id.
fn expected_view(events: &[Event], by_partition_key: bool) -> MemoryView<Value> {
    let mut view = MemoryView::new();
    for e in events
        .iter()
        .filter(|e| e.event_type().starts_with("order-"))
    {
        let order = e.field("order").cloned().unwrap_or(Value::Null);
        let key = match order.get("id").and_then(Value::as_str) {
            Some(id) => id.to_owned(),
            None if by_partition_key => e.partition_key().to_owned(),
            None => continue,
        };
        view.apply(&key, Version::of(e), order);
    }
    view
}

fn stored_view(hub: &Hub) -> anyhow::Result<MemoryView<Value>> {
    let mut view = MemoryView::new();
    for row in hub.view("orders")?.rows()? {
        view.apply(&row.key, row.version, row.value);
    }
    Ok(view)
}

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.events == 0 {
        bail!("--events must be at least 1");
    }
    if args.capacity == 0 || args.rate == 0 {
        bail!("--capacity and --rate must be at least 1");
    }
    let started = Instant::now();
    // Counts retries, throttles and breaker openings for the report.
    let tally = crate::tally::Tally::default();
    metrics::set_global_recorder(tally.clone())
        .map_err(|e| anyhow::anyhow!("cannot count metrics: {e}"))?;
    let (_temp, hub_path) = crate::util::fresh_demo_hub(args.dir.as_deref(), "demo.db")?;

    // The events: some order events lack their order id (a producer's bug), some are published
    // twice (a producer's retry).
    let mut events = generate::orders(args.events, args.seed);
    let mut rng = fastrand::Rng::with_seed(args.seed);
    let mut missing = 0;
    for e in events
        .iter_mut()
        .filter(|e| e.event_type().starts_with("order-"))
    {
        if rng.u32(..1000) < args.missing {
            if let Some(order) = e
                .fields_mut()
                .get_mut("order")
                .and_then(Value::as_object_mut)
            {
                order.remove("id");
                missing += 1;
            }
        }
    }
    let mut batches: Vec<Vec<Event>> = Vec::new();
    let mut duplicates = 0;
    for chunk in events.chunks(1_000) {
        let mut batch = chunk.to_vec();
        for e in chunk {
            if rng.u32(..1000) < args.duplicates {
                batch.push(e.clone());
                duplicates += 1;
            }
        }
        batches.push(batch);
    }
    let total = (events.len() + duplicates) as u64;

    let service = Arc::new(Service {
        capacity: args.capacity,
        started,
        outage: (Duration::from_secs(1), Duration::from_secs(1 + args.outage)),
        in_flight: AtomicUsize::new(0),
        answered: AtomicU64::new(0),
        latency_us: AtomicU64::new(0),
        last_answer_us: AtomicU64::new(0),
        per_second: Mutex::new(Vec::new()),
        throttled: AtomicU64::new(0),
        down: AtomicU64::new(0),
        repeated: AtomicU64::new(0),
        notified: Mutex::new(HashSet::new()),
    });
    let addr = serve(service.clone()).await?;
    let config = config(hub_path.clone(), addr, args.rate, "/order/id");
    let (hubs, processors) = build_all(&config).await?;
    let hub = hubs.store.clone();

    say!(
        "Floodway demo: hub {} , notification service at http://{addr}",
        hub_path.display()
    );
    say!(
        "{} events ({} orders without an id, {} published twice); the service takes {} calls at \
         once (429 above), answers in 5 ms at the median with jitter (p99 about 15 ms), and is down from 1 s to {} s",
        events.len(),
        missing,
        duplicates,
        args.capacity,
        1 + args.outage
    );
    say!("processors: orders-view (latest-wins view), notify (HTTP, rate limit {}/s, adaptive concurrency), faults (fault monitor)\n", args.rate);

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runner = {
        let events = hubs.events.clone();
        tokio::spawn(async move {
            run_all(&events, processors, ReadOptions::default(), async {
                stopped.await.ok();
            })
            .await
        })
    };
    let publisher = {
        let hub = hub.clone();
        tokio::spawn(async move {
            for batch in batches {
                hub.publish(&batch).await?;
            }
            Ok::<_, floodway_embedded::HubError>(())
        })
    };

    let bars = MultiProgress::new();
    let style =
        ProgressStyle::with_template("{prefix:>12} {bar:40.cyan/blue} {pos:>7}/{len:7} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
    let bar = |name: &str| {
        let b = bars.add(ProgressBar::new(total));
        b.set_style(style.clone());
        b.set_prefix(name.to_owned());
        b
    };
    let (published_bar, view_bar, notify_bar, faults_bar) = (
        bar("published"),
        bar("orders-view"),
        bar("notify"),
        bar("faults"),
    );
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let published = hub.published()?;
        published_bar.set_length(published.max(total));
        published_bar.set_position(published);
        let mut caught_up = publisher.is_finished();
        for (name, b) in [
            ("orders-view", &view_bar),
            ("notify", &notify_bar),
            ("faults", &faults_bar),
        ] {
            let lag = hub.lag(name)?;
            b.set_length(published);
            b.set_position(published - lag.min(published));
            caught_up &= lag == 0;
        }
        notify_bar.set_message(format!(
            "calls answered {}, throttled {}, during outage {}",
            service.answered.load(Ordering::Relaxed),
            service.throttled.load(Ordering::Relaxed),
            service.down.load(Ordering::Relaxed)
        ));
        if caught_up || runner.is_finished() {
            break;
        }
    }
    publisher.await??;
    let _ = stop.send(());
    let reports = runner
        .await?
        .map_err(|(name, err)| anyhow::anyhow!("processor `{name}` stopped: {err}"))?;
    for b in [&published_bar, &view_bar, &notify_bar, &faults_bar] {
        b.finish();
    }
    let elapsed = started.elapsed();

    say!(
        "\nprocessed {total} published events in {:.1} s",
        elapsed.as_secs_f64()
    );
    for (name, r) in &reports {
        let p = r.pipelines.first();
        line(
            &format!("processor {name}"),
            format!(
                "taken {}, delivered {}, faulted {}",
                p.map_or(0, |p| p.taken),
                p.map_or(0, |p| p.delivered),
                p.map_or(0, |p| p.faults)
            ),
        );
    }
    let faults = hub.fault_store()?.list(&FaultFilter::default())?;
    let mut causes: HashMap<String, u64> = HashMap::new();
    for f in &faults {
        *causes
            .entry(format!("{} in {}/{}", f.name, f.pipeline, f.step))
            .or_default() += 1;
    }
    let mut causes: Vec<_> = causes.into_iter().collect();
    causes.sort();
    for (cause, n) in &causes {
        line(&format!("faults: {cause}"), n);
    }
    let outage_faults = faults.iter().filter(|f| f.pipeline == "notify").count();
    let paid: HashSet<&str> = events
        .iter()
        .filter(|e| e.event_type() == "order-paid")
        .map(|e| e.id())
        .collect();
    let notified = service.notified.lock().unwrap().len();
    line(
        "notification calls answered",
        service.answered.load(Ordering::Relaxed),
    );
    line(
        "notification calls throttled (429)",
        service.throttled.load(Ordering::Relaxed),
    );
    line(
        "notification calls during the outage (502)",
        service.down.load(Ordering::Relaxed),
    );
    line(
        "retries (all pipelines)",
        tally.total("floodway_retries_total"),
    );
    line(
        "throttles seen by adaptive concurrency",
        tally.total("floodway_throttles_total"),
    );
    line(
        "breaker openings",
        tally.total("floodway_breaker_opens_total"),
    );
    line("faults caused by the outage", outage_faults);
    line(
        "order-paid events notified",
        format!("{notified} of {}, each once", paid.len()),
    );
    line(
        "repeated calls absorbed by the idempotency key",
        service.repeated.load(Ordering::Relaxed),
    );
    let answered = service.answered.load(Ordering::Relaxed);
    // Over the time the notifications took: up to the last answer, less the outage.
    let busy = service.last_answer_us.load(Ordering::Relaxed) as f64 / 1e6;
    let calls_per_sec = answered as f64 / (busy - args.outage as f64).max(0.001);
    // What the service can answer per second: its capacity over its mean latency.
    let mean_latency =
        service.latency_us.load(Ordering::Relaxed) as f64 / 1e6 / answered.max(1) as f64;
    let capacity_per_sec = args.capacity as f64 / mean_latency.max(1e-6);
    // The busiest second shows what adaptive concurrency holds once it has found the
    // capacity; the mean also pays for the start and the recovery after the outage.
    let best_second = service
        .per_second
        .lock()
        .unwrap()
        .iter()
        .copied()
        .max()
        .unwrap_or(0);
    line(
        "the service's capacity",
        format!(
            "{capacity_per_sec:.0} calls/s ({} at once / mean latency {:.1} ms; time on the wire and in the client not counted)",
            args.capacity,
            mean_latency * 1e3
        ),
    );
    line(
        "notification calls/s while the service was up",
        format!(
            "{calls_per_sec:.0} on average, {best_second} in the busiest second (rate limit {}/s)",
            args.rate
        ),
    );
    let view_ok = stored_view(&hub)? == expected_view(&events, false);
    line(
        "view matches the events (orders with an id)",
        if view_ok {
            "yes: zero lost, zero doubled"
        } else {
            "NO"
        },
    );
    if !view_ok || notified != paid.len() || outage_faults > 0 {
        bail!("the demo's checks failed (see above)");
    }

    say!("\nthe fix: key the view by the partition key, which every order event has; resubmitting the faults of orders-view...");
    let fixed = config_with_key(&config, "partitionKey");
    let outcome = crate::faults_cmd::resubmit_faults(
        &hubs,
        &fixed,
        FaultFilter {
            pipeline: Some("orders-view".into()),
            ..FaultFilter::default()
        },
        1_000,
        false,
    )
    .await?;
    line("resubmitted and succeeded", outcome.succeeded);
    line("still failing", outcome.failed);
    let view_ok = stored_view(&hub)? == expected_view(&events, true);
    line(
        "view matches every order event",
        if view_ok { "yes" } else { "NO" },
    );
    if !view_ok || outcome.failed > 0 {
        bail!("resubmission did not repair the view");
    }
    say!("\ndone in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn config_with_key(config: &Config, new_key: &str) -> Config {
    let mut fixed = config.clone();
    for p in &mut fixed.processors {
        if let ProcessorConfig::Materialize { key, .. } = p {
            *key = new_key.into();
        }
    }
    fixed
}
