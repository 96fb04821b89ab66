//! Prometheus metrics. Label sets are bounded: services come from the config (or a fixed
//! `unknown`/`passthrough`), codes are numbers, and raw paths or hosts are never labels.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{
    http::{Direction, flags::Flags},
    peer::Peer,
};

/// Request latency buckets, in seconds (0.5 ms to 30 s).
const BUCKETS: [f64; 15] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: &'static str,
    #[prometheus(flatten)]
    pub peers: PeerLabels,
    pub destination_service: Arc<str>,
    pub response_code: u16,
    pub grpc_status: String,
    pub tls: bool,
    /// Envoy's flags for what the proxy did (`UF`, `UO`, `FI`, ...); empty for a plain answer.
    pub response_flags: Flags,
}

/// One destination (`service|subset|port`) and what happened: a bounded set, as clusters come
/// from the config.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: Arc<str>,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterOnlyLabels {
    pub cluster: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub direction: &'static str,
    #[prometheus(flatten)]
    pub peers: PeerLabels,
    pub destination_service: Arc<str>,
    pub tls: bool,
}

/// Who talked to whom. Values come from identities (bounded by the mesh's service accounts) and
/// the config's workload names; an unknown side is empty.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub source_workload: Arc<str>,
    pub source_namespace: Arc<str>,
    pub source_principal: Arc<str>,
    pub destination_workload: Arc<str>,
    pub destination_namespace: Arc<str>,
    pub destination_principal: Arc<str>,
}

