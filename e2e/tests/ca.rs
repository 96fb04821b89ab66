//! The mesh CA against the real apiserver: tokens minted by the apiserver's TokenRequest API (or,
//! for an expired one, signed with the cluster's own key) and checked by its TokenReview. Who gets a certificate and who is refused (with the reason
//! counted), and two proxies whose certificates come from the operator, renewed several times
//! under steady load with no failed request, also while the operator is away.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{Pod, ServiceAccount},
};
use kube::{
    Api, Client,
    api::{DeleteParams, PostParams},
};
use weft_e2e::TestCluster;
use weft_identity::{SpiffeId, TrustBundle};
use weft_operator::Config;
use weft_proxy::{
    certify::{self, CaClient},
    settings::ExplicitListener,
    settings::IdentitySource,
};

const DEADLINE: Duration = Duration::from_secs(60);

/// A ServiceAccount and a pod using it (the pod need not run: a bound token needs the object).
async fn workload(client: &Client, ns: &str, sa: &str) -> Result<Pod> {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let account: ServiceAccount = serde_json::from_value(serde_json::json!({"metadata": {"name": sa}}))?;
    sas.create(&PostParams::default(), &account).await?;
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("{sa}-0")},
        "spec": {"serviceAccountName": sa, "automountServiceAccountToken": false,
                 "containers": [{"name": "app", "image": "weft.local/none:0"}]}}))?;
    Ok(Api::namespaced(client.clone(), ns).create(&PostParams::default(), &pod).await?)
}

/// A token for `sa`, for `audience`, bound to `pod` when given.
async fn token(client: &Client, ns: &str, sa: &str, audience: &str, pod: Option<&Pod>) -> Result<String> {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            expiration_seconds: Some(3600),
            bound_object_ref: pod.map(|p| BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: p.metadata.name.clone(),
                uid: p.metadata.uid.clone(),
            }),
        },
        ..TokenRequest::default()
    };
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let issued = sas.create_token_request(sa, &PostParams::default(), &request).await?;
    issued.status.map(|s| s.token).context("no token in the TokenRequest")
}

/// `token` signed again (ES256) with `key`, its validity first moved `ago` seconds into the past.
fn resign(token: &str, key: &Path, ago: u64) -> Result<String> {
    use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
    let mut parts = token.split('.');
    let (header, claims) = (parts.next().context("no JWT header")?, parts.next().context("no JWT claims")?);
    let mut claims: serde_json::Value = serde_json::from_slice(&B64.decode(claims)?)?;
    for claim in ["iat", "nbf", "exp"] {
        let at = claims[claim].as_u64().with_context(|| format!("no {claim} claim"))?;
        claims[claim] = serde_json::json!(at - ago);
    }
    let signed = format!("{header}.{}", B64.encode(serde_json::to_vec(&claims)?));
    let pkcs8 = rcgen::KeyPair::from_pem(&std::fs::read_to_string(key)?)?.serialize_der();
    let rng = ring::rand::SystemRandom::new();
    let signer = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &pkcs8,
        &rng,
    )
    .map_err(|e| anyhow::anyhow!("the ServiceAccount key: {e}"))?;
    let signature = signer.sign(&rng, signed.as_bytes()).map_err(|e| anyhow::anyhow!("signing: {e}"))?;
    Ok(format!("{signed}.{}", B64.encode(signature.as_ref())))
}

