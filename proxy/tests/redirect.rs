//! The pod's traffic capture as `weft-proxy init` installs it (real iptables rules), and the
//! redirect listeners (outbound 15001, inbound 15006) reading the original destination with
//! SO_ORIGINAL_DST. Nothing lower can catch a wrong rule, a wrong `getsockopt` or a listener that
//! ignores the original destination, so this runs the binary in a network namespace the test
//! creates (`unshare -n`): the "pod". Virtual IPs 10.96.0.x live on its loopback; a second
//! namespace made inside it (`ip netns add`), joined by a veth pair on 10.200.0.0/24, is the
//! client that calls the pod from outside. No packet leaves the two namespaces. The proxy runs as
//! UID 1337, which the rules exempt, exactly as in a pod. Needs root, `unshare`, `setpriv` and `iptables`; `cargo xtask test` installs iptables
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
    for tool in ["unshare", "setpriv", "iptables-restore", "ip"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output();
        if !found.is_ok_and(|o| o.status.success()) {
            return Some(format!("{tool} not installed"));
        }
    }
    None
}

#[test]
fn init_captures_traffic_and_the_listeners_use_the_original_destination() {
    if let Some(why) = missing_tools() {
        panic!(
            "this test needs root, unshare, setpriv, ip and iptables ({why}); `cargo xtask test` installs what is missing"
        );
    }
    let dir = std::env::temp_dir().join(format!("weft-redirect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.yaml");
    // 10.96.0.10:80 is an HTTP service answered by a direct response; 10.96.0.11:5432 is opaque
    // TCP whose endpoint is the proxy's own admin port, so the bytes prove the splice; "app" is
    // the pod's application, played by an explicit listener on :8080 that inbound traffic reaches.
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
  - name: app
    ports: [{number: 8080}]
    httpRoutes: [{directResponse: {status: 200, body: "app-answer"}}]
"#,
    )
    .unwrap();
    let log = dir.join("proxy.log");
    let access = dir.join("access.log");
    let script = format!(
        r#"
set -eu
ip link set lo up
ip addr add 10.96.0.10/32 dev lo
ip addr add 10.96.0.11/32 dev lo
peer=weft-client-$$
ip netns add $peer
trap 'ip netns del $peer' EXIT
ip link add weft0 type veth peer name weft1 netns $peer
ip addr add 10.200.0.1/24 dev weft0
ip link set weft0 up
ip netns exec $peer ip addr add 10.200.0.2/24 dev weft1
ip netns exec $peer ip link set weft1 up
ip netns exec $peer ip link set lo up
# The capture, exactly as the injected init container installs it (the injector's arguments).
{bin} init --proxy-uid=1337 --outbound-port=15001 --inbound-port=15006 \
  --exclude-inbound-ports=15000,15006 --exclude-outbound-ports=15000 >/dev/null
setpriv --reuid 1337 --regid 1337 --clear-groups {bin} --config {config} --log-format json --access-log \
  --admin-addr 0.0.0.0:15000 --outbound-addr 0.0.0.0:15001 --inbound-addr 0.0.0.0:15006 \
  --listen 127.0.0.1:8080 >{access} 2>{log} &
pid=$!
for _ in $(seq 1 200); do grep -q 'weft-proxy started' {log} && break; sleep 0.05; done
ask() {{ # address port Host-header path
  exec 3<>/dev/tcp/$1/$2
  printf 'GET %s HTTP/1.1\r\nhost: %s\r\nconnection: close\r\n\r\n' "$4" "$3" >&3
  tr -d '\r' <&3 | tail -n 1
  exec 3<&-
}}
echo "HTTP: $(ask 10.96.0.10 80 web /anything)"
echo "TCP: $(ask 10.96.0.11 5432 admin /live)"
echo "EXCLUDED-OUT: $(ask 10.96.0.10 15000 excluded-out /live)"
echo "INBOUND: $(ip netns exec $peer bash -c "$(declare -f ask); ask 10.200.0.1 8080 app /from-outside")"
echo "EXCLUDED-IN: $(ip netns exec $peer bash -c "$(declare -f ask); ask 10.200.0.1 15000 excluded-in /ready")"
kill -TERM $pid
wait $pid
echo "EXIT: $?"
"#,
        bin = BIN,
        config = config.display(),
        log = log.display(),
        access = access.display(),
    );
    let out = Command::new("timeout").args(["60", "unshare", "-n", "bash", "-c", &script]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    let access_log = std::fs::read_to_string(&access).unwrap_or_default();
    let context = format!(
        "stdout:\n{stdout}\nstderr:\n{}\nproxy log:\n{logs}\naccess log:\n{access_log}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{context}");
    assert!(stdout.contains("HTTP: via-outbound"), "outbound HTTP to a virtual IP is captured: {context}");
    assert!(stdout.contains("TCP: live"), "outbound opaque TCP is captured and spliced: {context}");
    assert!(
        stdout.contains("INBOUND: app-answer"),
        "inbound goes to the app on 127.0.0.1 and the original port: {context}"
    );
    assert!(stdout.contains("EXCLUDED-OUT: live") && stdout.contains("EXCLUDED-IN: ready"), "{context}");
    let directions = |authority: &str| -> Vec<String> {
        access_log
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|entry| entry["authority"] == authority)
            .map(|entry| entry["direction"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(directions("web"), ["outbound"], "{context}");
    assert!(directions("app").contains(&"inbound".to_owned()), "{context}");
    assert!(directions("excluded-out").is_empty(), "an excluded outbound port bypasses the proxy: {context}");
    assert!(directions("excluded-in").is_empty(), "an excluded inbound port bypasses the proxy: {context}");
    assert!(stdout.contains("EXIT: 0"), "{context}");
    let _ = std::fs::remove_dir_all(&dir);
}
