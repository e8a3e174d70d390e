//! Pulling from a consumer: the pull requests, and the count of messages they still owe, kept
//! by the task that reads what they bring.
//!
//! async-nats's pull stream (`Consumer::stream().messages()`) sends its requests from a task
//! of its own and hears that one went out through a channel. Messages the request brings can
//! arrive before that news, while the stream's count of messages owed stands at zero; the count
//! does not go below zero, so those messages are never taken off it, and once the news comes it
//! stays above what the server owes. The stream asks again only when less than half a batch is
//! owed, so with the server owing nothing it waits until the heartbeats are missed (twice the
//! heartbeat interval, 2.5 s here). Measured on one partition under load, before this module:
//! a stall of 2.7 s in about one run of 100,000 messages in eight. Here a request is counted
//! by the task that reads the replies, right after it is sent and before any reply is read, so
//! the count cannot fall behind the server's. A reconnect (the client's connection count
//! moves, looked at every 250 ms while the pull waits) clears the count, since a restarted
//! server forgets the requests it held, and the pull asks again; a server that goes silent
//! otherwise ends the pull after two heartbeat intervals without a word.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, Consumer};
use async_nats::{Message, StatusCode, Subject, Subscriber};
use futures_util::StreamExt;
use tokio::time::{Instant, Sleep};

use crate::error::NatsError;

/// The JetStream API prefix of the hub's context, which names no domain (`NatsHub::connect`).
const API_PREFIX: &str = "$JS.API";

/// Heartbeat intervals without a word after which the pull is given up (async-nats's rule).
const SILENT_INTERVALS: u32 = 2;

/// How often a waiting pull looks at the client's connection count and its silence.
const LOOK_EVERY: Duration = Duration::from_millis(250);

/// One pull from a consumer: an inbox, the requests sent to it, and what they still owe.
pub(crate) struct Pull {
    client: async_nats::Client,
    subscriber: Subscriber,
    inbox: Subject,
    /// `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`.
    subject: Subject,
    batch: usize,
    expires: Duration,
    heartbeat: Duration,
    /// The priority group of pinned sharing, and the pin this client holds in it: kept by the
    /// reader from one pull to the next (a request without it, while the pin stands, is
    /// passed over by the server until the pin's time to live runs out).
    group: Option<(&'static str, PinCell)>,
    /// Messages asked for that the server has neither delivered nor given up on.
    owed: usize,
    /// The client's connection count when `owed` was last counted: a server restarted, or
    /// another one reached, does not hold the requests sent before.
    connects: u64,
    statistics: std::sync::Arc<async_nats::Statistics>,
    /// How long nothing has arrived, counted in looks.
    silent: Duration,
    /// Something arrived since the last look.
    heard: bool,
    look: Duration,
    timer: Pin<Box<Sleep>>,
}

/// The pin a reader holds in its consumer's priority group, shared by its pulls.
pub(crate) type PinCell = std::sync::Arc<std::sync::Mutex<Option<String>>>;

impl Pull {
    /// Subscribes an inbox for `consumer`'s deliveries; requests go out as they are needed,
    /// `batch` messages each, waiting at the server up to `expires` with a heartbeat every
    /// `heartbeat` while there is nothing to deliver.
    pub(crate) async fn start(
        client: &async_nats::Client,
        consumer: &Consumer<pull::Config>,
        batch: usize,
        expires: Duration,
        heartbeat: Duration,
        group: Option<(&'static str, PinCell)>,
    ) -> Result<Pull, NatsError> {
        let inbox = Subject::from(client.new_inbox());
        let subscriber = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| NatsError::js("pull", e))?;
        let info = consumer.cached_info();
        let look = heartbeat.clamp(Duration::from_millis(10), LOOK_EVERY);
        let subject = Subject::from(format!(
            "{API_PREFIX}.CONSUMER.MSG.NEXT.{}.{}",
            info.stream_name, info.name
        ));
        Ok(Pull {
            client: client.clone(),
            subscriber,
            inbox,
            subject,
            batch: batch.max(1),
            expires,
            heartbeat,
            group,
            owed: 0,
            connects: client.statistics().connects.load(Ordering::Relaxed),
            statistics: client.statistics(),
            silent: Duration::ZERO,
            heard: false,
            look,
            timer: Box::pin(tokio::time::sleep(look)),
        })
    }

