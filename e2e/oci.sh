#!/usr/bin/env bash
# Builds an OCI image archive from a directory, without a container daemon: one uncompressed
# layer (a reproducible tar: sorted names, mtime 0, uid/gid 0, no atime/ctime), an image config
# and a manifest, in the OCI layout that `ctr images import` and `skopeo copy oci-archive:` read.
# The same inputs always give the same digests.
#
#   oci_archive OUT REF ROOTFS ENTRYPOINT_JSON USER [ENV_JSON [CMD_JSON]]
#     OUT             the .tar to write
#     REF             the image's name, for example moat.local/pause:3.10.2
#     ROOTFS          the directory that becomes the filesystem
#     ENTRYPOINT_JSON for example '["/pause"]'
#     USER            for example 65535:65535
#     ENV_JSON        for example '["PATH=/bin"]' (default: [])
#     CMD_JSON        the default arguments, for example '["operator"]' (default: [])
#
# Sourced by e2e/node.sh and the image scripts (e2e/moat-image.sh, e2e/model-server-image.sh,
# e2e/gate-peer-image.sh); prints the manifest digest.
#
#   oci_binary ROOTFS BINARY DEST
#     copies BINARY to ROOTFS/DEST with every library it links (glibc, the dynamic loader), at
#     the paths ldd names
#
#   oci_publish ARCHIVE DIGEST NAME OUT
#     what the image scripts end with: with OUT, copies the archive there and prints DIGEST;
#     without, pushes it as NAME:e2e through the local cluster's loopback registry
#     ($MOAT_NODE_REGISTRY_PUSH), checks that the registry holds DIGEST, and prints the reference
#     the cluster pulls ($MOAT_NODE_REGISTRY/NAME@DIGEST)
#
#   oci_push ARCHIVE REGISTRY/NAME:TAG CERT_DIR
#     pushes the archive with skopeo, unchanged (the same manifest digest), trusting the CA in
#     CERT_DIR; prints the digest skopeo wrote (sha256:...)

oci_archive() {
  local out=$1 ref=$2 rootfs=$3 entrypoint=$4 user=$5 env=${6:-[]} cmd=${7:-[]}
  local work
  work=$(mktemp -d)
  mkdir -p "$work/blobs/sha256"
  # Modes are normalised too (readable by all, writable by the owner): the umask of whoever
  # built the directory must not decide whether a non-root container can read its files.
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=posix --mode='u+rwX,go+rX,go-w' \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$rootfs" -cf "$work/layer.tar" .
  local layer config manifest
  read -r layer < <(oci_blob "$work" "$work/layer.tar")
  printf '{"architecture":"amd64","os":"linux","config":{"Entrypoint":%s,"Cmd":%s,"User":"%s","Env":%s,"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$entrypoint" "$cmd" "$user" "$env" "${layer% *}" >"$work/config.json"
  read -r config < <(oci_blob "$work" "$work/config.json")
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
    "${config% *}" "${config#* }" "${layer% *}" "${layer#* }" >"$work/manifest.json"
  read -r manifest < <(oci_blob "$work" "$work/manifest.json")
  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
    "${manifest% *}" "${manifest#* }" "$ref" "${ref##*:}" >"$work/index.json"
  printf '{"imageLayoutVersion":"1.0.0"}' >"$work/oci-layout"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$work" -cf "$out" oci-layout index.json blobs
  rm -rf "$work"
  echo "sha256:${manifest% *}"
}

oci_binary() {
  local root=$1 bin=$2 dest=$3 lib
  mkdir -p "$root$(dirname "$dest")"
  cp "$bin" "$root$dest"
  for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}

# oci_blob WORK FILE: moves FILE into WORK's blob store under its digest; prints "DIGEST SIZE".
oci_blob() {
  local digest size
  digest=$(sha256sum "$2" | cut -d' ' -f1)
  size=$(stat -c %s "$2")
  mv "$2" "$1/blobs/sha256/$digest"
  echo "$digest $size"
}

oci_publish() {
  local archive=$1 digest=$2 name=$3 out=$4 registry pushed
  if [ -n "$out" ]; then
    cp "$archive" "$out"
    echo "$digest"
    return 0
  fi
  registry=${MOAT_NODE_REGISTRY:?run with the environment of e2e/cluster.sh env (MOAT_NODE_REGISTRY is not set)}
  pushed=$(oci_push "$archive" "${MOAT_NODE_REGISTRY_PUSH:?}/$name:e2e" "${MOAT_NODE_REGISTRY_CERTS:?}") || return 1
  [ "$pushed" = "$digest" ] || { echo "the registry holds $pushed, not the digest built ($digest)" >&2; return 1; }
  echo "$registry/$name@$digest"
}

oci_push() {
  local archive=$1 ref=$2 certs=$3 digestfile
  digestfile=$(mktemp)
  skopeo copy --quiet --preserve-digests --digestfile "$digestfile" --dest-cert-dir "$certs" \
    "oci-archive:$archive" "docker://$ref" >&2 || { rm -f "$digestfile"; return 1; }
  cat "$digestfile"
  echo
  rm -f "$digestfile"
}
