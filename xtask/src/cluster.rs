//! `cargo xtask cluster up|down|status|env`: the local Kubernetes control plane
//! (see `e2e/README.md`).

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;
use weft_e2e::cluster::{self, Down, Stopped, Up};

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Start the control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler)
    /// and one real node (containerd, kubelet, kube-proxy in a network namespace, CoreDNS on
    /// it), building and installing what is missing first, and install the CRDs. Does nothing
    /// if already running.
    Up,
    /// Stop the cluster's processes, remove the node (containers, mounts, network namespace,
    /// cgroups) and the cluster's state (logs are kept).
    Down,
    /// Show each component, the node's Ready condition and pods that do not run. Exits 1 when
    /// not ready.
    Status,
    /// Print shell exports for the cluster (KUBECONFIG; kubectl and helm on PATH):
    /// `eval "$(cargo xtask cluster env)"`.
    Env,
}

pub(crate) fn run(command: Command) -> Result<()> {
    match command {
        Command::Up => up().map(drop),
        Command::Down => down(),
        Command::Status => {
            let status = cluster::status()?;
            print!("{status}");
            if !status.is_ready() {
                bail!("the test cluster is not ready");
            }
            Ok(())
        }
        Command::Env => {
            print!("{}", cluster::env()?.shell_exports());
            Ok(())
        }
    }
}

/// Starts the cluster and tells where everything is. Returns whether this call started it
/// (false when it was already running).
pub(crate) fn up() -> Result<bool> {
    let paths = cluster::Paths::from_env()?;
    crate::packages::ensure("cluster", weft_e2e::node::PACKAGES)?;
    let started = match cluster::up()? {
        Up::Started { state, elapsed } => {
            eprintln!(
                "[cluster] ready in {:.1}s: kube-apiserver at {}",
                elapsed.as_secs_f64(),
                state.apiserver_url()
            );
            true
        }
        Up::AlreadyRunning { state } => {
            eprintln!(
                "[cluster] already running: kube-apiserver at {} (CRDs brought up to date)",
                state.apiserver_url()
            );
            false
        }
    };
    eprintln!("[cluster] kubeconfig: {}", paths.kubeconfig().display());
    eprintln!("[cluster] logs:       {}", paths.logs().display());
    eprintln!("[cluster] use it from a shell with: eval \"$(cargo xtask cluster env)\"");
    Ok(started)
}

/// Runs `f` against the test cluster: starts it first (building the binaries if missing) and,
/// if it was not already running, stops it after, even when `f` failed. `f`'s error comes first.
pub(crate) fn with_cluster<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    let started = up().context("starting the test cluster")?;
    let result = f();
    let stopped = if started { down().context("stopping the test cluster") } else { Ok(()) };
    let value = result?;
    stopped?;
    Ok(value)
}

/// Stops the cluster, saying what was stopped.
pub(crate) fn down() -> Result<()> {
    match cluster::down()? {
        Down::NotRunning => eprintln!("[cluster] not running; nothing to stop"),
        Down::Stopped(stopped, cleaned) => {
            if !cleaned.is_empty() {
                eprintln!("[cluster] removed the node: {cleaned}");
            }
            let mut stuck = Vec::new();
            for (name, how) in stopped {
                match how {
                    Stopped::Terminated => eprintln!("[cluster] stopped {name}"),
                    Stopped::Killed => eprintln!("[cluster] killed {name} (it ignored SIGTERM)"),
                    Stopped::NotRunning => eprintln!("[cluster] {name} was not running"),
                    Stopped::StillRunning => stuck.push(name),
                }
            }
            if !stuck.is_empty() {
                bail!("still running after SIGKILL: {}", stuck.join(", "));
            }
        }
    }
    Ok(())
}
