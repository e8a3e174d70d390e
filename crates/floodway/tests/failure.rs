//! Each failure class end to end on the in-memory runtime, on tokio's paused clock.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use floodway::fault::FaultDetails;
use floodway::layer::breaker::{BreakerConfig, CircuitBreaker};
use floodway::layer::Resilience;
use floodway::memory::{MemoryCheckpointer, MemorySink, MemorySource};
use floodway::testing::{ScriptedSink, TestKit};
use floodway::{fault_sink_fn, BatchConfig, Error, ErrorClass, Event, Pipeline, RunError};
use tokio::time::Instant;

mod common;
use common::{batched, build, events, ids, run_pipeline};

/// A sink that fails every call carrying event `id` with `error()` and accepts the rest.
fn failing_on(id: &'static str, error: fn() -> Error) -> ScriptedSink {
    ScriptedSink::new(move |call| {
        if call.batch.events().any(|e| e.id() == id) {
            Err(error())
        } else {
            Ok(())
        }
    })
}

#[tokio::test(start_paused = true)]
async fn a_transient_blip_is_retried_and_succeeds_without_a_fault() {
    let kit = TestKit::new();
    // Calls 4 and 5 fail: a blip.
    let sink = ScriptedSink::new(|call| match call.number {
        4 | 5 => Err(Error::transient_msg("ConnectionReset", "blip")),
        _ => Ok(()),
    });
    let input = events(10, 3);
    let pipeline = Pipeline::builder("all")
        .parallelism(1)
        .sink(sink.clone())
        .unwrap();
    let report = run_pipeline(&kit, pipeline, &input).await.unwrap();
    assert!(kit.faults().is_empty());
    assert_eq!(ids(&sink.delivered().events()), ids(&input));
    assert_eq!(sink.calls(), 12);
    assert_eq!(report.pipeline("all").unwrap().delivered, 10);
    assert_eq!(kit.checkpoint("0"), Some(10));
}

#[tokio::test(start_paused = true)]
async fn a_poison_event_becomes_one_fault_and_the_stream_flows_on() {
    let kit = TestKit::new();
    let sink = failing_on("e-4", || Error::poison_msg("HttpStatus", "400 Bad Request"));
    let delivered = sink.delivered().clone();
    // e-4 has key k1; e-7 and e-10 share it and come after.
    let input = events(12, 3);
    let pipeline = Pipeline::builder("all").sink(sink).unwrap();
    run_pipeline(&kit, pipeline, &input).await.unwrap();

    let faults = kit.faults();
    assert_eq!(faults.len(), 1);
    let fault = &faults[0];
    assert_eq!(fault.event_type(), "fault");
    assert_eq!(fault.tag("pipeline"), Some("all"));
    assert_eq!(fault.tag("step"), Some("sink"));
    let details: FaultDetails = fault.payload().unwrap();
    assert_eq!(details.err.name, "HttpStatus");
    assert_eq!(details.err.class, "poison");
    assert_eq!(details.err.attempts, 1, "poison is not retried");
    assert_eq!(
        details.uow.record.bytes().unwrap(),
        input[4].to_json().as_bytes()
    );

    let got = delivered.events();
    assert_eq!(got.len(), 11);
    let k1: Vec<_> = got
        .iter()
        .filter(|e| e.partition_key() == "k1")
        .map(|e| e.id().to_owned())
        .collect();
    assert_eq!(
        k1,
        vec!["e-1", "e-7", "e-10"],
        "same key flows on, in order"
    );
    assert_eq!(kit.checkpoint("0"), Some(12));
    assert_eq!(
        kit.checkpointer().settlement("0", 5),
        Some(floodway::Settlement::Faulted)
    );
}

