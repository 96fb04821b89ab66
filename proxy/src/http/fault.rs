//! Fault injection (VirtualService `http[].fault`): before the upstream is touched, delay a share
//! of requests and abort a share with an HTTP or gRPC status. The abort is the proxy's own answer,
//! so it is never retried by the proxy that injected it.

use std::time::Duration;

use super::error::Failure;
use crate::config::policy::{Abort, Fault};

/// What happened to one request: whether it was delayed, and the abort to answer with, if any.
pub async fn inject(fault: &Fault) -> (bool, Option<Failure>) {
    let injection = fault.roll(fastrand::u32(..), fastrand::u32(..));
    let delayed = match injection.delay {
        Some(delay) if delay > Duration::ZERO => {
            tokio::time::sleep(delay).await;
            true
        }
        _ => false,
    };
    let abort = injection.abort.map(|a| match a {
        Abort::Http(status) => Failure::AbortHttp(status),
        Abort::Grpc(code) => Failure::AbortGrpc(code),
    });
    (delayed, abort)
}
