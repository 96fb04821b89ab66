//! DestinationRule: subsets of one host and the traffic policy used to reach it.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::PortSelector;
use crate::{Duration, status::Status, unsupported::Unsupported};

/// Policy applied after routing has chosen `host`: load balancing, connection limits, outlier
/// ejection, and named subsets of its endpoints.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "networking.weft.dev",
    version = "v1alpha1",
    kind = "DestinationRule",
    doc = "Subsets of one host and the traffic policy used to reach it.",
    plural = "destinationrules",
    shortname = "dr",
    namespaced,
    status = "Status",
    derive = "PartialEq",
    derive = "Default",
    printcolumn(
        name = "Host",
        type_ = "string",
        json_path = ".spec.host",
        description = "The service this applies to"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::bounded)]
pub struct DestinationRuleSpec {
    /// The service: a short name resolved in this namespace, or a fully qualified name.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
    /// Named groups of the host's endpoints, selected by pod labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub subsets: Vec<Subset>,
    /// The namespaces that see this rule: only `*` (every namespace, which is what Weft does) is
    /// accepted; narrower visibility is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 253)))]
    #[x_kube(validation = Rule::new("self.all(n, n == '*')").message("exportTo other than '*' is not supported by Weft: the rule applies in every namespace"))]
    pub export_to: Vec<String>,
    /// Not supported by Weft (refused): the rule applies to every client of the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("workloadSelector is not supported by Weft: the rule applies to every client of the host"))]
    pub workload_selector: Option<Unsupported>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    /// Referred to by `destination.subset` in a VirtualService.
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::schema::DNS_LABEL_PATTERN))]
    pub name: String,
    /// Endpoints whose pods carry all these labels belong to the subset.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    pub labels: BTreeMap<String, String>,
    /// Overrides the rule's policy for this subset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPoolSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTlsSettings>,
    /// Overrides for single ports of the host. An entry replaces the whole policy for its port:
    /// what it leaves out takes the defaults, not the values above (as in Istio).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self.all(p, self.exists_one(q, q.port.number == p.port.number))").message("portLevelSettings must name each port once"))]
    pub port_level_settings: Vec<PortTrafficPolicy>,
    /// Caps the retries sent to the host. Unset: retries may add 20% to the requests of the last
    /// 10s, plus 3 per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudget>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("tunnel is not supported by Weft"))]
    pub tunnel: Option<Unsupported>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("proxyProtocol is not supported by Weft"))]
    pub proxy_protocol: Option<Unsupported>,
}

/// The policy for one port of the host.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    /// The service port this applies to.
    pub port: PortSelector,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPoolSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTlsSettings>,
}

/// How requests are spread over the host's endpoints: one algorithm (`simple`) or sticky
/// sessions (`consistentHash`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.simple) || !has(self.consistentHash)").message("loadBalancer takes simple or consistentHash, not both"))]
pub struct LoadBalancerSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simple: Option<SimpleLb>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHashLb>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("localityLbSetting is not supported by Weft: endpoints are balanced without regard to locality"))]
    pub locality_lb_setting: Option<Unsupported>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("zoneAwareLbSetting is not supported by Weft: endpoints are balanced without regard to locality"))]
    pub zone_aware_lb_setting: Option<Unsupported>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("warmupDurationSecs is not supported by Weft: new endpoints get their share of requests at once"))]
    pub warmup_duration_secs: Option<Duration>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("warmup is not supported by Weft: new endpoints get their share of requests at once"))]
    pub warmup: Option<Unsupported>,
}

/// Load-balancing algorithms. `UNSPECIFIED` is Weft's default: power of two choices over
/// latency (peak EWMA) weighted by pending requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLb {
    Unspecified,
    Random,
    RoundRobin,
    LeastRequest,
}

