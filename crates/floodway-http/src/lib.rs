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
//! | 504 | transient, a timeout: retried, and adaptive concurrency backs off (the service behind a gateway did not answer in time) |
//! | 408, 423, 425, other 5xx | transient: retried; the breaker tells an outage from a bad request (with `Retry-After`, adaptive concurrency backs off too) |
//! | 401, 403 | transient when the credentials are configured: an expired or revoked one refuses every call, and the breaker holds the stream as in an outage until it is renewed; poison when a header is filled from the event (a tenant's token: the event's own credentials) |
//! | other 4xx | poison: the event is faulted |
//! | 3xx, 501, 505 | fatal for a URL written out whole: it is wrong, or the service does not take the method (the processor stops and says so); transient for a URL filled from the event, so that the breaker faults the one event whose URL is moved while other calls succeed |
//! | connection refused, reset, timed out, a TLS handshake cut short | transient (a connection timed out also counts as overload for adaptive concurrency, as a call timed out does) |
//! | a certificate the client does not trust, or the server refuses the client's | fatal: the certificates need fixing |
//! | a field the URL, a header or the body needs is missing | poison |
//!
//! Of an answer's body, 1 MiB at most is read: a longer one is cut and judged by its status
//! as any other (a 2xx is a success), except that a 2xx too long to publish as a response
//! event is poison; a body cut short by the connection is transient when the answer is not a
//! success or its body is to become a response event (a 2xx whose unused body is cut short was
//! taken by the service: it is not sent again).
//!
//! [`HttpSinkConfig::treat_as`] overrides the class of chosen statuses (a `409 Conflict` that
//! means "already done" is a success; a `404` that means "no such order" is poison).
//!
//! **Requests.** The method is GET, POST, PUT, PATCH or DELETE. The URL and header values are
//! templates over the event: `https://api.example.com/orders/{/order/id}` puts the value at
//! that JSON pointer in place (percent-encoded in the URL). The body is the whole event (the
//! default for POST, PUT and PATCH), the value at a JSON pointer, or nothing (the default for
//! GET and DELETE). Every request carries an `Idempotency-Key`, so a target that honours it
//! applies a redelivered event once: a stable id of the event's id, the method and the URL
//! template, the same for every delivery of the event to this endpoint and different for
//! another endpoint (an API that keeps keys per account, not per endpoint, refuses a key sent
//! again with other parameters). A header configured with one of the sink's own names
//! (`Idempotency-Key`, `Content-Type`) replaces the sink's.
//!
//! **Secrets.** A header can come from the environment or a file
//! ([`HttpSinkConfig::secret_header`]). Its value is marked sensitive, and is scrubbed from
//! every error message the sink makes and every response event (a server echoing the token in
//! a 400 does not put it into a fault event, a log line or a metric): the whole value and
//! the credentials after a scheme (`Bearer`, `Basic`), as they are, percent-encoded or as a
//! JSON string writes them.
//! Error messages name the URL template, never the URL made from an event (whose fields may be
//! redacted).
//!
//! **Connections.** `http://` and `https://` (rustls with ring's cryptography, no OpenSSL):
//! the system's root certificates unless [`HttpSinkConfig::ca_file`] names others, a client
//! certificate for mTLS with [`HttpSinkConfig::client_identity`] (both refused for an
//! `http://` URL, which would send in the clear what they were meant to protect), HTTP/2 when the server
//! offers it (ALPN), HTTP/1.1 otherwise. Connections are pooled and reused; at most
//! [`HttpSinkConfig::max_idle_connections`] idle ones are kept per host, and the concurrency
//! limit bounds the busy ones.
//!
//! ```no_run
//! use floodway_http::{Body, HttpSink, HttpSinkConfig, Outcome, Secret};
//! use floodway::Pipeline;
//!
//! let config = HttpSinkConfig::new("https://api.example.com/orders/{/order/id}", "PATCH")?
//!     .secret_header("Authorization", Secret::Env("API_TOKEN".into()))?
//!     .body(Body::Field("/order".into()))
//!     .treat_as("409", Outcome::Success)?;
//! let sink = HttpSink::new(config);
//! let pipeline = Pipeline::builder("notify").event_type("order-paid").sink(sink).unwrap();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod template;
mod tls;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use floodway::event::stable_id;
use floodway::sink::deliver_in_order;
use floodway::{Batch, Delivery, Error, Event};
use http::{header, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::util::BoxCloneSyncService;
use tower::ServiceExt;

use template::{Escape, Template};
use tls::TlsSettings;

/// A configuration the sink cannot work with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpConfigError {
    /// The URL does not parse or is not `http://` or `https://`.
    #[error("invalid URL `{url}`: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The method is not one of GET, POST, PUT, PATCH, DELETE.
    #[error("method `{0}` is not supported: use GET, POST, PUT, PATCH or DELETE")]
    Method(String),
    /// A header name or value is invalid.
    #[error("invalid header `{name}`: {reason}")]
    Header {
        /// The header.
        name: String,
        /// What is wrong (never the value of a secret).
        reason: String,
    },
    /// A secret cannot be read.
    #[error("secret for header `{name}`: {reason}")]
    Secret {
        /// The header.
        name: String,
        /// What is wrong (never the value).
        reason: String,
    },
    /// A `treat_as` entry is invalid.
    #[error("treat_as `{status}`: {reason}")]
    TreatAs {
        /// The status pattern.
        status: String,
        /// What is wrong.
        reason: String,
    },
    /// A certificate or key cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
}

