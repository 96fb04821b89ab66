//! Sidecar injection as a pure function: a pod (or a workload's pod template) in, the pod with
//! Weft's init container, proxy sidecar, volumes and status annotation out, and the app's HTTP
//! and TCP probes pointed at the proxy (see [`rewrite_app_probes`]). [`config`] is what the chart
//! configures.
//!
//! Its own crate so that both the webhook (which answers AdmissionReviews with [`inject`]'s JSON
//! patch, made by [`json_patch::diff`] so pointer escaping is never written by hand) and
//! `weftctl inject` (which applies [`inject_into`] to manifests offline) use it without weftctl
//! linking the webhook's HTTPS server.

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::{
    api::core::v1::{
        Capabilities, ConfigMapProjection, Container, ContainerPort, EnvVar, EnvVarSource, ExecAction,
        HTTPGetAction, HTTPHeader, KeyToPath, Lifecycle, LifecycleHandler, ObjectFieldSelector, Pod, PodSpec,
        Probe, ProjectedVolumeSource, ResourceRequirements, SecurityContext, ServiceAccountTokenProjection,
        Volume, VolumeMount, VolumeProjection,
    },
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use serde::Serialize;
pub use weft_api::workload::PROXY_CONTAINER;
use weft_api::{
    labels::{
        EXCLUDE_INBOUND_PORTS_ANNOTATION, EXCLUDE_OUTBOUND_CIDRS_ANNOTATION,
        EXCLUDE_OUTBOUND_PORTS_ANNOTATION, INJECT_ANNOTATION, INJECTED_ANNOTATION, PROXY_CPU_ANNOTATION,
        PROXY_MEMORY_ANNOTATION, REWRITE_APP_PROBES_ANNOTATION,
    },
    workload::{is_meshed, workload_name},
};

pub mod config;

pub use config::InjectConfig;

/// Name of the init container that installs traffic redirection.
pub const INIT_CONTAINER: &str = "weft-init";
/// The projected ServiceAccount token the proxy presents to the CA.
pub const TOKEN_VOLUME: &str = "weft-token";
pub const TOKEN_DIR: &str = "/var/run/secrets/weft/tokens";
/// The mesh's root certificates.
pub const TRUST_BUNDLE_VOLUME: &str = "weft-trust-bundle";
pub const TRUST_BUNDLE_DIR: &str = "/var/run/secrets/weft/trust";
const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";
/// The proxy's environment variable holding the original probes (`weft_proxy::probes`).
pub const APP_PROBES_ENV: &str = "WEFT_APP_PROBES";
/// Rewritten probes call the admin port at `/app-health/<container>/<readyz|livez|startupz>`.
pub const APP_HEALTH_PREFIX: &str = "/app-health/";

/// What [`inject`] decided for a pod.
#[derive(Clone, Debug, PartialEq)]
pub enum Injection {
    /// The pod is left as it is.
    Skip(SkipReason),
    /// The JSON patch that injects the pod.
    Patch(json_patch::Patch),
}

/// Why a pod is not injected. These are expected outcomes, not errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// `hostNetwork: true`: redirection would capture the node's traffic.
    HostNetwork,
    /// The pod's `weft.dev/inject: "false"` annotation.
    OptedOut,
    /// The pod already carries `weft.dev/injected` or a `weft-proxy` container.
    AlreadyInjected,
    /// A system or mesh namespace.
    ExcludedNamespace,
}

impl SkipReason {
    /// A stable label for logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::HostNetwork => "host_network",
            Self::OptedOut => "opted_out",
            Self::AlreadyInjected => "already_injected",
            Self::ExcludedNamespace => "excluded_namespace",
        }
    }
}

