//! `weftctl`: Weft's command line.

use std::{
    fs,
    io::{self, Read, Write},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use weft_inject::InjectConfig;
use weftctl::{
    check, cluster, explain, identity, inject,
    output::{Format, render},
    proxy_config, stat,
};

#[derive(Debug, Parser)]
#[command(name = "weftctl", version, about = "Weft service mesh command line")]
struct Cli {
    /// Namespace of the pods and workloads named (default: the kubeconfig's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// Output: a table for people, or json/yaml for scripts.
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Add Weft's proxy to the pods of Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets,
    /// Jobs and CronJobs in a multi-document YAML stream, exactly as the webhook would; other
    /// objects pass through. Writes the result to stdout and a report to stderr.
    Inject {
        /// The manifests: a file, or `-` for stdin.
        #[arg(short = 'f', long = "filename", value_name = "FILE|-")]
        file: String,
        /// Injection settings (the webhook's YAML configuration); defaults when absent.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Is the mesh healthy? Each check ✔ or ✘ with its fix; exits non-zero on any ✘. With
    /// `-n`, only that namespace's proxies are checked.
    Check {
        /// The namespace Weft is installed in.
        #[arg(long, default_value = "weft-system")]
        mesh_namespace: String,
    },
    /// Requests per second, success rate and p50/p95/p99 of a workload's traffic, from its
    /// proxies' metrics over a window.
    Stat {
        /// `deploy/NAME` or `svc/NAME`, optionally `NAMESPACE/deploy/NAME`.
        target: String,
        /// How long to watch.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        window: Duration,
    },
    /// The routes, destinations, endpoints and policies a pod's proxy runs now.
    ProxyConfig {
        /// `POD` or `NAMESPACE/POD`.
        pod: String,
    },
    /// The SPIFFE identity of a pod's proxy: issuer, validity, next renewal, trusted roots.
    Identity {
        /// `POD` or `NAMESPACE/POD`.
        pod: String,
    },
    /// Which route, destination and endpoints a request from the pod's app would take, and the
    /// fault, retries, timeout and authorization that apply, decided by the proxy's own code.
    Explain {
        /// `POD` or `NAMESPACE/POD`.
        pod: String,
        /// The URL the app would request, e.g. http://reviews:9080/reviews/1.
        url: String,
        #[arg(short = 'X', long, default_value = "GET")]
        method: http::Method,
        /// A request header, `name: value`; repeatable.
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = number.parse().map_err(|_| format!("{s:?}: expected e.g. 10s or 1m"))?;
    match unit {
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(60 * n)),
        "ms" => Ok(Duration::from_millis(n)),
        _ => Err(format!("{s:?}: expected e.g. 10s or 1m")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    match runtime.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the command; `Ok(false)` when it ran but found a problem (a failed check).
async fn run(cli: Cli) -> Result<bool> {
    let now = SystemTime::now;
    let format = cli.output;
    if let Command::Inject { file, config } = &cli.command {
        let config = InjectConfig::load(config.as_deref())?;
        let input = if file == "-" {
            let mut text = String::new();
            io::stdin().read_to_string(&mut text).context("reading stdin")?;
            text
        } else {
            fs::read_to_string(file).with_context(|| format!("reading {file}"))?
        };
        let (output, outcomes) = inject::inject_stream(&input, &config)?;
        io::stdout().write_all(output.as_bytes())?;
        for outcome in outcomes {
            eprintln!("{}: {}", outcome.object, outcome.result);
        }
        return Ok(true);
    }
    let (client, default_namespace) = cluster::connect().await?;
    let namespace = cli.namespace.clone().unwrap_or(default_namespace);
    let text = match cli.command {
        Command::Inject { .. } => unreachable!("handled above"),
        Command::Check { mesh_namespace } => {
            // Proxies everywhere, unless a namespace was named.
            let scope = cli.namespace.is_some().then_some(namespace.as_str());
            let checks =
                check::run(&client, &check::Install::in_namespace(&mesh_namespace), scope, now()).await;
            print!("{}", render(format, &checks, |c| check::render_table(c)));
            return Ok(checks.iter().all(|c| c.ok));
        }
        Command::Stat { target, window } => {
            let (ns, target) = match target.matches('/').count() {
                2 => target.split_once('/').map(|(n, t)| (n.to_owned(), t.to_owned())).expect("two slashes"),
                _ => (namespace, target),
            };
            let pods = stat::pods(&client, &ns, &target).await?;
            eprintln!("watching {} pod(s) of {ns}/{target} for {window:?}...", pods.len());
            let before = stat::scrape(&client, &ns, &pods).await?;
            let started = tokio::time::Instant::now();
            tokio::time::sleep(window).await;
            let after = stat::scrape(&client, &ns, &pods).await?;
            let rows = stat::rows(&before, &after, started.elapsed());
            render(format, &rows, |r| stat::render_table(r))
        }
        Command::ProxyConfig { pod } => {
            let (ns, pod) = cluster::split_name(&pod, &namespace);
            let running = proxy_config::fetch(&client, ns, pod).await?;
            render(format, &running.served, |_| proxy_config::render_table(&running, now()))
        }
        Command::Identity { pod } => {
            let (ns, pod) = cluster::split_name(&pod, &namespace);
            let report = identity::fetch(&client, ns, pod).await?;
            render(format, &report, |r| identity::render_table(r, now()))
        }
        Command::Explain { pod, url, method, headers } => {
            let (ns, pod) = cluster::split_name(&pod, &namespace);
            let headers = explain::parse_headers(&headers)?;
            let explained = explain::run(&client, ns, pod, &method, &url, &headers).await?;
            render(format, &explained, |e| explain::render_table(e, now()))
        }
    };
    print!("{text}");
    Ok(true)
}
