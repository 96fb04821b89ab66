//! Weft's demo app: one port answers HTTP/1.1, HTTP/2 cleartext (prior knowledge) and gRPC.
//!
//! - `GET /`: `{"service","version","pod","namespace"}`; `?status=N` (200-599) answers N,
//!   `?delay_ms=N` (0-60000) waits first; a `FAIL_PERCENT` share answers `FAIL_STATUS`.
//! - `GET /call?url=http://...&n=N&concurrency=C&header=Name:value&h2=true`: load generator
//!   ([`call`]), answers status/version/error counts and latency percentiles.
//! - `GET /healthz`: `ok`.
//! - gRPC: `grpc.health.v1.Health/Check` and `weft.demo.v1.Demo/Info` ([`grpc`]).
//!
//! The contract is in `examples/README.md`.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto, graceful::GracefulShutdown},
};
use serde::Serialize;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

pub mod call;
pub mod config;
pub mod grpc;
mod query;

pub use config::{Config, Identity};

/// The longest `delay_ms` a request may ask for.
pub const MAX_DELAY_MS: u64 = 60_000;
/// On shutdown, requests in flight get this long to finish (below Kubernetes' default 30 s grace).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ResBody = UnsyncBoxBody<Bytes, BoxError>;

fn boxed<B>(body: B) -> ResBody
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// Serves the app on `listener` until `shutdown` completes; then stops accepting, lets requests
/// in flight finish (up to [`DRAIN_TIMEOUT`]) and closes every connection.
pub async fn serve(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()>) {
    let app = Arc::new(App { grpc: grpc::Grpc::new(config.identity.clone()), config });
    let service = service_fn(move |request| {
        let app = app.clone();
        async move { Ok::<_, Infallible>(app.handle(request).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, typically: back off instead of spinning.
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let connection = builder.serve_connection(TokioIo::new(stream), service.clone()).into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    info!(connections = graceful.count(), "stopped accepting; draining");
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
        warn!(timeout = ?DRAIN_TIMEOUT, "connections still open; closing them");
    }
}

#[derive(Debug)]
struct App {
    config: Config,
    grpc: grpc::Grpc,
}

impl App {
    async fn handle(&self, request: Request<Incoming>) -> Response<ResBody> {
        if grpc::is_grpc(&request) {
            return self.grpc.call(request).await;
        }
        let query = request.uri().query();
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/") => self.root(query).await,
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok"),
            (&Method::GET, "/call") => match call::Call::parse(query) {
                Ok(call) => json(StatusCode::OK, &call.run().await),
                Err(message) => text(StatusCode::BAD_REQUEST, message),
            },
            (_, "/" | "/healthz" | "/call") => {
                let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET is allowed");
                response.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET"));
                response
            }
            (_, path) => {
                text(StatusCode::NOT_FOUND, format!("no route for {path}: try /, /call or /healthz"))
            }
        }
    }

    /// `GET /[?status=N][&delay_ms=N]`.
    async fn root(&self, query: Option<&str>) -> Response<ResBody> {
        let (status, delay_ms) = match root_params(query) {
            Ok(params) => params,
            Err(message) => return text(StatusCode::BAD_REQUEST, message),
        };
        if delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        }
        let fail = self.config.fail_percent > 0 && fastrand::u8(0..100) < self.config.fail_percent;
        let status = if fail { self.config.fail_status } else { status };
        json(status, &self.config.identity)
    }
}

fn root_params(query: Option<&str>) -> Result<(StatusCode, u64), String> {
    let (mut status, mut delay_ms) = (StatusCode::OK, 0);
    for (name, value) in query::pairs(query)? {
        match name.as_str() {
            "status" => {
                status = config::parse_status(&value)
                    .ok_or_else(|| format!("invalid status={value:?}: expected an integer from 200 to 599"))?
            }
            "delay_ms" => delay_ms = query::bounded("delay_ms", &value, 0, MAX_DELAY_MS)?,
            _ => {}
        }
    }
    Ok((status, delay_ms))
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<ResBody> {
    let mut body = body.into();
    body.push('\n');
    respond(status, "text/plain; charset=utf-8", body.into())
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<ResBody> {
    let body = serde_json::to_vec(value).expect("serializable");
    respond(status, "application/json", body.into())
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<ResBody> {
    let mut response = Response::new(boxed(Full::new(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    response
}
