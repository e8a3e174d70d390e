//! Helpers shared by the workspace's benchmarks.
#![allow(dead_code)]

/// How many events a run is to use: `FLOODWAY_BENCH_EVENTS`, or `default`.
pub(crate) fn events_wanted(default: usize) -> usize {
    std::env::var("FLOODWAY_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A multi-threaded runtime of two workers.
pub(crate) fn two_workers() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

pub(crate) mod chart;

/// Prints a line of the benchmark's report and keeps it for [`chart::save_table`].
macro_rules! out {
    () => {
        common::chart::emit(String::new())
    };
    ($($t:tt)*) => {
        common::chart::emit(format!($($t)*))
    };
}
