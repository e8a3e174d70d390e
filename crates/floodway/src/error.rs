//! Errors and their classes.
//!
//! Every error a step or a sink can meet carries an [`ErrorClass`]; the runtime decides what to
//! do from the class alone, never by matching strings. Connectors know their own failures (a
//! throttle, a timeout and a 5xx are transient; a 4xx is poison) and say so when they build an
//! [`Error`]; the framework owns *when* to retry (see [`crate::layer::retry`]).

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

/// The longest delay an error can ask for ([`Error::with_retry_after`]).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// A boxed error from user code or a client library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A store's failure as an [`Error`]: one of its own keeps its class (a DynamoDB validation
/// error is poison, not something to retry); any other is transient, named `name`.
pub(crate) fn keeping_class(error: BoxError, name: &'static str) -> Error {
    match error.downcast::<Error>() {
        Ok(e) => *e,
        Err(e) => Error::transient_msg(name, e.to_string()),
    }
}

/// What kind of failure an error is, which decides what happens to the unit of work.
///
/// See `DESIGN.md` section 3: the distinction between [`Poison`](ErrorClass::Poison) and
/// [`Outage`](ErrorClass::Outage) is the point of the failure design.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorClass {
    /// Worth retrying in place: throttled, timed out, connection refused, 5xx.
    Transient,
    /// This unit of work cannot succeed: it becomes a fault event and the stream flows on.
    Poison,
    /// The target is down: hold the work, fault nothing, resume when it recovers.
    Outage,
    /// Stop the processor without advancing its checkpoint.
    Fatal,
}

impl ErrorClass {
    /// The class as a lowercase word, as it appears in fault events and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Poison => "poison",
            ErrorClass::Outage => "outage",
            ErrorClass::Fatal => "fatal",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error raised by a step or a sink, with its class.
///
/// Build one with the constructor named after its class; the error's name (shown in fault
/// events) is the short type name of the cause unless set with [`Error::named`].
///
/// ```
/// use floodway::{Error, ErrorClass};
///
/// let err = Error::throttled_msg("HttpStatus", "429 Too Many Requests");
/// assert_eq!(err.class(), ErrorClass::Transient);
/// assert!(err.is_throttle());
/// ```
///
/// An `Error` is one pointer wide, so `Result`s on hot paths stay small.
#[derive(Debug)]
pub struct Error(Box<Inner>);

#[derive(Debug)]
struct Inner {
    class: ErrorClass,
    throttle: bool,
    timeout: bool,
    name: Cow<'static, str>,
    message: String,
    retry_after: Option<Duration>,
    attempts: u32,
    /// The call that failed delivered part of its batch: the target is up.
    partial: bool,
    source: Option<BoxError>,
}

fn short_type_name<E>() -> &'static str {
    let full = std::any::type_name::<E>();
    let base = full.split('<').next().unwrap_or(full);
    base.rsplit("::").next().unwrap_or(base)
}

impl Error {
    /// An error of `class` from a cause.
    pub fn new<E>(class: ErrorClass, cause: E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        Error(Box::new(Inner {
            class,
            throttle: false,
            timeout: false,
            name: Cow::Borrowed(short_type_name::<E>()),
            message: cause.to_string(),
            retry_after: None,
            attempts: 1,
            partial: false,
            source: Some(Box::new(cause)),
        }))
    }

    /// An error of `class` with a name and a message and no cause.
    pub fn msg(
        class: ErrorClass,
        name: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Error(Box::new(Inner {
            class,
            throttle: false,
            timeout: false,
            name: name.into(),
            message: message.into(),
            retry_after: None,
            attempts: 1,
            partial: false,
            source: None,
        }))
    }

