//! Faults on AWS: stores for a fault monitor (DynamoDB, S3), and resubmission by invoking
//! the function that failed a fault again.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem, Update};
use aws_sdk_lambda::primitives::Blob;
use floodway::fault_store::{
    FaultFilter, FaultStatus, FaultStore, Resubmission, ResubmitOutcome, StoredFault,
};
use floodway::hub::HubFuture;
use floodway::sink::deliver_each;
use floodway::{Batch, Delivery, Error, Event};
use serde_json::Value;

use crate::classify::{applied, cancellation, cancellation_reasons, classify};

fn tag(fault: &Event, name: &str) -> String {
    fault.tag(name).unwrap_or("unknown").to_owned()
}

/// Stores fault events in a DynamoDB table (partition key `pk`, a string): one item per fault
/// (its fault id) with processor, pipeline, step, the latest error, the fault event, first and
/// last seen, how many times it was raised and its latest 30 resubmissions (each detail cut to
/// 1 KiB, so that the item stays under DynamoDB's 400 KB); and one small item per raise
/// (`raise#<event id>`, with an `expiresAt` time in seconds for the table's TTL) so that a
/// raise stored twice counts once. A raise is stored in one transaction with its fault. The
/// sink of a fault monitor's pipeline, and a [`FaultStore`].
#[derive(Debug, Clone)]
pub struct DynamoDbFaults {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

/// How long a raise is remembered (a redelivered fault event comes within minutes).
const RAISE_MEMORY_SECS: i64 = 24 * 3600;

/// The key prefix of raise items.
const RAISE_PREFIX: &str = "raise#";

/// The resubmissions a fault's item keeps, the latest (each entry's detail at most 1 KiB):
/// with a fault fitted to 350 KiB, the item stays under DynamoDB's 400 KB.
const RESUBMISSIONS_KEPT: usize = 30;

/// The most of a resubmission's detail a fault's item keeps.
const DETAIL_KEPT: usize = 1024;

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: i64) -> AttributeValue {
    AttributeValue::N(v.to_string())
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
        if !fault.is_fault() {
            return Err(Error::poison_msg(
                "NotAFault",
                format!(
                    "event {} is of type `{}`, not a fault",
                    fault.id(),
                    fault.event_type()
                ),
            ));
        }
        // An item holds 400 KB at most.
        let fault = &floodway::fault::fit(&floodway::fault::normalized(fault), 350 * 1024);
        let details: floodway::fault::FaultDetails = fault.payload()?;
        let id = floodway::fault::fault_id(fault).to_owned();
        // The message again beside the fault, for lists: short, so the two fit in an item.
        let message = floodway::fault::clipped(&details.err.message, 4096);
        let now = floodway::event::now_millis();
        let marker = Put::builder()
            .table_name(&self.table)
            .item("pk", s(format!("{RAISE_PREFIX}{}", fault.id())))
            .item("fault", s(&id))
            .item("expiresAt", n(now / 1000 + RAISE_MEMORY_SECS))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map_err(|e| Error::fatal_msg("DynamoDbRequest", e.to_string()))?;
        let count = Update::builder()
            .table_name(&self.table)
            .key("pk", s(&id))
            .update_expression(
                "SET processor = :p, pipeline = :pl, step = :s, lastSeen = :now, \
                 firstSeen = if_not_exists(firstSeen, :now), \
                 errorName = if_not_exists(errorName, :n), \
                 errorClass = if_not_exists(errorClass, :c), \
                 message = if_not_exists(message, :m), fault = if_not_exists(fault, :f) \
                 ADD raised :one",
            )
            .expression_attribute_values(":p", s(tag(fault, "processor")))
            .expression_attribute_values(":pl", s(tag(fault, "pipeline")))
            .expression_attribute_values(":s", s(tag(fault, "step")))
            .expression_attribute_values(":now", n(now))
            .expression_attribute_values(":n", s(&details.err.name))
            .expression_attribute_values(":c", s(&details.err.class))
            .expression_attribute_values(":m", s(&*message))
            .expression_attribute_values(":f", s(fault.to_json()))
            .expression_attribute_values(":one", n(1))
            .build()
            .map_err(|e| Error::fatal_msg("DynamoDbRequest", e.to_string()))?;
        let counted = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().put(marker).build())
            .transact_items(TransactWriteItem::builder().update(count).build())
            .send()
            .await;
        if let Err(e) = counted {
            match cancellation_reasons(&e) {
                // The marker exists: this raise was counted before. What follows may not have
                // been done then (the store failed in between), and is idempotent: done again.
                Some(reasons)
                    if reasons.first().cloned().flatten().as_deref()
                        == Some("ConditionalCheckFailed") => {}
                // Throttled, in conflict with another raise of the fault, or rejected.
                Some(reasons) => return Err(cancellation(&reasons)),
                None => return Err(classify(e)),
            }
        }
        // Raised after its last successful resubmission (or never resolved): open again,
        // with this raise's error. A copy of an older raise only counts.
        let latest = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(&id))
            .update_expression(
                "SET lastRaised = :t, errorName = :n, errorClass = :c, message = :m, fault = :f",
            )
            .condition_expression(
                "(attribute_not_exists(resolvedAt) OR resolvedAt < :t) \
                 AND (attribute_not_exists(lastRaised) OR lastRaised <= :t)",
            )
            .expression_attribute_values(":t", n(fault.timestamp()))
            .expression_attribute_values(":n", s(&details.err.name))
            .expression_attribute_values(":c", s(&details.err.class))
            .expression_attribute_values(":m", s(&*message))
            .expression_attribute_values(":f", s(fault.to_json()))
            .send()
            .await;
        applied(latest).map(drop)
    }

    fn stored(item: &HashMap<String, AttributeValue>) -> Option<StoredFault> {
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
        let fault = Event::decode(text("fault").as_bytes()).ok()?;
        let resolved = number("resolvedAt");
        Some(StoredFault {
            id: text("pk"),
            processor: text("processor"),
            pipeline: text("pipeline"),
            step: text("step"),
            name: text("errorName"),
            class: text("errorClass"),
            message: text("message"),
            first_seen: number("firstSeen"),
            last_seen: number("lastSeen"),
            seen: number("raised") as u64,
            status: if resolved == 0 || number("lastRaised") > resolved {
                FaultStatus::Open
            } else {
                FaultStatus::Resolved
            },
            fault,
        })
    }

    /// Every stored fault (a scan), newest first.
    ///
    /// # Errors
    /// When DynamoDB fails.
    pub async fn list(&self) -> Result<Vec<StoredFault>, Error> {
        self.scan(&FaultFilter::default()).await
    }

    async fn scan(&self, filter: &FaultFilter) -> Result<Vec<StoredFault>, Error> {
        // Read strongly: a fault stored a moment ago is listed, and resubmitted.
        let request = self
            .client
            .scan()
            .table_name(&self.table)
            .consistent_read(true);
        let mut out: Vec<StoredFault> = crate::scan_items(request)
            .await?
            .iter()
            .filter_map(Self::stored)
            .filter(|f| filter.admits(f))
            .collect();
        out.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then(a.id.cmp(&b.id)));
        out.truncate(filter.limit.unwrap_or(usize::MAX));
        Ok(out)
    }

    async fn item(&self, id: &str) -> Result<Option<HashMap<String, AttributeValue>>, Error> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", s(id))
            .consistent_read(true)
            .send()
            .await
            .map_err(classify)?;
        Ok(out.item().cloned())
    }

    async fn record(&self, id: &str, outcome: ResubmitOutcome, detail: &str) -> Result<(), Error> {
        // The fault's item holds its history, and an item is at most 400 KB: each entry's
        // detail is clipped and the latest RESUBMISSIONS_KEPT kept, so that a long history
        // never keeps the fault from being raised again (its update would be refused).
        let detail = floodway::fault::clipped(detail, DETAIL_KEPT);
        let entry = |at: i64| {
            AttributeValue::M(HashMap::from([
                ("at".to_owned(), n(at)),
                ("outcome".to_owned(), s(outcome.as_str())),
                ("detail".to_owned(), s(detail.as_ref())),
            ]))
        };
        // A history read, then written whole on the condition that no entry came since: two
        // recordings at once do not lose one.
        for _ in 0..5 {
            let history = self.resubmissions(id).await?;
            // Two resubmissions in one millisecond keep their order.
            let last = history.last().map_or(0, |r| r.at + 1);
            let now = floodway::event::now_millis().max(last);
            let mut update = self
                .client
                .update_item()
                .table_name(&self.table)
                .key("pk", s(id));
            // Entries kept from before details were clipped are clipped when it is rewritten.
            let clipped = |r: &Resubmission| r.detail.len() <= DETAIL_KEPT + " [cut]".len();
            let mut set = if history.len() < RESUBMISSIONS_KEPT && history.iter().all(clipped) {
                update = update
                    .expression_attribute_values(":e", AttributeValue::L(vec![entry(now)]))
                    .expression_attribute_values(":empty", AttributeValue::L(Vec::new()));
                "SET resubmissions = list_append(if_not_exists(resubmissions, :empty), :e)"
                    .to_owned()
            } else {
                let from = (history.len() + 1).saturating_sub(RESUBMISSIONS_KEPT);
                let kept = history[from..]
                    .iter()
                    .map(|r| {
                        AttributeValue::M(HashMap::from([
                            ("at".to_owned(), n(r.at)),
                            ("outcome".to_owned(), s(&r.outcome)),
                            (
                                "detail".to_owned(),
                                s(floodway::fault::clipped(&r.detail, DETAIL_KEPT).as_ref()),
                            ),
                        ]))
                    })
                    .chain([entry(now)])
                    .collect();
                // Unchanged since it was read: as long, and with the same last entry (at the
                // cap, every rewrite is as long as the one before).
                let newest = history.len().saturating_sub(1);
                update = update
                    .expression_attribute_values(":all", AttributeValue::L(kept))
                    .expression_attribute_values(":len", n(history.len() as i64))
                    .expression_attribute_values(":last", n(history.last().map_or(0, |r| r.at)))
                    .expression_attribute_names("#at", "at")
                    .condition_expression(format!(
                        "size(resubmissions) = :len AND resubmissions[{newest}].#at = :last"
                    ));
                "SET resubmissions = :all".to_owned()
            };
            if outcome == ResubmitOutcome::Succeeded {
                set.push_str(", resolvedAt = :now");
                update = update.expression_attribute_values(":now", n(now));
            }
            if applied(update.update_expression(set).send().await)? {
                return self.release(id).await;
            }
        }
        Err(Error::transient_msg(
            "AwsUnavailable",
            format!("the resubmissions of fault {id} kept changing while one was recorded"),
        ))
    }

    /// Releases this process's claim on fault `id`'s resubmission, if it still holds it (not
    /// one another process took after this one's expired).
    async fn release(&self, id: &str) -> Result<(), Error> {
        let released = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(id))
            .update_expression("REMOVE claimBy, claimUntil")
            .condition_expression("claimBy = :me")
            .expression_attribute_values(":me", s(floodway::fault_store::claimant()))
            .send()
            .await;
        applied(released).map(drop)
    }

    async fn resubmissions(&self, id: &str) -> Result<Vec<Resubmission>, Error> {
        let Some(item) = self.item(id).await? else {
            return Ok(Vec::new());
        };
        let entries = item
            .get("resubmissions")
            .and_then(|v| v.as_l().ok())
            .cloned()
            .unwrap_or_default();
        Ok(entries
            .iter()
            .filter_map(|e| {
                let m = e.as_m().ok()?;
                let get = |k: &str| m.get(k).and_then(|v| v.as_s().ok()).cloned();
                Some(Resubmission {
                    at: m.get("at")?.as_n().ok()?.parse().ok()?,
                    outcome: get("outcome")?,
                    detail: get("detail").unwrap_or_default(),
                })
            })
            .collect())
    }
}

