//! The console as its tests reach it: a `floodway` process serving it on a free loopback port,
//! and its JSON API over real HTTP.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use serde_json::Value;

pub(crate) use floodway_nats::testing::free_port;

/// A `floodway` process serving the console at `port`; killed when dropped.
pub(crate) struct Served {
    pub(crate) child: Option<Child>,
    pub(crate) port: u16,
}

impl Served {
    /// Starts `floodway ARGS` in `dir` (its arguments name the console's address) and waits
    /// until the console answers at `port`.
    pub(crate) async fn start(dir: &Path, args: &[&str], port: u16) -> Served {
        let child = crate::common::start(dir, args, Stdio::inherit(), Stdio::inherit());
        Served::started(child, port).await
    }

    /// `floodway console --config floodway.toml` in `dir`, on a free loopback port, with
    /// `args` besides.
    pub(crate) async fn console(dir: &Path, args: &[&str]) -> Served {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut all = vec!["console", "--config", "floodway.toml", "--listen", &listen];
        all.extend_from_slice(args);
        Served::start(dir, &all, port).await
    }

    /// Waits until the console of `child` answers at `port`.
    pub(crate) async fn started(child: Child, port: u16) -> Served {
        let served = Served {
            child: Some(child),
            port,
        };
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the console did not listen at {port} within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        served
    }

    /// The page's address.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    /// Stops the process with SIGTERM; it must exit cleanly.
    pub(crate) fn stop(mut self) {
        crate::common::stop(self.child.take().unwrap());
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A request to the console at `port`: its status and JSON answer.
pub(crate) async fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, Value) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1:{port}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let response = client
        .request(request.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .expect("the console answers");
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// GETs `path` until `done` holds for its answer (20 s at most); the answer.
pub(crate) async fn poll(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    done: impl Fn(&Value) -> bool,
) -> Value {
    let started = Instant::now();
    loop {
        let (status, answer) = http(port, "GET", path, headers, None).await;
        if status == 200 && done(&answer) {
            return answer;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "GET {path}: waited 20 s; last answer {status} {answer}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until job `id` of the console at `port` is no longer running; the job.
pub(crate) async fn finished(port: u16, headers: &[(&str, &str)], id: &Value) -> Value {
    let actions = poll(port, "/api/actions", headers, |a| {
        a["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| &j["id"] == id && j["state"] != "running")
    })
    .await;
    let jobs = actions["jobs"].as_array().unwrap();
    jobs.iter().find(|j| &j["id"] == id).unwrap().clone()
}
