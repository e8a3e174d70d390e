//! The HTTP sink against real loopback servers: plain HTTP/1.1, HTTPS with a test CA, mTLS,
//! HTTP/2; each method, templates, secrets, `treat_as` and response events.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use floodway::{Batch, Error, ErrorClass, Event, Uow};
use floodway_http::{Body, HttpSink, HttpSinkConfig, Outcome, Secret};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tower::ServiceExt;

/// What the server saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    uri: String,
    version: http::Version,
    headers: http::HeaderMap,
    body: String,
}

type Answer = Arc<dyn Fn(&Seen, u64) -> Response<Full<Bytes>> + Send + Sync>;

struct Server {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicU64>,
}

impl Server {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn ok() -> Answer {
    Arc::new(|_, _| Response::new(Full::new(Bytes::from_static(b"{\"ok\":true}"))))
}

fn status(code: u16, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = StatusCode::from_u16(code).unwrap();
    response
}

/// A server on 127.0.0.1 answering with `answer` (given the request and its number), over TLS
/// (HTTP/1.1 or HTTP/2, as the client chooses) when `tls` is given.
async fn serve(answer: Answer, tls: Option<rustls::ServerConfig>) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let acceptor = tls.map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)));
    let calls = Arc::new(AtomicU64::new(0));
    let connections = Arc::new(AtomicU64::new(0));
    let accepted = connections.clone();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::SeqCst);
            let (answer, log, calls, acceptor) =
                (answer.clone(), log.clone(), calls.clone(), acceptor.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (answer, log, calls) = (answer.clone(), log.clone(), calls.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.unwrap().to_bytes();
                        let seen = Seen {
                            method: parts.method.to_string(),
                            uri: parts.uri.to_string(),
                            version: parts.version,
                            headers: parts.headers,
                            body: String::from_utf8_lossy(&body).into(),
                        };
                        let n = calls.fetch_add(1, Ordering::SeqCst);
                        let response = answer(&seen, n);
                        log.lock().unwrap().push(seen);
                        Ok::<_, Infallible>(response)
                    }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match acceptor {
                    Some(acceptor) => {
                        // A refused handshake ends the connection here, as a real server's.
                        if let Ok(stream) = acceptor.accept(stream).await {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                    None => {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
            });
        }
    });
    Server {
        addr,
        seen,
        connections,
    }
}

async fn send(sink: &HttpSink, event: Event) -> Result<(), Error> {
    // A batch of one answers as a whole.
    sink.clone()
        .oneshot(Batch::one(Uow::detached(event)))
        .await
        .map(|_| ())
}

fn order(id: &str) -> Event {
    Event::builder("order-paid", id)
        .id(format!("e-{id}"))
        .field(
            "order",
            serde_json::json!({"id": id, "total": 12.5, "tenant": "acme"}),
        )
        .build()
}

#[tokio::test]
async fn a_throttle_with_retry_after_as_a_date_asks_for_that_delay() {
    let wait = Duration::from_secs(3);
    let server = serve(
        Arc::new(move |_, n| {
            if n > 0 {
                return Response::new(Full::new(Bytes::from_static(b"{}")));
            }
            let mut response = status(429, String::new());
            let at = httpdate::fmt_http_date(SystemTime::now() + wait);
            response
                .headers_mut()
                .insert("retry-after", at.parse().unwrap());
            response
        }),
        None,
    )
    .await;
    let sink =
        HttpSink::new(HttpSinkConfig::post(&format!("http://{}/orders", server.addr)).unwrap());
    let err = send(&sink, order("o-1")).await.unwrap_err();
    assert!(err.is_throttle(), "{err}");
    let delay = err.retry_after().expect("the date became a delay");
    // An HTTP date has whole seconds: 3 s ahead reads as 2 to 3 s.
    assert!(
        delay >= Duration::from_secs(2) && delay <= Duration::from_secs(3),
        "{delay:?}"
    );
    send(&sink, order("o-1")).await.unwrap();
    assert_eq!(server.seen().len(), 2);
}

