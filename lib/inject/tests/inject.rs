//! `inject()` on a table of pod fixtures (`tests/fixtures/pods`): what is added, what is skipped,
//! and that the JSON patch, applied as the apiserver applies it, gives the injected pod.

use std::{fs, path::PathBuf};

use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::Value;
use weft_api::labels::REWRITE_APP_PROBES_ANNOTATION;
use weft_inject::{
    APP_PROBES_ENV, INIT_CONTAINER, InjectConfig, InjectError, Injection, PROXY_CONTAINER, SkipReason,
    TOKEN_VOLUME, TRUST_BUNDLE_VOLUME, inject,
};

fn fixture(name: &str) -> Pod {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pods").join(name);
    serde_yaml::from_str(&fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Injects `pod` and applies the patch to it, as the apiserver would.
fn injected(pod: &Pod, config: &InjectConfig) -> (Pod, json_patch::Patch) {
    let Injection::Patch(patch) = inject(pod, config).unwrap() else {
        panic!("{:?} was not injected", pod.metadata.name)
    };
    let mut document = serde_json::to_value(pod).unwrap();
    json_patch::patch(&mut document, &patch).unwrap();
    (serde_json::from_value(document).unwrap(), patch)
}

fn names(containers: &[Container]) -> Vec<&str> {
    containers.iter().map(|c| c.name.as_str()).collect()
}

fn container<'a>(containers: &'a [Container], name: &str) -> &'a Container {
    containers.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no container {name}"))
}

#[test]
fn skips_what_must_not_be_injected() {
    let config = InjectConfig::default();
    for (file, reason) in [
        ("host-network.yaml", SkipReason::HostNetwork),
        ("opted-out.yaml", SkipReason::OptedOut),
        ("already-injected.yaml", SkipReason::AlreadyInjected),
        ("excluded-namespace.yaml", SkipReason::ExcludedNamespace),
    ] {
        assert_eq!(inject(&fixture(file), &config).unwrap(), Injection::Skip(reason), "{file}");
    }
}

#[test]
fn injects_redirection_the_native_sidecar_and_volumes() {
    let config = InjectConfig::default();
    for file in [
        "plain.yaml",
        "with-init-containers.yaml",
        "exclusion-annotations.yaml",
        "escaped-names.yaml",
        "from-deployment.yaml",
    ] {
        let original = fixture(file);
        let (pod, _) = injected(&original, &config);
        let spec = pod.spec.as_ref().unwrap();
        let original_spec = original.spec.as_ref().unwrap();
        let init = spec.init_containers.as_deref().unwrap();

        // Redirection, then the proxy, then the app's own init containers.
        let app_inits = original_spec.init_containers.as_deref().map(names).unwrap_or_default();
        assert_eq!(names(init), [vec![INIT_CONTAINER, PROXY_CONTAINER], app_inits].concat(), "{file}");
        assert_eq!(spec.containers, original_spec.containers, "{file}: app containers are untouched");

        let proxy = container(init, PROXY_CONTAINER);
        assert_eq!(proxy.restart_policy.as_deref(), Some("Always"), "{file}: native sidecar");
        let startup = proxy.startup_probe.as_ref().and_then(|p| p.http_get.as_ref()).expect("startup probe");
        assert_eq!(startup.path.as_deref(), Some("/ready"));
        assert_eq!(serde_json::to_value(&startup.port).unwrap(), 15000);
        let proxy_security = proxy.security_context.as_ref().unwrap();
        assert_eq!((proxy_security.run_as_user, proxy_security.run_as_non_root), (Some(1337), Some(true)));

        let redirect = container(init, INIT_CONTAINER);
        let capabilities = redirect.security_context.as_ref().unwrap().capabilities.as_ref().unwrap();
        assert_eq!(capabilities.add.as_deref(), Some(&["NET_ADMIN".to_owned(), "NET_RAW".to_owned()][..]));
        assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
        assert_eq!(redirect.security_context.as_ref().unwrap().privileged, Some(false));
        let args = redirect.args.as_deref().unwrap();
        for expected in ["init", "--proxy-uid=1337", "--outbound-port=15001", "--inbound-port=15006"] {
            assert!(args.iter().any(|a| a == expected), "{file}: {expected} missing from {args:?}");
        }

        let volumes = spec.volumes.as_deref().unwrap();
        let token = volumes.iter().find(|v| v.name == TOKEN_VOLUME).expect("token volume");
        let projection = token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
            .service_account_token
            .as_ref()
            .unwrap();
        assert_eq!(
            (projection.audience.as_deref(), projection.expiration_seconds),
            (Some("weft-ca"), Some(3600))
        );
        assert!(volumes.iter().any(|v| v.name == TRUST_BUNDLE_VOLUME));
        for volume in original_spec.volumes.iter().flatten() {
            assert!(volumes.contains(volume), "{file}: kept volume {}", volume.name);
        }

        let annotations = pod.metadata.annotations.as_ref().unwrap();
        let status: Value = serde_json::from_str(&annotations["weft.dev/injected"]).unwrap();
        assert_eq!(status["initContainers"], serde_json::json!([INIT_CONTAINER, PROXY_CONTAINER]));
        for (key, value) in original.metadata.annotations.iter().flatten() {
            assert_eq!(annotations.get(key), Some(value), "{file}: kept annotation {key}");
        }
    }
}

