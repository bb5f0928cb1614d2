#!/usr/bin/env bash
# Sets everything up and runs the whole test suite (run as root): lint, then pytest against
# real FUSE mounts of test:/// hosts and of a real libvirtd with QEMU that this script starts
# and stops.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash contrib/setup.sh
.venv/bin/ruff check .
if [ -f contrib/qemu-testbed.sh ] && [ -z "${LIBVIRTFS_NO_QEMU:-}" ]; then
    bash contrib/qemu-testbed.sh start
    trap 'bash contrib/qemu-testbed.sh stop || true' EXIT
    export LIBVIRTFS_QEMU_URI=qemu:///system
fi
.venv/bin/python -m pytest -p no:cacheprovider "$@"
