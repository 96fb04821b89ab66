//! `GET /call`: a small load generator. It sends `n` GETs to one `http://` URL from `concurrency`
//! workers over kept-alive connections and reports status, version and latency counts.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Uri, Version};
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::query;

pub const MAX_REQUESTS: u32 = 100_000;
pub const MAX_CONCURRENCY: u32 = 256;
pub const MAX_SLOW_MS: u32 = 60_000;
/// Each request (connect, headers and body) must finish within this, or it counts as an error.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Only this much of each answer is read to find its `version`; a longer body still counts by status.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// The parameters of one `/call`.
#[derive(Debug)]
pub(crate) struct Call {
    url: Uri,
    n: u32,
    concurrency: u32,
    headers: HeaderMap,
    h2: bool,
    /// Count the answers that took at least this long.
    slow: Option<Duration>,
}

impl Call {
    /// `url` (required), `n`, `concurrency`, repeatable `header=Name:value`, `h2` and `slow_ms`.
    pub(crate) fn parse(query: Option<&str>) -> Result<Self, String> {
        let (mut url, mut n, mut concurrency, mut headers, mut h2) = (None, 1, 1, HeaderMap::new(), false);
        let mut slow = None;
        for (name, value) in query::pairs(query)? {
            match name.as_str() {
                "url" => url = Some(parse_url(&value)?),
                "n" => n = query::bounded("n", &value, 1, MAX_REQUESTS)?,
                "concurrency" => concurrency = query::bounded("concurrency", &value, 1, MAX_CONCURRENCY)?,
                "header" => {
                    let (name, value) = parse_header(&value)?;
                    headers.append(name, value);
                }
                "h2" => h2 = query::boolean("h2", &value)?,
                "slow_ms" => {
                    let ms = query::bounded("slow_ms", &value, 0, MAX_SLOW_MS)?;
                    slow = Some(Duration::from_millis(ms.into()));
                }
                _ => {}
            }
        }
        let url = url.ok_or("missing url: /call?url=http://host[:port]/path&n=N&concurrency=C")?;
        Ok(Self { url, n, concurrency: concurrency.min(n), headers, h2, slow })
    }

    pub(crate) async fn run(self) -> Report {
        let Self { url, n, concurrency, headers, h2, slow } = self;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(REQUEST_TIMEOUT));
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
            .http2_only(h2)
            .pool_max_idle_per_host(concurrency as usize)
            .build(connector);
        let (url, headers, next) = (Arc::new(url), Arc::new(headers), Arc::new(AtomicU32::new(0)));

        // Dropping the set (the caller went away) aborts the workers.
        let mut workers = JoinSet::new();
        for _ in 0..concurrency {
            let (client, url, headers, next) = (client.clone(), url.clone(), headers.clone(), next.clone());
            workers.spawn(async move {
                let mut tally = Tally::default();
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    let mut request =
                        Request::get(url.as_ref().clone()).body(Empty::new()).expect("a valid request");
                    request.headers_mut().extend(headers.as_ref().clone());
                    if h2 {
                        *request.version_mut() = Version::HTTP_2;
                    }
                    let started = Instant::now();
                    match tokio::time::timeout(REQUEST_TIMEOUT, send(&client, request)).await {
                        Ok(Ok((status, version))) => {
                            *tally.status.entry(status).or_default() += 1;
                            if let Some(version) = version {
                                *tally.versions.entry(version).or_default() += 1;
                            }
                            tally.latencies.push(started.elapsed());
                        }
                        Ok(Err(_)) | Err(_) => tally.errors += 1,
                    }
                }
                tally
            });
        }
        let mut total = Tally::default();
        while let Some(tally) = workers.join_next().await {
            total.merge(tally.expect("a /call worker panicked"));
        }
        total.report(slow)
    }
}

/// One GET of `url` (what `weft-demo get URL` runs, e.g. as a Job): its status, or why no
/// answer came.
pub async fn fetch_once(url: &str) -> Result<u16, String> {
    let url = parse_url(url)?;
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(REQUEST_TIMEOUT));
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let request = Request::get(url).body(Empty::new()).map_err(|e| e.to_string())?;
    match tokio::time::timeout(REQUEST_TIMEOUT, send(&client, request)).await {
        Ok(Ok((status, _))) => Ok(status),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {REQUEST_TIMEOUT:?}")),
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One request: its status and the `version` of a JSON body that has one.
async fn send(
    client: &Client<HttpConnector, Empty<Bytes>>,
    request: Request<Empty<Bytes>>,
) -> Result<(u16, Option<String>), BoxError> {
    #[derive(Deserialize)]
    struct Versioned {
        version: String,
    }

    let response = client.request(request).await?;
    let status = response.status().as_u16();
    let body = match Limited::new(response.into_body(), MAX_BODY_BYTES).collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) if error.is::<LengthLimitError>() => return Ok((status, None)),
        Err(error) => return Err(error),
    };
    let version = serde_json::from_slice::<Versioned>(&body).ok().map(|body| body.version);
    Ok((status, version.filter(|version| !version.is_empty())))
}

