//! Prometheus metrics. Label sets are bounded: services come from the config (or a fixed
//! `unknown`/`passthrough`), codes are numbers, and raw paths or hosts are never labels.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Request latency buckets, in seconds (0.5 ms to 30 s).
const BUCKETS: [f64; 15] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: &'static str,
    pub destination_service: String,
    pub response_code: u16,
    pub grpc_status: String,
    pub tls: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub direction: &'static str,
    pub destination_service: String,
    pub tls: &'static str,
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
    pub access_log_dropped: Counter,
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
        let access_log_dropped = Counter::default();
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
            "weft_access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            access_log_dropped.clone(),
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
            access_log_dropped,
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
        let labels = RequestLabels {
            direction: "outbound",
            destination_service: "reviews".into(),
            response_code: 200,
            grpc_status: String::new(),
            tls: "false",
        };
        m.requests.get_or_create(&labels).inc();
        m.request_duration.get_or_create(&labels).observe(0.003);
        let tcp = TcpLabels { direction: "outbound", destination_service: "db".into(), tls: "false" };
        m.tcp_sent_bytes.get_or_create(&tcp).inc_by(10);
        let text = m.encode();
        for want in [
            "weft_requests_total{direction=\"outbound\",destination_service=\"reviews\",response_code=\"200\"",
            "weft_request_duration_seconds_bucket{",
            "weft_tcp_sent_bytes_total{direction=\"outbound\",destination_service=\"db\",tls=\"false\"} 10",
            "# TYPE weft_tcp_sent_bytes counter",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }
}
