//! Durations as users write them in CRDs: `"1.5s"`, `"250ms"`, `"1m30s"`, `"2h"`.

use std::{borrow::Cow, fmt, time};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// The pattern the apiserver enforces: one or more decimal numbers, each with a unit of
/// `h`, `m`, `s` or `ms` (Istio's and Go's notation, without the sub-millisecond units).
pub const PATTERN: &str = r"^([0-9]{1,9}(\.[0-9]{1,9})?(h|ms|m|s))+$";
const MAX_LENGTH: u32 = 32;

/// A duration kept exactly as written, so that objects round-trip unchanged; [`Duration::parse`]
/// turns it into a [`std::time::Duration`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Duration(String);

/// A string that does not match [`PATTERN`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {0:?}: expected numbers with units h, m, s or ms, like \"1.5s\" or \"250ms\"")]
pub struct ParseDurationError(String);

impl Duration {
    /// Wraps a string without checking it; [`Duration::parse`] checks.
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The length of time this duration names.
    pub fn parse(&self) -> Result<time::Duration, ParseDurationError> {
        let invalid = || ParseDurationError(self.0.clone());
        let mut rest = self.0.as_str();
        if rest.is_empty() || rest.len() > MAX_LENGTH as usize {
            return Err(invalid());
        }
        let mut total = time::Duration::ZERO;
        while !rest.is_empty() {
            let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(invalid)?;
            let (number, after) = rest.split_at(number_len);
            let (unit_secs, unit_len) = if after.starts_with("ms") {
                (0.001, 2)
            } else {
                match after.as_bytes().first() {
                    Some(b'h') => (3600.0, 1),
                    Some(b'm') => (60.0, 1),
                    Some(b's') => (1.0, 1),
                    _ => return Err(invalid()),
                }
            };
            let well_formed = !number.is_empty()
                && !number.starts_with('.')
                && !number.ends_with('.')
                && number.matches('.').count() <= 1;
            if !well_formed {
                return Err(invalid());
            }
            let value: f64 = number.parse().map_err(|_| invalid())?;
            total += time::Duration::try_from_secs_f64(value * unit_secs).map_err(|_| invalid())?;
            rest = &after[unit_len..];
        }
        Ok(total)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "A duration such as \"1.5s\", \"250ms\" or \"1m30s\" (units h, m, s, ms).",
            "pattern": PATTERN,
            "maxLength": MAX_LENGTH,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(text: &str) -> f64 {
        Duration::new(text).parse().unwrap().as_secs_f64()
    }

    #[test]
    fn parses_the_notations_users_write() {
        assert_eq!(secs("1.5s"), 1.5);
        assert_eq!(secs("250ms"), 0.25);
        assert_eq!(secs("1m30s"), 90.0);
        assert_eq!(secs("2h"), 7200.0);
        assert_eq!(secs("1h1m1s1ms"), 3661.001);
    }

    #[test]
    fn rejects_what_the_schema_pattern_rejects() {
        for bad in ["", "5", "1.s", ".5s", "1d", "-1s", "1 s", "1.2.3s", "ms", "1us"] {
            assert!(Duration::new(bad).parse().is_err(), "{bad:?} should not parse");
            let pattern = regex_lite_match(bad);
            assert!(!pattern, "{bad:?} should not match the schema pattern");
        }
        for good in ["1.5s", "250ms", "1m30s", "2h"] {
            assert!(regex_lite_match(good), "{good:?} should match the schema pattern");
        }
    }

    /// The schema pattern, checked with the same engine the offline schema tests use.
    fn regex_lite_match(text: &str) -> bool {
        jsonschema::is_valid(
            &serde_json::json!({"type": "string", "pattern": PATTERN}),
            &serde_json::json!(text),
        )
    }
}
