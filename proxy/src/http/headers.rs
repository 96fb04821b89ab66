//! Header rules, as pure functions: hop-by-hop stripping, message framing checks, upgrade
//! detection, request ids, the client identity given to the application. Trace context (`traceparent`, `tracestate`, `b3`, `x-b3-*`) is
//! end-to-end and passes through untouched.

use http::{
    HeaderMap, HeaderName, HeaderValue, Uri, Version,
    header::{
        CONNECTION, CONTENT_LENGTH, HOST, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER,
        TRANSFER_ENCODING, UPGRADE,
    },
};
use tower::{Layer, Service};
use weft_identity::SpiffeId;

/// Headers that describe one connection, never forwarded (RFC 9110 section 7.6.1). Typed names,
/// not strings: removing by `&str` parses and hashes the name on every call, twice per request
/// (the profile in BENCHMARKS.md).
static HOP_BY_HOP: [HeaderName; 8] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
];

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The verified identity of a request's client, handed to the application (Envoy's header).
pub static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// Sets `x-forwarded-client-cert` on a request arriving for the local application:
/// `By=<this proxy's SPIFFE ID>;URI=<the client's>` when the client proxy was verified by mTLS,
/// nothing otherwise. A value the client sent is always removed first, over plain text and mTLS
/// alike, so the application can trust the header it sees.
pub fn set_client_identity(headers: &mut HeaderMap, client: Option<&SpiffeId>, local: Option<&SpiffeId>) {
    headers.remove(&X_FORWARDED_CLIENT_CERT);
    let Some(client) = client else { return };
    let value = match local {
        Some(local) => format!("By={local};URI={client}"),
        None => format!("URI={client}"),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(X_FORWARDED_CLIENT_CERT.clone(), v);
    }
}

/// Whether a request asks to switch protocols (WebSocket and friends).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE) && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers, including those the `Connection` header names. With `upgrade`,
/// `Connection: upgrade` and `Upgrade` are kept so the upstream sees the handshake. `te:
/// trailers` is kept (gRPC needs it end to end).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry one of them at most (`Connection: keep-alive` from an upstream): one
    // pass over the few names present finds which, so only those are removed (each removal
    // hashes its name).
    let mut present = [false; HOP_BY_HOP.len()];
    let mut has_upgrade = false;
    // Only names of these lengths can match: most keys are ruled out without a comparison.
    for key in headers.keys().filter(|k| matches!(k.as_str().len(), 2 | 7 | 10 | 16..=19)) {
        match HOP_BY_HOP.iter().position(|h| h == key) {
            Some(i) => present[i] = true,
            None => has_upgrade |= key == UPGRADE,
        }
    }
    if !has_upgrade && !present.contains(&true) {
        return;
    }
    // Headers the Connection header names, besides the ones removed anyway (so the common
    // `keep-alive` and `close` build no name and collect nothing).
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| {
            !t.eq_ignore_ascii_case("close")
                && !t.eq_ignore_ascii_case(UPGRADE.as_str())
                && !HOP_BY_HOP.iter().any(|h| t.eq_ignore_ascii_case(h.as_str()))
        })
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    let te_trailers = headers.get_all(TE).iter().any(|v| v.to_str().is_ok_and(|v| v.contains("trailers")));
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, present)| *present) {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else if has_upgrade {
        headers.remove(UPGRADE);
    }
}

/// Why an HTTP/1 request's framing is ambiguous (request smuggling), if it is.
pub fn ambiguous_framing(headers: &HeaderMap) -> Option<&'static str> {
    let te: Vec<&HeaderValue> = headers.get_all(TRANSFER_ENCODING).iter().collect();
    let cl: Vec<&HeaderValue> = headers.get_all(CONTENT_LENGTH).iter().collect();
    if !te.is_empty() && !cl.is_empty() {
        return Some("both Content-Length and Transfer-Encoding");
    }
    if cl.len() > 1 && cl.windows(2).any(|w| w[0] != w[1]) {
        return Some("conflicting Content-Length values");
    }
    if !te.is_empty() {
        let codings: Vec<String> = te
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|c| c.trim().to_ascii_lowercase())
            .collect();
        if codings.last().map(String::as_str) != Some("chunked")
            || codings.iter().filter(|c| *c == "chunked").count() != 1
        {
            return Some("Transfer-Encoding must end with a single chunked");
        }
    }
    None
}

