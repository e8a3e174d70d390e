//! Complex event processing on Lambda: sets and timers in a DynamoDB single table laid out as
//! aws-lambda-stream's correlation store, so Node and Rust rules can share one table.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;
use floodway::cep::{in_time_order, Collected, SharedRule, Timer};
use floodway::layer::BoxFuture;
use floodway::sink::Delivery;
use floodway::{Batch, Error, Event, Sink, Uow};
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
///   (within the minutes to hours DynamoDB takes: for tighter timers, add
///   [`TimerSchedules`], which also schedules each timer on EventBridge Scheduler);
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
    schedules: Option<TimerSchedules>,
}

/// What a timer fired: the events to publish (with their keys), then to
/// [mark](DynamoDbCep::mark_emitted), and the timer to [retire](DynamoDbCep::retire) after.
#[derive(Debug, Default)]
pub struct Fired {
    /// What the timer's rule emits and was not emitted before.
    pub emitted: Vec<(String, Event)>,
    /// The timer (with its key), deleted with its schedule once `emitted` is marked.
    retire: Option<(String, Timer)>,
}

/// How far ahead a timer already due is scheduled.
const SCHEDULE_AHEAD_MS: i64 = 5_000;

/// The type of the event a timer's schedule delivers (the `detail-type` of its EventBridge
/// envelope, and the type of the event in its `detail`: [`Timer::to_event`]).
pub use floodway::cep::TIMER_DUE;

/// Timers on EventBridge Scheduler, for when the minutes to hours DynamoDB's time to live
/// takes to delete a due item are too coarse: each timer also gets a one-time schedule
/// (`at(...)`, UTC, no flexible window, deleted after it runs) that invokes `target` (the
/// function, through `role`) with an EventBridge event of type [`TIMER_DUE`] whose detail
/// names the timer. The function fires it with [`DynamoDbCep::fire_scheduled`] (or a
/// [`CepSink::timers`] sink taking `timer-due` events); whichever comes first, the schedule
/// or the item's removal, fires it, and the other finds nothing new to emit.
#[derive(Debug, Clone)]
pub struct TimerSchedules {
    client: aws_sdk_scheduler::Client,
    group: Option<String>,
    target: String,
    role: String,
}

impl TimerSchedules {
    /// Schedules invoking `target` (an ARN: the function) with `role` (an IAM role's ARN that
    /// may invoke it), in the default group.
    pub fn new(
        config: &aws_config::SdkConfig,
        target: impl Into<String>,
        role: impl Into<String>,
    ) -> Self {
        TimerSchedules {
            client: aws_sdk_scheduler::Client::new(config),
            group: None,
            target: target.into(),
            role: role.into(),
        }
    }

    /// The schedule group to create them in.
    #[must_use]
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// The name of a timer's schedule: stable, so a repeat finds the schedule made before.
    pub fn name(processor: &str, key: &str, timer: &Timer) -> String {
        let id = floodway::rows::change_id(
            processor,
            &floodway::rows::RowKey::new(key, &timer.rule),
            &timer.trigger,
        );
        format!("floodway-{id}")
    }

    /// The schedule expression of a time (ms since the epoch): `at(...)` in UTC, to the next
    /// whole second; a time past the year 9999 (a timestamp in microseconds, say) is its last
    /// second, as the expression cannot name a later one.
    pub fn expression(due: i64) -> String {
        const LAST: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z
        let seconds = u64::try_from(due.max(0))
            .unwrap_or(0)
            .div_ceil(1000)
            .min(LAST);
        let at = std::time::UNIX_EPOCH + Duration::from_secs(seconds);
        let text = humantime::format_rfc3339_seconds(at).to_string();
        format!("at({})", text.trim_end_matches('Z'))
    }

