#!/usr/bin/env bash
# Builds the demo container image from Debian's busybox-static, with no
# registry: an OCI image layout in OUT/demo-image/, the same layout as an
# OCI archive, OUT/demo-image.tar, and its root file system as an erofs
# disk image, OUT/demo-image.erofs. Reproducible: fixed timestamps, owners
# and file order, so the same busybox gives the same digests.
#
# The image is named localhost/vmpod/busybox:latest (the
# io.containerd.image.name annotation that `ctr import` and vmpod read).
set -euo pipefail

out=${1:?usage: build.sh OUT_DIR}
busybox=${VMPOD_BUSYBOX:-/bin/busybox}
name=localhost/vmpod/busybox:latest

if [ ! -x "$busybox" ] || ! "$busybox" --list >/dev/null 2>&1; then
    echo "demo-image: $busybox is missing; install Debian's busybox-static (scripts/install-deps)" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs
mkdir -p "$rootfs"/{bin,etc,tmp,root,proc,sys,dev,home,var}
chmod 1777 "$rootfs/tmp"
chmod 0700 "$rootfs/root"
install -m 0755 "$busybox" "$rootfs/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
done
cat >"$rootfs/etc/passwd" <<'PW'
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
PW
cat >"$rootfs/etc/group" <<'GR'
root:x:0:
daemon:x:1:
users:x:100:nobody
nogroup:x:65534:
GR
find "$rootfs" -exec touch -h -d @0 {} +

# The same root file system as a read-only erofs disk: what a pod VM gets as
# a virtio-blk device (and a host pod as a loop device) for this image.
mkfs.erofs --quiet -T0 -U 00000000-0000-0000-0000-000000000000 "$work/demo-image.erofs" "$rootfs"

layer_tar=$work/layer.tar
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$rootfs" -cf "$layer_tar" .
layer_gz=$work/layer.tar.gz
gzip -9 -n -c "$layer_tar" >"$layer_gz"

sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }
diff_id=$(sha "$layer_tar")

layout=$work/layout
mkdir -p "$layout/blobs/sha256"
put() { # put FILE -> prints its digest hex and stores the blob
    local h; h=$(sha "$1"); cp "$1" "$layout/blobs/sha256/$h"; echo "$h"
}

layer_digest=$(put "$layer_gz")
config=$work/config.json
printf '%s' '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:'"$diff_id"'"]},"history":[{"created":"1970-01-01T00:00:00Z","created_by":"vmpod guest-image/demo-image/build.sh: Debian busybox-static"}]}' >"$config"
config_digest=$(put "$config")

manifest=$work/manifest.json
printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'"$config_digest"'","size":'"$(size "$config")"'},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:'"$layer_digest"'","size":'"$(size "$layer_gz")"'}]}' >"$manifest"
manifest_digest=$(put "$manifest")

printf '%s' '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:'"$manifest_digest"'","size":'"$(size "$manifest")"',"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"'"$name"'","org.opencontainers.image.ref.name":"latest"}}]}' >"$layout/index.json"

find "$layout" -exec touch -h -d @0 {} +
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$layout" -cf "$work/demo-image.tar" .

rm -rf "$out/demo-image" "$out/demo-image.tar" "$out/demo-image.erofs"
mv "$layout" "$out/demo-image"
mv "$work/demo-image.tar" "$out/demo-image.tar"
mv "$work/demo-image.erofs" "$out/demo-image.erofs"
echo "demo-image: $name = sha256:$manifest_digest (config sha256:$config_digest)" >&2
