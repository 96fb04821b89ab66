//! The demo walkthrough on the real node: Istio's YAML (`examples/walkthrough/`, apiVersion
//! changed) applied step by step to the meshed bookinfo apps, each step measured with real
//! requests sent by a client pod and its numbers checked against what the YAML asked.
//! `cargo xtask demo` shows it; `tests/walkthrough.rs` runs the same steps as a test.
//!
//! Every step waits for its readiness signal (the caller's proxy runs the new route, the
//! server's proxy the new policy) before it measures, so no step relies on timing.

pub mod expect;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind},
};
use serde_json::Value;

use self::expect::Verdict;
use crate::{
    apply, cluster,
    images::ImageSet,
    mesh::{self, ADMIN_PORT, CallReport, Load, MeshError, START, app_of, apply_and_wait, call_with, get},
};

/// The lifetime of workload certificates in the demo (`identity.workloadCertTTL`), short so
/// that the rotation step sees proxies renew under load.
pub const CERT_TTL: Duration = Duration::from_secs(30);
/// The Helm values the walkthrough needs on top of the images.
pub const HELM_SETS: &[&str] = &["operator.replicas=1", "webhook.replicas=1", "identity.workloadCertTTL=30s"];
/// The namespace the YAML files name in principals; replaced by the one the walkthrough runs in.
const NAMESPACE_IN_FILES: &str = "weft-demo";
const POLL: Duration = Duration::from_millis(300);

/// Errors of the walkthrough: the cluster or the mesh failed (a step whose numbers are wrong is
/// not an error: it is a [`StepOutcome`] with problems).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WalkthroughError {
    #[error(transparent)]
    Mesh(#[from] MeshError),
    #[error(transparent)]
    Cluster(#[from] cluster::Error),
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{0}")]
    Missing(String),
    #[error("{what} did not happen within {}s; last seen: {seen}", START.as_secs())]
    NotReady { what: String, seen: String },
}

type Result<T, E = WalkthroughError> = std::result::Result<T, E>;

/// One step's title and the checks that failed.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    pub title: &'static str,
    pub problems: Vec<String>,
    /// From applying its YAML to its last check.
    pub took: Duration,
}

/// Where the walkthrough runs and how it talks.
pub struct Walkthrough {
    client: Client,
    /// The meshed namespace with the demo apps.
    namespace: String,
    /// An unlabelled namespace for the unmeshed client.
    outside: String,
    /// Prints a line (stdout for the demo, stderr for the test).
    say: fn(&str),
    /// Print each YAML file as it is applied.
    show_yaml: bool,
}

impl std::fmt::Debug for Walkthrough {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Walkthrough")
            .field("namespace", &self.namespace)
            .field("outside", &self.outside)
            .finish()
    }
}

/// The pods the steps talk to.
struct Pods {
    frontend: Pod,
    reviews: Vec<Pod>,
    ratings: Vec<Pod>,
    outside: Pod,
}

impl Walkthrough {
    pub fn new(client: Client, namespace: &str, outside: &str, say: fn(&str), show_yaml: bool) -> Self {
        Self { client, namespace: namespace.into(), outside: outside.into(), say, show_yaml }
    }

