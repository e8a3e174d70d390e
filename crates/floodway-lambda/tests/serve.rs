//! `serve`, a function's side of the Runtime API, against the local Runtime API: answers,
//! error types, the X-Ray trace id, and a large invocation (a panicking handler is tested
//! beside `serve`); and its requests beside those of AWS's own runtime interface client
//! (PyPI `awslambdaric`, installed by `scripts/test`), answering the same invocations. A test binary
//! of its own: `serve` reads and sets the process's environment.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use floodway::memory::MemoryFaultSink;
use floodway::{sink_fn, Batch, Error, Pipeline, Processor};
use floodway_lambda::{
    serve, FunctionProcess, Handler, InvokeError, LocalRuntime, RuntimeRequest, ServeError,
};
use serde_json::{json, Value};

fn kinesis(events: &[Value]) -> Value {
    let records: Vec<Value> = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let data = base64::engine::general_purpose::STANDARD.encode(e.to_string());
            json!({
                "eventSource": "aws:kinesis",
                "eventID": format!("shardId-000000000000:{i}"),
                "eventSourceARN": "arn:aws:kinesis:us-west-2:000000000000:stream/s",
                "kinesis": { "partitionKey": "k", "sequenceNumber": i.to_string(), "data": data }
            })
        })
        .collect();
    json!({ "Records": records })
}

fn event(i: usize, kind: &str, padding: usize) -> Value {
    json!({
        "id": format!("e-{i}"), "type": kind, "timestamp": 1, "partitionKey": format!("k-{}", i % 7),
        "note": "n".repeat(padding)
    })
}

fn processor(sink: impl floodway::Sink + 'static) -> Processor {
    Processor::builder("served")
        .fault_sink(MemoryFaultSink::new())
        .pipeline(Pipeline::builder("all").sink(sink).unwrap())
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_every_invocation_with_its_trace_id() {
    assert!(matches!(
        serve(Handler::new(processor(sink_fn(|_: Batch| async {
            Ok::<_, Error>(())
        }))))
        .await,
        Err(ServeError::NotInLambda)
    ));

    let runtime = LocalRuntime::start().await.unwrap();
    std::env::set_var("AWS_LAMBDA_RUNTIME_API", runtime.address());
    // The sink counts events and remembers the trace id it ran under.
    let seen = Arc::new(Mutex::new((0usize, Vec::<String>::new())));
    let sink = sink_fn({
        let seen = seen.clone();
        move |batch: Batch| {
            let mut seen = seen.lock().unwrap();
            seen.0 += batch.len();
            seen.1
                .push(std::env::var("_X_AMZN_TRACE_ID").unwrap_or_default());
            std::future::ready(Ok::<_, Error>(()))
        }
    });
    let served = tokio::spawn(serve(Handler::new(processor(sink))));
    let timeout = Duration::from_secs(30);

    // An invocation of 3 MB: one buffer of its length, answered with no failures.
    let big: Vec<Value> = (0..6_000).map(|i| event(i, "thing", 400)).collect();
    let answer = runtime.invoke(&kinesis(&big), timeout).await.unwrap();
    assert_eq!(answer, json!({ "batchItemFailures": [] }));
    assert_eq!(seen.lock().unwrap().0, 6_000);
    assert!(seen.lock().unwrap().1.iter().all(|t| t == "Root=1-local"));

    // An invocation of no known source: the readable error type.
    let err = runtime
        .invoke(&json!({ "hello": "world" }), timeout)
        .await
        .unwrap_err();
    let InvokeError::Function(body) = err else {
        panic!("{err:?}")
    };
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["errorType"], "UnrecognizedEvent", "{body}");

    // And the function goes on.
    let answer = runtime
        .invoke(&kinesis(&[event(1, "thing", 0)]), timeout)
        .await
        .unwrap();
    assert_eq!(answer, json!({ "batchItemFailures": [] }));
    assert!(!served.is_finished());
    served.abort();
}

