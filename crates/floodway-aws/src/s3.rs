//! The event lake: events as S3 objects.

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use floodway::sink::deliver_each;
use floodway::{Batch, Delivery, Error, Event};

use crate::classify::classify;

/// `(year, month, day)` of a time in ms since the epoch (UTC).
pub(crate) fn date_of(millis: i64) -> (i64, u32, u32) {
    // Howard Hinnant's days-to-civil.
    let days = millis.div_euclid(86_400_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Stores every event as an object `{prefix}/{type}/{yyyy}/{mm}/{dd}/{id}.json` (by the
/// event's time): the event lake, to replay or query later. Writing an event again writes the
/// same object, so redelivery is harmless.
#[derive(Debug, Clone)]
pub struct S3Lake {
    client: Client,
    bucket: String,
    prefix: String,
}

impl S3Lake {
    /// A lake in `bucket` under `prefix`.
    pub fn new(
        config: &aws_config::SdkConfig,
        bucket: impl Into<String>,
        prefix: impl Into<String>,
    ) -> Self {
        S3Lake {
            client: crate::s3_client(config),
            bucket: bucket.into(),
            prefix: prefix.into().trim_end_matches('/').to_owned(),
        }
    }

    /// The object key of an event.
    pub fn key_of(&self, event: &Event) -> String {
        let (y, m, d) = date_of(event.timestamp());
        format!(
            "{}/{}/{y:04}/{m:02}/{d:02}/{}.json",
            self.prefix,
            event.event_type(),
            event.id()
        )
    }

    async fn put(&self, event: &Event) -> Result<(), Error> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.key_of(event))
            .content_type("application/json")
            .body(ByteStream::from(event.to_json().into_bytes()))
            .send()
            .await
            .map_err(classify)?;
        Ok(())
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
        assert_eq!(super::date_of(0), (1970, 1, 1));
        assert_eq!(super::date_of(1_700_000_000_000), (2023, 11, 14));
        assert_eq!(super::date_of(951_782_400_000), (2000, 2, 29));
    }
}
