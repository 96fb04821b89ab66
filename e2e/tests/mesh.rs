//! Weft installed as a user installs it, on the test cluster's real node: `helm install` of
//! the chart with the locally built images, a labelled namespace's app injected and running
//! with its proxy, traffic through both proxies, an unmeshed client, a Job, the operator
//! deleted under load, and `helm uninstall`.
//!
//! One test, in steps, because the chart is cluster-wide (its webhook, CRDs and cluster roles
//! exist once) and the last step uninstalls it: the steps share one installation and run in
//! order. Each step names what it proves and fails with what it saw.
//!
//! Needs the test cluster with its node and the images: `cargo xtask test` does both; by hand,
//! `cargo xtask cluster up && cargo xtask images`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::{
    apps::v1::Deployment,
    batch::v1::Job,
    core::v1::{Namespace, Pod},
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use serde_json::{Value, json};
use weft_e2e::{
    TestCluster, apply,
    helm::{self, chart_dir},
    images::{self, ImageSet},
    node,
};

const RELEASE: &str = "weft";
const RELEASE_NAMESPACE: &str = "weft-system";
/// How long pods get to start: images are local, but a cold 2-core machine is slow.
const START: Duration = Duration::from_secs(180);
const POLL: Duration = Duration::from_millis(500);
/// The demo app's port and the proxy's admin port.
const APP_PORT: u16 = 8080;
const ADMIN_PORT: u16 = 15000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_installs_and_meshes_apps_on_the_real_node() -> Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    let images = ImageSet::load(&images::dir()?)?
        .context("no images were built: run `cargo xtask images` (cargo xtask test does)")?;

    step("helm install: the operator and the webhook run as pods and become ready");
    let installed = Installed::install(&client, &images).await?;

    let meshed = cluster.namespace("meshed").await?;
    label_for_injection(&client, meshed.name()).await?;
    step("a labelled namespace's Deployments come up with the proxy beside the app, ready");
    let bookinfo = deploy_bookinfo(&client, meshed.name(), &images).await?;
    let frontend = bookinfo.pod("frontend")?;
    assert_injected_and_ready(frontend)?;
    let (status, body) = get(pod_ip(frontend)?, ADMIN_PORT, "/ready").await?;
    ensure!(status == 200, "the frontend's proxy /ready answered {status}: {body}");

    step("a request from one demo pod to another's Service crosses both proxies");
    let reviews_url = format!("http://reviews.{}.svc.cluster.local/", meshed.name());
    let before_out = requests_total(frontend, "outbound").await?;
    let before_in = bookinfo.requests_total_of("reviews", "inbound").await?;
    let call = call(frontend, &reviews_url, 30, 3).await?;
    ensure!(call.ok() == 30 && call.errors == 0, "frontend -> reviews: {call:?}");
    let out = requests_total(frontend, "outbound").await? - before_out;
    let inbound = bookinfo.requests_total_of("reviews", "inbound").await? - before_in;
    ensure!(out >= 30.0, "the frontend's proxy counted {out} outbound requests, expected at least 30");
    ensure!(inbound >= 30.0, "the reviews proxies counted {inbound} inbound requests, expected at least 30");
    ensure!(call.versions.len() >= 2, "the reviews Service spread over its versions: {:?}", call.versions);
    // The route came from the operator, over its Service's DNS name: the frontend's proxy
    // holds the reviews Service with its three pods as endpoints.
    let (_, config) = get(pod_ip(frontend)?, ADMIN_PORT, "/config").await?;
    let config: Value = serde_json::from_str(&config).context("the proxy's /config is not JSON")?;
    let reviews = config["config"]["services"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == format!("reviews.{}.svc.cluster.local", meshed.name()))
        .context("the frontend's proxy has no config for the reviews Service")?;
    let endpoints = reviews["ports"][0]["endpoints"].as_array().map_or(0, Vec::len);
    ensure!(endpoints == 3, "the proxy knows {endpoints} reviews endpoints, expected 3: {reviews}");

    step("an unlabelled namespace's pod is left alone and still reaches a meshed Service");
    let plain = cluster.namespace("plain").await?;
    let plain_bookinfo = deploy_demo(&client, plain.name(), &images, "client").await?;
    let client_pod = plain_bookinfo.pod("client")?;
    ensure!(
        !is_injected(client_pod),
        "a pod in an unlabelled namespace was injected: {:?}",
        client_pod.metadata.annotations
    );
    let call = self::call(client_pod, &reviews_url, 10, 1).await?;
    ensure!(call.ok() == 10 && call.errors == 0, "unmeshed client -> meshed reviews: {call:?}");

    step("a Job in a meshed namespace completes: the native sidecar does not hold it");
    run_job(&client, meshed.name(), &images, &format!("http://ratings.{}.svc.cluster.local/", meshed.name()))
        .await?;

    step("deleting the operator pod under load loses no request: proxies keep their config");
    operator_deleted_under_load(&client, frontend, &reviews_url).await?;

    step("helm uninstall leaves no Weft object behind");
    installed.uninstall_and_check(&client).await
}

