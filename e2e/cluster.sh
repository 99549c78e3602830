#!/usr/bin/env bash
# Moat's local Kubernetes control plane: pinned upstream components, built from their published Go
# modules, cached outside the repository, run as processes on loopback by kwokctl (binary runtime).
#
#   e2e/cluster.sh build   build (or find in the cache) every pinned binary
#   e2e/cluster.sh up      build, then start the cluster or find it running; prints `export KUBECONFIG=...`
#   e2e/cluster.sh down    stop the cluster and remove its state; leaves no process behind
#   e2e/cluster.sh status  say whether the cluster runs
#   e2e/cluster.sh env     print the variables (binaries, kubeconfig, etcd endpoint) tests use
#
# Environment: MOAT_CACHE (default ~/.cache/moat), MOAT_CLUSTER (default moat), MOAT_NODES (default 3).
set -euo pipefail

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${MOAT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moat}
CLUSTER=${MOAT_CLUSTER:-moat}
NODES=${MOAT_NODES:-3}

# Pinned versions. Kubernetes and etcd come from the go.mod files beside this script.
K8S_VERSION=$(sed -n 's/^require k8s.io\/kubernetes \(v[0-9.]*\)$/\1/p' "$E2E_DIR/k8s/go.mod")
ETCD_VERSION=$(sed -n 's/^\tgo.etcd.io\/etcd\/server\/v3 \(v[0-9.]*\)$/\1/p' "$E2E_DIR/etcd/go.mod")
KSTATUS_VERSION=$(sed -n 's/^\tsigs.k8s.io\/cli-utils \(v[0-9.]*\)$/\1/p' "$E2E_DIR/kstatus/go.mod")
KWOK_VERSION=v0.8.0
HELM_VERSION=v4.3.1
# The real node's network policy controller and cluster DNS (Go modules; the proxy's checksum
# database verifies them). kubelet and kube-proxy come from the same k8s.io/kubernetes module as
# the control plane (e2e/k8s/tools.go); the pause binary is compiled from that module's
# build/pause/linux/pause.c.
KUBE_ROUTER_VERSION=v2.1.0
COREDNS_VERSION=v1.15.0
# The fault proxy of the fault-injection suite (e2e/tests/faults.rs): between the operator and the
# API server on loopback it adds latency, drops and stalls connections, limits bandwidth.
TOXIPROXY_VERSION=v2.5.0

# The Argo CD and Flux CRDs the GitOps examples are checked against: taken from the published Go
# module zips (module version, sha256 of the zip, files inside it).
GITOPS_MODULES=(
  "github.com/argoproj/argo-cd/v3 v3.6.1 f7fa21a39dae04e030aea81151ccaca0e7541fcff6cca0dd018671189cdf1de5 manifests/crds/application-crd.yaml"
  "github.com/fluxcd/source-controller v1.10.1 e4e4e9dedf8842f673b569beeb083d6e852de8af0fd6c399fe10f94ddc798d92 config/crd/bases/source.toolkit.fluxcd.io_gitrepositories.yaml"
  "github.com/fluxcd/kustomize-controller v1.10.1 8725ec07d6931eb1bb860de3a8544277b4c133a2ecde63166891e4305e173616 config/crd/bases/kustomize.toolkit.fluxcd.io_kustomizations.yaml"
  "github.com/fluxcd/helm-controller v1.6.4 304f1c62568d8b4e46f04ab6841e9f102c71b8a80d428b778f1cc32ed424aedc config/crd/bases/helm.toolkit.fluxcd.io_helmreleases.yaml"
)

