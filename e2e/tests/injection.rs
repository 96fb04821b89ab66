//! Sidecar injection through the real kube-apiserver: the webhook server runs in this test
//! process on 127.0.0.1 with its own CA, registered by URL and caBundle (as envtest does), and
//! pods are created the way users and controllers create them.
//!
//! Each test registers its own MutatingWebhookConfiguration, scoped by namespace name to the
//! namespaces it made, so tests running side by side never see each other's webhook.
//!
//! Needs the test cluster: `cargo xtask test`, or `cargo xtask cluster up` then `cargo test`.

use std::{
    fs,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::{
            MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, WebhookClientConfig,
        },
        apps::v1::Deployment,
        core::v1::{Namespace, Pod},
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement},
};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use serde_json::json;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use weft_e2e::{TestCluster, TestNamespace};
use weft_webhook::{
    InjectConfig,
    inject::{INIT_CONTAINER, PROXY_CONTAINER},
    server::{AppState, router, serve_tls},
    tls::CertStore,
};

/// How long the apiserver may take to start calling a newly registered webhook.
const WEBHOOK_REGISTERED: Duration = Duration::from_secs(30);

/// The webhook server, in this process, with a serving certificate for 127.0.0.1.
struct WebhookServer {
    address: SocketAddr,
    ca_pem: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl WebhookServer {
    async fn start(name: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("weft-e2e-webhook-{name}-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let (ca_pem, cert_path, key_path) = serving_certificate(&dir)?;
        let certs = Arc::new(CertStore::load(&cert_path, &key_path)?);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let task =
            tokio::spawn(serve_tls(listener, certs, router(AppState::new(InjectConfig::default())), stopped));
        Ok(Self { address, ca_pem, stop, task })
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// A CA and a serving certificate signed by it for 127.0.0.1; returns the CA's PEM and the
/// paths of the serving pair.
fn serving_certificate(dir: &std::path::Path) -> Result<(String, PathBuf, PathBuf)> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "weft e2e webhook CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
    params.distinguished_name.push(DnType::CommonName, "127.0.0.1");
    let cert = params.signed_by(&key, &issuer)?;
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    fs::write(&cert_path, cert.pem())?;
    fs::write(&key_path, key.serialize_pem())?;
    Ok((ca.pem(), cert_path, key_path))
}

/// A MutatingWebhookConfiguration like the chart's, but calling `url` and matching only the
/// given namespaces (by the name label the apiserver sets), so parallel tests stay apart.
struct Registration {
    name: String,
    client: Client,
}

impl Registration {
    async fn create(
        client: &Client,
        name: &str,
        url: String,
        ca_pem: &str,
        failure_policy: &str,
        namespaces: &[&str],
    ) -> Result<Self> {
        let configuration = MutatingWebhookConfiguration {
            metadata: ObjectMeta { name: Some(name.to_owned()), ..ObjectMeta::default() },
            webhooks: Some(vec![MutatingWebhook {
                name: "sidecar-injector.weft.dev".to_owned(),
                admission_review_versions: vec!["v1".to_owned()],
                side_effects: "None".to_owned(),
                failure_policy: Some(failure_policy.to_owned()),
                timeout_seconds: Some(5),
                client_config: WebhookClientConfig {
                    url: Some(url),
                    ca_bundle: Some(ByteString(ca_pem.as_bytes().to_vec())),
                    ..WebhookClientConfig::default()
                },
                namespace_selector: Some(LabelSelector {
                    match_labels: Some([("weft.dev/inject".to_owned(), "enabled".to_owned())].into()),
                    match_expressions: Some(vec![LabelSelectorRequirement {
                        key: "kubernetes.io/metadata.name".to_owned(),
                        operator: "In".to_owned(),
                        values: Some(namespaces.iter().map(|n| (*n).to_owned()).collect()),
                    }]),
                }),
                rules: Some(vec![RuleWithOperations {
                    operations: Some(vec!["CREATE".to_owned()]),
                    api_groups: Some(vec![String::new()]),
                    api_versions: Some(vec!["v1".to_owned()]),
                    resources: Some(vec!["pods".to_owned()]),
                    scope: Some("Namespaced".to_owned()),
                }]),
                ..MutatingWebhook::default()
            }]),
        };
        Api::<MutatingWebhookConfiguration>::all(client.clone())
            .create(&PostParams::default(), &configuration)
            .await
            .context("registering the webhook")?;
        Ok(Self { name: name.to_owned(), client: client.clone() })
    }

    async fn delete(self) -> Result<()> {
        Api::<MutatingWebhookConfiguration>::all(self.client)
            .delete(&self.name, &DeleteParams::default())
            .await?;
        Ok(())
    }
}

async fn labelled_namespace(cluster: &TestCluster, prefix: &str) -> Result<TestNamespace> {
    let namespace = cluster.namespace(prefix).await?;
    let patch = json!({"metadata": {"labels": {"weft.dev/inject": "enabled"}}});
    Api::<Namespace>::all(cluster.client())
        .patch(namespace.name(), &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(namespace)
}

fn pod(name: &str, annotations: serde_json::Value) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]}
    }))?)
}

