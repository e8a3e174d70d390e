//! Steps that do I/O get the failure design of a sink, on tokio's paused clock: transient
//! errors retried in place, an outage held by the step's breaker (nothing faulted, nothing
//! skipped), poison faulted, fatal stops. And batches without a time limit never hang.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use floodway::layer::breaker::BreakerConfig;
use floodway::layer::retry::RetryPolicy;
use floodway::layer::Resilience;
use floodway::memory::MemorySink;
use floodway::testing::TestKit;
use floodway::{BatchConfig, Error, Event, Pipeline, RunError, Uow};
use tokio::time::Instant;

mod common;
use common::{build, events, processor, run, run_pipeline};

/// Per key, the ids in the order the sink saw them.
fn per_key(events: &[Event]) -> HashMap<String, Vec<String>> {
    let mut map: HashMap<String, Vec<String>> = HashMap::new();
    for e in events {
        map.entry(e.partition_key().to_owned())
            .or_default()
            .push(e.id().to_owned());
    }
    map
}

#[tokio::test(start_paused = true)]
async fn a_then_step_failing_transiently_twice_then_succeeding_faults_nothing() {
    let kit = TestKit::new();
    let calls_for_e3 = Arc::new(AtomicU32::new(0));
    let sink = MemorySink::new();
    let counter = calls_for_e3.clone();
    let pipeline = Pipeline::builder("enrich")
        .then(move |uow: Uow| {
            let counter = counter.clone();
            async move {
                if uow.event().id() == "e-3" && counter.fetch_add(1, Ordering::SeqCst) < 2 {
                    return Err(Error::transient_msg("ConnectionReset", "blip"));
                }
                Ok(uow)
            }
        })
        .sink(sink.clone())
        .unwrap();
    let report = run_pipeline(&kit, pipeline, &events(10, 3)).await.unwrap();
    assert!(kit.faults().is_empty(), "faults: {:?}", kit.faults());
    assert_eq!(calls_for_e3.load(Ordering::SeqCst), 3);
    assert_eq!(report.pipeline("enrich").unwrap().delivered, 10);
    assert_eq!(kit.checkpoint("0"), Some(10));
}

/// A service that refuses every call until `up_at`, counting calls.
#[derive(Clone)]
struct FlakyService {
    up_at: Arc<Mutex<Option<Instant>>>,
    refuse_first: u32,
    calls: Arc<AtomicU32>,
}

impl FlakyService {
    fn down_until(at: Instant) -> Self {
        FlakyService {
            up_at: Arc::new(Mutex::new(Some(at))),
            refuse_first: 0,
            calls: Arc::default(),
        }
    }

    fn down_for_calls(n: u32) -> Self {
        FlakyService {
            up_at: Arc::new(Mutex::new(None)),
            refuse_first: n,
            calls: Arc::default(),
        }
    }

    async fn call(&self, uow: Uow) -> Result<Uow, Error> {
        // Every call takes a little time, as a real one does.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let down_by_time = self
            .up_at
            .lock()
            .unwrap()
            .is_some_and(|t| Instant::now() < t);
        if down_by_time || n < self.refuse_first {
            return Err(Error::transient_msg("ConnectionRefused", "service down"));
        }
        Ok(uow)
    }

    /// Pipeline `enrich` calling this service in a `then` step, with `resilience` for the
    /// step (the default when `None`), into `sink`.
    fn enrich(&self, resilience: Option<Resilience>, sink: &MemorySink) -> Pipeline {
        let svc = self.clone();
        let builder = Pipeline::builder("enrich").then(move |uow| {
            let svc = svc.clone();
            async move { svc.call(uow).await }
        });
        match resilience {
            Some(resilience) => builder.step_resilience(resilience),
            None => builder,
        }
        .sink(sink.clone())
        .unwrap()
    }
}

/// Runs `pipeline` (named `enrich`) over 1,000 events of `keys` keys, and asserts that every
/// event was delivered, none faulted, and each key kept its order.
async fn assert_all_delivered_in_order(
    kit: &TestKit,
    pipeline: Pipeline,
    sink: &MemorySink,
    keys: u32,
) {
    let input = events(1_000, keys);
    let report = run_pipeline(kit, pipeline, &input).await.unwrap();
    assert!(kit.faults().is_empty(), "{} faults", kit.faults().len());
    assert_eq!(report.pipeline("enrich").unwrap().delivered, 1_000);
    // Nothing skipped, and every key still in order.
    assert_eq!(per_key(&sink.events()), per_key(&input));
}

