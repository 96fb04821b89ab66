//! The operator against the real kube-apiserver of the test cluster: status conditions written
//! with server-side apply, config streamed to a real proxy (run in-process with the
//! control-plane source) as objects change, proxies keeping their config while the operator is
//! down and resyncing after a restart, and leader election over a Lease.
//!
//! Why not a lower tier: the index has exhaustive unit tests; these catch what only the apiserver
//! shows (watch semantics, SSA on the status subresource, Lease compare-and-swap, the gRPC
//! stream between the two real binaries' libraries).
//!
//! Needs the test cluster: `cargo xtask test`, or `cargo xtask cluster up` then `cargo test`.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Pod, Service, ServiceAccount},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use kube_runtime::wait::await_condition;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use weft_api::{AuthorizationPolicy, DestinationRule, PeerAuthentication, VirtualService};
use weft_e2e::TestCluster;
use weft_operator::{Config, lease::Elector};
use weft_proxy::{
    config::control_plane::ControlPlane,
    settings::{IdentityFiles, IdentitySource, InboundListener},
};

/// Every wait in this file is bounded by this.
const DEADLINE: Duration = Duration::from_secs(30);

fn pp() -> PostParams {
    PostParams::default()
}

async fn create<K>(client: &Client, ns: &str, value: Value) -> Result<K>
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(value).context("building the object")?;
    Api::<K>::namespaced(client.clone(), ns).create(&pp(), &obj).await.context("creating")
}

/// Service `reviews` (no selector: its EndpointSlice is ours), two Pods (v1, v2; Pending, which
/// is fine: only their labels are read) and the slice pointing at them.
async fn bookinfo(client: &Client, ns: &str) -> Result<()> {
    // Pods are admitted once the namespace's default ServiceAccount exists.
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), ns);
    tokio::time::timeout(
        DEADLINE,
        await_condition(accounts, "default", |sa: Option<&ServiceAccount>| sa.is_some()),
    )
    .await
    .context("no default ServiceAccount")??;
    create::<Service>(
        client,
        ns,
        json!({"metadata": {"name": "reviews"}, "spec": {"ports": [{"name": "http", "port": 9080, "targetPort": 8080}]}}),
    )
    .await?;
    for version in ["v1", "v2"] {
        create::<Pod>(
            client,
            ns,
            json!({"metadata": {"name": format!("reviews-{version}"), "labels": {"app": "reviews", "version": version}},
                   "spec": {"containers": [{"name": "app", "image": "example.invalid/app"}]}}),
        )
        .await?;
    }
    create::<EndpointSlice>(
        client,
        ns,
        json!({
            "metadata": {"name": "reviews-1", "labels": {
                "kubernetes.io/service-name": "reviews",
                "endpointslice.kubernetes.io/managed-by": "weft-e2e"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.1.0.1"], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "reviews-v1", "namespace": ns}},
                {"addresses": ["10.1.0.2"], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "reviews-v2", "namespace": ns}},
            ],
        }),
    )
    .await?;
    create::<DestinationRule>(
        client,
        ns,
        json!({"apiVersion": "networking.weft.dev/v1alpha1", "kind": "DestinationRule",
               "metadata": {"name": "reviews"},
               "spec": {"host": "reviews", "subsets": [
                   {"name": "v1", "labels": {"version": "v1"}},
                   {"name": "v2", "labels": {"version": "v2"}}]}}),
    )
    .await?;
    Ok(())
}

fn split_vs(name: &str, v1: i32, v2: i32) -> Value {
    json!({"apiVersion": "networking.weft.dev/v1alpha1", "kind": "VirtualService",
           "metadata": {"name": name},
           "spec": {"hosts": ["reviews"], "http": [{"route": [
               {"destination": {"host": "reviews", "subset": "v1"}, "weight": v1},
               {"destination": {"host": "reviews", "subset": "v2"}, "weight": v2}]}]}})
}

/// The condition of `type_` on a VirtualService, as `(status, reason, message, observedGeneration)`.
fn condition(vs: &VirtualService, type_: &str) -> Option<(String, String, String, Option<i64>)> {
    let c = vs.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone(), c.observed_generation))
}

