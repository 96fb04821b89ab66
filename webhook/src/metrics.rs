//! The webhook's Prometheus metrics: admissions by outcome and their latency.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use crate::admission::Outcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
    /// Why a pod was skipped; empty otherwise. A closed set of values.
    reason: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    admissions: Family<OutcomeLabels, Counter>,
    malformed: Counter,
    duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let admissions = Family::<OutcomeLabels, Counter>::default();
        let malformed = Counter::default();
        // 50µs to ~100ms: admission is in-memory work, the target is p99 < 5ms.
        let duration =
            Histogram::new([0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1]);
        registry.register(
            "weft_webhook_admissions",
            "AdmissionReviews answered, by outcome",
            admissions.clone(),
        );
        registry.register(
            "weft_webhook_malformed_reviews",
            "Requests that were not AdmissionReviews",
            malformed.clone(),
        );
        registry.register(
            "weft_webhook_admission_duration_seconds",
            "Time to answer an AdmissionReview, decoding included",
            duration.clone(),
        );
        Self { registry, admissions, malformed, duration }
    }
}

impl Metrics {
    pub fn record(&self, outcome: Outcome, seconds: f64) {
        let reason = match outcome {
            Outcome::Skipped(reason) => reason.as_str(),
            _ => "",
        };
        self.admissions.get_or_create(&OutcomeLabels { outcome: outcome.as_str(), reason }).inc();
        self.duration.observe(seconds);
    }

    pub fn record_malformed(&self) {
        self.malformed.inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}
