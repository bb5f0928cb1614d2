#!/usr/bin/env bash
# soak.sh - the soak test of tests/test_soak.py, for as long as you like (docs/testbed.md):
# 16 clients read, write, control and snapshot through one mount while the filesystem's
# RSS, descriptors and threads and libvirtd's clients are sampled.
#
#   bash contrib/soak.sh                               an hour on the QEMU test bed
#   bash contrib/soak.sh --minutes 10                  ten minutes
#   bash contrib/soak.sh --minutes 5 --uri test:///default   libvirt's test driver, no test bed
#   bash contrib/soak.sh --uri qemu+tcp://127.0.0.1:16510/system   another QEMU daemon
#
# Run as root (FUSE, the test bed).  qemu:///system starts the test bed if it is not running
# (contrib/qemu-testbed.sh start) and leaves it running.  Extra arguments after -- go to pytest.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

usage() { echo "usage: bash contrib/soak.sh [--minutes N] [--uri URI] [-- PYTEST-ARGS]" >&2; exit 2; }
minutes=60
uri=qemu:///system
while [ $# -gt 0 ]; do
    case $1 in
        --minutes) [ $# -ge 2 ] || usage; minutes=$2; shift 2 ;;
        --uri) [ $# -ge 2 ] || usage; uri=$2; shift 2 ;;
        --) shift; break ;;
        -h|--help) usage ;;
        *) echo "soak: unknown argument $1" >&2; usage ;;
    esac
done
seconds=$(awk -v m="$minutes" 'BEGIN { if (m + 0 <= 0) exit 1; printf "%d", m * 60 }') ||
    { echo "soak: --minutes takes a positive number, not '$minutes'" >&2; exit 2; }

bash contrib/setup.sh
export LIBVIRTFS_SOAK_SECONDS=$seconds
case $uri in
    test:///default) test=tests/test_soak.py::test_soak_on_the_test_driver ;;
    *)
        if [ "$uri" = qemu:///system ]; then
            bash contrib/qemu-testbed.sh start >/dev/null
        fi
        export LIBVIRTFS_QEMU_URI=$uri
        test=tests/test_soak.py::test_soak_on_qemu ;;
esac
echo "soak: $minutes minutes on $uri ($test)" >&2
exec .venv/bin/python -m pytest -p no:cacheprovider -p no:logging -s -q "$test" "$@"
