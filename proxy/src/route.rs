//! Routing decisions as pure functions: which rule a request matches, which weighted destination
//! it takes, and how its path or location is rewritten. No I/O and no `.await` here.

use http::{HeaderMap, HeaderName, StatusCode};
use regex::Regex;

/// A compiled string condition.
#[derive(Clone, Debug)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    /// Anchored: the whole value must match.
    Regex(Regex),
}

impl StrMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StrMatch::Exact(s) => value == s,
            StrMatch::Prefix(p) => value.starts_with(p.as_str()),
            StrMatch::Regex(r) => r.is_match(value),
        }
    }

    fn matches_ignore_case(&self, value: &str) -> bool {
        match self {
            StrMatch::Exact(s) => value.eq_ignore_ascii_case(s),
            StrMatch::Prefix(p) => {
                value.len() >= p.len() && value.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
            StrMatch::Regex(r) => r.is_match(value),
        }
    }

    /// Compiles a regex so it must match the whole value.
    pub fn regex(pattern: &str) -> Result<StrMatch, regex::Error> {
        Regex::new(&format!("^(?:{pattern})$")).map(StrMatch::Regex)
    }
}

/// One match block: every condition present must hold.
#[derive(Clone, Debug, Default)]
pub struct Match {
    pub uri: Option<StrMatch>,
    pub method: Option<StrMatch>,
    pub authority: Option<StrMatch>,
    pub headers: Vec<(HeaderName, StrMatch)>,
    pub query_params: Vec<(String, StrMatch)>,
    pub ignore_uri_case: bool,
}

/// The parts of a request that routing looks at.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    pub method: &'a str,
    /// Lowercase host without the port.
    pub authority: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

impl Match {
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        let uri_ok = match &self.uri {
            None => true,
            Some(m) if self.ignore_uri_case => m.matches_ignore_case(req.path),
            Some(m) => m.matches(req.path),
        };
        uri_ok
            && self.method.as_ref().is_none_or(|m| m.matches(req.method))
            && self.authority.as_ref().is_none_or(|m| m.matches(req.authority))
            && self.headers.iter().all(|(name, m)| {
                req.headers.get_all(name).iter().any(|v| v.to_str().is_ok_and(|v| m.matches(v)))
            })
            && self
                .query_params
                .iter()
                .all(|(name, m)| query_pairs(req.query).any(|(k, v)| k == name.as_str() && m.matches(&v)))
    }

    /// The literal prefix this block matched the path with, for prefix rewrites.
    pub fn uri_prefix(&self) -> Option<&str> {
        match &self.uri {
            Some(StrMatch::Prefix(p)) => Some(p),
            _ => None,
        }
    }
}

/// The first rule whose matches (`matches_of(rule)`) hold, with the match block that held
/// (`None` for a rule with no matches, which takes every request).
pub fn select<'r, R>(
    rules: &'r [R],
    matches_of: impl Fn(&'r R) -> &'r [Match],
    req: &RequestView<'_>,
) -> Option<(&'r R, Option<&'r Match>)> {
    rules.iter().find_map(|rule| {
        let matches = matches_of(rule);
        if matches.is_empty() {
            return Some((rule, None));
        }
        matches.iter().find(|m| m.matches(req)).map(|m| (rule, Some(m)))
    })
}

/// Index of the weighted choice for a uniform random `r` in `0..sum(weights)`.
/// With every weight zero (or none), the first.
pub fn pick_weighted(weights: impl IntoIterator<Item = u32>, r: u64) -> usize {
    let mut acc = 0u64;
    let mut last_positive = 0;
    for (i, w) in weights.into_iter().enumerate() {
        if w == 0 {
            continue;
        }
        acc += u64::from(w);
        last_positive = i;
        if r < acc {
            return i;
        }
    }
    last_positive
}

/// Splits a query string into decoded `(name, value)` pairs.
pub fn query_pairs(query: Option<&str>) -> impl Iterator<Item = (String, String)> + '_ {
    query.unwrap_or("").split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k), percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The path (and query) after a URI rewrite: a prefix match replaces the matched prefix, any other
/// match replaces the whole path. The query is kept.
pub fn rewrite_path(path_and_query: &str, matched_prefix: Option<&str>, replacement: &str) -> String {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let mut out = match matched_prefix {
        Some(prefix) if path.len() >= prefix.len() => format!("{replacement}{}", &path[prefix.len()..]),
        _ => replacement.to_owned(),
    };
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// Where a redirect rule points: each part it sets replaces the request's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u16>,
    pub scheme: Option<String>,
    pub code: StatusCode,
}

