#!/usr/bin/env bash
# The gate's benchmark: `moat gate` (release) against direct calls to the same upstream and
# against Debian's nginx doing the same mTLS termination, in one run (e2e/src/bin/moat-gate-bench.rs).
# With --output FILE, its section of FILE (between the gate:begin/end markers) is replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
output=
[ "${1:-}" = --output ] && output=$2
CARGO=${CARGO:-cargo}
$CARGO build --release -q --bin moat
$CARGO build --release -q -p moat-e2e --bin moat-gate-bench
section=$(MOAT_BIN=target/release/moat target/release/moat-gate-bench)
echo "$section"
if [ -n "$output" ]; then
  if grep -q '<!-- gate:begin' "$output" 2>/dev/null; then
    SECTION="$section" awk '
      /<!-- gate:begin/ { print ENVIRON["SECTION"]; skip = 1; next }
      /<!-- gate:end/ { skip = 0; next }
      !skip { print }' "$output" > "$output.tmp"
    mv "$output.tmp" "$output"
  else
    printf '\n%s\n' "$section" >> "$output"
  fi
  echo "bench: wrote the gate section of $output"
fi