    /// Runs every step in order: a step whose numbers are wrong is reported and the next one
    /// still runs (each applies all it needs); an error of the cluster stops the walk.
    /// The namespaces must exist, the meshed one labelled for injection, and Weft installed
    /// with [`HELM_SETS`].
    pub async fn run(&self, images: &ImageSet) -> Result<Vec<StepOutcome>> {
        let mut pods = self.deploy(images).await?;
        let mut outcomes = Vec::new();
        macro_rules! step {
            ($title:expr, $body:expr) => {{
                let title: &'static str = $title;
                let started = Instant::now();
                (self.say)(&format!("\n== {} ==", title));
                let verdicts: Vec<Verdict> = $body.await?;
                let mut problems = Vec::new();
                for verdict in verdicts {
                    (self.say)(&format!("   {} {}", if verdict.held { "✔" } else { "✘" }, verdict.line));
                    if !verdict.held {
                        problems.push(verdict.line);
                    }
                }
                outcomes.push(StepOutcome { title, problems, took: started.elapsed() });
            }};
        }
        step!("1. All of reviews' traffic to v1", self.all_to_v1(&pods));
        step!(
            "2. A canary: 90% to v1, 10% to v2",
            self.canary(&pods, "02-canary-90-10.yaml", "canary-90-10", 0.1)
        );
        step!("3. The canary grows: 50/50", self.canary(&pods, "03-canary-50-50.yaml", "canary-50-50", 0.5));
        step!("4. Header routing: end-user jason to v3", self.header_route(&pods));
        step!("5. Faults: a 2 s delay for 50%, 503 for 10%", self.fault(&pods));
        step!("6. Retries absorb a flaky version's 503s", self.retries(&pods));
        step!("7. Outlier detection ejects the flaky pod", self.outlier_detection(&pods));
        step!("8. A request timeout of 0.5 s", self.timeout(&pods));
        step!("9. Certificates rotate under load", self.rotation(&pods));
        step!("10. A reviews pod deleted under load loses no request", self.pod_deleted(&mut pods));
        step!("11. STRICT mTLS: plain text refused, the mesh served", self.strict_mtls(&pods));
        step!("12. An AuthorizationPolicy denies the frontend's service account", self.deny(&pods));
        Ok(outcomes)
    }

