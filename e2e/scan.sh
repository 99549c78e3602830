#!/usr/bin/env bash
# `make test-scan`: two Kubernetes manifest scanners, pinned, over everything Moat puts into a
# cluster: `moat render` of every example and test fixture, and `helm template` of the chart (with
# its defaults and with every optional object on). Any finding fails; a check Moat decides not to
# follow is skipped on the object itself, with its reason, in the scanner's own annotation
# (docs/scanners.md lists them).
#
#   e2e/scan.sh build   build (or find in the cache) kube-score, checkov and helm
#   e2e/scan.sh run     render everything and scan it (builds first); MOAT=path/to/moat
#
# kube-score is built from its Go module into ~/.cache/moat/bin (as e2e/cluster.sh builds the
# control plane); checkov is installed from PyPI into a virtualenv beside it; helm is the one
# e2e/cluster.sh pins. Environment: MOAT_CACHE (default ~/.cache/moat), MOAT (the moat binary;
# default: `cargo build --bin moat`), MOAT_SCAN_KEEP=DIR (keep the rendered manifests there).
set -euo pipefail

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$E2E_DIR/.." && pwd)
CACHE=${MOAT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moat}

KUBE_SCORE_VERSION=v1.20.0
CHECKOV_VERSION=3.3.30
# The Kubernetes version kube-score checks API versions against (it knows nothing newer than
# its own release; v1.33 is the newest it accepts without warning about removed APIs).
KUBE_SCORE_K8S_VERSION=v1.33
# helm is the one e2e/cluster.sh pins; read from there so the two never disagree.
HELM_VERSION=$(sed -n 's/^HELM_VERSION=\(v[0-9.]*\)$/\1/p' "$E2E_DIR/cluster.sh")

BIN=$CACHE/bin
KUBE_SCORE_BIN=$BIN/kube-score-$KUBE_SCORE_VERSION
CHECKOV_VENV=$BIN/checkov-$CHECKOV_VERSION
HELM_BIN=$BIN/helm-$HELM_VERSION
LOGS=$CACHE/logs
# Optional kube-score checks Moat passes and keeps passing.
KUBE_SCORE_OPTIONAL=(--enable-optional-test container-seccomp-profile --enable-optional-test container-ports-check)

say() { printf 'scan: %s\n' "$*" >&2; }
die() { printf 'scan: error: %s\n' "$*" >&2; exit 1; }

[ -n "$HELM_VERSION" ] || die "could not read HELM_VERSION from $E2E_DIR/cluster.sh"

# shellcheck source=e2e/go-install.sh
. "$E2E_DIR/go-install.sh"

