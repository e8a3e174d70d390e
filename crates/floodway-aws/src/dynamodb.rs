//! A latest-wins view in a DynamoDB table.

use std::collections::HashMap;
use std::sync::Arc;

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;
use floodway::event::now_millis;
use floodway::hub::HubFuture;
use floodway::idempotence::Version;
use floodway::sink::deliver_each;
use floodway::state::{newest_per_key, Applied, KeyedState, Scan, StateRow, StateWrite};
use floodway::{Batch, BoxError, Delivery, Error, Event};
use futures_util::stream::{self, StreamExt};
use serde_json::Value;

use crate::classify::{applied, classify};

type KeyFn = Arc<dyn Fn(&Event) -> Result<String, Error> + Send + Sync>;
type ValueFn = Arc<dyn Fn(&Event) -> Result<Value, Error> + Send + Sync>;

/// Keeps, per key, the latest value in a DynamoDB table: each write is an `UpdateItem`
/// conditional on the row's stored `(timestamp, id)` being older than the event's, so an
/// older or redelivered event changes nothing (the failed condition counts as done). The
/// writes of a batch run concurrently. Rows hold the key (`pk`), `value` (the value as a
/// DynamoDB map), `timestamp`, `eventId` and optionally a `discriminator`.
#[derive(Clone)]
pub struct DynamoDbView {
    state: DynamoDbState,
    key: KeyFn,
    value: ValueFn,
}

impl std::fmt::Debug for DynamoDbView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoDbView")
            .field("table", &self.state.table)
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

/// A DynamoDB number as JSON, exactly as stored where JSON can hold it: an integer of up to
/// 64 bits (signed or not) as one, a larger integer as its text (a double would round it),
/// a fraction as a double.
fn number(n: &str) -> Value {
    if let Ok(i) = n.parse::<i64>() {
        return Value::from(i);
    }
    if let Ok(u) = n.parse::<u64>() {
        return Value::from(u);
    }
    let integer = n.bytes().all(|b| b.is_ascii_digit() || b == b'-');
    n.parse::<f64>()
        .ok()
        .filter(|_| !integer)
        .and_then(serde_json::Number::from_f64)
        .map_or_else(|| Value::String(n.to_owned()), Value::Number)
}

/// A DynamoDB attribute as a JSON value (numbers as [`number`] reads them; binary and sets
/// become arrays).
pub(crate) fn json_of(attribute: &AttributeValue) -> Value {
    match attribute {
        AttributeValue::S(s) => Value::String(s.clone()),
        AttributeValue::N(n) => number(n),
        AttributeValue::Bool(b) => Value::Bool(*b),
        AttributeValue::L(items) => Value::Array(items.iter().map(json_of).collect()),
        AttributeValue::M(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), json_of(v))).collect())
        }
        AttributeValue::Ss(items) => items.iter().cloned().map(Value::String).collect(),
        AttributeValue::Ns(items) => items
            .iter()
            .map(|n| json_of(&AttributeValue::N(n.clone())))
            .collect(),
        _ => Value::Null,
    }
}

/// Keyed state in a DynamoDB table (partition key `pk`, a string): the [`KeyedState`]
/// contract. A write is an `UpdateItem` conditional on the row's stored `(timestamp, id)`
/// being older than the event's, so an older or redelivered event changes nothing (and counts
/// as stale: the row's version is the inbox). A batch of writes sends the newest write of each
/// key alone ([`newest_per_key`]), the keys concurrently. Rows hold `pk`, `value` (the value
/// as a DynamoDB map), `timestamp`, `eventId`, optionally a `discriminator`, and for an
/// expiring row `expires` (ms) and `ttl` (seconds, for the table's time to live, which deletes
/// within a day or two; reads skip expired rows at once).
/// A scan reads the whole table (DynamoDB has no order over partition keys): for the command
/// and the console, not for a pipeline's hot path.
#[derive(Debug, Clone)]
pub struct DynamoDbState {
    client: Client,
    table: String,
    discriminator: Option<String>,
}

