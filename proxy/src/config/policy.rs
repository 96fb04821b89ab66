//! The compiled route and destination policies: fault injection, retries, mirroring and
//! consistent hashing. Plain data with the pure decisions that read only it; the layers that act
//! on them are in `http`.

use std::{sync::Arc, time::Duration};

use http::{HeaderName, StatusCode};

use super::Cluster;

/// VirtualService `http[].fault`: each part applies to its share of requests, drawn
/// independently.
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    pub delay: Option<(Duration, Share)>,
    pub abort: Option<(Abort, Share)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abort {
    Http(StatusCode),
    /// A gRPC status code, answered trailers-only.
    Grpc(u32),
}

/// A share of requests, 0 to 100 percent with fractions, kept in millionths of a request so a
/// roll is one integer comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share(u32);

impl Share {
    const SCALE: u32 = 1_000_000;

    /// `percent` clamped to 0..=100.
    pub fn percent(percent: f64) -> Share {
        Share((percent.clamp(0.0, 100.0) / 100.0 * f64::from(Self::SCALE)).round() as u32)
    }

    /// Whether a request with the uniform random draw `r` (any `u32`) falls in the share.
    pub fn holds(self, r: u32) -> bool {
        self.0 >= Self::SCALE || r % Self::SCALE < self.0
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    pub fn as_percent(self) -> f64 {
        f64::from(self.0) * 100.0 / f64::from(Self::SCALE)
    }
}

/// What the fault injector decided for one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Injection {
    pub delay: Option<Duration>,
    pub abort: Option<Abort>,
}

impl Fault {
    /// Decides for one request from two independent uniform draws.
    pub fn roll(&self, delay_draw: u32, abort_draw: u32) -> Injection {
        Injection {
            delay: self.delay.and_then(|(d, share)| share.holds(delay_draw).then_some(d)),
            abort: self.abort.and_then(|(a, share)| share.holds(abort_draw).then_some(a)),
        }
    }
}

/// When a try's outcome is worth another try (VirtualService `retries.retryOn`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// Any 5xx answer, and no answer at all (connect failure, reset, per-try timeout).
    pub server_error: bool,
    /// 502, 503 and 504, and no answer at all.
    pub gateway_error: bool,
    /// No answer: the connection was reset or closed, or the per-try timeout passed.
    pub reset: bool,
    pub connect_failure: bool,
    /// HTTP/2 REFUSED_STREAM: the server did not process the request.
    pub refused_stream: bool,
    /// 409.
    pub retriable_4xx: bool,
    /// The listed status codes (`retriable-status-codes` with numbers in the list).
    pub statuses: Vec<u16>,
    /// gRPC statuses (from a trailers-only answer's headers).
    pub grpc: Vec<u32>,
}

/// How a try ended, as far as retrying cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TryOutcome {
    Answered {
        status: u16,
        grpc_status: Option<u32>,
    },
    ConnectFailed,
    RefusedStream,
    /// Reset, closed, or no answer before the per-try timeout.
    NoAnswer,
    /// Never sent: a pool limit, no endpoint. Never retried (another try would meet the same).
    NotSent,
    /// The client's request body failed (bad framing, the client left, too slow): not the
    /// endpoint's doing, and never retried (the rest of the body will not come).
    ClientFailed,
}

impl RetryOn {
    /// Istio's default when a route says nothing (Weft retries less than Istio; see
    /// docs/traffic.md): connect failures and refused streams.
    pub fn default_conditions() -> RetryOn {
        RetryOn { connect_failure: true, refused_stream: true, ..RetryOn::default() }
    }

    /// Parses `retryOn`; an unknown condition is an error naming it.
    pub fn parse(list: &str) -> Result<RetryOn, String> {
        let mut on = RetryOn::default();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match item {
                "5xx" => on.server_error = true,
                "gateway-error" => on.gateway_error = true,
                "reset" => on.reset = true,
                "connect-failure" => on.connect_failure = true,
                "refused-stream" => on.refused_stream = true,
                "retriable-4xx" => on.retriable_4xx = true,
                // Istio lists the codes beside it; the codes are what count.
                "retriable-status-codes" => {}
                "cancelled" => on.grpc.push(1),
                "deadline-exceeded" => on.grpc.push(4),
                "resource-exhausted" => on.grpc.push(8),
                "internal" => on.grpc.push(13),
                "unavailable" => on.grpc.push(14),
                code => match code.parse::<u16>() {
                    Ok(c @ 100..=599) => on.statuses.push(c),
                    _ => return Err(format!("unknown retry condition {code:?}")),
                },
            }
        }
        Ok(on)
    }

    pub fn matches(&self, outcome: TryOutcome) -> bool {
        match outcome {
            TryOutcome::ConnectFailed => {
                self.connect_failure || self.server_error || self.gateway_error || self.reset
            }
            TryOutcome::RefusedStream => self.refused_stream || self.server_error || self.reset,
            TryOutcome::NoAnswer => self.reset || self.server_error || self.gateway_error,
            TryOutcome::NotSent | TryOutcome::ClientFailed => false,
            TryOutcome::Answered { status, grpc_status } => {
                (self.server_error && status >= 500)
                    || (self.gateway_error && (502..=504).contains(&status))
                    || (self.retriable_4xx && status == 409)
                    || self.statuses.contains(&status)
                    || grpc_status.is_some_and(|g| self.grpc.contains(&g))
            }
        }
    }
}

