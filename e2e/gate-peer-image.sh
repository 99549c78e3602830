#!/usr/bin/env bash
# The image of the gate's real-node peer (e2e/src/bin/moat-gate-peer.rs: the model server behind
# the gate and the client in front of it, one binary), built without a container daemon from the
# binary and the libraries it links, and pushed to the local cluster's registry. Prints the pinned
# reference (<registry>/gate-peer@sha256:...).
#
#   e2e/gate-peer-image.sh BINARY                 build and push (needs MOAT_NODE_REGISTRY and
#                                                 MOAT_NODE_REGISTRY_CERTS from `e2e/cluster.sh env`)
#   e2e/gate-peer-image.sh --archive OUT BINARY   only write the OCI archive
set -euo pipefail
E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=e2e/oci.sh
. "$E2E_DIR/oci.sh"
archive=
if [ "${1:-}" = --archive ]; then
  archive=${2:?usage: e2e/gate-peer-image.sh --archive OUT BINARY}
  shift 2
fi
bin=${1:?usage: e2e/gate-peer-image.sh [--archive OUT] BINARY}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
oci_binary "$work/rootfs" "$bin" /moat-gate-peer
digest=$(oci_archive "$work/gate-peer.tar" gate-peer:e2e "$work/rootfs" '["/moat-gate-peer"]' 65532:65532 '[]' '["idle"]')
oci_publish "$work/gate-peer.tar" "$digest" gate-peer "$archive"
