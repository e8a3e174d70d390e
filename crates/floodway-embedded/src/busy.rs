//! Writes that find the hub's file (or, for a view's writes, the views file) locked by another
//! process try again.
//!
//! Every connection first waits inside SQLite for up to [`HubOptions::busy_timeout`]. A write
//! transaction that still finds the file locked (another process's long transaction: a large
//! `hub retain`, an atomic publish of a big file) is not a failure of the storage: it is tried
//! again from the start, after a pause that doubles from 50 ms to 2 s, with a warning each
//! time, until [`HubOptions::busy_retry`] has passed since the first try. Only then is it an
//! error (transient by its class).
//!
//! [`HubOptions::busy_timeout`]: crate::HubOptions::busy_timeout
//! [`HubOptions::busy_retry`]: crate::HubOptions::busy_retry

use std::time::{Duration, Instant};

use crate::error::HubError;

const FIRST_PAUSE: Duration = Duration::from_millis(50);
const LONGEST_PAUSE: Duration = Duration::from_secs(2);

/// Runs `write` (a whole transaction, which rolls back when it fails) until it does not find
/// the file busy, or `limit` has passed since the first try. Blocks the calling thread while it
/// pauses: call it where blocking is allowed.
pub(crate) fn retry<T>(
    what: &str,
    limit: Duration,
    mut write: impl FnMut() -> Result<T, HubError>,
) -> Result<T, HubError> {
    let started = Instant::now();
    let mut pause = FIRST_PAUSE;
    let mut tries = 1u32;
    loop {
        match write() {
            Err(err) if err.is_busy() && started.elapsed() + pause <= limit => {
                tracing::warn!(
                    write = what,
                    tries,
                    waited_ms = started.elapsed().as_millis() as u64,
                    "the hub's file (the views file, for a view's write) is locked by another \
                     process's write; trying again"
                );
                metrics::counter!("floodway_hub_busy_retries_total", "write" => what.to_owned())
                    .increment(1);
                std::thread::sleep(pause);
                pause = (pause * 2).min(LONGEST_PAUSE);
                tries += 1;
            }
            Err(err) if err.is_busy() => {
                tracing::error!(
                    write = what,
                    tries,
                    waited_ms = started.elapsed().as_millis() as u64,
                    "the hub's file (the views file, for a view's write) stayed locked by \
                     another process's write; giving up"
                );
                return Err(err);
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy() -> HubError {
        HubError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        ))
    }

    #[test]
    fn busy_is_tried_again_until_the_limit() {
        let mut calls = 0;
        let result = retry("test", Duration::from_secs(5), || {
            calls += 1;
            if calls < 3 {
                Err(busy())
            } else {
                Ok(calls)
            }
        });
        assert_eq!(result.unwrap(), 3);
        let started = Instant::now();
        let mut calls = 0;
        let result: Result<(), _> = retry("test", Duration::from_millis(120), || {
            calls += 1;
            Err(busy())
        });
        assert!(result.unwrap_err().is_busy());
        assert_eq!(calls, 2, "50 ms, then a 100 ms pause would pass the limit");
        assert!(started.elapsed() < Duration::from_millis(120));
        // Other errors are not tried again.
        let mut calls = 0;
        let result: Result<(), _> = retry("test", Duration::from_secs(5), || {
            calls += 1;
            Err(HubError::Invalid("no".into()))
        });
        assert!(result.is_err());
        assert_eq!(calls, 1);
    }
}
