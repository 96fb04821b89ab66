//! `cargo xtask demo`: the main job, as far as it runs today. Starts the local cluster (control
//! plane and node), applies a canary (VirtualService + DestinationRule) as a user would, reads
//! it back, shows the apiserver rejecting a bad one with a message that names the field, builds
//! Weft's images and `helm install`s the chart onto the node, rolls out the demo apps in a
//! labelled namespace and shows them running with their proxies and a request crossing the
//! mesh, then runs a sidecar pair with mTLS in this process (`demo/mtls.rs`). The cluster and
//! the release stay up.

mod mtls;

use std::{fs, path::Path};

use anyhow::{Context, Result};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::Value;
use weft_api::{DestinationRule, VirtualService, labels::FIELD_MANAGER};
use weft_e2e::{cluster, mesh, webhook::enable_injection};

const NAMESPACE: &str = "weft-demo";
const FIXTURES: &str = "lib/api/tests/fixtures";

pub(crate) fn run() -> Result<()> {
    crate::cluster::up()?;
    crate::images::run(false)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(show())?;
    println!("\nThe cluster and the release keep running: look around with");
    println!("  eval \"$(cargo xtask cluster env)\"; kubectl get pods -A");
    println!("`cargo xtask cluster down` stops it all.");
    println!("Next to land: PeerAuthentication STRICT and authorization, resilience policies in the proxy.");
    Ok(())
}

async fn show() -> Result<()> {
    let paths = cluster::Paths::from_env()?;
    let client = Client::try_from(cluster::admin_config(&paths).await?)?;
    let root = crate::codegen::repo_root();
    let apply = PatchParams::apply(FIELD_MANAGER).force();

    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let namespace =
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}});
    namespaces.patch(NAMESPACE, &apply, &Patch::Apply(&namespace)).await?;

    println!("\n1. A canary: 90% of `reviews` to subset v1, 10% to v2 (Istio YAML, apiVersion changed)");
    let rule = read_fixture(&root, "valid/dr-subsets-outlier.yaml")?;
    let canary = read_fixture(&root, "valid/vs-canary-split.yaml")?;
    let rules: Api<DestinationRule> = Api::namespaced(client.clone(), NAMESPACE);
    let services: Api<VirtualService> = Api::namespaced(client.clone(), NAMESPACE);
    let rule = rules.patch(&name_of(&rule), &apply, &Patch::Apply(&rule)).await?;
    let canary = services.patch(&name_of(&canary), &apply, &Patch::Apply(&canary)).await?;
    let subsets: Vec<&str> = rule.spec.subsets.iter().map(|s| s.name.as_str()).collect();
    println!(
        "   stored DestinationRule {} for host {} with subsets {subsets:?}",
        name(&rule.metadata),
        rule.spec.host
    );
    for route in &canary.spec.http {
        for destination in &route.route {
            println!(
                "   stored VirtualService {}: {} -> {}/{} weight {}",
                name(&canary.metadata),
                canary.spec.hosts.join(","),
                destination.destination.host,
                destination.destination.subset.as_deref().unwrap_or("-"),
                destination.weight.unwrap_or(100)
            );
        }
    }

    println!("\n2. A bad one is refused by the apiserver itself, naming the field:");
    let bad = read_fixture(&root, "invalid/vs-weights-not-100.yaml")?;
    match services.patch(&name_of(&bad), &apply, &Patch::Apply(&bad)).await {
        Err(kube::Error::Api(status)) => println!("   {}", status.message),
        Err(other) => return Err(other).context("applying the invalid VirtualService"),
        Ok(_) => anyhow::bail!("the apiserver accepted a VirtualService whose weights sum to 90"),
    }

    println!("\n3. helm install Weft onto the node, label the namespace, roll out the demo apps");
    show_mesh(&client).await?;

    println!("\n4. A sidecar pair with mTLS (two proxies in this process, certificates from a fresh root)");
    let scratch = std::env::temp_dir().join(format!("weft-demo-mtls-{}", std::process::id()));
    let shown = mtls::show(&scratch).await;
    let _ = std::fs::remove_dir_all(&scratch);
    shown
}

