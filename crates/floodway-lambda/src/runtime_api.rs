//! A local Lambda Runtime API on 127.0.0.1, to run real handler binaries as Lambda would:
//! `GET /2018-06-01/runtime/invocation/next`, `POST .../invocation/{id}/response`,
//! `POST .../invocation/{id}/error` and `POST .../init/error`.
//!
//! [`LocalRuntime::invoke`] queues an invocation and waits for the function's answer; a
//! [`FunctionProcess`] is a handler binary started with `AWS_LAMBDA_RUNTIME_API` pointing
//! here. One invocation is handed out at a time, as Lambda does with one execution
//! environment.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, Mutex as AsyncMutex};

const PREFIX: &str = "/2018-06-01/runtime";

/// An invocation that did not produce an answer.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum InvokeError {
    /// The function reported an error (its `errorType` and `errorMessage`).
    #[error("function error: {0}")]
    Function(String),
    /// The function did not answer within its timeout.
    #[error("the function timed out after {0:?}")]
    Timeout(Duration),
    /// The function failed to start (`init/error`) or exited.
    #[error("the function is not running: {0}")]
    NotRunning(String),
}

struct Invocation {
    id: String,
    payload: Bytes,
    deadline_ms: u64,
    answer: oneshot::Sender<Result<Value, InvokeError>>,
}

#[derive(Default)]
struct State {
    waiting: HashMap<String, oneshot::Sender<Result<Value, InvokeError>>>,
    init_error: Option<String>,
    /// The latest requests, at most [`REQUESTS_KEPT`]: a replay through `floodway lambda run`
    /// makes two for every invocation.
    requests: std::collections::VecDeque<RuntimeRequest>,
}

/// How many of the latest requests [`LocalRuntime::requests`] keeps.
const REQUESTS_KEPT: usize = 1_000;

/// A request the function made to the Runtime API, as [`LocalRuntime::requests`] gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RuntimeRequest {
    /// `GET` or `POST`.
    pub method: String,
    /// The path, e.g. `/2018-06-01/runtime/invocation/invocation-0/response`.
    pub path: String,
    /// The headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
}