impl FaultStore for DynamoDbFaults {
    fn store_faults<'a>(&'a self, faults: &'a [Event]) -> HubFuture<'a, ()> {
        Box::pin(async move {
            for fault in faults {
                self.store(fault).await?;
            }
            Ok(())
        })
    }

    fn list_faults<'a>(&'a self, filter: &'a FaultFilter) -> HubFuture<'a, Vec<StoredFault>> {
        Box::pin(async move { Ok(self.scan(filter).await?) })
    }

    fn fault<'a>(&'a self, id: &'a str) -> HubFuture<'a, Option<StoredFault>> {
        Box::pin(async move { Ok(self.item(id).await?.as_ref().and_then(Self::stored)) })
    }

    fn record_resubmission_of<'a>(
        &'a self,
        id: &'a str,
        outcome: ResubmitOutcome,
        detail: &'a str,
    ) -> HubFuture<'a, ()> {
        Box::pin(async move { Ok(self.record(id, outcome, detail).await?) })
    }

    fn resubmissions_of<'a>(&'a self, id: &'a str) -> HubFuture<'a, Vec<Resubmission>> {
        Box::pin(async move { Ok(self.resubmissions(id).await?) })
    }

    fn claim_resubmission<'a>(
        &'a self,
        id: &'a str,
        claimant: &'a str,
        lease: std::time::Duration,
    ) -> HubFuture<'a, bool> {
        Box::pin(async move {
            let now = floodway::event::now_millis();
            let until = now.saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX));
            // Open (never resolved, or raised since), and not claimed by another unless that
            // claim has expired: one conditional write decides.
            let claimed = self
                .client
                .update_item()
                .table_name(&self.table)
                .key("pk", s(id))
                .update_expression("SET claimBy = :by, claimUntil = :until")
                .condition_expression(
                    "attribute_exists(fault) \
                     AND (attribute_not_exists(resolvedAt) OR lastRaised > resolvedAt) \
                     AND (attribute_not_exists(claimUntil) OR claimUntil <= :now \
                          OR claimBy = :by)",
                )
                .expression_attribute_values(":by", s(claimant))
                .expression_attribute_values(":until", n(until))
                .expression_attribute_values(":now", n(now))
                .send()
                .await;
            Ok(applied(claimed)?)
        })
    }
}

