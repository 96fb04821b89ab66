//! The index without a cluster: objects in, resolution out.

use k8s_openapi::{
    api::{
        core::v1::{Pod, Service},
        discovery::v1::EndpointSlice,
    },
    jiff::Timestamp,
};
use serde_json::{Value, json};
use weft_api::{AuthorizationPolicy, DestinationRule, PeerAuthentication, VirtualService};
use weft_proto::v1 as pb;

use super::*;

const NS: &str = "shop";

fn meta(ns: &str, name: &str, created: i64) -> Value {
    let ts = Timestamp::from_second(1_700_000_000 + created).unwrap().to_string();
    json!({"namespace": ns, "name": name, "creationTimestamp": ts, "generation": 1})
}

fn mk_service(ns: &str, name: &str, ip: &str, ports: &[(&str, i32)]) -> Object {
    let ports: Vec<Value> = ports.iter().map(|(n, p)| json!({"name": n, "port": p})).collect();
    let svc: Service = serde_json::from_value(json!({
        "metadata": meta(ns, name, 0),
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": ports},
    }))
    .unwrap();
    Object::Service(Box::new(svc))
}

/// A slice of `service` with endpoints `(ip, pod, ready)` on target port `port` named `port_name`.
fn mk_slice(
    ns: &str,
    name: &str,
    service: &str,
    port_name: &str,
    port: i32,
    eps: &[(&str, &str, bool)],
) -> Object {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|(ip, pod, ready)| {
            json!({"addresses": [ip], "conditions": {"ready": ready},
                   "targetRef": {"kind": "Pod", "name": pod, "namespace": ns}})
        })
        .collect();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .unwrap();
    Object::EndpointSlice(Box::new(slice))
}

fn mk_pod(ns: &str, name: &str, labels: Value) -> Object {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "spec": {"serviceAccountName": "reviews", "containers": [{"name": "app"}]},
    }))
    .unwrap();
    Object::Pod(Box::new(pod))
}

/// A pod from its whole metadata (namespace added) and spec.
fn mk_pod_from(ns: &str, mut metadata: Value, spec: Value) -> Object {
    metadata["namespace"] = ns.into();
    let pod: Pod = serde_json::from_value(json!({"metadata": metadata, "spec": spec})).unwrap();
    Object::Pod(Box::new(pod))
}

fn mk_vs(ns: &str, name: &str, created: i64, spec: Value) -> Object {
    let vs: VirtualService =
        serde_json::from_value(json!({"metadata": meta(ns, name, created), "spec": spec})).unwrap();
    Object::VirtualService(Box::new(vs))
}

fn mk_dr(ns: &str, name: &str, created: i64, spec: Value) -> Object {
    let dr: DestinationRule =
        serde_json::from_value(json!({"metadata": meta(ns, name, created), "spec": spec})).unwrap();
    Object::DestinationRule(Box::new(dr))
}

fn mk_pa(ns: &str, name: &str, created: i64, spec: Value) -> Object {
    let pa: PeerAuthentication =
        serde_json::from_value(json!({"metadata": meta(ns, name, created), "spec": spec})).unwrap();
    Object::PeerAuthentication(Box::new(pa))
}

fn mk_ap(ns: &str, name: &str, spec: Value) -> Object {
    let ap: AuthorizationPolicy =
        serde_json::from_value(json!({"metadata": meta(ns, name, 0), "spec": spec})).unwrap();
    Object::AuthorizationPolicy(Box::new(ap))
}

/// An AuthorizationPolicy with annotations.
fn mk_ap_annotated(ns: &str, name: &str, annotations: Value, spec: Value) -> Object {
    let mut metadata = meta(ns, name, 0);
    metadata["annotations"] = annotations;
    let ap: AuthorizationPolicy =
        serde_json::from_value(json!({"metadata": metadata, "spec": spec})).unwrap();
    Object::AuthorizationPolicy(Box::new(ap))
}

fn reviews_subsets() -> Value {
    json!({"host": "reviews", "subsets": [
        {"name": "v1", "labels": {"version": "v1"}},
        {"name": "v2", "labels": {"version": "v2"}},
    ]})
}

/// `reviews` (two pods, v1 and v2) and `ratings` in `shop`, `details` in `other`.
fn bookinfo() -> Index {
    let mut index = Index::new(Settings::default());
    for obj in [
        mk_service(NS, "reviews", "10.0.0.10", &[("http", 9080)]),
        mk_service(NS, "ratings", "10.0.0.11", &[("http", 9080)]),
        mk_service("other", "details", "10.0.0.12", &[("grpc-api", 9090), ("tcp-db", 5432)]),
        mk_pod(NS, "reviews-v1", json!({"app": "reviews", "version": "v1"})),
        mk_pod(NS, "reviews-v2", json!({"app": "reviews", "version": "v2"})),
        mk_slice(
            NS,
            "reviews-a",
            "reviews",
            "http",
            8080,
            &[("10.1.0.1", "reviews-v1", true), ("10.1.0.2", "reviews-v2", true)],
        ),
    ] {
        index.apply(obj);
    }
    index
}

fn weights(svc: &pb::Service, rule: usize) -> Vec<(String, String, u32)> {
    svc.http_routes[rule]
        .route
        .iter()
        .map(|w| {
            let d = w.destination.as_ref().unwrap();
            (d.host.clone(), d.subset.clone(), w.weight)
        })
        .collect()
}

fn status(r: &Resolution, kind: Kind, ns: &str, name: &str) -> DesiredStatus {
    r.statuses.get(&(kind, Key::new(ns, name))).cloned().unwrap_or_else(|| panic!("no status for {name}"))
}

const REVIEWS: &str = "reviews.shop.svc.cluster.local";

/// The proxy must accept everything the index emits: compile it as the proxy does, with each
/// workload's inbound policy (a policy it refuses would cost that proxy every later update).
fn proxy_accepts(r: &Resolution) {
    let config = pb::ProxyConfig {
        version: "test".into(),
        services: r.services.values().map(|s| (**s).clone()).collect(),
        inbound: None,
    };
    if let Err(e) = weft_proxy::config::compile(config.clone(), None) {
        panic!("the proxy rejects the resolved config: {e}");
    }
    for (workload, inbound) in &r.workloads {
        let config = pb::ProxyConfig { inbound: Some(inbound.as_ref().clone()), ..config.clone() };
        if let Err(e) = weft_proxy::config::compile(config, None) {
            panic!("the proxy rejects the inbound policy of {workload}: {e}\n{inbound:#?}");
        }
    }
}

#[test]
fn host_names_resolve_like_dns_search_paths() {
    let index = bookinfo();
    assert_eq!(index.fqdn("reviews", NS), REVIEWS);
    assert_eq!(index.fqdn("Reviews.shop", "x"), REVIEWS);
    assert_eq!(index.fqdn("reviews.shop.svc", "x"), REVIEWS);
    assert_eq!(index.fqdn("reviews.shop.svc.cluster.local.", "x"), REVIEWS);
    assert_eq!(index.fqdn("example.com.", NS), "example.com.svc.cluster.local");
    assert_eq!(index.fqdn("api.example.com", NS), "api.example.com");
}

#[test]
fn services_carry_addresses_ports_protocols_and_ready_endpoints_with_pod_labels() {
    let mut index = bookinfo();
    index.apply(mk_slice(
        NS,
        "reviews-b",
        "reviews",
        "http",
        8080,
        &[
            ("10.1.0.2", "reviews-v2", true), // also in reviews-a: listed once
            ("10.1.0.3", "reviews-v3", false),
        ],
    ));
    let r = index.resolve();
    let svc = &r.services[REVIEWS];
    assert_eq!(svc.aliases, ["reviews.shop", "reviews.shop.svc"]);
    assert_eq!(svc.addresses, ["10.0.0.10"]);
    assert_eq!(r.by_address["10.0.0.10"], REVIEWS);
    let port = &svc.ports[0];
    assert_eq!((port.number, port.protocol()), (9080, pb::Protocol::Http1));
    let eps: Vec<_> =
        port.endpoints.iter().map(|e| (e.address.as_str(), e.labels["version"].as_str())).collect();
    assert_eq!(eps, [("10.1.0.1:8080", "v1"), ("10.1.0.2:8080", "v2")]);
    let details = &r.services["details.other.svc.cluster.local"];
    let protos: Vec<_> = details.ports.iter().map(|p| p.protocol()).collect();
    assert_eq!(protos, [pb::Protocol::Grpc, pb::Protocol::Tcp]);
    assert!(details.ports[0].endpoints.is_empty(), "no slices yet");
    proxy_accepts(&r);
}

