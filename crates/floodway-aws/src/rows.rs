//! Rows by update requests ([`floodway::rows`]) in a DynamoDB single table.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem};
use aws_sdk_dynamodb::Client;
use floodway::event::now_millis;
use floodway::hub::HubFuture;
use floodway::idempotence::Version;
use floodway::rows::{merge_with, Outcome, Row, RowKey, RowMeta, RowQuery, RowStore, Update};
use floodway::{BoxError, Error};
use futures_util::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::classify::{cancellation, cancellation_reasons, classify};
use crate::dynamodb::{attribute, json_of};

/// The attribute holding what keeps a row order-tolerant (its versions), as JSON text.
const META: &str = floodway::rows::STORE_ATTRIBUTE;

/// How long the inbox remembers an event that added to a counter.
const INBOX_TTL_MS: i64 = 7 * 24 * 3600 * 1000;

/// Attempts of an update that meets a concurrent write of its row.
const ATTEMPTS: usize = 10;

/// Updates in flight per batch (rows of different keys).
const CONCURRENCY: usize = 32;

/// Rows in a DynamoDB single table (partition key `pk`, sort key `sk`, both strings): the
/// [`RowStore`] contract, by the same merge rule as every other store.
///
/// An update reads its row (consistently), merges, and puts the result on the condition that
/// the row is as it was read (its `floodway` attribute, or absent), retrying on a concurrent
/// write: the per-field rule needs the versions the row keeps, which an update expression
/// cannot compare field by field. An update that adds to a counter, the one write a repeat
/// would apply twice, also puts an inbox item (`pk = inbox#{pk}`, `sk = {sk}#{event id}`; for
/// an event id holding `#` or `\`, `pk = inboxesc#{pk}` and both escaped; expiring after 7
/// days) in the same transaction; every other write is idempotent by the versions alone.
///
/// Items carry what DynamoDB Streams change data capture needs, so the table's stream is its
/// outbox ([`floodway_lambda`'s `CdcOptions`]): `discriminator`, `timestamp` (ms), `ttl`
/// (seconds, for the table's time to live), `awsregion` (so a global table's replicas are
/// skipped), `deleted: true` on a deleted row (kept as a tombstone, so an older write cannot
/// bring it back; change data capture names it `-deleted`), and `latched: true` when the
/// writer is a listener whose rows must not become events again (aws-lambda-stream's
/// convention). Inbox items are always latched.
#[derive(Debug, Clone)]
pub struct DynamoDbRows {
    client: Client,
    table: String,
    region: Option<String>,
    latched: bool,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    /// The row's version.
    v: Version,
    /// Its per-field versions.
    m: RowMeta,
    /// When it expires (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x: Option<i64>,
    /// A revision every put changes, which the next put's condition names: a write that
    /// changes neither the row's version nor its fields' (an older event's count) still
    /// conflicts with a concurrent one.
    #[serde(default)]
    r: u64,
}

impl DynamoDbRows {
    /// The rows of `table`, written with `awsregion` set to `config`'s region.
    pub fn new(config: &aws_config::SdkConfig, table: impl Into<String>) -> Self {
        DynamoDbRows {
            client: Client::new(config),
            table: table.into(),
            region: config.region().map(ToString::to_string),
            latched: false,
        }
    }

    /// Marks every row written `latched: true`: a listener's rows, which change data capture
    /// on this table skips.
    #[must_use]
    pub fn latched(mut self, latched: bool) -> Self {
        self.latched = latched;
        self
    }

    fn key(key: &RowKey) -> HashMap<String, AttributeValue> {
        HashMap::from([
            ("pk".to_owned(), AttributeValue::S(key.pk.clone())),
            ("sk".to_owned(), AttributeValue::S(key.sk.clone())),
        ])
    }