/// Watches the VirtualService until `cond` holds (bounded).
async fn wait_vs(
    api: &Api<VirtualService>,
    name: &str,
    what: &str,
    cond: impl Fn(&VirtualService) -> bool,
) -> Result<VirtualService> {
    let found = tokio::time::timeout(
        DEADLINE,
        await_condition(api.clone(), name, move |o: Option<&VirtualService>| o.is_some_and(&cond)),
    )
    .await;
    match found {
        Ok(Ok(Some(vs))) => Ok(vs),
        Ok(Ok(None)) => bail!("{name} is gone"),
        Ok(Err(e)) => bail!("watching {name}: {e}"),
        Err(_) => {
            let now = api.get(name).await?;
            bail!("{name}: {what} not seen within {DEADLINE:?}; status now: {:?}", now.status)
        }
    }
}

/// Watches an object of any of Weft's kinds until `Accepted` and `ResolvedRefs` are both True
/// for its current generation (bounded).
async fn wait_both_true<K>(client: &Client, ns: &str, name: &str) -> Result<()>
where
    K: kube::Resource<DynamicType = ()>,
{
    let resource = kube::api::ApiResource::erase::<K>(&());
    let api = Api::<kube::api::DynamicObject>::namespaced_with(client.clone(), ns, &resource);
    let done = |o: Option<&kube::api::DynamicObject>| {
        let Some(o) = o else { return false };
        let generation = o.metadata.generation;
        let conditions = o.data["status"]["conditions"].as_array().cloned().unwrap_or_default();
        ["Accepted", "ResolvedRefs"].iter().all(|t| {
            conditions.iter().any(|c| {
                c["type"] == *t && c["status"] == "True" && c["observedGeneration"].as_i64() == generation
            })
        })
    };
    match tokio::time::timeout(DEADLINE, await_condition(api, name, done)).await {
        Ok(Ok(Some(_))) => Ok(()),
        Ok(Ok(None)) => bail!("{name} is gone"),
        Ok(Err(e)) => bail!("watching {name}: {e}"),
        Err(_) => bail!("{} {name}: conditions not True within {DEADLINE:?}", K::kind(&())),
    }
}

/// `GET path` with `Host: host`: `(status, body)`.
async fn http_get(addr: SocketAddr, path: &str, host: &str) -> Result<(u16, String)> {
    Ok(weft_e2e::http::get(addr, host, path).await?)
}

/// The proxy's `/config` as JSON.
async fn proxy_config(proxy: &weft_proxy::Handle) -> Result<Value> {
    let (status, body) = http_get(proxy.admin_addr, "/config", "localhost").await?;
    ensure!(status == 200, "/config answered {status}");
    serde_json::from_str(&body).context("parsing /config")
}

/// The weights of the first route of the service whose name starts with `reviews.`, by subset.
fn weights(config: &Value) -> Option<Vec<(String, u64)>> {
    let services = config["config"]["services"].as_array()?;
    let svc = services.iter().find(|s| s["name"].as_str().is_some_and(|n| n.starts_with("reviews.")))?;
    let route = svc["httpRoutes"].as_array()?.first()?["route"].as_array()?.clone();
    Some(
        route
            .iter()
            .map(|w| {
                (
                    w["destination"]["subset"].as_str().unwrap_or("").to_owned(),
                    w["weight"].as_u64().unwrap_or(0),
                )
            })
            .collect(),
    )
}

fn has_routes(config: &Value) -> bool {
    config["config"]["services"].as_array().into_iter().flatten().any(|s| {
        s["name"].as_str().is_some_and(|n| n.starts_with("reviews.")) && s.get("httpRoutes").is_some()
    })
}

/// Tests run in parallel against one cluster: each operator watches (and writes the status of)
/// its own test's namespace only.
async fn start_operator(
    client: &Client,
    ns: &str,
    grpc_addr: Option<SocketAddr>,
) -> Result<weft_operator::Handle> {
    let mut config = Config::for_tests(ns);
    config.watch_namespace = Some(ns.to_owned());
    if let Some(addr) = grpc_addr {
        config.grpc_addr = addr;
    }
    let operator = weft_operator::start(client.clone(), config).await?;
    tokio::time::timeout(DEADLINE, operator.ready()).await.context("the operator never synced")?;
    Ok(operator)
}

