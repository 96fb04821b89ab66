//! This workload's inbound policy: which connections it accepts (PeerAuthentication's mTLS mode,
//! per port) and which requests (AuthorizationPolicy). `compile` turns the operator's
//! `InboundPolicy` into matchers once per config; `Inbound::mtls` and `Inbound::decide` are pure
//! and run per connection and per request.
//!
//! The order is Istio's: a matching DENY policy denies; otherwise, when any ALLOW policy selects
//! the workload, the request is allowed only if one matches; with no policy everything is
//! allowed. Dry-run policies are decided the same way on their own, counted, never enforced.

mod rules;
#[cfg(test)]
mod tests;

use std::sync::{Arc, LazyLock, OnceLock};

use prometheus_client::metrics::counter::Counter;

use http::HeaderName;
pub use rules::{Check, Facts, HttpFacts};
use rules::{Condition, Field, Gate, HostPattern, IpBlock, KINDS, Operation, Pattern, Rule, Source};
use weft_proto::v1 as pb;

use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{at}: invalid IP address or CIDR block {value:?}")]
    BadIpBlock { at: String, value: String },
    #[error("{at}: invalid port {value:?}")]
    BadPort { at: String, value: String },
    #[error("{at}: unsupported condition key {key:?}")]
    UnknownKey { at: String, key: String },
    #[error("{at}: invalid header name {name:?}")]
    BadHeaderName { at: String, name: String },
    #[error("{at}: path templates such as {value:?} are not supported")]
    PathTemplate { at: String, value: String },
    #[error("{at}: unknown action {value}")]
    BadAction { at: String, value: i32 },
}

/// PeerAuthentication's mode for one port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MtlsMode {
    /// mTLS and plain text (the default when no PeerAuthentication applies).
    Permissive,
    /// mTLS only: plain text is refused.
    Strict,
    /// Plain text only: mesh tunnels are not terminated.
    Disable,
}

impl MtlsMode {
    fn from_pb(value: i32) -> MtlsMode {
        match pb::MtlsMode::try_from(value) {
            Ok(pb::MtlsMode::MtlsStrict) => MtlsMode::Strict,
            Ok(pb::MtlsMode::MtlsDisable) => MtlsMode::Disable,
            Ok(pb::MtlsMode::MtlsPermissive) => MtlsMode::Permissive,
            // A mode from a newer control plane that this proxy does not know: fail closed.
            Err(_) => MtlsMode::Strict,
        }
    }
}

/// The compiled inbound policy.
#[derive(Debug)]
pub struct Inbound {
    /// `<pod>.<namespace>`, as the control plane named it.
    pub workload: String,
    mtls: MtlsMode,
    port_mtls: Vec<(u16, MtlsMode)>,
    enforced: Policies,
    dry_run: Policies,
}

#[derive(Debug, Default)]
struct Policies {
    deny: ByKind<Policy>,
    allow: ByKind<Policy>,
    /// The counters of "no ALLOW policy matched" (`policy=""`).
    unmatched: Counters,
}

/// Items in order, and for each kind of request (`Facts::kind`: with or without an identity,
/// and its method) the indexes of those whose gate lets it through: a request walks only those,
/// so policies and rules that name principals cost a plain-text request nothing, and rules for
/// other methods cost nothing at all. Made once per config.
#[derive(Debug)]
struct ByKind<T> {
    all: Vec<T>,
    /// Kind `k`'s items are `indexes[starts[k]..starts[k + 1]]`.
    starts: [u32; KINDS + 1],
    indexes: Box<[u32]>,
}

impl<T> Default for ByKind<T> {
    fn default() -> Self {
        ByKind::new(Vec::new(), |_| Gate::default())
    }
}

