//! The test cluster's node as users debug with it: it is Ready, CoreDNS runs on it and answers
//! for Services, and `kubectl logs`, `kubectl port-forward` and the apiserver's proxy to a pod
//! reach containers on it.
//!
//! Needs the test cluster with its node: `cargo xtask test`, or `cargo xtask cluster up`.

use std::{
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::{
    Api,
    api::{ListParams, LogParams},
};
use weft_e2e::{TestCluster, cluster, node};

async fn coredns_pod(client: &kube::Client) -> Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    let listed = pods.list(&ListParams::default().labels("k8s-app=kube-dns")).await?;
    let pod = listed.items.into_iter().next().context("no CoreDNS pod")?;
    ensure!(node::pod_problem(&pod).is_none(), "{}", node::pod_problem(&pod).unwrap_or_default());
    Ok(pod)
}

#[tokio::test]
async fn the_node_is_ready_and_runs_coredns_behind_the_dns_service() -> Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes.get(node::net::NODE_NAME).await?;
    node::ready(&node).map_err(anyhow::Error::msg)?;
    let addresses = node.status.and_then(|s| s.addresses).unwrap_or_default();
    ensure!(
        addresses.iter().any(|a| a.type_ == "InternalIP" && a.address == node::net::NODE_IP.to_string()),
        "the node's InternalIP is not {}: {addresses:?}",
        node::net::NODE_IP
    );
    let pod = coredns_pod(&client).await?;
    let ip = pod.status.and_then(|s| s.pod_ip).context("CoreDNS has no address")?;
    ensure!(
        ip.starts_with("10.244.0."),
        "CoreDNS's address {ip} is not in the pod range {}",
        node::net::POD_CIDR
    );
    let services: Api<Service> = Api::namespaced(client.clone(), "kube-system");
    let dns = services.get("kube-dns").await?;
    let dns_ip = dns.spec.and_then(|s| s.cluster_ip).unwrap_or_default();
    ensure!(dns_ip == node::net::CLUSTER_DNS.to_string(), "kube-dns has address {dns_ip}");
    Ok(())
}

#[tokio::test]
async fn kubectl_logs_and_the_apiserver_proxy_reach_a_container_on_the_node() -> Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    let pod = coredns_pod(&client).await?;
    let name = pod.metadata.name.clone().context("no name")?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "kube-system");

    // What `kubectl logs` asks: the kubelet reads the container's log file.
    let logs = pods.logs(&name, &LogParams::default()).await?;
    ensure!(logs.contains("CoreDNS-1.14.7"), "CoreDNS's log does not name its version:\n{logs}");

    // The apiserver's proxy to a pod's port: the apiserver dials the pod's address.
    let request = http::Request::get(format!("/api/v1/namespaces/kube-system/pods/{name}:8080/proxy/health"))
        .body(Vec::new())?;
    let health = client.request_text(request).await?;
    ensure!(health.trim() == "OK", "CoreDNS /health through the apiserver answered {health:?}");
    Ok(())
}

#[test]
fn kubectl_port_forward_reaches_a_container_on_the_node() -> Result<()> {
    let env = cluster::env()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let pod = runtime.block_on(async {
        let cluster = TestCluster::shared().await;
        coredns_pod(&cluster.client()).await
    })?;
    let name = pod.metadata.name.context("no name")?;
    let mut forward = Command::new(env.bin_dir.join("kubectl"))
        .env("KUBECONFIG", &env.kubeconfig)
        .args(["port-forward", "-n", "kube-system", &format!("pod/{name}"), "--address=127.0.0.1", ":8181"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let result = (|| -> Result<()> {
        // kubectl prints the local port it chose once it listens: the readiness signal.
        let stdout = forward.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = lines.next().context("kubectl port-forward exited without forwarding")??;
        let port: u16 = line
            .strip_prefix("Forwarding from 127.0.0.1:")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("unexpected kubectl output: {line}"))?;
        // The pod is ready, so CoreDNS's ready plugin answers at once.
        let (status, body) = runtime.block_on(weft_e2e::http::get(
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            "localhost",
            "/ready",
        ))?;
        ensure!(status == 200 && body.trim() == "OK", "CoreDNS /ready through port-forward: {status} {body}");
        Ok(())
    })();
    let _ = forward.kill();
    let _ = forward.wait();
    result
}
