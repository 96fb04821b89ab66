//! The pieces of an authorization rule and how each matches, Istio's semantics. A check that
//! cannot be decided from what the connection carries (an HTTP field on opaque TCP, a header sent
//! twice) is `Unknown`; the rule's action settles it: an ALLOW rule does not match, a DENY rule
//! does. A policy therefore never allows more, or denies less, than written.

use std::net::{IpAddr, SocketAddr};

use http::{
    HeaderMap, HeaderName, Method,
    header::{CONNECTION, COOKIE, HOST},
};

use crate::{conn::Conn, peer::Peer};

/// Set by the proxy for the app (`http::headers`); a client's own value never reaches it.
static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// What a connection or request carries that rules look at.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    /// The verified client identity of a mesh tunnel without the scheme
    /// (`cluster.local/ns/shop/sa/web`), and its namespace; `None` for plain text.
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub source: IpAddr,
    /// The original destination: this workload's address and the app's port.
    pub destination: SocketAddr,
    /// The SNI the client sent, when the connection was TLS.
    pub sni: Option<&'a str>,
    /// Set for HTTP requests; opaque TCP has none of it.
    pub http: Option<HttpFacts<'a>>,
}

impl<'a> Facts<'a> {
    /// What an inbound connection carries: its addresses, and the verified client of a mesh
    /// tunnel (`tunnel`) with the SNI it asked for. `None` without an original destination.
    pub fn connection(conn: &Conn, tunnel: Option<&'a Peer>, sni: Option<&'a str>) -> Option<Facts<'a>> {
        let client = tunnel.filter(|p| p.identity.is_some());
        Some(Facts {
            principal: client.map(|p| p.principal.strip_prefix("spiffe://").unwrap_or(&p.principal)),
            namespace: client.map(|p| &*p.namespace),
            source: conn.peer.ip(),
            destination: conn.dst?,
            sni,
            http: None,
        })
    }

    /// What the policy indexes tell requests apart by (`KINDS` of them): whether it carries an
    /// identity, and its method (none for opaque TCP, a standard method, or another).
    pub fn kind(&self) -> usize {
        let method = self.http.as_ref().map_or(0, |h| usize::from(h.method_index));
        2 * method + usize::from(self.principal.is_some())
    }
}

/// The standard methods, in the order of their bits (`Gate::methods`).
const METHODS: [Method; 9] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::CONNECT,
    Method::OPTIONS,
    Method::TRACE,
    Method::PATCH,
];

/// How many kinds of request `Facts::kind` tells apart: with or without an identity, times opaque
/// TCP, each standard method and any other method.
pub const KINDS: usize = 2 * (METHODS.len() + 2);

#[derive(Clone, Copy, Debug)]
pub struct HttpFacts<'a> {
    /// Lower case, without the port; the port, when the authority names one.
    pub host: &'a str,
    pub port: Option<u16>,
    pub method: &'a str,
    /// Normalized (`http::normalize`), without the query: exactly what the upstream receives.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    /// Found once per request rather than once per rule: whether `path` has parameters (`;`),
    /// and the method's place (`method_index`).
    has_params: bool,
    method_index: u8,
}

impl<'a> HttpFacts<'a> {
    pub fn new(
        (host, port): (&'a str, Option<u16>),
        method: &'a Method,
        path: &'a str,
        headers: &'a HeaderMap,
    ) -> HttpFacts<'a> {
        HttpFacts {
            host,
            port,
            method: method.as_str(),
            path,
            headers,
            has_params: path.contains(';'),
            method_index: method_index(method),
        }
    }
}

/// 1 + the place of a standard method in `METHODS`; `METHODS.len() + 1` for any other.
fn method_index(method: &Method) -> u8 {
    match *method {
        Method::GET => 1,
        Method::HEAD => 2,
        Method::POST => 3,
        Method::PUT => 4,
        Method::DELETE => 5,
        Method::CONNECT => 6,
        Method::OPTIONS => 7,
        Method::TRACE => 8,
        Method::PATCH => 9,
        _ => METHODS.len() as u8 + 1,
    }
}

/// A three-valued check: `Unknown` is settled by the rule's action (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    Yes,
    No,
    Unknown,
}

impl Check {
    fn from(b: bool) -> Check {
        if b { Check::Yes } else { Check::No }
    }