/// Why a request's `Host` cannot be trusted, if it cannot (RFC 9112 section 3.2). An HTTP/1.1
/// request needs exactly one non-empty `Host`; HTTP/1.0 may omit it, and HTTP/2 names the
/// authority in `:authority` (a `Host`, if sent too, must still be single). Two `Host` headers
/// are refused rather than one picked: routing, authorization and the application could each
/// read a different one. The authority must be `host[:port]`: no userinfo, a port of digits up
/// to 65535.
pub fn bad_host(version: Version, uri: &Uri, headers: &HeaderMap) -> Option<&'static str> {
    let mut hosts = headers.get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Some("more than one Host header");
    }
    match host {
        Some(h) if h.is_empty() => return Some("empty Host header"),
        // Routing and authorization split the Host with the same `host_and_port`.
        Some(h) => {
            if let Err(why) = host_and_port(h.as_bytes()) {
                return Some(why);
            }
        }
        None if version == Version::HTTP_11 => return Some("no Host header"),
        None => {}
    }
    // The URI's authority (absolute form, HTTP/2 `:authority`) is the one routing reads.
    uri.authority().and_then(|a| host_and_port(a.as_str().as_bytes()).err())
}

/// The host (an IPv6 literal with its brackets) and port of a request's `host[:port]`, or why
/// it is not a valid authority.
pub fn host_and_port(authority: &[u8]) -> Result<(&str, Option<u16>), &'static str> {
    let (host, port, ipv6) = match authority.strip_prefix(b"[") {
        // An IPv6 literal: `[addr]` or `[addr]:port`.
        Some(rest) => {
            let Some(end) = rest.iter().position(|b| *b == b']') else {
                return Err("unclosed IPv6 literal");
            };
            let after = &rest[end + 1..];
            match after.strip_prefix(b":") {
                Some(port) => (&rest[..end], Some(port), true),
                None if after.is_empty() => (&rest[..end], None, true),
                None => return Err("bytes after the IPv6 literal"),
            }
        }
        None => match authority.iter().position(|b| *b == b':') {
            Some(i) => (&authority[..i], Some(&authority[i + 1..]), false),
            None => (authority, None, false),
        },
    };
    // A name or IPv4 address; inside brackets, an IPv6 address. No `%`: an escape would be
    // decoded by some readers and not others.
    let host_ok = !host.is_empty()
        && host.iter().all(|b| match ipv6 {
            true => b.is_ascii_hexdigit() || matches!(b, b':' | b'.'),
            false => b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'),
        });
    if !host_ok {
        return Err("invalid host in the authority");
    }
    let port = match port {
        None => None,
        Some(port) => {
            let digits = !port.is_empty() && port.len() <= 5 && port.iter().all(u8::is_ascii_digit);
            let value = std::str::from_utf8(port).ok().and_then(|p| p.parse::<u16>().ok());
            match value.filter(|_| digits) {
                Some(value) => Some(value),
                None => return Err("invalid port in the authority"),
            }
        }
    };
    // With its brackets, as `http::uri::Authority::host` gives it.
    let host = if ipv6 { &authority[..host.len() + 2] } else { host };
    // Only ASCII passed the checks above.
    Ok((std::str::from_utf8(host).map_err(|_| "invalid host in the authority")?, port))
}

/// A random version-4 UUID (`xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx`), written digit by digit:
/// `format!` with five hex fields cost about 1.5k instructions per request (BENCHMARKS.md).
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let a = fastrand::u64(..);
    let b = fastrand::u64(..);
    let a = (a & 0xffff_ffff_ffff_0fff) | 0x0000_0000_0000_4000;
    let b = (b & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    let mut out = [0u8; 36];
    let mut i = 0;
    for word in [a, b] {
        for shift in (0..16).rev().map(|k| 4 * k) {
            if matches!(i, 8 | 13 | 18 | 23) {
                out[i] = b'-';
                i += 1;
            }
            out[i] = HEX[((word >> shift) & 0xf) as usize];
            i += 1;
        }
    }
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// Adds `x-request-id` to requests that have none.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestId<S>;
    fn layer(&self, inner: S) -> RequestId<S> {
        RequestId(inner)
    }
}

#[derive(Clone, Debug)]
pub struct RequestId<S>(S);

impl<S, B> Service<http::Request<B>> for RequestId<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> S::Future {
        if !req.headers().contains_key(&REQUEST_ID) {
            req.headers_mut().insert(REQUEST_ID.clone(), new_request_id());
        }
        self.0.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_length_filter_lets_every_hop_by_hop_name_through() {
        for name in HOP_BY_HOP.iter().chain([&UPGRADE]) {
            assert!(matches!(name.as_str().len(), 2 | 7 | 10 | 16..=19), "{name}");
        }
    }