    /// The row at `key` as stored (tombstones and expired rows too), and its `floodway`
    /// attribute as read.
    async fn read(&self, key: &RowKey) -> Result<(Option<Row>, Option<String>), Error> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(key)))
            .consistent_read(true)
            .send()
            .await
            .map_err(classify)?;
        let Some(item) = out.item() else {
            return Ok((None, None));
        };
        let meta = match item.get(META) {
            Some(AttributeValue::S(s)) => Some(s.clone()),
            _ => None,
        };
        match row_of(item) {
            Some(row) => Ok((Some(row), meta)),
            // An item this store did not write (or cannot read): never overwritten.
            None => Err(Error::poison_msg(
                "ForeignItem",
                format!(
                    "item {key} of {} has no readable `{META}` attribute: it was not written \
                     as a row of update requests",
                    self.table
                ),
            )),
        }
    }

    fn item(&self, row: &Row, revision: u64) -> Result<HashMap<String, AttributeValue>, Error> {
        let mut item: HashMap<String, AttributeValue> = row
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), attribute(v)))
            .collect();
        item.extend(Self::key(&row.key));
        if let Some(d) = &row.discriminator {
            item.insert("discriminator".into(), AttributeValue::S(d.clone()));
        }
        item.insert(
            "timestamp".into(),
            AttributeValue::N(row.version.timestamp.to_string()),
        );
        if let Some(at) = row.expires_at {
            item.insert(
                "ttl".into(),
                AttributeValue::N(at.div_euclid(1000).to_string()),
            );
        }
        if let Some(region) = &self.region {
            item.insert("awsregion".into(), AttributeValue::S(region.clone()));
        }
        if self.latched {
            item.insert("latched".into(), AttributeValue::Bool(true));
        }
        if !row.live() {
            item.insert("deleted".into(), AttributeValue::Bool(true));
        }
        let stored = Stored {
            v: row.version.clone(),
            m: row.stored_meta(),
            x: row.expires_at,
            r: revision,
        };
        let text = serde_json::to_string(&stored)
            .map_err(|e| Error::poison_msg("InvalidRow", e.to_string()))?;
        item.insert(META.into(), AttributeValue::S(text));
        Ok(item)
    }

    /// Applies one update (and its fallback), retrying when the row changes under it.
    async fn apply_one(&self, u: &Update) -> Result<Outcome, Error> {
        let mut update = u.clone();
        let mut first: Option<Outcome> = None;
        'next: loop {
            for _ in 0..ATTEMPTS {
                let (row, seen) = self.read(&update.key).await?;
                let merged = merge_with(row.as_ref(), &update, now_millis(), false);
                let outcome = merged.outcome.clone();
                // A fault, or a repeat (of the update, or of the fallback it wrote before),
                // is what the update did, whichever row said so; but an update applied and
                // overwritten since reads as stale, and its inbox item tells the repeat.
                if let Outcome::Faulted(_) = outcome {
                    if self.inboxed(&update).await? {
                        return Ok(Outcome::Duplicate);
                    }
                    return Ok(outcome);
                }
                if outcome == Outcome::Duplicate {
                    return Ok(outcome);
                }
                if let Some(next) = &merged.row {
                    match self.put(&update, next, seen.as_deref()).await? {
                        Put2::Done => {}
                        Put2::Duplicate => return Ok(Outcome::Duplicate),
                        Put2::Conflict => continue,
                    }
                }
                let outcome = first.get_or_insert(outcome).clone();
                match merged.fallback {
                    Some(fallback) => {
                        update = fallback;
                        continue 'next;
                    }
                    None => return Ok(outcome),
                }
            }
            return Err(Error::transient_msg(
                "RowContention",
                format!(
                    "row {} changed under {ATTEMPTS} attempts to update it",
                    update.key
                ),
            ));
        }
    }

    /// Whether `u` put its inbox item (it was applied; see [`Self::put`]).
    async fn inboxed(&self, u: &Update) -> Result<bool, Error> {
        let item = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(inbox_pk(u)))
            .key("sk", AttributeValue::S(inbox_sk(u)))
            .consistent_read(true)
            .send()
            .await
            .map_err(classify)?;
        Ok(item.item().is_some())
    }

    async fn put(&self, u: &Update, row: &Row, seen: Option<&str>) -> Result<Put2, Error> {
        let revision = seen
            .and_then(|m| serde_json::from_str::<Stored>(m).ok())
            .map_or(0, |s| s.r.wrapping_add(1));
        let item = self.item(row, revision)?;
        let mut put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .expression_attribute_names("#m", META);
        put = match seen {
            Some(meta) => put
                .condition_expression("#m = :m")
                .expression_attribute_values(":m", AttributeValue::S(meta.to_owned())),
            None => put.condition_expression("attribute_not_exists(#m)"),
        };
        let put = put
            .build()
            .map_err(|e| Error::poison_msg("InvalidRow", e.to_string()))?;
        // The versions recognise a repeat of anything but a count, and of an update since
        // overtaken (stale): those whose repeat must not count twice, fault again or write
        // their fallback again take an inbox item.
        let counts = u.add.iter().any(|(_, v)| v.is_number())
            || !matches!(u.stale, floodway::rows::Stale::Drop);
        if !counts {
            let request = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(put.item().clone()))
                .set_condition_expression(Some(
                    put.condition_expression().unwrap_or_default().to_owned(),
                ))
                .set_expression_attribute_names(put.expression_attribute_names().cloned())
                .set_expression_attribute_values(put.expression_attribute_values().cloned());
            return match request.send().await {
                Ok(_) => Ok(Put2::Done),
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
                {
                    Ok(Put2::Conflict)
                }
                Err(e) => Err(classify(e)),
            };
        }
        let now = now_millis();
        let inbox = Put::builder()
            .table_name(&self.table)
            .item("pk", AttributeValue::S(inbox_pk(u)))
            .item("sk", AttributeValue::S(inbox_sk(u)))
            .item("discriminator", AttributeValue::S("inbox".into()))
            .item("latched", AttributeValue::Bool(true))
            .item(
                "ttl",
                AttributeValue::N(((now + INBOX_TTL_MS) / 1000).to_string()),
            )
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map_err(|e| Error::poison_msg("InvalidRow", e.to_string()))?;
        let sent = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().put(put).build())
            .transact_items(TransactWriteItem::builder().put(inbox).build())
            .send()
            .await;
        match sent {
            Ok(_) => Ok(Put2::Done),
            Err(e) => {
                let cancelled = cancellation_reasons(&e);
                let reasons = cancelled.clone().unwrap_or_default();
                let reason = |i: usize| reasons.get(i).and_then(Option::as_deref);
                let conflict = e
                    .as_service_error()
                    .is_some_and(|s| s.is_transaction_in_progress_exception());
                if reason(1) == Some("ConditionalCheckFailed") {
                    Ok(Put2::Duplicate)
                } else if conflict
                    || reason(0) == Some("ConditionalCheckFailed")
                    || reasons.iter().flatten().any(|c| c == "TransactionConflict")
                {
                    Ok(Put2::Conflict)
                } else if let Some(reasons) = cancelled {
                    // Throttled, or rejected: the cancellation says which by its reasons.
                    Err(cancellation(&reasons))
                } else {
                    Err(classify(e))
                }
            }
        }
    }
}