fn env<'a>(container: &'a Container, name: &str) -> Option<&'a str> {
    container.env.iter().flatten().find(|e| e.name == name).and_then(|e| e.value.as_deref())
}

#[test]
fn the_proxy_is_told_its_workload() {
    let config = InjectConfig::default();
    for (file, workload) in [
        // Owned by ReplicaSet checkout-6f7d9c4b8d with that pod-template-hash: the Deployment.
        ("from-deployment.yaml", "checkout"),
        // No owner: the pod itself.
        ("plain.yaml", "web"),
    ] {
        let (pod, _) = injected(&fixture(file), &config);
        let init = pod.spec.unwrap().init_containers.unwrap();
        assert_eq!(env(container(&init, PROXY_CONTAINER), "WEFT_WORKLOAD"), Some(workload), "{file}");
    }

    // Without native sidecars the proxy is a regular container, told the same.
    let config = InjectConfig { native_sidecar: false, ..config };
    let (pod, _) = injected(&fixture("from-deployment.yaml"), &config);
    let proxy = container(&pod.spec.as_ref().unwrap().containers, PROXY_CONTAINER);
    assert_eq!(env(proxy, "WEFT_WORKLOAD"), Some("checkout"));
}

#[test]
fn a_second_admission_does_not_inject_again() {
    let config = InjectConfig::default();
    let (once, _) = injected(&fixture("with-init-containers.yaml"), &config);
    assert_eq!(inject(&once, &config).unwrap(), Injection::Skip(SkipReason::AlreadyInjected));

    // Even without the status annotation (stripped by some tool), the proxy container is seen.
    let mut stripped = once.clone();
    stripped.metadata.annotations.as_mut().unwrap().remove("weft.dev/injected");
    assert_eq!(inject(&stripped, &config).unwrap(), Injection::Skip(SkipReason::AlreadyInjected));
}

#[test]
fn exclusion_annotations_reach_the_redirection_rules() {
    let (pod, _) = injected(&fixture("exclusion-annotations.yaml"), &InjectConfig::default());
    let init = pod.spec.unwrap().init_containers.unwrap();
    assert_eq!(
        container(&init, INIT_CONTAINER).args.as_deref().unwrap(),
        [
            "init",
            "--proxy-uid=1337",
            "--outbound-port=15001",
            "--inbound-port=15006",
            "--exclude-inbound-ports=9090,9091,15000,15006",
            "--exclude-outbound-ports=5432",
            "--exclude-outbound-cidrs=10.96.0.1/32,169.254.169.254",
        ]
    );
}

#[test]
fn resource_annotations_override_requests_and_raise_a_lower_limit() {
    let config = InjectConfig::default();
    let (pod, _) = injected(&fixture("exclusion-annotations.yaml"), &config);
    let init = pod.spec.unwrap().init_containers.unwrap();
    let resources = container(&init, PROXY_CONTAINER).resources.clone().unwrap();
    let (requests, limits) = (resources.requests.unwrap(), resources.limits.unwrap());
    assert_eq!(requests["cpu"].0, "250m");
    assert_eq!(requests["memory"].0, "128Mi");
    assert_eq!(limits["memory"].0, "128Mi", "the configured 64Mi limit is below the 128Mi request");
    assert!(!limits.contains_key("cpu"), "no CPU limit by default");

    let (plain, _) = injected(&fixture("plain.yaml"), &config);
    let init = plain.spec.unwrap().init_containers.unwrap();
    let requests = container(&init, PROXY_CONTAINER).resources.clone().unwrap().requests.unwrap();
    assert_eq!((requests["cpu"].0.as_str(), requests["memory"].0.as_str()), ("10m", "16Mi"));
}

#[test]
fn a_malformed_annotation_is_an_error_naming_it() {
    let error = inject(&fixture("bad-annotation.yaml"), &InjectConfig::default()).unwrap_err();
    assert!(matches!(
        error,
        InjectError::BadAnnotation { annotation: "weft.dev/exclude-outbound-ports", .. }
    ));
    assert!(
        error.to_string().contains("weft.dev/exclude-outbound-ports")
            && error.to_string().contains("\"postgres\""),
        "{error}"
    );
}

