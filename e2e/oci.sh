#!/usr/bin/env bash
# Builds an OCI image archive from a directory, without a container daemon: one uncompressed
# layer (a reproducible tar: sorted names, mtime 0, uid/gid 0, no atime/ctime), an image config
# and a manifest, in the OCI layout that `ctr images import` and `skopeo copy oci-archive:` read.
# The same inputs always give the same digests.
#
#   oci_archive OUT REF ROOTFS ENTRYPOINT_JSON USER [ENV_JSON]
#     OUT             the .tar to write
#     REF             the image's name, for example moat.local/pause:3.10.2
#     ROOTFS          the directory that becomes the filesystem
#     ENTRYPOINT_JSON for example '["/pause"]'
#     USER            for example 65535:65535
#     ENV_JSON        for example '["PATH=/bin"]' (default: [])
#
# Sourced by e2e/node.sh; prints the manifest digest.

oci_archive() {
  local out=$1 ref=$2 rootfs=$3 entrypoint=$4 user=$5 env=${6:-[]}
  local work
  work=$(mktemp -d)
  mkdir -p "$work/blobs/sha256"
  # Modes are normalised too (readable by all, writable by the owner): the umask of whoever
  # built the directory must not decide whether a non-root container can read its files.
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=posix --mode='u+rwX,go+rX,go-w' \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$rootfs" -cf "$work/layer.tar" .
  local layer_digest layer_size
  layer_digest=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
  layer_size=$(stat -c %s "$work/layer.tar")
  mv "$work/layer.tar" "$work/blobs/sha256/$layer_digest"
  printf '{"architecture":"amd64","os":"linux","config":{"Entrypoint":%s,"User":"%s","Env":%s,"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$entrypoint" "$user" "$env" "$layer_digest" >"$work/config.json"
  local config_digest config_size
  config_digest=$(sha256sum "$work/config.json" | cut -d' ' -f1)
  config_size=$(stat -c %s "$work/config.json")
  mv "$work/config.json" "$work/blobs/sha256/$config_digest"
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
    "$config_digest" "$config_size" "$layer_digest" "$layer_size" >"$work/manifest.json"
  local manifest_digest manifest_size
  manifest_digest=$(sha256sum "$work/manifest.json" | cut -d' ' -f1)
  manifest_size=$(stat -c %s "$work/manifest.json")
  mv "$work/manifest.json" "$work/blobs/sha256/$manifest_digest"
  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
    "$manifest_digest" "$manifest_size" "$ref" "${ref##*:}" >"$work/index.json"
  printf '{"imageLayoutVersion":"1.0.0"}' >"$work/oci-layout"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$work" -cf "$out" oci-layout index.json blobs
  rm -rf "$work"
  echo "sha256:$manifest_digest"
}
