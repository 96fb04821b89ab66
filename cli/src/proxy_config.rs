//! `weftctl proxy-config <pod>`: what a pod's proxy runs now, read from its `/config` and
//! compiled by the proxy's own compiler, so the routes shown are the ones it takes.

use std::time::SystemTime;

use kube::Client;
use weft_proto::v1::ProxyConfig;
use weft_proxy::{admin::ConfigReport, config::Snapshot, explain};

use crate::{
    cluster::{self, admin_json},
    output::{table, when},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Cluster(#[from] cluster::Error),
    #[error("the proxy of {pod} has no config loaded yet{}", .last_error.as_deref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    NoConfig { pod: String, last_error: Option<String> },
    #[error("the config of {pod} is not one weftctl reads (is weftctl older than the proxy?): {source}")]
    Decode { pod: String, source: serde_json::Error },
    #[error("the config of {pod} does not compile here (is weftctl older than the proxy?): {source}")]
    Compile { pod: String, source: weft_proxy::config::Error },
}

/// A pod's config: what it serves, and that compiled.
#[derive(Debug)]
pub struct Running {
    pub served: ConfigReport,
    /// Compiled; its `source` is the config as served.
    pub snapshot: Snapshot,
}

/// Fetches and compiles the config of `namespace/pod`'s proxy.
pub async fn fetch(client: &Client, namespace: &str, pod: &str) -> Result<Running, Error> {
    cluster::meshed_pod(client, namespace, pod).await?;
    let served: ConfigReport = admin_json(client, namespace, pod, "/config").await?;
    let name = format!("{namespace}/{pod}");
    let Some(json) = served.config.clone() else {
        return Err(Error::NoConfig { pod: name, last_error: served.last_error });
    };
    let config: ProxyConfig =
        serde_json::from_value(json).map_err(|source| Error::Decode { pod: name.clone(), source })?;
    let snapshot =
        weft_proxy::config::compile(config, None).map_err(|source| Error::Compile { pod: name, source })?;
    Ok(Running { served, snapshot })
}

/// The tables: the config's version, then services, routes, endpoints and the inbound policy.
pub fn render_table(running: &Running, now: SystemTime) -> String {
    let served = &running.served;
    let mut out = format!(
        "version: {}\nloaded: {}\n",
        served.version.as_deref().unwrap_or("-"),
        served.loaded_at_unix_seconds.map_or_else(|| "-".into(), |t| when(t, now)),
    );
    if let Some(error) = &served.last_error {
        out += &format!("last update rejected (the proxy kept the config above): {error}\n");
    }
    let routes = explain::routes(&running.snapshot);
    let rows: Vec<[String; 6]> = routes
        .iter()
        .map(|r| {
            let dests =
                r.destinations.iter().map(|d| format!("{} {}%", d.cluster, d.percent)).collect::<Vec<_>>();
            let policies = [
                r.timeout.as_ref().map(|t| format!("timeout {t}")),
                r.retries.as_ref().map(|t| format!("retries {t}")),
                r.fault.as_ref().map(|f| format!("fault {f}")),
                r.mirror.as_ref().map(|m| format!("mirror {m}")),
            ];
            [
                r.service.clone().unwrap_or_default(),
                r.route.clone().unwrap_or_else(|| "(default)".into()),
                r.matched.clone().unwrap_or_else(|| "any".into()),
                r.outcome.clone(),
                if dests.is_empty() { "-".into() } else { dests.join(", ") },
                policies.into_iter().flatten().collect::<Vec<_>>().join("; "),
            ]
        })
        .collect();
    out += &format!("\nROUTES ({})\n", rows.len());
    out += &table(["SERVICE", "ROUTE", "MATCH", "ACTION", "DESTINATIONS", "POLICIES"], &rows);

    let mut endpoints: Vec<[String; 4]> = Vec::new();
    for service in &running.snapshot.services {
        for port in &service.ports {
            for e in &port.cluster.endpoints {
                let identity =
                    e.peer.identity.as_ref().map_or_else(|| "(plain text)".into(), |id| id.to_string());
                endpoints.push([
                    port.cluster.name.to_string(),
                    e.addr.to_string(),
                    e.peer.workload.to_string(),
                    identity,
                ]);
            }
        }
    }
    out += &format!("\nENDPOINTS ({})\n", endpoints.len());
    out += &table(["CLUSTER", "ADDRESS", "WORKLOAD", "IDENTITY"], &endpoints);

    out += "\nINBOUND\n";
    match running.snapshot.source.inbound.as_ref() {
        None => out += "no PeerAuthentication or AuthorizationPolicy selects this workload\n",
        Some(inbound) => {
            out += &format!("mTLS mode: {}\n", inbound.mtls_mode().as_str_name().trim_start_matches("MTLS_"));
            for (port, mode) in &inbound.port_mtls {
                let mode = weft_proto::v1::MtlsMode::try_from(*mode).map_or("?", |m| m.as_str_name());
                out += &format!("  port {port}: {}\n", mode.trim_start_matches("MTLS_"));
            }
            let rows: Vec<[String; 3]> = inbound
                .authorizations
                .iter()
                .map(|a| {
                    let action = a.action().as_str_name().to_owned();
                    let action = if a.dry_run { format!("{action} (dry run)") } else { action };
                    [a.name.clone(), action, a.rules.len().to_string()]
                })
                .collect();
            if !rows.is_empty() {
                out += &table(["AUTHORIZATION", "ACTION", "RULES"], &rows);
            }
        }
    }
    out
}
