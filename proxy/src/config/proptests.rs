//! Property tests of the config compiler, which takes outside input (a file, the control plane):
//! any bytes or any structurally generated `ProxyConfig` give a snapshot or a typed error, never a
//! panic, and a snapshot holds what the request path relies on.

use std::{collections::BTreeMap, path::Path};

use proptest::{collection::vec, option, prelude::*};
use weft_proto::v1::{self as pb, consistent_hash, string_match::Kind};

use super::{Action, Snapshot, Split, compile, file};

/// Few hosts, so generated destinations often resolve; sometimes garbage.
fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["a", "B", "b.ns", "c", " a "]).prop_map(str::to_owned),
        1 => text(),
    ]
}

/// Any text: printable ASCII or any Unicode.
fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[ -~]{0,10}", any::<String>()]
}

fn number() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        prop::sample::select(vec![80u32, 443, 8080, 9080]),
        1u32..=700,
        Just(65_535),
        Just(65_536),
        any::<u32>(),
    ]
}

fn double() -> impl Strategy<Value = f64> {
    prop_oneof![
        0.0..=100.0f64,
        Just(0.0),
        Just(100.0),
        Just(-0.0),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        any::<f64>(),
    ]
}

fn socket_address() -> impl Strategy<Value = String> {
    prop_oneof!["10\\.1\\.0\\.[0-9]{1,3}:[0-9]{1,5}", "\\[fd00::[0-9a-f]{1,4}\\]:[0-9]{1,5}", text()]
}

fn ip() -> impl Strategy<Value = String> {
    prop_oneof!["10\\.96\\.0\\.[0-9]{1,3}", "fd00::[0-9a-f]{1,4}", text()]
}

fn identity() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "spiffe://td/ns/[a-z-]{0,4}/sa/[a-z.-]{0,4}", text()]
}

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof!["[a-zA-Z-]{1,8}", text()]
}

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map("[a-z]{1,2}", "v[12]", 0..3)
}

/// Patterns built from regex syntax, valid or not, and any text.
fn pattern() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z/.*+?()\\[\\]{}|^$\\\\0-9,-]{0,14}", text()]
}

fn string_match() -> impl Strategy<Value = pb::StringMatch> {
    let kind = prop_oneof![
        text().prop_map(Kind::Exact),
        text().prop_map(Kind::Prefix),
        pattern().prop_map(Kind::Regex),
    ];
    option::weighted(0.9, kind).prop_map(|kind| pb::StringMatch { kind })
}

fn header_ops() -> impl Strategy<Value = Option<pb::HeaderOperations>> {
    let map = || prop::collection::btree_map(header_name(), text(), 0..3);
    option::of((map(), map(), vec(header_name(), 0..3)))
        .prop_map(|o| o.map(|(set, add, remove)| pb::HeaderOperations { set, add, remove }))
}

fn destination() -> impl Strategy<Value = pb::Destination> {
    let subset = prop_oneof![Just(String::new()), Just("v1".to_owned()), text()];
    let port = prop_oneof![Just(0u32), number()];
    (host(), subset, port).prop_map(|(host, subset, port)| pb::Destination { host, subset, port })
}

fn weighted() -> impl Strategy<Value = pb::WeightedDestination> {
    (option::weighted(0.9, destination()), prop_oneof![0u32..=100, any::<u32>()], header_ops(), header_ops())
        .prop_map(|(destination, weight, request_headers, response_headers)| pb::WeightedDestination {
            destination,
            weight,
            request_headers,
            response_headers,
        })
}

fn http_match() -> impl Strategy<Value = pb::HttpMatch> {
    let matches = || prop::collection::btree_map(header_name(), string_match(), 0..2);
    (
        option::of(string_match()),
        option::of(string_match()),
        option::of(string_match()),
        matches(),
        matches(),
        any::<bool>(),
    )
        .prop_map(|(uri, method, authority, headers, query_params, ignore_uri_case)| pb::HttpMatch {
            uri,
            method,
            authority,
            headers,
            query_params,
            ignore_uri_case,
        })
}

