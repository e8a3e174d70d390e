//! EventBridge `PutEvents`: events as entries (detail-type = event type, detail = the event).

use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use aws_sdk_eventbridge::Client;
use floodway::{Batch, Delivery, Error, Event};

use crate::classify::{classify, failed_entries};
use crate::{deliver_in_chunks, EVENTBRIDGE};

/// Publishes events to an event bus, 10 entries and 256 KiB per call, and reports the entries
/// the service failed (throttled, internal) so that only those are retried; an entry of
/// 256 KiB or more is poison on its own (use a claim check). Also a fault sink.
#[derive(Debug, Clone)]
pub struct EventBridgeSink {
    client: Client,
    bus: String,
    source: String,
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
        }
    }

    fn entry(&self, event: &Event) -> PutEventsRequestEntry {
        PutEventsRequestEntry::builder()
            .event_bus_name(&self.bus)
            .source(&self.source)
            .detail_type(event.event_type())
            .detail(event.to_json())
            .build()
    }

    async fn write(&self, batch: Batch) -> Result<Delivery, Error> {
        let size = |e: &PutEventsRequestEntry| {
            e.detail().map_or(0, str::len)
                + e.detail_type().map_or(0, str::len)
                + e.source().map_or(0, str::len)
        };
        let mut delivery = Delivery::complete();
        let mut entries = Vec::with_capacity(batch.len());
        for (i, event) in batch.events().enumerate() {
            let entry = self.entry(event);
            if size(&entry) >= EVENTBRIDGE.entry {
                delivery.fail(
                    i,
                    Error::poison_msg(
                        "EntryTooLarge",
                        format!(
                            "an EventBridge entry of {} bytes is not under 256 KiB: use a claim check",
                            size(&entry)
                        ),
                    ),
                );
            } else {
                entries.push((i, entry));
            }
        }
        let limits = (EVENTBRIDGE.entries, EVENTBRIDGE.bytes - 1);
        deliver_in_chunks(delivery, entries, limits, size, None, |entries| {
            let client = self.client.clone();
            async move {
                let out = client
                    .put_events()
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .map_err(classify)?;
                Ok(failed_entries(
                    out.entries()
                        .iter()
                        .map(|r| (r.error_code(), r.error_message())),
                ))
            }
        })
        .await
    }
}

floodway::impl_sink!(EventBridgeSink, write);
floodway::impl_fault_sink!(EventBridgeSink, write, EVENTBRIDGE.entry - 1024);
