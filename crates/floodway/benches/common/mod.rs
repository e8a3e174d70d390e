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

/// The median of some measurements.
pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The median over runs of the ratio of `ours` to `reference` within each run: the two sides
/// of a run see the same machine state, and this shared machine drifts between runs.
pub(crate) fn median_ratio(ours: &[f64], reference: &[f64]) -> f64 {
    median(ours.iter().zip(reference).map(|(o, r)| o / r).collect())
}

/// The least and the greatest ratio of `ours` to `reference` within a run: how far apart the
/// runs' verdicts are on this machine.
pub(crate) fn ratio_range(ours: &[f64], reference: &[f64]) -> (f64, f64) {
    ours.iter()
        .zip(reference)
        .map(|(o, r)| o / r)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(x), hi.max(x))
        })
}

/// A field of a process's `/proc/<pid>/status` in KiB (`VmHWM:`, `VmRSS:`); 0 when unknown.
pub(crate) fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The CPU time process `pid` has used so far, user and system, its threads that ended
/// included (`/proc/<pid>/stat`), in ms (10 ms steps); 0 when unknown.
pub(crate) fn cpu_ms(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // After the command name (in parentheses, which may hold spaces): the state is
            // field 3, utime and stime fields 14 and 15, in clock ticks of 10 ms.
            let mut fields = s.get(s.rfind(')')? + 1..)?.split_whitespace().skip(11);
            let user: u64 = fields.next()?.parse().ok()?;
            let system: u64 = fields.next()?.parse().ok()?;
            Some((user + system) * 10)
        })
        .unwrap_or(0)
}

/// Prints a line of the benchmark's report and keeps it for [`chart::save_table`].
macro_rules! out {
    () => {
        common::chart::emit(String::new())
    };
    ($($t:tt)*) => {
        common::chart::emit(format!($($t)*))
    };
}
