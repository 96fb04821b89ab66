#!/usr/bin/env bash
# Builds the test cluster's binaries from the versions pinned in go.mod (the control plane, etcd,
# helm, and the node's kubelet, kube-proxy and kubectl) and coredns/go.mod (CoreDNS), once, into
# $WEFT_CACHE/k8s-<version>/bin.
# A second run finds the stamp for this go.mod and returns at once.
# Progress goes to stderr; the only line on stdout is the bin directory.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here"
export GOTOOLCHAIN=local GOFLAGS=-mod=readonly CGO_ENABLED=0

say() { printf '[cluster build] %s\n' "$*" >&2; }

command -v go >/dev/null || { say "Go is required (go.dev toolchain >= 1.24) and was not found on PATH"; exit 1; }

module_version() { go list -m -f '{{.Version}}' "$1"; }
k8s_version=$(module_version k8s.io/kubernetes)
helm_version=$(module_version helm.sh/helm/v3)
cache=${WEFT_CACHE:-$HOME/.cache/weft}
bin="$cache/k8s-$k8s_version/bin"
stamp="$bin/.built-from"
want=$(sha256sum go.mod go.sum coredns/go.mod coredns/go.sum build.sh | sha256sum | cut -d' ' -f1)

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  say "reusing binaries in $bin"
  echo "$bin"
  exit 0
fi

minor=${k8s_version#v1.}
minor=${minor%%.*}
build_date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
k8s_ldflags="-s -w"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  k8s_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
done
# Without these, helm assumes Kubernetes v1.20 for `helm template` and `helm lint`.
helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version"
for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
  helm_ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$minor"
done

# name, module directory, cgo (the kubelet uses it, as upstream builds it), package, ldflags
targets=(
  "etcd . 0 go.etcd.io/etcd/server/v3 -s -w"
  "kube-apiserver . 0 k8s.io/kubernetes/cmd/kube-apiserver $k8s_ldflags"
  "kube-controller-manager . 0 k8s.io/kubernetes/cmd/kube-controller-manager $k8s_ldflags"
  "kube-scheduler . 0 k8s.io/kubernetes/cmd/kube-scheduler $k8s_ldflags"
  "helm . 0 helm.sh/helm/v3/cmd/helm $helm_ldflags"
  "kubelet . 1 k8s.io/kubernetes/cmd/kubelet $k8s_ldflags"
  "kube-proxy . 0 k8s.io/kubernetes/cmd/kube-proxy $k8s_ldflags"
  "kubectl . 0 k8s.io/kubernetes/cmd/kubectl $k8s_ldflags"
  "coredns coredns 0 github.com/coredns/coredns -s -w"
)

mkdir -p "$bin"
rm -f "$stamp"
say "building Kubernetes $k8s_version, etcd and helm $helm_version into $bin"
say "the first build downloads the modules and compiles for a long while on 2 cores; later runs reuse it"
say "downloading modules"
go mod download
(cd coredns && go mod download)
started=$SECONDS
n=0
for target in "${targets[@]}"; do
  read -r name dir cgo pkg ldflags <<<"$target"
  n=$((n + 1))
  t0=$SECONDS
  say "[$n/${#targets[@]}] $name ($pkg)"
  (cd "$dir" && CGO_ENABLED=$cgo go build -trimpath -ldflags "$ldflags" -o "$bin/$name.tmp" "$pkg")
  mv -f "$bin/$name.tmp" "$bin/$name"
  say "[$n/${#targets[@]}] $name done in $((SECONDS - t0))s"
done
echo "$want" >"$stamp"
say "all binaries built in $((SECONDS - started))s"
echo "$bin"
