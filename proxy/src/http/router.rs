//! The innermost request service: decide (pure, `decide`), then act: answer directly, redirect,
//! or forward to an endpoint picked by the cluster's balancer.

use std::{
    convert::Infallible,
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{
    HeaderValue, Request, Response, StatusCode, Uri, Version,
    header::{CONTENT_TYPE, HOST, LOCATION},
    uri::{Authority, PathAndQuery},
};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::{
    Body, Direction, UpstreamBody, boxed, empty, full,
    headers::{ambiguous_framing, is_upgrade, strip_hop_by_hop},
    observe::ResponseInfo,
};
use crate::{
    app::Shared,
    balance,
    config::{Action, Cluster, HttpRoute, Service, Snapshot, Target},
    route::{Match, RequestView, pick_weighted, redirect_location, rewrite_path, select},
    upstream::{ConnectOpts, Endpoint, Peer, Proto},
};

/// What the proxy knows about a downstream connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub direction: Direction,
    pub peer: SocketAddr,
    /// The original destination of a redirected connection.
    pub dst: Option<SocketAddr>,
    /// An explicit listener's fixed destination (`host`, `port`).
    pub target: Option<(String, u16)>,
    pub downstream: Proto,
    /// The client proxy, when the connection is a mesh tunnel.
    pub tunnel: Option<Peer>,
}

/// The outcome of routing, borrowed from the snapshot.
#[derive(Debug)]
pub enum Decision<'s> {
    /// A service's rule matched (or the service has no rules and `route` is `None`).
    Route {
        service: &'s Arc<Service>,
        route: Option<(&'s HttpRoute, Option<&'s Match>)>,
        port: Option<u16>,
    },
    /// Forward unchanged to this address (unknown outbound destinations, and inbound traffic to
    /// the local app).
    Passthrough(SocketAddr),
    NoRoute,
}

/// Routing as a pure function of the snapshot, the connection and the request.
pub fn decide<'s>(
    snapshot: &'s Snapshot,
    conn: &ConnInfo,
    req: &RequestView<'_>,
    authority_port: Option<u16>,
    inbound_ip: IpAddr,
) -> Decision<'s> {
    if conn.direction == Direction::Inbound {
        return match conn.dst {
            Some(dst) => Decision::Passthrough(SocketAddr::new(inbound_ip, dst.port())),
            None => Decision::NoRoute,
        };
    }
    let dst_port = conn.dst.map(|d| d.port()).or(conn.target.as_ref().map(|t| t.1));
    let found = snapshot
        .service_by_host(req.authority)
        .map(|s| (s, authority_port.or(dst_port)))
        .or_else(|| conn.dst.and_then(|d| snapshot.service_by_addr(d)).map(|(s, p)| (s, Some(p.number))))
        .or_else(|| {
            let (host, port) = conn.target.as_ref()?;
            snapshot.service_by_host(host).map(|s| (s, Some(*port)))
        });
    match found {
        Some((service, port)) if service.http_routes.is_empty() => {
            Decision::Route { service, route: None, port }
        }
        Some((service, port)) => match select(&service.http_routes, req) {
            Some(route) => Decision::Route { service, route: Some(route), port },
            None => Decision::NoRoute,
        },
        None => conn.dst.map_or(Decision::NoRoute, Decision::Passthrough),
    }
}

/// Picks an endpoint with the cluster's policy.
pub fn pick_endpoint(cluster: &Cluster) -> Option<&Arc<Endpoint>> {
    let now = Instant::now();
    let eps = &cluster.endpoints;
    let i = balance::choose(
        cluster.policy,
        eps.len(),
        |i| eps[i].load.cost(cluster.policy, now),
        &cluster.rr,
        |n| fastrand::usize(..n),
    )?;
    eps.get(i)
}

/// Picks a weighted target (per request, uniformly at random by weight).
pub fn pick_target(targets: &[Target]) -> Option<&Target> {
    let total: u64 = targets.iter().map(|t| u64::from(t.weight)).sum();
    if targets.is_empty() {
        return None;
    }
    targets.get(pick_weighted(targets.iter().map(|t| t.weight), fastrand::u64(..total.max(1))))
}

/// The tower service at the end of the request path.
#[derive(Clone, Debug)]
pub struct Router {
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
}

impl Router {
    pub fn new(shared: Arc<Shared>, conn: Arc<ConnInfo>) -> Router {
        Router { shared, conn }
    }
}

impl tower::Service<Request<Incoming>> for Router {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(req).await) })
    }
}

