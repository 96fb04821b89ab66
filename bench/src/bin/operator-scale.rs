//! Convergence of Weft's operator at scale, against the real kube-apiserver of the test cluster:
//! `cargo run --release -p weft-bench --bin operator-scale` (with `cargo xtask cluster up`).
//!
//! Creates `--services` Services (no selector; past the first 200 headless, as the test cluster's
//! service range is a /24) with one EndpointSlice each (`--endpoints` in
//! all), and `--virtual-services` VirtualServices (a 90/10 split between two services). The
//! operator runs as a child process of its own (this binary with `--serve`), so its RSS and CPU
//! are its alone. `--subscribers` gRPC streams subscribe as proxies would, each to the `--hot`
//! routed services that the benchmark changes plus `--extra` others. Then, `--changes` times, one
//! VirtualService weight is patched and the time until each subscriber has the new weight is
//! recorded: per subscriber, and until the last of them (convergence).

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use futures::{StreamExt as _, stream};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use weft_api::VirtualService;
use weft_bench::{Percentiles, operator_process};
use weft_e2e::TestCluster;
use weft_proto::v1::{self as pb, config_discovery_client::ConfigDiscoveryClient};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Endpoints in all, spread evenly over the services.
    #[arg(long, default_value_t = 5000)]
    endpoints: usize,
    #[arg(long, default_value_t = 100)]
    virtual_services: usize,
    #[arg(long, default_value_t = 200)]
    subscribers: usize,
    /// Routed services every subscriber holds (the ones the benchmark changes).
    #[arg(long, default_value_t = 10)]
    hot: usize,
    /// Further services per subscriber, spread over the rest.
    #[arg(long, default_value_t = 5)]
    extra: usize,
    /// Measured weight changes, one at a time.
    #[arg(long, default_value_t = 50)]
    changes: usize,
    #[arg(long, default_value = "bench/results/operator-scale.json")]
    out: PathBuf,
    #[command(flatten)]
    serve: operator_process::ServeArgs,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(served) = args.serve.serve_if_asked() {
        return served;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(bench(args))
}

fn svc_name(i: usize) -> String {
    format!("svc-{i:04}")
}

fn vs(i: usize, services: usize, weight: i32) -> Value {
    json!({"apiVersion": "networking.weft.dev/v1alpha1", "kind": "VirtualService",
           "metadata": {"name": svc_name(i)},
           "spec": {"hosts": [svc_name(i)], "http": [{"route": [
               {"destination": {"host": svc_name(i)}, "weight": weight},
               {"destination": {"host": svc_name((i + services / 2) % services)}, "weight": 100 - weight}]}]}})
}

/// Runs `f` over `items` with `n` in flight.
async fn each<T, F, Fut>(items: Vec<T>, n: usize, f: F) -> Result<()>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let results: Vec<Result<()>> = stream::iter(items).map(f).buffer_unordered(n).collect().await;
    results.into_iter().collect()
}

/// `GET path` on the operator's admin server: `(status, body)`.
async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    Ok(weft_e2e::http::get(addr, "localhost", path).await?)
}

/// VmRSS and VmHWM in MiB, and CPU seconds (user + system) of a process.
fn usage(pid: u32) -> Result<(f64, f64, f64)> {
    use weft_bench::procfs::{clk_tck, cpu_ticks, status_kib};
    let kib = |field| status_kib(&[pid], field) as f64;
    Ok((kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0, cpu_ticks(&[pid]) as f64 / clk_tck()))
}

/// The first weight of the first route of each hot service in an update.
fn hot_weights(update: &pb::ConfigUpdate, hot: &BTreeSet<String>) -> Vec<(String, u32)> {
    update
        .config
        .iter()
        .flat_map(|c| &c.services)
        .filter_map(|s| {
            let short = s.name.split('.').next()?;
            if !hot.contains(short) {
                return None;
            }
            Some((short.to_owned(), s.http_routes.first()?.route.first()?.weight))
        })
        .collect()
}

