//! `weftctl inject -f FILE|-`: the webhook's injection applied offline to a YAML stream.

use std::{
    io::Write,
    path::PathBuf,
    process::{Command, Stdio},
};

use serde::Deserialize;
use serde_json::Value;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/workloads.yaml")
}

fn weftctl(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weftctl"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml).map(|d| Value::deserialize(d).unwrap()).collect()
}

fn init_names(template: &Value) -> Vec<&str> {
    template["spec"]["initContainers"]
        .as_array()
        .map(|c| c.iter().map(|c| c["name"].as_str().unwrap()).collect())
        .unwrap_or_default()
}

#[test]
fn injects_every_workload_kind_and_passes_other_objects_through() {
    let (ok, stdout, stderr) = weftctl(&["inject", "-f", fixture().to_str().unwrap()], None);
    assert!(ok, "{stderr}");
    let docs = documents(&stdout);
    assert_eq!(docs.len(), 9, "one output document per input document");
    let template = |doc: &Value, path: &[&str]| path.iter().fold(doc.clone(), |v, key| v[*key].clone());
    let injected = ["weft-init", "weft-proxy"];
    assert_eq!(init_names(&template(&docs[0], &["spec", "template"])), injected, "Deployment");
    assert_eq!(init_names(&template(&docs[1], &["spec", "template"])), injected, "StatefulSet");
    assert_eq!(init_names(&template(&docs[2], &["spec", "template"])), injected, "DaemonSet");
    assert_eq!(init_names(&template(&docs[3], &["spec", "template"])), injected, "Job");
    assert_eq!(
        init_names(&template(&docs[4], &["spec", "jobTemplate", "spec", "template"])),
        injected,
        "CronJob"
    );
    assert_eq!(init_names(&docs[5]), injected, "Pod");
    assert_eq!(
        docs[6],
        documents(&std::fs::read_to_string(fixture()).unwrap())[6],
        "a Service passes through unchanged"
    );
    assert!(init_names(&docs[7]).is_empty(), "an opted-out Pod is left alone");
    assert_eq!(
        init_names(&template(&docs[8], &["items"])[0]["spec"]["template"]),
        injected,
        "a Deployment inside a List"
    );

    assert!(docs[0]["spec"]["template"]["metadata"]["annotations"]["weft.dev/injected"].is_string());
    let proxy_env = |template: &Value| {
        let proxy = &template["spec"]["initContainers"][1];
        let env = proxy["env"].as_array().unwrap();
        env.iter().find(|e| e["name"] == "WEFT_WORKLOAD").map(|e| e["value"].as_str().unwrap().to_owned())
    };
    assert_eq!(proxy_env(&template(&docs[0], &["spec", "template"])).as_deref(), Some("web"), "Deployment");
    assert_eq!(proxy_env(&docs[5]).as_deref(), docs[5]["metadata"]["name"].as_str(), "Pod");
    assert!(
        docs[0]["spec"]["template"]["metadata"].get("name").is_none(),
        "no name is written into a template"
    );
    assert!(
        docs[0]["spec"]["template"]["metadata"].get("namespace").is_none(),
        "no namespace is written into a template"
    );
    assert!(stderr.contains("Deployment/web: injected"), "{stderr}");
    assert!(stderr.contains("Service/web: unchanged (not a workload)"), "{stderr}");
    assert!(stderr.contains("Pod/opted-out: skipped (opted_out)"), "{stderr}");
}

#[test]
fn reads_stdin_and_is_idempotent() {
    let input = std::fs::read_to_string(fixture()).unwrap();
    let (ok, once, _) = weftctl(&["inject", "-f", "-"], Some(&input));
    assert!(ok);
    let (ok, twice, stderr) = weftctl(&["inject", "-f", "-"], Some(&once));
    assert!(ok);
    assert_eq!(documents(&once), documents(&twice), "a second pass changes nothing");
    assert!(stderr.contains("Deployment/web: skipped (already_injected)"), "{stderr}");
}

#[test]
fn a_bad_annotation_fails_naming_the_document_and_annotation() {
    let input = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: ok\nspec:\n  containers: [{name: a, image: a}]\n---\n\
                 apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: typo\nspec:\n  template:\n    metadata:\n      annotations:\n        weft.dev/exclude-inbound-ports: http\n    spec:\n      containers: [{name: a, image: a}]\n";
    let (ok, stdout, stderr) = weftctl(&["inject", "-f", "-"], Some(input));
    assert!(!ok);
    assert!(stdout.is_empty(), "nothing is written when any document fails");
    assert!(
        stderr.contains("document 2 (Deployment/typo)") && stderr.contains("weft.dev/exclude-inbound-ports"),
        "{stderr}"
    );
}

#[test]
fn a_config_file_changes_what_is_injected() {
    let dir = std::env::temp_dir().join(format!("weftctl-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("inject.yaml");
    std::fs::write(&config, "proxyImage: registry.example/weft/proxy:9.9\nnativeSidecar: false\n").unwrap();
    let input =
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  containers: [{name: app, image: app}]\n";
    let (ok, stdout, stderr) =
        weftctl(&["inject", "-f", "-", "--config", config.to_str().unwrap()], Some(input));
    assert!(ok, "{stderr}");
    let pod = &documents(&stdout)[0];
    assert_eq!(pod["spec"]["containers"][0]["name"], "weft-proxy");
    assert_eq!(pod["spec"]["containers"][0]["image"], "registry.example/weft/proxy:9.9");
    std::fs::remove_dir_all(dir).unwrap();
}
