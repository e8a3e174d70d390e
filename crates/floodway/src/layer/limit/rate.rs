//! A GCRA rate limit, shareable between pipelines that call the same target.
//!
//! The generic cell rate algorithm keeps one number, the theoretical arrival time (TAT) of the
//! next call, and admits a call at time `now` only if `now >= TAT - tolerance`, then moves TAT
//! one interval on. Measured at admission, no window of length `w` ever holds more than
//! `w / interval + burst` calls.
//!
//! Callers first *reserve* a slot (a second TAT, advanced at arrival) and sleep until it, so
//! they wake one by one in arrival order instead of all at once; at wake-up the admission
//! check runs on the real clock. A late wake-up (timers have millisecond resolution, busy
//! threads are late) therefore delays a call instead of letting it crowd the next ones. Give
//! rates above about 1,000/s a burst of a few milliseconds' worth of calls, or the timer's
//! resolution caps the rate.
//!
//! Floodway keeps its own twenty-line GCRA rather than `governor` so that the limiter runs on
//! tokio's clock: tests and simulations on a paused clock see exact, repeatable timings.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{BuildError, Error};
use crate::layer::{Call, Policy};
pub use crate::layer::{RateLimit, RateLimitLayer};

/// A rate limit; clones share the same budget of calls.
///
/// ```
/// use floodway::layer::limit::rate::RateLimiter;
/// let limiter = RateLimiter::per_second(100).unwrap().with_burst(10).unwrap();
/// assert_eq!(limiter.interval().as_millis(), 10);
/// ```
#[derive(Debug, Clone)]
pub struct RateLimiter {
    state: Arc<Mutex<Gcra>>,
}

#[derive(Debug)]
struct Gcra {
    interval: Duration,
    tolerance: Duration,
    /// Theoretical arrival time of reservations: when the next caller should wake.
    reserved: Option<Instant>,
    /// Theoretical arrival time of admissions, on the real clock: what the limit enforces.
    admitted: Option<Instant>,
}

/// Advances `tat` by one call arriving at `now`; returns the earliest time the call conforms.
fn advance(
    tat: &mut Option<Instant>,
    now: Instant,
    interval: Duration,
    tolerance: Duration,
) -> Instant {
    let t = tat.map_or(now, |t| t.max(now));
    let allowed = t.checked_sub(tolerance).map_or(now, |a| a.max(now));
    *tat = Some(t + interval);
    allowed
}

impl RateLimiter {
    /// At most `calls` per `period`, with no burst.
    ///
    /// # Errors
    /// When `calls` is zero or the period is zero.
    pub fn new(calls: u32, period: Duration) -> Result<Self, BuildError> {
        if calls == 0 || period.is_zero() {
            return Err(BuildError::InvalidSetting {
                setting: "rate_limit",
                problem: "needs at least one call in a non-zero period".into(),
            });
        }
        Ok(RateLimiter {
            state: Arc::new(Mutex::new(Gcra {
                interval: period / calls,
                tolerance: Duration::ZERO,
                reserved: None,
                admitted: None,
            })),
        })
    }

    /// At most `calls` per second.
    ///
    /// # Errors
    /// When `calls` is zero.
    pub fn per_second(calls: u32) -> Result<Self, BuildError> {
        Self::new(calls, Duration::from_secs(1))
    }

    /// Allows `burst` calls at once after a quiet period (default 1).
    ///
    /// # Errors
    /// When `burst` is zero.
    pub fn with_burst(self, burst: u32) -> Result<Self, BuildError> {
        if burst == 0 {
            return Err(BuildError::InvalidSetting {
                setting: "burst",
                problem: "must be at least 1".into(),
            });
        }
        {
            let mut state = self.state.lock().unwrap();
            state.tolerance = state.interval * (burst - 1);
        }
        Ok(self)
    }

    /// The time between calls at the sustained rate.
    pub fn interval(&self) -> Duration {
        self.state.lock().unwrap().interval
    }

    /// Reserves the next slot and returns when the caller should try to start.
    pub fn reserve(&self) -> Instant {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        let (interval, tolerance) = (state.interval, state.tolerance);
        advance(&mut state.reserved, now, interval, tolerance)
    }

    /// Admits a call now if that keeps to the limit.
    ///
    /// # Errors
    /// When it would not: the instant at which it would.
    pub fn try_admit(&self) -> Result<(), Instant> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        let (interval, tolerance) = (state.interval, state.tolerance);
        let mut tat = state.admitted;
        let allowed = advance(&mut tat, now, interval, tolerance);
        if allowed > now {
            return Err(allowed);
        }
        state.admitted = tat;
        Ok(())
    }

    /// Waits until a call may start, and admits it.
    pub async fn acquire(&self) {
        let started = Instant::now();
        let at = self.reserve();
        if at > started {
            tokio::time::sleep_until(at).await;
        }
        while let Err(at) = self.try_admit() {
            tokio::time::sleep_until(at).await;
        }
        let waited = started.elapsed();
        if !waited.is_zero() {
            metrics::histogram!("floodway_rate_limit_wait_seconds").record(waited.as_secs_f64());
        }
    }
}

impl Policy for RateLimiter {
    async fn run<T: Send, C: Call<T>>(&self, inner: &mut C) -> Result<T, Error> {
        self.acquire().await;
        inner.call().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn spaces_calls_and_allows_bursts() {
        let limiter = RateLimiter::per_second(10).unwrap().with_burst(3).unwrap();
        let start = Instant::now();
        let times: Vec<_> = (0..6).map(|_| limiter.reserve() - start).collect();
        let ms: Vec<u128> = times.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, vec![0, 0, 0, 100, 200, 300]);
    }

    #[tokio::test(start_paused = true)]
    async fn admission_holds_on_the_real_clock_even_after_late_wakeups() {
        let limiter = RateLimiter::per_second(10).unwrap();
        limiter.acquire().await;
        // Two calls whose reservations passed long ago (a late thread): only one goes now.
        limiter.reserve();
        limiter.reserve();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(limiter.try_admit().is_ok());
        let next = limiter.try_admit().unwrap_err();
        assert_eq!(next - Instant::now(), Duration::from_millis(100));
    }

    #[test]
    fn rejects_nonsense() {
        assert!(RateLimiter::per_second(0).is_err());
        assert!(RateLimiter::per_second(1).unwrap().with_burst(0).is_err());
    }
}