#[tokio::test(start_paused = true)]
async fn retries_exhausted_while_the_target_is_healthy_fault_that_event_only() {
    // One event always times out while the stream keeps the target busy with others: calls
    // let through after its failure succeed, which proves the target healthy.
    let kit = TestKit::new();
    let sink = failing_on("e-2", || {
        Error::transient_msg("Timeout", "this one always times out")
    })
    .with_latency(Duration::from_millis(50));
    let delivered = sink.delivered().clone();
    let pipeline = Pipeline::builder("all").parallelism(4).sink(sink).unwrap();
    run_pipeline(&kit, pipeline, &events(400, 8)).await.unwrap();
    let faults = kit.faults();
    assert_eq!(faults.len(), 1, "one fault: {faults:?}");
    let details: FaultDetails = faults[0].payload().unwrap();
    assert_eq!(details.err.class, "transient");
    assert!(details.err.attempts > 1);
    assert_eq!(delivered.len(), 399);
}

/// A synchronous step throttled for one event while it works for the others (what it calls
/// is busy for that event's key, say) holds that event until it goes through: never faulted
/// for being throttled, as a sink's throttled call is not.
#[tokio::test(start_paused = true)]
async fn a_step_throttled_for_one_event_while_others_pass_holds_it_and_faults_nothing() {
    let kit = TestKit::new();
    let sink = MemorySink::new();
    let start = Instant::now();
    let pipeline = Pipeline::builder("enrich")
        .map(move |uow| {
            if uow.event().id() == "e-3" && start.elapsed() < Duration::from_secs(5) {
                return Err(Error::throttled_msg("Busy", "slow down"));
            }
            Ok(uow)
        })
        .sink(sink.clone())
        .unwrap();
    run_pipeline(&kit, pipeline, &events(50, 5)).await.unwrap();
    assert!(kit.faults().is_empty(), "{:?}", kit.faults());
    assert_eq!(sink.len(), 50);
    assert!(sink.events().iter().any(|e| e.id() == "e-3"));
}

#[tokio::test(start_paused = true)]
async fn a_full_outage_opens_the_breaker_faults_nothing_loses_nothing_and_recovers() {
    let kit = TestKit::new();
    let started = Instant::now();
    let outage = Duration::from_secs(120);
    let sink = ScriptedSink::new(move |call| {
        if call.elapsed < outage {
            return Err(Error::transient_msg("ConnectionRefused", "target down"));
        }
        Ok(())
    });
    let delivered = sink.delivered().clone();
    let breaker = CircuitBreaker::new(BreakerConfig::default(), "target");
    let pipeline = Pipeline::builder("all")
        .resilience(Resilience::default().shared_breaker(breaker.clone()))
        .sink(sink.clone())
        .unwrap();
    let input = events(500, 50);
    let report = run_pipeline(&kit, pipeline, &input).await.unwrap();

    assert!(kit.faults().is_empty(), "an outage faults nothing");
    assert!(breaker.opens() >= 1);
    let mut got = ids(&delivered.events());
    got.sort();
    let mut want = ids(&input);
    want.sort();
    assert_eq!(got, want, "nothing lost, nothing doubled");
    assert!(started.elapsed() >= outage);
    assert_eq!(report.done, 500);
    assert_eq!(kit.checkpoint("0"), Some(500));
    // While open, the breaker lets one probe through at a time: the target is not hammered.
    let failed = sink.failures();
    assert!(failed < 200, "{failed} failed calls during a 120 s outage");
}

