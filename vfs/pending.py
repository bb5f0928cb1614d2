"""Requests in progress, so that unmounting ends them, and a writer killed while it waits
for one is let go.

A request that waits (`wait STATE SECONDS`, a slow libvirt call) holds its caller inside
the system call, where the kernel delivers no signal once the request has reached us: a
`kill -9` of the caller cannot end it, and `fusermount3 -u` finds the mount busy.  So:

- every request runs in a cancel scope of its own; `end_all()` (SIGTERM, SIGINT, SIGHUP,
  the mount point gone) cancels them, and each caller gets ECANCELED;
- a write that lasts keeps an eye on its program (pyfuse3 passes on no FUSE interrupts):
  once that program has SIGKILL pending, the write gives up with EINTR and the kernel lets
  the program die.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import outcome
import trio

from libvirtfs.vfs.signals import interrupted

T = TypeVar("T")

# A write shorter than this is not watched.
WATCH_AFTER_SECONDS = 0.5
WATCH_EVERY_SECONDS = 0.2
_SIGKILL_BIT = 1 << 8  # signal 9 in /proc/PID/status's SigPnd and ShdPnd masks


class Pending:
    def __init__(self) -> None:
        self._scopes: set[trio.CancelScope] = set()
        self.ending = False

    @contextmanager
    def request(self) -> Iterator[None]:
        """Run one request so that `end_all` can end it: OSError(ECANCELED) then."""
        with trio.CancelScope() as scope:
            if self.ending:
                scope.cancel()
            self._scopes.add(scope)
            try:
                yield
            finally:
                self._scopes.discard(scope)
        if scope.cancelled_caught:
            raise OSError(errno.ECANCELED, "the filesystem is being unmounted")

    def end_all(self) -> int:
        """Cancel every request in progress, and any that arrives from now on."""
        self.ending = True
        for scope in list(self._scopes):
            scope.cancel()
        return len(self._scopes)


async def unless_killed(pid: int, fn: Callable[[], Awaitable[T]]) -> T:
    """`await fn()`, given up with EINTR once process `pid` is being killed."""
    if pid <= 0:
        return await fn()
    return await _unless(fn, lambda: _until_killed(pid),
                         f"process {pid} was killed while it waited")


async def _unless(fn: Callable[[], Awaitable[T]], watch: Callable[[], Awaitable[None]],
                  message: str) -> T:
    """`await fn()`, given up with EINTR (`message`) once `watch()` returns first."""
    result: list[outcome.Outcome[T]] = []
    async with trio.open_nursery() as nursery:
        async def run() -> None:
            try:
                result.append(outcome.Value(await fn()))
            except Exception as e:  # not trio.Cancelled: that one is the nursery's
                result.append(outcome.Error(e))
            nursery.cancel_scope.cancel()
        nursery.start_soon(run)
        await watch()
        nursery.cancel_scope.cancel()
    if result:
        return result[0].unwrap()
    raise OSError(errno.EINTR, message)


async def _until_killed(pid: int) -> None:
    await trio.sleep(WATCH_AFTER_SECONDS)
    while not _being_killed(pid):
        await trio.sleep(WATCH_EVERY_SECONDS)


def _being_killed(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("SigPnd:", "ShdPnd:")) and \
                        int(line.split()[1], 16) & _SIGKILL_BIT:
                    return True
                if line.startswith("State:") and line.split()[1] in ("Z", "X"):
                    return True
    except (OSError, ValueError):
        # Gone: it is not the one stuck in this write (a program in a request cannot
        # finish dying), so another holds the descriptor, and it is not being killed.
        return False
    return False


INTERRUPT_POLL_SECONDS = 0.1


async def unless_interrupted(pids: tuple[int, ...], fn: Callable[[], Awaitable[T]]) -> T:
    """`await fn()` (a read that may wait), given up with EINTR once the reading program
    has an interrupting signal pending (vfs/signals.py): Ctrl-C must end `cat events`."""
    if not pids:
        return await fn()

    async def until_interrupted() -> None:
        await trio.sleep(INTERRUPT_POLL_SECONDS)  # a read that has data never looks
        while not interrupted(*pids):
            await trio.sleep(INTERRUPT_POLL_SECONDS)

    return await _unless(fn, until_interrupted,
                         f"process {pids[0]} was interrupted while it waited")
