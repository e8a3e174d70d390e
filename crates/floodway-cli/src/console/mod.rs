//! `floodway console` and `floodway run --console`: a local web application for the flow and
//! the faults. The pages are plain HTML, CSS and JavaScript embedded in the binary (no build
//! step, no dependency); they read a JSON API and one server-sent event stream, which carries
//! a flow sample every second and the progress of actions.
//!
//! Safety: the console binds to loopback by default and refuses any other address without a
//! token file; with tokens, every API call needs one (a cookie set by the login form, or
//! `Authorization: Bearer`). Actions are POSTs that carry the page's CSRF token in a header a
//! cross-site form cannot set, from the console's own origin; each is a dry run first and acts
//! only when a confirmation names that dry run's plan; `--read-only` refuses them all.

mod actions;
mod flow;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use floodway::event::now_millis;
use floodway::fault_store::{FaultFilter, FaultStatus, FaultStore, StoredFault};
use floodway_processors::{Config, Hubs, Pauses};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::util::parse_time;

pub(crate) use flow::Metrics;

/// Options of `floodway console`.
#[derive(clap::Args)]
#[command(group(
    clap::ArgGroup::new("scope").args(["config", "dynamodb_table"]).required(true)
))]
pub(crate) struct ConsoleArgs {
    /// The configuration file: its hub, its fault store and its processors (which
    /// resubmission and replay run here).
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    aws: crate::faults_cmd::AwsArgs,
    /// The Lambda function (name or ARN) to resubmit the table's faults to, with
    /// --dynamodb-table; without it the console shows them and resubmits nothing.
    #[arg(long, value_name = "NAME", requires = "dynamodb_table")]
    function: Option<String>,
    /// Another endpoint for Lambda only (such as a local Runtime API), with --function.
    #[arg(long, value_name = "URL", requires = "function")]
    lambda_endpoint: Option<String>,
    /// With --function: the processor whose faults go to it (a table may hold several
    /// processors' faults; without it, a resubmission of faults of more than one is refused).
    #[arg(long, value_name = "NAME", requires = "function")]
    processor: Option<String>,
    /// Where to serve the console.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7878")]
    listen: SocketAddr,
    #[command(flatten)]
    access: AccessArgs,
    /// The Prometheus endpoint of the `floodway run` to watch (its `--metrics`), for the live
    /// rates; without it the flow shows the hub's side: lag per subscription and partition.
    #[arg(long, value_name = "URL")]
    metrics_url: Option<String>,
}

/// Who may use the console, and for what.
#[derive(clap::Args, Clone, Default)]
pub(crate) struct AccessArgs {
    /// A file of access tokens, one per line: `NAME:TOKEN` (the name is recorded with each
    /// action) or `TOKEN`. Required to listen on an address other than loopback.
    #[arg(long, value_name = "FILE")]
    pub(crate) token_file: Option<PathBuf>,
    /// Show everything and change nothing: no resubmission, replay or pause.
    #[arg(long)]
    pub(crate) read_only: bool,
    /// Where the console records who did what, one JSON object per line, kept across
    /// restarts (default: beside the hub file, `<hub>.console.jsonl`; none for a DynamoDB
    /// table unless given).
    #[arg(long, value_name = "FILE")]
    pub(crate) audit_log: Option<PathBuf>,
}

/// Resubmits one fault to a Lambda function and records the outcome.
pub(crate) type Invoke = Arc<
    dyn for<'a> Fn(
            &'a dyn FaultStore,
            &'a StoredFault,
        ) -> std::pin::Pin<
            Box<
                dyn std::future::Future<
                        Output = Result<
                            (floodway::fault_store::ResubmitOutcome, String),
                            floodway::BoxError,
                        >,
                    > + Send
                    + 'a,
            >,
        > + Send
        + Sync,
>;

/// What a console watches and acts on.
pub(crate) enum Scope {
    /// A hub, its fault store, and the processors of a configuration (which resubmission and
    /// replay run in this process).
    Hub { hubs: Hubs, config: Box<Config> },
    /// The faults Lambda functions stored in a DynamoDB table, resubmitted by invoking the
    /// function when one is named. There is no hub to show the flow of.
    #[cfg_attr(not(feature = "aws"), allow(dead_code))]
    Lambda {
        table: String,
        function: Option<(String, Invoke)>,
        /// The processor whose faults go to the function.
        processor: Option<String>,
    },
}