/// What a request's body is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// The whole event as JSON.
    Event,
    /// The JSON value at this pointer (a missing value is poison).
    Field(String),
    /// No body.
    Empty,
}

/// Where a secret header value comes from. The value is read once, when the configuration is
/// built; a missing variable or file is a configuration error that names it (never the value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Secret {
    /// An environment variable.
    Env(String),
    /// A file (its content, without a trailing newline).
    File(PathBuf),
}

/// What an answer means, for [`HttpSinkConfig::treat_as`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done (published as a response event when responses are).
    Success,
    /// The event cannot succeed: faulted.
    Poison,
    /// Retried.
    Transient,
    /// Retried, and adaptive concurrency backs off.
    Throttled,
    /// The processor stops.
    Fatal,
}

impl std::str::FromStr for Outcome {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "success" => Outcome::Success,
            "poison" => Outcome::Poison,
            "transient" => Outcome::Transient,
            "throttled" => Outcome::Throttled,
            "fatal" => Outcome::Fatal,
            other => {
                return Err(format!(
                    "`{other}` is not one of success, poison, transient, throttled, fatal"
                ))
            }
        })
    }
}

/// Statuses a `treat_as` entry covers: one (`"409"`) or a hundred (`"4xx"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StatusMatch {
    Exact(u16),
    Class(u16),
}

impl StatusMatch {
    fn parse(text: &str) -> Option<StatusMatch> {
        let t = text.trim().to_ascii_lowercase();
        if let Some(digit) = t.strip_suffix("xx") {
            let d: u16 = digit.parse().ok()?;
            return (1..=5).contains(&d).then_some(StatusMatch::Class(d));
        }
        let code: u16 = t.parse().ok()?;
        (100..=599)
            .contains(&code)
            .then_some(StatusMatch::Exact(code))
    }

    fn covers(self, status: u16) -> bool {
        match self {
            StatusMatch::Exact(code) => status == code,
            StatusMatch::Class(d) => status / 100 == d,
        }
    }
}

#[derive(Clone)]
enum HeaderSource {
    /// A value known when the sink is built: a constant, or a secret (marked sensitive).
    Fixed(HeaderValue),
    /// A value filled from each event.
    Template(Template),
}

/// Where and how events are sent.
#[derive(Clone)]
pub struct HttpSinkConfig {
    url_text: String,
    url: Template,
    https: bool,
    method: Method,
    headers: Vec<(HeaderName, HeaderSource)>,
    body: Option<Body>,
    response_type: Option<String>,
    response_headers: Vec<HeaderName>,
    treat_as: Vec<(StatusMatch, Outcome)>,
    tls: TlsSettings,
    max_idle: usize,
    secrets: Vec<String>,
}

impl std::fmt::Debug for HttpSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secret header values are never printed.
        let headers: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("HttpSinkConfig")
            .field("method", &self.method)
            .field("url", &self.url_text)
            .field("headers", &headers)
            .field("body", &self.effective_body())
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

