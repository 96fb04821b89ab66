//! `cargo xtask test [cargo test args]`: start the test cluster, run every test against it,
//! and stop it again whatever the tests did.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cluster;

pub(crate) fn run(cargo_args: &[String]) -> Result<()> {
    // `up` builds the binaries when they are missing, so this works on a fresh machine.
    cluster::up().context("starting the test cluster")?;
    let tests = run_tests(cargo_args);
    // Always stop the cluster, even when the tests failed or could not start.
    let stopped = cluster::down().context("stopping the test cluster");
    let status = tests?;
    stopped?;
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    Ok(())
}

fn run_tests(cargo_args: &[String]) -> Result<std::process::ExitStatus> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("[test] cargo test --workspace {}", cargo_args.join(" "));
    Command::new(cargo).args(["test", "--workspace"]).args(cargo_args).status().context("running cargo test")
}