impl RuntimeRequest {
    /// The value of header `name` (lower case), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The local Runtime API server.
#[derive(Clone)]
pub struct LocalRuntime {
    addr: SocketAddr,
    invoker: Invoker,
}

/// Queues invocations and waits for their answers.
#[derive(Clone)]
struct Invoker {
    queue: mpsc::Sender<Invocation>,
    state: Arc<Mutex<State>>,
    next: Arc<AtomicCounter>,
}

#[derive(Default)]
struct AtomicCounter(std::sync::atomic::AtomicU64);

impl std::fmt::Debug for LocalRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRuntime")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl LocalRuntime {
    /// Starts the server on a free loopback port (inside a tokio runtime).
    ///
    /// # Errors
    /// When no port can be bound.
    pub async fn start() -> std::io::Result<LocalRuntime> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (queue, pending) = mpsc::channel::<Invocation>(1);
        let pending = Arc::new(AsyncMutex::new(pending));
        let state: Arc<Mutex<State>> = Arc::default();
        let invoker = Invoker {
            queue,
            state: state.clone(),
            next: Arc::default(),
        };
        let shared = invoker.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (pending, invoker) = (pending.clone(), shared.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let (pending, invoker) = (pending.clone(), invoker.clone());
                        async move { Ok::<_, Infallible>(route(req, pending, invoker).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(LocalRuntime { addr, invoker })
    }

    /// `host:port`, the value of `AWS_LAMBDA_RUNTIME_API`.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// The requests the function made to the Runtime API, in order (the latest thousand): to
    /// check what a function posts (its answers, their headers) as Lambda would receive them.
    pub fn requests(&self) -> Vec<RuntimeRequest> {
        self.invoker
            .state
            .lock()
            .map(|s| s.requests.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// `http://host:port`: also a Lambda API endpoint for an SDK client, whose `Invoke`
    /// (`POST /2015-03-31/functions/{name}/invocations`) invokes the function here.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Invokes the function with `payload` and waits up to `timeout` for its answer.
    ///
    /// # Errors
    /// A function error, a timeout, or a function that failed to start.
    pub async fn invoke(&self, payload: &Value, timeout: Duration) -> Result<Value, InvokeError> {
        self.invoker
            .invoke(
                Bytes::from(serde_json::to_vec(payload).unwrap_or_default()),
                timeout,
            )
            .await
    }
}

impl Invoker {
    async fn invoke(&self, payload: Bytes, timeout: Duration) -> Result<Value, InvokeError> {
        if let Some(e) = self.state.lock().ok().and_then(|s| s.init_error.clone()) {
            return Err(InvokeError::NotRunning(e));
        }
        let n = self
            .next
            .0
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let id = format!("invocation-{n}");
        let (answer, answered) = oneshot::channel();
        let deadline_ms = u64::try_from(floodway::event::now_millis())
            .unwrap_or(0)
            .saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        let invocation = Invocation {
            id: id.clone(),
            payload,
            deadline_ms,
            answer,
        };
        let sent = tokio::time::timeout(timeout, self.queue.send(invocation)).await;
        match sent {
            Err(_) => return Err(InvokeError::Timeout(timeout)),
            Ok(Err(_)) => return Err(InvokeError::NotRunning("the runtime API stopped".into())),
            Ok(Ok(())) => {}
        }
        // Waits for the answer, the timeout, or the function process going away (an
        // invocation still queued when it died would otherwise wait out its timeout).
        let gone = async {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if let Some(why) = self.state.lock().ok().and_then(|s| s.init_error.clone()) {
                    return why;
                }
            }
        };
        let outcome = tokio::select! {
            answer = tokio::time::timeout(timeout, answered) => match answer {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => Err(InvokeError::NotRunning("no answer".into())),
                Err(_) => Err(InvokeError::Timeout(timeout)),
            },
            why = gone => Err(InvokeError::NotRunning(why)),
        };
        if outcome.is_err() {
            if let Ok(mut state) = self.state.lock() {
                state.waiting.remove(&id);
            }
        }
        outcome
    }
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

async fn route(
    req: Request<Incoming>,
    pending: Arc<AsyncMutex<mpsc::Receiver<Invocation>>>,
    invoker: Invoker,
) -> Response<Full<Bytes>> {
    let state = invoker.state.clone();
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return reply(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if path.starts_with("/2015-03-31/functions/") && path.ends_with("/invocations") {
        // The Lambda API's Invoke, as an SDK client calls it (synchronous).
        return match invoker.invoke(body, Duration::from_secs(900)).await {
            Ok(answer) => reply(
                StatusCode::OK,
                serde_json::to_vec(&answer).unwrap_or_default(),
            ),
            Err(e) => {
                let mut response = reply(
                    StatusCode::OK,
                    serde_json::to_vec(&serde_json::json!({ "errorMessage": e.to_string() }))
                        .unwrap_or_default(),
                );
                response.headers_mut().insert(
                    "x-amz-function-error",
                    http::HeaderValue::from_static("Unhandled"),
                );
                response
            }
        };
    }
    let Some(rest) = path.strip_prefix(PREFIX) else {
        return reply(StatusCode::NOT_FOUND, "not a runtime API path");
    };
    if let Ok(mut s) = state.lock() {
        if s.requests.len() == REQUESTS_KEPT {
            s.requests.pop_front();
        }
        s.requests.push_back(RuntimeRequest {
            method: parts.method.to_string(),
            path: path.clone(),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.clone(),
        });
    }
    match (&parts.method, rest) {
        (&Method::GET, "/invocation/next") => {
            let invocation = pending.lock().await.recv().await;
            let Some(invocation) = invocation else {
                return reply(StatusCode::GONE, "stopped");
            };
            if let Ok(mut s) = state.lock() {
                s.waiting.insert(invocation.id.clone(), invocation.answer);
            }
            let mut response = reply(StatusCode::OK, invocation.payload);
            let headers = response.headers_mut();
            let mut set = |name: &'static str, value: String| {
                if let Ok(v) = http::HeaderValue::from_str(&value) {
                    headers.insert(name, v);
                }
            };
            set("lambda-runtime-aws-request-id", invocation.id);
            set(
                "lambda-runtime-deadline-ms",
                invocation.deadline_ms.to_string(),
            );
            set(
                "lambda-runtime-invoked-function-arn",
                "arn:aws:lambda:local:000000000000:function:floodway".into(),
            );
            set("lambda-runtime-trace-id", "Root=1-local".into());
            // As Lambda sends it: AWS's own runtime client cannot do without it.
            set("content-type", "application/json".into());
            response
        }
        (&Method::POST, "/init/error") => {
            let text = String::from_utf8_lossy(&body).into_owned();
            if let Ok(mut s) = state.lock() {
                s.init_error = Some(text);
            }
            reply(StatusCode::ACCEPTED, "")
        }
        (&Method::POST, rest) if rest.starts_with("/invocation/") => {
            let mut parts = rest["/invocation/".len()..].splitn(2, '/');
            let (id, kind) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let waiting = state.lock().ok().and_then(|mut s| s.waiting.remove(id));
            let Some(answer) = waiting else {
                return reply(StatusCode::BAD_REQUEST, "unknown or finished invocation");
            };
            let outcome = match kind {
                // As Lambda reads it: nothing is null (all succeeded), and an answer that is
                // not JSON fails the whole batch.
                "response" if body.is_empty() => Ok(Value::Null),
                "response" => serde_json::from_slice(&body).map_err(|e| {
                    InvokeError::Function(format!(
                        "the function's answer is not JSON ({e}): {}",
                        String::from_utf8_lossy(&body)
                    ))
                }),
                "error" => Err(InvokeError::Function(
                    String::from_utf8_lossy(&body).into_owned(),
                )),
                _ => return reply(StatusCode::NOT_FOUND, "unknown endpoint"),
            };
            let _ = answer.send(outcome);
            reply(StatusCode::ACCEPTED, "")
        }
        _ => reply(StatusCode::NOT_FOUND, "unknown endpoint"),
    }
}

/// A handler binary running against a [`LocalRuntime`]; killed when dropped. When it exits
/// on its own (a crash), the invocations waiting on it fail at once with
/// [`InvokeError::NotRunning`], as do later ones, instead of waiting out their timeouts.
#[derive(Debug)]
pub struct FunctionProcess {
    pid: Option<u32>,
    kill: Option<oneshot::Sender<()>>,
    exited: tokio::sync::watch::Receiver<bool>,
}

impl FunctionProcess {
    /// Starts `binary` with `args` and the Lambda environment pointing at `runtime`, plus
    /// `env`.
    ///
    /// # Errors
    /// When the binary cannot be started.
    pub fn spawn(
        binary: &Path,
        args: &[&str],
        runtime: &LocalRuntime,
        env: &[(&str, &str)],
    ) -> std::io::Result<FunctionProcess> {
        let mut command = tokio::process::Command::new(binary);
        command
            .args(args)
            .env("AWS_LAMBDA_RUNTIME_API", runtime.address())
            .env("AWS_LAMBDA_FUNCTION_NAME", "floodway")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024")
            .env("AWS_REGION", "local")
            .kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn()?;
        let pid = child.id();
        if let Ok(mut state) = runtime.invoker.state.lock() {
            state.init_error = None;
        }
        let (kill, killed) = oneshot::channel::<()>();
        let (exited_tx, exited) = tokio::sync::watch::channel(false);
        let invoker = runtime.invoker.clone();
        tokio::spawn(async move {
            tokio::select! {
                status = child.wait() => {
                    let why = match status {
                        Ok(s) => format!("the function process exited ({s})"),
                        Err(e) => format!("the function process is gone: {e}"),
                    };
                    invoker.stopped(why).await;
                }
                _ = killed => {
                    let _ = child.kill().await;
                }
            }
            let _ = exited_tx.send(true);
        });
        Ok(FunctionProcess {
            pid,
            kill: Some(kill),
            exited,
        })
    }

    /// The process id.
    pub fn id(&self) -> Option<u32> {
        self.pid
    }

    /// Whether the process still runs.
    pub fn is_running(&self) -> bool {
        !*self.exited.borrow()
    }
}

impl Drop for FunctionProcess {
    fn drop(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
    }
}

impl Invoker {
    /// The function process is gone: fail what waits on it, and what comes later.
    async fn stopped(&self, why: String) {
        let waiting: Vec<oneshot::Sender<Result<Value, InvokeError>>> = match self.state.lock() {
            Ok(mut state) => {
                state.init_error = Some(why.clone());
                state.waiting.drain().map(|(_, answer)| answer).collect()
            }
            Err(_) => Vec::new(),
        };
        for answer in waiting {
            let _ = answer.send(Err(InvokeError::NotRunning(why.clone())));
        }
    }
}