#[tokio::test]
async fn connections_are_reused() {
    let server = serve(ok(), None).await;
    let sink = HttpSink::new(HttpSinkConfig::post(&format!("http://{}/x", server.addr)).unwrap());
    for i in 0..20 {
        send(&sink, order(&format!("o-{i}"))).await.unwrap();
    }
    // Four at once need four connections, and keep them for the next four.
    for round in 0..5 {
        let calls = (0..4).map(|i| send(&sink, order(&format!("p-{round}-{i}"))));
        for result in futures_util::future::join_all(calls).await {
            result.unwrap();
        }
    }
    assert_eq!(server.seen().len(), 40);
    let connections = server.connections.load(Ordering::SeqCst);
    assert!(connections <= 4, "{connections} connections for 40 calls");
}

#[tokio::test]
async fn every_method_with_templates_over_the_event() {
    let server = serve(ok(), None).await;
    let base = format!("http://{}", server.addr);
    let url =
        format!("{base}/tenants/{{/order/tenant}}/orders/{{/order/id}}?total={{/order/total}}");
    for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
        let config = HttpSinkConfig::new(&url, method)
            .unwrap()
            .header("X-Order", "order {/order/id}")
            .unwrap()
            .header("X-Static", "fixed")
            .unwrap();
        send(&HttpSink::new(config), order("o 1/2")).await.unwrap();
    }
    let seen = server.seen();
    assert_eq!(seen.len(), 5);
    for (s, method) in seen.iter().zip(["GET", "POST", "PUT", "PATCH", "DELETE"]) {
        assert_eq!(s.method, method);
        assert_eq!(s.uri, "/tenants/acme/orders/o%201%2F2?total=12.5");
        assert_eq!(s.headers["x-order"], "order o 1/2");
        assert_eq!(s.headers["x-static"], "fixed");
        // The event's id with the method and URL template: stable, and this endpoint's own.
        let key = floodway::event::stable_id(&[method, &url, "e-o 1/2"]);
        assert_eq!(s.headers["idempotency-key"], key.as_str());
        if method == "GET" || method == "DELETE" {
            assert_eq!(s.body, "", "{method} sends no body by default");
            assert!(s.headers.get("content-type").is_none());
        } else {
            let sent: serde_json::Value = serde_json::from_str(&s.body).unwrap();
            assert_eq!(sent["id"], "e-o 1/2", "{method} sends the event");
            assert_eq!(s.headers["content-type"], "application/json");
        }
    }
}

#[tokio::test]
async fn the_body_is_the_event_a_field_or_nothing() {
    let server = serve(ok(), None).await;
    let url = format!("http://{}/x", server.addr);
    let field = HttpSinkConfig::post(&url)
        .unwrap()
        .body(Body::Field("/order".into()));
    send(&HttpSink::new(field), order("o-1")).await.unwrap();
    let empty = HttpSinkConfig::new(&url, "PUT").unwrap().body(Body::Empty);
    send(&HttpSink::new(empty), order("o-1")).await.unwrap();
    let with_body = HttpSinkConfig::new(&url, "DELETE")
        .unwrap()
        .body(Body::Event);
    send(&HttpSink::new(with_body), order("o-1")).await.unwrap();
    let seen = server.seen();
    let order: serde_json::Value = serde_json::from_str(&seen[0].body).unwrap();
    assert_eq!(
        order,
        serde_json::json!({"id": "o-1", "total": 12.5, "tenant": "acme"})
    );
    assert_eq!(seen[1].body, "");
    assert!(seen[2].body.contains("\"order-paid\""));
}