    /// Both hold; a `No` decides without evaluating `other` (the request path runs every rule
    /// of every policy, so the cheap, discriminating checks go first).
    fn and(self, other: impl FnOnce() -> Check) -> Check {
        match self {
            Check::No => Check::No,
            Check::Yes => other(),
            Check::Unknown => match other() {
                Check::No => Check::No,
                _ => Check::Unknown,
            },
        }
    }

    /// One of `checks` holds: the first `Yes` decides; otherwise `Unknown` if any was.
    fn any(checks: impl Iterator<Item = Check>) -> Check {
        let mut result = Check::No;
        for c in checks {
            match c {
                Check::Yes => return Check::Yes,
                Check::Unknown => result = Check::Unknown,
                Check::No => {}
            }
        }
        result
    }
}

/// Istio's string match: `*` (any non-empty value), `prefix*`, `*suffix` or an exact value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    Any,
    Prefix(String),
    Suffix(String),
    Exact(String),
}

impl Pattern {
    pub fn parse(s: &str) -> Pattern {
        if s == "*" {
            Pattern::Any
        } else if let Some(p) = s.strip_suffix('*') {
            Pattern::Prefix(p.to_owned())
        } else if let Some(p) = s.strip_prefix('*') {
            Pattern::Suffix(p.to_owned())
        } else {
            Pattern::Exact(s.to_owned())
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Any => !value.is_empty(),
            Pattern::Prefix(p) => value.starts_with(p.as_str()),
            Pattern::Suffix(s) => value.ends_with(s.as_str()),
            Pattern::Exact(e) => value == e,
        }
    }
}

/// A `hosts` entry: a name pattern (lower case) and, when the entry names one (`web:8080`), the
/// port the request's authority must carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPattern {
    name: Pattern,
    port: Option<u16>,
}

impl HostPattern {
    pub fn parse(s: &str) -> HostPattern {
        let s = s.to_ascii_lowercase();
        match s.rsplit_once(':').and_then(|(name, port)| Some((name, port.parse().ok()?))) {
            Some((name, port)) if !name.ends_with(':') => {
                HostPattern { name: Pattern::parse(name), port: Some(port) }
            }
            _ => HostPattern { name: Pattern::parse(&s), port: None },
        }
    }

    fn matches(&self, host: &str, port: Option<u16>) -> bool {
        self.name.matches(host) && self.port.is_none_or(|p| port == Some(p))
    }
}

/// An address or a CIDR block (`10.0.0.0/8`, `2001:db8::/32`, `10.1.2.3`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpBlock {
    network: IpAddr,
    prefix: u8,
}

impl IpBlock {
    pub fn parse(s: &str) -> Option<IpBlock> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (s.parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(IpBlock { network: addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 client may arrive as an IPv4-mapped IPv6 address on a dual-stack socket.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                masked(u32::from(n).into(), 32, self.prefix) == masked(u32::from(a).into(), 32, self.prefix)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                masked(u128::from(n), 128, self.prefix) == masked(u128::from(a), 128, self.prefix)
            }
            _ => false,
        }
    }
}

fn masked(bits: u128, width: u32, prefix: u8) -> u128 {
    if prefix == 0 { 0 } else { bits >> (width - u32::from(prefix)) }
}

/// A positive and a negative list of one field: the value must match one of `any` (when
/// non-empty) and none of `none`.
#[derive(Clone, Debug)]
pub struct Field<T> {
    pub any: Vec<T>,
    pub none: Vec<T>,
}

impl<T> Field<T> {
    pub fn is_empty(&self) -> bool {
        self.any.is_empty() && self.none.is_empty()
    }

    /// `Yes` when the field says nothing; `value` is `None` when the connection does not carry
    /// it (no identity, no SNI): a positive list then fails and a negative one holds.
    fn check<V: Copy>(&self, value: Option<V>, matches: impl Fn(&T, V) -> bool) -> Check {
        // An empty list is passed over without a call: most fields have one list or none.
        let hit = |list: &[T]| {
            let Some(v) = value else { return false };
            for t in list {
                if matches(t, v) {
                    return true;
                }
            }
            false
        };
        Check::from((self.any.is_empty() || hit(&self.any)) && (self.none.is_empty() || !hit(&self.none)))
    }
}