BIN=$CACHE/bin
# The version is stamped into the binaries (kubectl and kwokctl read it); bump RECIPE when the
# build flags change so caches built the old way are not reused.
RECIPE=r2
K8S_BIN=$BIN/kubernetes-$K8S_VERSION-$RECIPE
ETCD_BIN=$BIN/etcd-$ETCD_VERSION
KWOK_BIN=$BIN/kwok-$KWOK_VERSION
HELM_BIN=$BIN/helm-$HELM_VERSION
NODE_BIN=$BIN/node-$K8S_VERSION-kube-router-$KUBE_ROUTER_VERSION-coredns-$COREDNS_VERSION-$RECIPE
KSTATUS_BIN=$BIN/kstatus-$KSTATUS_VERSION
TOXIPROXY_BIN=$BIN/toxiproxy-$TOXIPROXY_VERSION
GITOPS_CRDS=$BIN/gitops-crds-$(printf '%s\n' "${GITOPS_MODULES[@]}" | sha256sum | cut -c1-12)
LOGS=$CACHE/logs
export KWOK_WORKDIR=$CACHE/kwok
CLUSTER_DIR=$KWOK_WORKDIR/clusters/$CLUSTER
KUBECONFIG_PATH=$CLUSTER_DIR/kubeconfig.yaml
STATE=$CACHE/state/$CLUSTER

say() { printf 'cluster: %s\n' "$*" >&2; }
# shellcheck source=e2e/node.sh
. "$E2E_DIR/node.sh"
die() { printf 'cluster: error: %s\n' "$*" >&2; exit 1; }

for v in K8S_VERSION ETCD_VERSION KSTATUS_VERSION; do
  [ -n "${!v}" ] || die "could not read $v from $E2E_DIR/*/go.mod"
done
command -v go >/dev/null || die "Go is required to build the pinned components (install golang)"
# The go.mod files need Go 1.26; an older toolchain would try to download a newer one.
go_minor=$(go env GOVERSION | sed -n 's/^go1\.\([0-9]*\).*/\1/p')
[ "${go_minor:-0}" -ge 26 ] || die "Go >= 1.26 is required to build the pinned components; found $(go env GOVERSION)"

# build_into NAME DEST CMD...: run a build into a temporary directory and move it into the cache
# only when it succeeded, so an interrupted build never leaves a half-filled cache entry.
build_into() {
  local name=$1 dest=$2; shift 2
  local tmp=$dest.partial.$$ log=$LOGS/build-$name.log
  rm -rf "$dest".partial.*
  mkdir -p "$tmp" "$LOGS"
  say "building $name (log: $log)"
  if ! (cd "$E2E_DIR" && "$@") >"$log" 2>&1; then
    rm -rf "$tmp"
    tail -n 20 "$log" >&2 || true
    die "building $name failed: command '$*' (full log: $log)"
  fi
}

have() { # have DIR BINARY...: all present and executable
  local dir=$1; shift
  for b in "$@"; do [ -x "$dir/$b" ] || return 1; done
}

