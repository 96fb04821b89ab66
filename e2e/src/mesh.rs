//! Weft on the test cluster's node, installed as a user installs it: the chart with the images
//! `cargo xtask images` built, and the demo app of `examples/`. `tests/mesh.rs` and
//! `cargo xtask demo` both use it.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod, discovery::v1::EndpointSlice};
use kube::{
    Api, Client,
    api::{DynamicObject, ListParams},
};
use serde_json::Value;

use crate::{
    apply, cluster, helm,
    images::{self, ImageSet, ImagesError},
    node,
};

/// The Helm release's name.
pub const RELEASE: &str = "weft";
/// The namespace the release is installed into (`--create-namespace`).
pub const RELEASE_NAMESPACE: &str = "weft-system";
/// How long pods get to become ready: images are local, but a cold 2-core machine is slow.
pub const START: Duration = Duration::from_secs(180);
/// The demo app's port.
pub const APP_PORT: u16 = 8080;
/// The proxy's admin port (`/ready`, `/metrics`, `/config`).
pub const ADMIN_PORT: u16 = 15000;
/// The image `examples/bookinfo.yaml` names, replaced by the locally built one.
pub const DEMO_IMAGE_IN_EXAMPLES: &str = "weft.local/demo:0.1.0";
const POLL: Duration = Duration::from_millis(500);

/// Errors of installing and driving the mesh.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeshError {
    /// The cluster, helm or the Kubernetes API failed.
    #[error(transparent)]
    Cluster(#[from] cluster::Error),
    /// The images are missing or unreadable.
    #[error(transparent)]
    Images(#[from] ImagesError),
    /// `cargo xtask images` has not run.
    #[error("no images were built: run `cargo xtask images` (cargo xtask test and demo do)")]
    NoImages,
    /// Something did not become ready in time; the kubelet's reasons follow.
    #[error("{what} not ready after {}s:\n{problems}", START.as_secs())]
    NotReady {
        /// What was awaited.
        what: String,
        /// Why each pod concerned is not ready.
        problems: String,
    },
    /// A pod answered something unexpected.
    #[error("{what}: {detail}")]
    Answer {
        /// The request.
        what: String,
        /// What came back.
        detail: String,
    },
}

/// The images `cargo xtask images` recorded.
pub fn built_images() -> Result<ImageSet, MeshError> {
    ImageSet::load(&images::dir()?)?.ok_or(MeshError::NoImages)
}

/// `helm upgrade --install` of the chart in this repository with `images` (through the values file
/// `cargo xtask images` writes) and `sets` (`key=value`), then waits until the operator and
/// the webhook are available; returns the values file. The test cluster installs Weft's CRDs
/// itself, so the release does not (`crds.install=false`).
pub async fn install(client: &Client, images: &ImageSet, sets: &[&str]) -> Result<PathBuf, MeshError> {
    let values_path = values_file(images)?;
    let chart = helm::chart_dir();
    let (chart, values) = (chart.to_string_lossy(), values_path.to_string_lossy());
    // `upgrade --install`: a second run (the demo again) updates the release in place.
    let mut args = vec![
        "upgrade",
        "--install",
        RELEASE,
        &chart,
        "-n",
        RELEASE_NAMESPACE,
        "--create-namespace",
        "-f",
        &values,
    ];
    for set in ["crds.install=false"].iter().chain(sets) {
        args.extend(["--set", set]);
    }
    helm::run(&args)?;
    for name in ["weft-operator", "weft-webhook"] {
        wait_available(client, RELEASE_NAMESPACE, name).await?;
    }
    Ok(values_path)
}

/// Writes the Helm values for `images` next to them; returns the file.
pub fn values_file(images: &ImageSet) -> Result<PathBuf, MeshError> {
    let path = images::dir()?.join("values.yaml");
    std::fs::write(&path, images.helm_values())
        .map_err(|e| cluster::Error::io(format!("writing {}", path.display()), e))?;
    Ok(path)
}

/// `helm uninstall` of the release, waiting for its objects to go; `Ok` when it was not
/// installed.
pub fn uninstall() -> Result<(), MeshError> {
    match helm::run(&["uninstall", RELEASE, "-n", RELEASE_NAMESPACE, "--wait", "--timeout", "120s"]) {
        Err(cluster::Error::Helm { output, .. }) if output.contains("not found") => Ok(()),
        other => other.map(drop).map_err(MeshError::from),
    }
}

/// `examples/bookinfo.yaml` with the demo image built here.
pub fn bookinfo(images: &ImageSet) -> Result<String, MeshError> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bookinfo.yaml");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| cluster::Error::io(format!("reading {}", path.display()), e))?;
    if !text.contains(DEMO_IMAGE_IN_EXAMPLES) {
        return Err(cluster::Error::Manifest(format!(
            "{} no longer names the image {DEMO_IMAGE_IN_EXAMPLES}",
            path.display()
        ))
        .into());
    }
    Ok(text.replace(DEMO_IMAGE_IN_EXAMPLES, &images.demo.name))
}

