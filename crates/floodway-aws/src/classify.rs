//! AWS errors in Floodway's failure classes.

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
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
    // A write that met another's transaction on the same item; the SDK does not retry it.
    "TransactionConflictException",
    "KMSInternalException",
    "KMS.KMSInternalException",
    "DependencyTimeoutException",
    "KeyUnavailableException",
    "KMS.KeyUnavailableException",
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
    "ExpiredToken",
    "InvalidSignatureException",
    "KMSAccessDeniedException",
    "KMSDisabledException",
    "KMSNotFoundException",
    "KMSInvalidStateException",
    "KMSOptInRequired",
    // KMS's own names of a disabled or missing key (other services prefix them with `KMS`).
    "DisabledException",
    "NotFoundException",
    "InvalidKeyUsageException",
    "KmsException",
    "KMS.AccessDeniedException",
    "KMS.DisabledException",
    "KMS.NotFoundException",
    "KMS.InvalidStateException",
    // S3 addressed in the wrong region.
    "AuthorizationHeaderMalformed",
    "PermanentRedirect",
];

/// The class of an error code returned by a service, for entries of a batch call.
pub(crate) fn classify_code(code: &str, message: &str) -> Error {
    let text = format!("{code}: {message}");
    if THROTTLES.contains(&code) || code.contains("Throttl") {
        Error::throttled_msg("AwsThrottled", text)
    } else if TRANSIENT.contains(&code) || code.contains("Internal") {
        Error::transient_msg("AwsUnavailable", text)
    } else if FATAL.contains(&code)
        || code.starts_with("KMS")
        || code.contains("AccessDenied")
        // EventBridge's NotAuthorizedForSourceException and NotAuthorizedForDetailType...:
        // permissions, for every event alike.
        || code.starts_with("NotAuthorized")
    {
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
                    // A redirect: the wrong region or endpoint.
                    300..=399 | 401 | 403 => return Error::fatal_msg("AwsConfiguration", text),
                    _ => {}
                }
            }
            by_code
        }
        // Before a request is sent, the SDK finds its credentials and its endpoint: a failure
        // there comes as a dispatch failure, but no retry fixes a missing region or
        // credentials that are not there.
        SdkError::DispatchFailure(_) if unsendable(&error) => {
            Error::fatal_msg("AwsConfiguration", format!("{error:?}"))
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Error::transient_msg("AwsUnreachable", format!("{error:?}"))
        }
        _ => Error::poison_msg("AwsRequest", format!("{error:?}")),
    }
}

