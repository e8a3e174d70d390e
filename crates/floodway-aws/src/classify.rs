//! AWS errors in Floodway's failure classes.

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use floodway::Error;

/// Error codes that mean "slow down".
const THROTTLES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "ThrottledException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "SlowDown",
    "LimitExceededException",
    "KMSThrottlingException",
];

/// Error codes that a retry may fix.
const TRANSIENT: &[&str] = &[
    "InternalFailure",
    "InternalError",
    "InternalServerError",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "InternalServiceError",
    "RequestTimeout",
    "RequestTimeoutException",
    "TransactionInProgressException",
];

/// Error codes that mean the configuration is wrong (a missing resource, no permission).
const FATAL: &[&str] = &[
    "ResourceNotFoundException",
    "NoSuchBucket",
    "AccessDenied",
    "AccessDeniedException",
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "AWS.SimpleQueueService.NonExistentQueue",
    "QueueDoesNotExist",
    "ExpiredTokenException",
    "InvalidSignatureException",
    "KMSAccessDeniedException",
    "KMSDisabledException",
    "KMSNotFoundException",
    "KMSInvalidStateException",
    "KMSOptInRequired",
    "KmsException",
    "KMS.AccessDeniedException",
    "KMS.DisabledException",
    "KMS.NotFoundException",
    "KMS.InvalidStateException",
    "NotAuthorized",
];

/// The class of an error code returned by a service, for entries of a batch call.
pub(crate) fn classify_code(code: &str, message: &str) -> Error {
    let text = format!("{code}: {message}");
    if THROTTLES.contains(&code) || code.contains("Throttl") {
        Error::throttled_msg("AwsThrottled", text)
    } else if TRANSIENT.contains(&code) || code.starts_with("Internal") {
        Error::transient_msg("AwsUnavailable", text)
    } else if FATAL.contains(&code) || code.starts_with("KMS") || code.contains("AccessDenied") {
        Error::fatal_msg("AwsConfiguration", text)
    } else {
        Error::poison_msg("AwsRejected", text)
    }
}

/// Classifies an SDK error: service errors by code (throttles, 5xx and internal errors
/// transient, missing resources and permissions fatal, the rest poison: the request's
/// content was rejected), network failures and timeouts transient, a request that could not
/// be built poison.
pub fn classify<E>(error: SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &error {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("Unknown").to_owned();
            let message = service.err().message().unwrap_or_default().to_owned();
            let status = service.raw().status().as_u16();
            let by_code = classify_code(&code, &message);
            // An unknown code is classified by the HTTP status: 429 slow down, 5xx retry,
            // 401/403 configuration.
            if by_code.class() == floodway::ErrorClass::Poison {
                let text = format!("{code} (HTTP {status}): {message}");
                match status {
                    429 => return Error::throttled_msg("AwsThrottled", text),
                    500..=599 => return Error::transient_msg("AwsUnavailable", text),
                    401 | 403 => return Error::fatal_msg("AwsConfiguration", text),
                    _ => {}
                }
            }
            by_code
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Error::transient_msg("AwsUnreachable", format!("{error:?}"))
        }
        _ => Error::poison_msg("AwsRequest", format!("{error:?}")),
    }
}

/// The entries of a batch answer that carry an error code, by position, classified.
pub(crate) fn failed_entries<'a>(
    answers: impl Iterator<Item = (Option<&'a str>, Option<&'a str>)>,
) -> Vec<(usize, Error)> {
    answers
        .enumerate()
        .filter_map(|(i, (code, message))| {
            Some((i, classify_code(code?, message.unwrap_or_default())))
        })
        .collect()
}