    /// The next message. An error ends the pull: missed heartbeats (the server lost the
    /// requests, or the connection), the consumer deleted, or a status the pull cannot go on
    /// from.
    pub(crate) async fn next(&mut self) -> Result<Message, NatsError> {
        loop {
            let connects = self.statistics.connects.load(Ordering::Relaxed);
            if connects != self.connects {
                // Connected again: what was asked for on the connection before is not owed
                // any more (asking twice costs nothing but a request).
                self.connects = connects;
                self.owed = 0;
            }
            if self.owed <= self.batch / 2 {
                self.request().await?;
            }
            let message = tokio::select! {
                biased;
                message = self.subscriber.next() => message,
                () = &mut self.timer => {
                    // A reconnect is handled above; silence across it was the old
                    // connection's.
                    let reconnected =
                        self.statistics.connects.load(Ordering::Relaxed) != self.connects;
                    self.silent = if std::mem::take(&mut self.heard) || reconnected {
                        Duration::ZERO
                    } else {
                        self.silent + self.look
                    };
                    if self.silent >= self.heartbeat * SILENT_INTERVALS {
                        return Err(NatsError::js("pull", "missed heartbeats; pulling again"));
                    }
                    let next = Instant::now() + self.look;
                    self.timer.as_mut().reset(next);
                    continue;
                }
            };
            let Some(message) = message else {
                return Err(NatsError::js("pull", "the inbox's subscription ended"));
            };
            self.heard = true;
            match message.status {
                None | Some(StatusCode::OK) => {
                    self.owed = self.owed.saturating_sub(1);
                    if let Some((_, held)) = &self.group {
                        if let Some(pin) = message
                            .headers
                            .as_ref()
                            .and_then(|h| h.get_last(async_nats::header::NATS_PIN_ID))
                        {
                            let mut held = held.lock().unwrap_or_else(|p| p.into_inner());
                            if held.as_deref() != Some(pin.as_str()) {
                                *held = Some(pin.as_str().to_owned());
                            }
                        }
                    }
                    return Ok(message);
                }
                Some(StatusCode::IDLE_HEARTBEAT) => {}
                Some(
                    status @ (StatusCode::TIMEOUT
                    | StatusCode::REQUEST_TERMINATED
                    | StatusCode::PIN_ID_MISMATCH),
                ) => {
                    // A request expired or ended early: what it still owed will not come.
                    let description = message.description.as_deref().unwrap_or_default();
                    if description == "Consumer Deleted" {
                        return Err(NatsError::js("pull", "consumer deleted; recreating"));
                    }
                    if description == "Consumer is push based"
                        || description.starts_with("Exceeded MaxRequest")
                    {
                        return Err(NatsError::js("pull", description));
                    }
                    if status == StatusCode::PIN_ID_MISMATCH {
                        if let Some((_, held)) = &self.group {
                            *held.lock().unwrap_or_else(|p| p.into_inner()) = None;
                        }
                    }
                    let left = message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Pending-Messages"))
                        .and_then(|v| v.as_str().parse().ok())
                        .unwrap_or(self.batch);
                    self.owed = self.owed.saturating_sub(left);
                }
                Some(status) => {
                    return Err(NatsError::js(
                        "pull",
                        format!(
                            "status {status} from the consumer: {}",
                            message.description.as_deref().unwrap_or_default()
                        ),
                    ));
                }
            }
        }
    }

    /// Asks for another batch, counted once sent: the replies are read by this task only,
    /// after this returns.
    async fn request(&mut self) -> Result<(), NatsError> {
        let mut request = serde_json::json!({
            "batch": self.batch,
            "expires": u64::try_from(self.expires.as_nanos()).unwrap_or(u64::MAX),
            "idle_heartbeat": u64::try_from(self.heartbeat.as_nanos()).unwrap_or(u64::MAX),
        });
        if let Some((group, held)) = &self.group {
            request["group"] = (*group).into();
            if let Some(pin) = held.lock().unwrap_or_else(|p| p.into_inner()).as_deref() {
                request["id"] = pin.into();
            }
        }
        self.client
            .publish_with_reply(
                self.subject.clone(),
                self.inbox.clone(),
                request.to_string().into(),
            )
            .await
            .map_err(|e| NatsError::js("pull request", e))?;
        self.owed += self.batch;
        Ok(())
    }
}

/// What a delivery's ack subject says about it (ADR-15): `$JS.ACK.<stream>.<consumer>.
/// <delivered>.<stream seq>.<consumer seq>.<published ns>.<pending>`, or, from servers that
/// name the domain and account, `$JS.ACK.<domain>.<account hash>.<stream>.<consumer>.` and the
/// same five, then tokens this reader does not need. Read here, without async-nats's
/// `Message::info` (a JetStream message, which clones the client, and a parse of every field),
/// because it is read for every message: it profiled at 6% of the consuming process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Delivery<'a> {
    /// How many times the server has delivered the message.
    pub(crate) delivered: u64,
    pub(crate) stream_sequence: u64,
    pub(crate) consumer_sequence: u64,
    /// Messages left for the consumer to deliver after this one.
    pub(crate) pending: u64,
    /// When the message was stored, in ns since the epoch (read on demand).
    published: &'a str,
}

