//! The signing CA and where it lives: Secret `weft-ca` in the mesh namespace.
//!
//! Keys: `ca.crt` (the signing certificate), `ca.key` (its key), `cert-chain.pem` (intermediates
//! between it and a root; optional) and `root-cert.pem` (the roots proxies trust; optional, `ca.crt`
//! when absent). With no Secret, the first replica to start makes a root (ECDSA P-256, 10 years)
//! and creates it; creation is atomic, so a replica that loses the race reads the winner's. A user
//! who brings their own CA creates the Secret before installing, with an intermediate. Every
//! replica re-reads the Secret and swaps the signer when it changes; material that does not load
//! keeps the running signer and says why. The key never leaves the Secret and this process.

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use arc_swap::ArcSwapOption;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use weft_identity::{TrustBundle, ca::Issuer};

use super::CaConfig;
use crate::metrics::Metrics;

pub const CERT: &str = "ca.crt";
pub const KEY: &str = "ca.key";
pub const CHAIN: &str = "cert-chain.pem";
pub const ROOTS: &str = "root-cert.pem";
/// The label marking a CA the operator made (and may rotate).
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const OPERATOR: &str = "weft-operator";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Secret {0}: key {1} is missing")]
    Missing(String, &'static str),
    #[error("Secret {0}: key {1} is not UTF-8 PEM")]
    NotText(String, &'static str),
    #[error("Secret {secret}: {source}")]
    Load { secret: String, source: weft_identity::ca::Error },
    #[error("Secret {secret}: {key}: {source}")]
    Bundle { secret: String, key: &'static str, source: weft_identity::credentials::Error },
    #[error("making the root: {0}")]
    Generate(weft_identity::ca::Error),
    #[error("{action}: {source}")]
    Kube { action: &'static str, source: kube::Error },
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Missing(..) | Error::NotText(..) | Error::Load { .. } | Error::Bundle { .. } => {
                "ca_secret_invalid"
            }
            Error::Generate(_) => "ca_generate",
            Error::Kube { .. } => "ca_api",
        }
    }
}

/// What signs now, and the roots that go with it.
#[derive(Debug)]
pub struct Signer {
    pub issuer: Issuer,
    /// The trust bundle, PEM (every root a proxy must trust).
    pub bundle_pem: String,
    pub bundle: TrustBundle,
    /// The Secret's resourceVersion it came from.
    pub version: String,
}

/// The current signer, swapped whole; `changes` ticks on every swap.
#[derive(Debug)]
pub struct Authority {
    signer: ArcSwapOption<Signer>,
    changes: watch::Sender<u64>,
}

impl Default for Authority {
    fn default() -> Self {
        Authority { signer: ArcSwapOption::empty(), changes: watch::channel(0).0 }
    }
}

impl Authority {
    pub fn current(&self) -> Option<Arc<Signer>> {
        self.signer.load_full()
    }

    /// Ticks whenever the signer or the bundle changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn set(&self, signer: Signer) {
        self.signer.store(Some(Arc::new(signer)));
        self.changes.send_modify(|n| *n += 1);
    }

    /// Resolves once a signer is loaded.
    pub async fn ready(&self) {
        let mut changes = self.changes();
        let _ = changes.wait_for(|_| self.signer.load().is_some()).await;
    }
}

/// The signer a Secret's data holds (pure).
pub fn signer_from(
    secret: &str,
    data: &BTreeMap<String, ByteString>,
    version: &str,
) -> Result<Signer, Error> {
    let text = |key: &'static str| -> Result<Option<&str>, Error> {
        data.get(key)
            .map(|v| std::str::from_utf8(&v.0).map_err(|_| Error::NotText(secret.to_owned(), key)))
            .transpose()
    };
    let cert = text(CERT)?.ok_or_else(|| Error::Missing(secret.to_owned(), CERT))?;
    let key = text(KEY)?.ok_or_else(|| Error::Missing(secret.to_owned(), KEY))?;
    let chain = text(CHAIN)?.unwrap_or_default();
    let roots = text(ROOTS)?.filter(|r| !r.trim().is_empty()).unwrap_or(cert);
    let issuer = Issuer::from_pem(cert, key, chain, roots)
        .map_err(|source| Error::Load { secret: secret.to_owned(), source })?;
    let bundle = TrustBundle::from_pem(roots.as_bytes()).map_err(|source| Error::Bundle {
        secret: secret.to_owned(),
        key: ROOTS,
        source,
    })?;
    Ok(Signer { issuer, bundle_pem: roots.to_owned(), bundle, version: version.to_owned() })
}

