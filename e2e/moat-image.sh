#!/usr/bin/env bash
# Moat's own image, built without a container daemon from a moat binary and the libraries it
# links (glibc), and imported into the real node's containerd, named by digest as a pull by digest
# would name it. Prints the pinned reference (moat.local/moat@sha256:...). The same entrypoint,
# default command, user and files as the Dockerfile's image (tests/image.rs compares them), plus
# the glibc libraries the Dockerfile's static musl build does not need.
#
#   e2e/moat-image.sh BINARY                 build and import (needs MOAT_NODE_CONTAINERD, the
#                                            node's containerd socket, from `e2e/cluster.sh env`)
#   e2e/moat-image.sh --archive OUT BINARY   only write the OCI archive
set -euo pipefail
E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=e2e/oci.sh
. "$E2E_DIR/oci.sh"
archive=
if [ "${1:-}" = --archive ]; then
  archive=${2:?usage: e2e/moat-image.sh --archive OUT BINARY}
  shift 2
fi
bin=${1:?usage: e2e/moat-image.sh [--archive OUT] BINARY}
ref=moat.local/moat:e2e
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root/etc/ssl/certs"
cp "$bin" "$root/moat"
for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
digest=$(oci_archive "$work/moat.tar" "$ref" "$root" '["/moat"]' 65532:65532 '[]' '["operator"]')
if [ -n "$archive" ]; then
  cp "$work/moat.tar" "$archive"
  echo "$digest"
  exit 0
fi
sock=${MOAT_NODE_CONTAINERD:?run through the e2e tests (MOAT_NODE_CONTAINERD is not set)}
ctr --address "$sock" -n k8s.io images import "$work/moat.tar" >/dev/null
ctr --address "$sock" -n k8s.io images tag --force "$ref" "moat.local/moat@$digest" >/dev/null
echo "moat.local/moat@$digest"