/// Stores fault events as S3 objects `{prefix}/{processor}/{pipeline}/{id}.json` (a fault
/// stored again overwrites its object). The sink of a fault monitor's pipeline.
#[derive(Debug, Clone)]
pub struct S3Faults {
    objects: crate::s3::S3Objects,
}

impl S3Faults {
    /// Faults in `bucket` under `prefix`.
    pub fn new(
        config: &aws_config::SdkConfig,
        bucket: impl Into<String>,
        prefix: impl Into<String>,
    ) -> Self {
        S3Faults {
            objects: crate::s3::S3Objects::new(config, bucket, prefix),
        }
    }

    async fn store(&self, fault: &Event) -> Result<(), Error> {
        let fault = &floodway::fault::normalized(fault);
        let name = format!(
            "{}/{}/{}.json",
            tag(fault, "processor"),
            tag(fault, "pipeline"),
            floodway::fault::fault_id(fault)
        );
        self.objects
            .put(&self.objects.key(&name), fault.to_json())
            .await
    }
}

impl DynamoDbFaults {
    async fn store_all(&self, batch: Batch) -> Result<Delivery, Error> {
        deliver_each(&batch, 8, |uow| self.store(uow.event())).await
    }
}

impl S3Faults {
    async fn store_all(&self, batch: Batch) -> Result<Delivery, Error> {
        deliver_each(&batch, 8, |uow| self.store(uow.event())).await
    }
}

