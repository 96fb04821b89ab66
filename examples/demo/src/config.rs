//! The app's settings, read once from the environment in `main` and passed in (tests build them
//! directly).

use anyhow::{Context, Result, bail};
use http::StatusCode;
use serde::Serialize;

pub const ENV_PORT: &str = "PORT";
pub const ENV_SERVICE: &str = "SERVICE";
pub const ENV_VERSION: &str = "VERSION";
pub const ENV_POD_NAME: &str = "POD_NAME";
pub const ENV_POD_NAMESPACE: &str = "POD_NAMESPACE";
pub const ENV_FAIL_PERCENT: &str = "FAIL_PERCENT";
pub const ENV_FAIL_STATUS: &str = "FAIL_STATUS";
pub const ENV_SHUTDOWN_DELAY_MS: &str = "SHUTDOWN_DELAY_MS";
/// The longest `SHUTDOWN_DELAY_MS`: within Kubernetes' default 30 s grace period with the drain.
pub const MAX_SHUTDOWN_DELAY_MS: u64 = 10_000;

/// Who answers: the body of `GET /` and of `weft.demo.v1.Demo/Info`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Identity {
    pub service: String,
    pub version: String,
    pub pod: String,
    pub namespace: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Port to listen on (all interfaces); only `main` uses it.
    pub port: u16,
    pub identity: Identity,
    /// Share of `GET /` answers, 0 to 100, that fail with `fail_status`.
    pub fail_percent: u8,
    pub fail_status: StatusCode,
    /// How long to keep serving after SIGTERM before it stops accepting (the time callers need
    /// to learn the pod is going, as a Kubernetes preStop sleep gives).
    pub shutdown_delay: std::time::Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            port: 8080,
            identity: Identity::default(),
            fail_percent: 0,
            fail_status: StatusCode::SERVICE_UNAVAILABLE,
            shutdown_delay: std::time::Duration::ZERO,
        }
    }
}

impl Config {
    /// Reads the process environment; see [`Config::from_lookup`].
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var_os(name).map(|value| value.to_string_lossy().into_owned()))
    }

    /// Builds the config from `lookup(VARIABLE)`. Identity variables default to "" and an empty
    /// numeric variable counts as unset; a bad value is an error naming the variable.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let text = |name: &str| lookup(name).unwrap_or_default();
        let number = |name: &str| lookup(name).filter(|value| !value.trim().is_empty());
        let defaults = Self::default();

        let port = match number(ENV_PORT) {
            Some(value) => value
                .trim()
                .parse()
                .with_context(|| format!("{ENV_PORT}={value:?}: expected a port number"))?,
            None => defaults.port,
        };
        let fail_percent = match number(ENV_FAIL_PERCENT) {
            Some(value) => match value.trim().parse::<u8>() {
                Ok(percent) if percent <= 100 => percent,
                _ => bail!("{ENV_FAIL_PERCENT}={value:?}: expected an integer from 0 to 100"),
            },
            None => defaults.fail_percent,
        };
        let fail_status = match number(ENV_FAIL_STATUS) {
            Some(value) => match parse_status(value.trim()) {
                Some(status) => status,
                None => bail!("{ENV_FAIL_STATUS}={value:?}: expected an HTTP status from 200 to 599"),
            },
            None => defaults.fail_status,
        };
        let shutdown_delay = match number(ENV_SHUTDOWN_DELAY_MS) {
            Some(value) => match value.trim().parse::<u64>() {
                Ok(ms) if ms <= MAX_SHUTDOWN_DELAY_MS => std::time::Duration::from_millis(ms),
                _ => bail!(
                    "{ENV_SHUTDOWN_DELAY_MS}={value:?}: expected an integer from 0 to {MAX_SHUTDOWN_DELAY_MS}"
                ),
            },
            None => defaults.shutdown_delay,
        };
        Ok(Self {
            port,
            identity: Identity {
                service: text(ENV_SERVICE),
                version: text(ENV_VERSION),
                pod: text(ENV_POD_NAME),
                namespace: text(ENV_POD_NAMESPACE),
            },
            fail_percent,
            fail_status,
            shutdown_delay,
        })
    }
}

/// A final response status the demo may answer with: 200 to 599 (1xx are not final answers).
pub(crate) fn parse_status(value: &str) -> Option<StatusCode> {
    value
        .parse::<u16>()
        .ok()
        .filter(|code| (200..=599).contains(code))
        .and_then(|code| StatusCode::from_u16(code).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(vars: &[(&str, &str)]) -> Result<Config> {
        Config::from_lookup(|name| {
            vars.iter().find(|(key, _)| *key == name).map(|(_, value)| value.to_string())
        })
    }

    #[test]
    fn defaults_when_unset() {
        assert_eq!(from(&[]).unwrap(), Config::default());
    }

    #[test]
    fn reads_every_variable() {
        let config = from(&[
            (ENV_PORT, "9090"),
            (ENV_SERVICE, "reviews"),
            (ENV_VERSION, "v2"),
            (ENV_POD_NAME, "reviews-v2-abc"),
            (ENV_POD_NAMESPACE, "shop"),
            (ENV_FAIL_PERCENT, "25"),
            (ENV_FAIL_STATUS, "500"),
            (ENV_SHUTDOWN_DELAY_MS, "3000"),
        ])
        .unwrap();
        assert_eq!(config.port, 9090);
        assert_eq!(config.identity.service, "reviews");
        assert_eq!(config.identity.version, "v2");
        assert_eq!(config.identity.pod, "reviews-v2-abc");
        assert_eq!(config.identity.namespace, "shop");
        assert_eq!(config.fail_percent, 25);
        assert_eq!(config.fail_status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(config.shutdown_delay, std::time::Duration::from_secs(3));
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (name, value) in [
            (ENV_FAIL_PERCENT, "101"),
            (ENV_FAIL_PERCENT, "-1"),
            (ENV_FAIL_PERCENT, "ten"),
            (ENV_FAIL_STATUS, "99"),
            (ENV_FAIL_STATUS, "600"),
            (ENV_FAIL_STATUS, "x"),
            (ENV_SHUTDOWN_DELAY_MS, "10001"),
            (ENV_SHUTDOWN_DELAY_MS, "-1"),
            (ENV_PORT, "70000"),
        ] {
            let error = from(&[(name, value)]).unwrap_err().to_string();
            assert!(error.starts_with(&format!("{name}=")), "{name}={value}: {error}");
        }
    }
}
