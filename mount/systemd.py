"""What a systemd service needs of a daemon, without linking libsystemd: readiness
(`Type=notify`) and log lines the journal files at their level.

`NOTIFY_SOCKET` and `JOURNAL_STREAM` are set by systemd only; elsewhere both are no-ops.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

log = logging.getLogger(__name__)

# sd-daemon(3)'s prefixes: the journal takes a line's priority from them.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


def notify(state: str) -> None:
    """Tell the service manager `state` (READY=1, RELOADING=1, STOPPING=1, STATUS=...)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as e:
        log.warning("cannot tell the service manager %s: %s", state, e.strerror or e)


def stderr_is_journal() -> bool:
    """systemd connected standard error to the journal (JOURNAL_STREAM names its device
    and inode; a child whose stderr was redirected elsewhere keeps the variable)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        stat = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{stat.st_dev}:{stat.st_ino}"


class JournalFormatter(logging.Formatter):
    """`<6>libvirtfs.mount.serve: mounted ...`: the journal adds the time, the process
    name and its pid itself."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return f"<{priority}>{super().format(record)}"
