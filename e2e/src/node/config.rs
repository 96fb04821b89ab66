//! The node's configuration files, rendered by pure functions from [`NodeDirs`] and the
//! network plan in [`super::net`], so they can be checked without starting anything.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::net;

/// Where the node keeps its files: everything below `root` (the cluster's state directory's
/// `node/`) and `run` (a directory under `/run`, for state that must not outlive a reboot).
/// `down` unmounts whatever is mounted below either and removes both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDirs {
    /// `<cluster state>/node`.
    pub root: PathBuf,
    /// `/run/weft-node` (containerd's state: task bundles, pod network namespaces, shm mounts).
    pub run: PathBuf,
    /// `<cluster state>/logs/pods`: the containers' logs, kept after `down` like the
    /// components' logs.
    pub pod_logs: PathBuf,
}

impl NodeDirs {
    /// The node's directories inside the cluster state directory `cluster_root`.
    pub fn new(cluster_root: &Path) -> Self {
        Self {
            root: cluster_root.join("node"),
            run: PathBuf::from("/run").join(net::NETNS),
            pod_logs: cluster_root.join("logs/pods"),
        }
    }

    /// containerd's gRPC socket; also what `ctr --address` and the kubelet use.
    pub fn containerd_socket(&self) -> PathBuf {
        self.root.join("containerd.sock")
    }

    pub(crate) fn containerd_config(&self) -> PathBuf {
        self.root.join("containerd.toml")
    }

    pub(crate) fn containerd_root(&self) -> PathBuf {
        self.root.join("containerd")
    }

    pub(crate) fn containerd_state(&self) -> PathBuf {
        self.run.join("containerd")
    }

    pub(crate) fn cni_conf_dir(&self) -> PathBuf {
        self.root.join("cni/net.d")
    }

    pub(crate) fn cni_data_dir(&self) -> PathBuf {
        self.root.join("cni/ipam")
    }

    pub(crate) fn kubelet_root(&self) -> PathBuf {
        self.root.join("kubelet")
    }

    pub(crate) fn kubelet_config(&self) -> PathBuf {
        self.root.join("kubelet.yaml")
    }

    pub(crate) fn resolv_conf(&self) -> PathBuf {
        self.root.join("resolv.conf")
    }

    pub(crate) fn kube_proxy_config(&self) -> PathBuf {
        self.root.join("kube-proxy.yaml")
    }
}

/// containerd's `config.toml` (format version 2, containerd 1.6): all of its state in the
/// node's directories, the CRI plugin with runc on cgroupfs, the CNI from Debian's plugins,
/// and the sandbox ("pause") image given, which must already be imported: nothing is pulled.
pub fn containerd_toml(dirs: &NodeDirs, pause_image: &str) -> String {
    let socket = dirs.containerd_socket();
    let q = |p: PathBuf| toml_string(&p.to_string_lossy());
    format!(
        r#"version = 2
root = {root}
state = {state}
# Snapshotters that cannot work here would only log errors at every start.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = {socket}

[ttrpc]
  address = {ttrpc}

[plugins."io.containerd.internal.v1.opt"]
  path = {opt}

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = {pause}
  # Inside the node's network namespace: only the kubelet, beside it, reaches this.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # Pods' network namespaces are mounted below the state directory, so `down` finds them.
  netns_mounts_under_state_dir = true
  # Never ask for an OOM score below containerd's own: lowering it needs CAP_SYS_RESOURCE,
  # which the machines this runs on may not grant even to root (runc then dies with
  # "failed to update /proc/self/oom_score_adj: Permission denied").
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = {cni}
"#,
        root = q(dirs.containerd_root()),
        state = q(dirs.containerd_state()),
        socket = toml_string(&socket.to_string_lossy()),
        ttrpc = toml_string(&format!("{}.ttrpc", socket.display())),
        opt = q(dirs.containerd_root().join("opt")),
        pause = toml_string(pause_image),
        cni = q(dirs.cni_conf_dir()),
    )
}

/// The CNI network: a bridge in the node's namespace, one address per pod from
/// [`net::POD_CIDR`] (host-local IPAM, its records in the node's directory), the bridge as the
/// pods' gateway, and no masquerading (the host routes the pod range to the node itself).
pub fn cni_conflist(dirs: &NodeDirs) -> String {
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": "weft-node",
        "plugins": [
            {
                "type": "bridge",
                "bridge": net::BRIDGE,
                "isGateway": true,
                "ipMasq": false,
                // A pod reaching itself through a Service comes back through the bridge.
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": net::POD_CIDR}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": dirs.cni_data_dir(),
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ]
    });
    format!("{conflist:#}\n")
}

/// Files the kubelet is configured with.
#[derive(Debug, Clone)]
pub struct KubeletFiles<'a> {
    /// The CA that signs client certificates (the apiserver's, for `kubectl logs` and exec).
    pub client_ca: &'a Path,
    /// The kubelet's serving certificate and key (signed by the cluster CA).
    pub serving_cert: &'a Path,
    /// Its key.
    pub serving_key: &'a Path,
}

