//! Which events a pipeline takes: by type (exact, prefix, glob, set) and by content.

use std::collections::HashSet;

use crate::error::BuildError;
use crate::event::FAULT_EVENT_TYPE;

/// Matches event types: `order-submitted` (exact), `order-*` (prefix), `*-submitted` or
/// `order-*-v2` (glob), or any of a set.
///
/// A pattern with a wildcard never matches `fault` events, so a catch-all pipeline does not
/// consume the faults it raises; name `fault` exactly to take them (the fault monitor does).
///
/// ```
/// use floodway::pipeline::TypeFilter;
/// let f = TypeFilter::parse("order-*").unwrap();
/// assert!(f.matches("order-submitted"));
/// assert!(!f.matches("customer-created"));
/// assert!(!TypeFilter::parse("*").unwrap().matches("fault"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeFilter {
    /// Exactly this type.
    Exact(String),
    /// Types that start with this prefix (pattern `prefix*`).
    Prefix(String),
    /// A glob with `*` wildcards, split at the wildcards.
    Glob(Vec<String>),
    /// Any of these types.
    Set(HashSet<String>),
}

impl TypeFilter {
    /// Parses a pattern: exact, or with `*` wildcards.
    ///
    /// # Errors
    /// When the pattern is empty.
    pub fn parse(pattern: &str) -> Result<Self, BuildError> {
        if pattern.is_empty() {
            return Err(BuildError::InvalidPattern(pattern.into()));
        }
        if !pattern.contains('*') {
            return Ok(TypeFilter::Exact(pattern.into()));
        }
        let star = pattern.find('*').unwrap_or(pattern.len());
        if star == pattern.len() - 1 {
            return Ok(TypeFilter::Prefix(pattern[..star].into()));
        }
        Ok(TypeFilter::Glob(
            pattern.split('*').map(str::to_owned).collect(),
        ))
    }

    /// Any of the given exact types.
    pub fn set<I: IntoIterator<Item = S>, S: Into<String>>(types: I) -> Self {
        TypeFilter::Set(types.into_iter().map(Into::into).collect())
    }

    /// Whether `ty` matches.
    pub fn matches(&self, ty: &str) -> bool {
        match self {
            TypeFilter::Exact(t) => t == ty,
            TypeFilter::Set(s) => s.contains(ty),
            TypeFilter::Prefix(p) => ty != FAULT_EVENT_TYPE && ty.starts_with(p.as_str()),
            TypeFilter::Glob(parts) => ty != FAULT_EVENT_TYPE && glob_match(parts, ty),
        }
    }
}

fn glob_match(parts: &[String], mut text: &str) -> bool {
    let (first, rest) = match parts.split_first() {
        Some(x) => x,
        None => return true,
    };
    let Some(after) = text.strip_prefix(first.as_str()) else {
        return false;
    };
    text = after;
    let Some((last, middle)) = rest.split_last() else {
        return text.is_empty();
    };
    for part in middle {
        match text.find(part.as_str()) {
            Some(i) => text = &text[i + part.len()..],
            None => return false,
        }
    }
    text.len() >= last.len() && text.ends_with(last.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let m = |p: &str, t: &str| TypeFilter::parse(p).unwrap().matches(t);
        assert!(m("a-b", "a-b"));
        assert!(!m("a-b", "a-bc"));
        assert!(m("order-*", "order-x"));
        assert!(m("*-submitted", "order-submitted"));
        assert!(!m("*-submitted", "order-submitted-v2"));
        assert!(m("order-*-v2", "order-paid-v2"));
        assert!(!m("order-*-v2", "order-v2"));
        assert!(m("*", "anything"));
        assert!(!m("*", "fault"));
        assert!(m("fault", "fault"));
        assert!(TypeFilter::set(["a", "b"]).matches("b"));
        assert!(TypeFilter::parse("").is_err());
    }
}
