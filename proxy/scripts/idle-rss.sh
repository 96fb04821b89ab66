#!/usr/bin/env bash
# Reports weft-proxy's idle resident memory (VmRSS) for a release build: starts the proxy with a
# small config on loopback, waits until /ready answers, reads /proc/<pid>/status, stops it.
# Usage: proxy/scripts/idle-rss.sh   (target: under 10 MiB)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
cargo build --release -p weft-proxy --bin weft-proxy >&2
dir=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT
cat > "$dir/config.yaml" <<'YAML'
version: idle
services:
  - name: hello
    ports: [{number: 80}]
    httpRoutes: [{directResponse: {status: 200, body: "hi"}}]
YAML
./target/release/weft-proxy --config "$dir/config.yaml" --no-redirect --admin-addr 127.0.0.1:0 \
  --listen 127.0.0.1:0 --log-format json 2> "$dir/log" &
pid=$!
for _ in $(seq 1 100); do
  grep -q '"weft-proxy started"' "$dir/log" 2>/dev/null && break
  sleep 0.1
done
grep -q '"weft-proxy started"' "$dir/log" || { echo "proxy did not start" >&2; cat "$dir/log" >&2; exit 1; }
rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")
echo "weft-proxy idle RSS: ${rss} KiB (release build, pid $pid)"
[ "$rss" -lt 10240 ] || { echo "over the 10 MiB target" >&2; exit 1; }