fn url_error(url: &str, reason: impl Into<String>) -> HttpConfigError {
    HttpConfigError::Url {
        url: url.into(),
        reason: reason.into(),
    }
}

fn header_name(name: &str) -> Result<HeaderName, HttpConfigError> {
    HeaderName::try_from(name).map_err(|_| HttpConfigError::Header {
        name: name.into(),
        reason: "not a valid header name".into(),
    })
}

impl HttpSinkConfig {
    /// POST each event to `url`.
    ///
    /// # Errors
    /// When `url` is not a valid `http://` or `https://` URL template.
    pub fn post(url: &str) -> Result<Self, HttpConfigError> {
        Self::new(url, "POST")
    }

    /// Send each event to `url` (a template: `{/json/pointer}` is replaced by the event's
    /// value there, percent-encoded) with `method`: GET, POST, PUT, PATCH or DELETE.
    ///
    /// # Errors
    /// When `url` is not a valid `http://` or `https://` URL template or the method is not
    /// supported.
    pub fn new(url: &str, method: &str) -> Result<Self, HttpConfigError> {
        let template = Template::parse(url).map_err(|reason| url_error(url, reason))?;
        // Fields may fill the path and query, never the scheme or the host.
        let authority_written = template
            .prefix()
            .split_once("://")
            .is_some_and(|(_, rest)| rest.contains(['/', '?']));
        if !template.is_constant() && !authority_written {
            return Err(url_error(
                url,
                "the scheme and host must be written out, not taken from the event",
            ));
        }
        // The scheme and host are checked with every field filled in by a sample value.
        let sample: Uri = template
            .sample("x")
            .parse()
            .map_err(|e: http::uri::InvalidUri| url_error(url, e.to_string()))?;
        let https = match sample.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            Some(other) => {
                return Err(url_error(
                    url,
                    format!("scheme `{other}` is not supported: use http:// or https://"),
                ))
            }
            None => {
                return Err(url_error(
                    url,
                    "it needs a scheme and a host, e.g. https://api.example.com/path",
                ))
            }
        };
        let method = match method.to_ascii_uppercase().as_str() {
            "GET" => Method::GET,
            "POST" => Method::POST,
            "PUT" => Method::PUT,
            "PATCH" => Method::PATCH,
            "DELETE" => Method::DELETE,
            other => return Err(HttpConfigError::Method(other.into())),
        };
        Ok(HttpSinkConfig {
            url_text: url.into(),
            url: template,
            https,
            method,
            headers: Vec::new(),
            body: None,
            response_type: None,
            response_headers: Vec::new(),
            treat_as: Vec::new(),
            tls: TlsSettings::default(),
            max_idle: 32,
            secrets: Vec::new(),
        })
    }

    /// Adds a header to every request; the value is a template over the event, like the URL
    /// (without percent-encoding).
    ///
    /// # Errors
    /// When the name or the value is not a valid header.
    pub fn header(mut self, name: &str, value: &str) -> Result<Self, HttpConfigError> {
        let n = header_name(name)?;
        let invalid = |reason: &str| HttpConfigError::Header {
            name: name.into(),
            reason: reason.into(),
        };
        let template = Template::parse(value).map_err(|e| invalid(&e))?;
        let sample = HeaderValue::try_from(template.sample("x"))
            .map_err(|_| invalid("not a valid header value"))?;
        // A value without fields is parsed once, here, not for every request.
        let source = if template.is_constant() {
            HeaderSource::Fixed(sample)
        } else {
            HeaderSource::Template(template)
        };
        self.headers.push((n, source));
        Ok(self)
    }

    /// Adds a header whose value is a secret, read now from the environment or a file. The
    /// value is never printed: not in `Debug`, not in errors, faults or logs.
    ///
    /// # Errors
    /// When the name is invalid, or the secret is missing, empty or not a valid header value.
    pub fn secret_header(mut self, name: &str, secret: Secret) -> Result<Self, HttpConfigError> {
        let n = header_name(name)?;
        let invalid = |reason: String| HttpConfigError::Secret {
            name: name.into(),
            reason,
        };
        let value = match &secret {
            Secret::Env(var) => std::env::var(var)
                .map_err(|e| invalid(format!("environment variable {var}: {e}")))?,
            Secret::File(path) => std::fs::read_to_string(path)
                .map_err(|e| invalid(format!("file {}: {e}", path.display())))?
                .trim_end_matches(['\r', '\n'])
                .to_string(),
        };
        if value.trim().is_empty() {
            return Err(invalid(format!("{secret:?} is empty")));
        }
        let mut header = HeaderValue::try_from(value.as_str())
            .map_err(|_| invalid(format!("{secret:?} is not a valid header value")))?;
        header.set_sensitive(true);
        self.secrets.extend(secret_forms(&value));
        self.headers.push((n, HeaderSource::Fixed(header)));
        Ok(self)
    }

    /// What each request's body is: by default the whole event for POST, PUT and PATCH, and
    /// none for GET and DELETE.
    #[must_use]
    pub fn body(mut self, body: Body) -> Self {
        self.body = Some(body);
        self
    }

    /// Treats answers with `status` (`"409"`, or a class like `"4xx"`) as `outcome`, whatever
    /// their default class. Exact codes win over classes.
    ///
    /// # Errors
    /// When `status` is neither a code (100 to 599) nor a class (`1xx` to `5xx`).
    pub fn treat_as(mut self, status: &str, outcome: Outcome) -> Result<Self, HttpConfigError> {
        let matcher = StatusMatch::parse(status).ok_or_else(|| HttpConfigError::TreatAs {
            status: status.into(),
            reason: "use a status code like \"409\" or a class like \"4xx\"".into(),
        })?;
        self.treat_as.push((matcher, outcome));
        // Exact codes first, so that "404" = poison and "4xx" = success mean what they say.
        self.treat_as
            .sort_by_key(|(m, _)| matches!(m, StatusMatch::Class(_)));
        Ok(self)
    }

    /// Publishes each successful response as a new event of `event_type`, derived from the
    /// event sent (same partition key, a stable id), with the response body (JSON, or text) in
    /// its `response` field and the status in `status`.
    #[must_use]
    pub fn publish_response_as(mut self, event_type: impl Into<String>) -> Self {
        self.response_type = Some(event_type.into());
        self
    }

    /// Response headers copied into a response event's `headers` field (lower-case names).
    ///
    /// # Errors
    /// When a name is not a valid header name.
    pub fn response_headers<I, S>(mut self, names: I) -> Result<Self, HttpConfigError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        for name in names {
            self.response_headers.push(header_name(name.as_ref())?);
        }
        Ok(self)
    }

    /// Trusts the PEM certificates in `path` (a private CA) instead of the system's roots.
    ///
    /// # Errors
    /// When the file cannot be read or holds no certificate.
    pub fn ca_file(mut self, path: impl AsRef<Path>) -> Result<Self, HttpConfigError> {
        self.needs_https("ca_file")?;
        self.tls.set_ca_file(path.as_ref())?;
        Ok(self)
    }

    /// Presents the PEM certificate chain in `cert` with the PEM private key in `key` to
    /// servers that ask for a client certificate (mTLS).
    ///
    /// # Errors
    /// When a file cannot be read, or the key does not match the certificate.
    pub fn client_identity(
        mut self,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, HttpConfigError> {
        self.needs_https("client_identity")?;
        self.tls.set_identity(cert.as_ref(), key.as_ref())?;
        Ok(self)
    }

    /// Refuses a TLS setting for an `http://` URL: it would be ignored, and what it was meant
    /// to protect (a token, the client's identity) sent in the clear.
    fn needs_https(&self, setting: &str) -> Result<(), HttpConfigError> {
        match self.https {
            true => Ok(()),
            false => Err(HttpConfigError::Tls(format!(
                "{setting} is set for {}, which is not https://",
                self.url_text
            ))),
        }
    }

    /// What of each request is filled from the event.
    fn filled_from_event(&self) -> FromEvent {
        FromEvent {
            url: !self.url.is_constant(),
            headers: self
                .headers
                .iter()
                .any(|(_, source)| matches!(source, HeaderSource::Template(_))),
        }
    }

    /// Whether a header of this name is configured (it then replaces the sink's own).
    fn configures(&self, name: &HeaderName) -> bool {
        self.headers.iter().any(|(n, _)| n == name)
    }

    /// Idle connections kept per host for reuse (default 32).
    #[must_use]
    pub fn max_idle_connections(mut self, n: usize) -> Self {
        self.max_idle = n;
        self
    }

    /// The URL template, as given.
    pub fn url(&self) -> &str {
        &self.url_text
    }

    /// The method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    fn effective_body(&self) -> Body {
        self.body.clone().unwrap_or_else(|| {
            if self.method == Method::GET || self.method == Method::DELETE {
                Body::Empty
            } else {
                Body::Event
            }
        })
    }

    fn outcome(&self, status: StatusCode) -> Option<Outcome> {
        let code = status.as_u16();
        self.treat_as
            .iter()
            .find(|(m, _)| m.covers(code))
            .map(|(_, o)| *o)
    }

    /// `text` with every secret value replaced.
    fn scrub(&self, text: String) -> String {
        // The longest first: a secret inside another does not leave part of it.
        let mut secrets: Vec<&String> = self.secrets.iter().collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.into_iter().fold(text, |text, secret| {
            if text.contains(secret.as_str()) {
                text.replace(secret.as_str(), "[secret]")
            } else {
                text
            }
        })
    }
}