fn redirect() -> impl Strategy<Value = pb::Redirect> {
    let scheme = prop_oneof![Just(String::new()), Just("https".to_owned()), text()];
    let code = prop_oneof![Just(0u32), Just(302), number()];
    (text(), text(), number(), scheme, code).prop_map(|(uri, authority, port, scheme, redirect_code)| {
        pb::Redirect { uri, authority, port, scheme, redirect_code }
    })
}

fn fault() -> impl Strategy<Value = pb::Fault> {
    (
        number(),
        double(),
        prop_oneof![Just(0u32), Just(503), number()],
        double(),
        prop_oneof![0u32..=20, number()],
    )
        .prop_map(|(delay_ms, delay_percent, abort_http_status, abort_percent, abort_grpc_status)| {
            pb::Fault { delay_ms, delay_percent, abort_http_status, abort_percent, abort_grpc_status }
        })
}

fn retry() -> impl Strategy<Value = pb::Retry> {
    let on = prop_oneof!["((5xx|reset|unavailable|4[0-9]{2}|[0-9]{1,6}|x), ?){0,3}", text()];
    (number(), number(), on, number()).prop_map(|(attempts, per_try_timeout_ms, retry_on, backoff_ms)| {
        pb::Retry { attempts, per_try_timeout_ms, retry_on, backoff_ms }
    })
}

prop_compose! {
    fn http_route()(
        name in text(),
        matches in vec(http_match(), 0..3),
        route in vec(weighted(), 0..3),
        redirect in option::weighted(0.2, redirect()),
        direct_response in option::weighted(0.2, (number(), text())),
        rewrite in option::weighted(0.3, (text(), text())),
        headers in (header_ops(), header_ops()),
        (timeout_ms, retries, fault) in (number(), option::of(retry()), option::of(fault())),
        (mirror, mirror_percent) in (option::weighted(0.3, destination()), double()),
    ) -> pb::HttpRoute {
        pb::HttpRoute {
            name,
            matches,
            route,
            redirect,
            direct_response: direct_response.map(|(status, body)| pb::DirectResponse { status, body }),
            rewrite: rewrite.map(|(uri, authority)| pb::Rewrite { uri, authority }),
            request_headers: headers.0,
            response_headers: headers.1,
            timeout_ms,
            retries,
            fault,
            mirror,
            mirror_percent,
        }
    }
}

fn load_balancer() -> impl Strategy<Value = pb::LoadBalancer> {
    let key = prop_oneof![
        header_name().prop_map(consistent_hash::Key::HttpHeaderName),
        (text(), text(), number()).prop_map(|(name, path, ttl_ms)| consistent_hash::Key::HttpCookie(
            pb::HttpCookie { name, path, ttl_ms }
        )),
        any::<bool>().prop_map(consistent_hash::Key::UseSourceIp),
        text().prop_map(consistent_hash::Key::HttpQueryParameterName),
    ];
    (prop_oneof![0i32..4, any::<i32>()], option::of(option::of(key))).prop_map(|(policy, hash)| {
        pb::LoadBalancer { policy, consistent_hash: hash.map(|key| pb::ConsistentHash { key }) }
    })
}

fn connection_pool() -> impl Strategy<Value = pb::ConnectionPool> {
    vec(number(), 7).prop_map(|n| pb::ConnectionPool {
        connect_timeout_ms: n[0],
        idle_timeout_ms: n[1],
        max_connections: n[2],
        max_pending_requests: n[3],
        max_requests: n[4],
        max_requests_per_connection: n[5],
        max_retries: n[6],
        h2_upgrade: (n[0] % 3) as i32,
    })
}