impl<T> ByKind<T> {
    fn new(all: Vec<T>, gate: impl Fn(&T) -> Gate) -> ByKind<T> {
        let gates: Vec<Gate> = all.iter().map(gate).collect();
        let mut starts = [0; KINDS + 1];
        let mut indexes = Vec::new();
        for kind in 0..KINDS {
            indexes.extend((0..all.len()).filter(|i| gates[*i].admits(kind)).map(|i| i as u32));
            starts[kind + 1] = u32::try_from(indexes.len()).expect("fewer than 2^32 policies or rules");
        }
        ByKind { all, starts, indexes: indexes.into() }
    }

    fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// The items that may match a request of `kind`, in order.
    fn candidates(&self, kind: usize) -> impl Iterator<Item = &T> {
        let range = self.starts[kind] as usize..self.starts[kind + 1] as usize;
        self.indexes[range].iter().map(|i| &self.all[*i as usize])
    }
}

/// One policy's decision counters, `[allow, deny]`, taken from the metric family on first use so
/// that counting costs an increment, not a hash of the labels per request.
type Counters = OnceLock<[Counter; 2]>;

#[derive(Debug)]
struct Policy {
    /// `<namespace>/<name>`.
    name: Arc<str>,
    /// Its rules, indexed by what their gates let through.
    rules: ByKind<Rule>,
    /// What all its rules need (a request none of them lets through skips the policy whole).
    gate: Gate,
    counters: Counters,
}

impl Policy {
    /// Whether any rule matches a request of `kind`; `Unknown` checks count as a match for DENY
    /// and not for ALLOW.
    fn matches(&self, facts: &Facts<'_>, kind: usize, deny: bool) -> bool {
        self.rules.candidates(kind).any(|r| match r.check(facts) {
            Check::Yes => true,
            Check::No => false,
            Check::Unknown => deny,
        })
    }
}

/// The outcome of one set of policies for one connection or request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict<'p> {
    pub allowed: bool,
    /// The policy that decided (`<namespace>/<name>`): the matching DENY or ALLOW policy; `None`
    /// when the request was denied because no ALLOW policy matched.
    pub policy: Option<&'p str>,
}

/// The enforced outcome and the dry-run one; `None` where no policy of that kind selects the
/// workload (then nothing is counted). Borrows the policy's names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Decision<'p> {
    pub enforced: Option<Verdict<'p>>,
    pub dry_run: Option<Verdict<'p>>,
}

impl Decision<'_> {
    pub fn allowed(&self) -> bool {
        self.enforced.as_ref().is_none_or(|v| v.allowed)
    }

    /// The enforced policy that decided, for logs.
    pub fn decided_by(&self) -> Option<&str> {
        self.enforced.and_then(|v| v.policy)
    }
}

impl Policies {
    fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty()
    }

    /// The verdict for a request of `kind`, and the policy that decided (`None`: no policy
    /// matched, allowed with only DENY policies or denied because no ALLOW policy matched).
    fn decide(&self, facts: &Facts<'_>, kind: usize) -> Option<(bool, Option<&Policy>)> {
        if self.is_empty() {
            return None;
        }
        if let Some(p) = self.deny.candidates(kind).find(|p| p.matches(facts, kind, true)) {
            return Some((false, Some(p)));
        }
        if self.allow.is_empty() {
            return Some((true, None));
        }
        Some(match self.allow.candidates(kind).find(|p| p.matches(facts, kind, false)) {
            Some(p) => (true, Some(p)),
            None => (false, None),
        })
    }
}

/// The `policy` label when no policy matched: allowed with only DENY policies, or denied because
/// no ALLOW policy matched.
static NO_POLICY: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(""));

impl Inbound {
    /// The mTLS mode for connections to the app's `port`.
    pub fn mtls(&self, port: u16) -> MtlsMode {
        self.port_mtls.iter().find(|(p, _)| *p == port).map_or(self.mtls, |(_, m)| *m)
    }

    /// Whether any authorization policy (enforced or dry-run) selects the workload: without one
    /// there is nothing to decide or count.
    pub fn authorizes(&self) -> bool {
        !(self.enforced.is_empty() && self.dry_run.is_empty())
    }