/// A proxy on loopback subscribed to `operator`, with a certificate from the operator's CA for
/// its namespace (the config stream requires one).
async fn start_proxy(operator: &weft_operator::Handle, ns: &str) -> Result<weft_proxy::Handle> {
    start_proxy_with(operator, ns, |_| {}).await
}

/// [`start_proxy`] with its settings changed by `tweak`.
async fn start_proxy_with(
    operator: &weft_operator::Handle,
    ns: &str,
    tweak: impl FnOnce(&mut weft_proxy::Settings),
) -> Result<weft_proxy::Handle> {
    let mut settings = weft_proxy::Settings::loopback("/nonexistent".into());
    tweak(&mut settings);
    let mut cp =
        ControlPlane::new(operator.grpc_addr.to_string(), format!("test-proxy.{ns}"), vec!["reviews".into()]);
    cp.backoff_max = Duration::from_millis(500);
    cp.server_name = format!("weft-operator.{ns}.svc");
    settings.control_plane = Some(cp);
    let signer = operator.authority.current().context("the operator has no CA")?;
    let id = weft_identity::SpiffeId::new("cluster.local", ns, "test-proxy")?;
    let issued = signer.issuer.issue(&id, std::time::SystemTime::now(), Duration::from_secs(3600))?;
    let dir = std::env::temp_dir().join(format!("weft-operator-test-{ns}"));
    let files = IdentityFiles::write(&dir, &issued.cert_pem, &issued.key_pem, &signer.bundle_pem)?;
    settings.identity = Some(IdentitySource::Files(files));
    Ok(weft_proxy::start(settings).await?)
}