    async fn create(&self, processor: &str, key: &str, timer: &Timer) -> Result<(), Error> {
        use aws_sdk_scheduler::types::{
            ActionAfterCompletion, FlexibleTimeWindow, FlexibleTimeWindowMode, Target,
        };
        let name = Self::name(processor, key, timer);
        let detail = timer.to_event(processor, key).to_value();
        let input = serde_json::json!({
            "version": "0",
            "id": name,
            "detail-type": TIMER_DUE,
            "source": format!("cep:{processor}"),
            "detail": detail,
        });
        let invalid = |e: aws_sdk_scheduler::error::BuildError| {
            Error::poison_msg("InvalidSchedule", e.to_string())
        };
        // A timer already due (a backlog caught up, a batch retried after its time) is
        // scheduled a little ahead, not in the past: a one-time schedule names a time to
        // come, and its run follows within the minute either way.
        let at = timer
            .due
            .max(floodway::event::now_millis().saturating_add(SCHEDULE_AHEAD_MS));
        let result = self
            .client
            .create_schedule()
            .name(&name)
            .set_group_name(self.group.clone())
            .schedule_expression(Self::expression(at))
            .schedule_expression_timezone("UTC")
            .flexible_time_window(
                FlexibleTimeWindow::builder()
                    .mode(FlexibleTimeWindowMode::Off)
                    .build()
                    .map_err(invalid)?,
            )
            .target(
                Target::builder()
                    .arn(&self.target)
                    .role_arn(&self.role)
                    .input(input.to_string())
                    .build()
                    .map_err(invalid)?,
            )
            .action_after_completion(ActionAfterCompletion::Delete)
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            // Made before, by the first attempt of this very timer.
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conflict_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(classify(e)),
        }
    }

    async fn delete(&self, processor: &str, key: &str, timer: &Timer) -> Result<(), Error> {
        let result = self
            .client
            .delete_schedule()
            .name(Self::name(processor, key, timer))
            .set_group_name(self.group.clone())
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            // Ran and deleted itself, or deleted by an earlier firing.
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_not_found_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(classify(e)),
        }
    }
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
            schedules: None,
        }
    }

    /// The same, each timer also scheduled on EventBridge Scheduler.
    #[must_use]
    pub fn with_schedules(mut self, schedules: TimerSchedules) -> Self {
        self.schedules = Some(schedules);
        self
    }

    /// The processor's name.
    pub fn processor(&self) -> &str {
        &self.processor
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
        let now = floodway::event::now_millis();
        for (keys, event) in entries {
            let added = Collected::of(event);
            let expires = event.timestamp().saturating_add(ttl.as_millis() as i64);
            if expires <= now {
                // Past its time to live already: it would join no set (as on the embedded
                // hub).
                continue;
            }
            for key in keys {
                self.put_correlated(key, event, expires).await?;
                // What the table's time to live has not deleted yet (it may take two days)
                // but is past it is left out, as the embedded hub leaves it.
                let set = self.set_live_at(key, Some(now)).await?;
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
    /// image as change data capture gives it (`raw.old`). What its rule emits and was not
    /// emitted before; nothing for an item that is not a timer.
    ///
    /// # Errors
    /// A DynamoDB failure, classified.
    pub async fn fire_removed(&self, old: &Value, rules: &[SharedRule]) -> Result<Fired, Error> {
        let text = |name: &str| old.get(name).and_then(Value::as_str);
        if text("discriminator") != Some(TIMER) {
            return Ok(Fired::default());
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
    /// before. The timer stays until [`retire`](Self::retire)d: once what it emitted is
    /// published and [marked](Self::mark_emitted), so that the deletion's `REMOVE` record,
    /// firing it again, finds the emission marked.
    ///
    /// # Errors
    /// A DynamoDB failure, classified.
    pub async fn fire(
        &self,
        key: &str,
        timer: &Timer,
        rules: &[SharedRule],
    ) -> Result<Fired, Error> {
        let retire = Some((key.to_owned(), timer.clone()));
        let Some(rule) = rules.iter().find(|r| r.name() == timer.rule) else {
            tracing::warn!(rule = %timer.rule, key, "a timer of a rule no longer configured: dropped");
            return Ok(Fired {
                emitted: Vec::new(),
                retire,
            });
        };
        let set = self.set(key).await?;
        let out: Vec<(String, Event)> = rule
            .fire(&set, timer)
            .into_iter()
            .map(|f| (key.to_owned(), f.to_event(&self.source(), key)))
            .collect();
        Ok(Fired {
            emitted: self.unmarked(out).await?,
            retire,
        })
    }

    /// Deletes the timer `fired` came from, and its schedule: once what it emitted is
    /// published and marked.
    ///
    /// # Errors
    /// A DynamoDB or EventBridge Scheduler failure, classified.
    pub async fn retire(&self, fired: &Fired) -> Result<(), Error> {
        let Some((key, timer)) = &fired.retire else {
            return Ok(());
        };
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
        if let Some(schedules) = &self.schedules {
            schedules.delete(&self.processor, key, timer).await?;
        }
        Ok(())
    }

    /// Fires the timer a schedule delivered: `event` is the [`TIMER_DUE`] event of its
    /// EventBridge invocation (see [`TimerSchedules`]). What its rule emits and was not
    /// emitted before; nothing for another processor's timer.
    ///
    /// # Errors
    /// A DynamoDB failure, classified; a poison error for an event that names no timer.
    pub async fn fire_scheduled(
        &self,
        event: &Event,
        rules: &[SharedRule],
    ) -> Result<Fired, Error> {
        let Some((processor, key, timer)) = Timer::of_event(event) else {
            return Err(Error::poison_msg(
                "MalformedTimer",
                format!("a {TIMER_DUE} event without its timer: {}", event.to_json()),
            ));
        };
        if processor != self.processor {
            return Ok(Fired::default());
        }
        self.fire(&key, &timer, rules).await
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
        self.set_live_at(key, None).await
    }

    /// The events of `key`'s set, in time order; with `now` (ms), only those whose time to
    /// live (the item's `ttl`, in seconds) has not passed.
    async fn set_live_at(&self, key: &str, now: Option<i64>) -> Result<Vec<Collected>, Error> {
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
                let expired = match (now, item.get("ttl")) {
                    (Some(now), Some(AttributeValue::N(ttl))) => ttl
                        .parse::<i64>()
                        // Stored in whole seconds, rounded down: gone once the next second
                        // has begun.
                        .is_ok_and(|s| s.saturating_add(1).saturating_mul(1000) <= now),
                    _ => false,
                };
                if expired {
                    continue;
                }
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
        if let Some(schedules) = &self.schedules {
            schedules.create(&self.processor, key, timer).await?;
        }
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

/// How a batch of events is published (the sink emitted events go to), type-erased.
type PublishFn = Arc<dyn Fn(Batch) -> BoxFuture<Delivery> + Send + Sync>;

/// How an event's correlation keys are found.
type CorrelateFn = Arc<dyn Fn(&Event) -> Result<Vec<String>, Error> + Send + Sync>;

/// A CEP processor on Lambda as the sinks of a Floodway processor, over a [`DynamoDbCep`]:
///
/// - [`CepSink::collector`] collects a batch's events (under their partition key, or the keys
///   [`CepSink::correlate`] finds), evaluates the rules, publishes what they emit through the
///   publishing sink (an [`EventBridgeSink`](crate::EventBridgeSink), a
///   [`KinesisSink`](crate::KinesisSink)...) and then marks it emitted;
/// - [`CepSink::timers`] fires timers: the `timer-deleted` change events of the table's stream
///   (its time to live removed a due timer: [`DynamoDbCep::fire_removed`]) and the
///   [`TIMER_DUE`] events of EventBridge Scheduler ([`DynamoDbCep::fire_scheduled`]), and
///   publishes and marks what fires.
///
/// A publish that fails fails the batch: the pipeline's retries and faults take it, and a
/// repeat publishes again only what was not marked emitted (at least once, stable ids).
///
/// ```no_run
/// # async fn f(config: aws_config::SdkConfig, rules: Vec<floodway::cep::SharedRule>) -> Result<(), Box<dyn std::error::Error>> {
/// use floodway::{Pipeline, Processor};
/// use floodway_aws::{CepSink, DynamoDbCep, EventBridgeSink};
/// use std::time::Duration;
/// let cep = DynamoDbCep::new(&config, "events", "orders-cep");
/// let publish = EventBridgeSink::new(&config, "bus", "orders-cep");
/// let ttl = Duration::from_secs(86_400);
/// let processor = Processor::builder("orders-cep")
///     .fault_sink(publish.clone())
///     .pipeline(
///         Pipeline::builder("collect")
///             .event_type("order-submitted")
///             .event_type("payment-captured")
///             .sink(CepSink::collector(cep.clone(), rules.clone(), ttl, publish.clone()))?,
///     )
///     .pipeline(
///         Pipeline::builder("timers")
///             .event_type("timer-deleted")
///             .event_type(floodway_aws::TIMER_DUE)
///             .sink(CepSink::timers(cep, rules, ttl, publish))?,
///     )
///     .build()?;
/// let handler = floodway_lambda::Handler::new(processor);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct CepSink {
    cep: DynamoDbCep,
    rules: Arc<Vec<SharedRule>>,
    ttl: Duration,
    publish: PublishFn,
    correlate: CorrelateFn,
    timers: bool,
}

impl std::fmt::Debug for CepSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CepSink")
            .field("processor", &self.cep.processor)
            .field("timers", &self.timers)
            .finish_non_exhaustive()
    }
}

impl CepSink {
    /// Collects into `cep`'s sets and evaluates `rules`; emitted events go to `publish`.
    /// `ttl`: how long an event stays in its sets after its own time.
    pub fn collector<P: Sink>(
        cep: DynamoDbCep,
        rules: Vec<SharedRule>,
        ttl: Duration,
        publish: P,
    ) -> Self {
        CepSink {
            cep,
            rules: Arc::new(rules),
            ttl,
            publish: erase(publish),
            correlate: Arc::new(|e: &Event| Ok(vec![e.partition_key().to_owned()])),
            timers: false,
        }
    }

    /// Fires `cep`'s timers (`timer-deleted` change events and [`TIMER_DUE`] events); what
    /// fires goes to `publish`. Other events are left alone.
    pub fn timers<P: Sink>(
        cep: DynamoDbCep,
        rules: Vec<SharedRule>,
        ttl: Duration,
        publish: P,
    ) -> Self {
        CepSink {
            timers: true,
            ..CepSink::collector(cep, rules, ttl, publish)
        }
    }

    /// The correlation keys of an event (the default: its partition key); an error faults
    /// the event.
    #[must_use]
    pub fn correlate<F>(mut self, keys: F) -> Self
    where
        F: Fn(&Event) -> Result<Vec<String>, Error> + Send + Sync + 'static,
    {
        self.correlate = Arc::new(keys);
        self
    }

    async fn write(&self, batch: Batch) -> Result<Delivery, Error> {
        let mut delivery = Delivery::complete();
        let mut retire = Vec::new();
        let emitted = if self.timers {
            let mut emitted = Vec::new();
            for (i, event) in batch.events().enumerate() {
                let fired = if event.event_type() == TIMER_DUE {
                    self.cep.fire_scheduled(event, &self.rules).await
                } else if let Some(old) = event.field("raw").and_then(|r| r.get("old")) {
                    self.cep.fire_removed(old, &self.rules).await
                } else {
                    continue;
                };
                match fired {
                    Ok(mut fired) => {
                        emitted.append(&mut fired.emitted);
                        retire.push(fired);
                    }
                    // A malformed timer is that entry's fault, not the batch's.
                    Err(err) if err.class() == floodway::ErrorClass::Poison && batch.len() > 1 => {
                        delivery.fail(i, err);
                    }
                    Err(err) => return Err(err),
                }
            }
            emitted
        } else {
            let mut entries = Vec::with_capacity(batch.len());
            for (i, event) in batch.events().enumerate() {
                match (self.correlate)(event) {
                    Ok(keys) => entries.push((keys, event.clone())),
                    Err(err) if batch.len() == 1 => return Err(err),
                    Err(err) => delivery.fail(i, err),
                }
            }
            self.cep.collect(&entries, &self.rules, self.ttl).await?
        };
        if !emitted.is_empty() {
            let out = Batch::new(
                emitted
                    .iter()
                    .map(|(_, e)| Uow::detached(e.clone()))
                    .collect(),
            );
            let published = (self.publish)(out).await?;
            if let Some((_, error)) = published.into_failed().into_iter().next() {
                // Nothing marked: the retry publishes them all again, with the same ids.
                return Err(error);
            }
            self.cep.mark_emitted(&emitted, self.ttl).await?;
        }
        // Only now: a timer's deletion makes a `REMOVE` record that fires it again, and
        // that finds what it emitted marked.
        for fired in &retire {
            self.cep.retire(fired).await?;
        }
        Ok(delivery)
    }
}

floodway::impl_sink!(CepSink, write);

fn erase<P: Sink>(publish: P) -> PublishFn {
    Arc::new(move |batch| {
        let publish = publish.clone();
        Box::pin(async move {
            tower::ServiceExt::oneshot(publish, batch)
                .await
                .map(Into::into)
        })
    })
}
