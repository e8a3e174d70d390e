//! The stream circuit breaker: tells an outage from a poison event.
//!
//! A call that has exhausted its retries is either poison (the target is fine, this request is
//! not) or a victim of an outage (the target is down for everybody). The breaker decides with
//! one observation: **after this call failed, did a call let through later succeed?**
//!
//! A call that fails is first *held*, never faulted, and tried again (with its retries) as
//! soon as the breaker lets it. When it fails again:
//!
//! - if a call let through after its first failure has succeeded meanwhile, the target is
//!   healthy and this request is the problem: the error goes back to the pipeline, which faults
//!   the unit of work and flows on;
//! - if not, this looks like an outage: the breaker opens, new calls wait at the gate (so the
//!   pipeline stops pulling new work, through backpressure), and after an open period that
//!   grows from [`BreakerConfig::open_base`] to [`BreakerConfig::open_max`] one probe goes
//!   through. A new call is preferred as the probe, so that a held call that fails for reasons
//!   of its own is found out as soon as anything else succeeds. A successful probe closes the
//!   breaker and every held call is tried again.
//!
//! Calls are numbered when the breaker lets them through, and only a success numbered after the
//! failure counts as evidence: a call let through earlier (a slow one, or one queued behind a
//! rate limit) may have reached the target before the outage began and answer after it, which
//! proves nothing about the target now.
//!
//! The price of never faulting during an outage: a call that always fails transiently, with no
//! other call let through after it (the last record of a bounded input), cannot be told from an
//! outage, and is held until something else succeeds.
//!
//! During an outage nothing is faulted and nothing is skipped; when the target recovers the
//! stream resumes by itself.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

pub use super::{Breaker, BreakerLayer};
use crate::error::{Error, ErrorClass};
use crate::layer::retry::Backoff;
use crate::layer::{Call, Policy};