fn outlier_detection() -> impl Strategy<Value = pb::OutlierDetection> {
    vec(prop_oneof![0u32..=120, number()], 6).prop_map(|n| pb::OutlierDetection {
        consecutive_5xx_errors: n[0],
        consecutive_gateway_errors: n[1],
        base_ejection_time_ms: n[2],
        max_ejection_percent: n[3],
        min_health_percent: n[4],
        interval_ms: n[5],
    })
}

fn traffic_policy() -> impl Strategy<Value = pb::TrafficPolicy> {
    let port_level =
        (
            number(),
            option::of(load_balancer()),
            option::of(connection_pool()),
            option::of(outlier_detection()),
        )
            .prop_map(|(port, load_balancer, connection_pool, outlier_detection)| {
                pb::PortTrafficPolicy { port, load_balancer, connection_pool, outlier_detection }
            });
    let budget = (double(), number(), number()).prop_map(|(percent, min_retries_per_second, window_ms)| {
        pb::RetryBudget { percent, min_retries_per_second, window_ms }
    });
    (
        option::of(load_balancer()),
        option::of(connection_pool()),
        option::of(outlier_detection()),
        vec(port_level, 0..2),
        option::of(budget),
    )
        .prop_map(
            |(load_balancer, connection_pool, outlier_detection, port_level_settings, retry_budget)| {
                pb::TrafficPolicy {
                    load_balancer,
                    connection_pool,
                    outlier_detection,
                    port_level_settings,
                    retry_budget,
                }
            },
        )
}

fn service_port() -> impl Strategy<Value = pb::ServicePort> {
    let endpoint =
        (socket_address(), labels(), identity(), text()).prop_map(|(address, labels, identity, workload)| {
            pb::Endpoint { address, labels, identity, workload }
        });
    (number(), text(), prop_oneof![0i32..6, any::<i32>()], vec(endpoint, 0..3))
        .prop_map(|(number, name, protocol, endpoints)| pb::ServicePort { number, name, protocol, endpoints })
}

prop_compose! {
    fn service()(
        name in host(),
        aliases in vec(host(), 0..2),
        addresses in vec(ip(), 0..2),
        ports in vec(service_port(), 0..3),
        subsets in vec(
            (prop_oneof![Just("v1".to_owned()), text()], labels(), option::weighted(0.3, traffic_policy())),
            0..3,
        ),
        traffic_policy in option::weighted(0.5, traffic_policy()),
        http_routes in vec(http_route(), 0..3),
        tcp_routes in vec(vec(weighted(), 0..3), 0..2),
    ) -> pb::Service {
        pb::Service {
            name,
            aliases,
            addresses,
            ports,
            subsets: subsets
                .into_iter()
                .map(|(name, labels, traffic_policy)| pb::Subset { name, labels, traffic_policy })
                .collect(),
            traffic_policy,
            http_routes,
            tcp_routes: tcp_routes.into_iter().map(|route| pb::TcpRoute { route }).collect(),
        }
    }
}

fn inbound() -> impl Strategy<Value = pb::InboundPolicy> {
    let strings = || vec(prop_oneof!["[a-z0-9.:/*-]{0,12}", text()], 0..2);
    let peer = (strings(), strings(), strings(), strings()).prop_map(
        |(principals, namespaces, ip_blocks, remote)| pb::PeerMatch {
            principals,
            namespaces,
            ip_blocks,
            not_remote_ip_blocks: remote,
            ..pb::PeerMatch::default()
        },
    );
    let operation =
        (strings(), vec(number(), 0..2), strings(), strings()).prop_map(|(hosts, ports, methods, paths)| {
            pb::OperationMatch { hosts, ports, methods, not_paths: paths, ..pb::OperationMatch::default() }
        });
    let condition =
        (prop_oneof!["(source|request|destination)\\.[a-z.\\[\\]]{0,12}", text()], strings(), strings())
            .prop_map(|(key, values, not_values)| pb::Condition { key, values, not_values });
    let rule = (vec(peer, 0..2), vec(operation, 0..2), vec(condition, 0..2))
        .prop_map(|(from, to, when)| pb::AuthorizationRule { from, to, when });
    let authorization = (text(), prop_oneof![0i32..2, any::<i32>()], vec(rule, 0..2), any::<bool>())
        .prop_map(|(name, action, rules, dry_run)| pb::Authorization { name, action, rules, dry_run });
    (
        text(),
        text(),
        prop_oneof![0i32..3, any::<i32>()],
        prop::collection::btree_map(number(), prop_oneof![0i32..3, any::<i32>()], 0..2),
        vec(authorization, 0..2),
    )
        .prop_map(|(workload, service_account, mtls_mode, port_mtls, authorizations)| {
            pb::InboundPolicy { workload, service_account, mtls_mode, port_mtls, authorizations }
        })
}