    /// Removes what the steps applied: their policies, the flaky ratings version and the
    /// unmeshed client. The demo apps and the mesh stay.
    pub async fn clean_up(&self) -> Result<()> {
        for file in FILES {
            let text = self.read(file)?;
            for document in serde_yaml::Deserializer::from_str(&text) {
                let object: DynamicObject = serde::Deserialize::deserialize(document)
                    .map_err(|e| cluster::Error::Manifest(format!("{file}: {e}")))?;
                let types = object.types.clone().unwrap_or_default();
                let gvk = GroupVersionKind::try_from(&types)
                    .map_err(|e| cluster::Error::Manifest(e.to_string()))?;
                let api: Api<DynamicObject> =
                    Api::namespaced_with(self.client.clone(), &self.namespace, &ApiResource::from_gvk(&gvk));
                let name = object.metadata.name.unwrap_or_default();
                match api.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(status)) if status.code == 404 => {}
                    Err(e) => {
                        return Err(cluster::Error::kube(format!("deleting {} {name}", gvk.kind))(e).into());
                    }
                }
            }
        }
        Ok(())
    }

    /// Deploys the demo apps, the flaky ratings version and the unmeshed client, and waits
    /// until all are ready.
    async fn deploy(&self, images: &ImageSet) -> Result<Pods> {
        (self.say)(&format!(
            "\nkubectl apply -n {ns} -f examples/bookinfo.yaml -f examples/walkthrough/ratings-v2-flaky.yaml",
            ns = self.namespace
        ));
        let flaky =
            self.read("ratings-v2-flaky.yaml")?.replace(mesh::DEMO_IMAGE_IN_EXAMPLES, &images.demo.name);
        let manifest = format!("{}\n---\n{flaky}", mesh::bookinfo(images)?);
        let pods = apply_and_wait(&self.client, &self.namespace, &manifest).await?;
        let outside = apply_and_wait(&self.client, &self.outside, &outside_client(images)).await?;
        for pod in &pods {
            (self.say)(&format!(
                "   {:<36} {:<8} {}",
                pod.metadata.name.as_deref().unwrap_or_default(),
                if mesh::is_injected(pod) { "meshed" } else { "plain" },
                pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()).unwrap_or_default()
            ));
        }
        let of = |app: &str| pods.iter().filter(|p| app_of(p) == app).cloned().collect::<Vec<_>>();
        let first = |pods: Vec<Pod>, what: &str| {
            pods.into_iter().next().ok_or_else(|| WalkthroughError::Missing(format!("no {what} pod")))
        };
        let pods = Pods {
            frontend: first(of("frontend"), "frontend")?,
            reviews: of("reviews"),
            ratings: of("ratings"),
            outside: first(outside, "unmeshed client")?,
        };
        (self.say)(&format!(
            "   and in the unlabelled namespace {}: {} (no proxy)",
            self.outside,
            pods.outside.metadata.name.as_deref().unwrap_or_default()
        ));
        Ok(pods)
    }

    async fn all_to_v1(&self, pods: &Pods) -> Result<Vec<Verdict>> {
        self.apply("01-reviews-v1.yaml").await?;
        self.await_routes(&pods.frontend, "reviews", &["all-to-v1"]).await?;
        let (report, seen) =
            self.measure(&pods.frontend, &pods.reviews, &self.load("reviews", "/", 200, 4)).await?;
        let n = report.sent();
        Ok(vec![
            expect::all("answered 200", report.ok(), n),
            expect::all("from v1", report.version("v1"), n),
            self.identities(&seen, "frontend", n),
        ])
    }

    async fn canary(&self, pods: &Pods, file: &str, route: &str, v2: f64) -> Result<Vec<Verdict>> {
        self.apply(file).await?;
        self.await_routes(&pods.frontend, "reviews", &[route]).await?;
        let (report, seen) =
            self.measure(&pods.frontend, &pods.reviews, &self.load("reviews", "/", 400, 8)).await?;
        let n = report.sent();
        Ok(vec![
            expect::all("answered 200", report.ok(), n),
            expect::share("from v2", report.version("v2"), n, v2),
            expect::all("from v1 or v2", report.version("v1") + report.version("v2"), n),
            self.identities(&seen, "frontend", n),
        ])
    }

    async fn header_route(&self, pods: &Pods) -> Result<Vec<Verdict>> {
        self.apply("04-header-route.yaml").await?;
        self.await_routes(&pods.frontend, "reviews", &["jason-to-v3", "others-to-v1"]).await?;
        let jason = Load { headers: &[("end-user", "jason")], ..self.load("reviews", "/", 100, 4) };
        (self.say)("   with end-user: jason");
        let (with, _) = self.measure(&pods.frontend, &pods.reviews, &jason).await?;
        (self.say)("   without it");
        let (without, _) =
            self.measure(&pods.frontend, &pods.reviews, &self.load("reviews", "/", 100, 4)).await?;
        Ok(vec![
            expect::all("jason's answered 200", with.ok(), with.sent()),
            expect::all("jason's from v3", with.version("v3"), with.sent()),
            expect::all("others' answered 200", without.ok(), without.sent()),
            expect::all("others' from v1", without.version("v1"), without.sent()),
        ])
    }

    async fn fault(&self, pods: &Pods) -> Result<Vec<Verdict>> {
        self.apply("05-fault.yaml").await?;
        self.await_routes(&pods.frontend, "reviews", &["delay-and-abort"]).await?;
        let load = Load { slow_ms: Some(2000), ..self.load("reviews", "/", 100, 20) };
        let (report, _) = self.measure(&pods.frontend, &pods.reviews, &load).await?;
        let n = report.sent();
        Ok(vec![
            expect::share("aborted with 503", report.with_status(503), n, 0.1),
            expect::share("delayed by 2 s or more", report.slow.unwrap_or(0), n, 0.5),
            expect::all("answered 200 or the injected 503", report.ok() + report.with_status(503), n),
        ])
    }

    async fn retries(&self, pods: &Pods) -> Result<Vec<Verdict>> {
        (self.say)("   before: ratings has v1 and v2, which answers 503 to 30% of requests");
        let load = self.load("ratings", "/", 300, 4);
        let (before, _) = self.measure(&pods.frontend, &pods.ratings, &load).await?;
        self.apply("06-retries.yaml").await?;
        self.await_routes(&pods.frontend, "ratings", &["retry-5xx"]).await?;
        let (after, seen) = self.measure(&pods.frontend, &pods.ratings, &load).await?;
        let tries = seen.get(&self.principal("frontend")).copied().unwrap_or(0.0) as u64;
        Ok(vec![
            expect::some("503 without retries", before.with_status(503), before.sent()),
            expect::all("answered 200 with retries", after.ok(), after.sent()),
            // The server proxies count tries: each request once, and each retry again.
            expect::at_least("tries seen by the ratings proxies", tries, after.sent()),
        ])
    }

    async fn outlier_detection(&self, pods: &Pods) -> Result<Vec<Verdict>> {
        self.apply("07-outlier-detection.yaml").await?;
        self.await_routes(&pods.frontend, "ratings", &["no-retries"]).await?;
        // The outlier detection arrives in its own update, maybe after the route's.
        self.await_config(&pods.frontend, "ratings' outlier detection", |config| {
            service(config, &self.host("ratings"))
                .is_some_and(|s| !s["trafficPolicy"]["outlierDetection"].is_null())
        })
        .await?;
        (self.say)("   one at a time until ratings-v2 fails once and is ejected");
        let (first, _) =
            self.measure(&pods.frontend, &pods.ratings, &self.load("ratings", "/", 100, 1)).await?;
        (self.say)("   then");
        let (then, _) =
            self.measure(&pods.frontend, &pods.ratings, &self.load("ratings", "/", 200, 4)).await?;
        Ok(vec![
            expect::some("503 before the ejection", first.with_status(503), first.sent()),
            expect::all("answered 200 after it", then.ok(), then.sent()),
            expect::none("from the ejected v2", then.version("v2"), then.sent()),
        ])
    }

    async fn timeout(&self, pods: &Pods) -> Result<Vec<Verdict>> {
        self.apply("08-timeout.yaml").await?;
        self.await_routes(&pods.frontend, "reviews", &["timeout-500ms"]).await?;
        (self.say)("   the app is asked to take 1 s (?delay_ms=1000)");
        let load = self.load("reviews", "/?delay_ms=1000", 20, 4);
        let (report, _) = self.measure(&pods.frontend, &pods.reviews, &load).await?;
        Ok(vec![
            expect::all("answered 504 by the caller's proxy", report.with_status(504), report.sent()),
            expect::latency("p50", report.p50_ms, 500.0, 1000.0),
            expect::latency("p99", report.p99_ms, 500.0, 1000.0),
        ])
    }

    async fn rotation(&self, pods: &Pods) -> Result<Vec<Verdict>> {
        (self.say)(&format!(
            "   workload certificates live {}s (helm --set identity.workloadCertTTL={}s); proxies renew at about half",
            CERT_TTL.as_secs(),
            CERT_TTL.as_secs()
        ));
        let watched: Vec<&Pod> = std::iter::once(&pods.frontend).chain(&pods.reviews).collect();
        let mut expiry = Vec::new();
        for pod in &watched {
            expiry.push(not_after(pod).await?);
        }
        let load = self.load("reviews", "/", 50, 2);
        let deadline = Instant::now() + CERT_TTL + Duration::from_secs(30);
        let (mut sent, mut ok, mut renewed) = (0, 0, 0);
        // Bounded: batches until every watched proxy renewed, at most CERT_TTL + 30 s.
        while renewed < watched.len() && Instant::now() < deadline {
            let report = mesh::call_with(&pods.frontend, &load).await?;
            (sent, ok) = (sent + report.sent(), ok + report.ok());
            renewed = 0;
            for (pod, before) in watched.iter().zip(&expiry) {
                renewed += usize::from(not_after(pod).await? != *before);
            }
        }
        (self.say)(&format!(
            "   frontend -> reviews: {sent} requests while {renewed} of {} proxies renewed",
            watched.len()
        ));
        Ok(vec![
            expect::all("proxies that renewed their certificate", renewed as u64, watched.len() as u64),
            expect::all("answered 200 meanwhile", ok, sent),
        ])
    }

    /// Deletes one reviews pod while the frontend sends to the Service; its Deployment replaces
    /// it. The pod drains (its app and proxy finish what they started) while the callers'
    /// proxies learn that its endpoint is gone, so no request fails.
    async fn pod_deleted(&self, pods: &mut Pods) -> Result<Vec<Verdict>> {
        self.apply("10-reviews-all-versions.yaml").await?;
        self.await_routes(&pods.frontend, "reviews", &["all-versions"]).await?;
        let victim = pods
            .reviews
            .iter()
            .find(|p| p.metadata.labels.as_ref().and_then(|l| l.get("version")).is_some_and(|v| v == "v2"))
            .or(pods.reviews.first())
            .cloned()
            .ok_or_else(|| WalkthroughError::Missing("no reviews pod".into()))?;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let (frontend, load) = (pods.frontend.clone(), self.load("reviews", "/", 50, 2));
        let sender = tokio::spawn(async move {
            let mut reports = Vec::new();
            // Bounded: at most 2,000 batches, and stopped once the pod is replaced.
            for _ in 0..2_000 {
                if *stopped.borrow_and_update() {
                    break;
                }
                reports.push(call_with(&frontend, &load).await);
            }
            reports
        });
        (self.say)(&format!(
            "   kubectl -n {} delete pod {} (while the frontend sends)",
            self.namespace,
            name(&victim)
        ));
        let pods_api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        pods_api
            .delete(name(&victim), &DeleteParams::default())
            .await
            .map_err(cluster::Error::kube(format!("deleting pod {}", name(&victim))))?;
        let replaced = self.await_replaced(&victim).await;
        let _ = stop.send(true);
        let reports =
            sender.await.map_err(|e| WalkthroughError::Missing(format!("the load task failed: {e}")))?;
        let replacement = replaced?;
        let (mut sent, mut ok, mut errors, mut status) = (0, 0, 0, BTreeMap::new());
        for report in reports {
            let report = report?;
            (sent, ok, errors) = (sent + report.sent(), ok + report.ok(), errors + report.errors);
            for (code, count) in report.status {
                *status.entry(code).or_insert(0) += count;
            }
        }
        (self.say)(&format!(
            "   {sent} requests while {} went and {} came ready: status {} · errors {errors}",
            name(&victim),
            name(&replacement),
            counts(&status)
        ));
        if let Some(slot) = pods.reviews.iter_mut().find(|p| name(p) == name(&victim)) {
            *slot = replacement;
        }
        Ok(vec![expect::all("answered 200", ok, sent)])
    }

    /// Waits until `pod` is gone and another pod of its Deployment is ready; returns it.
    async fn await_replaced(&self, pod: &Pod) -> Result<Pod> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let selector = ["app", "version"]
            .iter()
            .filter_map(|k| labels.get(*k).map(|v| format!("{k}={v}")))
            .collect::<Vec<_>>()
            .join(",");
        let deadline = Instant::now() + START;
        loop {
            let listed = pods
                .list(&kube::api::ListParams::default().labels(&selector))
                .await
                .map_err(cluster::Error::kube("listing pods"))?;
            let old_gone = listed.items.iter().all(|p| name(p) != name(pod));
            let ready = listed
                .items
                .iter()
                .find(|p| crate::node::pod_problem(p).is_none() && p.metadata.deletion_timestamp.is_none());
            if let (true, Some(ready)) = (old_gone, ready) {
                return Ok(ready.clone());
            }
            if Instant::now() >= deadline {
                return Err(WalkthroughError::NotReady {
                    what: format!("a replacement for {}", name(pod)),
                    seen: format!("{} pods", listed.items.len()),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn strict_mtls(&self, pods: &Pods) -> Result<Vec<Verdict>> {
        self.apply("11-strict-mtls.yaml").await?;
        for pod in &pods.reviews {
            self.await_config(pod, "STRICT on reviews", |c| {
                c["config"]["inbound"]["mtlsMode"] == "MTLS_STRICT"
            })
            .await?;
        }
        let refused_before =
            metric_sum(&pods.reviews, "weft_inbound_refused_total{", "reason=\"plaintext\"").await?;
        (self.say)(&format!("   from the unmeshed client in {}", self.outside));
        let (plain, _) =
            self.measure(&pods.outside, &pods.reviews, &self.load("reviews", "/", 20, 1)).await?;
        let refused = metric_sum(&pods.reviews, "weft_inbound_refused_total{", "reason=\"plaintext\"")
            .await?
            - refused_before;
        (self.say)(&format!("   the reviews proxies refused {refused} plain-text connections"));
        (self.say)("   from the meshed frontend");
        let (meshed, seen) =
            self.measure(&pods.frontend, &pods.reviews, &self.load("reviews", "/", 100, 4)).await?;
        Ok(vec![
            expect::none("plain-text requests answered", plain.status.values().sum(), plain.sent()),
            expect::at_least("plain-text connections refused", refused as u64, plain.sent()),
            expect::all("mTLS requests answered 200", meshed.ok(), meshed.sent()),
            self.identities(&seen, "frontend", meshed.sent()),
        ])
    }

    async fn deny(&self, pods: &Pods) -> Result<Vec<Verdict>> {
        self.apply("12-deny-frontend.yaml").await?;
        let name = format!("{}/reviews-deny-frontend", self.namespace);
        for pod in &pods.reviews {
            self.await_config(pod, "the deny policy on reviews", |c| {
                c["config"]["inbound"]["authorizations"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|p| p["name"] == name.as_str()))
            })
            .await?;
        }
        (self.say)("   from the frontend");
        let (frontend, _) =
            self.measure(&pods.frontend, &pods.reviews, &self.load("reviews", "/", 50, 2)).await?;
        let ratings =
            pods.ratings.first().ok_or_else(|| WalkthroughError::Missing("no ratings pod".into()))?;
        (self.say)(&format!("   from {}", ratings.metadata.name.as_deref().unwrap_or_default()));
        let (other, seen) = self.measure(ratings, &pods.reviews, &self.load("reviews", "/", 50, 2)).await?;
        Ok(vec![
            expect::all("the frontend's answered 403", frontend.with_status(403), frontend.sent()),
            expect::all("ratings' answered 200", other.ok(), other.sent()),
            self.identities(&seen, "ratings", other.sent()),
        ])
    }

    /// Applies one file of `examples/walkthrough/` into the namespace, showing it.
    async fn apply(&self, file: &str) -> Result<()> {
        let text = self.read(file)?;
        (self.say)(&format!("kubectl apply -n {} -f examples/walkthrough/{file}", self.namespace));
        if self.show_yaml {
            for line in text.lines() {
                (self.say)(&format!("   | {line}"));
            }
        }
        apply::apply_yaml(&self.client, &text, Some(&self.namespace)).await?;
        Ok(())
    }

    fn read(&self, file: &str) -> Result<String> {
        let path = files_dir().join(file);
        let text = std::fs::read_to_string(&path)
            .map_err(|source| WalkthroughError::Read { path: path.display().to_string(), source })?;
        Ok(text.replace(&format!("/ns/{NAMESPACE_IN_FILES}/"), &format!("/ns/{}/", self.namespace)))
    }

    /// Waits until the proxy of `pod` routes `host` by exactly the HTTP routes `names`.
    async fn await_routes(&self, pod: &Pod, host: &str, names: &[&str]) -> Result<()> {
        self.subscribe(pod, host).await?;
        let fqdn = self.host(host);
        self.await_config(pod, &format!("routes {names:?} for {host}"), |config| {
            service(config, &fqdn).is_some_and(|s| {
                let routes = s["httpRoutes"].as_array().map(Vec::as_slice).unwrap_or_default();
                routes.len() == names.len() && routes.iter().zip(names).all(|(r, n)| r["name"] == *n)
            })
        })
        .await
    }

    /// Makes the proxy of `pod` hold the config of `host`: proxies learn a destination from the
    /// operator when they first send to it, so one request is sent when it is not there yet.
    async fn subscribe(&self, pod: &Pod, host: &str) -> Result<()> {
        let (_, body) = get(pod, ADMIN_PORT, "/config").await?;
        let config: Value = serde_json::from_str(&body).unwrap_or_default();
        if service(&config, &self.host(host)).is_none() {
            call_with(pod, &self.load(host, "/", 1, 1)).await?;
        }
        Ok(())
    }

    /// Polls the `/config` of `pod`'s proxy until `ready` holds.
    async fn await_config(&self, pod: &Pod, what: &str, ready: impl Fn(&Value) -> bool) -> Result<()> {
        let deadline = Instant::now() + START;
        loop {
            let (_, body) = get(pod, ADMIN_PORT, "/config").await?;
            let config: Value = serde_json::from_str(&body).unwrap_or_default();
            if ready(&config) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let seen = config["version"].to_string();
                return Err(WalkthroughError::NotReady { what: format!("{what} in {}", name(pod)), seen });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Sends `load` from `from` and shows what came back and which identities the proxies of
    /// `to` saw it from.
    async fn measure(
        &self,
        from: &Pod,
        to: &[Pod],
        load: &Load<'_>,
    ) -> Result<(CallReport, BTreeMap<String, f64>)> {
        let before = identities_seen(to).await?;
        let report = call_with(from, load).await?;
        let mut seen = identities_seen(to).await?;
        for (principal, count) in &mut seen {
            *count -= before.get(principal).copied().unwrap_or(0.0);
        }
        seen.retain(|_, count| *count > 0.0);
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1} ms"));
        (self.say)(&format!(
            "   {} -> {} x{} ({} at a time): status {} · versions {} · errors {} · p50 {} p99 {}{}",
            app_of(from),
            load.url,
            load.n,
            load.concurrency,
            counts(&report.status),
            counts(&report.versions),
            report.errors,
            ms(report.p50_ms),
            ms(report.p99_ms),
            report
                .slow
                .map(|s| format!(" · {s} slower than {} ms", load.slow_ms.unwrap_or(0)))
                .unwrap_or_default(),
        ));
        for (principal, count) in &seen {
            (self.say)(&format!(
                "     the {} proxies saw {count} over mTLS from {principal}",
                app_of(&to[0])
            ));
        }
        Ok((report, seen))
    }

    /// The server proxies saw `n` requests over mTLS from service account `account`.
    fn identities(&self, seen: &BTreeMap<String, f64>, account: &str, n: u64) -> Verdict {
        let principal = self.principal(account);
        let count = seen.get(&principal).copied().unwrap_or(0.0) as u64;
        expect::all(&format!("seen over mTLS as {principal}"), count, n)
    }

    /// The SPIFFE ID of service account `account` in the namespace.
    fn principal(&self, account: &str) -> String {
        format!("spiffe://cluster.local/ns/{}/sa/{account}", self.namespace)
    }

    fn host(&self, service: &str) -> String {
        format!("{service}.{}.svc.cluster.local", self.namespace)
    }

    fn url(&self, service: &str, path: &str) -> String {
        format!("http://{}{path}", self.host(service))
    }

    /// `n` GETs of `path` on `service`, `concurrency` at a time.
    fn load(&self, service: &str, path: &str, n: u32, concurrency: u32) -> Load<'static> {
        Load { url: self.url(service, path), n, concurrency, ..Load::default() }
    }
}

/// The files the steps apply, in `examples/walkthrough/`.
const FILES: &[&str] = &[
    "01-reviews-v1.yaml",
    "02-canary-90-10.yaml",
    "03-canary-50-50.yaml",
    "04-header-route.yaml",
    "05-fault.yaml",
    "06-retries.yaml",
    "07-outlier-detection.yaml",
    "08-timeout.yaml",
    "10-reviews-all-versions.yaml",
    "11-strict-mtls.yaml",
    "12-deny-frontend.yaml",
    "ratings-v2-flaky.yaml",
];

fn files_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/walkthrough")
}

/// Creates the meshed namespace (labelled for injection) and the unmeshed one.
pub async fn create_namespaces(client: &Client, meshed: &str, outside: &str) -> Result<()> {
    for name in [meshed, outside] {
        let object = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
        apply::apply_yaml(client, &object.to_string(), None).await?;
    }
    crate::webhook::enable_injection(client, meshed).await?;
    Ok(())
}

/// Deletes the unmeshed namespace.
pub async fn delete_namespace(client: &Client, name: &str) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    match namespaces.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(cluster::Error::kube(format!("deleting namespace {name}"))(e).into()),
    }
}

