#!/usr/bin/env bash
# Installs what `make test` and `make demo` need and a fresh Debian machine may lack. Idempotent:
# only missing packages are installed. Go and Rust (rustup) are expected on the machine.
set -euo pipefail

# gcc and libc6-dev: the Rust linker and ring's build script need a C toolchain.
# lua5.4: the Argo CD health check (examples/gitops/argocd/health.lua) is tested with a real Lua.
# curl and unzip: the Argo CD and Flux CRDs are fetched from their Go modules (e2e/cluster.sh).
# age: the standard age and age-keygen tools, the interoperability oracle of tests/model.rs and
# the baseline of bench/decrypt.sh.
# time: GNU time (/usr/bin/time -v), the peak RSS of moat decrypt in bench/decrypt.sh.
# docker-registry: a real OCI registry (distribution) on loopback for the image-pinning tests; we run
#   `docker-registry serve <config>` as a child process (e2e/src/registry.rs), never its service.
# skopeo: pushes the OCI layouts the tests write to that registry and inspects digests.
# apache2-utils: htpasswd, for the registry's bcrypt basic-auth file.
# stress-ng: keeps both cores busy during `make test-e2e-stress`, as a build beside the tests does.
# The real node (e2e/node.sh): containerd and runc run its containers; containernetworking-plugins
#   (bridge, host-local, portmap) its pod network; nftables (kube-proxy's mode and the node's guard
#   table), iptables and ipset (kube-router's NetworkPolicy rules); iproute2 and util-linux (ip,
#   nsenter) its network namespace; socat the API server relay; busybox-static the test workload
#   image. gcc with libc6-dev also builds the pause binary.
# python3-minimal and libpython3-stdlib: Debian's default Python, the files of the model server
#   image (e2e/model-server-image.sh), and what reads the chart's rules and dashboard in
#   `make test-rules` (charts/moat/tests/*.py).
# python3-venv: the virtualenv checkov is installed into from PyPI (`make test-scan`, e2e/scan.sh).
# git: e2e/tests/flux.rs commits to a repository that `git http-backend` serves (as a CGI program of
#   busybox-static's httpd) to Flux's source-controller.
# nginx-light: the baseline of the gate benchmark (the same mTLS termination and proxying; run as
#   a child process with its own prefix, never its service).
PACKAGES=(procps openssl ca-certificates gcc libc6-dev lua5.4 curl unzip age time docker-registry skopeo apache2-utils stress-ng
  containerd runc containernetworking-plugins nftables iptables ipset iproute2 util-linux socat busybox-static
  python3-minimal libpython3-stdlib python3-venv nginx-light git)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
for tool in go cargo; do
  command -v "$tool" >/dev/null || { echo "deps: error: $tool is required but not installed" >&2; exit 1; }
done
# rustfmt and clippy come with rustup's default profile; add them where a minimal profile lacks them.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  command -v rustup >/dev/null || { echo "deps: error: cargo fmt/clippy missing and no rustup to add them" >&2; exit 1; }
  rustup component add rustfmt clippy
fi
