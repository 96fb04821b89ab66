//! h2spec, the HTTP/2 conformance checker that proxy/tests/proxy/h2spec.rs runs against the
//! proxy's h2c listeners: built once from xtask/tools/h2spec/go.mod (the version and its
//! dependencies pinned there) into `~/.cache/weft/h2spec-VERSION/h2spec` (`$WEFT_CACHE` instead
//! of `~/.cache/weft` when set). `cargo xtask test` installs it first; `cargo xtask h2spec`
//! installs it alone.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

/// Must match xtask/tools/h2spec/go.mod and proxy/tests/proxy/h2spec.rs.
pub(crate) const VERSION: &str = "v2.2.1";

/// Where the test looks for it.
pub(crate) fn path() -> Result<PathBuf> {
    let cache = match std::env::var_os("WEFT_CACHE") {
        Some(cache) => PathBuf::from(cache),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cache/weft"),
    };
    Ok(cache.join(format!("h2spec-{VERSION}/h2spec")))
}

/// Builds h2spec unless it is there already (about 30 s on 2 cores, plus the module downloads).
pub(crate) fn install() -> Result<PathBuf> {
    let bin = path()?;
    if bin.is_file() {
        return Ok(bin);
    }
    let dir = bin.parent().context("h2spec's directory")?;
    eprintln!("[h2spec] building h2spec {VERSION} into {} (once)", dir.display());
    let status = Command::new("go")
        .args(["install", "tool"])
        .current_dir(crate::codegen::repo_root().join("xtask/tools/h2spec"))
        .env("GOBIN", dir)
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=readonly -buildvcs=false")
        .env("CGO_ENABLED", "0")
        .status()
        .context("running go (h2spec is a Go program; Go must be on PATH)")?;
    if !status.success() || !bin.is_file() {
        bail!("go install of h2spec {VERSION} failed ({status})");
    }
    Ok(bin)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_pinned_version_is_the_one_go_mod_requires() {
        let go_mod = include_str!("../tools/h2spec/go.mod");
        let pinned = format!("github.com/summerwind/h2spec {}+incompatible", super::VERSION);
        assert!(go_mod.contains(&pinned), "xtask/tools/h2spec/go.mod does not require {pinned}");
        let test = include_str!("../../proxy/tests/proxy/h2spec.rs");
        let expected = format!("const H2SPEC_VERSION: &str = \"{}\";", super::VERSION);
        assert!(test.contains(&expected), "proxy/tests/proxy/h2spec.rs does not say {expected}");
    }
}
