//! `cargo xtask images [--no-import]`: the container images of the test node, built from this
//! host's files (see `weft_e2e::images`): Weft's operator, webhook, proxy and demo app (release
//! builds), the pod sandbox (our `e2e/images/pause.c`) and CoreDNS (built with the cluster).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use weft_e2e::{
    cluster, helm,
    images::{self, ImageSet, ImageSpec, NONROOT, PROXY_UID},
};

/// The release binaries behind Weft's images, by component: `weft-<component>`.
const COMPONENTS: [&str; 4] = ["operator", "webhook", "proxy", "demo"];

pub(crate) fn run(no_import: bool) -> Result<()> {
    let set = build_all()?;
    let dir = images::dir()?;
    let values = dir.join("values.yaml");
    fs::write(&values, set.helm_values()).with_context(|| format!("writing {}", values.display()))?;
    for image in set.images() {
        let size = fs::metadata(&image.archive).map(|m| m.len()).unwrap_or(0);
        println!("{:<44} {:>6.1} MB  {}", image.name, size as f64 / 1e6, image.archive.display());
    }
    println!("recorded in {}", dir.join("images.json").display());
    if no_import {
        println!("not imported (--no-import)");
    } else {
        import_all(&set)?;
    }
    println!(
        "\ninstall the chart with these images:\n  helm install weft charts/weft --namespace weft-system \
         --create-namespace -f {}",
        values.display()
    );
    Ok(())
}

/// Imports `set` into the test node's containerd when it runs; says so when it does not.
pub(crate) fn import_all(set: &ImageSet) -> Result<()> {
    let socket = images::containerd_socket(&cluster::Paths::from_env()?);
    if !socket.exists() {
        println!(
            "not imported: no node containerd at {} (`cargo xtask cluster up` imports them when it starts)",
            socket.display()
        );
        return Ok(());
    }
    images::import(&socket, &set.images())?;
    println!("imported into the containerd at {}", socket.display());
    Ok(())
}

/// Builds the six images and records them in `images.json`.
pub(crate) fn build_all() -> Result<ImageSet> {
    crate::packages::ensure(
        "images",
        &[
            ("gcc", "gcc"),
            // libc.a, for the static pause; `command -v` finds a path that exists.
            (&format!("/usr/lib/{}-linux-gnu/libc.a", std::env::consts::ARCH), "libc6-dev"),
            ("xtables-nft-multi", "iptables"),
        ],
    )?;
    let root = crate::codegen::repo_root();
    let app_version = app_version(&helm::chart_dir().join("Chart.yaml"))?;
    let release = build_release(&root)?;
    let dir = images::dir()?;
    let cache = dir.parent().context("the images directory has no parent")?;
    let coredns = coredns_binary(&root, cache)?;
    let coredns_version =
        go_mod_version(&root.join("e2e/cluster/coredns/go.mod"), "github.com/coredns/coredns")?;

    let weft = |component: &str| -> Result<images::Image> {
        let proxy = component == "proxy";
        let spec = ImageSpec {
            component: component.to_owned(),
            version: app_version.clone(),
            binary: release.join(format!("weft-{component}")),
            user: if proxy { PROXY_UID } else { NONROOT },
            iptables: proxy,
        };
        eprintln!("[images] {component}");
        Ok(images::build(&spec, &dir)?)
    };
    let set = ImageSet {
        operator: weft("operator")?,
        webhook: weft("webhook")?,
        proxy: weft("proxy")?,
        demo: weft("demo")?,
        pause: {
            eprintln!("[images] pause");
            images::build_pause(&dir)?
        },
        coredns: {
            eprintln!("[images] coredns");
            let spec = ImageSpec {
                component: "coredns".to_owned(),
                version: coredns_version.trim_start_matches('v').to_owned(),
                binary: coredns,
                user: NONROOT,
                iptables: false,
            };
            images::build(&spec, &dir)?
        },
    };
    set.save(&dir)?;
    Ok(set)
}

/// `cargo build --release` of the four binaries; returns the directory they are in.
fn build_release(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.args(["build", "--release"]).current_dir(root);
    for component in COMPONENTS {
        command.args(["-p", &format!("weft-{component}")]);
    }
    let status = command.status().context("running cargo build")?;
    if !status.success() {
        bail!("building the release binaries failed ({status})");
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    };
    Ok(target.join("release"))
}

/// The chart's `appVersion`.
fn app_version(chart: &Path) -> Result<String> {
    let text = fs::read_to_string(chart).with_context(|| format!("reading {}", chart.display()))?;
    let chart_yaml: serde_yaml::Value =
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", chart.display()))?;
    match chart_yaml.get("appVersion") {
        Some(serde_yaml::Value::String(version)) if !version.is_empty() => Ok(version.clone()),
        _ => bail!("{} has no appVersion", chart.display()),
    }
}

/// CoreDNS from the cluster's bin dir, `<cache>/k8s-<kubernetes version>/bin/coredns`, built by
/// `e2e/cluster/build.sh` (run here when the binary is missing).
fn coredns_binary(root: &Path, cache: &Path) -> Result<PathBuf> {
    let k8s = go_mod_version(&root.join("e2e/cluster/go.mod"), "k8s.io/kubernetes")?;
    let binary = cache.join(format!("k8s-{k8s}/bin/coredns"));
    if binary.is_file() {
        return Ok(binary);
    }
    let script = root.join("e2e/cluster/build.sh");
    eprintln!("[images] {} is missing: running {}", binary.display(), script.display());
    let output = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!("{} failed ({})", script.display(), output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let bin = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    let binary = Path::new(bin).join("coredns");
    if !binary.is_file() {
        bail!("{} did not build {}", script.display(), binary.display());
    }
    Ok(binary)
}

/// The version `go.mod` requires of `module` (`v1.34.4`).
fn go_mod_version(go_mod: &Path, module: &str) -> Result<String> {
    let text = fs::read_to_string(go_mod).with_context(|| format!("reading {}", go_mod.display()))?;
    required_version(&text, module).with_context(|| format!("{} does not require {module}", go_mod.display()))
}

fn required_version(go_mod: &str, module: &str) -> Option<String> {
    go_mod.lines().find_map(|line| {
        let mut words = line.split_whitespace().skip_while(|w| *w == "require");
        (words.next() == Some(module))
            .then(|| words.next())
            .flatten()
            .filter(|version| version.starts_with('v'))
            .map(str::to_owned)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_require_lines_only() {
        let go_mod = "module x\n\nrequire k8s.io/api v0.34.4\n\nrequire (\n\tk8s.io/kubernetes v1.34.4 // indirect\n)\n\
                      replace k8s.io/kubernetes => ./elsewhere\n";
        assert_eq!(required_version(go_mod, "k8s.io/kubernetes").as_deref(), Some("v1.34.4"));
        assert_eq!(required_version(go_mod, "k8s.io/api").as_deref(), Some("v0.34.4"));
        assert_eq!(required_version(go_mod, "k8s.io/client-go"), None);
    }

    #[test]
    fn the_app_version_comes_from_the_chart() {
        let version = app_version(&helm::chart_dir().join("Chart.yaml")).unwrap();
        assert!(version.split('.').count() == 3, "{version}");
    }
}
