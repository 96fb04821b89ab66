//! Weft's injector as tests and benchmarks run it against the test cluster: the webhook server
//! in the calling process on 127.0.0.1 with a CA of its own, registered with the apiserver by
//! URL and caBundle (as envtest does).

use std::{
    fs,
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::Router;
use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::{
            MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, WebhookClientConfig,
        },
        core::v1::{Namespace, Pod},
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement},
};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use weft_api::labels::{INJECT_LABEL, INJECTED_ANNOTATION};
use weft_inject::{INIT_CONTAINER, InjectConfig, PROXY_CONTAINER};
use weft_webhook::{
    server::{AppState, router, serve_tls},
    tls::CertStore,
};

use crate::cluster::Error;

/// How long the apiserver may take to start calling a newly registered webhook.
pub const REGISTRATION_DEADLINE: Duration = Duration::from_secs(30);

/// The webhook server, running on the caller's runtime until [`WebhookServer::stop`].
#[derive(Debug)]
pub struct WebhookServer {
    address: SocketAddr,
    ca_pem: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl WebhookServer {
    /// Serves the injector's routes with the default configuration.
    pub async fn start(scratch: &Path) -> Result<Self, Error> {
        Self::start_with(scratch, router(AppState::new(InjectConfig::default()))).await
    }

    /// Serves `routes` (the injector's, perhaps wrapped) over TLS; keys go to `scratch`.
    pub async fn start_with(scratch: &Path, routes: Router) -> Result<Self, Error> {
        let io = |context: &'static str| move |source| Error::io(context, source);
        fs::create_dir_all(scratch).map_err(io("creating the webhook's directory"))?;
        let (ca_pem, cert, key) = serving_certificate()?;
        let (cert_path, key_path) = (scratch.join("tls.crt"), scratch.join("tls.key"));
        fs::write(&cert_path, cert).map_err(io("writing the webhook certificate"))?;
        fs::write(&key_path, key).map_err(io("writing the webhook key"))?;
        let certs = CertStore::load(&cert_path, &key_path)
            .map_err(|e| Error::Webhook(format!("loading the webhook certificate: {e}")))?;
        let listener = TcpListener::bind("127.0.0.1:0").await.map_err(io("binding the webhook port"))?;
        let address = listener.local_addr().map_err(io("reading the webhook address"))?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(serve_tls(listener, Arc::new(certs), routes, stopped));
        Ok(Self { address, ca_pem, stop, task })
    }

    /// The URL the apiserver calls.
    pub fn url(&self) -> String {
        format!("https://{}/mutate", self.address)
    }

    /// The CA that signed the serving certificate, for the registration's caBundle.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Stops accepting and closes every connection, keep-alive ones included.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// A CA, and a serving certificate and key for 127.0.0.1 signed by it, all PEM.
fn serving_certificate() -> Result<(String, String, String), Error> {
    let pki = |e: rcgen::Error| Error::Webhook(format!("generating the webhook's certificates: {e}"));
    let ca_key = KeyPair::generate().map_err(pki)?;
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "weft e2e webhook CA");
    let ca = ca_params.self_signed(&ca_key).map_err(pki)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().map_err(pki)?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
    params.distinguished_name.push(DnType::CommonName, "127.0.0.1");
    let cert = params.signed_by(&key, &issuer).map_err(pki)?;
    Ok((ca.pem(), cert.pem(), key.serialize_pem()))
}

/// A MutatingWebhookConfiguration like the chart's, calling a [`WebhookServer`] and matching
/// only the named namespaces (by the name label the apiserver sets), so that tests running side
/// by side never reach each other's webhook.
pub struct Registration {
    name: String,
    client: Client,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration").field("name", &self.name).finish_non_exhaustive()
    }
}

