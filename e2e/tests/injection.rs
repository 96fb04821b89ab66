//! Sidecar injection through the real kube-apiserver: the webhook server runs in this test
//! process on 127.0.0.1 with its own CA, registered by URL and caBundle (as envtest does), and
//! pods are created the way users and controllers create them.
//!
//! Each test registers its own MutatingWebhookConfiguration, scoped by namespace name to the
//! namespaces it made, so tests running side by side never see each other's webhook.
//!
//! Needs the test cluster: `cargo xtask test`, or `cargo xtask cluster up` then `cargo test`.

use std::path::PathBuf;

use anyhow::{Result, bail, ensure};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod};
use kube::{
    Api,
    api::{ObjectMeta, PostParams, WatchEvent, WatchParams},
};
use serde_json::json;
use weft_e2e::{
    TestCluster, TestNamespace,
    webhook::{Registration, WebhookServer, enable_injection, init_container_names, is_injected, pod},
};
use weft_inject::{INIT_CONTAINER, PROXY_CONTAINER};

async fn labelled_namespace(cluster: &TestCluster, prefix: &str) -> Result<TestNamespace> {
    let namespace = cluster.namespace(prefix).await?;
    enable_injection(&cluster.client(), namespace.name()).await?;
    Ok(namespace)
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("weft-e2e-webhook-{name}-{}", std::process::id()))
}

#[tokio::test]
async fn pods_in_a_labelled_namespace_are_stored_injected_and_others_untouched() -> Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    let meshed = labelled_namespace(cluster, "inject-on").await?;
    let plain = cluster.namespace("inject-off").await?;
    let server = WebhookServer::start(&scratch("basic")).await?;
    let registration =
        Registration::create(&client, meshed.name(), &server, "Fail", &[meshed.name(), plain.name()]).await?;
    registration.wait_until_injecting(meshed.name()).await?;
    let meshed_pods: Api<Pod> = Api::namespaced(client.clone(), meshed.name());

    let stored = meshed_pods.create(&PostParams::default(), &pod("web", json!({}))).await?;
    ensure!(is_injected(&stored), "stored pod was not injected: {:?}", init_container_names(&stored));
    let proxy = stored.spec.as_ref().and_then(|s| s.init_containers.as_ref()).and_then(|c| c.get(1)).unwrap();
    ensure!(proxy.restart_policy.as_deref() == Some("Always"), "the proxy is a native sidecar");
    let volumes: Vec<&str> =
        stored.spec.iter().flat_map(|s| s.volumes.iter().flatten()).map(|v| v.name.as_str()).collect();
    ensure!(
        volumes.contains(&"weft-token") && volumes.contains(&"weft-trust-bundle"),
        "volumes: {volumes:?}"
    );

    let opted_out = meshed_pods
        .create(&PostParams::default(), &pod("legacy", json!({"weft.dev/inject": "false"})))
        .await?;
    ensure!(init_container_names(&opted_out).is_empty(), "an opted-out pod is untouched");

    let unlabelled = Api::<Pod>::namespaced(client.clone(), plain.name())
        .create(&PostParams::default(), &pod("web", json!({})))
        .await?;
    ensure!(init_container_names(&unlabelled).is_empty(), "a pod in an unlabelled namespace is untouched");

    // A second admission of an injected pod (here: its copy created anew) adds nothing.
    let mut copy = stored.clone();
    copy.metadata = ObjectMeta {
        name: Some("web-copy".to_owned()),
        annotations: stored.metadata.annotations.clone(),
        ..ObjectMeta::default()
    };
    copy.status = None;
    if let Some(spec) = copy.spec.as_mut() {
        spec.node_name = None;
    }
    let copied = meshed_pods.create(&PostParams::default(), &copy).await?;
    ensure!(
        init_container_names(&copied) == [INIT_CONTAINER, PROXY_CONTAINER],
        "double injection: {:?}",
        init_container_names(&copied)
    );
    ensure!(
        copied.spec.as_ref().unwrap().volumes.as_ref().unwrap().len()
            == stored.spec.as_ref().unwrap().volumes.as_ref().unwrap().len()
    );

    registration.delete().await?;
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_deployments_pods_are_injected_when_the_controller_manager_creates_them() -> Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    let namespace = labelled_namespace(cluster, "inject-deploy").await?;
    let server = WebhookServer::start(&scratch("deploy")).await?;
    let registration =
        Registration::create(&client, namespace.name(), &server, "Fail", &[namespace.name()]).await?;
    registration.wait_until_injecting(namespace.name()).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace.name());

    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "reviews"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "reviews"}},
            "template": {
                "metadata": {"labels": {"app": "reviews"}},
                "spec": {"containers": [{"name": "reviews", "image": "registry.example/reviews:1"}]}
            }
        }
    }))?;
    Api::<Deployment>::namespaced(client.clone(), namespace.name())
        .create(&PostParams::default(), &deployment)
        .await?;

    // Deployment -> ReplicaSet -> Pod, by the controller-manager; watch for the pod.
    let params = WatchParams::default().labels("app=reviews").timeout(60);
    let mut events = pods.watch(&params, "0").await?.boxed();
    let created = loop {
        match events.try_next().await? {
            Some(WatchEvent::Added(pod)) => break pod,
            Some(WatchEvent::Error(status)) => bail!("watch failed: {}", status.message),
            Some(_) => continue,
            None => bail!("no pod for the Deployment within 60s"),
        }
    };
    ensure!(
        is_injected(&created),
        "the controller-made pod was not injected: {:?}",
        init_container_names(&created)
    );
    let creator = created.metadata.owner_references.iter().flatten().next().map(|o| o.kind.clone());
    ensure!(creator.as_deref() == Some("ReplicaSet"), "made by {creator:?}");

    registration.delete().await?;
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn with_the_webhook_down_the_failure_policy_decides() -> Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    for (policy, prefix) in [("Fail", "down-fail"), ("Ignore", "down-ignore")] {
        let namespace = labelled_namespace(cluster, prefix).await?;
        let server = WebhookServer::start(&scratch(prefix)).await?;
        let registration =
            Registration::create(&client, namespace.name(), &server, policy, &[namespace.name()]).await?;
        // The registration is live (and has this policy) before the webhook goes away.
        registration.wait_until_injecting(namespace.name()).await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace.name());
        server.stop().await;

        let answer = pods.create(&PostParams::default(), &pod("while-down", json!({}))).await;
        match (policy, answer) {
            ("Fail", Err(kube::Error::Api(status))) => {
                ensure!(status.message.contains("failed calling webhook"), "Fail: {}", status.message)
            }
            ("Ignore", Ok(stored)) => {
                ensure!(init_container_names(&stored).is_empty(), "Ignore stores the pod un-injected")
            }
            (policy, other) => bail!("{policy}: unexpected answer {other:?}"),
        }
        registration.delete().await?;
    }
    Ok(())
}
