#!/usr/bin/env bash
# The real node of Moat's local cluster: a kubelet with containerd and runc, CNI bridge
# networking, kube-proxy (nftables), kube-router (NetworkPolicy) and CoreDNS, next to the kwok
# nodes. Sourced by e2e/cluster.sh, which sets CACHE, CLUSTER, CLUSTER_DIR, STATE, LOGS, K8S_BIN,
# NODE_BIN and KUBECONFIG_PATH.
#
# Confined: the node's networking (the cni0 bridge, routes, ip_forward, kube-proxy's and
# kube-router's tables, ipsets) lives in the network namespace $NODE_NETNS, joined to the host by
# one veth pair ($NODE_HOST_IP on the host, $NODE_IP in the node). The host gets only that veth
# end and two routes (pods and Services via the node), which vanish with the namespace. The node
# namespace has no default route, and a guard table drops (and counts) anything that would leave
# it for anywhere but the host end of the veth; from the host, pods reach only the API relay and
# the registry.
# Nothing a pod sends can leave the machine.
#
# The node is tainted moat.dev/real-node=true:NoSchedule, so the kwok-backed tests never land
# on it. A namespace opts in with the annotations in NODE_NAMESPACE_ANNOTATIONS (the API server's
# PodNodeSelector and PodTolerationRestriction plugins then steer its pods here).

NODE_NAME=moat-node
NODE_NETNS=moat-$CLUSTER
NODE_HOST_IF=moat-h
NODE_IF=moat-n
NODE_HOST_IP=10.254.0.1
NODE_IP=10.254.0.2
NODE_POD_CIDR=10.244.0.0/24
NODE_POD_GATEWAY=10.244.0.1
NODE_CLUSTER_CIDR=10.244.0.0/16
NODE_SERVICE_CIDR=10.96.0.0/16
NODE_DNS_IP=10.96.0.10
NODE_TAINT=moat.dev/real-node
NODE_DIR=$STATE/node
NODE_RUN=/run/moat-$CLUSTER
NODE_CGROUP=moat-$CLUSTER
# The cluster's registry (Debian's docker-registry), TLS from a CA of its own, as two processes
# over one storage directory: a read-only one on the host end of the veth, from which the node's
# containerd pulls every image and an operator in the cluster resolves tags (as in production),
# and a writable one on loopback, which only this machine can reach, for pushes. Anonymous: a pod
# can read what the cluster runs, never change it. Not Debian's default port 5000, which the
# package's own service may hold.
NODE_REGISTRY_PORT=5443
NODE_REGISTRY=$NODE_HOST_IP:$NODE_REGISTRY_PORT
NODE_REGISTRY_PUSH=127.0.0.1:5444
PAUSE_IMAGE=$NODE_REGISTRY/pause:e2e
COREDNS_IMAGE=$NODE_REGISTRY/coredns:e2e
# A stand-in workload for tests: Debian's busybox-static (sh, httpd, nc, wget, nslookup, ...).
BUSYBOX_IMAGE=$NODE_REGISTRY/busybox:e2e
# Kernel settings the kubelet writes at start; no namespace contains them, so they are saved
# before and restored after.
NODE_SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes)

# shellcheck source=e2e/oci.sh
. "$E2E_DIR/oci.sh"

node_enabled() {
  [ "${MOAT_REAL_NODE:-1}" = 1 ]
}

in_node() { nsenter --net="/run/netns/$NODE_NETNS" -- "$@"; }

# Starts a daemon in the node's namespace, logging to $LOGS/node-NAME.log. nsenter execs the
# daemon (a network namespace needs no fork), so the recorded pid is the daemon's own.
node_daemon() {
  local name=$1; shift
  # umask 022: containerd creates each container's writable layer with it, and a non-root
  # container cannot even stat its own root directory in a 0700 one.
  (umask 022 && exec nsenter --net="/run/netns/$NODE_NETNS" -- "$@") >"$LOGS/node-$name.log" 2>&1 &
  echo $! >"$NODE_DIR/$name.pid"
}

node_say() { printf 'node: %s\n' "$*" >&2; }

