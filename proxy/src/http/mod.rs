//! HTTP proxying: the downstream server (`server`), the request path as tower layers
//! (`headers::RequestIdLayer`, `observe` for metrics and access logs, then `router`), and header
//! rules (`headers`).
//!
//! Inside `router`, a routed request passes the route's policies in order: `fault`, `retry`
//! (replaying bodies with `replay`), `mirror`; each try is `forward`; `sticky` finds
//! consistent-hash keys; `error` turns every failure into the response, with `flags`;
//! `request_body` tells the client's body failures from the upstream's and times out a stalled
//! body; `limits` refuses over-long request targets and too many header fields.
//! `normalize` is the path normalization authorization will match on (not applied yet).

pub mod error;
pub mod fault;
pub mod flags;
pub mod forward;
pub mod headers;
pub mod limits;
pub mod mirror;
pub mod normalize;
pub mod observe;
pub mod replay;
pub mod request_body;
pub mod retry;
pub mod router;
pub mod server;
pub mod sticky;

pub use crate::conn::Direction;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};

/// Errors carried in bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type on both sides of the proxy.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A complete body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// Wraps any body into `Body`.
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// `destination_service` values for traffic no config service describes, allocated once.
pub static PASSTHROUGH: std::sync::LazyLock<std::sync::Arc<str>> =
    std::sync::LazyLock::new(|| "passthrough".into());
pub static INBOUND: std::sync::LazyLock<std::sync::Arc<str>> = std::sync::LazyLock::new(|| "inbound".into());
pub static UNKNOWN: std::sync::LazyLock<std::sync::Arc<str>> = std::sync::LazyLock::new(|| "unknown".into());

pin_project_lite::pin_project! {
    /// An upstream response body on its way down: keeps `guard` alive until it ends or is
    /// dropped (the endpoint's pending-request count), and, when the route has a timeout, ends
    /// with an error once the deadline passes, so the timeout bounds the whole response (as
    /// Envoy's does), not only the wait for its headers. The client then sees the stream reset
    /// (HTTP/2) or the connection closed (HTTP/1.1).
    pub struct UpstreamBody<G> {
        #[pin]
        inner: Body,
        guard: Option<G>,
        // Boxed, and only with a route timeout: most routes have none.
        deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<G> UpstreamBody<G> {
    pub fn new(inner: Body, guard: G, deadline: Option<tokio::time::Instant>) -> Self {
        UpstreamBody {
            inner,
            guard: Some(guard),
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
        }
    }
}

impl<G> http_body::Body for UpstreamBody<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        use std::{future::Future as _, task::Poll};
        let this = self.project();
        if this.guard.is_none() {
            return Poll::Ready(None); // ended, failed or expired
        }
        if let Some(deadline) = this.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            this.guard.take();
            return Poll::Ready(Some(Err("route timeout passed while the response was streaming".into())));
        }
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = &polled {
            this.guard.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.guard.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