enum Put2 {
    Done,
    Duplicate,
    Conflict,
}

/// A stored item as a row (tombstones included); `None` for an item that is not one.
fn row_of(item: &HashMap<String, AttributeValue>) -> Option<Row> {
    let text = |name: &str| match item.get(name) {
        Some(AttributeValue::S(s)) => Some(s.clone()),
        _ => None,
    };
    let stored: Stored = serde_json::from_str(&text(META)?).ok()?;
    const OWN: [&str; 8] = [
        "pk",
        "sk",
        "discriminator",
        "timestamp",
        "ttl",
        "awsregion",
        "latched",
        "deleted",
    ];
    let fields: Map<String, Value> = item
        .iter()
        .filter(|(k, _)| k.as_str() != META && !OWN.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), json_of(v)))
        .collect();
    let mut row = Row {
        key: RowKey::new(text("pk")?, text("sk")?),
        discriminator: text("discriminator"),
        fields,
        version: stored.v,
        expires_at: stored.x,
        meta: stored.m,
    };
    row.restore_meta();
    Some(row)
}

fn boxed(e: Error) -> BoxError {
    Box::new(e)
}

impl RowStore for DynamoDbRows {
    fn name(&self) -> &str {
        &self.table
    }

    fn update<'a>(&'a self, updates: &'a [Update]) -> HubFuture<'a, Vec<Outcome>> {
        Box::pin(async move {
            // Rows concurrently, the updates of one row one after another, in order.
            let mut index: HashMap<&RowKey, usize> = HashMap::new();
            let mut by_row: Vec<Vec<usize>> = Vec::new();
            for (i, u) in updates.iter().enumerate() {
                let at = *index.entry(&u.key).or_insert_with(|| {
                    by_row.push(Vec::new());
                    by_row.len() - 1
                });
                by_row[at].push(i);
            }
            let rows = by_row.into_iter().map(|list| async move {
                let mut done = Vec::with_capacity(list.len());
                for i in list {
                    done.push((i, self.apply_one(&updates[i]).await?));
                }
                Ok::<_, Error>(done)
            });
            let results: Vec<Result<Vec<(usize, Outcome)>, Error>> = stream::iter(rows)
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
            let mut outcomes = vec![Outcome::Duplicate; updates.len()];
            for result in results {
                for (i, outcome) in result.map_err(boxed)? {
                    outcomes[i] = outcome;
                }
            }
            Ok(outcomes)
        })
    }