fn step(what: &str) {
    eprintln!("[mesh] {what}");
}

/// The release, installed; [`Installed::uninstall_and_check`] removes it. Dropping it without
/// that (a failed step) uninstalls too, so the next test binary finds no webhook of ours.
struct Installed {
    uninstalled: bool,
}

impl Installed {
    async fn install(client: &Client, images: &ImageSet) -> Result<Self> {
        let values = images::dir()?.join("values.yaml");
        std::fs::write(&values, images.helm_values())?;
        let chart = chart_dir();
        // A previous run that died may have left the release.
        let _ = helm::run(&["uninstall", RELEASE, "-n", RELEASE_NAMESPACE, "--wait"]);
        helm::run(&[
            "install",
            RELEASE,
            &chart.to_string_lossy(),
            "-n",
            RELEASE_NAMESPACE,
            "--create-namespace",
            "-f",
            &values.to_string_lossy(),
            // The test cluster installs Weft's CRDs itself (`cluster up`), so the release
            // does not own them.
            "--set",
            "crds.install=false",
            "--set",
            "operator.replicas=1",
            "--set",
            "webhook.replicas=1",
        ])?;
        let installed = Self { uninstalled: false };
        for name in ["weft-operator", "weft-webhook"] {
            wait_available(client, RELEASE_NAMESPACE, name).await?;
        }
        Ok(installed)
    }

    async fn uninstall_and_check(mut self, client: &Client) -> Result<()> {
        helm::run(&["uninstall", RELEASE, "-n", RELEASE_NAMESPACE, "--wait", "--timeout", "120s"])?;
        self.uninstalled = true;
        // Objects the operator made itself must go with the release (owner references), and
        // nothing namespaced may stay in the release namespace, which Helm documents it keeps.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = leftovers(client).await?;
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("after helm uninstall these remain: {}", left.join(", "));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if !self.uninstalled {
            let _ = helm::run(&["uninstall", RELEASE, "-n", RELEASE_NAMESPACE, "--wait"]);
        }
    }
}