fn parse_url(value: &str) -> Result<Uri, String> {
    let uri = value.parse::<Uri>().map_err(|error| format!("invalid url={value:?}: {error}"))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(format!("invalid url={value:?}: expected http://host[:port][/path] (plain HTTP only)"));
    }
    Ok(uri)
}

fn parse_header(value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let bad = || format!("invalid header={value:?}: expected Name:value");
    let (name, header_value) = value.split_once(':').ok_or_else(bad)?;
    let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| bad())?;
    let header_value = HeaderValue::from_str(header_value.trim()).map_err(|_| bad())?;
    Ok((name, header_value))
}

/// What one worker saw.
#[derive(Debug, Default)]
struct Tally {
    status: BTreeMap<u16, u64>,
    versions: BTreeMap<String, u64>,
    errors: u64,
    latencies: Vec<Duration>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        for (status, count) in other.status {
            *self.status.entry(status).or_default() += count;
        }
        for (version, count) in other.versions {
            *self.versions.entry(version).or_default() += count;
        }
        self.errors += other.errors;
        self.latencies.extend(other.latencies);
    }

    fn report(mut self, slow: Option<Duration>) -> Report {
        self.latencies.sort_unstable();
        let slow = slow.map(|at_least| {
            let fast = self.latencies.partition_point(|latency| *latency < at_least);
            (self.latencies.len() - fast) as u64
        });
        let latency_ms = Percentiles {
            p50: nearest_rank(&self.latencies, 50),
            p90: nearest_rank(&self.latencies, 90),
            p99: nearest_rank(&self.latencies, 99),
        };
        Report { status: self.status, versions: self.versions, errors: self.errors, latency_ms, slow }
    }
}

/// The answer of `/call`. Status keys serialize as strings (`"200"`).
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    status: BTreeMap<u16, u64>,
    versions: BTreeMap<String, u64>,
    errors: u64,
    latency_ms: Percentiles,
    /// Answers that took at least `slow_ms`; `null` when not asked.
    slow: Option<u64>,
}

/// Milliseconds, to the microsecond; `null` when no request got an answer.
#[derive(Debug, Serialize)]
struct Percentiles {
    p50: Option<f64>,
    p90: Option<f64>,
    p99: Option<f64>,
}

/// The `percentile`th of `sorted` by the nearest-rank method: the smallest value with at least
/// `percentile`% of the values at or below it.
fn nearest_rank(sorted: &[Duration], percentile: usize) -> Option<f64> {
    let rank = (percentile * sorted.len()).div_ceil(100).max(1);
    let value = sorted.get(rank - 1)?;
    Some((value.as_secs_f64() * 1e6).round() / 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let ms = |values: &[u64]| values.iter().map(|&v| Duration::from_millis(v)).collect::<Vec<_>>();
        let hundred = ms(&(1..=100).collect::<Vec<_>>());
        assert_eq!(nearest_rank(&hundred, 50), Some(50.0));
        assert_eq!(nearest_rank(&hundred, 90), Some(90.0));
        assert_eq!(nearest_rank(&hundred, 99), Some(99.0));
        assert_eq!(nearest_rank(&ms(&[7]), 50), Some(7.0));
        assert_eq!(nearest_rank(&ms(&[1, 2, 3]), 50), Some(2.0));
        assert_eq!(nearest_rank(&ms(&[1, 2, 3]), 99), Some(3.0));
        assert_eq!(nearest_rank(&[], 50), None);
        assert_eq!(nearest_rank(&[Duration::from_micros(1500)], 50), Some(1.5));
    }

    #[test]
    fn parses_call_parameters() {
        let call =
            Call::parse(Some("url=http://reviews/&n=10&concurrency=20&header=x-user:jason&h2=true")).unwrap();
        assert_eq!(call.url, "http://reviews/");
        assert_eq!((call.n, call.concurrency, call.h2), (10, 10, true));
        assert_eq!(call.headers["x-user"], "jason");
        assert_eq!(call.slow, None);
        let call = Call::parse(Some("url=http://reviews/&slow_ms=2000")).unwrap();
        assert_eq!(call.slow, Some(Duration::from_secs(2)));
    }

    #[test]
    fn counts_the_answers_at_least_as_slow_as_asked() {
        let tally = Tally {
            latencies: [5, 1999, 2000, 2500].map(Duration::from_millis).to_vec(),
            ..Tally::default()
        };
        assert_eq!(tally.report(Some(Duration::from_secs(2))).slow, Some(2));
        assert_eq!(Tally::default().report(Some(Duration::from_secs(2))).slow, Some(0));
        assert_eq!(Tally::default().report(None).slow, None);
    }

    #[test]
    fn rejects_bad_call_parameters() {
        for (query, names) in [
            ("n=1", "missing url"),
            ("url=https://reviews/", "url="),
            ("url=reviews", "url="),
            ("url=http://reviews/&n=0", "n="),
            ("url=http://reviews/&n=100001", "n="),
            ("url=http://reviews/&concurrency=257", "concurrency="),
            ("url=http://reviews/&header=novalue", "header="),
            ("url=http://reviews/&h2=yes", "h2="),
            ("url=http://reviews/&slow_ms=60001", "slow_ms="),
        ] {
            let error = Call::parse(Some(query)).unwrap_err();
            assert!(error.contains(names), "{query}: {error}");
        }
    }
}