/// Sticky sessions: requests with the same key go to the same endpoint while the endpoints stay
/// the same. Exactly one key: a header, a cookie, the source IP or a query parameter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.httpHeaderName), has(self.httpCookie), has(self.useSourceIp) && self.useSourceIp, has(self.httpQueryParameterName)].filter(x, x).size() == 1").message("consistentHash needs exactly one of httpHeaderName, httpCookie, useSourceIp: true or httpQueryParameterName"))]
pub struct ConsistentHashLb {
    /// Hash the value of this request header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"))]
    pub http_header_name: Option<String>,
    /// Hash the value of this cookie; with a `ttl`, the proxy sets the cookie when a request lacks
    /// it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_cookie: Option<HttpCookie>,
    /// Hash the client's IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_source_ip: Option<bool>,
    /// Hash the value of this query parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub http_query_parameter_name: Option<String>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("ringHash is not supported by Weft: the hash ring is not tunable"))]
    pub ring_hash: Option<Unsupported>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("maglev is not supported by Weft: the hash ring is not tunable"))]
    pub maglev: Option<Unsupported>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("minimumRingSize is not supported by Weft: the hash ring is not tunable"))]
    pub minimum_ring_size: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
pub struct HttpCookie {
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"))]
    pub name: String,
    /// The cookie's `Path` when the proxy sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub path: Option<String>,
    /// Lifetime of a cookie the proxy sets. Unset or `0s`: the proxy never sets one, and requests
    /// without the cookie are balanced by the default algorithm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("false").message("httpCookie.attributes is not supported by Weft"))]
    pub attributes: Vec<Unsupported>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ConnectionPoolSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSettings>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TcpSettings {
    /// Connections open at once to the whole host (all endpoints together); unlimited when
    /// unset. A request that would need one more is answered 503 at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections: Option<i32>,
    /// 10s when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,
    /// Close connections idle this long; 1h when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("maxConnectionDuration is not supported by Weft: connections are closed when idle (idleTimeout), never by age"))]
    pub max_connection_duration: Option<Duration>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("tcpKeepalive is not supported by Weft"))]
    pub tcp_keepalive: Option<Unsupported>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpSettings {
    /// Requests waiting for a connection to the host; unlimited when unset. One more is answered
    /// 503 at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub http1_max_pending_requests: Option<i32>,
    /// Requests in flight to the host; unlimited when unset. One more is answered 503 at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub http2_max_requests: Option<i32>,
    /// Requests per connection before it is closed; 0 or unset means unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_requests_per_connection: Option<i32>,
    /// Retries in flight to the host; 0 or unset means unlimited (the retry budget still applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_retries: Option<i32>,
    /// Close connections without requests for this long; 1h when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h2_upgrade_policy: Option<H2UpgradePolicy>,
    /// Not supported by Weft when true (refused): the proxy picks the upstream protocol itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("!self").message("useClientProtocol: true is not supported by Weft"))]
    pub use_client_protocol: Option<bool>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("maxConcurrentStreams is not supported by Weft: use http2MaxRequests to limit requests in flight"))]
    pub max_concurrent_streams: Option<i32>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("http2KeepAlive is not supported by Weft"))]
    pub http2_keep_alive: Option<Unsupported>,
}

/// Whether HTTP/1.1 requests travel as HTTP/2 between proxies, multiplexed over one tunnel per
/// endpoint (`UPGRADE`), or over HTTP/1.1 tunnels (`DO_NOT_UPGRADE`, and `DEFAULT`). Both ends
/// are Weft proxies, so the apps see HTTP/1.1 either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum H2UpgradePolicy {
    Default,
    DoNotUpgrade,
    Upgrade,
}

