"""Whether a program waiting in a read() has been sent a signal that should end the wait.

Once the kernel has handed a read to the filesystem, the reader sleeps until the answer
comes, even with SIGKILL pending: the kernel then sends FUSE_INTERRUPT, which pyfuse3 never
passes on to Python.  So a read that waits (a stream) looks at its program's pending signals
in /proc itself and answers EINTR when one is there that the program neither blocks nor
ignores, and that would end the program or run a handler of its (Ctrl-C, `kill`,
`timeout`).  Signals that only inform or stop (SIGCHLD, SIGWINCH, SIGTSTP, ...) leave the
read waiting: EINTR for them would end a `cat` that was merely resized or suspended.
"""

from __future__ import annotations

import signal

_QUIET = (signal.SIGCHLD, signal.SIGCONT, signal.SIGWINCH, signal.SIGURG, signal.SIGSTOP,
          signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
_QUIET_MASK = sum(1 << (int(s) - 1) for s in _QUIET)


def interrupted(*pids: int) -> bool:
    """True if the first of `pids` that still exists (a thread, then its thread group) has
    an interrupting signal pending, or is dying; False if none exists any more."""
    for pid in pids:
        if pid <= 0:
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        try:
            if fields.get("State", "").split()[:1] in (["Z"], ["X"]):
                return True
            pending = int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)
            pending &= ~int(fields["SigBlk"], 16) & ~int(fields["SigIgn"], 16)
        except (KeyError, ValueError):
            continue
        return bool(pending & ~_QUIET_MASK)
    return False
