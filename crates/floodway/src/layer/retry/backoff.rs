//! Exponential backoff with full jitter.

use std::time::Duration;

/// Exponential backoff with full jitter: the delay before retry `n` (0-based) is uniform in
/// `[0, min(max, initial * multiplier^n)]`.
///
/// Full jitter spreads retries of many clients that failed together, so a recovering target
/// is not hit by synchronized waves (see the AWS Architecture Blog, "Exponential Backoff And
/// Jitter").
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    multiplier: f64,
}

impl Default for Backoff {
    /// 100 ms doubling up to 5 s.
    fn default() -> Self {
        Backoff::exponential(Duration::from_millis(100), Duration::from_secs(5))
    }
}

impl Backoff {
    /// Doubling from `initial` up to `max`.
    pub fn exponential(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            multiplier: 2.0,
        }
    }

    /// Sets the growth factor (default 2).
    #[must_use]
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier.max(1.0);
        self
    }

    /// The upper bound of the delay before retry `retry` (0-based), before jitter.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = self.multiplier.powi(retry.min(64) as i32);
        let secs = (self.initial.as_secs_f64() * factor).min(self.max.as_secs_f64());
        Duration::from_secs_f64(secs)
    }

    /// A jittered delay before retry `retry` (0-based).
    pub fn delay(&self, retry: u32) -> Duration {
        self.ceiling(retry).mul_f64(fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let b = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(2), Duration::from_millis(400));
        assert_eq!(b.ceiling(10), Duration::from_secs(1));
        for n in 0..20 {
            assert!(b.delay(n) <= b.ceiling(n));
        }
    }
}