/// The texts a secret header value can be echoed as: whole, and the credentials after a
/// scheme (`Bearer abc` echoed as `abc`), each in every form a service may echo it in
/// ([`floodway::fault::echoed_forms`]: percent-encoded, JSON-escaped).
fn secret_forms(value: &str) -> Vec<String> {
    let mut texts = vec![value];
    if let Some((scheme, credentials)) = value.trim().split_once(' ') {
        let credentials = credentials.trim();
        if scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !credentials.is_empty()
        {
            texts.push(credentials);
        }
    }
    let mut forms: Vec<String> = Vec::new();
    for form in texts.into_iter().flat_map(floodway::fault::echoed_forms) {
        if !forms.contains(&form) {
            forms.push(form);
        }
    }
    forms
}

/// Where response events go: any service that publishes an event.
pub type ResponsePublisher = BoxCloneSyncService<Event, (), Error>;

/// Sends each event of a batch to an HTTP endpoint, in order; see the [crate docs](crate).
#[derive(Clone)]
pub struct HttpSink {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    config: Arc<HttpSinkConfig>,
    body: Body,
    responses: Option<ResponsePublisher>,
}

impl std::fmt::Debug for HttpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSink")
            .field("method", &self.config.method)
            .field("url", &self.config.url_text)
            .finish_non_exhaustive()
    }
}

