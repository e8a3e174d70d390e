//! Instants a duration away, for durations a setting may make too long for the clock.

use std::time::Duration;

use tokio::time::Instant;

/// What a wait too long for the clock stands for: a century.
pub const FOREVER: Duration = Duration::from_secs(100 * 365 * 86_400);

/// `at` plus `wait`; a wait the clock cannot add (`Duration::MAX`: "no limit") is a century,
/// not a panic.
pub fn later(at: Instant, wait: Duration) -> Instant {
    at.checked_add(wait).unwrap_or_else(|| at + FOREVER)
}
