//! The ready-made processors, end to end on a real hub file and a real HTTP server.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use floodway::testing::generate;
use floodway::Event;
use floodway_embedded::{FaultFilter, Hub, HubOptions};
use floodway_processors::{build_all, run_all, Config, Hubs};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// The orders view helpers of the hub's own tests.
#[path = "../../floodway-embedded/tests/common/mod.rs"]
mod hub;
use hub::{expected_view, stored_view};

#[derive(Default)]
struct Target {
    calls: AtomicU64,
    received: Mutex<HashMap<String, u32>>,
    throttled: Mutex<std::collections::HashSet<String>>,
}

impl Target {
    /// Asserts that every `order-paid` event of `events` but the `poisoned` ones reached the
    /// target exactly once; how many did.
    fn received_each_valid_order_once(&self, events: &[Event], poisoned: usize) -> usize {
        let paid = events
            .iter()
            .filter(|e| e.event_type() == "order-paid")
            .count();
        let received = self.received.lock().unwrap().clone();
        assert_eq!(received.len(), paid - poisoned);
        assert!(received.values().all(|n| *n == 1));
        received.len()
    }
}

/// A `[[processors]]` table: a processor of `kind` named `name` for events of `types`, with
/// `settings` (lines).
fn processor(kind: &str, name: &str, types: &str, settings: &str) -> String {
    format!("\n[[processors]]\nkind = \"{kind}\"\nname = \"{name}\"\ntypes = [\"{types}\"]\n{settings}\n")
}

/// The shop's processors: the orders view, notifications to the target at `addr` (with
/// `limits`, lines) whose responses are events, and an archive to `archive.db`.
fn shop(addr: std::net::SocketAddr, limits: &str) -> String {
    let view = processor(
        "materialize",
        "orders-view",
        "order-*",
        "view = \"orders\"\nvalue = \"/order\"",
    );
    // Not `order-*`: the orders view would take the responses too.
    let respond = "respond_as = \"payment-notified\"";
    let url = format!("url = \"http://{addr}/notify\"\n{limits}{respond}");
    let notify = processor("http", "notify", "order-paid", &url);
    let archive = processor("forward", "archive", "order-*", "to = \"archive.db\"");
    view + &notify + &archive
}

