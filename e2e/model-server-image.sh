#!/usr/bin/env bash
# The model server image of the local cluster (e2e/model-server/serve.py: a logistic-regression
# model served over mTLS, an HTTPS artifact store and a client), built without a container
# daemon from the packages of Debian's default Python on this machine (python3.X-minimal,
# libpython3.X-minimal, libpython3.X-stdlib: their files, less tests and bytecode) and the
# libraries they link. Pushed to the local cluster's registry; prints the pinned reference
# (<registry>/model-server@sha256:...).
#
#   e2e/model-server-image.sh                 build and push (needs MOAT_NODE_REGISTRY and
#                                             MOAT_NODE_REGISTRY_CERTS from `e2e/cluster.sh env`)
#   e2e/model-server-image.sh --archive OUT   only write the OCI archive
set -euo pipefail
E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=e2e/oci.sh
. "$E2E_DIR/oci.sh"
archive=
if [ "${1:-}" = --archive ]; then
  archive=${2:?usage: e2e/model-server-image.sh --archive OUT}
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root/app" "$root/tmp"
# The interpreter /usr/bin/python3 points to (python3.11 on Debian 12).
py=$(basename "$(readlink -f /usr/bin/python3)")
dpkg -L "$py-minimal" "lib$py-minimal" "lib$py-stdlib" |
  grep -E "^/usr/(bin/$py\$|lib/$py/)" |
  grep -vE '/(__pycache__|test|tests|idlelib|tkinter|turtledemo|ensurepip|lib2to3|pydoc_data)(/|$)' |
  while read -r f; do
    [ -f "$f" ] && [ ! -L "$f" ] || continue
    mkdir -p "$root$(dirname "$f")"
    cp "$f" "$root$f"
  done
ln -s "$py" "$root/usr/bin/python3"
# Every library the interpreter and its extension modules link (ldd's "name => path" lines, and
# the dynamic loader's own).
for lib in $(ldd "/usr/bin/$py" "/usr/lib/$py"/lib-dynload/*.so | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\/.*ld-linux/ {print $1}' | sort -u); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
cp "$E2E_DIR/model-server/serve.py" "$root/app/serve.py"
digest=$(oci_archive "$work/model-server.tar" model-server:e2e "$root" '["/usr/bin/python3", "-B", "/app/serve.py"]' \
  65532:65532 '["PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"]' '["serve", "--model", "/models/model", "--port", "8000"]')
oci_publish "$work/model-server.tar" "$digest" model-server "$archive"
