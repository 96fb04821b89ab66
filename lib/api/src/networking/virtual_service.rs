//! VirtualService: how requests to a set of hosts are matched and routed.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Destination, Headers, Percent, StringMatch};
use crate::{Duration, status::Status, unsupported::Unsupported};

/// The CEL rule and message for Istio's `gateways` lists: only `mesh` (the sidecars, which is all
/// Weft has) is accepted.
const MESH_ONLY: &str = "self.all(g, g == 'mesh')";

/// Routing rules for requests addressed to `hosts`. The first `http` rule whose `match` accepts a
/// request decides where it goes.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "networking.weft.dev",
    version = "v1alpha1",
    kind = "VirtualService",
    doc = "Routing for requests to a set of hosts: matches, weighted splits, retries, timeouts, faults, mirroring.",
    plural = "virtualservices",
    shortname = "vs",
    namespaced,
    status = "Status",
    derive = "PartialEq",
    derive = "Default",
    printcolumn(
        name = "Hosts",
        type_ = "string",
        json_path = ".spec.hosts",
        description = "The hosts this routes"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::bounded)]
pub struct VirtualServiceSpec {
    /// The destinations these rules apply to: service short names, fully qualified names.
    #[schemars(length(min = 1, max = 16), inner(length(min = 1, max = 253)))]
    pub hosts: Vec<String>,
    /// HTTP and gRPC rules, tried in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub http: Vec<HttpRoute>,
    /// Rules for opaque TCP traffic, tried in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub tcp: Vec<TcpRoute>,
    /// Where the rules apply: only `mesh` (the proxies beside the workloads, Istio's meaning) is
    /// accepted, which is also what an empty list means. Other names are refused: Weft has no
    /// gateways yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 253)))]
    #[x_kube(validation = Rule::new(MESH_ONLY).message("gateways naming anything but mesh is not supported by Weft, which has no gateways yet"))]
    pub gateways: Vec<String>,
    /// The namespaces that see these rules: only `*` (every namespace, which is what Weft does) is
    /// accepted; narrower visibility is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 253)))]
    #[x_kube(validation = Rule::new("self.all(n, n == '*')").message("exportTo other than '*' is not supported by Weft: the rules apply in every namespace"))]
    pub export_to: Vec<String>,
    /// Not supported by Weft (refused): rules for TLS connections by SNI.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("false").message("tls (routes by SNI) is not supported by Weft: route TLS traffic with tcp rules by port"))]
    pub tls: Vec<Unsupported>,
}

/// One HTTP rule: conditions, and exactly one action (route, redirect or direct response).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.route), has(self.redirect), has(self.directResponse)].filter(x, x).size() == 1").message("exactly one of route, redirect or directResponse must be set"))]
#[x_kube(validation = Rule::new("!has(self.rewrite) || !has(self.redirect)").message("rewrite cannot be combined with redirect"))]
#[x_kube(validation = Rule::new("!has(self.mirrors) || !(has(self.mirror) || has(self.mirrorPercentage) || has(self.mirrorPercent))").message("mirrors cannot be combined with mirror, mirrorPercentage or mirrorPercent"))]
#[x_kube(validation = Rule::new("!has(self.mirrorPercentage) || !has(self.mirrorPercent)").message("mirrorPercentage and mirrorPercent cannot both be set"))]
pub struct HttpRoute {
    /// A name for logs and metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub name: Option<String>,
    /// Alternatives: the rule applies when any one matches. Empty matches every request.
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub matches: Vec<HttpMatchRequest>,
    /// Weighted destinations. When any weight is set, the weights must sum to 100.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("!self.exists(d, has(d.weight)) || self.map(d, has(d.weight) ? d.weight : 0).sum() == 100").message("route weights must sum to 100"))]
    pub route: Vec<HttpRouteDestination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<HttpRedirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<HttpDirectResponse>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<HttpRewrite>,
    /// Deadline for the whole request, retries included. Unset means no deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<HttpRetry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<HttpFaultInjection>,
    /// Also send a copy of each request here; its responses are discarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Destination>,
    /// The share of requests mirrored; absent means 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_percentage: Option<Percent>,
    /// The share of requests mirrored as a whole number (deprecated in Istio; use
    /// `mirrorPercentage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub mirror_percent: Option<u32>,
    /// Istio's list of mirrors: Weft takes at most one entry, the same as `mirror`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self.size() <= 1").message("mirrors with more than one entry is not supported by Weft: a route mirrors to one destination"))]
    pub mirrors: Vec<HttpMirrorPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("delegate is not supported by Weft: write the routes in this VirtualService"))]
    pub delegate: Option<Unsupported>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("corsPolicy is not supported by Weft: answer CORS requests in the application"))]
    pub cors_policy: Option<Unsupported>,
}