async fn bench(args: Args) -> Result<()> {
    ensure!(
        args.hot <= args.virtual_services && args.virtual_services <= args.services,
        "hot <= virtual services <= services"
    );
    let cluster = TestCluster::try_shared().await?;
    let client = cluster.client();
    let namespace = cluster.namespace("bench-operator").await?;
    let ns = namespace.name().to_owned();

    // The objects.
    let started = Instant::now();
    let per = args.endpoints.div_ceil(args.services);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    let vss: Api<VirtualService> = Api::namespaced(client.clone(), &ns);
    each((0..args.services).collect(), 32, |i| {
        let (services, slices) = (services.clone(), slices.clone());
        let endpoints = per.min(args.endpoints.saturating_sub(i * per));
        async move {
            // The test cluster's service range is a /24: past the first 200, services are
            // headless (no virtual IP; routing by name is the same).
            let cluster_ip = if i < 200 { json!(null) } else { json!("None") };
            let svc: Service = serde_json::from_value(json!({"metadata": {"name": svc_name(i)},
                "spec": {"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}))?;
            services.create(&PostParams::default(), &svc).await?;
            let eps: Vec<Value> = (0..endpoints)
                .map(|e| json!({"addresses": [format!("10.{}.{}.{}", 1 + i / 250, i % 250, 1 + e)], "conditions": {"ready": true}}))
                .collect();
            let slice: EndpointSlice = serde_json::from_value(json!({
                "metadata": {"name": svc_name(i), "labels": {"kubernetes.io/service-name": svc_name(i),
                    "endpointslice.kubernetes.io/managed-by": "weft-bench"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps}))?;
            slices.create(&PostParams::default(), &slice).await?;
            Ok(())
        }
    })
    .await?;
    each((0..args.virtual_services).collect(), 32, |i| {
        let vss = vss.clone();
        async move {
            vss.create(&PostParams::default(), &serde_json::from_value(vs(i, args.services, 90))?).await?;
            Ok(())
        }
    })
    .await?;
    eprintln!(
        "created {} services, {} endpoints, {} virtual services in {:.1}s",
        args.services,
        args.endpoints,
        args.virtual_services,
        started.elapsed().as_secs_f64()
    );

    // The operator, in a process of its own.
    let mut operator = operator_process::start(&ns).await?;
    let (pid, grpc, admin, ready) = (operator.pid, operator.grpc, operator.admin, operator.ready_after);
    let (rss_ready, _, cpu_ready) = usage(pid)?;
    eprintln!("operator ready (synced) in {:.2}s, RSS {rss_ready:.1} MiB", ready.as_secs_f64());

    // The subscribers.
    let hot: BTreeSet<String> = (0..args.hot).map(svc_name).collect();
    let (reports, mut seen) = mpsc::unbounded_channel::<(usize, Vec<(String, u32)>, Instant)>();
    // Subscribers identify as a workload of the namespace, with a certificate from the CA the
    // operator made there (the config stream requires one).
    let secrets = kube::Api::namespaced(client.clone(), &ns);
    let signer = weft_operator::ca::authority::read(&secrets, "weft-ca").await?.context("no CA Secret")?;
    let id = weft_identity::SpiffeId::new("cluster.local", &ns, "bench")?;
    let issued = signer.issuer.issue(&id, std::time::SystemTime::now(), Duration::from_secs(3600))?;
    let creds = weft_identity::Credentials::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes())?;
    let tls = weft_identity::tls::control_client_config(&signer.bundle, Some(&creds))?;
    let server_name = format!("weft-operator.{ns}.svc");
    let mut first_updates = Vec::new();
    for s in 0..args.subscribers {
        let channel = weft_proxy::grpc::connect(&grpc.to_string(), &server_name, tls.clone()).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut names: Vec<String> = hot.iter().cloned().collect();
        names.extend(
            (0..args.extra).map(|e| svc_name(args.hot + (s * args.extra + e) % (args.services - args.hot))),
        );
        tx.send(pb::SubscribeRequest {
            node: format!("bench-{s}.{ns}"),
            subscribe: names,
            ..Default::default()
        })?;
        let mut updates = ConfigDiscoveryClient::new(channel)
            .subscribe(UnboundedReceiverStream::new(rx))
            .await?
            .into_inner();
        let first = updates.message().await?.context("no first update")?;
        first_updates.push(first.config.as_ref().map_or(0, |c| c.services.len()));
        let reports = reports.clone();
        let hot = hot.clone();
        tokio::spawn(async move {
            let _keep = tx;
            while let Ok(Some(update)) = updates.message().await {
                if reports.send((s, hot_weights(&update, &hot), Instant::now())).is_err() {
                    return;
                }
            }
        });
    }
    let services_per_subscriber =
        first_updates.iter().sum::<usize>() as f64 / first_updates.len().max(1) as f64;
    let (rss_subscribed, _, _) = usage(pid)?;
    eprintln!(
        "{} subscribers, {services_per_subscriber:.1} services each; operator RSS {rss_subscribed:.1} MiB",
        args.subscribers
    );

    // The changes.
    let cpu_before = usage(pid)?.2;
    let measured_from = Instant::now();
    let mut per_subscriber = Vec::new();
    let mut convergence = Vec::new();
    for c in 0..args.changes {
        let target = svc_name(c % args.hot);
        // A weight never used before for this service (the initial one is 90).
        let weight = 1 + (c as u32 % 80);
        let patch = vs(c % args.hot, args.services, weight as i32);
        let changed = Instant::now();
        vss.patch(&target, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        let mut have: BTreeSet<usize> = BTreeSet::new();
        let deadline = changed + Duration::from_secs(30);
        while have.len() < args.subscribers {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Some((s, weights, at))) = tokio::time::timeout(left, seen.recv()).await else {
                bail!("change {c}: {} of {} subscribers converged within 30 s", have.len(), args.subscribers);
            };
            if at >= changed && weights.iter().any(|(n, w)| *n == target && *w == weight) && have.insert(s) {
                per_subscriber.push(at.duration_since(changed).as_secs_f64());
                if have.len() == args.subscribers {
                    convergence.push(at.duration_since(changed).as_secs_f64());
                }
            }
        }
        // Updates still in flight for this change are drained by the next round's filter.
    }
    let measured = measured_from.elapsed().as_secs_f64();
    let (rss_end, hwm, cpu_after) = usage(pid)?;
    let (_, metrics) = http_get(admin, "/metrics").await?;
    let metric = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("weft_operator_errors") || l.starts_with("weft_operator_status_writes"))
    {
        eprintln!("{line}");
    }
    let resolves = metric("weft_operator_resolve_duration_seconds_count");
    let resolve_mean = metric("weft_operator_resolve_duration_seconds_sum") / resolves;
    let cpu_share = (cpu_after - cpu_before) / measured;
    operator.child.kill().await.ok();

    let each_p = Percentiles::of(&per_subscriber).context("no samples")?;
    let all_p = Percentiles::of(&convergence).context("no samples")?;
    let ms = |s: f64| format!("{:.1}", s * 1e3);
    println!("| measurement | samples | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");
    for (name, p) in [("change to one subscriber", each_p), ("change to every subscriber", all_p)] {
        println!("| {name} | {} | {} | {} | {} | {} |", p.count, ms(p.p50), ms(p.p90), ms(p.p99), ms(p.max));
    }
    println!(
        "\noperator: ready in {:.2} s; RSS {rss_ready:.1} MiB synced, {rss_subscribed:.1} MiB with {} subscribers, \
         {rss_end:.1} MiB after the changes (peak {hwm:.1} MiB); CPU {:.1} s to sync, {:.0}% of a core during the changes; \
         {resolves} resolutions of the whole index, {:.1} ms each on average",
        ready.as_secs_f64(),
        args.subscribers,
        cpu_ready,
        cpu_share * 100.0,
        resolve_mean * 1e3
    );
    let pct =
        |p: Percentiles| json!({"count": p.count, "p50": p.p50, "p90": p.p90, "p99": p.p99, "max": p.max});
    let result = json!({
        "services": args.services, "endpoints": args.endpoints, "virtual_services": args.virtual_services,
        "subscribers": args.subscribers, "services_per_subscriber": services_per_subscriber, "changes": args.changes,
        "per_subscriber_seconds": pct(each_p), "convergence_seconds": pct(all_p),
        "ready_seconds": ready.as_secs_f64(), "cpu_seconds_to_sync": cpu_ready,
        "rss_mib": {"synced": rss_ready, "subscribed": rss_subscribed, "end": rss_end, "peak": hwm},
        "cpu_share_during_changes": cpu_share,
        "resolutions": resolves, "resolve_mean_seconds": resolve_mean,
    });
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&result)?)?;
    eprintln!("raw result: {}", args.out.display());
    Ok(())
}