/// The console's state, shared by its handlers.
pub(crate) struct Console {
    scope: Scope,
    faults: Arc<dyn FaultStore>,
    metrics: Metrics,
    pauses: Option<Pauses>,
    read_only: bool,
    /// `(name, token)`; `None` when the console is open to whoever reaches loopback.
    tokens: Option<Vec<(String, String)>>,
    /// The token every POST carries in `x-floodway-csrf`.
    csrf: String,
    /// Who acts when there are no tokens.
    local_user: String,
    /// The hosts the console answers to, against DNS rebinding when it has no tokens; known
    /// once it listens.
    hosts: std::sync::OnceLock<Vec<String>>,
    /// Signed-in pages: session id (the cookie's value) to the token's name.
    sessions: Mutex<HashMap<String, String>>,
    /// The cookie of this console's sessions: named by its port, as cookies are shared
    /// between the ports of a host.
    cookie: std::sync::OnceLock<String>,
    /// Faults being resubmitted now, so that two jobs do not send one fault at once.
    sending: Mutex<std::collections::HashSet<String>>,
    history: Mutex<flow::History>,
    updates: tokio::sync::broadcast::Sender<(&'static str, String)>,
    plans: Mutex<actions::Plans>,
    jobs: Mutex<actions::Jobs>,
    audit: Mutex<Vec<actions::Recorded>>,
    audit_log: Option<PathBuf>,
}

/// `floodway console`: serves the console for a configuration until stopped.
pub(crate) async fn run(args: ConsoleArgs) -> anyhow::Result<()> {
    let metrics = match args.metrics_url.clone() {
        Some(url) => Metrics::Scraped(url),
        None => Metrics::None,
    };
    let (scope, faults) = match (&args.config, &args.aws.dynamodb_table) {
        (Some(path), _) => {
            let config = Config::load(path)?;
            let hubs = Hubs::for_config(&config).await?;
            let faults: Arc<dyn FaultStore> = Arc::new(hubs.store.fault_store()?);
            let config = Box::new(config);
            (Scope::Hub { hubs, config }, faults)
        }
        (None, Some(table)) => lambda_scope(&args, table).await?,
        (None, None) => bail!("give --config FILE, or --dynamodb-table TABLE"),
    };
    let console = Console::new(scope, faults, metrics, None, &args.access, args.listen)?;
    let served = serve(console, args.listen).await?;
    crate::util::shutdown_signal().await;
    served.abort();
    Ok(())
}

/// The scope of a console of Lambda faults in `table`, and its fault store.
#[cfg(feature = "aws")]
async fn lambda_scope(
    args: &ConsoleArgs,
    table: &str,
) -> anyhow::Result<(Scope, Arc<dyn FaultStore>)> {
    let sdk = args.aws.sdk_config().await;
    let faults: Arc<dyn FaultStore> = Arc::new(floodway_aws::DynamoDbFaults::new(&sdk, table));
    let function = args.function.as_ref().map(|name| {
        let lambda = Arc::new(floodway_aws::LambdaResubmitter::new(
            &sdk,
            args.lambda_endpoint.as_deref(),
            name.clone(),
        ));
        let invoke: Invoke = Arc::new(move |store, fault| {
            let lambda = lambda.clone();
            Box::pin(async move { lambda.resubmit(store, fault).await })
        });
        (name.clone(), invoke)
    });
    let scope = Scope::Lambda {
        table: table.to_owned(),
        function,
        processor: args.processor.clone(),
    };
    Ok((scope, faults))
}

#[cfg(not(feature = "aws"))]
async fn lambda_scope(_: &ConsoleArgs, _: &str) -> anyhow::Result<(Scope, Arc<dyn FaultStore>)> {
    Err(crate::faults_cmd::without_aws())
}

/// Sorts `faults` into what a resubmission to the Lambda function `function` sends and what
/// it cannot: a table may hold the faults of several functions, and each goes back to its own
/// only, so the faults of another processor than `processor`, or of several when none is
/// named, are not sent.
fn lambda_plan(
    function: Option<&str>,
    processor: Option<&str>,
    faults: Vec<StoredFault>,
) -> crate::faults_cmd::Planned {
    let open: std::collections::BTreeSet<&str> = faults
        .iter()
        .filter(|f| f.status != FaultStatus::Resolved)
        .map(|f| f.processor.as_str())
        .collect();
    let several = (processor.is_none() && open.len() > 1).then(|| {
        format!(
            "the faults are of {} processors ({}): start the console with --processor to say \
             which one's go to the function",
            open.len(),
            open.iter().copied().collect::<Vec<_>>().join(", ")
        )
    });
    let mut planned = crate::faults_cmd::Planned {
        faults: Vec::new(),
        skipped: Vec::new(),
    };
    for fault in faults {
        let why = if fault.status == FaultStatus::Resolved {
            "resolved already".to_owned()
        } else if function.is_none() {
            "no function to resubmit to: start the console with --function".to_owned()
        } else if let Some(p) = processor.filter(|p| *p != fault.processor) {
            format!(
                "a fault of processor `{}`: this console resubmits `{p}`'s",
                fault.processor
            )
        } else if let Some(why) = &several {
            why.clone()
        } else {
            planned.faults.push(fault);
            continue;
        };
        planned.skipped.push((fault, why));
    }
    planned
}

/// Builds the console and starts serving it at `listen`; the server's task.
pub(crate) async fn serve(
    console: Arc<Console>,
    listen: SocketAddr,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot serve the console at {listen}"))?;
    let bound = listener.local_addr()?;
    let port = bound.port();
    let mut hosts: Vec<String> = ["127.0.0.1", "localhost", "[::1]"]
        .iter()
        .map(|h| format!("{h}:{port}"))
        .chain([bound.to_string()])
        .collect();
    if port == 80 {
        // Browsers leave the default port out of the Host header.
        hosts.extend(["127.0.0.1", "localhost", "[::1]"].map(str::to_owned));
    }
    let _ = console.hosts.set(hosts);
    let _ = console.cookie.set(format!("floodway_session_{port}"));
    eprintln!(
        "console at http://{bound}/{}",
        if console.read_only {
            " (read-only)"
        } else {
            ""
        }
    );
    let sampler = console.clone();
    tokio::spawn(async move { sampler.sample_forever().await });
    let app = router(console);
    Ok(tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(error = %err, "the console stopped");
        }
    }))
}