# checkov into its own virtualenv. A virtualenv cannot be moved (its scripts name their own
# interpreter), so it is made in place and marked complete only when the install succeeded; an
# unmarked one is an interrupted install and is made again.
install_checkov() {
  local log=$LOGS/install-checkov-$CHECKOV_VERSION.log start=$SECONDS
  [ -f "$CHECKOV_VENV/.complete" ] && return 0
  command -v python3 >/dev/null || die "python3 is required to install checkov"
  rm -rf "$CHECKOV_VENV"
  mkdir -p "$LOGS"
  say "installing checkov $CHECKOV_VERSION from PyPI (log: $log)"
  if ! { python3 -m venv "$CHECKOV_VENV" \
      && "$CHECKOV_VENV/bin/pip" install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION"; } >"$log" 2>&1; then
    rm -rf "$CHECKOV_VENV"
    tail -n 20 "$log" >&2 || true
    die "installing checkov $CHECKOV_VERSION failed (full log: $log)"
  fi
  touch "$CHECKOV_VENV/.complete"
  say "installed checkov in $((SECONDS - start))s"
}

build() {
  [ -x "$KUBE_SCORE_BIN/kube-score" ] \
    || go_install kube-score-$KUBE_SCORE_VERSION "$KUBE_SCORE_BIN" github.com/zegl/kube-score/cmd/kube-score@$KUBE_SCORE_VERSION
  [ -x "$HELM_BIN/helm" ] \
    || go_install helm-$HELM_VERSION "$HELM_BIN" helm.sh/helm/v4/cmd/helm@$HELM_VERSION
  install_checkov
}


# The fixed digests renders are pinned to, as the operator pins them (offline: nothing asks a
# registry). Only their form matters to the scanners.
SERVER_DIGEST=sha256:$(printf 'moat scan: server image' | sha256sum | cut -c1-64)
HELPER_IMAGE=ghcr.io/moat-dev/moat@sha256:$(printf 'moat scan: helper image' | sha256sum | cut -c1-64)

# What is scanned, relative to the repository: every SecureModelDeployment in these files is
# rendered (a file may hold other objects beside it, as examples/quickstart.yaml does).
SMD_SOURCES=(examples tests/fixtures)
# The chart with its defaults, and with every optional object and value that changes an object
# on (the monitoring objects, namespaced RBAC, a pinned image, a registry CA).
CHART_VALUES_ALL=(
  --set metrics.serviceMonitor.enabled=true --set metrics.podMonitor.enabled=true
  --set metrics.monitoringNamespace=monitoring --set prometheusRule.enabled=true
  --set dashboard.enabled=true --set 'watchNamespaces={ml-prod,payments}'
  --set registries.caBundleConfigMap=registry-ca --set 'registries.allowed={registry.example.com}'
  --set 'networkPolicy.metricsFromNamespaces={monitoring}' --set priorityClassName=moat-critical
  --set "image.digest=sha256:$(printf 'moat scan: operator image' | sha256sum | cut -c1-64)"
)

# The moat binary: $MOAT, else a debug build.
moat_binary() {
  if [ -n "${MOAT:-}" ]; then
    [ -x "$MOAT" ] || die "MOAT=$MOAT is not an executable"
    echo "$MOAT"; return
  fi
  (cd "$ROOT" && cargo build --quiet --bin moat) >&2 || die "cargo build --bin moat failed"
  local target=${CARGO_TARGET_DIR:-}
  if [ -z "$target" ]; then
    target=$(cd "$ROOT" && cargo metadata --no-deps --format-version 1 \
      | "$CHECKOV_VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
  fi
  echo "$target/debug/moat"
}

# Every skip annotation must say why: checkov's `checkov.io/skipN: ID=reason` (without `=`
# checkov records "No comment provided"), and each check named by `kube-score/ignore` (whose
# syntax has no room for a reason) in `moat.dev/kube-score-ignore-reasons`, as `check: reason;`.
check_skip_reasons() {
  "$CHECKOV_VENV/bin/python" - "$@" <<'PY'
import sys, yaml
bad = []
for path in sys.argv[1:]:
    with open(path) as f:
        for doc in yaml.safe_load_all(f):
            if not isinstance(doc, dict):
                continue
            meta = doc.get("metadata") or {}
            where = f"{path}: {doc.get('kind')} {meta.get('name')}"
            notes = meta.get("annotations") or {}
            for key, value in notes.items():
                if key.startswith("checkov.io/skip"):
                    check, _, reason = str(value).partition("=")
                    if not check.strip() or not reason.strip():
                        bad.append(f"{where}: {key}: {value!r} gives no reason (ID=reason)")
            ignored = [c.strip() for c in notes.get("kube-score/ignore", "").split(",") if c.strip()]
            reasons = notes.get("moat.dev/kube-score-ignore-reasons", "")
            for check in ignored:
                if f"{check}: " not in reasons:
                    bad.append(f"{where}: kube-score/ignore {check} has no reason in moat.dev/kube-score-ignore-reasons")
for line in bad:
    print(f"scan: {line}", file=sys.stderr)
sys.exit(1 if bad else 0)
PY
}

run() {
  local start=$SECONDS moat failed=0
  moat=$(moat_binary)
  # Global, for the EXIT trap.
  if [ -n "${MOAT_SCAN_KEEP:-}" ]; then
    work=$MOAT_SCAN_KEEP; rm -rf "$work"; mkdir -p "$work"
  else
    work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
  fi
  mkdir -p "$work/smd" "$work/manifests"

  # 1. Every SecureModelDeployment of the examples and fixtures, one file each, then `moat render`
  # of it with the images pinned as the operator pins them.
  local sources=()
  for s in "${SMD_SOURCES[@]}"; do
    while IFS= read -r f; do sources+=("$f"); done < <(cd "$ROOT" && find "$s" -name '*.yaml' | sort)
  done
  local smds
  smds=$(cd "$ROOT" && "$CHECKOV_VENV/bin/python" - "$work/smd" "${sources[@]}" <<'PY'
import os, sys, yaml
out, paths = sys.argv[1], sys.argv[2:]
for path in paths:
    with open(path) as f:
        docs = list(yaml.safe_load_all(f))
    for doc in docs:
        if not isinstance(doc, dict) or doc.get("kind") != "SecureModelDeployment":
            continue
        name = f"{path.replace('/', '_').removesuffix('.yaml')}--{doc['metadata']['name']}"
        with open(os.path.join(out, name + ".yaml"), "w") as f:
            yaml.safe_dump(doc, f)
        digest = "@sha256:" in doc["spec"]["server"]["image"]
        print(f"{name}\t{path}\t{int(digest)}")
PY
  ) || die "reading the SecureModelDeployments of ${SMD_SOURCES[*]}"
  [ -n "$smds" ] || die "no SecureModelDeployment found in ${SMD_SOURCES[*]}"
  local name path digest count=0
  while IFS=$'\t' read -r name path digest; do
    local pin=()
    [ "$digest" = 1 ] || pin=(--image-digest "$SERVER_DIGEST")
    "$moat" render -f "$work/smd/$name.yaml" "${pin[@]}" --helper-image "$HELPER_IMAGE" \
      >"$work/manifests/render--$name.yaml" 2>"$work/render.err" \
      || { cat "$work/render.err" >&2; die "moat render of $path ($name) failed"; }
    count=$((count + 1))
  done <<<"$smds"
  say "rendered $count SecureModelDeployments of ${SMD_SOURCES[*]}"

  # 2. The chart, with its defaults and with everything on.
  "$HELM_BIN/helm" template moat "$ROOT/charts/moat" --namespace moat-system \
    >"$work/manifests/chart--defaults.yaml" || die "helm template of the chart failed"
  "$HELM_BIN/helm" template moat "$ROOT/charts/moat" --namespace moat-system "${CHART_VALUES_ALL[@]}" \
    >"$work/manifests/chart--all.yaml" || die "helm template of the chart (every option) failed"
  say "rendered the chart (defaults, and every option on)"

  check_skip_reasons "$work"/manifests/*.yaml || failed=1

  # 3. kube-score, one run per manifest set (its checks relate the objects of one set: a
  # Service to its pods, a NetworkPolicy or PDB to its Deployment). Every WARNING or CRITICAL is
  # a finding; SKIPPED is an annotated skip or an optional check left off.
  local f out findings
  for f in "$work"/manifests/*.yaml; do
    out=$("$KUBE_SCORE_BIN/kube-score" score --kubernetes-version "$KUBE_SCORE_K8S_VERSION" \
      "${KUBE_SCORE_OPTIONAL[@]}" --output-format ci "$f" 2>&1) || true
    findings=$(grep -E '^\[(WARNING|CRITICAL)\]' <<<"$out" || true)
    if [ -n "$findings" ] || ! grep -q '^\[OK\]' <<<"$out"; then
      printf 'scan: kube-score %s: %s\n' "$KUBE_SCORE_VERSION" "$(basename "$f")" >&2
      printf '%s\n' "${findings:-$out}" >&2
      failed=1
    fi
  done
  say "kube-score $KUBE_SCORE_VERSION: $(ls "$work"/manifests/*.yaml | wc -l) manifest sets scanned"

  # 4. checkov over all of them at once (it starts slowly), Kubernetes checks only, offline.
  if ! (cd "$work/manifests" && "$CHECKOV_VENV/bin/checkov" --directory . --framework kubernetes \
      --quiet --compact --skip-download --output cli >"$work/checkov.out" 2>"$work/checkov.err"); then
    cat "$work/checkov.out" "$work/checkov.err" >&2
    failed=1
  fi
  say "checkov $CHECKOV_VERSION: $(grep -m1 -o 'Passed checks: .*' "$work/checkov.out" || echo 'no summary')"

  [ $failed -eq 0 ] || die "findings above; fix them, or skip a check on the object with its reason (docs/scanners.md)"
  say "no findings ($((SECONDS - start))s)"
}

case ${1:-} in
  build) build ;;
  run) build; run ;;
  *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