#[test]
fn port_hints_come_from_app_protocol_then_the_name() {
    assert_eq!(port_protocol("web", Some("kubernetes.io/h2c")), pb::Protocol::Http2);
    assert_eq!(port_protocol("web", Some("grpc")), pb::Protocol::Grpc);
    assert_eq!(port_protocol("http-web", None), pb::Protocol::Http1);
    assert_eq!(port_protocol("mysql", None), pb::Protocol::ServerFirst);
    assert_eq!(port_protocol("web", None), pb::Protocol::Unspecified);
    assert_eq!(port_protocol("", None), pb::Protocol::Unspecified);
}

#[test]
fn subsets_by_labels_and_weighted_routes_with_short_names() {
    let mut index = bookinfo();
    index.apply(mk_dr(NS, "reviews", 0, reviews_subsets()));
    index.apply(mk_vs(NS, "reviews", 0, json!({"hosts": ["reviews"], "http": [
        {"match": [{"headers": {"x-user": {"exact": "jason"}}}], "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
        {"route": [
            {"destination": {"host": "reviews", "subset": "v1"}, "weight": 90},
            {"destination": {"host": "reviews.shop.svc.cluster.local", "subset": "v2"}, "weight": 10},
        ], "timeout": "1.5s"},
    ]})));
    let r = index.resolve();
    let svc = &r.services[REVIEWS];
    let subsets: Vec<_> =
        svc.subsets.iter().map(|s| (s.name.as_str(), s.labels["version"].as_str())).collect();
    assert_eq!(subsets, [("v1", "v1"), ("v2", "v2")]);
    assert_eq!(weights(svc, 0), [(REVIEWS.into(), "v2".into(), 0)]);
    assert_eq!(weights(svc, 1), [(REVIEWS.into(), "v1".into(), 90), (REVIEWS.into(), "v2".into(), 10)]);
    assert_eq!(svc.http_routes[1].timeout_ms, 1500);
    assert_eq!(svc.http_routes[1].name, "reviews.1");
    let header = &svc.http_routes[0].matches[0].headers["x-user"];
    assert_eq!(header.kind, Some(pb::string_match::Kind::Exact("jason".into())));
    let st = status(&r, Kind::VirtualService, NS, "reviews");
    assert!(st.accepted.ok && st.resolved_refs.ok, "{st:?}");
    assert_eq!(st.generation, Some(1));
    assert!(status(&r, Kind::DestinationRule, NS, "reviews").accepted.ok);
    proxy_accepts(&r);
}

#[test]
fn an_unknown_subset_is_named_with_its_destination_rule_and_left_out() {
    let mut index = bookinfo();
    index.apply(mk_dr(NS, "reviews", 0, reviews_subsets()));
    index.apply(mk_vs(
        NS,
        "reviews",
        0,
        json!({"hosts": ["reviews"], "http": [{"route": [
            {"destination": {"host": "reviews", "subset": "v1"}, "weight": 50},
            {"destination": {"host": "reviews", "subset": "v3"}, "weight": 50},
        ]}]}),
    ));
    let r = index.resolve();
    let st = status(&r, Kind::VirtualService, NS, "reviews");
    assert!(st.accepted.ok);
    assert!(!st.resolved_refs.ok);
    assert_eq!(st.resolved_refs.reason, "RefNotFound");
    assert_eq!(st.resolved_refs.message, "subset v3 not defined in DestinationRule reviews");
    assert_eq!(weights(&r.services[REVIEWS], 0), [(REVIEWS.into(), "v1".into(), 50)]);
    proxy_accepts(&r);

    // Without any DestinationRule for the host.
    let mut index = bookinfo();
    index.apply(mk_vs(
        NS,
        "reviews",
        0,
        json!({"hosts": ["reviews"], "http": [{"route": [
            {"destination": {"host": "reviews", "subset": "v1"}},
        ]}]}),
    ));
    let r = index.resolve();
    let st = status(&r, Kind::VirtualService, NS, "reviews");
    assert_eq!(
        st.resolved_refs.message,
        format!("subset v1 of host reviews not defined: no DestinationRule for {REVIEWS}")
    );
    // Nothing left to route to: those requests fail visibly.
    let rule = &r.services[REVIEWS].http_routes[0];
    assert!(rule.route.is_empty());
    assert_eq!(rule.direct_response.as_ref().unwrap().status, 503);
    proxy_accepts(&r);
}

#[test]
fn unknown_hosts_and_ports_are_reported() {
    let mut index = bookinfo();
    index.apply(mk_vs(
        NS,
        "mixed",
        0,
        json!({"hosts": ["reviews", "nope"], "http": [{"route": [
            {"destination": {"host": "ratings", "port": {"number": 1234}}, "weight": 30},
            {"destination": {"host": "missing"}, "weight": 30},
            {"destination": {"host": "details.other", "port": {"number": 9090}}, "weight": 40},
        ]}]}),
    ));
    index.apply(mk_dr(NS, "ghost", 0, json!({"host": "ghost"})));
    let r = index.resolve();
    let st = status(&r, Kind::VirtualService, NS, "mixed");
    assert!(st.accepted.ok);
    assert_eq!(
        st.resolved_refs.message,
        "port 1234 not defined in Service ratings.shop.svc.cluster.local; \
         host missing not found (no Service missing.shop.svc.cluster.local); \
         host nope not found (no Service nope.shop.svc.cluster.local)"
    );
    assert_eq!(
        weights(&r.services[REVIEWS], 0),
        [("details.other.svc.cluster.local".into(), String::new(), 40)]
    );
    assert!(!r.services.contains_key("nope.shop.svc.cluster.local"));
    let dr = status(&r, Kind::DestinationRule, NS, "ghost");
    assert_eq!(dr.resolved_refs.message, "host ghost not found (no Service ghost.shop.svc.cluster.local)");
    proxy_accepts(&r);
}

#[test]
fn conflicting_virtual_services_oldest_wins_and_the_loser_names_the_winner() {
    let mut index = bookinfo();
    let route = |subset: &str| json!({"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews", "subset": subset}}]}]});
    index.apply(mk_dr(NS, "reviews", 0, reviews_subsets()));
    index.apply(mk_vs(NS, "newer", 20, route("v2")));
    index.apply(mk_vs(NS, "older", 10, route("v1")));
    // Same creation time: the name decides.
    index.apply(mk_vs(NS, "a-tie", 20, route("v2")));
    let r = index.resolve();
    assert_eq!(weights(&r.services[REVIEWS], 0), [(REVIEWS.into(), "v1".into(), 0)]);
    assert!(status(&r, Kind::VirtualService, NS, "older").accepted.ok);
    for loser in ["newer", "a-tie"] {
        let st = status(&r, Kind::VirtualService, NS, loser);
        assert!(!st.accepted.ok);
        assert_eq!(st.accepted.reason, "Conflict");
        assert_eq!(
            st.accepted.message,
            format!("host {REVIEWS} is already routed by VirtualService shop/older")
        );
        assert!(st.resolved_refs.ok, "its references resolve");
    }

    // The winner goes: the next oldest takes over and is accepted.
    assert!(index.delete(Kind::VirtualService, &Key::new(NS, "older")));
    let r = index.resolve();
    assert_eq!(weights(&r.services[REVIEWS], 0), [(REVIEWS.into(), "v2".into(), 0)]);
    assert!(status(&r, Kind::VirtualService, NS, "a-tie").accepted.ok);
    assert!(status(&r, Kind::VirtualService, NS, "newer").accepted.message.contains("shop/a-tie"));
    assert!(!r.statuses.contains_key(&(Kind::VirtualService, Key::new(NS, "older"))));

    // A host short name and its full name are the same host.
    index.apply(mk_vs(
        "other",
        "cross",
        0,
        json!({"hosts": ["reviews.shop"], "http": [{"route": [{"destination": {"host": "ratings.shop"}}]}]}),
    ));
    let r = index.resolve();
    assert_eq!(
        weights(&r.services[REVIEWS], 0),
        [("ratings.shop.svc.cluster.local".into(), String::new(), 0)]
    );
    assert!(!status(&r, Kind::VirtualService, NS, "a-tie").accepted.ok);
}