impl Delivery<'_> {
    /// Reads a message's ack subject.
    pub(crate) fn of(message: &Message) -> Result<Delivery<'_>, NatsError> {
        let reply = message.reply.as_deref().unwrap_or_default();
        Delivery::parse(reply).ok_or_else(|| {
            NatsError::js(
                "message info",
                format!("`{reply}` is not a JetStream ack subject"),
            )
        })
    }

    fn parse(reply: &str) -> Option<Delivery<'_>> {
        let rest = reply.strip_prefix("$JS.ACK.")?;
        let mut tokens = [""; 9];
        let mut count = 0;
        for token in rest.split('.') {
            if count == tokens.len() {
                break;
            }
            tokens[count] = token;
            count += 1;
        }
        // Seven tokens in the first form; nine or more in the second.
        let fields = match count {
            7 => &tokens[2..7],
            9 => &tokens[4..9],
            _ => return None,
        };
        Some(Delivery {
            delivered: number(fields[0])?,
            stream_sequence: number(fields[1])?,
            consumer_sequence: number(fields[2])?,
            published: fields[3],
            pending: number(fields[4])?,
        })
    }

    /// When the message was stored, in ms since the epoch.
    pub(crate) fn published_ms(&self) -> Result<i64, NatsError> {
        let ns = number(self.published).ok_or_else(|| {
            NatsError::js(
                "message info",
                format!("`{}` is not a time in ns", self.published),
            )
        })?;
        Ok(i64::try_from(ns / 1_000_000).unwrap_or(i64::MAX))
    }
}