# The API server's port, from the configuration kwokctl wrote.
node_api_port() {
  grep -o -- '--secure-port=[0-9]*' "$CLUSTER_DIR/kwok.yaml" | head -n1 | cut -d= -f2
}

# Step 1, before the control plane starts: the namespace, the veth pair, the routes.
node_network_up() {
  mkdir -p "$NODE_DIR" "$NODE_RUN"
  : >"$NODE_DIR/sysctl.saved"
  local k
  for k in "${NODE_SYSCTLS[@]}"; do
    echo "$k=$(sysctl -n "$k")" >>"$NODE_DIR/sysctl.saved"
  done
  # `ip netns add` makes /run/netns a mount point the first time; put back as found.
  if ! mountpoint -q /run/netns; then
    touch "$NODE_DIR/netns-mount.ours"
  fi
  ip netns add "$NODE_NETNS"
  ip link add "$NODE_HOST_IF" type veth peer name "$NODE_IF" netns "$NODE_NETNS"
  ip addr add "$NODE_HOST_IP/30" dev "$NODE_HOST_IF"
  ip link set "$NODE_HOST_IF" up
  in_node ip link set lo up
  in_node ip addr add "$NODE_IP/30" dev "$NODE_IF"
  in_node ip link set "$NODE_IF" up
  in_node sysctl -qw net.ipv4.ip_forward=1
  # Host-side clients (the tests) reach pods and Services through the node.
  ip route add "$NODE_CLUSTER_CIDR" via "$NODE_IP" dev "$NODE_HOST_IF"
  ip route add "$NODE_SERVICE_CIDR" via "$NODE_IP" dev "$NODE_HOST_IF"
}

# Step 2, once the API server runs: certificates, the relay, the daemons, the images, CoreDNS.
node_up() {
  local start=$SECONDS port
  port=$(node_api_port)
  [ -n "$port" ] || { node_say "error: no API server port in $CLUSTER_DIR/kwok.yaml"; return 1; }
  node_pki "$port" || return 1
  # The API server listens on loopback; the node reaches it on the host end of the veth.
  socat "TCP-LISTEN:$port,bind=$NODE_HOST_IP,fork,reuseaddr" "TCP:127.0.0.1:$port" \
    >"$LOGS/node-relay.log" 2>&1 &
  echo $! >"$NODE_DIR/relay.pid"
  # Under `||` (as cluster.sh calls this) errexit is off: every step says when it failed.
  node_guard "$port" || return 1
  node_registry || return 1
  node_containerd || return 1
  node_images || return 1
  node_kubelet || return 1
  node_wait_ready || return 1
  node_kube_proxy || return 1
  node_kube_router || return 1
  node_coredns || return 1
  node_say "real node $NODE_NAME is up in $((SECONDS - start))s"
}

# A client certificate signed by the cluster CA, and a kubeconfig for it.
node_client() {
  local name=$1 cn=$2 org=$3 port=$4
  local pki=$NODE_DIR/pki
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$pki/$name.key" -subj "/O=$org/CN=$cn" -out "$pki/$name.csr" 2>/dev/null
  openssl x509 -req -in "$pki/$name.csr" -CA "$CLUSTER_DIR/pki/ca.crt" -CAkey "$CLUSTER_DIR/pki/ca.key" \
    -CAcreateserial -days 30 -out "$pki/$name.crt" 2>/dev/null
  cat >"$NODE_DIR/$name.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: moat
  cluster: {server: "https://$NODE_HOST_IP:$port", certificate-authority: "$CLUSTER_DIR/pki/ca.crt"}
users:
- name: $name
  user: {client-certificate: "$pki/$name.crt", client-key: "$pki/$name.key"}
contexts:
- name: moat
  context: {cluster: moat, user: $name}
current-context: moat
EOF
}

node_pki() {
  local port=$1
  mkdir -p "$NODE_DIR/pki"
  chmod 700 "$NODE_DIR/pki"
  # The Node authorizer and NodeRestriction know the kubelet by this name and group.
  node_client kubelet "system:node:$NODE_NAME" system:nodes "$port"
  # Bound to system:node-proxier by the API server's default RBAC.
  node_client kube-proxy system:kube-proxy system:node-proxier-users "$port"
  node_client kube-router moat:kube-router moat:node "$port"
  "$K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG_PATH" apply -f - >/dev/null <<'EOF'
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "moat:kube-router"}
rules:
- apiGroups: [""]
  resources: [namespaces, pods, nodes, services, endpoints]
  verbs: [get, list, watch]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "moat:kube-router"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "moat:kube-router"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: "moat:kube-router"}]