/// A local reply with what the access log needs to know.
fn reply(status: StatusCode, flags: &'static str, msg: &'static str, info: ResponseInfo) -> Response<Body> {
    let mut res = Response::new(full(msg));
    *res.status_mut() = status;
    res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    res.extensions_mut().insert(ResponseInfo { flags, ..info });
    res
}

/// The request's authority (`:authority` or `Host`).
fn authority_of<B>(req: &Request<B>) -> Option<Authority> {
    req.uri().authority().cloned().or_else(|| req.headers().get(HOST)?.to_str().ok()?.parse().ok())
}

impl Router {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        if req.version() <= Version::HTTP_11
            && let Some(why) = ambiguous_framing(req.headers())
        {
            tracing::debug!(peer = %self.conn.peer, why, "rejecting request with ambiguous framing");
            let mut res =
                reply(StatusCode::BAD_REQUEST, "BR", "ambiguous message framing\n", Default::default());
            res.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            return res;
        }
        let Some(snapshot) = self.shared.store.current() else {
            return reply(StatusCode::SERVICE_UNAVAILABLE, "NC", "no config loaded\n", Default::default());
        };
        let authority = authority_of(&req);
        let host = authority.as_ref().map(|a| a.host().to_ascii_lowercase()).unwrap_or_default();
        let view = RequestView {
            method: req.method().as_str(),
            authority: &host,
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
        };
        let port = authority.as_ref().and_then(|a| a.port_u16());
        let forward_ip = self.shared.settings.inbound_forward_ip;
        let fresh: Arc<Snapshot>;
        let mut decision = decide(&snapshot, &self.conn, &view, port, forward_ip);
        // An unknown outbound destination: ask the control plane before passing it through.
        if let Decision::Passthrough(addr) = decision
            && self.conn.direction == Direction::Outbound
            && self.shared.resolve_lazily(addr).await
            && let Some(current) = self.shared.store.current()
        {
            fresh = current;
            decision = decide(&fresh, &self.conn, &view, port, forward_ip);
        }
        match decision {
            Decision::NoRoute => reply(StatusCode::NOT_FOUND, "NR", "no route\n", Default::default()),
            Decision::Passthrough(addr) => {
                let endpoint = self.shared.passthrough.endpoint(&snapshot, addr);
                let info = ResponseInfo { service: Some(super::PASSTHROUGH.clone()), ..Default::default() };
                let plan = Plan {
                    endpoint,
                    proto: self.conn.downstream,
                    route: None,
                    matched: None,
                    target: None,
                    info,
                };
                let opts = self.shared.connect_opts(None);
                self.send(req, plan, opts).await
            }
            Decision::Route { service, route: None, port } => {
                let info = ResponseInfo { service: Some(service.name.clone()), ..Default::default() };
                let Some(port) = service.port_or_only(port) else {
                    return reply(StatusCode::NOT_FOUND, "NR", "no route\n", info);
                };
                self.to_cluster(req, &port.cluster, None, None, None, info).await
            }
            Decision::Route { service, route: Some((route, matched)), port } => {
                let info = ResponseInfo {
                    service: Some(service.name.clone()),
                    route: Some(route.name.clone()),
                    ..Default::default()
                };
                match &route.action {
                    Action::Direct { status, body } => {
                        let mut res = Response::new(full(body.clone()));
                        *res.status_mut() = *status;
                        if !body.is_empty() {
                            res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                        }
                        route.response_headers.apply(res.headers_mut());
                        res.extensions_mut().insert(info);
                        res
                    }
                    Action::Redirect(redirect) => {
                        let scheme = req.uri().scheme_str().unwrap_or("http");
                        let pq = req.uri().path_and_query().map_or("/", PathAndQuery::as_str);
                        let location = redirect_location(
                            redirect,
                            scheme,
                            &host,
                            authority.as_ref().and_then(|a| a.port_u16()),
                            pq,
                        );
                        let mut res = Response::new(empty());
                        *res.status_mut() = redirect.code;
                        match HeaderValue::from_str(&location) {
                            Ok(v) => {
                                res.headers_mut().insert(LOCATION, v);
                            }
                            Err(_) => return reply(StatusCode::BAD_REQUEST, "BR", "bad redirect\n", info),
                        }
                        route.response_headers.apply(res.headers_mut());
                        res.extensions_mut().insert(info);
                        res
                    }
                    Action::Forward(split) => {
                        let Some(target) = pick_target(&split.targets) else {
                            return reply(StatusCode::SERVICE_UNAVAILABLE, "UH", "no destination\n", info);
                        };
                        let cluster = target.cluster(port).clone();
                        let info = ResponseInfo { service: Some(target.service.clone()), ..info };
                        self.to_cluster(req, &cluster, Some(route), matched, Some(target), info).await
                    }
                }
            }
        }
    }

    async fn to_cluster(
        &self,
        req: Request<Incoming>,
        cluster: &Arc<Cluster>,
        route: Option<&HttpRoute>,
        matched: Option<&Match>,
        target: Option<&Target>,
        info: ResponseInfo,
    ) -> Response<Body> {
        let info = ResponseInfo { cluster: Some(cluster.name.clone()), ..info };
        let Some(endpoint) = pick_endpoint(cluster).cloned() else {
            return reply(StatusCode::SERVICE_UNAVAILABLE, "UH", "no healthy upstream\n", info);
        };
        let proto = match cluster.protocol {
            crate::config::Protocol::Http1 => Proto::Http1,
            crate::config::Protocol::Http2 => Proto::Http2,
            _ => self.conn.downstream,
        };
        let opts = self.shared.connect_opts(Some(cluster));
        self.send(req, Plan { endpoint, proto, route, matched, target, info }, opts).await
    }
}

