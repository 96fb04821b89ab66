//! The node's network: a network namespace made by `up`, reached from the host through one
//! veth pair, and the address plan of everything inside it.
//!
//! ```text
//!  host (root namespace)                 netns weft-node (the node)
//!  kube-apiserver 10.250.0.1:<port> ---- weft-host  <veth>  eth0 10.250.0.2   kubelet, kube-proxy, containerd
//!  routes: 10.244.0.0/24 (pods)     ---> via 10.250.0.2      bridge weft0 10.244.0.1 -- pods 10.244.0.x
//!          10.0.0.0/24 (Services)   ---> via 10.250.0.2      kube-proxy's iptables turn Service IPs into pods
//! ```
//!
//! The node has no default route: a pod, the kubelet or containerd trying to reach anything
//! outside these ranges fails at once ("network unreachable") instead of leaving the machine.
//! Deleting the namespace takes the veth pair, the bridge, the routes through it and every
//! iptables rule inside it along.

use std::{net::Ipv4Addr, path::PathBuf, process::Command};

use crate::cluster::Error;

/// The network namespace's name (`ip netns`), also the node's name and its cgroup root.
pub const NETNS: &str = "weft-node";
/// The node object's name.
pub const NODE_NAME: &str = NETNS;
/// The cgroup (below each v1 controller's root) that the kubelet puts every pod under.
pub const CGROUP_ROOT: &str = NETNS;
/// The host's end of the veth pair.
pub const HOST_LINK: &str = "weft-host";
/// The node's end of the veth pair, inside the namespace.
pub const NODE_LINK: &str = "eth0";
/// The host's address on the veth pair: kube-apiserver listens here, so the node and its
/// pods reach it (it is also the `kubernetes` Service's endpoint).
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
/// The node's address (its InternalIP): the kubelet's API, NodePorts.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 2);
/// The veth pair's prefix length.
pub const LINK_PREFIX: u8 = 30;
/// The pods' addresses on this node.
pub const POD_CIDR: &str = "10.244.0.0/24";
/// All pod addresses of the cluster (kube-proxy's `clusterCIDR`).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The CNI bridge inside the namespace.
pub const BRIDGE: &str = "weft0";
/// CoreDNS's Service address (the 10th of the Service range, as kubeadm does).
pub const CLUSTER_DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
/// The cluster's DNS domain.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The kubelet's API port on [`NODE_IP`].
pub const KUBELET_PORT: u16 = 10250;
/// The kubelet's `/healthz` on the node's loopback.
pub const KUBELET_HEALTHZ_PORT: u16 = 10248;
/// kube-proxy's `/healthz` on [`NODE_IP`].
pub const KUBE_PROXY_HEALTHZ_PORT: u16 = 10256;

/// The namespace's bind mount, which processes are started into.
pub fn netns_path() -> PathBuf {
    PathBuf::from("/run/netns").join(NETNS)
}

/// Creates the namespace, the veth pair with its addresses, and the host's routes to the pod
/// and Service ranges through the node. Fails if any of it exists already: call
/// [`remove`] first.
pub fn create(service_range: &str) -> Result<(), Error> {
    let host = format!("{HOST_IP}/{LINK_PREFIX}");
    let node = format!("{NODE_IP}/{LINK_PREFIX}");
    let node_ip = NODE_IP.to_string();
    let steps: Vec<Vec<&str>> = vec![
        vec!["netns", "add", NETNS],
        vec!["link", "add", HOST_LINK, "type", "veth", "peer", "name", NODE_LINK, "netns", NETNS],
        vec!["addr", "add", &host, "dev", HOST_LINK],
        vec!["link", "set", HOST_LINK, "up"],
        vec!["-n", NETNS, "link", "set", "lo", "up"],
        vec!["-n", NETNS, "addr", "add", &node, "dev", NODE_LINK],
        vec!["-n", NETNS, "link", "set", NODE_LINK, "up"],
        vec!["route", "add", POD_CIDR, "via", &node_ip, "dev", HOST_LINK],
        vec!["route", "add", service_range, "via", &node_ip, "dev", HOST_LINK],
    ];
    for step in steps {
        ip(&step)?;
    }
    // The node routes between its veth and the pods' bridge.
    sysctl_in_netns("net.ipv4.ip_forward=1")
}

/// Whether the namespace exists.
pub fn exists() -> bool {
    netns_path().exists()
}

/// Deletes the namespace (and with it the veth pair, the bridge, the routes and the iptables
/// rules inside) and, if a host end survived a half-made setup, that too. A no-op when
/// nothing is there. Processes still inside keep the namespace alive: stop them first.
pub fn remove() -> Result<(), Error> {
    if exists() {
        ip(&["netns", "delete", NETNS])?;
    }
    if PathBuf::from("/sys/class/net").join(HOST_LINK).exists() {
        ip(&["link", "delete", HOST_LINK])?;
    }
    Ok(())
}

fn sysctl_in_netns(setting: &str) -> Result<(), Error> {
    run(Command::new("ip").args(["netns", "exec", NETNS, "sysctl", "-q", "-w", setting]))
}

fn ip(args: &[&str]) -> Result<(), Error> {
    run(Command::new("ip").args(args))
}

/// Runs a setup command, turning a failure into an error that shows the command and what it
/// printed.
pub(crate) fn run(command: &mut Command) -> Result<(), Error> {
    let shown = format!(
        "{} {}",
        command.get_program().to_string_lossy(),
        command.get_args().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
    );
    let output = command.output().map_err(|e| Error::io(format!("running {shown}"), e))?;
    if output.status.success() {
        return Ok(());
    }
    Err(Error::NodeSetup {
        command: shown,
        output: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}
