//! The innermost request service. First the route: decide (pure, `decide`), and answer
//! redirects and direct responses. Then the route's policies, in order: fault injection
//! (`fault`), retries with per-try timeouts and the destination's budget (`retry`), mirroring
//! (`mirror`), with the route timeout bounding all tries together. Each try is `forward`: pool
//! limits, an endpoint (skipping ejected ones), send. Failures stay typed until
//! `error::respond` turns them into the answer.

use std::{
    borrow::Cow,
    convert::Infallible,
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, LazyLock},
    task::{Context, Poll},
};

use http::{
    HeaderValue, Request, Response, StatusCode, Version,
    header::{CONTENT_TYPE, HOST, LOCATION, SET_COOKIE},
    uri::PathAndQuery,
};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::{sync::Semaphore, time::Instant};
use tokio_util::task::TaskTracker;

use super::{
    Body, Direction, UpstreamBody, boxed, empty,
    error::{Failure, is_grpc, respond},
    fault,
    flags::Flags,
    forward::{Destination, Head, Try, forward},
    full,
    headers::{
        ambiguous_framing, bad_host, host_and_port, is_upgrade, set_client_identity, strip_hop_by_hop,
    },
    mirror,
    normalize::{Refused, normalize},
    observe::ResponseInfo,
    replay::{MAX_REPLAY, Replay},
    retry::{self, Again, Copies, Finished, Tries},
    sticky,
};
use crate::{
    config::{Action, HttpRoute, Service, Snapshot, Target, policy::RetryPolicy},
    conn::Conn,
    destinations::Destinations,
    inbound::{Facts, HttpFacts, Inbound, MtlsMode},
    metrics::{Metrics, ReasonLabels},
    peer::Peer,
    route::{Match, RequestView, redirect_location, rewrite_path, select},
    upstream::Proto,
};

/// What the proxy knows about a downstream HTTP connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub conn: Conn,
    /// The HTTP version on the wire.
    pub downstream: Proto,
    /// The HTTP version the client app speaks: `downstream`, except in a tunnel whose HTTP/2
    /// carries an HTTP/1.1 app's requests (then its requests go on as HTTP/1.1).
    pub origin: Proto,
    /// The client proxy, when the connection is a mesh tunnel.
    pub tunnel: Option<Peer>,
    /// The SNI a mesh tunnel's client asked for.
    pub sni: Option<Arc<str>>,
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
    conn: &Conn,
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
    let dst_port = conn.port();
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
        Some((service, port)) => match select(&service.http_routes, |r| &r.matches, req) {
            Some(route) => Decision::Route { service, route: Some(route), port },
            None => Decision::NoRoute,
        },
        None => conn.dst.map_or(Decision::NoRoute, Decision::Passthrough),
    }
}

/// The retry policy of requests that no VirtualService rule describes.
static DEFAULT_RETRY: LazyLock<RetryPolicy> = LazyLock::new(RetryPolicy::default);

/// What the router uses besides the request and its connection, handed over once by `app`.
#[derive(Debug)]
pub struct Routing {
    pub destinations: Arc<Destinations>,
    /// Where inbound requests go: the app, on this IP.
    pub inbound_forward_ip: IpAddr,
    pub metrics: Arc<Metrics>,
    /// Upgraded connections (WebSocket) run here, so drain waits for them too.
    pub upgrades: TaskTracker,
    /// Mirrored copies in flight (`mirror::MAX_IN_FLIGHT` at most).
    pub mirrors: Arc<Semaphore>,
}

/// The tower service at the end of the request path.
#[derive(Clone, Debug)]
pub struct Router {
    routing: Arc<Routing>,
    conn: Arc<ConnInfo>,
}