/// A pod that cannot be injected as asked. The message names the annotation or field.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("annotation {annotation}={value:?} is invalid: {reason}")]
    BadAnnotation { annotation: &'static str, value: String, reason: String },
    #[error("the pod already has a {kind} named {name:?}, which Weft's injector adds")]
    NameConflict { kind: &'static str, name: &'static str },
    #[error("the pod cannot be serialized: {0}")]
    Serialize(#[from] serde_json::Error),
}

/// Injects `pod` and returns the JSON patch that does it, or why it is skipped.
///
/// The pod's namespace must be set (the webhook takes it from the AdmissionRequest).
pub fn inject(pod: &Pod, config: &InjectConfig) -> Result<Injection, InjectError> {
    let mut injected = pod.clone();
    let spec = injected.spec.get_or_insert_with(PodSpec::default);
    if let Some(reason) = inject_into(&mut injected.metadata, spec, config)? {
        return Ok(Injection::Skip(reason));
    }
    let before = serde_json::to_value(pod)?;
    let after = serde_json::to_value(&injected)?;
    Ok(Injection::Patch(json_patch::diff(&before, &after)))
}

/// Injects a pod's metadata and spec in place: a Pod's own, or a workload's pod template.
/// Returns why nothing was changed, if so.
pub fn inject_into(
    meta: &mut ObjectMeta,
    spec: &mut PodSpec,
    config: &InjectConfig,
) -> Result<Option<SkipReason>, InjectError> {
    if let Some(reason) = skip_reason(meta, spec, config) {
        return Ok(Some(reason));
    }
    let annotations = meta.annotations.clone().unwrap_or_default();
    let redirect = Redirect::from_annotations(&annotations, config)?;
    let resources = proxy_resources(&annotations, config)?;
    let rewrite_probes = rewrite_probes_wanted(&annotations)?;
    check_names_free(spec)?;

    // Before the proxy joins `spec.containers`: only the app's containers are rewritten.
    let app_probes = if rewrite_probes {
        rewrite_app_probes(&mut spec.containers, &redirect, config.ports.admin)
    } else {
        BTreeMap::new()
    };
    let init = init_container(&redirect, &resources, config);
    let proxy = proxy_container(resources, workload_name(meta), &app_probes, config)?;
    let init_containers = spec.init_containers.get_or_insert_with(Vec::new);
    let mut status = InjectionStatus { version: env!("CARGO_PKG_VERSION"), ..InjectionStatus::default() };
    if config.native_sidecar {
        // Redirection first, then the proxy, then the app's own init containers: those start
        // only once the proxy is ready, so they have a working network through it.
        init_containers.splice(0..0, [init, proxy]);
        status.init_containers = vec![INIT_CONTAINER, PROXY_CONTAINER];
    } else {
        // Without native sidecars the proxy starts after all init containers, so redirection
        // goes last: the app's init containers keep a direct network instead of a dead one.
        init_containers.push(init);
        let first_app_container = spec.containers.first().map(|c| c.name.clone());
        spec.containers.insert(0, proxy);
        if let Some(name) = first_app_container {
            meta.annotations
                .get_or_insert_with(BTreeMap::new)
                .entry(DEFAULT_CONTAINER_ANNOTATION.to_owned())
                .or_insert(name);
        }
        status.init_containers = vec![INIT_CONTAINER];
        status.containers = vec![PROXY_CONTAINER];
    }
    spec.volumes.get_or_insert_with(Vec::new).extend(volumes(config));
    status.volumes = vec![TOKEN_VOLUME, TRUST_BUNDLE_VOLUME];
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(INJECTED_ANNOTATION.to_owned(), serde_json::to_string(&status)?);
    Ok(None)
}

fn skip_reason(meta: &ObjectMeta, spec: &PodSpec, config: &InjectConfig) -> Option<SkipReason> {
    let annotation = |key: &str| meta.annotations.as_ref().and_then(|a| a.get(key)).map(String::as_str);
    if spec.host_network == Some(true) {
        Some(SkipReason::HostNetwork)
    } else if matches!(annotation(INJECT_ANNOTATION), Some("false" | "disabled")) {
        Some(SkipReason::OptedOut)
    } else if is_meshed(meta, Some(spec)) {
        Some(SkipReason::AlreadyInjected)
    } else if meta.namespace.as_ref().is_some_and(|ns| config.excluded_namespaces.contains(ns)) {
        Some(SkipReason::ExcludedNamespace)
    } else {
        None
    }
}

fn check_names_free(spec: &PodSpec) -> Result<(), InjectError> {
    // A `weft-proxy` container already counts as injected (see `skip_reason`).
    let mut containers = spec.containers.iter().chain(spec.init_containers.iter().flatten());
    if containers.any(|c| c.name == INIT_CONTAINER) {
        return Err(InjectError::NameConflict { kind: "container", name: INIT_CONTAINER });
    }
    for name in [TOKEN_VOLUME, TRUST_BUNDLE_VOLUME] {
        if spec.volumes.iter().flatten().any(|v| v.name == name) {
            return Err(InjectError::NameConflict { kind: "volume", name });
        }
    }
    Ok(())
}

/// The `weft.dev/injected` annotation: what the injector added, so a second pass is a no-op and
/// `weftctl` can tell what is Weft's.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct InjectionStatus {
    version: &'static str,
    init_containers: Vec<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    containers: Vec<&'static str>,
    volumes: Vec<&'static str>,
}

