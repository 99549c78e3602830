#!/usr/bin/env bash
# Builds Moat's fuzz targets and runs each for a while (docs/fuzzing.md).
#
#   fuzz/run.sh [--seconds N] [--fresh] [--dev] [TARGET...]   every target (or those named), N s each
#
# --fresh starts from the checked-in seeds alone, with a corpus thrown away afterwards (the smoke
# pass: the corpus kept in the cache grows, and libFuzzer runs all of it before the clock counts).
# --dev builds without optimisations (the smoke pass): a cold build takes a fraction of the
# optimised one, which matters on a fresh machine, and a smoke pass needs coverage, not speed.
#
# `make fuzz` runs it with FUZZ_SECONDS (default 60); `make test-fuzz`, part of `make test`, with
# FUZZ_SMOKE_SECONDS (default 15). Needs rustup's nightly toolchain (installed if missing);
# cargo-fuzz is built once into the component cache, like the cluster's tools. The build and the
# corpus the fuzzer grows live in the cache too: the checked-in seeds (fuzz/corpus/<target>) are
# only read, and a crash is written to fuzz/artifacts/<target>/ (not checked in).
# Environment: MOAT_CACHE (default ~/.cache/moat).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${MOAT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moat}
CARGO_FUZZ_VERSION=0.13.2
CARGO_FUZZ_ROOT=$CACHE/bin/cargo-fuzz-$CARGO_FUZZ_VERSION
TARGETS=(gate_request age_header stream_decrypt tar_extract image_reference quantity smd_render)

seconds=60
fresh=0
dev=0
selected=()
while [ $# -gt 0 ]; do
  case $1 in
    --seconds) seconds=$2; shift 2 ;;
    --fresh) fresh=1; shift ;;
    --dev) dev=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) selected+=("$1"); shift ;;
  esac
done
[ ${#selected[@]} -gt 0 ] || selected=("${TARGETS[@]}")
for t in "${selected[@]}"; do
  printf '%s\n' "${TARGETS[@]}" | grep -qx "$t" || { echo "fuzz: error: no target $t (targets: ${TARGETS[*]})" >&2; exit 2; }
done

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz: installing rustup's nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
if [ ! -x "$CARGO_FUZZ_ROOT/bin/cargo-fuzz" ]; then
  echo "fuzz: building cargo-fuzz $CARGO_FUZZ_VERSION into $CARGO_FUZZ_ROOT (once, about a minute)"
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" --root "$CARGO_FUZZ_ROOT" --quiet
fi
export PATH=$CARGO_FUZZ_ROOT/bin:$PATH

# Release with debug assertions and overflow checks, AddressSanitizer (cargo-fuzz's default); 16
# codegen units, so that a change to Moat rebuilds in minutes rather than tens of them.
BUILD=(-O -a --codegen-units 16 --target-dir "$CACHE/fuzz/target")
# Without optimisations (debug assertions and overflow checks are on there anyway).
[ "$dev" = 0 ] || BUILD=(--dev --target-dir "$CACHE/fuzz/target")
cd "$ROOT"
start=$SECONDS
cargo +nightly fuzz build "${BUILD[@]}"
echo "fuzz: built in $((SECONDS - start)) s"

failed=()
for t in "${selected[@]}"; do
  work=$CACHE/fuzz/corpus/$t
  if [ "$fresh" = 1 ]; then
    mkdir -p "$CACHE/fuzz"
    work=$(mktemp -d "$CACHE/fuzz/fresh-$t.XXXXXX")
  fi
  log=$CACHE/fuzz/logs/$t.log
  mkdir -p "$work" "$(dirname "$log")" "fuzz/artifacts/$t"
  began=$SECONDS
  # stream_decrypt runs the decryption pipeline, whose threads are detached by design (a stalled
  # download must never block the cleanup of a failed decryption): they finish just after the
  # input returns, and LeakSanitizer, checking then, reports their exiting thread-locals as leaks
  # (std's channel context, glibc's thread-exit list). Leak detection is off for it alone.
  extra=()
  [ "$t" != stream_decrypt ] || extra=(-detect_leaks=0)
  # New inputs go to the first corpus directory (the cache); the seeds are only read.
  if cargo +nightly fuzz run "${BUILD[@]}" "$t" "$work" "fuzz/corpus/$t" -- \
      -max_total_time="$seconds" -timeout=60 -print_final_stats=1 "${extra[@]}" >"$log" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    echo "fuzz: $t: ok, ${runs:-?} runs in $((SECONDS - began)) s, corpus $(find "$work" fuzz/corpus/$t -type f | wc -l) (log $log)"
  else
    failed+=("$t")
    echo "fuzz: $t: FAILED after $((SECONDS - began)) s; the end of $log:" >&2
    tail -n 40 "$log" >&2
  fi
  [ "$fresh" = 0 ] || rm -rf "$work"
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: error: ${failed[*]} failed; the input is in fuzz/artifacts/<target>/ (reproduce: cargo +nightly fuzz run ${BUILD[*]} <target> <file>)" >&2
  exit 1
fi
echo "fuzz: every target ran ${seconds} s without a failure (total $((SECONDS - start)) s)"
