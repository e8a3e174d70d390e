//! Resubmission payloads: a fault's record sent back to the function that failed it, shaped
//! like the source it came from and limited to the pipeline that failed.
//!
//! A payload carries `"floodway": {"pipeline": "<name>"}` beside the source's fields; the
//! [`Handler`](crate::Handler) then runs only that pipeline. Records from Kinesis come back
//! as a Kinesis event and from SQS as an SQS event; others (DynamoDB change events,
//! EventBridge) as an EventBridge event whose detail is the event the pipeline saw, its text
//! as it was (numbers beyond a double, escapes and all), read again without the event size
//! limit when the source had put it together (a change of two large images).

use base64::Engine as _;
use floodway::fault::FaultDetails;
use floodway::{Error, Event};
use serde_json::value::RawValue;
use serde_json::{json, Value};

/// The invocation payload that resubmits `fault`, as JSON text (an event's text is carried as
/// it is, never read into a JSON tree and written again).
///
/// # Errors
/// A fault event without its details or its record's bytes (a truncated fault).
pub fn resubmission_payload(fault: &Event) -> Result<Box<RawValue>, Error> {
    let details: FaultDetails = fault.payload()?;
    let pipeline = fault.tag("pipeline").unwrap_or_default().to_owned();
    if pipeline == floodway::fault::DECODE_PIPELINE {
        return Err(Error::poison_msg(
            "Undecodable",
            "the record is not an event: no pipeline can take it; fix its producer and publish it again",
        ));
    }
    let record = &details.uow.record;
    let data = record.bytes()?;
    let (kind, name) = record
        .source
        .split_once(':')
        .unwrap_or((record.source.as_str(), ""));
    let marker = json!({
        "pipeline": pipeline,
        "faultId": floodway::fault::fault_id(fault),
        "assembled": kind == "dynamodb",
    });
    let position = record
        .sequence
        .clone()
        .unwrap_or_else(|| record.offset.to_string());
    let payload = match kind {
        "kinesis" => json!({
            "floodway": marker,
            "Records": [{
                "kinesis": {
                    "kinesisSchemaVersion": "1.0",
                    "partitionKey": "resubmitted",
                    "sequenceNumber": position,
                    "data": base64::engine::general_purpose::STANDARD.encode(&data),
                    "approximateArrivalTimestamp": floodway::event::now_millis() as f64 / 1000.0,
                },
                "eventSource": "aws:kinesis",
                "eventVersion": "1.0",
                "eventID": format!("{}:{position}", record.partition),
                "eventName": "aws:kinesis:record",
                "eventSourceARN": format!("arn:aws:kinesis:::stream/{name}"),
            }],
        }),
        "sqs" => json!({
            "floodway": marker,
            "Records": [{
                "messageId": position,
                "body": String::from_utf8_lossy(&data),
                "attributes": { "ApproximateReceiveCount": (record.attempt + 1).to_string() },
                "messageAttributes": {},
                "eventSource": "aws:sqs",
                "eventSourceARN": format!("arn:aws:sqs:::{name}"),
            }],
        }),
        _ => {
            #[derive(serde::Serialize)]
            struct Envelope<'a> {
                floodway: Value,
                version: &'static str,
                id: String,
                #[serde(rename = "detail-type")]
                detail_type: Option<&'a RawValue>,
                source: &'a str,
                time: &'static str,
                resources: [(); 0],
                detail: &'a RawValue,
            }
            #[derive(serde::Deserialize)]
            struct Typed<'a> {
                #[serde(borrow, rename = "type")]
                event_type: Option<&'a RawValue>,
            }
            let text = std::str::from_utf8(&data)
                .map_err(|e| Error::poison_msg("UndecodableRecord", e.to_string()))?;
            let detail: &RawValue = serde_json::from_str(text)
                .map_err(|e| Error::poison_msg("UndecodableRecord", e.to_string()))?;
            let typed: Typed<'_> = serde_json::from_str(detail.get())
                .map_err(|e| Error::poison_msg("UndecodableRecord", e.to_string()))?;
            return serde_json::value::to_raw_value(&Envelope {
                floodway: marker,
                version: "0",
                id: format!("resubmit-{}", floodway::fault::fault_id(fault)),
                detail_type: typed.event_type,
                source: &record.source,
                time: "1970-01-01T00:00:00Z",
                resources: [],
                detail,
            })
            .map_err(|e| Error::poison_msg("UndecodableRecord", e.to_string()));
        }
    };
    serde_json::value::to_raw_value(&payload)
        .map_err(|e| Error::poison_msg("UndecodableRecord", e.to_string()))
}
