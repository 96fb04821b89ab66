//! The injector's serving certificate. The leader issues it into a Secret that the webhook mounts
//! (and reloads without a restart), renews it at half its lifetime, and keeps the
//! MutatingWebhookConfiguration's `caBundle` trusting it.
//!
//! Each issuance makes a fresh CA, signs the leaf, and throws the CA's key away, so no CA key is
//! ever stored. During a renewal the `caBundle` trusts both the new CA and the previous one, so
//! the apiserver accepts the webhook's old certificate until the webhook has reloaded the new one.
//! Deciding what to do is a pure function ([`plan`]); the I/O is at the edge ([`run`]).

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use k8s_openapi::{
    ByteString,
    api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Secret},
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use weft_api::labels::FIELD_MANAGER;
use weft_identity::ca::Issuer;

/// When the issued certificate is valid from and to, and for which names; kept as annotations
/// on the Secret so deciding needs no certificate parsing.
const NOT_BEFORE: &str = "weft.dev/not-before";
const NOT_AFTER: &str = "weft.dev/not-after";
const DNS_NAMES: &str = "weft.dev/dns-names";
/// How often the leader checks the Secret and the caBundle.
const CHECK_EVERY: Duration = Duration::from_secs(30);

/// What to issue and where to keep it.
#[derive(Clone, Debug)]
pub struct WebhookCertConfig {
    /// The namespace of the webhook's Service and Secret (the mesh's).
    pub namespace: String,
    /// The webhook's Service: the certificate names `<service>.<namespace>.svc` and friends.
    pub service: String,
    /// The Secret (type kubernetes.io/tls) the webhook mounts.
    pub secret: String,
    /// The MutatingWebhookConfiguration whose webhooks get the caBundle.
    pub configuration: String,
    pub lifetime: Duration,
}

impl WebhookCertConfig {
    /// The names the apiserver may use to reach the Service.
    pub fn dns_names(&self, cluster_domain: &str) -> Vec<String> {
        let base = format!("{}.{}.svc", self.service, self.namespace);
        vec![base.clone(), format!("{base}.{cluster_domain}")]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("generating the webhook certificate: {0}")]
    Generate(#[from] weft_identity::ca::Error),
    #[error("{action}: {source}")]
    Kube { action: String, source: kube::Error },
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Generate(_) => "webhook_cert_generate",
            Error::Kube { .. } => "webhook_cert_api",
        }
    }
}

/// What the Secret says about the certificate it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    pub not_before: u64,
    pub not_after: u64,
    pub dns_names: Vec<String>,
}

impl Issued {
    fn from_annotations(annotations: &BTreeMap<String, String>) -> Option<Issued> {
        Some(Issued {
            not_before: annotations.get(NOT_BEFORE)?.parse().ok()?,
            not_after: annotations.get(NOT_AFTER)?.parse().ok()?,
            dns_names: annotations.get(DNS_NAMES)?.split(',').map(str::to_owned).collect(),
        })
    }

    fn annotations(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (NOT_BEFORE.to_owned(), self.not_before.to_string()),
            (NOT_AFTER.to_owned(), self.not_after.to_string()),
            (DNS_NAMES.to_owned(), self.dns_names.join(",")),
        ])
    }
}

/// What the leader does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// The certificate is good until `renew_at` (unix seconds): half its lifetime.
    Keep { renew_at: u64 },
    /// Issue a new one, and why.
    Issue(&'static str),
}

/// Decides from the Secret's record (if any) whether to issue: none yet, other names, or past
/// half of its lifetime (so a failed renewal has the other half to succeed).
pub fn plan(issued: Option<&Issued>, dns_names: &[String], now: u64) -> Plan {
    let Some(issued) = issued else { return Plan::Issue("no certificate yet") };
    if issued.dns_names != dns_names {
        return Plan::Issue("the service's names changed");
    }
    let renew_at = issued.not_before + (issued.not_after.saturating_sub(issued.not_before)) / 2;
    if now >= renew_at { Plan::Issue("past half of its lifetime") } else { Plan::Keep { renew_at } }
}

/// A freshly issued CA and leaf, PEM.
#[derive(Clone)]
pub struct Material {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub issued: Issued,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Material").field("issued", &self.issued).finish_non_exhaustive()
    }
}

