//! Mirroring (VirtualService `http[].mirror`): a copy of a share of requests goes to another
//! destination, fire-and-forget. The copy leaves once the primary's answer has arrived (so it
//! never delays it) with the body the primary read (only bodies that fit the replay cap are
//! mirrored); its `Host` gets Envoy's `-shadow` suffix; its answer is discarded. At most
//! [`MAX_IN_FLIGHT`] copies are in flight per proxy: the rest are dropped and counted.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Uri};
use tokio::{sync::Semaphore, time::Instant};

use super::{
    forward::{Destination, Head, Try, forward},
    full,
};
use crate::{
    config::policy::Mirror,
    metrics::{ClusterLabels, Metrics},
    upstream::{ConnectOpts, Proto},
};

pub const MAX_IN_FLIGHT: usize = 64;

/// A mirrored request gives up after this long.
const TIMEOUT: Duration = Duration::from_secs(30);

/// `host-shadow[:port]`.
pub fn shadow_authority(authority: &str) -> String {
    match authority.parse::<http::uri::Authority>() {
        Ok(a) => match a.port_u16() {
            Some(port) => format!("{}-shadow:{port}", a.host()),
            None => format!("{}-shadow", a.host()),
        },
        Err(_) => format!("{authority}-shadow"),
    }
}

/// What a copy is made of.
#[derive(Debug)]
pub struct Copy<'a> {
    pub method: Method,
    pub authority: &'a str,
    pub path_and_query: &'a str,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The port the primary request arrived for (picks the mirror's port the same way).
    pub port: Option<u16>,
    /// The HTTP version the client app speaks.
    pub origin: Proto,
}

/// Sends `copy` to `mirror` in the background, if fewer than `MAX_IN_FLIGHT` copies are out.
pub fn spawn(
    mirror: &Mirror,
    copy: Copy<'_>,
    opts: ConnectOpts,
    limit: &Arc<Semaphore>,
    metrics: &Arc<Metrics>,
) {
    let cluster = copy
        .port
        .and_then(|p| mirror.clusters.iter().find(|(n, _)| *n == p))
        .or(mirror.clusters.first())
        .map(|(_, c)| c.clone());
    let Some(cluster) = cluster else { return };
    let name = cluster.name.clone();
    let count = move |metrics: &Metrics, result| {
        metrics.mirrors.get_or_create(&ClusterLabels { cluster: name.clone(), result }).inc();
    };
    let Ok(permit) = limit.clone().try_acquire_owned() else {
        count(metrics, "dropped");
        return;
    };
    let proto = cluster.upstream_proto(copy.origin);
    let opts = cluster.connect_opts(opts);
    let Ok(shadow) = HeaderValue::from_str(&shadow_authority(copy.authority)) else { return };
    let target = Some(copy.path_and_query);
    let Some(head) = Head::new(proto, copy.method, Uri::default(), copy.headers, target, Some(&shadow))
    else {
        return;
    };
    let metrics = metrics.clone();
    let body = copy.body;
    tokio::spawn(async move {
        let _permit = permit;
        let sent = forward(
            head.into_request(full(body)),
            Try {
                destination: Destination::Cluster(&cluster),
                proto,
                opts: &opts,
                key: None,
                tried: &[],
                deadline: Some(Instant::now() + TIMEOUT),
                grpc: false,
                metrics: &metrics,
            },
        )
        .await;
        // The answer is discarded.
        count(&metrics, if sent.is_ok() { "sent" } else { "failed" });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_goes_on_the_host_before_the_port() {
        assert_eq!(shadow_authority("reviews"), "reviews-shadow");
        assert_eq!(shadow_authority("reviews.default:9080"), "reviews.default-shadow:9080");
        assert_eq!(shadow_authority("[::1]:80"), "[::1]-shadow:80");
    }
}
