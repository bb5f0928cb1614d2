"""Keeps tree-walking tools from removing libvirt objects (docs/writing.md, "rmdir").

`rmdir FOLDER` removes one object, as in configfs and cgroupfs.  Recursive deletes
(`find -delete`, `rm -rf`, `shutil.rmtree`, `rsync --delete`) reach that same rmdir after
trying to unlink what is inside, which libvirtfs refuses for served files.  So:

- A refused removal inside an object folder arms the folder's `Guard`.  For
  `GUARD_SECONDS` after that, an rmdir of the folder by the same program (same process,
  whatever thread) is refused with ENOTEMPTY, as any filesystem refuses a folder whose
  contents could not be removed; anyone else's first rmdir in that time is refused too,
  saying why, and the next one works.
- Some programs rmdir an object folder without first emptying it (mv across filesystems,
  `tar --unlink-first`, Node's `fs.rmSync`, `rm -d`): an rmdir from a program named in
  `RECURSIVE_REMOVERS` never removes an object.

The caller is known through `calling(pid)`, which the vfs wraps around each removal (and
each open for writing: `control` refuses the programs in `FILE_COPIERS`, see writable.py).
"""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

GUARD_SECONDS = 30.0

# Programs whose rmdir(2) of a folder is part of removing a whole tree.
RECURSIVE_REMOVERS = frozenset({"mv", "cp", "tar", "bsdtar", "rsync", "node", "nodejs",
                                "npm", "npx", "rm", "find"})


@dataclass(frozen=True)
class Caller:
    """The process behind a request: its thread-group id (0: unknown) and command name."""

    pid: int = 0
    command: str = ""
    only_if_empty: bool = False  # `rmdir --ignore-fail-on-non-empty`

    @classmethod
    def of(cls, pid: int) -> Caller:
        """FUSE gives the calling thread's id; a program is its thread group."""
        if pid <= 0:
            return cls()
        try:
            tgid = thread_group(pid)
            with open(f"/proc/{tgid}/comm") as f:
                command = f.read().strip()
            return cls(tgid, command, command == "rmdir" and _ignores_non_empty(tgid))
        except (OSError, ValueError):
            return cls(pid)  # gone already, or in another pid namespace


def thread_group(pid: int) -> int:
    """The program (thread-group id) of thread `pid`; OSError once it is gone."""
    with open(f"/proc/{pid}/status") as f:
        return next((int(line.split()[1]) for line in f if line.startswith("Tgid:")), pid)


def _ignores_non_empty(tgid: int) -> bool:
    """Whether rmdir was told to leave folders that are not empty alone: the usual way to
    clear out empty folders (`find DIR -type d -exec rmdir --ignore-fail-on-non-empty {} +`),
    which must not remove objects, whose folders are never empty."""
    with open(f"/proc/{tgid}/cmdline", "rb") as f:
        arguments = f.read().split(b"\0")
    return b"--ignore-fail-on-non-empty" in arguments


# Programs that copy files: a `control` file they write is a saved listing being copied
# back (`cp -r saved/lab/. networks/lab/` would say `start`), not words someone means.
FILE_COPIERS = frozenset({"cp", "tar", "bsdtar", "rsync", "install"})

_UNKNOWN = Caller()
_caller: ContextVar[Caller | None] = ContextVar("libvirtfs_caller", default=None)


@contextmanager
def calling(pid: int) -> Iterator[Caller]:
    """Operations inside this block are done for the process `pid` (a FUSE request's)."""
    caller = Caller.of(pid)
    token = _caller.set(caller)
    try:
        yield caller
    finally:
        _caller.reset(token)


def caller() -> Caller:
    return _caller.get() or _UNKNOWN


class Guard:
    """One object folder's memory of refused removals inside it."""

    __slots__ = ("_armed_at", "_by", "_others_refused")

    def __init__(self) -> None:
        self._armed_at: float | None = None
        self._by: set[int] = set()
        self._others_refused = False

    def arm(self) -> None:
        """A removal inside the folder was just refused."""
        now = time.monotonic()
        if not self._live(now):
            self._by, self._others_refused = set(), False
        self._armed_at = now
        self._by.add(caller().pid)

    def _live(self, now: float) -> bool:
        return self._armed_at is not None and now - self._armed_at < GUARD_SECONDS

    def check_rmdir(self, path: str, what: str) -> None:
        """Raise unless the caller may remove the object `what` (\"domain 'web'\")."""
        who = caller()
        if who.only_if_empty:
            raise OSError(errno.ENOTEMPTY,
                          f"{path} is {what}, so it is not empty: rmdir "
                          f"--ignore-fail-on-non-empty leaves it (a plain rmdir {path} "
                          f"removes the object)")
        if who.command in RECURSIVE_REMOVERS:
            raise OSError(errno.ENOTEMPTY,
                          f"{path} is {what}: {who.command} removes folders as part of a "
                          f"recursive delete, and libvirtfs removes an object only by a "
                          f"plain rmdir of its folder (rmdir {path})")
        now = time.monotonic()
        if not self._live(now):
            return
        if who.pid in self._by or who.pid == 0:
            raise OSError(errno.ENOTEMPTY,
                          f"{path} is {what}; its files could not be removed, so it is not "
                          f"empty. A plain rmdir {path} removes the object")
        if not self._others_refused:
            self._others_refused = True
            raise OSError(errno.ENOTEMPTY,
                          f"{path} is {what}, and a program just tried to delete the files "
                          f"in it; if you mean to remove the object, run rmdir again")
