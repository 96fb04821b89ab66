//! [`Index::resolve`]: from the translated objects to per-service proxy config, inbound policies
//! and desired status conditions. Pure and deterministic (ordered maps throughout), so equal
//! inputs give byte-equal outputs and content hashes make stable versions.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use weft_api::{
    Status,
    networking::{self as net, Destination, DestinationRuleSpec, StringMatch, VirtualServiceSpec},
    security::{self as sec, MtlsMode, WorkloadSelector},
};
use weft_proto::v1 as pb;

use super::{Crd, Index, Key, Kind, PodInfo, Slice};

/// What the index resolves to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resolution {
    /// Every Service, by fully qualified name, with endpoints, subsets, policy and routes.
    pub services: BTreeMap<String, Arc<pb::Service>>,
    /// Virtual IP to the fully qualified name of its Service.
    pub by_address: BTreeMap<String, String>,
    /// Inbound policy of every pod, by `<pod>.<namespace>`.
    pub workloads: BTreeMap<String, Arc<pb::InboundPolicy>>,
    /// The status each custom resource should carry.
    pub statuses: BTreeMap<(Kind, Key), DesiredStatus>,
}

/// The two conditions for one custom resource, for the generation they describe.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredStatus {
    pub generation: Option<i64>,
    pub accepted: Condition,
    pub resolved_refs: Condition,
    /// The status the object carries now.
    pub current: Option<Status>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub ok: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Resolution {
    /// The hosts `service`'s routes send traffic to (other than itself).
    pub fn dependencies(service: &pb::Service) -> BTreeSet<String> {
        let http = service.http_routes.iter().flat_map(|r| r.route.iter());
        let tcp = service.tcp_routes.iter().flat_map(|r| r.route.iter());
        let mirrors = service.http_routes.iter().filter_map(|r| r.mirror.as_ref());
        http.chain(tcp)
            .filter_map(|w| w.destination.as_ref())
            .chain(mirrors)
            .map(|d| d.host.clone())
            .filter(|h| *h != service.name)
            .collect()
    }
}

/// What went wrong with one resource, sorted into the condition each problem affects.
#[derive(Debug, Default)]
struct Problems {
    invalid: Vec<String>,
    conflicts: Vec<String>,
    unresolved: Vec<String>,
    /// Fields the proxies do not enforce yet (never emitted into proxy config).
    not_enforced: BTreeSet<&'static str>,
    /// Said after the verdict in the `Accepted` message, whatever it is.
    notes: Vec<String>,
}

impl Problems {
    fn into_status(self, generation: Option<i64>, current: Option<Status>) -> DesiredStatus {
        let mut accepted = if !self.invalid.is_empty() {
            Condition { ok: false, reason: "Invalid", message: self.invalid.join("; ") }
        } else if !self.conflicts.is_empty() {
            Condition { ok: false, reason: "Conflict", message: self.conflicts.join("; ") }
        } else if !self.not_enforced.is_empty() {
            let fields: Vec<&str> = self.not_enforced.into_iter().collect();
            Condition {
                ok: true,
                reason: "Accepted",
                message: format!("accepted; not yet enforced by proxies: {}", fields.join(", ")),
            }
        } else {
            Condition { ok: true, reason: "Accepted", message: "accepted".into() }
        };
        for note in &self.notes {
            accepted.message.push_str("; ");
            accepted.message.push_str(note);
        }
        let resolved_refs = if self.unresolved.is_empty() {
            Condition { ok: true, reason: "ResolvedRefs", message: "all references resolved".into() }
        } else {
            Condition { ok: false, reason: "RefNotFound", message: self.unresolved.join("; ") }
        };
        DesiredStatus { generation, accepted, resolved_refs, current }
    }
}

/// The DestinationRule that configures a host.
struct RuleRef<'a> {
    key: &'a Key,
    spec: &'a DestinationRuleSpec,
}

impl Index {
    /// `reviews` (in `ns`), `reviews.prod`, `reviews.prod.svc` and
    /// `reviews.prod.svc.cluster.local` all name `reviews.prod.svc.cluster.local`; anything else
    /// with two or more dots is kept as written (and names no Service).
    pub fn fqdn(&self, host: &str, ns: &str) -> String {
        super::fqdn(host, ns, &self.settings.cluster_domain)
    }

    /// The Service a fully qualified name belongs to.
    fn service_key(&self, fqdn: &str) -> Option<Key> {
        let rest = fqdn.strip_suffix(&format!(".svc.{}", self.settings.cluster_domain))?;
        let (name, ns) = rest.split_once('.')?;
        let key = Key::new(ns, name);
        self.services.contains_key(&key).then_some(key)
    }

    fn service_fqdn(&self, key: &Key) -> String {
        format!("{}.{}.svc.{}", key.name, key.namespace, self.settings.cluster_domain)
    }

