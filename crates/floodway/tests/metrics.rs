//! The processor reports what it does through the `metrics` facade.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use floodway::memory::{MemorySink, MemorySource};
use floodway::testing::TestKit;
use floodway::{Error, Pipeline};
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};

mod common;

/// Keeps every metric by name and sorted labels.
#[derive(Default, Clone)]
struct Collect {
    values: Arc<Mutex<HashMap<String, Arc<Value>>>>,
}

#[derive(Default)]
struct Value {
    count: AtomicU64,
    last: Mutex<f64>,
}

impl CounterFn for Value {
    fn increment(&self, value: u64) {
        self.count.fetch_add(value, Ordering::SeqCst);
    }
    fn absolute(&self, value: u64) {
        self.count.store(value, Ordering::SeqCst);
    }
}

impl GaugeFn for Value {
    fn increment(&self, value: f64) {
        *self.last.lock().unwrap() += value;
    }
    fn decrement(&self, value: f64) {
        *self.last.lock().unwrap() -= value;
    }
    fn set(&self, value: f64) {
        *self.last.lock().unwrap() = value;
    }
}

impl HistogramFn for Value {
    fn record(&self, value: f64) {
        self.count.fetch_add(1, Ordering::SeqCst);
        *self.last.lock().unwrap() = value;
    }
}

impl Collect {
    fn entry(&self, key: &Key) -> Arc<Value> {
        let mut labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        self.values.lock().unwrap().entry(name).or_default().clone()
    }

    fn count(&self, name: &str) -> u64 {
        self.values
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |v| v.count.load(Ordering::SeqCst))
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.values.lock().unwrap().keys().cloned().collect();
        names.sort();
        names
    }
}

impl Recorder for Collect {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.entry(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.entry(key))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.entry(key))
    }
}

#[test]
fn events_faults_and_latencies_are_counted() {
    let recorder = Collect::default();
    let kit = TestKit::new();
    let processor = kit
        .processor("orders")
        .pipeline(
            Pipeline::builder("valid")
                .validate(|e| match e.id() {
                    "e-3" => Err(Error::poison_msg("Invalid", "bad")),
                    _ => Ok(()),
                })
                .sink(MemorySink::new())
                .unwrap(),
        )
        .pipeline(
            Pipeline::builder("typed")
                .event_type("other")
                .sink(MemorySink::new())
                .unwrap(),
        )
        .build()
        .unwrap();
    let events = common::events(10, 10);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(kit.run(&processor, MemorySource::from_events(&events, 1)))
            .unwrap();
    });
    let count = |name: &str| recorder.count(name);
    assert_eq!(
        count("floodway_events_total{outcome=taken,pipeline=valid,processor=orders}"),
        10
    );
    assert_eq!(
        count("floodway_events_total{outcome=delivered,pipeline=valid,processor=orders}"),
        9
    );
    assert_eq!(
        count("floodway_events_total{outcome=faulted,pipeline=valid,processor=orders}"),
        1
    );
    assert_eq!(
        count("floodway_events_total{outcome=filtered,pipeline=typed,processor=orders}"),
        10
    );
    assert_eq!(
        count("floodway_faults_total{class=poison,pipeline=valid,processor=orders}"),
        1
    );
    assert_eq!(
        count("floodway_sink_duration_seconds{pipeline=valid,processor=orders}"),
        9
    );
    let names = recorder.names();
    for expected in ["floodway_in_flight{", "floodway_lag_seconds{"] {
        assert!(
            names.iter().any(|n| n.starts_with(expected)),
            "{expected} missing from {names:?}"
        );
    }
}
