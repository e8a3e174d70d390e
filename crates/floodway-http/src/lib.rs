//! Floodway's HTTP sink: events to an external API, with throttles, poison and outages told
//! apart.
//!
//! [`HttpSink`] is a `tower::Service<Batch>`: give it to a pipeline, and the pipeline's
//! resilience stack (retry, rate limit, adaptive concurrency, timeout, breaker) does the rest.
//! The sink's only policy is to say what each answer means:
//!
//! | answer | class |
//! |---|---|
//! | 2xx | success (the response can be published as a new event) |
//! | 429, 503 | throttled: retried, and adaptive concurrency backs off (`Retry-After` in seconds or as an HTTP date is honoured) |
//! | 408, other 5xx | transient: retried; the breaker tells an outage from a bad request |
//! | other 4xx | poison: the event is faulted |
//! | 3xx | fatal: the URL is wrong (the processor stops and says so) |
//! | connection refused, reset, timed out | transient |
//! | an unsupported URL | fatal: a configuration error |
//!
//! Each event is sent as its JSON with an `Idempotency-Key` header set to the event id, so a
//! target that honours it applies a redelivered event once.
//!
//! ```no_run
//! use floodway_http::{HttpSink, HttpSinkConfig};
//! use floodway::Pipeline;
//!
//! let sink = HttpSink::new(HttpSinkConfig::post("http://127.0.0.1:8080/notify").unwrap());
//! let pipeline = Pipeline::builder("notify").event_type("order-paid").sink(sink).unwrap();
//! ```

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use floodway::layer::BoxFuture;
use floodway::{Batch, Error, Event};
use http::{header, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::util::BoxCloneSyncService;
use tower::ServiceExt;

/// A configuration the sink cannot work with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpConfigError {
    /// The URL does not parse or is not `http://`.
    #[error("invalid URL `{url}`: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The method is neither POST nor PUT.
    #[error("method `{0}` is not supported: use POST or PUT")]
    Method(String),
    /// A header name or value is invalid.
    #[error("invalid header `{0}`")]
    Header(String),
}

/// Where and how events are sent.
#[derive(Debug, Clone)]
pub struct HttpSinkConfig {
    uri: Uri,
    method: Method,
    headers: Vec<(HeaderName, HeaderValue)>,
    response_type: Option<String>,
}

impl HttpSinkConfig {
    /// POST each event to `url`.
    ///
    /// # Errors
    /// When `url` is not a valid `http://` URL.
    pub fn post(url: &str) -> Result<Self, HttpConfigError> {
        Self::new(url, "POST")
    }

    /// Send each event to `url` with `method` (`POST` or `PUT`).
    ///
    /// # Errors
    /// When `url` is not a valid `http://` URL or the method is not supported.
    pub fn new(url: &str, method: &str) -> Result<Self, HttpConfigError> {
        let uri: Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| HttpConfigError::Url {
                url: url.into(),
                reason: e.to_string(),
            })?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(HttpConfigError::Url {
                    url: url.into(),
                    reason: format!("scheme `{other}` is not supported: use http://"),
                })
            }
            None => {
                return Err(HttpConfigError::Url {
                    url: url.into(),
                    reason: "it needs a scheme and a host, e.g. http://127.0.0.1:8080/path".into(),
                })
            }
        }
        let method = match method.to_ascii_uppercase().as_str() {
            "POST" => Method::POST,
            "PUT" => Method::PUT,
            other => return Err(HttpConfigError::Method(other.into())),
        };
        Ok(HttpSinkConfig {
            uri,
            method,
            headers: Vec::new(),
            response_type: None,
        })
    }

    /// Adds a header to every request.
    ///
    /// # Errors
    /// When the name or value is not a valid header.
    pub fn header(mut self, name: &str, value: &str) -> Result<Self, HttpConfigError> {
        let n = HeaderName::try_from(name).map_err(|_| HttpConfigError::Header(name.into()))?;
        let v = HeaderValue::try_from(value).map_err(|_| HttpConfigError::Header(name.into()))?;
        self.headers.push((n, v));
        Ok(self)
    }

    /// Publishes each successful response as a new event of `event_type`, derived from the
    /// event sent (same partition key, a stable id), with the response body (JSON, or text) in
    /// its `response` field.
    #[must_use]
    pub fn publish_response_as(mut self, event_type: impl Into<String>) -> Self {
        self.response_type = Some(event_type.into());
        self
    }

    /// The URL.
    pub fn uri(&self) -> &Uri {
        &self.uri
    }
}

/// Where response events go: any service that publishes an event.
pub type ResponsePublisher = BoxCloneSyncService<Event, (), Error>;

/// Sends each event of a batch to an HTTP endpoint, in order; see the [crate docs](crate).
#[derive(Clone)]
pub struct HttpSink {
    client: Client<HttpConnector, Full<Bytes>>,
    config: Arc<HttpSinkConfig>,
    responses: Option<ResponsePublisher>,
}

impl std::fmt::Debug for HttpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSink")
            .field("method", &self.config.method)
            .field("uri", &self.config.uri)
            .finish_non_exhaustive()
    }
}

impl HttpSink {
    /// A sink with a pooled HTTP/1.1 client.
    pub fn new(config: HttpSinkConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        HttpSink {
            client,
            config: Arc::new(config),
            responses: None,
        }
    }