impl Registration {
    pub async fn create(
        client: &Client,
        name: &str,
        server: &WebhookServer,
        failure_policy: &str,
        namespaces: &[&str],
    ) -> Result<Self, Error> {
        let configuration = MutatingWebhookConfiguration {
            metadata: ObjectMeta { name: Some(name.to_owned()), ..ObjectMeta::default() },
            webhooks: Some(vec![MutatingWebhook {
                name: "sidecar-injector.weft.dev".to_owned(),
                admission_review_versions: vec!["v1".to_owned()],
                side_effects: "None".to_owned(),
                failure_policy: Some(failure_policy.to_owned()),
                timeout_seconds: Some(5),
                client_config: WebhookClientConfig {
                    url: Some(server.url()),
                    ca_bundle: Some(ByteString(server.ca_pem().as_bytes().to_vec())),
                    ..WebhookClientConfig::default()
                },
                namespace_selector: Some(LabelSelector {
                    match_labels: Some([(INJECT_LABEL.to_owned(), "enabled".to_owned())].into()),
                    match_expressions: Some(vec![LabelSelectorRequirement {
                        key: "kubernetes.io/metadata.name".to_owned(),
                        operator: "In".to_owned(),
                        values: Some(namespaces.iter().map(|n| (*n).to_owned()).collect()),
                    }]),
                }),
                rules: Some(vec![pod_create_rule()]),
                ..MutatingWebhook::default()
            }]),
        };
        Api::<MutatingWebhookConfiguration>::all(client.clone())
            .create(&PostParams::default(), &configuration)
            .await
            .map_err(Error::kube(format!("registering webhook {name}")))?;
        Ok(Self { name: name.to_owned(), client: client.clone() })
    }

    /// Waits until the apiserver calls the webhook for pods in `namespace`: a dry-run create
    /// (no side effects) comes back injected.
    pub async fn wait_until_injecting(&self, namespace: &str) -> Result<(), Error> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let probe = pod("registration-probe", serde_json::json!({}));
        let deadline = Instant::now() + REGISTRATION_DEADLINE;
        loop {
            let answer = pods.create(&PostParams { dry_run: true, ..PostParams::default() }, &probe).await;
            if answer.as_ref().is_ok_and(is_injected) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Webhook(format!(
                    "the apiserver did not call webhook {} within {REGISTRATION_DEADLINE:?}: {answer:?}",
                    self.name
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn delete(self) -> Result<(), Error> {
        Api::<MutatingWebhookConfiguration>::all(self.client)
            .delete(&self.name, &DeleteParams::default())
            .await
            .map_err(Error::kube(format!("deleting webhook {}", self.name)))?;
        Ok(())
    }
}

/// The rule the chart's webhook has: CREATE of Pods.
pub fn pod_create_rule() -> RuleWithOperations {
    RuleWithOperations {
        operations: Some(vec!["CREATE".to_owned()]),
        api_groups: Some(vec![String::new()]),
        api_versions: Some(vec!["v1".to_owned()]),
        resources: Some(vec!["pods".to_owned()]),
        scope: Some("Namespaced".to_owned()),
    }
}

/// Labels `namespace` for injection (`weft.dev/inject=enabled`).
pub async fn enable_injection(client: &Client, namespace: &str) -> Result<(), Error> {
    let patch = serde_json::json!({"metadata": {"labels": {INJECT_LABEL: "enabled"}}});
    Api::<Namespace>::all(client.clone())
        .patch(namespace, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(Error::kube(format!("labelling namespace {namespace}")))?;
    Ok(())
}

/// A one-container pod with the given annotations.
pub fn pod(name: &str, annotations: serde_json::Value) -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]}
    }))
    .expect("a well-formed pod")
}

/// The names of a pod's init containers.
pub fn init_container_names(pod: &Pod) -> Vec<String> {
    pod.spec.iter().flat_map(|s| s.init_containers.iter().flatten()).map(|c| c.name.clone()).collect()
}

/// Whether the pod carries exactly Weft's init container and sidecar and the status annotation.
pub fn is_injected(pod: &Pod) -> bool {
    init_container_names(pod) == [INIT_CONTAINER, PROXY_CONTAINER]
        && pod.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(INJECTED_ANNOTATION))
}
