#!/usr/bin/env bash
# Moat's own image, built without a container daemon from a moat binary and the libraries it
# links (glibc), and pushed to the local cluster's registry, from which the real node pulls it by
# digest. Prints the pinned reference (<registry>/moat@sha256:...). The same entrypoint,
# default command, user and files as the Dockerfile's image (tests/image.rs compares them), plus
# the glibc libraries the Dockerfile's static musl build does not need.
#
#   e2e/moat-image.sh BINARY                 build and push (needs MOAT_NODE_REGISTRY and
#                                            MOAT_NODE_REGISTRY_CERTS from `e2e/cluster.sh env`)
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
oci_binary "$root" "$bin" /moat
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
digest=$(oci_archive "$work/moat.tar" "$ref" "$root" '["/moat"]' 65532:65532 '[]' '["operator"]')
oci_publish "$work/moat.tar" "$digest" moat "$archive"