/// Issues a one-use CA and a serving certificate for `dns_names`, valid from `now` for
/// `lifetime` (ECDSA P-256). The CA's key is dropped here.
pub fn issue(dns_names: &[String], now: u64, lifetime: Duration) -> Result<Material, Error> {
    let at = UNIX_EPOCH + Duration::from_secs(now);
    let ca = Issuer::new_ca("weft webhook CA", None, at, lifetime)?;
    let leaf = ca.issue_dns(dns_names, at, lifetime)?;
    Ok(Material {
        ca_pem: ca.root_pem().to_owned(),
        cert_pem: leaf.cert_pem,
        key_pem: leaf.key_pem,
        // As the issuer writes them: backdated a minute for clock skew.
        issued: Issued {
            not_before: now.saturating_sub(60),
            not_after: now + lifetime.as_secs(),
            dns_names: dns_names.to_vec(),
        },
    })
}

/// The caBundle after a renewal: the new CA first, then the previous one (if any and different).
pub fn bundle(new_ca: &str, previous_ca: Option<&str>) -> String {
    match previous_ca {
        Some(previous) if previous.trim() != new_ca.trim() && !previous.trim().is_empty() => {
            format!("{}\n{}\n", new_ca.trim_end(), previous.trim_end())
        }
        _ => new_ca.to_owned(),
    }
}

/// While this replica leads, keeps the certificate and the caBundle current; checks every 30 s
/// and whenever leadership changes.
pub async fn run(
    client: Client,
    config: WebhookCertConfig,
    cluster_domain: String,
    mut leader: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(CHECK_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
            changed = leader.changed() => if changed.is_err() { return },
        }
        if !*leader.borrow() {
            continue;
        }
        if let Err(error) = reconcile(&client, &config, &cluster_domain).await {
            warn!(%error, reason = error.metric_label(), "webhook certificate");
        }
    }
}

/// One pass: issue if [`plan`] says so, then make sure the caBundle trusts the Secret's CA.
pub async fn reconcile(
    client: &Client,
    config: &WebhookCertConfig,
    cluster_domain: &str,
) -> Result<(), Error> {
    let kube = |action: &str| {
        let action = action.to_owned();
        move |source| Error::Kube { action, source }
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &config.namespace);
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let current = secrets.get_opt(&config.secret).await.map_err(kube("reading the webhook Secret"))?;
    let data = |key: &str| {
        current
            .as_ref()
            .and_then(|s| s.data.as_ref())
            .and_then(|d| d.get(key))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
    };
    let issued =
        current.as_ref().and_then(|s| s.metadata.annotations.as_ref()).and_then(Issued::from_annotations);
    let names = config.dns_names(cluster_domain);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    let previous_ca = data("ca.crt");
    let ca = match plan(issued.as_ref(), &names, now) {
        Plan::Keep { .. } => previous_ca.unwrap_or_default(),
        Plan::Issue(why) => {
            let material = issue(&names, now, config.lifetime)?;
            // Trust first (new and previous CA), then serve: the apiserver never sees a
            // certificate it does not trust.
            patch_ca_bundle(
                &configurations,
                &config.configuration,
                &bundle(&material.ca_pem, previous_ca.as_deref()),
            )
            .await
            .map_err(kube("setting the webhook's caBundle"))?;
            // Owned by the webhook configuration it serves, so the garbage collector removes it
            // with the chart (`helm uninstall` never knew this Secret).
            let owner = configurations
                .get_opt(&config.configuration)
                .await
                .map_err(kube("reading the webhook configuration"))?
                .and_then(|c| owner_reference(&c));
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(config.secret.clone()),
                    namespace: Some(config.namespace.clone()),
                    annotations: Some(material.issued.annotations()),
                    owner_references: owner.map(|o| vec![o]),
                    ..ObjectMeta::default()
                },
                type_: Some("kubernetes.io/tls".to_owned()),
                data: Some(BTreeMap::from([
                    ("ca.crt".to_owned(), ByteString(material.ca_pem.clone().into_bytes())),
                    ("tls.crt".to_owned(), ByteString(material.cert_pem.into_bytes())),
                    ("tls.key".to_owned(), ByteString(material.key_pem.into_bytes())),
                ])),
                ..Secret::default()
            };
            secrets
                .patch(&config.secret, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&secret))
                .await
                .map_err(kube("writing the webhook Secret"))?;
            info!(secret = %config.secret, reason = why, not_after = material.issued.not_after, "issued the webhook's serving certificate");
            return Ok(());
        }
    };
    // A configuration recreated (or installed after the Secret) must still trust the CA.
    if let Some(existing) = configurations
        .get_opt(&config.configuration)
        .await
        .map_err(kube("reading the webhook configuration"))?
    {
        let trusted = existing.webhooks.iter().flatten().all(|w| {
            w.client_config
                .ca_bundle
                .as_ref()
                .is_some_and(|b| String::from_utf8_lossy(&b.0).contains(ca.trim()))
        });
        if !trusted && !ca.is_empty() {
            patch_ca_bundle(&configurations, &config.configuration, &ca)
                .await
                .map_err(kube("setting the webhook's caBundle"))?;
        }
    }
    Ok(())
}

