//! A deadline per call.

use std::future::Future as _;
use std::task::Poll;
use std::time::Duration;

pub use super::{Timeout, TimeoutLayer};
use crate::error::Error;
use crate::layer::{Call, Policy};

/// A deadline per call: the policy of [`TimeoutLayer`].
#[derive(Debug, Clone, Copy)]
pub struct Deadline(pub Duration);

impl From<Duration> for Deadline {
    fn from(timeout: Duration) -> Self {
        Deadline(timeout)
    }
}

impl Policy for Deadline {
    async fn run<T: Send, C: Call<T>>(&self, inner: &mut C) -> Result<T, Error> {
        let timeout = self.0;
        let mut call = std::pin::pin!(inner.call());
        // A call that is done at once (an in-process sink, a buffered write) needs no
        // deadline: it skips reading the clock and making a timer entry. (tokio registers
        // the entry only when it is polled, so the saving is small; it was measured only
        // together with another change, BENCHMARKS.md.)
        let first = std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await;
        if let Poll::Ready(result) = first {
            return result;
        }
        match tokio::time::timeout(timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(Error::timed_out(timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorClass;
    use tower::service_fn;
    use tower::Layer;
    use tower::ServiceExt;

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
