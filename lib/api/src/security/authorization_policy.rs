//! AuthorizationPolicy: which peers may call which operations on a workload.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::WorkloadSelector;
use crate::{status::Status, unsupported::Unsupported};

/// The CEL rule for a `when` key: the keys Weft evaluates are request headers
/// (`request.headers[<name>]`), the peer's address, namespace and principal, the destination's
/// address and port, and the TLS SNI. Written without backslashes (the brackets are checked by
/// `startsWith`/`endsWith`) so that it reads the same in CEL, RE2 and Rust's regex.
pub const WHEN_KEY_RULE: &str = "self in ['source.ip', 'source.namespace', 'source.principal', 'destination.ip', 'destination.port', 'connection.sni'] || (self.startsWith('request.headers[') && self.endsWith(']') && self.matches('^request[.]headers.[-0-9A-Za-z_.!#$%&*+^|~]+.$'))";

/// The CEL rule for `ports` and `notPorts`: every entry a port number from 1 to 65535 (the pattern
/// alone lets `0` and `99999` through, and a port that is not one must not turn into "any port").
pub const PORTS_RULE: &str = "self.all(p, p.matches('^[0-9]{1,5}$') && int(p) >= 1 && int(p) <= 65535)";

/// Allows or denies requests to the selected workloads. DENY policies are checked first; then,
/// if any ALLOW policy selects the workload, a request must match one of its rules. An ALLOW
/// policy without rules denies everything.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "security.weft.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    doc = "Which peers may call which operations on the selected workloads.",
    plural = "authorizationpolicies",
    shortname = "ap",
    namespaced,
    status = "Status",
    derive = "PartialEq",
    derive = "Default",
    printcolumn(
        name = "Action",
        type_ = "string",
        json_path = ".spec.action",
        description = "ALLOW or DENY"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::bounded)]
pub struct AuthorizationPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// ALLOW when unset. `AUDIT` and `CUSTOM` are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self != 'AUDIT' && self != 'CUSTOM'").message(kube::core::Message::Expression("'action ' + self + ' is not supported by Weft: use ALLOW or DENY'".into())))]
    pub action: Option<Action>,
    /// A request matches the policy when it matches any rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    // `self::` because the schema derive has its own `Rule` (a CEL rule) in scope.
    pub rules: Vec<self::Rule>,
    /// Not supported by Weft (refused): the external authorizer of a `CUSTOM` policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("provider is not supported by Weft: Weft has no external authorization"))]
    pub provider: Option<Unsupported>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("targetRef is not supported by Weft: select workloads with selector"))]
    pub target_ref: Option<Unsupported>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("false").message("targetRefs is not supported by Weft: select workloads with selector"))]
    pub target_refs: Vec<Unsupported>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    /// Not supported by Weft (refused by the schema).
    Audit,
    /// Not supported by Weft (refused by the schema).
    Custom,
}

/// A request matches a rule when it matches one of `from` (or `from` is empty), one of `to` (or
/// `to` is empty) and every `when` condition.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub from: Vec<From>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub to: Vec<To>,
    /// Conditions that must all hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub when: Vec<Condition>,
}

