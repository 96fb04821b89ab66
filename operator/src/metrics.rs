//! The operator's Prometheus metrics. Label values come from closed sets (error reasons are
//! the `metric_label` of each module's error enum, or a fixed operation name).

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CaLabels {
    result: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    resolve_duration: Histogram,
    errors: Family<ReasonLabels, Counter>,
    status_writes: Family<KindLabels, Counter>,
    push_latency: Histogram,
    pushes: Counter,
    connected: Gauge,
    leader: Gauge,
    ca_requests: Family<CaLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let reconciles = Counter::default();
        let resolve_duration =
            Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]);
        let errors = Family::<ReasonLabels, Counter>::default();
        let status_writes = Family::<KindLabels, Counter>::default();
        let push_latency = Histogram::new([0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]);
        let pushes = Counter::default();
        let connected = Gauge::default();
        let leader = Gauge::default();
        let ca_requests = Family::<CaLabels, Counter>::default();
        registry.register(
            "weft_operator_reconciles",
            "Resolutions of the index (each covers every change since the previous one)",
            reconciles.clone(),
        );
        registry.register(
            "weft_operator_resolve_duration_seconds",
            "Time to resolve the index into proxy config and status",
            resolve_duration.clone(),
        );
        registry.register("weft_operator_errors", "Errors, by reason", errors.clone());
        registry.register(
            "weft_operator_status_writes",
            "Status subresource patches, by kind",
            status_writes.clone(),
        );
        registry.register(
            "weft_operator_push_latency_seconds",
            "From a watched change arriving to a proxy stream being sent the config that carries it",
            push_latency.clone(),
        );
        registry.register("weft_operator_pushes", "Config updates sent to proxies", pushes.clone());
        registry.register("weft_operator_connected_proxies", "Open config streams", connected.clone());
        registry.register("weft_operator_leader", "1 while this replica holds the lease", leader.clone());
        registry.register(
            "weft_ca_requests",
            "Certificate requests, by result (issued, refused, error) and the refusal's reason",
            ca_requests.clone(),
        );
        Metrics {
            registry,
            reconciles,
            resolve_duration,
            errors,
            status_writes,
            push_latency,
            pushes,
            connected,
            leader,
            ca_requests,
        }
    }
}

impl Metrics {
    pub fn record_resolve(&self, seconds: f64) {
        self.reconciles.inc();
        self.resolve_duration.observe(seconds);
    }

    pub fn record_error(&self, reason: &'static str) {
        self.errors.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn record_status_write(&self, kind: &'static str) {
        self.status_writes.get_or_create(&KindLabels { kind }).inc();
    }

    pub fn record_push(&self, latency_seconds: f64) {
        self.pushes.inc();
        self.push_latency.observe(latency_seconds);
    }

    pub fn record_ca_request(&self, result: &'static str, reason: &'static str) {
        self.ca_requests.get_or_create(&CaLabels { result, reason }).inc();
    }

    pub fn connected(&self) -> &Gauge {
        &self.connected
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::Metrics;

    #[test]
    fn errors_are_counted_by_reason() {
        let m = Metrics::default();
        m.record_error("watch");
        m.record_error("watch");
        m.record_resolve(0.001);
        m.connected().inc();
        let text = m.encode();
        assert!(text.contains(r#"weft_operator_errors_total{reason="watch"} 2"#), "{text}");
        assert!(text.contains("weft_operator_reconciles_total 1"), "{text}");
        assert!(text.contains("weft_operator_connected_proxies 1"), "{text}");
    }
}
