//! Query strings: `application/x-www-form-urlencoded` pairs and bounded numeric parameters. Every
//! error is the message of a 400 answer and names the parameter.

use std::{fmt::Display, str::FromStr};

/// The decoded `name=value` pairs of `query`, in order (a name may repeat).
pub(crate) fn pairs(query: Option<&str>) -> Result<Vec<(String, String)>, String> {
    query
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(name)?, decode(value)?))
        })
        .collect()
}

/// Percent-decoding, with `+` as a space.
fn decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).and_then(|hex| std::str::from_utf8(hex).ok());
                let byte = hex.and_then(|hex| u8::from_str_radix(hex, 16).ok());
                out.push(byte.ok_or_else(|| format!("bad percent-encoding in the query string: {text:?}"))?);
                i += 2;
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("the query string is not UTF-8: {text:?}"))
}

/// Parses parameter `name` and checks `min <= value <= max`.
pub(crate) fn bounded<T>(name: &str, value: &str, min: T, max: T) -> Result<T, String>
where
    T: FromStr + PartialOrd + Display,
{
    match value.parse::<T>() {
        Ok(parsed) if parsed >= min && parsed <= max => Ok(parsed),
        _ => Err(format!("invalid {name}={value:?}: expected an integer from {min} to {max}")),
    }
}

/// Parses boolean parameter `name`: `true` or `false`.
pub(crate) fn boolean(name: &str, value: &str) -> Result<bool, String> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("invalid {name}={value:?}: expected true or false")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_pairs() {
        let query = Some("url=http%3A%2F%2Fa%3A80%2F%3Fstatus%3D503&header=X-A:b+c&n=&flag");
        assert_eq!(
            pairs(query).unwrap(),
            [
                ("url".to_string(), "http://a:80/?status=503".to_string()),
                ("header".to_string(), "X-A:b c".to_string()),
                ("n".to_string(), String::new()),
                ("flag".to_string(), String::new()),
            ]
        );
        assert!(pairs(None).unwrap().is_empty());
    }

    #[test]
    fn rejects_bad_percent_encoding() {
        assert!(pairs(Some("a=%zz")).is_err());
        assert!(pairs(Some("a=%4")).is_err());
        assert!(pairs(Some("a=%ff")).is_err());
    }

    #[test]
    fn bounds_are_inclusive() {
        assert_eq!(bounded("n", "1", 1u32, 10), Ok(1));
        assert_eq!(bounded("n", "10", 1u32, 10), Ok(10));
        assert_eq!(
            bounded("n", "11", 1u32, 10),
            Err(r#"invalid n="11": expected an integer from 1 to 10"#.into())
        );
        assert!(bounded("n", "0", 1u32, 10).is_err());
        assert!(bounded("n", "-1", 1u32, 10).is_err());
    }
}
