//! `cargo xtask bench <which>`: Weft's benchmarks, built in release mode, with what they need
//! started first. Results go to stdout (a Markdown table) and `bench/results/`; BENCHMARKS.md
//! records them with the command, machine and date.

use std::process::Command;

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
}

pub(crate) fn run(bench: Bench) -> Result<()> {
    match bench {
        Bench::Admission { args } => {
            let started = cluster::up()?;
            let result = cargo_run("admission", &args);
            let stopped = if started { cluster::down() } else { Ok(()) };
            result.and(stopped)
        }
    }
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
