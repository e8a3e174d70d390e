//! A concurrency limit, fixed or adaptive (AIMD).
//!
//! The adaptive limit works like TCP congestion control: while calls succeed and the limit is
//! in use, it grows by about one per round of calls (additive increase); when the target
//! throttles or times out, or its latency trends up, it shrinks by a factor (multiplicative
//! decrease), at most once per round so that one burst of throttles counts as one signal.
//! Nobody has to know the target's capacity: the limit finds it and follows it as it changes.
//!
//! Latency is judged as a trend, never by a single call (real latencies jitter: a log-normal
//! tail puts one call in twenty at twice the median). As in Vector's adaptive request
//! concurrency, successes are gathered in windows one mean latency long; at the end of a
//! window its mean is compared with a moving average of past windows (EWMA) and their mean
//! deviation: above the average by more than [`Aimd::deviation_scale`] deviations, the target
//! is slowing down under load and the limit shrinks. The average then takes the window in,
//! so a target that became slower for good is soon judged against its new self.

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
    /// A window whose mean latency is above the moving average by more than this many mean
    /// deviations is an overload signal.
    pub deviation_scale: f64,
}

impl Default for Aimd {
    /// From 4, between 1 and 256, shrink by 0.9, a latency window counts as overload 2.5
    /// deviations above the average.
    fn default() -> Self {
        Aimd {
            initial: 4,
            min: 1,
            max: 256,
            decrease: 0.9,
            deviation_scale: 2.5,
        }
    }
}

/// Weight of a new window in the moving averages (Vector's choice).
const EWMA_WEIGHT: f64 = 0.4;

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
    /// Latency windows: the moving average of their means and of their deviation from it
    /// (seconds), and the window being gathered.
    rtt: Option<f64>,
    rtt_deviation: f64,
    window: Window,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    sum: f64,
    count: u32,
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
        if err.is_throttle() || err.is_timeout() {
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
        if aimd.deviation_scale.is_nan() || aimd.deviation_scale < 0.0 {
            return Err(bad("deviation_scale must be at least 0"));
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
                    rtt: None,
                    rtt_deviation: 0.0,
                    window: Window {
                        started: Instant::now(),
                        sum: 0.0,
                        count: 0,
                    },
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

impl State {
    /// Adds a success's latency to the window; at the end of a window (one mean latency
    /// long), whether its mean is above the moving average by more than the allowed number
    /// of deviations. The averages then take the window in.
    fn latency_trends_up(&mut self, now: Instant, latency: Duration, aimd: Aimd) -> bool {
        let latency = latency.as_secs_f64();
        self.window.sum += latency;
        self.window.count += 1;
        let length = self.rtt.unwrap_or(latency).max(0.001);
        if (now - self.window.started).as_secs_f64() < length {
            return false;
        }
        let mean = self.window.sum / f64::from(self.window.count);
        self.window = Window {
            started: now,
            sum: 0.0,
            count: 0,
        };
        let Some(rtt) = self.rtt else {
            // The first window: the average starts there, with a deviation of half of it so
            // that the next windows are not judged against a spread of zero.
            self.rtt = Some(mean);
            self.rtt_deviation = mean / 2.0;
            return false;
        };
        let slower = mean > rtt + aimd.deviation_scale * self.rtt_deviation;
        self.rtt_deviation += EWMA_WEIGHT * ((mean - rtt).abs() - self.rtt_deviation);
        self.rtt = Some(rtt + EWMA_WEIGHT * (mean - rtt));
        slower
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
            if signal == Signal::Success && state.latency_trends_up(now, latency, aimd) {
                signal = Signal::Overload;
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

    /// Runs `callers` loops against a simulated service that takes `capacity` calls at once
    /// (throttling above that after 1 ms) with log-normal latencies (median 20 ms, `sigma`),
    /// for `seconds` on the paused clock. Returns the mean limit over the second half and the
    /// goodput as a fraction of what the capacity allows.
    async fn simulate(capacity: usize, sigma: f64, seconds: u64) -> (f64, f64) {
        use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
        let limiter = ConcurrencyLimiter::adaptive(Aimd::default(), "sim").unwrap();
        let busy = Arc::new(AtomicUsize::new(0));
        let ok = Arc::new(AtomicU64::new(0));
        let latency_sum = Arc::new(AtomicU64::new(0));
        let end = Instant::now() + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for seed in 0..(capacity as u64 * 4).max(32) {
            let (limiter, busy, ok, latency_sum) = (
                limiter.clone(),
                busy.clone(),
                ok.clone(),
                latency_sum.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(seed);
                while Instant::now() < end {
                    let permit = limiter.acquire().await;
                    if busy.fetch_add(1, Ordering::SeqCst) >= capacity {
                        busy.fetch_sub(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        permit.finish(Signal::Overload);
                        continue;
                    }
                    // Box-Muller: a standard normal from two uniforms.
                    let (u1, u2) = (rng.f64().max(1e-12), rng.f64());
                    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                    let latency = Duration::from_secs_f64(0.020 * (sigma * z).exp());
                    tokio::time::sleep(latency).await;
                    busy.fetch_sub(1, Ordering::SeqCst);
                    permit.finish(Signal::Success);
                    ok.fetch_add(1, Ordering::SeqCst);
                    latency_sum.fetch_add(latency.as_micros() as u64, Ordering::SeqCst);
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(seconds / 2)).await;
        let (mut sum, mut samples) = (0.0, 0.0);
        let ok_half = ok.load(Ordering::SeqCst);
        while Instant::now() < end {
            sum += limiter.limit() as f64;
            samples += 1.0;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        let calls = ok.load(Ordering::SeqCst);
        let mean_latency = latency_sum.load(Ordering::SeqCst) as f64 / 1e6 / calls.max(1) as f64;
        let goodput = (calls - ok_half) as f64 / (seconds as f64 / 2.0);
        (sum / samples, goodput / (capacity as f64 / mean_latency))
    }

    #[tokio::test(start_paused = true)]
    async fn jittered_latency_does_not_collapse_the_limit() {
        for capacity in [4usize, 16, 64] {
            let (limit, goodput) = simulate(capacity, 0.5, 30).await;
            eprintln!("capacity {capacity}: mean limit {limit:.1}, goodput {goodput:.3}");
            let c = capacity as f64;
            assert!(
                (limit - c).abs() <= c * 0.25 + 0.5,
                "capacity {capacity}: mean limit {limit:.1}"
            );
            assert!(
                goodput >= 0.85,
                "capacity {capacity}: goodput {goodput:.2} of capacity"
            );
        }
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
