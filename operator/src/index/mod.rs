//! The index: every watched object, translated into a compact form on `apply`, and
//! [`Index::resolve`], a pure function of them that produces the per-service proxy config (in the
//! `weft-proto` shape), each workload's inbound policy and the status every custom resource
//! should carry. No I/O and no `.await` anywhere in this module: the controllers feed it, the
//! config server and the status writer read what it resolves.
//!
//! ```text
//! [ VirtualService ] --hosts--> [ Service ] <--host-- [ DestinationRule (subsets) ]
//!                                   |
//!                    [ EndpointSlice ] --targetRef--> [ Pod (labels, serviceAccount, identity, workload) ]
//!                                                          ^
//!            [ PeerAuthentication / AuthorizationPolicy ] -+- selector
//! ```

mod resolve;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::{
        core::v1::{Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    jiff::Timestamp,
};
use kube::ResourceExt;
use weft_api::{
    AuthorizationPolicy, DestinationRule, PeerAuthentication, Status, VirtualService,
    labels::{DRY_RUN_ANNOTATION, ISTIO_DRY_RUN_ANNOTATION},
    networking::{DestinationRuleSpec, VirtualServiceSpec},
    security::{AuthorizationPolicySpec, PeerAuthenticationSpec},
    workload::{is_meshed, workload_name},
};
use weft_identity::SpiffeId;
use weft_proto::v1 as pb;

pub use resolve::{Condition, DesiredStatus, Resolution};

/// The kinds the index holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    VirtualService,
    DestinationRule,
    PeerAuthentication,
    AuthorizationPolicy,
    Service,
    EndpointSlice,
    Pod,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::PeerAuthentication,
        Kind::AuthorizationPolicy,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
        }
    }
}

/// The fully qualified name a host names from namespace `ns`, as DNS search paths would resolve
/// it: `reviews` (in `ns`), `reviews.prod`, `reviews.prod.svc` and
/// `reviews.prod.svc.cluster.local` all name `reviews.prod.svc.cluster.local`; anything else with
/// two or more dots is kept as written (and names no Service).
pub fn fqdn(host: &str, ns: &str, domain: &str) -> String {
    let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
    if host.ends_with(&format!(".svc.{domain}")) {
        host
    } else if host.ends_with(".svc") && host.matches('.').count() == 2 {
        format!("{host}.{domain}")
    } else {
        match host.matches('.').count() {
            0 => format!("{host}.{ns}.svc.{domain}"),
            1 => format!("{host}.svc.{domain}"),
            _ => host,
        }
    }
}

/// A namespaced object's name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Key {
        Key { namespace: namespace.into(), name: name.into() }
    }

    fn of(obj: &impl kube::Resource) -> Key {
        Key::new(obj.namespace().unwrap_or_default(), obj.name_any())
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One object of any kind, as the controllers deliver it.
#[derive(Clone, Debug)]
pub enum Object {
    VirtualService(Box<VirtualService>),
    DestinationRule(Box<DestinationRule>),
    PeerAuthentication(Box<PeerAuthentication>),
    AuthorizationPolicy(Box<AuthorizationPolicy>),
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Pod(Box<Pod>),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::VirtualService(_) => Kind::VirtualService,
            Object::DestinationRule(_) => Kind::DestinationRule,
            Object::PeerAuthentication(_) => Kind::PeerAuthentication,
            Object::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Pod(_) => Kind::Pod,
        }
    }
}

/// A change to apply to the index.
#[derive(Clone, Debug)]
pub enum Change {
    /// Created or updated.
    Apply(Object),
    Delete(Kind, Key),
    /// The full current list of one kind (a watch (re)started): everything else of that kind is gone.
    Reset(Kind, Vec<Object>),
}

/// Settings of the resolution.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `cluster.local`: services are `<name>.<namespace>.svc.<domain>`.
    pub cluster_domain: String,
    /// PeerAuthentication here without a selector applies mesh-wide.
    pub root_namespace: String,
    /// SPIFFE trust domain of meshed endpoints' identities: `spiffe://<domain>/ns/<ns>/sa/<sa>`.
    pub trust_domain: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            cluster_domain: "cluster.local".into(),
            root_namespace: "weft-system".into(),
            trust_domain: "cluster.local".into(),
        }
    }
}