/// Weft's objects still in the cluster: anything in the release namespace but what
/// Kubernetes itself puts in every namespace, its webhook configuration and its cluster roles.
/// (The CRDs are the test cluster's, not the release's.)
async fn leftovers(client: &Client) -> Result<Vec<String>> {
    let mut left = Vec::new();
    let namespaced: &[(&str, &str, &str, &[&str])] = &[
        ("apps", "v1", "Deployment", &[]),
        ("", "v1", "Pod", &[]),
        ("", "v1", "Service", &[]),
        ("", "v1", "ConfigMap", &["kube-root-ca.crt"]),
        ("", "v1", "Secret", &[]),
        ("", "v1", "ServiceAccount", &["default"]),
        ("coordination.k8s.io", "v1", "Lease", &[]),
        ("rbac.authorization.k8s.io", "v1", "Role", &[]),
        ("rbac.authorization.k8s.io", "v1", "RoleBinding", &[]),
        ("policy", "v1", "PodDisruptionBudget", &[]),
    ];
    for (group, version, kind, allowed) in namespaced {
        for name in names(client, group, version, kind, Some(RELEASE_NAMESPACE)).await? {
            if !allowed.contains(&name.as_str()) {
                left.push(format!("{kind} {RELEASE_NAMESPACE}/{name}"));
            }
        }
    }
    let cluster_scoped: &[(&str, &str, &str, &str)] = &[
        ("admissionregistration.k8s.io", "v1", "MutatingWebhookConfiguration", "weft"),
        ("rbac.authorization.k8s.io", "v1", "ClusterRole", "weft"),
        ("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "weft"),
    ];
    for (group, version, kind, marker) in cluster_scoped {
        for name in names(client, group, version, kind, None).await? {
            if name.contains(marker) {
                left.push(format!("{kind} {name}"));
            }
        }
    }
    Ok(left)
}

async fn names(
    client: &Client,
    group: &str,
    version: &str,
    kind: &str,
    ns: Option<&str>,
) -> Result<Vec<String>> {
    let resource = kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(group, version, kind));
    let api: Api<kube::api::DynamicObject> = match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    let list = api.list(&ListParams::default()).await.with_context(|| format!("listing {kind}"))?;
    Ok(list.items.into_iter().filter_map(|o| o.metadata.name).collect())
}

async fn label_for_injection(client: &Client, namespace: &str) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let patch = json!({"metadata": {"labels": {"weft.dev/inject": "enabled"}}});
    namespaces.patch(namespace, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// The pods of applied manifests, once every Deployment among them is available.
struct Running {
    namespace: String,
    pods: Vec<Pod>,
}

impl Running {
    /// The first pod whose `app` label is `app`.
    fn pod(&self, app: &str) -> Result<&Pod> {
        self.pods
            .iter()
            .find(|p| p.metadata.labels.as_ref().and_then(|l| l.get("app")).is_some_and(|a| a == app))
            .with_context(|| format!("no pod of app {app} in {}", self.namespace))
    }

    /// The sum of `weft_requests_total` in `direction` over the proxies of app `app`'s pods.
    async fn requests_total_of(&self, app: &str, direction: &str) -> Result<f64> {
        let mut total = 0.0;
        for pod in self
            .pods
            .iter()
            .filter(|p| p.metadata.labels.as_ref().and_then(|l| l.get("app")).is_some_and(|a| a == app))
        {
            total += requests_total(pod, direction).await?;
        }
        Ok(total)
    }
}

/// `examples/bookinfo.yaml` with the demo image built here, applied into `namespace`.
async fn deploy_bookinfo(client: &Client, namespace: &str, images: &ImageSet) -> Result<Running> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bookinfo.yaml");
    let manifests = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let manifests = manifests.replace(DEMO_IMAGE_IN_EXAMPLES, &images.demo.name);
    ensure!(
        manifests.contains(&images.demo.name),
        "examples/bookinfo.yaml no longer names {DEMO_IMAGE_IN_EXAMPLES}"
    );
    apply_and_wait(client, namespace, &manifests).await
}

/// The image `examples/bookinfo.yaml` names, replaced by the locally built one.
const DEMO_IMAGE_IN_EXAMPLES: &str = "weft.local/demo:0.1.0";

/// One demo Deployment `app` (no Service) in `namespace`.
async fn deploy_demo(client: &Client, namespace: &str, images: &ImageSet, app: &str) -> Result<Running> {
    let manifest = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": app},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": app}},
            "template": {
                "metadata": {"labels": {"app": app}},
                "spec": {"containers": [{
                    "name": "demo",
                    "image": images.demo.name,
                    "env": [{"name": "SERVICE", "value": app}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": APP_PORT}, "periodSeconds": 1},
                }]},
            },
        },
    });
    apply_and_wait(client, namespace, &serde_json::to_string(&manifest)?).await
}