/// Waits until the proxy's `/config` satisfies `cond`, woken by the proxy's own config changes
/// (checked at least every second, bounded by [`DEADLINE`]).
async fn wait_proxy<T>(
    proxy: &weft_proxy::Handle,
    what: &str,
    cond: impl Fn(&Value) -> Option<T>,
) -> Result<T> {
    let mut changes = proxy.store.subscribe();
    let start = Instant::now();
    loop {
        if let Some(found) = cond(&proxy_config(proxy).await?) {
            return Ok(found);
        }
        let left = DEADLINE.saturating_sub(start.elapsed());
        if left.is_zero() {
            bail!("{what}: not seen in the proxy's /config within {DEADLINE:?}");
        }
        let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), changes.changed()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_service_status_names_the_problem_and_follows_generations() -> Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    let ns = cluster.namespace("op-status").await?;
    bookinfo(&client, ns.name()).await?;
    let operator = start_operator(&client, ns.name(), None).await?;
    let api = Api::<VirtualService>::namespaced(client.clone(), ns.name());

    // A subset that no DestinationRule defines.
    let mut bad = split_vs("reviews", 50, 50);
    bad["spec"]["http"][0]["route"][1]["destination"]["subset"] = json!("v3");
    create::<VirtualService>(&client, ns.name(), bad).await?;
    let vs = wait_vs(&api, "reviews", "ResolvedRefs=False", |vs| {
        condition(vs, "ResolvedRefs").is_some_and(|c| c.0 == "False")
    })
    .await?;
    let generation = vs.metadata.generation;
    assert_eq!(
        condition(&vs, "ResolvedRefs"),
        Some((
            "False".into(),
            "RefNotFound".into(),
            "subset v3 not defined in DestinationRule reviews".into(),
            generation
        ))
    );
    assert_eq!(condition(&vs, "Accepted").map(|c| c.0), Some("True".into()));
    assert_eq!(vs.status.as_ref().unwrap().observed_generation, generation);
    // Written with server-side apply, by the one field manager, on the status subresource.
    let managers: Vec<_> = vs
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.subresource.as_deref() == Some("status"))
        .map(|m| (m.manager.clone().unwrap_or_default(), m.operation.clone().unwrap_or_default()))
        .collect();
    assert_eq!(managers, [("weft-operator".to_owned(), "Apply".to_owned())]);

    // Fixed: a new generation, and the conditions follow it.
    api.patch("reviews", &PatchParams::default(), &Patch::Merge(split_vs("reviews", 50, 50))).await?;
    let vs = wait_vs(&api, "reviews", "ResolvedRefs=True at the new generation", |vs| {
        condition(vs, "ResolvedRefs").is_some_and(|c| c.0 == "True" && c.3 == vs.metadata.generation)
    })
    .await?;
    assert!(vs.metadata.generation > generation);
    assert_eq!(vs.status.as_ref().unwrap().observed_generation, vs.metadata.generation);

    // A younger VirtualService for the same host loses and names the winner.
    create::<VirtualService>(&client, ns.name(), split_vs("reviews-canary", 10, 90)).await?;
    let loser = wait_vs(&api, "reviews-canary", "Accepted=False", |vs| {
        condition(vs, "Accepted").is_some_and(|c| c.0 == "False")
    })
    .await?;
    let (_, reason, message, _) = condition(&loser, "Accepted").unwrap();
    assert_eq!(reason, "Conflict");
    assert_eq!(
        message,
        format!(
            "host reviews.{0}.svc.cluster.local is already routed by VirtualService {0}/reviews",
            ns.name()
        )
    );
    // ...and takes over once the winner is deleted.
    api.delete("reviews", &DeleteParams::default()).await?;
    wait_vs(&api, "reviews-canary", "Accepted=True after the winner left", |vs| {
        condition(vs, "Accepted").is_some_and(|c| c.0 == "True")
    })
    .await?;

    // Every kind the operator reads carries both conditions.
    create::<PeerAuthentication>(
        &client,
        ns.name(),
        json!({"apiVersion": "security.weft.dev/v1alpha1", "kind": "PeerAuthentication",
               "metadata": {"name": "strict"}, "spec": {"mtls": {"mode": "STRICT"}}}),
    )
    .await?;
    create::<AuthorizationPolicy>(
        &client,
        ns.name(),
        json!({"apiVersion": "security.weft.dev/v1alpha1", "kind": "AuthorizationPolicy",
               "metadata": {"name": "allow-ns"},
               "spec": {"rules": [{"from": [{"source": {"namespaces": [ns.name()]}}]}]}}),
    )
    .await?;
    wait_both_true::<DestinationRule>(&client, ns.name(), "reviews").await?;
    wait_both_true::<PeerAuthentication>(&client, ns.name(), "strict").await?;
    wait_both_true::<AuthorizationPolicy>(&client, ns.name(), "allow-ns").await?;

    let metrics = http_get(operator.admin_addr, "/metrics", "localhost").await?.1;
    assert!(metrics.contains("weft_operator_status_writes_total{kind=\"VirtualService\"}"), "{metrics}");
    operator.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_proxy_follows_weight_changes_and_deletion() -> Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    let ns = cluster.namespace("op-push").await?;
    bookinfo(&client, ns.name()).await?;
    create::<VirtualService>(&client, ns.name(), split_vs("reviews", 90, 10)).await?;
    let operator = start_operator(&client, ns.name(), None).await?;
    let proxy = start_proxy(&operator, ns.name()).await?;

    let w = wait_proxy(&proxy, "the 90/10 split", |c| weights(c).filter(|w| w[0].1 == 90)).await?;
    assert_eq!(w, [("v1".to_owned(), 90), ("v2".to_owned(), 10)]);
    let config = proxy_config(&proxy).await?;
    let eps = &config["config"]["services"][0]["ports"][0]["endpoints"];
    assert_eq!(eps[0]["address"], "10.1.0.1:8080");
    assert_eq!(eps[0]["labels"]["version"], "v1");
    assert_eq!(http_get(proxy.admin_addr, "/ready", "localhost").await?.0, 200);
    let (status, body) = http_get(operator.admin_addr, "/metrics", "localhost").await?;
    assert_eq!(status, 200);
    assert!(body.contains("weft_operator_connected_proxies 1"), "{body}");
    assert_eq!(http_get(operator.admin_addr, "/ready", "localhost").await?.0, 200);

    // Change a weight: the proxy's /config follows.
    let api = Api::<VirtualService>::namespaced(client.clone(), ns.name());
    let changed = Instant::now();
    api.patch("reviews", &PatchParams::default(), &Patch::Merge(split_vs("reviews", 50, 50))).await?;
    let w = wait_proxy(&proxy, "the 50/50 split", |c| weights(c).filter(|w| w[0].1 == 50)).await?;
    assert_eq!(w, [("v1".to_owned(), 50), ("v2".to_owned(), 50)]);
    eprintln!("weight change reached the proxy in {:?}", changed.elapsed());

    // Delete it: the route is gone, the service stays.
    api.delete("reviews", &DeleteParams::default()).await?;
    wait_proxy(&proxy, "the route removed", |c| (!has_routes(c)).then_some(())).await?;
    let config = proxy_config(&proxy).await?;
    assert_eq!(config["config"]["services"][0]["aliases"][0], "reviews");

    proxy.shutdown();
    operator.shutdown().await;
    Ok(())
}