#[test]
fn patch_paths_escape_slash_and_tilde() {
    let original = fixture("escaped-names.yaml");
    let (pod, patch) = injected(&original, &InjectConfig::default());
    let paths: Vec<String> = serde_json::to_value(&patch)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|op| op["path"].as_str().unwrap().to_owned())
        .collect();
    assert!(paths.contains(&"/metadata/annotations/weft.dev~1injected".to_owned()), "{paths:?}");
    let annotations = pod.metadata.annotations.unwrap();
    assert_eq!(annotations["example.com/owner"], "team-a");
    assert_eq!(annotations["tilde~key"], "yes");
    assert!(annotations.contains_key("weft.dev/injected"));

    // A key with `~` that the patch must touch: an opted-in pod whose annotations we replace.
    let mut changed = serde_json::to_value(&original).unwrap();
    changed["metadata"]["annotations"]["tilde~key"] = "no".into();
    let patch = json_patch::diff(&serde_json::to_value(&original).unwrap(), &changed);
    assert_eq!(serde_json::to_value(&patch).unwrap()[0]["path"], "/metadata/annotations/tilde~0key");
}

#[test]
fn without_native_sidecars_the_proxy_starts_first_and_holds_the_app() {
    let config = InjectConfig { native_sidecar: false, ..InjectConfig::default() };
    let (pod, _) = injected(&fixture("with-init-containers.yaml"), &config);
    let spec = pod.spec.unwrap();
    // Redirection last among init containers: the app's migrate step keeps a direct network.
    assert_eq!(names(spec.init_containers.as_deref().unwrap()), ["migrate", INIT_CONTAINER]);
    assert_eq!(names(&spec.containers), [PROXY_CONTAINER, "api"]);
    let proxy = container(&spec.containers, PROXY_CONTAINER);
    assert_eq!(proxy.restart_policy, None);
    let hook = proxy.lifecycle.as_ref().unwrap().post_start.as_ref().unwrap().exec.as_ref().unwrap();
    assert_eq!(hook.command.as_deref(), Some(&["weft-proxy".to_owned(), "wait".to_owned()][..]));
    assert_eq!(pod.metadata.annotations.unwrap()["kubectl.kubernetes.io/default-container"], "api");
}

#[test]
fn a_volume_named_like_ours_is_an_error() {
    let mut pod = fixture("plain.yaml");
    pod.spec.as_mut().unwrap().volumes = Some(vec![k8s_openapi::api::core::v1::Volume {
        name: TOKEN_VOLUME.to_owned(),
        ..Default::default()
    }]);
    let error = inject(&pod, &InjectConfig::default()).unwrap_err();
    assert!(error.to_string().contains("volume named \"weft-token\""), "{error}");
}

#[test]
fn config_rejects_unknown_keys_and_accepts_empty() {
    assert_eq!(InjectConfig::from_yaml("").unwrap(), InjectConfig::default());
    let partial = InjectConfig::from_yaml("proxyImage: example/proxy:1\nnativeSidecar: false\n").unwrap();
    assert_eq!(
        (partial.proxy_image.as_str(), partial.native_sidecar, partial.proxy_uid),
        ("example/proxy:1", false, 1337)
    );
    let error = InjectConfig::from_yaml("proxyImg: typo\n").unwrap_err();
    assert!(error.to_string().contains("proxyImg"), "{error}");
}

/// What `with-probes.yaml`'s rewritten probes stand for, as the proxy reads it (the proxy's
/// `probes::tests::INJECTED` parses this same text).
const WITH_PROBES_ENV: &str = r#"{"/app-health/web/livez":{"port":8080,"path":"/livez","headers":[["Host","web.example"]]},"/app-health/web/readyz":{"port":8080,"path":"/healthz?full=1","headers":[["X-Probe","ready"],["X-Probe","again"]],"timeoutSeconds":2},"/app-health/web/startupz":{"port":8080,"tcp":true}}"#;