#[tokio::test(start_paused = true)]
async fn an_outage_that_begins_mid_stream_behind_a_rate_limit_faults_nothing() {
    // Calls queue behind a rate limit and a concurrency limit; those already on their way when
    // the outage begins succeed just after it began, which must not be taken as a sign that the
    // target is healthy.
    let kit = TestKit::new();
    let down = (Duration::from_secs(1), Duration::from_secs(3));
    let sink = ScriptedSink::new(move |call| {
        if call.elapsed >= down.0 && call.elapsed < down.1 {
            return Err(Error::transient_msg("ConnectionRefused", "down"));
        }
        Ok(())
    })
    .with_latency(Duration::from_millis(5));
    let delivered = sink.delivered().clone();
    let resilience = Resilience::default()
        .rate_limit(
            floodway::layer::limit::rate::RateLimiter::per_second(400)
                .unwrap()
                .with_burst(4)
                .unwrap(),
        )
        .adaptive_concurrency(Default::default());
    let pipeline = Pipeline::builder("all")
        .parallelism(128)
        .resilience(resilience)
        .sink(sink)
        .unwrap();
    run_pipeline(&kit, pipeline, &events(2_000, 500))
        .await
        .unwrap();
    assert!(kit.faults().is_empty(), "{} faults", kit.faults().len());
    assert_eq!(delivered.len(), 2_000);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_step_becomes_a_fault() {
    let kit = TestKit::new();
    let delivered = MemorySink::new();
    let pipeline = Pipeline::builder("all")
        .map(|uow| {
            if uow.event().id() == "e-3" {
                panic!("step bug on {}", uow.event().id());
            }
            Ok(uow)
        })
        .named("enrich")
        .then(|uow| async move {
            if uow.event().id() == "e-5" {
                panic!("async bug");
            }
            Ok(uow)
        })
        .sink(delivered.clone())
        .unwrap();
    run_pipeline(&kit, pipeline, &events(8, 2)).await.unwrap();
    let faults = kit.faults();
    assert_eq!(faults.len(), 2);
    let by_step: Vec<_> = faults
        .iter()
        .map(|f| f.tag("step").unwrap().to_owned())
        .collect();
    assert!(by_step.contains(&"enrich".to_owned()));
    assert!(by_step.contains(&"then-2".to_owned()));
    let details: FaultDetails = faults[0].payload().unwrap();
    assert_eq!(details.err.name, "Panic");
    assert_eq!(delivered.len(), 6);
    assert_eq!(kit.checkpoint("0"), Some(8));
}

#[tokio::test(start_paused = true)]
async fn a_failing_fault_sink_stops_the_processor_without_advancing_the_checkpoint() {
    let checkpointer = MemoryCheckpointer::default();
    let fault_calls = Arc::new(AtomicU32::new(0));
    let fault_sink = {
        let fault_calls = fault_calls.clone();
        fault_sink_fn(move |_fault: Event| {
            fault_calls.fetch_add(1, Ordering::SeqCst);
            async { Err(Error::transient_msg("Unavailable", "fault store down")) }
        })
    };
    let delivered = MemorySink::new();
    let pipeline = Pipeline::builder("all")
        .parallelism(1)
        .validate(|e| {
            if e.id() == "e-5" {
                Err(Error::poison_msg("Invalid", "bad"))
            } else {
                Ok(())
            }
        })
        .sink(delivered.clone())
        .unwrap();
    let processor = build(
        floodway::Processor::builder("p").fault_sink(fault_sink),
        pipeline,
    );
    let result = processor
        .run(
            MemorySource::from_events(&events(20, 1), 1),
            checkpointer.clone(),
            std::future::pending(),
        )
        .await;
    match result {
        Err(RunError::FaultSink {
            pipeline, cause, ..
        }) => {
            assert_eq!(pipeline, "all");
            assert_eq!(cause.class(), ErrorClass::Transient);
        }
        other => panic!("expected a fault sink error, got {other:?}"),
    }
    assert!(
        fault_calls.load(Ordering::SeqCst) > 1,
        "the fault sink was retried"
    );
    // e-5 is at offset 6: the checkpoint stays below it, and keeps what was done before it.
    assert_eq!(checkpointer.checkpoint("0"), Some(5));
    assert_eq!(checkpointer.settlement("0", 6), None);
}

#[tokio::test(start_paused = true)]
async fn undecodable_records_become_faults_before_any_pipeline() {
    let kit = TestKit::new();
    let delivered = MemorySink::new();
    let pipeline = Pipeline::builder("all").sink(delivered.clone()).unwrap();
    let processor = build(kit.processor("p").max_event_size(2_000), pipeline);
    let mut lines: Vec<String> = events(3, 1).iter().map(Event::to_json).collect();
    lines.insert(1, "{not json".into());
    lines.insert(2, r#"{"id":"x","type":"t","timestamp":1}"#.into());
    lines.push(format!(
        r#"{{"id":"big","type":"t","timestamp":1,"partitionKey":"k","pad":"{}"}}"#,
        "x".repeat(3_000)
    ));
    let report = kit.run_jsonl(&processor, &lines.join("\n")).await.unwrap();
    assert_eq!(report.decode_faults, 3);
    assert_eq!(delivered.len(), 3);
    let faults = kit.faults();
    let messages: Vec<String> = faults
        .iter()
        .map(|f| f.payload::<FaultDetails>().unwrap().err.message)
        .collect();
    assert!(messages[0].contains("not valid JSON"), "{messages:?}");
    assert!(messages[1].contains("partitionKey"), "{messages:?}");
    assert!(messages[2].contains("over the limit"), "{messages:?}");
    assert!(faults.iter().all(|f| f.tag("pipeline") == Some("*")));
    assert_eq!(kit.checkpoint("0"), Some(6));
}

#[tokio::test(start_paused = true)]
async fn a_failing_batch_is_bisected_so_only_the_poison_event_is_faulted() {
    let sink = failing_on("e-13", || Error::poison_msg("Rejected", "one bad entry"));
    let kit = run_batched(16, &sink, 32).await;
    let delivered = sink.delivered();
    assert_eq!(kit.faults().len(), 1);
    assert_eq!(delivered.len(), 31);
    // 2 batches + bisection of one batch of 16: 2 + 2 * log2(16) calls.
    assert_eq!(sink.calls(), 10);
}

#[tokio::test(start_paused = true)]
async fn a_fatal_step_error_stops_the_run() {
    let kit = TestKit::new();
    let pipeline = Pipeline::builder("all")
        .parallelism(1)
        .map(|uow| {
            if uow.event().id() == "e-2" {
                return Err(Error::fatal_msg("Misconfigured", "no credentials"));
            }
            Ok(uow)
        })
        .sink(MemorySink::new())
        .unwrap();
    let err = run_pipeline(&kit, pipeline, &events(5, 1))
        .await
        .unwrap_err();
    assert!(
        matches!(err, RunError::Fatal { ref step, .. } if step == "map-1"),
        "{err}"
    );
    assert!(kit.checkpoint("0").is_none_or(|c| c < 3));
    assert!(kit.faults().is_empty());
}

#[tokio::test(start_paused = true)]
async fn split_events_are_done_when_every_part_is() {
    let kit = TestKit::new();
    let parts = MemorySink::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let pipeline = Pipeline::builder("split")
        .flat_map(|uow| {
            let n = uow.event().field("n").and_then(|v| v.as_u64()).unwrap_or(0);
            Ok((0..n % 3)
                .map(|i| uow.with_event(uow.event().derive(format!("part-{i}")).build()))
                .collect())
        })
        .then({
            let seen = seen.clone();
            move |uow| {
                seen.lock()
                    .unwrap()
                    .push(uow.event().event_type().to_owned());
                async move { Ok(uow) }
            }
        })
        .batch(BatchConfig::count(4))
        .sink(parts.clone())
        .unwrap();
    let report = run_pipeline(&kit, pipeline, &events(9, 3)).await.unwrap();
    // n % 3 parts for n in 0..9: 0+1+2 three times.
    assert_eq!(parts.len(), 9);
    assert_eq!(seen.lock().unwrap().len(), 9);
    assert_eq!(
        report.pipeline("split").unwrap().filtered,
        3,
        "zero parts is filtered"
    );
    assert_eq!(report.done, 9);
    assert_eq!(kit.checkpoint("0"), Some(9));
}

#[tokio::test(start_paused = true)]
async fn parts_of_a_split_record_that_fail_get_a_fault_each() {
    // Each run's enrichment reads something else (a counter here, a changing row in life).
    let lookups = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let pipeline = || {
        let lookups = lookups.clone();
        Pipeline::builder("reject-lines")
            .flat_map(|uow| {
                // Two line items with the same id and content: only their place differs.
                Ok((0..2)
                    .map(|_| uow.with_event(uow.event().derive("line-item").build()))
                    .collect())
            })
            .map(move |mut uow| {
                let n = lookups.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                uow.event_mut()
                    .fields_mut()
                    .insert("looked_up".into(), n.into());
                Ok(uow)
            })
            .validate(|_| Err(Error::poison_msg("Rejected", "no line items today")))
            .sink(MemorySink::new())
            .unwrap()
    };
    let fault_ids = |kit: &TestKit| {
        kit.faults()
            .iter()
            .map(|f| floodway::fault::fault_id(f).to_owned())
            .collect::<std::collections::BTreeSet<_>>()
    };
    let kit = TestKit::new();
    run_pipeline(&kit, pipeline(), &events(3, 1)).await.unwrap();
    assert_eq!(kit.faults().len(), 6);
    let first = fault_ids(&kit);
    assert_eq!(
        first.len(),
        6,
        "two parts of three records, each its own fault"
    );
    // The same records again (a redelivery, a resubmission): the same faults, though the
    // enrichment read other values.
    let kit = TestKit::new();
    run_pipeline(&kit, pipeline(), &events(3, 1)).await.unwrap();
    assert_eq!(fault_ids(&kit), first);
}

/// Runs batches of `batch` into `sink` over `events(n, 4)` with a fresh kit, which it returns.
async fn run_batched(batch: usize, sink: &ScriptedSink, n: u32) -> TestKit {
    let kit = TestKit::new();
    run_pipeline(&kit, batched(batch, sink.clone()), &events(n, 4))
        .await
        .unwrap();
    kit
}

/// A sink that reports the entries carrying one of `ids` failed with `error()`, per entry,
/// for the calls `fails` says, and delivers the rest.
fn failing_entries(
    ids: &'static [&'static str],
    fails: fn(u64) -> bool,
    error: fn() -> Error,
) -> ScriptedSink {
    ScriptedSink::new(move |call| {
        let failed = call
            .batch
            .events()
            .enumerate()
            .filter(|(_, e)| fails(call.number) && ids.contains(&e.id()))
            .map(|(i, _)| (i, error()));
        Ok::<_, Error>(floodway::Delivery::with_failed(failed))
    })
}

#[tokio::test(start_paused = true)]
async fn entries_a_sink_reports_throttled_are_retried_alone_and_nothing_is_faulted() {
    let kit = TestKit::new();
    let sink = failing_entries(
        &["e-3", "e-9"],
        |call| call == 1,
        || Error::throttled_msg("ProvisionedThroughputExceeded", "slow down"),
    );
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let seen = sizes.clone();
    let recorder = floodway::sink_fn(move |batch: floodway::Batch| {
        seen.lock().unwrap().push(batch.len());
        let mut sink = sink.clone();
        async move { tower::Service::call(&mut sink, batch).await }
    });
    run_pipeline(&kit, batched(16, recorder), &events(16, 4))
        .await
        .unwrap();
    assert!(kit.faults().is_empty());
    assert_eq!(
        *sizes.lock().unwrap(),
        vec![16, 2],
        "only the two failed entries are sent again"
    );
}

#[tokio::test(start_paused = true)]
async fn an_entry_a_sink_reports_poison_is_faulted_alone_without_bisection() {
    let sink = failing_entries(
        &["e-13"],
        |_| true,
        || Error::poison_msg("ValidationException", "bad entry"),
    );
    let kit = run_batched(16, &sink, 32).await;
    let delivered = sink.delivered();
    let faults = kit.faults();
    assert_eq!(faults.len(), 1);
    let details: FaultDetails = faults[0].payload().unwrap();
    assert_eq!(details.err.name, "ValidationException");
    assert_eq!(delivered.len(), 31);
    assert_eq!(sink.calls(), 2, "one call per batch, no bisection");
    assert_eq!(kit.checkpoint("0"), Some(32));
}

#[tokio::test(start_paused = true)]
async fn an_entry_failing_transiently_for_good_is_faulted_alone_once_its_retries_are_spent() {
    let kit = TestKit::new();
    let sink = failing_entries(
        &["e-5"],
        |_| true,
        || Error::transient_msg("InternalFailure", "try again"),
    );
    let delivered = sink.delivered().clone();
    let pipeline = Pipeline::builder("batched")
        .batch(BatchConfig::count(8))
        .resilience(
            Resilience::default()
                .no_breaker()
                .retry(floodway::layer::retry::RetryPolicy::default().max_attempts(3)),
        )
        .sink(sink.clone())
        .unwrap();
    run_pipeline(&kit, pipeline, &events(8, 4)).await.unwrap();
    assert_eq!(kit.faults().len(), 1);
    let err = kit.faults()[0].payload::<FaultDetails>().unwrap().err;
    assert_eq!(
        err.name, "InternalFailure",
        "the entry's own error, not the call's summary"
    );
    assert_eq!(err.attempts, 3, "with the attempts made for it");
    assert_eq!(delivered.len(), 7);
    assert_eq!(
        sink.calls(),
        3,
        "the batch once, then the failed entry twice"
    );
}

/// Behind the breaker, with an entry failing for good in every batch: no call succeeds
/// whole, but each delivers the rest, which proves the target up to the calls that failed
/// before it; their failing entries are faulted and the stream flows on (before, the breaker
/// took the target for down and held every batch, faulting nothing). The batches at the end
/// have no later call to prove it, and are held like any lone failing call.
#[tokio::test(start_paused = true)]
async fn entries_failing_for_good_in_every_batch_are_faulted_behind_the_breaker() {
    let kit = TestKit::new();
    let bad = |id: &str| {
        id.strip_prefix("e-")
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| n % 8 == 5)
    };
    let sink = ScriptedSink::new(move |call| {
        let failed = call
            .batch
            .events()
            .enumerate()
            .filter(|(_, e)| bad(e.id()))
            .map(|(i, _)| {
                (
                    i,
                    Error::transient_msg("InternalFailure", "500 for this payload"),
                )
            });
        Ok::<_, Error>(floodway::Delivery::with_failed(failed))
    });
    let breaker = CircuitBreaker::new(BreakerConfig::default(), "target");
    let pipeline = Pipeline::builder("batched")
        .batch(BatchConfig::count(8))
        .parallelism(4)
        .resilience(Resilience::default().shared_breaker(breaker.clone()))
        .sink(sink.clone())
        .unwrap();
    let processor = common::processor(&kit, pipeline);
    let input = events(400, 50);
    let report = processor
        .run(
            MemorySource::from_events(&input, 1),
            MemoryCheckpointer::default(),
            tokio::time::sleep(Duration::from_secs(1800)),
        )
        .await
        .unwrap();
    let faulted: Vec<String> = kit
        .faults()
        .iter()
        .map(|f| f.payload::<FaultDetails>().unwrap().uow.event.unwrap()["id"].to_string())
        .collect();
    assert!(
        faulted.iter().all(|id| bad(id.trim_matches('"'))),
        "{faulted:?}"
    );
    // 50 failing entries; at most the last few batches' are still held at the end.
    assert!(faulted.len() >= 40, "{} faulted: {report:?}", faulted.len());
    assert!(
        sink.delivered().len() >= 40 * 7,
        "{}",
        sink.delivered().len()
    );
}

#[tokio::test(start_paused = true)]
async fn an_entry_reported_in_an_outage_is_held_until_the_target_is_back() {
    let sink = failing_entries(
        &["e-2"],
        |call| call < 6,
        || Error::msg(ErrorClass::Outage, "Unavailable", "region down"),
    );
    let kit = run_batched(8, &sink, 8).await;
    let delivered = sink.delivered();
    assert!(kit.faults().is_empty());
    assert_eq!(delivered.len(), 8);
    assert!(delivered
        .batches()
        .iter()
        .skip(1)
        .all(|b| b.len() == 1 && b[0].id() == "e-2"));
}