impl Console {
    /// The console of `hubs` and `config`; `pauses` when it runs beside the processors.
    ///
    /// # Errors
    /// A non-loopback `listen` without tokens; an unreadable or empty token file.
    pub(crate) fn new(
        scope: Scope,
        faults: Arc<dyn FaultStore>,
        metrics: Metrics,
        pauses: Option<Pauses>,
        access: &AccessArgs,
        listen: SocketAddr,
    ) -> anyhow::Result<Arc<Console>> {
        let tokens = access.token_file.as_deref().map(read_tokens).transpose()?;
        if !listen.ip().is_loopback() && tokens.is_none() {
            bail!(
                "the console would listen on {listen}, which is not loopback: give it \
                 --token-file FILE (lines of NAME:TOKEN), or listen on 127.0.0.1"
            );
        }
        let audit_log = access.audit_log.clone().or_else(|| match &scope {
            Scope::Hub { config, .. } => {
                let mut path = config.hub.path.clone().into_os_string();
                path.push(".console.jsonl");
                Some(path.into())
            }
            Scope::Lambda { .. } => None,
        });
        let audit = match &audit_log {
            Some(path) => actions::Recorded::read(path)?,
            None => Vec::new(),
        };
        Ok(Arc::new(Console {
            scope,
            faults,
            metrics,
            pauses,
            read_only: access.read_only,
            tokens,
            csrf: random_hex(16),
            local_user: local_user(),
            hosts: std::sync::OnceLock::new(),
            sessions: Mutex::default(),
            cookie: std::sync::OnceLock::new(),
            sending: Mutex::default(),
            history: Mutex::new(flow::History::default()),
            updates: tokio::sync::broadcast::channel(256).0,
            plans: Mutex::default(),
            jobs: Mutex::default(),
            audit: Mutex::new(audit),
            audit_log,
        }))
    }

    /// Sends `what` as an event named `kind` to every page watching.
    fn publish(&self, kind: &'static str, what: &impl Serialize) {
        if let Ok(text) = serde_json::to_string(what) {
            let _ = self.updates.send((kind, text));
        }
    }

    /// The hub and configuration, on a console of a hub.
    fn hub(&self) -> Option<(&Hubs, &Config)> {
        match &self.scope {
            Scope::Hub { hubs, config } => Some((hubs, config)),
            Scope::Lambda { .. } => None,
        }
    }

    /// The configured processors' names.
    fn processors(&self) -> Vec<&str> {
        self.hub()
            .map(|(_, config)| config.processors.iter().map(|p| p.name()).collect())
            .unwrap_or_default()
    }

    /// What the console is of, for people.
    fn describe(&self) -> String {
        match &self.scope {
            Scope::Hub { hubs, .. } => hubs.events.describe(),
            Scope::Lambda { table, .. } => {
                format!("DynamoDB table {table} (faults of Lambda functions)")
            }
        }
    }

    /// Where resubmitted faults go, for people; `None` when they cannot be resubmitted.
    fn resubmits_to(&self) -> Option<String> {
        match &self.scope {
            Scope::Hub { .. } => Some("the configured processors, run by this console".into()),
            Scope::Lambda { function, .. } => function
                .as_ref()
                .map(|(name, _)| format!("the Lambda function {name}")),
        }
    }

    /// Sorts `faults` into what a resubmission sends and what it cannot.
    fn plan(&self, faults: Vec<StoredFault>) -> crate::faults_cmd::Planned {
        match &self.scope {
            Scope::Hub { config, .. } => crate::faults_cmd::Planned::of(config, faults),
            Scope::Lambda {
                function,
                processor,
                ..
            } => lambda_plan(
                function.as_ref().map(|(name, _)| name.as_str()),
                processor.as_deref(),
                faults,
            ),
        }
    }

    /// Samples the flow every second, for as long as the console runs.
    async fn sample_forever(self: Arc<Self>) {
        let Some((hubs, config)) = self.hub() else {
            return;
        };
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            every.tick().await;
            let metrics = self.metrics.text().await;
            let hub = match tokio::time::timeout(Duration::from_secs(2), hubs.events.stats()).await
            {
                Ok(Ok(stats)) => Ok(stats),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("no answer within 2 s".to_owned()),
            };
            let processors = config
                .processors
                .iter()
                .map(|p| {
                    let paused = self.pauses.as_ref().and_then(|s| s.is_paused(p.name()));
                    (p.name().to_owned(), paused)
                })
                .collect();
            let text = {
                let mut history = self.history.lock().unwrap();
                let sample = history.next(now_millis(), processors, metrics, hub);
                serde_json::to_string(sample)
            };
            if let Ok(text) = text {
                let _ = self.updates.send(("flow", text));
            }
        }
    }
}