/// Whether `error` says that the request could not be made for want of configuration: no
/// credentials found (none configured, an invalid profile, a role refused or a session
/// expired), or no region (no endpoint, nothing to sign for). A credentials provider that
/// timed out, or failed for a reason other than a refusal, may answer later. The SDK's chain
/// says "not loaded" also when its last provider, the instance metadata service, could not be
/// reached: on a machine without credentials that is the configuration, on an instance a
/// passing failure; it is taken as the configuration (the processor stops and says so, and a
/// supervisor starting it again retries), not retried for ever.
fn unsendable(error: &(dyn std::error::Error + 'static)) -> bool {
    use aws_credential_types::provider::error::CredentialsError;
    let mut next = error.source();
    while let Some(e) = next {
        if let Some(credentials) = e.downcast_ref::<CredentialsError>() {
            return match credentials {
                CredentialsError::CredentialsNotLoaded(_)
                | CredentialsError::InvalidConfiguration(_) => true,
                CredentialsError::ProviderError(_) => {
                    let text = format!("{credentials:?}");
                    [
                        "AccessDenied",
                        "ExpiredToken",
                        "InvalidClientTokenId",
                        "UnauthorizedSSOToken",
                        "InvalidGrant",
                    ]
                    .iter()
                    .any(|code| text.contains(code))
                }
                _ => false,
            };
        }
        // No region: no endpoint to resolve, or (with an endpoint given) none to sign for,
        // which the SDK's private signing error says only in words.
        if e.downcast_ref::<aws_smithy_http::endpoint::ResolveEndpointError>()
            .is_some()
            || e.to_string().starts_with("missing signing region")
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// Whether a conditional DynamoDB update applied: `Ok(false)` when its condition did not
/// hold (an older event, a claim held, a history changed since it was read).
pub(crate) fn applied(
    result: Result<
        aws_sdk_dynamodb::operation::update_item::UpdateItemOutput,
        SdkError<
            aws_sdk_dynamodb::operation::update_item::UpdateItemError,
            aws_sdk_dynamodb::config::http::HttpResponse,
        >,
    >,
) -> Result<bool, Error> {
    match result {
        Ok(_) => Ok(true),
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
        {
            Ok(false)
        }
        Err(e) => Err(classify(e)),
    }
}

/// The reasons a DynamoDB transaction was cancelled, one per item in the order given
/// (`None` or `"None"` for an item that was not the cause); `None` when `error` is not a
/// cancellation.
pub(crate) fn cancellation_reasons<R>(
    error: &SdkError<TransactWriteItemsError, R>,
) -> Option<Vec<Option<String>>> {
    match error.as_service_error()? {
        TransactWriteItemsError::TransactionCanceledException(c) => Some(
            c.cancellation_reasons()
                .iter()
                .map(|r| r.code().map(str::to_owned))
                .collect(),
        ),
        _ => None,
    }
}

/// The class of a DynamoDB transaction cancelled for none of the reasons its caller looks for
/// (a condition of its own): the cancellation (HTTP 400) says nothing by itself, its reasons
/// do. A throttled item slows down, a conflict with another transaction is retried, anything
/// else (a validation error, an item collection over its size) rejects the request.
pub(crate) fn cancellation(reasons: &[Option<String>]) -> Error {
    let codes: Vec<&str> = reasons
        .iter()
        .flatten()
        .map(String::as_str)
        .filter(|c| *c != "None")
        .collect();
    let text = format!("transaction cancelled: [{}]", codes.join(", "));
    let any = |wanted: &[&str]| codes.iter().any(|c| wanted.contains(c));
    if any(&[
        "ThrottlingError",
        "ProvisionedThroughputExceeded",
        "RequestLimitExceeded",
    ]) {
        Error::throttled_msg("AwsThrottled", text)
    } else if codes.is_empty() || any(&["TransactionConflict"]) {
        Error::transient_msg("AwsUnavailable", text)
    } else {
        Error::poison_msg("AwsRejected", text)
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

#[cfg(test)]
mod tests {
    use super::*;
    use floodway::ErrorClass;
    use std::time::Duration;

    #[test]
    fn codes_are_classed_as_the_services_mean_them() {
        let class = |code: &str| {
            let e = classify_code(code, "m");
            (e.class(), e.is_throttle())
        };
        let throttle = (ErrorClass::Transient, true);
        let transient = (ErrorClass::Transient, false);
        assert_eq!(class("ThrottlingException"), throttle);
        assert_eq!(class("KMS.ThrottlingException"), throttle);
        assert_eq!(class("ProvisionedThroughputExceededException"), throttle);
        // KMS's own 5xx is an outage, not a configuration error, though it starts with KMS.
        assert_eq!(class("KMSInternalException"), transient);
        assert_eq!(class("KMS.KMSInternalException"), transient);
        assert_eq!(class("DependencyTimeoutException"), transient);
        assert_eq!(class("TransactionConflictException"), transient);
        assert_eq!(class("InternalServerError"), transient);
        for fatal in [
            "DisabledException",
            "NotFoundException",
            "KMSDisabledException",
            "KMS.DisabledException",
            "KMSInvalidStateException",
            "ExpiredToken",
            "AccessDeniedException",
            "ResourceNotFoundException",
            "NotAuthorizedForSourceException",
            "NotAuthorizedForDetailTypeException",
            "PermanentRedirect",
            "AuthorizationHeaderMalformed",
        ] {
            assert_eq!(class(fatal).0, ErrorClass::Fatal, "{fatal}");
        }
        assert_eq!(class("ValidationException").0, ErrorClass::Poison);
        assert_eq!(class("InvalidCiphertextException").0, ErrorClass::Poison);
    }

    #[test]
    fn a_cancelled_transaction_is_classed_by_its_reasons() {
        let reasons = |codes: &[&str]| -> Vec<Option<String>> {
            codes.iter().map(|c| Some((*c).to_owned())).collect()
        };
        let throttled = cancellation(&reasons(&["None", "ThrottlingError"]));
        assert!(throttled.is_throttle(), "{throttled}");
        let busy = cancellation(&reasons(&["TransactionConflict", "None"]));
        assert_eq!(busy.class(), ErrorClass::Transient);
        assert!(!busy.is_throttle());
        let rejected = cancellation(&reasons(&["ValidationError", "None"]));
        assert_eq!(rejected.class(), ErrorClass::Poison);
        assert!(
            rejected.to_string().contains("ValidationError"),
            "{rejected}"
        );
        assert_eq!(cancellation(&[None, None]).class(), ErrorClass::Transient);
    }

    /// A client of a closed loopback port: nothing answers, so an error that is not a
    /// connection refused comes from before the request was sent.
    fn client(
        region: Option<&str>,
        credentials: impl aws_credential_types::provider::ProvideCredentials + 'static,
    ) -> aws_sdk_sqs::Client {
        let mut config = aws_sdk_sqs::Config::builder()
            .behavior_version_latest()
            .endpoint_url("http://127.0.0.1:1")
            .credentials_provider(credentials);
        if let Some(region) = region {
            config = config.region(aws_sdk_sqs::config::Region::new(region.to_owned()));
        }
        aws_sdk_sqs::Client::from_conf(config.build())
    }

    async fn sent(client: aws_sdk_sqs::Client) -> Error {
        classify(
            client
                .send_message()
                .queue_url("http://127.0.0.1:1/000000000000/q")
                .message_body("m")
                .send()
                .await
                .unwrap_err(),
        )
    }

    #[tokio::test]
    async fn missing_credentials_or_region_are_configuration_errors_not_outages() {
        use aws_credential_types::provider::error::CredentialsError;
        use aws_credential_types::provider::future::ProvideCredentials as Future;
        use aws_credential_types::Credentials;

        #[derive(Debug)]
        struct Failing(fn() -> CredentialsError);
        impl aws_credential_types::provider::ProvideCredentials for Failing {
            fn provide_credentials<'a>(&'a self) -> Future<'a>
            where
                Self: 'a,
            {
                Future::ready(Err((self.0)()))
            }
        }
        let valid = Credentials::new("testing", "testing", None, None, "test");
        let not_loaded = || CredentialsError::not_loaded("no credentials in the chain");
        let refused = || {
            CredentialsError::provider_error(
                "AccessDenied: not authorized to perform sts:AssumeRole",
            )
        };
        let timed_out = || CredentialsError::provider_timed_out(Duration::from_secs(5));
        for (what, err) in [
            (
                "no credentials",
                sent(client(Some("us-east-1"), Failing(not_loaded))).await,
            ),
            (
                "a role refused",
                sent(client(Some("us-east-1"), Failing(refused))).await,
            ),
            ("no region", sent(client(None, valid.clone())).await),
        ] {
            assert_eq!(err.class(), ErrorClass::Fatal, "{what}: {err}");
        }
        // A provider that may answer later, and an endpoint that does not answer now, are
        // not configuration errors.
        for (what, err) in [
            (
                "timed out",
                sent(client(Some("us-east-1"), Failing(timed_out))).await,
            ),
            ("refused", sent(client(Some("us-east-1"), valid)).await),
        ] {
            assert_eq!(err.class(), ErrorClass::Transient, "{what}: {err}");
        }
    }
}