/// Traffic redirection settings for `weft-proxy init`.
#[derive(Debug, Default, PartialEq)]
struct Redirect {
    exclude_inbound_ports: Vec<u16>,
    exclude_outbound_ports: Vec<u16>,
    exclude_outbound_cidrs: Vec<String>,
}

impl Redirect {
    fn from_annotations(
        annotations: &BTreeMap<String, String>,
        config: &InjectConfig,
    ) -> Result<Self, InjectError> {
        // The admin port is never redirected: the kubelet's probes reach it directly.
        let mut exclude_inbound_ports = vec![config.ports.admin, config.ports.inbound];
        if let Some(value) = annotations.get(EXCLUDE_INBOUND_PORTS_ANNOTATION) {
            exclude_inbound_ports.extend(parse_ports(EXCLUDE_INBOUND_PORTS_ANNOTATION, value)?);
        }
        let exclude_outbound_ports = match annotations.get(EXCLUDE_OUTBOUND_PORTS_ANNOTATION) {
            Some(value) => parse_ports(EXCLUDE_OUTBOUND_PORTS_ANNOTATION, value)?,
            None => Vec::new(),
        };
        let exclude_outbound_cidrs = match annotations.get(EXCLUDE_OUTBOUND_CIDRS_ANNOTATION) {
            Some(value) => parse_cidrs(EXCLUDE_OUTBOUND_CIDRS_ANNOTATION, value)?,
            None => Vec::new(),
        };
        exclude_inbound_ports.sort_unstable();
        exclude_inbound_ports.dedup();
        Ok(Self { exclude_inbound_ports, exclude_outbound_ports, exclude_outbound_cidrs })
    }
}

fn list_items(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|item| !item.is_empty())
}

fn parse_ports(annotation: &'static str, value: &str) -> Result<Vec<u16>, InjectError> {
    list_items(value)
        .map(|item| match item.parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(InjectError::BadAnnotation {
                annotation,
                value: value.to_owned(),
                reason: format!("{item:?} is not a port number from 1 to 65535"),
            }),
        })
        .collect()
}

fn parse_cidrs(annotation: &'static str, value: &str) -> Result<Vec<String>, InjectError> {
    list_items(value)
        .map(|item| {
            let (address, prefix) = item.split_once('/').unwrap_or((item, ""));
            let valid = match address.parse::<IpAddr>() {
                Ok(ip) => {
                    let max = if ip.is_ipv4() { 32 } else { 128 };
                    prefix.is_empty() || prefix.parse::<u8>().is_ok_and(|p| p <= max)
                }
                Err(_) => false,
            };
            if valid {
                Ok(item.to_owned())
            } else {
                Err(InjectError::BadAnnotation {
                    annotation,
                    value: value.to_owned(),
                    reason: format!("{item:?} is not an IP address or CIDR"),
                })
            }
        })
        .collect()
}

