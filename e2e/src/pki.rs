//! The cluster's certificates and keys, generated fresh for every `cluster up`.
//!
//! - a cluster CA, which signs the serving certificate that kube-apiserver,
//!   kube-controller-manager and kube-scheduler present (SANs 127.0.0.1, localhost and the
//!   in-cluster names of the `kubernetes` Service); clients verify against it;
//! - a client CA (`--client-ca-file`), which signs the admin certificate (CN `admin`,
//!   O `system:masters`) and the controller-manager's and scheduler's own identities, and
//!   which the controller-manager uses to sign CertificateSigningRequests;
//! - the ServiceAccount token signing key pair;
//! - the node's: the kubelet's serving certificate (cluster CA, the node's address) and client
//!   certificate (`system:node:<node>` in `system:nodes`, for the Node authorizer), kube-proxy's
//!   (`system:kube-proxy`), and the apiserver's client certificate for the kubelet's API.
//!
//! Every key is ECDSA P-256 in PKCS#8 PEM, written with mode 0600. Nothing here keeps key
//! material after the files are written, and nothing prints it.

use std::{
    fs::OpenOptions,
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use time::OffsetDateTime;

use crate::{cluster::Error, node};

/// The `kubernetes` Service's first address in `--service-cluster-ip-range` and its DNS names,
/// so in-cluster clients can verify the apiserver too.
const SERVING_SANS: &[&str] = &[
    "127.0.0.1",
    "10.250.0.1", // node::net::HOST_IP, where the node and its pods reach the apiserver
    "localhost",
    "10.0.0.1",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
];

/// Where [`generate`] wrote each file.
#[derive(Debug, Clone)]
pub(crate) struct PkiFiles {
    pub(crate) cluster_ca: PathBuf,
    /// The cluster CA certificate in DER, for clients built in this process.
    pub(crate) cluster_ca_der: Vec<u8>,
    pub(crate) serving_cert: PathBuf,
    pub(crate) serving_key: PathBuf,
    pub(crate) client_ca: PathBuf,
    pub(crate) client_ca_key: PathBuf,
    pub(crate) sa_key: PathBuf,
    pub(crate) sa_pub: PathBuf,
    pub(crate) admin: ClientFiles,
    pub(crate) controller_manager: ClientFiles,
    pub(crate) scheduler: ClientFiles,
    pub(crate) kubelet_serving: ClientFiles,
    pub(crate) kubelet: ClientFiles,
    pub(crate) kube_proxy: ClientFiles,
    pub(crate) apiserver_kubelet_client: ClientFiles,
}

/// A client certificate and its key.
#[derive(Debug, Clone)]
pub(crate) struct ClientFiles {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

/// Generates the whole PKI into `dir` (which must exist).
pub(crate) fn generate(dir: &Path) -> Result<PkiFiles, Error> {
    let validity = Validity::now()?;

    let (cluster_ca_cert, cluster_ca) = ca("weft-e2e cluster CA", &validity)?;
    let cluster_ca_path = dir.join("cluster-ca.crt");
    write(&cluster_ca_path, &cluster_ca_cert.pem(), 0o644)?;

    let (serving_cert, serving_key) = leaf(
        &cluster_ca,
        "weft-e2e control plane",
        None,
        SERVING_SANS,
        ExtendedKeyUsagePurpose::ServerAuth,
        &validity,
    )?;
    let serving = pair(dir, "serving", &serving_cert, &serving_key)?;

    let (client_ca_cert, client_ca) = ca("weft-e2e client CA", &validity)?;
    let client_ca_path = dir.join("client-ca.crt");
    let client_ca_key_path = dir.join("client-ca.key");
    write(&client_ca_path, &client_ca_cert.pem(), 0o644)?;
    write(&client_ca_key_path, &client_ca.key().serialize_pem(), 0o600)?;

    let client = |file: &str, cn: &str, org: Option<&str>| -> Result<ClientFiles, Error> {
        let (cert, key) = leaf(&client_ca, cn, org, &[], ExtendedKeyUsagePurpose::ClientAuth, &validity)?;
        pair(dir, file, &cert, &key)
    };
    let admin = client("admin", "admin", Some("system:masters"))?;
    let controller_manager = client("controller-manager", "system:kube-controller-manager", None)?;
    let scheduler = client("scheduler", "system:kube-scheduler", None)?;
    let node_user = format!("system:node:{}", node::net::NODE_NAME);
    let kubelet = client("kubelet", &node_user, Some("system:nodes"))?;
    let kube_proxy = client("kube-proxy", "system:kube-proxy", None)?;
    let apiserver_kubelet_client =
        client("apiserver-kubelet-client", "kube-apiserver-kubelet-client", Some("system:masters"))?;
    let node_ip = node::net::NODE_IP.to_string();
    let (kubelet_cert, kubelet_key) = leaf(
        &cluster_ca,
        &node_user,
        None,
        &[&node_ip, node::net::NODE_NAME],
        ExtendedKeyUsagePurpose::ServerAuth,
        &validity,
    )?;
    let kubelet_serving = pair(dir, "kubelet-serving", &kubelet_cert, &kubelet_key)?;

    let sa = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let sa_key = dir.join("sa.key");
    let sa_pub = dir.join("sa.pub");
    write(&sa_key, &sa.serialize_pem(), 0o600)?;
    write(&sa_pub, &sa.public_key_pem(), 0o644)?;

    Ok(PkiFiles {
        cluster_ca: cluster_ca_path,
        cluster_ca_der: cluster_ca_cert.der().to_vec(),
        serving_cert: serving.cert,
        serving_key: serving.key,
        client_ca: client_ca_path,
        client_ca_key: client_ca_key_path,
        sa_key,
        sa_pub,
        admin,
        controller_manager,
        scheduler,
        kubelet_serving,
        kubelet,
        kube_proxy,
        apiserver_kubelet_client,
    })
}

/// Validity of every certificate: from an hour ago (clock skew) for a year.
struct Validity {
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

impl Validity {
    fn now() -> Result<Self, Error> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs();
        let at = |secs: u64| {
            i64::try_from(secs)
                .ok()
                .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
                .ok_or(Error::Clock)
        };
        Ok(Self { not_before: at(now.saturating_sub(3600))?, not_after: at(now + 365 * 24 * 3600)? })
    }

    fn apply(&self, params: &mut CertificateParams) {
        params.not_before = self.not_before;
        params.not_after = self.not_after;
    }
}

fn name(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    if let Some(org) = org {
        dn.push(DnType::OrganizationName, org);
    }
    dn.push(DnType::CommonName, cn);
    dn
}

/// A self-signed CA; returns its certificate and an issuer holding its key.
fn ca(cn: &str, validity: &Validity) -> Result<(Certificate, Issuer<'static, KeyPair>), Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(cn, None);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity.apply(&mut params);
    let cert = params.self_signed(&key)?;
    Ok((cert, Issuer::new(params, key)))
}

/// A leaf certificate signed by `issuer`; returns the certificate and key PEM.
fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    cn: &str,
    org: Option<&str>,
    sans: &[&str],
    usage: ExtendedKeyUsagePurpose,
    validity: &Validity,
) -> Result<(String, String), Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())?;
    params.distinguished_name = name(cn, org);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    validity.apply(&mut params);
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn pair(dir: &Path, stem: &str, cert: &str, key: &str) -> Result<ClientFiles, Error> {
    let files = ClientFiles { cert: dir.join(format!("{stem}.crt")), key: dir.join(format!("{stem}.key")) };
    write(&files.cert, cert, 0o644)?;
    write(&files.key, key, 0o600)?;
    Ok(files)
}

fn write(path: &Path, contents: &str, mode: u32) -> Result<(), Error> {
    let result = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()));
    result.map_err(|source: io::Error| Error::io(format!("writing {}", path.display()), source))
}