    #[test]
    fn host_and_port_split_as_routing_reads_them() {
        assert_eq!(host_and_port(b"origin"), Ok(("origin", None)));
        assert_eq!(host_and_port(b"ORIGIN.ns:8080"), Ok(("ORIGIN.ns", Some(8080))));
        assert_eq!(host_and_port(b"[2001:db8::1]:443"), Ok(("[2001:db8::1]", Some(443))));
        assert_eq!(host_and_port(b"[::1]"), Ok(("[::1]", None)));
        assert_eq!(host_and_port(b"10.0.0.1:65535"), Ok(("10.0.0.1", Some(65535))));
        assert!(host_and_port(b"origin:65536").is_err());
        assert!(host_and_port(b"").is_err());
        // What `http` parses gives the same host and port, so nothing changed for routing.
        for good in ["origin", "origin:80", "ORIGIN.ns:8080", "[::1]", "[2001:db8::1]:443", "a_b~c:1"] {
            let parsed: http::uri::Authority = good.parse().unwrap();
            assert_eq!(host_and_port(good.as_bytes()), Ok((parsed.host(), parsed.port_u16())), "{good}");
        }
    }

    #[test]
    fn a_host_must_be_single_present_on_http11_and_well_formed() {
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        let h11 = |hosts: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in hosts {
                h.append(HOST, HeaderValue::from_static(v));
            }
            bad_host(Version::HTTP_11, &uri("/"), &h)
        };
        for good in ["origin", "origin:80", "ORIGIN.ns:8080", "10.0.0.1:65535", "[::1]", "[2001:db8::1]:443"]
        {
            assert_eq!(h11(&[good]), None, "{good}");
        }
        for bad in [
            "origin:abc",
            "origin:99999",
            "origin:",
            "x@origin",
            "a b",
            "origin/x",
            "[::1",
            "[::1]x",
            "secret.ns::80",
            "secret.ns:1:80",
            "secret%2ens",
        ] {
            assert!(h11(&[bad]).is_some(), "{bad}");
        }
        assert_eq!(h11(&["a", "b"]), Some("more than one Host header"));
        assert_eq!(h11(&["a", "a"]), Some("more than one Host header"));
        assert_eq!(h11(&[]), Some("no Host header"));
        assert_eq!(h11(&[""]), Some("empty Host header"));
        assert_eq!(bad_host(Version::HTTP_10, &uri("/"), &HeaderMap::new()), None, "HTTP/1.0 may omit it");
        assert_eq!(bad_host(Version::HTTP_2, &uri("http://svc:80/"), &HeaderMap::new()), None);
        let mut one = HeaderMap::new();
        one.insert(HOST, HeaderValue::from_static("reviews"));
        assert!(
            bad_host(Version::HTTP_11, &uri("http://x@secret.ns/"), &one).is_some(),
            "userinfo in the URI"
        );
    }

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = map(&[
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("traceparent", "00-abc-def-01"),
            ("b3", "1-2-1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["b3", "te", "traceparent"]);

        // Names in any case; `close` and the hop-by-hop names themselves name nothing more.
        let mut h = map(&[
            ("connection", "Close, KEEP-ALIVE, X-Other, upgrade"),
            ("x-other", "1"),
            ("proxy-connection", "keep-alive"),
            ("content-type", "text/plain"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type"]);
        let mut h = map(&[("content-type", "text/plain")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "nothing to strip");
    }

    #[test]
    fn keeps_the_upgrade_handshake() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket"), ("sec-websocket-key", "k")]);
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert!(!is_upgrade(&map(&[("upgrade", "websocket")])), "needs Connection: upgrade too");
    }

    #[test]
    fn framing() {
        assert_eq!(ambiguous_framing(&map(&[("content-length", "3")])), None);
        assert_eq!(ambiguous_framing(&map(&[("content-length", "3"), ("content-length", "3")])), None);
        assert_eq!(ambiguous_framing(&map(&[("transfer-encoding", "gzip, chunked")])), None);
        for bad in [
            &[("content-length", "3"), ("transfer-encoding", "chunked")][..],
            &[("content-length", "3"), ("content-length", "4")],
            &[("transfer-encoding", "chunked, identity")],
            &[("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")],
            &[("transfer-encoding", "xchunked")],
        ] {
            assert!(ambiguous_framing(&map(bad)).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn request_ids_are_uuid_v4() {
        let id = new_request_id();
        let s = id.to_str().unwrap();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"));
        for (i, c) in s.char_indices() {
            if [8, 13, 18, 23].contains(&i) {
                assert_eq!(c, '-', "{s}");
            } else {
                assert!(c.is_ascii_hexdigit() && !c.is_ascii_uppercase(), "{s}");
            }
        }
        assert_ne!(new_request_id(), id);
    }
}
