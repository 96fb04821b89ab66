//! `weftctl stat [ns/]deploy/NAME|svc/NAME`: requests per second, success rate and latency
//! percentiles from the proxies' own `/metrics`, scraped twice a window apart (no metrics
//! server needed). Inbound rows are what the workload served; outbound rows what it sent, per
//! destination service and workload (a version is its own workload, e.g. `reviews-v2`).
//!
//! The arithmetic is pure: [`Counts::parse`] reads the Prometheus text, [`rows`] turns two
//! scrapes into rates and percentiles (interpolated within histogram buckets, as Prometheus's
//! `histogram_quantile` does).

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Pod, Service},
};
use kube::{Api, Client, api::ListParams};
use serde::{Deserialize, Serialize};

use crate::{cluster, output::table};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Cluster(#[from] cluster::Error),
    #[error("{0:?}: expected deploy/NAME or svc/NAME")]
    Target(String),
    #[error("{what}: {source}")]
    Api { what: String, source: kube::Error },
    #[error("{0} selects no running meshed pod")]
    NoPods(String),
}

/// Traffic of one direction and peer.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Key {
    /// `inbound` or `outbound`.
    pub direction: String,
    /// Outbound: where to. Inbound: who called (`source_workload`).
    pub peer_service: String,
    pub peer_workload: String,
}

/// Cumulative counters of one key.
#[derive(Clone, Debug, Default, PartialEq)]
struct Series {
    requests: f64,
    failures: f64,
    /// `le` upper bound to cumulative count, in bucket order.
    buckets: Vec<(f64, f64)>,
}

/// One scrape of one or more proxies, summed by key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counts(BTreeMap<Key, Series>);

impl Counts {
    /// Adds a proxy's `/metrics` text: `weft_requests_total` and
    /// `weft_request_duration_seconds_bucket`, keyed by direction and peer. A request counts as
    /// failed when it got a 5xx (Linkerd's and Istio's success rate).
    pub fn parse(&mut self, text: &str) {
        for line in text.lines() {
            let Some((name, labels, value)) = sample(line) else { continue };
            let is_requests = name == "weft_requests_total";
            let is_bucket = name == "weft_request_duration_seconds_bucket";
            if !is_requests && !is_bucket {
                continue;
            }
            let label = |k: &str| labels.iter().find(|(n, _)| *n == k).map_or("", |(_, v)| *v);
            let direction = label("direction");
            let key = if direction == "inbound" {
                Key {
                    direction: direction.into(),
                    peer_service: label("source_namespace").into(),
                    peer_workload: label("source_workload").into(),
                }
            } else {
                Key {
                    direction: direction.into(),
                    peer_service: label("destination_service").into(),
                    peer_workload: label("destination_workload").into(),
                }
            };
            let series = self.0.entry(key).or_default();
            if is_requests {
                series.requests += value;
                if label("response_code").starts_with('5') {
                    series.failures += value;
                }
            } else {
                let le = if label("le") == "+Inf" {
                    f64::INFINITY
                } else {
                    label("le").parse().unwrap_or(f64::NAN)
                };
                match series.buckets.iter_mut().find(|(b, _)| *b == le) {
                    Some((_, count)) => *count += value,
                    None => {
                        series.buckets.push((le, value));
                        series.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
                    }
                }
            }
        }
    }
}

/// A sample's label pairs.
type Labels<'a> = Vec<(&'a str, &'a str)>;

/// `name{labels} value` of one exposition line (labels unescaped only as far as weft needs).
fn sample(line: &str) -> Option<(&str, Labels<'_>, f64)> {
    if line.starts_with('#') {
        return None;
    }
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match head.split_once('{') {
        Some((name, rest)) => (name, rest.strip_suffix('}')?),
        None => (head, ""),
    };
    let labels = labels
        .split("\",")
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let (k, v) = p.split_once("=\"")?;
            Some((k, v.trim_end_matches('"')))
        })
        .collect();
    Some((name, labels, value))
}

/// One line of `stat`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    #[serde(flatten)]
    pub key: Key,
    pub requests: f64,
    pub rps: f64,
    /// Of the requests in the window; `None` when there were none.
    pub success_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// Rates and percentiles of what happened between `before` and `after`, `window` apart. Keys
/// with no request in the window are left out.
pub fn rows(before: &Counts, after: &Counts, window: Duration) -> Vec<Row> {
    let secs = window.as_secs_f64().max(f64::EPSILON);
    let empty = Series::default();
    after
        .0
        .iter()
        .filter_map(|(key, now)| {
            let then = before.0.get(key).unwrap_or(&empty);
            let requests = (now.requests - then.requests).max(0.0);
            if requests == 0.0 {
                return None;
            }
            let failures = (now.failures - then.failures).max(0.0);
            let buckets: Vec<(f64, f64)> = now
                .buckets
                .iter()
                .map(|&(le, n)| {
                    let before = then.buckets.iter().find(|(b, _)| *b == le).map_or(0.0, |(_, c)| *c);
                    (le, (n - before).max(0.0))
                })
                .collect();
            let ms = |q| quantile(q, &buckets).map(|s| s * 1000.0);
            Some(Row {
                key: key.clone(),
                requests,
                rps: requests / secs,
                success_rate: Some(1.0 - failures / requests),
                p50_ms: ms(0.50),
                p95_ms: ms(0.95),
                p99_ms: ms(0.99),
            })
        })
        .collect()
}

/// The `q` quantile of cumulative `buckets` (`le`, count), linear within the bucket it falls in;
/// in the `+Inf` bucket, the highest finite bound.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let within = if count > lower.1 { (rank - lower.1) / (count - lower.1) } else { 1.0 };
            return Some(lower.0 + (le - lower.0) * within);
        }
        lower = (le, count);
    }
    Some(lower.0)
}

