//! `cargo xtask test [cargo test args]`: start the test cluster (control plane and node),
//! build Weft's images and import them into the node, run every test against it, and stop it
//! again whatever the tests did. A cluster that was already running (started by hand with
//! `cargo xtask cluster up`) is left running.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::cluster;

/// Commands the tests run, and the Debian package that provides each: the proxy's redirect
/// test drives real iptables in a network namespace it creates.
const SYSTEM_TOOLS: [(&str, &str); 1] = [("iptables", "iptables")];

pub(crate) fn run(cargo_args: &[String]) -> Result<()> {
    crate::packages::ensure("test", &SYSTEM_TOOLS)?;
    // The proxy's HTTP/2 conformance test runs it (proxy/tests/proxy/h2spec.rs).
    crate::h2spec::install()?;
    // `up` builds the binaries when they are missing, so this works on a fresh machine; the
    // tests on the node (e2e/tests/mesh.rs) run the images built here.
    let (status, totals) = cluster::with_cluster(|| {
        crate::images::run(false)?;
        run_tests(cargo_args)
    })?;
    // Last, after the cluster's own messages: the total over every test binary.
    println!("\ntests: {} passed, {} failed, {} skipped", totals.passed, totals.failed, totals.ignored);
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    Ok(())
}

fn run_tests(cargo_args: &[String]) -> Result<(std::process::ExitStatus, Totals)> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut args = vec!["test".to_owned()];
    // `--workspace` would override a `-p`, so it is only the default.
    if !selects_packages(cargo_args) {
        args.push("--workspace".to_owned());
    }
    // Every test binary runs even after one fails, so the total counts them all.
    if !cargo_args.iter().take_while(|a| *a != "--").any(|a| a == "--no-fail-fast") {
        args.push("--no-fail-fast".to_owned());
    }
    args.extend(cargo_args.iter().cloned());
    eprintln!("[test] cargo {}", args.join(" "));
    let mut child =
        Command::new(cargo).args(&args).stdout(Stdio::piped()).spawn().context("running cargo test")?;
    // Pass the output through and add up every test binary's result line, so the run ends with
    // one total (the last binary is often a doc-test run of 0 tests).
    let mut totals = Totals::default();
    let stdout = child.stdout.take().context("cargo test's stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        totals.add(&line);
    }
    let status = child.wait().context("waiting for cargo test")?;
    Ok((status, totals))
}

/// Sums of cargo's `test result: ok. 3 passed; 0 failed; 1 ignored; ...` lines.
#[derive(Debug, Default, PartialEq, Eq)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    fn add(&mut self, line: &str) {
        let Some(result) = line.strip_prefix("test result: ") else { return };
        for part in result.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(kind), Some(count)) = (words.next(), words.next()) else { continue };
            let Ok(count) = count.parse::<u64>() else { continue };
            match kind {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }
}

/// Whether cargo's own arguments (those before a `--`) choose packages.
fn selects_packages(cargo_args: &[String]) -> bool {
    cargo_args
        .iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "--workspace" || a == "--all" || a.starts_with("-p") || a.starts_with("--package"))
}

#[cfg(test)]
mod tests {
    use super::{Totals, selects_packages};

    #[test]
    fn totals_add_up_result_lines_and_ignore_the_rest() {
        let mut totals = Totals::default();
        for line in [
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.02s",
            "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s",
            "test something ... ok",
            "running 3 tests",
        ] {
            totals.add(line);
        }
        assert_eq!(totals, Totals { passed: 5, failed: 1, ignored: 1 });
    }

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn package_selection_is_seen_only_before_the_separator() {
        assert!(!selects_packages(&args(&[])));
        assert!(!selects_packages(&args(&["--", "-p"])));
        assert!(selects_packages(&args(&["-p", "weft-e2e"])));
        assert!(selects_packages(&args(&["-pweft-e2e"])));
        assert!(selects_packages(&args(&["--package=weft-e2e", "--", "--nocapture"])));
        assert!(!selects_packages(&args(&["--release", "some_test_name"])));
    }
}
