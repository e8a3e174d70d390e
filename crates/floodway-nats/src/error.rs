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
            NatsError::Connect { .. } | NatsError::JetStream { .. } => Error::transient(error),
        }
    }
}