    /// Resolves everything. Pure: same index, same result.
    pub fn resolve(&self) -> Resolution {
        let mut out = Resolution::default();
        let mut services: BTreeMap<String, pb::Service> = BTreeMap::new();

        // Services with their endpoints.
        let mut slices: BTreeMap<Key, Vec<&Slice>> = BTreeMap::new();
        for (key, slice) in &self.slices {
            slices.entry(Key::new(&key.namespace, &slice.service)).or_default().push(slice);
        }
        for (key, svc) in &self.services {
            let fqdn = self.service_fqdn(key);
            for ip in &svc.cluster_ips {
                out.by_address.insert(ip.clone(), fqdn.clone());
            }
            let own_slices = slices.get(key).map(Vec::as_slice).unwrap_or_default();
            let ports = svc
                .ports
                .iter()
                .map(|port| pb::ServicePort {
                    number: port.port,
                    name: port.name.clone(),
                    protocol: port.protocol as i32,
                    endpoints: self.endpoints(&key.namespace, own_slices, &port.name),
                })
                .collect();
            services.insert(
                fqdn.clone(),
                pb::Service {
                    name: fqdn,
                    aliases: vec![
                        format!("{}.{}", key.name, key.namespace),
                        format!("{}.{}.svc", key.name, key.namespace),
                    ],
                    addresses: svc.cluster_ips.clone(),
                    ports,
                    ..pb::Service::default()
                },
            );
        }

        // DestinationRules: the oldest for a host wins.
        let mut rules: BTreeMap<String, RuleRef<'_>> = BTreeMap::new();
        for (key, dr) in by_age(&self.destination_rules) {
            let mut problems = Problems::default();
            let host = self.fqdn(&dr.spec.host, &key.namespace);
            if self.service_key(&host).is_none() {
                problems.unresolved.push(format!("host {} not found (no Service {host})", dr.spec.host));
            } else if let Some(winner) = rules.get(&host) {
                problems
                    .conflicts
                    .push(format!("host {host} is already configured by DestinationRule {}", winner.key));
            } else {
                let top = dr.spec.traffic_policy.as_ref();
                for policy in
                    top.into_iter().chain(dr.spec.subsets.iter().filter_map(|s| s.traffic_policy.as_ref()))
                {
                    not_enforced_in_policy(policy, &mut problems);
                }
                let svc = services.get_mut(&host).expect("resolved hosts are services");
                svc.traffic_policy = top.map(traffic_policy);
                svc.subsets = dr
                    .spec
                    .subsets
                    .iter()
                    .map(|s| pb::Subset {
                        name: s.name.clone(),
                        labels: s.labels.clone(),
                        // Merged over the service's policy here, so the proxy never merges.
                        traffic_policy: s.traffic_policy.as_ref().map(|p| traffic_policy(&merge(top, p))),
                    })
                    .collect();
                rules.insert(host, RuleRef { key, spec: &dr.spec });
            }
            out.statuses.insert(
                (Kind::DestinationRule, key.clone()),
                problems.into_status(dr.generation, dr.status.clone()),
            );
        }

        // VirtualServices: the oldest for a host wins it.
        let mut routed: BTreeMap<String, &Key> = BTreeMap::new();
        let mut routes: Vec<(String, Vec<pb::HttpRoute>, Vec<pb::TcpRoute>)> = Vec::new();
        for (key, vs) in by_age(&self.virtual_services) {
            let mut problems = Problems::default();
            let (http, tcp) = self.routes(key, &vs.spec, &services, &rules, &mut problems);
            let mut won = Vec::new();
            for host in &vs.spec.hosts {
                let fqdn = self.fqdn(host, &key.namespace);
                if self.service_key(&fqdn).is_none() {
                    problems.unresolved.push(format!("host {host} not found (no Service {fqdn})"));
                } else if let Some(winner) = routed.get(&fqdn) {
                    if *winner != key {
                        problems
                            .conflicts
                            .push(format!("host {fqdn} is already routed by VirtualService {winner}"));
                    }
                } else if !won.contains(&fqdn) {
                    won.push(fqdn);
                }
            }
            // An invalid resource is not used at all; a conflicting one keeps the hosts it won.
            if problems.invalid.is_empty() {
                for fqdn in won {
                    routed.insert(fqdn.clone(), key);
                    routes.push((fqdn, http.clone(), tcp.clone()));
                }
            }
            out.statuses.insert(
                (Kind::VirtualService, key.clone()),
                problems.into_status(vs.generation, vs.status.clone()),
            );
        }
        for (fqdn, http, tcp) in routes {
            let svc = services.get_mut(&fqdn).expect("routed hosts are services");
            svc.http_routes = http;
            svc.tcp_routes = tcp;
        }

        // Security policies. A selector that selects no pod is reported (ResolvedRefs) but
        // kept: the pods may come later.
        let root = &self.settings.root_namespace;
        for (key, pa) in &self.peer_authentications {
            let mut problems = Problems::default();
            if !pa.spec.port_level_mtls.is_empty() && pa.spec.selector.is_none() {
                problems.invalid.push("portLevelMtls needs a selector".into());
            }
            for p in pa.spec.port_level_mtls.keys().filter(|p| port(p).is_none()) {
                problems
                    .invalid
                    .push(format!("portLevelMtls: {p:?} is not a port number (1-65535): ignored"));
            }
            if let Some(sel) = pa.spec.selector.as_ref().filter(|s| !s.match_labels.is_empty())
                && !self
                    .pods
                    .iter()
                    .any(|(k, p)| k.namespace == key.namespace && selects(Some(sel), &p.labels))
            {
                problems.unresolved.push(format!(
                    "selector {} selects no pod in namespace {}",
                    labels(sel),
                    key.namespace
                ));
            }
            out.statuses.insert(
                (Kind::PeerAuthentication, key.clone()),
                problems.into_status(pa.generation, pa.status.clone()),
            );
        }
        // Each translated once; `inbound` picks those that apply to a pod.
        let mut authorizations: BTreeMap<&Key, pb::Authorization> = BTreeMap::new();
        for (key, ap) in &self.authorization_policies {
            let mut problems = Problems::default();
            if let Some(authorization) = authorization(key, ap, &mut problems) {
                authorizations.insert(key, authorization);
            }
            if let Some(sel) = ap.spec.selector.as_ref().filter(|s| !s.match_labels.is_empty()) {
                let mesh_wide = &key.namespace == root;
                let selected = self.pods.iter().any(|(k, p)| {
                    (mesh_wide || k.namespace == key.namespace) && selects(Some(sel), &p.labels)
                });
                if !selected {
                    let place = if mesh_wide {
                        "the mesh".to_owned()
                    } else {
                        format!("namespace {}", key.namespace)
                    };
                    problems.unresolved.push(format!("selector {} selects no pod in {place}", labels(sel)));
                }
            }
            out.statuses.insert(
                (Kind::AuthorizationPolicy, key.clone()),
                problems.into_status(ap.generation, ap.status.clone()),
            );
        }
        for (key, pod) in &self.pods {
            out.workloads.insert(
                format!("{}.{}", key.name, key.namespace),
                Arc::new(self.inbound(key, pod, &authorizations)),
            );
        }

        out.services = services.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
        out
    }

