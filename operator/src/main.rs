//! `weft-operator`: flags in, `Config` out, then run until SIGTERM or SIGINT.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use weft_operator::{
    Config, LeaseConfig, WebhookCertConfig,
    ca::{self, CaConfig, bundle::BundleConfig},
    controllers::Debounce,
    index::Settings,
};

/// A trust domain that can head a SPIFFE ID.
fn trust_domain(text: &str) -> Result<String, String> {
    weft_identity::SpiffeId::new(text, "default", "default").map_err(|e| e.to_string())?;
    Ok(text.to_owned())
}

/// A duration such as `2160h`, `90m` or `30s`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    weft_api::Duration::new(text).parse().map_err(|e| e.to_string())
}

/// A workload certificate lifetime: a duration within the CA's bounds.
fn workload_ttl(text: &str) -> Result<Duration, String> {
    let ttl = parse_duration(text)?;
    if ttl > ca::MAX_WORKLOAD_TTL || ttl < ca::MIN_WORKLOAD_TTL {
        return Err(format!(
            "{text} is outside {}s..={}s (at most 90 days)",
            ca::MIN_WORKLOAD_TTL.as_secs(),
            ca::MAX_WORKLOAD_TTL.as_secs()
        ));
    }
    Ok(ttl)
}

/// Weft's control plane: watches VirtualService, DestinationRule, PeerAuthentication,
/// AuthorizationPolicy, Services, EndpointSlices and Pods; serves resolved proxy config over gRPC;
/// writes status conditions while it holds the leader Lease.
#[derive(Debug, Parser)]
#[command(name = "weft-operator", version)]
struct Args {
    /// The gRPC server: ConfigDiscovery and the CA's Certificates, TLS with a certificate from
    /// the mesh CA.
    #[arg(long, env = "WEFT_OPERATOR_GRPC_ADDR", default_value = "0.0.0.0:15012")]
    grpc_addr: SocketAddr,
    /// Admin server: /live, /ready, /metrics.
    #[arg(long, env = "WEFT_OPERATOR_ADMIN_ADDR", default_value = "0.0.0.0:15014")]
    admin_addr: SocketAddr,
    /// Services are <name>.<namespace>.svc.<domain>.
    #[arg(long, env = "WEFT_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// SPIFFE trust domain: a meshed endpoint's identity is spiffe://<domain>/ns/<ns>/sa/<sa>.
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = "cluster.local", value_parser = trust_domain)]
    trust_domain: String,
    /// The mesh's root namespace: selector-less PeerAuthentication and AuthorizationPolicy here
    /// apply mesh-wide. Also where the leader Lease lives.
    #[arg(long, env = "POD_NAMESPACE", default_value = "weft-system")]
    namespace: String,
    /// Watch only this namespace (default: the whole cluster).
    #[arg(long, env = "WEFT_OPERATOR_WATCH_NAMESPACE", value_name = "NAMESPACE")]
    watch_namespace: Option<String>,
    /// This replica's identity in the Lease (the pod name); leader election is off without it.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// The leader Lease's name.
    #[arg(long, env = "WEFT_OPERATOR_LEASE", default_value = "weft-operator")]
    lease_name: String,
    /// How long a Lease stays valid without renewal, in seconds.
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Publish config once no change arrived for this long (milliseconds).
    #[arg(long, default_value_t = 50)]
    debounce_ms: u64,
    /// ...and at the latest this long after the first change (milliseconds).
    #[arg(long, default_value_t = 250)]
    debounce_max_ms: u64,
    /// The injector's MutatingWebhookConfiguration: when set, the leader issues the webhook's
    /// serving certificate into --webhook-tls-secret (in --namespace), renews it at half its
    /// lifetime and keeps this configuration's caBundle trusting it.
    #[arg(long, env = "WEFT_WEBHOOK_CONFIGURATION", value_name = "NAME")]
    webhook_configuration: Option<String>,
    /// The injector's Service (the certificate names <service>.<namespace>.svc).
    #[arg(long, default_value = "weft-webhook", value_name = "NAME")]
    webhook_service: String,
    /// The Secret (kubernetes.io/tls) the injector mounts.
    #[arg(long, default_value = "weft-webhook-tls", value_name = "NAME")]
    webhook_tls_secret: String,
    /// Lifetime of the injector's certificate, e.g. 2160h; renewed at half of it.
    #[arg(long, default_value = "2160h", value_parser = parse_duration, value_name = "DURATION")]
    webhook_cert_ttl: Duration,
    /// The Secret (in --namespace) holding the mesh CA: made with a new root on first start, or
    /// created beforehand with a plug-in intermediate (keys ca.crt, ca.key, cert-chain.pem,
    /// root-cert.pem).
    #[arg(long, default_value = "weft-ca", value_name = "NAME")]
    ca_secret: String,
    /// Lifetime of workload certificates (10s to 2160h); proxies renew at about half of it.
    #[arg(long, env = "WEFT_WORKLOAD_CERT_TTL", default_value = "24h", value_parser = workload_ttl, value_name = "DURATION")]
    workload_cert_ttl: Duration,
    /// The ConfigMap the trust bundle is kept in, in every namespace labelled for injection
    /// (empty: none is kept).
    #[arg(long, default_value = "weft-trust-bundle", value_name = "NAME")]
    trust_bundle_configmap: String,
    /// During a root rotation, how long after the new root reaches every bundle ConfigMap
    /// signing switches to it (the kubelet refreshes mounted ConfigMaps within about a minute).
    #[arg(long, default_value = "3m", value_parser = parse_duration, value_name = "DURATION")]
    root_rotation_propagation: Duration,
    /// The operator's Service: its certificate names <service>.<namespace>.svc.
    #[arg(long, default_value = "weft-operator", value_name = "NAME")]
    service: String,
    /// The operator's ServiceAccount: its certificate's SPIFFE ID.
    #[arg(long, env = "WEFT_SERVICE_ACCOUNT", default_value = "weft-operator", value_name = "NAME")]
    service_account: String,
    /// Log format on stderr.
    #[arg(long, env = "WEFT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
}