#[test]
fn conflicting_destination_rules_oldest_wins_and_policies_translate() {
    let mut index = bookinfo();
    index.apply(mk_dr(
        NS,
        "second",
        5,
        json!({"host": "reviews", "subsets": [{"name": "x", "labels": {"a": "b"}}]}),
    ));
    index.apply(mk_dr(NS, "first", 1, json!({
        "host": "reviews.shop.svc.cluster.local",
        "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"},
                          "connectionPool": {"tcp": {"connectTimeout": "250ms"}, "http": {"idleTimeout": "1m"}},
                          "outlierDetection": {"consecutive5xxErrors": 3}},
        "subsets": [{"name": "v1", "labels": {"version": "v1"}, "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}}],
    })));
    let r = index.resolve();
    let svc = &r.services[REVIEWS];
    let tp = svc.traffic_policy.as_ref().unwrap();
    assert_eq!(tp.load_balancer.as_ref().unwrap().policy(), pb::load_balancer::Policy::RoundRobin);
    assert_eq!(
        tp.connection_pool.unwrap(),
        pb::ConnectionPool { connect_timeout_ms: 250, idle_timeout_ms: 60_000, ..Default::default() }
    );
    assert_eq!(svc.subsets.len(), 1);
    assert_eq!(
        svc.subsets[0].traffic_policy.as_ref().unwrap().load_balancer.as_ref().unwrap().policy(),
        pb::load_balancer::Policy::Random
    );
    let first = status(&r, Kind::DestinationRule, NS, "first");
    assert!(first.accepted.ok);
    assert_eq!(first.accepted.message, "accepted");
    let second = status(&r, Kind::DestinationRule, NS, "second");
    assert_eq!(
        second.accepted.message,
        format!("host {REVIEWS} is already configured by DestinationRule shop/first")
    );
}

