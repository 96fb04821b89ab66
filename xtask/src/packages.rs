//! Debian packages that tests and benchmarks need, installed on first use: a fresh machine has
//! none of them, and nothing is installed by hand.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Installs, with apt-get, the package of every `(command, package)` whose command is missing.
/// `why` names the task in the message.
pub(crate) fn ensure(why: &str, tools: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|(tool, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(_, package)| *package)
        .collect();
    // One package may provide several of the tools.
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("[{why}] installing Debian packages: {}", missing.join(" "));
    let apt = |args: &[&str]| -> Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !status.success() {
            bail!("apt-get {} failed ({status}); install {} by hand", args.join(" "), missing.join(" "));
        }
        Ok(())
    };
    apt(&["update", "-qq"])?;
    apt(&[&["install", "-y", "-qq", "--no-install-recommends"][..], &missing].concat())
}