/// A reference to the webhook configuration as the Secret's owner (no `blockOwnerDeletion`:
/// deleting the configuration must never wait for the Secret).
fn owner_reference(configuration: &MutatingWebhookConfiguration) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: "admissionregistration.k8s.io/v1".to_owned(),
        kind: "MutatingWebhookConfiguration".to_owned(),
        name: configuration.metadata.name.clone()?,
        uid: configuration.metadata.uid.clone()?,
        ..OwnerReference::default()
    })
}

/// Sets `caBundle` on every webhook of the configuration with a strategic merge keyed by webhook
/// name, so the rest of the object (helm's) is untouched. A missing configuration is not an
/// error: the chart may not be installed yet.
async fn patch_ca_bundle(
    api: &Api<MutatingWebhookConfiguration>,
    name: &str,
    bundle: &str,
) -> Result<(), kube::Error> {
    let Some(existing) = api.get_opt(name).await? else { return Ok(()) };
    let encoded = ByteString(bundle.as_bytes().to_vec());
    let webhooks: Vec<serde_json::Value> = existing
        .webhooks
        .iter()
        .flatten()
        .map(|w| serde_json::json!({"name": w.name, "clientConfig": {"caBundle": encoded}}))
        .collect();
    if webhooks.is_empty() {
        return Ok(());
    }
    api.patch(name, &PatchParams::default(), &Patch::Strategic(serde_json::json!({ "webhooks": webhooks })))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    fn names() -> Vec<String> {
        vec!["weft-webhook.mesh.svc".to_owned(), "weft-webhook.mesh.svc.cluster.local".to_owned()]
    }

    #[test]
    fn issues_when_missing_renamed_or_past_half_life() {
        let issued = Issued { not_before: 1_000, not_after: 1_000 + 90 * DAY, dns_names: names() };
        assert_eq!(plan(None, &names(), 5_000), Plan::Issue("no certificate yet"));
        assert_eq!(plan(Some(&issued), &names(), 1_000 + DAY), Plan::Keep { renew_at: 1_000 + 45 * DAY });
        assert_eq!(plan(Some(&issued), &names(), 1_000 + 45 * DAY), Plan::Issue("past half of its lifetime"));
        assert_eq!(plan(Some(&issued), &names()[..1], 2_000), Plan::Issue("the service's names changed"));
    }

    #[test]
    fn the_record_round_trips_through_annotations_and_garbage_means_issue() {
        let issued = Issued { not_before: 7, not_after: 99, dns_names: names() };
        assert_eq!(Issued::from_annotations(&issued.annotations()), Some(issued));
        let mut broken = Issued { not_before: 7, not_after: 99, dns_names: names() }.annotations();
        broken.insert(NOT_AFTER.to_owned(), "soon".to_owned());
        assert_eq!(Issued::from_annotations(&broken), None);
    }

    #[test]
    fn the_bundle_trusts_the_new_and_the_previous_ca_once() {
        assert_eq!(bundle("NEW\n", None), "NEW\n");
        assert_eq!(bundle("NEW\n", Some("OLD\n")), "NEW\nOLD\n");
        assert_eq!(bundle("NEW\n", Some("NEW\n")), "NEW\n");
    }

    #[test]
    fn issued_material_is_pem_for_the_names_and_records_its_validity() {
        let material = issue(&names(), 1_700_000_000, Duration::from_secs(90 * DAY)).unwrap();
        assert!(material.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(material.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(material.key_pem.contains("PRIVATE KEY"));
        assert_eq!(material.issued.not_after, 1_700_000_000 + 90 * DAY);
        assert_eq!(material.issued.dns_names, names());
        assert!(!format!("{material:?}").contains("PRIVATE"), "Debug never shows the key");
    }
}
