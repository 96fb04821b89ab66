//! Weft installed as a user installs it, on the test cluster's real node: `helm install` of
//! the chart with the locally built images, a labelled namespace's app injected and running
//! with its proxy, traffic through both proxies, an unmeshed client, a Job, the operator
//! deleted under load, and `helm uninstall`.
//!
//! One test, in steps, because the chart is cluster-wide (its webhook and cluster roles exist
//! once) and the last step uninstalls it: the steps share one installation and run in order.
//! Each step names what it proves and fails with what it saw.
//!
//! Needs the test cluster with its node and the images: `cargo xtask test` does both; by hand,
//! `cargo xtask cluster up && cargo xtask images`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::{
    api::{batch::v1::Job, core::v1::Pod},
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{
    Api, Client,
    api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams},
};
use serde_json::{Value, json};
use weft_e2e::{
    TestCluster, apply,
    images::ImageSet,
    mesh::{
        self, ADMIN_PORT, APP_PORT, RELEASE_NAMESPACE, START, app_of, apply_and_wait, call, get, is_injected,
        requests_total,
    },
    node,
    webhook::enable_injection,
};

const POLL: Duration = Duration::from_millis(500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_installs_and_meshes_apps_on_the_real_node() -> Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    let images = mesh::built_images()?;

    step("helm install: the operator and the webhook run as pods and become ready");
    // A previous run that died may have left the release.
    mesh::uninstall()?;
    let installed = Installed;
    mesh::install(&client, &images, &["operator.replicas=1", "webhook.replicas=1"]).await?;

    step("a labelled namespace's Deployments come up with the proxy beside the app, ready");
    let meshed = cluster.namespace("meshed").await?;
    enable_injection(&client, meshed.name()).await?;
    let pods = apply_and_wait(&client, meshed.name(), &mesh::bookinfo(&images)?).await?;
    let frontend = only(&pods, "frontend")?;
    for pod in &pods {
        assert_injected_and_ready(pod)?;
    }
    let (status, body) = get(frontend, ADMIN_PORT, "/ready").await?;
    ensure!(status == 200, "the frontend's proxy /ready answered {status}: {body}");
    // Its identity came from the mesh CA: nobody wrote a certificate file.
    let frontend_id = format!("spiffe://cluster.local/ns/{}/sa/frontend", meshed.name());
    ensure!(
        body.contains(&format!("identity: {frontend_id}")),
        "the frontend's proxy has no identity from the CA: {body}"
    );

    step("a request from one demo pod to another's Service crosses both proxies, over mTLS");
    let reviews: Vec<&Pod> = pods.iter().filter(|p| app_of(p) == "reviews").collect();
    let reviews_url = format!("http://reviews.{}.svc.cluster.local/", meshed.name());
    // The frontend's proxy has never heard of the Service: the first connection asks the
    // operator and waits for its answer, so even that one goes over mTLS.
    let before_mtls = mtls_requests(&reviews, &frontend_id).await?;
    let before_out = requests_total(frontend, "outbound").await?;
    let before_in = sum_requests(&reviews, "inbound").await?;
    let report = call(frontend, &reviews_url, 30, 3).await?;
    ensure!(report.ok() == 30 && report.errors == 0, "frontend -> reviews: {report:?}");
    let out = requests_total(frontend, "outbound").await? - before_out;
    let inbound = sum_requests(&reviews, "inbound").await? - before_in;
    ensure!(out >= 30.0, "the frontend's proxy counted {out} outbound requests, expected at least 30");
    ensure!(inbound >= 30.0, "the reviews proxies counted {inbound} inbound requests, expected at least 30");
    ensure!(
        report.versions.len() >= 2,
        "the reviews Service spread over its versions: {:?}",
        report.versions
    );
    // Between the proxies it was mTLS: the reviews proxies name the frontend's identity, over TLS.
    let mtls = mtls_requests(&reviews, &frontend_id).await? - before_mtls;
    ensure!(mtls >= 30.0, "the reviews proxies counted {mtls} mTLS requests from {frontend_id}, expected 30");
    // The route came from the operator, over its Service's DNS name: the frontend's proxy
    // holds the reviews Service with its three pods as endpoints.
    let (_, config) = get(frontend, ADMIN_PORT, "/config").await?;
    let config: Value = serde_json::from_str(&config).context("the proxy's /config is not JSON")?;
    let service = config["config"]["services"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == format!("reviews.{}.svc.cluster.local", meshed.name()))
        .context("the frontend's proxy has no config for the reviews Service")?;
    let endpoints = service["ports"][0]["endpoints"].as_array().map_or(0, Vec::len);
    ensure!(endpoints == 3, "the proxy knows {endpoints} reviews endpoints, expected 3: {service}");

    step("weftctl answers from the running mesh: check, identity, proxy-config, explain, stat");
    weftctl_answers(&client, meshed.name(), frontend, &reviews, &reviews_url).await?;

    step("an unlabelled namespace's pod is left alone and still reaches a meshed Service");
    let plain = cluster.namespace("plain").await?;
    let plain_pods = apply_and_wait(&client, plain.name(), &demo_deployment(&images, "client")).await?;
    let client_pod = only(&plain_pods, "client")?;
    ensure!(!is_injected(client_pod), "a pod in an unlabelled namespace was injected");
    let report = call(client_pod, &reviews_url, 10, 1).await?;
    ensure!(report.ok() == 10 && report.errors == 0, "unmeshed client -> meshed reviews: {report:?}");

    step("STRICT mTLS on reviews refuses the unmeshed client and serves meshed ones; PERMISSIVE serves both");
    strict_then_permissive(&client, meshed.name(), &reviews, frontend, client_pod, &reviews_url).await?;

    step("a Job in a meshed namespace completes: the native sidecar does not hold it");
    let ratings_url = format!("http://ratings.{}.svc.cluster.local/", meshed.name());
    run_job(&client, meshed.name(), &images, &ratings_url).await?;

    step(
        "a proxy killed in place fails closed (no plain text reaches its app) and is ready again in under a second",
    );
    proxy_restarted_in_place(
        &client,
        &cluster.containerd_socket(),
        meshed.name(),
        &reviews,
        frontend,
        client_pod,
    )
    .await?;

    step("deleting the operator pod under load loses no request: proxies keep their config");
    operator_deleted_under_load(&client, frontend, &reviews_url).await?;

    step("helm uninstall leaves no Weft object behind");
    installed.uninstall_and_check(&client).await
}