/// Passive health checking: endpoints that keep failing are ejected for a while. Ejection is per
/// endpoint (pod address), whichever subset or route the failures came through.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive 5xx responses (or connection failures) that eject an endpoint; 5 when unset,
    /// 0 disables.
    #[serde(default, rename = "consecutive5xxErrors", skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub consecutive_5xx_errors: Option<u32>,
    /// Consecutive 502/503/504 responses that eject an endpoint; off when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub consecutive_gateway_errors: Option<u32>,
    /// How often ejections are evaluated; 10s when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// Ejection time, multiplied by the number of ejections; 30s when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<Duration>,
    /// At most this share of endpoints is ejected at once; 10 when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub max_ejection_percent: Option<i32>,
    /// Ejection stops while fewer than this share of endpoints is healthy; 0 when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub min_health_percent: Option<i32>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("consecutiveErrors is not supported by Weft (deprecated in Istio): use consecutive5xxErrors or consecutiveGatewayErrors"))]
    pub consecutive_errors: Option<i32>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("consecutiveLocalOriginFailures is not supported by Weft: connection failures count as 5xx errors"))]
    pub consecutive_local_origin_failures: Option<u32>,
    /// Not supported by Weft when true (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("!self").message("splitExternalLocalOriginErrors: true is not supported by Weft: connection failures count as 5xx errors"))]
    pub split_external_local_origin_errors: Option<bool>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("false").message("outlierDetectionHttpErrorCodes is not supported by Weft: use consecutive5xxErrors or consecutiveGatewayErrors"))]
    pub outlier_detection_http_error_codes: Vec<u32>,
}

/// Caps retries to the host as a share of its requests, so that retries cannot multiply an
/// outage. Weft budgets by rate over a window (like Linkerd), not by concurrency (like Envoy).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    /// Retries may add at most this share (0-100) of the requests sent over `budgetInterval`;
    /// 20 when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: Option<f64>,
    /// Retries always allowed per second, whatever the share (Weft's own field); 3 when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000))]
    pub min_retries_per_second: Option<u32>,
    /// The window over which requests and retries are counted; 10s when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('[1-9]')").message("budgetInterval must be longer than 0s"))]
    pub budget_interval: Option<Duration>,
    /// Not supported by Weft (refused): Istio's minimum number of concurrent retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("minRetryConcurrency is not supported by Weft, which budgets retries by rate, not concurrency: use minRetriesPerSecond"))]
    pub min_retry_concurrency: Option<u32>,
}

/// TLS towards the host. Traffic between meshed pods uses mesh mTLS automatically; this exists
/// so that Istio manifests saying `ISTIO_MUTUAL` keep working, and to turn mTLS off for a host.
/// TLS origination (`SIMPLE`, `MUTUAL`) and every setting that tunes it are refused.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode != 'SIMPLE' && self.mode != 'MUTUAL'").message(kube::core::Message::Expression("'tls.mode ' + self.mode + ' (TLS origination) is not supported by Weft: use ISTIO_MUTUAL (mesh mTLS) or DISABLE'".into())))]
pub struct ClientTlsSettings {
    pub mode: TlsMode,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("false").message("tls.clientCertificate is not supported by Weft: mesh mTLS uses the workload's own certificate"))]
    pub client_certificate: Option<String>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("false").message("tls.privateKey is not supported by Weft: mesh mTLS uses the workload's own key"))]
    pub private_key: Option<String>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("false").message("tls.caCertificates is not supported by Weft: mesh mTLS trusts the mesh CA"))]
    pub ca_certificates: Option<String>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("false").message("tls.credentialName is not supported by Weft: mesh mTLS uses the workload's own certificate"))]
    pub credential_name: Option<String>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 512)))]
    #[x_kube(validation = Rule::new("false").message("tls.subjectAltNames is not supported by Weft: mesh mTLS checks the identity the control plane names for each endpoint"))]
    pub subject_alt_names: Vec<String>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("false").message("tls.sni is not supported by Weft: mesh mTLS chooses the SNI itself"))]
    pub sni: Option<String>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("false").message("tls.insecureSkipVerify is not supported by Weft: mesh mTLS always verifies the peer"))]
    pub insecure_skip_verify: Option<bool>,
    /// Not supported by Weft (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("false").message("tls.caCrl is not supported by Weft"))]
    pub ca_crl: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    /// Plain text to the host.
    Disable,
    /// Not supported by Weft (refused): TLS origination with the CA certificates given.
    Simple,
    /// Not supported by Weft (refused): TLS origination with a client certificate.
    Mutual,
    /// Mesh mTLS with workload certificates (the default between meshed pods).
    #[default]
    IstioMutual,
}
