//! Validation and compilation of a `ProxyConfig` into a `Snapshot`: a pure function (the only
//! state it reads is the previous snapshot's endpoints, to carry their load and pools over).
//! Anything the proxy cannot honour is rejected with the path of the offending field, never
//! ignored.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::AtomicUsize},
    time::Duration,
};

use http::{HeaderName, HeaderValue, StatusCode};
use weft_proto::v1::{
    self as pb, connection_pool::H2Upgrade, consistent_hash, load_balancer, string_match::Kind,
};

use super::{
    Action, Cluster, HeaderOps, HttpRoute, Port, Protocol, Rewrite, Service, Snapshot, Split, Target,
    policy::{self, Abort, Fault, HashOn, Mirror, RetryOn, RetryPolicy, Share},
};
use crate::{
    balance::Policy,
    peer::Peer,
    resilience::{budget::BudgetPolicy, limits::PoolLimits, outlier::OutlierPolicy},
    route::{Match, Redirect, StrMatch},
    upstream::Endpoint,
};

/// Why a config was rejected. `at` is the field path, e.g. `services[0].httpRoutes[2].route[1]`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{at}: name must not be empty")]
    EmptyName { at: String },
    #[error("{at}: host {host:?} is already used by another service")]
    DuplicateHost { at: String, host: String },
    #[error("{at}: invalid address {value:?} ({why})")]
    BadAddress { at: String, value: String, why: &'static str },
    #[error("{at}: port {port} is declared twice")]
    DuplicatePort { at: String, port: u32 },
    #[error("{at}: subset {name:?} is declared twice")]
    DuplicateSubset { at: String, name: String },
    #[error("{at}: no service named {host:?}")]
    UnknownHost { at: String, host: String },
    #[error("{at}: service {host:?} has no subset {subset:?}")]
    UnknownSubset { at: String, host: String, subset: String },
    #[error("{at}: service {host:?} has no port {port}")]
    UnknownPort { at: String, host: String, port: u32 },
    #[error("{at}: service {host:?} has no ports")]
    NoPorts { at: String, host: String },
    #[error("{at}: a string match needs one of exact, prefix or regex")]
    EmptyMatch { at: String },
    #[error("{at}: invalid regex: {source}")]
    BadRegex { at: String, source: regex::Error },
    #[error("{at}: invalid header name {name:?}")]
    BadHeaderName { at: String, name: String },
    #[error("{at}: invalid header value for {name:?}")]
    BadHeaderValue { at: String, name: String },
    #[error("{at}: a rule needs exactly one of route, redirect or directResponse")]
    Action { at: String },
    #[error("{at}: at least one destination needs a positive weight")]
    NoWeight { at: String },
    #[error("{at}: invalid status code {code}")]
    BadStatus { at: String, code: u32 },
    #[error("{at}: redirect scheme must be http or https, not {scheme:?}")]
    BadScheme { at: String, scheme: String },
    #[error("{at}: {why}")]
    BadIdentity { at: String, why: String },
    #[error("{at}: {why}")]
    BadPolicy { at: String, why: String },
    #[error(transparent)]
    Inbound(#[from] crate::inbound::Error),
}

/// Compiles `config`, reusing the endpoints of `previous` that it keeps.
pub fn compile(config: pb::ProxyConfig, previous: Option<&Snapshot>) -> Result<Snapshot, Error> {
    let mut endpoints: HashMap<SocketAddr, Arc<Endpoint>> = HashMap::new();
    let mut by_host = HashMap::new();
    let mut by_addr = HashMap::new();

    // Pass 1: services, ports, endpoints, subsets.
    let mut shapes = Vec::with_capacity(config.services.len());
    for (i, svc) in config.services.iter().enumerate() {
        let at = format!("services[{i}]");
        let name = svc.name.trim().to_ascii_lowercase();
        if name.is_empty() {
            return Err(Error::EmptyName { at: format!("{at}.name") });
        }
        for (j, host) in std::iter::once(&name).chain(svc.aliases.iter()).enumerate() {
            let host = host.trim().to_ascii_lowercase();
            if by_host.insert(host.clone(), i).is_some() {
                let at = if j == 0 { format!("{at}.name") } else { format!("{at}.aliases[{}]", j - 1) };
                return Err(Error::DuplicateHost { at, host });
            }
        }
        let mut ports: Vec<PortShape> = Vec::new();
        for (j, port) in svc.ports.iter().enumerate() {
            let at = format!("{at}.ports[{j}]");
            let number =
                u16::try_from(port.number).ok().filter(|n| *n != 0).ok_or_else(|| Error::BadAddress {
                    at: format!("{at}.number"),
                    value: port.number.to_string(),
                    why: "port must be 1-65535",
                })?;
            if ports.iter().any(|p| p.number == number) {
                return Err(Error::DuplicatePort { at, port: port.number });
            }
            let mut eps = Vec::with_capacity(port.endpoints.len());
            for (k, ep) in port.endpoints.iter().enumerate() {
                let addr: SocketAddr = ep.address.parse().map_err(|_| Error::BadAddress {
                    at: format!("{at}.endpoints[{k}].address"),
                    value: ep.address.clone(),
                    why: "expected ip:port",
                })?;
                let identity = match ep.identity.as_str() {
                    "" => None,
                    id => Some(id.parse().map_err(|e: weft_identity::spiffe::Error| Error::BadIdentity {
                        at: format!("{at}.endpoints[{k}].identity"),
                        why: e.to_string(),
                    })?),
                };
                let peer = Peer::new(identity, ep.workload.as_str());
                // An address listed twice keeps its first description.
                let endpoint = endpoints
                    .entry(addr)
                    .or_insert_with(|| {
                        previous
                            .and_then(|p| p.endpoint(&addr))
                            .filter(|e| e.peer == peer)
                            .cloned()
                            .unwrap_or_else(|| Endpoint::with_peer(addr, peer))
                    })
                    .clone();
                eps.push((endpoint, ep.labels.clone()));
            }
            ports.push(PortShape { number, protocol: protocol(port.protocol()), endpoints: eps });
        }
        for (j, vip) in svc.addresses.iter().enumerate() {
            let ip: IpAddr = vip.parse().map_err(|_| Error::BadAddress {
                at: format!("{at}.addresses[{j}]"),
                value: vip.clone(),
                why: "expected an IP address",
            })?;
            for port in &ports {
                if by_addr.insert(SocketAddr::new(ip, port.number), i).is_some() {
                    return Err(Error::BadAddress {
                        at: format!("{at}.addresses[{j}]"),
                        value: vip.clone(),
                        why: "address and port already belong to another service",
                    });
                }
            }
        }
        let mut subsets: HashMap<String, &pb::Subset> = HashMap::new();
        for (j, s) in svc.subsets.iter().enumerate() {
            if subsets.insert(s.name.clone(), s).is_some() {
                return Err(Error::DuplicateSubset {
                    at: format!("{at}.subsets[{j}]"),
                    name: s.name.clone(),
                });
            }
        }
        shapes.push(ServiceShape {
            name: Arc::from(name.as_str()),
            ports,
            subsets,
            policy: svc.traffic_policy.clone(),
        });
    }

    // Pass 2: routes, resolving destinations to clusters.
    let mut clusters = Clusters { shapes: &shapes, by_host: &by_host, cache: HashMap::new(), previous };
    let mut services = Vec::with_capacity(shapes.len());
    for (i, (svc, shape)) in config.services.iter().zip(&shapes).enumerate() {
        let at = format!("services[{i}]");
        let ports = shape
            .ports
            .iter()
            .map(|p| {
                Ok(Port {
                    number: p.number,
                    protocol: p.protocol,
                    cluster: clusters.get(i, "", p.number, &at)?,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let http_routes = svc
            .http_routes
            .iter()
            .enumerate()
            .map(|(j, r)| http_route(r, &format!("{at}.httpRoutes[{j}]"), &mut clusters))
            .collect::<Result<Vec<_>, _>>()?;
        let tcp_routes = svc
            .tcp_routes
            .iter()
            .enumerate()
            .map(|(j, r)| split(&r.route, &format!("{at}.tcpRoutes[{j}].route"), &mut clusters))
            .collect::<Result<Vec<_>, _>>()?;
        services.push(Arc::new(Service { name: shape.name.clone(), ports, http_routes, tcp_routes }));
    }

    let cluster_states = clusters.cache.values().map(|c| (c.name.clone(), c.state.clone())).collect();
    let inbound = config.inbound.as_ref().map(crate::inbound::compile).transpose()?.map(Arc::new);
    Ok(Snapshot {
        version: config.version.clone(),
        inbound,
        source: config,
        services,
        by_host,
        by_addr,
        endpoints,
        cluster_states,
    })
}

struct ServiceShape<'a> {
    name: Arc<str>,
    ports: Vec<PortShape>,
    subsets: HashMap<String, &'a pb::Subset>,
    policy: Option<pb::TrafficPolicy>,
}

struct PortShape {
    number: u16,
    protocol: Protocol,
    endpoints: Vec<(Arc<Endpoint>, BTreeMap<String, String>)>,
}

/// A destination's clusters by port.
type PortClusters = Vec<(u16, Arc<Cluster>)>;

struct Clusters<'a, 's> {
    shapes: &'a [ServiceShape<'s>],
    by_host: &'a HashMap<String, usize>,
    cache: HashMap<(usize, String, u16), Arc<Cluster>>,
    previous: Option<&'a Snapshot>,
}

impl Clusters<'_, '_> {
    fn get(&mut self, svc: usize, subset: &str, port: u16, at: &str) -> Result<Arc<Cluster>, Error> {
        let key = (svc, subset.to_owned(), port);
        if let Some(c) = self.cache.get(&key) {
            return Ok(c.clone());
        }
        let shape = &self.shapes[svc];
        let (labels, subset_policy) = match subset {
            "" => (None, None),
            s => {
                let sub = shape.subsets.get(s).ok_or_else(|| Error::UnknownSubset {
                    at: at.to_owned(),
                    host: shape.name.to_string(),
                    subset: s.to_owned(),
                })?;
                (Some(&sub.labels), sub.traffic_policy.clone())
            }
        };
        let port_shape = shape.ports.iter().find(|p| p.number == port).ok_or_else(|| Error::UnknownPort {
            at: at.to_owned(),
            host: shape.name.to_string(),
            port: port.into(),
        })?;
        let policy = subset_policy.or_else(|| shape.policy.clone()).unwrap_or_default();
        let at_policy = if subset.is_empty() {
            format!("{at} (service {} trafficPolicy)", shape.name)
        } else {
            format!("{at} (subset {subset} trafficPolicy)")
        };
        let resolved = resolve_policy(&policy, port, &at_policy)?;
        let name: Arc<str> = Arc::from(format!("{}|{subset}|{port}", shape.name));
        let state = self.previous.and_then(|p| p.cluster_state(&name)).cloned().unwrap_or_default();
        let cluster = Arc::new(Cluster {
            name,
            protocol: port_shape.protocol,
            policy: resolved.balance,
            endpoints: port_shape
                .endpoints
                .iter()
                .filter(|(_, l)| labels.is_none_or(|want| want.iter().all(|(k, v)| l.get(k) == Some(v))))
                .map(|(e, _)| e.clone())
                .collect(),
            rr: AtomicUsize::new(0),
            connect_timeout: resolved.connect_timeout,
            idle_timeout: resolved.idle_timeout,
            hash: resolved.hash,
            limits: resolved.limits,
            h2_upgrade: resolved.h2_upgrade,
            outlier: resolved.outlier,
            budget: resolved.budget,
            state,
        });
        self.cache.insert(key, cluster.clone());
        Ok(cluster)
    }

    fn destination(&mut self, dest: &pb::Destination, at: &str) -> Result<(Arc<str>, PortClusters), Error> {
        let host = dest.host.trim().to_ascii_lowercase();
        let &svc = self
            .by_host
            .get(&host)
            .ok_or_else(|| Error::UnknownHost { at: at.to_owned(), host: host.clone() })?;
        let shape = &self.shapes[svc];
        let ports: Vec<u16> = match dest.port {
            0 => shape.ports.iter().map(|p| p.number).collect(),
            n => vec![u16::try_from(n).map_err(|_| Error::UnknownPort {
                at: at.to_owned(),
                host: host.clone(),
                port: n,
            })?],
        };
        if ports.is_empty() {
            return Err(Error::NoPorts { at: at.to_owned(), host });
        }
        let clusters = ports
            .into_iter()
            .map(|p| Ok((p, self.get(svc, &dest.subset, p, at)?)))
            .collect::<Result<Vec<_>, Error>>()?;
        Ok((shape.name.clone(), clusters))
    }
}

/// A destination's policy for one port, validated.
struct ResolvedPolicy {
    balance: Policy,
    hash: Option<HashOn>,
    connect_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
    limits: PoolLimits,
    h2_upgrade: Option<bool>,
    outlier: Option<OutlierPolicy>,
    budget: BudgetPolicy,
}

fn ms(v: u32) -> Option<Duration> {
    (v > 0).then(|| Duration::from_millis(v.into()))
}

fn percent(value: f64, at: &str) -> Result<f64, Error> {
    if (0.0..=100.0).contains(&value) {
        Ok(value)
    } else {
        Err(Error::BadPolicy { at: at.to_owned(), why: format!("{value} is not a percentage (0 to 100)") })
    }
}

/// The policy for `port`: the port's own settings replace the policy's parts of the same kind.
fn resolve_policy(policy: &pb::TrafficPolicy, port: u16, at: &str) -> Result<ResolvedPolicy, Error> {
    let port_level = policy.port_level_settings.iter().find(|p| p.port == u32::from(port));
    let lb = port_level.and_then(|p| p.load_balancer.as_ref()).or(policy.load_balancer.as_ref());
    let pool = port_level.and_then(|p| p.connection_pool.as_ref()).or(policy.connection_pool.as_ref());
    let outlier = port_level.and_then(|p| p.outlier_detection.as_ref()).or(policy.outlier_detection.as_ref());
    let pool = pool.cloned().unwrap_or_default();
    let hash = match lb.and_then(|l| l.consistent_hash.as_ref()).and_then(|h| h.key.as_ref()) {
        None => None,
        Some(consistent_hash::Key::HttpHeaderName(name)) => Some(HashOn::Header(
            HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).map_err(|_| {
                Error::BadHeaderName { at: format!("{at}.loadBalancer.consistentHash"), name: name.clone() }
            })?,
        )),
        Some(consistent_hash::Key::HttpCookie(c)) if !c.name.is_empty() => Some(HashOn::Cookie {
            name: c.name.clone(),
            path: (!c.path.is_empty()).then(|| c.path.clone()),
            ttl: ms(c.ttl_ms),
        }),
        Some(consistent_hash::Key::UseSourceIp(true)) => Some(HashOn::SourceIp),
        Some(consistent_hash::Key::HttpQueryParameterName(q)) if !q.is_empty() => {
            Some(HashOn::QueryParameter(q.clone()))
        }
        Some(_) => {
            return Err(Error::BadPolicy {
                at: format!("{at}.loadBalancer.consistentHash"),
                why: "a hash key needs a header name, a cookie name, useSourceIp: true or a query parameter name"
                    .into(),
            });
        }
    };
    let outlier = match outlier {
        Some(o) if o.consecutive_5xx_errors > 0 || o.consecutive_gateway_errors > 0 => {
            let at = format!("{at}.outlierDetection");
            percent(f64::from(o.max_ejection_percent), &format!("{at}.maxEjectionPercent"))?;
            percent(f64::from(o.min_health_percent), &format!("{at}.minHealthPercent"))?;
            Some(OutlierPolicy {
                consecutive_5xx: o.consecutive_5xx_errors,
                consecutive_gateway: o.consecutive_gateway_errors,
                base_ejection: ms(o.base_ejection_time_ms).unwrap_or(Duration::from_secs(30)),
                max_ejection_percent: o.max_ejection_percent,
                min_health_percent: o.min_health_percent,
                interval: ms(o.interval_ms).unwrap_or(Duration::from_secs(10)),
            })
        }
        _ => None,
    };
    let budget = match &policy.retry_budget {
        None => BudgetPolicy::default(),
        Some(b) => BudgetPolicy {
            percent: percent(b.percent, &format!("{at}.retryBudget.percent"))?,
            min_per_second: b.min_retries_per_second,
            window: ms(b.window_ms).unwrap_or(BudgetPolicy::default().window),
        },
    };
    Ok(ResolvedPolicy {
        balance: lb_policy(lb.map(|l| l.policy()).unwrap_or_default()),
        hash,
        connect_timeout: ms(pool.connect_timeout_ms),
        idle_timeout: ms(pool.idle_timeout_ms),
        limits: PoolLimits {
            max_connections: pool.max_connections,
            max_pending: pool.max_pending_requests,
            max_requests: pool.max_requests,
            max_requests_per_connection: pool.max_requests_per_connection,
            max_retries: pool.max_retries,
        },
        h2_upgrade: match pool.h2_upgrade() {
            H2Upgrade::Default => None,
            H2Upgrade::DoNotUpgrade => Some(false),
            H2Upgrade::Upgrade => Some(true),
        },
        outlier,
        budget,
    })
}

fn protocol(p: pb::Protocol) -> Protocol {
    match p {
        pb::Protocol::Unspecified => Protocol::Detect,
        pb::Protocol::Http1 => Protocol::Http1,
        pb::Protocol::Http2 | pb::Protocol::Grpc => Protocol::Http2,
        pb::Protocol::Tcp | pb::Protocol::ServerFirst => Protocol::Tcp,
    }
}

fn lb_policy(p: load_balancer::Policy) -> Policy {
    match p {
        load_balancer::Policy::PeakEwma => Policy::PeakEwma,
        load_balancer::Policy::RoundRobin => Policy::RoundRobin,
        load_balancer::Policy::LeastRequest => Policy::LeastRequest,
        load_balancer::Policy::Random => Policy::Random,
    }
}

fn http_route(r: &pb::HttpRoute, at: &str, clusters: &mut Clusters<'_, '_>) -> Result<HttpRoute, Error> {
    let matches = r
        .matches
        .iter()
        .enumerate()
        .map(|(i, m)| http_match(m, &format!("{at}.matches[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let action = match (!r.route.is_empty(), &r.redirect, &r.direct_response) {
        (true, None, None) => Action::Forward(split(&r.route, &format!("{at}.route"), clusters)?),
        (false, Some(rd), None) => Action::Redirect(redirect(rd, &format!("{at}.redirect"))?),
        (false, None, Some(d)) => Action::Direct {
            status: StatusCode::from_u16(u16::try_from(d.status).unwrap_or(0)).map_err(|_| {
                Error::BadStatus { at: format!("{at}.directResponse.status"), code: d.status }
            })?,
            body: d.body.clone().into(),
        },
        _ => return Err(Error::Action { at: at.to_owned() }),
    };
    let rewrite = match &r.rewrite {
        Some(rw) if !rw.uri.is_empty() || !rw.authority.is_empty() => Some(Rewrite {
            uri: (!rw.uri.is_empty()).then(|| rw.uri.clone()),
            authority: match rw.authority.as_str() {
                "" => None,
                a => Some(HeaderValue::from_str(a).map_err(|_| Error::BadHeaderValue {
                    at: format!("{at}.rewrite.authority"),
                    name: "host".into(),
                })?),
            },
        }),
        _ => None,
    };
    Ok(HttpRoute {
        name: Arc::from(r.name.as_str()),
        matches,
        action,
        rewrite,
        request_headers: header_ops(r.request_headers.as_ref(), &format!("{at}.requestHeaders"))?,
        response_headers: header_ops(r.response_headers.as_ref(), &format!("{at}.responseHeaders"))?,
        timeout: ms(r.timeout_ms),
        fault: r.fault.as_ref().map(|f| fault(f, &format!("{at}.fault"))).transpose()?.flatten(),
        retry: r
            .retries
            .as_ref()
            .map(|x| retry(x, &format!("{at}.retries")))
            .transpose()?
            .unwrap_or_default(),
        mirror: match &r.mirror {
            None => None,
            Some(dest) => {
                let (service, cl) = clusters.destination(dest, &format!("{at}.mirror"))?;
                let share = Share::percent(percent(r.mirror_percent, &format!("{at}.mirrorPercent"))?);
                (!share.is_zero()).then_some(Mirror { service, clusters: cl, share })
            }
        },
    })
}

/// A fault that can never fire compiles to none.
fn fault(f: &pb::Fault, at: &str) -> Result<Option<Fault>, Error> {
    let delay = match ms(f.delay_ms) {
        Some(d) => Some((d, Share::percent(percent(f.delay_percent, &format!("{at}.delayPercent"))?))),
        None => None,
    };
    let abort = match (f.abort_http_status, f.abort_grpc_status) {
        (0, 0) => None,
        (_, g @ 1..=16) => Some(Abort::Grpc(g)),
        (0, g) => {
            return Err(Error::BadPolicy {
                at: format!("{at}.abortGrpcStatus"),
                why: format!("{g} is not a gRPC status code (1 to 16)"),
            });
        }
        (code, _) => match StatusCode::from_u16(u16::try_from(code).unwrap_or(0)) {
            Ok(s) if (200..600).contains(&code) => Some(Abort::Http(s)),
            _ => return Err(Error::BadStatus { at: format!("{at}.abortHttpStatus"), code }),
        },
    };
    let abort = match abort {
        Some(a) => Some((a, Share::percent(percent(f.abort_percent, &format!("{at}.abortPercent"))?))),
        None => None,
    };
    let fault =
        Fault { delay: delay.filter(|(_, s)| !s.is_zero()), abort: abort.filter(|(_, s)| !s.is_zero()) };
    Ok((fault.delay.is_some() || fault.abort.is_some()).then_some(fault))
}

fn retry(r: &pb::Retry, at: &str) -> Result<RetryPolicy, Error> {
    let on = match r.retry_on.trim() {
        "" => RetryOn::default_conditions(),
        list => RetryOn::parse(list).map_err(|why| Error::BadPolicy { at: format!("{at}.retryOn"), why })?,
    };
    Ok(RetryPolicy {
        attempts: r.attempts,
        per_try_timeout: ms(r.per_try_timeout_ms),
        on,
        backoff: ms(r.backoff_ms).unwrap_or(policy::DEFAULT_BACKOFF),
    })
}

fn split(
    route: &[pb::WeightedDestination],
    at: &str,
    clusters: &mut Clusters<'_, '_>,
) -> Result<Split, Error> {
    let mut targets = Vec::with_capacity(route.len());
    for (i, wd) in route.iter().enumerate() {
        let at = format!("{at}[{i}]");
        let dest = wd.destination.clone().unwrap_or_default();
        let (service, cl) = clusters.destination(&dest, &format!("{at}.destination"))?;
        targets.push(Target {
            // A lone destination needs no weight.
            weight: if route.len() == 1 { wd.weight.max(1) } else { wd.weight },
            service,
            clusters: cl,
            request_headers: header_ops(wd.request_headers.as_ref(), &format!("{at}.requestHeaders"))?,
            response_headers: header_ops(wd.response_headers.as_ref(), &format!("{at}.responseHeaders"))?,
        });
    }
    if !targets.is_empty() && targets.iter().all(|t| t.weight == 0) {
        return Err(Error::NoWeight { at: at.to_owned() });
    }
    Ok(Split { targets })
}

fn http_match(m: &pb::HttpMatch, at: &str) -> Result<Match, Error> {
    let header_name = |name: &str, at: &str| {
        HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            .map_err(|_| Error::BadHeaderName { at: at.to_owned(), name: name.to_owned() })
    };
    Ok(Match {
        uri: m.uri.as_ref().map(|s| string_match(s, &format!("{at}.uri"))).transpose()?,
        method: m.method.as_ref().map(|s| string_match(s, &format!("{at}.method"))).transpose()?,
        authority: m
            .authority
            .as_ref()
            .map(|s| string_match(&lowercase(s), &format!("{at}.authority")))
            .transpose()?,
        headers: m
            .headers
            .iter()
            .map(|(k, v)| {
                let at = format!("{at}.headers[{k}]");
                Ok((header_name(k, &at)?, string_match(v, &at)?))
            })
            .collect::<Result<_, Error>>()?,
        query_params: m
            .query_params
            .iter()
            .map(|(k, v)| Ok((k.clone(), string_match(v, &format!("{at}.queryParams[{k}]"))?)))
            .collect::<Result<_, Error>>()?,
        ignore_uri_case: m.ignore_uri_case,
    })
}

/// Hosts compare lowercase, so exact and prefix authority matches are lowercased too.
fn lowercase(s: &pb::StringMatch) -> pb::StringMatch {
    let kind = match &s.kind {
        Some(Kind::Exact(v)) => Some(Kind::Exact(v.to_ascii_lowercase())),
        Some(Kind::Prefix(v)) => Some(Kind::Prefix(v.to_ascii_lowercase())),
        other => other.clone(),
    };
    pb::StringMatch { kind }
}

fn string_match(s: &pb::StringMatch, at: &str) -> Result<StrMatch, Error> {
    match &s.kind {
        Some(Kind::Exact(v)) => Ok(StrMatch::Exact(v.clone())),
        Some(Kind::Prefix(v)) => Ok(StrMatch::Prefix(v.clone())),
        Some(Kind::Regex(v)) => {
            StrMatch::regex(v).map_err(|source| Error::BadRegex { at: at.to_owned(), source })
        }
        None => Err(Error::EmptyMatch { at: at.to_owned() }),
    }
}

fn redirect(r: &pb::Redirect, at: &str) -> Result<Redirect, Error> {
    let code = match r.redirect_code {
        0 => StatusCode::MOVED_PERMANENTLY,
        c @ (301 | 302 | 303 | 307 | 308) => {
            StatusCode::from_u16(c as u16).unwrap_or(StatusCode::MOVED_PERMANENTLY)
        }
        c => return Err(Error::BadStatus { at: format!("{at}.redirectCode"), code: c }),
    };
    let scheme = match r.scheme.as_str() {
        "" => None,
        s @ ("http" | "https") => Some(s.to_owned()),
        s => return Err(Error::BadScheme { at: format!("{at}.scheme"), scheme: s.to_owned() }),
    };
    let port = match r.port {
        0 => None,
        p => Some(u16::try_from(p).map_err(|_| Error::BadAddress {
            at: format!("{at}.port"),
            value: p.to_string(),
            why: "port must be 1-65535",
        })?),
    };
    Ok(Redirect {
        uri: (!r.uri.is_empty()).then(|| r.uri.clone()),
        authority: (!r.authority.is_empty()).then(|| r.authority.to_ascii_lowercase()),
        port,
        scheme,
        code,
    })
}

fn header_ops(ops: Option<&pb::HeaderOperations>, at: &str) -> Result<HeaderOps, Error> {
    let Some(ops) = ops else { return Ok(HeaderOps::default()) };
    let name = |n: &str| {
        HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes())
            .map_err(|_| Error::BadHeaderName { at: at.to_owned(), name: n.to_owned() })
    };
    let pair = |(n, v): (&String, &String)| {
        Ok((
            name(n)?,
            HeaderValue::from_str(v)
                .map_err(|_| Error::BadHeaderValue { at: at.to_owned(), name: n.clone() })?,
        ))
    };
    Ok(HeaderOps {
        set: ops.set.iter().map(pair).collect::<Result<_, Error>>()?,
        add: ops.add.iter().map(pair).collect::<Result<_, Error>>()?,
        remove: ops.remove.iter().map(|n| name(n)).collect::<Result<_, Error>>()?,
    })
}

/// Set of hosts in a config, for tests and diagnostics.
#[cfg(test)]
fn hosts(s: &Snapshot) -> std::collections::HashSet<String> {
    s.by_host.keys().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> pb::ProxyConfig {
        serde_yaml::from_str(yaml).expect("test yaml parses")
    }

    const BASE: &str = r#"
version: v1
services:
  - name: Reviews.default.svc.cluster.local
    aliases: [reviews]
    addresses: ["10.96.0.10"]
    ports:
      - number: 9080
        endpoints:
          - {address: "10.1.0.5:9080", labels: {version: v1}}
          - {address: "10.1.0.6:9080", labels: {version: v2}}
    subsets:
      - {name: v1, labels: {version: v1}}
      - {name: v2, labels: {version: v2}, trafficPolicy: {loadBalancer: {policy: ROUND_ROBIN}}}
    httpRoutes:
      - name: split
        matches: [{uri: {prefix: /api}}]
        route:
          - {destination: {host: reviews, subset: v1}, weight: 90}
          - {destination: {host: reviews, subset: v2}, weight: 10}
      - name: moved
        redirect: {uri: /new}
"#;

    #[test]
    fn compiles_services_subsets_and_routes() {
        let s = compile(parse(BASE), None).expect("valid");
        assert_eq!(s.version, "v1");
        assert_eq!(
            hosts(&s),
            std::collections::HashSet::from(["reviews.default.svc.cluster.local".into(), "reviews".into()])
        );
        let (svc, port) = s.service_by_addr("10.96.0.10:9080".parse().unwrap()).expect("by vip");
        assert_eq!(&*svc.name, "reviews.default.svc.cluster.local");
        assert_eq!(port.cluster.endpoints.len(), 2);
        let Action::Forward(split) = &svc.http_routes[0].action else { panic!("forward") };
        let v1 = split.targets[0].cluster(Some(9080));
        assert_eq!(v1.endpoints.iter().map(|e| e.addr.to_string()).collect::<Vec<_>>(), ["10.1.0.5:9080"]);
        assert_eq!(v1.policy, Policy::PeakEwma);
        assert_eq!(split.targets[1].cluster(None).policy, Policy::RoundRobin, "subset policy overrides");
        assert!(matches!(
            svc.http_routes[1].action,
            Action::Redirect(Redirect { code: StatusCode::MOVED_PERMANENTLY, .. })
        ));
    }

    #[test]
    fn endpoints_and_cluster_state_carry_over_between_snapshots() {
        let first = compile(parse(BASE), None).unwrap();
        let addr = "10.1.0.5:9080".parse().unwrap();
        let a = first.endpoint(&addr).unwrap().clone();
        let second = compile(parse(BASE), Some(&first)).unwrap();
        assert!(Arc::ptr_eq(&a, second.endpoint(&addr).unwrap()), "same endpoint state");
        let state = |s: &Snapshot| s.services[0].ports[0].cluster.state.clone();
        assert!(Arc::ptr_eq(&state(&first), &state(&second)), "same budget and pool counters");
        let renamed = compile(parse(&BASE.replace("number: 9080", "number: 9081")), Some(&second)).unwrap();
        assert!(!Arc::ptr_eq(&state(&second), &state(&renamed)), "another cluster starts afresh");
    }

    #[test]
    fn resilience_policies_compile_with_their_defaults() {
        let yaml = BASE
            .replace(
                "name: split",
                "name: split\n        timeoutMs: 3000\n        retries: {attempts: 2, perTryTimeoutMs: 500, retryOn: \"5xx,unavailable,418\"}\n        fault: {delayMs: 100, delayPercent: 12.5, abortGrpcStatus: 14, abortPercent: 1}\n        mirror: {host: reviews, subset: v2}\n        mirrorPercent: 10",
            )
            .replace(
                "subsets:",
                "trafficPolicy:\n      outlierDetection: {consecutive5xxErrors: 5}\n      connectionPool: {maxRequests: 10, maxRetries: 2}\n      retryBudget: {percent: 50}\n      portLevelSettings: [{port: 9080, loadBalancer: {consistentHash: {useSourceIp: true}}}]\n    subsets:",
            );
        let s = compile(parse(&yaml), None).expect("valid");
        let route = &s.services[0].http_routes[0];
        assert_eq!(route.timeout, Some(Duration::from_secs(3)));
        assert_eq!(route.retry.attempts, 2);
        assert_eq!(route.retry.per_try_timeout, Some(Duration::from_millis(500)));
        assert_eq!(route.retry.on, RetryOn::parse("5xx,unavailable,418").unwrap());
        assert_eq!(route.retry.backoff, policy::DEFAULT_BACKOFF);
        let fault = route.fault.as_ref().unwrap();
        assert_eq!(fault.delay, Some((Duration::from_millis(100), Share::percent(12.5))));
        assert_eq!(fault.abort, Some((Abort::Grpc(14), Share::percent(1.0))));
        assert_eq!(
            &*route.mirror.as_ref().unwrap().clusters[0].1.name,
            "reviews.default.svc.cluster.local|v2|9080"
        );
        assert_eq!(s.services[0].http_routes[1].retry, RetryPolicy::default(), "no retries: the default");
        let cluster = &s.services[0].ports[0].cluster;
        let outlier = cluster.outlier.unwrap();
        assert_eq!((outlier.consecutive_5xx, outlier.base_ejection), (5, Duration::from_secs(30)));
        assert_eq!((cluster.limits.max_requests, cluster.limits.max_retries), (10, 2));
        // The operator writes every budget field; here an unset floor is no floor, an unset
        // window the default one.
        assert_eq!(
            cluster.budget,
            BudgetPolicy { percent: 50.0, min_per_second: 0, window: Duration::from_secs(10) }
        );
        assert_eq!(cluster.hash, Some(HashOn::SourceIp), "the port's own load balancer");
        let Action::Forward(split) = &route.action else { panic!("forward") };
        assert!(split.targets[0].cluster(None).outlier.is_some(), "v1 has no policy: the service's");
        // v2 has its own: the operator merges a subset's parts over the service's before they
        // reach the proxy, so here it replaces the whole policy.
        assert!(split.targets[1].cluster(None).outlier.is_none());
    }

    #[test]
    fn rejects_with_the_field_path() {
        let cases = [
            (
                BASE.replace("subset: v2}", "subset: v3}"),
                "services[0].httpRoutes[0].route[1].destination: service \"reviews.default.svc.cluster.local\" has no subset \"v3\"",
            ),
            (
                BASE.replace("host: reviews, subset: v1", "host: nope"),
                "services[0].httpRoutes[0].route[0].destination: no service named \"nope\"",
            ),
            (
                BASE.replace("prefix: /api", "regex: \"(\""),
                "services[0].httpRoutes[0].matches[0].uri: invalid regex",
            ),
            (
                BASE.replace("10.1.0.6:9080", "10.1.0.6"),
                "services[0].ports[0].endpoints[1].address: invalid address",
            ),
            (
                BASE.replace(
                    "redirect: {uri: /new}",
                    "redirect: {uri: /new}\n        directResponse: {status: 200}",
                ),
                "services[0].httpRoutes[1]: a rule needs exactly one",
            ),
            (
                BASE.replace("redirect: {uri: /new}", "redirect: {redirectCode: 200}"),
                "services[0].httpRoutes[1].redirect.redirectCode: invalid status code 200",
            ),
            (
                BASE.replace("weight: 90", "weight: 0").replace("weight: 10", "weight: 0"),
                "services[0].httpRoutes[0].route: at least one destination",
            ),
            (
                BASE.replace(
                    "name: split",
                    "name: split\n        retries: {attempts: 3, retryOn: \"5xx,teapot\"}",
                ),
                "services[0].httpRoutes[0].retries.retryOn: unknown retry condition \"teapot\"",
            ),
            (
                BASE.replace(
                    "name: split",
                    "name: split\n        fault: {abortHttpStatus: 700, abortPercent: 5}",
                ),
                "services[0].httpRoutes[0].fault.abortHttpStatus: invalid status code 700",
            ),
            (
                BASE.replace("name: split", "name: split\n        fault: {delayMs: 10, delayPercent: 101}"),
                "services[0].httpRoutes[0].fault.delayPercent: 101 is not a percentage",
            ),
            (
                BASE.replace("name: split", "name: split\n        mirror: {host: nope}"),
                "services[0].httpRoutes[0].mirror: no service named \"nope\"",
            ),
            (
                BASE.replace(
                    "trafficPolicy: {loadBalancer: {policy: ROUND_ROBIN}}",
                    "trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: \"bad header\"}}}",
                ),
                "services[0].httpRoutes[0].route[1].destination (subset v2 trafficPolicy).loadBalancer.consistentHash: invalid header name",
            ),
            (
                BASE.replace("aliases: [reviews]", "aliases: [reviews, REVIEWS]"),
                "services[0].aliases[1]: host \"reviews\" is already used",
            ),
            (
                BASE.replace("matches: [{uri: {prefix: /api}}]", "matches: [{uri: {}}]"),
                "services[0].httpRoutes[0].matches[0].uri: a string match needs one",
            ),
            (
                BASE.replace(
                    "redirect: {uri: /new}",
                    "redirect: {uri: /new}\n        requestHeaders: {set: {\"bad header\": x}}",
                ),
                "services[0].httpRoutes[1].requestHeaders: invalid header name",
            ),
        ];
        for (yaml, want) in cases {
            let err = compile(parse(&yaml), None).expect_err(want).to_string();
            assert!(err.starts_with(want), "got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn single_destination_needs_no_weight_and_empty_config_is_valid() {
        let s = compile(
            parse("services: [{name: a, ports: [{number: 80}], httpRoutes: [{route: [{destination: {host: a}}]}]}]"),
            None,
        )
        .unwrap();
        let Action::Forward(split) = &s.services[0].http_routes[0].action else { panic!() };
        assert_eq!(split.targets[0].weight, 1);
        assert!(compile(pb::ProxyConfig::default(), None).unwrap().services.is_empty());
    }
}
