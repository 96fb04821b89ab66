//! Request path normalization, once, before anything matches on the path (issue 13: the
//! authorization policies must see the path the application will see, and the upstream must
//! receive exactly the path that was checked).
//!
//! What it does, in order (Istio's `NORMALIZE_AND_MERGE_SLASHES` with escaped slashes refused):
//! 1. the query (after `?`) is left as it is;
//! 2. `\` becomes `/` (as Envoy's path normalization does);
//! 3. percent-encoded `/` and `\` (`%2F`, `%5C`) are **refused**: a path that means different
//!    things to the proxy and the application is a bypass waiting to happen;
//! 4. percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded; other escapes
//!    are kept, with upper-case hex; a malformed escape is refused;
//! 5. runs of `/` become one;
//! 6. `.` and `..` segments are removed (RFC 3986 §5.2.4), after decoding, so `/%2e%2e/` is
//!    caught too; `..` never climbs above the root.
//!
//! `;` parameters stay part of their segment (`/admin;x` is not `/admin`), and case is kept: a
//! rule decides whether it matches case-insensitively.

use std::borrow::Cow;

/// Why a path is refused (the request gets 400).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the path contains an encoded slash or backslash")]
    EncodedSlash,
    #[error("the path contains a malformed percent-encoding")]
    BadEscape,
    #[error("the path does not start with /")]
    NotAbsolute,
    /// `/..;/admin`: a dot segment with parameters, which some servers resolve as `..`.
    #[error("the path has a dot segment with parameters")]
    DotSegmentParameters,
}

/// `.;x` or `..;x`: a dot segment to servers that drop path parameters (Tomcat, Jetty, Spring).
fn is_dot_with_parameters(segment: &[u8]) -> bool {
    let name = segment.split(|&b| b == b';').next().unwrap_or_default();
    segment.contains(&b';') && (name == b"." || name == b"..")
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// The normalized path and query; borrowed when nothing changed (the common case costs a scan).
pub fn normalize(path_and_query: &str) -> Result<Cow<'_, str>, Refused> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    if path == "*" {
        return Ok(Cow::Borrowed(path_and_query)); // OPTIONS *
    }
    if !path.starts_with('/') && !path.starts_with('\\') {
        return Err(Refused::NotAbsolute);
    }
    if is_normal(path.as_bytes()) {
        return Ok(Cow::Borrowed(path_and_query));
    }
    // Steps 2-4: one byte string with backslashes turned and escapes settled.
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => decoded.push(b'/'),
            b'%' => {
                let (Some(h), Some(l)) =
                    (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex))
                else {
                    return Err(Refused::BadEscape);
                };
                let byte = h * 16 + l;
                if byte == b'/' || byte == b'\\' {
                    return Err(Refused::EncodedSlash);
                }
                if is_unreserved(byte) {
                    decoded.push(byte);
                } else {
                    decoded.push(b'%');
                    decoded.extend(format!("{byte:02X}").bytes());
                }
                i += 2;
            }
            b => decoded.push(b),
        }
        i += 1;
    }
    // Steps 5-6 over segments.
    let mut segments: Vec<&[u8]> = Vec::new();
    let ends_with_slash = decoded.ends_with(b"/");
    for segment in decoded.split(|&b| b == b'/').skip(1) {
        match segment {
            b"" | b"." => {}
            b".." => {
                segments.pop();
            }
            s if is_dot_with_parameters(s) => return Err(Refused::DotSegmentParameters),
            s => segments.push(s),
        }
    }
    let last_is_dir = ends_with_slash || matches!(decoded.rsplit(|&b| b == b'/').next(), Some(b".." | b"."));
    let mut out = Vec::with_capacity(decoded.len() + query.map_or(0, |q| q.len() + 1));
    for s in &segments {
        out.push(b'/');
        out.extend_from_slice(s);
    }
    if segments.is_empty() || last_is_dir {
        out.push(b'/');
    }
    if let Some(q) = query {
        out.push(b'?');
        out.extend_from_slice(q.as_bytes());
    }
    // Only ASCII bytes were added and escapes keep non-ASCII encoded, so this cannot fail for a
    // path that came from a valid URI; anything else is refused rather than guessed.
    String::from_utf8(out).map(Cow::Owned).map_err(|_| Refused::BadEscape)
}

/// Whether a path needs no work: no `\`, no `%`, and no empty (but the last), `.` or `..`
/// segment.
fn is_normal(path: &[u8]) -> bool {
    if path.iter().any(|&b| b == b'\\' || b == b'%') {
        return false;
    }
    let mut segments = path.split(|&b| b == b'/').skip(1).peekable();
    while let Some(s) = segments.next() {
        let last = segments.peek().is_none();
        if s == b"." || s == b".." || (s.is_empty() && !last) || s.starts_with(b".") && s.contains(&b';') {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, Refused> {
        normalize(p).map(Cow::into_owned)
    }

    #[test]
    fn the_known_bypass_tricks_all_become_the_path_they_mean() {
        for (input, want) in [
            ("//admin", "/admin"),
            ("/a/../admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/%2e%2e/admin", "/admin"),
            ("/%2E%2E/%2e/admin", "/admin"),
            ("\\admin", "/admin"),
            ("/a\\..\\admin", "/admin"),
            ("/../../admin", "/admin"),
            ("/admin/./", "/admin/"),
            ("/admin?x", "/admin?x"),
            ("/admin?a=../b", "/admin?a=../b"),
        ] {
            assert_eq!(n(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn what_stays_different_stays_different() {
        assert_eq!(n("/admin;x").as_deref(), Ok("/admin;x"), "parameters belong to the segment");
        assert_eq!(n("/ADMIN").as_deref(), Ok("/ADMIN"), "case is the rule's business");
        assert_eq!(n("/a%20b").as_deref(), Ok("/a%20b"), "reserved escapes stay encoded");
        assert_eq!(n("/a%3a").as_deref(), Ok("/a%3A"), "in upper-case hex");
    }

    #[test]
    fn encoded_slashes_and_bad_escapes_are_refused() {
        assert_eq!(n("/admin%2F"), Err(Refused::EncodedSlash));
        assert_eq!(n("/admin%2fx"), Err(Refused::EncodedSlash));
        assert_eq!(n("/a%5Cb"), Err(Refused::EncodedSlash));
        assert_eq!(n("/a%zz"), Err(Refused::BadEscape));
        assert_eq!(n("/a%4"), Err(Refused::BadEscape));
        assert_eq!(n("admin"), Err(Refused::NotAbsolute));
        assert_eq!(n("/public/..;/admin"), Err(Refused::DotSegmentParameters));
        assert_eq!(n("/%2e%2e;x/admin"), Err(Refused::DotSegmentParameters));
        assert_eq!(n("/a/.;x/b"), Err(Refused::DotSegmentParameters));
        assert_eq!(n("/a/..x;y/b").as_deref(), Ok("/a/..x;y/b"), "not a dot segment");
    }

    #[test]
    fn normal_paths_are_borrowed_untouched() {
        for p in ["/", "/a/b", "/a/b/", "/a.b/c..d/.e", "/x?y=//z"] {
            assert!(matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
        assert_eq!(n("*").as_deref(), Ok("*"));
        assert_eq!(n("/").as_deref(), Ok("/"));
        assert_eq!(n("/..").as_deref(), Ok("/"));
    }
}