/// A Deployment of the demo app to call from outside the mesh.
fn outside_client(images: &ImageSet) -> String {
    serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "unmeshed-client"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "unmeshed-client"}},
            "template": {
                "metadata": {"labels": {"app": "unmeshed-client"}},
                "spec": {"containers": [{
                    "name": "demo",
                    "image": images.demo.name,
                    "env": [{"name": "SERVICE", "value": "unmeshed-client"}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": mesh::APP_PORT}, "periodSeconds": 1},
                }]},
            },
        },
    })
    .to_string()
}

/// The service named `fqdn` in a proxy's `/config`.
fn service<'a>(config: &'a Value, fqdn: &str) -> Option<&'a Value> {
    config["config"]["services"].as_array()?.iter().find(|s| s["name"] == fqdn)
}

/// When the certificate of `pod`'s proxy expires (its `/ready`).
async fn not_after(pod: &Pod) -> Result<u64> {
    let (_, ready) = get(pod, ADMIN_PORT, "/ready").await?;
    ready
        .lines()
        .find_map(|l| l.strip_prefix("notAfterUnixSeconds: ")?.trim().parse().ok())
        .ok_or_else(|| WalkthroughError::Missing(format!("{} has no certificate: {ready}", name(pod))))
}

/// Inbound mTLS requests the proxies of `pods` counted, by source identity.
async fn identities_seen(pods: &[Pod]) -> Result<BTreeMap<String, f64>> {
    let mut seen = BTreeMap::new();
    for pod in pods {
        let (_, metrics) = get(pod, ADMIN_PORT, "/metrics").await?;
        for line in metrics.lines().filter(|l| {
            l.starts_with("weft_requests_total{")
                && l.contains("direction=\"inbound\"")
                && l.contains("tls=\"true\"")
        }) {
            let principal = label(line, "source_principal").unwrap_or_default();
            let count: f64 = line.rsplit_once(' ').and_then(|(_, v)| v.parse().ok()).unwrap_or(0.0);
            *seen.entry(principal.to_owned()).or_default() += count;
        }
    }
    Ok(seen)
}

