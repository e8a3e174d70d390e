//! Text with JSON pointers in braces, filled in from each event: `/orders/{/order/id}`.

use std::borrow::Cow;

use floodway::{Error, Event};

/// A text with `{/json/pointer}` placeholders. A `{` not followed by `/` is plain text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(String),
}

/// How a field's value is written into the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Escape {
    /// Percent-encoded: safe in a URL path segment or query value.
    Url,
    /// As it is (a header value).
    None,
}

impl Template {
    /// Parses `text`.
    ///
    /// # Errors
    /// An unclosed `{/...`.
    pub(crate) fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        let mut literal = String::new();
        while let Some(at) = rest.find("{/") {
            literal.push_str(&rest[..at]);
            let after = &rest[at + 1..];
            let end = after
                .find('}')
                .ok_or_else(|| format!("`{{{after}` is not closed with `}}`"))?;
            if !literal.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut literal)));
            }
            parts.push(Part::Field(after[..end].to_string()));
            rest = &after[end + 1..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Ok(Template { parts })
    }

    /// The text before the first placeholder.
    pub(crate) fn prefix(&self) -> &str {
        match self.parts.first() {
            Some(Part::Text(t)) => t,
            _ => "",
        }
    }

    /// Whether it has no placeholder.
    pub(crate) fn is_constant(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(_)))
    }

    /// The text with every placeholder given `sample`: to check what it renders to.
    pub(crate) fn sample(&self, sample: &str) -> String {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => t.as_str(),
                Part::Field(_) => sample,
            })
            .collect()
    }

    /// The text for `event`.
    ///
    /// # Errors
    /// A [poison](floodway::ErrorClass::Poison) error named `MissingField` when a field is
    /// absent, null, an object or an array, or `InvalidField` when a URL's fields make its
    /// path name another resource (a `.` or `..` segment, an empty one): the event cannot be
    /// sent as configured.
    pub(crate) fn render<'a>(
        &'a self,
        event: &Event,
        escape: Escape,
    ) -> Result<Cow<'a, str>, Error> {
        if let [Part::Text(t)] = self.parts.as_slice() {
            return Ok(Cow::Borrowed(t));
        }
        let mut out = String::new();
        for (i, part) in self.parts.iter().enumerate() {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field(pointer) => {
                    let value = scalar_at(event, pointer)?;
                    // What follows the field: the path's end, or more of it.
                    let ends_path = match self.parts.get(i + 1) {
                        None => true,
                        Some(Part::Text(t)) => t.starts_with(['?', '#']),
                        Some(Part::Field(_)) => false,
                    };
                    match escape {
                        // An empty field that is the path's whole last segment names the
                        // collection, not one of it (`/orders/` for `/orders/{id}`); one
                        // between two others makes `//`, found below.
                        Escape::Url
                            if value.is_empty()
                                && ends_path
                                && out.ends_with('/')
                                && in_path(&out) =>
                        {
                            return Err(Error::poison_msg(
                                "InvalidField",
                                format!(
                                    "{pointer} is empty in event {}, in the URL's path: it \
                                     would name another resource",
                                    event.id()
                                ),
                            ));
                        }
                        Escape::Url => floodway::fault::percent_encode(&value, &mut out),
                        Escape::None => out.push_str(&value),
                    }
                }
            }
        }
        if escape == Escape::Url {
            if let Some(segment) = moved_segment(&out) {
                // `/orders/../cancel` is `/cancel` once a server or a proxy tidies it: the
                // event cannot be sent as configured.
                return Err(Error::poison_msg(
                    "InvalidField",
                    format!(
                        "event {} makes a path segment `{segment}` of the URL, which names \
                         another resource (the URL is not quoted: it may hold redacted values)",
                        event.id()
                    ),
                ));
            }
        }
        Ok(Cow::Owned(out))
    }
}

/// Whether what follows `url` so far is in its path (past the host, before a query).
fn in_path(url: &str) -> bool {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    url[after_scheme..].contains('/') && !url.contains(['?', '#'])
}

/// A segment of `url`'s path that moves it elsewhere once tidied: `.`, `..`, or an empty
/// one between two others (`/orders//cancel`).
fn moved_segment(url: &str) -> Option<&str> {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let path_start = after_scheme + url[after_scheme..].find('/')?;
    let path_end = url[path_start..]
        .find(['?', '#'])
        .map_or(url.len(), |i| path_start + i);
    let segments: Vec<&str> = url[path_start + 1..path_end].split('/').collect();
    let last = segments.len().saturating_sub(1);
    segments
        .iter()
        .enumerate()
        .find(|(i, s)| matches!(**s, "." | "..") || (s.is_empty() && *i < last))
        .map(|(_, s)| *s)
}

