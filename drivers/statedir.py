"""The state folder: what libvirtfs keeps on the machine that mounts.

STATE is /var/lib/libvirtfs for root and $XDG_STATE_HOME/libvirtfs for other users.  It
holds read-your-writes records of objects libvirt keeps no metadata for (`written/`) and,
without syslog, the background log.  Everything in it may name paths, addresses and hosts,
so it is private to the mounting user.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
from pathlib import Path

from libvirtfs.drivers.records import Written


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/libvirtfs")
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "libvirtfs"


def private_folder(path: Path) -> Path:
    """`path`, made if needed, readable by the mounting user only: remembered definitions
    and the log may name paths, addresses and hosts."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


class StateDir:
    """Written definitions kept in files, for objects libvirt keeps no metadata for."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, host_uuid: str, kind: str, key: str) -> Path:
        name = hashlib.sha256(f"{host_uuid}\0{kind}\0{key}".encode()).hexdigest()
        return self.root / "written" / name

    def get(self, host_uuid: str, kind: str, key: str) -> Written | None:
        try:
            record = json.loads(self._path(host_uuid, kind, key).read_text())
            return Written(record["digest"], base64.b64decode(record["data"]))
        except (OSError, ValueError, KeyError):
            return None

    def put(self, host_uuid: str, kind: str, key: str, written: Written) -> None:
        path = self._path(host_uuid, kind, key)
        private_folder(self.root)
        private_folder(path.parent)
        temporary = path.with_suffix(".tmp")
        record = json.dumps({"digest": written.digest,
                             "data": base64.b64encode(written.data).decode()})
        # Definitions may name paths and addresses: readable by the mounting user only.
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(record)
        os.replace(temporary, path)

    def forget(self, host_uuid: str, kind: str, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(host_uuid, kind, key).unlink()