#[tokio::test(start_paused = true)]
async fn a_step_whose_service_is_down_for_three_breaker_periods_faults_nothing() {
    let kit = TestKit::new();
    let period = Duration::from_secs(10);
    let service = FlakyService::down_until(Instant::now() + period * 3);
    let sink = MemorySink::new();
    let breaker = BreakerConfig {
        open_base: period,
        open_max: period,
    };
    let pipeline = service.enrich(Some(Resilience::default().breaker(breaker)), &sink);
    let started = Instant::now();
    assert_all_delivered_in_order(&kit, pipeline, &sink, 10).await;
    assert!(started.elapsed() >= period * 3, "the outage was waited out");
    assert_eq!(kit.checkpoint("0"), Some(1_000));
}

#[tokio::test(start_paused = true)]
async fn a_step_down_for_its_first_200_calls_faults_nothing() {
    let kit = TestKit::new();
    let service = FlakyService::down_for_calls(200);
    let sink = MemorySink::new();
    let pipeline = service.enrich(None, &sink);
    assert_all_delivered_in_order(&kit, pipeline, &sink, 16).await;
}

#[tokio::test(start_paused = true)]
async fn a_step_failing_on_one_event_only_faults_that_event_after_its_retries() {
    // A synchronous step that fails transiently for one event, always: its retries are spent
    // while the step succeeds for the events that keep coming, so it is poison, not an
    // outage. (The sink's latency and the in-flight bound spread the stream over time, as a
    // live stream is.) A map of the unit of work, a check of the event and a map of the event
    // (the last two read the event by reference) are judged alike.
    let lookup = |e: &Event| {
        if e.id() == "e-7" {
            Err(Error::transient_msg("LookupFailed", "no answer for e-7"))
        } else {
            Ok(())
        }
    };
    for (kind, step) in [
        ("map", "map-1"),
        ("validate", "validate-1"),
        ("map_event", "map-1"),
    ] {
        let kit = TestKit::new();
        let sink = floodway::testing::ScriptedSink::new(|_| Ok(()))
            .with_latency(Duration::from_millis(50));
        let builder = Pipeline::builder("lookup");
        let builder = match kind {
            "map" => builder.map(move |uow| lookup(uow.event()).map(|()| uow)),
            "validate" => builder.validate(lookup),
            _ => builder.map_event(move |e| lookup(e).map(|()| e.clone())),
        };
        let pipeline = builder
            .step_resilience(Resilience::default().retry(RetryPolicy::default().max_attempts(3)))
            .sink(sink.clone())
            .unwrap();
        let processor = build(
            kit.processor("p").max_in_flight(50).pull_batch(10),
            pipeline,
        );
        let report = run(&kit, &processor, &events(1_000, 10)).await.unwrap();
        let faults = kit.faults();
        assert_eq!(faults.len(), 1, "{kind}");
        let details: floodway::fault::FaultDetails = faults[0].payload().unwrap();
        assert_eq!(details.err.class, "transient");
        assert_eq!(details.err.attempts, 3);
        assert_eq!(faults[0].tag("step"), Some(step));
        assert_eq!(report.pipeline("lookup").unwrap().delivered, 999, "{kind}");
        assert_eq!(sink.delivered().len(), 999, "{kind}");
        assert_eq!(kit.checkpoint("0"), Some(1_000), "{kind}");
    }
}