#[tokio::test]
async fn a_field_the_request_needs_is_poison_and_nothing_is_sent() {
    let server = serve(ok(), None).await;
    let url = format!("http://{}/orders/{{/order/customer}}", server.addr);
    let sink = HttpSink::new(HttpSinkConfig::post(&url).unwrap());
    let err = send(&sink, order("o-1")).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Poison);
    assert_eq!(err.name(), "MissingField");
    // The same for a header and for the body.
    let x = HttpSinkConfig::post(&format!("http://{}/x", server.addr)).unwrap();
    let header = x.clone().header("X-Customer", "{/customer/id}").unwrap();
    let body = x.body(Body::Field("/customer".into()));
    for config in [header, body] {
        let err = send(&HttpSink::new(config), order("o-1"))
            .await
            .unwrap_err();
        assert_eq!(err.class(), ErrorClass::Poison);
    }
    assert!(server.seen().is_empty());
}

#[tokio::test]
async fn secrets_are_sent_but_never_printed() {
    // The server echoes the credentials it was given in its refusals, as some do.
    let server = serve(
        Arc::new(|seen, _| {
            let echo = format!(
                "bad request from {:?} / {:?}",
                seen.headers.get("authorization"),
                seen.headers.get("x-api-key")
            );
            // The token alone too, JSON-escaped, as an error document quoting it would.
            let token = format!("{:?}", seen.headers.get("authorization"));
            let token = token
                .trim_start_matches("Some(\"Bearer ")
                .trim_end_matches("\")");
            let echo = format!("{echo} {{\"token\":\"{}\"}}", token.replace('/', "\\/"));
            status(if seen.uri.contains("retry") { 500 } else { 400 }, echo)
        }),
        None,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("api-key");
    std::fs::write(&key_file, "file-secret-5f1e\n").unwrap();
    // SAFETY-free: the variable is unique to this test and set before any thread reads it.
    std::env::set_var("FLOODWAY_TEST_TOKEN", "Bearer env-secret/9c2a");
    for path in ["/orders", "/retry"] {
        let config = HttpSinkConfig::post(&format!("http://{}{path}", server.addr))
            .unwrap()
            .secret_header("Authorization", Secret::Env("FLOODWAY_TEST_TOKEN".into()))
            .unwrap()
            .secret_header("X-Api-Key", Secret::File(key_file.clone()))
            .unwrap();
        let printed = format!("{config:?}");
        let err = send(&HttpSink::new(config), order("o-1"))
            .await
            .unwrap_err();
        for text in [printed, err.to_string(), format!("{err:?}")] {
            assert!(!text.contains("9c2a"), "{text}");
            assert!(!text.contains("file-secret-5f1e"), "{text}");
        }
        assert!(err.message().contains("[secret]"), "{}", err.message());
    }
    let seen = server.seen();
    assert_eq!(seen[0].headers["authorization"], "Bearer env-secret/9c2a");
    assert_eq!(seen[0].headers["x-api-key"], "file-secret-5f1e");
    // A secret that is not there is a configuration error naming where it was looked for.
    let err = HttpSinkConfig::post("http://127.0.0.1:1/x")
        .unwrap()
        .secret_header("Authorization", Secret::Env("FLOODWAY_TEST_ABSENT".into()))
        .unwrap_err();
    assert!(err.to_string().contains("FLOODWAY_TEST_ABSENT"), "{err}");
}

#[tokio::test]
async fn treat_as_overrides_the_class_of_chosen_statuses() {
    let server = serve(
        Arc::new(|seen, _| {
            let code = seen.uri.trim_start_matches('/').parse().unwrap();
            status(code, format!("status {code}"))
        }),
        None,
    )
    .await;
    let config = |code: u16| {
        HttpSinkConfig::post(&format!("http://{}/{code}", server.addr))
            .unwrap()
            .treat_as("409", Outcome::Success)
            .unwrap()
            .treat_as("4xx", Outcome::Transient)
            .unwrap()
            .treat_as("404", Outcome::Poison)
            .unwrap()
            .treat_as("502", Outcome::Throttled)
            .unwrap()
    };
    let class = |r: Result<(), Error>| r.map_err(|e| (e.class(), e.is_throttle()));
    assert_eq!(
        class(send(&HttpSink::new(config(409)), order("o")).await),
        Ok(())
    );
    assert_eq!(
        class(send(&HttpSink::new(config(404)), order("o")).await),
        Err((ErrorClass::Poison, false)),
        "the exact code wins over the class"
    );
    assert_eq!(
        class(send(&HttpSink::new(config(422)), order("o")).await),
        Err((ErrorClass::Transient, false))
    );
    assert_eq!(
        class(send(&HttpSink::new(config(502)), order("o")).await),
        Err((ErrorClass::Transient, true))
    );
    assert!(HttpSinkConfig::post("http://x/")
        .unwrap()
        .treat_as("6xx", Outcome::Success)
        .is_err());
    assert!(HttpSinkConfig::post("http://x/")
        .unwrap()
        .treat_as("ok", Outcome::Success)
        .is_err());
}

#[tokio::test]
async fn responses_become_events_with_status_and_chosen_headers() {
    let server = serve(
        Arc::new(|_, _| {
            let mut response = status(201, "{\"receipt\":\"r-7\"}".into());
            response
                .headers_mut()
                .insert("etag", "\"v3\"".parse().unwrap());
            response
                .headers_mut()
                .insert("x-internal", "no".parse().unwrap());
            response
        }),
        None,
    )
    .await;
    let published = Arc::new(Mutex::new(Vec::new()));
    let publisher = {
        let published = published.clone();
        tower::util::BoxCloneSyncService::new(tower::service_fn(move |e: Event| {
            published.lock().unwrap().push(e);
            std::future::ready(Ok::<_, Error>(()))
        }))
    };
    let config = HttpSinkConfig::post(&format!("http://{}/x", server.addr))
        .unwrap()
        .publish_response_as("payment-notified")
        .response_headers(["ETag", "location"])
        .unwrap();
    let sink = HttpSink::new(config).with_response_publisher(publisher);
    send(&sink, order("o-1")).await.unwrap();
    let events = published.lock().unwrap().clone();
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e.event_type(), "payment-notified");
    assert_eq!(e.partition_key(), "o-1");
    assert_eq!(e.field("status"), Some(&serde_json::json!(201)));
    assert_eq!(
        e.field("response"),
        Some(&serde_json::json!({"receipt": "r-7"}))
    );
    assert_eq!(
        e.field("headers"),
        Some(&serde_json::json!({"etag": "\"v3\""}))
    );
}