/// The `Location` of a redirect: each part the rule sets replaces the request's.
pub fn redirect_location(
    redirect: &Redirect,
    scheme: &str,
    host: &str,
    port: Option<u16>,
    path_and_query: &str,
) -> String {
    let scheme = redirect.scheme.as_deref().unwrap_or(scheme);
    let host = redirect.authority.as_deref().unwrap_or(host);
    // A new authority drops the old port unless the rule names one.
    let port = redirect.port.or(if redirect.authority.is_some() { None } else { port });
    let default_port = match scheme {
        "https" => 443,
        _ => 80,
    };
    let path = redirect.uri.as_deref().unwrap_or(path_and_query);
    match port {
        Some(p) if p != default_port => format!("{scheme}://{host}:{p}{path}"),
        _ => format!("{scheme}://{host}{path}"),
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn route(name: &'static str, matches: Vec<Match>) -> (&'static str, Vec<Match>) {
        (name, matches)
    }

    fn view<'a>(
        method: &'a str,
        path: &'a str,
        query: Option<&'a str>,
        headers: &'a HeaderMap,
    ) -> RequestView<'a> {
        RequestView { method, authority: "reviews", path, query, headers }
    }

    #[test]
    fn string_matches() {
        assert!(StrMatch::Exact("/a".into()).matches("/a"));
        assert!(!StrMatch::Exact("/a".into()).matches("/a/"));
        assert!(StrMatch::Prefix("/api".into()).matches("/api/v1"));
        assert!(!StrMatch::Prefix("/api".into()).matches("/ap"));
        let re = StrMatch::regex("/users/[0-9]+").unwrap();
        assert!(re.matches("/users/42"));
        assert!(!re.matches("/users/42/x"), "regex is anchored");
        assert!(!re.matches("x/users/42"));
        assert!(StrMatch::regex("(").is_err());
        assert!(StrMatch::Prefix("/API".into()).matches_ignore_case("/api/x"));
        assert!(!StrMatch::Prefix("/API/long".into()).matches_ignore_case("/api"));
    }

    #[test]
    fn first_matching_rule_wins() {
        let headers = HeaderMap::new();
        let routes = vec![
            route("exact", vec![Match { uri: Some(StrMatch::Exact("/exact".into())), ..Default::default() }]),
            route("prefix", vec![Match { uri: Some(StrMatch::Prefix("/api".into())), ..Default::default() }]),
            route(
                "api-post",
                vec![Match { method: Some(StrMatch::Exact("POST".into())), ..Default::default() }],
            ),
            route("catch-all", vec![]),
        ];
        let name = |m, p| select(&routes, |r| &r.1, &view(m, p, None, &headers)).map(|(r, _)| r.0.to_owned());
        assert_eq!(name("GET", "/exact").as_deref(), Some("exact"));
        assert_eq!(name("POST", "/api/x").as_deref(), Some("prefix"), "earlier rule wins over later");
        assert_eq!(name("POST", "/other").as_deref(), Some("api-post"));
        assert_eq!(name("GET", "/other").as_deref(), Some("catch-all"));
        assert!(select(&routes[..2], |r| &r.1, &view("GET", "/none", None, &headers)).is_none());
    }

    #[test]
    fn headers_query_and_authority() {
        let m = Match {
            headers: vec![(HeaderName::from_static("x-user"), StrMatch::Exact("jason".into()))],
            query_params: vec![("v".into(), StrMatch::regex("[0-9]+").unwrap())],
            authority: Some(StrMatch::Exact("reviews".into())),
            ..Default::default()
        };
        let mut h = HeaderMap::new();
        assert!(!m.matches(&view("GET", "/", Some("v=1"), &h)), "missing header never matches");
        h.append("x-user", HeaderValue::from_static("other"));
        h.append("x-user", HeaderValue::from_static("jason"));
        assert!(m.matches(&view("GET", "/", Some("a=b&v=12"), &h)), "any value of a repeated header");
        assert!(!m.matches(&view("GET", "/", Some("v=x"), &h)));
        assert!(!m.matches(&view("GET", "/", None, &h)));
        let mut other = view("GET", "/", Some("v=1"), &h);
        other.authority = "ratings";
        assert!(!m.matches(&other));
    }

    #[test]
    fn query_values_are_decoded() {
        let pairs: Vec<_> = query_pairs(Some("a=b%20c&d&e=f+g&bad=%zz&end=%4")).collect();
        assert_eq!(
            pairs,
            [
                ("a".into(), "b c".into()),
                ("d".into(), "".into()),
                ("e".into(), "f g".into()),
                ("bad".into(), "%zz".into()),
                ("end".into(), "%4".into())
            ]
        );
    }

    #[test]
    fn weighted_pick_boundaries() {
        let w = [90, 10];
        assert_eq!(pick_weighted(w, 0), 0);
        assert_eq!(pick_weighted(w, 89), 0);
        assert_eq!(pick_weighted(w, 90), 1);
        assert_eq!(pick_weighted(w, 99), 1);
        assert_eq!(pick_weighted([0, 5, 0], 3), 1, "zero weights are never picked");
        assert_eq!(pick_weighted([0, 0], 0), 0);
        // Exact ratio over the whole range of r.
        let counts = (0..100u64).fold([0; 2], |mut c, r| {
            c[pick_weighted(w, r)] += 1;
            c
        });
        assert_eq!(counts, [90, 10]);
    }

    #[test]
    fn rewrites() {
        assert_eq!(rewrite_path("/api/v1/users?x=1", Some("/api/"), "/"), "/v1/users?x=1");
        assert_eq!(rewrite_path("/api", Some("/api"), "/v2"), "/v2");
        assert_eq!(rewrite_path("/exact?q", None, "/other"), "/other?q");
    }

    #[test]
    fn redirect_locations() {
        let r = Redirect {
            uri: Some("/new".into()),
            authority: None,
            port: None,
            scheme: None,
            code: StatusCode::MOVED_PERMANENTLY,
        };
        assert_eq!(redirect_location(&r, "http", "a.com", Some(8080), "/old?x"), "http://a.com:8080/new");
        let r = Redirect {
            uri: None,
            authority: Some("b.com".into()),
            port: None,
            scheme: Some("https".into()),
            code: StatusCode::FOUND,
        };
        assert_eq!(redirect_location(&r, "http", "a.com", Some(8080), "/p?x"), "https://b.com/p?x");
        let r = Redirect {
            uri: None,
            authority: None,
            port: Some(443),
            scheme: Some("https".into()),
            code: StatusCode::FOUND,
        };
        assert_eq!(redirect_location(&r, "http", "a.com", Some(80), "/"), "https://a.com/");
    }
}