/// The meshed, running pods of `target` (`deploy/NAME` or `svc/NAME`) in `namespace`.
pub async fn pods(client: &Client, namespace: &str, target: &str) -> Result<Vec<String>, Error> {
    let (kind, name) = target.split_once('/').ok_or_else(|| Error::Target(target.into()))?;
    let api = |what: String| move |source| Error::Api { what, source };
    let selector: BTreeMap<String, String> = match kind {
        "deploy" | "deployment" | "deployments" => {
            let d = Api::<Deployment>::namespaced(client.clone(), namespace)
                .get(name)
                .await
                .map_err(api(format!("getting deployment {namespace}/{name}")))?;
            d.spec.and_then(|s| s.selector.match_labels).unwrap_or_default()
        }
        "svc" | "service" | "services" => {
            let s = Api::<Service>::namespaced(client.clone(), namespace)
                .get(name)
                .await
                .map_err(api(format!("getting service {namespace}/{name}")))?;
            s.spec.and_then(|s| s.selector).unwrap_or_default()
        }
        _ => return Err(Error::Target(target.into())),
    };
    let labels = selector.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
    let list = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&labels))
        .await
        .map_err(api(format!("listing the pods of {target}")))?;
    let names: Vec<String> = list
        .items
        .into_iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .filter(|p| {
            p.metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(weft_api::labels::INJECTED_ANNOTATION))
        })
        .filter_map(|p| p.metadata.name)
        .collect();
    if names.is_empty() {
        return Err(Error::NoPods(format!("{namespace}/{target}")));
    }
    Ok(names)
}

/// Scrapes every pod's proxy once.
pub async fn scrape(client: &Client, namespace: &str, pods: &[String]) -> Result<Counts, Error> {
    let mut counts = Counts::default();
    for pod in pods {
        counts.parse(&cluster::admin_get(client, namespace, pod, "/metrics").await?);
    }
    Ok(counts)
}

pub fn render_table(rows: &[Row]) -> String {
    let cell = |v: Option<f64>, digits: usize| v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"));
    let lines: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            let peer = if r.key.direction == "inbound" {
                format!("from {}/{}", r.key.peer_service, r.key.peer_workload)
            } else {
                format!("to {}", r.key.peer_service)
            };
            [
                r.key.direction.clone(),
                peer,
                r.key.peer_workload.clone(),
                format!("{:.1}", r.rps),
                cell(r.success_rate.map(|s| s * 100.0), 2) + "%",
                cell(r.p50_ms, 1),
                cell(r.p95_ms, 1),
                cell(r.p99_ms, 1),
            ]
        })
        .collect();
    if lines.is_empty() {
        return "no requests in the window\n".into();
    }
    table(["DIRECTION", "PEER", "WORKLOAD", "RPS", "SUCCESS", "P50 MS", "P95 MS", "P99 MS"], &lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(text: &str) -> Counts {
        let mut c = Counts::default();
        c.parse(text);
        c
    }

    const OUT: &str = r#"direction="outbound",source_workload="frontend",source_namespace="shop",source_principal="",destination_workload="reviews-v2",destination_namespace="shop",destination_principal="",destination_service="reviews.shop.svc.cluster.local""#;

    fn text(ok: u64, failed: u64, fast: u64, slow: u64) -> String {
        format!(
            "# TYPE weft_requests counter\n\
             weft_requests_total{{{OUT},response_code=\"200\",grpc_status=\"\",tls=\"true\",response_flags=\"\"}} {ok}\n\
             weft_requests_total{{{OUT},response_code=\"503\",grpc_status=\"\",tls=\"true\",response_flags=\"UF\"}} {failed}\n\
             weft_request_duration_seconds_bucket{{{OUT},response_code=\"200\",grpc_status=\"\",tls=\"true\",response_flags=\"\",le=\"0.01\"}} {fast}\n\
             weft_request_duration_seconds_bucket{{{OUT},response_code=\"200\",grpc_status=\"\",tls=\"true\",response_flags=\"\",le=\"0.1\"}} {}\n\
             weft_request_duration_seconds_bucket{{{OUT},response_code=\"200\",grpc_status=\"\",tls=\"true\",response_flags=\"\",le=\"+Inf\"}} {}\n",
            fast + slow,
            fast + slow
        )
    }

    #[test]
    fn two_scrapes_give_rate_success_and_percentiles_of_the_window() {
        let before = scrape(&text(100, 0, 100, 0));
        // In 10 s: 190 good and 10 failed; 100 under 10 ms, 100 between 10 and 100 ms.
        let after = scrape(&text(290, 10, 200, 100));
        let [row] = &rows(&before, &after, Duration::from_secs(10))[..] else { panic!() };
        assert_eq!(row.key.peer_service, "reviews.shop.svc.cluster.local");
        assert_eq!(row.key.peer_workload, "reviews-v2");
        assert_eq!((row.requests, row.rps), (200.0, 20.0));
        assert_eq!(row.success_rate, Some(0.95));
        assert_eq!(row.p50_ms, Some(10.0));
        let p99 = row.p99_ms.unwrap();
        assert!((p99 - 98.2).abs() < 1e-9, "{p99}");
    }

    #[test]
    fn a_quiet_window_has_no_row_and_quantiles_stay_in_range() {
        let same = scrape(&text(5, 0, 5, 0));
        assert!(rows(&same, &same, Duration::from_secs(5)).is_empty());
        assert_eq!(quantile(0.5, &[(0.01, 0.0), (f64::INFINITY, 0.0)]), None);
        assert_eq!(
            quantile(0.99, &[(0.01, 1.0), (f64::INFINITY, 10.0)]),
            Some(0.01),
            "beyond the last bound"
        );
    }
}
