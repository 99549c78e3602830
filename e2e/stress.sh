#!/usr/bin/env bash
# `make test-e2e-stress`: the e2e suite (as `make test-e2e` runs it) while stress-ng keeps every
# core busy with CPU and memory work, the way CI's two cores look when a build runs beside the
# tests. A test that only passes on an idle machine fails here.
#
# Environment: STRESS_RUNS (default 1) runs the suite that many times in a row and stops at the
# first failure; STRESS_WORKERS (default: the number of cores) CPU workers, plus one VM worker.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v stress-ng >/dev/null || { echo "stress: stress-ng is missing (e2e/deps.sh installs it)" >&2; exit 1; }
eval "$(e2e/cluster.sh env)"
runs=${STRESS_RUNS:-1}
workers=${STRESS_WORKERS:-$(nproc)}
# Build first, without load, so the runs time the tests and not the compiler.
cargo test -p moat-e2e --no-run --quiet
stress-ng --cpu "$workers" --vm 1 --vm-bytes 512M --timeout 0 --quiet &
stress=$!
trap 'kill "$stress" 2>/dev/null || true; wait "$stress" 2>/dev/null || true' EXIT
for run in $(seq 1 "$runs"); do
  start=$SECONDS
  echo "stress: run $run of $runs, load average $(cut -d' ' -f1 /proc/loadavg), $workers CPU workers busy"
  cargo test -p moat-e2e -- --test-threads=4
  echo "stress: run $run passed in $((SECONDS - start)) s (load average $(cut -d' ' -f1 /proc/loadavg))"
done