/// A test CA, a server certificate for 127.0.0.1 signed by it, and a client certificate.
struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new() -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Floodway test CA");
        let ca = params.self_signed(&ca_key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Pki { dir, ca, ca_key }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `{name}.pem` and `{name}.key` for a leaf signed by the CA.
    fn issue(&self, name: &str, sans: &[&str], usage: rcgen::ExtendedKeyUsagePurpose) {
        let key = rcgen::KeyPair::generate().unwrap();
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(sans).unwrap();
        params.extended_key_usages = vec![usage];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(self.path(&format!("{name}.key")), key.serialize_pem()).unwrap();
    }

    /// The server's TLS configuration (HTTP/2 and HTTP/1.1 offered), requiring a client
    /// certificate from this CA when `mtls`.
    fn server_config(&self, mtls: bool) -> rustls::ServerConfig {
        self.issue(
            "server",
            &["127.0.0.1", "localhost"],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        );
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if mtls {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.ca.der().clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(
                certs(&self.path("server.pem")),
                key(&self.path("server.key")),
            )
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config
    }
}

fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn key(path: &Path) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_file(path).unwrap()
}

#[tokio::test]
async fn https_is_refused_without_the_ca_and_accepted_with_it_over_http2() {
    let pki = Pki::new();
    let server = serve(ok(), Some(pki.server_config(false))).await;
    let url = format!("https://{}/orders", server.addr);

    let untrusted = HttpSink::new(HttpSinkConfig::post(&url).unwrap());
    let err = send(&untrusted, order("o-1")).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Fatal, "{err}");
    assert_eq!(err.name(), "TlsError");
    assert!(err.message().contains("certificate"), "{}", err.message());

    let trusted = HttpSink::new(
        HttpSinkConfig::post(&url)
            .unwrap()
            .ca_file(pki.path("ca.pem"))
            .unwrap(),
    );
    for i in 0..3 {
        send(&trusted, order(&format!("o-{i}"))).await.unwrap();
    }
    let seen = server.seen();
    assert_eq!(seen.len(), 3);
    assert!(
        seen.iter().all(|s| s.version == http::Version::HTTP_2),
        "HTTP/2 when the server offers it: {:?}",
        seen.iter().map(|s| s.version).collect::<Vec<_>>()
    );

    // A plain-text server on an https URL is a handshake that fails: transient.
    let plain = serve(ok(), None).await;
    let url = format!("https://{}/orders", plain.addr);
    let sink = HttpSink::new(
        HttpSinkConfig::post(&url)
            .unwrap()
            .ca_file(pki.path("ca.pem"))
            .unwrap(),
    );
    let err = send(&sink, order("o-1")).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Transient, "{err}");
}