impl HttpSink {
    /// A sink with a pooled client: HTTP/1.1, or HTTP/2 where a TLS server offers it.
    pub fn new(config: HttpSinkConfig) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config.tls.client_config(config.https))
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(config.max_idle)
            .build(connector);
        HttpSink {
            client,
            body: config.effective_body(),
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

    fn request(&self, event: &Event) -> Result<Request<Full<Bytes>>, Error> {
        let config = &self.config;
        let url = config.url.render(event, Escape::Url)?;
        // The message names the template: the URL made from the event may hold redacted
        // values, percent-encoded where scrubbing would not find them.
        let uri: Uri = url.parse().map_err(|e: http::uri::InvalidUri| {
            Error::poison_msg(
                "InvalidUrl",
                format!(
                    "{} made from event {} is not a valid URL: {e}",
                    config.url_text,
                    event.id()
                ),
            )
        })?;
        let body = match &self.body {
            Body::Event => event.to_bytes(),
            Body::Field(pointer) => {
                let value = event.json_at(pointer).ok_or_else(|| {
                    Error::poison_msg(
                        "MissingField",
                        format!("body {pointer} is missing in event {}", event.id()),
                    )
                })?;
                Bytes::copy_from_slice(value.as_bytes())
            }
            Body::Empty => Bytes::new(),
        };
        let mut request = Request::builder().method(config.method.clone()).uri(uri);
        // The sink's own headers, unless configured: then the configured value replaces them.
        if !config.configures(&IDEMPOTENCY_KEY) {
            let key = stable_id(&[config.method.as_str(), &config.url_text, event.id()]);
            let key = HeaderValue::try_from(key).expect("a stable id is hex");
            request = request.header(IDEMPOTENCY_KEY, key);
        }
        if !body.is_empty() && !config.configures(&header::CONTENT_TYPE) {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        for (name, source) in &config.headers {
            let value = match source {
                HeaderSource::Fixed(value) => value.clone(),
                HeaderSource::Template(t) => {
                    let text = t.render(event, Escape::None)?;
                    HeaderValue::from_str(&text).map_err(|_| {
                        Error::poison_msg(
                            "InvalidHeader",
                            format!("header {name} of event {} is not a valid value", event.id()),
                        )
                    })?
                }
            };
            request = request.header(name, value);
        }
        request
            .body(Full::new(body))
            .map_err(|e| Error::fatal_msg("InvalidRequest", e.to_string()))
    }

    async fn send(&self, event: &Event) -> Result<(), Error> {
        let request = self.request(event)?;
        let response = self.client.request(request).await.map_err(|e| {
            let message = format!(
                "{} {}: {}",
                self.config.method,
                self.config.url_text,
                error_chain(&e)
            );
            tls::classify_connect(&e, self.config.scrub(message))
        })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after(v, std::time::SystemTime::now()));
        let headers = self.chosen_headers(response.headers());
        let outcome = self.config.outcome(status);
        let success =
            outcome == Some(Outcome::Success) || (outcome.is_none() && status.is_success());
        // At most 1 MiB of answer is kept: a target must not exhaust the processor's memory.
        // A longer one is cut, not an error: the status says what happened.
        let (body, whole) = match read_at_most(response.into_body(), MAX_RESPONSE_BODY).await {
            Ok(read) => read,
            // Taken by the service, and its answer not needed: sending it again would do it
            // twice wherever the service does not keep idempotency keys.
            Err(_) if success && self.config.response_type.is_none() => return Ok(()),
            Err(e) => return Err(Error::transient_msg("ResponseBody", e)),
        };
        if success {
            if !whole && self.config.response_type.is_some() {
                // Taken by the target, and too long to be published as a response event:
                // sending it again would not change that.
                return Err(Error::poison_msg(
                    "ResponseTooLarge",
                    format!(
                        "{status}: an answer over {MAX_RESPONSE_BODY} bytes cannot become a \
                         response event"
                    ),
                ));
            }
            return self.publish_response(event, status, headers, &body).await;
        }
        // The answer goes into the error's message: without the secrets a server may echo.
        let body = match self.config.secrets.is_empty() {
            true => body,
            false => Bytes::from(self.config.scrub(String::from_utf8_lossy(&body).into())),
        };
        Err(match outcome {
            Some(outcome) => treated(outcome, status, retry_after, &body),
            None => classify(status, retry_after, &body, self.config.filled_from_event()),
        })
    }

    fn chosen_headers(&self, headers: &http::HeaderMap) -> Option<serde_json::Value> {
        if self.config.response_headers.is_empty() {
            return None;
        }
        let map = self
            .config
            .response_headers
            .iter()
            .filter_map(|name| {
                let value = headers.get(name)?.to_str().ok()?;
                Some((name.as_str().to_string(), serde_json::Value::from(value)))
            })
            .collect();
        Some(serde_json::Value::Object(map))
    }

    async fn publish_response(
        &self,
        event: &Event,
        status: StatusCode,
        headers: Option<serde_json::Value>,
        body: &Bytes,
    ) -> Result<(), Error> {
        let (Some(event_type), Some(publisher)) = (&self.config.response_type, &self.responses)
        else {
            return Ok(());
        };
        // Without the secrets a server may echo (a request's headers, sent back): the event
        // goes to the hub, and from there anywhere.
        let secret = !self.config.secrets.is_empty();
        let body = match secret {
            true => Bytes::from(self.config.scrub(String::from_utf8_lossy(body).into())),
            false => body.clone(),
        };
        let response = if body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&body).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&body).into())
            })
        };
        let mut derived = event
            .derive(event_type.clone())
            .field("response", response)
            .field("status", status.as_u16());
        if let Some(mut headers) = headers {
            if let (true, Some(map)) = (secret, headers.as_object_mut()) {
                for value in map.values_mut() {
                    if let Some(text) = value.as_str() {
                        *value = self.config.scrub(text.to_owned()).into();
                    }
                }
            }
            derived = derived.field("headers", headers);
        }
        publisher.clone().oneshot(derived.build()).await
    }
}

