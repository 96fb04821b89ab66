//! The test cluster's node: one real Kubernetes node run by `cargo xtask cluster up` beside
//! the control plane. containerd (Debian's, with runc and the CNI bridge), the kubelet and
//! kube-proxy (built from the same Kubernetes module as the control plane) run as host
//! processes inside a network namespace made for them ([`net`]); CoreDNS runs on it as a pod.
//! Images are imported into containerd from archives, never pulled ([`crate::images`]).
//!
//! The pieces:
//! - [`config`]: every configuration file, rendered by pure functions;
//! - [`net`]: the namespace, the veth pair, the address plan;
//! - [`clean`]: removing whatever a node left behind (by `down`, or by `up` after a crash).

mod clean;
pub mod config;
pub mod net;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

pub use clean::{Cleaned, clean};
pub use config::NodeDirs;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{Api, api::ListParams};

use crate::cluster::Error;

/// containerd, in the node's namespace.
pub const CONTAINERD: &str = "containerd";
/// The kubelet, in the node's namespace.
pub const KUBELET: &str = "kubelet";
/// kube-proxy, in the node's namespace.
pub const KUBE_PROXY: &str = "kube-proxy";
/// The Debian packages the node needs, by the command (or file) that shows each is there.
pub const PACKAGES: &[(&str, &str)] = &[
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("runc", "runc"),
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
    ("iptables", "iptables"),
    ("conntrack", "conntrack"),
    ("ip", "iproute2"),
];

/// Checks that this machine can run the node, and says in one line what is missing and how
/// to get it, instead of failing later in a component's log.
pub fn preflight() -> Result<(), Error> {
    let missing = |what: &str, fix: &str| Err(Error::NodePreflight(format!("{what}: {fix}")));
    if !rustix::process::geteuid().is_root() {
        return missing(
            "the node needs root (network namespaces, mounts, cgroups)",
            "run `cargo xtask cluster up` as root",
        );
    }
    let absent: Vec<&str> =
        PACKAGES.iter().filter(|(tool, _)| !command_exists(tool)).map(|(_, package)| *package).collect();
    if !absent.is_empty() {
        let mut packages = absent.clone();
        packages.dedup();
        return missing(
            &format!("missing Debian packages {}", packages.join(" ")),
            &format!("`apt-get install {}` (cargo xtask cluster up does this itself)", packages.join(" ")),
        );
    }
    if !Path::new("/sys/fs/cgroup/memory/cgroup.procs").is_file() {
        return missing(
            "no cgroup v1 memory hierarchy at /sys/fs/cgroup/memory",
            "the node's kubelet uses the cgroupfs driver on cgroup v1; mount the v1 controllers",
        );
    }
    let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems.lines().any(|l| l.trim_end().ends_with("overlay")) {
        return missing(
            "the kernel has no overlay filesystem",
            "load it (`modprobe overlay`): containerd's overlayfs snapshotter needs it",
        );
    }
    if !Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables").exists() {
        return missing(
            "the kernel's bridge netfilter is missing (no /proc/sys/net/bridge)",
            "load it (`modprobe br_netfilter`): kube-proxy's Service rules must see bridged pod traffic",
        );
    }
    Ok(())
}

fn command_exists(tool: &str) -> bool {
    if tool.starts_with('/') {
        return Path::new(tool).is_file();
    }
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

/// What the node runs with that `up` prepares elsewhere.
#[derive(Debug, Clone)]
pub struct NodeInputs<'a> {
    /// The pause image's reference (containerd's sandbox image).
    pub pause_image: &'a str,
    /// Files for the kubelet's TLS and client authentication.
    pub kubelet: config::KubeletFiles<'a>,
    /// kube-proxy's kubeconfig.
    pub kube_proxy_kubeconfig: &'a Path,
}

