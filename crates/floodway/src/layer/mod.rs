//! Resilience as tower layers: retry, timeout, rate limit, adaptive concurrency, and the stream
//! circuit breaker.
//!
//! Each layer works with any `tower::Service` whose error is [`crate::Error`], so they wrap
//! Floodway sinks and any client you call from a step. [`Resilience`] stacks them in the order
//! that makes their guarantees hold:
//!
//! ```text
//! Breaker            judges calls whose retries are spent: poison or outage?
//!   Retry            retries transient errors with backoff, bounded by attempts, time, budget
//!     ConcurrencyLimit   calls in flight, fixed or adaptive (AIMD on latency and throttles)
//!       RateLimit        GCRA; innermost, so the calls that reach the target never exceed it
//!         Timeout        each attempt's deadline
//!           sink
//! ```
//!
//! Every layer is always ready and waits inside the call's future instead of in
//! `poll_ready`: the stack is shared by concurrent calls, and the pipeline's parallelism and the
//! processor's in-flight limit bound how many calls can wait. A waiting call holds its unit of
//! work, so a slow or closed gate slows the source down (backpressure) rather than growing a
//! queue.

pub mod breaker;
pub mod limit;
pub mod retry;
pub mod timeout;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tower::util::BoxCloneSyncService;
use tower::{Layer, Service};

use crate::error::Error;
use breaker::{BreakerConfig, CircuitBreaker};
use limit::concurrency::ConcurrencyLimiter;
use limit::rate::RateLimiter;
use retry::RetryPolicy;

/// The future type of Floodway's layers.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'static>>;

/// What a layer does around the calls of what it wraps: wait for a slot, bound the time,
/// retry, hold during an outage.
///
/// A policy makes the calls of `inner` it decides on (one, or more when it retries or probes),
/// each awaited before the next; the inner calls are the next policy's, down to the service.
/// A pipeline's stack ([`Resilience`]) nests the policies in one future per call, with
/// nothing cloned or boxed between them; [`PolicyLayer`] applies one policy to any `tower`
/// service ([`Guarded`]).
pub trait Policy: Clone + Send + Sync + 'static {
    /// Makes `inner`'s calls under this policy; its answer is the call's.
    fn run<T: Send, C: Call<T>>(
        &self,
        inner: &mut C,
    ) -> impl Future<Output = Result<T, Error>> + Send;
}

/// The calls a [`Policy`] makes: each makes one attempt at the request below it.
pub trait Call<T>: Send {
    /// One attempt.
    fn call(&mut self) -> impl Future<Output = Result<T, Error>> + Send;
}

/// The policy `policy` (none: the calls go straight through) around `inner`'s calls.
struct Nested<'p, P, C> {
    policy: Option<&'p P>,
    inner: C,
}

impl<'p, P, C> Nested<'p, P, C> {
    fn new(policy: &'p Option<P>, inner: C) -> Self {
        Nested {
            policy: policy.as_ref(),
            inner,
        }
    }
}

impl<T: Send, P: Policy, C: Call<T>> Call<T> for Nested<'_, P, C> {
    async fn call(&mut self) -> Result<T, Error> {
        match self.policy {
            Some(policy) => policy.run(&mut self.inner).await,
            None => self.inner.call().await,
        }
    }
}

/// The service at the bottom of a stack, called with a clone of the request each attempt.
struct Bottom<S, R> {
    service: S,
    req: R,
}

impl<S: Wrappable<R>, R: Request> Call<S::Response> for Bottom<S, R> {
    async fn call(&mut self) -> Result<S::Response, Error> {
        call(&mut self.service, self.req.clone()).await
    }
}

/// What a layer can pass to its service: cloned for each attempt, moved between tasks.
pub trait Request: Clone + Send + 'static {}

impl<T: Clone + Send + 'static> Request for T {}

/// What a layer can wrap: a cloneable service failing with [`crate::Error`] whose calls can
/// move to another task.
pub trait Wrappable<Req>:
    Service<Req, Error = Error, Future: Send, Response: Send + 'static> + Clone + Send + 'static
{
}

impl<T, Req> Wrappable<Req> for T where
    T: Service<Req, Error = Error, Future: Send, Response: Send + 'static> + Clone + Send + 'static
{
}

/// One call of a service: it waits until the service is ready, then calls it.
async fn call<S: Service<R, Error = Error>, R>(
    inner: &mut S,
    req: R,
) -> Result<S::Response, Error> {
    use tower::ServiceExt;
    inner.ready().await?.call(req).await
}

/// Applies a [`Policy`] to a service.
#[derive(Debug, Clone)]
pub struct PolicyLayer<P> {
    policy: P,
}

