//! `serve`, a function's side of the Runtime API, against the local Runtime API: answers,
//! error types, the X-Ray trace id, and a large invocation (a panicking handler is tested
//! beside `serve`). A test binary
//! of its own: `serve` reads and sets the process's environment.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use floodway::memory::MemoryFaultSink;
use floodway::{sink_fn, Batch, Error, Pipeline, Processor};
use floodway_lambda::{serve, Handler, InvokeError, LocalRuntime, ServeError};
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