EOF
}

# The node's firewall of last resort, in its own namespace: pod traffic to the host is
# masqueraded and allowed only to the API relay and the registry; anything else leaving the node
# is dropped and counted (`nft list counter inet moat-guard leaving`; it must stay at the attempts the tests
# make).
node_guard() {
  local port=$1
  in_node nft -f - <<EOF
table inet moat-guard {
  counter leaving {}
  chain forward {
    type filter hook forward priority -10; policy accept;
    ct state established,related accept
    oifname "$NODE_IF" ip daddr $NODE_HOST_IP tcp dport { $port, $NODE_REGISTRY_PORT } accept
    oifname "$NODE_IF" counter name leaving drop
  }
  chain output {
    type filter hook output priority -10; policy accept;
    oifname "$NODE_IF" ip daddr $NODE_HOST_IP accept
    oifname "$NODE_IF" counter name leaving drop
  }
  chain postrouting {
    type nat hook postrouting priority 100; policy accept;
    oifname "$NODE_IF" ip saddr $NODE_CLUSTER_CIDR masquerade
  }
}
EOF
}

# The registry: its CA and certificate (for $NODE_HOST_IP and 127.0.0.1), the configurations,
# the two daemons.
node_registry() {
  local dir=$NODE_DIR/registry addr
  for addr in "$NODE_REGISTRY" "$NODE_REGISTRY_PUSH"; do
    if [ -n "$(ss -Hltn "sport = :${addr##*:}")" ]; then
      node_say "error: port ${addr##*:} is in use ($(ss -Hltnp "sport = :${addr##*:}" | head -n1)); the local registry needs it"
      return 1
    fi
  done
  mkdir -p "$dir/storage" "$dir/certs.d/$NODE_REGISTRY"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
    -subj "/CN=moat local registry CA" -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null &&
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -subj "/CN=$NODE_HOST_IP" -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null &&
    openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
      -days 30 -extfile <(printf 'subjectAltName=IP:%s,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' "$NODE_HOST_IP") \
      -out "$dir/server.crt" 2>/dev/null ||
    { node_say "error: creating the registry's certificates failed"; return 1; }
  rm -f "$dir/ca.key" "$dir/server.csr"
  # skopeo's --dest-cert-dir and containerd's hosts.toml both read the CA from here.
  cp "$dir/ca.crt" "$dir/certs.d/$NODE_REGISTRY/ca.crt"
  cat >"$dir/certs.d/$NODE_REGISTRY/hosts.toml" <<TOML
server = "https://$NODE_REGISTRY"
[host."https://$NODE_REGISTRY"]
  capabilities = ["pull", "resolve"]
  ca = "$dir/ca.crt"
TOML
  local name readonly
  for name in registry registry-push; do
    addr=$NODE_REGISTRY readonly=true
    [ "$name" = registry ] || addr=$NODE_REGISTRY_PUSH readonly=false
    cat >"$dir/$name.yml" <<YAML
version: 0.1
log: {level: warn}
storage:
  filesystem: {rootdirectory: $dir/storage}
  maintenance: {readonly: {enabled: $readonly}, uploadpurging: {enabled: false}}
http:
  addr: $addr
  tls: {certificate: $dir/server.crt, key: $dir/server.key}
YAML
    docker-registry serve "$dir/$name.yml" >"$LOGS/node-$name.log" 2>&1 &
    echo $! >"$NODE_DIR/$name.pid"
  done
  local deadline=$((SECONDS + 60))
  for name in registry registry-push; do
    addr=$NODE_REGISTRY
    [ "$name" = registry ] || addr=$NODE_REGISTRY_PUSH
    until curl -fsS --cacert "$dir/ca.crt" -o /dev/null "https://$addr/v2/" 2>/dev/null; do
      if [ $SECONDS -ge $deadline ] || ! kill -0 "$(cat "$NODE_DIR/$name.pid")" 2>/dev/null; then
        node_say "error: the registry did not answer on https://$addr/v2/ (log: $LOGS/node-$name.log)"
        return 1
      fi
      sleep 0.2
    done
  done
}

# node_push ARCHIVE NAME:TAG: pushes an OCI archive through the loopback registry and prints the
# reference the cluster pulls it by ($NODE_REGISTRY/NAME@sha256:...).
node_push() {
  local digest
  digest=$(oci_push "$1" "$NODE_REGISTRY_PUSH/$2" "$NODE_DIR/registry/certs.d/$NODE_REGISTRY") || return 1
  echo "$NODE_REGISTRY/${2%:*}@$digest"
}

node_containerd() {
  mkdir -p "$NODE_DIR/containerd" "$NODE_DIR/cni" "$NODE_DIR/cni-ipam"
  cat >"$NODE_DIR/cni/10-moat.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "moat", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$NODE_DIR/cni-ipam",
            "ranges": [[{"subnet": "$NODE_POD_CIDR", "gateway": "$NODE_POD_GATEWAY"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}
]}
EOF
  cat >"$NODE_DIR/containerd.toml" <<EOF
version = 2
root = "$NODE_DIR/containerd/root"
state = "$NODE_RUN/containerd"
[grpc]
  address = "$NODE_RUN/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$NODE_DIR/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # Pod network namespaces under the state directory, removed with it (not in /run/netns).
  netns_mounts_under_state_dir = true
  # Without it runc fails here: oom_score_adj cannot be lowered (no CAP_SYS_RESOURCE).
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$NODE_DIR/registry/certs.d"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NODE_DIR/cni"
EOF
  node_daemon containerd containerd --config "$NODE_DIR/containerd.toml"
  local deadline=$((SECONDS + 60))
  until ctr --address "$NODE_RUN/containerd.sock" version >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { node_say "error: containerd did not start (log: $LOGS/node-containerd.log)"; return 1; }
    sleep 0.2
  done
}

# The pause, CoreDNS and busybox images, built here from files on this machine and pushed to the
# registry; the kubelet pulls them from there by digest (pause by tag: containerd's
# sandbox_image).
node_images() {
  local root=$NODE_DIR/images
  rm -rf "$root"
  mkdir -p "$root/pause" "$root/coredns"
  cp "$NODE_BIN/pause" "$root/pause/pause"
  oci_archive "$root/pause.tar" "$PAUSE_IMAGE" "$root/pause" '["/pause"]' 65535:65535 >/dev/null
  cp "$NODE_BIN/coredns" "$root/coredns/coredns"
  oci_archive "$root/coredns.tar" "$COREDNS_IMAGE" "$root/coredns" '["/coredns"]' 65532:65532 >/dev/null
  mkdir -p "$root/busybox/bin"
  cp /bin/busybox "$root/busybox/bin/busybox"
  local applet
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/busybox/bin/$applet"
  done
  oci_archive "$root/busybox.tar" "$BUSYBOX_IMAGE" "$root/busybox" '["/bin/sh"]' 65534:65534 '["PATH=/bin"]' >/dev/null
  local image ref
  for image in pause coredns busybox; do
    ref=$(node_push "$root/$image.tar" "$image:e2e" 2>>"$LOGS/node-images.log") ||
      { node_say "error: pushing the $image image failed (log: $LOGS/node-images.log)"; return 1; }
    echo "$ref" >"$NODE_DIR/$image.image"
  done
  rm -rf "$root"
}

node_kubelet() {
  mkdir -p "$NODE_DIR/kubelet" "$NODE_DIR/pod-logs"
  # The kubelet's cgroup root, in every hierarchy; it must exist before the kubelet starts, and
  # a new cpuset cgroup has no CPUs or memory nodes until given its parent's.
  local c
  for c in /sys/fs/cgroup/*/; do
    mkdir -p "$c$NODE_CGROUP"
  done
  cat /sys/fs/cgroup/cpuset/cpuset.cpus >"/sys/fs/cgroup/cpuset/$NODE_CGROUP/cpuset.cpus"
  cat /sys/fs/cgroup/cpuset/cpuset.mems >"/sys/fs/cgroup/cpuset/$NODE_CGROUP/cpuset.mems"
  : >"$NODE_DIR/resolv.conf"
  cat >"$NODE_DIR/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /$NODE_CGROUP
address: $NODE_IP
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$CLUSTER_DIR/pki/ca.crt"}
authorization: {mode: Webhook}
clusterDomain: cluster.local
clusterDNS: [$NODE_DNS_IP]
resolvConf: "$NODE_DIR/resolv.conf"
containerRuntimeEndpoint: "unix://$NODE_RUN/containerd.sock"
podLogsDir: "$NODE_DIR/pod-logs"
failSwapOn: false
rotateCertificates: false
registerWithTaints: [{key: $NODE_TAINT, value: "true", effect: NoSchedule}]
# The images are never collected (the registry holds them, but a pull costs time), and the node
# is never short of memory or disk on this shared machine; a pod past its own limits (an emptyDir
# over its sizeLimit) is still evicted.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "1Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
maxPods: 110
serializeImagePulls: false
# How often the kubelet measures each pod's volumes (default 1m); an emptyDir past its sizeLimit
# is evicted at the next measurement.
volumeStatsAggPeriod: 5s
EOF
  node_daemon kubelet "$NODE_BIN/kubelet" --config "$NODE_DIR/kubelet.yaml" \
    --kubeconfig "$NODE_DIR/kubelet.kubeconfig" --root-dir "$NODE_DIR/kubelet" \
    --cert-dir "$NODE_DIR/kubelet/pki" --node-ip "$NODE_IP" --hostname-override "$NODE_NAME" \
    --node-labels "$NODE_TAINT=true"
}

node_kube_proxy() {
  cat >"$NODE_DIR/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clientConnection: {kubeconfig: "$NODE_DIR/kube-proxy.kubeconfig"}
hostnameOverride: $NODE_NAME
clusterCIDR: $NODE_CLUSTER_CIDR
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: ["$NODE_IP/32"]
conntrack: {maxPerCore: 0}
EOF
  node_daemon kube-proxy "$NODE_BIN/kube-proxy" --config "$NODE_DIR/kube-proxy.yaml"
}

node_kube_router() {
  node_daemon kube-router "$NODE_BIN/kube-router" --kubeconfig "$NODE_DIR/kube-router.kubeconfig" \
    --run-firewall=true --run-router=false --run-service-proxy=false --enable-cni=false \
    --hostname-override "$NODE_NAME" --metrics-port 0 --health-port 20244
  # It needs the registered Node, and enforces nothing if it stops: wait for its health check.
  local deadline=$((SECONDS + 60))
  until in_node curl -fsS -o /dev/null http://127.0.0.1:20244/healthz 2>/dev/null; do
    if [ $SECONDS -ge $deadline ] || ! kill -0 "$(cat "$NODE_DIR/kube-router.pid")" 2>/dev/null; then
      node_say "error: kube-router is not healthy (log: $LOGS/node-kube-router.log)"
      return 1
    fi
    sleep 0.3
  done
}

node_kubectl() { "$K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG_PATH" "$@"; }

node_wait_ready() {
  local deadline=$((SECONDS + 120))
  until node_kubectl get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -q True; do
    [ $SECONDS -lt $deadline ] || { node_say "error: node $NODE_NAME not Ready within 120s (log: $LOGS/node-kubelet.log)"; return 1; }
    sleep 0.5
  done
}

# Cluster DNS as real pods on the real node (NetworkPolicies select them by label).
node_coredns() {
  node_kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: ServiceAccount
metadata: {name: coredns, namespace: kube-system}
automountServiceAccountToken: true
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects: [{kind: ServiceAccount, name: coredns, namespace: kube-system}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: coredns, namespace: kube-system}
data:
  Corefile: |
    .:53 {
        errors
        health 127.0.0.1:8080
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
        }
        cache 30
        loop
        reload
        loadbalance
    }
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  replicas: 1
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata: {labels: {k8s-app: kube-dns}}
    spec:
      serviceAccountName: coredns
      nodeSelector: {$NODE_TAINT: "true"}
      tolerations: [{key: $NODE_TAINT, operator: Exists, effect: NoSchedule}]
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        runAsGroup: 65532
        seccompProfile: {type: RuntimeDefault}
        sysctls: [{name: net.ipv4.ip_unprivileged_port_start, value: "53"}]
      containers:
      - name: coredns
        image: $(cat "$NODE_DIR/coredns.image")
        args: ["-conf", "/etc/coredns/Corefile"]
        ports:
        - {name: dns, containerPort: 53, protocol: UDP}
        - {name: dns-tcp, containerPort: 53, protocol: TCP}
        readinessProbe: {httpGet: {path: /ready, port: 8181}}
        resources: {limits: {memory: 128Mi}, requests: {cpu: 50m, memory: 64Mi}}
        securityContext:
          allowPrivilegeEscalation: false
          capabilities: {drop: [ALL]}
          readOnlyRootFilesystem: true
        volumeMounts: [{name: config, mountPath: /etc/coredns, readOnly: true}]
      volumes: [{name: config, configMap: {name: coredns}}]
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $NODE_DNS_IP
  selector: {k8s-app: kube-dns}
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
EOF
  if ! node_kubectl -n kube-system rollout status deployment/coredns --timeout=120s >/dev/null; then
    node_say "error: CoreDNS did not become ready (kubectl -n kube-system describe pods -l k8s-app=kube-dns)"
    return 1
  fi
}

node_stop_pid() {
  local f=$NODE_DIR/$1.pid pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 10))
  while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$f"
}

# Undo everything node_network_up and node_up did: processes, containers, mounts, cgroups, the
# namespace (with its links, routes, tables and ipsets), the kernel settings. Safe to repeat.
node_down() {
  local c pids
  node_stop_pid kubelet
  node_stop_pid kube-proxy
  node_stop_pid kube-router
  # Whatever a crashed earlier run left without a pid file.
  pids=$(pgrep -f "^$NODE_BIN/" || true)
  [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
  # Every container process, by the node's cgroups (the kubelet puts all pods under them).
  for _ in 1 2 3; do
    pids=$(find /sys/fs/cgroup/pids/"$NODE_CGROUP" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u || true)
    [ -n "$pids" ] || break
    kill -9 $pids 2>/dev/null || true
    sleep 0.3
  done
  # The shims of this containerd, then containerd itself.
  pids=$(pgrep -f "containerd-shim.* -address $NODE_RUN/containerd.sock" || true)
  [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
  node_stop_pid containerd
  node_stop_pid relay
  node_stop_pid registry
  node_stop_pid registry-push
  pids=$(pgrep -f "^containerd --config $NODE_DIR/containerd.toml|^socat TCP-LISTEN:[0-9]*,bind=$NODE_HOST_IP,|^docker-registry serve $NODE_DIR/" || true)
  [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
  # Mounts under the node's directories, deepest first.
  awk -v a="$NODE_DIR/" -v b="$NODE_RUN/" 'index($5, a) == 1 || index($5, b) == 1 || $5 == substr(b, 1, length(b) - 1) {print $5}' /proc/self/mountinfo \
    | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  for c in /sys/fs/cgroup/*/; do
    [ -d "$c$NODE_CGROUP" ] || continue
    find "$c$NODE_CGROUP" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
  if ip netns list 2>/dev/null | grep -qw "$NODE_NETNS"; then
    ip netns delete "$NODE_NETNS"
  fi
  ip link delete "$NODE_HOST_IF" 2>/dev/null || true
  if [ -f "$NODE_DIR/netns-mount.ours" ] && [ -z "$(ip netns list 2>/dev/null)" ]; then
    umount /run/netns 2>/dev/null || true
    rmdir /run/netns 2>/dev/null || true
  fi
  if [ -s "$NODE_DIR/sysctl.saved" ]; then
    while IFS= read -r line; do sysctl -qw "$line" || true; done <"$NODE_DIR/sysctl.saved"
  fi
  rm -rf "$NODE_RUN"
  rm -rf "$NODE_DIR" 2>/dev/null || true
}