#[test]
fn deleting_objects_removes_what_they_contributed() {
    let mut index = bookinfo();
    index.apply(mk_vs(
        NS,
        "reviews",
        0,
        json!({"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "ratings"}}]}]}),
    ));
    assert_eq!(index.resolve().services[REVIEWS].http_routes.len(), 1);

    // The destination Service goes: the reference no longer resolves.
    assert!(index.delete(Kind::Service, &Key::new(NS, "ratings")));
    let r = index.resolve();
    assert!(!r.services.contains_key("ratings.shop.svc.cluster.local"));
    assert!(!r.by_address.contains_key("10.0.0.11"));
    assert!(!status(&r, Kind::VirtualService, NS, "reviews").resolved_refs.ok);
    proxy_accepts(&r);

    // The VirtualService goes: routes and status go with it.
    assert!(index.delete(Kind::VirtualService, &Key::new(NS, "reviews")));
    let r = index.resolve();
    assert!(r.services[REVIEWS].http_routes.is_empty());
    assert!(r.statuses.is_empty());
    assert!(!index.delete(Kind::VirtualService, &Key::new(NS, "reviews")), "already gone");

    // The routed Service goes.
    index.delete(Kind::Service, &Key::new(NS, "reviews"));
    assert!(!index.resolve().services.contains_key(REVIEWS));
}

#[test]
fn endpoint_churn_and_resets() {
    let mut index = bookinfo();
    let eps = |index: &Index| -> Vec<String> {
        index.resolve().services[REVIEWS].ports[0].endpoints.iter().map(|e| e.address.clone()).collect()
    };
    assert_eq!(eps(&index), ["10.1.0.1:8080", "10.1.0.2:8080"]);
    // Re-applying the same slice changes nothing.
    assert!(!index.apply(mk_slice(
        NS,
        "reviews-a",
        "reviews",
        "http",
        8080,
        &[("10.1.0.1", "reviews-v1", true), ("10.1.0.2", "reviews-v2", true),]
    )));
    // An endpoint turns unready, another appears.
    assert!(index.apply(mk_slice(
        NS,
        "reviews-a",
        "reviews",
        "http",
        8080,
        &[
            ("10.1.0.1", "reviews-v1", false),
            ("10.1.0.2", "reviews-v2", true),
            ("10.1.0.4", "reviews-v4", true),
        ]
    )));
    assert_eq!(eps(&index), ["10.1.0.2:8080", "10.1.0.4:8080"]);
    // A pod's labels change: the endpoint's labels follow.
    index.apply(mk_pod(NS, "reviews-v2", json!({"version": "v9"})));
    assert_eq!(index.resolve().services[REVIEWS].ports[0].endpoints[0].labels["version"], "v9");
    // A slice for an unnamed port does not match the named service port.
    index.apply(mk_slice(NS, "reviews-c", "reviews", "", 7000, &[("10.1.0.7", "x", true)]));
    assert_eq!(eps(&index).len(), 2);
    // A watch restart lists what exists now: the rest is forgotten.
    let changed = index.change(Change::Reset(
        Kind::EndpointSlice,
        vec![mk_slice(NS, "reviews-z", "reviews", "http", 8080, &[("10.1.0.9", "reviews-v1", true)])],
    ));
    assert!(changed);
    assert_eq!(eps(&index), ["10.1.0.9:8080"]);
    assert_eq!(index.counts()[&Kind::EndpointSlice], 1);
    assert!(!index.change(Change::Delete(Kind::EndpointSlice, Key::new(NS, "reviews-a"))));
    assert!(index.change(Change::Delete(Kind::EndpointSlice, Key::new(NS, "reviews-z"))));
    assert!(eps(&index).is_empty());
    proxy_accepts(&index.resolve());
}

/// `reviews-v1` as its Deployment's ReplicaSet creates it, with the injector's annotation.
fn meshed_reviews_v1() -> Object {
    mk_pod_from(
        NS,
        json!({
            "name": "reviews-v1",
            "labels": {"app": "reviews", "version": "v1", "pod-template-hash": "5d8f9c"},
            "annotations": {"weft.dev/injected": "{}"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "reviews-v1-5d8f9c",
                                 "uid": "u1", "controller": true}],
        }),
        json!({"serviceAccountName": "reviews", "containers": [{"name": "app"}]}),
    )
}

/// `(address, identity, workload)` of the endpoints of `reviews`.
fn reviews_endpoints(index: &Index) -> Vec<(String, String, String)> {
    let r = index.resolve();
    proxy_accepts(&r);
    let endpoints = &r.services[REVIEWS].ports[0].endpoints;
    endpoints.iter().map(|e| (e.address.clone(), e.identity.clone(), e.workload.clone())).collect()
}

fn triples(expected: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    expected.iter().map(|(a, i, w)| (a.to_string(), i.to_string(), w.to_string())).collect()
}

#[test]
fn meshed_endpoints_carry_their_identity_and_every_endpoint_its_workload() {
    let mut index = bookinfo();
    assert!(index.apply(meshed_reviews_v1()));
    // A slice endpoint whose pod the index has not seen: an address only.
    index.apply(mk_slice(NS, "reviews-b", "reviews", "http", 8080, &[("10.1.0.3", "reviews-v3", true)]));
    assert_eq!(
        reviews_endpoints(&index),
        triples(&[
            ("10.1.0.1:8080", "spiffe://cluster.local/ns/shop/sa/reviews", "reviews-v1"),
            ("10.1.0.2:8080", "", "reviews-v2"),
            ("10.1.0.3:8080", "", ""),
        ])
    );
    let labels = &index.resolve().services[REVIEWS].ports[0].endpoints[0].labels;
    assert_eq!(labels["version"], "v1", "labels are kept alongside");
}

#[test]
fn identities_use_the_configured_trust_domain_and_the_default_service_account() {
    let settings = Settings { trust_domain: "prod.example.org".into(), ..Settings::default() };
    let mut index = Index::new(settings);
    index.apply(mk_service(NS, "reviews", "10.0.0.10", &[("http", 9080)]));
    index.apply(meshed_reviews_v1());
    // Meshed by its native sidecar alone (the annotation stripped), no serviceAccountName.
    index.apply(mk_pod_from(
        NS,
        json!({"name": "reviews-v2"}),
        json!({"initContainers": [{"name": "weft-proxy"}], "containers": [{"name": "app"}]}),
    ));
    index.apply(mk_slice(
        NS,
        "reviews-a",
        "reviews",
        "http",
        8080,
        &[("10.1.0.1", "reviews-v1", true), ("10.1.0.2", "reviews-v2", true)],
    ));
    assert_eq!(
        reviews_endpoints(&index),
        triples(&[
            ("10.1.0.1:8080", "spiffe://prod.example.org/ns/shop/sa/reviews", "reviews-v1"),
            ("10.1.0.2:8080", "spiffe://prod.example.org/ns/shop/sa/default", "reviews-v2"),
        ])
    );
}

#[test]
fn a_pod_update_that_only_changes_mesh_membership_is_a_change() {
    let mut index = bookinfo();
    let v2 = |annotations: Value, init_containers: Value| {
        mk_pod_from(
            NS,
            json!({"name": "reviews-v2", "labels": {"app": "reviews", "version": "v2"}, "annotations": annotations}),
            json!({"serviceAccountName": "reviews", "initContainers": init_containers, "containers": [{"name": "app"}]}),
        )
    };
    let v2_identity = |index: &Index| reviews_endpoints(index)[1].1.clone();
    assert_eq!(v2_identity(&index), "");

    assert!(index.apply(v2(json!({"weft.dev/injected": "{}"}), json!([{"name": "weft-proxy"}]))));
    assert_eq!(v2_identity(&index), "spiffe://cluster.local/ns/shop/sa/reviews");
    // An annotation that does not change membership changes nothing the resolution reads.
    assert!(!index.apply(v2(json!({"example.com/note": "x"}), json!([{"name": "weft-proxy"}]))));
    // Neither the annotation nor the proxy: no longer meshed.
    assert!(index.apply(v2(json!({}), json!([]))));
    assert_eq!(v2_identity(&index), "");
    // The annotation alone: meshed again.
    assert!(index.apply(v2(json!({"weft.dev/injected": "{}"}), json!([]))));
    assert_eq!(v2_identity(&index), "spiffe://cluster.local/ns/shop/sa/reviews");
}

#[test]
fn invalid_virtual_services_are_not_used() {
    let mut index = bookinfo();
    index.apply(mk_vs(NS, "bad", 0, json!({"hosts": ["reviews"], "http": [
        {"match": [{"uri": {"regex": "/(unclosed"}}, {"headers": {"bad header": {"exact": "x"}}}], "route": [{"destination": {"host": "ratings"}}]},
    ]})));
    index.apply(mk_vs(
        NS,
        "good",
        5,
        json!({"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]}),
    ));
    let r = index.resolve();
    let st = status(&r, Kind::VirtualService, NS, "bad");
    assert!(!st.accepted.ok);
    assert_eq!(st.accepted.reason, "Invalid");
    assert!(
        st.accepted.message.starts_with("http[0].match[0].uri: invalid regex \"/(unclosed\""),
        "{}",
        st.accepted.message
    );
    assert!(st.accepted.message.contains("http[0].match[1].headers: invalid header name \"bad header\""));
    // The younger valid one gets the host.
    assert!(status(&r, Kind::VirtualService, NS, "good").accepted.ok);
    assert_eq!(weights(&r.services[REVIEWS], 0), [(REVIEWS.into(), String::new(), 0)]);
    proxy_accepts(&r);
}

#[test]
fn fields_proxies_do_not_enforce_yet_are_named() {
    let mut index = bookinfo();
    index.apply(mk_vs(NS, "r", 0, json!({"hosts": ["reviews"], "http": [{
        "route": [{"destination": {"host": "reviews"}}],
        "retries": {"attempts": 3}, "fault": {"abort": {"httpStatus": 500}},
        "mirror": {"host": "ratings"},
        "redirect": null,
    }], "tcp": [{"match": [{"port": 5432}], "route": [{"destination": {"host": "details.other", "port": {"number": 5432}}}]}]})));
    index.apply(mk_dr(
        NS,
        "d",
        0,
        json!({"host": "reviews", "trafficPolicy": {
        "connectionPool": {"http": {"h2UpgradePolicy": "UPGRADE", "http2MaxRequests": 10}},
        "outlierDetection": {}, "tls": {"mode": "DISABLE"}}}),
    ));
    let r = index.resolve();
    let st = status(&r, Kind::VirtualService, NS, "r");
    assert!(st.accepted.ok);
    // Retries, faults and mirrors are enforced now: only the TCP match is left.
    assert_eq!(st.accepted.message, "accepted; not yet enforced by proxies: tcp.match");
    let rule = &r.services[REVIEWS].http_routes[0];
    assert!(rule.retries.is_some() && rule.fault.is_some() && rule.mirror.is_some());
    assert_eq!(r.services[REVIEWS].tcp_routes.len(), 1);
    let st = status(&r, Kind::DestinationRule, NS, "d");
    assert_eq!(st.accepted.message, "accepted; not yet enforced by proxies: trafficPolicy.tls.mode: DISABLE");
    let pool = r.services[REVIEWS].traffic_policy.as_ref().and_then(|p| p.connection_pool.as_ref());
    assert_eq!(pool.map(|p| p.h2_upgrade()), Some(pb::connection_pool::H2Upgrade::Upgrade));
}

#[test]
fn redirects_direct_responses_rewrites_and_headers_translate() {
    let mut index = bookinfo();
    index.apply(mk_vs(NS, "r", 0, json!({"hosts": ["reviews"], "http": [
        {"name": "old", "match": [{"uri": {"prefix": "/old"}, "ignoreUriCase": true}], "redirect": {"uri": "/new", "scheme": "https", "redirectCode": 308}},
        {"match": [{"method": {"exact": "DELETE"}}], "directResponse": {"status": 403, "body": {"string": "no"}}},
        {"rewrite": {"uri": "/v2"}, "headers": {"request": {"set": {"x-a": "1"}}, "response": {"remove": ["server"]}},
         "route": [{"destination": {"host": "reviews"}, "headers": {"request": {"add": {"x-b": "2"}}}}, {"destination": {"host": "ratings"}}]},
    ]})));
    let r = index.resolve();
    let rules = &r.services[REVIEWS].http_routes;
    assert_eq!(rules[0].name, "old");
    assert!(rules[0].matches[0].ignore_uri_case);
    assert_eq!(
        rules[0].redirect,
        Some(pb::Redirect {
            uri: "/new".into(),
            scheme: "https".into(),
            redirect_code: 308,
            ..Default::default()
        })
    );
    assert_eq!(rules[1].direct_response, Some(pb::DirectResponse { status: 403, body: "no".into() }));
    assert_eq!(rules[2].rewrite.as_ref().unwrap().uri, "/v2");
    assert_eq!(rules[2].request_headers.as_ref().unwrap().set["x-a"], "1");
    assert_eq!(rules[2].response_headers.as_ref().unwrap().remove, ["server"]);
    assert_eq!(rules[2].route[0].request_headers.as_ref().unwrap().add["x-b"], "2");
    // Two destinations without weights share equally.
    assert_eq!(weights(&r.services[REVIEWS], 2).iter().map(|w| w.2).collect::<Vec<_>>(), [1, 1]);
    proxy_accepts(&r);
}

#[test]
fn inbound_policy_most_specific_peer_authentication_wins_and_authorizations_select_by_labels() {
    let mut index = bookinfo();
    let policy =
        |index: &Index, pod: &str| index.resolve().workloads[&format!("{pod}.{NS}")].as_ref().clone();
    assert_eq!(policy(&index, "reviews-v1").mtls_mode(), pb::MtlsMode::MtlsPermissive);
    assert_eq!(policy(&index, "reviews-v1").service_account, "reviews");

    index.apply(mk_pa("weft-system", "mesh", 0, json!({"mtls": {"mode": "STRICT"}})));
    assert_eq!(policy(&index, "reviews-v1").mtls_mode(), pb::MtlsMode::MtlsStrict);
    index.apply(mk_pa(NS, "ns", 0, json!({"mtls": {"mode": "DISABLE"}})));
    assert_eq!(policy(&index, "reviews-v1").mtls_mode(), pb::MtlsMode::MtlsDisable);
    index.apply(mk_pa(
        NS,
        "v1-only",
        0,
        json!({
            "selector": {"matchLabels": {"version": "v1"}}, "mtls": {"mode": "UNSET"},
            "portLevelMtls": {"8080": {"mode": "STRICT"}},
        }),
    ));
    let v1 = policy(&index, "reviews-v1");
    assert_eq!(v1.mtls_mode(), pb::MtlsMode::MtlsDisable, "UNSET inherits the namespace's");
    assert_eq!(v1.port_mtls[&8080], pb::MtlsMode::MtlsStrict as i32);
    assert!(policy(&index, "reviews-v2").port_mtls.is_empty());

    index.apply(mk_ap(NS, "deny-v2", json!({"selector": {"matchLabels": {"version": "v2"}}, "action": "DENY",
        "rules": [{"from": [{"source": {"namespaces": ["evil"]}}], "to": [{"operation": {"ports": ["8080"], "methods": ["POST"]}}]}]})));
    index.apply(mk_ap("weft-system", "mesh-allow", json!({"rules": [{}]})));
    index.apply(mk_ap("elsewhere", "not-here", json!({})));
    let v2 = policy(&index, "reviews-v2");
    let names: Vec<_> = v2.authorizations.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["shop/deny-v2", "weft-system/mesh-allow"]);
    assert_eq!(v2.authorizations[0].action(), pb::authorization::Action::Deny);
    assert_eq!(v2.authorizations[0].rules[0].to[0].ports, [8080]);
    assert_eq!(v2.authorizations[0].rules[0].from[0].namespaces, ["evil"]);
    assert_eq!(policy(&index, "reviews-v1").authorizations.len(), 1);

    let r = index.resolve();
    assert!(status(&r, Kind::PeerAuthentication, NS, "v1-only").accepted.ok);
    assert!(status(&r, Kind::AuthorizationPolicy, NS, "deny-v2").accepted.ok);
    index.apply(mk_pa(NS, "bad", 0, json!({"portLevelMtls": {"80": {"mode": "STRICT"}}})));
    index.apply(mk_ap(NS, "bad", json!({"rules": [{"to": [{"operation": {"ports": ["70000"]}}]}]})));
    let r = index.resolve();
    assert_eq!(
        status(&r, Kind::PeerAuthentication, NS, "bad").accepted.message,
        "portLevelMtls needs a selector"
    );
    assert_eq!(
        status(&r, Kind::AuthorizationPolicy, NS, "bad").accepted.message,
        "rules[0].to[0].operation.ports: \"70000\" is not a port number (1-65535); rules[0] matches \
         nothing (an ALLOW rule that cannot be read whole is left out)"
    );
    proxy_accepts(&r);
}

#[test]
fn resolution_is_deterministic_and_lists_route_dependencies() {
    let mut index = bookinfo();
    index.apply(mk_vs(NS, "r", 0, json!({"hosts": ["reviews"], "http": [{"route": [
        {"destination": {"host": "ratings"}, "weight": 50}, {"destination": {"host": "reviews"}, "weight": 50}]}]})));
    let a = index.resolve();
    assert_eq!(a, index.clone().resolve());
    assert_eq!(
        Resolution::dependencies(&a.services[REVIEWS]),
        BTreeSet::from(["ratings.shop.svc.cluster.local".to_owned()])
    );
}

#[test]
fn external_name_services_and_slices_without_a_service_are_ignored() {
    let mut index = Index::default();
    let svc: Service = serde_json::from_value(json!({"metadata": {"namespace": NS, "name": "ext"},
        "spec": {"type": "ExternalName", "externalName": "example.com"}}))
    .unwrap();
    assert!(!index.apply(Object::Service(Box::new(svc))));
    let slice: EndpointSlice = serde_json::from_value(json!({"metadata": {"namespace": NS, "name": "s"},
        "addressType": "IPv4", "endpoints": []}))
    .unwrap();
    assert!(!index.apply(Object::EndpointSlice(Box::new(slice))));
    assert!(index.resolve().services.is_empty());
}

// Resilience policies (issue 16): what the operator writes into the contract, Istio's defaults
// resolved. The proxies of this commit's tree may not compile these fields yet, so these tests
// check the translation only.

/// The first HTTP rule of `reviews` after applying a VirtualService with one rule `rule` (an
/// empty rule when the VirtualService is not used), and the VirtualService's status.
fn reviews_rule(index: &mut Index, rule: Value) -> (pb::HttpRoute, DesiredStatus) {
    let mut rule = rule;
    rule["route"] = json!([{"destination": {"host": "reviews"}}]);
    index.apply(mk_vs(NS, "r", 0, json!({"hosts": ["reviews"], "http": [rule]})));
    let r = index.resolve();
    proxy_accepts(&r);
    let first = r.services[REVIEWS].http_routes.first().cloned().unwrap_or_default();
    (first, status(&r, Kind::VirtualService, NS, "r"))
}

#[test]
fn faults_translate_with_percentages_defaulting_to_100() {
    let mut index = bookinfo();
    let (rule, st) = reviews_rule(
        &mut index,
        json!({"fault": {"delay": {"fixedDelay": "1.5s"}, "abort": {"httpStatus": 503}}}),
    );
    assert_eq!(st.accepted.message, "accepted");
    assert_eq!(
        rule.fault.unwrap(),
        pb::Fault {
            delay_ms: 1500,
            delay_percent: 100.0,
            abort_http_status: 503,
            abort_percent: 100.0,
            abort_grpc_status: 0
        }
    );
    let (rule, _) = reviews_rule(
        &mut index,
        json!({"fault": {"delay": {"fixedDelay": "5ms", "percentage": {"value": 0.5}},
                         "abort": {"grpcStatus": "UNAVAILABLE", "percentage": {"value": 25}}}}),
    );
    assert_eq!(
        rule.fault.unwrap(),
        pb::Fault {
            delay_ms: 5,
            delay_percent: 0.5,
            abort_http_status: 0,
            abort_percent: 25.0,
            abort_grpc_status: 14
        }
    );
    // Istio's deprecated integer `percent`; an abort alone leaves the delay at zero.
    let (rule, _) = reviews_rule(&mut index, json!({"fault": {"delay": {"fixedDelay": "1s", "percent": 7}}}));
    let f = rule.fault.unwrap();
    assert_eq!((f.delay_ms, f.delay_percent, f.abort_http_status, f.abort_percent), (1000, 7.0, 0, 0.0));
    let (rule, _) = reviews_rule(&mut index, json!({"fault": {"abort": {"grpcStatus": "CANCELLED"}}}));
    let f = rule.fault.unwrap();
    assert_eq!((f.delay_ms, f.delay_percent, f.abort_grpc_status, f.abort_percent), (0, 0.0, 1, 100.0));
    // No fault: none in the contract.
    let (rule, _) = reviews_rule(&mut index, json!({}));
    assert!(rule.fault.is_none());
}

#[test]
fn an_abort_status_outside_200_599_is_invalid_naming_the_field() {
    let mut index = bookinfo();
    let (_, st) = reviews_rule(&mut index, json!({"fault": {"abort": {"httpStatus": 600}}}));
    assert!(!st.accepted.ok);
    assert_eq!(st.accepted.reason, "Invalid");
    assert_eq!(st.accepted.message, "http[0].fault.abort.httpStatus: 600 is not an HTTP status (200-599)");
}

#[test]
fn retries_translate_absent_means_the_proxy_default_and_zero_attempts_means_none() {
    let mut index = bookinfo();
    // Absent: no Retry message, so the proxy's default applies.
    let (rule, _) = reviews_rule(&mut index, json!({}));
    assert!(rule.retries.is_none());
    // attempts 0: an explicit "no retries".
    let (rule, _) = reviews_rule(&mut index, json!({"retries": {"attempts": 0}}));
    assert_eq!(rule.retries.unwrap().attempts, 0);
    // Given: as written; backoff 25 ms unless set.
    let (rule, st) = reviews_rule(
        &mut index,
        json!({"timeout": "3s", "retries": {"attempts": 3, "perTryTimeout": "500ms", "retryOn": "5xx,reset,gateway-error"}}),
    );
    assert_eq!(st.accepted.message, "accepted");
    assert_eq!(rule.timeout_ms, 3000);
    assert_eq!(
        rule.retries.unwrap(),
        pb::Retry {
            attempts: 3,
            per_try_timeout_ms: 500,
            retry_on: "5xx,reset,gateway-error".into(),
            backoff_ms: 25
        }
    );
    let (rule, _) = reviews_rule(&mut index, json!({"retries": {"attempts": 1, "backoff": "100ms"}}));
    let retry = rule.retries.unwrap();
    assert_eq!((retry.per_try_timeout_ms, retry.backoff_ms), (0, 100));
    // retryOn unset: Istio's default conditions, spelled out.
    assert_eq!(
        retry.retry_on,
        "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes,503"
    );
}

#[test]
fn retry_status_codes_imply_retriable_status_codes_and_unknown_conditions_are_invalid() {
    let mut index = bookinfo();
    let (rule, _) =
        reviews_rule(&mut index, json!({"retries": {"attempts": 2, "retryOn": "503,connect-failure,503"}}));
    assert_eq!(rule.retries.unwrap().retry_on, "503,connect-failure,retriable-status-codes");
    let (_, st) =
        reviews_rule(&mut index, json!({"retries": {"attempts": 2, "retryOn": "5xx,retriable-headers"}}));
    assert_eq!(st.accepted.reason, "Invalid");
    assert_eq!(
        st.accepted.message,
        "http[0].retries.retryOn: condition \"retriable-headers\" is not supported"
    );
}

#[test]
fn mirrors_translate_with_percentages_and_count_as_dependencies() {
    let mut index = bookinfo();
    let (rule, st) = reviews_rule(&mut index, json!({"mirror": {"host": "ratings"}}));
    assert_eq!(st.accepted.message, "accepted");
    let ratings = "ratings.shop.svc.cluster.local";
    assert_eq!(rule.mirror.as_ref().unwrap().host, ratings);
    assert_eq!(rule.mirror_percent, 100.0);
    let (rule, _) =
        reviews_rule(&mut index, json!({"mirror": {"host": "ratings"}, "mirrorPercentage": {"value": 12.5}}));
    assert_eq!(rule.mirror_percent, 12.5);
    let (rule, _) = reviews_rule(&mut index, json!({"mirror": {"host": "ratings"}, "mirrorPercent": 30}));
    assert_eq!(rule.mirror_percent, 30.0);
    // Istio's `mirrors` with one entry is the same thing.
    let (rule, _) = reviews_rule(
        &mut index,
        json!({"mirrors": [{"destination": {"host": "details.other", "port": {"number": 9090}}, "percentage": {"value": 5}}]}),
    );
    let mirror = rule.mirror.unwrap();
    assert_eq!((mirror.host.as_str(), mirror.port), ("details.other.svc.cluster.local", 9090));
    assert_eq!(rule.mirror_percent, 5.0);
    // A proxy subscribing to reviews also receives the mirror's service.
    let r = index.resolve();
    assert_eq!(
        Resolution::dependencies(&r.services[REVIEWS]),
        BTreeSet::from(["details.other.svc.cluster.local".to_owned()])
    );
}

#[test]
fn an_unresolved_mirror_is_reported_and_left_out_while_the_route_works() {
    let mut index = bookinfo();
    let (rule, st) = reviews_rule(&mut index, json!({"mirror": {"host": "shadow"}}));
    assert!(st.accepted.ok);
    assert!(!st.resolved_refs.ok);
    assert_eq!(st.resolved_refs.message, "host shadow not found (no Service shadow.shop.svc.cluster.local)");
    assert!(rule.mirror.is_none());
    assert_eq!(rule.route.len(), 1);
    let (rule, st) = reviews_rule(&mut index, json!({"mirror": {"host": "reviews", "subset": "v9"}}));
    assert!(rule.mirror.is_none());
    assert!(
        st.resolved_refs.message.starts_with("subset v9 of host reviews not defined"),
        "{}",
        st.resolved_refs.message
    );
}

fn reviews_policy(index: &mut Index, spec: Value) -> (pb::Service, DesiredStatus) {
    index.apply(mk_dr(NS, "d", 0, spec));
    let r = index.resolve();
    proxy_accepts(&r);
    ((*r.services[REVIEWS]).clone(), status(&r, Kind::DestinationRule, NS, "d"))
}

#[test]
fn connection_pool_limits_translate() {
    let mut index = bookinfo();
    let (svc, st) = reviews_policy(
        &mut index,
        json!({"host": "reviews", "trafficPolicy": {"connectionPool": {
            "tcp": {"maxConnections": 100, "connectTimeout": "1s", "idleTimeout": "5m"},
            "http": {"http1MaxPendingRequests": 10, "http2MaxRequests": 200, "maxRequestsPerConnection": 50, "maxRetries": 4, "h2UpgradePolicy": "DO_NOT_UPGRADE"},
        }}}),
    );
    assert_eq!(st.accepted.message, "accepted");
    assert_eq!(
        svc.traffic_policy.unwrap().connection_pool.unwrap(),
        pb::ConnectionPool {
            connect_timeout_ms: 1000,
            idle_timeout_ms: 300_000,
            max_connections: 100,
            max_pending_requests: 10,
            max_requests: 200,
            max_requests_per_connection: 50,
            max_retries: 4,
            h2_upgrade: pb::connection_pool::H2Upgrade::DoNotUpgrade as i32,
        }
    );
}

#[test]
fn outlier_detection_takes_istio_defaults_when_the_block_is_present() {
    let mut index = bookinfo();
    let (svc, _) =
        reviews_policy(&mut index, json!({"host": "reviews", "trafficPolicy": {"outlierDetection": {}}}));
    assert_eq!(
        svc.traffic_policy.unwrap().outlier_detection.unwrap(),
        pb::OutlierDetection {
            consecutive_5xx_errors: 5,
            consecutive_gateway_errors: 0,
            base_ejection_time_ms: 30_000,
            max_ejection_percent: 10,
            min_health_percent: 0,
            interval_ms: 10_000,
        }
    );
    let (svc, _) = reviews_policy(
        &mut index,
        json!({"host": "reviews", "trafficPolicy": {"outlierDetection": {
        "consecutive5xxErrors": 0, "consecutiveGatewayErrors": 3, "interval": "1s",
        "baseEjectionTime": "2m", "maxEjectionPercent": 50, "minHealthPercent": 30}}}),
    );
    assert_eq!(
        svc.traffic_policy.unwrap().outlier_detection.unwrap(),
        pb::OutlierDetection {
            consecutive_5xx_errors: 0,
            consecutive_gateway_errors: 3,
            base_ejection_time_ms: 120_000,
            max_ejection_percent: 50,
            min_health_percent: 30,
            interval_ms: 1000,
        }
    );
    // No block: no outlier detection.
    let (svc, _) = reviews_policy(
        &mut index,
        json!({"host": "reviews", "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}}),
    );
    assert!(svc.traffic_policy.unwrap().outlier_detection.is_none());
}

#[test]
fn retry_budget_translates_with_defaults() {
    let mut index = bookinfo();
    let (svc, _) =
        reviews_policy(&mut index, json!({"host": "reviews", "trafficPolicy": {"retryBudget": {}}}));
    assert_eq!(
        svc.traffic_policy.unwrap().retry_budget.unwrap(),
        pb::RetryBudget { percent: 20.0, min_retries_per_second: 3, window_ms: 10_000 }
    );
    let (svc, _) = reviews_policy(
        &mut index,
        json!({"host": "reviews", "trafficPolicy": {"retryBudget": {
        "percent": 12.5, "minRetriesPerSecond": 0, "budgetInterval": "30s"}}}),
    );
    assert_eq!(
        svc.traffic_policy.unwrap().retry_budget.unwrap(),
        pb::RetryBudget { percent: 12.5, min_retries_per_second: 0, window_ms: 30_000 }
    );
    let (svc, _) =
        reviews_policy(&mut index, json!({"host": "reviews", "trafficPolicy": {"outlierDetection": {}}}));
    assert!(svc.traffic_policy.unwrap().retry_budget.is_none(), "unset: the proxy's default budget");
}

#[test]
fn consistent_hash_keys_translate() {
    use pb::consistent_hash::Key;
    let mut index = bookinfo();
    let mut key_of = |hash: Value| {
        let (svc, st) = reviews_policy(
            &mut index,
            json!({"host": "reviews", "trafficPolicy": {"loadBalancer": {"consistentHash": hash}}}),
        );
        assert_eq!(st.accepted.message, "accepted");
        svc.traffic_policy.unwrap().load_balancer.unwrap().consistent_hash.unwrap().key.unwrap()
    };
    assert_eq!(key_of(json!({"httpHeaderName": "X-User"})), Key::HttpHeaderName("x-user".into()));
    assert_eq!(
        key_of(json!({"httpCookie": {"name": "user", "path": "/", "ttl": "1h"}})),
        Key::HttpCookie(pb::HttpCookie { name: "user".into(), path: "/".into(), ttl_ms: 3_600_000 })
    );
    assert_eq!(
        key_of(json!({"httpCookie": {"name": "user", "ttl": "0s"}})),
        Key::HttpCookie(pb::HttpCookie { name: "user".into(), path: String::new(), ttl_ms: 0 })
    );
    assert_eq!(key_of(json!({"useSourceIp": true})), Key::UseSourceIp(true));
    assert_eq!(
        key_of(json!({"httpQueryParameterName": "session"})),
        Key::HttpQueryParameterName("session".into())
    );
}

#[test]
fn port_level_settings_replace_the_whole_policy_for_their_port() {
    let mut index = bookinfo();
    let (svc, _) = reviews_policy(
        &mut index,
        json!({"host": "reviews", "trafficPolicy": {
            "loadBalancer": {"simple": "ROUND_ROBIN"},
            "outlierDetection": {"consecutive5xxErrors": 2},
            "portLevelSettings": [{"port": {"number": 9080}, "connectionPool": {"tcp": {"maxConnections": 7}}}],
        }}),
    );
    let tp = svc.traffic_policy.unwrap();
    assert_eq!(tp.port_level_settings.len(), 1);
    let port = &tp.port_level_settings[0];
    assert_eq!(port.port, 9080);
    assert_eq!(port.connection_pool.as_ref().unwrap().max_connections, 7);
    // What the entry leaves out takes the defaults, not the service-wide values (Istio's rule).
    assert_eq!(port.load_balancer, Some(pb::LoadBalancer::default()));
    assert_eq!(port.outlier_detection, Some(pb::OutlierDetection::default()));
}

#[test]
fn subset_policies_merge_over_the_service_policy_part_by_part() {
    let mut index = bookinfo();
    let (svc, _) = reviews_policy(
        &mut index,
        json!({"host": "reviews",
            "trafficPolicy": {
                "loadBalancer": {"simple": "ROUND_ROBIN"},
                "connectionPool": {"tcp": {"maxConnections": 100}},
                "outlierDetection": {"consecutive5xxErrors": 2},
                "retryBudget": {"percent": 10},
                "portLevelSettings": [
                    {"port": {"number": 9080}, "loadBalancer": {"simple": "RANDOM"}},
                    {"port": {"number": 9081}, "outlierDetection": {"consecutiveGatewayErrors": 1}},
                ],
            },
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}, "trafficPolicy": {
                    "loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}},
                    "portLevelSettings": [{"port": {"number": 9081}, "connectionPool": {"tcp": {"maxConnections": 1}}}],
                }},
                {"name": "v2", "labels": {"version": "v2"}},
            ],
        }),
    );
    let v1 = svc.subsets[0].traffic_policy.clone().unwrap();
    // The subset's loadBalancer replaces the service's; the other parts are the service's.
    assert!(v1.load_balancer.as_ref().unwrap().consistent_hash.is_some());
    assert_eq!(v1.connection_pool.as_ref().unwrap().max_connections, 100);
    assert_eq!(v1.outlier_detection.as_ref().unwrap().consecutive_5xx_errors, 2);
    assert_eq!(v1.retry_budget.as_ref().unwrap().percent, 10.0);
    // Port 9080: the service's entry, with the subset's loadBalancer over it.
    let p9080 = &v1.port_level_settings[0];
    assert_eq!(p9080.port, 9080);
    assert!(p9080.load_balancer.as_ref().unwrap().consistent_hash.is_some());
    assert_eq!(p9080.connection_pool, Some(pb::ConnectionPool::default()));
    // Port 9081: the subset's own entry replaces everything.
    let p9081 = &v1.port_level_settings[1];
    assert_eq!(p9081.port, 9081);
    assert_eq!(p9081.connection_pool.as_ref().unwrap().max_connections, 1);
    assert_eq!(p9081.outlier_detection, Some(pb::OutlierDetection::default()));
    assert_eq!(p9081.load_balancer, Some(pb::LoadBalancer::default()));
    // A subset without a policy leaves the service's to the proxy.
    assert!(svc.subsets[1].traffic_policy.is_none());
}

/// The authorizations `reviews-v1` gets, by name.
fn authorizations(index: &Index) -> BTreeMap<String, pb::Authorization> {
    let r = index.resolve();
    proxy_accepts(&r);
    r.workloads[&format!("reviews-v1.{NS}")]
        .authorizations
        .iter()
        .map(|a| (a.name.clone(), a.clone()))
        .collect()
}

#[test]
fn when_conditions_and_remote_ip_blocks_translate() {
    let mut index = bookinfo();
    index.apply(mk_ap(NS, "office", json!({"rules": [{
        "from": [{"source": {"remoteIpBlocks": ["203.0.113.0/24", "2001:db8::/32"],
                             "notRemoteIpBlocks": ["203.0.113.7"], "ipBlocks": ["10.0.0.0/8"]}}],
        "when": [
            {"key": "request.headers[X-Tenant]", "values": ["acme", "beta-*"], "notValues": ["beta-test"]},
            {"key": "source.ip", "values": ["10.1.0.0/16"], "notValues": ["10.1.0.9"]},
            {"key": "source.namespace", "values": ["shop"]},
            {"key": "source.principal", "notValues": ["*/sa/guest"]},
            {"key": "destination.ip", "values": ["10.1.0.1"]},
            {"key": "destination.port", "values": ["8080", "9080"]},
            {"key": "connection.sni", "values": ["reviews.shop.svc.cluster.local"]},
        ],
    }]})));
    let all = authorizations(&index);
    let rule = &all["shop/office"].rules[0];
    assert_eq!(rule.from[0].remote_ip_blocks, ["203.0.113.0/24", "2001:db8::/32"]);
    assert_eq!(rule.from[0].not_remote_ip_blocks, ["203.0.113.7"]);
    assert_eq!(rule.from[0].ip_blocks, ["10.0.0.0/8"]);
    fn strs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let when: Vec<(&str, Vec<&str>, Vec<&str>)> =
        rule.when.iter().map(|c| (c.key.as_str(), strs(&c.values), strs(&c.not_values))).collect();
    assert_eq!(
        when,
        [
            ("request.headers[x-tenant]", vec!["acme", "beta-*"], vec!["beta-test"]),
            ("source.ip", vec!["10.1.0.0/16"], vec!["10.1.0.9"]),
            ("source.namespace", vec!["shop"], vec![]),
            ("source.principal", vec![], vec!["*/sa/guest"]),
            ("destination.ip", vec!["10.1.0.1"], vec![]),
            ("destination.port", vec!["8080", "9080"], vec![]),
            ("connection.sni", vec!["reviews.shop.svc.cluster.local"], vec![]),
        ],
        "in order; header names lowercased"
    );
    let st = status(&index.resolve(), Kind::AuthorizationPolicy, NS, "office");
    assert_eq!((st.accepted.ok, st.accepted.message.as_str()), (true, "accepted"));
    assert!(!all["shop/office"].dry_run);
}

#[test]
fn dry_run_comes_from_either_annotation_and_only_true_turns_it_on() {
    let mut index = bookinfo();
    let spec = json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["evil"]}}]}]});
    index.apply(mk_ap_annotated(NS, "weft", json!({"weft.dev/dry-run": "true"}), spec.clone()));
    index.apply(mk_ap_annotated(NS, "istio", json!({"istio.io/dry-run": "true"}), spec.clone()));
    index.apply(mk_ap_annotated(
        NS,
        "either",
        json!({"weft.dev/dry-run": "false", "istio.io/dry-run": "true"}),
        spec.clone(),
    ));
    index.apply(mk_ap_annotated(NS, "off", json!({"weft.dev/dry-run": "false"}), spec.clone()));
    index.apply(mk_ap_annotated(NS, "other", json!({"example.com/dry-run": "true"}), spec.clone()));
    index.apply(mk_ap_annotated(NS, "yes", json!({"weft.dev/dry-run": "yes"}), spec.clone()));
    index.apply(mk_ap(NS, "plain", spec));
    let dry: Vec<(String, bool)> =
        authorizations(&index).into_values().map(|a| (a.name, a.dry_run)).collect();
    assert_eq!(
        dry,
        [
            ("shop/either".to_owned(), true),
            ("shop/istio".to_owned(), true),
            ("shop/off".to_owned(), false),
            ("shop/other".to_owned(), false),
            ("shop/plain".to_owned(), false),
            ("shop/weft".to_owned(), true),
            ("shop/yes".to_owned(), false),
        ]
    );
    let r = index.resolve();
    let accepted = |name: &str| status(&r, Kind::AuthorizationPolicy, NS, name).accepted;
    assert_eq!(
        accepted("weft").message,
        "accepted; dry run: evaluated and counted by the proxies, not enforced"
    );
    assert_eq!(accepted("plain").message, "accepted");
    let yes = accepted("yes");
    assert!(yes.ok);
    assert_eq!(
        yes.message,
        r#"accepted; annotation weft.dev/dry-run: "yes" is not "true": the policy is enforced"#
    );

    // Removing the annotation is a change that turns enforcement on.
    assert!(index.apply(mk_ap(
        NS,
        "weft",
        json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["evil"]}}]}]})
    )));
    assert!(!authorizations(&index)["shop/weft"].dry_run);
}

