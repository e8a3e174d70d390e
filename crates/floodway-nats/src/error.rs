//! Errors of the JetStream hub, and how the core classifies them.

use floodway::Error;

/// A failure of the NATS hub.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsError {
    /// The settings cannot work (a bad name, a stream that does not match them).
    #[error("{0}")]
    Config(String),
    /// The server could not be reached.
    #[error("cannot connect to NATS at {servers}: {message}")]
    Connect {
        /// The servers tried.
        servers: String,
        /// Why.
        message: String,
    },
    /// An event larger than the stream takes: the server's `max_payload`, or the stream's own
    /// `max_msg_size`, with room for the headers.
    #[error("event {id} is {size} bytes, more than the stream takes{}: raise the server's max_payload or the stream's max_msg_size, or keep large data elsewhere (a claim check)", max.map(|m| format!(" ({m})")).unwrap_or_default())]
    TooLarge {
        /// The event.
        id: String,
        /// Its size.
        size: usize,
        /// The limit, when known (the server may refuse by a limit set since the hub
        /// connected).
        max: Option<usize>,
    },
    /// Every acknowledgement the connection lets wait is taken (by this publisher's other
    /// calls, or by acks of messages sent before the connection broke, held until they time
    /// out): the connection is busy, as a throttled target is.
    #[error("JetStream publish: the connection's publish acknowledgements are all taken; try again later")]
    Busy,
    /// A JetStream request (stream, consumer, publish, ack) failed; worth trying again.
    #[error("JetStream {action}: {message}")]
    JetStream {
        /// What was being done.
        action: &'static str,
        /// Why.
        message: String,
    },
}

impl NatsError {
    pub(crate) fn js(action: &'static str, error: impl std::fmt::Display) -> NatsError {
        NatsError::JetStream {
            action,
            message: error.to_string(),
        }
    }
}

impl From<NatsError> for Error {
    fn from(error: NatsError) -> Error {
        match error {
            NatsError::Config(_) => Error::fatal(error),
            NatsError::TooLarge { .. } => Error::poison(error),
            NatsError::Busy => Error::throttled(error),
            NatsError::Connect { .. } | NatsError::JetStream { .. } => Error::transient(error),
        }
    }
}
