//! `cargo xtask codegen [--check]`: the CRD manifests, generated from the weft-api types.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

/// Directories that hold generated CRDs, relative to the repository root.
const OUTPUT_DIRS: [&str; 2] = ["crds", "charts/weft/templates/crds"];

pub(crate) fn run(check: bool) -> Result<()> {
    let root = repo_root();
    let manifests = weft_api::crd_manifests();
    let mut stale = Vec::new();
    for dir in OUTPUT_DIRS.map(|dir| root.join(dir)) {
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let wanted: BTreeSet<&str> = manifests.iter().map(|m| m.file_name.as_str()).collect();
        for manifest in &manifests {
            let path = dir.join(&manifest.file_name);
            let current = fs::read_to_string(&path).unwrap_or_default();
            if current == manifest.yaml {
                continue;
            }
            if check {
                stale.push(path);
            } else {
                fs::write(&path, &manifest.yaml).with_context(|| format!("writing {}", path.display()))?;
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
        println!("codegen: {} CRDs up to date in {}", manifests.len(), OUTPUT_DIRS.join(" and "));
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