    pub fn decide(&self, facts: &Facts<'_>) -> Decision<'_> {
        self.decide_counted(facts, None)
    }

    /// `decide`, counting the outcome in `weft_authz_decisions_total` when `metrics` is given.
    pub fn decide_counted(&self, facts: &Facts<'_>, metrics: Option<&Metrics>) -> Decision<'_> {
        let kind = facts.kind();
        let mut decision = Decision::default();
        for (policies, dry_run) in [(&self.enforced, false), (&self.dry_run, true)] {
            let Some((allowed, policy)) = policies.decide(facts, kind) else { continue };
            if let Some(metrics) = metrics {
                let (name, counters) =
                    policy.map_or((&*NO_POLICY, &policies.unmatched), |p| (&p.name, &p.counters));
                let [allow, deny] = counters.get_or_init(|| metrics.authz_counters(name, dry_run));
                if allowed {
                    allow.inc()
                } else {
                    deny.inc()
                };
            }
            let verdict = Verdict { allowed, policy: policy.map(|p| &*p.name) };
            *if dry_run { &mut decision.dry_run } else { &mut decision.enforced } = Some(verdict);
        }
        decision
    }
}

/// Compiles the operator's inbound policy.
pub fn compile(policy: &pb::InboundPolicy) -> Result<Inbound, Error> {
    // (DENY, ALLOW) policies, in order.
    let mut enforced = (Vec::new(), Vec::new());
    let mut dry_run = (Vec::new(), Vec::new());
    for (i, a) in policy.authorizations.iter().enumerate() {
        let at = format!("inbound.authorizations[{i}]");
        let rules: Vec<Rule> = a
            .rules
            .iter()
            .enumerate()
            .map(|(j, r)| rule(r, &format!("{at}.rules[{j}]")))
            .collect::<Result<_, _>>()?;
        let compiled = Policy {
            name: Arc::from(a.name.as_str()),
            gate: Gate::all(&rules),
            rules: ByKind::new(rules, Rule::gate),
            counters: Counters::new(),
        };
        let (deny, allow) = if a.dry_run { &mut dry_run } else { &mut enforced };
        match pb::authorization::Action::try_from(a.action) {
            Ok(pb::authorization::Action::Allow) => allow.push(compiled),
            Ok(pb::authorization::Action::Deny) => deny.push(compiled),
            Err(_) => return Err(Error::BadAction { at: format!("{at}.action"), value: a.action }),
        }
    }
    let policies = |(deny, allow): (Vec<Policy>, Vec<Policy>)| Policies {
        deny: ByKind::new(deny, |p| p.gate),
        allow: ByKind::new(allow, |p| p.gate),
        unmatched: Counters::new(),
    };
    let (enforced, dry_run) = (policies(enforced), policies(dry_run));
    let port_mtls = policy
        .port_mtls
        .iter()
        .map(|(port, mode)| {
            let p = u16::try_from(*port).ok().filter(|p| *p != 0);
            p.map(|p| (p, MtlsMode::from_pb(*mode)))
                .ok_or_else(|| Error::BadPort { at: "inbound.portMtls".into(), value: port.to_string() })
        })
        .collect::<Result<_, _>>()?;
    Ok(Inbound {
        workload: policy.workload.clone(),
        mtls: MtlsMode::from_pb(policy.mtls_mode),
        port_mtls,
        enforced,
        dry_run,
    })
}

fn rule(r: &pb::AuthorizationRule, at: &str) -> Result<Rule, Error> {
    let from = r
        .from
        .iter()
        .enumerate()
        .map(|(i, s)| source(s, &format!("{at}.from[{i}]")))
        .collect::<Result<_, _>>()?;
    let to =
        r.to.iter()
            .enumerate()
            .map(|(i, o)| operation(o, &format!("{at}.to[{i}]")))
            .collect::<Result<_, _>>()?;
    let when = r
        .when
        .iter()
        .enumerate()
        .map(|(i, c)| condition(c, &format!("{at}.when[{i}]")))
        .collect::<Result<_, _>>()?;
    Ok(Rule::new(from, to, when))
}

fn patterns(any: &[String], none: &[String]) -> Field<Pattern> {
    Field {
        any: any.iter().map(|s| Pattern::parse(s)).collect(),
        none: none.iter().map(|s| Pattern::parse(s)).collect(),
    }
}

fn ip_blocks(any: &[String], none: &[String], at: &str) -> Result<Field<IpBlock>, Error> {
    let parse = |list: &[String]| {
        list.iter()
            .map(|v| {
                IpBlock::parse(v.trim())
                    .ok_or_else(|| Error::BadIpBlock { at: at.to_owned(), value: v.clone() })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(Field { any: parse(any)?, none: parse(none)? })
}

fn ports<T: ToString>(
    any: &[T],
    none: &[T],
    at: &str,
    parse: impl Fn(&T) -> Option<u16>,
) -> Result<Field<u16>, Error> {
    let parse = |list: &[T]| {
        list.iter()
            .map(|v| {
                parse(v)
                    .filter(|p| *p != 0)
                    .ok_or_else(|| Error::BadPort { at: at.to_owned(), value: v.to_string() })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(Field { any: parse(any)?, none: parse(none)? })
}

fn source(s: &pb::PeerMatch, at: &str) -> Result<Source, Error> {
    Ok(Source {
        principals: patterns(&s.principals, &s.not_principals),
        namespaces: patterns(&s.namespaces, &s.not_namespaces),
        ip_blocks: ip_blocks(&s.ip_blocks, &s.not_ip_blocks, &format!("{at}.ipBlocks"))?,
        remote_ip_blocks: ip_blocks(
            &s.remote_ip_blocks,
            &s.not_remote_ip_blocks,
            &format!("{at}.remoteIpBlocks"),
        )?,
    })
}

fn operation(o: &pb::OperationMatch, at: &str) -> Result<Operation, Error> {
    let hosts = |list: &[String]| list.iter().map(|s| HostPattern::parse(s)).collect();
    for p in o.paths.iter().chain(&o.not_paths) {
        if p.contains('{') {
            return Err(Error::PathTemplate { at: format!("{at}.paths"), value: p.clone() });
        }
    }
    Ok(Operation {
        hosts: Field { any: hosts(&o.hosts), none: hosts(&o.not_hosts) },
        ports: ports(&o.ports, &o.not_ports, &format!("{at}.ports"), |p| u16::try_from(*p).ok())?,
        methods: patterns(&o.methods, &o.not_methods),
        paths: patterns(&o.paths, &o.not_paths),
    })
}

fn condition(c: &pb::Condition, at: &str) -> Result<Condition, Error> {
    let key = c.key.trim();
    let values = || patterns(&c.values, &c.not_values);
    let ips = || ip_blocks(&c.values, &c.not_values, &format!("{at}.values"));
    Ok(match key {
        "source.ip" => Condition::SourceIp(ips()?),
        "source.namespace" => Condition::SourceNamespace(values()),
        "source.principal" => Condition::SourcePrincipal(values()),
        "destination.ip" => Condition::DestinationIp(ips()?),
        "destination.port" => {
            Condition::DestinationPort(ports(&c.values, &c.not_values, &format!("{at}.values"), |p| {
                p.trim().parse().ok()
            })?)
        }
        "connection.sni" => Condition::Sni(values()),
        _ => {
            let name = key
                .strip_prefix("request.headers[")
                .and_then(|k| k.strip_suffix(']'))
                .ok_or_else(|| Error::UnknownKey { at: format!("{at}.key"), key: key.to_owned() })?;
            let header = HeaderName::try_from(name)
                .map_err(|_| Error::BadHeaderName { at: format!("{at}.key"), name: name.to_owned() })?;
            Condition::Header(header, values())
        }
    })
}
