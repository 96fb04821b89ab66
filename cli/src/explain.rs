//! `weftctl explain <pod> <url> [-H name:value]...`: what the pod's proxy would do with that
//! request from its app, decided by the proxy's own code (`weft_proxy::explain`) on the config it
//! runs now; and, at the destination, what the server's proxy decides (mTLS mode and
//! authorization) for this pod's identity.

use std::{
    net::{IpAddr, SocketAddr},
    time::SystemTime,
};

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::{Api, Client, api::ListParams};
use serde::{Deserialize, Serialize};
use weft_identity::SpiffeId;
use weft_proxy::explain::{self, Inbound, Outbound};

use crate::{cluster, output::table, proxy_config};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Cluster(#[from] cluster::Error),
    #[error(transparent)]
    Config(#[from] proxy_config::Error),
    #[error("{0:?} is not an absolute URL such as http://reviews:9080/path")]
    Url(String),
    #[error("header {0:?}: expected `name: value`")]
    Header(String),
    #[error("{what}: {source}")]
    Api { what: String, source: kube::Error },
}

/// The answer, both sides.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub pod: String,
    pub request: String,
    pub config_version: Option<String>,
    pub outbound: Outbound,
    /// Per meshed destination pod reached (one per endpoint pod found).
    pub inbound: Vec<ServerSide>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerSide {
    pub pod: String,
    pub endpoint: String,
    pub decision: Inbound,
}

pub fn parse_headers(raw: &[String]) -> Result<HeaderMap, Error> {
    let mut headers = HeaderMap::new();
    for h in raw {
        let (name, value) = h.split_once(':').ok_or_else(|| Error::Header(h.clone()))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| Error::Header(h.clone()))?;
        let value = HeaderValue::from_str(value.trim()).map_err(|_| Error::Header(h.clone()))?;
        headers.append(name, value);
    }
    Ok(headers)
}

pub async fn run(
    client: &Client,
    namespace: &str,
    pod_name: &str,
    method: &Method,
    url: &str,
    headers: &HeaderMap,
) -> Result<Explanation, Error> {
    let uri: Uri = url.parse().map_err(|_| Error::Url(url.into()))?;
    let host = uri.host().ok_or_else(|| Error::Url(url.into()))?.to_ascii_lowercase();
    let pod = cluster::meshed_pod(client, namespace, pod_name).await?;
    let running = proxy_config::fetch(client, namespace, pod_name).await?;
    // The app connects to the Service's cluster IP; the proxy falls back to that address when
    // the host names no service it knows.
    let port = uri.port_u16().unwrap_or(80);
    let dst = cluster_ip(client, namespace, &host).await.map(|ip| SocketAddr::new(ip, port));
    let req = explain::Request { method, uri: &uri, headers, dst };
    let outbound = explain::outbound(&running.snapshot, &req);

    // The server side, for every endpoint pod the request may reach.
    let client_id = pod_identity(&pod);
    let source = pod.status.as_ref().and_then(|s| s.pod_ip.as_ref()).and_then(|ip| ip.parse().ok());
    let mut inbound = Vec::new();
    for endpoint in outbound.destinations.iter().flat_map(|d| &d.endpoints) {
        let Ok(addr) = endpoint.address.parse::<SocketAddr>() else { continue };
        let Some((server_ns, server)) = pod_at(client, addr.ip()).await? else { continue };
        let Ok(server_config) = proxy_config::fetch(client, &server_ns, &server).await else { continue };
        let tls_client = endpoint.identity.as_ref().and(client_id.as_ref());
        let decision = explain::inbound(
            &server_config.snapshot,
            tls_client,
            source.unwrap_or(IpAddr::from([0, 0, 0, 0])),
            addr,
            &req,
        );
        inbound.push(ServerSide {
            pod: format!("{server_ns}/{server}"),
            endpoint: endpoint.address.clone(),
            decision,
        });
    }
    Ok(Explanation {
        pod: format!("{namespace}/{pod_name}"),
        request: format!("{method} {uri}"),
        config_version: running.served.version,
        outbound,
        inbound,
    })
}