/// Everything needed to send one request upstream.
struct Plan<'a> {
    endpoint: Arc<Endpoint>,
    proto: Proto,
    route: Option<&'a HttpRoute>,
    matched: Option<&'a Match>,
    target: Option<&'a Target>,
    info: ResponseInfo,
}

impl Router {
    async fn send(&self, mut req: Request<Incoming>, plan: Plan<'_>, opts: ConnectOpts) -> Response<Body> {
        let Plan { endpoint, route, matched, target, mut info, .. } = plan;
        info.upstream_tls = endpoint.is_tunneled(opts.mesh.as_deref());
        info.upstream = Some(endpoint.clone());
        let upgrade = self.conn.downstream == Proto::Http1 && is_upgrade(req.headers());
        let proto = if upgrade { Proto::Http1 } else { plan.proto };
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

        let (mut parts, body) = req.into_parts();
        let authority = authority_of_parts(&parts);
        strip_hop_by_hop(&mut parts.headers, upgrade);
        if let Some(route) = route {
            route.request_headers.apply(&mut parts.headers);
        }
        if let Some(target) = target {
            target.request_headers.apply(&mut parts.headers);
        }
        let mut authority = authority.unwrap_or_default();
        let mut pq = parts.uri.path_and_query().map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        if let Some(rewrite) = route.and_then(|r| r.rewrite.as_ref()) {
            if let Some(uri) = &rewrite.uri {
                pq = rewrite_path(&pq, matched.and_then(Match::uri_prefix), uri);
            }
            if let Some(a) = &rewrite.authority {
                authority = a.to_str().unwrap_or_default().to_owned();
            }
        }
        let uri = match proto {
            Proto::Http1 => {
                if let Ok(v) = HeaderValue::from_str(&authority) {
                    parts.headers.insert(HOST, v);
                }
                parts.version = Version::HTTP_11;
                pq.parse::<Uri>()
            }
            Proto::Http2 => {
                parts.headers.remove(HOST);
                parts.version = Version::HTTP_2;
                format!("http://{authority}{pq}").parse::<Uri>()
            }
        };
        let Ok(uri) = uri else {
            return reply(StatusCode::BAD_REQUEST, "BR", "bad request target\n", info);
        };
        parts.uri = uri;
        let upstream_req = Request::from_parts(parts, boxed(body));

        let pending = endpoint.load.start();
        let started = Instant::now();
        // The route timeout covers the whole response: headers here, the body in `UpstreamBody`.
        let timeout = route.and_then(|r| r.timeout);
        let deadline = timeout.map(|t| started + t);
        let connect_timeout = opts.connect_timeout;
        let sent = endpoint.send(upstream_req, proto, opts);
        let result = match (timeout, deadline) {
            (Some(t), Some(d)) => tokio::time::timeout_at(d, sent).await.map_err(|_| t),
            _ => Ok(sent.await),
        };
        let mut res = match result {
            Err(t) => {
                tracing::debug!(upstream = %endpoint.addr, timeout = ?t, "upstream timed out");
                endpoint.load.observe(t, Instant::now());
                return reply(StatusCode::GATEWAY_TIMEOUT, "UT", "upstream request timeout\n", info);
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, "upstream request failed");
                if error.is_connect() {
                    // A failed endpoint looks slow, so the balancer steers away from it.
                    endpoint.load.observe(connect_timeout.max(Duration::from_secs(1)), Instant::now());
                    return reply(StatusCode::SERVICE_UNAVAILABLE, "UF", "upstream connect error\n", info);
                }
                return reply(StatusCode::BAD_GATEWAY, "UC", "upstream connection error\n", info);
            }
            Ok(Ok(res)) => res,
        };
        let now = Instant::now();
        endpoint.load.observe(now - started, now);

