//! The traffic capture that `weft-proxy init` installs in a pod's network namespace: inbound TCP
//! to the inbound listener, outbound TCP to the outbound listener, with the proxy's own traffic
//! (by UID), loopback, and the excluded ports and CIDRs left alone.
//!
//! The rules are a pure function of [`Capture`], rendered as one `iptables-restore` input so
//! they are installed atomically: a pod never runs with half its rules.

use std::{
    io::Write as _,
    net::IpAddr,
    process::{Command, Stdio},
};

/// What to capture, from `weft-proxy init`'s flags (which the injector sets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capture {
    /// The proxy runs as this UID; its own connections are never redirected.
    pub proxy_uid: u32,
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// Inbound destination ports that reach the pod directly (the admin port, at least).
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports that bypass the proxy.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destinations (IPv4 addresses or CIDRs) that bypass the proxy.
    pub exclude_outbound_cidrs: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0:?} is not an IP address or CIDR")]
    BadCidr(String),
    #[error("running {command}: {source}")]
    Spawn { command: &'static str, source: std::io::Error },
    #[error("{command} refused the rules ({status}): {stderr}")]
    Rejected { command: &'static str, status: std::process::ExitStatus, stderr: String },
}

/// The chains Weft owns in the nat table.
const INBOUND: &str = "WEFT_INBOUND";
const OUTBOUND: &str = "WEFT_OUTPUT";

/// Renders the `iptables-restore` input for the nat table. Fails on a malformed CIDR, before
/// anything is installed. Only IPv4 is captured so far, so IPv6 exclusions (valid, and already
/// bypassing the proxy) need no rule.
pub fn rules(capture: &Capture) -> Result<String, Error> {
    let mut ipv4_exclusions = Vec::new();
    for cidr in &capture.exclude_outbound_cidrs {
        let (address, prefix) = cidr.split_once('/').unwrap_or((cidr, ""));
        let (is_v4, max) = match address.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => (true, 32),
            Ok(IpAddr::V6(_)) => (false, 128),
            Err(_) => return Err(Error::BadCidr(cidr.clone())),
        };
        if !(prefix.is_empty() || prefix.parse::<u8>().is_ok_and(|p| p <= max)) {
            return Err(Error::BadCidr(cidr.clone()));
        }
        if is_v4 {
            ipv4_exclusions.push(cidr);
        }
    }
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    line("*nat".to_owned());
    line(format!(":{INBOUND} - [0:0]"));
    line(format!(":{OUTBOUND} - [0:0]"));
    // Inbound: everything arriving for the pod, except the excluded ports, to the inbound listener.
    line(format!("-A PREROUTING -p tcp -j {INBOUND}"));
    for port in &capture.exclude_inbound_ports {
        line(format!("-A {INBOUND} -p tcp --dport {port} -j RETURN"));
    }
    line(format!("-A {INBOUND} -p tcp -j REDIRECT --to-ports {}", capture.inbound_port));
    // Outbound: the app's connections, except the proxy's own, loopback and the exclusions.
    line(format!("-A OUTPUT -p tcp -j {OUTBOUND}"));
    line(format!("-A {OUTBOUND} -m owner --uid-owner {} -j RETURN", capture.proxy_uid));
    line(format!("-A {OUTBOUND} -d 127.0.0.1/32 -j RETURN"));
    for port in &capture.exclude_outbound_ports {
        line(format!("-A {OUTBOUND} -p tcp --dport {port} -j RETURN"));
    }
    for cidr in ipv4_exclusions {
        line(format!("-A {OUTBOUND} -d {cidr} -j RETURN"));
    }
    line(format!("-A {OUTBOUND} -p tcp -j REDIRECT --to-ports {}", capture.outbound_port));
    line("COMMIT".to_owned());
    Ok(out)
}

/// Installs `rules` with `iptables-restore --noflush` (other tables and chains are kept).
pub fn install(rules: &str) -> Result<(), Error> {
    const COMMAND: &str = "iptables-restore";
    let mut child = Command::new(COMMAND)
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn { command: COMMAND, source })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(rules.as_bytes()).map_err(|source| Error::Spawn { command: COMMAND, source })?;
    }
    let output = child.wait_with_output().map_err(|source| Error::Spawn { command: COMMAND, source })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        return Err(Error::Rejected { command: COMMAND, status: output.status, stderr });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capture() -> Capture {
        Capture {
            proxy_uid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            exclude_inbound_ports: vec![15000, 15006],
            exclude_outbound_ports: vec![5432],
            exclude_outbound_cidrs: vec![
                "169.254.169.254".to_owned(),
                "10.96.0.0/12".to_owned(),
                "fd00::/8".to_owned(),
            ],
        }
    }

    #[test]
    fn renders_one_atomic_restore_for_the_nat_table() {
        assert_eq!(
            rules(&capture()).unwrap(),
            "*nat\n\
             :WEFT_INBOUND - [0:0]\n\
             :WEFT_OUTPUT - [0:0]\n\
             -A PREROUTING -p tcp -j WEFT_INBOUND\n\
             -A WEFT_INBOUND -p tcp --dport 15000 -j RETURN\n\
             -A WEFT_INBOUND -p tcp --dport 15006 -j RETURN\n\
             -A WEFT_INBOUND -p tcp -j REDIRECT --to-ports 15006\n\
             -A OUTPUT -p tcp -j WEFT_OUTPUT\n\
             -A WEFT_OUTPUT -m owner --uid-owner 1337 -j RETURN\n\
             -A WEFT_OUTPUT -d 127.0.0.1/32 -j RETURN\n\
             -A WEFT_OUTPUT -p tcp --dport 5432 -j RETURN\n\
             -A WEFT_OUTPUT -d 169.254.169.254 -j RETURN\n\
             -A WEFT_OUTPUT -d 10.96.0.0/12 -j RETURN\n\
             -A WEFT_OUTPUT -p tcp -j REDIRECT --to-ports 15001\n\
             COMMIT\n"
        );
    }

    #[test]
    fn a_malformed_cidr_is_refused_before_anything_is_installed() {
        for bad in ["10.0.0.0/33", "example.com", "fd00::/129", "10.0.0.0/x"] {
            let mut capture = capture();
            capture.exclude_outbound_cidrs = vec![bad.to_owned()];
            assert!(matches!(rules(&capture), Err(Error::BadCidr(c)) if c == bad), "{bad}");
        }
    }
}
