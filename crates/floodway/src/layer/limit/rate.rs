//! A GCRA rate limit, shareable between pipelines that call the same target.
//!
//! The generic cell rate algorithm keeps one number, the theoretical arrival time (TAT) of the
//! next call, and admits a call at `max(now, TAT - tolerance)`. Every call reserves its slot
//! when it arrives and then sleeps until the slot, so callers are served in arrival order and
//! no window of length `w` ever holds more than `w / interval + burst` calls.
//!
//! Floodway keeps its own twenty-line GCRA rather than `governor` so that the limiter runs on
//! tokio's clock: tests and simulations on a paused clock see exact, repeatable timings.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use crate::error::{BuildError, Error};
use crate::layer::BoxFuture;

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
    tat: Option<Instant>,
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
                tat: None,
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

    /// Reserves the next slot and returns when the call may start.
    pub fn reserve(&self) -> Instant {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        let tat = state.tat.map_or(now, |t| t.max(now));
        let allowed = tat.checked_sub(state.tolerance).map_or(now, |t| t.max(now));
        state.tat = Some(tat + state.interval);
        allowed
    }

    /// Waits for a slot.
    pub async fn acquire(&self) {
        let at = self.reserve();
        let now = Instant::now();
        if at > now {
            metrics::histogram!("floodway_rate_limit_wait_seconds")
                .record((at - now).as_secs_f64());
            tokio::time::sleep_until(at).await;
        }
    }
}

/// Applies [`RateLimit`] with a shared [`RateLimiter`].
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    limiter: RateLimiter,
}

impl RateLimitLayer {
    /// Limits calls through `limiter`; give the same limiter to several layers to share it.
    pub fn new(limiter: RateLimiter) -> Self {
        RateLimitLayer { limiter }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

/// Delays calls so that they never exceed the limiter's rate.
#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    limiter: RateLimiter,
}

impl<S, Req> Service<Req> for RateLimit<S>
where
    S: Service<Req, Error = Error> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send + 'static,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = Error;
    type Future = BoxFuture<S::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let inner = self.inner.clone();
        let limiter = self.limiter.clone();
        Box::pin(async move {
            limiter.acquire().await;
            inner.oneshot(req).await
        })
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

    #[test]
    fn rejects_nonsense() {
        assert!(RateLimiter::per_second(0).is_err());
        assert!(RateLimiter::per_second(1).unwrap().with_burst(0).is_err());
    }
}