#[derive(Clone, Debug)]
pub struct Source {
    /// SPIFFE IDs without the scheme (`cluster.local/ns/shop/sa/web`).
    pub principals: Field<Pattern>,
    pub namespaces: Field<Pattern>,
    pub ip_blocks: Field<IpBlock>,
    /// With no trusted proxy in front of the sidecar the original client is the connection's
    /// source (Istio's default), so these check the same address as `ip_blocks`.
    pub remote_ip_blocks: Field<IpBlock>,
}

impl Source {
    fn check(&self, f: &Facts<'_>) -> Check {
        let ip = |b: &IpBlock, ip| b.contains(ip);
        self.principals
            .check(f.principal, |p, v| p.matches(v))
            .and(|| self.namespaces.check(f.namespace, |p, v| p.matches(v)))
            .and(|| self.ip_blocks.check(Some(f.source), ip))
            .and(|| self.remote_ip_blocks.check(Some(f.source), ip))
    }
}

#[derive(Clone, Debug)]
pub struct Operation {
    pub hosts: Field<HostPattern>,
    pub ports: Field<u16>,
    pub methods: Field<Pattern>,
    pub paths: Field<Pattern>,
}

impl Operation {
    fn check(&self, f: &Facts<'_>) -> Check {
        let ports = || self.ports.check(Some(f.destination.port()), |p, v| *p == v);
        let Some(h) = f.http else {
            let http_only = self.hosts.is_empty() && self.methods.is_empty() && self.paths.is_empty();
            return if http_only { ports() } else { ports().and(|| Check::Unknown) };
        };
        self.methods
            .check(Some(h.method), |p, v| p.matches(v))
            .and(ports)
            .and(|| self.paths_check(&h))
            .and(|| self.hosts.check(Some(h.host), |p, v| p.matches(v, h.port)))
    }

    /// Path parameters (`/admin;x`) mean nothing to the proxy and, to some applications, the
    /// same as the path without them: where the two readings disagree the check is `Unknown`.
    fn paths_check(&self, h: &HttpFacts<'_>) -> Check {
        let check = |p: &str| self.paths.check(Some(p), |pat, v| pat.matches(v));
        let raw = check(h.path);
        match h.has_params {
            false => raw,
            true if check(&without_params(h.path)) == raw => raw,
            true => Check::Unknown,
        }
    }
}

/// One `when` entry.
#[derive(Clone, Debug)]
pub enum Condition {
    Header(HeaderName, Field<Pattern>),
    SourceIp(Field<IpBlock>),
    SourceNamespace(Field<Pattern>),
    SourcePrincipal(Field<Pattern>),
    DestinationIp(Field<IpBlock>),
    DestinationPort(Field<u16>),
    Sni(Field<Pattern>),
}

/// Whether the request's `Connection` header names `name` (so it is not forwarded).
fn names_in_connection(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(name.as_str()))
}

/// `/a;x/b;y=1` as `/a/b`.
fn without_params(path: &str) -> String {
    path.split('/').map(|seg| seg.split(';').next().unwrap_or("")).collect::<Vec<_>>().join("/")
}

impl Condition {
    fn check(&self, f: &Facts<'_>) -> Check {
        let ip = |b: &IpBlock, ip| b.contains(ip);
        match self {
            Condition::Header(name, field) => {
                let Some(h) = f.http else { return Check::Unknown };
                if name == HOST {
                    // The authority the request is routed by and the app receives, whether it
                    // came as `Host`, `:authority` or an absolute URI.
                    return field.check(Some(h.host), |p, v| p.matches(v));
                }
                if name == X_FORWARDED_CLIENT_CERT || names_in_connection(h.headers, name) {
                    // Not what the app will see: the proxy replaces the first with the verified
                    // identity, and removes hop-by-hop headers the `Connection` header names.
                    return Check::Unknown;
                }
                if name == COOKIE {
                    // HTTP/2 splits cookies into several fields; they are one header (RFC 9113 8.2.3).
                    let joined =
                        h.headers.get_all(COOKIE).iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>();
                    return match joined.is_empty() {
                        true => field.check(None::<&str>, |p, v| p.matches(v)),
                        false => field.check(Some(joined.join("; ").as_str()), |p, v| p.matches(v)),
                    };
                }
                let mut values = h.headers.get_all(name).iter();
                match (values.next(), values.next()) {
                    // Sent twice: which one the application reads is not ours to guess.
                    (Some(_), Some(_)) => Check::Unknown,
                    (Some(v), None) => match v.to_str() {
                        Ok(v) => field.check(Some(v), |p, v| p.matches(v)),
                        Err(_) => Check::Unknown,
                    },
                    (None, _) => field.check(None::<&str>, |p, v| p.matches(v)),
                }
            }
            Condition::SourceIp(field) => field.check(Some(f.source), ip),
            Condition::SourceNamespace(field) => field.check(f.namespace, |p, v| p.matches(v)),
            Condition::SourcePrincipal(field) => field.check(f.principal, |p, v| p.matches(v)),
            Condition::DestinationIp(field) => field.check(Some(f.destination.ip()), ip),
            Condition::DestinationPort(field) => field.check(Some(f.destination.port()), |p, v| *p == v),
            Condition::Sni(field) => field.check(f.sni, |p, v| p.matches(v)),
        }
    }
}

