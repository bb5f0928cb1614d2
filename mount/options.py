"""`-o` options: FUSE's, fstab's, and libvirtfs's own.

`mount -t fuse.libvirtfs` (through mount.fuse3) passes every option of the fstab line, so
the generic mount options are accepted too: those the kernel understands go to FUSE, the
ones that only mean something to mount(8) or systemd are dropped.  Anything else is a
clear error rather than a silently ignored typo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Passed to libfuse as they are.
FUSE_FLAGS = {
    "ro", "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "async", "sync",
    "atime", "noatime", "diratime", "nodiratime", "relatime", "norelatime", "strictatime",
    "nostrictatime", "dirsync", "allow_other", "allow_root", "default_permissions",
    "auto_unmount",
}
FUSE_VALUES = {"fsname", "subtype", "max_read", "blksize", "context", "fscontext",
               "defcontext", "rootcontext"}
# Meaningful to mount(8), fstab or systemd only.
IGNORED_FLAGS = {"defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group",
                 "_netdev", "nofail", "lazytime", "nolazytime", "silent", "loud"}
IGNORED_PREFIXES = ("x-", "comment=", "X-")
# Longest timeout or cache time accepted: a day.  Beyond it a value is a typo, and inf or
# nan would make a libvirt call unbounded.
MAX_SECONDS = 86400.0


class OptionError(ValueError):
    pass


@dataclass
class MountOptions:
    fuse: set[str] = field(default_factory=lambda: {"fsname=libvirtfs", "subtype=libvirtfs",
                                                     "default_permissions"})
    read_only: bool = False
    timeout: float = 30.0
    cache_timeout: float = 1.0
    # A job (drivers/jobs.py) that makes no progress this long is aborted.
    job_stall: float = 300.0
    # Who owns what is served (None: the mounting user) and the group that shares the
    # owner's rights, a name or a number (mount/serve.py resolves it); vfs/permissions.py.
    uid: int | None = None
    gid: int | None = None
    admin_group: str | None = None

    def add(self, text: str) -> None:
        """Take one `-o` argument (comma-separated)."""
        for option in filter(None, (o.strip() for o in text.split(","))):
            self._add_one(option)

    def _add_one(self, option: str) -> None:
        key, has_value, value = option.partition("=")
        if key in ("timeout", "cache_timeout", "job_stall"):
            setattr(self, key, _seconds(key, value if has_value else None,
                                        zero_ok=key == "cache_timeout"))
            return
        if key in ("uid", "gid"):
            setattr(self, key, _id(key, value if has_value else None))
            return
        if key == "admin_group":
            if not value.strip():
                raise OptionError("option admin_group needs a group name or number")
            self.admin_group = value.strip()
            return
        if option in ("ro", "rw"):
            self.read_only = option == "ro"
            self.fuse.discard("rw" if option == "ro" else "ro")
            self.fuse.add(option)
            return
        if option in FUSE_FLAGS and not has_value:
            self.fuse.add(option)
            return
        if key in FUSE_VALUES and has_value:
            self.fuse = {o for o in self.fuse if not o.startswith(key + "=")}
            self.fuse.add(option)
            return
        if option in IGNORED_FLAGS or option.startswith(IGNORED_PREFIXES):
            return
        raise OptionError(f"unknown mount option {option!r}")


def _id(key: str, value: str | None) -> int:
    """A user or group number: 0 to 2**32 - 2 (-1 means "unchanged" to chown(2))."""
    if value is None or not value.isdigit() or int(value) > 2**32 - 2:
        raise OptionError(f"option {key} needs a number (a numeric {key}), got {value!r}")
    return int(value)


def _seconds(key: str, value: str | None, *, zero_ok: bool) -> float:
    try:
        number = float(value) if value is not None else math.nan
    except ValueError:
        number = math.nan
    low = "0" if zero_ok else "more than 0"
    if not (0 <= number <= MAX_SECONDS) or (number == 0 and not zero_ok):  # nan, inf too
        raise OptionError(f"option {key} needs a number of seconds from {low} to "
                          f"{MAX_SECONDS:g}, got {value!r}")
    return number