fn step(what: &str) {
    eprintln!("[mesh] {what}");
}

/// The pod of app `app` among `pods` (exactly one).
fn only<'a>(pods: &'a [Pod], app: &str) -> Result<&'a Pod> {
    let mut matching = pods.iter().filter(|p| app_of(p) == app);
    let pod = matching.next().with_context(|| format!("no pod of app {app}"))?;
    ensure!(matching.next().is_none(), "more than one pod of app {app}");
    Ok(pod)
}

/// weftctl's commands on the meshed namespace, each checked against what the test knows: the
/// install it made, the frontend's identity from the CA, the reviews Service and its three pods,
/// and the requests it sends.
async fn weftctl_answers(
    client: &Client,
    namespace: &str,
    frontend: &Pod,
    reviews: &[&Pod],
    url: &str,
) -> Result<()> {
    let now = std::time::SystemTime::now();
    let install = weftctl::check::Install::in_namespace(RELEASE_NAMESPACE);
    let checks = weftctl::check::run(client, &install, Some(namespace), now).await;
    let failed: Vec<_> = checks.iter().filter(|c| !c.ok).collect();
    ensure!(failed.is_empty(), "weftctl check failed: {failed:?}");
    ensure!(checks.len() >= 9, "weftctl check ran {} checks: {checks:?}", checks.len());

    let pod = frontend.metadata.name.as_deref().context("a pod name")?;
    let identity = weftctl::identity::fetch(client, namespace, pod).await?;
    let expected = format!("spiffe://cluster.local/ns/{namespace}/sa/frontend");
    ensure!(identity.identity.as_deref() == Some(expected.as_str()), "weftctl identity: {identity:?}");
    let cert = identity.certificate.as_ref().context("no certificate")?;
    ensure!(
        identity.trust_bundle.iter().any(|root| root.subject == cert.issuer),
        "the certificate's issuer is not among the trusted roots: {identity:?}"
    );
    let renewal = identity.next_renewal_unix_seconds.context("a CA identity has a next renewal")?;
    ensure!(
        (cert.not_before_unix_seconds..cert.not_after_unix_seconds).contains(&renewal),
        "renewal outside the validity: {identity:?}"
    );

    let running = weftctl::proxy_config::fetch(client, namespace, pod).await?;
    let table = weftctl::proxy_config::render_table(&running, now);
    let reviews_ips: Vec<String> =
        reviews.iter().map(|p| mesh::pod_ip(p).map(|ip| ip.to_string())).collect::<Result<_, _>>()?;
    for ip in &reviews_ips {
        ensure!(
            table.contains(ip.as_str()),
            "weftctl proxy-config does not list the reviews pod {ip}:\n{table}"
        );
    }

    let explained =
        weftctl::explain::run(client, namespace, pod, &http::Method::GET, url, &Default::default()).await?;
    let service = format!("reviews.{namespace}.svc.cluster.local");
    ensure!(
        explained.outbound.service.as_deref() == Some(service.as_str()),
        "weftctl explain: {explained:?}"
    );
    let endpoints: Vec<_> = explained.outbound.destinations.iter().flat_map(|d| &d.endpoints).collect();
    let reviews_id = format!("spiffe://cluster.local/ns/{namespace}/sa/reviews");
    ensure!(
        endpoints.len() == 3 && endpoints.iter().all(|e| e.identity.as_deref() == Some(reviews_id.as_str())),
        "weftctl explain: the three reviews pods over mTLS, got {endpoints:?}"
    );
    ensure!(
        explained.inbound.len() == 3 && explained.inbound.iter().all(|s| s.decision.allowed),
        "weftctl explain: every reviews proxy admits the frontend: {:?}",
        explained.inbound
    );

    let frontends = weftctl::stat::pods(client, namespace, "deploy/frontend-v1").await?;
    ensure!(frontends == [pod], "weftctl stat: the frontend's pods are {frontends:?}");
    let before = weftctl::stat::scrape(client, namespace, &frontends).await?;
    let started = std::time::Instant::now();
    let report = call(frontend, url, 40, 4).await?;
    ensure!(report.ok() == 40, "frontend -> reviews: {report:?}");
    let after = weftctl::stat::scrape(client, namespace, &frontends).await?;
    let rows = weftctl::stat::rows(&before, &after, started.elapsed());
    let to_reviews: Vec<_> =
        rows.iter().filter(|r| r.key.direction == "outbound" && r.key.peer_service == service).collect();
    let requests: f64 = to_reviews.iter().map(|r| r.requests).sum();
    ensure!(requests == 40.0, "weftctl stat counted {requests} requests to reviews, sent 40: {rows:?}");
    ensure!(
        to_reviews.iter().all(|r| r.success_rate == Some(1.0) && r.p99_ms.is_some_and(|p| p > 0.0)),
        "weftctl stat: {to_reviews:?}"
    );
    Ok(())
}

