#!/usr/bin/env bash
# Lifecycle of the local control plane: `up` twice is safe, `down` leaves no process behind,
# and a stale half-created cluster is cleaned up by the next `up`. Runs last in `make test-e2e`
# and leaves the cluster down.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(e2e/cluster.sh env)"
fails=0 passes=0
pass() { echo "ok: $*"; passes=$((passes + 1)); }
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }
alive() { pgrep -f "^$MOAT_CLUSTER_DIR/bin/" >/dev/null; }
MOAT_CACHE_BIN=$(dirname "$(dirname "$MOAT_KUBECTL")")
err=$(mktemp)
trap 'rm -f "$err"' EXIT

# What the real node may change on the host, and must put back: links, routes, network
# namespaces, the host's nftables and iptables rules, ipsets, mounts, cgroups, the kernel
# settings the kubelet writes, ip_forward.
host_state() {
  ip -o link show | awk -F': ' '{print "link " $2}' | sed 's/@.*//'
  ip route show | sed 's/^/route /'
  ip netns list 2>/dev/null | sed 's/^/netns /'
  echo "nft $(nft list ruleset 2>/dev/null | sha256sum | cut -c1-16)"
  echo "iptables $(iptables-save 2>/dev/null | grep -v '^[#:]' | sha256sum | cut -c1-16)"
  ipset list -n 2>/dev/null | sed 's/^/ipset /'
  awk '{print "mount " $5}' /proc/self/mountinfo | grep -E 'moat|kubelet|containerd|netns' || true
  find /sys/fs/cgroup -mindepth 2 -maxdepth 2 -type d -name 'moat-*' | sed 's/^/cgroup /'
  for k in vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops \
    kernel.keys.root_maxkeys kernel.keys.root_maxbytes net.ipv4.ip_forward; do
    echo "sysctl $k=$(sysctl -n "$k")"
  done
}

e2e/cluster.sh down >/dev/null 2>&1
before=$(host_state)

if ! e2e/cluster.sh up >/dev/null 2>"$err"; then
  cat "$err"
  echo "lifecycle: 0 passed, 1 failed"
  exit 1
fi
first=$(e2e/cluster.sh up 2>"$err")
if grep -q "already running" "$err" && [ "$first" = "export KUBECONFIG=$KUBECONFIG" ]; then
  pass "a second 'up' finds the running cluster and prints the same KUBECONFIG"
else
  fail "a second 'up' did not report the running cluster (stdout: $first)"
fi
alive && pass "the cluster's processes run" || fail "no cluster process found while up"

e2e/cluster.sh down >/dev/null 2>&1
if alive; then fail "processes left after 'down': $(pgrep -af "$MOAT_CLUSTER_DIR/")"; else pass "'down' leaves no process behind"; fi
[ ! -d "$MOAT_CLUSTER_DIR" ] && pass "'down' removes the cluster's state" || fail "state left in $MOAT_CLUSTER_DIR"
e2e/cluster.sh down >/dev/null 2>&1 && pass "'down' twice is safe" || fail "a second 'down' failed"

# A stale cluster directory (a crashed earlier run) is detected and replaced.
mkdir -p "$MOAT_CLUSTER_DIR"
echo "stale" >"$MOAT_CLUSTER_DIR/kwok.yaml"
if out=$(e2e/cluster.sh up 2>&1) && grep -q "stale cluster" <<<"$out" && e2e/cluster.sh status >/dev/null; then
  pass "'up' replaces a stale cluster and starts a working one"
else
  fail "'up' did not recover from a stale cluster: $out"
fi
e2e/cluster.sh down >/dev/null 2>&1
alive && fail "processes left after the final 'down'" || pass "final 'down' is clean"
after=$(host_state)
if [ "$before" = "$after" ]; then
  pass "the host is as before: $(wc -l <<<"$after") links, routes, namespaces, rule sets, mounts, cgroups and kernel settings compared"
else
  fail "the host changed: $(diff <(echo "$before") <(echo "$after") | grep '^[<>]' | tr '\n' ';')"
fi
if pgrep -f "^$MOAT_CACHE_BIN/node-|containerd --config .*/node/containerd.toml|^docker-registry serve .*/node/registry/" >/dev/null; then
  fail "real-node processes left: $(pgrep -af "containerd --config .*/node/containerd.toml|/node-v|docker-registry serve .*/node/registry/")"
else
  pass "no real-node process is left"
fi

echo "lifecycle: $passes passed, $fails failed"
[ "$fails" -eq 0 ]