/// A new root in the Secret's form (pure but for the key's randomness).
pub fn new_root_secret(config: &CaConfig, now: SystemTime) -> Result<Secret, Error> {
    let root = Issuer::new_root(&config.trust_domain, now, config.root_ttl).map_err(Error::Generate)?;
    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(config.secret.clone()),
            namespace: Some(config.namespace.clone()),
            labels: Some(BTreeMap::from([(MANAGED_BY.to_owned(), OPERATOR.to_owned())])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([
            (CERT.to_owned(), bytes(root.cert_pem())),
            (KEY.to_owned(), bytes(root.key_pem())),
            (ROOTS.to_owned(), bytes(root.root_pem())),
        ])),
        ..Secret::default()
    })
}

/// Loads (or first makes) the CA, then re-reads the Secret every `reload_every` until `stop`.
pub async fn run(
    client: Client,
    config: CaConfig,
    authority: Arc<Authority>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let secrets: Api<Secret> = Api::namespaced(client, &config.namespace);
    loop {
        if let Err(error) = sync(&secrets, &config, &authority).await {
            metrics.record_error(error.metric_label());
            let keeping = authority.current().map(|s| s.version.clone());
            warn!(%error, ?keeping, "the CA Secret did not load; keeping the running CA");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(config.reload_every) => {}
        }
    }
}

/// The signer Secret `name` holds now (`None`: no such Secret).
pub async fn read(secrets: &Api<Secret>, name: &str) -> Result<Option<Signer>, Error> {
    let Some(secret) = secrets
        .get_opt(name)
        .await
        .map_err(|source| Error::Kube { action: "reading the CA Secret", source })?
    else {
        return Ok(None);
    };
    let version = secret.metadata.resource_version.clone().unwrap_or_default();
    signer_from(name, &secret.data.unwrap_or_default(), &version).map(Some)
}

async fn sync(secrets: &Api<Secret>, config: &CaConfig, authority: &Authority) -> Result<(), Error> {
    let kube = |action| move |source| Error::Kube { action, source };
    let secret = match secrets.get_opt(&config.secret).await.map_err(kube("reading the CA Secret"))? {
        Some(secret) => secret,
        None => {
            let fresh = new_root_secret(config, SystemTime::now())?;
            match secrets.create(&PostParams::default(), &fresh).await {
                Ok(created) => {
                    info!(secret = %config.secret, trust_domain = %config.trust_domain, "made the mesh root CA");
                    created
                }
                // Another replica made it first: use theirs.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    secrets.get(&config.secret).await.map_err(kube("reading the CA Secret"))?
                }
                Err(source) => return Err(Error::Kube { action: "creating the CA Secret", source }),
            }
        }
    };
    let version = secret.metadata.resource_version.clone().unwrap_or_default();
    if authority.current().is_some_and(|s| s.version == version) {
        return Ok(());
    }
    let signer = signer_from(&config.secret, &secret.data.unwrap_or_default(), &version)?;
    info!(
        secret = %config.secret,
        ca = ?signer.issuer,
        roots = signer.bundle.roots.len(),
        "CA loaded"
    );
    authority.set(signer);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_root_round_trips_through_the_secret_and_its_key_stays_out_of_debug() {
        let config = CaConfig::new("mesh", "cluster.local");
        let secret = new_root_secret(&config, SystemTime::now()).unwrap();
        let data = secret.data.unwrap();
        let signer = signer_from("weft-ca", &data, "7").unwrap();
        assert_eq!(signer.bundle.roots.len(), 1);
        assert_eq!(signer.version, "7");
        assert!(signer.bundle_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let debug = format!("{signer:?}");
        assert!(!debug.contains("PRIVATE"), "{debug}");
    }

    #[test]
    fn a_broken_secret_names_what_is_wrong() {
        let config = CaConfig::new("mesh", "cluster.local");
        let mut data = new_root_secret(&config, SystemTime::now()).unwrap().data.unwrap();
        data.remove(KEY);
        let err = signer_from("weft-ca", &data, "1").unwrap_err();
        assert_eq!(err.to_string(), "Secret weft-ca: key ca.key is missing");
        data.insert(
            KEY.into(),
            ByteString(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".to_vec()),
        );
        let err = signer_from("weft-ca", &data, "1").unwrap_err();
        assert!(err.to_string().contains("not a usable private key"), "{err}");
        assert!(!err.to_string().contains("AAAA"), "no key material in errors");
    }
}
