//! Claim checks: events too large for a hub or a queue travel as a small event pointing at
//! an S3 object, and are redeemed on the reading side.

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use floodway::{Error, Event};
use serde_json::json;

use crate::classify::classify;

/// Moves large events to S3 and brings them back.
///
/// In a pipeline that publishes, `.then(move |uow| ...)` with [`ClaimCheck::store`] replaces
/// an event over the threshold by its claim: the same id, type, time, partition key and tags,
/// and `s3: {bucket, key}` instead of the payload. A reading pipeline redeems it with
/// [`ClaimCheck::redeem`] before its other steps.
#[derive(Debug, Clone)]
pub struct ClaimCheck {
    client: Client,
    bucket: String,
    prefix: String,
    threshold: usize,
}

impl ClaimCheck {
    /// Claim checks in `bucket` under `prefix`, for events over `threshold` bytes.
    pub fn new(
        config: &aws_config::SdkConfig,
        bucket: impl Into<String>,
        prefix: impl Into<String>,
        threshold: usize,
    ) -> Self {
        ClaimCheck {
            client: crate::s3_client(config),
            bucket: bucket.into(),
            prefix: prefix.into().trim_end_matches('/').to_owned(),
            threshold,
        }
    }

    /// The event itself if it is small enough, else its claim (the event stored in S3).
    ///
    /// # Errors
    /// When S3 fails.
    pub async fn store(&self, event: Event) -> Result<Event, Error> {
        let body = event.to_json();
        if body.len() <= self.threshold {
            return Ok(event);
        }
        let key = format!("{}/{}.json", self.prefix, event.id());
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .content_type("application/json")
            .body(ByteStream::from(body.into_bytes()))
            .send()
            .await
            .map_err(classify)?;
        let mut claim = Event::builder(event.event_type(), event.partition_key())
            .id(event.id())
            .timestamp(event.timestamp())
            .field("s3", json!({ "bucket": self.bucket, "key": key }));
        if let Some(tags) = event.tags() {
            for (k, v) in tags {
                claim = claim.tag(k.clone(), v.clone());
            }
        }
        Ok(claim.build())
    }

    /// The full event of a claim this claim check made (its bucket, under its prefix); any
    /// other event as it is, even one with an `s3` field of its own.
    ///
    /// # Errors
    /// When S3 fails, or the object is not an event (poison).
    pub async fn redeem(&self, event: Event) -> Result<Event, Error> {
        let Some(claim) = event.field("s3") else {
            return Ok(event);
        };
        let (Some(bucket), Some(key)) = (claim["bucket"].as_str(), claim["key"].as_str()) else {
            return Ok(event);
        };
        if bucket != self.bucket || !key.starts_with(&format!("{}/", self.prefix)) {
            return Ok(event);
        }
        let object = self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(classify)?;
        let bytes = object
            .body
            .collect()
            .await
            .map_err(|e| Error::transient_msg("S3Read", e.to_string()))?
            .into_bytes();
        Event::decode_bytes(bytes, usize::MAX)
            .map_err(|e| Error::poison_msg("ClaimNotAnEvent", format!("s3://{bucket}/{key}: {e}")))
    }
}
