#!/usr/bin/env bash
# Prometheus and promtool, pinned, built from the published Prometheus Go module into the component
# cache outside the repository (as e2e/cluster.sh builds the control plane), and the pinned helm
# that renders the chart whose rules promtool checks.
#
#   e2e/prometheus.sh build   build (or find in the cache) prometheus, promtool and helm
#   e2e/prometheus.sh env     print MOAT_PROMTOOL, MOAT_PROMETHEUS and MOAT_HELM
#
# `make test-rules` runs `build`, then charts/moat/tests/rules.sh. Environment: MOAT_CACHE
# (default ~/.cache/moat).
set -euo pipefail

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${MOAT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moat}

# The Prometheus module's versions are v0.3MM.P for Prometheus 3.MM.P: v0.316.0 is Prometheus 3.16.0.
PROMETHEUS_MODULE_VERSION=v0.316.0
# helm is the one e2e/cluster.sh pins; read from there so the two never disagree.
HELM_VERSION=$(sed -n 's/^HELM_VERSION=\(v[0-9.]*\)$/\1/p' "$E2E_DIR/cluster.sh")

BIN=$CACHE/bin
PROMETHEUS_BIN=$BIN/prometheus-$PROMETHEUS_MODULE_VERSION
HELM_BIN=$BIN/helm-$HELM_VERSION
LOGS=$CACHE/logs

say() { printf 'prometheus: %s\n' "$*" >&2; }
die() { printf 'prometheus: error: %s\n' "$*" >&2; exit 1; }

[ -n "$HELM_VERSION" ] || die "could not read HELM_VERSION from $E2E_DIR/cluster.sh"

have() { # have DIR BINARY...: all present and executable
  local dir=$1; shift
  for b in "$@"; do [ -x "$dir/$b" ] || return 1; done
}

# shellcheck source=e2e/go-install.sh
. "$E2E_DIR/go-install.sh"

build() {
  if ! have "$PROMETHEUS_BIN" prometheus promtool; then
    go_install prometheus-$PROMETHEUS_MODULE_VERSION "$PROMETHEUS_BIN" \
      github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_MODULE_VERSION \
      github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_MODULE_VERSION
  fi
  if ! have "$HELM_BIN" helm; then
    go_install helm-$HELM_VERSION "$HELM_BIN" helm.sh/helm/v4/cmd/helm@$HELM_VERSION
  fi
}

case ${1:-} in
  build) build ;;
  env)
    echo "export MOAT_PROMTOOL=$PROMETHEUS_BIN/promtool"
    echo "export MOAT_PROMETHEUS=$PROMETHEUS_BIN/prometheus"
    echo "export MOAT_HELM=$HELM_BIN/helm"
    ;;
  *) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