impl DynamoDbState {
    /// The state in `table`.
    pub fn new(config: &aws_config::SdkConfig, table: impl Into<String>) -> Self {
        DynamoDbState {
            client: Client::new(config),
            table: table.into(),
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

    /// Writes one row; `false` when the row held this version or a newer one.
    async fn write(&self, w: &StateWrite) -> Result<bool, Error> {
        let mut set = vec!["#v = :v", "#ts = :ts", "#id = :id"];
        let mut request = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(w.key.clone()))
            .condition_expression(
                "attribute_not_exists(#ts) OR #ts < :ts OR (#ts = :ts AND #id < :id)",
            )
            .expression_attribute_names("#v", "value")
            .expression_attribute_names("#ts", "timestamp")
            .expression_attribute_names("#id", "eventId")
            .expression_attribute_values(":v", attribute(&w.value))
            .expression_attribute_values(":ts", AttributeValue::N(w.version.timestamp.to_string()))
            .expression_attribute_values(":id", AttributeValue::S(w.version.id.clone()));
        if let Some(d) = &self.discriminator {
            set.push("#d = :d");
            request = request
                .expression_attribute_names("#d", "discriminator")
                .expression_attribute_values(":d", AttributeValue::S(d.clone()));
        }
        let mut remove = "";
        request = match w.expires_at {
            Some(at) => {
                set.push("#x = :x");
                set.push("#ttl = :ttl");
                request
                    .expression_attribute_names("#x", "expires")
                    .expression_attribute_names("#ttl", "ttl")
                    .expression_attribute_values(":x", AttributeValue::N(at.to_string()))
                    .expression_attribute_values(
                        ":ttl",
                        AttributeValue::N(at.div_euclid(1000).to_string()),
                    )
            }
            None => {
                remove = " REMOVE #x, #ttl";
                request
                    .expression_attribute_names("#x", "expires")
                    .expression_attribute_names("#ttl", "ttl")
            }
        };
        let expression = format!("SET {}{remove}", set.join(", "));
        // Not applied: an older or the same event, and latest-wins says nothing changes.
        applied(request.update_expression(expression).send().await)
    }

    /// Every row the scan's filter admits, all pages.
    async fn scan_all(&self, scan: &Scan) -> Result<Vec<StateRow>, Error> {
        let now = now_millis();
        let mut request = self
            .client
            .scan()
            .table_name(&self.table)
            .consistent_read(true);
        if !scan.prefix.is_empty() {
            request = request
                .filter_expression("begins_with(pk, :p)")
                .expression_attribute_values(":p", AttributeValue::S(scan.prefix.clone()));
        }
        let mut rows: Vec<StateRow> = crate::scan_items(request)
            .await?
            .iter()
            .filter_map(row_of)
            .filter(|r| scan.admits(&r.key) && !r.expired(now))
            .collect();
        rows.sort_by(|a, b| a.key.cmp(&b.key));
        rows.truncate(scan.limit);
        Ok(rows)
    }
}

/// A stored item as a row; `None` for an item without the row's attributes.
fn row_of(item: &HashMap<String, AttributeValue>) -> Option<StateRow> {
    let text = |name: &str| match item.get(name) {
        Some(AttributeValue::S(s)) => Some(s.clone()),
        _ => None,
    };
    let number = |name: &str| match item.get(name) {
        Some(AttributeValue::N(n)) => n.parse::<i64>().ok(),
        _ => None,
    };
    Some(StateRow {
        key: text("pk")?,
        version: Version {
            timestamp: number("timestamp")?,
            id: text("eventId")?,
        },
        value: item.get("value").map_or(Value::Null, json_of),
        expires_at: number("expires"),
    })
}

fn boxed(e: Error) -> BoxError {
    Box::new(e)
}

impl KeyedState for DynamoDbState {
    fn name(&self) -> &str {
        &self.table
    }