        if res.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(downstream) = downstream_upgrade
        {
            let upstream = hyper::upgrade::on(&mut res);
            self.shared.tracker.spawn(async move {
                match tokio::try_join!(downstream, upstream) {
                    Ok((d, u)) => {
                        let (mut d, mut u) = (TokioIo::new(d), TokioIo::new(u));
                        if let Err(error) = tokio::io::copy_bidirectional(&mut d, &mut u).await {
                            tracing::debug!(%error, "upgraded connection ended");
                        }
                    }
                    Err(error) => tracing::debug!(%error, "upgrade failed"),
                }
            });
            let (mut parts, _) = res.into_parts();
            parts.extensions.insert(info);
            return Response::from_parts(parts, empty());
        }

        strip_hop_by_hop(res.headers_mut(), false);
        if let Some(target) = target {
            target.response_headers.apply(res.headers_mut());
        }
        if let Some(route) = route {
            route.response_headers.apply(res.headers_mut());
        }
        let (mut parts, body) = res.into_parts();
        parts.version = match self.conn.downstream {
            Proto::Http1 => Version::HTTP_11,
            Proto::Http2 => Version::HTTP_2,
        };
        parts.extensions.insert(info);
        Response::from_parts(parts, Body::new(UpstreamBody::new(boxed(body), pending, deadline)))
    }
}

fn authority_of_parts(parts: &http::request::Parts) -> Option<String> {
    parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| parts.headers.get(HOST)?.to_str().ok().map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;

    use super::*;
    use crate::config::compile;

    const YAML: &str = r#"
services:
  - name: reviews
    addresses: ["10.96.0.10"]
    ports: [{number: 9080, endpoints: [{address: "127.0.0.1:1"}]}]
    httpRoutes:
      - name: api
        matches: [{uri: {prefix: /api}}]
        route: [{destination: {host: reviews}}]
  - name: ratings
    ports: [{number: 80}, {number: 81}]
"#;

    fn conn(direction: Direction, dst: Option<&str>, target: Option<(&str, u16)>) -> ConnInfo {
        ConnInfo {
            direction,
            peer: "127.0.0.1:5000".parse().unwrap(),
            dst: dst.map(|d| d.parse().unwrap()),
            target: target.map(|(h, p)| (h.to_owned(), p)),
            downstream: Proto::Http1,
            tunnel: None,
        }
    }

    fn decide_for(c: &ConnInfo, host: &str, path: &str, port: Option<u16>) -> String {
        let snap = compile(serde_yaml::from_str(YAML).unwrap(), None).unwrap();
        let headers = HeaderMap::new();
        let view = RequestView { method: "GET", authority: host, path, query: None, headers: &headers };
        match decide(&snap, c, &view, port, [127, 0, 0, 1].into()) {
            Decision::Route { service, route, port } => {
                format!("{}:{}:{port:?}", service.name, route.map_or("-", |(r, _)| &*r.name))
            }
            Decision::Passthrough(a) => format!("passthrough {a}"),
            Decision::NoRoute => "no route".into(),
        }
    }

    #[test]
    fn routes_by_host_then_original_destination_then_listener_target() {
        let explicit = conn(Direction::Explicit, None, None);
        assert_eq!(decide_for(&explicit, "reviews", "/api/x", Some(9080)), "reviews:api:Some(9080)");
        assert_eq!(
            decide_for(&explicit, "reviews", "/other", None),
            "no route",
            "rules exist but none match"
        );
        assert_eq!(
            decide_for(&explicit, "ratings", "/", Some(81)),
            "ratings:-:Some(81)",
            "no rules: default route"
        );
        assert_eq!(decide_for(&explicit, "unknown", "/", None), "no route");

        let out = conn(Direction::Outbound, Some("10.96.0.10:9080"), None);
        assert_eq!(decide_for(&out, "10.96.0.10", "/api", None), "reviews:api:Some(9080)", "by VIP");
        let out = conn(Direction::Outbound, Some("10.0.0.1:8080"), None);
        assert_eq!(decide_for(&out, "example.com", "/", None), "passthrough 10.0.0.1:8080");

        let fixed = conn(Direction::Explicit, None, Some(("ratings", 80)));
        assert_eq!(decide_for(&fixed, "127.0.0.1", "/", None), "ratings:-:Some(80)");

        let inbound = conn(Direction::Inbound, Some("10.1.0.5:8080"), None);
        assert_eq!(decide_for(&inbound, "reviews", "/api", None), "passthrough 127.0.0.1:8080");
    }
}