impl<P: Policy> PolicyLayer<P> {
    /// A layer applying `policy`: `TimeoutLayer::new(Duration::from_secs(5))`,
    /// `RateLimitLayer::new(limiter.clone())`, ...
    pub fn new(policy: impl Into<P>) -> Self {
        PolicyLayer {
            policy: policy.into(),
        }
    }
}

/// Applies [`Breaker`] with a shared [`CircuitBreaker`].
pub type BreakerLayer = PolicyLayer<CircuitBreaker>;

/// Holds calls during an outage instead of failing them; see the [breaker docs](breaker).
///
/// Place it outside the retry layer: it judges calls whose retries are spent.
pub type Breaker<S> = Guarded<S, CircuitBreaker>;

/// Applies [`ConcurrencyLimit`] with a shared [`ConcurrencyLimiter`].
pub type ConcurrencyLimitLayer = PolicyLayer<ConcurrencyLimiter>;

/// Holds calls until the limiter has a slot; reports each call's outcome to it.
pub type ConcurrencyLimit<S> = Guarded<S, ConcurrencyLimiter>;

/// Applies [`RateLimit`] with a shared [`RateLimiter`]; give clones of one limiter to several
/// layers to share it.
pub type RateLimitLayer = PolicyLayer<RateLimiter>;

/// Delays calls so that they never exceed the limiter's rate.
pub type RateLimit<S> = Guarded<S, RateLimiter>;

/// Applies [`Timeout`] to a service (from a `Duration`).
pub type TimeoutLayer = PolicyLayer<timeout::Deadline>;

/// Fails a call with a transient `Timeout` error when it takes too long.
pub type Timeout<S> = Guarded<S, timeout::Deadline>;

/// Applies [`Retry`] to a service (from [`retry::Retrying`]).
pub type RetryLayer = PolicyLayer<retry::Retrying>;

/// Retries transient errors of the inner service, per [`RetryPolicy`].
///
/// The error finally returned records how many attempts were made.
pub type Retry<S> = Guarded<S, retry::Retrying>;

