//! The flow: what the processors are doing, sampled once a second from their metrics and the
//! hub's stats, kept for the last minutes and streamed to the pages.
//!
//! The metrics are the Prometheus text the processors already export: rendered in the process
//! for `floodway run --console`, or scraped from a running `floodway run --metrics` for
//! `floodway console --metrics-url`. The hub's stats (lag per subscription and partition) come
//! through the `EventHub` contract, so the flow works the same on every hub.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::Serialize;

/// How many samples are kept: five minutes at one a second.
pub(crate) const KEPT: usize = 300;

/// Where the processors' metrics come from.
pub(crate) enum Metrics {
    /// This process's own recorder (`floodway run --console`).
    InProcess(metrics_exporter_prometheus::PrometheusHandle),
    /// The Prometheus endpoint of another process (`floodway console --metrics-url`).
    Scraped(String),
    /// None: the flow shows the hub's side only.
    None,
}

impl Metrics {
    /// The metrics' text now; `Ok(None)` when there are none.
    pub(crate) async fn text(&self) -> Result<Option<String>, String> {
        match self {
            Metrics::InProcess(handle) => Ok(Some(handle.render())),
            Metrics::Scraped(url) => scrape(url).await.map(Some),
            Metrics::None => Ok(None),
        }
    }

    /// What the page says about where the rates come from.
    pub(crate) fn describe(&self) -> String {
        match self {
            Metrics::InProcess(_) => "this process".into(),
            Metrics::Scraped(url) => url.clone(),
            Metrics::None => String::new(),
        }
    }
}

/// The most of a metrics page the console reads (a process's page is some kilobytes).
const SCRAPE_LIMIT: usize = 8 << 20;

/// GETs a Prometheus endpoint (plain HTTP; it is meant for a process on this machine). The
/// whole exchange, body included, has 2 s: an endpoint that stalls half way through its
/// answer must not hold up the sampling every page reads.
async fn scrape(url: &str) -> Result<String, String> {
    use http_body_util::BodyExt as _;
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let exchange = async {
        let response = client.get(uri).await.map_err(|e| format!("{url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("{url}: {}", response.status()));
        }
        let body = http_body_util::Limited::new(response.into_body(), SCRAPE_LIMIT)
            .collect()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        String::from_utf8(body.to_bytes().to_vec()).map_err(|e| format!("{url}: {e}"))
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .map_err(|_| format!("{url}: no whole answer within 2 s"))?
}

/// One metric line: its name, labels and value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Line {
    pub(crate) name: String,
    pub(crate) labels: Vec<(String, String)>,
    pub(crate) value: f64,
}

impl Line {
    fn label(&self, key: &str) -> &str {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// Parses the Prometheus text format (comments skipped; a line it cannot read is skipped).
pub(crate) fn parse(text: &str) -> Vec<Line> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Line> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let mut key = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '}' => {
                    end = Some(i + 1);
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    if chars.next().map(|(_, c)| c) != Some('"') {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            '"' => break,
                            other => value.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                other => key.push(other),
            }
        }
        rest = &inner[end?..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Line {
        name,
        labels,
        value,
    })
}

/// Counters of one pipeline, as read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub(crate) struct Counts {
    pub(crate) taken: f64,
    pub(crate) delivered: f64,
    pub(crate) filtered: f64,
    pub(crate) faulted: f64,
}

impl Counts {
    fn add(&mut self, outcome: &str, value: f64) {
        match outcome {
            "taken" => self.taken += value,
            "delivered" => self.delivered += value,
            "filtered" => self.filtered += value,
            "faulted" => self.faulted += value,
            _ => {}
        }
    }

    /// Per second since `before`, `seconds` ago; a counter that went down (a restart) counts
    /// from zero.
    fn rate(&self, before: &Counts, seconds: f64) -> Counts {
        let per = |now: f64, then: f64| {
            let delta = if now >= then { now - then } else { now };
            (delta / seconds * 10.0).round() / 10.0
        };
        Counts {
            taken: per(self.taken, before.taken),
            delivered: per(self.delivered, before.delivered),
            filtered: per(self.filtered, before.filtered),
            faulted: per(self.faulted, before.faulted),
        }
    }
}

/// A pipeline in a sample.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PipelineFlow {
    pub(crate) processor: String,
    pub(crate) pipeline: String,
    /// Events per second since the sample before.
    pub(crate) rate: Counts,
    /// Since the process started.
    pub(crate) total: Counts,
}