build() {
  local start=$SECONDS built=0
  export GOFLAGS="${GOFLAGS:-} -trimpath" CGO_ENABLED=0
  if ! have "$K8S_BIN" kube-apiserver kube-controller-manager kube-scheduler kubectl; then
    local minor pkg ldflags="-s -w"
    minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
    done
    build_into kubernetes-$K8S_VERSION "$K8S_BIN" bash -c "cd k8s && go build -ldflags='$ldflags' -o '$K8S_BIN.partial.$$/' \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl"
    rm -rf "$K8S_BIN"; mv "$K8S_BIN.partial.$$" "$K8S_BIN"; built=1
  fi
  if ! have "$ETCD_BIN" etcd etcdctl; then
    build_into etcd-$ETCD_VERSION "$ETCD_BIN" bash -c "cd etcd && go build -ldflags='-s -w' -o '$ETCD_BIN.partial.$$/etcd' go.etcd.io/etcd/server/v3 \
      && go build -ldflags='-s -w' -o '$ETCD_BIN.partial.$$/etcdctl' go.etcd.io/etcd/etcdctl/v3"
    rm -rf "$ETCD_BIN"; mv "$ETCD_BIN.partial.$$" "$ETCD_BIN"; built=1
  fi
  if ! have "$KWOK_BIN" kwok kwokctl; then
    build_into kwok-$KWOK_VERSION "$KWOK_BIN" env GOBIN="$KWOK_BIN.partial.$$" \
      go install -ldflags='-s -w' sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION sigs.k8s.io/kwok/cmd/kwokctl@$KWOK_VERSION
    rm -rf "$KWOK_BIN"; mv "$KWOK_BIN.partial.$$" "$KWOK_BIN"; built=1
  fi
  if ! have "$HELM_BIN" helm; then
    build_into helm-$HELM_VERSION "$HELM_BIN" env GOBIN="$HELM_BIN.partial.$$" \
      go install -ldflags='-s -w' helm.sh/helm/v4/cmd/helm@$HELM_VERSION
    rm -rf "$HELM_BIN"; mv "$HELM_BIN.partial.$$" "$HELM_BIN"; built=1
  fi
  if ! have "$KSTATUS_BIN" kstatus; then
    build_into kstatus-$KSTATUS_VERSION "$KSTATUS_BIN" bash -c "cd kstatus && go build -ldflags='-s -w' -o '$KSTATUS_BIN.partial.$$/kstatus' ."
    rm -rf "$KSTATUS_BIN"; mv "$KSTATUS_BIN.partial.$$" "$KSTATUS_BIN"; built=1
  fi
  if ! have "$TOXIPROXY_BIN" toxiproxy-server toxiproxy-cli; then
    build_into toxiproxy-$TOXIPROXY_VERSION "$TOXIPROXY_BIN" bash -c "GOBIN='$TOXIPROXY_BIN.partial.$$' go install -ldflags='-s -w' \
      github.com/Shopify/toxiproxy/v2/cmd/server@$TOXIPROXY_VERSION github.com/Shopify/toxiproxy/v2/cmd/cli@$TOXIPROXY_VERSION \
      && mv '$TOXIPROXY_BIN.partial.$$/server' '$TOXIPROXY_BIN.partial.$$/toxiproxy-server' \
      && mv '$TOXIPROXY_BIN.partial.$$/cli' '$TOXIPROXY_BIN.partial.$$/toxiproxy-cli'"
    rm -rf "$TOXIPROXY_BIN"; mv "$TOXIPROXY_BIN.partial.$$" "$TOXIPROXY_BIN"; built=1
  fi
  if node_enabled && ! have "$NODE_BIN" kubelet kube-proxy kube-router coredns pause; then
    build_node; built=1
  fi
  if [ ! -d "$GITOPS_CRDS" ]; then
    fetch_gitops_crds; built=1
  fi
  if [ $built -eq 1 ]; then
    say "cold build of the pinned components took $((SECONDS - start))s"
  fi
}

# The real node's binaries, into one cache entry.
build_node() {
  local minor pkg ldflags="-s -w" tmp=$NODE_BIN.partial.$$
  minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  build_into node-$K8S_VERSION "$NODE_BIN" bash -c "cd k8s && go build -ldflags='$ldflags' -o '$tmp/' \
      k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy \
    && gcc -Os -Wall -static -DVERSION=$K8S_VERSION -o '$tmp/pause' \"\$(go env GOMODCACHE)/k8s.io/kubernetes@$K8S_VERSION/build/pause/linux/pause.c\" \
    && GOBIN='$tmp' go install -ldflags='-s -w' github.com/cloudnativelabs/kube-router/v2/cmd/kube-router@$KUBE_ROUTER_VERSION \
    && GOBIN='$tmp' go install -ldflags='-s -w' github.com/coredns/coredns@$COREDNS_VERSION"
  rm -rf "$NODE_BIN"; mv "$tmp" "$NODE_BIN"
}

# The GOPROXY's first URL (the Go default when unset); the zips are what `go mod download` gets.
go_proxy() {
  local p
  p=$(go env GOPROXY | tr ',|' '\n\n' | grep -E '^https?://' | head -n1)
  echo "${p:-https://proxy.golang.org}"
}

