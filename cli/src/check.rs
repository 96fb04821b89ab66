//! `weftctl check`: is the mesh healthy? Each line is one fact, ✔ or ✘ with how to fix it:
//! the CRDs and their versions, the operator and the webhook ready, the webhook's serving
//! certificate valid for its Service and signed by the `caBundle` the apiserver trusts, the
//! mesh's root CA and its expiry, the injected namespaces, and every meshed pod's proxy ready
//! (it is ready only with a config and an identity from the operator).

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        apps::v1::Deployment,
        core::v1::{ConfigMap, Namespace, Pod, Secret},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{Api, Client, api::ListParams};
use rustls::{
    RootCertStore,
    client::{WebPkiServerVerifier, danger::ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};
use serde::{Deserialize, Serialize};
use weft_api::labels::{INJECT_LABEL, INJECTED_ANNOTATION};
use weft_identity::CertInfo;

use crate::output::{unix, when};

/// Where the chart put things (its defaults).
#[derive(Clone, Debug)]
pub struct Install {
    pub namespace: String,
    pub operator: String,
    pub webhook: String,
    pub webhook_configuration: String,
    pub webhook_secret: String,
    pub trust_bundle: String,
}

impl Install {
    pub fn in_namespace(namespace: &str) -> Install {
        Install {
            namespace: namespace.into(),
            operator: "weft-operator".into(),
            webhook: "weft-webhook".into(),
            webhook_configuration: "weft-sidecar-injector".into(),
            webhook_secret: "weft-webhook-tls".into(),
            trust_bundle: "weft-trust-bundle".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub ok: bool,
    pub what: String,
    /// What to do when it is not ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn ok(what: impl Into<String>) -> Check {
    Check { ok: true, what: what.into(), fix: None }
}

fn fail(what: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { ok: false, what: what.into(), fix: Some(fix.into()) }
}

/// Every check; the proxies' only in `namespace` when one is given.
pub async fn run(client: &Client, install: &Install, namespace: Option<&str>, now: SystemTime) -> Vec<Check> {
    let mut checks = crds(client).await;
    for name in [&install.operator, &install.webhook] {
        checks.push(deployment(client, &install.namespace, name).await);
    }
    checks.extend(webhook_certificate(client, install, now).await);
    let (namespaces, injected) = injected_namespaces(client).await;
    checks.push(namespaces);
    checks.push(root_ca(client, install, &injected, now).await);
    checks.push(proxies(client, namespace).await);
    checks
}

async fn crds(client: &Client) -> Vec<Check> {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let mut checks = Vec::new();
    for expected in weft_api::crds() {
        let name = expected.metadata.name.clone().unwrap_or_default();
        let version =
            expected.spec.versions.iter().find(|v| v.storage).map(|v| v.name.clone()).unwrap_or_default();
        let fix = "install or upgrade the chart: helm upgrade --install weft charts/weft -n weft-system";
        checks.push(match api.get_opt(&name).await {
            Ok(Some(crd)) => {
                let established = crd
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Established" && c.status == "True"));
                let served = crd.spec.versions.iter().any(|v| v.name == version && v.served);
                match (established, served) {
                    (true, true) => ok(format!("CRD {name} is installed and serves {version}")),
                    (false, _) => fail(
                        format!("CRD {name} is not established"),
                        "kubectl describe crd ".to_owned() + &name,
                    ),
                    (_, false) => fail(format!("CRD {name} does not serve {version} (an older Weft?)"), fix),
                }
            }
            Ok(None) => fail(format!("CRD {name} is missing"), fix),
            Err(e) => fail(format!("CRD {name}: {e}"), "check access to the cluster (kubectl get crd)"),
        });
    }
    checks
}

async fn deployment(client: &Client, namespace: &str, name: &str) -> Check {
    let describe = format!(
        "kubectl -n {namespace} describe deployment {name}; kubectl -n {namespace} logs deploy/{name}"
    );
    match Api::<Deployment>::namespaced(client.clone(), namespace).get_opt(name).await {
        Ok(Some(d)) => {
            let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let ready = d.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0);
            if ready >= want && want > 0 {
                ok(format!("{namespace}/{name} is ready ({ready}/{want})"))
            } else {
                fail(format!("{namespace}/{name} has {ready}/{want} replicas ready"), describe)
            }
        }
        Ok(None) => fail(
            format!("{namespace}/{name} is not installed"),
            format!("helm upgrade --install weft charts/weft -n {namespace} --create-namespace"),
        ),
        Err(e) => fail(format!("{namespace}/{name}: {e}"), describe),
    }
}

async fn webhook_certificate(client: &Client, install: &Install, now: SystemTime) -> Vec<Check> {
    let restart = format!(
        "the operator keeps both current: kubectl -n {} logs deploy/{}",
        install.namespace, install.operator
    );
    let configs = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let ca_bundle = match configs.get_opt(&install.webhook_configuration).await {
        Ok(Some(c)) => c.webhooks.unwrap_or_default().into_iter().find_map(|w| w.client_config.ca_bundle),
        Ok(None) => {
            return vec![fail(
                format!("MutatingWebhookConfiguration {} is missing", install.webhook_configuration),
                "helm upgrade --install weft charts/weft -n weft-system",
            )];
        }
        Err(e) => return vec![fail(format!("webhook configuration: {e}"), restart)],
    };
    let Some(ByteString(ca_pem)) = ca_bundle.filter(|b| !b.0.is_empty()) else {
        return vec![fail("the webhook's caBundle is empty: the apiserver cannot call it", restart)];
    };
    let secret =
        Api::<Secret>::namespaced(client.clone(), &install.namespace).get_opt(&install.webhook_secret).await;
    let cert_pem = match secret {
        Ok(Some(s)) => s.data.unwrap_or_default().remove("tls.crt").map(|b| b.0),
        Ok(None) | Err(_) => None,
    };
    let Some(cert_pem) = cert_pem else {
        return vec![fail(
            format!(
                "the webhook's serving certificate ({}/{}) is missing",
                install.namespace, install.webhook_secret
            ),
            restart,
        )];
    };
    let host = format!("{}.{}.svc", install.webhook, install.namespace);
    vec![match verify_serving(&cert_pem, &ca_pem, &host, now) {
        Ok(not_after) => ok(format!(
            "the webhook's certificate is valid for {host} and signed by the caBundle; expires {}",
            when(unix(not_after), now)
        )),
        Err(why) => fail(format!("the webhook's certificate: {why}"), restart),
    }]
}

/// Checks a serving certificate chain against CA roots for `host` at `now`, as the apiserver
/// will; returns when the leaf expires.
pub fn verify_serving(
    cert_pem: &[u8],
    ca_pem: &[u8],
    host: &str,
    now: SystemTime,
) -> Result<SystemTime, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not PEM: {e}"))?;
    let (leaf, intermediates) = chain.split_first().ok_or("no certificate in tls.crt")?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(ca.map_err(|e| format!("caBundle is not PEM: {e}"))?)
            .map_err(|e| format!("caBundle: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| format!("caBundle: {e}"))?;
    let name = ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
    let at = UnixTime::since_unix_epoch(now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());
    verifier.verify_server_cert(leaf, intermediates, &name, &[], at).map_err(|e| e.to_string())?;
    Ok(CertInfo::of(leaf).map_err(|e| e.to_string())?.not_after)
}

/// The mesh's roots as proxies see them: the trust bundle the operator keeps in every injected
/// namespace (the CA's key stays in its Secret, which weftctl does not read).
async fn root_ca(client: &Client, install: &Install, injected: &[String], now: SystemTime) -> Check {
    let fix =
        format!("the operator writes it: kubectl -n {} logs deploy/{}", install.namespace, install.operator);
    let mut bundles = Vec::new();
    for ns in injected {
        let map = Api::<ConfigMap>::namespaced(client.clone(), ns).get_opt(&install.trust_bundle).await;
        match map.ok().flatten().and_then(|m| m.data.unwrap_or_default().remove("ca.crt")) {
            Some(pem) => bundles.push(pem),
            None => return fail(format!("no trust bundle in {ns} ({})", install.trust_bundle), fix),
        }
    }
    let Some(pem) = bundles.first() else {
        return ok("root CA: no injected namespace yet, so no trust bundle to check");
    };
    if bundles.iter().any(|b| b != pem) {
        return fail("the injected namespaces hold different trust bundles (a rotation in progress?)", fix);
    }
    let roots = match CertInfo::all_from_pem(pem.as_bytes()) {
        Ok(roots) if !roots.is_empty() => roots,
        Ok(_) => return fail("the trust bundle holds no certificate", fix),
        Err(e) => return fail(format!("the trust bundle does not parse: {e}"), fix),
    };
    let expired: Vec<&CertInfo> = roots.iter().filter(|r| r.not_after <= now).collect();
    let described: Vec<String> =
        roots.iter().map(|r| format!("{} (expires {})", r.subject, when(unix(r.not_after), now))).collect();
    if expired.is_empty() {
        ok(format!("root CA: {}", described.join("; ")))
    } else {
        fail(format!("root CA expired: {}", described.join("; ")), "rotate the root: see docs/security.md")
    }
}

/// The namespaces labelled for injection, and the check that lists them.
async fn injected_namespaces(client: &Client) -> (Check, Vec<String>) {
    let params = ListParams::default().labels(&format!("{INJECT_LABEL}=enabled"));
    match Api::<Namespace>::all(client.clone()).list(&params).await {
        Ok(list) => {
            // A namespace being deleted is on its way out, trust bundle and all.
            let live = list.items.into_iter().filter(|n| n.metadata.deletion_timestamp.is_none());
            let names: Vec<String> = live.filter_map(|n| n.metadata.name).collect();
            let check = if names.is_empty() {
                ok(format!("no namespace is labelled {INJECT_LABEL}=enabled yet"))
            } else {
                ok(format!("injected namespaces: {}", names.join(", ")))
            };
            (check, names)
        }
        Err(e) => {
            (fail(format!("listing namespaces: {e}"), "check access to the cluster (kubectl get ns)"), vec![])
        }
    }
}

async fn proxies(client: &Client, namespace: Option<&str>) -> Check {
    let api = match namespace {
        Some(ns) => Api::<Pod>::namespaced(client.clone(), ns),
        None => Api::<Pod>::all(client.clone()),
    };
    let pods = match api.list(&ListParams::default()).await {
        Ok(list) => list.items,
        Err(e) => {
            return fail(format!("listing pods: {e}"), "check access to the cluster (kubectl get pods -A)");
        }
    };
    let mut by_state: BTreeMap<bool, Vec<String>> = BTreeMap::new();
    for pod in pods {
        if !pod.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(INJECTED_ANNOTATION)) {
            continue;
        }
        let status = pod.status.as_ref();
        let statuses = status.into_iter().flat_map(|s| {
            s.container_statuses.iter().flatten().chain(s.init_container_statuses.iter().flatten())
        });
        let ready = statuses.into_iter().any(|c| c.name == weft_inject::PROXY_CONTAINER && c.ready);
        let name = format!(
            "{}/{}",
            pod.metadata.namespace.unwrap_or_default(),
            pod.metadata.name.unwrap_or_default()
        );
        by_state.entry(ready).or_default().push(name);
    }
    let ready = by_state.get(&true).map_or(0, Vec::len);
    match by_state.get(&false) {
        None => ok(format!("{ready} meshed proxies ready (config and identity from the operator)")),
        Some(waiting) => fail(
            format!(
                "{} of {} meshed proxies are not ready: {}",
                waiting.len(),
                waiting.len() + ready,
                waiting.join(", ")
            ),
            "weftctl proxy-config <pod> and weftctl identity <pod> say what is missing; kubectl logs <pod> -c weft-proxy",
        ),
    }
}

pub fn render_table(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        out += &format!("{} {}\n", if c.ok { "✔" } else { "✘" }, c.what);
        if let Some(fix) = &c.fix {
            out += &format!("    fix: {fix}\n");
        }
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    out += &if failed == 0 {
        "\nall checks passed\n".to_owned()
    } else {
        format!("\n{failed} check(s) failed\n")
    };
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use weft_identity::ca::Issuer;

    use super::*;

    #[test]
    fn a_serving_certificate_must_name_the_host_chain_to_the_bundle_and_be_current() {
        let now = SystemTime::now();
        let ca = Issuer::new_root("cluster.local", now, Duration::from_secs(86_400)).unwrap();
        let host = "weft-webhook.weft-system.svc";
        let issued = ca.issue_dns(&[host.to_owned()], now, Duration::from_secs(3600)).unwrap();
        let (cert, bundle) = (issued.cert_pem.as_bytes(), ca.root_pem().as_bytes());
        let expires = verify_serving(cert, bundle, host, now).unwrap();
        assert!(expires > now + Duration::from_secs(3500));
        assert!(verify_serving(cert, bundle, "other.weft-system.svc", now).is_err(), "another name");
        let later = now + Duration::from_secs(7200);
        assert!(verify_serving(cert, bundle, host, later).unwrap_err().contains("xpired"), "expired");
        let stranger = Issuer::new_root("cluster.local", now, Duration::from_secs(86_400)).unwrap();
        assert!(verify_serving(cert, stranger.root_pem().as_bytes(), host, now).is_err(), "another CA");
    }
}