impl Args {
    fn config(self) -> Config {
        let Args {
            grpc_addr,
            admin_addr,
            cluster_domain,
            trust_domain,
            namespace,
            watch_namespace,
            identity,
            lease_name,
            lease_duration_seconds,
            debounce_ms,
            debounce_max_ms,
            webhook_configuration,
            webhook_service,
            webhook_tls_secret,
            webhook_cert_ttl,
            ca_secret,
            workload_cert_ttl,
            trust_bundle_configmap,
            root_rotation_propagation,
            service,
            service_account,
            log_format: _,
            log: _,
        } = self;
        let webhook_cert = webhook_configuration.map(|configuration| WebhookCertConfig {
            namespace: namespace.clone(),
            service: webhook_service,
            secret: webhook_tls_secret,
            configuration,
            lifetime: webhook_cert_ttl,
        });
        let duration = Duration::from_secs(lease_duration_seconds.max(2));
        let ca = CaConfig {
            secret: ca_secret,
            workload_ttl: workload_cert_ttl,
            service,
            service_account,
            rotation_propagation: root_rotation_propagation,
            bundle: (!trust_bundle_configmap.is_empty())
                .then_some(BundleConfig { name: trust_bundle_configmap }),
            ..CaConfig::new(&namespace, &trust_domain)
        };
        Config {
            grpc_addr,
            admin_addr,
            index: Settings { cluster_domain, root_namespace: namespace.clone(), trust_domain },
            watch_namespace,
            debounce: Debounce {
                quiet: Duration::from_millis(debounce_ms),
                max_delay: Duration::from_millis(debounce_max_ms.max(debounce_ms)),
            },
            lease: identity.map(|identity| LeaseConfig {
                namespace,
                name: lease_name,
                identity,
                duration,
                retry_period: duration / 5,
            }),
            webhook_cert,
            ca,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log).context("parsing --log")?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if args.log_format == "json" {
        builder.json().init();
    } else {
        builder.with_ansi(false).init();
    }
    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
    let handle = weft_operator::start(client, args.config()).await.context("starting")?;

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
    handle.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trust_domain_flag_reaches_the_index() {
        let args = Args::try_parse_from(["weft-operator", "--trust-domain=example.org"]).unwrap();
        assert_eq!(args.config().index.trust_domain, "example.org");
    }

    #[test]
    fn workload_certificate_lifetimes_are_bounded() {
        let parse =
            |ttl: &str| Args::try_parse_from(["weft-operator", &format!("--workload-cert-ttl={ttl}")]);
        assert_eq!(parse("20s").unwrap().config().ca.workload_ttl, Duration::from_secs(20));
        assert_eq!(parse("2160h").unwrap().config().ca.workload_ttl, ca::MAX_WORKLOAD_TTL);
        let err = parse("2161h").unwrap_err().to_string();
        assert!(err.contains("at most 90 days"), "{err}");
        assert!(parse("1s").is_err());
    }
}