#[test]
fn unreadable_ports_fail_closed_allow_rules_match_nothing_and_deny_rules_match_more() {
    let mut index = bookinfo();
    // ALLOW: the rule with a bad port is left out, the good one stays.
    index.apply(mk_ap(
        NS,
        "allow",
        json!({"rules": [
            {"to": [{"operation": {"ports": ["8080", "70000"]}}]},
            {"to": [{"operation": {"ports": ["9080"]}}]},
        ]}),
    ));
    // ALLOW whose only rule is bad: no rules left, so it matches nothing (never "any port").
    index.apply(mk_ap(NS, "allow-abc", json!({"rules": [{"to": [{"operation": {"ports": ["abc"]}}]}]})));
    index.apply(mk_ap(NS, "allow-zero", json!({"rules": [{"to": [{"operation": {"notPorts": ["0"]}}]}]})));
    // DENY: a bad `ports` entry makes it any port; a bad `notPorts` entry excludes nothing.
    index.apply(mk_ap(NS, "deny", json!({"action": "DENY", "rules": [
        {"to": [{"operation": {"ports": ["8080", "70000"], "notPorts": ["9090", "0"], "methods": ["POST"]}}]},
    ]})));
    let all = authorizations(&index);
    let ports: Vec<Vec<u32>> = all["shop/allow"].rules.iter().map(|r| r.to[0].ports.clone()).collect();
    assert_eq!(ports, [vec![9080]]);
    assert!(all["shop/allow-abc"].rules.is_empty());
    assert!(all["shop/allow-zero"].rules.is_empty());
    let deny = &all["shop/deny"].rules[0].to[0];
    assert!(deny.ports.is_empty(), "any port");
    assert_eq!(deny.not_ports, [9090]);
    assert_eq!(deny.methods, ["POST"]);

    let r = index.resolve();
    let accepted = |name: &str| status(&r, Kind::AuthorizationPolicy, NS, name).accepted;
    assert_eq!(accepted("allow").reason, "Invalid");
    assert_eq!(
        accepted("allow-abc").message,
        r#"rules[0].to[0].operation.ports: "abc" is not a port number (1-65535); rules[0] matches nothing (an ALLOW rule that cannot be read whole is left out)"#
    );
    assert_eq!(
        accepted("deny").message,
        r#"rules[0].to[0].operation.ports: "70000" is not a port number (1-65535); rules[0].to[0].operation.notPorts: "0" is not a port number (1-65535); rules[0] is enforced without what cannot be read (a DENY rule matches more, never less)"#
    );
}

