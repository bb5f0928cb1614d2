#!/usr/bin/env bash
# Sets everything up and mounts libvirt's demo host test:///default (run as root).
# Usage: contrib/demo.sh [MOUNTPOINT]   (default /tmp/libvirtfs-demo)
set -euo pipefail
cd "$(dirname "$0")/.."
bash contrib/setup.sh
mountpoint=${1:-/tmp/libvirtfs-demo}
mkdir -p "$mountpoint"
if mountpoint -q "$mountpoint"; then
    echo "$mountpoint is mounted already."
else
    .venv/bin/libvirtfs test:///default "$mountpoint"
fi
cat <<TEXT
libvirtfs serves test:///default at $mountpoint.  Look around:
    ls -R $mountpoint | head -40
    cat $mountpoint/hosts/test/domains/test/state
    cat $mountpoint/hosts/test/domains/test/info
    grep -r . $mountpoint/hosts/test/domains/*/state
Unmount with:
    fusermount3 -u $mountpoint
TEXT