    /// The ready endpoints of one service port, deduplicated across slices, sorted by address.
    /// An endpoint whose pod is unknown (not listed yet, or not a pod) has no labels, no identity
    /// and no workload.
    fn endpoints(&self, ns: &str, slices: &[&Slice], port_name: &str) -> Vec<pb::Endpoint> {
        let mut found: BTreeMap<String, pb::Endpoint> = BTreeMap::new();
        for slice in slices {
            let Some(&(_, target)) = slice.ports.iter().find(|(name, _)| name == port_name) else {
                continue;
            };
            for ep in slice.endpoints.iter().filter(|e| e.ready) {
                let pod = ep.pod.as_ref().and_then(|p| self.pods.get(&Key::new(ns, p.as_str())));
                let template = pod
                    .map(|pod| pb::Endpoint {
                        labels: pod.labels.clone(),
                        identity: pod.identity.clone(),
                        workload: pod.workload.clone(),
                        ..pb::Endpoint::default()
                    })
                    .unwrap_or_default();
                for ip in &ep.addresses {
                    let address =
                        if ip.contains(':') { format!("[{ip}]:{target}") } else { format!("{ip}:{target}") };
                    found.insert(address.clone(), pb::Endpoint { address, ..template.clone() });
                }
            }
        }
        found.into_values().collect()
    }