#[test]
fn unreadable_conditions_blocks_and_paths_fail_closed() {
    let mut index = bookinfo();
    let rules = json!([
        {"from": [{"source": {"ipBlocks": ["10.0.0.0/33", "10.0.0.0/8"], "notIpBlocks": ["nope", "10.9.0.0/16"],
                              "namespaces": ["evil"]}}],
         "to": [{"operation": {"paths": ["/api/{*}", "/admin"], "notPaths": ["/x/{**}", "/health"]}}],
         "when": [
             {"key": "request.auth.claims[iss]", "values": ["me"]},
             {"key": "source.ip", "values": ["10.1.0.0/99"]},
             {"key": "destination.port", "values": ["80", "http"]},
             {"key": "request.headers[bad header]", "values": ["x"]},
             {"key": "source.namespace"},
             {"key": "source.principal", "values": ["*/sa/web"]},
         ]},
        {"from": [{"source": {"requestPrincipals": ["*"], "namespaces": ["evil"]}}]},
        {"from": [{"source": {"namespaces": ["good"]}}]},
    ]);
    index.apply(mk_ap(NS, "allow", json!({"rules": rules})));
    index.apply(mk_ap(NS, "deny", json!({"action": "DENY", "rules": rules})));
    let all = authorizations(&index);

    // ALLOW: only the rule that reads whole is left.
    let allow = &all["shop/allow"];
    assert_eq!(allow.rules.len(), 1);
    assert_eq!(allow.rules[0].from[0].namespaces, ["good"]);

    // DENY: every rule, without what cannot be read, so each matches more.
    let deny = &all["shop/deny"];
    assert_eq!(deny.rules.len(), 3);
    let first = &deny.rules[0];
    assert!(first.from[0].ip_blocks.is_empty(), "any address");
    assert_eq!(first.from[0].not_ip_blocks, ["10.9.0.0/16"]);
    assert_eq!(first.from[0].namespaces, ["evil"]);
    assert!(first.to[0].paths.is_empty(), "any path");
    assert_eq!(first.to[0].not_paths, ["/health"]);
    let keys: Vec<&str> = first.when.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(keys, ["source.principal"], "the unreadable conditions are dropped");
    assert_eq!(deny.rules[1].from[0].namespaces, ["evil"], "enforced without requestPrincipals");

    let r = index.resolve();
    let message = status(&r, Kind::AuthorizationPolicy, NS, "allow").accepted.message;
    for part in [
        r#"rules[0].from[0].source.ipBlocks: "10.0.0.0/33" is not an IP address or CIDR block"#,
        r#"rules[0].from[0].source.notIpBlocks: "nope" is not an IP address or CIDR block"#,
        r#"rules[0].to[0].operation.paths: "/api/{*}" is not a path without a template"#,
        r#"rules[0].when[0]: key "request.auth.claims[iss]" is not supported by Weft"#,
        r#"rules[0].when[1].values: "10.1.0.0/99" is not an IP address or CIDR block"#,
        r#"rules[0].when[2].values: "http" is not a port number (1-65535)"#,
        r#"rules[0].when[3]: key "request.headers[bad header]" is not supported by Weft"#,
        "rules[0].when[4]: needs values or notValues",
        "rules[0] matches nothing",
        "rules[1].from[0].source.requestPrincipals is not supported by Weft",
        "rules[1] matches nothing",
    ] {
        assert!(message.contains(part), "{part:?} missing from {message}");
    }
    assert!(!message.contains("rules[2]"), "{message}");
    assert!(
        status(&r, Kind::AuthorizationPolicy, NS, "deny").accepted.message.contains(
            "rules[1] is enforced without what cannot be read (a DENY rule matches more, never less)"
        )
    );
}