fn scratch(ns: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("weft-ca-test-{ns}"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The CA client's settings for a proxy of `ns` with `token` (written to a file).
fn ca_client(
    dir: &Path,
    name: &str,
    operator: &weft_operator::Handle,
    ns: &str,
    token: &str,
) -> Result<CaClient> {
    let token_file = dir.join(format!("{name}.token"));
    std::fs::write(&token_file, token)?;
    let bundle_file = dir.join("ca.crt");
    let signer = operator.authority.current().context("the operator has no CA")?;
    std::fs::write(&bundle_file, &signer.bundle_pem)?;
    Ok(CaClient {
        addr: operator.grpc_addr.to_string(),
        server_name: format!("weft-operator.{ns}.svc"),
        token_file,
        trust_bundle_file: bundle_file,
        expected: None,
        poll: Duration::from_millis(200),
        backoff_min: Duration::from_millis(200),
        backoff_max: Duration::from_secs(2),
    })
}

async fn start_operator(
    client: &Client,
    ns: &str,
    ttl: Duration,
    grpc: Option<std::net::SocketAddr>,
) -> Result<weft_operator::Handle> {
    let mut config = Config::for_tests(ns);
    config.watch_namespace = Some(ns.to_owned());
    config.ca.workload_ttl = ttl;
    if let Some(addr) = grpc {
        config.grpc_addr = addr;
    }
    let operator = weft_operator::start(client.clone(), config).await?;
    tokio::time::timeout(DEADLINE, operator.ready()).await.context("the operator never became ready")?;
    Ok(operator)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_issues_exactly_the_tokens_identity_and_refuses_everything_else() -> Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    let ns = cluster.namespace("ca-certify").await?;
    let ns = ns.name();
    let operator = start_operator(&client, ns, Duration::from_secs(3600), None).await?;
    let dir = scratch(ns)?;
    let pod = workload(&client, ns, "reviews").await?;
    let bundle = TrustBundle::from_pem(operator.authority.current().context("no CA")?.bundle_pem.as_bytes())?;

    let good = token(&client, ns, "reviews", "weft-ca", Some(&pod)).await?;
    let creds = certify::certify(&ca_client(&dir, "good", &operator, ns, &good)?, &bundle).await?;
    assert_eq!(creds.id, SpiffeId::new("cluster.local", ns, "reviews")?);
    let lifetime = creds.not_after.duration_since(creds.not_before)?;
    assert_eq!(lifetime, Duration::from_secs(3600 + 60), "the configured lifetime, backdated a minute");
    assert_eq!(creds.chain.len(), 2, "leaf and CA");

    let refused = |name: &'static str, token: String, expected: Option<SpiffeId>| {
        let (dir, operator, bundle) = (&dir, &operator, &bundle);
        async move {
            let mut settings = ca_client(dir, name, operator, ns, &token)?;
            settings.expected = expected;
            match certify::certify(&settings, bundle).await {
                Ok(creds) => anyhow::bail!("{name}: issued {}", creds.id),
                Err(certify::Error::Refused(status)) => Ok::<_, anyhow::Error>(status),
                Err(other) => anyhow::bail!("{name}: {other}"),
            }
        }
    };
    let none = refused("no token", String::new(), None).await?;
    assert_eq!(none.code(), tonic::Code::Unauthenticated, "{none:?}");
    let audience = refused(
        "other audience",
        token(&client, ns, "reviews", "https://example.org", Some(&pod)).await?,
        None,
    )
    .await?;
    assert_eq!(audience.code(), tonic::Code::Unauthenticated, "{audience:?}");
    let unbound = refused("unbound", token(&client, ns, "reviews", "weft-ca", None).await?, None).await?;
    assert!(unbound.message().contains("not bound to a pod"), "{unbound:?}");
    let forged = refused("garbage", "eyJhbGciOiJSUzI1NiJ9.e30.c2ln".into(), None).await?;
    assert_eq!(forged.code(), tonic::Code::Unauthenticated, "{forged:?}");
    // sa reviews asking for sa admin: refused, and named.
    let admin = SpiffeId::new("cluster.local", ns, "admin")?;
    let other = refused("another identity", good.clone(), Some(admin)).await?;
    assert_eq!(other.code(), tonic::Code::InvalidArgument, "{other:?}");
    assert!(other.message().contains("/sa/admin"), "{other:?}");
    // An expired token: the TokenRequest API mints none (ten minutes at least), so the good
    // token's claims are moved two hours into the past and signed again with the cluster's own
    // key. The control: the same token re-signed unchanged is accepted, so the refusal is the
    // expiry, not the signature.
    let key = cluster.service_account_key();
    let control =
        certify::certify(&ca_client(&dir, "resigned", &operator, ns, &resign(&good, &key, 0)?)?, &bundle)
            .await?;
    assert_eq!(control.id, creds.id);
    let old = refused("expired token", resign(&good, &key, 7200)?, None).await?;
    assert_eq!(old.code(), tonic::Code::Unauthenticated, "{old:?}");
    assert!(old.message().contains("expired"), "{old:?}");

    // A token of a deleted pod dies with the pod (at once: the CA reads the pod back).
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.delete("reviews-0", &DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() })
        .await?;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while pods.get_opt("reviews-0").await?.is_some() {
        ensure!(tokio::time::Instant::now() < deadline, "the pod was never deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deleted = refused("deleted pod", good.clone(), None).await?;
    assert_eq!(deleted.code(), tonic::Code::Unauthenticated, "{deleted:?}");

    let metrics = operator.metrics.encode();
    // The deleted pod's token is refused either by the CA reading the pod back (`pod_gone`) or,
    // once the apiserver's review cache has expired, by the review itself (`token_rejected`).
    let count = |result: &str, reason: &str| -> u64 {
        let line = format!("weft_ca_requests_total{{result=\"{result}\",reason=\"{reason}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(&line)?.parse().ok()).unwrap_or(0)
    };
    assert_eq!(count("refused", "token_rejected") + count("refused", "pod_gone"), 3, "{metrics}");
    for (result, reason, expected) in [
        ("issued", "", 2),
        ("refused", "no_token", 1),
        ("refused", "wrong_audience", 1),
        ("refused", "not_pod_bound", 1),
        ("refused", "identity_mismatch", 1),
    ] {
        assert_eq!(count(result, reason), expected, "{result} {reason} in:\n{metrics}");
    }
    operator.shutdown().await;
    Ok(())
}

async fn proxy(dir: &Path, name: &str, config: &str, ca: CaClient) -> Result<weft_proxy::Handle> {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, config)?;
    let mut settings = weft_proxy::Settings::loopback(path);
    settings.explicit = vec![ExplicitListener { addr: ([127, 0, 0, 1], 0).into(), target: None }];
    settings.identity = Some(IdentitySource::Ca(ca));
    let proxy = weft_proxy::start(settings).await?;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while weft_e2e::http::get(proxy.admin_addr, "admin", "/ready").await.map(|(s, _)| s).unwrap_or(0) != 200 {
        ensure!(tokio::time::Instant::now() < deadline, "{name} never got a certificate");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(proxy)
}

/// Two proxies like the sidecars of `productpage` (client) and `reviews` (server), both with
/// certificates from `operator` for ServiceAccounts of their own.
struct Pair {
    server: weft_proxy::Handle,
    client: weft_proxy::Handle,
}

impl Pair {
    async fn start(client: &Client, ns: &str, operator: &weft_operator::Handle, dir: &Path) -> Result<Pair> {
        let client_pod = workload(client, ns, "productpage").await?;
        let server_pod = workload(client, ns, "reviews").await?;
        let app = weft_e2e::http::serve_ok("ok\n").await?;
        let server_token = token(client, ns, "reviews", "weft-ca", Some(&server_pod)).await?;
        let server = proxy(
            dir,
            "reviews",
            &format!("services:\n  - name: reviews\n    ports: [{{number: 9080, endpoints: [{{address: \"{app}\"}}]}}]\n"),
            ca_client(dir, "reviews", operator, ns, &server_token)?,
        )
        .await?;
        let reviews = SpiffeId::new("cluster.local", ns, "reviews")?;
        let client_token = token(client, ns, "productpage", "weft-ca", Some(&client_pod)).await?;
        let client_proxy = proxy(
            dir,
            "productpage",
            &format!(
                "services:\n  - name: reviews\n    ports: [{{number: 9080, endpoints: [{{address: \"{}\", identity: \"{reviews}\", workload: reviews}}]}}]\n",
                server.explicit_addrs[0]
            ),
            ca_client(dir, "productpage", operator, ns, &client_token)?,
        )
        .await?;
        Ok(Pair { server, client: client_proxy })
    }

    fn target(&self) -> std::net::SocketAddr {
        self.client.explicit_addrs[0]
    }

    fn shutdown(&self) {
        self.client.shutdown();
        self.server.shutdown();
    }
}

/// Steady load through the pair: one request at a time, each on a new connection (so each is a
/// handshake with whatever certificates and bundle are current), until stopped.
struct Load {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(target: std::net::SocketAddr) -> Load {
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let stop = tokio_util::sync::CancellationToken::new();
        let task = {
            let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    match weft_e2e::http::get(target, "reviews", "/").await {
                        Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                        outcome => {
                            eprintln!("failed: {outcome:?}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        Load { ok, failed, stop, task }
    }

    /// Stops and checks that every request succeeded (and that there were some).
    async fn finish(self) -> Result<()> {
        self.stop.cancel();
        self.task.await?;
        let (ok, failed) = (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed));
        ensure!(failed == 0, "{failed} of {} requests failed", ok + failed);
        ensure!(ok > 100, "only {ok} requests");
        Ok(())
    }
}

fn renewals(proxy: &weft_proxy::Handle) -> u64 {
    let text = proxy.metrics.encode();
    text.lines()
        .find(|l| l.starts_with("weft_identity_reloads_total{result=\"ok\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_renew_from_the_operator_under_load_without_a_failed_request() -> Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    let ns = cluster.namespace("ca-renew").await?;
    let ns = ns.name();
    let ttl = Duration::from_secs(20);
    let mut operator = start_operator(&client, ns, ttl, None).await?;
    let grpc = operator.grpc_addr;
    let dir = scratch(ns)?;
    let pair = Pair::start(&client, ns, &operator, &dir).await?;
    let (server, client_proxy) = (&pair.server, &pair.client);
    let reviews = SpiffeId::new("cluster.local", ns, "reviews")?;
    let load = Load::start(pair.target());

    // At least three renewals each (renewal is due every 8 to 10 s of a 20 s lifetime).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while renewals(server) < 4 || renewals(client_proxy) < 4 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "too few renewals: {} and {}",
            renewals(server),
            renewals(client_proxy)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The operator away for longer than a renewal interval: traffic goes on with the
    // certificates the proxies hold; renewal succeeds once it is back.
    operator.shutdown().await;
    let before = (renewals(server), renewals(client_proxy));
    tokio::time::sleep(Duration::from_secs(11)).await;
    ensure!(renewals(server) == before.0, "no renewal while the operator is away");
    operator = start_operator(&client, ns, ttl, Some(grpc)).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while renewals(server) <= before.0 || renewals(client_proxy) <= before.1 {
        ensure!(tokio::time::Instant::now() < deadline, "no renewal after the operator returned");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    load.finish().await?;
    let errors = server.metrics.encode();
    assert!(
        errors.contains("weft_identity_reloads_total{result=\"error\"}"),
        "renewal failures are counted:\n{errors}"
    );
    let metrics = weft_e2e::http::get(server.admin_addr, "admin", "/metrics").await?.1;
    let principal = format!("spiffe://cluster.local/ns/{ns}/sa/productpage");
    assert!(
        metrics.lines().any(|l| l.starts_with("weft_requests_total{")
            && l.contains("tls=\"true\"")
            && l.contains(&principal)),
        "the server proxy names the client's identity:\n{metrics}"
    );
    let (_, ready) = weft_e2e::http::get(server.admin_addr, "admin", "/ready").await?;
    assert!(
        ready.contains(&format!("identity: {reviews}")) && ready.contains("notAfterUnixSeconds: "),
        "{ready}"
    );

    pair.shutdown();
    operator.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_whose_certificate_expired_fails_closed_and_recovers_when_the_ca_returns() -> Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    let ns = cluster.namespace("ca-expiry").await?;
    let ns = ns.name();
    let ttl = Duration::from_secs(10);
    let operator = start_operator(&client, ns, ttl, None).await?;
    let grpc = operator.grpc_addr;
    let dir = scratch(ns)?;
    let pair = Pair::start(&client, ns, &operator, &dir).await?;
    let client_proxy = &pair.client;
    let target = pair.target();
    assert_eq!(weft_e2e::http::get(target, "reviews", "/").await?.0, 200);

    // No CA: once the certificate expires the proxy presents none, reports not ready, and
    // refuses the meshed endpoint rather than reach it in plain text.
    operator.shutdown().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = weft_e2e::http::get(client_proxy.admin_addr, "admin", "/ready").await?;
        if status == 503 {
            assert!(body.contains("no identity"), "{body}");
            break;
        }
        ensure!(tokio::time::Instant::now() < deadline, "the certificate never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, body) = weft_e2e::http::get(target, "reviews", "/").await?;
    assert_eq!(status, 503, "fails closed: {body}");

    // The CA back: a new certificate, and traffic flows again without a restart.
    let operator = start_operator(&client, ns, ttl, Some(grpc)).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while weft_e2e::http::get(target, "reviews", "/").await?.0 != 200 {
        ensure!(tokio::time::Instant::now() < deadline, "traffic never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    pair.shutdown();
    operator.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_rotates_under_load_without_a_failed_request() -> Result<()> {
    use kube::api::{Patch, PatchParams};
    use weft_operator::ca::rotation::PHASE;

    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    let ns = cluster.namespace("ca-rotate").await?;
    let ns = ns.name();
    let mut config = Config::for_tests(ns);
    config.watch_namespace = Some(ns.to_owned());
    config.ca.workload_ttl = Duration::from_secs(20);
    config.ca.reload_every = Duration::from_secs(1);
    config.ca.rotation_propagation = Duration::from_secs(3);
    let operator = weft_operator::start(client.clone(), config).await?;
    tokio::time::timeout(DEADLINE, operator.ready()).await.context("the operator never became ready")?;
    let dir = scratch(ns)?;
    let pair = Pair::start(&client, ns, &operator, &dir).await?;
    let old_bundle = operator.authority.current().context("no CA")?.bundle_pem.clone();

    // The kubelet's part: the mounted bundle follows what the CA publishes.
    let mirror_stop = tokio_util::sync::CancellationToken::new();
    let mirror = {
        let (authority, stop, file) = (operator.authority.clone(), mirror_stop.clone(), dir.join("ca.crt"));
        tokio::spawn(async move {
            let mut changes = authority.changes();
            while !stop.is_cancelled() {
                if let Some(signer) = authority.current() {
                    let _ = std::fs::write(file.with_extension("tmp"), &signer.bundle_pem);
                    let _ = std::fs::rename(file.with_extension("tmp"), &file);
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = changes.changed() => {}
                }
            }
        })
    };
    let load = Load::start(pair.target());
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The documented command: annotate the CA Secret.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), ns);
    let request = serde_json::json!({"metadata": {"annotations": {PHASE: "requested"}}});
    secrets.patch("weft-ca", &PatchParams::default(), &Patch::Merge(&request)).await?;
    let mut phases = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let secret = secrets.get("weft-ca").await?;
        let phase = secret.metadata.annotations.and_then(|a| a.get(PHASE).cloned()).unwrap_or_default();
        if phases.last() != Some(&phase) {
            eprintln!("rotation phase: {phase}");
            phases.push(phase.clone());
        }
        if phase == "done" {
            break;
        }
        ensure!(tokio::time::Instant::now() < deadline, "the rotation did not finish: {phases:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    ensure!(phases.iter().any(|p| p == "switched"), "phases seen: {phases:?}");
    // Once the old root is gone, every new handshake proves both proxies hold new-root
    // certificates: keep the load on a little longer.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let new_bundle = loop {
        let bundle = operator.authority.current().context("no CA")?.bundle_pem.clone();
        if TrustBundle::from_pem(bundle.as_bytes())?.roots.len() == 1 {
            break bundle;
        }
        ensure!(tokio::time::Instant::now() < deadline, "the operator never reloaded the retired bundle");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(new_bundle.trim() != old_bundle.trim(), "the root did not change");
    tokio::time::sleep(Duration::from_secs(3)).await;
    load.finish().await?;
    for proxy in [&pair.server, &pair.client] {
        let (_, ready) = weft_e2e::http::get(proxy.admin_addr, "admin", "/ready").await?;
        ensure!(ready.contains("trustBundleRoots: 1"), "the old root is still trusted: {ready}");
    }
    mirror_stop.cancel();
    mirror.await?;
    pair.shutdown();
    operator.shutdown().await;
    Ok(())
}
