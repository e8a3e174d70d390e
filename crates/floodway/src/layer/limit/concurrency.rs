//! A concurrency limit, fixed or adaptive (AIMD).
//!
//! The adaptive limit works like TCP congestion control: while calls succeed at the target's
//! usual latency and the limit is in use, it grows by about one per round of calls (additive
//! increase); when the target throttles, times out, or answers much slower than its best
//! recent latency, it shrinks by a factor (multiplicative decrease), at most once per round so
//! that one burst of throttles counts as one signal. Nobody has to know the target's capacity:
//! the limit finds it and follows it as it changes.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use crate::error::{BuildError, Error, ErrorClass};
use crate::layer::BoxFuture;

/// Settings of the adaptive limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aimd {
    /// The limit to start from.
    pub initial: usize,
    /// Never below this.
    pub min: usize,
    /// Never above this.
    pub max: usize,
    /// Factor applied on an overload signal, in (0, 1).
    pub decrease: f64,
    /// A success slower than `latency_tolerance` times the best recent latency is an overload
    /// signal.
    pub latency_tolerance: f64,
}

impl Default for Aimd {
    /// From 4, between 1 and 256, shrink by 0.9, tolerate twice the best latency.
    fn default() -> Self {
        Aimd {
            initial: 4,
            min: 1,
            max: 256,
            decrease: 0.9,
            latency_tolerance: 2.0,
        }
    }
}

/// A concurrency limit shared by clones: fixed, or adaptive per [`Aimd`].
#[derive(Debug, Clone)]
pub struct ConcurrencyLimiter {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    notify: Notify,
    adaptive: Option<Aimd>,
    label: Arc<str>,
}

#[derive(Debug)]
struct State {
    limit: f64,
    in_flight: usize,
    /// Incremented at every decrease; a call started before it cannot cause another one.
    generation: u64,
    best_latency: Option<Duration>,
    best_latency_at: Instant,
}

/// How a call ended, as the limiter sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Answered; the latency counts.
    Success,
    /// Throttled or timed out: the target is over capacity.
    Overload,
    /// Failed in a way that says nothing about load (e.g. a 4xx).
    Neutral,
}

impl Signal {
    /// The signal an error gives.
    pub fn of(err: &Error) -> Signal {
        if err.is_throttle() || err.name() == "Timeout" {
            Signal::Overload
        } else if err.class() == ErrorClass::Transient {
            Signal::Neutral
        } else {
            Signal::Success
        }
    }
}

/// A slot taken from a [`ConcurrencyLimiter`]; give it back with [`Permit::finish`] (dropping
/// it releases the slot with a neutral signal).
#[derive(Debug)]
pub struct Permit {
    shared: Arc<Shared>,
    started: Instant,
    generation: u64,
    done: bool,
}

impl ConcurrencyLimiter {
    /// A fixed limit of `limit` calls at once.
    ///
    /// # Errors
    /// When `limit` is zero.
    pub fn fixed(limit: usize) -> Result<Self, BuildError> {
        if limit == 0 {
            return Err(BuildError::InvalidSetting {
                setting: "concurrency",
                problem: "must be at least 1".into(),
            });
        }
        Ok(Self::build(limit as f64, None, "fixed"))
    }

    /// An adaptive limit; `label` names it in metrics.
    ///
    /// # Errors
    /// When the settings are inconsistent (zero minimum, min over max, factor outside (0, 1)).
    pub fn adaptive(aimd: Aimd, label: impl Into<Arc<str>>) -> Result<Self, BuildError> {
        let bad = |problem: &str| BuildError::InvalidSetting {
            setting: "adaptive_concurrency",
            problem: problem.into(),
        };
        if aimd.min == 0 || aimd.min > aimd.max {
            return Err(bad("needs 1 <= min <= max"));
        }
        if !(aimd.decrease > 0.0 && aimd.decrease < 1.0) {
            return Err(bad("decrease must be between 0 and 1"));
        }
        if aimd.latency_tolerance < 1.0 {
            return Err(bad("latency_tolerance must be at least 1"));
        }
        let initial = aimd.initial.clamp(aimd.min, aimd.max) as f64;
        Ok(Self::build(initial, Some(aimd), label))
    }

    fn build(limit: f64, adaptive: Option<Aimd>, label: impl Into<Arc<str>>) -> Self {
        ConcurrencyLimiter {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    limit,
                    in_flight: 0,
                    generation: 0,
                    best_latency: None,
                    best_latency_at: Instant::now(),
                }),
                notify: Notify::new(),
                adaptive,
                label: label.into(),
            }),
        }
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.shared.state.lock().unwrap().limit as usize
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.shared.state.lock().unwrap().in_flight
    }

    /// Waits for a free slot.
    pub async fn acquire(&self) -> Permit {
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.shared.state.lock().unwrap();
                let limit = state.limit.floor().max(1.0);
                if (state.in_flight as f64) < limit {
                    state.in_flight += 1;
                    return Permit {
                        shared: self.shared.clone(),
                        started: Instant::now(),
                        generation: state.generation,
                        done: false,
                    };
                }
            }
            notified.await;
        }
    }
}

