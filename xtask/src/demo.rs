//! `cargo xtask demo`: the main job, as far as it runs today. Starts the local cluster, applies
//! a canary (VirtualService + DestinationRule) as a user would, reads it back, shows the
//! apiserver rejecting a bad one with a message that names the field, and injects the proxy
//! into a pod of a labelled namespace through the real admission chain (the injector runs in
//! this process for the demo, registered by URL), then runs a sidecar pair with mTLS in this
//! process (`demo/mtls.rs`). The cluster stays up.

mod mtls;

use std::{fs, path::Path};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::Value;
use weft_api::{DestinationRule, VirtualService, labels::FIELD_MANAGER};
use weft_e2e::{
    cluster,
    webhook::{Registration, WebhookServer, enable_injection, pod},
};

const NAMESPACE: &str = "weft-demo";
const FIXTURES: &str = "lib/api/tests/fixtures";

pub(crate) fn run() -> Result<()> {
    crate::cluster::up()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(show())?;
    println!("\nThe cluster keeps running: `cargo xtask cluster down` stops it.");
    println!(
        "Next to land: the mesh CA (today the proxies' certificates come from files), container images and a real node, so injected pods run."
    );
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

    println!(
        "\n3. Label the namespace weft.dev/inject=enabled and create a plain pod: the injector adds the proxy"
    );
    enable_injection(&client, NAMESPACE).await?;
    let scratch = std::env::temp_dir().join(format!("weft-demo-webhook-{}", std::process::id()));
    let server = WebhookServer::start(&scratch).await?;
    let registration =
        Registration::create(&client, "weft-demo-injector", &server, "Fail", &[NAMESPACE]).await?;
    let shown = show_injection(&client, &registration).await;
    registration.delete().await?;
    server.stop().await;
    shown?;

    println!("\n4. A sidecar pair with mTLS (two proxies in this process, certificates from a fresh root)");
    let scratch = std::env::temp_dir().join(format!("weft-demo-mtls-{}", std::process::id()));
    let shown = mtls::show(&scratch).await;
    let _ = std::fs::remove_dir_all(&scratch);
    shown
}

async fn show_injection(client: &Client, registration: &Registration) -> Result<()> {
    registration.wait_until_injecting(NAMESPACE).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let name = format!("productpage-{}", std::process::id());
    let stored = pods.create(&PostParams::default(), &pod(&name, serde_json::json!({}))).await?;
    let spec = stored.spec.unwrap_or_default();
    for container in spec.init_containers.iter().flatten() {
        let role = match container.restart_policy.as_deref() {
            Some("Always") => "native sidecar",
            _ => "init",
        };
        let args = container.args.as_deref().unwrap_or_default().join(" ");
        println!("   pod {name}: {role} container {} {args}", container.name);
    }
    for container in &spec.containers {
        println!("   pod {name}: app container {}", container.name);
    }
    let volumes: Vec<&str> = spec.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
    println!("   pod {name}: volumes {volumes:?}");
    println!("   (no node runs it yet: the proxy image and a kubelet arrive with later work)");
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
