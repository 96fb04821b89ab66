//! `cargo xtask codegen [--check]`: the CRD manifests, generated from the weft-api types.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

/// Where generated CRDs go, relative to the repository root, and how each copy is wrapped.
const OUTPUTS: [(&str, Wrap); 2] = [("crds", Wrap::None), ("charts/weft/templates/crds", Wrap::ChartToggle)];

#[derive(Clone, Copy)]
enum Wrap {
    None,
    /// Rendered only when the chart's `crds.install` value is true.
    ChartToggle,
}

impl Wrap {
    fn apply(self, yaml: &str) -> String {
        match self {
            Wrap::None => yaml.to_owned(),
            Wrap::ChartToggle => format!("{{{{- if .Values.crds.install }}}}\n{yaml}{{{{- end }}}}\n"),
        }
    }
}

pub(crate) fn run(check: bool) -> Result<()> {
    let root = repo_root();
    let manifests = weft_api::crd_manifests();
    let mut stale = Vec::new();
    for (dir, wrap) in OUTPUTS.map(|(dir, wrap)| (root.join(dir), wrap)) {
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let wanted: BTreeSet<&str> = manifests.iter().map(|m| m.file_name.as_str()).collect();
        for manifest in &manifests {
            let path = dir.join(&manifest.file_name);
            let wanted = wrap.apply(&manifest.yaml);
            if fs::read_to_string(&path).is_ok_and(|current| current == wanted) {
                continue;
            }
            if check {
                stale.push(path);
            } else {
                fs::write(&path, &wanted).with_context(|| format!("writing {}", path.display()))?;
                println!("wrote {}", relative(&root, &path));
            }
        }
        for leftover in yaml_files(&dir)?.into_iter().filter(|p| !wanted.contains(file_name(p))) {
            if check {
                stale.push(leftover);
            } else {
                fs::remove_file(&leftover).with_context(|| format!("removing {}", leftover.display()))?;
                println!("removed {}", relative(&root, &leftover));
            }
        }
    }
    if !stale.is_empty() {
        let list: Vec<String> = stale.iter().map(|p| relative(&root, p)).collect();
        bail!(
            "generated files are stale: {}\nrun `cargo xtask codegen` and commit the result",
            list.join(", ")
        );
    }
    if check {
        let dirs: Vec<&str> = OUTPUTS.iter().map(|(dir, _)| *dir).collect();
        println!("codegen: {} CRDs up to date in {}", manifests.len(), dirs.join(" and "));
    }
    Ok(())
}

fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "yaml") {
            files.push(path);
        }
    }
    Ok(files)
}

fn file_name(path: &Path) -> &str {
    path.file_name().and_then(|n| n.to_str()).unwrap_or_default()
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root).unwrap_or(path).display().to_string()
}

/// The workspace root: xtask lives one level below it.
pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is inside the workspace").to_path_buf()
}