/// Writes the node's configuration files, makes its directories and cgroups, and creates its
/// network. Call [`clean`] first.
pub(crate) fn prepare(dirs: &NodeDirs, inputs: &NodeInputs<'_>, service_range: &str) -> Result<(), Error> {
    for dir in [
        dirs.root.clone(),
        dirs.run.clone(),
        dirs.pod_logs.clone(),
        dirs.cni_conf_dir(),
        dirs.cni_data_dir(),
        dirs.kubelet_root(),
    ] {
        fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    let files: [(PathBuf, String); 5] = [
        (dirs.containerd_config(), config::containerd_toml(dirs, inputs.pause_image)),
        (dirs.cni_conf_dir().join("10-weft-node.conflist"), config::cni_conflist(dirs)),
        (dirs.kubelet_config(), config::kubelet_yaml(dirs, &inputs.kubelet)),
        (dirs.kube_proxy_config(), config::kube_proxy_yaml(inputs.kube_proxy_kubeconfig)),
        (dirs.resolv_conf(), config::resolv_conf()),
    ];
    for (path, contents) in files {
        fs::write(&path, contents).map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    }
    clean::create_cgroups()?;
    net::create(service_range).inspect_err(|_| {
        let _ = net::remove();
    })
}

/// containerd's arguments.
pub(crate) fn containerd_args(dirs: &NodeDirs) -> Vec<String> {
    vec![format!("--config={}", dirs.containerd_config().display()), "--log-level=warn".into()]
}

/// The kubelet's arguments.
pub(crate) fn kubelet_args(dirs: &NodeDirs, kubeconfig: &Path) -> Vec<String> {
    vec![
        format!("--config={}", dirs.kubelet_config().display()),
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--root-dir={}", dirs.kubelet_root().display()),
        format!("--hostname-override={}", net::NODE_NAME),
        format!("--node-ip={}", net::NODE_IP),
    ]
}

/// kube-proxy's arguments.
pub(crate) fn kube_proxy_args(dirs: &NodeDirs) -> Vec<String> {
    vec![format!("--config={}", dirs.kube_proxy_config().display())]
}

/// Whether containerd answers on its socket.
pub(crate) fn containerd_ready(dirs: &NodeDirs) -> Result<(), String> {
    let output = Command::new("ctr")
        .arg("--address")
        .arg(dirs.containerd_socket())
        .args(["--timeout", "2s", "version"])
        .output()
        .map_err(|e| format!("running ctr: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}

/// The absolute path of `command` on `PATH` (recorded processes are recognised by it).
pub(crate) fn which(command: &str) -> Result<PathBuf, Error> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(command))
        .find(|path| path.is_file())
        .ok_or_else(|| Error::NodePreflight(format!("{command} is not on PATH")))
}

/// `Ok` when the node's `Ready` condition is `True`, else its reason and message.
pub fn ready(node: &Node) -> Result<(), String> {
    let conditions = node.status.as_ref().and_then(|s| s.conditions.as_deref()).unwrap_or_default();
    match conditions.iter().find(|c| c.type_ == "Ready") {
        Some(c) if c.status == "True" => Ok(()),
        Some(c) => Err(format!(
            "Ready={} ({}: {})",
            c.status,
            c.reason.as_deref().unwrap_or("no reason"),
            c.message.as_deref().unwrap_or("")
        )),
        None => Err("no Ready condition yet".to_owned()),
    }
}

/// Why a pod is not running and ready, in the kubelet's words (its phase, each container's
/// waiting or terminated reason and message); `None` when it runs and is ready.
pub fn pod_problem(pod: &Pod) -> Option<String> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Unknown");
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    if ready || phase == "Succeeded" {
        return None;
    }
    let mut reasons = Vec::new();
    let containers = status.into_iter().flat_map(|s| {
        s.init_container_statuses.iter().flatten().chain(s.container_statuses.iter().flatten())
    });
    for container in containers {
        let state = container.state.as_ref();
        if let Some(waiting) = state.and_then(|s| s.waiting.as_ref()) {
            reasons.push(format!(
                "{}: {} {}",
                container.name,
                waiting.reason.as_deref().unwrap_or("Waiting"),
                waiting.message.as_deref().unwrap_or("")
            ));
        } else if let Some(done) = state.and_then(|s| s.terminated.as_ref())
            && done.exit_code != 0
        {
            reasons.push(format!(
                "{}: {} (exit {}) {}",
                container.name,
                done.reason.as_deref().unwrap_or("Terminated"),
                done.exit_code,
                done.message.as_deref().unwrap_or("")
            ));
        }
    }
    if reasons.is_empty()
        && let Some(unscheduled) = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled" && c.status != "True"))
    {
        reasons.push(format!("unscheduled: {}", unscheduled.message.as_deref().unwrap_or("")));
    }
    Some(format!("pod {namespace}/{name} {phase}, not ready: {}", reasons.join("; ").trim()))
}

/// [`pod_problem`] for every pod matching `selector`, one per line; a short note when none
/// exists yet.
pub async fn pod_problems(pods: &Api<Pod>, selector: &str) -> String {
    match pods.list(&ListParams::default().labels(selector)).await {
        Ok(list) if list.items.is_empty() => format!("no pod matches {selector} yet"),
        Ok(list) => {
            let problems: Vec<String> = list.items.iter().filter_map(pod_problem).collect();
            if problems.is_empty() { "pods ready".to_owned() } else { problems.join("\n") }
        }
        Err(e) => format!("listing pods: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn a_pod_that_cannot_start_is_described_with_the_kubelets_reason() {
        let stuck = pod(serde_json::json!({
            "phase": "Pending",
            "containerStatuses": [{
                "name": "app", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ErrImageNeverPull", "message": "image not present"}},
            }],
        }));
        let problem = pod_problem(&stuck).unwrap();
        assert!(problem.starts_with("pod shop/web Pending"), "{problem}");
        assert!(problem.contains("app: ErrImageNeverPull image not present"), "{problem}");

        let crashed = pod(serde_json::json!({
            "phase": "Running",
            "containerStatuses": [{
                "name": "app", "image": "x", "imageID": "", "ready": false, "restartCount": 3,
                "state": {"terminated": {"reason": "Error", "exitCode": 2}},
            }],
        }));
        assert!(pod_problem(&crashed).unwrap().contains("app: Error (exit 2)"));
    }

    #[test]
    fn ready_and_finished_pods_have_no_problem() {
        let ready = pod(serde_json::json!({
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
        }));
        assert_eq!(pod_problem(&ready), None);
        assert_eq!(pod_problem(&pod(serde_json::json!({"phase": "Succeeded"}))), None);
    }
}
