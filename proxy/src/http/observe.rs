//! The outermost request layer: counts and times every request when its response ends, writes
//! the access log line, and tracks the connection's in-flight requests (for the idle timeout).

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body as _, Frame, SizeHint};
use prometheus_client::metrics::{counter::Counter, histogram::Histogram};
use tokio::{io::AsyncWriteExt, sync::mpsc, time::Instant};
use tower::{Layer, Service};

use super::{Body, BoxError, Direction, flags::Flags, headers::REQUEST_ID};
use crate::{
    io::Activity,
    metrics::{Metrics, PeerLabels, RequestLabels},
    peer::Peer,
    upstream::Endpoint,
};

/// What the router did, attached to the response for this layer.
#[derive(Clone, Debug, Default)]
pub struct ResponseInfo {
    pub route: Option<Arc<str>>,
    pub service: Option<Arc<str>>,
    pub cluster: Option<Arc<str>>,
    /// The endpoint the request went to (its address and, as the config says, who runs there).
    pub upstream: Option<Arc<Endpoint>>,
    /// The request went upstream through a mesh tunnel.
    pub upstream_tls: bool,
    /// Envoy's response flags (see `error::Flags`).
    pub flags: Flags,
    /// Retries sent for this request.
    pub retries: u32,
    /// Something the access log should say (e.g. why a request was not retried).
    pub note: Option<&'static str>,
}

/// One JSON access log line per request, written by a background task; lines are dropped (and
/// counted) rather than slowing requests when stdout falls behind.
#[derive(Clone, Debug)]
pub struct AccessLog {
    tx: mpsc::Sender<String>,
}

impl AccessLog {
    pub fn spawn(metrics: Arc<Metrics>) -> AccessLog {
        let (tx, mut rx) = mpsc::channel::<String>(1024);
        tokio::spawn(async move {
            let mut out = tokio::io::stdout();
            while let Some(line) = rx.recv().await {
                if out.write_all(line.as_bytes()).await.is_err() {
                    metrics.access_log_dropped.inc();
                }
            }
            let _ = out.flush().await;
        });
        AccessLog { tx }
    }

    /// An access log whose lines go to a channel (tests).
    pub fn to_channel(tx: mpsc::Sender<String>) -> AccessLog {
        AccessLog { tx }
    }
}

#[derive(Clone, Debug)]
pub struct ObserveLayer {
    pub metrics: Arc<Metrics>,
    pub access_log: Option<AccessLog>,
    pub direction: Direction,
    /// The connection's activity: requests in flight and the head-read clock.
    pub activity: Arc<Activity>,
    pub conn: Arc<ConnMetrics>,
}

/// A connection's side of the metrics: who is talking, and the handles its last request used.
#[derive(Debug, Default)]
pub struct ConnMetrics {
    /// This proxy's workload.
    pub local: Peer,
    /// The client proxy, when the connection is a mesh tunnel.
    pub downstream: Option<Peer>,
    /// Requests on one connection nearly always share a label set: comparing with the last one
    /// (`Arc` fields compare by pointer first) skips hashing the labels into both families.
    /// Boxed, so that a parked connection can let go of it (`forget_recent`).
    recent: Mutex<Option<Box<(RequestLabels, Counter, Histogram)>>>,
}

impl ConnMetrics {
    pub fn new(local: Peer, downstream: Option<Peer>) -> ConnMetrics {
        ConnMetrics { local, downstream, recent: Mutex::default() }
    }

