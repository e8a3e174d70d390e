//! Faults on AWS: stores for a fault monitor (DynamoDB, S3), and resubmission by invoking
//! the function that failed a fault again.

use std::task::{Context, Poll};

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_lambda::primitives::Blob;
use aws_sdk_s3::primitives::ByteStream;
use floodway::layer::BoxFuture;
use floodway::{Batch, Error, Event};
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
        let err = fault.field("err").cloned().unwrap_or(Value::Null);
        let now = AttributeValue::N(floodway::event::now_millis().to_string());
        self.client
            .update_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(fault.id().to_owned()))
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
        Ok(())
    }
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
            client: aws_sdk_s3::Client::from_conf(
                aws_sdk_s3::config::Builder::from(config)
                    .force_path_style(true)
                    .build(),
            ),
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
            fault.id()
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

macro_rules! fault_store_service {
    ($store:ty) => {
        impl tower::Service<Batch> for $store {
            type Response = ();
            type Error = Error;
            type Future = BoxFuture<()>;

            fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
                Poll::Ready(Ok(()))
            }

            fn call(&mut self, batch: Batch) -> Self::Future {
                let store = self.clone();
                let faults: Vec<Event> = batch.events().cloned().collect();
                Box::pin(async move {
                    for fault in &faults {
                        store.store(fault).await?;
                    }
                    Ok(())
                })
            }
        }
    };
}

fault_store_service!(DynamoDbFaults);
fault_store_service!(S3Faults);

/// How a resubmission went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resubmitted {
    /// The pipeline finished the record.
    Succeeded,
    /// The function answered that the record is unfinished (it failed transiently again).
    Unfinished,
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
        return Ok(Resubmitted::Failed(answer.to_string()));
    }
    let unfinished = answer["batchItemFailures"]
        .as_array()
        .is_some_and(|f| !f.is_empty());
    Ok(if unfinished {
        Resubmitted::Unfinished
    } else {
        Resubmitted::Succeeded
    })
}
