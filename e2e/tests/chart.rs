//! The Helm chart (`charts/weft`) with the real helm against the real kube-apiserver: it lints
//! clean, renders Weft's own CRDs and an injector configuration the webhook accepts, and
//! `helm install` creates every object it renders.
//!
//! Needs the test cluster: `cargo xtask test`, or `cargo xtask cluster up` then `cargo test`.

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::ConfigMap};
use kube::{
    Api,
    api::DynamicObject,
    core::GroupVersionKind,
    discovery::{self, Scope},
};
use serde_json::Value;
use weft_e2e::{TestCluster, helm::chart_dir};
use weft_inject::InjectConfig;

fn helm(args: &[&str]) -> Result<String> {
    Ok(weft_e2e::helm::run(args)?)
}

fn documents(yaml: &str) -> Result<Vec<Value>> {
    Ok(weft_e2e::helm::documents(yaml)?)
}

#[test]
fn the_chart_lints_clean() -> Result<()> {
    let chart = chart_dir();
    let output = helm(&["lint", "--strict", &chart.to_string_lossy()])?;
    ensure!(output.contains("0 chart(s) failed"), "{output}");
    Ok(())
}

#[test]
fn the_chart_renders_weft_api_crds_and_a_config_the_injector_accepts() -> Result<()> {
    let chart = chart_dir();
    let rendered = documents(&helm(&["template", "weft", &chart.to_string_lossy(), "--namespace", "mesh"])?)?;
    let crds: Vec<&Value> = rendered.iter().filter(|d| d["kind"] == "CustomResourceDefinition").collect();
    let expected: Vec<Value> = weft_api::crds().iter().map(serde_json::to_value).collect::<Result<_, _>>()?;
    ensure!(crds.len() == expected.len(), "{} CRDs rendered, {} defined", crds.len(), expected.len());
    for crd in expected {
        ensure!(
            crds.contains(&&crd),
            "the chart does not render {} as weft_api defines it",
            crd["metadata"]["name"]
        );
    }

    let injector = rendered
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "weft-injector")
        .context("no injector ConfigMap")?;
    let config =
        InjectConfig::from_yaml(injector["data"]["config.yaml"].as_str().context("no config.yaml")?)?;
    ensure!(
        config.proxy_image.ends_with(&format!("/proxy:{}", env!("CARGO_PKG_VERSION"))),
        "{}",
        config.proxy_image
    );
    ensure!(
        config.excluded_namespaces.contains("mesh") && config.excluded_namespaces.contains("kube-system")
    );
    ensure!(config.control_plane_address == "weft-operator.mesh.svc:15012");
    ensure!(config.resources.cpu_limit.is_none() && config.resources.memory_limit.as_deref() == Some("64Mi"));

    let without =
        documents(&helm(&["template", "weft", &chart.to_string_lossy(), "--set", "crds.install=false"])?)?;
    ensure!(
        !without.iter().any(|d| d["kind"] == "CustomResourceDefinition"),
        "crds.install=false still renders CRDs"
    );
    Ok(())
}

#[tokio::test]
async fn helm_install_creates_every_object_the_chart_renders() -> Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    let namespace = cluster.namespace("chart").await?;
    let chart = chart_dir();
    let release = "weft";
    // The CRDs are already installed (by the cluster, from the same source) and owned by
    // another field manager, so the release leaves them out. Ignore keeps the release's
    // injector (which has no pods here) from blocking pods that other tests create.
    helm(&[
        "install",
        release,
        &chart.to_string_lossy(),
        "--namespace",
        namespace.name(),
        "--set",
        "crds.install=false",
        "--set",
        "webhook.failurePolicy=Ignore",
    ])?;
    let installed = async {
        let manifest = documents(&helm(&["get", "manifest", release, "--namespace", namespace.name()])?)?;
        let mut rendered: Vec<String> = manifest
            .iter()
            .map(|o| {
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap_or_default(),
                    o["metadata"]["name"].as_str().unwrap_or_default()
                )
            })
            .collect();
        rendered.sort();
        let expected = [
            "ClusterRole/weft-operator",
            "ClusterRoleBinding/weft-operator",
            "ConfigMap/weft-injector",
            "Deployment/weft-operator",
            "Deployment/weft-webhook",
            "Lease/weft-operator",
            "MutatingWebhookConfiguration/weft-sidecar-injector",
            "PodDisruptionBudget/weft-operator",
            "PodDisruptionBudget/weft-webhook",
            "Role/weft-operator",
            "RoleBinding/weft-operator",
            "Service/weft-operator",
            "Service/weft-webhook",
            "ServiceAccount/weft-operator",
            "ServiceAccount/weft-webhook",
        ];
        ensure!(rendered == expected, "the release holds {rendered:?}");
        for object in &manifest {
            let (api_version, kind) = (
                object["apiVersion"].as_str().unwrap_or_default(),
                object["kind"].as_str().unwrap_or_default(),
            );
            let name = object["metadata"]["name"].as_str().unwrap_or_default();
            let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
            let (resource, capabilities) =
                discovery::pinned_kind(&client, &GroupVersionKind::gvk(group, version, kind)).await?;
            let api: Api<DynamicObject> = match capabilities.scope {
                Scope::Namespaced => Api::namespaced_with(client.clone(), namespace.name(), &resource),
                Scope::Cluster => Api::all_with(client.clone(), &resource),
            };
            api.get(name).await.with_context(|| format!("{kind} {name} was not created"))?;
        }

        let configuration =
            Api::<MutatingWebhookConfiguration>::all(client.clone()).get("weft-sidecar-injector").await?;
        let webhook = &configuration.webhooks.as_deref().unwrap_or_default()[0];
        ensure!(
            webhook.side_effects == "None"
                && webhook.timeout_seconds == Some(5)
                && webhook.failure_policy.as_deref() == Some("Ignore")
        );
        ensure!(webhook.client_config.ca_bundle.is_none(), "caBundle is the operator's to set");
        let excluded = webhook
            .namespace_selector
            .as_ref()
            .and_then(|s| s.match_expressions.as_ref())
            .map(|e| e[0].values.clone().unwrap_or_default())
            .unwrap_or_default();
        ensure!(
            excluded.contains(&namespace.name().to_owned()) && excluded.contains(&"kube-system".to_owned()),
            "{excluded:?}"
        );

        let injector =
            Api::<ConfigMap>::namespaced(client.clone(), namespace.name()).get("weft-injector").await?;
        let text = injector.data.unwrap_or_default().remove("config.yaml").unwrap_or_default();
        InjectConfig::from_yaml(&text).context("the installed injector config")?;
        Ok(())
    }
    .await;
    // Uninstall even when a check failed: the release's cluster-scoped objects would clash with
    // the next run.
    let uninstalled = helm(&["uninstall", release, "--namespace", namespace.name(), "--wait"]);
    installed?;
    if let Err(error) = uninstalled {
        bail!("uninstall failed: {error}");
    }
    Ok(())
}