/// The proxy's resources: the configured ones, with requests overridden by the pod's
/// `weft.dev/proxy-cpu` / `weft.dev/proxy-memory` annotations. A limit below an overridden request
/// is raised to it, or the pod would be invalid.
fn proxy_resources(
    annotations: &BTreeMap<String, String>,
    config: &InjectConfig,
) -> Result<ResourceRequirements, InjectError> {
    let configured = &config.resources;
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    for (resource, annotation, request, limit) in [
        ("cpu", PROXY_CPU_ANNOTATION, &configured.cpu_request, &configured.cpu_limit),
        ("memory", PROXY_MEMORY_ANNOTATION, &configured.memory_request, &configured.memory_limit),
    ] {
        let override_value = annotations.get(annotation);
        let request = match override_value {
            Some(value) => Some(parse_quantity(annotation, value).map(|_| value.clone())?),
            None => request.clone(),
        };
        let mut limit = limit.clone();
        if let (Some(request), Some(current)) = (&request, &limit) {
            let below = quantity_value(current).zip(quantity_value(request)).is_some_and(|(l, r)| l < r);
            if override_value.is_some() && below {
                limit = Some(request.clone());
            }
        }
        if let Some(request) = request {
            requests.insert(resource.to_owned(), Quantity(request));
        }
        if let Some(limit) = limit {
            limits.insert(resource.to_owned(), Quantity(limit));
        }
    }
    Ok(ResourceRequirements {
        requests: (!requests.is_empty()).then_some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..ResourceRequirements::default()
    })
}

fn parse_quantity(annotation: &'static str, value: &str) -> Result<f64, InjectError> {
    quantity_value(value).ok_or_else(|| InjectError::BadAnnotation {
        annotation,
        value: value.to_owned(),
        reason: "expected a Kubernetes quantity such as \"100m\", \"0.5\", \"64Mi\" or \"1G\"".to_owned(),
    })
}

