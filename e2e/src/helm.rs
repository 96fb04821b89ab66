//! The test cluster's helm (built with the cluster's binaries), run against the test cluster.

use std::{path::PathBuf, process::Command};

use serde::Deserialize;
use serde_json::Value;

use crate::cluster::{self, Error};

/// The chart in this repository.
pub fn chart_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/weft")
}

/// Runs `helm <args>` with the test cluster's kubeconfig and a scratch helm home; returns stdout.
pub fn run(args: &[&str]) -> Result<String, Error> {
    let env = cluster::env()?;
    let home = std::env::temp_dir().join("weft-e2e-helm");
    let output = Command::new(env.bin_dir.join("helm"))
        .args(args)
        .env("KUBECONFIG", &env.kubeconfig)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .output()
        .map_err(|source| Error::io("running helm", source))?;
    if !output.status.success() {
        return Err(Error::Helm {
            args: args.join(" "),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The objects of a YAML stream (`helm template` or `helm get manifest` output).
pub fn documents(yaml: &str) -> Result<Vec<Value>, Error> {
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(yaml) {
        let value = Value::deserialize(document)
            .map_err(|e| Error::Helm { args: "(parsing its output)".into(), output: e.to_string() })?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    Ok(documents)
}

/// `helm template` of this repository's chart with `args` (e.g. `--set k=v`), as objects.
pub fn render(release_namespace: &str, args: &[&str]) -> Result<Vec<Value>, Error> {
    let chart = chart_dir();
    let chart = chart.to_string_lossy();
    let mut all = vec!["template", "weft", chart.as_ref(), "--namespace", release_namespace];
    all.extend_from_slice(args);
    documents(&run(&all)?)
}