/// Conditions on one request; all that are set must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatchRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub name: Option<String>,
    /// The request path, without the query string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<StringMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<StringMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<StringMatch>,
    /// The `Host`/`:authority` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<StringMatch>,
    /// Header name (lowercase) to condition.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    pub headers: BTreeMap<String, StringMatch>,
    /// Headers that must not match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    pub without_headers: BTreeMap<String, StringMatch>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    pub query_params: BTreeMap<String, StringMatch>,
    /// The destination port the client used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u32>,
    /// Match `uri` case-insensitively.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore_uri_case: Option<bool>,
    /// Only `mesh` is accepted, as for the VirtualService's `gateways`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 253)))]
    #[x_kube(validation = Rule::new(MESH_ONLY).message("gateways naming anything but mesh is not supported by Weft, which has no gateways yet"))]
    pub gateways: Vec<String>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    #[x_kube(validation = Rule::new("false").message("sourceLabels is not supported by Weft: a route cannot depend on the calling workload"))]
    pub source_labels: BTreeMap<String, String>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    #[x_kube(validation = Rule::new("false").message("sourceNamespace is not supported by Weft: a route cannot depend on the calling workload"))]
    pub source_namespace: Option<String>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("statPrefix is not supported by Weft"))]
    pub stat_prefix: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HttpRouteDestination {
    pub destination: Destination,
    /// Share of traffic in percent. A lone destination without a weight gets all traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub weight: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
}

/// Answers with a redirect instead of forwarding.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRedirect {
    /// Replaces the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub uri: Option<String>,
    /// Replaces the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub authority: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<RedirectScheme>,
    /// 301 when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = [301, 302, 303, 307, 308]))]
    pub redirect_code: Option<u32>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("derivePort is not supported by Weft: set port, or leave it out to keep the request's port"))]
    pub derive_port: Option<String>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("false").message("prefixRewrite is not supported by Weft: set uri to replace the whole path"))]
    pub prefix_rewrite: Option<String>,
    /// Istio's protobuf spelling of `prefixRewrite`, which Istio's own examples use; refused the
    /// same way.
    #[serde(default, rename = "prefix_rewrite", skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("false").message("prefix_rewrite (prefixRewrite) is not supported by Weft: set uri to replace the whole path"))]
    pub prefix_rewrite_proto: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RedirectScheme {
    Http,
    Https,
}

/// Answers with a fixed response instead of forwarding.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HttpDirectResponse {
    #[schemars(range(min = 200, max = 599))]
    pub status: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<HttpBody>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
pub struct HttpBody {
    #[schemars(length(max = 4096))]
    pub string: String,
    /// Not supported by Weft (refused): a binary body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8192))]
    #[x_kube(validation = Rule::new("false").message("body.bytes is not supported by Weft: use body.string"))]
    pub bytes: Option<String>,
}

/// Changes the request before it is forwarded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRewrite {
    /// Replaces the part of the path matched by a `prefix` match (or the whole path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub uri: Option<String>,
    /// Replaces the `Host`/`:authority` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub authority: Option<String>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("uriRegexRewrite is not supported by Weft: use uri"))]
    pub uri_regex_rewrite: Option<Unsupported>,
}

/// One entry of `mirrors`: where copies go and the share of requests copied.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HttpMirrorPolicy {
    pub destination: Destination,
    /// Absent means 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
}

/// The conditions `retryOn` accepts.
pub const RETRY_ON_PATTERN: &str = "^(5xx|gateway-error|reset|connect-failure|refused-stream|retriable-4xx|retriable-status-codes|cancelled|deadline-exceeded|internal|resource-exhausted|unavailable|[1-5][0-9][0-9])(,(5xx|gateway-error|reset|connect-failure|refused-stream|retriable-4xx|retriable-status-codes|cancelled|deadline-exceeded|internal|resource-exhausted|unavailable|[1-5][0-9][0-9]))*$";