    fn routes(
        &self,
        key: &Key,
        spec: &VirtualServiceSpec,
        services: &BTreeMap<String, pb::Service>,
        rules: &BTreeMap<String, RuleRef<'_>>,
        problems: &mut Problems,
    ) -> (Vec<pb::HttpRoute>, Vec<pb::TcpRoute>) {
        let mut http = Vec::new();
        for (i, rule) in spec.http.iter().enumerate() {
            let at = format!("http[{i}]");
            let mut matches = Vec::new();
            for (j, m) in rule.matches.iter().enumerate() {
                let at = format!("{at}.match[{j}]");
                if m.scheme.is_some() {
                    problems.not_enforced.insert("http.match.scheme");
                }
                if !m.without_headers.is_empty() {
                    problems.not_enforced.insert("http.match.withoutHeaders");
                }
                if m.port.is_some() {
                    problems.not_enforced.insert("http.match.port");
                }
                let uri = m.uri.as_ref().map(|s| string_match(&format!("{at}.uri"), s, problems));
                let method = m.method.as_ref().map(|s| string_match(&format!("{at}.method"), s, problems));
                let authority =
                    m.authority.as_ref().map(|s| string_match(&format!("{at}.authority"), s, problems));
                let mut headers = BTreeMap::new();
                for (name, sm) in &m.headers {
                    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                        problems.invalid.push(format!("{at}.headers: invalid header name {name:?}"));
                    }
                    let sm = string_match(&format!("{at}.headers.{name}"), sm, problems);
                    headers.insert(name.to_ascii_lowercase(), sm);
                }
                let mut query_params = BTreeMap::new();
                for (name, sm) in &m.query_params {
                    let sm = string_match(&format!("{at}.queryParams.{name}"), sm, problems);
                    query_params.insert(name.clone(), sm);
                }
                matches.push(pb::HttpMatch {
                    uri,
                    method,
                    authority,
                    headers,
                    query_params,
                    ignore_uri_case: m.ignore_uri_case.unwrap_or(false),
                });
            }
            let headers = rule.headers.as_ref();
            let mut out = pb::HttpRoute {
                name: rule.name.clone().unwrap_or_else(|| format!("{}.{i}", key.name)),
                matches,
                request_headers: headers.and_then(|h| h.request.as_ref()).map(header_ops),
                response_headers: headers.and_then(|h| h.response.as_ref()).map(header_ops),
                timeout_ms: rule
                    .timeout
                    .as_ref()
                    .map_or(0, |t| duration_ms(t, &format!("{at}.timeout"), problems)),
                rewrite: rule.rewrite.as_ref().map(|r| pb::Rewrite {
                    uri: r.uri.clone().unwrap_or_default(),
                    authority: r.authority.clone().unwrap_or_default(),
                }),
                retries: rule.retries.as_ref().map(|r| retry(r, &format!("{at}.retries"), problems)),
                fault: rule.fault.as_ref().map(|f| fault(f, &format!("{at}.fault"), problems)),
                ..pb::HttpRoute::default()
            };
            // `mirror` (with `mirrorPercentage` or the older `mirrorPercent`), or a single entry
            // of `mirrors`; the schema refuses more than one.
            let mirror = match (&rule.mirror, rule.mirrors.first()) {
                (Some(dest), _) => Some((
                    dest,
                    rule.mirror_percentage.as_ref().map(|p| p.value).or(rule.mirror_percent.map(f64::from)),
                )),
                (None, Some(m)) => Some((&m.destination, m.percentage.as_ref().map(|p| p.value))),
                (None, None) => None,
            };
            if let Some((dest, percent)) = mirror {
                // An unresolved mirror is reported in ResolvedRefs and left out; the route
                // itself still works.
                if let Some(destination) = self.destination(key, dest, services, rules, problems) {
                    out.mirror = Some(destination);
                    out.mirror_percent = percent.unwrap_or(100.0);
                }
            }
            if let Some(r) = &rule.redirect {
                out.redirect = Some(pb::Redirect {
                    uri: r.uri.clone().unwrap_or_default(),
                    authority: r.authority.clone().unwrap_or_default(),
                    port: r.port.unwrap_or_default(),
                    scheme: match r.scheme {
                        Some(net::RedirectScheme::Http) => "http".into(),
                        Some(net::RedirectScheme::Https) => "https".into(),
                        None => String::new(),
                    },
                    redirect_code: r.redirect_code.unwrap_or(301),
                });
            } else if let Some(d) = &rule.direct_response {
                out.direct_response = Some(pb::DirectResponse {
                    status: d.status,
                    body: d.body.as_ref().map(|b| b.string.clone()).unwrap_or_default(),
                });
            } else {
                let weighted: Vec<_> =
                    rule.route.iter().map(|d| (&d.destination, d.weight, d.headers.as_ref())).collect();
                match self.split(key, &weighted, services, rules, problems) {
                    Some(route) => out.route = route,
                    // Nothing left to send to: fail those requests visibly rather than let a
                    // later rule or the service's default catch them.
                    None => {
                        out.direct_response = Some(pb::DirectResponse {
                            status: 503,
                            body: "no healthy upstream: unresolved destination\n".into(),
                        })
                    }
                }
            }
            http.push(out);
        }
        let mut tcp = Vec::new();
        for rule in &spec.tcp {
            if !rule.matches.is_empty() {
                problems.not_enforced.insert("tcp.match");
            }
            let weighted: Vec<_> = rule.route.iter().map(|d| (&d.destination, d.weight, None)).collect();
            if let Some(route) = self.split(key, &weighted, services, rules, problems) {
                tcp.push(pb::TcpRoute { route });
            }
        }
        (http, tcp)
    }

    /// Weighted destinations with the unresolved ones left out (each reported); `None` when
    /// nothing with a weight is left.
    fn split(
        &self,
        key: &Key,
        weighted: &[(&Destination, Option<i32>, Option<&net::Headers>)],
        services: &BTreeMap<String, pb::Service>,
        rules: &BTreeMap<String, RuleRef<'_>>,
        problems: &mut Problems,
    ) -> Option<Vec<pb::WeightedDestination>> {
        let unweighted = weighted.len() > 1 && weighted.iter().all(|(_, w, _)| w.is_none());
        let mut out = Vec::new();
        for (dest, weight, headers) in weighted {
            let Some(destination) = self.destination(key, dest, services, rules, problems) else {
                continue;
            };
            out.push(pb::WeightedDestination {
                destination: Some(destination),
                weight: if unweighted { 1 } else { weight.and_then(|w| u32::try_from(w).ok()).unwrap_or(0) },
                request_headers: headers.and_then(|h| h.request.as_ref()).map(header_ops),
                response_headers: headers.and_then(|h| h.response.as_ref()).map(header_ops),
            });
        }
        let usable = match out.len() {
            0 => false,
            1 => true,
            _ => out.iter().any(|w| w.weight > 0),
        };
        usable.then_some(out)
    }

    fn destination(
        &self,
        key: &Key,
        dest: &Destination,
        services: &BTreeMap<String, pb::Service>,
        rules: &BTreeMap<String, RuleRef<'_>>,
        problems: &mut Problems,
    ) -> Option<pb::Destination> {
        let fqdn = self.fqdn(&dest.host, &key.namespace);
        let Some(svc) = services.get(&fqdn) else {
            problems.unresolved.push(format!("host {} not found (no Service {fqdn})", dest.host));
            return None;
        };
        if svc.ports.is_empty() {
            problems.unresolved.push(format!("host {} has no TCP ports", dest.host));
            return None;
        }
        let port = dest.port.as_ref().map_or(0, |p| p.number);
        if port != 0 && !svc.ports.iter().any(|p| p.number == port) {
            problems.unresolved.push(format!("port {port} not defined in Service {fqdn}"));
            return None;
        }
        let subset = dest.subset.clone().unwrap_or_default();
        if !subset.is_empty() {
            match rules.get(&fqdn) {
                None => {
                    problems.unresolved.push(format!(
                        "subset {subset} of host {} not defined: no DestinationRule for {fqdn}",
                        dest.host
                    ));
                    return None;
                }
                Some(rule) if !rule.spec.subsets.iter().any(|s| s.name == subset) => {
                    let name = if rule.key.namespace == key.namespace {
                        rule.key.name.clone()
                    } else {
                        rule.key.to_string()
                    };
                    problems
                        .unresolved
                        .push(format!("subset {subset} not defined in DestinationRule {name}"));
                    return None;
                }
                Some(_) => {}
            }
        }
        Some(pb::Destination { host: fqdn, subset, port })
    }

    fn inbound(
        &self,
        key: &Key,
        pod: &PodInfo,
        authorizations: &BTreeMap<&Key, pb::Authorization>,
    ) -> pb::InboundPolicy {
        let root = &self.settings.root_namespace;
        let selects = |sel: &Option<WorkloadSelector>| selects(sel.as_ref(), &pod.labels);
        // Most specific first, then oldest: workload, namespace, mesh.
        let mut candidates: Vec<Candidate<'_>> = Vec::new();
        for (k, pa) in &self.peer_authentications {
            let rank = match (&pa.spec.selector, k.namespace == key.namespace, &k.namespace == root) {
                (Some(_), true, _) if selects(&pa.spec.selector) => 0,
                (None, true, _) => 1,
                (None, false, true) => 2,
                _ => continue,
            };
            candidates.push((rank, pa.age_key(k), pa));
        }
        candidates.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        let mode = candidates
            .iter()
            .filter_map(|(_, _, pa)| pa.spec.mtls.as_ref().map(|m| m.mode))
            .find(|m| *m != MtlsMode::Unset)
            .unwrap_or(MtlsMode::Permissive);
        let port_mtls = candidates
            .first()
            .filter(|(rank, _, _)| *rank == 0)
            .map(|(_, _, pa)| {
                pa.spec
                    .port_level_mtls
                    .iter()
                    .filter_map(|(port, m)| {
                        let port = self::port(port)?;
                        let m = if m.mode == MtlsMode::Unset { mode } else { m.mode };
                        Some((port, mtls_mode(m) as i32))
                    })
                    .collect()
            })
            .unwrap_or_default();

        let authorizations = authorizations
            .iter()
            .filter(|(k, _)| {
                let ap = &self.authorization_policies[**k];
                (k.namespace == key.namespace || &k.namespace == root) && selects(&ap.spec.selector)
            })
            .map(|(_, a)| a.clone())
            .collect();
        pb::InboundPolicy {
            workload: format!("{}.{}", key.name, key.namespace),
            service_account: pod.service_account.clone(),
            mtls_mode: mtls_mode(mode) as i32,
            port_mtls,
            authorizations,
        }
    }
}