/// The Python of the virtualenv that holds `awslambdaric`: `$FLOODWAY_LAMBDA_RIC_PYTHON`, else
/// `target/test-venv/bin/python` above this directory.
fn ric_python() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("FLOODWAY_LAMBDA_RIC_PYTHON") {
        return path.into();
    }
    let mut dir = std::env::current_dir().unwrap();
    loop {
        let candidate = dir.join("target/test-venv/bin/python");
        if candidate.is_file() {
            return candidate;
        }
        assert!(
            dir.pop(),
            "no Python with awslambdaric: run scripts/test (it installs PyPI awslambdaric into \
             target/test-venv), or set FLOODWAY_LAMBDA_RIC_PYTHON"
        );
    }
}

/// What a function posts for an invocation it answers and one it fails: the two requests.
async fn answers(
    binary: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (RuntimeRequest, RuntimeRequest) {
    let runtime = LocalRuntime::start().await.unwrap();
    let _function = FunctionProcess::spawn(binary, args, &runtime, env).unwrap();
    let timeout = Duration::from_secs(30);
    let answer = runtime
        .invoke(&kinesis(&[event(0, "thing", 0)]), timeout)
        .await
        .unwrap();
    assert_eq!(answer, json!({ "batchItemFailures": [] }));
    let err = runtime
        .invoke(&json!({ "hello": "world" }), timeout)
        .await
        .unwrap_err();
    assert!(matches!(err, InvokeError::Function(_)), "{err:?}");
    let posts: Vec<RuntimeRequest> = runtime
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    assert_eq!(posts.len(), 2, "{posts:?}");
    (posts[0].clone(), posts[1].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_posts_its_answers_as_aws_runtime_interface_client_does() {
    // AWS's client, running a Python handler that answers a Kinesis batch and fails on
    // anything else.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("handler.py"),
        "def handler(event, context):\n    \
         if 'Records' not in event:\n        \
         raise ValueError('neither Records nor detail')\n    \
         return {'batchItemFailures': []}\n",
    )
    .unwrap();
    let python = ric_python();
    let path = dir.path().to_str().unwrap();
    let (ric_ok, ric_error) = answers(
        &python,
        &["-m", "awslambdaric", "handler.handler"],
        &[("PYTHONPATH", path), ("LAMBDA_TASK_ROOT", path)],
    )
    .await;
    // A function built on `serve`.
    let example = std::path::Path::new(env!("CARGO_BIN_EXE_floodway-example-handler"));
    let (ok, error) = answers(example, &[], &[]).await;

    for (ours, theirs) in [(&ok, &ric_ok), (&error, &ric_error)] {
        assert_eq!(kind_of(ours), kind_of(theirs), "{ours:?} / {theirs:?}");
        assert_eq!(
            ours.header("content-type"),
            theirs.header("content-type"),
            "{ours:?} / {theirs:?}"
        );
    }
    assert_eq!(kind_of(&ok), "response");
    assert_eq!(kind_of(&error), "error");
    // Both answer bodies are JSON; an error says its type and message under the same names.
    // (`Lambda-Runtime-Function-Error-Type`, which `serve` sets to `Unhandled`, is optional:
    // awslambdaric 4.2.2 sends none.)
    let body = |r: &RuntimeRequest| serde_json::from_slice::<Value>(&r.body).unwrap();
    assert_eq!(body(&ok), body(&ric_ok));
    let (ours, theirs) = (body(&error), body(&ric_error));
    assert_eq!(ours["errorType"], "UnrecognizedEvent", "{ours}");
    assert_eq!(theirs["errorType"], "ValueError", "{theirs}");
    assert!(ours["errorMessage"].is_string() && theirs["errorMessage"].is_string());
}

/// `response` or `error`: the last segment of an answer's path.
fn kind_of(r: &RuntimeRequest) -> &str {
    r.path.rsplit('/').next().unwrap_or_default()
}
