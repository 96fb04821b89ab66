//! Admission latency of Weft's injector under concurrent pod creations, against the real
//! kube-apiserver of the test cluster: `cargo xtask bench admission`.
//!
//! The webhook runs in this process, registered by URL (as in the e2e tests). Each round creates
//! `--concurrency` pods at once in a namespace labelled for injection. Two latencies are
//! recorded per pod: inside the webhook (request in to response out: decoding, injection,
//! encoding) and the apiserver round trip of the create (which includes the admission call).
//! The webhook runs on a single worker thread of its own; the apiserver, etcd and the load
//! generator share the machine's other capacity, so run it on a quiet machine.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::{Context, Result, ensure};
use axum::{extract::Request, middleware::Next};
use clap::Parser;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::PostParams};
use serde_json::json;
use weft_bench::Percentiles;
use weft_e2e::{
    TestCluster,
    webhook::{Registration, WebhookServer, enable_injection, is_injected, pod},
};
use weft_inject::InjectConfig;
use weft_webhook::server::{AppState, router};

#[derive(Debug, Parser)]
struct Args {
    /// Pods created at once in each round.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Measured rounds (one more runs first as a warm-up).
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Where to write the raw result (JSON).
    #[arg(long, default_value = "bench/results/admission.json")]
    out: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let cluster = TestCluster::try_shared().await?;
    let client = cluster.client();
    let namespace = cluster.namespace("bench-admission").await?;
    enable_injection(&client, namespace.name()).await?;

    let inside = Arc::new(Mutex::new(Vec::<f64>::new()));
    let recorder = inside.clone();
    let routes = router(AppState::new(InjectConfig::default())).layer(axum::middleware::from_fn(
        move |request: Request, next: Next| {
            let recorder = recorder.clone();
            async move {
                let started = Instant::now();
                let response = next.run(request).await;
                recorder.lock().expect("not poisoned").push(started.elapsed().as_secs_f64());
                response
            }
        },
    ));
    let scratch = std::env::temp_dir().join(format!("weft-bench-admission-{}", std::process::id()));
    // The webhook gets a runtime of its own, as it has a process of its own in a cluster: the
    // load generator's 50 clients must not queue in front of it on the same worker threads.
    let webhook_runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let server =
        webhook_runtime.spawn(async move { WebhookServer::start_with(&scratch, routes).await }).await??;
    let registration =
        Registration::create(&client, namespace.name(), &server, "Fail", &[namespace.name()]).await?;
    registration.wait_until_injecting(namespace.name()).await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace.name());
    let mut round_trips = Vec::new();
    for round in 0..=args.rounds {
        if round == 1 {
            inside.lock().expect("not poisoned").clear();
            round_trips.clear();
        }
        let creates = (0..args.concurrency).map(|i| {
            let pods = pods.clone();
            async move {
                let started = Instant::now();
                let stored =
                    pods.create(&PostParams::default(), &pod(&format!("bench-{round}-{i}"), json!({}))).await;
                (started.elapsed().as_secs_f64(), stored)
            }
        });
        for (seconds, stored) in futures::future::join_all(creates).await {
            let stored = stored.context("a pod create failed")?;
            ensure!(is_injected(&stored), "a pod was stored without injection");
            round_trips.push(seconds);
        }
    }
    registration.delete().await?;
    webhook_runtime.spawn(server.stop()).await?;
    webhook_runtime.shutdown_background();

    let inside = Percentiles::of(&inside.lock().expect("not poisoned")).context("no admissions recorded")?;
    let round_trip = Percentiles::of(&round_trips).context("no creates recorded")?;
    let admissions = args.concurrency * args.rounds;
    ensure!(round_trip.count == admissions, "{} creates measured, {admissions} expected", round_trip.count);
    ensure!(
        inside.count >= admissions,
        "{} admissions seen by the webhook, {admissions} expected",
        inside.count
    );
    let ms = |s: f64| format!("{:.3}", s * 1e3);
    println!(
        "| measurement ({} pods, {} at a time) | p50 ms | p90 ms | p99 ms | max ms |",
        admissions, args.concurrency
    );
    println!("|---|---|---|---|---|");
    for (name, p) in [("inside the webhook", inside), ("apiserver create round trip", round_trip)] {
        println!("| {name} | {} | {} | {} | {} |", ms(p.p50), ms(p.p90), ms(p.p99), ms(p.max));
    }
    let result = json!({
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "errors": 0,
        "webhook_seconds": {"count": inside.count, "p50": inside.p50, "p90": inside.p90, "p99": inside.p99, "max": inside.max},
        "create_round_trip_seconds": {"count": round_trip.count, "p50": round_trip.p50, "p90": round_trip.p90, "p99": round_trip.p99, "max": round_trip.max},
    });
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&result)?)?;
    eprintln!("raw result: {}", args.out.display());
    Ok(())
}
