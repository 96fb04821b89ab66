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
    mesh,
};

/// The release binaries behind Weft's images, by component: `weft-<component>`.
const COMPONENTS: [&str; 4] = ["operator", "webhook", "proxy", "demo"];

pub(crate) fn run(no_import: bool) -> Result<()> {
    let set = build_all()?;
    let dir = images::dir()?;
    let values = mesh::values_file(&set)?;
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
        "\ninstall the chart with these images (the local cluster has the CRDs already):\n  \
         helm install weft charts/weft --namespace weft-system --create-namespace -f {} --set crds.install=false",
        values.display()
    );
    Ok(())
}

/// Imports `set` into the test node's containerd when it runs; says so when it does not.
pub(crate) fn import_all(set: &ImageSet) -> Result<()> {
    let socket = cluster::Paths::from_env()?.node().containerd_socket();
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
    // The cluster's binaries (CoreDNS among them), built by e2e/cluster/build.sh if missing.
    let bin_dir = cluster::build_binaries()?;

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
            images::build_coredns(&bin_dir, &dir)?
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The images built here and the Dockerfiles users build elsewhere describe the same
    /// thing: the binary at `/usr/local/bin/weft-<component>` as the entrypoint, run as the
    /// same user.
    #[test]
    fn each_dockerfile_runs_the_same_binary_as_the_same_user() {
        let root = crate::codegen::repo_root();
        for component in COMPONENTS {
            let dir = if component == "demo" { "examples/demo".to_owned() } else { component.to_owned() };
            let path = root.join(dir).join("Dockerfile");
            let dockerfile = fs::read_to_string(&path).unwrap();
            let uid = if component == "proxy" { PROXY_UID } else { NONROOT };
            let binary = format!("/usr/local/bin/weft-{component}");
            assert!(
                dockerfile.contains(&format!("USER {uid}:{uid}")),
                "{} does not run as {uid}",
                path.display()
            );
            assert!(
                dockerfile.contains(&format!("ENTRYPOINT [\"{binary}\"]")),
                "{} does not run {binary}",
                path.display()
            );
            assert!(
                dockerfile.contains(&format!("-p weft-{component}")),
                "{} builds another package",
                path.display()
            );
        }
    }

    #[test]
    fn the_app_version_comes_from_the_chart() {
        let version = app_version(&helm::chart_dir().join("Chart.yaml")).unwrap();
        assert!(version.split('.').count() == 3, "{version}");
    }
}