/// The sum of the samples of the metric lines starting with `prefix` and containing `filter`.
async fn metric_sum(pods: &[Pod], prefix: &str, filter: &str) -> Result<f64> {
    let mut total = 0.0;
    for pod in pods {
        total += mesh::metric_sum(pod, prefix, filter).await?;
    }
    Ok(total)
}

/// The value of label `name` in an OpenMetrics sample line.
fn label<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!("{name}=\""))? + name.len() + 2;
    let length = line[start..].find('"')?;
    Some(&line[start..start + length])
}

fn counts(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "-".into();
    }
    map.iter().map(|(k, v)| format!("{k}:{v}")).collect::<Vec<_>>().join(" ")
}

fn name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_label_of_a_sample() {
        let line = r#"weft_requests_total{direction="inbound",source_principal="spiffe://a/ns/b/sa/c",tls="true"} 3"#;
        assert_eq!(label(line, "source_principal"), Some("spiffe://a/ns/b/sa/c"));
        assert_eq!(label(line, "tls"), Some("true"));
        assert_eq!(label(line, "absent"), None);
    }

    #[test]
    fn every_file_the_steps_apply_exists_and_is_listed_for_clean_up() {
        let mut on_disk: Vec<String> = std::fs::read_dir(files_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        assert_eq!(on_disk, FILES);
    }
}
