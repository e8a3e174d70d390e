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
    // An interval too long for the clock (a period of `Duration::MAX`) is a century.
    *tat = Some(crate::clock::later(t, interval));
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
        // An interval of zero would be no limit at all.
        let interval = period / calls;
        if interval.is_zero() {
            return Err(BuildError::InvalidSetting {
                setting: "rate_limit",
                problem: format!("{calls} calls in {period:?} is more than one a nanosecond"),
            });
        }
        Ok(RateLimiter {
            state: Arc::new(Mutex::new(Gcra {
                // A period too long to count in (`Duration::MAX`) is a century a call: the
                // tolerance of a burst is then counted in centuries too, never "no limit".
                interval: interval.min(crate::clock::FOREVER),
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
            // At most a century a call, so at most about 4 * 10^11 years: the clock can
            // subtract it, and a tolerance the clock cannot subtract would admit every call.
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

    /// Gives back a slot reserved by a caller that went away before it was admitted (a unit
    /// cut off at a deadline): the next caller may have it, rather than every later one
    /// waiting an interval more, for good.
    fn give_back(&self) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        let interval = state.interval;
        if let Some(t) = state.reserved {
            state.reserved = Some(t.checked_sub(interval).map_or(now, |back| back.max(now)));
        }
    }

    /// Waits until a call may start, and admits it. Cancelled before it is admitted, it
    /// gives its slot back.
    pub async fn acquire(&self) {
        struct Slot<'a>(&'a RateLimiter, bool);
        impl Drop for Slot<'_> {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.give_back();
                }
            }
        }
        let started = Instant::now();
        let at = self.reserve();
        let mut slot = Slot(self, false);
        if at > started {
            tokio::time::sleep_until(at).await;
        }
        while let Err(at) = self.try_admit() {
            tokio::time::sleep_until(at).await;
        }
        slot.1 = true;
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

    /// Callers cut off while they wait give their slots back: the next caller waits for its
    /// own turn, not for theirs as well (a processor reused across Lambda invocations cut
    /// at their deadlines made no call at all).
    #[tokio::test(start_paused = true)]
    async fn a_caller_cancelled_while_waiting_gives_its_slot_back() {
        let limiter = RateLimiter::per_second(1).unwrap();
        limiter.acquire().await;
        for _ in 0..9 {
            let cut = tokio::time::timeout(Duration::from_millis(10), limiter.acquire()).await;
            assert!(cut.is_err());
        }
        let started = Instant::now();
        limiter.acquire().await;
        assert!(
            started.elapsed() <= Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        // And the limit holds: the next one a second after.
        let started = Instant::now();
        limiter.acquire().await;
        assert!(started.elapsed() >= Duration::from_millis(990));
    }

    /// A period too long for the clock is a very slow limit, not a panic.
    #[tokio::test(start_paused = true)]
    async fn a_period_of_no_end_does_not_overflow() {
        let limiter = RateLimiter::new(1, Duration::MAX).unwrap();
        limiter.acquire().await;
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), limiter.acquire())
                .await
                .is_err()
        );
        // With a burst: the burst goes at once, and the limit still holds after it.
        let limiter = RateLimiter::new(1, Duration::MAX)
            .unwrap()
            .with_burst(3)
            .unwrap();
        for _ in 0..3 {
            tokio::time::timeout(Duration::from_secs(1), limiter.acquire())
                .await
                .unwrap();
        }
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), limiter.acquire())
                .await
                .is_err()
        );
        // A rate the clock cannot space (an interval under a nanosecond) is refused, not
        // taken for no limit.
        let err = RateLimiter::per_second(2_000_000_000).unwrap_err();
        assert!(
            err.to_string().contains("more than one a nanosecond"),
            "{err}"
        );
        RateLimiter::per_second(1_000_000_000).unwrap();
    }

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
