#!/usr/bin/env bash
# Sets everything up and runs the whole test suite (run as root): lint, then pytest against
# real FUSE mounts of test:/// hosts and of a real libvirtd with QEMU that this script starts
# and stops (it says first what that changes on the machine, and puts qemu.conf back at the
# end).  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash contrib/setup.sh
.venv/bin/ruff check .
if [ -f contrib/qemu-testbed.sh ] && [ -z "${LIBVIRTFS_NO_QEMU:-}" ]; then
    # Said before anything changes; LIBVIRTFS_NO_QEMU=1 runs the suite without any of it
    # (the tests marked qemu are then skipped).
    bash contrib/qemu-testbed.sh changes >&2
    echo "test.sh: all of this lasts until the run ends (Ctrl-C included), except the packages" >&2
    trap 'bash contrib/qemu-testbed.sh stop || true' EXIT
    bash contrib/qemu-testbed.sh start
    export LIBVIRTFS_QEMU_URI=qemu:///system
fi
.venv/bin/python -m pytest -p no:cacheprovider "$@"
