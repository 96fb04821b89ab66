//! What a proxy would do with one request, and why, for `weftctl explain`: the router's own
//! decisions (`router::decide` and the route selection in it, the inbound policy's
//! `Inbound::decide`) run on a compiled snapshot of the proxy's running config. Nothing is sent
//! and nothing is drawn at random: every weighted destination is listed with its share, and a
//! fault with its percentages.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use http::{HeaderMap, Method, Uri};
use serde::{Deserialize, Serialize};
use weft_identity::SpiffeId;

use crate::{
    config::{
        Action, Cluster, HttpRoute, Snapshot,
        policy::{Abort, RetryPolicy},
    },
    conn::{Conn, Direction},
    http::router::{Decision, decide},
    inbound::{Facts, HttpFacts, MtlsMode},
    peer::Peer,
    route::{Match, RequestView, StrMatch, redirect_location},
};

/// The request to explain.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub method: &'a Method,
    /// Absolute (`http://reviews:9080/x`) or a path with the host in `headers`.
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    /// The address the app connected to (a Service's cluster IP and port), when known: the proxy
    /// falls back to it when the host names no service.
    pub dst: Option<SocketAddr>,
}

impl Request<'_> {
    fn host(&self) -> String {
        let from_header =
            || self.headers.get(http::header::HOST)?.to_str().ok()?.parse::<http::uri::Authority>().ok();
        let authority = self.uri.authority().cloned().or_else(from_header);
        authority.map(|a| a.host().to_ascii_lowercase()).unwrap_or_default()
    }

    fn port(&self) -> Option<u16> {
        self.uri.port_u16()
    }
}

/// The client proxy's side: which service, route and destinations, and what the route does.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Outbound {
    pub service: Option<String>,
    pub port: Option<u16>,
    /// How the service was found.
    pub found_by: Option<String>,
    pub route: Option<String>,
    /// The match block that held (`None`: the route matches every request).
    pub matched: Option<String>,
    /// `forward`, `redirect ...`, `direct response ...`, `passthrough to ...` or `no route: ...`.
    pub outcome: String,
    pub destinations: Vec<Destination>,
    pub timeout: Option<String>,
    pub fault: Option<String>,
    pub retries: Option<String>,
    pub mirror: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    pub service: String,
    /// This destination's share of the route's requests.
    pub percent: f64,
    /// `service|subset|port`.
    pub cluster: String,
    pub balancing: String,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub address: String,
    /// The SPIFFE ID its proxy must present; `None`: not meshed, sent in plain text.
    pub identity: Option<String>,
}

/// The server proxy's side: the mTLS mode of the port and the authorization decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Inbound {
    pub mtls_mode: String,
    pub allowed: bool,
    /// Why, in words.
    pub reason: String,
    /// The enforced policy that decided (`namespace/name`).
    pub policy: Option<String>,
    /// What the dry-run policies would have decided, when there are any.
    pub dry_run: Option<String>,
}

/// What the proxy with `snapshot` does with `req` sent by its app.
pub fn outbound(snapshot: &Snapshot, req: &Request<'_>) -> Outbound {
    let host = req.host();
    let path = req.uri.path();
    let view = RequestView {
        method: req.method.as_str(),
        authority: &host,
        path,
        query: req.uri.query(),
        headers: req.headers,
    };
    let conn = Conn {
        direction: Direction::Outbound,
        peer: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
        dst: req.dst,
        target: None,
    };
    let found_by = if snapshot.service_by_host(&host).is_some() {
        format!("the host {host:?}")
    } else {
        req.dst.map_or_else(|| "nothing".to_owned(), |d| format!("the address {d}"))
    };
    let no_service = || {
        let dst = req.dst.map_or_else(String::new, |d| format!(" or the address {d}"));
        format!(
            "no route: no service in this proxy's config has the host {host:?}{dst} (it learns a service on first use; send a request and ask again)"
        )
    };
    match decide(snapshot, &conn, &view, req.port(), IpAddr::V4(Ipv4Addr::LOCALHOST)) {
        Decision::NoRoute => {
            let outcome = match snapshot.service_by_host(&host) {
                Some(service) => format!("no route: none of {}'s rules matches (404 NR)", service.name),
                None => no_service(),
            };
            Outbound { outcome, ..Outbound::default() }
        }
        Decision::Passthrough(addr) => Outbound {
            outcome: format!("passthrough to {addr}: not a service of the mesh, forwarded unchanged"),
            ..Outbound::default()
        },
        Decision::Route { service, route: None, port } => {
            let mut out = Outbound {
                service: Some(service.name.to_string()),
                port,
                found_by: Some(found_by),
                outcome: "forward (the service has no routes: all its endpoints)".into(),
                retries: Some(describe_retries(&RetryPolicy::default())),
                ..Outbound::default()
            };
            match service.port_or_only(port) {
                Some(p) => {
                    out.port = Some(p.number);
                    out.destinations = vec![destination(&service.name, 100.0, &p.cluster)];
                }
                None => out.outcome = format!("no route: {} has no port {port:?}", service.name),
            }
            out
        }
        Decision::Route { service, route: Some((route, matched)), port } => {
            let mut out = Outbound {
                service: Some(service.name.to_string()),
                port,
                found_by: Some(found_by),
                matched: matched.map(describe_match),
                ..Outbound::default()
            };
            describe_route(&mut out, route, port);
            if let Action::Redirect(r) = &route.action {
                let pq = req.uri.path_and_query().map_or("/", |pq| pq.as_str());
                let scheme = req.uri.scheme_str().unwrap_or("http");
                let location = redirect_location(r, scheme, &host, req.port(), pq);
                out.outcome = format!("redirect {} to {location}", r.code.as_u16());
            }
            out
        }
    }
}

