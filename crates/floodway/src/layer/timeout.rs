//! A deadline per call.

use std::task::{Context, Poll};
use std::time::Duration;

use tower::{Layer, Service, ServiceExt};

use crate::error::Error;
use crate::layer::BoxFuture;

/// Applies [`Timeout`] to a service.
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    timeout: Duration,
}

impl TimeoutLayer {
    /// Fails calls that take longer than `timeout`.
    pub fn new(timeout: Duration) -> Self {
        TimeoutLayer { timeout }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            timeout: self.timeout,
        }
    }
}

/// Fails a call with a transient `Timeout` error when it takes too long.
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S, Req> Service<Req> for Timeout<S>
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
        let call = self.inner.clone().oneshot(req);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, call).await {
                Ok(result) => result,
                Err(_) => Err(Error::timed_out(timeout)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorClass;
    use tower::service_fn;

    #[tokio::test(start_paused = true)]
    async fn slow_calls_time_out_as_transient() {
        let svc = service_fn(|d: u64| async move {
            tokio::time::sleep(Duration::from_millis(d)).await;
            Ok::<_, Error>(d)
        });
        let svc = TimeoutLayer::new(Duration::from_millis(100)).layer(svc);
        assert_eq!(svc.clone().oneshot(50).await.unwrap(), 50);
        let err = svc.oneshot(150).await.unwrap_err();
        assert_eq!(
            (err.name(), err.class()),
            ("Timeout", ErrorClass::Transient)
        );
    }
}