/// The header that lets a service apply a request sent again once.
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The most of an answer's body that is read.
const MAX_RESPONSE_BODY: usize = 1024 * 1024;

/// Reads `body` up to `limit` bytes: the bytes, and whether that was all of it (the rest is
/// left unread, and the connection closed rather than reused).
async fn read_at_most<B>(mut body: B, limit: usize) -> Result<(Bytes, bool), String>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut kept = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            if kept.len() + data.len() > limit {
                kept.extend_from_slice(&data[..limit - kept.len()]);
                return Ok((kept.freeze(), false));
            }
            kept.extend_from_slice(&data);
        }
    }
    Ok((kept.freeze(), true))
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

/// What of a request is filled from the event, which decides whether some answers are about
/// the event or the configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FromEvent {
    /// The URL: a redirect, 501 or 505 is about this event's resource.
    pub url: bool,
    /// A header (a tenant's token, say): a 401 or 403 is about this event's credentials.
    pub headers: bool,
}

/// What a non-2xx answer means, given what of the request came `from` the event.
pub fn classify(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
    from: FromEvent,
) -> Error {
    let snippet: String = String::from_utf8_lossy(body).chars().take(200).collect();
    let message = format!("{status}: {snippet}");
    let err = match status.as_u16() {
        429 | 503 => Error::throttled_msg("HttpStatus", message),
        // The service behind a gateway did not answer in time: a sign of overload, as a
        // timeout of the call itself is.
        504 => Error::transient_msg("HttpStatus", message).with_timeout(),
        // A redirect, a method or HTTP version the service does not implement: for a URL made
        // from the event, this event's resource may have moved (the breaker faults it while
        // other calls succeed); for a URL written out whole, the configuration is wrong.
        300..=399 | 501 | 505 if from.url => Error::transient_msg(
            "HttpStatus",
            format!("{message} (for the URL made from this event)"),
        ),
        300..=399 => Error::fatal_msg("HttpStatus", format!("{message} (redirected: fix the URL)")),
        501 | 505 => Error::fatal_msg(
            "HttpStatus",
            format!("{message} (the service does not take this request: fix the method)"),
        ),
        // Timed out, locked, too early: the same request may succeed later.
        408 | 423 | 425 | 500..=599 => Error::transient_msg("HttpStatus", message),
        // Credentials refused. Taken from the event (a header filled from it), they are this
        // event's: poison, as any other 4xx. Configured, an expired or revoked one refuses
        // every call, which the breaker holds as an outage until it is renewed, rather than
        // every event faulted.
        401 | 403 if !from.headers => Error::transient_msg("HttpStatus", message),
        _ => Error::poison_msg("HttpStatus", message),
    };
    match retry_after {
        Some(delay) => err.with_retry_after(delay),
        None => err,
    }
}