/// Inbound requests the pods' proxies counted over mTLS from `principal`.
async fn mtls_requests(pods: &[&Pod], principal: &str) -> Result<f64> {
    let mut total = 0.0;
    for pod in pods {
        let (_, metrics) = get(pod, ADMIN_PORT, "/metrics").await?;
        total += metrics
            .lines()
            .filter(|l| {
                l.starts_with("weft_requests_total{")
                    && l.contains("direction=\"inbound\"")
                    && l.contains("tls=\"true\"")
                    && l.contains(&format!("source_principal=\"{principal}\""))
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>();
    }
    Ok(total)
}

async fn sum_requests(pods: &[&Pod], direction: &str) -> Result<f64> {
    let mut total = 0.0;
    for pod in pods {
        total += requests_total(pod, direction).await?;
    }
    Ok(total)
}

/// The release, installed. [`Installed::uninstall_and_check`] removes it; dropped after a failed
/// step, it uninstalls anyway, so later test binaries find no webhook of ours (uninstalling
/// twice is harmless: the second finds no release).
struct Installed;

impl Installed {
    async fn uninstall_and_check(&self, client: &Client) -> Result<()> {
        mesh::uninstall()?;
        // Objects the operator made itself must go with the release (owner references).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = leftovers(client).await?;
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("after helm uninstall these remain: {}", left.join(", "));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = mesh::uninstall();
    }
}

/// Weft's objects still in the cluster: anything in the release namespace (which Helm
/// documents it keeps) but what Kubernetes puts in every namespace, its webhook configuration
/// and its cluster roles. The CRDs are the test cluster's, not the release's.
async fn leftovers(client: &Client) -> Result<Vec<String>> {
    let mut left = Vec::new();
    let namespaced: &[(&str, &str, &str, &[&str])] = &[
        ("apps", "v1", "Deployment", &[]),
        ("", "v1", "Pod", &[]),
        ("", "v1", "Service", &[]),
        ("", "v1", "ConfigMap", &["kube-root-ca.crt"]),
        // The mesh CA stays (as Istio's istio-ca-secret does): a reinstall keeps the root
        // that running proxies trust, and a plug-in CA is the user's own.
        ("", "v1", "Secret", &["weft-ca"]),
        ("", "v1", "ServiceAccount", &["default"]),
        ("coordination.k8s.io", "v1", "Lease", &[]),
        ("rbac.authorization.k8s.io", "v1", "Role", &[]),
        ("rbac.authorization.k8s.io", "v1", "RoleBinding", &[]),
        ("policy", "v1", "PodDisruptionBudget", &[]),
    ];
    for (group, version, kind, allowed) in namespaced {
        for name in names(client, group, version, kind, Some(RELEASE_NAMESPACE)).await? {
            if !allowed.contains(&name.as_str()) {
                left.push(format!("{kind} {RELEASE_NAMESPACE}/{name}"));
            }
        }
    }
    let cluster_scoped = [
        ("admissionregistration.k8s.io", "v1", "MutatingWebhookConfiguration"),
        ("rbac.authorization.k8s.io", "v1", "ClusterRole"),
        ("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding"),
    ];
    for (group, version, kind) in cluster_scoped {
        for name in names(client, group, version, kind, None).await? {
            if name.contains("weft") {
                left.push(format!("{kind} {name}"));
            }
        }
    }
    Ok(left)
}

async fn names(
    client: &Client,
    group: &str,
    version: &str,
    kind: &str,
    ns: Option<&str>,
) -> Result<Vec<String>> {
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
    let api: Api<DynamicObject> = match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    let list = api.list(&ListParams::default()).await.with_context(|| format!("listing {kind}"))?;
    Ok(list.items.into_iter().filter_map(|o| o.metadata.name).collect())
}

/// One demo Deployment `app` (no Service), as JSON (which is YAML).
fn demo_deployment(images: &ImageSet, app: &str) -> String {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": app},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": app}},
            "template": {
                "metadata": {"labels": {"app": app}},
                "spec": {"containers": [{
                    "name": "demo",
                    "image": images.demo.name,
                    "env": [{"name": "SERVICE", "value": app}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": APP_PORT}, "periodSeconds": 1},
                }]},
            },
        },
    })
    .to_string()
}