#[test]
fn actions_and_target_refs_weft_does_not_support_fail_closed() {
    let mut index = bookinfo();
    let rules = json!([{"from": [{"source": {"namespaces": ["good"]}}]}]);
    index.apply(mk_ap(NS, "audit", json!({"action": "AUDIT", "rules": rules})));
    index.apply(mk_ap(
        NS,
        "custom",
        json!({"action": "CUSTOM", "provider": {"name": "ext"}, "rules": rules}),
    ));
    index.apply(mk_ap(
        NS,
        "allow-target",
        json!({"targetRef": {"kind": "Service", "name": "x"}, "rules": rules}),
    ));
    index.apply(mk_ap(
        NS,
        "deny-target",
        json!({"action": "DENY", "targetRefs": [{"kind": "Service", "name": "x"}], "rules": rules}),
    ));
    let all = authorizations(&index);
    assert!(!all.contains_key("shop/audit"), "AUDIT never changes a decision");
    assert_eq!(all["shop/custom"].action(), pb::authorization::Action::Deny);
    assert_eq!(all["shop/custom"].rules.len(), 1);
    assert!(all["shop/allow-target"].rules.is_empty(), "an ALLOW that cannot be placed matches nothing");
    assert_eq!(all["shop/deny-target"].rules.len(), 1);

    let r = index.resolve();
    for name in ["audit", "custom", "allow-target", "deny-target"] {
        let accepted = status(&r, Kind::AuthorizationPolicy, NS, name).accepted;
        assert_eq!((accepted.ok, accepted.reason), (false, "Invalid"), "{name}: {}", accepted.message);
    }
    assert_eq!(
        status(&r, Kind::AuthorizationPolicy, NS, "allow-target").accepted.message,
        "targetRef is not supported by Weft (use selector): it matches nothing"
    );
}

