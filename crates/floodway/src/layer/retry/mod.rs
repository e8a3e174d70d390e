//! Retries of transient errors, with backoff, attempt and time bounds, and a budget.
//!
//! Only [`ErrorClass::Transient`] errors are retried: the
//! connector decides *whether* an error is worth retrying, this layer decides *when*.

mod backoff;
mod budget;

pub use backoff::Backoff;
pub use budget::RetryBudget;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

pub use super::{Retry, RetryLayer};
use crate::error::{Error, ErrorClass};
use crate::layer::{Call, Policy};

/// When to retry: attempts, elapsed time, backoff and budget.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    max_attempts: u32,
    max_elapsed: Duration,
    backoff: Backoff,
    budget: Option<RetryBudget>,
}

impl Default for RetryPolicy {
    /// 5 attempts within 30 s, [`Backoff::default`], [`RetryBudget::default`].
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            max_elapsed: Duration::from_secs(30),
            backoff: Backoff::default(),
            budget: Some(RetryBudget::default()),
        }
    }
}

impl RetryPolicy {
    /// At most `attempts` calls in all (1 means no retry).
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Gives up when the next retry would start later than this after the first attempt.
    #[must_use]
    pub fn max_elapsed(mut self, elapsed: Duration) -> Self {
        self.max_elapsed = elapsed;
        self
    }

    /// Sets the backoff.
    #[must_use]
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sets the budget; share one budget between the sinks that call the same target.
    #[must_use]
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Retries without a budget (attempts and time still bound them).
    #[must_use]
    pub fn without_budget(mut self) -> Self {
        self.budget = None;
        self
    }
}

/// A retry policy and the sink it names in metrics: the policy of [`RetryLayer`].
#[derive(Debug, Clone)]
pub struct Retrying {
    policy: Arc<RetryPolicy>,
    label: Arc<str>,
}

impl Retrying {
    /// Retries with `policy`; `label` names the sink in metrics.
    pub fn new(policy: RetryPolicy, label: impl Into<Arc<str>>) -> Self {
        Retrying {
            policy: Arc::new(policy),
            label: label.into(),
        }
    }
}

impl Policy for Retrying {
    async fn run<T: Send, C: Call<T>>(&self, inner: &mut C) -> Result<T, Error> {
        let (policy, label) = (&self.policy, &self.label);
        if let Some(budget) = &policy.budget {
            budget.deposit();
        }
        let started = Instant::now();
        let mut attempt = 1;
        // Whether an attempt delivered part of its batch: said with the error given up on,
        // though later attempts sent only what was left (the breaker reads it).
        let mut partial = false;
        loop {
            // The future owns its service: every attempt calls it, none clones it.
            let err = match inner.call().await {
                Ok(response) => return Ok(response),
                Err(err) => err,
            };
            partial |= err.is_partial();
            let err = if partial { err.delivered_part() } else { err };
            if err.class() != ErrorClass::Transient || attempt >= policy.max_attempts {
                return Err(err.with_attempts(attempt));
            }
            let delay = policy
                .backoff
                .delay(attempt - 1)
                .max(err.retry_after().unwrap_or_default());
            if started.elapsed().saturating_add(delay) > policy.max_elapsed
                || !policy.budget.as_ref().is_none_or(RetryBudget::withdraw)
            {
                return Err(err.with_attempts(attempt));
            }
            metrics::counter!("floodway_retries_total", "sink" => label.to_string()).increment(1);
            tracing::debug!(sink = %label, attempt, ?delay, error = %err, "retrying");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tower::service_fn;
    use tower::Layer;
    use tower::Service;
    use tower::ServiceExt;

    fn flaky(
        fail_first: u32,
        class: ErrorClass,
    ) -> (
        Arc<AtomicU32>,
        impl Service<u8, Response = u8, Error = Error, Future: Send> + Clone + Send,
    ) {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let svc = service_fn(move |x: u8| {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if n <= fail_first {
                    Err(Error::msg(class, "Flaky", format!("call {n}")))
                } else {
                    Ok(x)
                }
            }
        });
        (calls, svc)
    }

    #[tokio::test(start_paused = true)]
    async fn retries_transient_until_success() {
        let (calls, svc) = flaky(3, ErrorClass::Transient);
        let svc = RetryLayer::new(Retrying::new(RetryPolicy::default(), "t")).layer(svc);
        assert_eq!(svc.oneshot(7).await.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_max_attempts_and_says_how_many() {
        let (calls, svc) = flaky(100, ErrorClass::Transient);
        let policy = RetryPolicy::default().max_attempts(3);
        let err = RetryLayer::new(Retrying::new(policy, "t"))
            .layer(svc)
            .oneshot(1)
            .await
            .unwrap_err();
        assert_eq!(err.attempts(), 3);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn does_not_retry_poison() {
        let (calls, svc) = flaky(100, ErrorClass::Poison);
        let err = RetryLayer::new(Retrying::new(RetryPolicy::default(), "t"))
            .layer(svc)
            .oneshot(1)
            .await
            .unwrap_err();
        assert_eq!(err.class(), ErrorClass::Poison);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn stops_at_max_elapsed() {
        let (calls, svc) = flaky(100, ErrorClass::Transient);
        let policy = RetryPolicy::default()
            .max_attempts(1000)
            .without_budget()
            .backoff(Backoff::exponential(
                Duration::from_secs(1),
                Duration::from_secs(1),
            ))
            .max_elapsed(Duration::from_secs(10));
        let started = Instant::now();
        RetryLayer::new(Retrying::new(policy, "t"))
            .layer(svc)
            .oneshot(1)
            .await
            .unwrap_err();
        assert!(started.elapsed() <= Duration::from_secs(10));
        assert!(
            calls.load(Ordering::SeqCst) > 5,
            "jittered 0-1 s delays fit many tries"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn budget_caps_retries_across_calls() {
        let (calls, svc) = flaky(u32::MAX, ErrorClass::Transient);
        let policy = RetryPolicy::default().budget(RetryBudget::new(0.0, 1.0));
        let svc = RetryLayer::new(Retrying::new(policy, "t")).layer(svc);
        for _ in 0..10 {
            svc.clone().oneshot(1).await.unwrap_err();
        }
        // 10 first attempts; the budget starts with 10 retries and earns ~1/s meanwhile.
        let total = calls.load(Ordering::SeqCst);
        assert!((20..=32).contains(&total), "{total} calls");
    }

    #[tokio::test(start_paused = true)]
    async fn a_target_asking_for_a_wait_beyond_any_clock_is_given_up_on_not_a_panic() {
        // A second into the call, the target answers `Retry-After: 18446744073709551615`.
        let svc = service_fn(|_: u32| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Err::<u32, _>(
                Error::throttled_msg("HttpStatus", "429")
                    .with_retry_after(Duration::from_secs(u64::MAX)),
            )
        });
        let err = RetryLayer::new(Retrying::new(RetryPolicy::default(), "t"))
            .layer(svc)
            .oneshot(1)
            .await
            .unwrap_err();
        assert_eq!(err.attempts(), 1, "not waited for");
        assert_eq!(err.retry_after(), Some(crate::error::MAX_RETRY_AFTER));
    }
}