floodway::impl_sink!(DynamoDbFaults, store_all);
floodway::impl_sink!(S3Faults, store_all);

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

impl Resubmitted {
    /// The outcome a fault store records, and its detail.
    pub fn outcome(&self) -> (ResubmitOutcome, String) {
        match self {
            Resubmitted::Succeeded => (ResubmitOutcome::Succeeded, "processed".to_owned()),
            Resubmitted::Unfinished => (
                ResubmitOutcome::Failed,
                "unfinished: the function failed the record transiently again".to_owned(),
            ),
            Resubmitted::FaultedAgain => (
                ResubmitOutcome::Failed,
                "faulted again: see the fault's latest error".to_owned(),
            ),
            Resubmitted::Failed(why) => (
                ResubmitOutcome::Failed,
                format!("the function failed: {why}"),
            ),
        }
    }
}

/// Resubmits faults to the Lambda function that failed them, and records each outcome with
/// its fault; what `floodway faults resubmit --dynamodb-table` does for each fault, the
/// counterpart of `floodway::fault_store::resubmit` for processors that run on Lambda.
#[derive(Debug, Clone)]
pub struct LambdaResubmitter {
    lambda: aws_sdk_lambda::Client,
    function: String,
}

impl LambdaResubmitter {
    /// Invokes `function` (a name or ARN) through `config`'s Lambda endpoint, or `endpoint`
    /// when given (a local Runtime API such as `floodway_lambda::LocalRuntime`).
    pub fn new(
        config: &aws_config::SdkConfig,
        endpoint: Option<&str>,
        function: impl Into<String>,
    ) -> Self {
        let mut lambda = aws_sdk_lambda::config::Builder::from(config);
        if let Some(url) = endpoint {
            lambda = lambda.endpoint_url(url);
        }
        LambdaResubmitter {
            lambda: aws_sdk_lambda::Client::from_conf(lambda.build()),
            function: function.into(),
        }
    }

    /// The function resubmitted to.
    pub fn function(&self) -> &str {
        &self.function
    }

    /// Invokes the function with the fault's record (see [`resubmit`]) and records the
    /// outcome in `store`; a success resolves the fault. An invocation that fails is an
    /// outcome too, with its error as the detail.
    ///
    /// # Errors
    /// Only when the outcome cannot be recorded.
    pub async fn resubmit(
        &self,
        store: &dyn FaultStore,
        fault: &StoredFault,
    ) -> Result<(ResubmitOutcome, String), floodway::BoxError> {
        let answer = resubmit(&self.lambda, &self.function, &fault.fault)
            .await
            .unwrap_or_else(|e| Resubmitted::Failed(e.to_string()));
        let (outcome, detail) = answer.outcome();
        store
            .record_resubmission_of(&fault.id, outcome, &detail)
            .await?;
        Ok((outcome, detail))
    }
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
