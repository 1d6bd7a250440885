#!/usr/bin/env bash
# Build the local control-plane binaries (kube-apiserver, kube-controller-manager,
# etcd, helm; for the node: kubelet, kube-proxy, kube-scheduler, CoreDNS and a pause
# binary) from the Go module proxy, fetch promtool from Debian's prometheus package,
# and cache them outside the repo, keyed by version.
# Prints nothing but progress on stderr; a second run with a warm cache is a no-op.
#
#   hack/build-binaries.sh            build what is missing
#   hack/build-binaries.sh --print    print the bin directory (after building)
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-1.37.2}"
ETCD_VERSION="${ETCD_VERSION:-3.6.16}"
HELM_VERSION="${HELM_VERSION:-3.22.0}"
# promtool (alert rule unit tests) from Debian's prometheus package, pinned.
PROMETHEUS_DEB_VERSION="${PROMETHEUS_DEB_VERSION:-2.42.0+ds-5+deb12u1}"
# The Prometheus Operator CRDs the chart targets (ServiceMonitor, PrometheusRule),
# from its Go module, for install tests and schema validation.
PROMETHEUS_OPERATOR_VERSION="${PROMETHEUS_OPERATOR_VERSION:-0.85.0}"
# kubeconform (strict manifest validation in make test-chart), from the Go module proxy.
KUBECONFORM_VERSION="${KUBECONFORM_VERSION:-0.8.0}"
# checkov (policy checks on the rendered chart), from PyPI into a virtualenv of its own.
CHECKOV_VERSION="${CHECKOV_VERSION:-3.3.30}"
# CoreDNS (Service names for Pods on the local node), from its Go module with the
# plugins hack/node/coredns.go selects.
COREDNS_VERSION="${COREDNS_VERSION:-1.15.0}"
CACHE="${AAO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/agent-access-operator}"
BIN="$CACHE/bin"
export GOFLAGS="${GOFLAGS:--buildvcs=false} -trimpath"
export CGO_ENABLED=0

K8S_BIN="$BIN/kubernetes-v$K8S_VERSION"
ETCD_BIN="$BIN/etcd-v$ETCD_VERSION"
HELM_BIN="$BIN/helm-v$HELM_VERSION"
PROMTOOL_BIN="$BIN/promtool-${PROMETHEUS_DEB_VERSION//[+~:]/_}"
PROMOP_CRDS="$BIN/prometheus-operator-crds-v$PROMETHEUS_OPERATOR_VERSION"
KUBECONFORM_BIN="$BIN/kubeconform-v$KUBECONFORM_VERSION"
CHECKOV_VENV="$BIN/checkov-v$CHECKOV_VERSION"

log() { echo "build-binaries: $*" >&2; }

# Kubernetes components built from the same k8s.io/kubernetes module, one version.
# kubelet, kube-proxy and kube-scheduler serve `make node-up` (a real node); built with the rest so
# one module download serves all.
K8S_COMPONENTS="${K8S_COMPONENTS:-kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy}"

build_kubernetes() {
  local missing=""
  for c in $K8S_COMPONENTS; do [ -x "$K8S_BIN/$c" ] || missing="$missing $c"; done
  [ -z "$missing" ] && return 0
  local minor="${K8S_VERSION#*.}"; minor="${minor%%.*}"
  local staging_version="0.${K8S_VERSION#*.}"
  local mod; mod="$(mktemp -d)"
  log "building$missing v$K8S_VERSION in $mod (cold build: several minutes)"
  local started=$SECONDS
  (
    cd "$mod"
    # The upstream go.mod requires its staging modules at v0.0.0 and replaces
    # them with local paths; read the list from it and replace each with its release.
    local upstream
    upstream="$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
    cat > go.mod <<GOMOD
module agentaccess.local/controlplane

go 1.26

require k8s.io/kubernetes v$K8S_VERSION
GOMOD
    grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$upstream" \
      | awk '{print $1}' | sort -u \
      | while read -r m; do echo "replace $m => $m v$staging_version" >> go.mod; done
    log "$(grep -c '^replace' go.mod) staging modules replaced with v$staging_version"
    {
      printf '//go:build tools\n\npackage tools\n\nimport (\n'
      for c in $missing; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$c"; done
      printf ')\n'
    } > tools.go
    go mod tidy -e >/dev/null 2>&1 || true
    for c in $missing; do go get "k8s.io/kubernetes/cmd/$c@v$K8S_VERSION" >&2; done
    local ld="-s -w"
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ld="$ld -X $p.gitVersion=v$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
    done
    mkdir -p "$K8S_BIN"
    for c in $missing; do
      go build -ldflags "$ld" -o "$K8S_BIN/$c.tmp" "k8s.io/kubernetes/cmd/$c"
      mv "$K8S_BIN/$c.tmp" "$K8S_BIN/$c"
    done
  )
  rm -rf "$mod"
  log "built$missing in $((SECONDS - started))s"
}

# go_main DIR NAME SOURCE [MODULE@VERSION]: build the one main package in SOURCE into
# DIR/NAME (skipped when there), with the module it imports from at that version.
go_main() {
  local dir="$1" name="$2" src="$3" dep="${4:-}"
  [ -x "$dir/$name" ] && return 0
  log "building $name${dep:+ from $dep}"
  local started=$SECONDS mod
  mod="$(mktemp -d)"
  cp "$src" "$mod/main.go"
  printf 'module agentaccess.local/%s\n\ngo 1.26\n' "$name" > "$mod/go.mod"
  (
    cd "$mod"
    if [ -n "$dep" ]; then go get "$dep" >&2 && go mod tidy >&2; fi
    mkdir -p "$dir.tmp"
    go build -ldflags "-s -w" -o "$dir.tmp/$name" .
  )
  rm -rf "$dir"; mv "$dir.tmp" "$dir"; rm -rf "$mod"
  log "$name built in $((SECONDS - started))s"
}

