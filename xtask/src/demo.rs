//! `cargo xtask demo`: the main job. Starts the local cluster (control plane and node), builds
//! and imports Weft's images when they changed, shows the apiserver refusing a bad
//! VirtualService, `helm install`s the chart, labels the demo namespace, rolls out the demo
//! apps and walks through canary, header routing, faults, retries, outlier detection, a
//! timeout, certificate rotation, STRICT mTLS and authorization (`weft_e2e::walkthrough`),
//! measuring each step with real requests and checking its numbers. On exit, Ctrl-C included,
//! it removes what the steps applied; the cluster, the mesh and the demo apps keep running.

use std::{path::Path, time::Instant};

use anyhow::{Context, Result, bail};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::Value;
use weft_api::{VirtualService, labels::FIELD_MANAGER};
use weft_e2e::{
    cluster, mesh,
    walkthrough::{self, StepOutcome, Walkthrough},
};

const NAMESPACE: &str = "weft-demo";
const OUTSIDE: &str = "weft-demo-outside";

pub(crate) fn run() -> Result<()> {
    let started = Instant::now();
    println!("[demo] starting the local cluster and its node");
    crate::cluster::up()?;
    println!("[demo] building Weft's images (reused when nothing changed)");
    crate::images::run(false)?;
    let built = started.elapsed();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let outcomes = runtime.block_on(show())?;
    let failed: Vec<&StepOutcome> = outcomes.iter().filter(|o| !o.problems.is_empty()).collect();
    let steps: f64 = outcomes.iter().map(|o| o.took.as_secs_f64()).sum();
    println!(
        "\n== Summary: {:.0}s in all; cluster and images {:.0}s, install and rollout {:.0}s, steps {steps:.0}s ==",
        started.elapsed().as_secs_f64(),
        built.as_secs_f64(),
        (started.elapsed() - built).as_secs_f64() - steps
    );
    for outcome in &outcomes {
        let mark = if outcome.problems.is_empty() { "✔" } else { "✘" };
        println!("   {mark} {:<66} {:>5.1}s", outcome.title, outcome.took.as_secs_f64());
    }
    println!("\nThe cluster, Weft and the demo apps keep running: look around with");
    println!("  eval \"$(cargo xtask cluster env)\"");
    println!("  kubectl -n {NAMESPACE} get pods");
    println!("  kubectl apply -n {NAMESPACE} -f examples/walkthrough/02-canary-90-10.yaml");
    println!(
        "  kubectl -n {NAMESPACE} exec deploy/frontend-v1 -c frontend -- weft-demo get http://reviews.{NAMESPACE}.svc.cluster.local/"
    );
    println!("  cargo run -p weftctl -- check");
    println!("  cargo run -p weftctl -- stat deploy/frontend-v1 -n {NAMESPACE}");
    println!(
        "  cargo run -p weftctl -- explain -n {NAMESPACE} <frontend pod> http://reviews:9080/ -H 'end-user: jason'"
    );
    println!("`cargo xtask cluster down` stops it all.");
    if !failed.is_empty() {
        bail!("{} of {} steps measured something their YAML did not ask for", failed.len(), outcomes.len());
    }
    Ok(())
}

async fn show() -> Result<Vec<StepOutcome>> {
    let paths = cluster::Paths::from_env()?;
    let client = Client::try_from(cluster::admin_config(&paths).await?)?;
    walkthrough::create_namespaces(&client, NAMESPACE, OUTSIDE).await?;

    println!("\n== 0. A bad VirtualService is refused by the apiserver itself, naming the field ==");
    refuse_bad_virtual_service(&client).await?;

    println!("\n== Installing Weft ==");
    let images = mesh::built_images()?;
    let values = mesh::install(&client, &images, walkthrough::HELM_SETS).await?;
    println!(
        "helm upgrade --install weft charts/weft -n {} --create-namespace -f {} --set {}: operator and webhook ready",
        mesh::RELEASE_NAMESPACE,
        values.display(),
        walkthrough::HELM_SETS.join(" --set ")
    );
    println!("kubectl label namespace {NAMESPACE} weft.dev/inject=enabled");

    let walk = Walkthrough::new(client.clone(), NAMESPACE, OUTSIDE, say, true);
    let walked = tokio::select! {
        walked = walk.run(&images) => walked.map_err(anyhow::Error::from),
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    println!("\n[demo] cleaning up what the steps applied");
    let cleaned = walk.clean_up().await;
    let deleted = walkthrough::delete_namespace(&client, OUTSIDE).await;
    let outcomes = walked?;
    cleaned?;
    deleted?;
    Ok(outcomes)
}

fn say(line: &str) {
    println!("{line}");
}

async fn refuse_bad_virtual_service(client: &Client) -> Result<()> {
    let path = crate::codegen::repo_root().join("lib/api/tests/fixtures/invalid/vs-weights-not-100.yaml");
    let bad = read_yaml(&path)?;
    println!("kubectl apply -n {NAMESPACE} -f {} (weights 60 + 30)", path.display());
    let services: Api<VirtualService> = Api::namespaced(client.clone(), NAMESPACE);
    let name = bad["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    match services.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&bad)).await {
        Err(kube::Error::Api(status)) => println!("   ✔ refused: {}", status.message),
        Err(other) => return Err(other).context("applying the invalid VirtualService"),
        Ok(_) => bail!("the apiserver accepted a VirtualService whose weights sum to 90"),
    }
    Ok(())
}

fn read_yaml(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}