/// Applies `yaml` into `namespace`, waits until every Deployment in it is available and every
/// Service in it lists all its endpoints as ready (what the operator tells the proxies comes
/// from those EndpointSlices), and returns the namespace's pods.
pub async fn apply_and_wait(client: &Client, namespace: &str, yaml: &str) -> Result<Vec<Pod>, MeshError> {
    let applied: Vec<DynamicObject> = apply::apply_yaml(client, yaml, Some(namespace)).await?;
    let named = |kind: &str| -> Vec<String> {
        applied
            .iter()
            .filter(|o| o.types.as_ref().is_some_and(|t| t.kind == kind))
            .map(|o| o.metadata.name.clone().unwrap_or_default())
            .collect()
    };
    for name in named("Deployment") {
        wait_available(client, namespace, &name).await?;
    }
    for name in named("Service") {
        wait_endpoints_ready(client, namespace, &name).await?;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let listed = pods.list(&ListParams::default()).await.map_err(cluster::Error::kube("listing pods"))?;
    Ok(listed.items)
}

/// Waits until Deployment `name` has all its replicas updated and available; on timeout the
/// error carries the kubelet's reasons for every pod that is not ready.
pub async fn wait_available(client: &Client, namespace: &str, name: &str) -> Result<(), MeshError> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let deadline = Instant::now() + START;
    loop {
        let deployment = deployments
            .get(name)
            .await
            .map_err(cluster::Error::kube(format!("reading Deployment {name}")))?;
        let want = deployment.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let status = deployment.status.clone().unwrap_or_default();
        if status.available_replicas.unwrap_or(0) >= want
            && status.updated_replicas.unwrap_or(0) >= want
            && status.replicas.unwrap_or(0) == want
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let selector = deployment
                .spec
                .and_then(|s| s.selector.match_labels)
                .unwrap_or_default()
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            return Err(MeshError::NotReady {
                what: format!("Deployment {namespace}/{name}"),
                problems: node::pod_problems(&pods, &selector).await,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until Service `name`'s EndpointSlices list at least one endpoint and all of them
/// ready.
async fn wait_endpoints_ready(client: &Client, namespace: &str, name: &str) -> Result<(), MeshError> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    let selector = format!("kubernetes.io/service-name={name}");
    let deadline = Instant::now() + START;
    loop {
        let listed = slices
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(cluster::Error::kube(format!("listing the EndpointSlices of {name}")))?;
        let endpoints: Vec<_> = listed.items.iter().flat_map(|s| &s.endpoints).collect();
        let ready =
            endpoints.iter().filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false)).count();
        if !endpoints.is_empty() && ready == endpoints.len() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(MeshError::NotReady {
                what: format!("the endpoints of Service {namespace}/{name}"),
                problems: format!("{} listed, {ready} ready", endpoints.len()),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The pod's address.
pub fn pod_ip(pod: &Pod) -> Result<IpAddr, MeshError> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let ip = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()).unwrap_or_default();
    ip.parse()
        .map_err(|_| MeshError::Answer { what: format!("pod {name}"), detail: format!("no IP ({ip:?})") })
}

/// A GET from the host to a pod's port (routed into the node's namespace): status and body.
pub async fn get(pod: &Pod, port: u16, path: &str) -> Result<(u16, String), MeshError> {
    let ip = pod_ip(pod)?;
    crate::http::get(SocketAddr::new(ip, port), &ip.to_string(), path)
        .await
        .map_err(|e| MeshError::Answer { what: format!("GET {ip}:{port}{path}"), detail: e.to_string() })
}

/// What the demo app's `/call` answered.
#[derive(Debug, Clone, PartialEq)]
pub struct CallReport {
    /// Responses by status code.
    pub status: BTreeMap<String, u64>,
    /// Responses by the `version` in their body (other demo apps').
    pub versions: BTreeMap<String, u64>,
    /// Requests that got no response.
    pub errors: u64,
    /// Latency percentiles in milliseconds (`None` when nothing answered).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Responses at least [`Load::slow_ms`] slow, when it was asked.
    pub slow: Option<u64>,
}

impl CallReport {
    /// Responses with status 200.
    pub fn ok(&self) -> u64 {
        self.with_status(200)
    }

    /// Responses with `status`.
    pub fn with_status(&self, status: u16) -> u64 {
        self.status.get(&status.to_string()).copied().unwrap_or(0)
    }

    /// Responses from pods of `version`.
    pub fn version(&self, version: &str) -> u64 {
        self.versions.get(version).copied().unwrap_or(0)
    }

    /// Requests sent: answered or not.
    pub fn sent(&self) -> u64 {
        self.status.values().sum::<u64>() + self.errors
    }
}

/// Load for the demo app's `/call`: `n` GETs of `url`, `concurrency` at a time.
#[derive(Debug, Clone, Default)]
pub struct Load<'a> {
    pub url: String,
    pub n: u32,
    pub concurrency: u32,
    /// Sent with every request.
    pub headers: &'a [(&'a str, &'a str)],
    /// Count the responses at least this slow ([`CallReport::slow`]).
    pub slow_ms: Option<u32>,
}

/// Has the demo app in `pod` send `n` GETs to `url`, `concurrency` at a time (its `/call`).
pub async fn call(pod: &Pod, url: &str, n: u32, concurrency: u32) -> Result<CallReport, MeshError> {
    call_with(pod, &Load { url: url.to_owned(), n, concurrency, ..Load::default() }).await
}

/// Has the demo app in `pod` send `load` (its `/call`).
pub async fn call_with(pod: &Pod, load: &Load<'_>) -> Result<CallReport, MeshError> {
    let mut path = format!("/call?url={}&n={}&concurrency={}", encode(&load.url), load.n, load.concurrency);
    for (name, value) in load.headers {
        path.push_str(&format!("&header={}", encode(&format!("{name}:{value}"))));
    }
    if let Some(slow) = load.slow_ms {
        path.push_str(&format!("&slow_ms={slow}"));
    }
    let (status, body) = get(pod, APP_PORT, &path).await?;
    let bad = |detail: String| MeshError::Answer { what: format!("/call {}", load.url), detail };
    if status != 200 {
        return Err(bad(format!("status {status}: {body}")));
    }
    let json: Value = serde_json::from_str(&body).map_err(|e| bad(format!("{e}: {body}")))?;
    let counts = |key: &str| -> BTreeMap<String, u64> {
        json[key]
            .as_object()
            .map(|o| o.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect())
            .unwrap_or_default()
    };
    Ok(CallReport {
        status: counts("status"),
        versions: counts("versions"),
        errors: json["errors"].as_u64().unwrap_or(0),
        p50_ms: json["latency_ms"]["p50"].as_f64(),
        p99_ms: json["latency_ms"]["p99"].as_f64(),
        slow: json["slow"].as_u64(),
    })
}

/// The sum of `weft_requests_total` samples in `direction` on the proxy of `pod`.
pub async fn requests_total(pod: &Pod, direction: &str) -> Result<f64, MeshError> {
    metric_sum(pod, "weft_requests_total{", &format!("direction=\"{direction}\"")).await
}

/// The sum of the samples on the `/metrics` of `pod`'s proxy whose lines start with `prefix`
/// and contain `filter`.
pub async fn metric_sum(pod: &Pod, prefix: &str, filter: &str) -> Result<f64, MeshError> {
    let (status, metrics) = get(pod, ADMIN_PORT, "/metrics").await?;
    if status != 200 {
        return Err(MeshError::Answer { what: "/metrics".into(), detail: format!("status {status}") });
    }
    Ok(metrics
        .lines()
        .filter(|l| l.starts_with(prefix) && l.contains(filter))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum())
}

/// Whether Weft's proxy was injected into the pod (as a native sidecar or a container).
pub fn is_injected(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| {
        s.init_containers.iter().flatten().any(|c| c.name == "weft-proxy")
            || s.containers.iter().any(|c| c.name == "weft-proxy")
    })
}

/// The value of label `app`.
pub fn app_of(pod: &Pod) -> &str {
    pod.metadata.labels.as_ref().and_then(|l| l.get("app")).map_or("", String::as_str)
}

/// Percent-encodes a query parameter's value.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_encoded_for_a_query() {
        assert_eq!(encode("http://a.b/?x=1&y"), "http%3A%2F%2Fa.b%2F%3Fx%3D1%26y");
    }
}
