//! A function's side of the Lambda Runtime API: [`serve`] takes each invocation, runs a
//! [`Handler`] over it and posts the answer (`GET /2018-06-01/runtime/invocation/next`,
//! `POST .../invocation/{id}/response`, `POST .../invocation/{id}/error`).
//!
//! Floodway speaks the Runtime API itself rather than through `lambda_runtime`, for the
//! function's memory: the invocation's body is read into one buffer sized by its
//! `Content-Length` and handed to the handler, which decodes a Kinesis batch's records into
//! that buffer itself and drops any other once its records are read. A generic runtime
//! collects the body's chunks, copies them into one buffer, then deserializes the payload
//! into a copy of its own: three copies of a 6 MB invocation, where this keeps one
//! (BENCHMARKS.md measures the function's peak).
//!
//! The protocol is small and documented
//! (<https://docs.aws.amazon.com/lambda/latest/dg/runtimes-api.html>): one keep-alive HTTP/1.1
//! connection to `AWS_LAMBDA_RUNTIME_API`, one invocation at a time. The X-Ray trace id of
//! each invocation is set as `_X_AMZN_TRACE_ID`, as the AWS SDKs expect. A handler that panics
//! answers its invocation with an error (`errorType` `Panic`) and the function goes on.

use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tracing::Instrument;

use crate::handler::{Handler, HandlerError};

const API: &str = "/2018-06-01/runtime";
/// The most a `Content-Length` reserves up front; a larger body grows as it arrives.
const MAX_RESERVE: usize = 64 << 20;

/// The function could not talk to the Lambda Runtime API. Lambda restarts a function whose
/// `main` returns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// `AWS_LAMBDA_RUNTIME_API` is not set: the binary runs outside Lambda and outside a local
    /// Runtime API ([`crate::LocalRuntime`]).
    #[error(
        "AWS_LAMBDA_RUNTIME_API is not set: run the function under Lambda or a local Runtime API"
    )]
    NotInLambda,
    /// The API could not be reached, or answered what the protocol does not allow.
    #[error("Lambda Runtime API at {address}: {message}")]
    Api {
        /// `host:port`.
        address: String,
        /// What went wrong.
        message: String,
    },
}

/// Serves `handler` through the Lambda Runtime API (`AWS_LAMBDA_RUNTIME_API`): the `main` of
/// a function. Returns only when the API cannot be reached or breaks the protocol.
///
/// # Errors
/// [`ServeError`].
pub async fn serve(handler: Handler) -> Result<(), ServeError> {
    let address = std::env::var("AWS_LAMBDA_RUNTIME_API").map_err(|_| ServeError::NotInLambda)?;
    let handler = Arc::new(handler);
    serve_at(address, move |body, deadline_ms| {
        let handler = handler.clone();
        async move { handler.handle_owned(body, deadline_ms).await }
    })
    .await
}

/// [`serve`] with the Runtime API at `address`, each invocation's body and deadline run by
/// `run`.
async fn serve_at<F, R>(address: String, run: F) -> Result<(), ServeError>
where
    F: Fn(Vec<u8>, Option<u64>) -> R,
    R: std::future::Future<Output = Result<Value, HandlerError>> + Send + 'static,
{
    let mut api = Api {
        address,
        sender: None,
    };
    loop {
        let next = api.next().await?;
        let span = tracing::info_span!("invocation", request_id = %next.id);
        match &next.trace_id {
            Some(trace) => std::env::set_var("_X_AMZN_TRACE_ID", trace),
            None => std::env::remove_var("_X_AMZN_TRACE_ID"),
        }
        // Spawned, so that a panic answers this invocation instead of ending the function.
        let running = tokio::spawn(run(next.body, next.deadline_ms).instrument(span.clone()));
        let answer = match running.await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => {
                tracing::error!(parent: &span, error = %e, "invocation failed");
                Err(e.to_json())
            }
            Err(join) => {
                let message = match join.try_into_panic() {
                    Ok(panic) => panic_message(panic.as_ref()),
                    Err(e) => e.to_string(),
                };
                tracing::error!(parent: &span, panic = %message, "the handler panicked");
                Err(json!({ "errorType": "Panic", "errorMessage": message }))
            }
        };
        api.answer(&next.id, answer).await?;
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "the handler panicked".to_owned()
    }
}

/// An invocation as `invocation/next` gives it.
struct Next {
    id: String,
    deadline_ms: Option<u64>,
    trace_id: Option<String>,
    body: Vec<u8>,
}

/// One keep-alive connection to the Runtime API, opened again when it closes.
struct Api {
    address: String,
    sender: Option<http1::SendRequest<Full<Bytes>>>,
}

impl Api {
    fn error(&self, message: impl std::fmt::Display) -> ServeError {
        ServeError::Api {
            address: self.address.clone(),
            message: message.to_string(),
        }
    }