/// A PeerAuthentication that applies to a pod: (specificity rank, age, the policy).
type Candidate<'a> =
    (u8, (bool, Option<k8s_openapi::jiff::Timestamp>, &'a Key), &'a Crd<sec::PeerAuthenticationSpec>);

/// Entries oldest first (creation time, then namespace/name).
fn by_age<S>(map: &BTreeMap<Key, Crd<S>>) -> Vec<(&Key, &Crd<S>)> {
    let mut all: Vec<_> = map.iter().collect();
    all.sort_by(|(ka, a), (kb, b)| a.age_key(ka).cmp(&b.age_key(kb)));
    all
}

fn string_match(at: &str, sm: &StringMatch, problems: &mut Problems) -> pb::StringMatch {
    use pb::string_match::Kind;
    let kind = if let Some(e) = &sm.exact {
        Kind::Exact(e.clone())
    } else if let Some(p) = &sm.prefix {
        Kind::Prefix(p.clone())
    } else if let Some(r) = &sm.regex {
        if let Err(e) = regex::Regex::new(r) {
            let why = e.to_string().lines().last().unwrap_or_default().trim().to_owned();
            problems.invalid.push(format!("{at}: invalid regex {r:?}: {why}"));
        }
        Kind::Regex(r.clone())
    } else {
        problems.invalid.push(format!("{at}: needs one of exact, prefix or regex"));
        Kind::Prefix(String::new())
    };
    pb::StringMatch { kind: Some(kind) }
}

fn duration_ms(d: &weft_api::Duration, at: &str, problems: &mut Problems) -> u32 {
    match d.parse() {
        Ok(d) => u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1),
        Err(e) => {
            problems.invalid.push(format!("{at}: {e}"));
            0
        }
    }
}

fn header_ops(h: &net::HeaderOperations) -> pb::HeaderOperations {
    pb::HeaderOperations { set: h.set.clone(), add: h.add.clone(), remove: h.remove.clone() }
}

/// Milliseconds of a duration the schema has already checked; `None` when absent.
fn ms(d: Option<&weft_api::Duration>) -> Option<u32> {
    d.and_then(|d| d.parse().ok()).map(|d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX))
}

/// The retry conditions Istio uses when `retries` says none.
const ISTIO_DEFAULT_RETRY_ON: &str =
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes,503";

/// The `retryOn` conditions the proxies implement (and HTTP status codes).
const RETRY_CONDITIONS: [&str; 12] = [
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "refused-stream",
    "retriable-4xx",
    "retriable-status-codes",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

fn retry(r: &net::HttpRetry, at: &str, problems: &mut Problems) -> pb::Retry {
    let retry_on = match r.retry_on.as_deref() {
        None => ISTIO_DEFAULT_RETRY_ON.to_owned(),
        Some(list) => {
            let mut conditions: Vec<&str> = Vec::new();
            for c in list.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                let code = c.len() == 3 && c.parse::<u16>().is_ok_and(|n| (100..600).contains(&n));
                if !code && !RETRY_CONDITIONS.contains(&c) {
                    problems.invalid.push(format!("{at}.retryOn: condition {c:?} is not supported"));
                } else if !conditions.contains(&c) {
                    conditions.push(c);
                }
            }
            // As in Istio, a status code in the list retries that code without also naming
            // `retriable-status-codes`.
            let has_code = conditions.iter().any(|c| c.parse::<u16>().is_ok());
            if has_code && !conditions.contains(&"retriable-status-codes") {
                conditions.push("retriable-status-codes");
            }
            conditions.join(",")
        }
    };
    pb::Retry {
        attempts: u32::try_from(r.attempts).unwrap_or(0),
        per_try_timeout_ms: ms(r.per_try_timeout.as_ref()).unwrap_or(0),
        retry_on,
        backoff_ms: ms(r.backoff.as_ref()).filter(|b| *b > 0).unwrap_or(25),
    }
}

fn fault(f: &net::HttpFaultInjection, at: &str, problems: &mut Problems) -> pb::Fault {
    let mut out = pb::Fault::default();
    if let Some(d) = &f.delay {
        out.delay_ms = ms(d.fixed_delay.as_ref()).unwrap_or(0);
        out.delay_percent =
            d.percentage.as_ref().map(|p| p.value).or(d.percent.map(f64::from)).unwrap_or(100.0);
    }
    if let Some(a) = &f.abort {
        match (a.http_status, a.grpc_status) {
            (Some(status), _) if !(200..=599).contains(&status) => problems
                .invalid
                .push(format!("{at}.abort.httpStatus: {status} is not an HTTP status (200-599)")),
            (Some(status), _) => out.abort_http_status = status.unsigned_abs(),
            (None, Some(status)) => out.abort_grpc_status = grpc_code(status),
            (None, None) => problems.invalid.push(format!("{at}.abort: needs httpStatus or grpcStatus")),
        }
        out.abort_percent = a.percentage.as_ref().map_or(100.0, |p| p.value);
    }
    out
}

/// The numeric code of a gRPC status.
fn grpc_code(s: net::GrpcStatus) -> u32 {
    use net::GrpcStatus as G;
    match s {
        G::Cancelled => 1,
        G::Unknown => 2,
        G::InvalidArgument => 3,
        G::DeadlineExceeded => 4,
        G::NotFound => 5,
        G::AlreadyExists => 6,
        G::PermissionDenied => 7,
        G::ResourceExhausted => 8,
        G::FailedPrecondition => 9,
        G::Aborted => 10,
        G::OutOfRange => 11,
        G::Unimplemented => 12,
        G::Internal => 13,
        G::Unavailable => 14,
        G::DataLoss => 15,
        G::Unauthenticated => 16,
    }
}

