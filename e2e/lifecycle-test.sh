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
err=$(mktemp)
trap 'rm -f "$err"' EXIT

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

echo "lifecycle: $passes passed, $fails failed"
[ "$fails" -eq 0 ]