fn config() -> impl Strategy<Value = pb::ProxyConfig> {
    (text(), vec(service(), 0..3), option::weighted(0.3, inbound()))
        .prop_map(|(version, services, inbound)| pb::ProxyConfig { version, services, inbound })
}

/// What the request path relies on in a snapshot: every split it may pick from has a target with
/// a positive weight, and every target at least one cluster (`Target::cluster` takes the first).
fn check_snapshot(s: &Snapshot) -> Result<(), TestCaseError> {
    let check_split = |split: &Split| -> Result<(), TestCaseError> {
        if !split.targets.is_empty() {
            prop_assert!(split.targets.iter().any(|t| t.weight > 0));
            prop_assert!(split.pick().is_some());
        }
        for target in &split.targets {
            prop_assert!(!target.clusters.is_empty());
            let _ = target.cluster(None);
        }
        Ok(())
    };
    for service in &s.services {
        prop_assert!(s.service_by_host(&service.name).is_some());
        for route in &service.http_routes {
            if let Action::Forward(split) = &route.action {
                check_split(split)?;
            }
            if let Some(mirror) = &route.mirror {
                prop_assert!(!mirror.clusters.is_empty());
            }
        }
        for split in &service.tcp_routes {
            check_split(split)?;
        }
    }
    Ok(())
}

/// Compiles `config` from scratch and over its own snapshot: both the same way, no panic.
fn compiles_or_names_the_problem(config: pb::ProxyConfig) -> Result<(), TestCaseError> {
    match compile(config.clone(), None) {
        Ok(first) => {
            check_snapshot(&first)?;
            let second = compile(config, Some(&first)).map_err(|e| TestCaseError::fail(e.to_string()))?;
            check_snapshot(&second)?;
        }
        Err(e) => {
            prop_assert!(!e.to_string().is_empty());
            prop_assert!(compile(config, None).is_err(), "compiling is deterministic");
        }
    }
    Ok(())
}

/// Parses a file's bytes and compiles what parsed.
fn parse_and_compile(path: &str, bytes: &[u8]) -> Result<(), TestCaseError> {
    match file::parse(Path::new(path), bytes) {
        Ok(config) => compiles_or_names_the_problem(config),
        Err(e) => {
            prop_assert!(!e.to_string().is_empty());
            Ok(())
        }
    }
}

/// `config` with its doubles made short and finite: JSON has no NaN (serde_json writes `null`),
/// pbjson leaves out `-0.0` as a default, and serde_json's float parsing may be off by one ulp.
fn exact_doubles(mut config: pb::ProxyConfig) -> pb::ProxyConfig {
    fn exact(x: &mut f64) {
        *x = if x.is_finite() && x.abs() < 1e9 { (*x * 8.0).round() / 8.0 + 0.0 } else { 0.0 };
    }
    let budget = |p: &mut Option<pb::TrafficPolicy>| {
        if let Some(b) = p.as_mut().and_then(|p| p.retry_budget.as_mut()) {
            exact(&mut b.percent);
        }
    };
    for service in &mut config.services {
        budget(&mut service.traffic_policy);
        for subset in &mut service.subsets {
            budget(&mut subset.traffic_policy);
        }
        for route in &mut service.http_routes {
            exact(&mut route.mirror_percent);
            if let Some(f) = &mut route.fault {
                exact(&mut f.delay_percent);
                exact(&mut f.abort_percent);
            }
        }
    }
    config
}

