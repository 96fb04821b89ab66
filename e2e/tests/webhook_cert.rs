//! The operator issues the injector's serving certificate and keeps the webhook configuration's
//! caBundle trusting it, against the real kube-apiserver: the Secret appears, the caBundle
//! verifies a TLS handshake with the webhook server serving that Secret under the Service's name,
//! and a renewal trusts both CAs until the webhook has reloaded.
//!
//! Needs the test cluster: `cargo xtask test`, or `cargo xtask cluster up` then `cargo test`.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::{
    admissionregistration::v1::{
        MutatingWebhook, MutatingWebhookConfiguration, ServiceReference, WebhookClientConfig,
    },
    core::v1::Secret,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::TlsConnector;
use weft_e2e::{TestCluster, webhook::pod_create_rule};
use weft_inject::InjectConfig;
use weft_operator::{Config, WebhookCertConfig, webhook_cert};
use weft_webhook::{
    server::{AppState, router, serve_tls},
    tls::CertStore,
};

const DEADLINE: Duration = Duration::from_secs(30);

/// A configuration shaped like the chart's (Service reference, no caBundle) that matches no
/// namespace, so it never stands in the way of other tests' pods.
async fn configuration(client: &Client, name: &str, namespace: &str) -> Result<()> {
    let configuration = MutatingWebhookConfiguration {
        metadata: ObjectMeta { name: Some(name.to_owned()), ..ObjectMeta::default() },
        webhooks: Some(vec![MutatingWebhook {
            name: "sidecar-injector.weft.dev".to_owned(),
            admission_review_versions: vec!["v1".to_owned()],
            side_effects: "None".to_owned(),
            client_config: WebhookClientConfig {
                service: Some(ServiceReference {
                    name: "weft-webhook".to_owned(),
                    namespace: namespace.to_owned(),
                    path: Some("/mutate".to_owned()),
                    port: Some(443),
                }),
                ..WebhookClientConfig::default()
            },
            namespace_selector: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                match_labels: Some([("weft.dev/e2e-never".to_owned(), "matches".to_owned())].into()),
                ..Default::default()
            }),
            rules: Some(vec![pod_create_rule()]),
            ..MutatingWebhook::default()
        }]),
    };
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &configuration)
        .await?;
    Ok(())
}

fn secret_data(secret: &Secret, key: &str) -> String {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .unwrap_or_default()
}

async fn ca_bundle(client: &Client, name: &str) -> Result<String> {
    let configuration = Api::<MutatingWebhookConfiguration>::all(client.clone()).get(name).await?;
    Ok(configuration.webhooks.unwrap_or_default()[0]
        .client_config
        .ca_bundle
        .as_ref()
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .unwrap_or_default())
}

/// Serves the Secret's certificate with the real webhook server and handshakes with it, trusting
/// only `bundle` and checking the Service's DNS name, as the apiserver does.
async fn handshake(
    secret: &Secret,
    bundle: &str,
    service_name: &str,
    scratch: &std::path::Path,
) -> Result<String> {
    std::fs::create_dir_all(scratch)?;
    let (cert, key) = (scratch.join("tls.crt"), scratch.join("tls.key"));
    std::fs::write(&cert, secret_data(secret, "tls.crt"))?;
    std::fs::write(&key, secret_data(secret, "tls.key"))?;
    let store = Arc::new(CertStore::load(&cert, &key)?);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    let server =
        tokio::spawn(serve_tls(listener, store, router(AppState::new(InjectConfig::default())), stopped));

    let mut roots = RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots.add(certificate?)?;
    }
    let client = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(address).await?;
    let mut tls = TlsConnector::from(Arc::new(client))
        .connect(ServerName::try_from(service_name.to_owned())?, tcp)
        .await?;
    tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: webhook\r\nconnection: close\r\n\r\n").await?;
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await?;
    stop.send(true)?;
    server.await?;
    Ok(answer)
}

#[tokio::test]
async fn the_operator_issues_the_webhook_certificate_and_keeps_the_ca_bundle() -> Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    let namespace = cluster.namespace("webhook-cert").await?;
    let ns = namespace.name().to_owned();
    let configuration_name = format!("weft-test-{ns}");
    configuration(&client, &configuration_name, &ns).await?;
    let cert_config = WebhookCertConfig {
        namespace: ns.clone(),
        service: "weft-webhook".to_owned(),
        secret: "weft-webhook-tls".to_owned(),
        configuration: configuration_name.clone(),
        lifetime: Duration::from_secs(90 * 86_400),
    };
    let mut config = Config::for_tests(&ns);
    config.watch_namespace = Some(ns.clone());
    config.webhook_cert = Some(cert_config.clone());
    let operator = weft_operator::start(client.clone(), config).await?;

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let issued =
        kube_runtime::wait::await_condition(secrets.clone(), "weft-webhook-tls", |s: Option<&Secret>| {
            s.is_some_and(|s| !secret_data(s, "tls.crt").is_empty())
        });
    let secret =
        tokio::time::timeout(DEADLINE, issued).await.context("no Secret issued")??.context("deleted")?;
    ensure!(secret.type_.as_deref() == Some("kubernetes.io/tls"));
    let first_ca = secret_data(&secret, "ca.crt");
    let bundle = ca_bundle(&client, &configuration_name).await?;
    ensure!(bundle.contains(first_ca.trim()), "the caBundle does not trust the issued CA");

    let scratch = std::env::temp_dir().join(format!("weft-e2e-webhook-cert-{}", std::process::id()));
    let answer = handshake(&secret, &bundle, &format!("weft-webhook.{ns}.svc"), &scratch).await?;
    ensure!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Renewal: mark the certificate as past half its lifetime; the next pass re-issues it and
    // the bundle trusts the new CA and, until the webhook has reloaded, the old one.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let aged = serde_json::json!({"metadata": {"annotations": {
        "weft.dev/not-before": (now - 100).to_string(), "weft.dev/not-after": (now + 10).to_string()}}});
    secrets.patch("weft-webhook-tls", &PatchParams::default(), &Patch::Merge(&aged)).await?;
    webhook_cert::reconcile(&client, &cert_config, "cluster.local").await?;
    let renewed = secrets.get("weft-webhook-tls").await?;
    let second_ca = secret_data(&renewed, "ca.crt");
    ensure!(second_ca != first_ca, "the renewal made a new CA");
    let bundle = ca_bundle(&client, &configuration_name).await?;
    ensure!(
        bundle.contains(second_ca.trim()) && bundle.contains(first_ca.trim()),
        "both CAs trusted during the renewal"
    );
    let answer =
        handshake(&renewed, &bundle, &format!("weft-webhook.{ns}.svc.cluster.local"), &scratch).await?;
    ensure!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    operator.shutdown().await;
    Api::<MutatingWebhookConfiguration>::all(client)
        .delete(&configuration_name, &DeleteParams::default())
        .await?;
    let _ = std::fs::remove_dir_all(scratch);
    Ok(())
}