#[tokio::test]
async fn mtls_is_refused_without_a_client_certificate_and_accepted_with_one() {
    let pki = Pki::new();
    pki.issue(
        "client",
        &["client"],
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    );
    let server = serve(ok(), Some(pki.server_config(true))).await;
    let url = format!("https://{}/orders", server.addr);
    let config = || {
        HttpSinkConfig::post(&url)
            .unwrap()
            .ca_file(pki.path("ca.pem"))
            .unwrap()
    };

    let anonymous = HttpSink::new(config());
    let err = send(&anonymous, order("o-1")).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Fatal, "{err}");
    assert!(server.seen().is_empty());

    let identified = HttpSink::new(
        config()
            .client_identity(pki.path("client.pem"), pki.path("client.key"))
            .unwrap(),
    );
    send(&identified, order("o-1")).await.unwrap();
    assert_eq!(server.seen().len(), 1);

    // A key that is not the certificate's is refused when the sink is configured.
    pki.issue(
        "other",
        &["other"],
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    );
    let err = config()
        .client_identity(pki.path("client.pem"), pki.path("other.key"))
        .unwrap_err();
    assert!(err.to_string().contains("client_key"), "{err}");
    let err = config().ca_file(pki.path("missing.pem")).unwrap_err();
    assert!(err.to_string().contains("missing.pem"), "{err}");
}

#[tokio::test]
async fn an_answer_over_the_body_limit_is_judged_by_its_status() {
    // 2 MiB of answer, over the 1 MiB read: a 200 for the first order, a 400 for the next.
    let big = "x".repeat(2 * 1024 * 1024);
    let server = serve(
        Arc::new(move |seen: &Seen, _| {
            let code = if seen.body.contains("o-bad") {
                400
            } else {
                200
            };
            status(code, big.clone())
        }),
        None,
    )
    .await;
    let url = format!("http://{}/x", server.addr);
    let sink = HttpSink::new(HttpSinkConfig::post(&url).unwrap());
    // Taken: the call did what it was for, whatever the length of what came back.
    send(&sink, order("o-1")).await.unwrap();
    // Refused: poison, as a short 400 is, not a transient error to send again.
    let err = send(&sink, order("o-bad")).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Poison, "{err}");
    // Taken, but too long to publish as a response event: poison too.
    let publisher = tower::util::BoxCloneSyncService::new(tower::service_fn(|_: Event| {
        std::future::ready(Ok::<_, Error>(()))
    }));
    let sink = HttpSink::new(
        HttpSinkConfig::post(&url)
            .unwrap()
            .publish_response_as("payment-notified"),
    )
    .with_response_publisher(publisher);
    let err = send(&sink, order("o-2")).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Poison, "{err}");
    assert!(err.to_string().contains("ResponseTooLarge"), "{err}");
    assert_eq!(server.seen().len(), 3, "each sent once");
}