fn init_container_names(pod: &Pod) -> Vec<String> {
    pod.spec.iter().flat_map(|s| s.init_containers.iter().flatten()).map(|c| c.name.clone()).collect()
}

fn is_injected(pod: &Pod) -> bool {
    init_container_names(pod) == [INIT_CONTAINER, PROXY_CONTAINER]
        && pod.metadata.annotations.as_ref().is_some_and(|a| a.contains_key("weft.dev/injected"))
}

/// The readiness signal for a new registration: a dry-run create (no side effects) that comes
/// back injected once the apiserver calls the webhook.
async fn wait_until_injecting(pods: &Api<Pod>) -> Result<()> {
    let deadline = Instant::now() + WEBHOOK_REGISTERED;
    let probe = pod("registration-probe", json!({}))?;
    loop {
        let answer = pods.create(&PostParams { dry_run: true, ..PostParams::default() }, &probe).await;
        if answer.as_ref().is_ok_and(is_injected) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the webhook was not called within {WEBHOOK_REGISTERED:?}: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn pods_in_a_labelled_namespace_are_stored_injected_and_others_untouched() -> Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    let meshed = labelled_namespace(cluster, "inject-on").await?;
    let plain = cluster.namespace("inject-off").await?;
    let server = WebhookServer::start("basic").await?;
    let registration = Registration::create(
        &client,
        meshed.name(),
        format!("https://{}/mutate", server.address),
        &server.ca_pem,
        "Fail",
        &[meshed.name(), plain.name()],
    )
    .await?;
    let meshed_pods: Api<Pod> = Api::namespaced(client.clone(), meshed.name());
    wait_until_injecting(&meshed_pods).await?;

    let stored = meshed_pods.create(&PostParams::default(), &pod("web", json!({}))?).await?;
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
        .create(&PostParams::default(), &pod("legacy", json!({"weft.dev/inject": "false"}))?)
        .await?;
    ensure!(init_container_names(&opted_out).is_empty(), "an opted-out pod is untouched");

    let unlabelled = Api::<Pod>::namespaced(client.clone(), plain.name())
        .create(&PostParams::default(), &pod("web", json!({}))?)
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
    let server = WebhookServer::start("deploy").await?;
    let registration = Registration::create(
        &client,
        namespace.name(),
        format!("https://{}/mutate", server.address),
        &server.ca_pem,
        "Fail",
        &[namespace.name()],
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace.name());
    wait_until_injecting(&pods).await?;

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
        let server = WebhookServer::start(prefix).await?;
        let registration = Registration::create(
            &client,
            namespace.name(),
            format!("https://{}/mutate", server.address),
            &server.ca_pem,
            policy,
            &[namespace.name()],
        )
        .await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace.name());
        // The registration is live (and has this policy) before the webhook goes away.
        wait_until_injecting(&pods).await?;
        server.stop().await;

        let answer = pods.create(&PostParams::default(), &pod("while-down", json!({}))?).await;
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