impl<S, P: Clone> Layer<S> for PolicyLayer<P> {
    type Service = Guarded<S, P>;
    fn layer(&self, inner: S) -> Guarded<S, P> {
        Guarded {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// A service called under a [`Policy`].
#[derive(Debug, Clone)]
pub struct Guarded<S, P> {
    inner: S,
    policy: P,
}

impl<S, P, Req> Service<Req> for Guarded<S, P>
where
    P: Policy,
    S: Wrappable<Req>,
    Req: Request,
{
    type Response = S::Response;
    type Error = Error;
    type Future = BoxFuture<S::Response>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let policy = self.policy.clone();
        let service = self.inner.clone();
        Box::pin(async move { policy.run(&mut Bottom { service, req }).await })
    }
}

/// The resilience stack around one sink, in the order of the [module docs](self).
///
/// The default has retries ([`RetryPolicy::default`]), a 30 s timeout and a breaker, and no
/// rate or concurrency limit beyond the pipeline's parallelism.
///
/// ```
/// use std::time::Duration;
/// use floodway::layer::{Resilience, limit::rate::RateLimiter};
///
/// let shared = RateLimiter::per_second(50).unwrap();
/// let resilience = Resilience::default()
///     .timeout(Duration::from_secs(5))
///     .rate_limit(shared.clone())
///     .adaptive_concurrency(Default::default());
/// ```
#[derive(Debug, Clone)]
pub struct Resilience {
    retry: Option<RetryPolicy>,
    timeout: Option<Duration>,
    rate: Option<RateLimiter>,
    concurrency: Option<Concurrency>,
    breaker: Option<BreakerChoice>,
}

#[derive(Debug, Clone)]
enum Concurrency {
    Shared(ConcurrencyLimiter),
    Adaptive(limit::concurrency::Aimd),
}

#[derive(Debug, Clone)]
enum BreakerChoice {
    Shared(CircuitBreaker),
    New(BreakerConfig),
}

impl Default for Resilience {
    fn default() -> Self {
        Resilience {
            retry: Some(RetryPolicy::default()),
            timeout: Some(Duration::from_secs(30)),
            rate: None,
            concurrency: None,
            breaker: Some(BreakerChoice::New(BreakerConfig::default())),
        }
    }
}

impl Resilience {
    /// No layers at all: errors reach the pipeline as the sink returns them.
    pub fn none() -> Self {
        Resilience {
            retry: None,
            timeout: None,
            rate: None,
            concurrency: None,
            breaker: None,
        }
    }

    /// Sets the retry policy.
    #[must_use]
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// No retries.
    #[must_use]
    pub fn no_retry(mut self) -> Self {
        self.retry = None;
        self
    }

    /// Sets each attempt's deadline.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// No deadline.
    #[must_use]
    pub fn no_timeout(mut self) -> Self {
        self.timeout = None;
        self
    }

    /// Limits the rate of calls; pass clones of one limiter to share it between sinks.
    #[must_use]
    pub fn rate_limit(mut self, limiter: RateLimiter) -> Self {
        self.rate = Some(limiter);
        self
    }

    /// Limits concurrent calls with a given (fixed or adaptive, possibly shared) limiter.
    #[must_use]
    pub fn concurrency(mut self, limiter: ConcurrencyLimiter) -> Self {
        self.concurrency = Some(Concurrency::Shared(limiter));
        self
    }

    /// Limits concurrent calls with a new adaptive limiter for this sink.
    #[must_use]
    pub fn adaptive_concurrency(mut self, aimd: limit::concurrency::Aimd) -> Self {
        self.concurrency = Some(Concurrency::Adaptive(aimd));
        self
    }

    /// Sets the breaker's settings (a new breaker for this sink).
    #[must_use]
    pub fn breaker(mut self, config: BreakerConfig) -> Self {
        self.breaker = Some(BreakerChoice::New(config));
        self
    }

    /// Uses a given breaker, e.g. one shared by every pipeline that calls the same target.
    #[must_use]
    pub fn shared_breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.breaker = Some(BreakerChoice::Shared(breaker));
        self
    }

    /// No breaker: a call whose retries are spent is faulted even during an outage.
    #[must_use]
    pub fn no_breaker(mut self) -> Self {
        self.breaker = None;
        self
    }

    /// Wraps `service` in the stack; `label` names it in metrics and logs.
    ///
    /// # Errors
    /// When an adaptive concurrency setting is inconsistent.
    pub fn apply<S, Req, Resp>(
        &self,
        label: &str,
        service: S,
    ) -> Result<BoxCloneSyncService<Req, Resp, Error>, crate::error::BuildError>
    where
        S: Service<Req, Response = Resp, Error = Error> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        Req: Clone + Send + 'static,
        Resp: Send + 'static,
    {
        Ok(BoxCloneSyncService::new(self.stack(label, service)?))
    }

    /// The stack around `service`, as one service whose clones share it.
    pub(crate) fn stack<S>(
        &self,
        label: &str,
        service: S,
    ) -> Result<Resilient<S>, crate::error::BuildError> {
        let concurrency = match &self.concurrency {
            None => None,
            Some(Concurrency::Shared(limiter)) => Some(limiter.clone()),
            Some(Concurrency::Adaptive(aimd)) => Some(ConcurrencyLimiter::adaptive(*aimd, label)?),
        };
        Ok(Resilient {
            stack: std::sync::Arc::new(Stack {
                breaker: self.breaker.as_ref().map(|b| match b {
                    BreakerChoice::Shared(b) => b.clone(),
                    BreakerChoice::New(config) => CircuitBreaker::new(*config, label),
                }),
                retry: self.retry.clone().map(|p| retry::Retrying::new(p, label)),
                concurrency,
                rate: self.rate.clone(),
                timeout: self.timeout.map(timeout::Deadline),
                service,
            }),
        })
    }
}

/// A service under a [`Resilience`] stack. The policies and the service are shared by every
/// clone; a call is one future that runs the policies nested, in the order of the
/// [module docs](self), cloning the service once.
pub(crate) struct Resilient<S> {
    stack: std::sync::Arc<Stack<S>>,
}

struct Stack<S> {
    breaker: Option<CircuitBreaker>,
    retry: Option<retry::Retrying>,
    concurrency: Option<ConcurrencyLimiter>,
    rate: Option<RateLimiter>,
    timeout: Option<timeout::Deadline>,
    service: S,
}

impl<S> Clone for Resilient<S> {
    fn clone(&self) -> Self {
        Resilient {
            stack: self.stack.clone(),
        }
    }
}

impl<S> Resilient<S> {
    /// Calls the stack: `Service::call` without the `&mut`.
    pub(crate) fn call_shared<Req>(&self, req: Req) -> BoxFuture<S::Response>
    where
        S: Wrappable<Req> + Sync,
        Req: Request,
    {
        let stack = self.stack.clone();
        Box::pin(async move {
            let s = &*stack;
            let call = Bottom {
                service: s.service.clone(),
                req,
            };
            let call = Nested::new(&s.timeout, call);
            let call = Nested::new(&s.rate, call);
            let call = Nested::new(&s.concurrency, call);
            let call = Nested::new(&s.retry, call);
            Nested::new(&s.breaker, call).call().await
        })
    }
}

impl<S, Req> Service<Req> for Resilient<S>
where
    S: Wrappable<Req> + Sync,
    Req: Request,
{
    type Response = S::Response;
    type Error = Error;
    type Future = BoxFuture<S::Response>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.call_shared(req)
    }
}
