//! The HTTP sink against a real loopback server.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use floodway::{Batch, Event, Uow};
use floodway_http::{HttpSink, HttpSinkConfig};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use tower::ServiceExt;

/// A server that answers its first call with 429 and `Retry-After` as an HTTP date `wait`
/// ahead, and 200 after that.
async fn throttling_once(wait: Duration) -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let counter = calls.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req| {
                    let first = counter.fetch_add(1, Ordering::SeqCst) == 0;
                    async move {
                        let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
                        if first {
                            *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                            let at = httpdate::fmt_http_date(SystemTime::now() + wait);
                            response
                                .headers_mut()
                                .insert("retry-after", at.parse().unwrap());
                        }
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, calls)
}

#[tokio::test]
async fn a_throttle_with_retry_after_as_a_date_asks_for_that_delay() {
    let (addr, calls) = throttling_once(Duration::from_secs(3)).await;
    let sink = HttpSink::new(HttpSinkConfig::post(&format!("http://{addr}/orders")).unwrap());
    let batch = || Batch::one(Uow::detached(Event::builder("order-paid", "o-1").build()));
    let err = sink.clone().oneshot(batch()).await.unwrap_err();
    assert!(err.is_throttle(), "{err}");
    let delay = err.retry_after().expect("the date became a delay");
    // An HTTP date has whole seconds: 3 s ahead reads as 2 to 3 s.
    assert!(
        delay >= Duration::from_secs(2) && delay <= Duration::from_secs(3),
        "{delay:?}"
    );
    sink.oneshot(batch()).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}
