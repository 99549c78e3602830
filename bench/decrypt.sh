#!/usr/bin/env bash
# Model decryption benchmark: `moat decrypt` (SHA-256 verification, parallel decryption, tar
# extraction onto a tmpfs) against `age -d` (Debian's age, single stream) on the same artifact.
#
#   bash bench/decrypt.sh [--size-mib 4096] [--runs 3] [--output docs/benchmarks.md]
#
# Needs age, GNU time (/usr/bin/time) and openssl (e2e/deps.sh installs them) and a release build
# of moat (built here unless MOAT points at a binary). The artifact is generated from a fast
# deterministic source (AES-CTR keystream of zeros: incompressible, reproducible), encrypted once
# with `age -r`, kept in the page cache, and deleted at the end. Extraction goes to /dev/shm (a
# tmpfs, like the memory-backed emptyDir the init container fills). With --output, the section
# between the model-decryption markers of that file is replaced (or appended).
set -euo pipefail
cd "$(dirname "$0")/.."

size_mib=4096
runs=3
output=""
while [ $# -gt 0 ]; do
  case "$1" in
    --size-mib) size_mib=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --output) output=$2; shift 2 ;;
    *) echo "usage: $0 [--size-mib N] [--runs N] [--output FILE]" >&2; exit 2 ;;
  esac
done

for tool in age age-keygen openssl /usr/bin/time; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing (bash e2e/deps.sh)" >&2; exit 1; }
done
if [ -z "${MOAT:-}" ]; then
  cargo build --release --quiet --bin moat
  MOAT="${CARGO_TARGET_DIR:-target}/release/moat"
fi

work=$(mktemp -d /tmp/moat-bench-decrypt.XXXXXX)
shm=$(mktemp -d /dev/shm/moat-bench-decrypt.XXXXXX)
trap 'rm -rf "$work" "$shm"' EXIT

# The model: four equal shards and a config, like a sharded safetensors checkpoint.
mkdir -p "$work/model"
shard_bytes=$(( size_mib * 1024 * 1024 / 4 ))
for i in 1 2 3 4; do
  # openssl stops on SIGPIPE when head has enough.
  { openssl enc -aes-128-ctr -nosalt -K "0$i" -iv 0 -in /dev/zero 2>/dev/null || true; } \
    | head -c "$shard_bytes" > "$work/model/model-0000$i-of-00004.safetensors"
done
echo '{"architectures": ["Bench"]}' > "$work/model/config.json"
age-keygen -o "$work/key.txt" 2>/dev/null
recipient=$(age-keygen -y "$work/key.txt")
tar -C "$work/model" -cf - . | age -r "$recipient" -o "$work/model.tar.age"
rm -rf "$work/model"
artifact_bytes=$(stat -c %s "$work/model.tar.age")
sha=$(sha256sum "$work/model.tar.age" | cut -d' ' -f1)
cat "$work/model.tar.age" > /dev/null  # into the page cache

now() { date +%s.%N; }
mbps() { awk -v b="$artifact_bytes" -v s="$1" 'BEGIN { printf "%.0f", b / s / 1e6 }'; }
best() { sort -g | head -1 | awk '{ printf "%.2f", $1 }'; }

moat_cpu=() age_times=() age_file_times=() age_tar_times=() moat_times=() moat_rss=()
for _ in $(seq "$runs"); do
  t0=$(now); age -d -i "$work/key.txt" -o /dev/null "$work/model.tar.age"; t1=$(now)
  age_times+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')")

  t0=$(now); age -d -i "$work/key.txt" -o "$shm/model.tar" "$work/model.tar.age"; t1=$(now)
  age_file_times+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')")
  rm -f "$shm/model.tar"

  mkdir "$shm/age"
  t0=$(now); age -d -i "$work/key.txt" "$work/model.tar.age" | tar -C "$shm/age" -xf -; t1=$(now)
  age_tar_times+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')")
  rm -rf "$shm/age"

  /usr/bin/time -v -o "$work/time.txt" "$MOAT" decrypt --source "file://$work/model.tar.age" \
    --sha256 "$sha" --identity "$work/key.txt" --target "$shm/moat" 2>"$work/moat.err" \
    || { cat "$work/moat.err" >&2; exit 1; }
  moat_times+=("$(awk -F': ' '/Elapsed \(wall clock\)/ { n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; print s }' "$work/time.txt")")
  moat_rss+=("$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$work/time.txt")")
  moat_cpu+=("$(awk -F': ' '/User time|System time/ { s += $2 } END { print s }' "$work/time.txt")")
  rm -rf "$shm/moat"
done