    /// A transient error: retried in place.
    pub fn transient<E: std::error::Error + Send + Sync + 'static>(cause: E) -> Self {
        Self::new(ErrorClass::Transient, cause)
    }

    /// A poison error: the unit of work becomes a fault event.
    pub fn poison<E: std::error::Error + Send + Sync + 'static>(cause: E) -> Self {
        Self::new(ErrorClass::Poison, cause)
    }

    /// A fatal error: the processor stops without advancing its checkpoint.
    pub fn fatal<E: std::error::Error + Send + Sync + 'static>(cause: E) -> Self {
        Self::new(ErrorClass::Fatal, cause)
    }

    /// A transient error that says the target is throttling: retried, and a signal for
    /// adaptive concurrency to back off.
    pub fn throttled<E: std::error::Error + Send + Sync + 'static>(cause: E) -> Self {
        let mut err = Self::new(ErrorClass::Transient, cause);
        err.0.throttle = true;
        err
    }

    /// A poison error with a name and a message.
    pub fn poison_msg(name: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self::msg(ErrorClass::Poison, name, message)
    }

    /// A transient error with a name and a message.
    pub fn transient_msg(name: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self::msg(ErrorClass::Transient, name, message)
    }

    /// A throttle (transient) with a name and a message.
    pub fn throttled_msg(name: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        let mut err = Self::msg(ErrorClass::Transient, name, message);
        err.0.throttle = true;
        err
    }

    /// A transient error saying that a call got no answer within `after`: retried, and (as a
    /// throttle is) a sign of overload for adaptive concurrency. Named `Timeout`.
    pub fn timed_out(after: Duration) -> Self {
        let mut err = Self::msg(
            ErrorClass::Transient,
            "Timeout",
            format!("no answer within {after:?}"),
        );
        err.0.timeout = true;
        err
    }

    /// A fatal error with a name and a message.
    pub fn fatal_msg(name: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self::msg(ErrorClass::Fatal, name, message)
    }

    /// Renames the error (the `err.name` of a fault event).
    #[must_use]
    pub fn named(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.0.name = name.into();
        self
    }

    /// Sets the delay the target asked for before the next attempt (e.g. `Retry-After`), at
    /// most an hour: a target asking for more is taken at its word for an hour (the retry's
    /// time bound gives up on it sooner), and a number meant to mean "never" does not
    /// overflow the arithmetic of the waits.
    #[must_use]
    pub fn with_retry_after(mut self, delay: Duration) -> Self {
        self.0.retry_after = Some(delay.min(MAX_RETRY_AFTER));
        self
    }

    /// Marks the error as a timeout ([`Error::is_timeout`]): no answer came in time, as a
    /// gateway answering 504 says of the service behind it. Adaptive concurrency reads it
    /// as overload.
    #[must_use]
    pub fn with_timeout(mut self) -> Self {
        self.0.timeout = true;
        self
    }

    /// Changes the class.
    #[must_use]
    pub fn with_class(mut self, class: ErrorClass) -> Self {
        self.0.class = class;
        self
    }

    /// An error like this one (class, name, throttle, timeout, delay asked for) with another
    /// message and no cause.
    pub(crate) fn echo(&self, message: String) -> Self {
        Error(Box::new(Inner {
            class: self.0.class,
            throttle: self.0.throttle,
            timeout: self.0.timeout,
            name: self.0.name.clone(),
            message,
            retry_after: self.0.retry_after,
            attempts: self.0.attempts,
            partial: self.0.partial,
            source: None,
        }))
    }

    /// The same error without its cause (whose text the message keeps): for reporting one
    /// failure against several entries.
    #[must_use]
    pub fn copied(&self) -> Self {
        self.echo(self.0.message.clone())
    }

    /// The poison error of a caught panic (from `catch_unwind`, or a task's `JoinError`),
    /// named `Panic`, with the panic's message: user code that panics on an event cannot
    /// succeed with it.
    pub fn panicked(payload: &(dyn std::any::Any + Send)) -> Self {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic with a non-string payload".to_owned());
        Error::poison_msg("Panic", message)
    }

    /// Marks the error of a call that delivered part of its batch: proof the target is up,
    /// whatever happened to the rest.
    pub(crate) fn delivered_part(mut self) -> Self {
        self.0.partial = true;
        self
    }

    /// Whether the call that failed delivered part of its batch.
    pub(crate) fn is_partial(&self) -> bool {
        self.0.partial
    }

    pub(crate) fn with_attempts(mut self, attempts: u32) -> Self {
        self.0.attempts = attempts;
        self
    }

    /// The class that decides what happens next.
    pub fn class(&self) -> ErrorClass {
        self.0.class
    }

    /// Whether the target signalled overload (HTTP 429, a throttling exception).
    pub fn is_throttle(&self) -> bool {
        self.0.throttle
    }

    /// Whether the call got no answer in time ([`Error::timed_out`]): a sign of overload.
    pub fn is_timeout(&self) -> bool {
        self.0.timeout
    }

    /// The error's name, e.g. `Timeout` or `DecodeEventError`.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// The delay the target asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        self.0.retry_after
    }

    /// How many attempts were made before this error was given up on.
    pub fn attempts(&self) -> u32 {
        self.0.attempts
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.0.name, self.0.class, self.0.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Classifies the error of any `Result` in one call: `client.get(..).await.transient()?`.
pub trait ResultExt<T> {
    /// Maps the error to a [transient](ErrorClass::Transient) [`Error`].
    ///
    /// # Errors
    /// Returns the classified error when `self` is `Err`.
    fn transient(self) -> Result<T, Error>;
    /// Maps the error to a [poison](ErrorClass::Poison) [`Error`].
    ///
    /// # Errors
    /// Returns the classified error when `self` is `Err`.
    fn poison(self) -> Result<T, Error>;
    /// Maps the error to a [fatal](ErrorClass::Fatal) [`Error`].
    ///
    /// # Errors
    /// Returns the classified error when `self` is `Err`.
    fn fatal(self) -> Result<T, Error>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> ResultExt<T> for Result<T, E> {
    fn transient(self) -> Result<T, Error> {
        self.map_err(Error::transient)
    }
    fn poison(self) -> Result<T, Error> {
        self.map_err(Error::poison)
    }
    fn fatal(self) -> Result<T, Error> {
        self.map_err(Error::fatal)
    }
}

/// Why bytes could not be decoded into an [`Event`](crate::Event): always a poison event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeEventError {
    /// The record is larger than the configured limit.
    #[error("event is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// Size of the record in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The record is not valid UTF-8.
    #[error("event is not valid UTF-8 (valid up to byte {valid_up_to})")]
    NotUtf8 {
        /// Length of the valid prefix.
        valid_up_to: usize,
    },
    /// The record is not well-formed JSON.
    #[error("event is not valid JSON at line {line} column {column}: {message}")]
    NotJson {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// What the parser found.
        message: String,
    },
    /// The record is JSON but not an object.
    #[error("event is JSON but not an object")]
    NotObject,
    /// A required envelope field is absent.
    #[error("event lacks the required field `{field}`")]
    MissingField {
        /// The missing field.
        field: &'static str,
    },
    /// An envelope field has the wrong type or an invalid value.
    #[error("event field `{field}` must be {expected}, found {found}")]
    InvalidField {
        /// The offending field.
        field: &'static str,
        /// What the field must be.
        expected: &'static str,
        /// What was found instead (truncated).
        found: String,
    },
}

impl From<DecodeEventError> for Error {
    fn from(err: DecodeEventError) -> Self {
        Error::poison(err)
    }
}

/// A source failed to deliver records.
#[derive(Debug, thiserror::Error)]
#[error("source `{source_name}` failed: {cause}")]
pub struct SourceError {
    /// The source that failed.
    pub source_name: String,
    /// The underlying error.
    #[source]
    pub cause: BoxError,
}

/// A checkpointer failed to commit a position.
#[derive(Debug, thiserror::Error)]
#[error("committing checkpoint failed: {cause}")]
pub struct CommitError {
    /// The underlying error.
    #[source]
    pub cause: BoxError,
}

/// Why a processor stopped before its source ended or it was asked to stop.
///
/// Every variant leaves the checkpoint below the record that could not be finished, so a
/// restart resumes without losing anything.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The fault sink could not store a fault: the poison record cannot be let go.
    #[error("fault sink failed to publish fault {fault_id} (pipeline `{pipeline}`): {cause}")]
    FaultSink {
        /// Id of the fault that could not be published.
        fault_id: String,
        /// The pipeline that raised it.
        pipeline: String,
        /// The fault sink's error.
        #[source]
        cause: Error,
    },
    /// A step or sink raised a fatal error.
    #[error("fatal error in pipeline `{pipeline}` step `{step}`: {cause}")]
    Fatal {
        /// The pipeline.
        pipeline: String,
        /// The step.
        step: String,
        /// The error.
        #[source]
        cause: Error,
    },
    /// The source failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The checkpointer failed.
    #[error(transparent)]
    Commit(#[from] CommitError),
}

/// A pipeline or processor was configured inconsistently.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// Two pipelines share a name.
    #[error("two pipelines are named `{0}`: pipeline names must be unique in a processor")]
    DuplicatePipeline(String),
    /// A processor needs at least one pipeline.
    #[error("processor `{0}` has no pipelines: add one with `.pipeline(..)`")]
    NoPipelines(String),
    /// A setting is out of range.
    #[error("`{setting}` {problem}")]
    InvalidSetting {
        /// The setting.
        setting: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// A glob pattern is malformed.
    #[error("type pattern `{0}` is invalid: use `*` as a wildcard, e.g. `order-*`")]
    InvalidPattern(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_cause_type() {
        let err = Error::poison(DecodeEventError::NotObject);
        assert_eq!(err.name(), "DecodeEventError");
        assert_eq!(err.class(), ErrorClass::Poison);
        assert_eq!(
            err.to_string(),
            "DecodeEventError (poison): event is JSON but not an object"
        );
    }

    #[test]
    fn result_ext_classifies() {
        let r: Result<(), std::io::Error> = Err(std::io::Error::other("refused"));
        let err = r.transient().unwrap_err();
        assert_eq!(err.class(), ErrorClass::Transient);
        assert_eq!(err.name(), "Error");
        assert_eq!(err.message(), "refused");
    }
}
