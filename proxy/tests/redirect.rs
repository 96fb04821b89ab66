//! The redirect listeners (outbound 15001, inbound 15006) with real iptables REDIRECT rules, so the proxy reads the original
//! destination with SO_ORIGINAL_DST. Nothing lower can catch a wrong `getsockopt` or a listener
//! that ignores the original destination, so this runs the binary in a network namespace the
//! test creates (`unshare -n`), where the virtual IPs 10.96.0.x live on its own loopback and no
//! packet leaves the namespace. The proxy runs as UID 1337, which the rule exempts, exactly as in
//! a pod. Needs root, `unshare`, `setpriv` and `iptables`; `cargo xtask test` installs iptables
//! (Debian's package). Without them the test fails and says what is missing: it never skips.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_weft-proxy");

fn missing_tools() -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0"))
    });
    if uid != Some(true) {
        return Some("not root".into());
    }
    for tool in ["unshare", "setpriv", "iptables", "ip"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output();
        if !found.is_ok_and(|o| o.status.success()) {
            return Some(format!("{tool} not installed"));
        }
    }
    None
}

#[test]
fn redirect_listeners_use_the_original_destination() {
    if let Some(why) = missing_tools() {
        panic!(
            "this test needs root, unshare, setpriv, ip and iptables ({why}); `cargo xtask test` installs what is missing"
        );
    }
    let dir = std::env::temp_dir().join(format!("weft-redirect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.yaml");
    // 10.96.0.10:80 is an HTTP service answered by a direct response; 10.96.0.11:5432 is opaque
    // TCP whose endpoint is the proxy's own admin port, so the bytes prove the splice.
    std::fs::write(
        &config,
        r#"
version: redirect
services:
  - name: web.default.svc.cluster.local
    addresses: ["10.96.0.10"]
    ports: [{number: 80}]
    httpRoutes: [{directResponse: {status: 200, body: "via-outbound"}}]
  - name: db.default.svc.cluster.local
    addresses: ["10.96.0.11"]
    ports: [{number: 5432, protocol: TCP, endpoints: [{address: "127.0.0.1:15000"}]}]
"#,
    )
    .unwrap();
    let log = dir.join("proxy.log");
    let script = format!(
        r#"
set -eu
ip link set lo up
ip addr add 10.96.0.10/32 dev lo
ip addr add 10.96.0.11/32 dev lo
ip addr add 10.96.1.20/32 dev lo
iptables -t nat -A OUTPUT -p tcp -d 10.96.0.0/24 -m owner ! --uid-owner 1337 -j REDIRECT --to-ports 15001
iptables -t nat -A OUTPUT -p tcp -d 10.96.1.20 -m owner ! --uid-owner 1337 -j REDIRECT --to-ports 15006
setpriv --reuid 1337 --regid 1337 --clear-groups {bin} --config {config} --log-format json \
  --admin-addr 127.0.0.1:15000 --outbound-addr 127.0.0.1:15001 --inbound-addr 127.0.0.1:15006 2>{log} &
pid=$!
for _ in $(seq 1 200); do grep -q 'weft-proxy started' {log} && break; sleep 0.05; done
exec 3<>/dev/tcp/10.96.0.10/80
printf 'GET /anything HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n' >&3
echo "HTTP: $(tr -d '\r' <&3 | tail -n 1)"
exec 3<&-
exec 4<>/dev/tcp/10.96.0.11/5432
printf 'GET /live HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n' >&4
echo "TCP: $(tr -d '\r' <&4 | tail -n 1)"
exec 4<&-
exec 5<>/dev/tcp/10.96.1.20/15000
printf 'GET /ready HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n' >&5
echo "INBOUND: $(tr -d '\r' <&5 | tail -n 1)"
exec 5<&-
kill -TERM $pid
wait $pid
echo "EXIT: $?"
"#,
        bin = BIN,
        config = config.display(),
        log = log.display(),
    );
    let out = Command::new("timeout").args(["60", "unshare", "-n", "bash", "-c", &script]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    let context =
        format!("stdout:\n{stdout}\nstderr:\n{}\nproxy log:\n{logs}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{context}");
    assert!(stdout.contains("HTTP: via-outbound"), "{context}");
    assert!(stdout.contains("TCP: live"), "{context}");
    assert!(
        stdout.contains("INBOUND: ready"),
        "inbound goes to the app on 127.0.0.1 and the original port: {context}"
    );
    assert!(stdout.contains("EXIT: 0"), "{context}");
    let _ = std::fs::remove_dir_all(&dir);
}
