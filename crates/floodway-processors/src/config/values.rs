//! Values of the configuration file that are more than strings, parsed when the file is read:
//! a bad one is an error naming the key, the file and the line.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A duration written as text: `500ms`, `30s`, `2m`, `7d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }
}

impl From<Duration> for HumanDuration {
    fn from(d: Duration) -> Self {
        HumanDuration(d)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text)
            .map(HumanDuration)
            .map_err(|e| {
                de::Error::custom(format!(
                    "`{text}` is not a duration like 500ms, 30s, 2m or 7d: {e}"
                ))
            })
    }
}

/// This process's share of a stream's partitions, `i/n`: the partitions `p` with `p % n == i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instance {
    /// `i`.
    pub index: u32,
    /// `n`.
    pub count: u32,
}

impl<'de> Deserialize<'de> for Instance {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let parsed = text
            .split_once('/')
            .and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
        match parsed {
            Some((index, count)) if index < count => Ok(Instance { index, count }),
            _ => Err(de::Error::custom(format!(
                "`{text}` is not `i/n` with i < n (like 0/2)"
            ))),
        }
    }
}

/// Calls at once: `"adaptive"` (found and followed) or a fixed number of at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConcurrencyConfig {
    /// Adaptive concurrency.
    #[default]
    Adaptive,
    /// A fixed limit.
    Fixed(usize),
}

impl<'de> Deserialize<'de> for ConcurrencyConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ConcurrencyConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"adaptive\" or a number of calls of at least 1")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                match v {
                    "adaptive" => Ok(ConcurrencyConfig::Adaptive),
                    other => Err(E::custom(format!(
                        "concurrency is \"adaptive\" or a number, not \"{other}\""
                    ))),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                match usize::try_from(v) {
                    Ok(n) if n >= 1 => Ok(ConcurrencyConfig::Fixed(n)),
                    _ => Err(E::custom(format!(
                        "concurrency must be at least 1, not {v}"
                    ))),
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// An HTTP method of the *http* processor (any case in the file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HttpMethod {
    /// GET.
    Get,
    /// POST.
    #[default]
    Post,
    /// PUT.
    Put,
    /// PATCH.
    Patch,
    /// DELETE.
    Delete,
}

impl HttpMethod {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Patch => "PATCH",
            HttpMethod::Delete => "DELETE",
        }
    }
}

impl<'de> Deserialize<'de> for HttpMethod {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Ok(match text.to_ascii_uppercase().as_str() {
            "GET" => HttpMethod::Get,
            "POST" => HttpMethod::Post,
            "PUT" => HttpMethod::Put,
            "PATCH" => HttpMethod::Patch,
            "DELETE" => HttpMethod::Delete,
            _ => {
                return Err(de::Error::custom(format!(
                    "method `{text}` is not one of GET, POST, PUT, PATCH, DELETE"
                )))
            }
        })
    }
}

/// The body of the *http* processor's requests: `"event"`, `"none"`, or a JSON pointer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpBody(pub floodway_http::Body);

impl<'de> Deserialize<'de> for HttpBody {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use floodway_http::Body;
        let text = String::deserialize(deserializer)?;
        Ok(HttpBody(match text.as_str() {
            "event" => Body::Event,
            "none" => Body::Empty,
            pointer if pointer.starts_with('/') => Body::Field(pointer.into()),
            other => {
                return Err(de::Error::custom(format!(
                    "body is \"event\", \"none\" or a JSON pointer like \"/order\", not \"{other}\""
                )))
            }
        }))
    }
}

/// What an answer means, in `treat_as`: `success`, `poison`, `transient`, `throttled`,
/// `fatal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpOutcome(pub floodway_http::Outcome);

impl<'de> Deserialize<'de> for HttpOutcome {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse()
            .map(HttpOutcome)
            .map_err(|e: String| de::Error::custom(format!("treat_as: {e}")))
    }
}