/// Matches when a `from` entry matches (or there are none), a `to` entry matches (or none) and
/// every condition holds.
#[derive(Clone, Debug)]
pub struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
    gate: Gate,
}

/// Necessary conditions of a rule (or of all of a policy's rules) that depend only on a request's
/// kind (`Facts::kind`): the policy indexes list, for each kind, only what its gate admits, so
/// most rules that cannot match a request are never looked at (every inbound request runs every
/// DENY rule). A gate decides only definite `No`s, never an `Unknown`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Gate {
    /// Every `from` entry names principals or namespaces: plain text cannot match.
    needs_identity: bool,
    /// Every `to` entry allows only these standard methods (a bit each); `None`: any.
    methods: Option<u16>,
}

impl Gate {
    /// What every one of `rules` needs: a policy whose rules all need it can be passed over whole.
    pub fn all(rules: &[Rule]) -> Gate {
        if rules.is_empty() {
            return Gate::default();
        }
        Gate {
            needs_identity: rules.iter().all(|r| r.gate.needs_identity),
            methods: rules.iter().try_fold(0, |acc, r| r.gate.methods.map(|m| acc | m)),
        }
    }

    /// Whether a request of `kind` may match (when not, it cannot).
    pub fn admits(&self, kind: usize) -> bool {
        let identity = kind % 2 == 1;
        // The method's bit: none for opaque TCP (no method to check), 0 for a non-standard one.
        let method = match kind / 2 {
            0 => None,
            i if i <= METHODS.len() => Some(1u16 << (i - 1)),
            _ => Some(0),
        };
        let methods_ok = match (self.methods, method) {
            (Some(allowed), Some(bit)) => allowed & bit != 0,
            _ => true,
        };
        (identity || !self.needs_identity) && methods_ok
    }
}

/// The bit of a standard method named exactly, 0 for any other name.
fn method_bit(name: &str) -> u16 {
    METHODS.iter().position(|m| m.as_str() == name).map_or(0, |i| 1 << i)
}

impl Rule {
    pub fn new(from: Vec<Source>, to: Vec<Operation>, when: Vec<Condition>) -> Rule {
        let needs_identity = !from.is_empty()
            && from.iter().all(|s| !s.principals.any.is_empty() || !s.namespaces.any.is_empty());
        let exact_bits = |o: &Operation| {
            let bits = o.methods.any.iter().map(|p| match p {
                Pattern::Exact(m) => method_bit(m),
                _ => 0,
            });
            let all_standard = !o.methods.any.is_empty() && bits.clone().all(|b| b != 0);
            all_standard.then(|| bits.fold(0, |acc, b| acc | b))
        };
        let methods = if to.is_empty() {
            None
        } else {
            to.iter().map(exact_bits).try_fold(0, |acc, bits| bits.map(|b| acc | b))
        };
        Rule { from, to, when, gate: Gate { needs_identity, methods } }
    }

    /// What a request must be for this rule to match (the policy indexes read it).
    pub fn gate(&self) -> Gate {
        self.gate
    }

    /// The full check; it does not read the gate, which the indexes have applied already.
    pub fn check(&self, f: &Facts<'_>) -> Check {
        let from = || {
            if self.from.is_empty() { Check::Yes } else { Check::any(self.from.iter().map(|s| s.check(f))) }
        };
        let to =
            || if self.to.is_empty() { Check::Yes } else { Check::any(self.to.iter().map(|o| o.check(f))) };
        self.when.iter().fold(from().and(to), |acc, c| acc.and(|| c.check(f)))
    }
}
