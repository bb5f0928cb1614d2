#!/usr/bin/env bash
# bench.sh - libvirtfs's benchmark (issue 9): libvirtfs side by side with a null pyfuse3
# filesystem, libvirt-python and virsh, in one run; prints a table of medians and ratios
# and, on a full run, writes it into docs/performance.md.  See docs/performance.md.
#
#   bash contrib/bench.sh             everything, 20-30 minutes
#   bash contrib/bench.sh --quick     3 runs each, 1,000 domains and the QEMU host
#   bash contrib/bench.sh --only 1000 | --only 10000 | --only qemu | --only remote
#   bash contrib/bench.sh --no-qemu   test-driver parts only
#   bash contrib/bench.sh --smoke     20 domains, one run (tests/test_bench.py)
#
# Needs root (FUSE, the QEMU test bed) and the README's set-up (bash contrib/setup.sh).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=$REPO/.venv/bin/python
[[ -x $PYTHON ]] || { echo "bench: $PYTHON is missing: run bash contrib/setup.sh first" >&2; exit 1; }
exec "$PYTHON" "$REPO/contrib/bench/run.py" "$@"
