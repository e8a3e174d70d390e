//! The stream circuit breaker: tells an outage from a poison event.
//!
//! A call that has exhausted its retries is either poison (the target is fine, this request is
//! not) or a victim of an outage (the target is down for everybody). The breaker decides with
//! one observation: **after this call failed, did a call that started later succeed?** (When
//! no call has started since, as at the end of a bounded stream: did any call that started
//! after this one succeed?)
//!
//! A call that fails is first *held*, never faulted, and tried again (with its retries) as
//! soon as the breaker lets it. When it fails again:
//!
//! - if a call that started after its first failure has succeeded meanwhile, the target is
//!   healthy and this request is the problem: the error goes back to the pipeline, which faults
//!   the unit of work and flows on;
//! - if not, this looks like an outage: the breaker opens, new calls wait at the gate (so the
//!   pipeline stops pulling new work, through backpressure), and after an open period that
//!   grows from [`BreakerConfig::open_base`] to [`BreakerConfig::open_max`] one probe goes
//!   through. A new call is preferred as the probe, so that a held call that fails for reasons
//!   of its own is found out as soon as anything else succeeds. A successful probe closes the
//!   breaker and every held call is tried again.
//!
//! Only calls that *started* after the failure count as evidence: calls queued ahead of it
//! (behind a rate limit, say) may have reached the target before the outage began and succeed
//! after it, which proves nothing about the target now.
//!
//! During an outage nothing is faulted and nothing is skipped; when the target recovers the
//! stream resumes by itself.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use crate::error::{Error, ErrorClass};
use crate::layer::BoxFuture;

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
    /// Calls started so far: each call's number orders it against failures.
    started: AtomicU64,
    /// The highest number of a call that succeeded (0: none yet).
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
    }
}

/// Gives the probe slot back if a probe is dropped before it finished.
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
                }),
                notify: Notify::new(),
                started: AtomicU64::new(0),
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

    async fn admit(&self, held: bool) -> Admission {
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

    fn on_success(&self, admission: Admission, call: u64) {
        self.succeeded.fetch_max(call, Ordering::SeqCst);
        if admission == Admission::Normal && self.closed.load(Ordering::Acquire) {
            return;
        }
        let mut inner = self.state.lock().unwrap();
        if admission == Admission::Probe || inner.mode != BreakerState::Closed {
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

    /// Whether a call started after `call`'s first failure (numbered `failed_at`) succeeded;
    /// when no call has started since (the failing call is alone, at the end of a stream), a
    /// success of any call started after `call` itself.
    fn healthy_since(&self, call: u64, failed_at: u64) -> bool {
        let succeeded = self.succeeded.load(Ordering::SeqCst);
        if self.started.load(Ordering::SeqCst) > failed_at {
            succeeded > failed_at
        } else {
            succeeded > call
        }
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

/// Applies [`Breaker`] with a shared [`CircuitBreaker`].
#[derive(Debug, Clone)]
pub struct BreakerLayer {
    breaker: CircuitBreaker,
}

impl BreakerLayer {
    /// Guards calls with `breaker`.
    pub fn new(breaker: CircuitBreaker) -> Self {
        BreakerLayer { breaker }
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = Breaker<S>;
    fn layer(&self, inner: S) -> Breaker<S> {
        Breaker {
            inner,
            breaker: self.breaker.clone(),
        }
    }
}

/// Holds calls during an outage instead of failing them; see the [module docs](self).
///
/// Place it outside the retry layer: it judges calls whose retries are spent.
#[derive(Debug, Clone)]
pub struct Breaker<S> {
    inner: S,
    breaker: CircuitBreaker,
}

impl<S, Req> Service<Req> for Breaker<S>
where
    S: Service<Req, Error = Error> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send + 'static,
    Req: Clone + Send + 'static,
{
    type Response = S::Response;
    type Error = Error;
    type Future = BoxFuture<S::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let inner = self.inner.clone();
        let shared = self.breaker.shared.clone();
        Box::pin(async move {
            let call = shared.started.fetch_add(1, Ordering::SeqCst) + 1;
            // The number of the last call started when this one first failed.
            let mut failed_at: Option<u64> = None;
            loop {
                let held = failed_at.is_some();
                let admission = shared.admit(held).await;
                let mut guard = ProbeGuard {
                    shared: &shared,
                    armed: admission == Admission::Probe,
                };
                let result = inner.clone().oneshot(req.clone()).await;
                guard.armed = false;
                match result {
                    Ok(response) => {
                        shared.on_success(admission, call);
                        return Ok(response);
                    }
                    // A poison answer still proves the target is up.
                    Err(err) if err.class() == ErrorClass::Poison => {
                        shared.on_success(admission, call);
                        return Err(err);
                    }
                    Err(err) if err.class() != ErrorClass::Transient => return Err(err),
                    Err(err) => match failed_at {
                        Some(at) if shared.healthy_since(call, at) => {
                            // Later calls get through: this call is the problem, not the target.
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
                            failed_at = Some(shared.started.load(Ordering::SeqCst));
                            if admission == Admission::Probe {
                                shared.on_outage_suspected(admission);
                            }
                        }
                    },
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::service_fn;

    #[tokio::test(start_paused = true)]
    async fn holds_during_outage_and_resumes() {
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
        let breaker = CircuitBreaker::new(BreakerConfig::default(), "t");
        let svc = BreakerLayer::new(breaker.clone()).layer(svc);
        let call = tokio::spawn(svc.clone().oneshot(1));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!call.is_finished(), "held, not failed");
        assert!(matches!(breaker.state(), BreakerState::Open { .. }));
        assert!(breaker.opens() >= 4, "probes back off: {}", breaker.opens());
        up.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert_eq!(call.await.unwrap().unwrap(), 1);
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_failing_while_others_succeed_is_returned() {
        let svc = service_fn(|x: u32| async move {
            if x == 13 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                Err(Error::transient_msg("Timeout", "always"))
            } else {
                Ok(x)
            }
        });
        let breaker = CircuitBreaker::new(BreakerConfig::default(), "t");
        let svc = BreakerLayer::new(breaker.clone()).layer(svc);
        let bad = tokio::spawn(svc.clone().oneshot(13));
        // The bad call is held, the breaker opens; a new call probes and succeeds, which
        // proves the target healthy: the held call then fails for good on its next try.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let good = tokio::spawn(svc.clone().oneshot(1));
        assert_eq!(good.await.unwrap().unwrap(), 1);
        let err = bad.await.unwrap().unwrap_err();
        assert_eq!(err.class(), ErrorClass::Transient);
        assert_eq!(breaker.state(), BreakerState::Closed);
    }
}
