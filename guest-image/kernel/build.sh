#!/usr/bin/env bash
# Builds the vmpod guest kernel (an uncompressed ELF vmlinux) from Debian's
# linux-source-6.1 with microvm.config on top of tinyconfig.
#
# The result is cached outside the source tree, keyed by the hash of
# everything that determines it (fragment, this script, the source tarball),
# so a machine pays the ~20 CPU-minute build once:
#   ${VMPOD_CACHE_DIR:-/var/cache/vmpod}/kernel/<key>/{vmlinux,config}
#
# Usage: build.sh [OUT_DIR]   -- also links OUT_DIR/vmlinux to the cached one
# Prints the cached vmlinux path on its last line.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
fragment="$here/microvm.config"
tarball=${VMPOD_KERNEL_TARBALL:-/usr/src/linux-source-6.1.tar.xz}
cache_root=${VMPOD_CACHE_DIR:-/var/cache/vmpod}/kernel
out_dir=${1:-}

if [ ! -f "$tarball" ]; then
    echo "kernel: $tarball is missing; install Debian's linux-source-6.1 (scripts/install-deps)" >&2
    exit 1
fi

# The tarball's own hash, not the package version: a rebuilt package with the
# same version must not reuse a kernel built from other sources.
tar_hash=$(sha256sum "$tarball" | cut -d' ' -f1)
key=$(cat "$fragment" "$0" <(echo "$tar_hash") | sha256sum | cut -c1-16)
cache="$cache_root/$key"

if [ -f "$cache/vmlinux" ]; then
    echo "kernel: cached $cache/vmlinux" >&2
else
    mkdir -p "$cache_root"
    work=$(mktemp -d "$cache_root/build-$key.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    echo "kernel: building $key in $work (this takes a while once per machine)" >&2
    start=$(date +%s)
    tar -C "$work" -xJf "$tarball"
    src=$(echo "$work"/linux-source-*)
    make -C "$src" -s tinyconfig >"$work/tinyconfig.log"
    "$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$fragment" >/dev/null
    make -C "$src" -s olddefconfig

    # Kconfig drops options whose dependencies are unmet without a word.
    missing=0
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=y)
                grep -qx "$line" "$src/.config" || { echo "kernel: $line was dropped by Kconfig" >&2; missing=1; } ;;
            "# CONFIG_"*" is not set")
                opt=${line#\# }; opt=${opt%% *}
                if grep -q "^$opt=" "$src/.config"; then echo "kernel: $opt should not be set" >&2; missing=1; fi ;;
        esac
    done <"$fragment"
    [ "$missing" = 0 ] || { echo "kernel: config verification failed" >&2; exit 1; }

    make -C "$src" -s -j"$(nproc)" vmlinux
    staged="$work/out"
    mkdir "$staged"
    cp "$src/vmlinux" "$staged/vmlinux"
    cp "$src/.config" "$staged/config"
    echo "$(( $(date +%s) - start ))" >"$staged/build-seconds"
    rm -rf "$cache"
    mv "$staged" "$cache"
    echo "kernel: built $cache/vmlinux in $(cat "$cache/build-seconds") s" >&2
fi

if [ -n "$out_dir" ]; then
    mkdir -p "$out_dir"
    ln -sfn "$cache/vmlinux" "$out_dir/vmlinux"
    ln -sfn "$cache/config" "$out_dir/kernel.config"
fi
echo "$cache/vmlinux"