/// A custom resource as the index keeps it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Crd<S> {
    pub generation: Option<i64>,
    pub created: Option<Timestamp>,
    pub spec: S,
    /// The status the object carries now (what the status writer compares against).
    pub status: Option<Status>,
    /// What its dry-run annotations say (only AuthorizationPolicy reads it).
    pub dry_run: DryRun,
}

/// An object's dry-run annotations, [`DRY_RUN_ANNOTATION`] or Istio's
/// [`ISTIO_DRY_RUN_ANNOTATION`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct DryRun {
    /// Either says `"true"`: evaluated and counted, never enforced.
    pub on: bool,
    /// `<annotation>: <value>` for each that says neither `"true"` nor `"false"` (it does not
    /// make a dry run, and the status says so).
    pub unrecognized: Vec<String>,
}

impl DryRun {
    fn of(meta: &ObjectMeta) -> DryRun {
        let mut dry_run = DryRun::default();
        for name in [DRY_RUN_ANNOTATION, ISTIO_DRY_RUN_ANNOTATION] {
            match meta.annotations.as_ref().and_then(|a| a.get(name)).map(String::as_str) {
                Some("true") => dry_run.on = true,
                None | Some("false") => {}
                Some(other) => dry_run.unrecognized.push(format!("{name}: {other:?}")),
            }
        }
        dry_run
    }
}

