//! One try: take the destination's pool limits, pick an endpoint (skipping ejected ones and those
//! this request already tried), send, and tell outlier detection how it went. Failures stay typed
//! (`Failure` plus the `TryOutcome` retries look at) until `error::respond`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http::{
    HeaderMap, HeaderValue, Method, Request, Response, Uri, Version,
    header::HOST,
    uri::{Authority, PathAndQuery, Scheme},
};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::{
    Body,
    error::Failure,
    request_body::{BodyPace, Watch, WatchedBody},
};
use crate::{
    balance::PendingGuard,
    config::{Cluster, policy::TryOutcome},
    metrics::{ClusterLabels, ClusterOnlyLabels, Metrics},
    resilience::{
        limits::Taken,
        outlier::{Outcome, may_eject},
    },
    upstream::{ConnectOpts, Endpoint, Proto, SendError},
};

/// The request as it goes upstream (after rewrites), in the form the destination's HTTP version
/// wants, kept to build each try's request.
#[derive(Debug)]
pub struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Head {
    /// The request for `proto`: HTTP/1.1 in origin form with `Host`, HTTP/2 in absolute form
    /// (`:authority`) without it. `path_and_query` and `authority` replace the request's when the
    /// route rewrites them. The request's own URI and `Host` are kept as they are when they
    /// already fit (the common case costs no parsing). `None` when the target is not valid.
    pub fn new(
        proto: Proto,
        method: Method,
        uri: Uri,
        mut headers: HeaderMap,
        path_and_query: Option<&str>,
        authority: Option<&HeaderValue>,
    ) -> Option<Head> {
        let pq = match path_and_query {
            Some(p) => p.parse::<PathAndQuery>().ok()?,
            None => uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")),
        };
        let (uri, version) = match proto {
            Proto::Http1 => {
                // An absolute-form target's authority wins over `Host` (RFC 9112 §3.2.2).
                match (authority, uri.authority()) {
                    (Some(a), _) => {
                        headers.insert(HOST, a.clone());
                    }
                    (None, Some(a)) => {
                        headers.insert(HOST, HeaderValue::from_str(a.as_str()).ok()?);
                    }
                    (None, None) => {}
                }
                let origin_form = uri.scheme().is_none() && uri.authority().is_none();
                let uri = if origin_form && path_and_query.is_none() { uri } else { Uri::from(pq) };
                (uri, Version::HTTP_11)
            }
            Proto::Http2 => {
                let authority: Authority = match authority {
                    Some(a) => a.to_str().ok()?.parse().ok()?,
                    None => match uri.authority() {
                        Some(a) => a.clone(),
                        None => headers.get(HOST)?.to_str().ok()?.parse().ok()?,
                    },
                };
                headers.remove(HOST);
                let uri = Uri::builder()
                    .scheme(Scheme::HTTP)
                    .authority(authority)
                    .path_and_query(pq)
                    .build()
                    .ok()?;
                (uri, Version::HTTP_2)
            }
        };
        Some(Head { method, uri, version, headers })
    }

    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The authority the request goes to (`:authority` or `Host`).
    pub fn authority(&self) -> Option<&str> {
        match self.uri.authority() {
            Some(a) => Some(a.as_str()),
            None => self.headers.get(HOST)?.to_str().ok(),
        }
    }

    pub fn path_and_query(&self) -> &str {
        self.uri.path_and_query().map_or("/", PathAndQuery::as_str)
    }

    /// A request for one try (the head is copied; the first try may take it with `into_request`).
    pub fn request(&self, body: Body) -> Request<Body> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }

    /// The request for the only try, without copying.
    pub fn into_request(self, body: Body) -> Request<Body> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}

