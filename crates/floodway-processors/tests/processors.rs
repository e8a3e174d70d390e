//! The ready-made processors, end to end on a real hub file and a real HTTP server.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use floodway::idempotence::{MemoryView, Version};
use floodway::testing::generate;
use floodway::Event;
use floodway_embedded::{FaultFilter, Hub, HubOptions, SubscriptionOptions};
use floodway_processors::{build_all, run_all, Config};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

#[derive(Default)]
struct Target {
    calls: AtomicU64,
    received: Mutex<HashMap<String, u32>>,
    throttled: Mutex<std::collections::HashSet<String>>,
}

/// An HTTP target on a free loopback port: 400 for orders with a negative total (poison),
/// 429 for the first call of some events (a throttle), 200 with a JSON body otherwise.
async fn serve(target: Arc<Target>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let target = target.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let target = target.clone();
                    async move {
                        target.calls.fetch_add(1, Ordering::SeqCst);
                        let key = req
                            .headers()
                            .get("idempotency-key")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let event: Value = serde_json::from_slice(&body).unwrap();
                        let (status, reply) = if event["order"]["total"].as_i64().unwrap_or(0) < 0 {
                            (
                                StatusCode::BAD_REQUEST,
                                r#"{"error":"negative total"}"#.to_owned(),
                            )
                        } else if key.len().is_multiple_of(3)
                            && target.throttled.lock().unwrap().insert(key.clone())
                        {
                            // The first call of about a third of the events is throttled, once.
                            (StatusCode::TOO_MANY_REQUESTS, "slow down".to_owned())
                        } else {
                            *target
                                .received
                                .lock()
                                .unwrap()
                                .entry(key.clone())
                                .or_default() += 1;
                            (StatusCode::OK, format!(r#"{{"notified":"{key}"}}"#))
                        };
                        let mut response = Response::new(Full::new(Bytes::from(reply)));
                        *response.status_mut() = status;
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn bounded() -> SubscriptionOptions {
    SubscriptionOptions {
        follow: false,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_processors_materialize_call_forward_and_monitor_faults() {
    let dir = tempfile::tempdir().unwrap();
    let target = Arc::new(Target::default());
    let addr = serve(target.clone()).await;
    let mut events = generate::orders(600, 31);
    // Three poison orders for the HTTP target.
    let mut poisoned = 0;
    for e in events
        .iter_mut()
        .filter(|e| e.event_type() == "order-paid")
        .take(3)
    {
        e.fields_mut().get_mut("order").unwrap()["total"] = Value::from(-1);
        poisoned += 1;
    }
    let config_text = format!(
        r#"
[hub]
path = "hub.db"

[[processors]]
kind = "materialize"
name = "orders-view"
types = ["order-*"]
view = "orders"
value = "/order"

[[processors]]
kind = "http"
name = "notify"
types = ["order-paid"]
url = "http://{addr}/notify"
rate_limit = 2000
burst = 20
# Not `order-*`: the orders view would take the responses too.
respond_as = "payment-notified"

[[processors]]
kind = "forward"
name = "archive"
types = ["order-*"]
to = "archive.db"
"#
    );
    let path = dir.path().join("floodway.toml");
    std::fs::write(&path, config_text).unwrap();
    let config = Config::load(&path).unwrap();
    let (hubs, processors) = build_all(&config).await.unwrap();
    let hub = hubs.store.clone();
    hub.publish(&events).await.unwrap();
    let reports = run_all(&hubs.events, processors, bounded(), std::future::pending())
        .await
        .unwrap();
    assert_eq!(reports.len(), 3);

    // The view holds the latest order per order id.
    let mut want = MemoryView::new();
    for e in events
        .iter()
        .filter(|e| e.event_type().starts_with("order-"))
    {
        want.apply(
            e.partition_key(),
            Version::of(e),
            e.field("order").unwrap().clone(),
        );
    }
    let mut got = MemoryView::new();
    for row in hub.view("orders").unwrap().rows().unwrap() {
        got.apply(&row.key, row.version, row.value);
    }
    assert_eq!(got, want);

    // Every valid order-paid event reached the target once (throttles were retried).
    let paid: Vec<&Event> = events
        .iter()
        .filter(|e| e.event_type() == "order-paid")
        .collect();
    let received = target.received.lock().unwrap().clone();
    assert_eq!(received.len(), paid.len() - poisoned);
    assert!(received.values().all(|n| *n == 1));
    assert!(
        target.calls.load(Ordering::SeqCst) > received.len() as u64,
        "some were throttled"
    );

    // The archive got every order event.
    let archive = Hub::open(dir.path().join("archive.db"), HubOptions::default()).unwrap();
    let orders = events
        .iter()
        .filter(|e| e.event_type().starts_with("order-"))
        .count();
    let archived: u64 = archive
        .stats()
        .unwrap()
        .partitions
        .iter()
        .map(|p| p.events)
        .sum();
    assert_eq!(archived, orders as u64);

    // Faults and responses went to the hub as events; the fault monitor stores the faults.
    let monitor = floodway_processors::processors::fault_monitor(&hubs, "faults").unwrap();
    run_all(
        &hubs.events,
        vec![monitor],
        bounded(),
        std::future::pending(),
    )
    .await
    .unwrap();
    let faults = hub
        .fault_store()
        .unwrap()
        .list(&FaultFilter::default())
        .unwrap();
    let summary: Vec<String> = faults
        .iter()
        .map(|f| format!("{}/{}: {}", f.pipeline, f.name, f.message))
        .collect();
    assert_eq!(faults.len(), poisoned, "{summary:?}");
    assert!(faults
        .iter()
        .all(|f| f.pipeline == "notify" && f.message.contains("400")));
    let notified: u64 = {
        let mut n = 0;
        let (mut reader, _) = hub.subscribe("check", bounded()).unwrap().split();
        use floodway::Source;
        while let Some(batch) = reader.next_batch(500).await.unwrap() {
            n += batch
                .iter()
                .filter(|r| Event::decode(&r.data).unwrap().event_type() == "payment-notified")
                .count() as u64;
        }
        n
    };
    assert_eq!(notified, (paid.len() - poisoned) as u64);
}

/// The same processors on NATS JetStream, fed from an embedded hub by a forward processor
/// and forwarding back into another embedded hub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_processors_run_on_nats_with_forwarding_both_ways() {
    let server = floodway_nats::testing::NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let target = Arc::new(Target::default());
    let addr = serve(target.clone()).await;
    let mut events = generate::orders(400, 32);
    let mut poisoned = 0;
    for e in events
        .iter_mut()
        .filter(|e| e.event_type() == "order-paid")
        .take(2)
    {
        e.fields_mut().get_mut("order").unwrap()["total"] = Value::from(-1);
        poisoned += 1;
    }
    let nats = format!(
        r#"servers = ["{}"]
stream = "SHOP"
subject = "shop""#,
        server.url()
    );
    // The edge: an embedded hub forwarding everything to NATS.
    let edge = dir.path().join("edge.toml");
    std::fs::write(
        &edge,
        format!(
            r#"
[hub]
path = "edge.db"

[[processors]]
kind = "forward"
name = "to-nats"
types = ["*"]
to_nats = {{ {}, partitions = 4 }}
"#,
            nats.replace('\n', ", ")
        ),
    )
    .unwrap();
    // The core: processors on NATS, views and faults in a local store, an archive back on an
    // embedded hub.
    let core = dir.path().join("core.toml");
    std::fs::write(
        &core,
        format!(
            r#"
[hub]
path = "stores.db"
partitions = 4

[hub.nats]
{nats}

[[processors]]
kind = "materialize"
name = "orders-view"
types = ["order-*"]
view = "orders"
value = "/order"

[[processors]]
kind = "http"
name = "notify"
types = ["order-paid"]
url = "http://{addr}/notify"
respond_as = "payment-notified"

[[processors]]
kind = "forward"
name = "archive"
types = ["order-*"]
to = "archive.db"
"#
        ),
    )
    .unwrap();

    let (edge_hubs, edge_processors) = build_all(&Config::load(&edge).unwrap()).await.unwrap();
    edge_hubs.store.publish(&events).await.unwrap();
    run_all(
        &edge_hubs.events,
        edge_processors,
        bounded(),
        std::future::pending(),
    )
    .await
    .unwrap();

    let (hubs, processors) = build_all(&Config::load(&core).unwrap()).await.unwrap();
    let floodway_processors::EventHub::Nats(nats_hub, _) = &hubs.events else {
        panic!("the core runs on NATS");
    };
    assert_eq!(nats_hub.stats().await.unwrap().messages, 400);
    run_all(&hubs.events, processors, bounded(), std::future::pending())
        .await
        .unwrap();

    let mut want = MemoryView::new();
    for e in events
        .iter()
        .filter(|e| e.event_type().starts_with("order-"))
    {
        want.apply(
            e.partition_key(),
            Version::of(e),
            e.field("order").unwrap().clone(),
        );
    }
    let mut got = MemoryView::new();
    for row in hubs.store.view("orders").unwrap().rows().unwrap() {
        got.apply(&row.key, row.version, row.value);
    }
    assert_eq!(got, want);
    let paid = events
        .iter()
        .filter(|e| e.event_type() == "order-paid")
        .count();
    let received = target.received.lock().unwrap().clone();
    assert_eq!(received.len(), paid - poisoned);
    assert!(received.values().all(|n| *n == 1));

    let archive = Hub::open(dir.path().join("archive.db"), HubOptions::default()).unwrap();
    let archived: u64 = archive
        .stats()
        .unwrap()
        .partitions
        .iter()
        .map(|p| p.events)
        .sum();
    let orders = events
        .iter()
        .filter(|e| e.event_type().starts_with("order-"))
        .count();
    assert_eq!(archived, orders as u64);

    // Faults went to the fault subject; the monitor stores them in the local store.
    let monitor = floodway_processors::processors::fault_monitor(&hubs, "faults").unwrap();
    run_all(
        &hubs.events,
        vec![monitor],
        bounded(),
        std::future::pending(),
    )
    .await
    .unwrap();
    let faults = hubs
        .store
        .fault_store()
        .unwrap()
        .list(&FaultFilter::default())
        .unwrap();
    assert_eq!(faults.len(), poisoned);
    assert!(faults.iter().all(|f| f.pipeline == "notify"));
    let stats = nats_hub.stats().await.unwrap();
    assert_eq!(stats.faults, poisoned as u64);
    // Responses were published to NATS as events.
    assert_eq!(
        stats.messages,
        400 + (paid - poisoned) as u64 + poisoned as u64
    );
}