/// The pod runs the redirection init container, the proxy as a native sidecar and the app,
/// and the proxy and the app are both started and ready ("2/2").
fn assert_injected_and_ready(pod: &Pod) -> Result<()> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let spec = pod.spec.as_ref().context("no spec")?;
    let init: Vec<&str> = spec.init_containers.iter().flatten().map(|c| c.name.as_str()).collect();
    ensure!(init == ["weft-init", "weft-proxy"], "pod {name} has init containers {init:?}: not injected");
    let sidecar = &spec.init_containers.as_ref().context("no init containers")?[1];
    ensure!(
        sidecar.restart_policy.as_deref() == Some("Always"),
        "the proxy is not a native sidecar in {name}"
    );
    let status = pod.status.as_ref().context("no status")?;
    let proxy = status
        .init_container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == "weft-proxy")
        .context("no status for the proxy")?;
    ensure!(
        proxy.ready && proxy.started == Some(true),
        "the proxy in {name} is not ready: {:?}",
        proxy.state
    );
    // The app's probe goes to the proxy's admin port, so it passes under STRICT mTLS too.
    let probed = spec.containers.iter().filter(|c| c.readiness_probe.is_some()).count();
    ensure!(probed > 0, "pod {name} has no app readiness probe to check");
    for c in &spec.containers {
        let probe = c.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref());
        if let Some(get) = probe {
            let to_admin = get.port == IntOrString::Int(ADMIN_PORT.into())
                && get.path.as_deref() == Some(&*format!("/app-health/{}/readyz", c.name));
            ensure!(
                to_admin,
                "the readiness probe of {name}/{} was not pointed at the proxy: {get:?}",
                c.name
            );
        }
    }
    let apps: Vec<_> = status.container_statuses.iter().flatten().collect();
    ensure!(!apps.is_empty() && apps.iter().all(|c| c.ready), "the app in {name} is not ready: {apps:?}");
    Ok(())
}