/// Where a try goes: a cluster's endpoints, or one fixed endpoint (passthrough, the local app).
#[derive(Clone, Copy, Debug)]
pub enum Destination<'a> {
    Cluster(&'a Arc<Cluster>),
    Endpoint(&'a Arc<Endpoint>),
}

/// Held until the response body ends: the endpoint's pending count and the pool's units.
#[derive(Debug)]
pub struct InFlight {
    _pending: PendingGuard,
    _request: Option<Taken>,
    _connection: Option<Taken>,
}

/// A try that got an answer.
#[derive(Debug)]
pub struct Answer {
    pub response: Response<Incoming>,
    pub outcome: TryOutcome,
    pub endpoint: Arc<Endpoint>,
    pub in_flight: InFlight,
}

/// A try that did not.
#[derive(Debug)]
pub struct Failed {
    pub failure: Failure,
    pub outcome: TryOutcome,
    /// The endpoint tried, if one was picked.
    pub endpoint: Option<Arc<Endpoint>>,
    /// The request, when it never left (its body unread): another try can take it as it is.
    pub unsent: Option<Request<Body>>,
}

/// What one try needs besides the request.
#[derive(Debug)]
pub struct Try<'a> {
    pub destination: Destination<'a>,
    pub proto: Proto,
    pub opts: &'a ConnectOpts,
    /// The consistent-hash key, when the cluster hashes.
    pub key: Option<u64>,
    /// Endpoints this request already tried.
    pub tried: &'a [SocketAddr],
    /// When this try gives up waiting for the answer's head (the route's or the per-try
    /// deadline, whichever is first).
    pub deadline: Option<Instant>,
    /// The request is gRPC: its answer's `grpc-status` counts for retries.
    pub grpc: bool,
    pub metrics: &'a Metrics,
}

impl Failed {
    fn before_sending(failure: Failure) -> Failed {
        Failed { failure, outcome: TryOutcome::NotSent, endpoint: None, unsent: None }
    }
}

static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// Sends `req` once.
pub async fn forward(req: Request<Body>, t: Try<'_>) -> Result<Answer, Failed> {
    let (endpoint, request, connection) = match t.destination {
        Destination::Endpoint(e) => (e.clone(), None, None),
        Destination::Cluster(cluster) => {
            let limits = &cluster.limits;
            let pool = &cluster.state.pool;
            let overflow = |what| {
                t.metrics
                    .overflows
                    .get_or_create(&ClusterLabels { cluster: cluster.name.clone(), result: what })
                    .inc();
                Failed::before_sending(Failure::Overflow)
            };
            // Counted only under a limit: no shared counter is touched on the common path.
            let request = match limits.max_requests {
                0 => None,
                max => match pool.requests.try_take(max) {
                    Some(unit) => Some(unit),
                    None => return Err(overflow("max_requests")),
                },
            };
            let Some(endpoint) = cluster.pick(t.key, t.tried).cloned() else {
                return Err(Failed::before_sending(Failure::NoHealthyUpstream));
            };
            // HTTP/1.1 carries one request per connection: the connection limit caps requests
            // in flight to the destination, and the rest wait, up to `max_pending` of them.
            let connection = if t.proto == Proto::Http1 && limits.max_connections > 0 {
                match pool.connections.try_take(limits.max_connections) {
                    Some(c) => Some(c),
                    None => {
                        let Some(_pending) = pool.pending.try_take(limits.max_pending) else {
                            return Err(overflow("max_pending_requests"));
                        };
                        let wait = pool.connections.take(limits.max_connections);
                        match t.deadline {
                            Some(d) => match tokio::time::timeout_at(d, wait).await {
                                Ok(c) => Some(c),
                                Err(_) => return Err(Failed::before_sending(Failure::Timeout)),
                            },
                            None => Some(wait.await),
                        }
                    }
                }
            } else {
                None
            };
            (endpoint, request, connection)
        }
    };

    let pending = endpoint.load.start();
    let started = Instant::now();
    // gRPC streams may idle before their answer (a client-streaming call answers at its end),
    // and carry deadlines of their own: no stall timeout or minimum rate for them.
    let pace = match t.grpc {
        true => BodyPace::OFF,
        false => BodyPace { timeout: t.opts.request_body_timeout, min_rate: t.opts.request_body_min_rate },
    };
    let (req, watch) = watch_body(req, pace);
    let sent = endpoint.send(req, t.proto, t.opts);
    let result = match t.deadline {
        Some(d) => tokio::time::timeout_at(d, sent).await.map_err(|_| d),
        None => Ok(sent.await),
    };
    let mut unsent = None;
    let (outcome, result) = match result {
        Err(deadline) => {
            tracing::debug!(upstream = %endpoint.addr, "upstream timed out");
            endpoint.load.observe(deadline.saturating_duration_since(started), Instant::now());
            (TryOutcome::NoAnswer, Err(Failure::Timeout))
        }
        Ok(Err(SendError { error, .. })) if let Some(fault) = watch.as_ref().and_then(|w| w.fault()) => {
            // hyper reports the client's broken body as a failed send: not the endpoint's doing.
            tracing::debug!(%error, ?fault, "request failed on the client's body");
            (TryOutcome::ClientFailed, Err(fault.failure()))
        }
        Ok(Err(SendError { error, unsent: back })) => {
            tracing::debug!(%error, "upstream request failed");
            let refused = error.is_refused_stream();
            unsent = back;
            if error.is_connect() {
                // A failed endpoint looks slow, so the balancer steers away from it.
                endpoint.load.observe(t.opts.connect_timeout.max(Duration::from_secs(1)), Instant::now());
                (TryOutcome::ConnectFailed, Err(Failure::ConnectFailed))
            } else if unsent.is_some() {
                // The connection broke before the request left: as safe to retry as a refusal.
                (TryOutcome::ConnectFailed, Err(Failure::UpstreamReset))
            } else if refused {
                (TryOutcome::RefusedStream, Err(Failure::UpstreamReset))
            } else {
                (TryOutcome::NoAnswer, Err(Failure::UpstreamReset))
            }
        }
        Ok(Ok(res)) => {
            if let Some(watch) = &watch {
                watch.answered();
            }
            let now = Instant::now();
            endpoint.load.observe(now - started, now);
            let grpc_status = match t.grpc {
                true => {
                    res.headers().get(&GRPC_STATUS).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
                }
                false => None,
            };
            (TryOutcome::Answered { status: res.status().as_u16(), grpc_status }, Ok(res))
        }
    };
    if let Destination::Cluster(cluster) = t.destination {
        observe_health(cluster, &endpoint, outcome, t.metrics);
    }
    match result {
        Ok(response) => Ok(Answer {
            response,
            outcome,
            endpoint,
            in_flight: InFlight { _pending: pending, _request: request, _connection: connection },
        }),
        Err(failure) => Err(Failed { failure, outcome, endpoint: Some(endpoint), unsent }),
    }
}