impl PeerLabels {
    /// `local` is this proxy's workload; `downstream` the client proxy of a mesh tunnel;
    /// `upstream` the endpoint the request or connection went to. The client side is the tunnel's
    /// peer, else this workload; the server side is the endpoint when the config describes it,
    /// else this workload for traffic to the local app (inbound, or out of a tunnel), else
    /// unknown.
    pub fn new(
        direction: Direction,
        local: &Peer,
        downstream: Option<&Peer>,
        upstream: Option<&Peer>,
    ) -> Self {
        let source = downstream.unwrap_or(local);
        let described = upstream.filter(|p| p.identity.is_some() || !p.workload.is_empty());
        // Traffic that arrived through a tunnel or on the inbound listener is for the local app.
        let for_local = direction == Direction::Inbound || downstream.is_some();
        let destination = described.or(for_local.then_some(local));
        let empty = Arc::<str>::default;
        PeerLabels {
            source_workload: source.workload.clone(),
            source_namespace: source.namespace.clone(),
            source_principal: source.principal.clone(),
            destination_workload: destination.map_or_else(empty, |p| p.workload.clone()),
            destination_namespace: destination.map_or_else(empty, |p| p.namespace.clone()),
            destination_principal: destination.map_or_else(empty, |p| p.principal.clone()),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: &'static str,
}

type HistogramFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: HistogramFamily,
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpLabels, Counter>,
    pub tcp_sent_bytes: Family<TcpLabels, Counter>,
    pub tcp_received_bytes: Family<TcpLabels, Counter>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub connections_rejected: Family<ListenerLabels, Counter>,
    pub connections_active: Family<ListenerLabels, Gauge>,
    /// HTTP/1 connections waiting for their next request parked, holding no buffers.
    pub connections_parked: Gauge,
    /// Times hyper let go of an idle HTTP/1 connection (each one then waits parked, or goes
    /// straight back to hyper with the start of its next request).
    pub http1_parks: Counter,
    pub access_log_dropped: Counter,
    pub identity_reloads: Family<ResultLabels, Counter>,
    /// When this proxy's certificate expires (Unix seconds; 0 without one).
    pub identity_expiry: Gauge,
    pub tls_handshakes: Family<HandshakeLabels, Counter>,
    /// Retries by result: `sent`, `budget_exhausted`, `overflow`, `not_replayable`.
    pub retries: Family<ClusterLabels, Counter>,
    /// Mirrored copies by result: `sent`, `dropped` (too many in flight), `failed`.
    pub mirrors: Family<ClusterLabels, Counter>,
    /// Requests answered at once because a connection-pool limit was reached.
    pub overflows: Family<ClusterLabels, Counter>,
    pub ejections: Family<ClusterOnlyLabels, Counter>,
    pub ejected: Family<ClusterOnlyLabels, Gauge>,
    /// Inbound connections refused by the mTLS mode, by reason.
    pub inbound_refused: Family<ReasonLabels, Counter>,
    /// Authorization decisions (HTTP requests and TCP connections) by deciding policy.
    pub authz: Family<AuthzLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    /// `<namespace>/<name>` of the policy that decided; empty when no ALLOW policy matched.
    pub policy: Arc<str>,
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// Whether the policy is a dry run (counted, not enforced).
    pub dry_run: bool,
}

impl Metrics {
    /// The `[allow, deny]` decision counters of one policy (`""`: none matched).
    pub fn authz_counters(&self, policy: &Arc<str>, dry_run: bool) -> [Counter; 2] {
        ["allow", "deny"].map(|decision| {
            let labels = AuthzLabels { policy: policy.clone(), decision, dry_run };
            self.authz.get_or_create(&labels).clone()
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `accept` (a tunnel from a peer) or `connect` (to an endpoint).
    pub side: &'static str,
    pub result: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::default();
        let request_duration: HistogramFamily = Family::new_with_constructor(|| Histogram::new(BUCKETS));
        let tcp_opened = Family::default();
        let tcp_closed = Family::default();
        let tcp_sent_bytes = Family::default();
        let tcp_received_bytes = Family::default();
        let config_reloads = Family::default();
        let connections_rejected = Family::default();
        let connections_active = Family::default();
        let connections_parked = Gauge::default();
        let http1_parks = Counter::default();
        let access_log_dropped = Counter::default();
        let identity_reloads = Family::default();
        let identity_expiry = Gauge::default();
        let tls_handshakes = Family::default();
        let retries = Family::default();
        let mirrors = Family::default();
        let overflows = Family::default();
        let ejections = Family::default();
        let ejected = Family::default();
        let inbound_refused = Family::default();
        let authz = Family::default();
        registry.register(
            "weft_inbound_refused",
            "Inbound connections refused by the workload's mTLS mode (plain text under STRICT)",
            inbound_refused.clone(),
        );
        registry.register(
            "weft_authz_decisions",
            "Authorization decisions on inbound requests and connections, by deciding policy",
            authz.clone(),
        );
        registry.register(
            "weft_requests",
            "HTTP and gRPC requests, counted when the response ends",
            requests.clone(),
        );
        registry.register(
            "weft_request_duration_seconds",
            "Time from request received to response end",
            request_duration.clone(),
        );
        registry.register("weft_tcp_connections_opened", "Opaque TCP connections opened", tcp_opened.clone());
        registry.register("weft_tcp_connections_closed", "Opaque TCP connections closed", tcp_closed.clone());
        registry.register(
            "weft_tcp_sent_bytes",
            "Bytes sent to the downstream on opaque TCP",
            tcp_sent_bytes.clone(),
        );
        registry.register(
            "weft_tcp_received_bytes",
            "Bytes received from the downstream on opaque TCP",
            tcp_received_bytes.clone(),
        );
        registry.register("weft_config_reloads", "Config load attempts by result", config_reloads.clone());
        registry.register(
            "weft_connections_rejected",
            "Downstream connections closed at accept because the listener was full",
            connections_rejected.clone(),
        );
        registry.register(
            "weft_connections_active",
            "Open downstream connections",
            connections_active.clone(),
        );
        registry.register(
            "weft_connections_parked",
            "Open downstream HTTP/1 connections waiting for their next request parked, without buffers",
            connections_parked.clone(),
        );
        registry.register(
            "weft_http1_parks",
            "Times an HTTP/1 connection idle between requests gave back its buffers",
            http1_parks.clone(),
        );
        registry.register(
            "weft_access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            access_log_dropped.clone(),
        );
        registry.register(
            "weft_identity_reloads",
            "Identity load attempts (certificate files, or requests to the mesh CA) by result",
            identity_reloads.clone(),
        );
        registry.register(
            "weft_identity_expiry_timestamp_seconds",
            "When this proxy's certificate expires, Unix seconds (0: none)",
            identity_expiry.clone(),
        );
        registry.register(
            "weft_tls_handshakes",
            "Mesh mTLS handshakes by side and result",
            tls_handshakes.clone(),
        );
        registry.register("weft_retries", "Retries by destination and result", retries.clone());
        registry.register(
            "weft_mirror_requests",
            "Mirrored copies by destination and result",
            mirrors.clone(),
        );
        registry.register(
            "weft_pool_overflows",
            "Requests answered 503 UO at once because a connection-pool limit was reached",
            overflows.clone(),
        );
        registry.register(
            "weft_outlier_ejections",
            "Endpoints ejected by outlier detection",
            ejections.clone(),
        );
        registry.register(
            "weft_outlier_ejected_endpoints",
            "Endpoints out of balancing now",
            ejected.clone(),
        );
        Metrics {
            registry,
            requests,
            request_duration,
            tcp_opened,
            tcp_closed,
            tcp_sent_bytes,
            tcp_received_bytes,
            config_reloads,
            connections_rejected,
            connections_active,
            connections_parked,
            http1_parks,
            access_log_dropped,
            identity_reloads,
            identity_expiry,
            tls_handshakes,
            retries,
            mirrors,
            overflows,
            ejections,
            ejected,
            inbound_refused,
            authz,
        }
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// The text exposition (OpenMetrics).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels() {
        let m = Metrics::default();
        let local = Peer { workload: "productpage".into(), namespace: "prod".into(), ..Peer::default() };
        let reviews = Peer::new(Some("spiffe://td/ns/prod/sa/reviews".parse().unwrap()), "reviews-v1");
        let labels = RequestLabels {
            direction: "outbound",
            peers: PeerLabels::new(Direction::Outbound, &local, None, Some(&reviews)),
            destination_service: "reviews".into(),
            response_code: 200,
            grpc_status: String::new(),
            tls: true,
            response_flags: Flags::UF | Flags::URX,
        };
        m.requests.get_or_create(&labels).inc();
        m.request_duration.get_or_create(&labels).observe(0.003);
        let tcp = TcpLabels {
            direction: "inbound",
            peers: PeerLabels::new(Direction::Inbound, &local, Some(&reviews), None),
            destination_service: "db".into(),
            tls: false,
        };
        m.tcp_sent_bytes.get_or_create(&tcp).inc_by(10);
        let text = m.encode();
        for want in [
            "weft_requests_total{direction=\"outbound\",source_workload=\"productpage\",source_namespace=\"prod\",source_principal=\"\",destination_workload=\"reviews-v1\",destination_namespace=\"prod\",destination_principal=\"spiffe://td/ns/prod/sa/reviews\",destination_service=\"reviews\",response_code=\"200\",grpc_status=\"\",tls=\"true\",response_flags=\"UF,URX\"} 1",
            "weft_request_duration_seconds_bucket{",
            "weft_tcp_sent_bytes_total{direction=\"inbound\",source_workload=\"reviews-v1\",source_namespace=\"prod\",source_principal=\"spiffe://td/ns/prod/sa/reviews\",destination_workload=\"productpage\",destination_namespace=\"prod\",destination_principal=\"\",destination_service=\"db\",tls=\"false\"} 10",
            "# TYPE weft_tcp_sent_bytes counter",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn an_undescribed_outbound_destination_is_unknown_not_local() {
        let local = Peer { workload: "productpage".into(), ..Peer::default() };
        let passthrough = Peer::default();
        let out = PeerLabels::new(Direction::Outbound, &local, None, Some(&passthrough));
        assert_eq!((&*out.source_workload, &*out.destination_workload), ("productpage", ""));
        let inbound = PeerLabels::new(Direction::Inbound, &local, None, Some(&passthrough));
        assert_eq!(&*inbound.destination_workload, "productpage", "inbound goes to the local app");
    }
}

/// Counts one in a gauge while it lives (a connection open, one parked), also when the task
/// holding it is dropped.
#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn inc(gauge: Gauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