#[test]
fn http_and_tcp_probes_are_pointed_at_the_admin_port() {
    let (pod, _) = injected(&fixture("with-probes.yaml"), &InjectConfig::default());
    let web = container(&pod.spec.as_ref().unwrap().containers, "web");
    let probe = |p: &Option<k8s_openapi::api::core::v1::Probe>| serde_json::to_value(p).unwrap();
    // The handler changes; timing and thresholds stay as the app wrote them.
    assert_eq!(
        probe(&web.readiness_probe),
        serde_json::json!({
            "httpGet": {"path": "/app-health/web/readyz", "port": 15000},
            "initialDelaySeconds": 3, "periodSeconds": 5, "timeoutSeconds": 2,
            "successThreshold": 1, "failureThreshold": 4,
        })
    );
    // By port name, with the scheme and the Host header moved to the proxy's copy.
    assert_eq!(
        probe(&web.liveness_probe),
        serde_json::json!({
            "httpGet": {"path": "/app-health/web/livez", "port": 15000},
            "periodSeconds": 10, "terminationGracePeriodSeconds": 30,
        })
    );
    // TCP becomes HTTP: the proxy opens the connection.
    assert_eq!(
        probe(&web.startup_probe),
        serde_json::json!({
            "httpGet": {"path": "/app-health/web/startupz", "port": 15000},
            "periodSeconds": 2, "failureThreshold": 30,
        })
    );
}

#[test]
fn the_proxy_is_given_the_original_probes() {
    let (pod, _) = injected(&fixture("with-probes.yaml"), &InjectConfig::default());
    let init = pod.spec.unwrap().init_containers.unwrap();
    assert_eq!(env(container(&init, PROXY_CONTAINER), APP_PROBES_ENV), Some(WITH_PROBES_ENV));

    // Without native sidecars too.
    let config = InjectConfig { native_sidecar: false, ..InjectConfig::default() };
    let (pod, _) = injected(&fixture("with-probes.yaml"), &config);
    let spec = pod.spec.unwrap();
    assert_eq!(names(&spec.containers), [PROXY_CONTAINER, "web", "worker", "metrics"]);
    assert_eq!(env(container(&spec.containers, PROXY_CONTAINER), APP_PROBES_ENV), Some(WITH_PROBES_ENV));

    // No probe to run, no variable.
    let (pod, _) = injected(&fixture("plain.yaml"), &InjectConfig::default());
    let init = pod.spec.unwrap().init_containers.unwrap();
    assert_eq!(env(container(&init, PROXY_CONTAINER), APP_PROBES_ENV), None);
}

#[test]
fn exec_grpc_https_other_hosts_unresolved_names_and_excluded_ports_are_left_alone() {
    let original = fixture("with-probes.yaml");
    let (pod, _) = injected(&original, &InjectConfig::default());
    let (before, after) = (&original.spec.unwrap().containers, &pod.spec.unwrap().containers);
    // worker: HTTPS, exec and gRPC. metrics: a port name no `ports[].name` resolves, a port
    // excluded from redirection (plain text reaches it), and a TCP probe of another host.
    for name in ["worker", "metrics"] {
        assert_eq!(container(after, name), container(before, name), "{name}");
    }
}

#[test]
fn the_rewrite_annotation_turns_it_off() {
    let mut pod = fixture("with-probes.yaml");
    let annotations = pod.metadata.annotations.get_or_insert_with(Default::default);
    annotations.insert(REWRITE_APP_PROBES_ANNOTATION.to_owned(), "false".to_owned());
    let (injected_pod, _) = injected(&pod, &InjectConfig::default());
    let spec = injected_pod.spec.unwrap();
    assert_eq!(spec.containers, pod.spec.as_ref().unwrap().containers, "no probe rewritten");
    assert_eq!(env(container(&spec.init_containers.unwrap(), PROXY_CONTAINER), APP_PROBES_ENV), None);

    // "true" is the default, spelled out; anything else names the annotation.
    let annotations = pod.metadata.annotations.as_mut().unwrap();
    annotations.insert(REWRITE_APP_PROBES_ANNOTATION.to_owned(), "true".to_owned());
    let (injected_pod, _) = injected(&pod, &InjectConfig::default());
    let init = injected_pod.spec.unwrap().init_containers.unwrap();
    assert_eq!(env(container(&init, PROXY_CONTAINER), APP_PROBES_ENV), Some(WITH_PROBES_ENV));
    let annotations = pod.metadata.annotations.as_mut().unwrap();
    annotations.insert(REWRITE_APP_PROBES_ANNOTATION.to_owned(), "no".to_owned());
    let error = inject(&pod, &InjectConfig::default()).unwrap_err();
    assert!(
        matches!(error, InjectError::BadAnnotation { annotation: "weft.dev/rewrite-app-probes", .. }),
        "{error}"
    );
}

#[test]
fn rewritten_probes_are_not_rewritten_again() {
    let config = InjectConfig::default();
    let (once, _) = injected(&fixture("with-probes.yaml"), &config);
    assert_eq!(inject(&once, &config).unwrap(), Injection::Skip(SkipReason::AlreadyInjected));
    let mut stripped = once.clone();
    stripped.metadata.annotations.as_mut().unwrap().remove("weft.dev/injected");
    assert_eq!(inject(&stripped, &config).unwrap(), Injection::Skip(SkipReason::AlreadyInjected));
}
