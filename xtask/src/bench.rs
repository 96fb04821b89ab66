//! `cargo xtask bench <which>`: Weft's benchmarks, built in release mode, with what they need
//! started first. Results go to stdout (a Markdown table) and `bench/results/`; BENCHMARKS.md
//! records them with the command, machine and date.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use crate::cluster;

#[derive(Debug, Subcommand)]
pub(crate) enum Bench {
    /// Admission latency of the sidecar injector under concurrent pod creations, through the
    /// test cluster's kube-apiserver (started if needed).
    Admission {
        /// Passed to the benchmark (`--concurrency N`, `--rounds N`, `--out FILE`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The proxy side by side with direct, HAProxy and nginx on this machine: latency at a fixed
    /// rate, throughput per core, CPU and memory, mTLS handshakes (M0-M5 of issue 7). Installs
    /// what it needs first (Debian haproxy, nginx-light, wrk, nghttp2-client; oha from crates.io
    /// into ~/.cache/weft) and builds weft-proxy in release mode.
    Proxy {
        /// Passed to the benchmark (`--quick`, `--rounds N`, `--seconds N`, `--out FILE`, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The operator at scale (1,000 Services, 5,000 endpoints, 100 VirtualServices, 200 proxy
    /// subscriptions): time from a CRD change to every subscriber, RSS and CPU, through the test
    /// cluster's kube-apiserver (started if needed).
    Operator {
        /// Passed to the benchmark (see `cargo run -p weft-bench --bin operator-scale -- --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The mesh CA: 200 proxies asking for their certificate at once through the real
    /// TokenReview, several rounds; time to a certificate, the operator's CPU and RSS.
    Ca {
        /// Passed to the benchmark (`--proxies N`, `--rounds N`, `--out FILE`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Commands the proxy benchmark runs, and the Debian package that provides each.
const PROXY_TOOLS: [(&str, &str); 5] = [
    ("haproxy", "haproxy"),
    ("nginx", "nginx-light"),
    ("wrk", "wrk"),
    ("h2load", "nghttp2-client"),
    ("taskset", "util-linux"),
];

/// The fixed-rate load generator (open loop, coordinated-omission correction, HTTP/2).
const OHA_VERSION: &str = "1.16.0";

pub(crate) fn run(bench: Bench) -> Result<()> {
    match bench {
        Bench::Admission { args } => cluster::with_cluster(|| cargo_run("admission", &args)),
        Bench::Operator { args } => cluster::with_cluster(|| cargo_run("operator-scale", &args)),
        Bench::Ca { args } => cluster::with_cluster(|| cargo_run("ca", &args)),
        Bench::Proxy { args } => {
            crate::packages::ensure("bench", &PROXY_TOOLS)?;
            let oha = install_oha()?;
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let root = crate::codegen::repo_root();
            let status = Command::new(cargo)
                .args(["build", "--quiet", "--release", "--package", "weft-proxy"])
                .current_dir(&root)
                .status()
                .context("running cargo build")?;
            if !status.success() {
                bail!("building weft-proxy failed ({status})");
            }
            let mut all = vec![
                "--oha".to_owned(),
                oha.display().to_string(),
                "--weft-proxy".to_owned(),
                root.join("target/release/weft-proxy").display().to_string(),
            ];
            all.extend(args);
            cargo_run("proxy", &all)
        }
    }
}

/// oha from crates.io, built once into `~/.cache/weft/oha-VERSION` (about 8 minutes on 2 cores).
fn install_oha() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let root = PathBuf::from(home).join(format!(".cache/weft/oha-{OHA_VERSION}"));
    let bin = root.join("bin/oha");
    if bin.exists() {
        return Ok(bin);
    }
    eprintln!("[bench] building oha {OHA_VERSION} into {} (once)", root.display());
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["install", "--quiet", "--locked", "oha", "--version", OHA_VERSION, "--root"])
        .arg(&root)
        .status()
        .context("running cargo install oha")?;
    if !status.success() {
        bail!("cargo install oha {OHA_VERSION} failed ({status})");
    }
    Ok(bin)
}

fn cargo_run(bin: &str, args: &[String]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["run", "--quiet", "--release", "--package", "weft-bench", "--bin", bin, "--"])
        .args(args)
        .current_dir(crate::codegen::repo_root())
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("benchmark {bin} failed ({status})");
    }
    Ok(())
}