async fn apply_and_wait(client: &Client, namespace: &str, yaml: &str) -> Result<Running> {
    let applied = apply::apply_yaml(client, yaml, Some(namespace)).await?;
    for object in &applied {
        if object.types.as_ref().is_some_and(|t| t.kind == "Deployment") {
            wait_available(client, namespace, object.metadata.name.as_deref().unwrap_or_default()).await?;
        }
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pods = pods.list(&ListParams::default()).await?.items;
    Ok(Running { namespace: namespace.to_owned(), pods })
}

/// Waits until Deployment `name` has all its replicas available and updated; on timeout the
/// error carries the kubelet's reasons for every pod that is not ready.
async fn wait_available(client: &Client, namespace: &str, name: &str) -> Result<()> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let deadline = Instant::now() + START;
    loop {
        let deployment = deployments.get(name).await?;
        let want = deployment.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let status = deployment.status.unwrap_or_default();
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
            bail!(
                "Deployment {namespace}/{name} not available after {}s:\n{}",
                START.as_secs(),
                node::pod_problems(&pods, &selector).await
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

fn is_injected(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| {
        s.init_containers.iter().flatten().any(|c| c.name == "weft-proxy")
            || s.containers.iter().any(|c| c.name == "weft-proxy")
    })
}

/// The pod runs the redirection init container, the proxy as a native sidecar and the app,
/// and the proxy and the app are both started and ready ("2/2").
fn assert_injected_and_ready(pod: &Pod) -> Result<()> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let spec = pod.spec.as_ref().context("no spec")?;
    let sidecar = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "weft-proxy")
        .with_context(|| format!("pod {name} has no weft-proxy init container: not injected"))?;
    ensure!(
        sidecar.restart_policy.as_deref() == Some("Always"),
        "the proxy is not a native sidecar in {name}"
    );
    let status = pod.status.as_ref().context("no status")?;
    let proxy = status
        .init_container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == "weft-proxy")
        .context("no status for the proxy")?;
    ensure!(
        proxy.ready && proxy.started == Some(true),
        "the proxy in {name} is not ready: {:?}",
        proxy.state
    );
    let apps: Vec<_> = status.container_statuses.iter().flatten().collect();
    ensure!(!apps.is_empty() && apps.iter().all(|c| c.ready), "the app in {name} is not ready: {apps:?}");
    Ok(())
}

fn pod_ip(pod: &Pod) -> Result<IpAddr> {
    let ip = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()).context("the pod has no IP")?;
    Ok(ip.parse()?)
}

/// A GET from the host to a pod's address (routed into the node's namespace).
async fn get(ip: IpAddr, port: u16, path: &str) -> Result<(u16, String)> {
    Ok(weft_e2e::http::get(SocketAddr::new(ip, port), &ip.to_string(), path).await?)
}

/// The sum of `weft_requests_total` samples in `direction` on a pod's proxy.
async fn requests_total(pod: &Pod, direction: &str) -> Result<f64> {
    let (status, metrics) = get(pod_ip(pod)?, ADMIN_PORT, "/metrics").await?;
    ensure!(status == 200, "/metrics answered {status}");
    let wanted = format!("direction=\"{direction}\"");
    Ok(metrics
        .lines()
        .filter(|l| l.starts_with("weft_requests_total{") && l.contains(&wanted))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum())
}

/// What the demo app's `/call` answered.
#[derive(Debug)]
struct Call {
    status: BTreeMap<String, u64>,
    versions: BTreeMap<String, u64>,
    errors: u64,
}

impl Call {
    fn ok(&self) -> u64 {
        self.status.get("200").copied().unwrap_or(0)
    }
}

/// Has the demo app in `pod` send `n` requests to `url` (`concurrency` at a time).
async fn call(pod: &Pod, url: &str, n: u32, concurrency: u32) -> Result<Call> {
    let path = format!("/call?url={}&n={n}&concurrency={concurrency}", encode(url));
    let (status, body) = get(pod_ip(pod)?, APP_PORT, &path).await?;
    ensure!(status == 200, "/call answered {status}: {body}");
    let json: Value = serde_json::from_str(&body).with_context(|| format!("/call answered {body}"))?;
    let counts = |key: &str| -> BTreeMap<String, u64> {
        json[key]
            .as_object()
            .map(|o| o.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect())
            .unwrap_or_default()
    };
    Ok(Call {
        status: counts("status"),
        versions: counts("versions"),
        errors: json["errors"].as_u64().unwrap_or(0),
    })
}

fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Job whose one container fetches `url` once with the demo binary and exits, in a meshed
/// namespace: it is injected, and it completes although its proxy runs on.
async fn run_job(client: &Client, namespace: &str, images: &ImageSet, url: &str) -> Result<()> {
    let job = json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "fetch-once"},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "fetch", "image": images.demo.name, "args": ["get", url]}],
            }},
        },
    });
    apply::apply_yaml(client, &serde_json::to_string(&job)?, Some(namespace)).await?;
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let deadline = Instant::now() + START;
    loop {
        let status = jobs.get("fetch-once").await?.status.unwrap_or_default();
        if status.succeeded.unwrap_or(0) >= 1 {
            break;
        }
        if status.failed.unwrap_or(0) >= 1 || Instant::now() >= deadline {
            bail!(
                "the Job did not complete (failed: {:?}):\n{}",
                status.failed,
                node::pod_problems(&pods, "job-name=fetch-once").await
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let pod = pods.list(&ListParams::default().labels("job-name=fetch-once")).await?.items;
    let pod = pod.first().context("the Job's pod is gone")?;
    ensure!(is_injected(pod), "the Job's pod was not injected");
    Ok(())
}

/// Runs batches of requests from `client_pod` to `url` while the operator's pod is deleted
/// and replaced; every batch must succeed in full, and at least one must have run while no
/// operator was ready.
async fn operator_deleted_under_load(client: &Client, client_pod: &Pod, url: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let selector = "app.kubernetes.io/name=weft-operator";
    let old: Vec<String> = pods
        .list(&ListParams::default().labels(selector))
        .await?
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    ensure!(!old.is_empty(), "no operator pod to delete");

    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let load_pod = client_pod.clone();
    let load_url = url.to_owned();
    let load = tokio::spawn(async move {
        let mut batches = Vec::new();
        // Bounded: at most 200 batches of 20 requests, and the caller stops it sooner.
        for _ in 0..200 {
            if *stop_rx.borrow_and_update() {
                break;
            }
            let started = Instant::now();
            let result = call(&load_pod, &load_url, 20, 2).await;
            batches.push((started, Instant::now(), result));
        }
        batches
    });

    let deleted_at = Instant::now();
    for name in &old {
        pods.delete(name, &DeleteParams::default()).await?;
    }
    // The replacement is ready when a pod that is not one of the old ones is Ready and the
    // old ones are gone.
    let deadline = deleted_at + START;
    let replaced_at = loop {
        let now = pods.list(&ListParams::default().labels(selector)).await?.items;
        let old_gone = now.iter().all(|p| !old.contains(p.metadata.name.as_ref().unwrap_or(&String::new())));
        if old_gone && !now.is_empty() && now.iter().all(|p| node::pod_problem(p).is_none()) {
            break Instant::now();
        }
        if Instant::now() >= deadline {
            let _ = stop_tx.send(true);
            bail!("the operator was not replaced in time:\n{}", node::pod_problems(&pods, selector).await);
        }
        tokio::time::sleep(POLL).await;
    };
    let _ = stop_tx.send(true);
    let batches = load.await?;
    ensure!(!batches.is_empty(), "no batch ran");
    let mut during = 0;
    for (started, ended, result) in &batches {
        let call = result.as_ref().map_err(|e| anyhow::anyhow!("a batch failed: {e:#}"))?;
        ensure!(call.ok() == 20 && call.errors == 0, "a batch lost requests: {call:?}");
        // Wholly between the deletion and the replacement's readiness.
        if *started >= deleted_at && *ended <= replaced_at {
            during += 1;
        }
    }
    ensure!(during > 0, "no batch overlapped the operator's absence ({} batches)", batches.len());
    eprintln!("[mesh]   {} batches of 20, {during} while the operator was away, all 200", batches.len());
    Ok(())
}