/// A processor in a sample.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ProcessorFlow {
    pub(crate) name: String,
    /// Paused by the console; `None` where this console cannot pause it.
    pub(crate) paused: Option<bool>,
    pub(crate) in_flight: Option<f64>,
    pub(crate) lag_seconds: Option<f64>,
}

/// A sink target in a sample: its breaker, adaptive limit and throttles.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct SinkFlow {
    pub(crate) sink: String,
    /// `closed`, `open` or `half-open`.
    pub(crate) breaker: Option<&'static str>,
    pub(crate) limit: Option<f64>,
    /// Per second.
    pub(crate) throttles: f64,
    pub(crate) retries: f64,
    #[serde(skip)]
    throttles_total: f64,
    #[serde(skip)]
    retries_total: f64,
}

/// A subscription in a sample.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SubscriptionFlow {
    pub(crate) name: String,
    pub(crate) lag: u64,
    pub(crate) partitions: Vec<(String, u64)>,
    pub(crate) owner: Option<String>,
    pub(crate) progress: String,
}

/// One second of the flow.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Sample {
    /// When (ms since the epoch).
    pub(crate) at: i64,
    pub(crate) processors: Vec<ProcessorFlow>,
    pub(crate) pipelines: Vec<PipelineFlow>,
    pub(crate) sinks: Vec<SinkFlow>,
    /// Rate-limit waits per second, and their mean in ms over the last second.
    pub(crate) rate_limit_waits: f64,
    pub(crate) rate_limit_wait_ms: Option<f64>,
    pub(crate) subscriptions: Vec<SubscriptionFlow>,
    /// What went wrong reading the metrics or the hub, if anything.
    pub(crate) problems: Vec<String>,
    #[serde(skip)]
    waits: (f64, f64),
}

/// The samples of the last minutes.
#[derive(Default)]
pub(crate) struct History {
    pub(crate) samples: VecDeque<Sample>,
}