fetch_gitops_crds() {
  local tmp=$GITOPS_CRDS.partial.$$ line module version sum files zip proxy
  proxy=$(go_proxy)
  rm -rf "$GITOPS_CRDS".partial.*
  mkdir -p "$tmp"
  for line in "${GITOPS_MODULES[@]}"; do
    read -r module version sum files <<<"$line"
    zip=$tmp/module.zip
    say "fetching $module@$version (CRDs for the GitOps examples)"
    curl -fsSL --retry 3 -o "$zip" "$proxy/$module/@v/$version.zip" \
      || { rm -rf "$tmp"; die "downloading $proxy/$module/@v/$version.zip failed"; }
    echo "$sum  $zip" | sha256sum -c --quiet - \
      || { rm -rf "$tmp"; die "$module@$version: the zip's sha256 is not the pinned $sum"; }
    for f in $files; do
      unzip -q -j -o "$zip" "$module@$version/$f" -d "$tmp" \
        || { rm -rf "$tmp"; die "$module@$version has no $f"; }
    done
    rm -f "$zip"
  done
  rm -rf "$GITOPS_CRDS"; mv "$tmp" "$GITOPS_CRDS"
}

kwokctl() { "$KWOK_BIN/kwokctl" --name "$CLUSTER" "$@"; }
kubectl() { "$K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG_PATH" "$@"; }

running() {
  [ -f "$KUBECONFIG_PATH" ] && kubectl get --raw /readyz >/dev/null 2>&1
}

write_configs() {
  mkdir -p "$STATE"
  chmod 700 "$STATE"
  # Secrets are encrypted at rest with secretbox (XSalsa20-Poly1305); a fresh key per cluster.
  if [ ! -s "$STATE/encryption.yaml" ]; then
    touch "$STATE/encryption.yaml"
    chmod 600 "$STATE/encryption.yaml"
    cat >"$STATE/encryption.yaml" <<EOF
apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets]
    providers:
      - secretbox:
          keys:
            - name: key1
              secret: $(head -c 32 /dev/urandom | base64 -w0)
      - identity: {}
EOF
  fi
  # Every component listens on loopback only: kwokctl's default binds etcd (plaintext, no
  # authentication), the API server, the scheduler, the controller manager and the kwok
  # controller to all interfaces, which on a shared network hands the cluster to anyone nearby.
  # kwokctl has no flag for it; it is options.bindAddress of its configuration file.
  {
    cat <<EOF
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokctlConfiguration
options:
  bindAddress: 127.0.0.1
EOF
    # In-cluster clients (CoreDNS, Moat) call the kubernetes Service: 10.96.0.1.
    node_enabled && echo "  kubeApiserverCertSANs: [$NODE_HOST_IP, 10.96.0.1]"
    cat <<EOF
componentsPatches:
- name: kube-controller-manager
  extraArgs:
  - {key: kube-api-qps, value: "200"}
  - {key: kube-api-burst, value: "400"}
- name: kube-scheduler
  extraArgs:
  - {key: kube-api-qps, value: "200"}
  - {key: kube-api-burst, value: "400"}
- name: kube-apiserver
  extraArgs:
  - {key: encryption-provider-config, value: $STATE/encryption.yaml}
  - {key: service-cluster-ip-range, value: 10.96.0.0/16}
EOF
    if node_enabled; then
      # The real node reaches the API server through a relay on the host end of its veth:
      # the certificate must name that address, the kubernetes Service points there, and the
      # API server reaches the kubelet by its InternalIP with a client certificate. NodeRestriction
      # limits what the kubelet may write; PodNodeSelector and PodTolerationRestriction let a
      # namespace send its pods to the (tainted) real node. The kwok controller manages only its
      # own nodes (kwokctl's default would take over the real one and fake its pods).
      cat <<EOF
  - {key: advertise-address, value: $NODE_HOST_IP}
  - {key: kubelet-preferred-address-types, value: InternalIP}
  - {key: kubelet-client-certificate, value: $CLUSTER_DIR/pki/admin.crt}
  - {key: kubelet-client-key, value: $CLUSTER_DIR/pki/admin.key}
  - {key: enable-admission-plugins, value: "NodeRestriction,PodNodeSelector,PodTolerationRestriction"}
- name: kwok-controller
  extraArgs:
  - {key: manage-all-nodes, value: "false", override: true}
  - {key: manage-nodes-with-annotation-selector, value: kwok.x-k8s.io/node=fake}
EOF
    fi
  } >"$STATE/kwokctl.yaml"
  # Audit: metadata for every request (never request bodies, so no Secret value reaches the log).
  cat >"$STATE/audit-policy.yaml" <<'EOF'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
