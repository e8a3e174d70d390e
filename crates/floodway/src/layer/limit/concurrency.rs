//! A concurrency limit, fixed or adaptive (AIMD).
//!
//! The adaptive limit works like TCP congestion control: while calls succeed and the limit is
//! in use, it grows by about one per round of calls (additive increase); when the target
//! throttles or times out, or its latency trends up, it shrinks by a factor (multiplicative
//! decrease), at most once per round so that one burst of throttles counts as one signal.
//! Nobody has to know the target's capacity: the limit finds it and follows it as it changes.
//!
//! Three refinements make it hold a real service's capacity rather than saw around it:
//!
//! - **Slow start.** Until the first overload signal the limit doubles every round (one more
//!   per success), as TCP's does; the first signal halves it, which lands between the last
//!   round that went through and the one that did not. A limit of 64 is found in five rounds,
//!   not sixty.
//! - **A remembered ceiling.** An explicit back-pressure signal (a throttle or a timeout)
//!   records the limit it happened at. Growing back, the limit stops just below that ceiling
//!   and probes it only every few rounds: after each probe the target throttles again, the
//!   wait doubles (up to 64 rounds, and never more than [`MAX_PROBE_WAIT`]). Without this,
//!   additive increase probes every round, and a target taking 4 calls at once throttles one
//!   call in four. A probe that goes through forgets the ceiling: the target has grown.
//! - **Latency as a trend only** (below), and it never sets a ceiling: it is a softer signal.
//!
//! Latency is judged as a trend, never by a single call (real latencies jitter: a log-normal
//! tail puts one call in twenty at twice the median). As in Vector's adaptive request
//! concurrency, successes are gathered in windows one mean latency long; at the end of a
//! window its mean is compared with a moving average of past windows (EWMA) and their mean
//! deviation: above the average by more than [`Aimd::deviation_scale`] deviations, the target
//! is slowing down under load and the limit shrinks. The average then takes the window in,
//! so a target that became slower for good is soon judged against its new self. A trend is
//! acted on only while the limit is in use (at least half of it busy), as growth is: calls
//! further apart than a round make windows of one call, whose jitter is no trend.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::{BuildError, Error, ErrorClass};
use crate::layer::{Call, Policy};
pub use crate::layer::{ConcurrencyLimit, ConcurrencyLimitLayer};

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

/// The most rounds spent just below a known ceiling before probing it again.
const MAX_PROBE_ROUNDS: f64 = 64.0;

/// The longest wait just below a known ceiling before probing it again, however slow the
/// rounds: a target that grew is found within about this long.
pub const MAX_PROBE_WAIT: Duration = Duration::from_secs(2);

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
    /// Doubling every round until the first overload signal.
    slow_start: bool,
    /// The limit at the last explicit back-pressure signal, while it holds.
    ceiling: Option<Ceiling>,
}

#[derive(Debug)]
struct Ceiling {
    /// The limit that was throttled.
    at: f64,
    /// Rounds to wait below it before the next probe.
    probe_rounds: f64,
    /// Rounds waited so far (successes divided by the limit).
    waited: f64,
    /// When the limit reached it.
    reached: Option<Instant>,
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
    /// Failed in a way that says nothing about load (a 500, a 4xx, a refused connection).
    Neutral,
}

