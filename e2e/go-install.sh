# shellcheck shell=bash
# Sourced by the scripts that build a pinned Go tool into the cache (e2e/prometheus.sh,
# e2e/scan.sh); they define E2E_DIR, LOGS, say and die first.
#
# go_install NAME DEST PACKAGE@VERSION...: `go install` into a temporary directory, moved into the
# cache only when the build succeeded, so an interrupted build never leaves a half-filled entry.
# The temporary directory is the calling script's own (DEST.partial-<script>.PID): e2e/cluster.sh
# clears `DEST.partial.*`, and several scripts may build helm at once on a fresh machine.
go_install() {
  local name=$1 dest=$2; shift 2
  local tmp=$dest.partial-$(basename "$0" .sh).$$ log=$LOGS/build-$name.log start=$SECONDS
  command -v go >/dev/null || die "Go is required to build $name (install golang)"
  rm -rf "$tmp"
  mkdir -p "$tmp" "$LOGS"
  say "building $name (log: $log)"
  if ! (cd "$E2E_DIR" && GOFLAGS="${GOFLAGS:-} -trimpath" CGO_ENABLED=0 GOBIN="$tmp" \
      go install -ldflags='-s -w' "$@") >"$log" 2>&1; then
    rm -rf "$tmp"
    tail -n 20 "$log" >&2 || true
    die "building $name failed: go install $* (full log: $log)"
  fi
  # Another build may have filled the entry meanwhile (cluster.sh builds helm too): keep that one.
  if [ -d "$dest" ]; then rm -rf "$tmp"; else mv "$tmp" "$dest"; fi
  say "built $name in $((SECONDS - start))s"
}