EOF
}

up() {
  build
  if running; then
    say "cluster '$CLUSTER' is already running"
    echo "export KUBECONFIG=$KUBECONFIG_PATH"
    return 0
  fi
  if [ -d "$CLUSTER_DIR" ]; then
    say "found a stale cluster '$CLUSTER' (not answering): removing it"
    down
  fi
  write_configs
  mkdir -p "$LOGS"
  if node_enabled; then
    node_network_up || fail_start "setting up the real node's network namespace failed"
  fi
  local start=$SECONDS log=$LOGS/kwokctl-create.log
  say "starting cluster '$CLUSTER' (kube-apiserver $K8S_VERSION, etcd $ETCD_VERSION, kwok $KWOK_VERSION)"
  # Extra component flags are componentsPatches in $STATE/kwokctl.yaml (kwokctl v0.8.0's
  # --extra-args indexes repeated flags by position and panics on some orders).
  if ! kwokctl -c "$STATE/kwokctl.yaml" create cluster --runtime binary --secure-port=true \
      --kube-authorization=true --kube-admission=true \
      --kube-audit-policy "$STATE/audit-policy.yaml" \
      --kube-apiserver-binary "$K8S_BIN/kube-apiserver" \
      --kube-controller-manager-binary "$K8S_BIN/kube-controller-manager" \
      --kube-scheduler-binary "$K8S_BIN/kube-scheduler" \
      --kwok-controller-binary "$KWOK_BIN/kwok" \
      --etcd-binary "$ETCD_BIN/etcd" \
      --kubeconfig "$STATE/user-kubeconfig.yaml" \
      --wait 2m --timeout 3m >"$log" 2>&1; then
    tail -n 30 "$log" >&2 || true
    report_component_logs
    down >/dev/null 2>&1 || true
    die "kwokctl create cluster failed (log: $log; component logs: $CLUSTER_DIR/logs)"
  fi
  # Local disk too: Moat's pods request ephemeral-storage, which kwok's template leaves out.
  if ! kwokctl scale node --replicas "$NODES" --param '.allocatable["ephemeral-storage"]="1Ti"' >>"$log" 2>&1; then
    tail -n 20 "$log" >&2 || true
    fail_start "creating $NODES kwok nodes failed (log: $log)"
  fi
  local deadline=$((SECONDS + 120))
  until [ "$(kubectl get nodes --no-headers 2>/dev/null | grep -c ' Ready ')" -ge "$NODES" ]; do
    [ $SECONDS -lt $deadline ] || fail_start "kwok nodes did not become Ready within 120s (log: $CLUSTER_DIR/logs/kwok-controller.log)"
    sleep 1
  done
  until kubectl get serviceaccount default -n default >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || fail_start "the default ServiceAccount never appeared (log: $CLUSTER_DIR/logs/kube-controller-manager.log)"
    sleep 1
  done
  if node_enabled; then
    node_up || fail_start "starting the real node failed (logs: $LOGS/node-*.log)"
  fi
  say "cluster '$CLUSTER' is up with $NODES kwok nodes$(node_enabled && echo " and the real node $NODE_NAME") in $((SECONDS - start))s"
  echo "export KUBECONFIG=$KUBECONFIG_PATH"
}

# A start that failed half-way: report, remove the half-started cluster (so the next `up` does not
# mistake it for a working one), and stop.
fail_start() {
  report_component_logs
  down >/dev/null 2>&1 || true
  die "$1"
}

