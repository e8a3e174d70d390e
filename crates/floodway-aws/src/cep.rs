//! Complex event processing on Lambda: sets and timers in a DynamoDB single table laid out as
//! aws-lambda-stream's correlation store, so Node and Rust rules can share one table.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;
use floodway::cep::{in_time_order, Collected, SharedRule, Timer};
use floodway::{Error, Event};
use serde_json::Value;

use crate::classify::classify;
use crate::dynamodb::{attribute, json_of};

/// The discriminator of a correlated event's item, as aws-lambda-stream's `correlate` writes it.
pub(crate) const CORRELATED: &str = "CORREL";

/// The discriminator of a timer's item.
pub(crate) const TIMER: &str = "TIMER";

/// A CEP processor's state in a DynamoDB single table (`pk`, `sk`, strings):
///
/// - each collected event under each correlation key as aws-lambda-stream's `correlate` flavor
///   writes it: `pk` the key (`{value}.{suffix}` with a suffix), `sk` the event id,
///   `discriminator: "CORREL"`, `timestamp`, `ttl` (seconds), `awsregion`, `ruleId` (the
///   processor), `suffix`, and the event under `event`; so a Node `evaluate` rule reads the
///   sets this writes, and this reads the sets Node's `correlate` writes;
/// - a timer: `pk = timer#{key}`, `sk = {rule}#{event id}`, `discriminator: "TIMER"`, `due`
///   (ms) and `ttl` (its due time in seconds), so the table's time to live deletes it once
///   due and the deletion (a `REMOVE` record on the table's stream, `timer-deleted` from change
///   data capture with `keep_ttl_deletes`) fires it through [`DynamoDbCep::fire_removed`]
///   (within the minutes to hours DynamoDB takes: for tighter timers, call
///   [`DynamoDbCep::fire`] from a schedule);
/// - what was emitted: `pk = fired#{key}`, `sk` the emitted event's id, with the set's `ttl`.
///
/// Emission is at least once with stable ids: [`DynamoDbCep::collect`] returns the events to
/// publish that are not yet marked emitted, and [`DynamoDbCep::mark_emitted`] marks them once
/// published; a crash between the two publishes them again, with the same ids.
#[derive(Debug, Clone)]
pub struct DynamoDbCep {
    client: Client,
    table: String,
    processor: String,
    region: Option<String>,
}

impl DynamoDbCep {
    /// The state of processor `processor` in `table`.
    pub fn new(
        config: &aws_config::SdkConfig,
        table: impl Into<String>,
        processor: impl Into<String>,
    ) -> Self {
        DynamoDbCep {
            client: Client::new(config),
            table: table.into(),
            processor: processor.into(),
            region: config.region().map(ToString::to_string),
        }
    }

    fn source(&self) -> String {
        format!("cep:{}", self.processor)
    }

    /// Collects each event under each of its keys, evaluates the rules over each key's set,
    /// sets the timers they ask for, and returns what they emit and was not emitted before,
    /// with its key (to [`mark_emitted`](Self::mark_emitted) once published). A repeat is
    /// evaluated again (its item and timers are written again, the same): what a crash cut
    /// short is finished, and what was emitted is not emitted twice.
    ///
    /// # Errors
    /// A DynamoDB failure, classified.
    pub async fn collect(
        &self,
        entries: &[(Vec<String>, Event)],
        rules: &[SharedRule],
        ttl: Duration,
    ) -> Result<Vec<(String, Event)>, Error> {
        let mut out = Vec::new();
        for (keys, event) in entries {
            let added = Collected::of(event);
            let expires = event.timestamp().saturating_add(ttl.as_millis() as i64);
            for key in keys {
                self.put_correlated(key, event, expires).await?;
                let set = self.set(key).await?;
                for rule in rules {
                    for firing in rule.evaluate(&set, &added) {
                        out.push((key.clone(), firing.to_event(&self.source(), key)));
                    }
                    for timer in rule.timers(&added) {
                        self.put_timer(key, &timer, event).await?;
                    }
                }
            }
        }
        self.unmarked(out).await
    }

    /// Fires a timer whose item the table's time to live removed: `old` is the item's old
    /// image as change data capture gives it (`raw.old`). Returns what its rule emits and was
    /// not emitted before; nothing for an item that is not a timer.
    ///
    /// # Errors
    /// A DynamoDB failure, classified.
    pub async fn fire_removed(
        &self,
        old: &Value,
        rules: &[SharedRule],
    ) -> Result<Vec<(String, Event)>, Error> {
        let text = |name: &str| old.get(name).and_then(Value::as_str);
        if text("discriminator") != Some(TIMER) {
            return Ok(Vec::new());
        }
        let (Some(pk), Some(sk), Some(due)) = (
            text("pk"),
            text("sk"),
            old.get("due").and_then(Value::as_i64),
        ) else {
            return Err(Error::poison_msg(
                "MalformedTimer",
                format!("a timer item without pk, sk or due: {old}"),
            ));
        };
        let key = pk.strip_prefix("timer#").unwrap_or(pk);
        let (rule, trigger) = sk.split_once('#').unwrap_or((sk, ""));
        let timer = Timer {
            due,
            rule: rule.to_owned(),
            trigger: trigger.to_owned(),
        };
        self.fire(key, &timer, rules).await
    }