    fn apply<'a>(&'a self, writes: &'a [StateWrite]) -> HubFuture<'a, Applied> {
        Box::pin(async move {
            // The newest write of each key alone, the keys concurrently: a row is never
            // written twice at once, so the stored version only grows.
            let (newest, superseded) = newest_per_key(writes, |w| &w.key, |w| &w.version);
            let sends: Vec<_> = newest.into_iter().map(|w| self.write(w)).collect();
            let results: Vec<Result<bool, Error>> = stream::iter(sends)
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
            let mut applied = superseded;
            for result in results {
                applied.count(result.map_err(boxed)?);
            }
            Ok(applied)
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> HubFuture<'a, Option<StateRow>> {
        Box::pin(async move {
            let out = self
                .client
                .get_item()
                .table_name(&self.table)
                .key("pk", AttributeValue::S(key.to_owned()))
                .consistent_read(true)
                .send()
                .await
                .map_err(|e| boxed(classify(e)))?;
            let now = now_millis();
            Ok(out.item().and_then(row_of).filter(|r| !r.expired(now)))
        })
    }

    fn scan<'a>(&'a self, scan: &'a Scan) -> HubFuture<'a, Vec<StateRow>> {
        Box::pin(async move { self.scan_all(scan).await.map_err(boxed) })
    }

    fn expire(&self, now: i64) -> HubFuture<'_, u64> {
        Box::pin(async move {
            let request = self
                .client
                .scan()
                .table_name(&self.table)
                .filter_expression("#x <= :now")
                .expression_attribute_names("#x", "expires")
                .expression_attribute_values(":now", AttributeValue::N(now.to_string()));
            let mut expired = 0;
            for row in crate::scan_items(request)
                .await
                .map_err(boxed)?
                .iter()
                .filter_map(row_of)
            {
                let deleted = self
                    .client
                    .delete_item()
                    .table_name(&self.table)
                    .key("pk", AttributeValue::S(row.key))
                    .condition_expression("#x <= :now")
                    .expression_attribute_names("#x", "expires")
                    .expression_attribute_values(":now", AttributeValue::N(now.to_string()))
                    .send()
                    .await;
                match deleted {
                    Ok(_) => expired += 1,
                    // Written again meanwhile: no longer expired.
                    Err(e)
                        if e.as_service_error()
                            .is_some_and(|s| s.is_conditional_check_failed_exception()) => {}
                    Err(e) => return Err(boxed(classify(e))),
                }
            }
            Ok(expired)
        })
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
            state: DynamoDbState::new(config, table),
            key: Arc::new(key),
            value: Arc::new(value),
        }
    }

    /// Writes a `discriminator` attribute with this value on every row: the kind of row, from
    /// which change data capture names its events (`{discriminator}-created`, ...).
    #[must_use]
    pub fn discriminator(mut self, discriminator: impl Into<String>) -> Self {
        self.state = self.state.discriminator(discriminator);
        self
    }

    /// The keyed state the view writes.
    pub fn state(&self) -> &DynamoDbState {
        &self.state
    }

    async fn write_all(&self, batch: Batch) -> Result<Delivery, Error> {
        deliver_each(&batch, CONCURRENCY, |uow| async {
            let event = uow.event();
            let write =
                StateWrite::new((self.key)(event)?, Version::of(event), (self.value)(event)?);
            self.state.write(&write).await.map(|_| ())
        })
        .await
    }
}

/// Writes in flight per batch.
const CONCURRENCY: usize = 32;

floodway::impl_sink!(DynamoDbView, write_all);

#[cfg(test)]
mod tests {
    use super::*;

    /// Numbers come back as they were stored: 64-bit integers of either sign exactly, larger
    /// ones as their text, fractions as doubles.
    #[test]
    fn numbers_read_back_exactly_where_json_can_hold_them() {
        let n = |text: &str| json_of(&AttributeValue::N(text.into()));
        assert_eq!(n("-12"), serde_json::json!(-12));
        assert_eq!(n("18446744073709551615"), serde_json::json!(u64::MAX));
        assert_eq!(
            n("123456789012345678901234567890"),
            serde_json::json!("123456789012345678901234567890")
        );
        assert_eq!(n("2.5"), serde_json::json!(2.5));
    }
}
