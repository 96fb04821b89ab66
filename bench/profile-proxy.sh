#!/usr/bin/env bash
# Instructions per proxied request through weft-proxy (one hop, HTTP/1.1, 1 KB body, keep-alive),
# counted by valgrind's callgrind, and the functions that spend them.
#
# Usage: bench/profile-proxy.sh [REQUESTS] [CONNECTIONS] [h1|h2] [none|retry|inbound|authz]
#                               [plain|mtls] [http1|h2]
#                               (defaults 2000, 16, h1, none, plain, http1)
# h2 sends HTTP/2 (h2c, 10 streams per connection); the proxy's upstream stays HTTP/1.1.
# `retry` gives the route a retry policy that needs copies of each request (5xx and resets, 2
# attempts, the default budget): what such a policy costs when nothing fails.
# `inbound` sends the requests to an explicit inbound listener (`--listen-inbound`: the path to
# the local app, with path normalization) and `authz` adds 10 authorization policies of 10 rules
# each that the workload evaluates in full for every request (5 DENY that do not match, then 5
# ALLOW of which only the last rule matches): authz minus inbound is what authorization costs.
# `mtls` (with `inbound` or `authz` only) makes the client a mesh workload: the load goes to a
# second weft-proxy, its sidecar (explicit outbound listener, on CPU 0, not profiled), which
# reaches the profiled proxy's inbound listener over mesh mTLS (TLS 1.3, connections kept) as
# `spiffe://cluster.local/ns/bench/sa/outbound`, an identity no rule names. The last argument says
# what carries the HTTP/1.1 requests between them: `http1` (a tunnel per request in flight, ALPN
# weft/http1, the proxy's default) or `h2` (one multiplexed HTTP/2 tunnel, ALPN weft/h2-http1):
# the rules that name principals are compared and fail. The certificates come from the bench's
# root (`target/release/proxy --write-certs`, built when missing). The profiled proxy's count
# then includes its side of TLS; the run fails unless every request it counted came over mTLS.
#
# The proxy runs under callgrind with one worker; an nginx origin answers 1 KB. Also printed: the
# heap allocations per request (calls into malloc, calloc, realloc and posix_memalign). After 300
# warm-up requests the counters are zeroed, REQUESTS requests are sent (h2load --h1, bounded in
# count and time), and the counters are dumped: total instructions / REQUESTS is the cost of one
# request. The per-function table is written to $OUT (default bench/results/proxy-callgrind.txt);
# the raw callgrind dump stays in a temporary directory and is removed.
# WEFT_PROXY=FILE profiles that binary instead of building target/release/weft-proxy (to compare
# runs of one build while the tree changes).
# Needs valgrind, nginx and h2load (nghttp2-client): `cargo xtask bench proxy` installs the last two.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
requests=${1:-2000}
conns=${2:-16}
proto=${3:-h1}
policy=${4:-none}
client=${5:-plain}
tunnel=${6:-http1}
inbound_policy=""
case "$policy" in
  none|inbound) route="" ;;
  retry) route='    httpRoutes: [{route: [{destination: {host: origin}}], retries: {attempts: 2, retryOn: "5xx,reset"}}]' ;;
  authz)
    route=""
    inbound_policy="inbound:
  authorizations:"
    for p in 0 1 2 3 4 5 6 7 8 9; do
      action=DENY; [ "$p" -ge 5 ] && action=ALLOW
      inbound_policy+="
    - name: bench/p$p
      action: $action
      rules:"
      for r in 0 1 2 3 4 5 6 7 8 9; do
        if [ "$p" = 9 ] && [ "$r" = 9 ]; then
          inbound_policy+="
        - to: [{methods: [GET], paths: [\"/*\"]}]"
        else
          inbound_policy+="
        - from: [{principals: [\"cluster.local/ns/bench/sa/p$p-r$r\"]}]
          to: [{methods: [DELETE], paths: [\"/admin/$p/$r*\"]}]"
        fi
      done
    done
    ;;
  *) echo "policy must be none, retry, inbound or authz" >&2; exit 2 ;;
esac
case "$client/$policy" in
  plain/*|mtls/inbound|mtls/authz) ;;
  mtls/*) echo "an mtls client needs the inbound or authz policy" >&2; exit 2 ;;
  *) echo "the client must be plain or mtls" >&2; exit 2 ;;
esac
case "$tunnel" in
  h2) upgrade=UPGRADE ;;
  http1) upgrade=DO_NOT_UPGRADE ;;
  *) echo "the tunnel must be http1 or h2" >&2; exit 2 ;;
esac
case "$proto" in
  h1) load=(--h1) ;;
  h2) load=(-m 10) ;;
  *) echo "protocol must be h1 or h2" >&2; exit 2 ;;
esac
out=${OUT:-bench/results/proxy-callgrind.txt}
port_origin=27380
port_proxy=27383
port_admin=27384
port_client=27385
port_client_admin=27386
listen=(--listen "127.0.0.1:$port_proxy")
case "$policy" in
  inbound|authz) listen=(--listen-inbound "127.0.0.1:$port_proxy=$port_origin") ;;
esac
for tool in valgrind callgrind_control callgrind_annotate nginx h2load; do
  command -v "$tool" > /dev/null || { echo "$tool is needed (apt-get install valgrind nginx-light nghttp2-client)" >&2; exit 1; }
done
weft=${WEFT_PROXY:-}
if [ -z "$weft" ]; then
  cargo build --quiet --release -p weft-proxy --bin weft-proxy >&2
  weft=./target/release/weft-proxy
fi
# The certificates' writer: built when missing only (it does not depend on the proxy under test,
# and rebuilding the bench with everything it links is slow).
if [ "$client" = mtls ] && ! ./target/release/proxy --help 2> /dev/null | grep -q -- --write-certs; then
  cargo build --quiet --release -p weft-bench --bin proxy >&2
fi
mkdir -p "$(dirname "$out")"
dir=$(mktemp -d /tmp/weft-bench-profile.XXXXXX)
origin_pid=
proxy_pid=
client_pid=
cleanup() {
  [ -n "$client_pid" ] && kill "$client_pid" 2> /dev/null || true
  [ -n "$proxy_pid" ] && kill "$proxy_pid" 2> /dev/null || true
  [ -n "$origin_pid" ] && kill "$origin_pid" 2> /dev/null || true
  wait 2> /dev/null || true
  rm -rf -- "$dir"
}
trap cleanup EXIT

body=$(head -c 1024 /dev/zero | tr '\0' a)
cat > "$dir/nginx.conf" << EOF
daemon off; master_process off; worker_processes 1; pid $dir/nginx.pid; error_log stderr warn;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000; client_body_temp_path $dir/body; proxy_temp_path $dir/proxy;
  server { listen 127.0.0.1:$port_origin; location / { default_type text/plain; return 200 "$body"; } } }
EOF
cat > "$dir/weft.yaml" << EOF
version: profile
services:
  - name: origin
    aliases: ["127.0.0.1"]
    ports: [{number: $port_origin, protocol: HTTP1, endpoints: [{address: "127.0.0.1:$port_origin"}]}]
$route
$inbound_policy
EOF
identity=()
target=$port_proxy
if [ "$client" = mtls ]; then
  ./target/release/proxy --write-certs "$dir/certs"
  identity=(--cert-file "$dir/certs/inbound.crt" --key-file "$dir/certs/inbound.key"
    --trust-bundle-file "$dir/certs/root.pem")
  # The client's sidecar routes by Host (the alias 127.0.0.1) to the profiled proxy's inbound
  # listener, an endpoint reached over mTLS that must present the inbound identity.
  cat > "$dir/client.yaml" << EOF
version: profile
services:
  - name: origin
    aliases: ["127.0.0.1"]
    ports: [{number: $port_proxy, protocol: HTTP1, endpoints: [{address: "127.0.0.1:$port_proxy", identity: "spiffe://cluster.local/ns/bench/sa/inbound"}]}]
    trafficPolicy: {connectionPool: {h2Upgrade: $upgrade}}
EOF
  taskset -c 0 "$weft" --config "$dir/client.yaml" --no-redirect \
    --listen "127.0.0.1:$port_client" --admin-addr "127.0.0.1:$port_client_admin" --workers 1 \
    --log warn --cert-file "$dir/certs/outbound.crt" --key-file "$dir/certs/outbound.key" \
    --trust-bundle-file "$dir/certs/root.pem" 2> "$dir/client.log" &
  client_pid=$!
  target=$port_client
fi
taskset -c 1 nginx -e stderr -c "$dir/nginx.conf" &
origin_pid=$!
valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" --dump-instr=no \
  "$weft" --config "$dir/weft.yaml" --no-redirect "${listen[@]}" "${identity[@]}" \
  --admin-addr "127.0.0.1:$port_admin" --workers 1 --log warn 2> "$dir/valgrind.log" &
proxy_pid=$!
for _ in $(seq 1 300); do
  curl -fs -o /dev/null "http://127.0.0.1:$target/" 2> /dev/null && break
  sleep 0.1
done
curl -fs -o /dev/null "http://127.0.0.1:$target/" || {
  echo "proxy did not start" >&2
  cat "$dir/valgrind.log" >&2
  [ -z "$client_pid" ] || cat "$dir/client.log" >&2
  exit 1
}
timeout 120 h2load "${load[@]}" -n 300 -c "$conns" "http://127.0.0.1:$target/" > /dev/null
handshakes() {
  curl -fs "http://127.0.0.1:$port_admin/metrics" | awk '/^weft_tls_handshakes_total\{/ { n += $NF } END { print n + 0 }'
}
[ "$client" = plain ] || handshakes_before=$(handshakes)
callgrind_control -z "$proxy_pid" > /dev/null
timeout 300 h2load "${load[@]}" -n "$requests" -c "$conns" "http://127.0.0.1:$target/" > "$dir/h2load.txt"
grep -q "succeeded, 0 failed, 0 errored" < <(grep "requests:" "$dir/h2load.txt" | sed 's/.*started, //') \
  || { echo "h2load reported failures:" >&2; cat "$dir/h2load.txt" >&2; exit 1; }
callgrind_control -d "$proxy_pid" > /dev/null
sleep 1
if [ "$client" = mtls ]; then
  # A handshake costs as much as hundreds of requests: the client's sidecar should keep its
  # connections from the warm-up on.
  echo "mTLS handshakes during the measured requests: $(($(handshakes) - handshakes_before))" >&2
  # Every request the profiled proxy counted came through the mesh tunnel.
  curl -fs "http://127.0.0.1:$port_admin/metrics" > "$dir/metrics.txt"
  awk '/^weft_requests_total\{/ { if ($0 ~ /tls="true"/) t += $NF; else p += $NF }
       END { printf "requests counted by the profiled proxy: %d over mTLS, %d without\n", t, p; exit !(t > 0 && p == 0) }' \
    "$dir/metrics.txt" >&2 || { echo "the client did not reach the profiled proxy over mTLS only" >&2; exit 1; }
fi
dump=$(ls -t "$dir"/callgrind.out.* | head -1)
# callgrind_annotate exits non-zero when it cannot find source files to annotate; that is fine.
(callgrind_annotate --inclusive=no --threshold=100 "$dump" 2> /dev/null || true) | head -200 > "$out"
total=$(awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}' "$out")
tunnels=""
[ "$client" = plain ] || tunnels=", $tunnel tunnel"
echo "requests: $requests over $conns connections ($proto downstream, HTTP/1.1 upstream, 1 KB, route policy: $policy, $client client$tunnels)"
echo "instructions in weft-proxy: $total, per request: $((total / requests))"
# Heap allocations: the calls callgrind recorded into the allocator's entry points.
allocations=$(awk '
  /^c?fn=\(/ {
    id = $1; sub(/^c?fn=/, "", id); name = $0; sub(/^[^ ]* ?/, "", name)
    if (name != "") names[id] = name
    if ($1 ~ /^cfn=/) callee = names[id]
    next
  }
  /^calls=/ && callee ~ /^(malloc|calloc|realloc|posix_memalign|aligned_alloc)$/ {
    split($1, c, "="); n += c[2]
  }
  END { print n + 0 }' "$dump")
echo "heap allocations (malloc, calloc, realloc, posix_memalign): $allocations, per request: $((allocations / requests))"
echo "functions by instructions (the first lines are the runtime's inclusive frames): $out"
grep -E '^ *[0-9,]+ \(' "$out" | grep -v -E 'PROGRAM TOTALS|clone|start_thread|thread_start|call_once|rust_begin|blocking::pool|harness::Harness<T,S>::poll \[|core::Core|BlockingTask|raw::poll|Scoped|worker::run' | head -30 | cut -c1-160 || true
