//! A latest-wins view in a DynamoDB table.

use std::collections::HashMap;
use std::sync::Arc;

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;
use floodway::sink::deliver_each;
use floodway::{Batch, Delivery, Error, Event};
use serde_json::Value;

use crate::classify::classify;

type KeyFn = Arc<dyn Fn(&Event) -> Result<String, Error> + Send + Sync>;
type ValueFn = Arc<dyn Fn(&Event) -> Result<Value, Error> + Send + Sync>;

/// Keeps, per key, the latest value in a DynamoDB table: each write is an `UpdateItem`
/// conditional on the row's stored `(timestamp, id)` being older than the event's, so an
/// older or redelivered event changes nothing (the failed condition counts as done). The
/// writes of a batch run concurrently. Rows hold the key (`pk`), `value` (the value as a
/// DynamoDB map), `timestamp`, `eventId` and optionally a `discriminator`.
#[derive(Clone)]
pub struct DynamoDbView {
    client: Client,
    table: String,
    key: KeyFn,
    value: ValueFn,
    discriminator: Option<String>,
}

impl std::fmt::Debug for DynamoDbView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoDbView")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

/// A JSON value as a DynamoDB attribute.
pub(crate) fn attribute(value: &Value) -> AttributeValue {
    match value {
        Value::Null => AttributeValue::Null(true),
        Value::Bool(b) => AttributeValue::Bool(*b),
        Value::Number(n) => AttributeValue::N(n.to_string()),
        Value::String(s) => AttributeValue::S(s.clone()),
        Value::Array(items) => AttributeValue::L(items.iter().map(attribute).collect()),
        Value::Object(map) => AttributeValue::M(
            map.iter()
                .map(|(k, v)| (k.clone(), attribute(v)))
                .collect::<HashMap<_, _>>(),
        ),
    }
}

impl DynamoDbView {
    /// A view in `table` (partition key `pk`, a string), keyed and valued by the functions.
    pub fn new<K, V>(
        config: &aws_config::SdkConfig,
        table: impl Into<String>,
        key: K,
        value: V,
    ) -> Self
    where
        K: Fn(&Event) -> Result<String, Error> + Send + Sync + 'static,
        V: Fn(&Event) -> Result<Value, Error> + Send + Sync + 'static,
    {
        DynamoDbView {
            client: Client::new(config),
            table: table.into(),
            key: Arc::new(key),
            value: Arc::new(value),
            discriminator: None,
        }
    }

    /// Writes a `discriminator` attribute with this value on every row: the kind of row, from
    /// which change data capture names its events (`{discriminator}-created`, ...).
    #[must_use]
    pub fn discriminator(mut self, discriminator: impl Into<String>) -> Self {
        self.discriminator = Some(discriminator.into());
        self
    }

    async fn write(&self, event: Event) -> Result<bool, Error> {
        let key = (self.key)(&event)?;
        let value = (self.value)(&event)?;
        let (expression, discriminator) = match &self.discriminator {
            Some(d) => (
                "SET #v = :v, #ts = :ts, #id = :id, #d = :d",
                AttributeValue::S(d.clone()),
            ),
            None => (
                "SET #v = :v, #ts = :ts, #id = :id",
                AttributeValue::Null(true),
            ),
        };
        let mut request = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(key))
            .update_expression(expression)
            .condition_expression(
                "attribute_not_exists(#ts) OR #ts < :ts OR (#ts = :ts AND #id < :id)",
            )
            .expression_attribute_names("#v", "value")
            .expression_attribute_names("#ts", "timestamp")
            .expression_attribute_names("#id", "eventId")
            .expression_attribute_values(":v", attribute(&value))
            .expression_attribute_values(":ts", AttributeValue::N(event.timestamp().to_string()))
            .expression_attribute_values(":id", AttributeValue::S(event.id().to_owned()));
        if self.discriminator.is_some() {
            request = request
                .expression_attribute_names("#d", "discriminator")
                .expression_attribute_values(":d", discriminator);
        }
        let result = request.send().await;
        match result {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                // An older or the same event: latest-wins says nothing changes.
                Ok(false)
            }
            Err(e) => Err(classify(e)),
        }
    }

    async fn write_all(&self, batch: Batch) -> Result<Delivery, Error> {
        deliver_each(&batch, CONCURRENCY, |uow| async {
            self.write(uow.event().clone()).await.map(|_| ())
        })
        .await
    }
}

/// Writes in flight per batch.
const CONCURRENCY: usize = 32;

floodway::impl_sink!(DynamoDbView, write_all);