/// A VirtualService with an abort fault, server-side applied as `kubectl apply --server-side`
/// does: the subscribed proxy answers with the injected status, and follows a change of it.
/// (The endpoints are addresses nothing listens on: only the fault can answer.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_applied_as_a_virtual_service_changes_what_the_proxy_answers() -> Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    let ns = cluster.namespace("op-fault").await?;
    bookinfo(&client, ns.name()).await?;
    let operator = start_operator(&client, ns.name(), None).await?;
    let proxy = start_proxy(&operator, ns.name()).await?;
    let api = Api::<VirtualService>::namespaced(client.clone(), ns.name());
    let apply = PatchParams::apply("weft-e2e").force();
    let fault_vs = |status: u16| {
        json!({"apiVersion": "networking.weft.dev/v1alpha1", "kind": "VirtualService",
               "metadata": {"name": "reviews"},
               "spec": {"hosts": ["reviews"], "http": [{
                   "fault": {"abort": {"httpStatus": status, "percentage": {"value": 100.0}}},
                   "route": [{"destination": {"host": "reviews", "subset": "v1"}}]}]}})
    };
    let listener = proxy.explicit_addrs[0];
    for status in [418, 429] {
        api.patch("reviews", &apply, &Patch::Apply(fault_vs(status))).await?;
        wait_proxy(&proxy, "the fault", |c| {
            let services = c["config"]["services"].as_array()?;
            let svc =
                services.iter().find(|s| s["name"].as_str().is_some_and(|n| n.starts_with("reviews.")))?;
            (svc["httpRoutes"][0]["fault"]["abortHttpStatus"] == status).then_some(())
        })
        .await?;
        let (got, body) = http_get(listener, "/", "reviews").await?;
        assert_eq!(got, status, "{body}");
        assert_eq!(body, "fault injected\n");
    }
    let vs = wait_vs(&api, "reviews", "Accepted for generation 2", |vs| {
        condition(vs, "Accepted").is_some_and(|c| c.0 == "True" && c.3 == Some(2))
    })
    .await?;
    let accepted = condition(&vs, "Accepted").context("no Accepted condition")?;
    assert_eq!(accepted.2, "accepted", "faults are enforced, not merely accepted");

    proxy.shutdown();
    operator.shutdown().await;
    Ok(())
}