impl History {
    /// Builds the next sample from the metrics' text and the hub's stats, and keeps it.
    pub(crate) fn next(
        &mut self,
        at: i64,
        processors: Vec<(String, Option<bool>)>,
        metrics: Result<Option<String>, String>,
        hub: Result<floodway::hub::HubStats, String>,
    ) -> &Sample {
        let mut problems = Vec::new();
        let unread = metrics.is_err();
        let lines = match metrics {
            Ok(text) => parse(text.as_deref().unwrap_or("")),
            Err(e) => {
                problems.push(format!("metrics: {e}"));
                Vec::new()
            }
        };
        let before = self.samples.back();
        let seconds = before.map_or(1.0, |b| ((at - b.at) as f64 / 1000.0).max(0.001));
        let mut totals: BTreeMap<(String, String), Counts> = BTreeMap::new();
        let mut gauges: BTreeMap<String, (Option<f64>, Option<f64>)> = BTreeMap::new();
        let mut sinks: BTreeMap<String, SinkFlow> = BTreeMap::new();
        let mut waits = (0.0, 0.0);
        for line in &lines {
            match line.name.as_str() {
                "floodway_events_total" => totals
                    .entry((
                        line.label("processor").to_owned(),
                        line.label("pipeline").to_owned(),
                    ))
                    .or_default()
                    .add(line.label("outcome"), line.value),
                "floodway_in_flight" => {
                    gauges
                        .entry(line.label("processor").to_owned())
                        .or_default()
                        .0 = Some(line.value)
                }
                "floodway_lag_seconds" => {
                    gauges
                        .entry(line.label("processor").to_owned())
                        .or_default()
                        .1 = Some(line.value)
                }
                "floodway_breaker_state" => {
                    let s = sinks_entry(&mut sinks, line.label("sink"));
                    s.breaker = Some(match line.value as u8 {
                        0 => "closed",
                        1 => "open",
                        _ => "half-open",
                    });
                }
                "floodway_concurrency_limit" => {
                    sinks_entry(&mut sinks, line.label("sink")).limit = Some(line.value)
                }
                "floodway_throttles_total" => {
                    sinks_entry(&mut sinks, line.label("sink")).throttles_total += line.value
                }
                "floodway_retries_total" => {
                    sinks_entry(&mut sinks, line.label("sink")).retries_total += line.value
                }
                "floodway_rate_limit_wait_seconds_count" => waits.0 += line.value,
                "floodway_rate_limit_wait_seconds_sum" => waits.1 += line.value,
                _ => {}
            }
        }
        let mut pipelines: Vec<PipelineFlow> = totals
            .into_iter()
            .map(|((processor, pipeline), total)| {
                // New since the sample before: it counted from zero; in the first sample,
                // there is no rate yet.
                let then = before.map_or(total, |b| {
                    b.pipelines
                        .iter()
                        .find(|p| p.processor == processor && p.pipeline == pipeline)
                        .map_or(Counts::default(), |p| p.total)
                });
                PipelineFlow {
                    rate: total.rate(&then, seconds),
                    processor,
                    pipeline,
                    total,
                }
            })
            .collect();
        let per_second = |now: f64, then: Option<f64>| {
            let then = then.unwrap_or(now);
            let delta = if now >= then { now - then } else { now };
            (delta / seconds * 10.0).round() / 10.0
        };
        let mut sinks: Vec<SinkFlow> = sinks
            .into_values()
            .map(|mut s| {
                let then = before.and_then(|b| b.sinks.iter().find(|t| t.sink == s.sink));
                s.throttles = per_second(s.throttles_total, then.map(|t| t.throttles_total));
                s.retries = per_second(s.retries_total, then.map(|t| t.retries_total));
                s
            })
            .collect();
        if unread {
            // The metrics could not be read: the totals stand as they were, at no rate, so
            // that the next sample read measures its rates from them and not from zero.
            if let Some(b) = before {
                pipelines = b
                    .pipelines
                    .iter()
                    .map(|p| PipelineFlow {
                        rate: Counts::default(),
                        ..p.clone()
                    })
                    .collect();
                sinks = b
                    .sinks
                    .iter()
                    .map(|s| SinkFlow {
                        throttles: 0.0,
                        retries: 0.0,
                        ..s.clone()
                    })
                    .collect();
                waits = b.waits;
            }
        }
        let (then_count, then_sum) = before.map_or(waits, |b| b.waits);
        let new_waits = waits.0 - then_count;
        let rate_limit_wait_ms = (new_waits > 0.0)
            .then(|| ((waits.1 - then_sum) / new_waits * 1000.0 * 10.0).round() / 10.0);
        let processors = processors
            .into_iter()
            .map(|(name, paused)| {
                let (in_flight, lag_seconds) = gauges.get(&name).copied().unwrap_or_default();
                ProcessorFlow {
                    name,
                    paused,
                    in_flight,
                    lag_seconds,
                }
            })
            .collect();
        let subscriptions = match hub {
            Ok(stats) => stats
                .subscriptions
                .into_iter()
                .map(|s| SubscriptionFlow {
                    name: s.name,
                    lag: s.lag,
                    partitions: s.partitions,
                    owner: s.owner.map(|(owner, _)| owner),
                    progress: s.progress,
                })
                .collect(),
            Err(e) => {
                problems.push(format!("hub: {e}"));
                Vec::new()
            }
        };
        let sample = Sample {
            at,
            processors,
            pipelines,
            sinks,
            rate_limit_waits: per_second(waits.0, Some(then_count)),
            rate_limit_wait_ms,
            subscriptions,
            problems,
            waits,
        };
        if self.samples.len() == KEPT {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
        self.samples.back().expect("pushed above")
    }
}

fn sinks_entry<'a>(sinks: &'a mut BTreeMap<String, SinkFlow>, name: &str) -> &'a mut SinkFlow {
    sinks.entry(name.to_owned()).or_insert_with(|| SinkFlow {
        sink: name.to_owned(),
        ..SinkFlow::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_parses_with_labels_escapes_and_infinities() {
        let text = "# TYPE floodway_events_total counter\n\
                    floodway_events_total{processor=\"p\",pipeline=\"a \\\"b\\\"\",outcome=\"taken\"} 12\n\
                    floodway_rate_limit_wait_seconds_sum 0.25\n\
                    floodway_x{quantile=\"1\"} +Inf\n\
                    broken{ 3\n";
        let lines = parse(text);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(lines[0].label("pipeline"), "a \"b\"");
        assert_eq!(lines[0].label("outcome"), "taken");
        assert_eq!(lines[0].value, 12.0);
        assert_eq!(lines[1].name, "floodway_rate_limit_wait_seconds_sum");
        assert!(lines[2].value.is_infinite());
    }

    /// A metrics endpoint that sends its headers and then holds the connection: the scrape
    /// fails within its 2 s instead of waiting for the body for ever.
    #[tokio::test]
    async fn a_metrics_endpoint_stalling_in_its_body_fails_the_scrape_in_time() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/metrics", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = socket.read(&mut request).await.unwrap();
            socket
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nfloodway_")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(socket);
        });
        let started = std::time::Instant::now();
        let scraped = tokio::time::timeout(Duration::from_secs(10), scrape(&url))
            .await
            .expect("the scrape gives up by itself");
        let err = scraped.expect_err("no whole answer");
        assert!(err.contains("within 2 s"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        server.abort();
    }

    fn metrics(taken: u32, faulted: u32, throttles: u32, waits: (u32, f64)) -> String {
        format!(
            "floodway_events_total{{processor=\"p\",pipeline=\"v\",outcome=\"taken\"}} {taken}\n\
             floodway_events_total{{processor=\"p\",pipeline=\"v\",outcome=\"faulted\"}} {faulted}\n\
             floodway_in_flight{{processor=\"p\"}} 7\n\
             floodway_breaker_state{{sink=\"api\"}} 1\n\
             floodway_concurrency_limit{{sink=\"api\"}} 12\n\
             floodway_throttles_total{{sink=\"api\"}} {throttles}\n\
             floodway_rate_limit_wait_seconds_count {}\n\
             floodway_rate_limit_wait_seconds_sum {}\n",
            waits.0, waits.1
        )
    }

    #[test]
    fn rates_are_per_second_between_samples_and_survive_a_restart() {
        let mut history = History::default();
        let hub = || Ok(floodway::hub::HubStats::default());
        let procs = || vec![("p".to_owned(), Some(false)), ("q".to_owned(), None)];
        history.next(
            1_000,
            procs(),
            Ok(Some(metrics(100, 1, 0, (0, 0.0)))),
            hub(),
        );
        let s = history.next(
            3_000,
            procs(),
            Ok(Some(metrics(700, 5, 4, (10, 0.5)))),
            hub(),
        );
        let p = &s.pipelines[0];
        assert_eq!((p.rate.taken, p.rate.faulted), (300.0, 2.0));
        assert_eq!(p.total.taken, 700.0);
        assert_eq!(s.sinks[0].breaker, Some("open"));
        assert_eq!(s.sinks[0].limit, Some(12.0));
        assert_eq!(s.sinks[0].throttles, 2.0);
        assert_eq!(s.rate_limit_waits, 5.0);
        assert_eq!(s.rate_limit_wait_ms, Some(50.0));
        assert_eq!(s.processors[0].in_flight, Some(7.0));
        assert_eq!(s.processors[1].in_flight, None);
        // The metrics' process restarted: its counters start again from zero.
        let s = history.next(4_000, procs(), Ok(Some(metrics(50, 0, 0, (0, 0.0)))), hub());
        assert_eq!(s.pipelines[0].rate.taken, 50.0);
        // An unreachable endpoint is a problem on the page, not an error; the totals stand,
        // and the rates after it are measured from them.
        let s = history.next(5_000, procs(), Err("refused".into()), Err("gone".into()));
        assert_eq!(s.problems, vec!["metrics: refused", "hub: gone"]);
        assert_eq!(
            (s.pipelines[0].rate.taken, s.pipelines[0].total.taken),
            (0.0, 50.0)
        );
        let s = history.next(6_000, procs(), Ok(Some(metrics(60, 0, 0, (0, 0.0)))), hub());
        assert_eq!(s.pipelines[0].rate.taken, 10.0);
        assert_eq!(s.rate_limit_waits, 0.0);
        for t in 0..KEPT as i64 {
            history.next(7_000 + t * 1000, procs(), Ok(None), hub());
        }
        assert_eq!(history.samples.len(), KEPT);
    }
}
