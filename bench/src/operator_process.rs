//! The operator as a child process of a benchmark, so its CPU and RSS are its alone: the
//! benchmark binary runs itself with `--serve ADDR --serve-admin ADDR --serve-namespace NS`
//! (hidden flags every operator benchmark has: [`ServeArgs`]).

use std::{
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use weft_e2e::TestCluster;

/// The hidden flags that make a benchmark binary the operator child (`#[command(flatten)]`).
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Internal: run the operator (the child process).
    #[arg(long, hide = true)]
    serve: Option<SocketAddr>,
    #[arg(long, hide = true)]
    serve_admin: Option<SocketAddr>,
    #[arg(long, hide = true)]
    serve_namespace: Option<String>,
}

impl ServeArgs {
    /// When these flags are given, runs the operator until killed and returns its outcome;
    /// `None`: this process is the benchmark.
    pub fn serve_if_asked(&self) -> Option<Result<()>> {
        match (self.serve, self.serve_admin, self.serve_namespace.clone()) {
            (Some(grpc), Some(admin), Some(ns)) => Some(serve(grpc, admin, ns)),
            _ => None,
        }
    }
}

/// A running operator child.
#[derive(Debug)]
pub struct OperatorProcess {
    pub child: tokio::process::Child,
    pub pid: u32,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    /// From spawn to `/ready`.
    pub ready_after: Duration,
}

fn free_port() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Starts this binary as the operator for namespace `ns` and waits (at most 120 s) for `/ready`.
pub async fn start(ns: &str) -> Result<OperatorProcess> {
    let (grpc, admin) = (free_port()?, free_port()?);
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--serve", &grpc.to_string(), "--serve-admin", &admin.to_string(), "--serve-namespace", ns])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the operator")?;
    let pid = child.id().context("the operator has no pid")?;
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the operator exited: {status}");
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the operator was not ready within 120 s");
        }
        if weft_e2e::http::get(admin, "localhost", "/ready").await.is_ok_and(|(status, _)| status == 200) {
            return Ok(OperatorProcess { child, pid, grpc, admin, ready_after: started.elapsed() });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The child's side: the operator for `namespace` (its CA Secret there, watching only it) on a
/// runtime of 2 workers, as a deployment would give it, until killed.
fn serve(grpc: SocketAddr, admin: SocketAddr, namespace: String) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let cluster = TestCluster::try_shared().await?;
        let mut config = weft_operator::Config::for_tests(&namespace);
        config.watch_namespace = Some(namespace);
        config.grpc_addr = grpc;
        config.admin_addr = admin;
        let handle = weft_operator::start(cluster.client(), config).await?;
        std::future::pending::<()>().await;
        drop(handle);
        Ok(())
    })
}