/// The first wait of a call throttled while others get through; it doubles each time, up to
/// [`HELD_BACKOFF_MAX`] (full jitter).
const HELD_BACKOFF: Duration = Duration::from_millis(100);
const HELD_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Settings of a [`CircuitBreaker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// The first open period.
    pub open_base: Duration,
    /// The longest open period; periods double up to it while probes fail.
    pub open_max: Duration,
}

impl Default for BreakerConfig {
    /// Open for 1 s, doubling up to 30 s.
    fn default() -> Self {
        BreakerConfig {
            open_base: Duration::from_secs(1),
            open_max: Duration::from_secs(30),
        }
    }
}

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow.
    Closed,
    /// Calls wait until the instant passes.
    Open {
        /// When a probe may go.
        until: Instant,
    },
    /// One probe is allowed; the rest wait for its answer.
    HalfOpen {
        /// Whether the probe is under way.
        probing: bool,
    },
}

impl BreakerState {
    fn gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::Open { .. } => 1.0,
            BreakerState::HalfOpen { .. } => 2.0,
        }
    }
}

/// A stream circuit breaker, shared by clones (one per target).
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: BreakerConfig,
    label: Arc<str>,
    state: Mutex<Inner>,
    notify: Notify,
    /// Calls let through so far: each admission's number orders it against failures.
    admitted: AtomicU64,
    /// The highest admission number of a call that succeeded (0: none yet).
    succeeded: AtomicU64,
    /// Mirrors `state.mode == Closed`, so that the common case takes no lock.
    closed: AtomicBool,
}

#[derive(Debug)]
struct Inner {
    mode: BreakerState,
    reopenings: u32,
    new_waiters: usize,
    opens: u64,
    /// The last admission number when the breaker last opened: a success of a call let
    /// through before then (slow, answering during the outage) says nothing of the target
    /// now, and does not close it.
    opened_at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    Normal,
    Probe,
}

/// Counts a new call waiting at the gate while it waits.
struct Waiting<'a>(&'a Shared);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.state.lock().unwrap().new_waiters -= 1;
        // A held call may be waiting for this one to take the probe.
        self.0.notify.notify_waiters();
    }
}

/// Gives the probe slot back, whatever way a probe ends, unless its outcome already decided the
/// breaker's state (closed, or open again).
struct ProbeGuard<'a> {
    shared: &'a Shared,
    armed: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut inner = self.shared.state.lock().unwrap();
            if let BreakerState::HalfOpen { probing: true } = inner.mode {
                inner.mode = BreakerState::HalfOpen { probing: false };
            }
            drop(inner);
            self.shared.notify.notify_waiters();
        }
    }
}

impl CircuitBreaker {
    /// A closed breaker; `label` names the target in metrics and logs.
    pub fn new(config: BreakerConfig, label: impl Into<Arc<str>>) -> Self {
        let label = label.into();
        metrics::gauge!("floodway_breaker_state", "sink" => label.to_string()).set(0.0);
        CircuitBreaker {
            shared: Arc::new(Shared {
                config,
                label,
                state: Mutex::new(Inner {
                    mode: BreakerState::Closed,
                    reopenings: 0,
                    new_waiters: 0,
                    opens: 0,
                    opened_at: 0,
                }),
                notify: Notify::new(),
                admitted: AtomicU64::new(0),
                succeeded: AtomicU64::new(0),
                closed: AtomicBool::new(true),
            }),
        }
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        self.shared.state.lock().unwrap().mode
    }

    /// How many times the breaker has opened.
    pub fn opens(&self) -> u64 {
        self.shared.state.lock().unwrap().opens
    }
}

impl Shared {
    fn set_mode(&self, inner: &mut Inner, mode: BreakerState) {
        inner.mode = mode;
        self.closed
            .store(mode == BreakerState::Closed, Ordering::Release);
        metrics::gauge!("floodway_breaker_state", "sink" => self.label.to_string())
            .set(mode.gauge());
    }

    /// Waits until the call may go; returns how and its admission number.
    async fn admit(&self, held: bool) -> (Admission, u64) {
        let admission = self.gate(held).await;
        (admission, self.admitted.fetch_add(1, Ordering::SeqCst) + 1)
    }

    async fn gate(&self, held: bool) -> Admission {
        if self.closed.load(Ordering::Acquire) {
            return Admission::Normal;
        }
        let mut waiting = None;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let open_until = {
                let mut inner = self.state.lock().unwrap();
                match inner.mode {
                    BreakerState::Closed => return Admission::Normal,
                    BreakerState::Open { until } if Instant::now() >= until => {
                        self.set_mode(&mut inner, BreakerState::HalfOpen { probing: false });
                        continue;
                    }
                    BreakerState::Open { until } => Some(until),
                    BreakerState::HalfOpen { probing: false }
                        if !held || inner.new_waiters == 0 =>
                    {
                        self.set_mode(&mut inner, BreakerState::HalfOpen { probing: true });
                        return Admission::Probe;
                    }
                    BreakerState::HalfOpen { .. } => None,
                }
            };
            if !held && waiting.is_none() {
                self.state.lock().unwrap().new_waiters += 1;
                waiting = Some(Waiting(self));
            }
            match open_until {
                Some(until) => {
                    tokio::select! {
                        () = &mut notified => {}
                        () = tokio::time::sleep_until(until) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    fn on_success(&self, admission: Admission, number: u64) {
        self.succeeded.fetch_max(number, Ordering::SeqCst);
        if admission == Admission::Normal && self.closed.load(Ordering::Acquire) {
            return;
        }
        self.close(admission, number);
    }

    /// Closes the breaker after a success (or proof that the target is healthy) of the call
    /// admitted as number `number`: a probe, or a call admitted since the breaker opened.
    fn close(&self, admission: Admission, number: u64) {
        let mut inner = self.state.lock().unwrap();
        if admission == Admission::Probe
            || (inner.mode != BreakerState::Closed && number > inner.opened_at)
        {
            if inner.mode != BreakerState::Closed {
                tracing::info!(sink = %self.label, "circuit breaker closed: target recovered");
            }
            inner.reopenings = 0;
            self.set_mode(&mut inner, BreakerState::Closed);
            drop(inner);
            self.notify.notify_waiters();
        }
    }

    fn open(&self, inner: &mut Inner) {
        let factor = 2u32.saturating_pow(inner.reopenings.min(16));
        let period = self
            .config
            .open_base
            .saturating_mul(factor)
            .min(self.config.open_max);
        inner.reopenings += 1;
        inner.opens += 1;
        inner.opened_at = self.admitted.load(Ordering::SeqCst);
        metrics::counter!("floodway_breaker_opens_total", "sink" => self.label.to_string())
            .increment(1);
        tracing::warn!(sink = %self.label, ?period, "circuit breaker open: target looks down");
        self.set_mode(
            inner,
            BreakerState::Open {
                until: Instant::now() + period,
            },
        );
    }

    /// Whether a call let through after a failure that happened at admission number
    /// `failed_at` has succeeded, and since the breaker last opened: a success from before
    /// an opening says nothing of the target since.
    fn healthy_since(&self, failed_at: u64) -> bool {
        let opened_at = self.state.lock().unwrap().opened_at;
        self.succeeded.load(Ordering::SeqCst) > failed_at.max(opened_at)
    }

    /// A held call failed again with no sign of health since its first failure, or a probe
    /// failed.
    fn on_outage_suspected(&self, admission: Admission) {
        let mut inner = self.state.lock().unwrap();
        match (admission, inner.mode) {
            (Admission::Probe, _) | (_, BreakerState::Closed) => self.open(&mut inner),
            _ => {}
        }
        drop(inner);
        self.notify.notify_waiters();
    }
}

impl Policy for CircuitBreaker {
    async fn run<T: Send, C: Call<T>>(&self, inner: &mut C) -> Result<T, Error> {
        let shared = &self.shared;
        // The last admission number when this call first failed.
        let mut failed_at: Option<u64> = None;
        // Times this call was throttled while others got through.
        let mut throttled = 0;
        // Attempts made in the rounds before this one (each round its retries' attempts):
        // what a fault of this call says it took.
        let mut attempts = 0u32;
        loop {
            let held = failed_at.is_some();
            let (admission, number) = shared.admit(held).await;
            let _guard = ProbeGuard {
                shared,
                armed: admission == Admission::Probe,
            };
            let err = match inner.call().await {
                Ok(response) => {
                    shared.on_success(admission, number);
                    return Ok(response);
                }
                Err(err) => {
                    let made = attempts.saturating_add(err.attempts());
                    attempts = made;
                    err.with_attempts(made)
                }
            };
            // Part of the batch was delivered: the target is up. What failed is held once
            // more, as any call's first failure, and then judged by that success, its own
            // included: when every call in flight has entries that fail for good, no other
            // call can be let through to show the target up, and waiting for one stalled the
            // pipeline. The price: entries failing because an outage began in the middle of
            // their batch are faulted (resubmittable) unless another call shows the outage
            // first (it opens the breaker, and a success from before that no longer counts).
            let partial = err.is_partial();
            if partial {
                shared.on_success(admission, number);
            }
            match err.class() {
                // A poison answer still proves the target is up.
                ErrorClass::Poison => {
                    shared.on_success(admission, number);
                    return Err(err);
                }
                ErrorClass::Transient => {}
                ErrorClass::Outage => {
                    // The sink says the target is down: a failed probe opens again.
                    if admission == Admission::Probe {
                        shared.on_outage_suspected(admission);
                    }
                    return Err(err);
                }
                _ => return Err(err),
            }
            match failed_at {
                // Throttled while others get through: the target is busy, and would take
                // this call another time. Held again, never faulted for it.
                Some(at) if shared.healthy_since(at) && err.is_throttle() => {
                    tracing::debug!(sink = %shared.label, error = %err, "throttled call held again");
                    failed_at = Some(shared.admitted.load(Ordering::SeqCst));
                    if admission == Admission::Probe {
                        shared.close(admission, number);
                    }
                    // Sent again after what the target asked for, or a backoff that grows
                    // with each time, never at once: the retries below have given up (their
                    // attempts, time or budget spent), and a call sent again the moment its
                    // 429 came would keep a busy target busier.
                    let backoff = Backoff::exponential(HELD_BACKOFF, HELD_BACKOFF_MAX);
                    let wait = backoff
                        .delay(throttled)
                        .max(err.retry_after().unwrap_or_default());
                    throttled += 1;
                    tokio::time::sleep(wait).await;
                }
                Some(at) if shared.healthy_since(at) => {
                    // Later calls get through: this call is the problem, not the target.
                    if admission == Admission::Probe {
                        shared.close(admission, number);
                    }
                    return Err(err);
                }
                Some(_) => {
                    tracing::debug!(sink = %shared.label, error = %err, "outage suspected");
                    shared.on_outage_suspected(admission);
                }
                None => {
                    metrics::counter!("floodway_breaker_held_total", "sink" => shared.label.to_string())
                        .increment(1);
                    tracing::debug!(sink = %shared.label, error = %err, "call held by the breaker");
                    failed_at = Some(if partial {
                        // Failed after a success of its own.
                        number - 1
                    } else {
                        shared.admitted.load(Ordering::SeqCst)
                    });
                    if admission == Admission::Probe && !partial {
                        shared.on_outage_suspected(admission);
                    }
                    // What the target asked for is waited, before the call goes again (a
                    // `Retry-After` longer than the retries' time gave them up at once);
                    // else a short jittered pause, so that a call the retries gave up on
                    // (their attempts, time or budget spent) does not go again the same
                    // instant, and calls let through after it have a moment to answer.
                    let pause = Backoff::exponential(HELD_BACKOFF, HELD_BACKOFF_MAX).delay(0);
                    tokio::time::sleep(err.retry_after().unwrap_or(pause)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use tower::service_fn;
    use tower::Layer;
    use tower::Service;
    use tower::ServiceExt;

    /// Runs a test's body, failing it if the paused clock passes an hour: a held call that
    /// never learns the target is healthy would otherwise spin forever instead of failing.
    async fn bounded(test: impl std::future::Future<Output = ()>) {
        tokio::time::timeout(Duration::from_secs(3600), test)
            .await
            .expect("a call was held for an hour");
    }

    /// `svc` behind a breaker of the default settings, and the breaker.
    fn guarded<S>(svc: S) -> (CircuitBreaker, Breaker<S>) {
        let breaker = CircuitBreaker::new(BreakerConfig::default(), "t");
        let svc = BreakerLayer::new(breaker.clone()).layer(svc);
        (breaker, svc)
    }

    #[tokio::test(start_paused = true)]
    async fn holds_during_outage_and_resumes() {
        bounded(async {
            let up = Arc::new(AtomicBool::new(false));
            let u = up.clone();
            let svc = service_fn(move |x: u32| {
                let up = u.load(Ordering::SeqCst);
                async move {
                    if up {
                        Ok(x)
                    } else {
                        Err(Error::transient_msg("Down", "connection refused"))
                    }
                }
            });
            let (breaker, svc) = guarded(svc);
            let call = tokio::spawn(svc.clone().oneshot(1));
            tokio::time::sleep(Duration::from_secs(60)).await;
            assert!(!call.is_finished(), "held, not failed");
            assert!(matches!(breaker.state(), BreakerState::Open { .. }));
            assert!(breaker.opens() >= 4, "probes back off: {}", breaker.opens());
            up.store(true, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(31)).await;
            assert_eq!(call.await.unwrap().unwrap(), 1);
            assert_eq!(breaker.state(), BreakerState::Closed);
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_failing_while_others_succeed_is_returned() {
        bounded(async {
            let svc = service_fn(|x: u32| async move {
                if x == 13 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    Err(Error::transient_msg("Timeout", "always"))
                } else {
                    Ok(x)
                }
            });
            let (breaker, svc) = guarded(svc);
            let bad = tokio::spawn(svc.clone().oneshot(13));
            // The bad call is held, the breaker opens; a new call probes and succeeds, which
            // proves the target healthy: the held call then fails for good on its next try.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let good = tokio::spawn(svc.clone().oneshot(1));
            assert_eq!(good.await.unwrap().unwrap(), 1);
            let err = bad.await.unwrap().unwrap_err();
            assert_eq!(err.class(), ErrorClass::Transient);
            assert_eq!(breaker.state(), BreakerState::Closed);
        })
        .await;
    }

    /// A call returned after being held says every attempt it made, the rounds before the
    /// last included.
    #[tokio::test(start_paused = true)]
    async fn a_returned_call_counts_the_attempts_of_every_round() {
        bounded(async {
            let calls = Arc::new(AtomicU64::new(0));
            let counted = calls.clone();
            let svc = service_fn(move |x: u32| {
                let counted = counted.clone();
                async move {
                    if x == 13 {
                        counted.fetch_add(1, Ordering::SeqCst);
                        // As the retry layer gives up: after its attempts.
                        Err(Error::transient_msg("Fails", "always").with_attempts(5))
                    } else {
                        Ok(x)
                    }
                }
            });
            let (_, svc) = guarded(svc);
            let bad = tokio::spawn(svc.clone().oneshot(13));
            tokio::time::sleep(Duration::from_millis(20)).await;
            svc.clone().oneshot(1).await.unwrap();
            let err = bad.await.unwrap().unwrap_err();
            let rounds = calls.load(Ordering::SeqCst);
            assert!(rounds >= 2, "held once: {rounds}");
            assert_eq!(u64::from(err.attempts()), rounds * 5);
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_throttled_while_others_succeed_is_held_not_returned() {
        bounded(async {
            // The target throttles call 13 for its first 5 s, then takes it: a busy target, not a
            // bad request.
            let start = Instant::now();
            let calls = Arc::new(AtomicU64::new(0));
            let counted = calls.clone();
            let svc = service_fn(move |x: u32| {
                let counted = counted.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    if x == 13 {
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                    if x == 13 && start.elapsed() < Duration::from_secs(5) {
                        Err(Error::throttled_msg("HttpStatus", "429 Too Many Requests"))
                    } else {
                        Ok(x)
                    }
                }
            });
            let (breaker, svc) = guarded(svc);
            let throttled = tokio::spawn(svc.clone().oneshot(13));
            for x in 0..100 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                assert_eq!(svc.clone().oneshot(x).await.unwrap(), x);
            }
            assert_eq!(throttled.await.unwrap().unwrap(), 13, "held until taken");
            assert_eq!(breaker.state(), BreakerState::Closed);
            // Sent again after a growing backoff, not the moment each 429 came (which was
            // about 500 calls in those 5 s).
            let calls = calls.load(Ordering::SeqCst);
            assert!(
                (3..=25).contains(&calls),
                "{calls} calls of the throttled one"
            );
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_of_a_call_let_through_before_the_outage_does_not_close_it() {
        bounded(async {
            // Call 1 reaches the target before it goes down and answers 2 s later; every
            // call after it fails: the breaker opens, and call 1's success says nothing of
            // the target now.
            let svc = service_fn(|x: u32| async move {
                if x == 1 {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    Ok(x)
                } else {
                    Err(Error::transient_msg("Down", "connection refused"))
                }
            });
            let (breaker, svc) = guarded(svc);
            let slow = tokio::spawn(svc.clone().oneshot(1));
            tokio::time::sleep(Duration::from_millis(10)).await;
            let _failing = tokio::spawn(svc.clone().oneshot(2));
            tokio::time::sleep(Duration::from_millis(1_890)).await;
            assert!(matches!(breaker.state(), BreakerState::Open { .. }));
            let opens = breaker.opens();
            assert_eq!(slow.await.unwrap().unwrap(), 1);
            tokio::time::sleep(Duration::from_millis(50)).await;
            // Closed by it, the breaker would let the held call through at once, which
            // fails and opens it again with its pause back at the shortest.
            assert!(matches!(breaker.state(), BreakerState::Open { .. }));
            assert_eq!(breaker.opens(), opens, "not closed and opened again");
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_call_waits_what_the_target_asked_for() {
        bounded(async {
            // Call 13 is throttled for a minute with `Retry-After: 60`, longer than the
            // retries' time: it goes again after 60 s, not at once.
            let start = Instant::now();
            let times = Arc::new(std::sync::Mutex::new(Vec::new()));
            let seen = times.clone();
            let svc = service_fn(move |x: u32| {
                let seen = seen.clone();
                async move {
                    if x == 13 {
                        seen.lock().unwrap().push(start.elapsed());
                        if start.elapsed() < Duration::from_secs(60) {
                            return Err(Error::throttled_msg("HttpStatus", "429")
                                .with_retry_after(Duration::from_secs(60)));
                        }
                    }
                    Ok(x)
                }
            });
            let (_breaker, svc) = guarded(svc);
            assert_eq!(svc.clone().oneshot(13).await.unwrap(), 13);
            let times = times.lock().unwrap().clone();
            assert!(times.len() >= 2, "{times:?}");
            assert!(
                times[1] - times[0] >= Duration::from_secs(60),
                "went again after {:?}",
                times[1] - times[0]
            );
        })
        .await;
    }

    /// A target whose answers are decided when they arrive: down between `from` and `to`.
    fn target(
        start: Instant,
        from: Duration,
        to: Duration,
        latency: impl Fn(u32) -> Duration + Clone + Send + 'static,
    ) -> impl Service<u32, Response = u32, Error = Error, Future: Send> + Clone + Send {
        service_fn(move |x: u32| {
            let latency = latency.clone();
            async move {
                tokio::time::sleep(latency(x)).await;
                let at = start.elapsed();
                if at >= from && at < to {
                    Err(Error::transient_msg("Down", "connection refused"))
                } else {
                    Ok(x)
                }
            }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_call_overtaken_by_successes_before_an_outage_is_held_not_faulted() {
        bounded(async {
            let start = Instant::now();
            let svc = target(
                start,
                Duration::from_millis(25),
                Duration::from_secs(5),
                |x| Duration::from_millis(if x == 1 { 300 } else { 10 }),
            );
            let (breaker, svc) = guarded(svc);
            let slow = tokio::spawn(svc.clone().oneshot(1));
            tokio::time::sleep(Duration::from_millis(1)).await;
            let fast: Vec<_> = (2..4)
                .map(|x| tokio::spawn(svc.clone().oneshot(x)))
                .collect();
            for f in fast {
                f.await.unwrap().unwrap();
            }
            // Calls 2 and 3 succeeded after call 1 was let through, but before the outage: that
            // proves nothing about the target when call 1 failed.
            assert_eq!(
                slow.await.unwrap().unwrap(),
                1,
                "held through the outage, then done"
            );
            assert!(start.elapsed() >= Duration::from_secs(5));
            assert!(breaker.opens() >= 1);
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_answered_with_an_outage_error_does_not_wedge_the_gate() {
        bounded(async {
            let start = Instant::now();
            let svc = service_fn(move |x: u32| async move {
                let at = start.elapsed();
                if at < Duration::from_secs(2) {
                    Err(Error::transient_msg("Timeout", "slow"))
                } else if at < Duration::from_secs(4) {
                    Err(Error::msg(
                        ErrorClass::Outage,
                        "Unavailable",
                        "down for maintenance",
                    ))
                } else {
                    Ok(x)
                }
            });
            let (breaker, svc) = guarded(svc);
            // Like the runtime: an outage error is retried after a pause, never faulted.
            let call = |x: u32| {
                let svc = svc.clone();
                tokio::spawn(async move {
                    loop {
                        match svc.clone().oneshot(x).await {
                            Ok(v) => return v,
                            Err(e) if e.class() == ErrorClass::Outage => {
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                })
            };
            let calls: Vec<_> = (0..4).map(call).collect();
            for (x, c) in calls.into_iter().enumerate() {
                let got = tokio::time::timeout(Duration::from_secs(120), c).await;
                assert_eq!(got.expect("no call hangs").unwrap(), x as u32);
            }
            assert_eq!(breaker.state(), BreakerState::Closed);
        })
        .await;
    }
}
