//! Opaque TCP forwarding: splice bytes both ways until both sides are done, passing a half-close
//! (FIN) from one side to the other, with an idle timeout and byte metrics.

use std::{sync::atomic::Ordering, time::Duration};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::{
    io::{Activity, ActivityIo, Watch},
    metrics::{Metrics, TcpLabels},
};

/// Bytes moved by one splice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// From the downstream (client) to the upstream, including detection bytes.
    pub received: u64,
    /// From the upstream to the downstream.
    pub sent: u64,
}

/// Splices `downstream` (whose first bytes, read during detection, are `prefix`) with
/// `upstream` until both directions end or nothing moves for `idle`.
pub async fn splice<D, U>(
    downstream: D,
    prefix: Bytes,
    mut upstream: U,
    idle: Duration,
    metrics: &Metrics,
    labels: TcpLabels,
) -> std::io::Result<Totals>
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    metrics.tcp_opened.get_or_create(&labels).inc();
    let activity = Activity::new();
    let mut down = ActivityIo::new(downstream, activity.clone());
    let result = async {
        upstream.write_all(&prefix).await?;
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut down, &mut upstream) => r.map(|_| ()),
            _ = activity.due(Watch::idle(idle)) => {
                tracing::debug!(?idle, "TCP connection idle; closing");
                Ok(())
            }
        }
    }
    .await;
    let totals = Totals {
        received: activity.read.load(Ordering::Relaxed) + prefix.len() as u64,
        sent: activity.written.load(Ordering::Relaxed),
    };
    metrics.tcp_received_bytes.get_or_create(&labels).inc_by(totals.received);
    metrics.tcp_sent_bytes.get_or_create(&labels).inc_by(totals.sent);
    metrics.tcp_closed.get_or_create(&labels).inc();
    result.map(|()| totals)
}