    async fn send(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> Result<http::Response<Incoming>, ServeError> {
        if let Some(sender) = &mut self.sender {
            if sender.ready().await.is_err() {
                self.sender = None;
            }
        }
        let sender = match &mut self.sender {
            Some(sender) => sender,
            None => {
                let stream = tokio::net::TcpStream::connect(&self.address)
                    .await
                    .map_err(|e| self.error(e))?;
                let _ = stream.set_nodelay(true);
                // Reads of 64 KiB, each copied into the body's buffer and dropped: hyper's
                // adaptive reads grow to 400 KiB, and an allocator keeps what they leave.
                let (sender, connection) = http1::Builder::new()
                    .read_buf_exact_size(Some(64 << 10))
                    .handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| self.error(e))?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "the Runtime API connection closed");
                    }
                });
                self.sender.insert(sender)
            }
        };
        match sender.send_request(request).await {
            Ok(response) => Ok(response),
            Err(e) => {
                self.sender = None;
                Err(self.error(e))
            }
        }
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, ServeError> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        // A path that does not parse (a request id the API should never give) is an error,
        // not a request to `/` that leaves the invocation to time out.
        *request.uri_mut() = path
            .parse()
            .map_err(|e| self.error(format!("cannot request {path:?}: {e}")))?;
        let headers = request.headers_mut();
        if let Ok(host) = http::HeaderValue::from_str(&self.address) {
            headers.insert(http::header::HOST, host);
        }
        headers.insert(
            http::header::USER_AGENT,
            http::HeaderValue::from_static(concat!("floodway-lambda/", env!("CARGO_PKG_VERSION"))),
        );
        Ok(request)
    }

    /// The next invocation; waits as long as Lambda has none.
    async fn next(&mut self) -> Result<Next, ServeError> {
        let request = self.request(Method::GET, &format!("{API}/invocation/next"), Bytes::new())?;
        let response = self.send(request).await?;
        let (parts, mut incoming) = response.into_parts();
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let length = header(CONTENT_LENGTH.as_str()).and_then(|l| l.parse::<usize>().ok());
        // One buffer of the body's size; each chunk is copied in and dropped as it arrives.
        let mut body = Vec::with_capacity(length.unwrap_or(0).min(MAX_RESERVE));
        while let Some(frame) = incoming.frame().await {
            let frame = frame.map_err(|e| self.error(e))?;
            if let Ok(data) = frame.into_data() {
                body.extend_from_slice(&data);
            }
        }
        if parts.status != StatusCode::OK {
            return Err(self.error(format_args!(
                "invocation/next answered {}: {}",
                parts.status,
                String::from_utf8_lossy(&body)
            )));
        }
        let id = header("lambda-runtime-aws-request-id")
            .ok_or_else(|| self.error("an invocation without Lambda-Runtime-Aws-Request-Id"))?;
        Ok(Next {
            id,
            deadline_ms: header("lambda-runtime-deadline-ms").and_then(|d| d.parse().ok()),
            trace_id: header("lambda-runtime-trace-id"),
            body,
        })
    }

    /// Posts an invocation's answer: its response, or the error (`errorType`, `errorMessage`).
    async fn answer(&mut self, id: &str, answer: Result<Value, Value>) -> Result<(), ServeError> {
        let (kind, body) = match &answer {
            Ok(response) => ("response", response),
            Err(error) => ("error", error),
        };
        let bytes = serde_json::to_vec(body).map_err(|e| self.error(e))?;
        let mut request = self.request(
            Method::POST,
            &format!("{API}/invocation/{id}/{kind}"),
            Bytes::from(bytes),
        )?;
        request.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        if answer.is_err() {
            request.headers_mut().insert(
                "lambda-runtime-function-error-type",
                http::HeaderValue::from_static("Unhandled"),
            );
        }
        let response = self.send(request).await?;
        let status = response.status();
        let text = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if status == http::StatusCode::INTERNAL_SERVER_ERROR {
            // The API's word for a state it cannot recover from: the runtime exits at once.
            return Err(self.error(format!(
                "answered the invocation's {kind} with 500 (non-recoverable): {}",
                String::from_utf8_lossy(&text)
            )));
        }
        if !status.is_success() {
            // Lambda refuses an answer larger than its limit (413): the invocation fails, and
            // the function goes on with the next.
            tracing::error!(
                %status,
                answer = %String::from_utf8_lossy(&text),
                "the Runtime API refused the invocation's {kind}"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::{InvokeError, LocalRuntime};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_handler_fails_its_invocation_and_the_function_goes_on() {
        let runtime = LocalRuntime::start().await.unwrap();
        let served = tokio::spawn(serve_at(
            runtime.address(),
            |body, deadline_ms| async move {
                let payload: Value = serde_json::from_slice(&body).unwrap();
                assert!(payload["boom"].is_null(), "boom in the handler");
                Ok(json!({ "got": payload, "deadline": deadline_ms.is_some() }))
            },
        ));
        let timeout = Duration::from_secs(30);
        let err = runtime
            .invoke(&json!({ "boom": 1 }), timeout)
            .await
            .unwrap_err();
        let InvokeError::Function(body) = err else {
            panic!("{err:?}")
        };
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["errorType"], "Panic", "{body}");
        assert!(body["errorMessage"]
            .as_str()
            .unwrap()
            .contains("boom in the handler"));
        let answer = runtime.invoke(&json!({ "a": 1 }), timeout).await.unwrap();
        assert_eq!(answer, json!({ "got": { "a": 1 }, "deadline": true }));
        assert!(!served.is_finished());
        served.abort();
    }

    /// One HTTP/1.1 request read from `stream`: its request line and body.
    async fn read_request(stream: &mut tokio::net::TcpStream) -> (String, Vec<u8>) {
        use tokio::io::AsyncReadExt;
        let mut bytes = Vec::new();
        let end = loop {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the connection closed");
            bytes.extend_from_slice(&chunk[..n]);
            if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
        };
        let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        let mut body = bytes[end..].to_vec();
        while body.len() < length {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            body.extend_from_slice(&chunk[..n]);
        }
        (head.lines().next().unwrap_or_default().to_owned(), body)
    }

    /// A Runtime API answering an invocation's answer with 500 (non-recoverable, says the
    /// API's contract): the runtime stops with an error instead of asking for the next.
    #[tokio::test]
    async fn a_500_from_the_runtime_api_stops_the_runtime() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let api = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let (line, _) = read_request(&mut stream).await;
            assert!(
                line.starts_with("GET /2018-06-01/runtime/invocation/next"),
                "{line}"
            );
            let body = b"{}";
            let head = format!(
                "HTTP/1.1 200 OK\r\nlambda-runtime-aws-request-id: r-1\r\n\
                 lambda-runtime-deadline-ms: 99999999999999\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            stream.write_all(head.as_bytes()).await.unwrap();
            stream.write_all(body).await.unwrap();
            let (line, _) = read_request(&mut stream).await;
            assert!(
                line.starts_with("POST /2018-06-01/runtime/invocation/r-1/response"),
                "{line}"
            );
            let refusal = b"{\"errorType\":\"Container\"}";
            let head = format!(
                "HTTP/1.1 500 Internal Server Error\r\ncontent-length: {}\r\n\r\n",
                refusal.len()
            );
            stream.write_all(head.as_bytes()).await.unwrap();
            stream.write_all(refusal).await.unwrap();
            stream
        });
        let served = tokio::time::timeout(
            Duration::from_secs(10),
            serve_at(address, |_, _| async { Ok(json!({})) }),
        )
        .await
        .expect("the runtime stopped");
        let err = served.unwrap_err();
        assert!(err.to_string().contains("500"), "{err}");
        drop(api.await.unwrap());
    }

    /// An answer that is not JSON fails its invocation, as Lambda takes it (an event source
    /// mapping retries the whole batch); an empty one is null, all succeeded.
    #[tokio::test]
    async fn an_answer_that_is_not_json_fails_the_invocation() {
        use tokio::io::AsyncWriteExt;
        let runtime = LocalRuntime::start().await.unwrap();
        let address = runtime.address();
        let function = tokio::spawn(async move {
            for answer in ["not json", ""] {
                let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
                stream
                    .write_all(
                        b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nhost: x\r\n\r\n",
                    )
                    .await
                    .unwrap();
                let id = {
                    use tokio::io::AsyncReadExt;
                    let mut bytes = Vec::new();
                    loop {
                        let mut chunk = [0u8; 4096];
                        let n = stream.read(&mut chunk).await.unwrap();
                        bytes.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&bytes).to_ascii_lowercase();
                        if let Some(at) = text.find("lambda-runtime-aws-request-id: ") {
                            let rest = &text[at + 31..];
                            if let Some(end) = rest.find("\r\n") {
                                break rest[..end].to_owned();
                            }
                        }
                    }
                };
                let mut post = tokio::net::TcpStream::connect(&address).await.unwrap();
                let request = format!(
                    "POST /2018-06-01/runtime/invocation/{id}/response HTTP/1.1\r\nhost: x\r\n\
                     content-length: {}\r\n\r\n{answer}",
                    answer.len()
                );
                post.write_all(request.as_bytes()).await.unwrap();
                let (line, _) = read_request(&mut post).await;
                assert!(line.contains("202"), "{line}");
            }
        });
        let timeout = Duration::from_secs(10);
        let err = runtime.invoke(&json!({}), timeout).await.unwrap_err();
        assert!(
            matches!(&err, InvokeError::Function(m) if m.contains("not JSON")),
            "{err:?}"
        );
        assert_eq!(
            runtime.invoke(&json!({}), timeout).await.unwrap(),
            Value::Null
        );
        function.await.unwrap();
    }
}