/// A non-2xx answer as `treat_as` says (success is handled by the caller).
fn treated(
    outcome: Outcome,
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Error {
    let snippet: String = String::from_utf8_lossy(body).chars().take(200).collect();
    let message = format!("{status}: {snippet} (treat_as)");
    let err = match outcome {
        Outcome::Poison | Outcome::Success => Error::poison_msg("HttpStatus", message),
        Outcome::Transient => Error::transient_msg("HttpStatus", message),
        Outcome::Throttled => Error::throttled_msg("HttpStatus", message),
        Outcome::Fatal => Error::fatal_msg("HttpStatus", message),
    };
    match retry_after {
        Some(delay) => err.with_retry_after(delay),
        None => err,
    }
}

impl HttpSink {
    /// Sends a batch's events one after another, so that a key's events reach the service in
    /// order; the first that fails, unless it is poison, stops the batch (see
    /// [`deliver_in_order`]).
    async fn write(&self, batch: Batch) -> Result<Delivery, Error> {
        deliver_in_order(&batch, |uow| self.send(uow.event())).await
    }
}

floodway::impl_sink!(HttpSink, write);

#[cfg(test)]
mod tests {
    use super::*;
    use floodway::ErrorClass;

    #[test]
    fn answers_are_classified() {
        let class = |code: u16| {
            let err = classify(
                StatusCode::from_u16(code).unwrap(),
                None,
                b"",
                FromEvent::default(),
            );
            (err.class(), err.is_throttle())
        };
        assert_eq!(class(429), (ErrorClass::Transient, true));
        assert_eq!(class(503), (ErrorClass::Transient, true));
        assert_eq!(class(500), (ErrorClass::Transient, false));
        assert_eq!(class(408), (ErrorClass::Transient, false));
        assert_eq!(class(400), (ErrorClass::Poison, false));
        assert_eq!(class(404), (ErrorClass::Poison, false));
        assert_eq!(class(301), (ErrorClass::Fatal, false));
        assert_eq!(class(501), (ErrorClass::Fatal, false));
        assert_eq!(class(505), (ErrorClass::Fatal, false));
        assert_eq!(class(425), (ErrorClass::Transient, false));
        assert_eq!(class(423), (ErrorClass::Transient, false));
        // A gateway's service did not answer in time: overload, as a timeout.
        let fixed = FromEvent::default();
        let gateway = classify(StatusCode::GATEWAY_TIMEOUT, None, b"", fixed);
        assert!(gateway.is_timeout() && !gateway.is_throttle());
        assert!(!classify(StatusCode::BAD_GATEWAY, None, b"", fixed).is_timeout());
        // A configured credential refused: an expired one holds the stream (the breaker sees
        // every call fail) rather than fault every event; one filled from the event is the
        // event's, poison.
        assert_eq!(class(401), (ErrorClass::Transient, false));
        assert_eq!(class(403), (ErrorClass::Transient, false));
        let headers = FromEvent {
            headers: true,
            ..FromEvent::default()
        };
        for code in [401, 403] {
            let err = classify(StatusCode::from_u16(code).unwrap(), None, b"", headers);
            assert_eq!(err.class(), ErrorClass::Poison, "{code}");
        }
        // For a URL made from the event, a redirect or an unimplemented request is about this
        // event's resource: the breaker judges it, the processor does not stop.
        let url = FromEvent {
            url: true,
            ..FromEvent::default()
        };
        for code in [301, 308, 501, 505] {
            let err = classify(StatusCode::from_u16(code).unwrap(), None, b"", url);
            assert_eq!(err.class(), ErrorClass::Transient, "{code}");
        }
        assert_eq!(
            classify(StatusCode::NOT_FOUND, None, b"", url).class(),
            ErrorClass::Poison
        );
        let err = classify(
            StatusCode::TOO_MANY_REQUESTS,
            Some(Duration::from_secs(2)),
            b"slow",
            FromEvent::default(),
        );
        assert_eq!(err.retry_after(), Some(Duration::from_secs(2)));
        assert!(err.message().contains("slow"));
    }

    #[test]
    fn a_secret_is_known_in_the_forms_a_server_echoes_it() {
        let forms = secret_forms("Bearer tok/en+1");
        for form in [
            "Bearer tok/en+1",
            "tok/en+1",
            "tok\\/en+1",
            "tok%2Fen%2B1",
            "Bearer%20tok%2Fen%2B1",
        ] {
            assert!(forms.iter().any(|f| f == form), "{form} in {forms:?}");
        }
        // A value whose first word is not a scheme is kept whole only.
        assert!(!secret_forms("k=v rest").contains(&"rest".to_string()));
        assert!(secret_forms("abc-key-1").iter().all(|f| f.contains("abc")));
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
        assert!(HttpSinkConfig::new("http://x", "CONNECT")
            .unwrap_err()
            .to_string()
            .contains("PATCH"));
        assert!(HttpSinkConfig::post("{/scheme}://host/x")
            .unwrap_err()
            .to_string()
            .contains("written out"));
        assert!(HttpSinkConfig::post("https://{/host}/x").is_err());
        assert!(HttpSinkConfig::post("https://api/{/id").is_err());
        assert!(HttpSinkConfig::post("http://x")
            .unwrap()
            .header("bad name", "v")
            .is_err());
        // TLS settings for a plain URL would be ignored, and the token sent in the clear.
        let plain = HttpSinkConfig::post("http://x/orders").unwrap();
        let err = plain.clone().ca_file("/no/such/ca.pem").unwrap_err();
        assert!(err.to_string().contains("not https://"), "{err}");
        let err = plain.client_identity("/c.pem", "/k.pem").unwrap_err();
        assert!(err.to_string().contains("not https://"), "{err}");
    }
}