#[tokio::test(start_paused = true)]
async fn synchronous_steps_down_for_every_event_hold_them_and_fault_nothing() {
    // A check of each event and a map of it fail transiently for every event for 20 s (what
    // they read from is down): no event's retries are spent while another passes, so none is
    // poison; all are held until the steps work again, then delivered in order.
    for down_at in ["validate", "map"] {
        let kit = TestKit::new();
        let sink = MemorySink::new();
        let back = Instant::now() + Duration::from_secs(20);
        let failing = move |step: &str| {
            if step == down_at && Instant::now() < back {
                Err(Error::transient_msg("Unavailable", "the lookup is down"))
            } else {
                Ok(())
            }
        };
        let pipeline = Pipeline::builder("enrich")
            .validate(move |_| failing("validate"))
            .map_event(move |e| {
                failing("map")?;
                Ok(e.derive("order-enriched").build())
            })
            .step_resilience(Resilience::default().retry(RetryPolicy::default().max_attempts(3)))
            .sink(sink.clone())
            .unwrap();
        let input = events(200, 5);
        let report = run_pipeline(&kit, pipeline, &input).await.unwrap();
        assert!(
            kit.faults().is_empty(),
            "{down_at}: {} faults",
            kit.faults().len()
        );
        assert!(
            Instant::now() >= back,
            "{down_at}: the outage was waited out"
        );
        assert_eq!(report.pipeline("enrich").unwrap().delivered, 200);
        let derived: Vec<Event> = input
            .iter()
            .map(|e| e.derive("order-enriched").build())
            .collect();
        assert_eq!(per_key(&sink.events()), per_key(&derived), "{down_at}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_poison_error_from_a_step_is_faulted_at_once_and_a_fatal_one_stops() {
    let kit = TestKit::new();
    let calls = Arc::new(AtomicU32::new(0));
    /// Pipeline `enrich` whose step counts its calls in `calls` and fails `e-2` with `error()`.
    fn failing_e2(calls: &Arc<AtomicU32>, error: fn() -> Error) -> Pipeline {
        let counter = calls.clone();
        Pipeline::builder("enrich")
            .then(move |uow: Uow| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    match uow.event().id() {
                        "e-2" => Err(error()),
                        _ => Ok(uow),
                    }
                }
            })
            .sink(MemorySink::new())
            .unwrap()
    }

    let pipeline = failing_e2(&calls, || Error::poison_msg("NotFound", "404"));
    run_pipeline(&kit, pipeline, &events(5, 5)).await.unwrap();
    assert_eq!(kit.faults().len(), 1);
    assert_eq!(calls.load(Ordering::SeqCst), 5, "poison is not retried");

    let kit = TestKit::new();
    let pipeline = failing_e2(&calls, || Error::fatal_msg("BadConfig", "no credentials"));
    let err = run_pipeline(&kit, pipeline, &events(5, 5))
        .await
        .unwrap_err();
    assert!(matches!(err, RunError::Fatal { .. }), "{err}");
    assert!(kit.faults().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_step_that_is_a_tower_service_gets_the_same_failure_design() {
    let kit = TestKit::new();
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    let service = tower::service_fn(move |uow: Uow| {
        let counter = counter.clone();
        async move {
            if counter.fetch_add(1, Ordering::SeqCst) < 3 {
                return Err(Error::throttled_msg("HttpStatus", "429 Too Many Requests")
                    .with_retry_after(Duration::from_millis(200)));
            }
            Ok::<_, Error>(uow)
        }
    });
    let sink = MemorySink::new();
    let processor = processor(
        &kit,
        Pipeline::builder("lookup")
            .call(service)
            .named("lookup-customer")
            .sink(sink.clone())
            .unwrap(),
    );
    run(&kit, &processor, &events(20, 4)).await.unwrap();
    assert!(kit.faults().is_empty());
    assert_eq!(sink.len(), 20);
    assert_eq!(calls.load(Ordering::SeqCst), 23);
    assert_eq!(
        processor.pipelines()[0].step_names().collect::<Vec<_>>(),
        ["lookup-customer"]
    );
}

#[test]
fn step_resilience_needs_a_step() {
    let err = Pipeline::builder("p")
        .step_resilience(Resilience::none())
        .sink(MemorySink::new())
        .unwrap_err();
    assert!(err.to_string().contains("step_resilience"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_batch_without_a_time_limit_is_sent_when_pulling_stops() {
    // 100 in flight at most, pulled 30 at a time: after 90 the next pull does not fit, and the
    // open batch of 90 would wait forever for its 100th unit of work.
    let kit = TestKit::new();
    let sink = MemorySink::new();
    let pipeline = Pipeline::builder("archive")
        .batch(BatchConfig::count(100).max_wait(Duration::MAX))
        .sink(sink.clone())
        .unwrap();
    let processor = build(
        kit.processor("p").max_in_flight(100).pull_batch(30),
        pipeline,
    );
    let input = events(1_000, 7);
    let report = tokio::time::timeout(Duration::from_secs(3_600), run(&kit, &processor, &input))
        .await
        .expect("the run hung with a batch held open")
        .unwrap();
    assert_eq!(report.pipeline("archive").unwrap().delivered, 1_000);
    assert_eq!(sink.len(), 1_000);
    assert!(sink.batches().iter().all(|b| b.len() <= 100));
}

/// `Pipeline::compress_over`: fields over the threshold leave compressed as aws-lambda-stream
/// compresses them (and read back as they were); an event under it leaves as it came.
#[tokio::test]
async fn a_pipeline_compresses_what_it_sends_over_its_threshold_and_nothing_else() {
    let kit = TestKit::new();
    let sink = MemorySink::new();
    let processor = kit
        .processor("p")
        .pipeline(
            Pipeline::builder("out")
                .compress_over(200)
                .sink(sink.clone())
                .unwrap(),
        )
        .build()
        .unwrap();
    let big = serde_json::json!({ "notes": "n".repeat(400), "id": "o-1" });
    let lines = [
        serde_json::json!({ "id": "e1", "type": "t", "timestamp": 1, "partitionKey": "k", "order": big }),
        serde_json::json!({ "id": "e2", "type": "t", "timestamp": 2, "partitionKey": "k", "order": { "id": "o-2" } }),
    ]
    .map(|v| v.to_string())
    .join("\n");
    kit.run_jsonl(&processor, &lines).await.unwrap();
    let sent = sink.events();
    assert_eq!(sent.len(), 2);
    let (large, small) = (sent[0].to_json(), sent[1].to_json());
    assert!(large.contains("\"COMPRESSED"), "{large}");
    assert!(!large.contains(&"n".repeat(400)), "{large}");
    assert_eq!(
        small,
        lines.lines().nth(1).unwrap(),
        "under the threshold: as it came"
    );
    // What was sent reads back as it was.
    let back = Event::decode(large.as_bytes()).unwrap();
    assert_eq!(back.field("order"), Some(&big));
}

#[tokio::test(start_paused = true)]
async fn a_step_that_changes_the_key_lets_no_later_event_pass_a_retried_one() {
    // The first event of key k fails its check three times and waits out retries; the
    // second passes at once. A later step gives both the key k2: the second must still wait
    // for the first, whichever key it is looked at by, batched or not.
    for batched in [false, true] {
        let kit = TestKit::new();
        let sink = MemorySink::new();
        let failed = Arc::new(AtomicU32::new(0));
        let count = failed.clone();
        let pipeline = Pipeline::builder("rekey")
            .validate(move |e| {
                if e.id() == "first" && count.fetch_add(1, Ordering::SeqCst) < 3 {
                    Err(Error::transient_msg("Blip", "try again"))
                } else {
                    Ok(())
                }
            })
            .map(|mut uow| {
                uow.event_mut().set_partition_key("k2");
                Ok(uow)
            })
            .step_resilience(Resilience::default().retry(RetryPolicy::default().max_attempts(5)));
        let pipeline = match batched {
            true => pipeline.batch(BatchConfig::count(1).max_wait(Duration::from_millis(5))),
            false => pipeline,
        };
        let pipeline = pipeline.sink(sink.clone()).unwrap();
        let input: Vec<Event> = ["first", "second"]
            .iter()
            .map(|id| Event::builder("thing-noted", "k").id(*id).build())
            .collect();
        run_pipeline(&kit, pipeline, &input).await.unwrap();
        assert_eq!(
            failed.load(Ordering::SeqCst),
            4,
            "failed three times, then passed"
        );
        let order: Vec<String> = sink.events().iter().map(|e| e.id().to_owned()).collect();
        assert_eq!(order, ["first", "second"], "batched: {batched}");
    }
}

/// Events of different source keys that a step gives one key (orders re-keyed by customer)
/// reach the sink in turn for that key, as well as for their own.
#[tokio::test(start_paused = true)]
async fn events_a_step_gives_one_key_run_in_turn_for_it() {
    let kit = TestKit::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = {
        let seen = seen.clone();
        floodway::sink_fn(move |batch: floodway::Batch| {
            let seen = seen.clone();
            async move {
                let id = batch.events().next().unwrap().id().to_owned();
                if id == "placed" {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                seen.lock().unwrap().push(id);
                Ok::<_, Error>(())
            }
        })
    };
    let pipeline = Pipeline::builder("by-customer")
        .parallelism(4)
        .map(|mut uow| {
            uow.event_mut().set_partition_key("customer-1");
            Ok(uow)
        })
        .sink(sink)
        .unwrap();
    let input: Vec<Event> = [("placed", "order-1"), ("cancelled", "order-2")]
        .iter()
        .map(|(id, key)| Event::builder("order-noted", *key).id(*id).build())
        .collect();
    run_pipeline(&kit, pipeline, &input).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), ["placed", "cancelled"]);
}

#[tokio::test(start_paused = true)]
async fn a_synchronous_step_retried_before_a_batch_keeps_its_keys_order() {
    // A map step fails every seventh event until 50 ms after its first call for it (a
    // blip), so those events wait out retries while the events behind them pass the step at
    // once: the ones of the same key must still reach the batch, and the sink, after them.
    let kit = TestKit::new();
    let sink = MemorySink::new();
    let blipped: Arc<Mutex<HashMap<String, (Instant, u32)>>> = Arc::default();
    let seen = blipped.clone();
    let pipeline = Pipeline::builder("enrich")
        .map(move |uow| {
            let id = uow.event().id().to_owned();
            let n: u32 = id.trim_start_matches("e-").parse().unwrap_or(0);
            if n.is_multiple_of(7) {
                let mut seen = seen.lock().unwrap();
                let (first, calls) = seen.entry(id).or_insert((Instant::now(), 0));
                *calls += 1;
                if first.elapsed() < Duration::from_millis(50) {
                    return Err(Error::transient_msg("Blip", "try again"));
                }
            }
            Ok(uow)
        })
        .step_resilience(Resilience::default().retry(RetryPolicy::default().max_attempts(50)))
        .batch(BatchConfig::count(8).max_wait(Duration::from_millis(20)))
        .sink(sink.clone())
        .unwrap();
    let input = events(1_000, 5);
    let report = run_pipeline(&kit, pipeline, &input).await.unwrap();
    assert!(kit.faults().is_empty(), "{} faults", kit.faults().len());
    let blipped = blipped.lock().unwrap();
    assert_eq!(blipped.len(), 143);
    assert!(
        blipped.values().all(|(_, calls)| *calls >= 2),
        "each failed and was retried"
    );
    drop(blipped);
    assert_eq!(report.pipeline("enrich").unwrap().delivered, 1_000);
    assert_eq!(per_key(&sink.events()), per_key(&input));
    assert_eq!(kit.checkpoint("0"), Some(1_000));
}

/// A filter after an async step counts what it drops as filtered, batched or not: what the
/// type filter took is filtered, delivered or faulted, nothing vanishes from the report.
#[tokio::test(start_paused = true)]
async fn a_filter_after_an_async_step_counts_what_it_drops() {
    for batched in [false, true] {
        let kit = TestKit::new();
        let sink = MemorySink::new();
        let pipeline = Pipeline::builder("late-filter")
            .then(|uow| async move { Ok(uow) })
            .filter(|uow| uow.event().id().ends_with('0'));
        let pipeline = if batched {
            pipeline.batch(BatchConfig::count(4))
        } else {
            pipeline
        };
        let pipeline = pipeline.sink(sink.clone()).unwrap();
        let report = run_pipeline(&kit, pipeline, &events(20, 4)).await.unwrap();
        let p = report.pipeline("late-filter").unwrap();
        assert_eq!(
            (p.taken, p.delivered, p.filtered),
            (20, 2, 18),
            "batched: {batched}"
        );
        assert_eq!(sink.len(), 2);
    }
}

/// Events compacted away (a later one of their key went in their stead) count as filtered:
/// every event the type filter took is filtered, delivered or faulted.
#[tokio::test(start_paused = true)]
async fn compacted_events_count_as_filtered() {
    let kit = TestKit::new();
    let sink = MemorySink::new();
    let pipeline = Pipeline::builder("latest")
        .batch(BatchConfig::count(20))
        .compact(|uow| uow.event().partition_key().to_owned())
        .sink(sink.clone())
        .unwrap();
    let report = run_pipeline(&kit, pipeline, &events(20, 4)).await.unwrap();
    let p = report.pipeline("latest").unwrap();
    assert_eq!(sink.len(), 4);
    assert_eq!((p.taken, p.delivered, p.filtered, p.faults), (20, 4, 16, 0));
}

/// A step that changes an event whose payload does not read (a lone surrogate) faults it:
/// written again from its fields, it would go on as its envelope alone.
#[tokio::test(start_paused = true)]
async fn tagging_an_event_whose_payload_does_not_read_faults_it() {
    let kit = TestKit::new();
    let sink = MemorySink::new();
    let tags = floodway::pipeline::StandardTags {
        source: Some("orders".into()),
        ..Default::default()
    };
    let pipeline = Pipeline::builder("tagged")
        .standard_tags(tags)
        .sink(sink.clone())
        .unwrap();
    let processor = processor(&kit, pipeline);
    let lines = concat!(
        r#"{"id":"e1","type":"t","timestamp":1,"partitionKey":"k","order":{"id":"o","note":"\ud800"}}"#,
        "\n",
        r#"{"id":"e2","type":"t","timestamp":2,"partitionKey":"k","order":{"id":"p"}}"#,
    );
    kit.run_jsonl(&processor, lines).await.unwrap();
    let faults = kit.faults();
    assert_eq!(faults.len(), 1);
    let details: floodway::fault::FaultDetails = faults[0].payload().unwrap();
    assert_eq!(details.err.name, "UnreadablePayload");
    let delivered = sink.events();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].field("order").unwrap()["id"], "p");
    assert_eq!(delivered[0].tags().unwrap()["source"], "orders");
}
