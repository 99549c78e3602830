#!/usr/bin/env bash
# Flux's source-controller and kustomize-controller, pinned, built from their published Go modules
# (the wrapper modules e2e/flux/*/go.mod) into the component cache outside the repository, as
# e2e/cluster.sh builds the control plane. e2e/tests/flux.rs runs them as processes against the
# local cluster.
#
#   e2e/flux.sh build   build (or find in the cache) both controllers and their CRDs
#   e2e/flux.sh env     print MOAT_FLUX_SOURCE_CONTROLLER, MOAT_FLUX_KUSTOMIZE_CONTROLLER, MOAT_FLUX_CRDS
#
# Environment: MOAT_CACHE (default ~/.cache/moat).
set -euo pipefail

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${MOAT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moat}

# The versions are those the wrapper modules require.
SOURCE_VERSION=$(sed -n 's/^\tgithub.com\/fluxcd\/source-controller \(v[0-9.]*\)$/\1/p;s/^require github.com\/fluxcd\/source-controller \(v[0-9.]*\)$/\1/p' "$E2E_DIR/flux/source-controller/go.mod")
KUSTOMIZE_VERSION=$(sed -n 's/^\tgithub.com\/fluxcd\/kustomize-controller \(v[0-9.]*\)$/\1/p;s/^require github.com\/fluxcd\/kustomize-controller \(v[0-9.]*\)$/\1/p' "$E2E_DIR/flux/kustomize-controller/go.mod")

BIN=$CACHE/bin
SOURCE_BIN=$BIN/source-controller-$SOURCE_VERSION
KUSTOMIZE_BIN=$BIN/kustomize-controller-$KUSTOMIZE_VERSION
LOGS=$CACHE/logs

say() { printf 'flux: %s\n' "$*" >&2; }
die() { printf 'flux: error: %s\n' "$*" >&2; exit 1; }

[ -n "$SOURCE_VERSION" ] || die "could not read source-controller's version from $E2E_DIR/flux/source-controller/go.mod"
[ -n "$KUSTOMIZE_VERSION" ] || die "could not read kustomize-controller's version from $E2E_DIR/flux/kustomize-controller/go.mod"

# build_controller NAME VERSION DEST: `go build` of the module's main package, and a copy of the
# module's CRDs (config/crd/bases), into a temporary directory moved into the cache only when
# both succeeded, so an interrupted build never leaves a half-filled entry.
build_controller() {
  local name=$1 version=$2 dest=$3
  local tmp=$dest.partial.$$ log=$LOGS/build-$name-$version.log start=$SECONDS module=github.com/fluxcd/$1
  command -v go >/dev/null || die "Go is required to build $name (install golang)"
  rm -rf "$dest".partial.*
  mkdir -p "$tmp/crds" "$LOGS"
  say "building $name $version (log: $log)"
  if ! (cd "$E2E_DIR/flux/$name" \
      && GOFLAGS="${GOFLAGS:-} -trimpath -mod=readonly" CGO_ENABLED=0 GOTOOLCHAIN=local \
        go build -ldflags='-s -w' -o "$tmp/$name" "$module" \
      && cp "$(go list -m -f '{{.Dir}}' "$module")"/config/crd/bases/*.yaml "$tmp/crds/") >"$log" 2>&1; then
    rm -rf "$tmp"
    tail -n 20 "$log" >&2 || true
    die "building $name failed (full log: $log)"
  fi
  chmod -R u+w "$tmp"
  rm -rf "$dest"
  mv "$tmp" "$dest"
  say "built $name in $((SECONDS - start))s"
}

build() {
  [ -x "$SOURCE_BIN/source-controller" ] \
    || build_controller source-controller "$SOURCE_VERSION" "$SOURCE_BIN"
  [ -x "$KUSTOMIZE_BIN/kustomize-controller" ] \
    || build_controller kustomize-controller "$KUSTOMIZE_VERSION" "$KUSTOMIZE_BIN"
}

case ${1:-} in
  build) build ;;
  env)
    echo "export MOAT_FLUX_SOURCE_CONTROLLER=$SOURCE_BIN/source-controller"
    echo "export MOAT_FLUX_KUSTOMIZE_CONTROLLER=$KUSTOMIZE_BIN/kustomize-controller"
    echo "export MOAT_FLUX_CRDS=$SOURCE_BIN/crds:$KUSTOMIZE_BIN/crds"
    ;;
  *) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