    /// Fires `timer` of `key` now: what its rule makes of the key's set and was not emitted
    /// before. The timer's item is deleted.
    ///
    /// # Errors
    /// A DynamoDB failure, classified.
    pub async fn fire(
        &self,
        key: &str,
        timer: &Timer,
        rules: &[SharedRule],
    ) -> Result<Vec<(String, Event)>, Error> {
        let Some(rule) = rules.iter().find(|r| r.name() == timer.rule) else {
            tracing::warn!(rule = %timer.rule, key, "a timer of a rule no longer configured: dropped");
            return Ok(Vec::new());
        };
        let set = self.set(key).await?;
        let out: Vec<(String, Event)> = rule
            .fire(&set, timer)
            .into_iter()
            .map(|f| (key.to_owned(), f.to_event(&self.source(), key)))
            .collect();
        self.client
            .delete_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(format!("timer#{key}")))
            .key(
                "sk",
                AttributeValue::S(format!("{}#{}", timer.rule, timer.trigger)),
            )
            .send()
            .await
            .map_err(classify)?;
        self.unmarked(out).await
    }

    /// Marks events as emitted (published), so the same set evaluated again does not emit
    /// them again.
    ///
    /// # Errors
    /// A DynamoDB failure, classified.
    pub async fn mark_emitted(
        &self,
        emitted: &[(String, Event)],
        ttl: Duration,
    ) -> Result<(), Error> {
        for (key, event) in emitted {
            let expires = event.timestamp().saturating_add(ttl.as_millis() as i64);
            self.client
                .put_item()
                .table_name(&self.table)
                .item("pk", AttributeValue::S(format!("fired#{key}")))
                .item("sk", AttributeValue::S(event.id().to_owned()))
                .item("discriminator", AttributeValue::S("FIRED".into()))
                .item(
                    "ttl",
                    AttributeValue::N(expires.div_euclid(1000).to_string()),
                )
                .send()
                .await
                .map_err(classify)?;
        }
        Ok(())
    }

    /// The events of `key`'s set, in time order.
    ///
    /// # Errors
    /// A DynamoDB failure, classified.
    pub async fn set(&self, key: &str) -> Result<Vec<Collected>, Error> {
        let mut set = Vec::new();
        let mut start = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .consistent_read(true)
                .key_condition_expression("#pk = :pk")
                .expression_attribute_names("#pk", "pk")
                .expression_attribute_values(":pk", AttributeValue::S(key.to_owned()))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(classify)?;
            for item in page.items() {
                let correlated = matches!(item.get("discriminator"), Some(AttributeValue::S(d)) if d == CORRELATED);
                let Some(event) = item.get("event").filter(|_| correlated) else {
                    continue;
                };
                match Event::from_value(json_of(event)) {
                    Ok(event) => set.push(Collected::of(&event)),
                    Err(e) => {
                        tracing::warn!(key, error = %e, "a correlated item's event does not parse: left out")
                    }
                }
            }
            match page.last_evaluated_key() {
                Some(last) => start = Some(last.clone()),
                None => break,
            }
        }
        in_time_order(&mut set);
        Ok(set)
    }

    /// Puts `event`'s correlated item under `key` (again, the same, for a repeat).
    async fn put_correlated(&self, key: &str, event: &Event, expires: i64) -> Result<(), Error> {
        let value: Value = serde_json::to_value(event)
            .map_err(|e| Error::poison_msg("InvalidEvent", e.to_string()))?;
        let mut item: HashMap<String, AttributeValue> = HashMap::from([
            ("pk".into(), AttributeValue::S(key.to_owned())),
            ("sk".into(), AttributeValue::S(event.id().to_owned())),
            ("discriminator".into(), AttributeValue::S(CORRELATED.into())),
            (
                "timestamp".into(),
                AttributeValue::N(event.timestamp().to_string()),
            ),
            (
                "ttl".into(),
                AttributeValue::N(expires.div_euclid(1000).to_string()),
            ),
            ("ruleId".into(), AttributeValue::S(self.processor.clone())),
            ("event".into(), attribute(&value)),
        ]);
        if let Some((_, suffix)) = key.rsplit_once('.') {
            item.insert("suffix".into(), AttributeValue::S(suffix.to_owned()));
        }
        if let Some(region) = &self.region {
            item.insert("awsregion".into(), AttributeValue::S(region.clone()));
        }
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn put_timer(&self, key: &str, timer: &Timer, trigger: &Event) -> Result<(), Error> {
        self.client
            .put_item()
            .table_name(&self.table)
            .item("pk", AttributeValue::S(format!("timer#{key}")))
            .item(
                "sk",
                AttributeValue::S(format!("{}#{}", timer.rule, timer.trigger)),
            )
            .item("discriminator", AttributeValue::S(TIMER.into()))
            .item("due", AttributeValue::N(timer.due.to_string()))
            .item(
                "ttl",
                AttributeValue::N(timer.due.div_euclid(1000).to_string()),
            )
            .item("expire", AttributeValue::S(timer.rule.clone()))
            .item(
                "timestamp",
                AttributeValue::N(trigger.timestamp().to_string()),
            )
            .send()
            .await
            .map_err(classify)?;
        Ok(())
    }

    /// Those of `emitted` not marked emitted yet.
    async fn unmarked(&self, emitted: Vec<(String, Event)>) -> Result<Vec<(String, Event)>, Error> {
        let mut out = Vec::with_capacity(emitted.len());
        for (key, event) in emitted {
            let marked = self
                .client
                .get_item()
                .table_name(&self.table)
                .key("pk", AttributeValue::S(format!("fired#{key}")))
                .key("sk", AttributeValue::S(event.id().to_owned()))
                .consistent_read(true)
                .send()
                .await
                .map_err(classify)?;
            let repeat = out
                .iter()
                .any(|(_, e): &(String, Event)| e.id() == event.id());
            if marked.item().is_none() && !repeat {
                out.push((key, event));
            }
        }
        Ok(out)
    }
}