impl Permit {
    /// Releases the slot, telling the limiter how the call went.
    pub fn finish(mut self, signal: Signal) {
        self.release(signal);
    }

    fn release(&mut self, signal: Signal) {
        if self.done {
            return;
        }
        self.done = true;
        let shared = &self.shared;
        let mut state = shared.state.lock().unwrap();
        // Grow only while the limit is in use (at least half of it busy), or an idle stream
        // would raise the limit without ever testing the target at that level.
        let saturated = state.in_flight as f64 * 2.0 >= state.limit.floor();
        state.in_flight -= 1;
        if let Some(aimd) = shared.adaptive {
            let now = Instant::now();
            let latency = now - self.started;
            let mut signal = signal;
            if signal == Signal::Success {
                // The best latency decays: after 30 s without a new best, start over, so a
                // target that became slower for good is not judged against its old self.
                if state.best_latency.is_none_or(|best| latency < best)
                    || now - state.best_latency_at > Duration::from_secs(30)
                {
                    state.best_latency = Some(latency);
                    state.best_latency_at = now;
                }
                let best = state.best_latency.unwrap_or(latency);
                if latency.as_secs_f64() > best.as_secs_f64() * aimd.latency_tolerance
                    && latency > Duration::from_millis(1)
                {
                    signal = Signal::Overload;
                }
            }
            let before = state.limit.floor();
            match signal {
                Signal::Overload if self.generation == state.generation => {
                    state.limit = (state.limit * aimd.decrease).max(aimd.min as f64);
                    state.generation += 1;
                    metrics::counter!("floodway_concurrency_decreases_total", "sink" => shared.label.to_string())
                        .increment(1);
                }
                Signal::Success if saturated => {
                    state.limit = (state.limit + 1.0 / state.limit).min(aimd.max as f64);
                }
                _ => {}
            }
            // Reported when it moves, not at every call.
            if state.limit.floor() != before {
                metrics::gauge!("floodway_concurrency_limit", "sink" => shared.label.to_string())
                    .set(state.limit.floor());
            }
        }
        drop(state);
        shared.notify.notify_waiters();
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.release(Signal::Neutral);
    }
}

/// Applies [`ConcurrencyLimit`] with a shared [`ConcurrencyLimiter`].
#[derive(Debug, Clone)]
pub struct ConcurrencyLimitLayer {
    limiter: ConcurrencyLimiter,
}

impl ConcurrencyLimitLayer {
    /// Limits concurrent calls through `limiter`.
    pub fn new(limiter: ConcurrencyLimiter) -> Self {
        ConcurrencyLimitLayer { limiter }
    }
}

impl<S> Layer<S> for ConcurrencyLimitLayer {
    type Service = ConcurrencyLimit<S>;
    fn layer(&self, inner: S) -> ConcurrencyLimit<S> {
        ConcurrencyLimit {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

/// Holds calls until the limiter has a slot; reports each call's outcome to it.
#[derive(Debug, Clone)]
pub struct ConcurrencyLimit<S> {
    inner: S,
    limiter: ConcurrencyLimiter,
}

impl<S, Req> Service<Req> for ConcurrencyLimit<S>
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
            let permit = limiter.acquire().await;
            let result = inner.oneshot(req).await;
            let signal = match &result {
                Ok(_) => Signal::Success,
                Err(err) => Signal::of(err),
            };
            if signal == Signal::Overload && result.as_ref().is_err_and(Error::is_throttle) {
                metrics::counter!("floodway_throttles_total", "sink" => limiter.shared.label.to_string())
                    .increment(1);
            }
            permit.finish(signal);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn fixed_limit_holds_callers() {
        let limiter = ConcurrencyLimiter::fixed(2).unwrap();
        let a = limiter.acquire().await;
        let _b = limiter.acquire().await;
        let waiter = tokio::spawn({
            let limiter = limiter.clone();
            async move { limiter.acquire().await.finish(Signal::Success) }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        a.finish(Signal::Success);
        waiter.await.unwrap();
        assert_eq!(limiter.limit(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn adaptive_grows_when_saturated_and_shrinks_once_per_round() {
        let limiter = ConcurrencyLimiter::adaptive(Aimd::default(), "t").unwrap();
        for _ in 0..80 {
            let permits: Vec<_> =
                futures_util::future::join_all((0..limiter.limit()).map(|_| limiter.acquire()))
                    .await;
            tokio::time::sleep(Duration::from_millis(5)).await;
            for p in permits {
                p.finish(Signal::Success);
            }
        }
        let grown = limiter.limit();
        assert!(grown > 20, "grew to {grown}");
        let permits: Vec<_> =
            futures_util::future::join_all((0..grown).map(|_| limiter.acquire())).await;
        for p in permits {
            p.finish(Signal::Overload);
        }
        let shrunk = limiter.limit();
        let expected = grown as f64 * 0.9;
        assert!(
            (shrunk as f64 - expected).abs() <= 1.0,
            "one decrease for one round: {grown} -> {shrunk}"
        );
    }
}