    /// Where to publish response events (see [`HttpSinkConfig::publish_response_as`]).
    #[must_use]
    pub fn with_response_publisher(mut self, publisher: ResponsePublisher) -> Self {
        self.responses = Some(publisher);
        self
    }

    async fn send(&self, event: &Event) -> Result<(), Error> {
        let body = match event.source_text() {
            Some(text) => Bytes::copy_from_slice(text.as_bytes()),
            None => Bytes::from(event.to_json()),
        };
        // An id that cannot be a header value (a control character) is this event's problem.
        let key = HeaderValue::from_str(event.id()).map_err(|_| {
            Error::poison_msg(
                "InvalidIdempotencyKey",
                format!("event id {:?} cannot be sent as a header", event.id()),
            )
        })?;
        let mut request = Request::builder()
            .method(self.config.method.clone())
            .uri(self.config.uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header("idempotency-key", key);
        for (name, value) in &self.config.headers {
            request = request.header(name, value);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| Error::fatal_msg("InvalidRequest", e.to_string()))?;
        let response = self.client.request(request).await.map_err(|e| {
            let message = format!("{}: {}", self.config.uri, error_chain(&e));
            Error::transient_msg("ConnectionError", message)
        })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after(v, std::time::SystemTime::now()));
        // At most 1 MiB of answer: a target must not exhaust the processor's memory.
        let body = http_body_util::Limited::new(response.into_body(), 1024 * 1024)
            .collect()
            .await
            .map_err(|e| Error::transient_msg("ResponseBody", e.to_string()))?
            .to_bytes();
        if status.is_success() {
            return self.publish_response(event, &body).await;
        }
        Err(classify(status, retry_after, &body))
    }

    async fn publish_response(&self, event: &Event, body: &Bytes) -> Result<(), Error> {
        let (Some(event_type), Some(publisher)) = (&self.config.response_type, &self.responses)
        else {
            return Ok(());
        };
        let response = serde_json::from_slice(body)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(body).into()));
        let derived = event
            .derive(event_type.clone())
            .field("response", response)
            .build();
        publisher.clone().oneshot(derived).await
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The delay a `Retry-After` header asks for: a number of seconds, or an HTTP date (a date
/// already past asks for no delay). `None` when it is neither.
pub fn retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// What a non-2xx answer means.
pub fn classify(status: StatusCode, retry_after: Option<Duration>, body: &[u8]) -> Error {
    let snippet: String = String::from_utf8_lossy(body).chars().take(200).collect();
    let message = format!("{status}: {snippet}");
    let err = match status.as_u16() {
        429 | 503 => Error::throttled_msg("HttpStatus", message),
        408 | 500..=599 => Error::transient_msg("HttpStatus", message),
        // A redirect for an API call means the URL is wrong: a configuration error.
        300..=399 => Error::fatal_msg("HttpStatus", format!("{message} (redirected: fix the URL)")),
        _ => Error::poison_msg("HttpStatus", message),
    };
    match retry_after {
        Some(delay) => err.with_retry_after(delay),
        None => err,
    }
}

impl tower::Service<Batch> for HttpSink {
    type Response = ();
    type Error = Error;
    type Future = BoxFuture<()>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, batch: Batch) -> Self::Future {
        let sink = self.clone();
        Box::pin(async move {
            for event in batch.events() {
                sink.send(event).await?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use floodway::ErrorClass;

    #[test]
    fn answers_are_classified() {
        let class = |code: u16| {
            let err = classify(StatusCode::from_u16(code).unwrap(), None, b"");
            (err.class(), err.is_throttle())
        };
        assert_eq!(class(429), (ErrorClass::Transient, true));
        assert_eq!(class(503), (ErrorClass::Transient, true));
        assert_eq!(class(500), (ErrorClass::Transient, false));
        assert_eq!(class(408), (ErrorClass::Transient, false));
        assert_eq!(class(400), (ErrorClass::Poison, false));
        assert_eq!(class(404), (ErrorClass::Poison, false));
        assert_eq!(class(301), (ErrorClass::Fatal, false));
        let err = classify(
            StatusCode::TOO_MANY_REQUESTS,
            Some(Duration::from_secs(2)),
            b"slow",
        );
        assert_eq!(err.retry_after(), Some(Duration::from_secs(2)));
        assert!(err.message().contains("slow"));
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(784_111_777); // 06 Nov 1994 08:49:37
        assert_eq!(retry_after(" 120 ", now), Some(Duration::from_secs(120)));
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now),
            Some(Duration::ZERO),
            "a date already past"
        );
        assert_eq!(retry_after("soon", now), None);
    }

    #[test]
    fn bad_configuration_is_named() {
        assert!(HttpSinkConfig::post("ftp://x")
            .unwrap_err()
            .to_string()
            .contains("http://"));
        assert!(HttpSinkConfig::post("/path")
            .unwrap_err()
            .to_string()
            .contains("scheme"));
        assert!(HttpSinkConfig::new("http://x", "GET").is_err());
        assert!(HttpSinkConfig::post("http://x")
            .unwrap()
            .header("bad name", "v")
            .is_err());
    }
}