build_etcd() {
  local src; src="$(mktemp --suffix=.go)"
  cat > "$src" <<'GOSRC'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GOSRC
  go_main "$ETCD_BIN" etcd "$src" "go.etcd.io/etcd/server/v3@v$ETCD_VERSION"
  rm -f "$src"
}

build_helm() {
  [ -x "$HELM_BIN/helm" ] && return 0
  log "building helm v$HELM_VERSION"
  local started=$SECONDS
  mkdir -p "$HELM_BIN.tmp"
  GOBIN="$HELM_BIN.tmp" go install -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION" "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION"
  rm -rf "$HELM_BIN"; mv "$HELM_BIN.tmp" "$HELM_BIN"
  log "helm built in $((SECONDS - started))s"
}

fetch_promtool() {
  [ -x "$PROMTOOL_BIN/promtool" ] && return 0
  command -v apt-get >/dev/null || { log "promtool comes from Debian's prometheus package: apt-get is required"; exit 1; }
  log "fetching promtool from Debian's prometheus $PROMETHEUS_DEB_VERSION"
  local tmp; tmp="$(mktemp -d)"
  (
    cd "$tmp"
    apt-get download -q "prometheus=$PROMETHEUS_DEB_VERSION" >&2 \
      || { apt-get update -q >&2 && apt-get download -q "prometheus=$PROMETHEUS_DEB_VERSION" >&2; }
    dpkg-deb -x prometheus_*.deb root
    mkdir -p "$PROMTOOL_BIN.tmp"
    cp root/usr/bin/promtool "$PROMTOOL_BIN.tmp/promtool"
  )
  rm -rf "$PROMTOOL_BIN"; mv "$PROMTOOL_BIN.tmp" "$PROMTOOL_BIN"; rm -rf "$tmp"
  "$PROMTOOL_BIN/promtool" --version >&2
}

fetch_prometheus_operator_crds() {
  [ -f "$PROMOP_CRDS/monitoring.coreos.com_servicemonitors.yaml" ] && return 0
  log "fetching the Prometheus Operator CRDs v$PROMETHEUS_OPERATOR_VERSION"
  local dir
  dir="$(go mod download -json "github.com/prometheus-operator/prometheus-operator@v$PROMETHEUS_OPERATOR_VERSION" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
  mkdir -p "$PROMOP_CRDS.tmp"
  for kind in servicemonitors prometheusrules; do
    cp "$dir/example/prometheus-operator-crd/monitoring.coreos.com_$kind.yaml" "$PROMOP_CRDS.tmp/"
  done
  chmod -R u+w "$PROMOP_CRDS.tmp"
  rm -rf "$PROMOP_CRDS"; mv "$PROMOP_CRDS.tmp" "$PROMOP_CRDS"
}

build_kubeconform() {
  [ -x "$KUBECONFORM_BIN/kubeconform" ] && return 0
  log "building kubeconform v$KUBECONFORM_VERSION"
  mkdir -p "$KUBECONFORM_BIN.tmp"
  GOBIN="$KUBECONFORM_BIN.tmp" go install -ldflags "-s -w" "github.com/yannh/kubeconform/cmd/kubeconform@v$KUBECONFORM_VERSION"
  rm -rf "$KUBECONFORM_BIN"; mv "$KUBECONFORM_BIN.tmp" "$KUBECONFORM_BIN"
}

COREDNS_BIN="$BIN/coredns-v$COREDNS_VERSION-$(sha256sum "$(dirname "$0")/node/coredns.go" | cut -c1-12)"
build_coredns() {
  go_main "$COREDNS_BIN" coredns "$(dirname "$0")/node/coredns.go" "github.com/coredns/coredns@v$COREDNS_VERSION"
}

# The pod sandbox image's one binary (sleeps until signalled, reaps children), from
# hack/node/pause.go: a few lines of Go, no dependencies.
PAUSE_BIN="$BIN/pause-$(sha256sum "$(dirname "$0")/node/pause.go" | cut -c1-12)"
build_pause() {
  go_main "$PAUSE_BIN" pause "$(dirname "$0")/node/pause.go"
}

install_checkov() {
  [ -f "$CHECKOV_VENV/.installed" ] && return 0
  log "installing checkov $CHECKOV_VERSION"
  rm -rf "$CHECKOV_VENV"  # a virtualenv cannot be moved: made in place, marked when done
  python3 -m venv "$CHECKOV_VENV"
  "$CHECKOV_VENV/bin/pip" install -q "checkov==$CHECKOV_VERSION" >&2
  touch "$CHECKOV_VENV/.installed"
}

command -v go >/dev/null || { log "go is required to build the control-plane binaries"; exit 1; }
build_etcd
build_helm
build_kubernetes
fetch_promtool
fetch_prometheus_operator_crds
build_kubeconform
install_checkov
build_pause
build_coredns
if [ "${1:-}" = "--print" ]; then
  echo "$K8S_BIN:$ETCD_BIN:$HELM_BIN:$PROMTOOL_BIN:$PROMOP_CRDS:$KUBECONFORM_BIN:$CHECKOV_VENV/bin:$PAUSE_BIN:$COREDNS_BIN"
fi
