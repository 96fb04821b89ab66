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
        // Checked alone first: wrapped, a pattern such as `a)|(b` would close the anchoring group
        // itself and compile to "starts with a or ends with b".
        Regex::new(pattern)?;
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
        // A boundary check, not a length one: a prefix that did not match this path (or matched
        // another spelling of it) must not split a character.
        Some(prefix) if path.is_char_boundary(prefix.len()) => {
            format!("{replacement}{}", &path[prefix.len()..])
        }
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
        // Found by `a_regex_compiles_only_when_its_pattern_does`: it compiled unanchored.
        assert!(StrMatch::regex("a)|(b").is_err());
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
        // Found by `rewrites_and_redirects_of_any_strings_never_panic`: slicing at the prefix's
        // length inside a character panicked.
        assert_eq!(rewrite_path("é", Some("a"), "/x"), "/x");
        assert_eq!(rewrite_path("/é", Some("/a"), "/x"), "/x");
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

/// Property tests: matchers and rewrites see whatever a client sends, and compiled matches hold
/// whatever a config said.
#[cfg(test)]
mod proptests {
    use http::HeaderValue;
    use proptest::{collection::vec, option, prelude::*};

    use super::*;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof!["[ -~]{0,10}", "[/a-zA-Z%?=&+]{0,10}", any::<String>()]
    }

    fn str_match() -> impl Strategy<Value = StrMatch> {
        prop_oneof![
            text().prop_map(StrMatch::Exact),
            text().prop_map(StrMatch::Prefix),
            prop_oneof!["[a-z/.*+?()\\[\\]|^$\\\\0-9-]{0,12}", text()]
                .prop_filter_map("invalid regex", |p| StrMatch::regex(&p).ok()),
        ]
    }

    fn header_name() -> impl Strategy<Value = HeaderName> {
        "[a-z][a-z0-9-]{0,6}".prop_map(|n| HeaderName::from_bytes(n.as_bytes()).expect("a token"))
    }

    fn headers() -> impl Strategy<Value = HeaderMap> {
        // Values with any bytes but controls, so some are not UTF-8 (`to_str` fails).
        let byte = any::<u8>().prop_filter("not a header byte", |&b| b == b'\t' || (b >= 0x20 && b != 0x7f));
        let value = vec(byte, 0..8).prop_map(|v| HeaderValue::from_bytes(&v).expect("visible bytes"));
        vec((header_name(), value), 0..4).prop_map(|pairs| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.append(name, value);
            }
            headers
        })
    }

    prop_compose! {
        fn a_match()(
            uri in option::of(str_match()),
            method in option::of(str_match()),
            authority in option::of(str_match()),
            headers in vec((header_name(), str_match()), 0..2),
            query_params in vec((text(), str_match()), 0..2),
            ignore_uri_case in any::<bool>(),
        ) -> Match {
            Match { uri, method, authority, headers, query_params, ignore_uri_case }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn matching_any_request_against_any_rules_never_panics(
            rules in vec(vec(a_match(), 0..3), 0..4),
            (method, authority, path) in (text(), text(), text()),
            query in option::of(text()),
            headers in headers(),
        ) {
            let req = RequestView { method: &method, authority: &authority, path: &path, query: query.as_deref(), headers: &headers };
            for m in rules.iter().flatten() {
                let _ = m.matches(&req);
                if let Some(prefix) = m.uri_prefix() {
                    let _ = rewrite_path(&path, Some(prefix), "/x");
                }
            }
            if let Some((rule, matched)) = select(&rules, |r| r.as_slice(), &req) {
                match matched {
                    None => prop_assert!(rule.is_empty()),
                    Some(m) => prop_assert!(m.matches(&req)),
                }
            }
        }

        #[test]
        fn an_exact_match_matches_its_string_and_nothing_longer(s in text(), more in "[ -~]{1,4}") {
            let m = StrMatch::Exact(s.clone());
            prop_assert!(m.matches(&s));
            prop_assert!(m.matches_ignore_case(&s.to_ascii_uppercase()));
            prop_assert!(m.matches_ignore_case(&s.to_ascii_lowercase()));
            let longer = format!("{s}{more}");
            prop_assert!(!m.matches(&longer));
        }

        #[test]
        fn a_prefix_match_matches_every_extension(prefix in text(), rest in text()) {
            let m = StrMatch::Prefix(prefix.clone());
            let value = format!("{prefix}{rest}");
            prop_assert!(m.matches(&value));
            prop_assert!(m.matches_ignore_case(&value.to_ascii_uppercase()));
            prop_assert!(m.matches_ignore_case(&value.to_ascii_lowercase()));
            // Through a route: a path match block takes every path under the prefix.
            let route = Match { uri: Some(m), ignore_uri_case: true, ..Match::default() };
            let headers = HeaderMap::new();
            let upper = value.to_ascii_uppercase();
            let req = RequestView { method: "GET", authority: "a", path: &upper, query: None, headers: &headers };
            prop_assert!(route.matches(&req));
        }

        #[test]
        fn a_regex_of_a_literal_matches_only_that_literal(s in text(), more in "[ -~]{1,4}") {
            let m = StrMatch::regex(&regex::escape(&s)).expect("an escaped literal compiles");
            prop_assert!(m.matches(&s));
            let (after, before) = (format!("{s}{more}"), format!("{more}{s}"));
            prop_assert!(!m.matches(&after));
            prop_assert!(!m.matches(&before));
        }

        #[test]
        fn a_regex_compiles_only_when_its_pattern_does(
            pattern in prop_oneof![
                vec(prop::sample::select(vec!["a", "b", "(", ")", "|", ".*", "?", "(?:", "\\)", "^", "$"]), 0..7)
                    .prop_map(|tokens| tokens.concat()),
                text(),
            ],
            value in prop_oneof!["[ab]{0,4}", text()],
        ) {
            let alone = Regex::new(&pattern);
            prop_assert_eq!(StrMatch::regex(&pattern).is_ok(), alone.is_ok(), "{:?}", pattern);
            if let (Ok(m), Ok(alone)) = (StrMatch::regex(&pattern), alone) {
                // A whole-value match is a match.
                prop_assert!(!m.matches(&value) || alone.is_match(&value));
            }
        }

        #[test]
        fn a_prefix_rewrite_replaces_just_the_prefix(
            prefix in text(), rest in text(), query in option::of(text()), replacement in text(),
        ) {
            prop_assume!(!prefix.contains('?') && !rest.contains('?'));
            let path = format!("{prefix}{rest}");
            let pq = match &query { Some(q) => format!("{path}?{q}"), None => path };
            let want = match &query { Some(q) => format!("{replacement}{rest}?{q}"), None => format!("{replacement}{rest}") };
            prop_assert_eq!(rewrite_path(&pq, Some(&prefix), &replacement), want);
        }

        #[test]
        fn rewrites_and_redirects_of_any_strings_never_panic(
            pq in text(), prefix in option::of(text()), replacement in text(),
            (scheme, host, port) in (text(), text(), option::of(any::<u16>())),
            redirect_port in option::of(any::<u16>()), (uri, authority) in (option::of(text()), option::of(text())),
        ) {
            let _ = rewrite_path(&pq, prefix.as_deref(), &replacement);
            let redirect = Redirect { uri, authority, port: redirect_port, scheme: None, code: StatusCode::FOUND };
            let _ = redirect_location(&redirect, &scheme, &host, port, &pq);
        }

        #[test]
        fn query_values_decode_what_was_encoded(name in "[a-z]{1,4}", value in any::<String>(), noise in text()) {
            let encoded: String = value.bytes().map(|b| format!("%{b:02X}")).collect();
            let query = format!("{noise}&{name}={encoded}");
            prop_assert!(query_pairs(Some(&query)).any(|(k, v)| k == name && v == value));
            let _ = query_pairs(Some(&noise)).count();
        }

        #[test]
        fn a_weighted_pick_takes_a_positive_weight(weights in vec(prop_oneof![Just(0u32), any::<u32>()], 1..5), r in any::<u64>()) {
            let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
            let i = pick_weighted(weights.iter().copied(), r % total.max(1));
            prop_assert!(i < weights.len());
            prop_assert!(total == 0 || weights[i] > 0);
        }
    }
}