    /// Drops the last request's handles: a connection idle long enough to be parked gives back
    /// their memory, and its next request looks them up once again.
    pub fn forget_recent(&self) {
        *self.recent.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn record(&self, metrics: &Metrics, labels: RequestLabels, seconds: f64) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((last, requests, duration)) = recent.as_deref()
            && *last == labels
        {
            requests.inc();
            duration.observe(seconds);
            return;
        }
        let requests = metrics.requests.get_or_create(&labels).clone();
        let duration = metrics.request_duration.get_or_create(&labels).clone();
        requests.inc();
        duration.observe(seconds);
        *recent = Some(Box::new((labels, requests, duration)));
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner, layer: self.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct Observe<S> {
    inner: S,
    layer: ObserveLayer,
}

/// The request fields kept for the access log (the path without its query, which may carry
/// secrets).
struct RequestSummary {
    method: http::Method,
    authority: String,
    path: String,
    version: http::Version,
    request_id: Option<http::HeaderValue>,
}

impl<S> Service<Request<hyper::body::Incoming>> for Observe<S>
where
    S: Service<Request<hyper::body::Incoming>, Response = Response<Body>, Error = std::convert::Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, std::convert::Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<hyper::body::Incoming>) -> Self::Future {
        let start = Instant::now();
        self.layer.activity.request_started();
        let guard = InFlightGuard(self.layer.activity.clone());
        let summary = self.layer.access_log.as_ref().map(|_| RequestSummary {
            method: req.method().clone(),
            authority: req
                .uri()
                .authority()
                .map(|a| a.to_string())
                .or_else(|| {
                    req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()).map(String::from)
                })
                .unwrap_or_default(),
            path: req.uri().path().to_owned(),
            version: req.version(),
            request_id: req.headers().get(&REQUEST_ID).cloned(),
        });
        let layer = self.layer.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let Ok(res) = fut.await;
            let (mut parts, body) = res.into_parts();
            let info = parts.extensions.remove::<ResponseInfo>().unwrap_or_default();
            let grpc_status = grpc_status(&parts.headers);
            let done = Done {
                start,
                status: parts.status.as_u16(),
                grpc_status,
                info,
                summary,
                layer,
                _guard: guard,
            };
            Ok(Response::from_parts(parts, Body::new(ObservedBody { inner: body, done: Some(done) })))
        })
    }
}

struct InFlightGuard(Arc<Activity>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

fn grpc_status(headers: &HeaderMap) -> Option<String> {
    headers.get(&GRPC_STATUS).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

struct Done {
    start: Instant,
    status: u16,
    grpc_status: Option<String>,
    info: ResponseInfo,
    summary: Option<RequestSummary>,
    layer: ObserveLayer,
    _guard: InFlightGuard,
}

impl Done {
    fn finish(self, complete: bool) {
        let elapsed = self.start.elapsed();
        let flags = if !complete && self.info.flags.is_empty() { Flags::DC } else { self.info.flags };
        let conn = &self.layer.conn;
        let tls = conn.downstream.is_some() || self.info.upstream_tls;
        let labels = RequestLabels {
            direction: self.layer.direction.as_str(),
            peers: PeerLabels::new(
                self.layer.direction,
                &conn.local,
                conn.downstream.as_ref(),
                self.info.upstream.as_ref().map(|e| &e.peer),
            ),
            destination_service: self.info.service.clone().unwrap_or_else(|| super::UNKNOWN.clone()),
            response_code: self.status,
            grpc_status: self.grpc_status.clone().unwrap_or_default(),
            tls,
            response_flags: flags,
        };
        conn.record(&self.layer.metrics, labels, elapsed.as_secs_f64());
        if let (Some(log), Some(req)) = (&self.layer.access_log, &self.summary) {
            let ts = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
            let mut line = serde_json::json!({
                "timestamp": ts,
                "direction": self.layer.direction.as_str(),
                "method": req.method.as_str(),
                "authority": req.authority,
                "path": req.path,
                "protocol": format!("{:?}", req.version),
                "status": self.status,
                "grpc_status": self.grpc_status,
                "route": self.info.route.as_deref(),
                "destination_service": self.info.service.as_deref(),
                "cluster": self.info.cluster.as_deref(),
                "upstream": self.info.upstream.as_ref().map(|e| e.addr.to_string()),
                "tls": tls,
                "peer_identity": conn.downstream.as_ref().map(|p| &*p.principal),
                "upstream_identity": self.info.upstream.as_ref().map(|e| &e.peer).filter(|p| p.identity.is_some()).map(|p| &*p.principal),
                "response_flags": flags.names(),
                "retries": self.info.retries,
                "note": self.info.note,
                "duration_ms": elapsed.as_secs_f64() * 1000.0,
                "request_id": req.request_id.as_ref().and_then(|v| v.to_str().ok()),
            })
            .to_string();
            line.push('\n');
            if log.tx.try_send(line).is_err() {
                self.layer.metrics.access_log_dropped.inc();
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// Passes frames through; reports the request when the body ends, fails, or is dropped.
    struct ObservedBody {
        #[pin]
        inner: Body,
        done: Option<Done>,
    }

    impl PinnedDrop for ObservedBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(done) = this.done.take() {
                // A body hyper never polled because it was known to be empty is complete.
                done.finish(this.inner.is_end_stream());
            }
        }
    }
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(trailers), Some(done)) = (frame.trailers_ref(), this.done.as_mut())
                    && let Some(s) = grpc_status(trailers)
                {
                    done.grpc_status = Some(s);
                }
            }
            Poll::Ready(None) => {
                if let Some(done) = this.done.take() {
                    done.finish(true);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(done) = this.done.take() {
                    done.finish(false);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