/// Serves HTTP/1 on a free loopback port: each connection is first made ready by `connect`
/// (it is dropped if that gives nothing), then every request is answered by `answer`.
async fn serve_http<C, CF, IO, A, AF>(connect: C, answer: A) -> std::net::SocketAddr
where
    C: Fn(tokio::net::TcpStream) -> CF + Send + 'static,
    CF: Future<Output = Option<IO>> + Send + 'static,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    A: Fn(Request<Incoming>) -> AF + Clone + Send + Sync + 'static,
    AF: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let ready = connect(stream);
            let answer = answer.clone();
            tokio::spawn(async move {
                let Some(stream) = ready.await else {
                    return;
                };
                let service = service_fn(move |req| {
                    let response = answer(req);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// The value of header `name` of `req`, empty if there is none.
fn header(req: &Request<Incoming>, name: &str) -> String {
    let value = req.headers().get(name).map(|v| v.to_str().unwrap());
    value.unwrap_or_default().to_owned()
}

/// A response of `status` with `body`.
fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

/// An HTTP target on a free loopback port: 400 for orders with a negative total (poison),
/// 429 for the first call of some events (a throttle), 200 with a JSON body otherwise.
async fn serve(target: Arc<Target>) -> std::net::SocketAddr {
    let answer = move |req: Request<Incoming>| {
        let target = target.clone();
        async move {
            target.calls.fetch_add(1, Ordering::SeqCst);
            let key = header(&req, "idempotency-key");
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let event: Value = serde_json::from_slice(&body).unwrap();
            if event["order"]["total"].as_i64().unwrap_or(0) < 0 {
                reply(StatusCode::BAD_REQUEST, r#"{"error":"negative total"}"#)
            } else if key.len().is_multiple_of(3)
                && target.throttled.lock().unwrap().insert(key.clone())
            {
                // The first call of about a third of the events is throttled, once.
                reply(StatusCode::TOO_MANY_REQUESTS, "slow down")
            } else {
                *target
                    .received
                    .lock()
                    .unwrap()
                    .entry(key.clone())
                    .or_default() += 1;
                reply(StatusCode::OK, format!(r#"{{"notified":"{key}"}}"#))
            }
        }
    };
    serve_http(|stream| async { Some(stream) }, answer).await
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

/// The faults the hub's store holds, once a fault monitor has stored those published so far.
async fn stored_faults(hubs: &Hubs) -> Vec<floodway_embedded::StoredFault> {
    store_faults(hubs).await;
    let store = hubs.store.fault_store().unwrap();
    store.list(&FaultFilter::default()).unwrap()
}

/// A bounded reader of the hub's events (which keeps the hub open while it lives).
fn check(hub: &Hub) -> floodway_embedded::SubscriptionReader {
    hub.subscribe("check", bounded().into()).unwrap().split().0
}

/// Every event `reader` gives.
async fn events_on(reader: &mut impl floodway::Source) -> Vec<Event> {
    let mut events = Vec::new();
    while let Some(batch) = reader.next_batch(500).await.unwrap() {
        events.extend(batch.iter().map(|r| Event::decode(&r.data).unwrap()));
    }
    events
}

/// Gives the first `n` `order-paid` events a negative total, which the HTTP targets refuse;
/// how many it changed.
fn poison(events: &mut [Event], n: usize) -> usize {
    let paid = events.iter_mut().filter(|e| e.event_type() == "order-paid");
    let mut poisoned = 0;
    for e in paid.take(n) {
        e.fields_mut().get_mut("order").unwrap()["total"] = Value::from(-1);
        poisoned += 1;
    }
    poisoned
}

/// The events the hub's partitions hold.
fn events_held(partitions: &[floodway_embedded::PartitionStats]) -> u64 {
    partitions.iter().map(|p| p.events).sum()
}

/// The archive hub `archive.db` in `dir` holds every order event of `events`.
fn assert_archived(dir: &std::path::Path, events: &[Event]) {
    let archive = Hub::open(dir.join("archive.db"), HubOptions::default()).unwrap();
    let orders = events
        .iter()
        .filter(|e| e.event_type().starts_with("order-"))
        .count();
    assert_eq!(
        events_held(&archive.stats().unwrap().partitions),
        orders as u64
    );
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
    let poisoned = poison(&mut events, 3);
    let throttled = "rate_limit = 2000\nburst = 20\n";
    let config_text = format!("[hub]\npath = \"hub.db\"\n{}", shop(addr, throttled));
    let (hubs, reports) = run_config(dir.path(), &config_text, &events).await;
    let hub = hubs.store.clone();
    assert_eq!(reports.len(), 3);

    // The view holds the latest order per order id.
    assert_eq!(stored_view(&hub), expected_view(&events));

    // Every valid order-paid event reached the target once (throttles were retried).
    let received = target.received_each_valid_order_once(&events, poisoned);
    assert!(
        target.calls.load(Ordering::SeqCst) > received as u64,
        "some were throttled"
    );

    // The archive got every order event.
    assert_archived(dir.path(), &events);

    // Faults and responses went to the hub as events; the fault monitor stores the faults.
    let faults = stored_faults(&hubs).await;
    let summary: Vec<String> = faults
        .iter()
        .map(|f| format!("{}/{}: {}", f.pipeline, f.name, f.message))
        .collect();
    assert_eq!(faults.len(), poisoned, "{summary:?}");
    assert!(faults
        .iter()
        .all(|f| f.pipeline == "notify" && f.message.contains("400")));
    let notified = events_on(&mut check(&hub))
        .await
        .into_iter()
        .filter(|e| e.event_type() == "payment-notified")
        .count();
    assert_eq!(notified, received);
}

/// A fault of a large event (the fault carries the record twice, as bytes and decoded, so it
/// is larger than events may be) reaches the store as itself: trimmed of the decoded event as
/// it is published, and still carrying the record, so it can be resubmitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_of_a_large_event_is_stored_as_itself() {
    let dir = tempfile::tempdir().unwrap();
    let view = processor(
        "materialize",
        "orders-view",
        "order-*",
        "view = \"orders\"\nvalue = \"/order\"",
    );
    // No `order`: the view cannot take it.
    let big = Event::builder("order-noted", "o-1")
        .field("note", "x".repeat(600 * 1024))
        .build();
    let config_text = format!("[hub]\npath = \"hub.db\"\n{view}");
    let (hubs, _) = run_config(dir.path(), &config_text, std::slice::from_ref(&big)).await;
    let faults = stored_faults(&hubs).await;
    let summary: Vec<String> = faults
        .iter()
        .map(|f| format!("{}/{}: {}", f.pipeline, f.name, f.message))
        .collect();
    assert_eq!(faults.len(), 1, "{summary:?}");
    assert_eq!(faults[0].processor, "orders-view", "{summary:?}");
    let details = faults[0].details().unwrap();
    assert!(details.uow.event.is_none(), "the decoded event is left out");
    assert_eq!(
        details.uow.record.bytes().unwrap(),
        big.to_json().as_bytes()
    );
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
    let poisoned = poison(&mut events, 2);
    let nats = format!(
        r#"servers = ["{}"]
stream = "SHOP"
subject = "shop""#,
        server.url()
    );
    // The edge: an embedded hub forwarding everything to NATS.
    let edge = dir.path().join("edge.toml");
    let to_nats = format!(
        "to_nats = {{ {}, partitions = 4 }}",
        nats.replace('\n', ", ")
    );
    let edge_text = format!(
        "[hub]\npath = \"edge.db\"\n{}",
        processor("forward", "to-nats", "*", &to_nats)
    );
    std::fs::write(&edge, edge_text).unwrap();
    // The core: processors on NATS, views and faults in a local store, an archive back on an
    // embedded hub.
    let core = dir.path().join("core.toml");
    let stores = "[hub]\npath = \"stores.db\"\npartitions = 4\n";
    let core_text = format!("{stores}\n[hub.nats]\n{nats}\n{}", shop(addr, ""));
    std::fs::write(&core, core_text).unwrap();

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

    assert_eq!(stored_view(&hubs.store), expected_view(&events));
    let received = target.received_each_valid_order_once(&events, poisoned);

    assert_archived(dir.path(), &events);

    // Faults went to the fault subject; the monitor stores them in the local store.
    let faults = stored_faults(&hubs).await;
    assert_eq!(faults.len(), poisoned);
    assert!(faults.iter().all(|f| f.pipeline == "notify"));
    let stats = hubs.events.stats().await.unwrap();
    assert_eq!(stats.faults, Some(poisoned as u64));
    // Responses were published to NATS as events.
    let held: u64 = stats.partitions.iter().map(|p| p.events).sum();
    assert_eq!(held, 400 + received as u64);
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
    let applied = Arc::new(Mutex::new(Vec::new()));
    let log = applied.clone();
    let answer = move |req: Request<Incoming>| {
        let log = log.clone();
        async move {
            let auth = header(&req, "authorization");
            let path = req.uri().path().to_owned();
            let method = req.method().clone();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let order: Value = serde_json::from_slice(&body).unwrap();
            if auth != format!("Bearer {token}") || method != "PATCH" {
                reply(StatusCode::UNAUTHORIZED, "{}")
            } else if order["total"].as_f64().unwrap_or(0.0) < 0.0 {
                let echo = format!("negative total (request authorized by {auth})");
                reply(StatusCode::BAD_REQUEST, echo)
            } else if log.lock().unwrap().contains(&path) {
                reply(StatusCode::CONFLICT, "{}")
            } else {
                log.lock().unwrap().push(path.clone());
                // An API that echoes the request's headers: the token must not reach the hub
                // through the response event either.
                let echo = serde_json::json!({ "authorization": auth }).to_string();
                let mut response = reply(StatusCode::OK, echo);
                response
                    .headers_mut()
                    .insert("etag", "\"v1\"".parse().unwrap());
                response
            }
        }
    };
    let tls = move |stream| {
        let acceptor = acceptor.clone();
        async move { acceptor.accept(stream).await.ok() }
    };
    (serve_http(tls, answer).await, applied)
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
    let faults = stored_faults(&hubs).await;

    let orders: std::collections::HashSet<String> = events
        .iter()
        .skip(2)
        .map(|e| e.field("order").unwrap()["id"].as_str().unwrap().to_owned())
        .collect();
    let applied = applied.lock().unwrap().clone();
    assert_eq!(applied.len(), orders.len(), "each valid order once");
    assert!(applied[0].starts_with("/tenants/acme/orders/"));

    assert_eq!(faults.len(), 2, "the two negative totals");
    assert!(faults
        .iter()
        .all(|f| f.class == "poison" && f.message.contains("400")));
    assert!(
        faults.iter().all(|f| f.message.contains("[secret]")),
        "{faults:?}"
    );

    // Responses, including the 409's, are events with their status and ETag.
    // The reader lives to the end: the hub's WAL stays on disk to be searched below.
    let mut reader = check(&hub);
    let mut statuses = Vec::new();
    for e in events_on(&mut reader).await {
        if e.event_type() == "order-applied" {
            statuses.push(e.field("status").unwrap().as_u64().unwrap());
            if e.field("status") == Some(&Value::from(200)) {
                assert_eq!(e.field("headers").unwrap()["etag"], "\"v1\"");
                assert_eq!(e.field("response").unwrap()["authorization"], "[secret]");
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

/// A paused processor takes nothing new, even a batch its reader was already waiting for;
/// resumed, it takes everything; its subscription stays its own throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_processor_takes_nothing_until_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("floodway.toml");
    let text = format!(
        "[hub]\npath = \"hub.db\"\npartitions = 2\n{}",
        processor("materialize", "orders-view", "order-*", "view = \"orders\"")
    );
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).unwrap();
    let (hubs, processors) = build_all(&config).await.unwrap();
    let pauses = floodway_processors::Pauses::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = {
        let (hub, pauses) = (hubs.events.clone(), pauses.clone());
        tokio::spawn(async move {
            let stopped = async move {
                let _ = stopped.await;
            };
            floodway_processors::run_all_pausable(
                &hub,
                processors,
                floodway::ReadOptions::default(),
                stopped,
                &pauses,
            )
            .await
        })
    };
    let view = || hubs.store.view("orders").unwrap().rows().unwrap().len();
    let within = |what: &'static str| {
        let started = std::time::Instant::now();
        move || {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(20),
                "{what}"
            )
        }
    };
    // Running, and reading: the first event applied, its reader waits for more.
    let first = [Event::builder("order-paid", "o-first").build()];
    hubs.store.publish(&first).await.unwrap();
    let waited = within("the processor to apply its first event");
    while view() < 1 {
        waited();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(pauses.set("orders-view", true));
    assert!(!pauses.set("no-such-processor", true));
    assert_eq!(pauses.states(), vec![("orders-view".to_owned(), true)]);
    let events: Vec<Event> = (0..40)
        .map(|i| Event::builder("order-paid", format!("o-{i}")).build())
        .collect();
    hubs.store.publish(&events).await.unwrap();
    // Nothing is taken while paused: the reader's pending batch is held, not handed on.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(view(), 1, "a paused processor applied events");
    assert!(pauses.set("orders-view", false));
    let waited = within("the resumed processor to apply every event");
    while view() < 41 {
        waited();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stop.send(()).unwrap();
    let reports = running.await.unwrap().unwrap();
    assert_eq!(reports[0].1.done, 41);
}