/// Every route of every service in `snapshot`, as `weftctl proxy-config` lists them: `matched`
/// holds all of a route's match blocks (any one holds), and a service without routes has one
/// line for its default destination.
pub fn routes(snapshot: &Snapshot) -> Vec<Outbound> {
    let mut all = Vec::new();
    for service in &snapshot.services {
        let base = Outbound { service: Some(service.name.to_string()), ..Outbound::default() };
        if service.http_routes.is_empty() {
            for port in &service.ports {
                all.push(Outbound {
                    port: Some(port.number),
                    outcome: "forward".into(),
                    destinations: vec![destination(&service.name, 100.0, &port.cluster)],
                    retries: Some(describe_retries(&RetryPolicy::default())),
                    ..base.clone()
                });
            }
        }
        for route in &service.http_routes {
            let mut out = base.clone();
            if !route.matches.is_empty() {
                let blocks: Vec<String> = route.matches.iter().map(describe_match).collect();
                out.matched = Some(blocks.join(" | "));
            }
            describe_route(&mut out, route, None);
            all.push(out);
        }
    }
    all
}

/// A route's name, action and policies into `out`.
fn describe_route(out: &mut Outbound, route: &HttpRoute, port: Option<u16>) {
    out.route = Some(route.name.to_string());
    out.timeout = route.timeout.map(describe_duration);
    match &route.action {
        Action::Direct { status, .. } => out.outcome = format!("direct response {}", status.as_u16()),
        Action::Redirect(r) => out.outcome = format!("redirect {}", r.code.as_u16()),
        Action::Forward(split) => {
            out.outcome = "forward".into();
            let total: u64 = split.targets.iter().map(|t| u64::from(t.weight)).sum();
            out.destinations = split
                .targets
                .iter()
                .map(|t| {
                    let percent = if total == 0 { 0.0 } else { 100.0 * f64::from(t.weight) / total as f64 };
                    destination(&t.service, percent, t.cluster(port))
                })
                .collect();
            out.fault = route.fault.as_ref().map(|f| {
                let mut parts = Vec::new();
                if let Some((delay, share)) = f.delay {
                    parts.push(format!("delay {} for {}%", describe_duration(delay), share.as_percent()));
                }
                match f.abort {
                    Some((Abort::Http(status), share)) => {
                        parts.push(format!("abort {} for {}%", status.as_u16(), share.as_percent()));
                    }
                    Some((Abort::Grpc(code), share)) => {
                        parts.push(format!("abort grpc-status {code} for {}%", share.as_percent()));
                    }
                    None => {}
                }
                parts.join(", ")
            });
            out.retries = Some(describe_retries(&route.retry));
            out.mirror =
                route.mirror.as_ref().map(|m| format!("{}% copied to {}", m.share.as_percent(), m.service));
        }
    }
}