/// Fields of a DestinationRule policy that are accepted but not carried to the proxies.
fn not_enforced_in_policy(t: &net::TrafficPolicy, problems: &mut Problems) {
    let tls = t.tls.iter().chain(t.port_level_settings.iter().filter_map(|p| p.tls.as_ref()));
    if tls.into_iter().any(|t| t.mode == net::TlsMode::Disable) {
        problems.not_enforced.insert("trafficPolicy.tls.mode: DISABLE");
    }
}

/// A subset's policy over its service's, as Istio merges them: each part the subset sets
/// replaces the service's part of the same kind. For a port with settings, the subset's entry for
/// that port replaces everything; without one, the service's entry for the port is taken with the
/// subset's parts over it.
fn merge(service: Option<&net::TrafficPolicy>, subset: &net::TrafficPolicy) -> net::TrafficPolicy {
    let base = service.cloned().unwrap_or_default();
    let mut ports: BTreeMap<u32, net::PortTrafficPolicy> = BTreeMap::new();
    for p in &base.port_level_settings {
        ports.insert(
            p.port.number,
            net::PortTrafficPolicy {
                port: p.port.clone(),
                load_balancer: subset.load_balancer.clone().or_else(|| p.load_balancer.clone()),
                connection_pool: subset.connection_pool.clone().or_else(|| p.connection_pool.clone()),
                outlier_detection: subset.outlier_detection.clone().or_else(|| p.outlier_detection.clone()),
                tls: subset.tls.clone().or_else(|| p.tls.clone()),
            },
        );
    }
    for p in &subset.port_level_settings {
        ports.insert(p.port.number, p.clone());
    }
    net::TrafficPolicy {
        load_balancer: subset.load_balancer.clone().or(base.load_balancer),
        connection_pool: subset.connection_pool.clone().or(base.connection_pool),
        outlier_detection: subset.outlier_detection.clone().or(base.outlier_detection),
        tls: subset.tls.clone().or(base.tls),
        port_level_settings: ports.into_values().collect(),
        retry_budget: subset.retry_budget.clone().or(base.retry_budget),
        ..Default::default()
    }
}

fn traffic_policy(t: &net::TrafficPolicy) -> pb::TrafficPolicy {
    pb::TrafficPolicy {
        load_balancer: t.load_balancer.as_ref().map(load_balancer),
        connection_pool: t.connection_pool.as_ref().map(connection_pool),
        outlier_detection: t.outlier_detection.as_ref().map(outlier_detection),
        // A port's entry replaces the whole policy for that port, and what it leaves out takes
        // the defaults (Istio's rule): every part is written, so none is inherited.
        port_level_settings: t
            .port_level_settings
            .iter()
            .map(|p| pb::PortTrafficPolicy {
                port: p.port.number,
                load_balancer: Some(p.load_balancer.as_ref().map(load_balancer).unwrap_or_default()),
                connection_pool: Some(p.connection_pool.as_ref().map(connection_pool).unwrap_or_default()),
                outlier_detection: Some(
                    p.outlier_detection.as_ref().map(outlier_detection).unwrap_or_default(),
                ),
            })
            .collect(),
        retry_budget: t.retry_budget.as_ref().map(|b| pb::RetryBudget {
            percent: b.percent.unwrap_or(20.0),
            min_retries_per_second: b.min_retries_per_second.unwrap_or(3),
            window_ms: ms(b.budget_interval.as_ref()).filter(|w| *w > 0).unwrap_or(10_000),
        }),
    }
}

fn load_balancer(l: &net::LoadBalancerSettings) -> pb::LoadBalancer {
    use pb::consistent_hash::Key;
    let policy = match l.simple {
        None | Some(net::SimpleLb::Unspecified) => pb::load_balancer::Policy::PeakEwma,
        Some(net::SimpleLb::Random) => pb::load_balancer::Policy::Random,
        Some(net::SimpleLb::RoundRobin) => pb::load_balancer::Policy::RoundRobin,
        Some(net::SimpleLb::LeastRequest) => pb::load_balancer::Policy::LeastRequest,
    };
    let consistent_hash = l.consistent_hash.as_ref().and_then(|c| {
        let key = if let Some(h) = &c.http_header_name {
            Key::HttpHeaderName(h.to_ascii_lowercase())
        } else if let Some(cookie) = &c.http_cookie {
            Key::HttpCookie(pb::HttpCookie {
                name: cookie.name.clone(),
                path: cookie.path.clone().unwrap_or_default(),
                ttl_ms: ms(cookie.ttl.as_ref()).unwrap_or(0),
            })
        } else if c.use_source_ip == Some(true) {
            Key::UseSourceIp(true)
        } else {
            Key::HttpQueryParameterName(c.http_query_parameter_name.clone()?)
        };
        Some(pb::ConsistentHash { key: Some(key) })
    });
    pb::LoadBalancer { policy: policy as i32, consistent_hash }
}

fn connection_pool(c: &net::ConnectionPoolSettings) -> pb::ConnectionPool {
    let (tcp, http) = (c.tcp.as_ref(), c.http.as_ref());
    let limit = |v: Option<i32>| v.and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
    pb::ConnectionPool {
        connect_timeout_ms: ms(tcp.and_then(|t| t.connect_timeout.as_ref())).unwrap_or(0),
        idle_timeout_ms: ms(http
            .and_then(|h| h.idle_timeout.as_ref())
            .or(tcp.and_then(|t| t.idle_timeout.as_ref())))
        .unwrap_or(0),
        max_connections: limit(tcp.and_then(|t| t.max_connections)),
        max_pending_requests: limit(http.and_then(|h| h.http1_max_pending_requests)),
        max_requests: limit(http.and_then(|h| h.http2_max_requests)),
        max_requests_per_connection: limit(http.and_then(|h| h.max_requests_per_connection)),
        max_retries: limit(http.and_then(|h| h.max_retries)),
        h2_upgrade: match http.and_then(|h| h.h2_upgrade_policy) {
            None | Some(net::H2UpgradePolicy::Default) => pb::connection_pool::H2Upgrade::Default,
            Some(net::H2UpgradePolicy::DoNotUpgrade) => pb::connection_pool::H2Upgrade::DoNotUpgrade,
            Some(net::H2UpgradePolicy::Upgrade) => pb::connection_pool::H2Upgrade::Upgrade,
        } as i32,
    }
}