/// The `KubeletConfiguration`. cgroupfs driver under [`net::CGROUP_ROOT`] (this machine has
/// cgroup v1, which kubelet 1.34 still runs on when `failCgroupV1` is false), webhook
/// authentication and authorization (the apiserver's client certificate is checked, anonymous
/// requests are refused), eviction thresholds low enough that a busy CI disk never evicts the
/// tests' pods, and image garbage collection off: images are imported, never pulled, so a
/// collected image could not come back.
pub fn kubelet_yaml(dirs: &NodeDirs, files: &KubeletFiles<'_>) -> String {
    let config = json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": net::NODE_IP.to_string(),
        "port": net::KUBELET_PORT,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": net::KUBELET_HEALTHZ_PORT,
        "tlsCertFile": files.serving_cert,
        "tlsPrivateKeyFile": files.serving_key,
        "authentication": {
            "anonymous": {"enabled": false},
            "webhook": {"enabled": true},
            "x509": {"clientCAFile": files.client_ca},
        },
        "authorization": {"mode": "Webhook"},
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": format!("/{}", net::CGROUP_ROOT),
        "failCgroupV1": false,
        "failSwapOn": false,
        "containerRuntimeEndpoint": format!("unix://{}", dirs.containerd_socket().display()),
        "clusterDNS": [net::CLUSTER_DNS.to_string()],
        "clusterDomain": net::CLUSTER_DOMAIN,
        "resolvConf": dirs.resolv_conf(),
        "podLogsDir": dirs.pod_logs,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": false,
        "maxPods": 110,
        "enforceNodeAllocatable": ["pods"],
        "shutdownGracePeriod": "0s",
    });
    serde_yaml::to_string(&config).unwrap_or_default()
}

/// The `KubeProxyConfiguration`: iptables mode, `/healthz` on the node's address (the host
/// asks it whether the Service rules are in place), metrics on the node's loopback,
/// and conntrack limits left as the kernel has them (0 means "do not touch"; a network
/// namespace may not change them anyway).
pub fn kube_proxy_yaml(kubeconfig: &Path) -> String {
    let config = json!({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": kubeconfig},
        "hostnameOverride": net::NODE_NAME,
        "mode": "iptables",
        "clusterCIDR": net::CLUSTER_CIDR,
        "healthzBindAddress": format!("{}:{}", net::NODE_IP, net::KUBE_PROXY_HEALTHZ_PORT),
        "metricsBindAddress": "127.0.0.1:10249",
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    });
    serde_yaml::to_string(&config).unwrap_or_default()
}

/// The resolv.conf the kubelet hands to pods with `dnsPolicy: Default` (CoreDNS among them)
/// and extends for the others: no upstream server, because nothing outside the node is ever
/// asked. Names outside the cluster fail at once instead of timing out.
pub fn resolv_conf() -> String {
    "# Weft's test node: no upstream DNS; cluster names are answered by CoreDNS.\noptions ndots:5\n"
        .to_owned()
}

/// CoreDNS's objects (ServiceAccount, RBAC, Corefile, Deployment, the `kube-dns` Service at
/// [`net::CLUSTER_DNS`]) for `image`, as one YAML stream.
pub fn coredns_manifests(image: &str) -> String {
    include_str!("coredns.yaml")
        .replace("{{image}}", image)
        .replace("{{cluster_dns}}", &net::CLUSTER_DNS.to_string())
        .replace("{{cluster_domain}}", net::CLUSTER_DOMAIN)
}

fn toml_string(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs() -> NodeDirs {
        NodeDirs::new(Path::new("/cache/cluster"))
    }

    #[test]
    fn containerd_keeps_everything_in_the_node_directories() {
        let toml = containerd_toml(&dirs(), "weft.local/pause:3.10-abc");
        assert!(toml.contains(r#"root = "/cache/cluster/node/containerd""#));
        assert!(toml.contains(r#"state = "/run/weft-node/containerd""#));
        assert!(toml.contains(r#"address = "/cache/cluster/node/containerd.sock""#));
        assert!(toml.contains(r#"sandbox_image = "weft.local/pause:3.10-abc""#));
        assert!(toml.contains(r#"conf_dir = "/cache/cluster/node/cni/net.d""#));
        assert!(toml.contains("SystemdCgroup = false"));
    }

    #[test]
    fn cni_gives_pods_addresses_from_the_pod_range_on_the_bridge() {
        let conflist: serde_json::Value = serde_json::from_str(&cni_conflist(&dirs())).unwrap();
        let bridge = &conflist["plugins"][0];
        assert_eq!(bridge["type"], "bridge");
        assert_eq!(bridge["bridge"], net::BRIDGE);
        assert_eq!(bridge["ipam"]["ranges"][0][0]["subnet"], net::POD_CIDR);
        assert_eq!(bridge["ipam"]["dataDir"], "/cache/cluster/node/cni/ipam");
    }

    #[test]
    fn kubelet_runs_cgroupfs_on_v1_and_refuses_anonymous_requests() {
        let ca = Path::new("/pki/client-ca.crt");
        let (cert, key) = (Path::new("/pki/kubelet.crt"), Path::new("/pki/kubelet.key"));
        let yaml =
            kubelet_yaml(&dirs(), &KubeletFiles { client_ca: ca, serving_cert: cert, serving_key: key });
        let config: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(config["cgroupDriver"], "cgroupfs");
        assert_eq!(config["failCgroupV1"], false);
        assert_eq!(config["authentication"]["anonymous"]["enabled"], false);
        assert_eq!(config["address"], net::NODE_IP.to_string());
        assert_eq!(config["clusterDNS"][0], net::CLUSTER_DNS.to_string());
        assert_eq!(config["containerRuntimeEndpoint"], "unix:///cache/cluster/node/containerd.sock");
    }

    #[test]
    fn coredns_manifests_name_the_image_and_the_dns_address() {
        let yaml = coredns_manifests("weft.local/coredns:1.14.7-abc");
        assert!(!yaml.contains("{{"), "every placeholder is filled");
        let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&yaml)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        let service = docs.iter().find(|d| d["kind"] == "Service").unwrap();
        assert_eq!(service["spec"]["clusterIP"], net::CLUSTER_DNS.to_string());
        let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
        assert_eq!(
            deployment["spec"]["template"]["spec"]["containers"][0]["image"],
            "weft.local/coredns:1.14.7-abc"
        );
    }
}