#[tokio::test]
async fn configured_headers_replace_the_sinks_own() {
    let server = serve(ok(), None).await;
    let url = format!("http://{}/orders/{{/order/id}}", server.addr);
    let config = HttpSinkConfig::new(&url, "PATCH")
        .unwrap()
        .header("Content-Type", "application/merge-patch+json")
        .unwrap()
        .header("Idempotency-Key", "order-{/order/id}")
        .unwrap();
    send(&HttpSink::new(config), order("o-1")).await.unwrap();
    // Without them, each endpoint has keys of its own for the same event.
    for path in ["customers", "payments"] {
        let url = format!("http://{}/{path}", server.addr);
        send(
            &HttpSink::new(HttpSinkConfig::post(&url).unwrap()),
            order("o-1"),
        )
        .await
        .unwrap();
    }
    let seen = server.seen();
    let values = |name: &str| -> Vec<String> {
        seen[0]
            .headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(values("content-type"), ["application/merge-patch+json"]);
    assert_eq!(values("idempotency-key"), ["order-o-1"]);
    assert_ne!(
        seen[1].headers["idempotency-key"],
        seen[2].headers["idempotency-key"]
    );
}

#[tokio::test]
async fn a_redirect_stops_the_processor_only_for_a_url_written_out_whole() {
    let server = serve(
        Arc::new(|seen, _| match seen.uri.as_str() {
            "/orders/old" | "/fixed" => {
                let mut moved = status(308, String::new());
                moved
                    .headers_mut()
                    .insert("location", "/elsewhere".parse().unwrap());
                moved
            }
            _ => status(200, "{}".into()),
        }),
        None,
    )
    .await;
    let templated = HttpSink::new(
        HttpSinkConfig::post(&format!("http://{}/orders/{{/order/id}}", server.addr)).unwrap(),
    );
    // One event's resource moved: transient, for the breaker to fault it while others pass.
    let err = send(&templated, order("old")).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Transient, "{err}");
    send(&templated, order("new")).await.unwrap();
    let fixed =
        HttpSink::new(HttpSinkConfig::post(&format!("http://{}/fixed", server.addr)).unwrap());
    let err = send(&fixed, order("new")).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Fatal, "{err}");
}

#[tokio::test]
async fn a_success_whose_unused_answer_is_cut_short_is_not_sent_again() {
    // A raw server: 201 with a body shorter than it announced, then the connection closed.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicU64::new(0));
    let counted = requests.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let mut buf = vec![0u8; 64 * 1024];
            let mut read = Vec::new();
            // The request's head and its body (Content-Length), then the cut answer.
            loop {
                let n = stream.read(&mut buf).await.unwrap_or(0);
                read.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&read).to_lowercase();
                let done = text.split_once("\r\n\r\n").is_some_and(|(head, body)| {
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    body.len() >= length
                });
                if n == 0 || done {
                    break;
                }
            }
            let _ = stream
                .write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 100\r\n\r\n0123456789")
                .await;
        }
    });
    let url = format!("http://{addr}/orders");
    send(
        &HttpSink::new(HttpSinkConfig::post(&url).unwrap()),
        order("o-1"),
    )
    .await
    .unwrap();
    assert_eq!(requests.load(Ordering::SeqCst), 1);
    // Its answer wanted as a response event, the cut is transient: it is all there is of it.
    let wanted = HttpSinkConfig::post(&url)
        .unwrap()
        .publish_response_as("order-noted");
    let err = send(&HttpSink::new(wanted), order("o-1"))
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Transient);
    assert_eq!(err.name(), "ResponseBody");
}

/// A service whose accept queue is full: the connection is not made within the sink's connect
/// timeout (5 s), which counts as a timeout (overload) for adaptive concurrency.
#[tokio::test]
async fn a_connection_not_made_in_time_is_a_timeout() {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    // Never accepted: a backlog of one fills with the first connections.
    let _listener = socket.listen(1).unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(c)) = tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            held.push(c);
        }
    }
    let sink = HttpSink::new(HttpSinkConfig::post(&format!("http://{addr}/x")).unwrap());
    let started = std::time::Instant::now();
    let err = send(&sink, order("o-1")).await.unwrap_err();
    assert!(err.is_timeout(), "{err} after {:?}", started.elapsed());
    assert_eq!(err.class(), ErrorClass::Transient);
}
