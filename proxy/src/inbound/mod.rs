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
use rules::{Condition, Field, Gate, HostPattern, IpBlock, Operation, Pattern, Rule, Source};
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
    deny: ByIdentity<Policy>,
    allow: ByIdentity<Policy>,
    /// The counters of "no ALLOW policy matched" (`policy=""`).
    unmatched: Counters,
}

/// Items in order, and the indexes of those a request without an identity (plain text) can
/// match: such a request walks only those, so policies and rules that name principals or
/// namespaces cost it nothing.
#[derive(Debug)]
struct ByIdentity<T> {
    all: Vec<T>,
    plain: Vec<usize>,
}

impl<T> Default for ByIdentity<T> {
    fn default() -> Self {
        ByIdentity { all: Vec::new(), plain: Vec::new() }
    }
}

impl<T> ByIdentity<T> {
    fn push(&mut self, item: T, needs_identity: bool) {
        if !needs_identity {
            self.plain.push(self.all.len());
        }
        self.all.push(item);
    }

    fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// The items that may match `facts`, in order.
    fn candidates<'a>(&'a self, facts: &Facts<'_>) -> impl Iterator<Item = &'a T> {
        let plain = facts.principal.is_none();
        let n = if plain { self.plain.len() } else { self.all.len() };
        (0..n).map(move |i| &self.all[if plain { self.plain[i] } else { i }])
    }
}

/// One policy's decision counters, `[allow, deny]`, taken from the metric family on first use so
/// that counting costs an increment, not a hash of the labels per request.
type Counters = OnceLock<[Counter; 2]>;

#[derive(Debug)]
struct Policy {
    /// `<namespace>/<name>`.
    name: Arc<str>,
    rules: ByIdentity<Rule>,
    /// What all its rules need: most requests a policy does not match skip it here.
    gate: Gate,
    counters: Counters,
}

impl Policy {
    /// Whether any rule matches; `Unknown` checks count as a match for DENY and not for ALLOW.
    fn matches(&self, facts: &Facts<'_>, deny: bool) -> bool {
        if self.gate.rejects(facts) {
            return false;
        }
        self.rules.candidates(facts).any(|r| match r.check(facts) {
            Check::Yes => true,
            Check::No => false,
            Check::Unknown => deny,
        })
    }
}

/// The outcome of one set of policies for one connection or request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// The policy that decided: the matching DENY or ALLOW policy; `None` when the request was
    /// denied because no ALLOW policy matched.
    pub policy: Option<Arc<str>>,
}

/// The enforced outcome and the dry-run one; `None` where no policy of that kind selects the
/// workload (then nothing is counted).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    pub enforced: Option<Verdict>,
    pub dry_run: Option<Verdict>,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.enforced.as_ref().is_none_or(|v| v.allowed)
    }

    /// The enforced policy that decided, for logs.
    pub fn decided_by(&self) -> Option<&str> {
        self.enforced.as_ref().and_then(|v| v.policy.as_deref())
    }
}

impl Policies {
    fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty()
    }

    /// The verdict, and the policy name and counters it counts in.
    fn decide(&self, facts: &Facts<'_>) -> Option<(Verdict, (&Arc<str>, &Counters))> {
        if self.is_empty() {
            return None;
        }
        let unmatched = |allowed| (Verdict { allowed, policy: None }, (&*NO_POLICY, &self.unmatched));
        if let Some(p) = self.deny.candidates(facts).find(|p| p.matches(facts, true)) {
            return Some(decided_by(false, p));
        }
        if self.allow.is_empty() {
            return Some(unmatched(true));
        }
        Some(match self.allow.candidates(facts).find(|p| p.matches(facts, false)) {
            Some(p) => decided_by(true, p),
            None => unmatched(false),
        })
    }
}

/// A verdict decided by policy `p`.
fn decided_by(allowed: bool, p: &Policy) -> (Verdict, (&Arc<str>, &Counters)) {
    (Verdict { allowed, policy: Some(p.name.clone()) }, (&p.name, &p.counters))
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

    pub fn decide(&self, facts: &Facts<'_>) -> Decision {
        self.decide_counted(facts, None)
    }

    /// `decide`, counting the outcome in `weft_authz_decisions_total` when `metrics` is given.
    pub fn decide_counted(&self, facts: &Facts<'_>, metrics: Option<&Metrics>) -> Decision {
        let mut decision = Decision::default();
        for (policies, dry_run) in [(&self.enforced, false), (&self.dry_run, true)] {
            let Some((verdict, counters)) = policies.decide(facts) else { continue };
            if let (Some(metrics), (name, counters)) = (metrics, counters) {
                let [allow, deny] = counters.get_or_init(|| metrics.authz_counters(name, dry_run));
                if verdict.allowed {
                    allow.inc()
                } else {
                    deny.inc()
                };
            }
            *if dry_run { &mut decision.dry_run } else { &mut decision.enforced } = Some(verdict);
        }
        decision
    }
}

/// Compiles the operator's inbound policy.
pub fn compile(policy: &pb::InboundPolicy) -> Result<Inbound, Error> {
    let mut enforced = Policies::default();
    let mut dry_run = Policies::default();
    for (i, a) in policy.authorizations.iter().enumerate() {
        let at = format!("inbound.authorizations[{i}]");
        let rules: Vec<Rule> = a
            .rules
            .iter()
            .enumerate()
            .map(|(j, r)| rule(r, &format!("{at}.rules[{j}]")))
            .collect::<Result<_, _>>()?;
        let gate = Gate::all(&rules);
        let mut by_identity = ByIdentity::default();
        for r in rules {
            let needs = r.needs_identity();
            by_identity.push(r, needs);
        }
        let compiled =
            Policy { name: Arc::from(a.name.as_str()), gate, rules: by_identity, counters: Counters::new() };
        let set = if a.dry_run { &mut dry_run } else { &mut enforced };
        match pb::authorization::Action::try_from(a.action) {
            Ok(pb::authorization::Action::Allow) => set.allow.push(compiled, gate.needs_identity()),
            Ok(pb::authorization::Action::Deny) => set.deny.push(compiled, gate.needs_identity()),
            Err(_) => return Err(Error::BadAction { at: format!("{at}.action"), value: a.action }),
        }
    }
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