async fn show_mesh(client: &Client) -> Result<()> {
    let images = mesh::built_images()?;
    let values = mesh::install(client, &images, &["operator.replicas=1", "webhook.replicas=1"]).await?;
    println!(
        "   helm upgrade --install weft charts/weft -n {} --create-namespace -f {} --set crds.install=false: operator and webhook ready",
        mesh::RELEASE_NAMESPACE,
        values.display()
    );
    enable_injection(client, NAMESPACE).await?;
    println!("   kubectl label namespace {NAMESPACE} weft.dev/inject=enabled");
    let pods = mesh::apply_and_wait(client, NAMESPACE, &mesh::bookinfo(&images)?).await?;
    println!("   kubectl apply -n {NAMESPACE} -f examples/bookinfo.yaml: every Deployment available");
    println!("   {:<34} {:<6} {:<12} CONTAINERS", "POD", "READY", "IP");
    for pod in &pods {
        let status = pod.status.clone().unwrap_or_default();
        let statuses: Vec<_> = status
            .init_container_statuses
            .iter()
            .flatten()
            .filter(|c| c.started == Some(true))
            .chain(status.container_statuses.iter().flatten())
            .collect();
        let ready = statuses.iter().filter(|c| c.ready).count();
        let names: Vec<&str> = statuses.iter().map(|c| c.name.as_str()).collect();
        println!(
            "   {:<34} {:<6} {:<12} {}",
            name(&pod.metadata),
            format!("{ready}/{}", statuses.len()),
            status.pod_ip.unwrap_or_default(),
            names.join(", ")
        );
    }
    let frontend = pods.iter().find(|p| mesh::app_of(p) == "frontend").context("no frontend pod")?;
    let url = format!("http://reviews.{NAMESPACE}.svc.cluster.local/");
    let report = mesh::call(frontend, &url, 100, 4).await?;
    println!("   frontend -> {url} x100: status {:?}, versions {:?}", report.status, report.versions);
    println!("   (the canary of step 1 is live: the proxies split reviews about 90/10 between v1 and v2)");
    let outbound = mesh::requests_total(frontend, "outbound").await?;
    println!("   the frontend's proxy has counted {outbound} outbound requests (weft_requests_total)");
    // The identities came from the mesh CA; the requests crossed between proxies over mTLS.
    let (_, ready) = mesh::get(frontend, mesh::ADMIN_PORT, "/ready").await?;
    let identity = ready
        .lines()
        .find_map(|l| l.strip_prefix("identity: "))
        .context("the frontend's proxy has no identity")?;
    println!("   the frontend's proxy is {identity}, its certificate issued by the operator's CA");
    let mut mtls = 0.0;
    for pod in pods.iter().filter(|p| mesh::app_of(p) == "reviews") {
        let (_, metrics) = mesh::get(pod, mesh::ADMIN_PORT, "/metrics").await?;
        mtls += metrics
            .lines()
            .filter(|l| {
                l.starts_with("weft_requests_total{") && l.contains("tls=\"true\"") && l.contains(identity)
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>();
    }
    println!(
        "   the reviews proxies counted {mtls} requests from it over mTLS (tls=\"true\", its SPIFFE ID as source)"
    );
    Ok(())
}

fn read_fixture(root: &Path, name: &str) -> Result<Value> {
    let path = root.join(FIXTURES).join(name);
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut object: Value =
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    object["metadata"]["namespace"] = NAMESPACE.into();
    Ok(object)
}

fn name_of(object: &Value) -> String {
    object["metadata"]["name"].as_str().unwrap_or_default().to_owned()
}

fn name(meta: &kube::api::ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or_default()
}