/// The cluster IP of the Service `host` names (`name`, `name.ns`, `name.ns.svc...`).
async fn cluster_ip(client: &Client, namespace: &str, host: &str) -> Option<IpAddr> {
    let mut parts = host.split('.');
    let name = parts.next()?;
    let ns = parts.next().unwrap_or(namespace);
    let svc = Api::<Service>::namespaced(client.clone(), ns).get(name).await.ok()?;
    svc.spec?.cluster_ip?.parse().ok()
}

/// The pod with this IP, if any.
async fn pod_at(client: &Client, ip: IpAddr) -> Result<Option<(String, String)>, Error> {
    let params = ListParams::default().fields(&format!("status.podIP={ip}"));
    let pods = Api::<Pod>::all(client.clone())
        .list(&params)
        .await
        .map_err(|source| Error::Api { what: format!("finding the pod at {ip}"), source })?;
    Ok(pods.items.into_iter().find_map(|p| Some((p.metadata.namespace?, p.metadata.name?))))
}

/// The SPIFFE ID a meshed pod presents: its namespace and service account in the mesh's trust
/// domain, read from the proxy's environment as the injector wrote it.
fn pod_identity(pod: &Pod) -> Option<SpiffeId> {
    let spec = pod.spec.as_ref()?;
    let proxy = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == weft_inject::PROXY_CONTAINER)?;
    let env = |name: &str| proxy.env.iter().flatten().find(|e| e.name == name).and_then(|e| e.value.clone());
    let trust_domain = env("WEFT_TRUST_DOMAIN").unwrap_or_else(|| "cluster.local".into());
    let namespace = pod.metadata.namespace.as_deref()?;
    let account = spec.service_account_name.as_deref().unwrap_or("default");
    SpiffeId::new(&trust_domain, namespace, account).ok()
}

pub fn render_table(e: &Explanation, _now: SystemTime) -> String {
    let o = &e.outbound;
    let mut out =
        format!("{} from {} (config {})\n\n", e.request, e.pod, e.config_version.as_deref().unwrap_or("-"));
    let line =
        |label: &str, value: Option<&str>| value.map(|v| format!("{label:<13}{v}\n")).unwrap_or_default();
    out += &line("service:", o.service.as_deref());
    out += &line("found by:", o.found_by.as_deref());
    out += &line("port:", o.port.map(|p| p.to_string()).as_deref());
    out += &line("route:", o.route.as_deref());
    out += &line("matched:", o.matched.as_deref().or(o.route.as_ref().map(|_| "any request")));
    out += &line("action:", Some(&o.outcome));
    out += &line("timeout:", o.timeout.as_deref());
    out += &line("retries:", o.retries.as_deref());
    out += &line("fault:", o.fault.as_deref());
    out += &line("mirror:", o.mirror.as_deref());
    if !o.destinations.is_empty() {
        let rows: Vec<[String; 5]> = o
            .destinations
            .iter()
            .flat_map(|d| {
                d.endpoints.iter().map(move |ep| {
                    [
                        d.cluster.clone(),
                        format!("{}%", d.percent),
                        d.balancing.clone(),
                        ep.address.clone(),
                        ep.identity.clone().unwrap_or_else(|| "(plain text)".into()),
                    ]
                })
            })
            .collect();
        out += "\n";
        out += &table(["DESTINATION", "SHARE", "BALANCING", "ENDPOINT", "MTLS IDENTITY"], &rows);
    }
    if !e.inbound.is_empty() {
        let rows: Vec<[String; 4]> = e
            .inbound
            .iter()
            .map(|s| {
                let verdict = if s.decision.allowed { "allowed" } else { "DENIED" };
                [s.pod.clone(), s.decision.mtls_mode.clone(), verdict.into(), s.decision.reason.clone()]
            })
            .collect();
        out += "\nAT THE DESTINATION\n";
        out += &table(["POD", "MTLS", "VERDICT", "WHY"], &rows);
    }
    out
}
