//! What tests use: a client for the running test cluster and temporary namespaces.

use std::{
    collections::BTreeMap,
    fmt,
    hash::{BuildHasher, RandomState},
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
    thread,
    time::{SystemTime, UNIX_EPOCH},
};

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, Config,
    api::{DeleteParams, ObjectMeta, PostParams},
};
use tokio::sync::OnceCell;

use crate::cluster::{self, Error, Paths};

/// The label on every namespace made by [`TestCluster::namespace`].
pub const TEST_NAMESPACE_LABEL: &str = "weft.dev/e2e";

static SHARED: OnceCell<TestCluster> = OnceCell::const_new();

/// The running test cluster, as a test sees it.
///
/// It does not start a cluster: `cargo xtask cluster up` (or `cargo xtask test`, which also
/// stops it again) does. Without a ready cluster, [`TestCluster::shared`] panics with the
/// command to run; tests never skip.
pub struct TestCluster {
    config: Config,
    paths: Paths,
}

impl fmt::Debug for TestCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the Config: it holds the admin credentials.
        f.debug_struct("TestCluster")
            .field("url", &self.config.cluster_url.to_string())
            .field("state", &self.paths.root())
            .finish_non_exhaustive()
    }
}

impl TestCluster {
    /// The cluster for this test binary, connected once, checked with `/readyz`, and with
    /// the CRDs of [`weft_api::crds`] applied and established.
    ///
    /// # Panics
    /// When no test cluster is running, with the command that starts one.
    pub async fn shared() -> &'static TestCluster {
        match Self::try_shared().await {
            Ok(cluster) => cluster,
            Err(error) => panic!("{error}"),
        }
    }

    /// Like [`TestCluster::shared`], but returns the error.
    pub async fn try_shared() -> Result<&'static TestCluster, Error> {
        SHARED.get_or_try_init(Self::connect).await
    }

    async fn connect() -> Result<TestCluster, Error> {
        let paths = Paths::from_env()?;
        cluster::env()?;
        let config = cluster::admin_config(&paths).await?;
        let url = config.cluster_url.to_string();
        let client = Client::try_from(config.clone())
            .map_err(|source| Error::Kube { context: "building a Kubernetes client".into(), source })?;
        cluster::get(&client, "/readyz")
            .await
            .map_err(|why| Error::NotRunning { reason: format!("{url}readyz answered: {why}") })?;
        // The cluster may predate a change to the API types: bring its CRDs up to date (a
        // no-op when nothing changed), so tests always run against the current definitions.
        cluster::install_crds(&client, &weft_api::crds()).await?;
        Ok(TestCluster { config, paths })
    }

    /// A new client for the cluster, with admin (system:masters) rights.
    ///
    /// Call it on the runtime that will use the client (each `#[tokio::test]` has its own,
    /// and a client stops working when the runtime it was made on ends), so make one per
    /// test rather than sharing one.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn client(&self) -> Client {
        Client::try_from(self.config.clone())
            .expect("the test cluster's config was already used to build a client")
    }

    /// The client configuration, for clients with other settings or credentials.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The admin kubeconfig, for tools (helm) and processes started by tests.
    pub fn kubeconfig(&self) -> PathBuf {
        self.paths.kubeconfig()
    }

    /// The node's containerd socket, for `ctr` (namespace `images::NAMESPACE`).
    pub fn containerd_socket(&self) -> PathBuf {
        self.paths.node().containerd_socket()
    }

    /// The ServiceAccount token signing key (see `Paths::service_account_key`).
    pub fn service_account_key(&self) -> PathBuf {
        self.paths.service_account_key()
    }

    /// Creates a namespace named `<prefix>-<random>` for one test, deleted when the returned
    /// guard drops (namespace deletion, which the controller-manager finishes, removes
    /// everything in it).
    pub async fn namespace(&self, prefix: &str) -> Result<TestNamespace, Error> {
        let name = unique_name(prefix);
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([(TEST_NAMESPACE_LABEL.to_owned(), "true".to_owned())])),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(self.client())
            .create(&PostParams::default(), &namespace)
            .await
            .map_err(|source| Error::Kube { context: format!("creating test namespace {name}"), source })?;
        Ok(TestNamespace { name, config: self.config.clone() })
    }
}

/// A namespace that exists for one test; dropping it deletes the namespace.
pub struct TestNamespace {
    name: String,
    config: Config,
}

impl fmt::Debug for TestNamespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestNamespace").field("name", &self.name).finish_non_exhaustive()
    }
}

impl TestNamespace {
    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestNamespace {
    /// Sends the delete from a thread of its own with its own runtime, because drop may run
    /// on the test's runtime (which must not block on itself) or after it has ended. The
    /// deletion finishes in the background; nothing waits for it.
    fn drop(&mut self) {
        let name = std::mem::take(&mut self.name);
        let config = self.config.clone();
        let deleted = thread::spawn(move || -> Result<(), String> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let client = Client::try_from(config).map_err(|e| e.to_string())?;
                match Api::<Namespace>::all(client).delete(&name, &DeleteParams::background()).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                    Err(e) => Err(format!("deleting test namespace {name}: {e}")),
                }
            })
        })
        .join();
        match deleted {
            Ok(Ok(())) => {}
            Ok(Err(why)) => eprintln!("warning: {why}"),
            Err(_) => eprintln!("warning: the thread deleting a test namespace panicked"),
        }
    }
}

/// `<prefix>-<8 hex digits>`, a valid namespace name (DNS-1123 label) unique in practice.
fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut clean: String = prefix
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    clean.truncate(40);
    let clean = clean.trim_matches('-');
    let clean = if clean.is_empty() { "test" } else { clean };
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    let seed = (std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed), nanos);
    let suffix = RandomState::new().hash_one(seed) as u32;
    format!("{clean}-{suffix:08x}")
}

#[cfg(test)]
mod tests {
    use super::unique_name;

    fn is_dns_label(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= 63
            && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    }

    #[test]
    fn unique_names_are_dns_labels_and_differ() {
        for prefix in ["fixtures", "Token_Review", "--", "", &"x".repeat(100)] {
            let a = unique_name(prefix);
            let b = unique_name(prefix);
            assert!(is_dns_label(&a), "{a:?}");
            assert_ne!(a, b);
        }
        assert!(unique_name("crds").starts_with("crds-"));
    }
}