#[test]
fn selectors_that_select_no_pod_are_named_in_resolved_refs() {
    let mut index = bookinfo();
    let only = |app: &str| json!({"selector": {"matchLabels": {"app": app}}, "rules": [{}]});
    index.apply(mk_ap(NS, "reviews", only("reviews")));
    index.apply(mk_ap(NS, "web", only("web")));
    index.apply(mk_ap(NS, "everyone", json!({"rules": [{}]})));
    // In the root namespace a selector selects across the mesh.
    index.apply(mk_ap("weft-system", "mesh-reviews", only("reviews")));
    index.apply(mk_ap("weft-system", "mesh-web", only("web")));
    // Elsewhere only in its own namespace.
    index.apply(mk_ap("other", "reviews-elsewhere", only("reviews")));
    index.apply(mk_pa(
        NS,
        "web-strict",
        0,
        json!({"selector": {"matchLabels": {"app": "web", "tier": "1"}},
        "mtls": {"mode": "STRICT"}}),
    ));
    index.apply(mk_pa(
        NS,
        "reviews-strict",
        0,
        json!({"selector": {"matchLabels": {"app": "reviews"}},
        "mtls": {"mode": "STRICT"}}),
    ));

    let r = index.resolve();
    let refs = |kind: Kind, ns: &str, name: &str| {
        let c = status(&r, kind, ns, name).resolved_refs;
        (c.ok, c.reason, c.message)
    };
    let ok = (true, "ResolvedRefs", "all references resolved".to_owned());
    let ap = Kind::AuthorizationPolicy;
    assert_eq!(refs(ap, NS, "reviews"), ok);
    assert_eq!(refs(ap, NS, "everyone"), ok);
    assert_eq!(refs(ap, "weft-system", "mesh-reviews"), ok);
    assert_eq!(
        refs(ap, NS, "web"),
        (false, "RefNotFound", "selector app=web selects no pod in namespace shop".into())
    );
    assert_eq!(
        refs(ap, "weft-system", "mesh-web"),
        (false, "RefNotFound", "selector app=web selects no pod in the mesh".into())
    );
    assert_eq!(
        refs(ap, "other", "reviews-elsewhere"),
        (false, "RefNotFound", "selector app=reviews selects no pod in namespace other".into())
    );
    let pa = Kind::PeerAuthentication;
    assert_eq!(refs(pa, NS, "reviews-strict"), ok);
    assert_eq!(
        refs(pa, NS, "web-strict"),
        (false, "RefNotFound", "selector app=web,tier=1 selects no pod in namespace shop".into())
    );
    // Still accepted, and still applied when a pod comes.
    assert!(status(&r, ap, NS, "web").accepted.ok);
    index.apply(mk_pod(NS, "web-1", json!({"app": "web", "tier": "1"})));
    let r = index.resolve();
    assert!(status(&r, ap, NS, "web").resolved_refs.ok);
    assert!(status(&r, pa, NS, "web-strict").resolved_refs.ok);
    let web = &r.workloads[&format!("web-1.{NS}")];
    let names: Vec<&str> = web.authorizations.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["shop/everyone", "shop/web", "weft-system/mesh-web"]);
    assert_eq!(web.mtls_mode(), pb::MtlsMode::MtlsStrict);
}