impl Router {
    pub fn new(routing: Arc<Routing>, conn: Arc<ConnInfo>) -> Router {
        Router { routing, conn }
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

/// The request's host (lowercase) and port, from `:authority` or `Host` as `bad_host` checked
/// them; an empty host when there is none.
fn host_and_port_of<B>(req: &Request<B>) -> (Cow<'_, str>, Option<u16>) {
    let authority = match req.uri().authority() {
        Some(a) => a.as_str().as_bytes(),
        None => req.headers().get(HOST).map_or(&b""[..], HeaderValue::as_bytes),
    };
    let Ok((host, port)) = host_and_port(authority) else { return (Cow::Borrowed(""), None) };
    let host = match host.bytes().any(|b| b.is_ascii_uppercase()) {
        true => Cow::Owned(host.to_ascii_lowercase()),
        false => Cow::Borrowed(host),
    };
    (host, port)
}

/// Normalizes a request's path in place (`normalize`), so what is checked is what is sent.
fn normalize_path<B>(req: &mut Request<B>) -> Result<(), Refused> {
    let pq = req.uri().path_and_query().map_or("/", PathAndQuery::as_str);
    let Cow::Owned(normal) = normalize(pq)? else { return Ok(()) };
    let mut parts = req.uri().clone().into_parts();
    // Normalizing only removes and decodes characters that were valid already.
    parts.path_and_query = Some(PathAndQuery::try_from(normal).map_err(|_| Refused::BadEscape)?);
    *req.uri_mut() = http::Uri::from_parts(parts).map_err(|_| Refused::BadEscape)?;
    Ok(())
}

/// Where a request goes once routed, and the route's policies for it.
struct Plan<'a> {
    destination: Destination<'a>,
    /// The port the request arrived for (mirrors pick their port the same way).
    port: Option<u16>,
    route: Option<&'a HttpRoute>,
    matched: Option<&'a Match>,
    target: Option<&'a Target>,
    retry: Option<&'a RetryPolicy>,
    info: ResponseInfo,
}

impl Router {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let grpc = is_grpc(&req);
        if req.version() <= Version::HTTP_11
            && let Some(why) = ambiguous_framing(req.headers())
        {
            tracing::debug!(peer = %self.conn.conn.peer, why, "rejecting request with ambiguous framing");
            return respond(Failure::AmbiguousFraming, false, ResponseInfo::default());
        }
        if let Some(why) = bad_host(req.version(), req.uri(), req.headers()) {
            tracing::debug!(peer = %self.conn.conn.peer, why, "rejecting request with a bad Host");
            return respond(Failure::BadHost, grpc, ResponseInfo::default());
        }
        let Some(snapshot) = self.routing.destinations.store.current() else {
            return respond(Failure::NoConfig, grpc, ResponseInfo::default());
        };
        let mut req = req;
        let inbound = self.conn.conn.direction == Direction::Inbound;
        if inbound && let Err(why) = normalize_path(&mut req) {
            tracing::debug!(peer = %self.conn.conn.peer, %why, "refusing a path that does not normalize");
            return respond(Failure::BadPath(why), grpc, ResponseInfo::default());
        }
        let (host, port) = host_and_port_of(&req);
        if inbound && let Some(policy) = snapshot.inbound.as_deref() {
            let info = || ResponseInfo { service: Some(super::INBOUND.clone()), ..Default::default() };
            // The mode may have become STRICT after this plain-text connection was accepted.
            let app_port = self.conn.conn.port().unwrap_or_default();
            if self.conn.tunnel.is_none() && policy.mtls(app_port) == MtlsMode::Strict {
                self.routing
                    .metrics
                    .inbound_refused
                    .get_or_create(&ReasonLabels { reason: "plaintext" })
                    .inc();
                return respond(Failure::MtlsRequired, grpc, info());
            }
            if policy.authorizes() && !self.authorize(policy, &req, (&host, port)) {
                return respond(Failure::Denied, grpc, info());
            }
        }
        let view = RequestView {
            method: req.method().as_str(),
            authority: &host,
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
        };
        let forward_ip = self.routing.inbound_forward_ip;
        let fresh: Arc<Snapshot>;
        let mut decision = decide(&snapshot, &self.conn.conn, &view, port, forward_ip);
        // An unknown outbound destination: ask the control plane before passing it through.
        if let Decision::Passthrough(addr) = decision
            && self.conn.conn.direction == Direction::Outbound
            && self.routing.destinations.resolve_lazily(addr).await
            && let Some(current) = self.routing.destinations.store.current()
        {
            fresh = current;
            decision = decide(&fresh, &self.conn.conn, &view, port, forward_ip);
        }
        match decision {
            Decision::NoRoute => respond(Failure::NoRoute, grpc, ResponseInfo::default()),
            Decision::Passthrough(addr) => {
                let endpoint = self.routing.destinations.passthrough(&snapshot, addr);
                let info = ResponseInfo { service: Some(super::PASSTHROUGH.clone()), ..Default::default() };
                let plan = Plan {
                    destination: Destination::Endpoint(&endpoint),
                    port: None,
                    route: None,
                    matched: None,
                    target: None,
                    retry: None,
                    info,
                };
                self.send(req, plan, grpc).await
            }
            Decision::Route { service, route: None, port } => {
                let info = ResponseInfo { service: Some(service.name.clone()), ..Default::default() };
                let Some(port) = service.port_or_only(port) else {
                    return respond(Failure::NoRoute, grpc, info);
                };
                let plan = Plan {
                    destination: Destination::Cluster(&port.cluster),
                    port: Some(port.number),
                    route: None,
                    matched: None,
                    target: None,
                    retry: Some(&DEFAULT_RETRY),
                    info: ResponseInfo { cluster: Some(port.cluster.name.clone()), ..info },
                };
                self.send(req, plan, grpc).await
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
                        let location = redirect_location(redirect, scheme, &host, port, pq);
                        let Ok(location) = HeaderValue::from_str(&location) else {
                            return respond(Failure::BadRedirect, grpc, info);
                        };
                        let mut res = Response::new(empty());
                        *res.status_mut() = redirect.code;
                        res.headers_mut().insert(LOCATION, location);
                        route.response_headers.apply(res.headers_mut());
                        res.extensions_mut().insert(info);
                        res
                    }
                    Action::Forward(split) => {
                        let Some(target) = split.pick() else {
                            return respond(Failure::NoHealthyUpstream, grpc, info);
                        };
                        let cluster = target.cluster(port);
                        let mut info = ResponseInfo {
                            service: Some(target.service.clone()),
                            cluster: Some(cluster.name.clone()),
                            ..info
                        };
                        if let Some(f) = &route.fault {
                            let (delayed, abort) = fault::inject(f).await;
                            if delayed {
                                info.flags |= Flags::DI;
                            }
                            if let Some(abort) = abort {
                                return respond(abort, grpc, info);
                            }
                        }
                        let plan = Plan {
                            destination: Destination::Cluster(cluster),
                            port,
                            route: Some(route),
                            matched,
                            target: Some(target),
                            retry: Some(&route.retry),
                            info,
                        };
                        self.send(req, plan, grpc).await
                    }
                }
            }
        }
    }

    /// Decides a request to the local app by the workload's authorization policies (on the
    /// normalized path, the one the app receives) and counts the decision.
    fn authorize(&self, policy: &Inbound, req: &Request<Incoming>, authority: (&str, Option<u16>)) -> bool {
        let sni = self.conn.sni.as_deref();
        let Some(mut facts) = Facts::connection(&self.conn.conn, self.conn.tunnel.as_ref(), sni) else {
            return false;
        };
        facts.http = Some(HttpFacts::new(authority, req.method(), req.uri().path(), req.headers()));
        let decision = policy.decide_counted(&facts, Some(&self.routing.metrics));
        if !decision.allowed() {
            let policy = decision.decided_by();
            tracing::debug!(peer = %self.conn.conn.peer, method = %req.method(), policy, "request denied by authorization policy");
        }
        decision.allowed()
    }

    /// Rewrites the request once, then sends it: through the retry policy when it has one, else
    /// in a single try; then mirrors it, and turns the outcome into the downstream's response.
    async fn send(&self, mut req: Request<Incoming>, plan: Plan<'_>, grpc: bool) -> Response<Body> {
        let Plan { destination, port, route, matched, target, retry, mut info } = plan;
        let cluster = match destination {
            Destination::Cluster(c) => Some(c),
            Destination::Endpoint(_) => None,
        };
        let upgrade = self.conn.downstream == Proto::Http1 && is_upgrade(req.headers());
        let proto = match (upgrade, cluster) {
            (true, _) => Proto::Http1,
            (false, Some(c)) => c.upstream_proto(self.conn.origin),
            (false, None) => self.conn.origin,
        };
        let key = cluster
            .and_then(|c| c.hash.as_ref())
            .and_then(|on| sticky::key(on, req.headers(), req.uri().query(), self.conn.conn.peer.ip()));
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, upgrade);
        // Requests for the local application (inbound, and explicit listeners that end mesh
        // tunnels) carry the client's verified identity, and only that.
        if self.conn.conn.direction != Direction::Outbound {
            let client = self.conn.tunnel.as_ref().and_then(|p| p.identity.as_deref());
            let local = client.and_then(|_| self.routing.destinations.identity.current());
            set_client_identity(&mut parts.headers, client, local.as_ref().map(|t| &t.creds.id));
        }
        if let Some(route) = route {
            route.request_headers.apply(&mut parts.headers);
        }
        if let Some(target) = target {
            target.request_headers.apply(&mut parts.headers);
        }
        let rewrite = route.and_then(|r| r.rewrite.as_ref());
        let new_path = rewrite.and_then(|r| r.uri.as_deref()).map(|replacement| {
            let pq = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
            rewrite_path(pq, matched.and_then(Match::uri_prefix), replacement)
        });
        let new_authority = rewrite.and_then(|r| r.authority.as_ref());
        let mirror = route
            .and_then(|r| r.mirror.as_ref())
            .filter(|m| !upgrade && m.share.holds(fastrand::u32(..)))
            .map(|m| (m, parts.headers.clone()));
        let Some(head) =
            Head::new(proto, parts.method, parts.uri, parts.headers, new_path.as_deref(), new_authority)
        else {
            return respond(Failure::BadRequestTarget, grpc, info);
        };

        let base = self.routing.destinations.connect_opts();
        let opts = match cluster {
            Some(c) => c.connect_opts(base),
            None => base,
        };
        // The route timeout covers every try and the whole response: the head here, the body in
        // `UpstreamBody`.
        let deadline = route.and_then(|r| r.timeout).map(|t| Instant::now() + t);
        let body = boxed(body);
        let retry = retry.filter(|p| p.attempts > 0 && !upgrade);
        // Copies of the head and body only when a later try or the mirror needs them, and only
        // of bodies within the replay cap.
        let fits = body.size_hint().upper().is_none_or(|n| n <= MAX_REPLAY as u64);
        let retry_needs_copies = retry.is_some_and(|p| cluster.is_some() && Again::needs_copies(p, proto));
        if retry_needs_copies && !fits {
            info.note = Some("request body over 64 KiB: not retried");
        }
        let key_hash = key.as_ref().map(|k| k.hash);
        let copies = fits && (mirror.is_some() || retry_needs_copies);
        let (first, again) = if copies {
            let (replay, first) = Replay::new(body);
            (head.request(Body::new(first)), Again::Copies(Box::new(Copies { head, body: replay })))
        } else {
            (head.into_request(body), Again::Unsent)
        };
        let finished = match (cluster, retry) {
            (Some(cluster), Some(policy)) => {
                let tries = Tries {
                    cluster,
                    proto,
                    opts: &opts,
                    key: key_hash,
                    deadline,
                    grpc,
                    metrics: &self.routing.metrics,
                };
                retry::run(first, &again, policy, tries).await
            }
            _ => {
                let t = Try {
                    destination,
                    proto,
                    opts: &opts,
                    key: key_hash,
                    tried: &[],
                    deadline,
                    grpc,
                    metrics: &self.routing.metrics,
                };
                Finished { result: forward(first, t).await, retries: 0, exhausted: false }
            }
        };
        let copies = match &again {
            Again::Copies(copies) => Some(copies),
            Again::Unsent => None,
        };
        if let (Some((mirror, headers)), Some(Copies { head, body: replay })) = (mirror, copies.map(|c| &**c))
            && let Some(body) = replay.complete()
        {
            let copy = mirror::Copy {
                method: head.method().clone(),
                authority: head.authority().unwrap_or_default(),
                path_and_query: head.path_and_query(),
                headers,
                body,
                port,
                origin: self.conn.origin,
            };
            mirror::spawn(
                mirror,
                copy,
                self.routing.destinations.connect_opts(),
                &self.routing.mirrors,
                &self.routing.metrics,
            );
        }

        info.retries = finished.retries;
        if finished.exhausted && finished.retries > 0 {
            info.flags |= Flags::URX;
        }
        let answer = match finished.result {
            Ok(answer) => answer,
            Err(failed) => {
                if let Some(endpoint) = &failed.endpoint {
                    info.upstream_tls = endpoint.is_tunneled(opts.mesh.as_deref());
                }
                info.upstream = failed.endpoint;
                return respond(failed.failure, grpc, info);
            }
        };
        info.upstream_tls = answer.endpoint.is_tunneled(opts.mesh.as_deref());
        info.upstream = Some(answer.endpoint);
        let mut res = answer.response;

        if res.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(downstream) = downstream_upgrade
        {
            let upstream = hyper::upgrade::on(&mut res);
            self.routing.upgrades.spawn(async move {
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
        if let Some(cookie) = key.and_then(|k| k.set_cookie) {
            res.headers_mut().append(SET_COOKIE, cookie);
        }
        let (mut parts, body) = res.into_parts();
        parts.version = match self.conn.downstream {
            Proto::Http1 => Version::HTTP_11,
            Proto::Http2 => Version::HTTP_2,
        };
        parts.extensions.insert(info);
        Response::from_parts(parts, Body::new(UpstreamBody::new(boxed(body), answer.in_flight, deadline)))
    }
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

    fn conn(direction: Direction, dst: Option<&str>, target: Option<(&str, u16)>) -> Conn {
        Conn {
            direction,
            peer: "127.0.0.1:5000".parse().unwrap(),
            dst: dst.map(|d| d.parse().unwrap()),
            target: target.map(|(h, p)| (h.to_owned(), p)),
        }
    }

    fn decide_for(c: &Conn, host: &str, path: &str, port: Option<u16>) -> String {
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
