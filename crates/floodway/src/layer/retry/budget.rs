//! A retry budget: retries as a share of traffic, not a fixed count per call.

use std::sync::{Arc, Mutex};

use tokio::time::Instant;

/// Limits retries to a share of first attempts plus a small floor per second.
///
/// A fixed "retry 5 times" multiplies load by 6 when a target is failing, which turns a blip
/// into an outage. A budget lets a few calls retry freely and caps the whole stream's retries
/// at `ratio` of its calls (plus `min_per_sec`), whatever the per-call attempt limit says.
/// Clones share one budget.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    state: Arc<Mutex<BudgetState>>,
}

#[derive(Debug)]
struct BudgetState {
    ratio: f64,
    min_per_sec: f64,
    max_tokens: f64,
    tokens: f64,
    refilled_at: Instant,
}

impl Default for RetryBudget {
    /// Retries up to 20% of calls, plus 10 per second.
    fn default() -> Self {
        RetryBudget::new(0.2, 10.0)
    }
}

impl RetryBudget {
    /// Allows `ratio` retries per first attempt, plus `min_per_sec` retries per second.
    pub fn new(ratio: f64, min_per_sec: f64) -> Self {
        let max_tokens = (min_per_sec * 10.0).max(10.0);
        RetryBudget {
            state: Arc::new(Mutex::new(BudgetState {
                ratio: ratio.max(0.0),
                min_per_sec: min_per_sec.max(0.0),
                max_tokens,
                tokens: max_tokens,
                refilled_at: Instant::now(),
            })),
        }
    }

    fn refill(state: &mut BudgetState) {
        let now = Instant::now();
        let secs = now.duration_since(state.refilled_at).as_secs_f64();
        state.refilled_at = now;
        state.tokens = (state.tokens + secs * state.min_per_sec).min(state.max_tokens);
    }

    /// Records a first attempt.
    pub fn deposit(&self) {
        let mut state = self.state.lock().unwrap();
        state.tokens = (state.tokens + state.ratio).min(state.max_tokens);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&self) -> bool {
        let mut state = self.state.lock().unwrap();
        Self::refill(&mut state);
        if state.tokens >= 1.0 {
            state.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn caps_retries_then_refills() {
        let budget = RetryBudget::new(0.5, 1.0);
        let mut granted = 0;
        while budget.withdraw() {
            granted += 1;
        }
        assert_eq!(granted, 10, "starts full: ten seconds of the floor");
        budget.deposit();
        budget.deposit();
        assert!(budget.withdraw(), "two calls earn one retry at ratio 0.5");
        assert!(!budget.withdraw());
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(budget.withdraw() && budget.withdraw() && budget.withdraw());
        assert!(!budget.withdraw());
    }
}