age_s=$(printf '%s\n' "${age_times[@]}" | best)
age_tar_s=$(printf '%s\n' "${age_tar_times[@]}" | best)
age_file_s=$(printf '%s\n' "${age_file_times[@]}" | best)
moat_s=$(printf '%s\n' "${moat_times[@]}" | best)
cpu_s=$(printf '%s\n' "${moat_cpu[@]}" | best)
rss_kib=$(printf '%s\n' "${moat_rss[@]}" | sort -g | tail -1)
age_mbps=$(mbps "$age_s")
age_tar_mbps=$(mbps "$age_tar_s")
age_file_mbps=$(mbps "$age_file_s")
moat_mbps=$(mbps "$moat_s")
ratio() { awk -v a="$1" -v m="$moat_s" 'BEGIN { printf "%.2f", a / m }'; }
ratio_null=$(ratio "$age_s")
ratio_file=$(ratio "$age_file_s")
ratio_tar=$(ratio "$age_tar_s")
rss_mib=$(awk -v k="$rss_kib" 'BEGIN { printf "%.1f", k / 1024 }')
cpus=$(nproc)
wall_note=$(awk -v b="$artifact_bytes" -v c="$cpu_s" 'BEGIN { printf "%.2f GB, %.2f CPU-s per GB", b / 1e9, c / (b / 1e9) }')

section=$(cat <<EOF
<!-- model-decryption:begin (written by bench/decrypt.sh) -->
### Model decryption

\`bash bench/decrypt.sh\`: a ${size_mib} MiB model (four incompressible shards from an AES-CTR keystream and a config file) archived with GNU tar and encrypted once with \`age -r\` (Debian age $(age --version)); the artifact (${artifact_bytes} bytes) is in the page cache. Best of ${runs} runs on ${cpus} CPUs, wall-clock time; throughput is artifact bytes per second. \`moat decrypt\` reads the file, verifies its SHA-256, decrypts the age payload on every core and extracts the tar into /dev/shm (a tmpfs, like the memory-backed emptyDir of the init container); its peak RSS is the \`Maximum resident set size\` of \`/usr/bin/time -v\` (the largest over the runs). Targets: at least 1.5 times the throughput of \`age -d\`, peak RSS under 128 MiB for any size.

| command | time | throughput | moat is faster by |
|---|---|---|---|
| \`age -d -o /dev/null\` (decryption only, nothing written) | ${age_s} s | ${age_mbps} MB/s | ${ratio_null}x |
| \`age -d -o /dev/shm/model.tar\` (decrypted tar written to tmpfs) | ${age_file_s} s | ${age_file_mbps} MB/s | ${ratio_file}x |
| \`age -d \| tar -x\` onto tmpfs (the same job as moat, without SHA-256) | ${age_tar_s} s | ${age_tar_mbps} MB/s | ${ratio_tar}x |
| **\`moat decrypt\`** (SHA-256 + decryption + extraction onto tmpfs) | **${moat_s} s** | **${moat_mbps} MB/s** | |

Peak RSS of \`moat decrypt\`: **${rss_mib} MiB** (\`--threads\` default: one decrypting thread per core; ${cpus} here).

\`moat decrypt\` used ${cpu_s} CPU-seconds (user + system, least over the runs) for ${wall_note}. Where they go (perf on the 2-CPU development VM, per GB of artifact): SHA-256 about 0.55 s on the reading thread (ring, SHA extensions: serial by nature, the longest single chain), ChaCha20-Poly1305 about 0.4 s spread over the decrypting threads (ring, AVX2), the kernel's tmpfs page allocation and copy for the extracted files about 0.45 s, reading the page cache about 0.07 s. On 2 CPUs that is a floor of about 0.7 s per GB whatever the scheduling; \`age -d -o /dev/null\` does a single decryption (Go's ChaCha20-Poly1305) and writes nothing, so on 2 CPUs moat cannot reach 1.5 times its speed while also hashing and writing the files; against \`age -d\` that writes its output (to a file or through \`tar -x\`) it is the faster by the factors above, and it also verifies the digest. With more cores the ceiling is the serial SHA-256 (about 1.8 GB/s).
<!-- model-decryption:end -->
EOF
)

echo "$section"
if [ -n "$output" ]; then
  if grep -q '<!-- model-decryption:begin' "$output" 2>/dev/null; then
    SECTION="$section" awk '
      /<!-- model-decryption:begin/ { print ENVIRON["SECTION"]; skip = 1; next }
      /<!-- model-decryption:end/ { skip = 0; next }
      !skip { print }' "$output" > "$output.tmp"
    mv "$output.tmp" "$output"
  else
    printf '\n%s\n' "$section" >> "$output"
  fi
  echo "bench: wrote the model decryption section of $output"
fi
