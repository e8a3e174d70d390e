//! EventBridge `PutEvents`: events as entries (detail-type = event type, detail = the event).

use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use aws_sdk_eventbridge::Client;
use floodway::{Error, Event};

use crate::classify::{classify, classify_code};
use crate::{chunks, first_error, send_failed_again};

/// Entries per call.
const MAX_ENTRIES: usize = 10;
/// Bytes per call (EventBridge counts each entry's detail, detail-type and source).
const MAX_BYTES: usize = 256 * 1024;

/// Publishes events to an event bus, 10 entries and 256 KiB per call; entries the service
/// failed (throttled, internal) are sent again, alone, a few times before the batch fails.
/// Also a fault sink.
#[derive(Debug, Clone)]
pub struct EventBridgeSink {
    client: Client,
    bus: String,
    source: String,
    attempts: u32,
}

impl EventBridgeSink {
    /// A sink to `bus`, with `source` as every entry's source.
    pub fn new(
        config: &aws_config::SdkConfig,
        bus: impl Into<String>,
        source: impl Into<String>,
    ) -> Self {
        EventBridgeSink {
            client: Client::new(config),
            bus: bus.into(),
            source: source.into(),
            attempts: 3,
        }
    }

    /// Rounds of sending failed entries again within one call (default 3).
    #[must_use]
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    fn entry(&self, event: &Event) -> PutEventsRequestEntry {
        PutEventsRequestEntry::builder()
            .event_bus_name(&self.bus)
            .source(&self.source)
            .detail_type(event.event_type())
            .detail(event.to_json())
            .build()
    }

    async fn write(&self, events: Vec<Event>) -> Result<(), Error> {
        let entries: Vec<PutEventsRequestEntry> = events.iter().map(|e| self.entry(e)).collect();
        let size = |e: &PutEventsRequestEntry| {
            e.detail().map_or(0, str::len)
                + e.detail_type().map_or(0, str::len)
                + e.source().map_or(0, str::len)
        };
        // Every entry checked before anything is sent (a partly sent batch would be resent).
        if let Some(big) = entries.iter().find(|e| size(e) >= MAX_BYTES) {
            return Err(Error::poison_msg(
                "EntryTooLarge",
                format!(
                    "an EventBridge entry of {} bytes is not under 256 KiB: use a claim check",
                    size(big)
                ),
            ));
        }
        for chunk in chunks(entries, MAX_ENTRIES, MAX_BYTES - 1, size) {
            let client = self.client.clone();
            let failed = send_failed_again(chunk, self.attempts, |entries| {
                let client = client.clone();
                async move {
                    let out = client
                        .put_events()
                        .set_entries(Some(entries))
                        .send()
                        .await
                        .map_err(classify)?;
                    Ok(out
                        .entries()
                        .iter()
                        .enumerate()
                        .filter_map(|(i, r)| {
                            r.error_code().map(|code| {
                                (
                                    i,
                                    classify_code(code, r.error_message().unwrap_or_default()),
                                )
                            })
                        })
                        .collect())
                }
            })
            .await?;
            first_error(failed)?;
        }
        Ok(())
    }
}

crate::batch_sink!(EventBridgeSink);
crate::event_sink!(EventBridgeSink, MAX_BYTES - 1024);