/// The console's routes, behind its access checks.
fn router(console: Arc<Console>) -> Router {
    let api = Router::new()
        .route("/api/session", get(session))
        .route("/api/flow", get(flow_history))
        .route("/api/stream", get(stream))
        .route("/api/faults", get(list_faults))
        .route("/api/faults/groups", get(fault_groups))
        .route("/api/faults/{id}", get(show_fault))
        .route("/api/resubmit", post(resubmit))
        .route("/api/replay", post(replay))
        .route("/api/processors/{name}/{action}", post(pause))
        .route("/api/actions", get(actions_done))
        .layer(axum::middleware::from_fn_with_state(console.clone(), guard));
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .merge(api)
        .with_state(console)
}

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
                 frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// An error for the page: a status and a sentence.
struct Refused(StatusCode, String);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn refused(status: StatusCode, why: impl Into<String>) -> Refused {
    Refused(status, why.into())
}

fn failed(e: impl std::fmt::Display) -> Refused {
    refused(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// Who is asking, as the access check found.
#[derive(Clone)]
struct Who(String);

/// Checks every API call: the host (without tokens), the token (with them), and for a POST
/// the CSRF header, the origin and read-only mode.
async fn guard(
    State(console): State<Arc<Console>>,
    mut request: Request<axum::body::Body>,
    next: Next,
) -> Response {
    match console.admit(request.method(), request.headers()) {
        Ok(who) => {
            request.extensions_mut().insert(Who(who));
            next.run(request).await
        }
        Err(refusal) => refusal.into_response(),
    }
}

impl Console {
    fn admit(&self, method: &Method, headers: &HeaderMap) -> Result<String, Refused> {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let who = match &self.tokens {
            None => {
                let hosts = self.hosts.get().map(Vec::as_slice).unwrap_or_default();
                if !hosts.iter().any(|h| h == host) {
                    return Err(refused(
                        StatusCode::MISDIRECTED_REQUEST,
                        format!(
                            "this console answers to {} only",
                            hosts.first().map_or("loopback", String::as_str)
                        ),
                    ));
                }
                self.local_user.clone()
            }
            Some(tokens) => {
                let by_token = bearer(headers).and_then(|given| {
                    tokens
                        .iter()
                        .find(|(_, t)| same(t.as_bytes(), given.as_bytes()))
                        .map(|(name, _)| name.clone())
                });
                let by_session = || {
                    let sid = cookie(headers, self.cookie.get()?)?;
                    self.sessions.lock().unwrap().get(&sid).cloned()
                };
                match by_token.or_else(by_session) {
                    Some(name) => name,
                    None => {
                        return Err(refused(
                            StatusCode::UNAUTHORIZED,
                            "a token is needed: sign in with one from the console's token file",
                        ))
                    }
                }
            }
        };
        if method != Method::GET && method != Method::HEAD {
            if self.read_only {
                return Err(refused(
                    StatusCode::FORBIDDEN,
                    "this console is read-only (--read-only)",
                ));
            }
            let csrf = headers.get("x-floodway-csrf").and_then(|v| v.to_str().ok());
            if !csrf.is_some_and(|c| same(c.as_bytes(), self.csrf.as_bytes())) {
                return Err(refused(
                    StatusCode::FORBIDDEN,
                    "missing or wrong x-floodway-csrf header: actions come from the console's pages",
                ));
            }
            if let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
                let own = origin
                    .strip_prefix("http://")
                    .or_else(|| origin.strip_prefix("https://"));
                if own != Some(host) {
                    return Err(refused(
                        StatusCode::FORBIDDEN,
                        format!("an action from another origin ({origin}) is refused"),
                    ));
                }
            }
        }
        Ok(who)
    }
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    Some(value.strip_prefix("Bearer ")?.trim().to_owned())
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// Compares secrets in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads a token file: lines of `NAME:TOKEN` or `TOKEN`; blank lines and `#` comments skipped.
fn read_tokens(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    let tokens: Vec<(String, String)> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| match l.split_once(':') {
            Some((name, token)) => (name.trim().to_owned(), token.trim().to_owned()),
            None => ("token".to_owned(), l.to_owned()),
        })
        .collect();
    if let Some((name, _)) = tokens.iter().find(|(_, t)| t.len() < 16) {
        bail!(
            "{}: the token of `{name}` is shorter than 16 characters",
            path.display()
        );
    }
    // A token travels in an Authorization header: visible ASCII only.
    if let Some((name, _)) = tokens
        .iter()
        .find(|(_, t)| !t.bytes().all(|b| b.is_ascii_graphic()))
    {
        bail!(
            "{}: the token of `{name}` holds a space or a character that is not ASCII",
            path.display()
        );
    }
    if tokens.is_empty() {
        bail!("{} holds no tokens", path.display());
    }
    Ok(tokens)
}

/// `n` random bytes in hex.
pub(crate) fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    if getrandom::fill(&mut bytes).is_err() {
        bytes.iter_mut().for_each(|b| *b = fastrand::u8(..));
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn local_user() -> String {
    ["USER", "LOGNAME", "USERNAME"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| "local".to_owned())
}

/// A time range for people.
fn range_text(from: i64, to: i64) -> String {
    format!(
        "{} .. {}",
        crate::util::show_time(from),
        crate::util::show_time(to)
    )
}

#[derive(Deserialize)]
struct Login {
    token: String,
}

/// The login form: a valid token opens a session, whose random id is the cookie (the token
/// itself never is), for this console's port only.
async fn login(State(console): State<Arc<Console>>, Json(login): Json<Login>) -> Response {
    let Some(tokens) = &console.tokens else {
        return Json(json!({ "ok": true })).into_response();
    };
    let token = login.token.trim();
    let Some((name, _)) = tokens
        .iter()
        .find(|(_, t)| same(t.as_bytes(), token.as_bytes()))
    else {
        return refused(StatusCode::UNAUTHORIZED, "unknown token").into_response();
    };
    let sid = random_hex(24);
    console
        .sessions
        .lock()
        .unwrap()
        .insert(sid.clone(), name.clone());
    let cookie = console
        .cookie
        .get()
        .map_or("floodway_session", String::as_str);
    (
        [(
            header::SET_COOKIE,
            format!("{cookie}={sid}; HttpOnly; SameSite=Strict; Path=/"),
        )],
        Json(json!({ "ok": true })),
    )
        .into_response()
}

/// Signing out: the session named by the cookie ends, and the cookie is cleared. It needs
/// the page's CSRF header (so that another site cannot sign a page out) and nothing else,
/// read-only or not.
async fn logout(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let csrf = headers.get("x-floodway-csrf").and_then(|v| v.to_str().ok());
    if !csrf.is_some_and(|c| same(c.as_bytes(), console.csrf.as_bytes())) {
        return refused(
            StatusCode::FORBIDDEN,
            "missing or wrong x-floodway-csrf header",
        )
        .into_response();
    }
    let name = console
        .cookie
        .get()
        .map_or("floodway_session", String::as_str);
    if let Some(sid) = cookie(&headers, name) {
        console.sessions.lock().unwrap().remove(&sid);
    }
    (
        [(
            header::SET_COOKIE,
            format!("{name}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
        )],
        Json(json!({ "ok": true })),
    )
        .into_response()
}

async fn session(
    State(console): State<Arc<Console>>,
    axum::Extension(Who(who)): axum::Extension<Who>,
) -> Json<Value> {
    Json(json!({
        "user": who,
        "read_only": console.read_only,
        "csrf": console.csrf,
        "can_pause": console.pauses.is_some(),
        "signed_in": console.tokens.is_some(),
        "can_replay": console.hub().is_some(),
        "has_hub": console.hub().is_some(),
        "resubmits_to": console.resubmits_to(),
        "hub": console.describe(),
        "metrics": console.metrics.describe(),
        "processors": console.processors(),
    }))
}

async fn flow_history(State(console): State<Arc<Console>>) -> Json<Value> {
    let history = console.history.lock().unwrap();
    Json(json!({ "samples": history.samples }))
}

/// The server-sent events: `flow` every second, `job` and `audit` as they happen.
async fn stream(
    State(console): State<Arc<Console>>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let updates = console.updates.subscribe();
    let events = futures_util::stream::unfold(updates, |mut updates| async move {
        loop {
            match updates.recv().await {
                Ok((kind, data)) => {
                    return Some((Ok(SseEvent::default().event(kind).data(data)), updates))
                }
                // A slow page misses samples, not the stream.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// The fault list's filters, as the page sends them.
#[derive(Deserialize, Default, Clone)]
struct FaultQuery {
    processor: Option<String>,
    pipeline: Option<String>,
    error: Option<String>,
    class: Option<String>,
    step: Option<String>,
    status: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
}

/// An empty form field is no filter.
fn given(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

impl FaultQuery {
    fn filter(&self) -> Result<FaultFilter, Refused> {
        let time = |t: &Option<String>| {
            given(t)
                .map(|t| parse_time(&t))
                .transpose()
                .map_err(|e| refused(StatusCode::BAD_REQUEST, e.to_string()))
        };
        Ok(FaultFilter {
            processor: given(&self.processor),
            pipeline: given(&self.pipeline),
            error: given(&self.error),
            since: time(&self.since)?,
            until: time(&self.until)?,
            status: match given(&self.status).as_deref() {
                None | Some("any") => None,
                Some("open") => Some(FaultStatus::Open),
                Some("resolved") => Some(FaultStatus::Resolved),
                Some(other) => {
                    return Err(refused(
                        StatusCode::BAD_REQUEST,
                        format!("status `{other}`: open, resolved or any"),
                    ))
                }
            },
            // The class and step are filtered here, so the store's limit would cut too early.
            limit: None,
        })
    }

    fn admits(&self, fault: &StoredFault) -> bool {
        given(&self.class).is_none_or(|c| c == fault.class)
            && given(&self.step).is_none_or(|s| s == fault.step)
    }
}

impl Console {
    async fn faults_for(&self, query: &FaultQuery) -> Result<Vec<StoredFault>, Refused> {
        let faults = self
            .faults
            .list_faults(&query.filter()?)
            .await
            .map_err(|e| failed(format!("cannot read the fault store: {e}")))?;
        Ok(faults.into_iter().filter(|f| query.admits(f)).collect())
    }
}

fn fault_row(f: &StoredFault) -> Value {
    json!({
        "id": f.id,
        "processor": f.processor,
        "pipeline": f.pipeline,
        "step": f.step,
        "name": f.name,
        "class": f.class,
        "message": f.message,
        "first_seen": f.first_seen,
        "last_seen": f.last_seen,
        "seen": f.seen,
        "status": f.status.as_str(),
    })
}

async fn list_faults(
    State(console): State<Arc<Console>>,
    Query(query): Query<FaultQuery>,
) -> Result<Json<Value>, Refused> {
    let faults = console.faults_for(&query).await?;
    let limit = query.limit.unwrap_or(500);
    Ok(Json(json!({
        "total": faults.len(),
        "faults": faults.iter().take(limit).map(fault_row).collect::<Vec<_>>(),
    })))
}

/// What groups faults: one cause.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct Cause {
    processor: String,
    pipeline: String,
    step: String,
    name: String,
    class: String,
}

impl Cause {
    fn of(f: &StoredFault) -> Cause {
        Cause {
            processor: f.processor.clone(),
            pipeline: f.pipeline.clone(),
            step: f.step.clone(),
            name: f.name.clone(),
            class: f.class.clone(),
        }
    }

    fn query(&self, status: Option<String>) -> FaultQuery {
        FaultQuery {
            processor: Some(self.processor.clone()),
            pipeline: Some(self.pipeline.clone()),
            error: Some(self.name.clone()),
            class: Some(self.class.clone()),
            step: Some(self.step.clone()),
            status,
            ..FaultQuery::default()
        }
    }
}

/// The faults the filters select, grouped by cause: processor, pipeline, step, error name and
/// class; with counts, first and last seen, and a sample message. Largest group first.
async fn fault_groups(
    State(console): State<Arc<Console>>,
    Query(query): Query<FaultQuery>,
) -> Result<Json<Value>, Refused> {
    let faults = console.faults_for(&query).await?;
    Ok(Json(json!({ "groups": Group::all(&faults) })))
}

/// The faults of one cause.
#[derive(Debug, Serialize)]
struct Group {
    cause: Cause,
    /// Faults of this cause.
    faults: u64,
    /// Times they were raised in all.
    raised: u64,
    /// Of them, open.
    open: u64,
    first_seen: i64,
    last_seen: i64,
    /// The message of the fault seen last.
    message: String,
}

impl Group {
    /// `faults` grouped by cause, largest group first, then the one seen last.
    fn all(faults: &[StoredFault]) -> Vec<Group> {
        let mut groups: HashMap<Cause, Group> = HashMap::new();
        for f in faults {
            let g = groups.entry(Cause::of(f)).or_insert_with(|| Group {
                cause: Cause::of(f),
                faults: 0,
                raised: 0,
                open: 0,
                first_seen: f.first_seen,
                last_seen: f.last_seen,
                message: f.message.clone(),
            });
            g.faults += 1;
            g.raised += f.seen;
            if f.status == FaultStatus::Open {
                g.open += 1;
            }
            g.first_seen = g.first_seen.min(f.first_seen);
            if f.last_seen > g.last_seen {
                g.last_seen = f.last_seen;
                g.message = f.message.clone();
            }
        }
        let mut groups: Vec<Group> = groups.into_values().collect();
        groups.sort_by(|a, b| b.faults.cmp(&a.faults).then(b.last_seen.cmp(&a.last_seen)));
        groups
    }
}

async fn show_fault(
    State(console): State<Arc<Console>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, Refused> {
    let fault = console
        .faults
        .fault(&id)
        .await
        .map_err(failed)?
        .ok_or_else(|| refused(StatusCode::NOT_FOUND, format!("no fault {id}")))?;
    let history = console.faults.resubmissions_of(&id).await.map_err(failed)?;
    let mut row = fault_row(&fault);
    let details = fault.details().map_err(failed)?;
    let record = &details.uow.record;
    row["attempts"] = json!(details.err.attempts);
    row["event"] = details.uow.event.clone().unwrap_or(Value::Null);
    row["record"] = json!({
        "source": record.source,
        "partition": record.partition,
        "offset": record.offset,
        "attempt": record.attempt,
        "redacted": record.redacted,
        "truncated": record.truncated,
        "data": if !record.carried() {
            Value::Null
        } else {
            record
                .bytes()
                .ok()
                .map(|b| serde_json::from_slice::<Value>(&b)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&b).into_owned())))
                .unwrap_or(Value::Null)
        },
    });
    row["resubmissions"] = json!(history
        .iter()
        .map(|r| json!({ "at": r.at, "outcome": r.outcome, "detail": r.detail }))
        .collect::<Vec<_>>());
    Ok(Json(row))
}

/// A resubmission: a dry run of faults (by ids, a cause, or filters), or the confirmation of
/// one.
#[derive(Deserialize)]
struct ResubmitRequest {
    #[serde(default)]
    ids: Vec<String>,
    cause: Option<Cause>,
    filter: Option<FaultQuery>,
    /// The plan of a dry run: carry it out.
    confirm: Option<String>,
}

async fn resubmit(
    State(console): State<Arc<Console>>,
    axum::Extension(Who(who)): axum::Extension<Who>,
    Json(request): Json<ResubmitRequest>,
) -> Result<Json<Value>, Refused> {
    if let Some(plan) = request.confirm {
        return console.confirm(&plan, "resubmit", &who);
    }
    let faults = if !request.ids.is_empty() {
        let mut faults = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for id in request.ids.iter().filter(|id| seen.insert(id.as_str())) {
            match console.faults.fault(id).await.map_err(failed)? {
                Some(f) => faults.push(f),
                None => return Err(refused(StatusCode::NOT_FOUND, format!("no fault {id}"))),
            }
        }
        faults
    } else if let Some(cause) = request.cause {
        console
            .faults_for(&cause.query(Some("open".into())))
            .await?
    } else if let Some(filter) = request.filter {
        console.faults_for(&filter).await?
    } else {
        return Err(refused(
            StatusCode::BAD_REQUEST,
            "say which faults: ids, a cause or a filter",
        ));
    };
    let planned = console.plan(faults);
    let send: Vec<Value> = planned
        .faults
        .iter()
        .map(|f| {
            json!({
                "id": f.id,
                "processor": f.processor,
                "pipeline": f.pipeline,
                "name": f.name,
                "message": f.message,
            })
        })
        .collect();
    let skipped: Vec<Value> = planned
        .skipped
        .iter()
        .map(|(f, why)| json!({ "id": f.id, "why": why }))
        .collect();
    let plan = (!planned.faults.is_empty()).then(|| {
        console
            .plans
            .lock()
            .unwrap()
            .keep(actions::Plan::Resubmit(planned.faults))
    });
    Ok(Json(json!({
        "plan": plan,
        "send": send,
        "skipped": skipped,
        "to": console.resubmits_to(),
    })))
}

impl Console {
    fn confirm(
        self: &Arc<Self>,
        plan: &str,
        action: &str,
        who: &str,
    ) -> Result<Json<Value>, Refused> {
        let plan = self
            .plans
            .lock()
            .unwrap()
            .take(plan, action)
            .ok_or_else(|| {
                refused(
                    StatusCode::CONFLICT,
                    "no such plan: it was carried out already or expired; run the dry run again",
                )
            })?;
        Ok(Json(json!({ "job": self.carry_out(plan, who) })))
    }
}

#[derive(Deserialize)]
struct ReplayRequest {
    processor: Option<String>,
    from: Option<String>,
    to: Option<String>,
    confirm: Option<String>,
}

async fn replay(
    State(console): State<Arc<Console>>,
    axum::Extension(Who(who)): axum::Extension<Who>,
    Json(request): Json<ReplayRequest>,
) -> Result<Json<Value>, Refused> {
    if let Some(plan) = request.confirm {
        return console.confirm(&plan, "replay", &who);
    }
    let bad = |why: String| refused(StatusCode::BAD_REQUEST, why);
    let Some((hubs, config)) = console.hub() else {
        return Err(refused(
            StatusCode::CONFLICT,
            "a console of Lambda faults has no hub to replay from",
        ));
    };
    let processor = given(&request.processor).ok_or_else(|| bad("which processor?".into()))?;
    if !console.processors().contains(&processor.as_str()) {
        return Err(bad(format!("no processor `{processor}` is configured")));
    }
    let from = parse_time(&given(&request.from).ok_or_else(|| bad("from when?".into()))?)
        .map_err(|e| bad(e.to_string()))?;
    let to = match given(&request.to) {
        Some(t) => parse_time(&t).map_err(|e| bad(e.to_string()))?,
        None => now_millis(),
    };
    if to < from {
        return Err(bad("`to` is before `from`".into()));
    }
    // The fault monitor reads the fault events, which the hub does not count by time.
    let events = match config.processors.iter().find(|p| p.name() == processor) {
        Some(floodway_processors::ProcessorConfig::FaultMonitor { .. }) => None,
        _ => hubs
            .events
            .count_published(from, to)
            .await
            .map_err(failed)?,
    };
    let plan = console.plans.lock().unwrap().keep(actions::Plan::Replay {
        processor: processor.clone(),
        from,
        to,
        events,
    });
    Ok(Json(json!({
        "plan": plan,
        "processor": processor,
        "from": from,
        "to": to,
        "range": range_text(from, to),
        "events": events,
    })))
}

#[derive(Deserialize)]
struct Confirmed {
    #[serde(default)]
    confirm: bool,
}

/// Pauses or resumes a processor that runs beside this console.
async fn pause(
    State(console): State<Arc<Console>>,
    axum::Extension(Who(who)): axum::Extension<Who>,
    UrlPath((name, action)): UrlPath<(String, String)>,
    Json(confirmed): Json<Confirmed>,
) -> Result<Json<Value>, Refused> {
    let paused = match action.as_str() {
        "pause" => true,
        "resume" => false,
        other => {
            return Err(refused(
                StatusCode::NOT_FOUND,
                format!("no action `{other}`"),
            ))
        }
    };
    let Some(pauses) = &console.pauses else {
        return Err(refused(
            StatusCode::CONFLICT,
            "this console does not run the processors: pause them from the console of \
             `floodway run --console`",
        ));
    };
    if !confirmed.confirm {
        return Err(refused(
            StatusCode::PRECONDITION_REQUIRED,
            format!("confirm that `{name}` should {action}"),
        ));
    }
    if !pauses.set(&name, paused) {
        return Err(refused(
            StatusCode::NOT_FOUND,
            format!("no processor `{name}` runs here"),
        ));
    }
    console.record(&who, &action, format!("processor `{name}`"));
    Ok(Json(json!({ "processor": name, "paused": paused })))
}

async fn actions_done(State(console): State<Arc<Console>>) -> Json<Value> {
    let jobs: Vec<actions::Job> = console
        .jobs
        .lock()
        .unwrap()
        .jobs
        .iter()
        .map(|j| j.lock().unwrap().clone())
        .collect();
    let audit = console.audit.lock().unwrap().clone();
    Json(json!({ "jobs": jobs, "audit": audit }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_named_and_checked_for_length() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(
            &file,
            "# on call\nalice:0123456789abcdef0\n\nfedcba9876543210\n",
        )
        .unwrap();
        let tokens = read_tokens(&file).unwrap();
        assert_eq!(
            tokens,
            vec![
                ("alice".to_owned(), "0123456789abcdef0".to_owned()),
                ("token".to_owned(), "fedcba9876543210".to_owned())
            ]
        );
        std::fs::write(&file, "bob:short\n").unwrap();
        assert!(read_tokens(&file).unwrap_err().to_string().contains("bob"));
        std::fs::write(&file, "\n# none\n").unwrap();
        assert!(read_tokens(&file)
            .unwrap_err()
            .to_string()
            .contains("no tokens"));
    }

    fn stored(id: &str, name: &str, seen: (i64, i64), status: FaultStatus) -> StoredFault {
        StoredFault {
            id: id.into(),
            processor: "p".into(),
            pipeline: "v".into(),
            step: "sink".into(),
            name: name.into(),
            class: "poison".into(),
            message: format!("{name} of {id}"),
            first_seen: seen.0,
            last_seen: seen.1,
            seen: 2,
            status,
            fault: floodway::Event::builder("fault", "p").build(),
        }
    }

    /// A table may hold several functions' faults: each goes back to its own processor only.
    #[test]
    fn a_lambda_resubmission_sends_one_processors_faults_only() {
        let of = |id: &str, processor: &str| StoredFault {
            processor: processor.into(),
            ..stored(id, "MissingKey", (1, 2), FaultStatus::Open)
        };
        let faults = || vec![of("a", "orders"), of("b", "billing"), of("c", "orders")];
        let ids = |f: &[StoredFault]| f.iter().map(|f| f.id.clone()).collect::<Vec<_>>();

        let named = lambda_plan(Some("orders-fn"), Some("orders"), faults());
        assert_eq!(ids(&named.faults), ["a", "c"]);
        assert_eq!(named.skipped.len(), 1);
        assert!(
            named.skipped[0].1.contains("processor `billing`"),
            "{:?}",
            named.skipped
        );

        let unnamed = lambda_plan(Some("orders-fn"), None, faults());
        assert!(unnamed.faults.is_empty());
        assert_eq!(unnamed.skipped.len(), 3);
        assert!(
            unnamed.skipped[0].1.contains("--processor"),
            "{:?}",
            unnamed.skipped
        );

        let one = lambda_plan(Some("orders-fn"), None, vec![of("a", "orders")]);
        assert_eq!(
            ids(&one.faults),
            ["a"],
            "one processor's faults need no name"
        );
        let nowhere = lambda_plan(None, None, vec![of("a", "orders")]);
        assert!(nowhere.skipped[0].1.contains("--function"));
    }

    #[test]
    fn faults_group_by_cause_with_counts_times_and_the_latest_message() {
        let faults = [
            stored("a", "MissingKey", (10, 20), FaultStatus::Open),
            stored("b", "HttpStatus", (5, 50), FaultStatus::Open),
            stored("c", "MissingKey", (3, 40), FaultStatus::Resolved),
            stored("d", "MissingKey", (15, 30), FaultStatus::Open),
        ];
        let groups = Group::all(&faults);
        assert_eq!(groups.len(), 2);
        let g = &groups[0];
        assert_eq!(g.cause.name, "MissingKey");
        assert_eq!((g.faults, g.open, g.raised), (3, 2, 6));
        assert_eq!((g.first_seen, g.last_seen), (3, 40));
        assert_eq!(g.message, "MissingKey of c");
        assert_eq!(
            (groups[1].cause.name.as_str(), groups[1].faults),
            ("HttpStatus", 1)
        );
    }

    #[test]
    fn cookies_and_bearer_tokens_are_read_and_secrets_compared_whole() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            "a=1; floodway_session_7878=xyz; b=2".parse().unwrap(),
        );
        headers.insert(header::AUTHORIZATION, "Bearer  t0k ".parse().unwrap());
        assert_eq!(
            cookie(&headers, "floodway_session_7878").as_deref(),
            Some("xyz")
        );
        assert_eq!(bearer(&headers).as_deref(), Some("t0k"));
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }
}