/// Istio's defaults for what the block leaves out: 5 consecutive 5xx (0 disables), gateway
/// errors off, 10s interval, 30s base ejection, at most 10% ejected, no health floor.
fn outlier_detection(o: &net::OutlierDetection) -> pb::OutlierDetection {
    let percent = |v: Option<i32>, default: u32| v.and_then(|v| u32::try_from(v).ok()).unwrap_or(default);
    pb::OutlierDetection {
        consecutive_5xx_errors: o.consecutive_5xx_errors.unwrap_or(5),
        consecutive_gateway_errors: o.consecutive_gateway_errors.unwrap_or(0),
        base_ejection_time_ms: ms(o.base_ejection_time.as_ref()).unwrap_or(30_000).max(1),
        max_ejection_percent: percent(o.max_ejection_percent, 10),
        min_health_percent: percent(o.min_health_percent, 0),
        interval_ms: ms(o.interval.as_ref()).unwrap_or(10_000).max(1),
    }
}

fn mtls_mode(m: MtlsMode) -> pb::MtlsMode {
    match m {
        MtlsMode::Strict => pb::MtlsMode::MtlsStrict,
        MtlsMode::Disable => pb::MtlsMode::MtlsDisable,
        MtlsMode::Permissive | MtlsMode::Unset => pb::MtlsMode::MtlsPermissive,
    }
}