/// A token of decimal digits.
fn number(token: &str) -> Option<u64> {
    token.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use async_nats::jetstream::consumer::{pull, AckPolicy};

    use super::{Delivery, Pull};
    use crate::testing::NatsServer;

    /// A pull of `consumer` asking for 10 messages at a time.
    async fn pull_of(
        client: &async_nats::Client,
        consumer: &async_nats::jetstream::consumer::Consumer<pull::Config>,
        expires: Duration,
        heartbeat: Duration,
    ) -> Pull {
        Pull::start(client, consumer, 10, expires, heartbeat, None)
            .await
            .unwrap()
    }

    /// Both forms of the ack subject (ADR-15), and what is not one.
    #[test]
    fn a_delivery_is_read_from_either_form_of_its_ack_subject() {
        let first = "$JS.ACK.ORDERS.view_0.3.1042.977.1764600000123456789.12";
        let second = "$JS.ACK._.ACCHASH.ORDERS.view_0.3.1042.977.1764600000123456789.12.RND";
        for reply in [
            first,
            second,
            "$JS.ACK.D.H.ORDERS.view_0.3.1042.977.1764600000123456789.12",
        ] {
            let delivery = Delivery::parse(reply).unwrap();
            assert_eq!(
                (
                    delivery.delivered,
                    delivery.stream_sequence,
                    delivery.consumer_sequence
                ),
                (3, 1042, 977),
                "{reply}"
            );
            assert_eq!(delivery.pending, 12, "{reply}");
            assert_eq!(
                delivery.published_ms().unwrap(),
                1_764_600_000_123,
                "{reply}"
            );
        }
        for bad in [
            "_INBOX.x",
            "$JS.ACK.ORDERS.view_0.3.1042.977.1764600000123456789",
            "$JS.ACK.ORDERS.view_0.x.1042.977.1764600000123456789.12",
            "$JS.ACK.ORDERS.view_0.3.-1042.977.1764600000123456789.12",
            "$JS.ACK.ORDERS.view_0.3.99999999999999999999999.977.1.12",
            "$JS.ACK.D.H.ORDERS.view_0.3.1042.977.1",
        ] {
            assert_eq!(Delivery::parse(bad), None, "{bad}");
        }
    }

    /// A stream of `n` small messages and a consumer of them that needs no acks.
    async fn stream_of(
        server: &NatsServer,
        n: usize,
    ) -> (
        async_nats::Client,
        async_nats::jetstream::consumer::Consumer<pull::Config>,
    ) {
        let (client, stream) = crate::testing::numbered_stream(&server.url(), n).await;
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some("c".into()),
                ack_policy: AckPolicy::None,
                ..Default::default()
            })
            .await
            .unwrap();
        (client, consumer)
    }

    /// Thousands of small requests read while both workers are kept busy, so the reader and
    /// everything else are late to run: every message comes, in order, and no heartbeat is
    /// missed (the count of what the requests owe never rises above the server's). The same
    /// read through async-nats's pull stream (requests sent from a task of its own) stalled
    /// until its heartbeats were missed on this machine.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pull_under_load_reads_everything_without_missing_a_heartbeat() {
        let server = NatsServer::start();
        let n = 30_000;
        let (client, consumer) = stream_of(&server, n).await;
        let busy = Arc::new(AtomicBool::new(true));
        let spinners: Vec<_> = (0..2)
            .map(|_| {
                let busy = busy.clone();
                tokio::spawn(async move {
                    while busy.load(Ordering::Relaxed) {
                        std::hint::black_box((0..2_000u64).sum::<u64>());
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        let mut pull = pull_of(
            &client,
            &consumer,
            Duration::from_secs(2),
            Duration::from_millis(100),
        )
        .await;
        for i in 1..=n {
            let message = pull.next().await.unwrap_or_else(|e| panic!("at {i}: {e}"));
            assert_eq!(message.payload, i.to_string());
        }
        busy.store(false, Ordering::Relaxed);
        for spinner in spinners {
            spinner.await.unwrap();
        }
    }

    /// With nothing to read, requests expire at the server and are made again: the pull
    /// hears the heartbeats meanwhile and brings what is published later.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_pull_asks_again_as_its_requests_expire() {
        let server = NatsServer::start();
        let (client, consumer) = stream_of(&server, 0).await;
        let mut pull = pull_of(
            &client,
            &consumer,
            Duration::from_millis(300),
            Duration::from_millis(75),
        )
        .await;
        let js = async_nats::jetstream::new(client.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            js.publish("s", "late".into()).await.unwrap().await.unwrap();
        });
        let message = tokio::time::timeout(Duration::from_secs(10), pull.next())
            .await
            .expect("the message published after five expiries comes")
            .unwrap();
        assert_eq!(message.payload, "late");
    }

    /// A server restarted forgets the requests it held: the pull, waiting meanwhile, asks
    /// again once the client is connected anew, not when its heartbeats (ten seconds apart
    /// here) are missed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pull_asks_again_once_it_is_connected_anew() {
        let mut server = NatsServer::start();
        let (client, consumer) = stream_of(&server, 0).await;
        let mut pull = pull_of(
            &client,
            &consumer,
            Duration::from_secs(30),
            Duration::from_secs(10),
        )
        .await;
        let connects = client.statistics().connects.load(Ordering::Relaxed);
        // Restarted while the pull waits (its first request made).
        let restarted = tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(300));
            server.restart();
            server
        });
        let js = async_nats::jetstream::new(client.clone());
        tokio::spawn(async move {
            while js.client().statistics().connects.load(Ordering::Relaxed) == connects {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            js.publish("s", "after".into())
                .await
                .unwrap()
                .await
                .unwrap();
        });
        let message = tokio::time::timeout(Duration::from_secs(8), pull.next())
            .await
            .expect("asked again once connected, long before a heartbeat is missed")
            .unwrap();
        assert_eq!(message.payload, "after");
        let _server = restarted.await.unwrap();
    }

    /// A server that goes silent (killed) ends the pull after two heartbeat intervals
    /// without a word, so that the reader pulls again instead of waiting forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pull_ends_when_the_server_goes_silent() {
        let mut server = NatsServer::start();
        let (client, consumer) = stream_of(&server, 0).await;
        let mut pull = pull_of(
            &client,
            &consumer,
            Duration::from_secs(5),
            Duration::from_millis(100),
        )
        .await;
        server.kill();
        let error = tokio::time::timeout(Duration::from_secs(10), pull.next())
            .await
            .expect("the pull ends")
            .unwrap_err();
        assert!(error.to_string().contains("missed heartbeats"), "{error}");
    }
}
