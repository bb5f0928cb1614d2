#!/usr/bin/env bash
# Installs everything libvirtfs needs on Debian 12, as root: system packages, a virtualenv in
# .venv and the package itself (editable, with the test extras).  Safe to run again: it only
# installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
    fuse3 libfuse3-dev pkg-config libvirt-dev gcc  # build pyfuse3 and libvirt-python
    libvirt-clients                                # virsh, which the tests compare against
    attr acl vim tar                               # getfattr/setfattr, setfacl, vim, tar: tools the tests drive
    rsync nodejs                                   # recursive deletes and restores the tests try
    procps                                         # pgrep, with which tests find processes
    strace                                         # how many requests ls -l makes (test_xattrs)
    systemd                                        # systemd-analyze verify of contrib/systemd's unit (nothing is started)
)

missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
        missing+=("$package")
done
python=${PYTHON:-python3}
if ! "$python" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    missing+=(python3-dev)
fi
if ! "$python" -c 'import ensurepip' 2>/dev/null; then
    missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "$python" -m venv .venv
fi
# Reinstall only when pyproject.toml changed since the last install.
stamp=.venv/.libvirtfs-installed
if [ ! -f "$stamp" ] || ! cmp -s pyproject.toml "$stamp"; then
    echo "setup: installing libvirtfs and its dependencies into .venv" >&2
    if ! { .venv/bin/pip install -q --upgrade pip &&
           .venv/bin/pip install -q -e '.[test]'; } >.venv/install.log 2>&1; then
        tail -n 30 .venv/install.log >&2
        echo "setup: pip install failed; the whole log is in .venv/install.log" >&2
        exit 1
    fi
    cp pyproject.toml "$stamp"
fi

# The command on PATH, for users and for mount -t fuse.libvirtfs (and so /etc/fstab): mount
# runs mount.fuse3 with a PATH of its own, which holds /usr/local/bin but not this .venv.
ln -sfn "$PWD/.venv/bin/libvirtfs" /usr/local/bin/libvirtfs