/// A route's retry policy, compiled; `attempts` 0 disables retries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
    pub backoff: Duration,
}

/// Envoy's and Istio's base backoff interval.
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);

impl Default for RetryPolicy {
    /// What a route without `retries` gets: one retry of connect failures and refused streams.
    fn default() -> Self {
        RetryPolicy {
            attempts: 1,
            per_try_timeout: None,
            on: RetryOn::default_conditions(),
            backoff: DEFAULT_BACKOFF,
        }
    }
}

/// The wait before retry number `retry` (1-based): full jitter over an exponentially growing
/// interval, capped at ten times the base (Envoy's rule). `draw` is uniform in `0..=u32::MAX`.
pub fn backoff(base: Duration, retry: u32, draw: u32) -> Duration {
    let ceiling = base.saturating_mul(1 << retry.saturating_sub(1).min(16)).min(base.saturating_mul(10));
    ceiling.mul_f64(f64::from(draw) / f64::from(u32::MAX))
}

/// VirtualService `http[].mirror`: copies of a share of requests go to `clusters` too.
#[derive(Debug)]
pub struct Mirror {
    pub service: Arc<str>,
    pub clusters: Vec<(u16, Arc<Cluster>)>,
    pub share: Share,
}

/// DestinationRule `loadBalancer.consistentHash`: where a request's key comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashOn {
    Header(HeaderName),
    Cookie { name: String, path: Option<String>, ttl: Option<Duration> },
    SourceIp,
    QueryParameter(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_hold_for_their_fraction_of_draws() {
        let quarter = Share::percent(25.0);
        let hits = (0..1_000_000u32).filter(|&r| quarter.holds(r)).count();
        assert_eq!(hits, 250_000);
        assert!(Share::percent(100.0).holds(u32::MAX));
        assert!(!Share::percent(0.0).holds(0));
        assert_eq!(Share::percent(0.1), Share(1_000), "fractions of a percent");
        assert_eq!(Share::percent(150.0), Share::percent(100.0));
    }

    #[test]
    fn retry_conditions_follow_envoys_meanings() {
        let answered = |status, grpc_status| TryOutcome::Answered { status, grpc_status };
        let on = RetryOn::parse("gateway-error, 418,unavailable").unwrap();
        assert!(on.matches(answered(503, None)));
        assert!(!on.matches(answered(500, None)), "500 is not a gateway error");
        assert!(on.matches(answered(418, None)), "listed status");
        assert!(on.matches(answered(200, Some(14))), "gRPC unavailable");
        assert!(!on.matches(answered(200, Some(2))));
        assert!(on.matches(TryOutcome::ConnectFailed) && on.matches(TryOutcome::NoAnswer));
        assert!(!on.matches(TryOutcome::RefusedStream));

        let d = RetryOn::default_conditions();
        assert!(d.matches(TryOutcome::ConnectFailed) && d.matches(TryOutcome::RefusedStream));
        assert!(!d.matches(TryOutcome::NoAnswer), "a reset may have reached the app: not by default");
        assert!(!d.matches(answered(503, None)));
        assert!(RetryOn::parse("5xx").unwrap().matches(answered(500, None)));
        assert!(RetryOn::parse("retriable-4xx").unwrap().matches(answered(409, None)));
        assert_eq!(RetryOn::parse("5xx,bogus").unwrap_err(), "unknown retry condition \"bogus\"");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(25);
        assert_eq!(backoff(base, 1, u32::MAX), base);
        assert_eq!(backoff(base, 3, u32::MAX), base * 4);
        assert_eq!(backoff(base, 10, u32::MAX), base * 10, "capped at ten times the base");
        assert_eq!(backoff(base, 2, 0), Duration::ZERO, "full jitter");
    }

    #[test]
    fn faults_roll_each_part_on_its_own_draw() {
        let fault = Fault {
            delay: Some((Duration::from_secs(2), Share::percent(50.0))),
            abort: Some((Abort::Http(StatusCode::SERVICE_UNAVAILABLE), Share::percent(10.0))),
        };
        assert_eq!(
            fault.roll(0, 0),
            Injection {
                delay: Some(Duration::from_secs(2)),
                abort: Some(Abort::Http(StatusCode::SERVICE_UNAVAILABLE))
            }
        );
        assert_eq!(fault.roll(600_000, 200_000), Injection::default());
    }
}
