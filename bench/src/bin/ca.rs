//! Certificate issuance by the mesh CA at pod-start scale, against the real kube-apiserver of the
//! test cluster: `cargo xtask bench ca` (or `cargo run --release -p weft-bench --bin ca` with the
//! cluster up).
//!
//! Makes `--proxies` ServiceAccounts and pods (pinned to a node that does not exist, so they are
//! API objects only) and a bound token for each, then `--rounds` times lets every proxy ask for
//! its certificate at once with the proxy's own client (`weft_proxy::certify::certify`: key,
//! request, TLS to the operator, TokenReview and pod read on the operator's side, signing).
//! The operator runs as a child process of its own (this binary with `--serve`), so its CPU and
//! RSS are its alone; both are read after every round, so growth per issued certificate shows.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::Parser;
use futures::{StreamExt as _, stream};
use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{Pod, ServiceAccount},
};
use kube::{Api, api::PostParams};
use serde_json::json;
use weft_bench::{Percentiles, operator_process, procfs};
use weft_e2e::TestCluster;
use weft_identity::TrustBundle;
use weft_proxy::certify::{self, CaClient};

#[derive(Debug, Parser)]
struct Args {
    /// Proxies asking at once.
    #[arg(long, default_value_t = 200)]
    proxies: usize,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    #[arg(long, default_value = "bench/results/ca.json")]
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

async fn bench(args: Args) -> Result<()> {
    let cluster = TestCluster::try_shared().await?;
    let client = cluster.client();
    let namespace = cluster.namespace("bench-ca").await?;
    let ns = namespace.name().to_owned();
    let dir = std::env::temp_dir().join(format!("weft-bench-ca-{ns}"));
    std::fs::create_dir_all(&dir)?;

    // The workloads: API objects only.
    let started = Instant::now();
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let tokens: Vec<(String, String)> = stream::iter(0..args.proxies)
        .map(|i| {
            let (sas, pods) = (sas.clone(), pods.clone());
            async move {
                let sa = format!("proxy-{i}");
                sas.create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": sa}}))?,
                )
                .await?;
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": format!("{sa}-0")},
                    "spec": {"serviceAccountName": sa, "automountServiceAccountToken": false,
                             "nodeName": "weft-bench-nowhere",
                             "containers": [{"name": "app", "image": "weft.local/none:0"}]}}))?;
                let pod = pods.create(&PostParams::default(), &pod).await?;
                let request = TokenRequest {
                    spec: TokenRequestSpec {
                        audiences: vec!["weft-ca".into()],
                        expiration_seconds: Some(3600),
                        bound_object_ref: Some(BoundObjectReference {
                            api_version: Some("v1".into()),
                            kind: Some("Pod".into()),
                            name: pod.metadata.name.clone(),
                            uid: pod.metadata.uid.clone(),
                        }),
                    },
                    ..TokenRequest::default()
                };
                let issued = sas.create_token_request(&sa, &PostParams::default(), &request).await?;
                let token = issued.status.map(|s| s.token).context("no token")?;
                Ok::<_, anyhow::Error>((sa, token))
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    eprintln!(
        "{} service accounts, pods and tokens in {:.1}s",
        args.proxies,
        started.elapsed().as_secs_f64()
    );

    // The operator, in a process of its own.
    let mut operator = operator_process::start(&ns).await?;
    let (pid, grpc) = (operator.pid, operator.grpc);
    let secrets = Api::namespaced(client.clone(), &ns);
    let signer = weft_operator::ca::authority::read(&secrets, "weft-ca").await?.context("no CA Secret")?;
    let bundle_file = dir.join("ca.crt");
    std::fs::write(&bundle_file, &signer.bundle_pem)?;
    let bundle = Arc::new(TrustBundle::from_pem(signer.bundle_pem.as_bytes())?);
    let settings: Vec<CaClient> = tokens
        .iter()
        .map(|(sa, token)| {
            let token_file = dir.join(format!("{sa}.token"));
            std::fs::write(&token_file, token)?;
            Ok(CaClient {
                addr: grpc.to_string(),
                server_name: format!("weft-operator.{ns}.svc"),
                token_file,
                trust_bundle_file: bundle_file.clone(),
                expected: None,
                poll: Duration::from_secs(1),
                backoff_min: Duration::from_millis(200),
                backoff_max: Duration::from_secs(30),
            })
        })
        .collect::<Result<_>>()?;

    let hz = procfs::clk_tck();
    let rss0 = procfs::status_kib(&[pid], "VmRSS:");
    let mut cpu = procfs::cpu_ticks(&[pid]);
    println!(
        "| round | certificates | failed | p50 ms | p90 ms | p99 ms | max ms | wall s | operator CPU s | operator RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        let wall = Instant::now();
        let results: Vec<Result<f64>> = stream::iter(settings.iter().cloned())
            .map(|s| {
                let bundle = bundle.clone();
                tokio::spawn(async move {
                    let asked = Instant::now();
                    certify::certify(&s, &bundle).await?;
                    Ok::<_, anyhow::Error>(asked.elapsed().as_secs_f64() * 1000.0)
                })
            })
            .buffer_unordered(args.proxies)
            .map(|joined| joined.map_err(anyhow::Error::from).and_then(|r| r))
            .collect()
            .await;
        let wall = wall.elapsed().as_secs_f64();
        let failed = results.iter().filter(|r| r.is_err()).count();
        if let Some(Err(error)) = results.iter().find(|r| r.is_err()) {
            eprintln!("round {round}: e.g. {error}");
        }
        let ms: Vec<f64> = results.into_iter().filter_map(Result::ok).collect();
        let p = Percentiles::of(&ms).context("no certificate issued")?;
        let now_cpu = procfs::cpu_ticks(&[pid]);
        let cpu_s = (now_cpu - cpu) as f64 / hz;
        cpu = now_cpu;
        let rss = procfs::status_kib(&[pid], "VmRSS:") as f64 / 1024.0;
        println!(
            "| {round} | {} | {failed} | {:.1} | {:.1} | {:.1} | {:.1} | {wall:.2} | {cpu_s:.2} | {rss:.1} |",
            p.count, p.p50, p.p90, p.p99, p.max
        );
        rounds.push(json!({"round": round, "issued": p.count, "failed": failed, "p50_ms": p.p50, "p90_ms": p.p90,
            "p99_ms": p.p99, "max_ms": p.max, "wall_s": wall, "operator_cpu_s": cpu_s, "operator_rss_mib": rss}));
    }
    println!("operator RSS before the first round: {:.1} MiB", rss0 as f64 / 1024.0);
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(
        &args.out,
        serde_json::to_string_pretty(
            &json!({"proxies": args.proxies, "rss_before_mib": rss0 as f64 / 1024.0, "rounds": rounds}),
        )?,
    )?;
    operator.child.kill().await?;
    Ok(())
}