/// What the proxy with `snapshot` (the server's) decides for `req` arriving from `client` (its
/// SPIFFE ID, `None` for plain text) at `source`, for the app's `destination` address.
pub fn inbound(
    snapshot: &Snapshot,
    client: Option<&SpiffeId>,
    source: IpAddr,
    destination: SocketAddr,
    req: &Request<'_>,
) -> Inbound {
    let Some(policy) = snapshot.inbound.as_deref() else {
        return Inbound {
            mtls_mode: "PERMISSIVE".into(),
            allowed: true,
            reason: "no PeerAuthentication or AuthorizationPolicy selects this workload".into(),
            policy: None,
            dry_run: None,
        };
    };
    let mode = policy.mtls(destination.port());
    let mtls_mode = format!("{mode:?}").to_ascii_uppercase();
    if client.is_none() && mode == MtlsMode::Strict {
        return Inbound {
            mtls_mode,
            allowed: false,
            reason: "plain text refused: the port's mTLS mode is STRICT".into(),
            policy: None,
            dry_run: None,
        };
    }
    let tunnel = client.map(|id| Peer::new(Some(id.clone()), ""));
    let conn = Conn {
        direction: Direction::Inbound,
        peer: SocketAddr::new(source, 0),
        dst: Some(destination),
        target: None,
    };
    let host = req.host();
    let mut facts =
        Facts::connection(&conn, tunnel.as_ref(), None).expect("the connection has a destination");
    facts.http = Some(HttpFacts::new((&host, req.port()), req.method, req.uri.path(), req.headers));
    let decision = policy.decide(&facts);
    let verdict = |v: Option<crate::inbound::Verdict<'_>>| {
        v.map(|v| match (v.allowed, v.policy) {
            (true, Some(p)) => format!("allowed by {p}"),
            (true, None) => "allowed: no DENY policy matches".to_owned(),
            (false, Some(p)) => format!("denied by {p}"),
            (false, None) => "denied: no ALLOW policy matches".to_owned(),
        })
    };
    Inbound {
        mtls_mode,
        allowed: decision.allowed(),
        reason: verdict(decision.enforced)
            .unwrap_or_else(|| "no AuthorizationPolicy selects this workload".into()),
        policy: decision.decided_by().map(str::to_owned),
        dry_run: verdict(decision.dry_run),
    }
}

fn destination(service: &str, percent: f64, cluster: &Cluster) -> Destination {
    Destination {
        service: service.to_owned(),
        percent,
        cluster: cluster.name.to_string(),
        balancing: format!("{:?}", cluster.policy),
        endpoints: cluster
            .endpoints
            .iter()
            .map(|e| Endpoint {
                address: e.addr.to_string(),
                identity: e.peer.identity.as_ref().map(|id| id.to_string()),
            })
            .collect(),
    }
}

fn describe_match(m: &Match) -> String {
    let s = |m: &StrMatch| match m {
        StrMatch::Exact(v) => format!("= {v:?}"),
        StrMatch::Prefix(v) => format!("prefix {v:?}"),
        StrMatch::Regex(r) => format!("~ {:?}", r.as_str()),
    };
    let mut parts = Vec::new();
    if let Some(uri) = &m.uri {
        parts.push(format!("uri {}{}", s(uri), if m.ignore_uri_case { " (any case)" } else { "" }));
    }
    if let Some(method) = &m.method {
        parts.push(format!("method {}", s(method)));
    }
    if let Some(authority) = &m.authority {
        parts.push(format!("authority {}", s(authority)));
    }
    parts.extend(m.headers.iter().map(|(name, v)| format!("header {name} {}", s(v))));
    parts.extend(m.query_params.iter().map(|(name, v)| format!("query {name} {}", s(v))));
    if parts.is_empty() { "any request".into() } else { parts.join(", ") }
}

fn describe_retries(r: &RetryPolicy) -> String {
    if r.attempts == 0 {
        return "none".into();
    }
    let on = &r.on;
    let mut conditions: Vec<String> = [
        (on.server_error, "5xx"),
        (on.gateway_error, "gateway-error"),
        (on.reset, "reset"),
        (on.connect_failure, "connect-failure"),
        (on.refused_stream, "refused-stream"),
        (on.retriable_4xx, "retriable-4xx"),
    ]
    .into_iter()
    .filter(|(set, _)| *set)
    .map(|(_, name)| name.to_owned())
    .collect();
    conditions.extend(on.statuses.iter().map(u16::to_string));
    conditions.extend(on.grpc.iter().map(|c| format!("grpc {c}")));
    let per_try =
        r.per_try_timeout.map_or_else(String::new, |t| format!(", {} per try", describe_duration(t)));
    format!("{} on {}{per_try}", r.attempts, conditions.join(","))
}

fn describe_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 { format!("{}s", d.as_secs()) } else { format!("{}ms", d.as_millis()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::compile;

    const CONFIG: &str = r#"
services:
- name: reviews.shop.svc.cluster.local
  aliases: [reviews]
  ports:
  - number: 9080
    protocol: HTTP1
    endpoints:
    - {address: "10.0.0.1:9080", labels: {version: v1}, identity: "spiffe://cluster.local/ns/shop/sa/reviews"}
    - {address: "10.0.0.2:9080", labels: {version: v2}, identity: "spiffe://cluster.local/ns/shop/sa/reviews"}
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
  httpRoutes:
  - name: jason
    matches: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews.shop.svc.cluster.local, subset: v2}, weight: 100}]
    fault: {abortHttpStatus: 503, abortPercent: 10}
  - name: canary
    timeoutMs: 500
    retries: {attempts: 3, retryOn: "5xx,connect-failure"}
    route:
    - {destination: {host: reviews.shop.svc.cluster.local, subset: v1}, weight: 90}
    - {destination: {host: reviews.shop.svc.cluster.local, subset: v2}, weight: 10}
