//! Claim checks: events too large for a hub or a queue travel as a small event pointing at
//! an S3 object, and are redeemed on the reading side.

use floodway::{Error, Event};
use serde_json::json;

use crate::classify::classify;
use crate::s3::S3Objects;

/// Moves large events to S3 and brings them back.
///
/// In a pipeline that publishes, `.then(move |uow| ...)` with [`ClaimCheck::store`] replaces
/// an event over the threshold by its claim: the same id, type, time, partition key and tags,
/// and `s3: {bucket, key}` instead of the payload. A reading pipeline redeems it with
/// [`ClaimCheck::redeem`] before its other steps.
#[derive(Debug, Clone)]
pub struct ClaimCheck {
    objects: S3Objects,
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
            objects: S3Objects::new(config, bucket, prefix),
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
        let key = self.objects.key(&format!("{}.json", event.id()));
        self.objects.put(&key, body).await?;
        let mut claim = Event::builder(event.event_type(), event.partition_key())
            .id(event.id())
            .timestamp(event.timestamp())
            .field("s3", json!({ "bucket": self.objects.bucket, "key": key }));
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
        if bucket != self.objects.bucket || !key.starts_with(&self.objects.key("")) {
            return Ok(event);
        }
        let object = self
            .objects
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