/// A valid config, as JSON, for mutating.
const VALID: &str = r#"{
  "version": "v1",
  "services": [{
    "name": "reviews", "aliases": ["r"], "addresses": ["10.96.0.10"],
    "ports": [{"number": 9080, "protocol": "HTTP1", "endpoints": [
      {"address": "10.1.0.5:9080", "labels": {"version": "v1"}, "identity": "spiffe://td/ns/a/sa/b"}]}],
    "subsets": [{"name": "v1", "labels": {"version": "v1"}}],
    "trafficPolicy": {"outlierDetection": {"consecutive5xxErrors": 5}, "retryBudget": {"percent": 20}},
    "httpRoutes": [{
      "matches": [{"uri": {"prefix": "/api"}, "headers": {"x-user": {"regex": "j.*"}}}],
      "route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 90},
                {"destination": {"host": "r", "port": 9080}, "weight": 10}],
      "retries": {"attempts": 2, "retryOn": "5xx"},
      "fault": {"delayMs": 5, "delayPercent": 1.5},
      "mirror": {"host": "reviews"}, "mirrorPercent": 10
    }, {"redirect": {"uri": "/new", "redirectCode": 302}}],
    "tcpRoutes": [{"route": [{"destination": {"host": "reviews"}}]}]
  }]
}"#;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn generated_configs_compile_or_name_the_problem(config in config()) {
        compiles_or_names_the_problem(config)?;
    }

    #[test]
    fn generated_configs_survive_json_and_yaml(config in config()) {
        // Only known enum values serialize (pbjson): the control plane's gRPC may send others,
        // which the property above covers.
        let config = exact_doubles(config);
        if let Ok(json) = serde_json::to_vec(&config) {
            let parsed = file::parse(Path::new("c.json"), &json).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(format!("{parsed:?}"), format!("{config:?}"));
            let yaml = serde_yaml::to_string(&config).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let parsed = file::parse(Path::new("c.yaml"), yaml.as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(format!("{parsed:?}"), format!("{config:?}"));
            compiles_or_names_the_problem(parsed)?;
        }
    }

    #[test]
    fn any_bytes_parse_and_compile_or_name_the_problem(bytes in vec(any::<u8>(), 0..256), json in any::<bool>()) {
        parse_and_compile(if json { "c.json" } else { "c.yaml" }, &bytes)?;
    }

    #[test]
    fn yaml_like_text_parses_and_compiles_or_names_the_problem(
        text in "([a-zA-Z0-9 ]{0,6}|services|name|ports|number|httpRoutes|route|destination|host|[:,\\-\\[\\]{}\"'&*!|>#\n]){0,40}",
    ) {
        parse_and_compile("c.yaml", text.as_bytes())?;
    }

    #[test]
    fn mutated_valid_configs_parse_and_compile_or_name_the_problem(
        edits in vec((any::<prop::sample::Index>(), prop_oneof![any::<u8>(), prop::sample::select(b"{}[]\",:0-9aZ \n".to_vec())]), 1..4),
        json in any::<bool>(),
    ) {
        let mut bytes = VALID.as_bytes().to_vec();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        parse_and_compile(if json { "c.json" } else { "c.yaml" }, &bytes)?;
    }
}

#[test]
fn the_valid_config_is_valid() {
    let config = file::parse(Path::new("c.json"), VALID.as_bytes()).unwrap();
    check_snapshot(&compile(config, None).unwrap()).unwrap();
}
