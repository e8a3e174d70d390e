//! Limits on what a sink sends: a rate (GCRA) and a concurrency that adapts to the target.

pub mod concurrency;
pub mod rate;
