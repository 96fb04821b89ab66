//! What the injector adds, as configured by the chart's values (`proxy`, `injector`).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// Everything [`crate::inject`](fn@crate::inject) needs besides the pod. Loaded from YAML (the chart renders it
/// into a ConfigMap); every field has a default, so `{}` is a valid configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct InjectConfig {
    /// The image holding `weft-proxy`; used for the init and the sidecar container.
    pub proxy_image: String,
    pub image_pull_policy: Option<String>,
    /// The proxy runs as this UID; redirection exempts its own traffic by it.
    pub proxy_uid: i64,
    pub ports: ProxyPorts,
    pub resources: ProxyResources,
    /// Run the proxy as a native sidecar (an init container with `restartPolicy: Always`,
    /// Kubernetes 1.29+). Otherwise it is the first container, and a postStart hook holds the
    /// app until the proxy is ready.
    pub native_sidecar: bool,
    /// Pods in these namespaces are never injected, whatever their labels say.
    pub excluded_namespaces: BTreeSet<String>,
    pub trust_domain: String,
    /// `host:port` of the operator's config and CA service.
    pub control_plane_address: String,
    /// `text` or `json`.
    pub log_format: String,
    pub log_level: String,
    /// Audience of the projected ServiceAccount token the proxy presents to the CA.
    pub token_audience: String,
    /// Lifetime of that token; the kubelet refreshes it well before expiry.
    pub token_expiration_seconds: i64,
    /// ConfigMap (in the pod's namespace, kept by the operator) holding the mesh's root
    /// certificates under `ca.crt`.
    pub trust_bundle_config_map: String,
}

/// The proxy's well-known ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyPorts {
    pub outbound: u16,
    pub inbound: u16,
    pub admin: u16,
}

/// Requests and limits of the proxy container, as Kubernetes quantities.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyResources {
    pub cpu_request: Option<String>,
    pub memory_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            proxy_image: format!("docker.io/weftmesh/proxy:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: None,
            proxy_uid: 1337,
            ports: ProxyPorts::default(),
            resources: ProxyResources::default(),
            native_sidecar: true,
            excluded_namespaces: ["kube-system", "kube-public", "kube-node-lease", "weft-system"]
                .map(str::to_owned)
                .into(),
            trust_domain: "cluster.local".to_owned(),
            control_plane_address: "weft-operator.weft-system.svc:15012".to_owned(),
            log_format: "text".to_owned(),
            log_level: "info".to_owned(),
            token_audience: "weft-ca".to_owned(),
            token_expiration_seconds: 3600,
            trust_bundle_config_map: "weft-trust-bundle".to_owned(),
        }
    }
}

impl Default for ProxyPorts {
    fn default() -> Self {
        Self { outbound: 15001, inbound: 15006, admin: 15000 }
    }
}

impl Default for ProxyResources {
    fn default() -> Self {
        Self {
            cpu_request: Some("10m".to_owned()),
            memory_request: Some("16Mi".to_owned()),
            cpu_limit: None,
            memory_limit: Some("64Mi".to_owned()),
        }
    }
}

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}: {source}")]
    Read { path: std::path::PathBuf, source: std::io::Error },
    #[error("parsing {path}: {source}")]
    Parse { path: std::path::PathBuf, source: serde_yaml::Error },
}

impl InjectConfig {
    /// The configuration in the file at `path` (the webhook's `--config`, `weftctl inject
    /// --config`), or the defaults without one.
    pub fn load(path: Option<&std::path::Path>) -> Result<Self, LoadError> {
        let Some(path) = path else { return Ok(Self::default()) };
        let text = std::fs::read_to_string(path)
            .map_err(|source| LoadError::Read { path: path.to_owned(), source })?;
        Self::from_yaml(&text).map_err(|source| LoadError::Parse { path: path.to_owned(), source })
    }

    /// Reads a configuration from YAML; unknown keys are an error, so a typo is not ignored.
    pub fn from_yaml(text: &str) -> Result<Self, serde_yaml::Error> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_yaml::from_str(text)
    }
}