inbound:
  mtlsMode: MTLS_STRICT
  authorizations:
  - {name: shop/deny-web, action: DENY, rules: [{from: [{principals: ["cluster.local/ns/shop/sa/web"]}]}]}
"#;

    fn snapshot() -> Snapshot {
        compile(serde_yaml::from_str(CONFIG).unwrap(), None).unwrap()
    }

    fn ask(snapshot: &Snapshot, url: &str, headers: &[(&str, &str)]) -> Outbound {
        let uri: Uri = url.parse().unwrap();
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        outbound(snapshot, &Request { method: &Method::GET, uri: &uri, headers: &map, dst: None })
    }

    #[test]
    fn a_header_route_wins_over_the_canary_and_shows_its_fault() {
        let s = snapshot();
        let jason = ask(&s, "http://reviews:9080/r", &[("end-user", "jason")]);
        assert_eq!(jason.route.as_deref(), Some("jason"));
        assert_eq!(jason.matched.as_deref(), Some(r#"header end-user = "jason""#));
        assert_eq!(jason.fault.as_deref(), Some("abort 503 for 10%"));
        let [v2] = &jason.destinations[..] else { panic!("{jason:?}") };
        assert_eq!((v2.cluster.as_str(), v2.percent), ("reviews.shop.svc.cluster.local|v2|9080", 100.0));
        assert_eq!(v2.endpoints[0].address, "10.0.0.2:9080");
    }

    #[test]
    fn the_canary_lists_both_shares_with_timeout_and_retries() {
        let s = snapshot();
        let other = ask(&s, "http://reviews:9080/r", &[]);
        assert_eq!((other.route.as_deref(), other.matched.as_deref()), (Some("canary"), None));
        let shares: Vec<_> = other.destinations.iter().map(|d| (d.cluster.as_str(), d.percent)).collect();
        assert_eq!(
            shares,
            [
                ("reviews.shop.svc.cluster.local|v1|9080", 90.0),
                ("reviews.shop.svc.cluster.local|v2|9080", 10.0)
            ]
        );
        assert_eq!(other.timeout.as_deref(), Some("500ms"));
        assert_eq!(other.retries.as_deref(), Some("3 on 5xx,connect-failure"));
        assert_eq!(other.fault, None);
        assert_eq!(other.found_by.as_deref(), Some(r#"the host "reviews""#));
    }

    #[test]
    fn routes_lists_each_route_with_all_its_match_blocks() {
        let all = routes(&snapshot());
        let names: Vec<_> = all.iter().map(|r| (r.route.as_deref(), r.matched.as_deref())).collect();
        assert_eq!(names, [(Some("jason"), Some(r#"header end-user = "jason""#)), (Some("canary"), None)]);
        assert_eq!(all[1].destinations.len(), 2);
    }

    #[test]
    fn an_unknown_host_says_the_proxy_learns_services_on_first_use() {
        let unknown = ask(&snapshot(), "http://ratings:9080/", &[]);
        assert!(
            unknown.outcome.starts_with("no route") && unknown.outcome.contains("first use"),
            "{unknown:?}"
        );
        assert!(unknown.destinations.is_empty());
    }

    #[test]
    fn inbound_refuses_plain_text_under_strict_and_names_the_deny_policy() {
        let s = snapshot();
        let uri: Uri = "/r".parse().unwrap();
        let headers = HeaderMap::new();
        let req = Request { method: &Method::GET, uri: &uri, headers: &headers, dst: None };
        let source: IpAddr = "10.0.0.9".parse().unwrap();
        let app: SocketAddr = "10.0.0.1:9080".parse().unwrap();
        let plain = inbound(&s, None, source, app, &req);
        assert_eq!((plain.mtls_mode.as_str(), plain.allowed), ("STRICT", false));
        let web = SpiffeId::new("cluster.local", "shop", "web").unwrap();
        let denied = inbound(&s, Some(&web), source, app, &req);
        assert_eq!((denied.allowed, denied.policy.as_deref()), (false, Some("shop/deny-web")));
        let frontend = SpiffeId::new("cluster.local", "shop", "frontend").unwrap();
        let allowed = inbound(&s, Some(&frontend), source, app, &req);
        assert!(allowed.allowed, "{allowed:?}");
        assert_eq!(allowed.reason, "allowed: no DENY policy matches");
    }
}
