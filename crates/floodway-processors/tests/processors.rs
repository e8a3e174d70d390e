//! The ready-made processors, end to end on a real hub file and a real HTTP server.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use floodway::idempotence::{MemoryView, Version};
use floodway::testing::generate;
use floodway::Event;
use floodway_embedded::{FaultFilter, Hub, HubOptions};
use floodway_processors::{build_all, run_all, Config, Hubs};
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

/// Writes `text` as the configuration file in `dir`, publishes `events` to its hub and runs
/// every configured processor over them once.
async fn run_config(
    dir: &std::path::Path,
    text: &str,
    events: &[Event],
) -> (Hubs, Vec<(String, floodway::runtime::RunReport)>) {
    let path = dir.join("floodway.toml");
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).unwrap();
    let (hubs, processors) = build_all(&config).await.unwrap();
    hubs.store.publish(events).await.unwrap();
    let reports = run_all(&hubs.events, processors, bounded(), std::future::pending())
        .await
        .unwrap();
    (hubs, reports)
}

/// Runs a fault monitor over the hub: the fault events published so far, into the store.
async fn store_faults(hubs: &Hubs) {
    let monitor = floodway_processors::processors::fault_monitor(hubs, "faults").unwrap();
    run_all(
        &hubs.events,
        vec![monitor],
        bounded(),
        std::future::pending(),
    )
    .await
    .unwrap();
}

fn bounded() -> floodway::ReadOptions {
    floodway::ReadOptions::default().bounded()
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
    let (hubs, reports) = run_config(dir.path(), &config_text, &events).await;
    let hub = hubs.store.clone();
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
    store_faults(&hubs).await;
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
        let (mut reader, _) = hub.subscribe("check", bounded().into()).unwrap().split();
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
    let stats = hubs.events.stats().await.unwrap();
    assert!(
        stats.description.starts_with("NATS stream"),
        "the core runs on NATS"
    );
    let held: u64 = stats.partitions.iter().map(|p| p.events).sum();
    assert_eq!(held + stats.faults.unwrap_or(0), 400);
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
    store_faults(&hubs).await;
    let faults = hubs
        .store
        .fault_store()
        .unwrap()
        .list(&FaultFilter::default())
        .unwrap();
    assert_eq!(faults.len(), poisoned);
    assert!(faults.iter().all(|f| f.pipeline == "notify"));
    let stats = hubs.events.stats().await.unwrap();
    assert_eq!(stats.faults, Some(poisoned as u64));
    // Responses were published to NATS as events.
    let held: u64 = stats.partitions.iter().map(|p| p.events).sum();
    assert_eq!(held, 400 + (paid - poisoned) as u64);
}

/// Log lines of every test in this file, for the ones that check what was logged.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || CapturedWriter(writer.clone()))
            .init();
        logs
    })
    .clone()
}