/// Whether a selector (absent: every pod) selects a pod with these labels.
fn selects(sel: Option<&WorkloadSelector>, labels: &BTreeMap<String, String>) -> bool {
    sel.is_none_or(|s| s.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// A selector as `kubectl` writes one: `app=web,version=v1`.
fn labels(sel: &WorkloadSelector) -> String {
    sel.match_labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// One AuthorizationPolicy in the proxies' shape; `None` when it never changes a decision.
///
/// The schema refuses everything reported here as invalid; it gets this far only past the schema
/// (an older CRD, say), and then fails closed: an ALLOW rule that cannot be read whole is left out
/// (it matches nothing), a DENY rule loses the part that cannot be read (it matches more, never
/// less).
fn authorization(
    key: &Key,
    ap: &Crd<sec::AuthorizationPolicySpec>,
    problems: &mut Problems,
) -> Option<pb::Authorization> {
    use pb::authorization::Action;
    let spec = &ap.spec;
    let action = match spec.action.unwrap_or_default() {
        sec::Action::Allow => Action::Allow,
        sec::Action::Deny => Action::Deny,
        sec::Action::Audit => {
            problems.invalid.push("action AUDIT is not supported by Weft: the policy is not used".into());
            return None;
        }
        sec::Action::Custom => {
            problems.invalid.push(
                "action CUSTOM is not supported by Weft (no external authorization): requests its rules \
                 match are denied"
                    .into(),
            );
            Action::Deny
        }
    };
    if spec.provider.is_some() {
        problems.invalid.push("provider is not supported by Weft".into());
    }
    let deny = action == Action::Deny;
    let targeted = spec.target_ref.is_some() || !spec.target_refs.is_empty();
    if targeted {
        // Without a selector it would apply to the whole namespace, not to its targets.
        let then = if deny { "its rules apply to the selected pods" } else { "it matches nothing" };
        problems.invalid.push(format!("targetRef is not supported by Weft (use selector): {then}"));
    }
    let rules = if targeted && !deny {
        Vec::new()
    } else {
        spec.rules
            .iter()
            .enumerate()
            .filter_map(|(i, r)| authorization_rule(r, &format!("rules[{i}]"), deny, problems))
            .collect()
    };
    if ap.dry_run.on {
        problems.notes.push("dry run: evaluated and counted by the proxies, not enforced".into());
    }
    for annotation in &ap.dry_run.unrecognized {
        problems.notes.push(format!("annotation {annotation} is not \"true\": the policy is enforced"));
    }
    Some(pb::Authorization { name: key.to_string(), action: action as i32, rules, dry_run: ap.dry_run.on })
}

/// The `when` keys the proxies evaluate, besides `request.headers[<name>]`.
const WHEN_KEYS: [&str; 6] = [
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
    "connection.sni",
];

/// What the entries of a list must be.
#[derive(Clone, Copy)]
enum Entry {
    Port,
    IpBlock,
    /// A path or pattern (`*` at the start or end); Istio's templates (`{*}`, `{**}`) are not
    /// supported.
    Path,
}

impl Entry {
    fn valid(self, s: &str) -> bool {
        match self {
            Entry::Port => port(s).is_some(),
            Entry::IpBlock => ip_block(s),
            Entry::Path => !s.contains('{'),
        }
    }

    fn expected(self) -> &'static str {
        match self {
            Entry::Port => "a port number (1-65535)",
            Entry::IpBlock => "an IP address or CIDR block",
            Entry::Path => "a path without a template ({*} and {**} are not supported by Weft)",
        }
    }
}

fn port(s: &str) -> Option<u32> {
    let digits = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    s.parse::<u32>().ok().filter(|p| digits && (1..=65535).contains(p))
}

fn ip_block(s: &str) -> bool {
    let Some((ip, len)) = s.split_once('/') else { return s.parse::<std::net::IpAddr>().is_ok() };
    let max = match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => 32,
        Ok(std::net::IpAddr::V6(_)) => 128,
        Err(_) => return false,
    };
    !len.is_empty()
        && len.len() <= 3
        && len.bytes().all(|b| b.is_ascii_digit())
        && len.parse::<u8>().is_ok_and(|l| l <= max)
}

/// Checks one rule's lists while translating it.
struct RuleCheck {
    deny: bool,
    /// What could not be read, as `<field>: <why>`.
    bad: Vec<String>,
}

impl RuleCheck {
    /// A list that matches when any entry does. With an entry that cannot be read, a DENY rule
    /// drops the whole list (any value matches).
    fn any_of(&mut self, at: &str, entries: &[String], entry: Entry) -> Vec<String> {
        if self.read(at, entries, entry) || !self.deny { entries.to_vec() } else { Vec::new() }
    }

    /// A list that matches when no entry does: an entry that cannot be read is dropped (it
    /// excludes nothing).
    fn none_of(&mut self, at: &str, entries: &[String], entry: Entry) -> Vec<String> {
        self.read(at, entries, entry);
        entries.iter().filter(|e| entry.valid(e)).cloned().collect()
    }

    /// Whether every entry is valid; reports those that are not.
    fn read(&mut self, at: &str, entries: &[String], entry: Entry) -> bool {
        let before = self.bad.len();
        for e in entries.iter().filter(|e| !entry.valid(e)) {
            self.bad.push(format!("{at}: {e:?} is not {}", entry.expected()));
        }
        self.bad.len() == before
    }

    /// A field Weft does not evaluate: the DENY rule is enforced without it.
    fn unsupported(&mut self, at: &str, set: bool) {
        if set {
            self.bad.push(format!("{at} is not supported by Weft"));
        }
    }
}

/// One rule in the proxies' shape, `None` for an ALLOW rule that cannot be read whole (see
/// [`authorization`]).
fn authorization_rule(
    r: &sec::Rule,
    at: &str,
    deny: bool,
    problems: &mut Problems,
) -> Option<pb::AuthorizationRule> {
    let mut check = RuleCheck { deny, bad: Vec::new() };
    let mut from = Vec::new();
    for (j, f) in r.from.iter().enumerate() {
        let at = format!("{at}.from[{j}].source");
        let s = &f.source;
        check.unsupported(&format!("{at}.requestPrincipals"), !s.request_principals.is_empty());
        check.unsupported(&format!("{at}.notRequestPrincipals"), !s.not_request_principals.is_empty());
        check.unsupported(&format!("{at}.serviceAccounts"), !s.service_accounts.is_empty());
        check.unsupported(&format!("{at}.notServiceAccounts"), !s.not_service_accounts.is_empty());
        from.push(pb::PeerMatch {
            principals: s.principals.clone(),
            not_principals: s.not_principals.clone(),
            namespaces: s.namespaces.clone(),
            not_namespaces: s.not_namespaces.clone(),
            ip_blocks: check.any_of(&format!("{at}.ipBlocks"), &s.ip_blocks, Entry::IpBlock),
            not_ip_blocks: check.none_of(&format!("{at}.notIpBlocks"), &s.not_ip_blocks, Entry::IpBlock),
            remote_ip_blocks: check.any_of(
                &format!("{at}.remoteIpBlocks"),
                &s.remote_ip_blocks,
                Entry::IpBlock,
            ),
            not_remote_ip_blocks: check.none_of(
                &format!("{at}.notRemoteIpBlocks"),
                &s.not_remote_ip_blocks,
                Entry::IpBlock,
            ),
        });
    }
    let mut to = Vec::new();
    for (j, t) in r.to.iter().enumerate() {
        let at = format!("{at}.to[{j}].operation");
        let o = &t.operation;
        let ports = |p: Vec<String>| p.iter().filter_map(|p| port(p)).collect();
        to.push(pb::OperationMatch {
            hosts: o.hosts.clone(),
            not_hosts: o.not_hosts.clone(),
            ports: ports(check.any_of(&format!("{at}.ports"), &o.ports, Entry::Port)),
            not_ports: ports(check.none_of(&format!("{at}.notPorts"), &o.not_ports, Entry::Port)),
            methods: o.methods.clone(),
            not_methods: o.not_methods.clone(),
            paths: check.any_of(&format!("{at}.paths"), &o.paths, Entry::Path),
            not_paths: check.none_of(&format!("{at}.notPaths"), &o.not_paths, Entry::Path),
        });
    }
    let mut when = Vec::new();
    for (j, c) in r.when.iter().enumerate() {
        if let Some(c) = condition(c, &format!("{at}.when[{j}]"), &mut check) {
            when.push(c);
        }
    }
    if check.bad.is_empty() {
        return Some(pb::AuthorizationRule { from, to, when });
    }
    let then = if deny {
        format!("{at} is enforced without what cannot be read (a DENY rule matches more, never less)")
    } else {
        format!("{at} matches nothing (an ALLOW rule that cannot be read whole is left out)")
    };
    problems.invalid.extend(check.bad);
    problems.invalid.push(then);
    deny.then_some(pb::AuthorizationRule { from, to, when })
}

/// A `when` condition; `None` when it cannot be read (a DENY rule is then enforced without it).
/// Header names are lowercased in the key: `request.headers[x-user]`.
fn condition(c: &sec::Condition, at: &str, check: &mut RuleCheck) -> Option<pb::Condition> {
    let before = check.bad.len();
    let header = c
        .key
        .strip_prefix("request.headers[")
        .and_then(|rest| rest.strip_suffix(']'))
        .filter(|name| http::HeaderName::from_bytes(name.as_bytes()).is_ok());
    let key = match header {
        Some(name) => format!("request.headers[{}]", name.to_ascii_lowercase()),
        None if WHEN_KEYS.contains(&c.key.as_str()) => c.key.clone(),
        None => {
            check.bad.push(format!("{at}: key {:?} is not supported by Weft", c.key));
            return None;
        }
    };
    if c.values.is_empty() && c.not_values.is_empty() {
        check.bad.push(format!("{at}: needs values or notValues"));
        return None;
    }
    let entry = match key.as_str() {
        "source.ip" | "destination.ip" => Some(Entry::IpBlock),
        "destination.port" => Some(Entry::Port),
        _ => None,
    };
    if let Some(entry) = entry {
        check.read(&format!("{at}.values"), &c.values, entry);
        check.read(&format!("{at}.notValues"), &c.not_values, entry);
    }
    (check.bad.len() == before).then(|| pb::Condition {
        key,
        values: c.values.clone(),
        not_values: c.not_values.clone(),
    })
}
