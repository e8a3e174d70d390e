//! The event lake: events as S3 objects.

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use floodway::sink::deliver_each;
use floodway::{Batch, Delivery, Error, Event};

use crate::classify::classify;

/// Stores every event as an object `{prefix}/{type}/{yyyy}/{mm}/{dd}/{id}.json` (by the
/// event's time): the event lake, to replay or query later. Writing an event again writes the
/// same object, so redelivery is harmless.
#[derive(Debug, Clone)]
pub struct S3Lake {
    objects: S3Objects,
}

/// JSON objects under a prefix of a bucket: where the lake, the S3 fault store and claim
/// checks keep events.
#[derive(Debug, Clone)]
pub(crate) struct S3Objects {
    pub(crate) client: Client,
    pub(crate) bucket: String,
    pub(crate) prefix: String,
}

impl S3Objects {
    pub(crate) fn new(
        config: &aws_config::SdkConfig,
        bucket: impl Into<String>,
        prefix: impl Into<String>,
    ) -> Self {
        S3Objects {
            client: crate::s3_client(config),
            bucket: bucket.into(),
            prefix: prefix.into().trim_end_matches('/').to_owned(),
        }
    }

    /// The key of `name` under the prefix.
    pub(crate) fn key(&self, name: &str) -> String {
        format!("{}/{name}", self.prefix)
    }

    /// Writes `json` as the object `key`.
    pub(crate) async fn put(&self, key: &str, json: String) -> Result<(), Error> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/json")
            .body(ByteStream::from(json.into_bytes()))
            .send()
            .await
            .map_err(classify)?;
        Ok(())
    }
}

impl S3Lake {
    /// A lake in `bucket` under `prefix`.
    pub fn new(
        config: &aws_config::SdkConfig,
        bucket: impl Into<String>,
        prefix: impl Into<String>,
    ) -> Self {
        S3Lake {
            objects: S3Objects::new(config, bucket, prefix),
        }
    }

    /// The object key of an event.
    pub fn key_of(&self, event: &Event) -> String {
        let (y, m, d) = floodway::event::civil_date(event.timestamp());
        let name = format!(
            "{}/{y:04}/{m:02}/{d:02}/{}.json",
            event.event_type(),
            event.id()
        );
        self.objects.key(&name)
    }

    async fn put(&self, event: &Event) -> Result<(), Error> {
        self.objects.put(&self.key_of(event), event.to_json()).await
    }

    async fn write(&self, batch: Batch) -> Result<Delivery, Error> {
        deliver_each(&batch, 32, |uow| self.put(uow.event())).await
    }
}

floodway::impl_sink!(S3Lake, write);

#[cfg(test)]
mod tests {
    #[test]
    fn dates_are_civil() {
        assert_eq!(floodway::event::civil_date(0), (1970, 1, 1));
        assert_eq!(
            floodway::event::civil_date(1_700_000_000_000),
            (2023, 11, 14)
        );
        assert_eq!(floodway::event::civil_date(951_782_400_000), (2000, 2, 29));
    }
}