impl<S> Crd<S> {
    /// Oldest first: creation time, then namespace/name. Objects without a timestamp (not yet
    /// stored by the apiserver) sort last.
    fn age_key<'a>(&self, key: &'a Key) -> (bool, Option<Timestamp>, &'a Key) {
        (self.created.is_none(), self.created, key)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Svc {
    pub cluster_ips: Vec<String>,
    pub ports: Vec<SvcPort>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SvcPort {
    pub name: String,
    pub port: u32,
    pub protocol: pb::Protocol,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Slice {
    /// The Service (same namespace) it belongs to: label `kubernetes.io/service-name`.
    pub service: String,
    /// Port name (empty when unnamed) to target port.
    pub ports: Vec<(String, u32)>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SliceEndpoint {
    pub addresses: Vec<String>,
    pub ready: bool,
    /// The pod behind it (targetRef of kind Pod), for labels, identity and workload.
    pub pod: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PodInfo {
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    /// Its SPIFFE ID when a Weft proxy runs beside it (peers then originate mTLS to it), else
    /// empty. Computed here, once per pod change, not per endpoint and port on every resolve.
    pub identity: String,
    /// Its Deployment, StatefulSet, ... name (see [`weft_api::workload::workload_name`]).
    pub workload: String,
}

/// Everything the controllers have seen, translated into what the resolution reads. One task
/// owns it; nothing else touches it.
#[derive(Clone, Debug, Default)]
pub struct Index {
    pub(crate) settings: Settings,
    pub(crate) virtual_services: BTreeMap<Key, Crd<VirtualServiceSpec>>,
    pub(crate) destination_rules: BTreeMap<Key, Crd<DestinationRuleSpec>>,
    pub(crate) peer_authentications: BTreeMap<Key, Crd<PeerAuthenticationSpec>>,
    pub(crate) authorization_policies: BTreeMap<Key, Crd<AuthorizationPolicySpec>>,
    pub(crate) services: BTreeMap<Key, Svc>,
    pub(crate) slices: BTreeMap<Key, Slice>,
    pub(crate) pods: BTreeMap<Key, PodInfo>,
}

impl Index {
    pub fn new(settings: Settings) -> Index {
        Index { settings, ..Index::default() }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Applies one change. Returns whether anything the resolution reads changed (a Pod status
    /// update that leaves labels, service account, mesh membership and workload alone returns
    /// false).
    pub fn change(&mut self, change: Change) -> bool {
        match change {
            Change::Apply(obj) => self.apply(obj),
            Change::Delete(kind, key) => self.delete(kind, &key),
            Change::Reset(kind, objects) => {
                let keep: BTreeSet<Key> = objects.iter().map(object_key).collect();
                let mut changed = self.retain(kind, &keep);
                for obj in objects {
                    changed |= self.apply(obj);
                }
                changed
            }
        }
    }

    pub fn apply(&mut self, obj: Object) -> bool {
        let key = object_key(&obj);
        match obj {
            Object::VirtualService(vs) => put(&mut self.virtual_services, key, crd(*vs, |o| o.spec)),
            Object::DestinationRule(dr) => put(&mut self.destination_rules, key, crd(*dr, |o| o.spec)),
            Object::PeerAuthentication(pa) => put(&mut self.peer_authentications, key, crd(*pa, |o| o.spec)),
            Object::AuthorizationPolicy(ap) => {
                put(&mut self.authorization_policies, key, crd(*ap, |o| o.spec))
            }
            Object::Service(svc) => match translate_service(&svc) {
                Some(s) => put(&mut self.services, key, s),
                None => self.services.remove(&key).is_some(),
            },
            Object::EndpointSlice(slice) => match translate_slice(&slice) {
                Some(s) => put(&mut self.slices, key, s),
                None => self.slices.remove(&key).is_some(),
            },
            Object::Pod(pod) => {
                let info = translate_pod(&pod, &self.settings.trust_domain);
                put(&mut self.pods, key, info)
            }
        }
    }

    pub fn delete(&mut self, kind: Kind, key: &Key) -> bool {
        match kind {
            Kind::VirtualService => self.virtual_services.remove(key).is_some(),
            Kind::DestinationRule => self.destination_rules.remove(key).is_some(),
            Kind::PeerAuthentication => self.peer_authentications.remove(key).is_some(),
            Kind::AuthorizationPolicy => self.authorization_policies.remove(key).is_some(),
            Kind::Service => self.services.remove(key).is_some(),
            Kind::EndpointSlice => self.slices.remove(key).is_some(),
            Kind::Pod => self.pods.remove(key).is_some(),
        }
    }

    fn retain(&mut self, kind: Kind, keep: &BTreeSet<Key>) -> bool {
        fn retain<V>(map: &mut BTreeMap<Key, V>, keep: &BTreeSet<Key>) -> bool {
            let before = map.len();
            map.retain(|k, _| keep.contains(k));
            map.len() != before
        }
        match kind {
            Kind::VirtualService => retain(&mut self.virtual_services, keep),
            Kind::DestinationRule => retain(&mut self.destination_rules, keep),
            Kind::PeerAuthentication => retain(&mut self.peer_authentications, keep),
            Kind::AuthorizationPolicy => retain(&mut self.authorization_policies, keep),
            Kind::Service => retain(&mut self.services, keep),
            Kind::EndpointSlice => retain(&mut self.slices, keep),
            Kind::Pod => retain(&mut self.pods, keep),
        }
    }

    /// How many objects of each kind the index holds.
    pub fn counts(&self) -> BTreeMap<Kind, usize> {
        BTreeMap::from([
            (Kind::VirtualService, self.virtual_services.len()),
            (Kind::DestinationRule, self.destination_rules.len()),
            (Kind::PeerAuthentication, self.peer_authentications.len()),
            (Kind::AuthorizationPolicy, self.authorization_policies.len()),
            (Kind::Service, self.services.len()),
            (Kind::EndpointSlice, self.slices.len()),
            (Kind::Pod, self.pods.len()),
        ])
    }
}

fn object_key(obj: &Object) -> Key {
    match obj {
        Object::VirtualService(o) => Key::of(o.as_ref()),
        Object::DestinationRule(o) => Key::of(o.as_ref()),
        Object::PeerAuthentication(o) => Key::of(o.as_ref()),
        Object::AuthorizationPolicy(o) => Key::of(o.as_ref()),
        Object::Service(o) => Key::of(o.as_ref()),
        Object::EndpointSlice(o) => Key::of(o.as_ref()),
        Object::Pod(o) => Key::of(o.as_ref()),
    }
}

fn put<V: PartialEq>(map: &mut BTreeMap<Key, V>, key: Key, value: V) -> bool {
    match map.get(&key) {
        Some(old) if *old == value => false,
        _ => {
            map.insert(key, value);
            true
        }
    }
}

fn crd<K, S>(obj: K, spec: impl FnOnce(K) -> S) -> Crd<S>
where
    K: kube::Resource + HasStatus,
{
    let generation = obj.meta().generation;
    let created = obj.meta().creation_timestamp.as_ref().map(|t| t.0);
    let status = obj.status_of();
    let dry_run = DryRun::of(obj.meta());
    Crd { generation, created, status, dry_run, spec: spec(obj) }
}

/// The status a custom resource carries.
pub(crate) trait HasStatus {
    fn status_of(&self) -> Option<Status>;
}

macro_rules! has_status {
    ($($t:ty),*) => {$(
        impl HasStatus for $t {
            fn status_of(&self) -> Option<Status> {
                self.status.clone()
            }
        }
    )*};
}
has_status!(VirtualService, DestinationRule, PeerAuthentication, AuthorizationPolicy);

/// The hint for a service port, from `appProtocol`, else the port name's prefix (Istio's
/// convention: `http`, `http-web`, `grpc-api`, `tcp-db`), else detection.
pub(crate) fn port_protocol(name: &str, app_protocol: Option<&str>) -> pb::Protocol {
    let by_name = |n: &str| match n.split('-').next().unwrap_or_default() {
        "http" => Some(pb::Protocol::Http1),
        "http2" | "h2c" => Some(pb::Protocol::Http2),
        "grpc" => Some(pb::Protocol::Grpc), // `grpc-web` too: the name is cut at its first `-`
        "tcp" | "tls" | "https" | "mongo" | "redis" => Some(pb::Protocol::Tcp),
        "mysql" | "smtp" | "postgres" => Some(pb::Protocol::ServerFirst),
        _ => None,
    };
    let app = app_protocol.map(|a| a.to_ascii_lowercase());
    match app.as_deref() {
        Some("kubernetes.io/h2c") => pb::Protocol::Http2,
        Some("kubernetes.io/ws" | "kubernetes.io/wss") => pb::Protocol::Http1,
        Some(a) => by_name(a).unwrap_or(pb::Protocol::Unspecified),
        None => by_name(&name.to_ascii_lowercase()).unwrap_or(pb::Protocol::Unspecified),
    }
}

/// `None` for services the mesh does not route: ExternalName.
fn translate_service(svc: &Service) -> Option<Svc> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let mut cluster_ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if cluster_ips.is_empty() {
        cluster_ips.extend(spec.cluster_ip.clone());
    }
    cluster_ips.retain(|ip| !ip.is_empty() && ip != "None");
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .map(|p| {
            let name = p.name.clone().unwrap_or_default();
            SvcPort {
                protocol: port_protocol(&name, p.app_protocol.as_deref()),
                name,
                port: u32::try_from(p.port).unwrap_or_default(),
            }
        })
        .collect();
    Some(Svc { cluster_ips, ports })
}

/// `None` for slices that belong to no Service.
fn translate_slice(slice: &EndpointSlice) -> Option<Slice> {
    let service = slice.labels().get("kubernetes.io/service-name")?.clone();
    let ports = slice
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| Some((p.name.clone().unwrap_or_default(), u32::try_from(p.port?).ok()?)))
        .collect();
    let endpoints = slice
        .endpoints
        .iter()
        .map(|e| SliceEndpoint {
            addresses: e.addresses.clone(),
            // Unknown readiness counts as ready (the EndpointSlice API's rule).
            ready: e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
            pod: e
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.clone()),
        })
        .collect();
    Some(Slice { service, ports, endpoints })
}

fn translate_pod(pod: &Pod, trust_domain: &str) -> PodInfo {
    let service_account =
        pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
    // Empty if the names do not form an ID; the apiserver's name rules and the trust-domain
    // flag's check make that unreachable.
    let identity = is_meshed(&pod.metadata, pod.spec.as_ref())
        .then(|| SpiffeId::new(trust_domain, &pod.namespace().unwrap_or_default(), &service_account).ok())
        .flatten()
        .map(|id| id.to_string())
        .unwrap_or_default();
    PodInfo {
        labels: pod.labels().clone(),
        service_account,
        identity,
        workload: workload_name(&pod.metadata).to_owned(),
    }
}
