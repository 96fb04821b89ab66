//! The `weft-operator` binary against the test cluster: started with the flags the chart
//! passes it becomes ready, takes the Lease, and on SIGTERM releases it and exits 0; killed
//! (SIGKILL) under a connected proxy, the proxy keeps serving its config and resyncs from the
//! next operator process.
//!
//! Needs the test cluster: `cargo xtask cluster up` (or `cargo xtask test`).

use std::{
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use rustix::process::{Pid, Signal, kill_process};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use weft_e2e::TestCluster;

const DEADLINE: Duration = Duration::from_secs(30);

fn free_port() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

async fn status_of(addr: SocketAddr, path: &str) -> Option<u16> {
    weft_e2e::http::get(addr, "localhost", path).await.ok().map(|(status, _)| status)
}

/// Starts the binary (no leader election unless `POD_NAME` is given in `env`) and waits for
/// `/ready`.
async fn start(
    cluster: &TestCluster,
    grpc: SocketAddr,
    admin: SocketAddr,
    env: &[(&str, &str)],
    extra: &[&str],
) -> Result<tokio::process::Child> {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_weft-operator"))
        .args(["--grpc-addr", &grpc.to_string(), "--admin-addr", &admin.to_string()])
        .args(extra)
        .env("KUBECONFIG", cluster.kubeconfig())
        .env_remove("POD_NAME")
        .envs(env.iter().copied())
        .env("WEFT_LOG_FORMAT", "json")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting weft-operator")?;
    let started = Instant::now();
    while status_of(admin, "/ready").await != Some(200) {
        if let Some(status) = child.try_wait()? {
            bail!("weft-operator exited: {status}");
        }
        if started.elapsed() > DEADLINE {
            bail!("not ready within {DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(child)
}

#[tokio::test]
async fn the_binary_starts_with_the_charts_flags_leads_and_releases_on_sigterm() -> Result<()> {
    let cluster = TestCluster::shared().await;
    let ns = cluster.namespace("op-binary").await?;
    let (grpc, admin) = (free_port()?, free_port()?);
    // The arguments charts/weft renders for the operator's container.
    let rendered = weft_e2e::helm::render(ns.name(), &[])?;
    let deployment = rendered
        .iter()
        .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "weft-operator")
        .context("the chart renders no weft-operator Deployment")?;
    let chart_args: Vec<String> =
        serde_json::from_value(deployment["spec"]["template"]["spec"]["containers"][0]["args"].clone())
            .unwrap_or_default();
    // The chart names the cluster-wide webhook configuration; this operator gets one of its own
    // (absent here) so it never touches the one another test installs with the chart.
    let own_configuration = format!("--webhook-configuration=weft-test-{}", ns.name());
    let chart_flags: Vec<&str> = chart_args
        .iter()
        .map(|arg| {
            if arg.starts_with("--webhook-configuration=") {
                own_configuration.as_str()
            } else {
                arg.as_str()
            }
        })
        .collect();
    assert!(
        chart_flags.contains(&own_configuration.as_str()),
        "the chart passes --webhook-configuration: {chart_args:?}"
    );
    let env = [
        ("POD_NAMESPACE", ns.name()),
        ("POD_NAME", "weft-operator-0"),
        // Not a chart setting: keeps this test's operator out of other tests' namespaces.
        ("WEFT_OPERATOR_WATCH_NAMESPACE", ns.name()),
    ];
    let mut child = start(cluster, grpc, admin, &env, &chart_flags).await?;
    assert_eq!(status_of(admin, "/live").await, Some(200));

    let leases = Api::<Lease>::namespaced(cluster.client(), ns.name());
    let holder = |lease: Option<&Lease>| {
        lease.and_then(|l| l.spec.as_ref()).and_then(|s| s.holder_identity.clone()).unwrap_or_default()
    };
    let held =
        kube_runtime::wait::await_condition(leases.clone(), "weft-operator", move |l: Option<&Lease>| {
            holder(l) == "weft-operator-0"
        });
    tokio::time::timeout(DEADLINE, held).await.context("never took the lease")??;

    let pid = Pid::from_raw(child.id().context("no pid")? as i32).context("pid 0")?;
    kill_process(pid, Signal::TERM)?;
    let status = tokio::time::timeout(DEADLINE, child.wait()).await.context("no exit after SIGTERM")??;
    assert!(status.success(), "{status}");
    let lease = leases.get("weft-operator").await?;
    assert_eq!(holder(Some(&lease)), "", "released on shutdown");
    Ok(())
}

/// `GET /` with `Host: reviews` through the proxy's explicit listener.
async fn ask(listener: SocketAddr) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(listener).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n").await?;
    let mut buf = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    Ok(text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

fn answer(body: &str) -> serde_json::Value {
    serde_json::json!({"apiVersion": "networking.weft.dev/v1alpha1", "kind": "VirtualService",
        "metadata": {"name": "reviews"},
        "spec": {"hosts": ["reviews"], "http": [{"directResponse": {"status": 200, "body": {"string": body}}}]}})
}

#[tokio::test]
async fn a_killed_operator_leaves_proxies_serving_and_the_next_one_resyncs_them() -> Result<()> {
    use kube::api::{Patch, PatchParams, PostParams};
    use weft_api::VirtualService;

    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    let ns = cluster.namespace("op-kill").await?;
    let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "reviews"}, "spec": {"ports": [{"name": "http", "port": 9080}]}}))?;
    Api::namespaced(client.clone(), ns.name()).create(&PostParams::default(), &svc).await?;
    let vss = Api::<VirtualService>::namespaced(client.clone(), ns.name());
    vss.create(&PostParams::default(), &serde_json::from_value(answer("one"))?).await?;

    let (grpc, admin) = (free_port()?, free_port()?);
    let scope = ["--watch-namespace", ns.name()];
    let env = [("POD_NAMESPACE", ns.name())];
    let mut first = start(cluster, grpc, admin, &env, &scope).await?;
    let mut settings = weft_proxy::Settings::loopback("/nonexistent".into());
    let mut cp = weft_proxy::config::control_plane::ControlPlane::new(
        grpc.to_string(),
        format!("test-proxy.{}", ns.name()),
        vec!["reviews".into()],
    );
    cp.backoff_max = Duration::from_millis(500);
    cp.server_name = format!("weft-operator.{}.svc", ns.name());
    settings.control_plane = Some(cp);
    // A certificate from the CA the operator made in its namespace (the stream requires one).
    let secrets = Api::namespaced(client.clone(), ns.name());
    let signer = weft_operator::ca::authority::read(&secrets, "weft-ca").await?.context("no CA Secret")?;
    let id = weft_identity::SpiffeId::new("cluster.local", ns.name(), "test-proxy")?;
    let issued = signer.issuer.issue(&id, std::time::SystemTime::now(), Duration::from_secs(3600))?;
    let dir = std::env::temp_dir().join(format!("weft-binary-test-{}", ns.name()));
    let files = weft_proxy::settings::IdentityFiles::write(
        &dir,
        &issued.cert_pem,
        &issued.key_pem,
        &signer.bundle_pem,
    )?;
    settings.identity = Some(weft_proxy::settings::IdentitySource::Files(files));
    let proxy = weft_proxy::start(settings).await?;
    let listener = proxy.explicit_addrs[0];
    let mut status = proxy.store.subscribe();
    tokio::time::timeout(DEADLINE, status.wait_for(|s| s.loaded_at.is_some())).await??;
    assert_eq!(ask(listener).await?, "one");

    // SIGKILL: no goodbye on the stream.
    first.kill().await?;
    let mut connected = proxy.control_plane.as_ref().context("control plane")?.connected();
    tokio::time::timeout(DEADLINE, connected.wait_for(|c| !*c)).await??;
    assert_eq!(ask(listener).await?, "one", "still serving its last config");
    assert!(proxy.store.is_ready());

    vss.patch("reviews", &PatchParams::default(), &Patch::Merge(answer("two"))).await?;
    // Nothing installs while no operator runs, so this count is stable until the next one.
    let before = proxy.store.status().attempts;
    let mut second = start(cluster, grpc, admin, &env, &scope).await?;
    tokio::time::timeout(DEADLINE, status.wait_for(|s| s.attempts > before)).await??;
    assert_eq!(ask(listener).await?, "two");
    proxy.shutdown();
    second.kill().await?;
    Ok(())
}