struct CapturedWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for CapturedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An HTTPS API on a free loopback port, with a self-signed certificate for 127.0.0.1:
/// `PATCH /tenants/{tenant}/orders/{id}` with the order as the body and a bearer token.
/// Without the token: 401. A negative total: 400 echoing the token back, as careless APIs
/// do. An order it has seen: 409. Otherwise 200 with an `ETag`.
async fn serve_https(
    cert: &rcgen::CertifiedKey,
    token: &'static str,
) -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let applied = Arc::new(Mutex::new(Vec::new()));
    let log = applied.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, log) = (acceptor.clone(), log.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let log = log.clone();
                    async move {
                        let auth = req
                            .headers()
                            .get("authorization")
                            .map(|v| v.to_str().unwrap().to_owned())
                            .unwrap_or_default();
                        let path = req.uri().path().to_owned();
                        let method = req.method().clone();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let order: Value = serde_json::from_slice(&body).unwrap();
                        let mut response = Response::new(Full::new(Bytes::from("{}")));
                        let status = if auth != format!("Bearer {token}") || method != "PATCH" {
                            StatusCode::UNAUTHORIZED
                        } else if order["total"].as_f64().unwrap_or(0.0) < 0.0 {
                            *response.body_mut() = Full::new(Bytes::from(format!(
                                "negative total (request authorized by {auth})"
                            )));
                            StatusCode::BAD_REQUEST
                        } else if log.lock().unwrap().contains(&path) {
                            StatusCode::CONFLICT
                        } else {
                            log.lock().unwrap().push(path.clone());
                            response
                                .headers_mut()
                                .insert("etag", "\"v1\"".parse().unwrap());
                            StatusCode::OK
                        };
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
    (addr, applied)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_api_with_a_secret_token_templates_and_treat_as_keeps_the_secret() {
    const TOKEN: &str = "tok-7b1f93c2e0";
    let logs = captured_logs();
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    std::fs::write(dir.path().join("api-ca.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("api-token"), format!("Bearer {TOKEN}\n")).unwrap();
    let (addr, applied) = serve_https(&cert, TOKEN).await;

    let mut events: Vec<Event> = generate::orders(300, 77)
        .into_iter()
        .filter(|e| e.event_type() == "order-paid")
        .collect();
    for e in events.iter_mut().take(2) {
        e.fields_mut().get_mut("order").unwrap()["total"] = Value::from(-1);
    }
    // The same order paid twice: the second call is answered 409, which means done.
    let mut again = events[5].clone();
    again.set_id("order-paid-again");
    events.push(again);
    for e in &mut events {
        e.fields_mut()
            .get_mut("order")
            .unwrap()
            .as_object_mut()
            .unwrap()
            .insert("tenant".into(), Value::from("acme"));
    }
    let config_text = format!(
        r#"
[hub]
path = "hub.db"

[[processors]]
kind = "http"
name = "apply"
types = ["order-paid"]
url = "https://{addr}/tenants/{{/order/tenant}}/orders/{{/order/id}}"
method = "PATCH"
headers = {{ Authorization = {{ file = "api-token" }}, X-Order = "{{/order/id}}" }}
body = "/order"
treat_as = {{ "409" = "success" }}
ca_file = "api-ca.pem"
respond_as = "order-applied"
response_headers = ["etag"]
max_attempts = 2

[[processors]]
kind = "fault-monitor"
name = "faults"
"#
    );
    let (hubs, _) = run_config(dir.path(), &config_text, &events).await;
    let hub = hubs.store.clone();
    // The fault events published by the first run, into the store.
    store_faults(&hubs).await;

    let orders: std::collections::HashSet<String> = events
        .iter()
        .skip(2)
        .map(|e| e.field("order").unwrap()["id"].as_str().unwrap().to_owned())
        .collect();
    let applied = applied.lock().unwrap().clone();
    assert_eq!(applied.len(), orders.len(), "each valid order once");
    assert!(applied[0].starts_with("/tenants/acme/orders/"));

    let faults = hub
        .fault_store()
        .unwrap()
        .list(&FaultFilter::default())
        .unwrap();
    assert_eq!(faults.len(), 2, "the two negative totals");
    assert!(faults
        .iter()
        .all(|f| f.class == "poison" && f.message.contains("400")));
    assert!(
        faults.iter().all(|f| f.message.contains("[secret]")),
        "{faults:?}"
    );

    // Responses, including the 409's, are events with their status and ETag.
    let (mut reader, _) = hub.subscribe("check", bounded().into()).unwrap().split();
    let mut statuses = Vec::new();
    use floodway::Source;
    while let Some(batch) = reader.next_batch(500).await.unwrap() {
        for r in batch {
            let e = Event::decode(&r.data).unwrap();
            if e.event_type() == "order-applied" {
                statuses.push(e.field("status").unwrap().as_u64().unwrap());
                if e.field("status") == Some(&Value::from(200)) {
                    assert_eq!(e.field("headers").unwrap()["etag"], "\"v1\"");
                }
            }
        }
    }
    statuses.sort_unstable();
    assert_eq!(statuses.len(), events.len() - 2);
    assert_eq!(statuses.last(), Some(&409));

    // The token is nowhere: not in a log line, not in a byte the hub stored (events, fault
    // events, the fault store, the WAL).
    drop((hub, hubs));
    let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("apply"), "the run was logged");
    assert!(!logs.contains(TOKEN), "a log line holds the token");
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() == "api-token" {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            !bytes.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()),
            "{} holds the token",
            path.display()
        );
    }
}
