//! Faults on AWS: stores for a fault monitor (DynamoDB, S3), and resubmission by invoking
//! the function that failed a fault again.

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_lambda::primitives::Blob;
use aws_sdk_s3::primitives::ByteStream;
use floodway::{Error, Event};
use serde_json::Value;

use crate::classify::classify;

fn tag(fault: &Event, name: &str) -> String {
    fault.tag(name).unwrap_or("unknown").to_owned()
}

/// Stores fault events in a DynamoDB table (partition key `pk`, a string: the fault id, so a
/// fault stored again is one row): processor, pipeline, step, error name and message, the
/// fault event, first and last seen, and how many times it was raised. The sink of a fault
/// monitor's pipeline.
#[derive(Debug, Clone)]
pub struct DynamoDbFaults {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

impl DynamoDbFaults {
    /// Faults in `table`.
    pub fn new(config: &aws_config::SdkConfig, table: impl Into<String>) -> Self {
        DynamoDbFaults {
            client: aws_sdk_dynamodb::Client::new(config),
            table: table.into(),
        }
    }

    async fn store(&self, fault: &Event) -> Result<(), Error> {
        // An item holds 400 KB at most.
        let fault = &floodway::fault::fit(fault, 350 * 1024);
        let err = fault.field("err").cloned().unwrap_or(Value::Null);
        let now = AttributeValue::N(floodway::event::now_millis().to_string());
        self.client
            .update_item()
            .table_name(&self.table)
            .key(
                "pk",
                AttributeValue::S(floodway::fault::fault_id(fault).to_owned()),
            )
            .update_expression(
                "SET processor = :p, pipeline = :pl, step = :s, errorName = :n, \
                 message = :m, fault = :f, lastSeen = :now, \
                 firstSeen = if_not_exists(firstSeen, :now) ADD raised :one",
            )
            .expression_attribute_values(":p", AttributeValue::S(tag(fault, "processor")))
            .expression_attribute_values(":pl", AttributeValue::S(tag(fault, "pipeline")))
            .expression_attribute_values(":s", AttributeValue::S(tag(fault, "step")))
            .expression_attribute_values(
                ":n",
                AttributeValue::S(err["name"].as_str().unwrap_or_default().to_owned()),
            )
            .expression_attribute_values(
                ":m",
                AttributeValue::S(err["message"].as_str().unwrap_or_default().to_owned()),
            )
            .expression_attribute_values(":f", AttributeValue::S(fault.to_json()))
            .expression_attribute_values(":now", now)
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .send()
            .await
            .map_err(classify)?;
        // When it was raised (the fault event's time), kept at its latest: a redelivered copy
        // of an old fault event does not reopen a fault resolved since.
        let raised = AttributeValue::N(fault.timestamp().to_string());
        let later = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(
                "pk",
                AttributeValue::S(floodway::fault::fault_id(fault).to_owned()),
            )
            .update_expression("SET lastRaised = :t")
            .condition_expression("attribute_not_exists(lastRaised) OR lastRaised < :t")
            .expression_attribute_values(":t", raised)
            .send()
            .await;
        match later {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(classify(e)),
        }
    }

    /// Every stored fault (a scan), newest raised first.
    ///
    /// # Errors
    /// When DynamoDB fails.
    pub async fn list(&self) -> Result<Vec<StoredFault>, Error> {
        let mut out = Vec::new();
        let mut start = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(&self.table)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(classify)?;
            for item in page.items() {
                let text = |k: &str| {
                    item.get(k)
                        .and_then(|v| v.as_s().ok())
                        .cloned()
                        .unwrap_or_default()
                };
                let number = |k: &str| {
                    item.get(k)
                        .and_then(|v| v.as_n().ok())
                        .and_then(|n| n.parse::<i64>().ok())
                        .unwrap_or(0)
                };
                let fault = match Event::decode(text("fault").as_bytes()) {
                    Ok(f) => f,
                    Err(_) => continue,
                };
                let resolved = number("resolvedAt");
                out.push(StoredFault {
                    id: text("pk"),
                    processor: text("processor"),
                    pipeline: text("pipeline"),
                    error: text("errorName"),
                    message: text("message"),
                    raised: number("raised") as u64,
                    last_raised: number("lastRaised"),
                    open: resolved == 0 || number("lastRaised") > resolved,
                    resubmissions: item
                        .get("resubmissions")
                        .and_then(|v| v.as_l().ok())
                        .map(|l| l.iter().filter_map(|v| v.as_s().ok().cloned()).collect())
                        .unwrap_or_default(),
                    fault,
                });
            }
            start = page.last_evaluated_key().cloned();
            if start.is_none() {
                break;
            }
        }
        out.sort_by_key(|f| std::cmp::Reverse(f.last_raised));
        Ok(out)
    }