/// An AuthorizationPolicy applied as `kubectl apply --server-side` does reaches the proxy of the
/// pod it selects (as its inbound policy) and changes what it answers: the denied path gets 403,
/// the rest still reaches the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_policy_applied_server_side_changes_what_the_proxy_answers() -> Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    let ns = cluster.namespace("op-authz").await?;
    bookinfo(&client, ns.name()).await?;
    // The proxy's own pod: the operator resolves inbound policies for the pods it knows.
    create::<Pod>(
        &client,
        ns.name(),
        json!({"metadata": {"name": "test-proxy", "labels": {"app": "ratings"}},
               "spec": {"containers": [{"name": "app", "image": "example.invalid/app"}]}}),
    )
    .await?;
    let app = weft_e2e::http::serve_ok("ratings").await?;
    let operator = start_operator(&client, ns.name(), None).await?;
    let proxy = start_proxy_with(&operator, ns.name(), |s| {
        s.explicit = vec![];
        s.inbound_explicit =
            vec![InboundListener { addr: "127.0.0.1:0".parse().unwrap(), app_port: app.port() }];
    })
    .await?;
    let workload = format!("test-proxy.{}", ns.name());
    wait_proxy(&proxy, "its inbound policy", |c| {
        (c["config"]["inbound"]["workload"] == *workload).then_some(())
    })
    .await?;
    let listener = proxy.explicit_addrs[0];
    assert_eq!(http_get(listener, "/admin/users", "ratings").await?, (200, "ratings".into()));

    let policy = json!({"apiVersion": "security.weft.dev/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-admin"},
        "spec": {"selector": {"matchLabels": {"app": "ratings"}}, "action": "DENY",
                 "rules": [{"to": [{"operation": {"paths": ["/admin", "/admin/*"]}}]}]}});
    Api::<AuthorizationPolicy>::namespaced(client.clone(), ns.name())
        .patch("deny-admin", &PatchParams::apply("weft-e2e").force(), &Patch::Apply(policy))
        .await?;
    let name = format!("{}/deny-admin", ns.name());
    wait_proxy(&proxy, "the DENY policy", |c| {
        (c["config"]["inbound"]["authorizations"][0]["name"] == *name).then_some(())
    })
    .await?;
    let denied = http_get(listener, "/admin/users", "ratings").await?;
    assert_eq!(denied, (403, "denied by authorization policy\n".into()));
    assert_eq!(http_get(listener, "//admin", "ratings").await?.0, 403, "the path is normalized first");
    assert_eq!(http_get(listener, "/reviews", "ratings").await?, (200, "ratings".into()));

    proxy.shutdown();
    operator.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_keep_serving_while_the_operator_is_down_and_resync_after_restart() -> Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    let ns = cluster.namespace("op-restart").await?;
    bookinfo(&client, ns.name()).await?;
    let answer = |body: &str| {
        json!({"apiVersion": "networking.weft.dev/v1alpha1", "kind": "VirtualService",
               "metadata": {"name": "reviews"},
               "spec": {"hosts": ["reviews"], "http": [{"directResponse": {"status": 200, "body": {"string": body}}}]}})
    };
    create::<VirtualService>(&client, ns.name(), answer("before")).await?;
    let operator = start_operator(&client, ns.name(), None).await?;
    let grpc_addr = operator.grpc_addr;
    let proxy = start_proxy(&operator, ns.name()).await?;
    let listener = proxy.explicit_addrs[0];
    wait_proxy(&proxy, "the first config", |c| has_routes(c).then_some(())).await?;
    assert_eq!(http_get(listener, "/", "reviews").await?, (200, "before".into()));
    let version = proxy_config(&proxy).await?["version"].clone();

    // The operator goes away: the proxy keeps its config and keeps answering.
    operator.shutdown().await;
    let mut connected = proxy.control_plane.as_ref().context("a control-plane proxy")?.connected();
    tokio::time::timeout(DEADLINE, connected.wait_for(|c| !*c))
        .await
        .context("the proxy never noticed")??;
    assert_eq!(http_get(listener, "/", "reviews").await?, (200, "before".into()));
    assert_eq!(proxy_config(&proxy).await?["version"], version);
    assert_eq!(http_get(proxy.admin_addr, "/ready", "localhost").await?.0, 200);

    // Changed while nobody serves config; a restarted operator on the same address resyncs it.
    Api::<VirtualService>::namespaced(client.clone(), ns.name())
        .patch("reviews", &PatchParams::default(), &Patch::Merge(answer("after")))
        .await?;
    let operator = start_operator(&client, ns.name(), Some(grpc_addr)).await?;
    wait_proxy(&proxy, "the resynced config", |c| c["config"].to_string().contains("after").then_some(()))
        .await?;
    assert_eq!(http_get(listener, "/", "reviews").await?, (200, "after".into()));

    proxy.shutdown();
    operator.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_leads_and_a_released_lease_passes_at_once() -> Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    let ns = cluster.namespace("op-lease").await?;
    let api = Api::<Lease>::namespaced(client.clone(), ns.name());
    let elector = |identity: &str| Elector {
        api: api.clone(),
        name: "weft-operator".into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(15),
        retry_period: Duration::from_millis(200),
    };
    let metrics = std::sync::Arc::new(weft_operator::metrics::Metrics::default());
    let (a_tx, mut a) = tokio::sync::watch::channel(false);
    let (b_tx, mut b) = tokio::sync::watch::channel(false);
    let stop_a = CancellationToken::new();
    let stop_b = CancellationToken::new();
    let task_a = tokio::spawn(elector("a").run(a_tx, metrics.clone(), stop_a.clone()));
    tokio::time::timeout(DEADLINE, a.wait_for(|l| *l)).await.context("a never led")??;
    let task_b = tokio::spawn(elector("b").run(b_tx, metrics.clone(), stop_b.clone()));
    // b keeps trying for a while (many retry periods) without taking over.
    for _ in 0..5 {
        let _ = tokio::time::timeout(Duration::from_millis(200), b.changed()).await;
        assert!(!*b.borrow(), "two leaders");
    }
    let lease = api.get("weft-operator").await?;
    assert_eq!(lease.spec.as_ref().unwrap().holder_identity.as_deref(), Some("a"));

    // a stops and releases: b takes over long before the lease would have expired.
    let released = Instant::now();
    stop_a.cancel();
    task_a.await?;
    tokio::time::timeout(DEADLINE, b.wait_for(|l| *l)).await.context("b never led")??;
    assert!(released.elapsed() < Duration::from_secs(5), "took {:?}", released.elapsed());
    let spec = api.get("weft-operator").await?.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("b"));
    assert_eq!(spec.lease_transitions, Some(1));

    // A third replica follows the holder.
    assert!(!elector("c").try_once(k8s_openapi::jiff::Timestamp::now()).await?);
    stop_b.cancel();
    task_b.await?;
    Ok(())
}