/// The request with its body watched (`request_body`), unless it has none (no cost for GETs).
fn watch_body(req: Request<Body>, pace: BodyPace) -> (Request<Body>, Option<Arc<Watch>>) {
    if http_body::Body::is_end_stream(req.body()) {
        return (req, None);
    }
    let (parts, body) = req.into_parts();
    let (body, watch) = WatchedBody::new(body, pace);
    (Request::from_parts(parts, Body::new(body)), Some(watch))
}

/// Outlier detection: counts the outcome against the endpoint and ejects it when it crossed a
/// threshold and the cluster's share allows.
fn observe_health(cluster: &Cluster, endpoint: &Arc<Endpoint>, outcome: TryOutcome, metrics: &Metrics) {
    let Some(policy) = &cluster.outlier else { return };
    let outcome = match outcome {
        TryOutcome::Answered { status, .. } => Outcome::Status(status),
        // A refused stream was not processed: not the endpoint's failure.
        TryOutcome::RefusedStream | TryOutcome::NotSent | TryOutcome::ClientFailed => return,
        TryOutcome::ConnectFailed | TryOutcome::NoAnswer => Outcome::LocalFailure,
    };
    if !endpoint.health.observe(policy, outcome) {
        return;
    }
    let now = Instant::now();
    if !may_eject(cluster.ejected(), cluster.endpoints.len(), policy.max_ejection_percent) {
        return;
    }
    let Some(time) = endpoint.health.eject(policy, now) else { return };
    tracing::info!(cluster = %cluster.name, endpoint = %endpoint.addr, ?time, "endpoint ejected by outlier detection");
    let labels = ClusterOnlyLabels { cluster: cluster.name.clone() };
    metrics.ejections.get_or_create(&labels).inc();
    let gauge = metrics.ejected.get_or_create(&labels).clone();
    gauge.inc();
    tokio::spawn(async move {
        tokio::time::sleep(time).await;
        gauge.dec();
    });
}