    fn get<'a>(&'a self, key: &'a RowKey) -> HubFuture<'a, Option<Row>> {
        Box::pin(async move {
            let (row, _) = self.read(key).await.map_err(boxed)?;
            let now = now_millis();
            Ok(row.filter(|r| r.live() && !r.expired(now)))
        })
    }

    fn query<'a>(&'a self, query: &'a RowQuery) -> HubFuture<'a, Vec<Row>> {
        Box::pin(async move {
            let now = now_millis();
            let mut request = self
                .client
                .query()
                .table_name(&self.table)
                .consistent_read(true)
                .expression_attribute_names("#pk", "pk")
                .expression_attribute_values(":pk", AttributeValue::S(query.pk.clone()));
            request = match &query.after {
                Some(after) if after.as_str() >= query.sk_prefix.as_str() => request
                    .key_condition_expression("#pk = :pk AND #sk > :after")
                    .expression_attribute_names("#sk", "sk")
                    .expression_attribute_values(":after", AttributeValue::S(after.clone())),
                _ if query.sk_prefix.is_empty() => request.key_condition_expression("#pk = :pk"),
                _ => request
                    .key_condition_expression("#pk = :pk AND begins_with(#sk, :prefix)")
                    .expression_attribute_names("#sk", "sk")
                    .expression_attribute_values(
                        ":prefix",
                        AttributeValue::S(query.sk_prefix.clone()),
                    ),
            };
            let mut rows = Vec::new();
            let mut start = None;
            'pages: loop {
                let page = request
                    .clone()
                    .set_exclusive_start_key(start)
                    .send()
                    .await
                    .map_err(|e| boxed(classify(e)))?;
                for item in page.items() {
                    let Some(row) = row_of(item) else { continue };
                    if !row.key.sk.starts_with(&query.sk_prefix) {
                        if row.key.sk.as_str() > query.sk_prefix.as_str() {
                            break 'pages;
                        }
                        continue;
                    }
                    if query.admits(&row.key) && row.live() && !row.expired(now) {
                        rows.push(row);
                        if rows.len() == query.limit {
                            break 'pages;
                        }
                    }
                }
                match page.last_evaluated_key() {
                    Some(key) => start = Some(key.clone()),
                    None => break,
                }
            }
            Ok(rows)
        })
    }
}

/// Whether an update's event id holds a character that can make two inbox items' keys one:
/// `#` (or `\`). Such ids are kept apart from the others (see [`inbox_pk`]).
fn odd_id(u: &Update) -> bool {
    u.version.id.contains(['#', '\\'])
}

/// The inbox item's partition key: `inbox#{pk}`, or `inboxesc#{pk}` for an event id holding
/// `#` or `\` ([`inbox_sk`]).
fn inbox_pk(u: &Update) -> String {
    match odd_id(u) {
        false => format!("inbox#{}", u.key.pk),
        true => format!("inboxesc#{}", u.key.pk),
    }
}

/// The inbox item's sort key: `{sk}#{event id}`, where the last `#` ends the row's key since
/// the id holds none; with an id that does, the two are escaped (`\` and `#` preceded by `\`),
/// so the first bare `#` ends the row's key, under a partition key of their own. Keys of ids
/// without either (nearly all) are as they always were: an item written before is found.
fn inbox_sk(u: &Update) -> String {
    let (sk, id) = (u.key.sk.as_str(), u.version.id.as_str());
    if !odd_id(u) {
        return format!("{sk}#{id}");
    }
    let mut out = String::with_capacity(sk.len() + id.len() + 8);
    let escape = |out: &mut String, text: &str| {
        for c in text.chars() {
            if c == '\\' || c == '#' {
                out.push('\\');
            }
            out.push(c);
        }
    };
    escape(&mut out, sk);
    out.push('#');
    escape(&mut out, id);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use floodway::idempotence::Version;
    use floodway::rows::RowKey;

    /// Inbox items of ids without `#` or `\` keep the keys they always had (an item written
    /// before an upgrade is found after it); the others are escaped, under keys of their own.
    #[test]
    fn inbox_keys_are_as_before_for_plain_ids() {
        let update = |sk: &str, id: &str| {
            let version = Version {
                timestamp: 1,
                id: id.into(),
            };
            Update::new(RowKey::new("p", sk), version)
        };
        let plain = update("item#1", "e-1");
        assert_eq!(
            (inbox_pk(&plain), inbox_sk(&plain)),
            ("inbox#p".into(), "item#1#e-1".into())
        );
        let odd = update("a#b", "c#d");
        assert_eq!(
            (inbox_pk(&odd), inbox_sk(&odd)),
            ("inboxesc#p".into(), "a\\#b#c\\#d".into())
        );
    }
}