/// A condition on one attribute of the request or connection: it holds when the attribute matches
/// one of `values` (if set) and none of `notValues`. The keys Weft evaluates are
/// `request.headers[<name>]`, `source.ip`, `source.namespace`, `source.principal`,
/// `destination.ip`, `destination.port` and `connection.sni`; any other key (`request.auth.*`
/// among them) is refused.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.values) || has(self.notValues)").message("when needs values or notValues"))]
pub struct Condition {
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new(WHEN_KEY_RULE).message(kube::core::Message::Expression("'when key ' + self + ' is not supported by Weft: use request.headers[<name>], source.ip, source.namespace, source.principal, destination.ip, destination.port or connection.sni'".into())))]
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 1024)))]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 1024)))]
    pub not_values: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct From {
    pub source: Source,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct To {
    pub operation: Operation,
}

/// The peer. Within one source all set fields must match; each list matches any of its entries.
/// Principals are SPIFFE IDs without the scheme (`cluster.local/ns/default/sa/web`); `*` may
/// stand at the start or end of a principal or namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.principals), has(self.notPrincipals), has(self.namespaces), has(self.notNamespaces), has(self.ipBlocks), has(self.notIpBlocks), has(self.remoteIpBlocks), has(self.notRemoteIpBlocks), has(self.requestPrincipals), has(self.notRequestPrincipals), has(self.serviceAccounts), has(self.notServiceAccounts)].exists(x, x)").message("source needs at least one field"))]
pub struct Source {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 512)))]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 512)))]
    pub not_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 63)))]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 63)))]
    pub not_namespaces: Vec<String>,
    /// Peer addresses or CIDRs (`10.0.0.0/8`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 64)))]
    #[x_kube(validation = Rule::new("self.all(b, isCIDR(b) || isIP(b))").message("ipBlocks entries must be IP addresses or CIDRs"))]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 64)))]
    #[x_kube(validation = Rule::new("self.all(b, isCIDR(b) || isIP(b))").message("notIpBlocks entries must be IP addresses or CIDRs"))]
    pub not_ip_blocks: Vec<String>,
    /// The original client's addresses or CIDRs, as Istio reads them from `X-Forwarded-For`; for
    /// a direct peer the same as `ipBlocks`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 64)))]
    #[x_kube(validation = Rule::new("self.all(b, isCIDR(b) || isIP(b))").message("remoteIpBlocks entries must be IP addresses or CIDRs"))]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 64)))]
    #[x_kube(validation = Rule::new("self.all(b, isCIDR(b) || isIP(b))").message("notRemoteIpBlocks entries must be IP addresses or CIDRs"))]
    pub not_remote_ip_blocks: Vec<String>,
    /// Not supported by Weft (refused): Weft has no request (JWT) authentication.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 512)))]
    #[x_kube(validation = Rule::new("false").message("requestPrincipals is not supported by Weft, which has no request authentication: use principals"))]
    pub request_principals: Vec<String>,
    /// Not supported by Weft (refused): Weft has no request (JWT) authentication.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 512)))]
    #[x_kube(validation = Rule::new("false").message("notRequestPrincipals is not supported by Weft, which has no request authentication: use notPrincipals"))]
    pub not_request_principals: Vec<String>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 320)))]
    #[x_kube(validation = Rule::new("false").message("serviceAccounts is not supported by Weft: use principals"))]
    pub service_accounts: Vec<String>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 320)))]
    #[x_kube(validation = Rule::new("false").message("notServiceAccounts is not supported by Weft: use notPrincipals"))]
    pub not_service_accounts: Vec<String>,
}

/// What is called. Within one operation all set fields must match; each list matches any of its
/// entries. Paths may use `*` at the start or end.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.hosts), has(self.notHosts), has(self.ports), has(self.notPorts), has(self.methods), has(self.notMethods), has(self.paths), has(self.notPaths)].exists(x, x)").message("operation needs at least one field"))]
pub struct Operation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 253)))]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 253)))]
    pub not_hosts: Vec<String>,
    /// Port numbers (1-65535) as strings, as in Istio.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 5), regex(pattern = r"^[0-9]+$")))]
    #[x_kube(validation = Rule::new(PORTS_RULE).message("ports entries must be port numbers from 1 to 65535"))]
    pub ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 5), regex(pattern = r"^[0-9]+$")))]
    #[x_kube(validation = Rule::new(PORTS_RULE).message("notPorts entries must be port numbers from 1 to 65535"))]
    pub not_ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 32)))]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 32)))]
    pub not_methods: Vec<String>,
    /// Exact, or with `*` at the start or end; Istio's path templates (`{*}`, `{**}`) are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 1024)))]
    #[x_kube(validation = Rule::new("self.all(p, !p.contains('{'))").message("paths templates ({*}, {**}) are not supported by Weft: use * at the start or end"))]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 1024)))]
    #[x_kube(validation = Rule::new("self.all(p, !p.contains('{'))").message("notPaths templates ({*}, {**}) are not supported by Weft: use * at the start or end"))]
    pub not_paths: Vec<String>,
}