/// Polls `check` until it holds, for at most [`DEADLINE`] (for state with no change signal, such
/// as a metric).
async fn eventually(what: &str, check: impl Fn() -> bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check() {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "not within {DEADLINE:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_both_serve_config_and_only_the_leader_writes_status() -> Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    let ns = cluster.namespace("op-replicas").await?;
    bookinfo(&client, ns.name()).await?;
    let replica = |identity: &str| {
        let mut config = Config::for_tests(ns.name());
        config.watch_namespace = Some(ns.name().to_owned());
        config.lease = Some(weft_operator::LeaseConfig {
            namespace: ns.name().to_owned(),
            name: "weft-operator".into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            retry_period: Duration::from_millis(200),
        });
        weft_operator::start(client.clone(), config)
    };
    let first = replica("first").await?;
    tokio::time::timeout(DEADLINE, first.leader().wait_for(|l| *l)).await.context("no leader")??;
    let second = replica("second").await?;
    tokio::time::timeout(DEADLINE, second.ready()).await.context("the second replica never synced")?;
    assert!(first.is_leader() && !second.is_leader());

    // The follower serves config too.
    create::<VirtualService>(&client, ns.name(), split_vs("reviews", 90, 10)).await?;
    let proxy = start_proxy(&second, ns.name()).await?;
    wait_proxy(&proxy, "config from the follower", |c| weights(c).filter(|w| w[0].1 == 90)).await?;

    // Status comes from the leader alone.
    let api = Api::<VirtualService>::namespaced(client.clone(), ns.name());
    wait_vs(&api, "reviews", "Accepted", |vs| condition(vs, "Accepted").is_some()).await?;
    let writes = |h: &weft_operator::Handle| {
        h.metrics.encode().contains("weft_operator_status_writes_total{kind=\"VirtualService\"}")
    };
    // The counter moves just after the write it counts, which the watch above may beat.
    eventually("the leader counts its status write", || writes(&first)).await?;
    assert!(!writes(&second), "the follower wrote status");

    // The leader stops: the follower takes over and writes the status of what comes next.
    first.shutdown().await;
    tokio::time::timeout(DEADLINE, second.leader().wait_for(|l| *l)).await.context("no takeover")??;
    create::<VirtualService>(&client, ns.name(), split_vs("reviews-late", 10, 90)).await?;
    wait_vs(&api, "reviews-late", "Accepted=False from the new leader", |vs| {
        condition(vs, "Accepted").is_some_and(|c| c.0 == "False")
    })
    .await?;
    eventually("the new leader counts its status write", || writes(&second)).await?;
    proxy.shutdown();
    second.shutdown().await;
    Ok(())
}