    /// Records a resubmission's outcome with the fault; a success resolves it.
    ///
    /// # Errors
    /// When DynamoDB fails.
    pub async fn record_resubmission(&self, id: &str, outcome: &Resubmitted) -> Result<(), Error> {
        let now = floodway::event::now_millis();
        let entry = format!("{now}: {outcome:?}");
        let mut update = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(id.to_owned()))
            .expression_attribute_values(":e", AttributeValue::L(vec![AttributeValue::S(entry)]))
            .expression_attribute_values(":empty", AttributeValue::L(Vec::new()));
        update = if *outcome == Resubmitted::Succeeded {
            update
                .update_expression(
                    "SET resubmissions = list_append(if_not_exists(resubmissions, :empty), :e), resolvedAt = :now",
                )
                .expression_attribute_values(":now", AttributeValue::N(now.to_string()))
        } else {
            update.update_expression(
                "SET resubmissions = list_append(if_not_exists(resubmissions, :empty), :e)",
            )
        };
        update.send().await.map_err(classify)?;
        Ok(())
    }
}

/// A fault as [`DynamoDbFaults`] keeps it.
#[derive(Debug, Clone)]
pub struct StoredFault {
    /// The fault id.
    pub id: String,
    /// The processor.
    pub processor: String,
    /// The pipeline.
    pub pipeline: String,
    /// The error's name.
    pub error: String,
    /// The error's message.
    pub message: String,
    /// Times stored.
    pub raised: u64,
    /// When it was last raised (ms).
    pub last_raised: i64,
    /// Not resolved, or raised again after its last successful resubmission.
    pub open: bool,
    /// Resubmissions and their outcomes.
    pub resubmissions: Vec<String>,
    /// The fault event.
    pub fault: Event,
}

/// Stores fault events as S3 objects `{prefix}/{processor}/{pipeline}/{id}.json` (a fault
/// stored again overwrites its object). The sink of a fault monitor's pipeline.
#[derive(Debug, Clone)]
pub struct S3Faults {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
}

impl S3Faults {
    /// Faults in `bucket` under `prefix`.
    pub fn new(
        config: &aws_config::SdkConfig,
        bucket: impl Into<String>,
        prefix: impl Into<String>,
    ) -> Self {
        S3Faults {
            client: crate::s3_client(config),
            bucket: bucket.into(),
            prefix: prefix.into().trim_end_matches('/').to_owned(),
        }
    }

    async fn store(&self, fault: &Event) -> Result<(), Error> {
        let key = format!(
            "{}/{}/{}/{}.json",
            self.prefix,
            tag(fault, "processor"),
            tag(fault, "pipeline"),
            floodway::fault::fault_id(fault)
        );
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/json")
            .body(ByteStream::from(fault.to_json().into_bytes()))
            .send()
            .await
            .map_err(classify)?;
        Ok(())
    }
}

impl DynamoDbFaults {
    async fn store_all(&self, faults: Vec<Event>) -> Result<(), Error> {
        for fault in &faults {
            self.store(fault).await?;
        }
        Ok(())
    }
}

impl S3Faults {
    async fn store_all(&self, faults: Vec<Event>) -> Result<(), Error> {
        for fault in &faults {
            self.store(fault).await?;
        }
        Ok(())
    }
}

crate::batch_sink!(DynamoDbFaults, store_all);
crate::batch_sink!(S3Faults, store_all);

/// How a resubmission went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resubmitted {
    /// The pipeline finished the record.
    Succeeded,
    /// The function answered that the record is unfinished (it failed transiently again).
    Unfinished,
    /// The pipeline faulted the record again (a new fault event tells why).
    FaultedAgain,
    /// The function failed: its error.
    Failed(String),
}

/// Invokes `function` synchronously with the fault's record, shaped like its source and
/// limited to the pipeline that failed it (see `floodway_lambda::resubmit`).
///
/// # Errors
/// A fault without its record, or an invocation that could not be made.
pub async fn resubmit(
    lambda: &aws_sdk_lambda::Client,
    function: &str,
    fault: &Event,
) -> Result<Resubmitted, Error> {
    let payload = floodway_lambda::resubmission_payload(fault)?;
    let out = lambda
        .invoke()
        .function_name(function)
        .payload(Blob::new(
            serde_json::to_vec(&payload)
                .map_err(|e| Error::poison_msg("Payload", e.to_string()))?,
        ))
        .send()
        .await
        .map_err(classify)?;
    let answer: Value = out
        .payload()
        .and_then(|p| serde_json::from_slice(p.as_ref()).ok())
        .unwrap_or(Value::Null);
    if out.function_error().is_some() {
        // An EventBridge-shaped record that did not finish comes back as an error.
        if answer.to_string().contains("not finished") {
            return Ok(Resubmitted::Unfinished);
        }
        return Ok(Resubmitted::Failed(answer.to_string()));
    }
    let unfinished = answer["batchItemFailures"]
        .as_array()
        .is_some_and(|f| !f.is_empty());
    let faulted = answer["floodway"]["faulted"].as_u64().unwrap_or(0) > 0;
    Ok(if faulted {
        Resubmitted::FaultedAgain
    } else if unfinished {
        Resubmitted::Unfinished
    } else {
        Resubmitted::Succeeded
    })
}
