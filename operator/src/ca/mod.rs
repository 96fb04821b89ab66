//! The mesh CA. It signs every proxy's SPIFFE certificate and keeps the trust bundle where
//! proxies read it.
//!
//! - [`authority`]: the signing CA, kept in a Secret in the mesh namespace (a root made on first
//!   start, or an intermediate the user plugs in), reloaded by every replica when it changes.
//! - [`certify`]: the `Certificates` gRPC service: a certificate request and a ServiceAccount
//!   token in (checked by TokenReview), a certificate for exactly that token's identity out.
//! - [`serving`]: TLS on port 15012: the operator's own certificate from the same CA, and the
//!   caller's identity (when it presents a certificate) handed to each RPC.
//! - [`bundle`]: the `weft-trust-bundle` ConfigMap in every namespace labelled for injection.
//! - [`rotation`]: root rotation in phases, started by an annotation on the CA Secret.

pub mod authority;
pub mod bundle;
pub mod certify;
pub mod rotation;
pub mod serving;

use std::time::Duration;

pub use authority::Authority;

/// Workload certificates live at most this long (Istio refuses more than 90 days too).
pub const MAX_WORKLOAD_TTL: Duration = Duration::from_secs(90 * 86_400);
/// ...and at least this long: renewal at half-life must leave time to retry.
pub const MIN_WORKLOAD_TTL: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct CaConfig {
    /// The mesh namespace: where the CA Secret lives and the operator runs.
    pub namespace: String,
    /// The Secret holding the signing CA (`weft-ca`).
    pub secret: String,
    pub trust_domain: String,
    /// Lifetime of workload certificates (`identity.workloadCertTTL`).
    pub workload_ttl: Duration,
    /// Lifetime of a root this operator makes.
    pub root_ttl: Duration,
    /// The audience a proxy's token must be for.
    pub audience: String,
    /// The operator's Service (its serving certificate names `<service>.<namespace>.svc`...).
    pub service: String,
    /// The operator's ServiceAccount (its serving certificate's SPIFFE ID).
    pub service_account: String,
    /// How often the CA Secret is read for changes.
    pub reload_every: Duration,
    /// Keep the trust bundle ConfigMap in injected namespaces (off in tests that share a cluster).
    pub bundle: Option<bundle::BundleConfig>,
    /// During a root rotation, how long after the new root reaches the bundle ConfigMaps
    /// signing switches to it: the kubelet refreshes mounted ConfigMaps within about a minute.
    pub rotation_propagation: Duration,
}

impl CaConfig {
    /// A CA in `namespace` with the chart's defaults and no bundle ConfigMaps.
    pub fn new(namespace: &str, trust_domain: &str) -> CaConfig {
        CaConfig {
            namespace: namespace.to_owned(),
            secret: "weft-ca".to_owned(),
            trust_domain: trust_domain.to_owned(),
            workload_ttl: Duration::from_secs(86_400),
            root_ttl: Duration::from_secs(10 * 365 * 86_400),
            audience: "weft-ca".to_owned(),
            service: "weft-operator".to_owned(),
            service_account: "weft-operator".to_owned(),
            reload_every: Duration::from_secs(5),
            bundle: None,
            rotation_propagation: Duration::from_secs(180),
        }
    }

    /// The names proxies dial the operator by.
    pub fn dns_names(&self, cluster_domain: &str) -> Vec<String> {
        let (svc, ns) = (&self.service, &self.namespace);
        vec![format!("{svc}.{ns}.svc"), format!("{svc}.{ns}.svc.{cluster_domain}"), format!("{svc}.{ns}")]
    }
}