/// Retries for failed requests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRetry {
    /// Retries after the first try; 0 disables retries.
    #[schemars(range(min = 0, max = 10))]
    pub attempts: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    /// Comma-separated conditions: `5xx`, `gateway-error`, `reset`, `connect-failure`,
    /// `refused-stream`, `retriable-4xx`, `retriable-status-codes`, the gRPC statuses
    /// `cancelled`, `deadline-exceeded`, `internal`, `resource-exhausted`, `unavailable`, and HTTP
    /// status codes. Unset: Istio's default, `connect-failure,refused-stream,unavailable,
    /// cancelled` and 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    #[x_kube(validation = Rule::new(format!("self.matches('{RETRY_ON_PATTERN}')")).message("retryOn must be a comma-separated list of 5xx, gateway-error, reset, connect-failure, refused-stream, retriable-4xx, retriable-status-codes, cancelled, deadline-exceeded, internal, resource-exhausted, unavailable or HTTP status codes; other conditions are not supported by Weft"))]
    pub retry_on: Option<String>,
    /// Base of the exponential backoff between tries; 25ms when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Duration>,
    /// Not supported by Weft when true (refused): Weft has no localities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("!self").message("retryRemoteLocalities: true is not supported by Weft"))]
    pub retry_remote_localities: Option<bool>,
    /// A retry goes to another endpoint when one exists; `false` is not supported (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self").message("retryIgnorePreviousHosts: false is not supported by Weft: a retry always goes to another endpoint when one exists"))]
    pub retry_ignore_previous_hosts: Option<bool>,
}

/// Faults injected on the client side, for testing resilience.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.delay) || has(self.abort)").message("fault needs a delay or an abort"))]
pub struct HttpFaultInjection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.fixedDelay) || has(self.exponentialDelay)").message("delay requires fixedDelay"))]
#[x_kube(validation = Rule::new("!has(self.percentage) || !has(self.percent)").message("percentage and percent cannot both be set"))]
pub struct FaultDelay {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed_delay: Option<Duration>,
    /// Share of requests delayed; absent means 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
    /// Share of requests delayed as a whole number (deprecated in Istio; use `percentage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub percent: Option<i32>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("exponentialDelay is not supported by Weft: use fixedDelay"))]
    pub exponential_delay: Option<Duration>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.httpStatus), has(self.grpcStatus), has(self.http2Error)].filter(x, x).size() == 1").message("abort requires exactly one of httpStatus or grpcStatus"))]
pub struct FaultAbort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 200, max = 599))]
    pub http_status: Option<i32>,
    /// A gRPC status name such as `UNAVAILABLE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<GrpcStatus>,
    /// Share of requests aborted; absent means 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("http2Error is not supported by Weft: use httpStatus or grpcStatus"))]
    pub http2_error: Option<String>,
}

/// gRPC status codes by their canonical names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum GrpcStatus {
    Cancelled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

/// A rule for opaque TCP connections.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
pub struct TcpRoute {
    /// Alternatives: the rule applies when any one matches. Empty matches every connection.
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub matches: Vec<L4MatchAttributes>,
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(validation = Rule::new("!self.exists(d, has(d.weight)) || self.map(d, has(d.weight) ? d.weight : 0).sum() == 100").message("route weights must sum to 100"))]
    pub route: Vec<RouteDestination>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct L4MatchAttributes {
    /// The destination port the client used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u32>,
    /// Only `mesh` is accepted, as for the VirtualService's `gateways`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 253)))]
    #[x_kube(validation = Rule::new(MESH_ONLY).message("gateways naming anything but mesh is not supported by Weft, which has no gateways yet"))]
    pub gateways: Vec<String>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new("false").message("destinationSubnets is not supported by Weft: match by port"))]
    pub destination_subnets: Vec<String>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    #[x_kube(validation = Rule::new("false").message("sourceLabels is not supported by Weft: a route cannot depend on the calling workload"))]
    pub source_labels: BTreeMap<String, String>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    #[x_kube(validation = Rule::new("false").message("sourceNamespace is not supported by Weft: a route cannot depend on the calling workload"))]
    pub source_namespace: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RouteDestination {
    pub destination: Destination,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub weight: Option<i32>,
}