report_component_logs() {
  local f
  for f in "$CLUSTER_DIR"/logs/*.log; do
    [ -f "$f" ] || continue
    if grep -qiE 'error|fatal|address already in use' "$f"; then
      say "from $f:"
      grep -iE 'error|fatal|address already in use' "$f" | tail -n 5 >&2
    fi
  done
}

down() {
  node_down
  if [ -x "$KWOK_BIN/kwokctl" ] && [ -d "$CLUSTER_DIR" ]; then
    kwokctl delete cluster >"$LOGS/kwokctl-delete.log" 2>&1 || say "kwokctl delete cluster reported an error (log: $LOGS/kwokctl-delete.log)"
  fi
  # Whatever kwokctl could not stop (a half-created cluster): every process started from this
  # cluster's directory or our cached binaries with this cluster's state.
  local pids
  # Only the cluster's own components, which kwokctl runs from $CLUSTER_DIR/bin (not, say, a
  # `tail -f` on one of its logs).
  local pattern="^$CLUSTER_DIR/bin/"
  pids=$(pgrep -f "$pattern" || true)
  if [ -n "$pids" ]; then
    say "stopping leftover processes: $pids"
    kill $pids 2>/dev/null || true
    sleep 1
    kill -9 $(pgrep -f "$pattern" || true) 2>/dev/null || true
  fi
  rm -rf "$CLUSTER_DIR" "$STATE"
  say "cluster '$CLUSTER' is down"
}

etcd_endpoint() {
  # kwokctl records the etcd address it gave the apiserver in the cluster's configuration.
  grep -o -- '--etcd-servers=[^"[:space:]]*' "$CLUSTER_DIR/kwok.yaml" | head -n1 | cut -d= -f2
}

case ${1:-} in
  build) build ;;
  up) up ;;
  down) down ;;
  status) if running; then echo "running: export KUBECONFIG=$KUBECONFIG_PATH"; else echo "not running"; exit 1; fi ;;
  env)
    echo "export KUBECONFIG=$KUBECONFIG_PATH"
    echo "export MOAT_KUBECTL=$K8S_BIN/kubectl"
    echo "export MOAT_HELM=$HELM_BIN/helm"
    echo "export MOAT_ETCDCTL=$ETCD_BIN/etcdctl"
    echo "export MOAT_KSTATUS=$KSTATUS_BIN/kstatus"
    echo "export MOAT_TOXIPROXY=$TOXIPROXY_BIN"
    echo "export MOAT_GITOPS_CRDS=$GITOPS_CRDS"
    echo "export MOAT_ETCD_ENDPOINT=$(etcd_endpoint 2>/dev/null || true)"
    echo "export MOAT_AUDIT_LOG=$CLUSTER_DIR/logs/audit.log"
    echo "export MOAT_CLUSTER_DIR=$CLUSTER_DIR"
    echo "export KWOK_WORKDIR=$KWOK_WORKDIR"
    echo "export MOAT_REAL_NODE=${MOAT_REAL_NODE:-1}"
    echo "export MOAT_NODE_NAME=$NODE_NAME"
    echo "export MOAT_NODE_NETNS=$NODE_NETNS"
    echo "export MOAT_NODE_HOST_IP=$NODE_HOST_IP"
    echo "export MOAT_NODE_CONTAINERD=$NODE_RUN/containerd.sock"
    echo "export MOAT_NODE_REGISTRY=$NODE_REGISTRY"
    echo "export MOAT_NODE_REGISTRY_PUSH=$NODE_REGISTRY_PUSH"
    echo "export MOAT_NODE_CGROUP=$NODE_CGROUP"
    echo "export MOAT_NODE_REGISTRY_CA=$NODE_DIR/registry/ca.crt"
    echo "export MOAT_NODE_REGISTRY_CERTS=$NODE_DIR/registry/certs.d/$NODE_REGISTRY"
    [ ! -s "$NODE_DIR/busybox.image" ] || echo "export MOAT_NODE_BUSYBOX_IMAGE=$(cat "$NODE_DIR/busybox.image")"
    echo "export MOAT_KWOKCTL=\"$KWOK_BIN/kwokctl --name $CLUSTER\""
    echo "export PATH=$K8S_BIN:$HELM_BIN:$ETCD_BIN:$KWOK_BIN:\$PATH"
    ;;
  *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