/// The numeric value of a Kubernetes quantity (`100m` → 0.1, `64Mi` → 67108864), for comparing.
fn quantity_value(text: &str) -> Option<f64> {
    const SUFFIXES: [(&str, f64); 13] = [
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let (number, multiplier) = SUFFIXES
        .iter()
        .find_map(|(suffix, multiplier)| text.strip_suffix(suffix).map(|number| (number, *multiplier)))
        .unwrap_or((text, 1.0));
    let well_formed = !number.is_empty()
        && number.chars().all(|c| c.is_ascii_digit() || c == '.')
        && number.matches('.').count() <= 1
        && !number.starts_with('.');
    well_formed.then(|| number.parse::<f64>().ok()).flatten().map(|n| n * multiplier)
}

fn init_container(redirect: &Redirect, resources: &ResourceRequirements, config: &InjectConfig) -> Container {
    let join = |ports: &[u16]| ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
    let mut args = vec![
        "init".to_owned(),
        format!("--proxy-uid={}", config.proxy_uid),
        format!("--outbound-port={}", config.ports.outbound),
        format!("--inbound-port={}", config.ports.inbound),
        format!("--exclude-inbound-ports={}", join(&redirect.exclude_inbound_ports)),
    ];
    if !redirect.exclude_outbound_ports.is_empty() {
        args.push(format!("--exclude-outbound-ports={}", join(&redirect.exclude_outbound_ports)));
    }
    if !redirect.exclude_outbound_cidrs.is_empty() {
        args.push(format!("--exclude-outbound-cidrs={}", redirect.exclude_outbound_cidrs.join(",")));
    }
    Container {
        name: INIT_CONTAINER.to_owned(),
        image: Some(config.proxy_image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        command: Some(vec!["weft-proxy".to_owned()]),
        args: Some(args),
        resources: Some(resources.clone()),
        // Root with exactly the two capabilities iptables/nft need, nothing else.
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".to_owned(), "NET_RAW".to_owned()]),
                drop: Some(vec!["ALL".to_owned()]),
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

fn proxy_container(
    resources: ResourceRequirements,
    workload: &str,
    app_probes: &BTreeMap<String, AppProbe>,
    config: &InjectConfig,
) -> Result<Container, InjectError> {
    let admin_probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(config.ports.admin.into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Probe::default()
    };
    let field = |path: &str| EnvVarSource {
        field_ref: Some(ObjectFieldSelector {
            field_path: path.to_owned(),
            ..ObjectFieldSelector::default()
        }),
        ..EnvVarSource::default()
    };
    let value =
        |name: &str, value: String| EnvVar { name: name.to_owned(), value: Some(value), ..EnvVar::default() };
    let from = |name: &str, path: &str| EnvVar {
        name: name.to_owned(),
        value_from: Some(field(path)),
        ..EnvVar::default()
    };
    let mut container = Container {
        name: PROXY_CONTAINER.to_owned(),
        image: Some(config.proxy_image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        command: Some(vec!["weft-proxy".to_owned()]),
        env: Some(vec![
            from("POD_NAME", "metadata.name"),
            from("POD_NAMESPACE", "metadata.namespace"),
            from("POD_IP", "status.podIP"),
            from("WEFT_SERVICE_ACCOUNT", "spec.serviceAccountName"),
            value("WEFT_CONTROL_PLANE", config.control_plane_address.clone()),
            value("WEFT_TRUST_DOMAIN", config.trust_domain.clone()),
            value("WEFT_TOKEN_FILE", format!("{TOKEN_DIR}/token")),
            value("WEFT_TRUST_BUNDLE_FILE", format!("{TRUST_BUNDLE_DIR}/ca.crt")),
            value("WEFT_ADMIN_ADDR", format!("0.0.0.0:{}", config.ports.admin)),
            value("WEFT_OUTBOUND_ADDR", format!("0.0.0.0:{}", config.ports.outbound)),
            value("WEFT_INBOUND_ADDR", format!("0.0.0.0:{}", config.ports.inbound)),
            value("WEFT_LOG_FORMAT", config.log_format.clone()),
            value("WEFT_LOG", config.log_level.clone()),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("weft-admin".to_owned()),
            container_port: config.ports.admin.into(),
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        // The app starts only after the startup probe passes: up to 5 minutes for a first config.
        startup_probe: Some(admin_probe("/ready", 1, 300)),
        readiness_probe: Some(admin_probe("/ready", 5, 3)),
        liveness_probe: Some(admin_probe("/live", 10, 3)),
        resources: Some(resources),
        security_context: Some(SecurityContext {
            run_as_user: Some(config.proxy_uid),
            run_as_group: Some(config.proxy_uid),
            run_as_non_root: Some(true),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: TOKEN_VOLUME.to_owned(),
                mount_path: TOKEN_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: TRUST_BUNDLE_VOLUME.to_owned(),
                mount_path: TRUST_BUNDLE_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    // The downward API cannot expose owners, so the name is fixed at injection. Unknown (a bare
    // template) leaves it out rather than naming the workload "".
    if !workload.is_empty() {
        container.env.get_or_insert_with(Vec::new).push(value("WEFT_WORKLOAD", workload.to_owned()));
    }
    if !app_probes.is_empty() {
        let probes = serde_json::to_string(app_probes)?;
        container.env.get_or_insert_with(Vec::new).push(value(APP_PROBES_ENV, probes));
    }
    if config.native_sidecar {
        container.restart_policy = Some("Always".to_owned());
    } else {
        // Kubernetes starts the next container only when this hook returns: the app waits for
        // the proxy to be ready.
        container.lifecycle = Some(Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction { command: Some(vec!["weft-proxy".to_owned(), "wait".to_owned()]) }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        });
    }
    Ok(container)
}

/// The `weft.dev/rewrite-app-probes` annotation: absent or `"true"` rewrites, `"false"` does not.
fn rewrite_probes_wanted(annotations: &BTreeMap<String, String>) -> Result<bool, InjectError> {
    match annotations.get(REWRITE_APP_PROBES_ANNOTATION).map(String::as_str) {
        None | Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(InjectError::BadAnnotation {
            annotation: REWRITE_APP_PROBES_ANNOTATION,
            value: other.to_owned(),
            reason: "expected \"true\" or \"false\"".to_owned(),
        }),
    }
}

/// One original probe, as the proxy reads it from `WEFT_APP_PROBES`: a JSON object from each
/// rewritten path to one of these. The proxy's side of the contract is `weft_proxy::probes`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct AppProbe {
    /// The app's port, a named port resolved.
    port: u16,
    /// HTTP: the request target with its query, `/` when the probe has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    /// HTTP: the probe's `httpHeaders` as `[name, value]` pairs, in order (`Host` included).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    headers: Vec<(String, String)>,
    /// TCP: the proxy only opens a connection.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    tcp: bool,
    /// The probe's `timeoutSeconds`, when set: how long the proxy waits for the app (the kubelet
    /// keeps waiting as long on the rewritten probe). The proxy's default bounds the rest.
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout_seconds: Option<i32>,
}

/// Points the app containers' HTTP and TCP probes at the proxy's admin port, which runs the
/// original against the app locally, and returns the originals by their new path.
///
/// Why: redirection sends the kubelet's plain-text probes to the inbound listener, which refuses
/// plain text under PeerAuthentication STRICT; the admin port is never redirected. A rewritten
/// probe keeps its timing (delay, period, timeout, thresholds); only its handler changes, to
/// `httpGet :<admin>/app-health/<container>/<readyz|livez|startupz>`.
///
/// Left as they are:
/// - `exec`: it runs in the container and never crosses the network.
/// - `grpc` and `httpGet` with scheme HTTPS: not yet (the proxy would have to speak gRPC health
///   or TLS to the app).
/// - a probe with a `host`: the kubelet calls that host, not this pod.
/// - a named port that no `ports[].name` of the container resolves (the kubelet fails it too).
/// - a path with bytes outside RFC 3986 (a space, say) or a header value with control
///   characters: the proxy could not send them as written (the kubelet fails the latter too).
/// - a port excluded from redirection (the admin port, or `weft.dev/exclude-inbound-ports`):
///   plain text reaches the app there. So probes already pointing at the admin port stay as
///   they are, and a second pass over a rewritten container changes nothing.
fn rewrite_app_probes(
    containers: &mut [Container],
    redirect: &Redirect,
    admin_port: u16,
) -> BTreeMap<String, AppProbe> {
    let mut originals = BTreeMap::new();
    for container in containers {
        let ports = container.ports.as_deref().unwrap_or_default();
        for (kind, probe) in [
            ("readyz", &mut container.readiness_probe),
            ("livez", &mut container.liveness_probe),
            ("startupz", &mut container.startup_probe),
        ] {
            let Some(probe) = probe else { continue };
            let Some(mut original) = original_probe(probe, ports) else { continue };
            if redirect.exclude_inbound_ports.contains(&original.port) {
                continue;
            }
            original.timeout_seconds = probe.timeout_seconds;
            let path = format!("{APP_HEALTH_PREFIX}{}/{kind}", container.name);
            probe.http_get = Some(HTTPGetAction {
                path: Some(path.clone()),
                port: IntOrString::Int(admin_port.into()),
                ..HTTPGetAction::default()
            });
            probe.tcp_socket = None;
            originals.insert(path, original);
        }
    }
    originals
}

/// What the proxy must do for `probe`, or `None` to leave it alone (see [`rewrite_app_probes`]).
fn original_probe(probe: &Probe, ports: &[ContainerPort]) -> Option<AppProbe> {
    let has_host = |host: &Option<String>| host.as_deref().is_some_and(|h| !h.is_empty());
    if let Some(http) = &probe.http_get {
        let plain = http.scheme.as_deref().is_none_or(|s| s.eq_ignore_ascii_case("HTTP"));
        if !plain || has_host(&http.host) {
            return None;
        }
        // As the kubelet does: `/` for no path, a missing leading slash added, no fragment.
        let path = http.path.as_deref().unwrap_or_default();
        let path = match path.split_once('#').map_or(path, |(path, _fragment)| path) {
            "" => "/".to_owned(),
            p if p.starts_with('/') => p.to_owned(),
            p => format!("/{p}"),
        };
        if !path.bytes().all(is_request_target_byte) {
            return None;
        }
        let headers = http
            .http_headers
            .iter()
            .flatten()
            .map(|HTTPHeader { name, value }| {
                valid_header(name, value).then(|| (name.clone(), value.clone()))
            })
            .collect::<Option<Vec<_>>>()?;
        let port = resolve_port(&http.port, ports)?;
        Some(AppProbe { port, path: Some(path), headers, tcp: false, timeout_seconds: None })
    } else if let Some(tcp) = &probe.tcp_socket {
        if has_host(&tcp.host) {
            return None;
        }
        let port = resolve_port(&tcp.port, ports)?;
        Some(AppProbe { port, path: None, headers: Vec::new(), tcp: true, timeout_seconds: None })
    } else {
        None
    }
}

/// A probe's port: a number, or the name of one of the container's TCP ports. `None` when the
/// name resolves to nothing: the probe is then left unchanged.
fn resolve_port(port: &IntOrString, ports: &[ContainerPort]) -> Option<u16> {
    let number = match port {
        IntOrString::Int(number) => *number,
        IntOrString::String(name) => {
            ports
                .iter()
                .find(|p| {
                    p.name.as_deref() == Some(name.as_str())
                        && p.protocol.as_deref().is_none_or(|protocol| protocol == "TCP")
                })?
                .container_port
        }
    };
    u16::try_from(number).ok().filter(|port| *port != 0)
}

/// Bytes of a path and query (RFC 3986) that every HTTP stack takes as they are.
fn is_request_target_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&byte)
}

/// A header the proxy can send: a token name (RFC 9110) and a value of visible ASCII, spaces
/// and tabs.
fn valid_header(name: &str, value: &str) -> bool {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    !name.is_empty()
        && name.bytes().all(token)
        && value.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
}

fn volumes(config: &InjectConfig) -> [Volume; 2] {
    [
        Volume {
            name: TOKEN_VOLUME.to_owned(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(config.token_audience.clone()),
                        expiration_seconds: Some(config.token_expiration_seconds),
                        path: "token".to_owned(),
                    }),
                    ..VolumeProjection::default()
                }]),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: TRUST_BUNDLE_VOLUME.to_owned(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    // Required: the operator keeps it in every injected namespace, and a proxy
                    // without the bundle can trust neither the CA nor its peers. A pod created
                    // before the ConfigMap waits in ContainerCreating until it exists.
                    config_map: Some(ConfigMapProjection {
                        name: config.trust_bundle_config_map.clone(),
                        optional: Some(false),
                        items: Some(vec![KeyToPath {
                            key: "ca.crt".to_owned(),
                            path: "ca.crt".to_owned(),
                            ..KeyToPath::default()
                        }]),
                    }),
                    ..VolumeProjection::default()
                }]),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_compare_by_value() {
        assert_eq!(quantity_value("100m"), Some(0.1));
        assert_eq!(quantity_value("64Mi"), Some(67108864.0));
        assert_eq!(quantity_value("1G"), Some(1e9));
        assert_eq!(quantity_value("2"), Some(2.0));
        for bad in ["", "Mi", "1.2.3", "-1", ".5", "10 Mi", "1x"] {
            assert_eq!(quantity_value(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn port_and_cidr_lists_are_checked_item_by_item() {
        assert_eq!(parse_ports("a", " 80, 443 ,").unwrap(), vec![80, 443]);
        assert!(parse_ports("a", "80,0").is_err());
        assert!(parse_ports("a", "80,http").is_err());
        assert_eq!(
            parse_cidrs("a", "10.0.0.0/8, 1.2.3.4,fd00::/8").unwrap(),
            vec!["10.0.0.0/8", "1.2.3.4", "fd00::/8"]
        );
        assert!(parse_cidrs("a", "10.0.0.0/33").is_err());
        assert!(parse_cidrs("a", "example.com").is_err());
    }

    #[test]
    fn original_probes_read_paths_ports_and_headers_as_the_kubelet_does() {
        let named = |name: &str, port: i32, protocol: Option<&str>| ContainerPort {
            name: Some(name.to_owned()),
            container_port: port,
            protocol: protocol.map(str::to_owned),
            ..ContainerPort::default()
        };
        let ports = [named("http", 8080, None), named("dns", 5353, Some("UDP"))];
        assert_eq!(resolve_port(&IntOrString::Int(80), &ports), Some(80));
        assert_eq!(resolve_port(&IntOrString::String("http".into()), &ports), Some(8080));
        assert_eq!(resolve_port(&IntOrString::String("dns".into()), &ports), None, "not TCP");
        assert_eq!(resolve_port(&IntOrString::String("nope".into()), &ports), None);
        assert_eq!(resolve_port(&IntOrString::Int(0), &ports), None);
        assert_eq!(resolve_port(&IntOrString::Int(70000), &ports), None);

        let http = |path: Option<&str>, headers: &[(&str, &str)]| Probe {
            http_get: Some(HTTPGetAction {
                path: path.map(str::to_owned),
                port: IntOrString::Int(8080),
                http_headers: Some(
                    headers
                        .iter()
                        .map(|(n, v)| HTTPHeader { name: (*n).to_owned(), value: (*v).to_owned() })
                        .collect(),
                ),
                ..HTTPGetAction::default()
            }),
            ..Probe::default()
        };
        let path = |probe: &Probe| original_probe(probe, &[]).and_then(|p| p.path);
        assert_eq!(path(&http(None, &[])).as_deref(), Some("/"));
        assert_eq!(path(&http(Some("healthz"), &[])).as_deref(), Some("/healthz"));
        assert_eq!(path(&http(Some("/h?a=1&b=%20"), &[])).as_deref(), Some("/h?a=1&b=%20"));
        assert_eq!(path(&http(Some("/a b"), &[])), None, "not a valid request target");
        assert_eq!(path(&http(Some("/h?a#frag"), &[])).as_deref(), Some("/h?a"));
        assert!(original_probe(&http(None, &[("X-A", "b c\t")]), &[]).is_some());
        assert!(original_probe(&http(None, &[("X A", "b")]), &[]).is_none());
        assert!(original_probe(&http(None, &[("X-A", "b\r\nc")]), &[]).is_none());

        let mut other_host = http(None, &[]);
        other_host.http_get.as_mut().unwrap().host = Some("10.0.0.1".to_owned());
        assert!(original_probe(&other_host, &[]).is_none());
        let mut lower_case_scheme = http(None, &[]);
        lower_case_scheme.http_get.as_mut().unwrap().scheme = Some("https".to_owned());
        assert!(original_probe(&lower_case_scheme, &[]).is_none());
    }
}
