//! Control services on NATS: `cargo bench -p floodway-cli --bench cepnats`.
//!
//! One *cep* processor (an order is ready once paid; expired when not paid within an hour,
//! so every order sets a timer and none falls due during the run) over the same orders, built
//! and run by the library from one configuration (`build_all`, `run_all`, a bounded read),
//! on a NATS hub and on the embedded hub, in the same run. On NATS a batch whose first
//! delivery does not follow the last this process saw asks the stream what another instance
//! read of its partition, and each batch hands its timers to the stream as message schedules
//! before it is acknowledged; the embedded hub keeps both in its file. Medians of three runs,
//! each into fresh streams and files.

#[path = "../../floodway/benches/common/mod.rs"]
#[macro_use]
mod common;

#[path = "../tests/common/mod.rs"]
mod cli;

use std::time::Instant;

use floodway::hub::ReadOptions;
use floodway::Event;
use floodway_embedded::{Hub, HubOptions};
use floodway_nats::testing::NatsServer;
use floodway_processors::config::Config;

/// The allocator the `floodway` command uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RUNS: usize = 3;

/// `orders` orders submitted now, four in five paid 5 ms later, as they would be published.
fn events(orders: usize) -> Vec<Event> {
    let now = floodway::event::now_millis();
    let mut out = Vec::with_capacity(orders * 2);
    for i in 0..orders {
        let order = serde_json::json!({"id": format!("o-{i}"), "total": 100 + i % 900});
        out.push(
            Event::builder("order-submitted", format!("o-{i}"))
                .id(format!("s-{i}"))
                .timestamp(now + i as i64)
                .field("order", order.clone())
                .build(),
        );
        if i % 5 != 0 {
            out.push(
                Event::builder("payment-captured", format!("o-{i}"))
                    .id(format!("p-{i}"))
                    .timestamp(now + i as i64 + 5)
                    .field("order", order)
                    .build(),
            );
        }
    }
    out
}

/// The processor (the command's tests' orders, not paid within an hour: expired), on the
/// hub the `[hub]` table gives.
fn config(hub: &str) -> String {
    format!("{hub}{}", cli::order_cep("1h"))
}

/// Builds and runs `config` over what its hub holds; events per second, and the orders the
/// processor made ready (read back from its store, as a check).
fn build_and_run(rt: &tokio::runtime::Runtime, config: &str, n: usize) -> (f64, usize) {
    let config = Config::parse(config).unwrap();
    rt.block_on(async {
        let started = Instant::now();
        let (hubs, processors) = floodway_processors::build_all(&config).await.unwrap();
        let options = ReadOptions {
            follow: false,
            ..ReadOptions::default()
        };
        floodway_processors::run_all(&hubs.events, processors, options, std::future::pending())
            .await
            .unwrap();
        let rate = n as f64 / started.elapsed().as_secs_f64();
        let ready = hubs
            .store
            .outbox()
            .unwrap()
            .pending(usize::MAX)
            .unwrap()
            .iter()
            .filter(|p| p.event.event_type() == "order-ready")
            .count();
        (rate, ready)
    })
}

fn main() {
    let orders = common::events_wanted(40_000) / 2;
    let rt = common::two_workers();
    let events = events(orders);
    let n = events.len();
    let paid = orders - orders.div_ceil(5);
    let server = NatsServer::start();
    let tmp = tempfile::tempdir_in(".").unwrap();
    let (mut on_nats, mut embedded) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        eprintln!("run {} of {RUNS}: NATS...", run + 1);
        let store = tmp.path().join(format!("nats-store-{run}.db"));
        let hub = format!(
            "[hub]\npath = {store:?}\npartitions = 4\n\n[hub.nats]\nservers = [\"{}\"]\nstream = \"CEP{run}\"\nsubject = \"cep{run}\"\n",
            server.url()
        );
        rt.block_on(async {
            let nats = floodway_nats::NatsHub::connect(&floodway_nats::NatsHubOptions {
                servers: vec![server.url()],
                stream: format!("CEP{run}"),
                subject: format!("cep{run}"),
                partitions: Some(4),
                ..Default::default()
            })
            .await
            .unwrap();
            for chunk in events.chunks(1_000) {
                nats.publish(chunk).await.unwrap();
            }
        });
        let (rate, ready) = build_and_run(&rt, &config(&hub), n);
        assert_eq!(ready, paid, "every paid order is ready, on NATS");
        on_nats.push(rate);

        eprintln!("run {} of {RUNS}: embedded hub...", run + 1);
        let file = tmp.path().join(format!("hub-{run}.db"));
        let options = HubOptions {
            partitions: Some(4),
            ..HubOptions::default()
        };
        let embedded_hub = Hub::open(&file, options).unwrap();
        rt.block_on(async {
            for chunk in events.chunks(1_000) {
                embedded_hub.publish(chunk).await.unwrap();
            }
        });
        drop(embedded_hub);
        let hub = format!("[hub]\npath = {file:?}\npartitions = 4\n");
        let (rate, ready) = build_and_run(&rt, &config(&hub), n);
        assert_eq!(ready, paid, "every paid order is ready, embedded");
        embedded.push(rate);
    }
    let (on_nats, embedded) = (common::median(on_nats), common::median(embedded));
    out!(
        "{n} events ({orders} orders, {paid} paid), 4 partitions, one timer per order, median of {RUNS} runs\n"
    );
    out!("| measurement | result | reference | ratio |");
    out!("|---|---|---|---|");
    out!(
        "| cep processor on NATS: collect, evaluate, {orders} timers handed to the stream, catch-up checks | {on_nats:.0} ev/s | {embedded:.0} ev/s, the same on the embedded hub | {:.2} |",
        on_nats / embedded
    );
    common::chart::save_table("cepnats");
}
