//! gRPC on the HTTP port: `grpc.health.v1.Health/Check` and `weft.demo.v1.Demo/Info`, served by
//! tonic's generated servers; requests are routed here by their `content-type`.

use http::{Request, Response, header};
use hyper::body::Incoming;
use tonic::Status;
use tower::ServiceExt as _;

use crate::{ResBody, boxed, config::Identity};

/// The generated messages, servers and clients.
pub mod proto {
    /// The standard health checking protocol (`Check` only).
    pub mod health {
        #![allow(missing_docs, missing_debug_implementations, clippy::all)]
        tonic::include_proto!("grpc.health.v1");
    }
    /// The demo's own service.
    pub mod demo {
        #![allow(missing_docs, missing_debug_implementations, clippy::all)]
        tonic::include_proto!("weft.demo.v1");
    }
}

use proto::{
    demo::{
        InfoRequest, InfoResponse,
        demo_server::{Demo, DemoServer},
    },
    health::{
        HealthCheckRequest, HealthCheckResponse,
        health_check_response::ServingStatus,
        health_server::{Health, HealthServer},
    },
};

/// Whether `request` is gRPC (`application/grpc`, `application/grpc+proto`, ...).
pub(crate) fn is_grpc<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"))
}

#[derive(Clone, Debug)]
pub(crate) struct Grpc {
    health: HealthServer<HealthService>,
    demo: DemoServer<DemoService>,
}

impl Grpc {
    pub(crate) fn new(identity: Identity) -> Self {
        Self { health: HealthServer::new(HealthService), demo: DemoServer::new(DemoService(identity)) }
    }

    pub(crate) async fn call(&self, request: Request<Incoming>) -> Response<ResBody> {
        let path = request.uri().path();
        let response = if path.starts_with("/grpc.health.v1.Health/") {
            self.health.clone().oneshot(request).await
        } else if path.starts_with("/weft.demo.v1.Demo/") {
            self.demo.clone().oneshot(request).await
        } else {
            Ok(Status::unimplemented(format!("unknown gRPC service in {path}")).into_http())
        };
        let Ok(response) = response;
        response.map(boxed)
    }
}

/// The services this server reports SERVING for: the whole server ("") and the demo service.
const SERVING: &[&str] = &["", "weft.demo.v1.Demo", "grpc.health.v1.Health"];

#[derive(Clone, Copy, Debug)]
struct HealthService;

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, Status> {
        let service = &request.get_ref().service;
        if !SERVING.contains(&service.as_str()) {
            return Err(Status::not_found(format!("unknown service {service:?}")));
        }
        Ok(tonic::Response::new(HealthCheckResponse { status: ServingStatus::Serving.into() }))
    }
}

#[derive(Clone, Debug)]
struct DemoService(Identity);

#[tonic::async_trait]
impl Demo for DemoService {
    async fn info(&self, _: tonic::Request<InfoRequest>) -> Result<tonic::Response<InfoResponse>, Status> {
        let Identity { service, version, pod, namespace } = self.0.clone();
        Ok(tonic::Response::new(InfoResponse { service, version, pod, namespace }))
    }
}
