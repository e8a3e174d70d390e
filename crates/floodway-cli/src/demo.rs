//! `floodway demo`: the failure design at work, in memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use floodway::fault::FaultDetails;
use floodway::idempotence::{Inbox, MemoryInbox, MemoryView, Version};
use floodway::layer::breaker::{BreakerConfig, CircuitBreaker};
use floodway::layer::limit::concurrency::Aimd;
use floodway::layer::limit::rate::RateLimiter;
use floodway::layer::Resilience;
use floodway::memory::{MemoryCheckpointer, MemoryFaultSink, MemorySource};
use floodway::testing::generate;
use floodway::{sink_fn, Batch, BatchConfig, Error, Event, Pipeline, Processor, Record};
use serde_json::Value;
use tokio::time::Instant;

/// Options of `floodway demo`.
#[derive(clap::Args)]
pub(crate) struct DemoArgs {
    /// How many order events to generate.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Per mille of events that are undecodable (truncated, missing fields).
    #[arg(long, default_value_t = 2)]
    undecodable: u32,
    /// Per mille of events with a currency the validation rejects (fixed and resubmitted at
    /// the end).
    #[arg(long, default_value_t = 5)]
    invalid: u32,
    /// Per mille of events delivered twice, as after a crash and redelivery.
    #[arg(long, default_value_t = 10)]
    duplicates: u32,
    /// Rate limit of calls to the notification service, per second.
    #[arg(long, default_value_t = 4_000)]
    rate: u32,
    /// Seconds the notification service is down, starting one second in.
    #[arg(long, default_value_t = 2)]
    outage: u64,
    /// Seed of the generated events.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// The view the `materialize` pipeline keeps: latest order state per order id.
#[derive(Default)]
struct OrdersView {
    inbox: MemoryInbox,
    view: MemoryView<Value>,
    duplicates: u64,
}

/// A payment-notification service: it answers in 5 ms, throttles (429) above `capacity`
/// concurrent calls, refuses connections during its outage, and takes the event id as an
/// idempotency key, so a redelivered event is acknowledged without a second notification.
#[derive(Clone)]
struct NotificationService {
    capacity: usize,
    in_flight: Arc<AtomicUsize>,
    outage: (Instant, Instant),
    ok: Arc<AtomicU64>,
    throttled: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    notified: Arc<Mutex<HashMap<String, u32>>>,
    repeated: Arc<AtomicU64>,
}

impl NotificationService {
    async fn call(&self, event: &Event) -> Result<(), Error> {
        let now = Instant::now();
        if now >= self.outage.0 && now < self.outage.1 {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Error::transient_msg(
                "ConnectionRefused",
                "notification service is down",
            ));
        }
        if self.in_flight.fetch_add(1, Ordering::SeqCst) >= self.capacity {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.throttled.fetch_add(1, Ordering::Relaxed);
            return Err(Error::throttled_msg("HttpStatus", "429 Too Many Requests"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.ok.fetch_add(1, Ordering::Relaxed);
        let mut notified = self.notified.lock().unwrap();
        let sent = notified.entry(event.id().to_owned()).or_default();
        if *sent > 0 {
            self.repeated.fetch_add(1, Ordering::Relaxed);
        } else {
            *sent = 1;
        }
        Ok(())
    }
}

fn validate_currency(event: &Event, accepted: &'static [&'static str]) -> Result<(), Error> {
    let currency = event
        .field("order")
        .and_then(|o| o.get("currency"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if accepted.contains(&currency) {
        Ok(())
    } else {
        Err(Error::poison_msg(
            "UnknownCurrency",
            format!("currency `{currency}` is not one of {accepted:?}"),
        ))
    }
}

/// The `materialize` pipeline; `fixed` is the version after the fix, which reads the
/// currency `EURO` as `EUR`.
fn materialize(view: Arc<Mutex<OrdersView>>, fixed: bool) -> anyhow::Result<Pipeline> {
    let sink = sink_fn(move |batch: Batch| {
        let view = view.clone();
        async move {
            let mut v = view.lock().unwrap();
            for event in batch.events() {
                if !v.inbox.first_delivery(event.id()) {
                    v.duplicates += 1;
                    continue;
                }
                let order = event.field("order").cloned().unwrap_or(Value::Null);
                v.view
                    .apply(event.partition_key(), Version::of(event), order);
            }
            Ok::<_, Error>(())
        }
    });
    Ok(Pipeline::builder("materialize")
        .event_type("order-*")
        .map(move |mut uow| {
            let euro = uow.event().field("order").and_then(|o| o.get("currency"))
                == Some(&Value::from("EURO"));
            if fixed && euro {
                if let Some(order) = uow.event_mut().fields_mut().get_mut("order") {
                    order["currency"] = Value::from("EUR");
                }
            }
            Ok(uow)
        })
        .named("normalize-currency")
        .validate(|e| validate_currency(e, &["EUR", "USD"]))
        .named("validate-currency")
        .batch(BatchConfig::count(100).max_wait(Duration::from_millis(20)))
        .sink(sink)?)
}

fn line(label: &str, value: impl std::fmt::Display) {
    println!("  {label:<44} {value}");
}

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.events == 0 {
        bail!("--events must be at least 1");
    }
    let started = Instant::now();
    eprintln!(
        "generating {} order events (seed {})...",
        args.events, args.seed
    );
    let mut events = generate::orders(args.events, args.seed);
    let mut rng = fastrand::Rng::with_seed(args.seed);
    let mut invalid = 0;
    for e in &mut events {
        if e.event_type().starts_with("order-") && rng.u32(..1000) < args.invalid {
            let order = e
                .fields_mut()
                .get_mut("order")
                .context("generated orders have an order")?;
            order["currency"] = Value::from("EURO");
            invalid += 1;
        }
    }
    let mut lines: Vec<String> = events.iter().map(Event::to_json).collect();
    let undecodable = generate::poison_lines(&mut lines, args.undecodable, args.seed + 1);
    let mut delivered: Vec<String> = Vec::with_capacity(lines.len());
    let mut duplicates = 0;
    for l in &lines {
        delivered.push(l.clone());
        if rng.u32(..1000) < args.duplicates {
            delivered.push(l.clone());
            duplicates += 1;
        }
    }
    let records: Vec<Record> = delivered
        .iter()
        .enumerate()
        .map(|(i, l)| Record::new("demo", "0", i as u64 + 1, l.clone()))
        .collect();

    let view = Arc::new(Mutex::new(OrdersView::default()));
    let service = NotificationService {
        capacity: 12,
        in_flight: Arc::default(),
        outage: (
            started + Duration::from_secs(1),
            started + Duration::from_secs(1 + args.outage),
        ),
        ok: Arc::default(),
        throttled: Arc::default(),
        refused: Arc::default(),
        notified: Arc::default(),
        repeated: Arc::default(),
    };
    let breaker = CircuitBreaker::new(
        BreakerConfig {
            open_base: Duration::from_millis(250),
            open_max: Duration::from_secs(2),
        },
        "notifications",
    );
    let limiter = RateLimiter::per_second(args.rate)?.with_burst((args.rate / 100).max(1))?;
    let notify = {
        let service = service.clone();
        Pipeline::builder("notify")
            .event_type("order-paid")
            .parallelism(256)
            .resilience(
                Resilience::default()
                    .timeout(Duration::from_secs(1))
                    .rate_limit(limiter)
                    .adaptive_concurrency(Aimd::default())
                    .shared_breaker(breaker.clone()),
            )
            .sink(sink_fn(move |batch: Batch| {
                let service = service.clone();
                async move {
                    for event in batch.events() {
                        service.call(event).await?;
                    }
                    Ok(())
                }
            }))?
    };
    let faults = MemoryFaultSink::new();
    let checkpointer = MemoryCheckpointer::default();
    let processor = Processor::builder("demo")
        .fault_sink(faults.clone())
        .pipeline(materialize(view.clone(), false)?)
        .pipeline(notify)
        .build()?;

    println!("Floodway demo: {} records ({} undecodable, {} with an unknown currency, {} delivered twice)", records.len(), undecodable, invalid, duplicates);
    println!(
        "the notification service answers in 5 ms, throttles above 12 calls at once (2,400 calls/s), \
         and is down from 1 s to {} s",
        1 + args.outage
    );
    println!(
        "while it is down the breaker holds its calls; records wait for every pipeline, so the \
         whole stream slows down instead of faulting\n"
    );
    let total = records.len() as u64;
    let run = tokio::spawn({
        let processor = processor.clone();
        let checkpointer = checkpointer.clone();
        async move {
            processor
                .run(
                    MemorySource::new(records),
                    checkpointer,
                    std::future::pending(),
                )
                .await
        }
    });
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.tick().await;
    while !run.is_finished() {
        tick.tick().await;
        let settled = checkpointer.settled() as u64;
        eprintln!(
            "  {:>5.1}s  {:>6.1}% settled  notified {:>6}  throttled {:>5}  refused {:>5}  breaker opened {:>2}x  faults {:>4}",
            started.elapsed().as_secs_f64(),
            settled as f64 * 100.0 / total as f64,
            service.ok.load(Ordering::Relaxed),
            service.throttled.load(Ordering::Relaxed),
            service.refused.load(Ordering::Relaxed),
            breaker.opens(),
            faults.len(),
        );
    }
    let report = run.await??;
    let elapsed = started.elapsed();

    // What the view must hold: the latest valid event per order, from the decodable lines.
    let valid_events: Vec<Event> = lines
        .iter()
        .filter_map(|l| Event::decode(l.as_bytes()).ok())
        .filter(|e| e.event_type().starts_with("order-"))
        .collect();
    let expected = |accept_euro: bool| {
        let mut want: MemoryView<Value> = MemoryView::new();
        for e in &valid_events {
            if accept_euro || validate_currency(e, &["EUR", "USD"]).is_ok() {
                let mut order = e.field("order").cloned().unwrap_or(Value::Null);
                if accept_euro && order["currency"] == "EURO" {
                    order["currency"] = Value::from("EUR");
                }
                want.apply(e.partition_key(), Version::of(e), order);
            }
        }
        want
    };

    let fault_list = faults.faults();
    let mut by_cause: HashMap<String, u64> = HashMap::new();
    for f in &fault_list {
        let d: FaultDetails = f.payload()?;
        *by_cause
            .entry(format!(
                "{} in {}/{}",
                d.err.name,
                f.tag("pipeline").unwrap_or("?"),
                f.tag("step").unwrap_or("?")
            ))
            .or_default() += 1;
    }
    let paid = valid_events
        .iter()
        .filter(|e| e.event_type() == "order-paid")
        .count();
    let notified = service.notified.lock().unwrap().len();

    println!(
        "\nprocessed {} records in {:.1} s ({:.0} records/s)",
        report.received,
        elapsed.as_secs_f64(),
        report.received as f64 / elapsed.as_secs_f64()
    );
    for p in &report.pipelines {
        line(
            &format!("pipeline {}", p.name),
            format!(
                "taken {}, delivered {}, faulted {}, filtered {}",
                p.taken, p.delivered, p.faults, p.filtered
            ),
        );
    }
    line("faults, undecodable records", report.decode_faults);
    let mut causes: Vec<_> = by_cause.into_iter().collect();
    causes.sort();
    for (cause, n) in causes {
        line(&format!("faults, {cause}"), n);
    }
    line(
        "notification calls answered",
        service.ok.load(Ordering::Relaxed),
    );
    line(
        "notification calls throttled (429)",
        service.throttled.load(Ordering::Relaxed),
    );
    line(
        "notification calls refused (outage)",
        service.refused.load(Ordering::Relaxed),
    );
    line(
        "breaker opened",
        format!("{} times; nothing faulted by the outage", breaker.opens()),
    );
    let up_secs = (elapsed.as_secs_f64() - args.outage as f64).max(0.001);
    line(
        "notification calls/s while the service was up",
        format!(
            "{:.0} (its capacity 2,400/s; rate limit {}/s)",
            service.ok.load(Ordering::Relaxed) as f64 / up_secs,
            args.rate
        ),
    );
    line(
        "order-paid events notified",
        format!("{notified} of {paid}, each once"),
    );
    line(
        "redelivered calls absorbed by the idempotency key",
        service.repeated.load(Ordering::Relaxed),
    );
    if notified != paid {
        bail!("{} order-paid events were not notified", paid - notified);
    }

    let (rows_ok, dupes) = {
        let v = view.lock().unwrap();
        (v.view == expected(false), v.duplicates)
    };
    line("view: redeliveries ignored by the inbox", dupes);
    line(
        "view: matches the valid events",
        if rows_ok {
            "yes: zero lost, zero doubled"
        } else {
            "NO"
        },
    );
    if !rows_ok {
        bail!("the view does not match the events");
    }

    println!("\nfixing the cause: the validation now accepts `EURO` (as EUR), then resubmitting faults of `materialize`...");
    let resubmit: Vec<Record> = fault_list
        .iter()
        .filter(|f| f.tag("pipeline") == Some("materialize"))
        .map(|f| -> anyhow::Result<Record> {
            let r = f.payload::<FaultDetails>()?.uow.record;
            let data = r.bytes()?;
            Ok(Record::new(r.source, r.partition, r.offset, data).with_attempt(r.attempt + 1))
        })
        .collect::<anyhow::Result<_>>()?;
    let fixed_faults = MemoryFaultSink::new();
    let fixed = Processor::builder("demo")
        .fault_sink(fixed_faults.clone())
        .pipeline(materialize(view.clone(), true)?)
        .build()?;
    let resubmitted = resubmit.len();
    let again = fixed
        .run(
            MemorySource::new(resubmit),
            MemoryCheckpointer::default(),
            std::future::pending(),
        )
        .await?;
    line("resubmitted", resubmitted);
    line(
        "succeeded",
        again.pipeline("materialize").map_or(0, |p| p.delivered),
    );
    line("still failing", fixed_faults.len());
    let rows_ok = view.lock().unwrap().view == expected(true);
    line(
        "view: matches every decodable event",
        if rows_ok { "yes" } else { "NO" },
    );
    line("undecodable records left as faults", report.decode_faults);
    if !rows_ok || !fixed_faults.is_empty() {
        bail!("resubmission did not repair the view");
    }
    println!("\ndone in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