/// The text of a string, number or boolean at `pointer`.
pub(crate) fn scalar_at(event: &Event, pointer: &str) -> Result<String, Error> {
    let missing = |what: &str| {
        Error::poison_msg(
            "MissingField",
            format!("{pointer} is {what} in event {}", event.id()),
        )
    };
    let raw = event.json_at(pointer).ok_or_else(|| missing("missing"))?;
    let raw = raw.trim();
    if raw.starts_with('"') {
        return serde_json::from_str::<String>(raw).map_err(|_| missing("not valid JSON"));
    }
    match raw.as_bytes().first() {
        Some(b'{') => Err(missing("an object, not a value")),
        Some(b'[') => Err(missing("an array, not a value")),
        _ if raw == "null" => Err(missing("null")),
        _ => Ok(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        Event::decode(
            br#"{"id":"e-1","type":"t","timestamp":1,"partitionKey":"k",
                 "order":{"id":"o 1/2","n":42,"paid":true,"none":null,"lines":[1]}}"#,
        )
        .unwrap()
    }

    #[test]
    fn fields_fill_the_text_and_are_escaped_in_urls() {
        let t =
            Template::parse("https://api/orders/{/order/id}?n={/order/n}&p={/order/paid}").unwrap();
        assert_eq!(t.prefix(), "https://api/orders/");
        assert!(!t.is_constant());
        assert_eq!(
            t.render(&event(), Escape::Url).unwrap(),
            "https://api/orders/o%201%2F2?n=42&p=true"
        );
        let h = Template::parse("Order {/order/id}").unwrap();
        assert_eq!(h.render(&event(), Escape::None).unwrap(), "Order o 1/2");
        assert_eq!(t.sample("x"), "https://api/orders/x?n=x&p=x");
    }

    #[test]
    fn braces_without_a_pointer_are_text() {
        let t = Template::parse(r#"{"a":1}"#).unwrap();
        assert!(t.is_constant());
        assert_eq!(t.render(&event(), Escape::None).unwrap(), r#"{"a":1}"#);
        assert!(Template::parse("x{/a").is_err());
    }

    #[test]
    fn a_field_that_would_change_the_path_is_poison() {
        let t = Template::parse("https://api/orders/{/order}/cancel?note={/note}").unwrap();
        let with = |order: &str, note: &str| {
            let text = format!(
                r#"{{"id":"e","type":"t","timestamp":1,"partitionKey":"k","order":"{order}","note":"{note}"}}"#
            );
            t.render(&Event::decode(text.as_bytes()).unwrap(), Escape::Url)
                .map(|u| u.into_owned())
        };
        for id in ["..", ".", ""] {
            let err = with(id, "x").unwrap_err();
            assert_eq!(err.class(), floodway::ErrorClass::Poison, "{id:?}");
            assert_eq!(err.name(), "InvalidField");
        }
        // A template of one field `v`, rendered for `value`.
        let part = |template: &str, value: &str| {
            let text = format!(
                r#"{{"id":"e","type":"t","timestamp":1,"partitionKey":"k","v":"{value}"}}"#
            );
            Template::parse(template)
                .unwrap()
                .render(&Event::decode(text.as_bytes()).unwrap(), Escape::Url)
                .map(|u| u.into_owned())
        };
        // The last segment too: `/orders/` is the collection.
        for id in ["..", ".", ""] {
            let err = part("https://api/orders/{/v}?note=x", id).unwrap_err();
            assert_eq!(err.class(), floodway::ErrorClass::Poison, "{id:?}");
            assert_eq!(err.name(), "InvalidField");
        }
        assert_eq!(
            with("a.b", "").unwrap(),
            "https://api/orders/a.b/cancel?note="
        );
        assert_eq!(
            with("o-1", "..").unwrap(),
            "https://api/orders/o-1/cancel?note=.."
        );
        // The rendered segment counts, not the field alone.
        assert!(part("https://api/items/.{/v}", ".").is_err(), "makes `..`");
        assert_eq!(
            part("https://api/items/sku{/v}/", "").unwrap(),
            "https://api/items/sku/"
        );
        assert_eq!(
            part("https://api/x#{/v}", "..").unwrap(),
            "https://api/x#.."
        );
    }

    #[test]
    fn a_missing_or_structured_field_is_poison() {
        for pointer in ["/order/missing", "/order/none", "/order", "/order/lines"] {
            let t = Template::parse(&format!("https://api/{{{pointer}}}")).unwrap();
            let err = t.render(&event(), Escape::Url).unwrap_err();
            assert_eq!(err.class(), floodway::ErrorClass::Poison, "{pointer}");
            assert_eq!(err.name(), "MissingField");
            assert!(err.message().contains(pointer), "{}", err.message());
        }
    }
}