/// A Job whose one container fetches `url` once with the demo binary and exits, in a meshed
/// namespace: it is injected, and it completes although its proxy runs on.
async fn run_job(client: &Client, namespace: &str, images: &ImageSet, url: &str) -> Result<()> {
    let job = json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "fetch-once"},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "fetch", "image": images.demo.name, "args": ["get", url]}],
            }},
        },
    });
    apply::apply_yaml(client, &job.to_string(), Some(namespace)).await?;
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let deadline = Instant::now() + START;
    loop {
        let status = jobs.get("fetch-once").await?.status.unwrap_or_default();
        if status.succeeded.unwrap_or(0) >= 1 {
            break;
        }
        if status.failed.unwrap_or(0) >= 1 || Instant::now() >= deadline {
            bail!(
                "the Job did not complete (failed: {:?}):\n{}",
                status.failed,
                node::pod_problems(&pods, "job-name=fetch-once").await
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let listed = pods.list(&ListParams::default().labels("job-name=fetch-once")).await?.items;
    let pod = listed.first().context("the Job's pod is gone")?;
    ensure!(is_injected(pod), "the Job's pod was not injected");
    Ok(())
}

/// Applies a PeerAuthentication selecting the reviews pods in `mode` and waits until each of
/// their proxies runs it (their `/config` shows the mode).
async fn peer_authentication(client: &Client, namespace: &str, reviews: &[&Pod], mode: &str) -> Result<()> {
    let policy = json!({
        "apiVersion": "security.weft.dev/v1alpha1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "reviews-mtls"},
        "spec": {"selector": {"matchLabels": {"app": "reviews"}}, "mtls": {"mode": mode}},
    });
    apply::apply_yaml(client, &policy.to_string(), Some(namespace)).await?;
    // The proxy config omits the default (PERMISSIVE), as proto3 JSON does.
    let want = if mode == "PERMISSIVE" { Value::Null } else { Value::from(format!("MTLS_{mode}")) };
    let deadline = Instant::now() + START;
    for pod in reviews {
        loop {
            let (_, config) = get(pod, ADMIN_PORT, "/config").await?;
            let config: Value = serde_json::from_str(&config).context("the proxy's /config is not JSON")?;
            let inbound = &config["config"]["inbound"];
            if inbound.is_object() && inbound["mtlsMode"] == want {
                break;
            }
            if Instant::now() >= deadline {
                bail!("a reviews proxy did not get mTLS mode {mode}; its inbound policy: {inbound}");
            }
            tokio::time::sleep(POLL).await;
        }
    }
    Ok(())
}

/// Under STRICT the reviews proxies refuse the unmeshed client's plain text (and count it) but
/// serve the meshed frontend; back under PERMISSIVE the unmeshed client is served again.
async fn strict_then_permissive(
    client: &Client,
    namespace: &str,
    reviews: &[&Pod],
    frontend: &Pod,
    unmeshed: &Pod,
    url: &str,
) -> Result<()> {
    peer_authentication(client, namespace, reviews, "STRICT").await?;
    let refused_before = refused_plaintext(reviews).await?;
    let report = call(unmeshed, url, 10, 1).await?;
    ensure!(report.ok() == 0, "under STRICT the unmeshed client was served: {report:?}");
    let refused = refused_plaintext(reviews).await? - refused_before;
    ensure!(
        refused >= 10.0,
        "the reviews proxies counted {refused} refused plain-text connections, expected 10"
    );
    let report = call(frontend, url, 20, 2).await?;
    ensure!(
        report.ok() == 20 && report.errors == 0,
        "under STRICT the meshed frontend lost requests: {report:?}"
    );

    peer_authentication(client, namespace, reviews, "PERMISSIVE").await?;
    let report = call(unmeshed, url, 10, 1).await?;
    ensure!(report.ok() == 10 && report.errors == 0, "under PERMISSIVE the unmeshed client: {report:?}");
    eprintln!("[mesh]   STRICT: 10 plain-text requests refused, 20 mTLS served; PERMISSIVE: 10 plain served");
    Ok(())
}

/// Under STRICT, SIGKILLs one reviews pod's proxy container (the pod and its iptables capture
/// stay) and, until the kubelet's restart is ready, sends plain text from the unmeshed client
/// straight to that pod's app port: each connection must find no one (the capture still sends it
/// to the dead proxy's port) or the new proxy refusing it, never the app. The new proxy must go
/// from its admin port's first answer (the process is up) to ready (config and a certificate
/// from the CA) in under a second.
async fn proxy_restarted_in_place(
    client: &Client,
    containerd: &std::path::Path,
    namespace: &str,
    reviews: &[&Pod],
    frontend: &Pod,
    unmeshed: &Pod,
) -> Result<()> {
    const READY_WITHIN: Duration = Duration::from_secs(1);
    peer_authentication(client, namespace, reviews, "STRICT").await?;
    let victim = reviews[0];
    let name = victim.metadata.name.clone().context("a pod name")?;
    let ip = mesh::pod_ip(victim)?;
    let proxy_status = |pod: &Pod| {
        let statuses = pod.status.as_ref().into_iter().flat_map(|s| {
            s.init_container_statuses.iter().flatten().chain(s.container_statuses.iter().flatten())
        });
        statuses.into_iter().find(|c| c.name == weft_inject::PROXY_CONTAINER).cloned()
    };
    let before = proxy_status(victim).context("the reviews pod has no proxy container status")?;
    let container = before.container_id.clone().context("no container id")?;
    let container = container.split_once("://").map_or(container.as_str(), |(_, id)| id).to_owned();
    let killed = std::process::Command::new("ctr")
        .arg("--address")
        .arg(containerd)
        .args([
            "--namespace",
            weft_e2e::images::NAMESPACE,
            "tasks",
            "kill",
            "--signal",
            "SIGKILL",
            &container,
        ])
        .output()?;
    ensure!(killed.status.success(), "ctr tasks kill: {}", String::from_utf8_lossy(&killed.stderr));

    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let direct = format!("http://{ip}:{APP_PORT}/");
    let deadline = Instant::now() + START;
    // `ctr` returns once the signal is sent: the old proxy is gone when its admin port stops
    // answering.
    while get(victim, ADMIN_PORT, "/ready").await.is_ok() {
        ensure!(Instant::now() < deadline, "the proxy still answers after SIGKILL");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (mut attempts, mut first_answer, mut ready_at) = (0u32, None, None);
    while ready_at.is_none() {
        ensure!(Instant::now() < deadline, "the killed proxy was not ready again within {START:?}");
        // Plain text straight to the app's port, as an attacker on the pod network would try.
        let plain = call(unmeshed, &direct, 1, 1).await?;
        attempts += 1;
        ensure!(plain.ok() == 0, "plain text reached the app while its proxy restarted: {plain:?}");
        if let Ok((status, _)) = get(victim, ADMIN_PORT, "/ready").await {
            let now = Instant::now();
            let first = *first_answer.get_or_insert(now);
            if status == 200 {
                ready_at = Some(now - first);
            }
        }
    }
    let took = ready_at.expect("the loop ends once ready");
    // The kubelet restarted it in place (its status reaches the apiserver a little later).
    loop {
        let now = proxy_status(&pods.get(&name).await?).context("no proxy status after the restart")?;
        if now.restart_count > before.restart_count && now.ready {
            break;
        }
        ensure!(Instant::now() < deadline, "the proxy container did not restart in place: {now:?}");
        tokio::time::sleep(POLL).await;
    }
    ensure!(took < READY_WITHIN, "the restarted proxy took {took:?} from its first answer to ready");
    // And it serves again: the meshed frontend reaches that pod, over mTLS, through the new proxy.
    let report = call(frontend, &direct, 5, 1).await?;
    ensure!(report.ok() == 5, "the frontend through the restarted proxy: {report:?}");
    peer_authentication(client, namespace, reviews, "PERMISSIVE").await?;
    eprintln!(
        "[mesh]   {attempts} plain-text tries during the restart, none reached the app; ready {took:?} after its first answer"
    );
    Ok(())
}

/// Plain-text connections the pods' proxies refused under STRICT.
async fn refused_plaintext(pods: &[&Pod]) -> Result<f64> {
    let mut total = 0.0;
    for pod in pods {
        let (_, metrics) = get(pod, ADMIN_PORT, "/metrics").await?;
        total += metrics
            .lines()
            .filter(|l| l.starts_with("weft_inbound_refused_total{") && l.contains("reason=\"plaintext\""))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>();
    }
    Ok(total)
}

/// Runs batches of requests from `client_pod` to `url` while the operator's pod is deleted
/// and replaced; every batch must succeed in full, and at least one must run wholly between
/// the deletion and the replacement's readiness.
async fn operator_deleted_under_load(client: &Client, client_pod: &Pod, url: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let selector = "app.kubernetes.io/name=weft-operator";
    let old: Vec<String> = pods
        .list(&ListParams::default().labels(selector))
        .await?
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    ensure!(!old.is_empty(), "no operator pod to delete");

    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let (load_pod, load_url) = (client_pod.clone(), url.to_owned());
    let load = tokio::spawn(async move {
        let mut batches = Vec::new();
        // Bounded: at most 300 batches of 20 requests, and the caller stops it sooner.
        for _ in 0..300 {
            if *stop_rx.borrow_and_update() {
                break;
            }
            let started = Instant::now();
            let result = call(&load_pod, &load_url, 20, 2).await;
            batches.push((started, Instant::now(), result));
        }
        batches
    });

    let deleted_at = Instant::now();
    for name in &old {
        pods.delete(name, &DeleteParams::default()).await?;
    }
    // Replaced: the old pods are gone and a new one is ready.
    let replaced_at = loop {
        let now = pods.list(&ListParams::default().labels(selector)).await?.items;
        let old_gone = now.iter().all(|p| p.metadata.name.as_ref().is_none_or(|n| !old.contains(n)));
        if old_gone && !now.is_empty() && now.iter().all(|p| node::pod_problem(p).is_none()) {
            break Instant::now();
        }
        if deleted_at.elapsed() >= START {
            let _ = stop_tx.send(true);
            bail!("the operator was not replaced in time:\n{}", node::pod_problems(&pods, selector).await);
        }
        tokio::time::sleep(POLL).await;
    };
    let _ = stop_tx.send(true);
    let batches = load.await?;
    let mut during = 0;
    for (started, ended, result) in &batches {
        let report = result.as_ref().map_err(|e| anyhow::anyhow!("a batch failed: {e}"))?;
        ensure!(report.ok() == 20 && report.errors == 0, "a batch lost requests: {report:?}");
        if *started >= deleted_at && *ended <= replaced_at {
            during += 1;
        }
    }
    ensure!(during > 0, "no batch ran while the operator was away ({} batches)", batches.len());
    eprintln!(
        "[mesh]   {} batches of 20, {during} wholly while the operator was away, all 200",
        batches.len()
    );
    Ok(())
}