impl Signal {
    /// The signal an error gives: a throttle or a timeout is back-pressure; any other error
    /// is neutral. Not a success: a poison answer's or a refused connection's latency (fast,
    /// and nothing like the work's) would pull the average down and grow the limit, even
    /// while the target is down.
    ///
    /// A transient answer asking to be called again later (`Retry-After`, on a 502 say) is
    /// back-pressure too, whatever its status: the target says it is busy.
    pub fn of(err: &Error) -> Signal {
        let asks_later = err.retry_after().is_some() && err.class() == ErrorClass::Transient;
        if err.is_throttle() || err.is_timeout() || asks_later {
            Signal::Overload
        } else {
            Signal::Neutral
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
                    slow_start: true,
                    ceiling: None,
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

impl State {
    /// One success's worth of growth.
    fn increase(&mut self, aimd: Aimd, now: Instant) {
        let max = aimd.max as f64;
        if self.slow_start {
            self.limit = (self.limit + 1.0).min(max);
            return;
        }
        let step = 1.0 / self.limit;
        if let Some(ceiling) = &mut self.ceiling {
            // Just below the ceiling: wait there, then probe it.
            let below = ceiling.at.floor() - 1.0;
            if self.limit + step >= below + 1.0 {
                let reached = *ceiling.reached.get_or_insert(now);
                ceiling.waited += step;
                if ceiling.waited < ceiling.probe_rounds && now - reached < MAX_PROBE_WAIT {
                    self.limit = self.limit.max(below).min(below + 0.999);
                    return;
                }
                // The probe: one round at the ceiling. Past it, the ceiling is gone.
                if self.limit + step >= ceiling.at.floor() + 1.0 {
                    self.ceiling = None;
                }
            }
        }
        self.limit = (self.limit + step).min(max);
    }

    /// An overload signal: `explicit` for a throttle or a timeout, not a latency trend.
    fn decrease(&mut self, aimd: Aimd, explicit: bool) {
        let at = self.limit;
        if self.slow_start {
            // The round before went through at half this limit.
            self.slow_start = false;
            self.limit = (at / 2.0).max(aimd.min as f64);
        } else {
            self.limit = (at * aimd.decrease).max(aimd.min as f64);
        }
        self.generation += 1;
        if !explicit {
            return;
        }
        let probe_rounds = match &self.ceiling {
            // The probe at (or above) the ceiling was refused again: wait twice as long.
            Some(c) if at.floor() >= c.at.floor() => (c.probe_rounds * 2.0).min(MAX_PROBE_ROUNDS),
            Some(c) => c.probe_rounds,
            None => 1.0,
        };
        self.ceiling = Some(Ceiling {
            at: at.floor().max(aimd.min as f64 + 1.0),
            probe_rounds,
            waited: 0.0,
            reached: None,
        });
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
            // A latency trend counts only while the limit is in use: calls further apart than
            // a round each make a window of one, and one slow call in a dozen would shrink
            // a limit nothing tested (light traffic drained it, and the next burst grew
            // back one call a round).
            let trend = signal == Signal::Success
                && state.latency_trends_up(now, latency, aimd)
                && saturated;
            let before = state.limit.floor();
            let explicit = signal == Signal::Overload;
            if explicit || trend {
                // At most one decrease per round: a call that started before the last one
                // reports on a limit that is gone.
                if self.generation == state.generation {
                    state.decrease(aimd, explicit);
                    metrics::counter!("floodway_concurrency_decreases_total", "sink" => shared.label.to_string())
                        .increment(1);
                }
            } else if signal == Signal::Success && saturated {
                state.increase(aimd, now);
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

impl Policy for ConcurrencyLimiter {
    async fn run<T: Send, C: Call<T>>(&self, inner: &mut C) -> Result<T, Error> {
        let permit = self.acquire().await;
        let result = inner.call().await;
        let signal = match &result {
            Ok(_) => Signal::Success,
            Err(err) => Signal::of(err),
        };
        if signal == Signal::Overload && result.as_ref().is_err_and(Error::is_throttle) {
            metrics::counter!("floodway_throttles_total", "sink" => self.shared.label.to_string())
                .increment(1);
        }
        permit.finish(signal);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_throttles_and_timeouts_speak_of_load_and_no_error_counts_as_a_success() {
        for err in [
            Error::throttled_msg("Http", "429"),
            Error::timed_out(Duration::from_secs(1)),
            Error::transient_msg("Http", "504").with_timeout(),
            // A 502 asking to be called again later.
            Error::transient_msg("Http", "502").with_retry_after(Duration::from_secs(1)),
        ] {
            assert_eq!(Signal::of(&err), Signal::Overload, "{err}");
        }
        for err in [
            Error::transient_msg("Http", "500"),
            Error::poison_msg("Http", "400"),
            Error::transient_msg("Down", "connection refused").with_class(ErrorClass::Outage),
            Error::fatal_msg("Http", "301"),
        ] {
            assert_eq!(Signal::of(&err), Signal::Neutral, "{err}");
        }
    }

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

    /// What a simulated run measured over its second half.
    #[derive(Debug)]
    struct Run {
        /// The mean limit.
        limit: f64,
        /// Successes as a fraction of what the capacity allows (capacity / mean latency).
        goodput: f64,
        /// Throttled calls as a share of all calls.
        throttled: f64,
    }

    /// Runs callers against a simulated service that takes `capacity` calls at once
    /// (throttling above that after 1 ms) with log-normal latencies (median 20 ms, `sigma`),
    /// for `seconds` on the paused clock; `change` is called every 100 ms with the time
    /// elapsed and may set a new capacity. Measures the second half.
    async fn simulate(
        capacity: usize,
        sigma: f64,
        seconds: u64,
        change: impl Fn(Duration) -> Option<usize>,
    ) -> Run {
        use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
        let limiter = ConcurrencyLimiter::adaptive(Aimd::default(), "sim").unwrap();
        let cap = Arc::new(AtomicUsize::new(capacity));
        let busy = Arc::new(AtomicUsize::new(0));
        let ok = Arc::new(AtomicU64::new(0));
        let throttled = Arc::new(AtomicU64::new(0));
        let latency_sum = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let end = start + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for seed in 0..(capacity as u64 * 4).max(32) {
            let (limiter, cap, busy, ok, throttled, latency_sum) = (
                limiter.clone(),
                cap.clone(),
                busy.clone(),
                ok.clone(),
                throttled.clone(),
                latency_sum.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(seed);
                while Instant::now() < end {
                    let permit = limiter.acquire().await;
                    if busy.fetch_add(1, Ordering::SeqCst) >= cap.load(Ordering::SeqCst) {
                        busy.fetch_sub(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        permit.finish(Signal::Overload);
                        throttled.fetch_add(1, Ordering::SeqCst);
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
        let half = start + Duration::from_secs(seconds) / 2;
        let (mut sum, mut samples, mut at_half) = (0.0, 0.0, None);
        while Instant::now() < end {
            if let Some(c) = change(Instant::now() - start) {
                cap.store(c, Ordering::SeqCst);
            }
            if Instant::now() >= half {
                at_half
                    .get_or_insert((ok.load(Ordering::SeqCst), throttled.load(Ordering::SeqCst)));
                sum += limiter.limit() as f64;
                samples += 1.0;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        let (ok_half, throttled_half) = at_half.unwrap();
        let calls = ok.load(Ordering::SeqCst);
        let mean_latency = latency_sum.load(Ordering::SeqCst) as f64 / 1e6 / calls.max(1) as f64;
        let good = (calls - ok_half) as f64;
        let bad = (throttled.load(Ordering::SeqCst) - throttled_half) as f64;
        let capacity = cap.load(Ordering::SeqCst) as f64;
        Run {
            limit: sum / samples,
            goodput: good / (seconds as f64 / 2.0) / (capacity / mean_latency),
            throttled: bad / (good + bad),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn jittered_latency_does_not_collapse_the_limit() {
        for capacity in [4usize, 16, 64] {
            for sigma in [0.25, 0.5] {
                let run = simulate(capacity, sigma, 30, |_| None).await;
                eprintln!("capacity {capacity}, sigma {sigma}: {run:?}");
                let c = capacity as f64;
                assert!(
                    (run.limit - c).abs() <= c * 0.25 + 0.5,
                    "capacity {capacity}: {run:?}"
                );
                assert!(run.goodput >= 0.9, "capacity {capacity}: {run:?}");
                assert!(run.throttled <= 0.03, "capacity {capacity}: {run:?}");
            }
        }
    }

    /// Light traffic (one call a second, each alone in its latency window) does not drain a
    /// limit it does not use: single slow calls are jitter, not a trend.
    #[tokio::test(start_paused = true)]
    async fn light_traffic_keeps_the_limit() {
        let limiter = ConcurrencyLimiter::adaptive(Aimd::default(), "t").unwrap();
        for _ in 0..30 {
            round(&limiter, 256).await;
        }
        let grown = limiter.limit();
        assert!(grown >= 64, "{grown}");
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..300 {
            let permit = limiter.acquire().await;
            let (u1, u2) = (rng.f64().max(1e-12), rng.f64());
            let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            tokio::time::sleep(Duration::from_secs_f64(0.020 * (0.5 * z).exp())).await;
            permit.finish(Signal::Success);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert!(
            limiter.limit() >= grown / 2,
            "{} of {grown}",
            limiter.limit()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_follows_a_capacity_halved_then_restored() {
        // 16, halved at 10 s, restored at 20 s; the second half (15 s to 30 s) spans both.
        let run = simulate(16, 0.5, 30, |t| match t.as_secs() {
            10..20 => Some(8),
            20.. => Some(16),
            _ => None,
        })
        .await;
        eprintln!("halved and restored: {run:?}");
        // 5 s at 8 then 10 s at 16: a mean limit of about 13.3 when followed.
        assert!((run.limit - 13.3).abs() <= 2.0, "{run:?}");
        assert!(run.throttled <= 0.05, "{run:?}");
    }

    /// A round of 20 ms at the full limit: calls up to `capacity` succeed, the others throttle.
    /// Returns how many throttled.
    async fn round(limiter: &ConcurrencyLimiter, capacity: usize) -> usize {
        let n = limiter.limit();
        let permits: Vec<_> =
            futures_util::future::join_all((0..n).map(|_| limiter.acquire())).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Throttles are reported first, as a target refusing a call answers at once.
        for (i, p) in permits.into_iter().enumerate().rev() {
            p.finish(if i < capacity {
                Signal::Success
            } else {
                Signal::Overload
            });
        }
        n.saturating_sub(capacity)
    }

    #[tokio::test(start_paused = true)]
    async fn slow_start_then_a_ceiling_probed_ever_more_rarely() {
        let limiter = ConcurrencyLimiter::adaptive(Aimd::default(), "t").unwrap();
        // Every success adds one while at least half the limit is busy: when a whole round
        // ends at once, about half of its successes count: the limit grows by a third or more
        // per round.
        let mut limits = vec![limiter.limit()];
        for _ in 0..9 {
            round(&limiter, 1000).await;
            limits.push(limiter.limit());
        }
        assert!(limits[9] >= 64, "exponential growth: {limits:?}");
        // Capacity 40: the first throttles halve the limit (slow start ends).
        let before = limiter.limit();
        round(&limiter, 40).await;
        assert_eq!(limiter.limit(), before / 2);
        // Growing back, the limit probes 64's ceiling... it is above 40, so: throttles at
        // 41 and over only; count the rounds with a throttle over the next 400 rounds.
        let mut throttled_rounds = Vec::new();
        for r in 0..400 {
            if round(&limiter, 40).await > 0 {
                throttled_rounds.push(r);
            }
        }
        let gaps: Vec<usize> = throttled_rounds.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            throttled_rounds.len() <= 20,
            "probes become rare: {throttled_rounds:?}"
        );
        assert!(
            gaps.iter().rev().take(2).all(|g| *g >= 32),
            "waits between probes grew: {gaps:?}"
        );
        assert!((39..=41).contains(&limiter.limit()), "{}", limiter.limit());
        // The target grows: the next probe goes through and the ceiling is forgotten.
        let mut rounds = 0;
        while limiter.limit() <= 42 && rounds < 100 {
            round(&limiter, 1000).await;
            rounds += 1;
        }
        // Rounds of 20 ms: the probe comes within MAX_PROBE_WAIT (100 rounds), and a round.
        assert!(
            rounds <= 102,
            "probed within {MAX_PROBE_WAIT:?}: {rounds} rounds"
        );
        for _ in 0..100 {
            round(&limiter, 1000).await;
        }
        assert!(limiter.limit() > 60, "{}", limiter.limit());
    }

    #[tokio::test(start_paused = true)]
    async fn adaptive_grows_when_saturated_and_shrinks_once_per_round() {
        let limiter = ConcurrencyLimiter::adaptive(Aimd::default(), "t").unwrap();
        for _ in 0..80 {
            round(&limiter, usize::MAX).await;
        }
        assert_eq!(
            limiter.limit(),
            256,
            "slow start doubled it up to the maximum"
        );
        // The first overload ends slow start by halving the limit.
        round(&limiter, 0).await;
        assert_eq!(limiter.limit(), 128);
        for _ in 0..80 {
            round(&limiter, usize::MAX).await;
        }
        let grown = limiter.limit();
        assert!(grown > 128, "grew again to {grown}");
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
