"""A lock that costs a few bytes until two tasks want it at once.

Every node of the tree that renders, lists or changes something holds a lock (single-flight
renders, one scan at a time, an rmdir never racing a `start`).  trio.Lock carries a parking
lot from birth, about 240 bytes; with eight of them per domain folder that was a sixth of a
domain's memory, for locks that are almost never contended.  `LazyLock` keeps a flag, and
makes a parking lot (a `trio.Semaphore`) only while somebody waits; it is dropped again
when the last waiter got the lock.  Where a node's lock is only its own business (a
file's render, a folder's scan), `held()` makes the lock when needed and drops it after:
an idle node holds none at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from types import TracebackType

import trio


class LazyLock:
    """A fair (first come, first served) lock for trio tasks: `async with`, `locked()`.
    Unlike `trio.Lock` it does not check which task releases it."""

    __slots__ = ("_held", "_waiting")

    def __init__(self) -> None:
        self._held = False
        # While tasks wait: a semaphore at 0 that hands the lock over, one waiter a release.
        self._waiting: trio.Semaphore | None = None

    def locked(self) -> bool:
        return self._held

    async def acquire(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._held:
            self._held = True
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        if self._waiting is None:
            self._waiting = trio.Semaphore(0)
        # A cancelled waiter leaves the queue; one that was handed the lock returns.
        await self._waiting.acquire()

    def release(self) -> None:
        if not self._held:
            raise RuntimeError("release of a LazyLock nobody holds")
        waiting = self._waiting
        if waiting is not None and waiting.statistics().tasks_waiting:
            waiting.release()  # the first waiter holds it now; it stays held
            return
        self._waiting = None
        self._held = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


@contextlib.asynccontextmanager
async def held(owner: object, attribute: str) -> AsyncIterator[None]:
    """Hold the LazyLock kept in `owner.attribute` (None: nobody holds or waits for it),
    made now if need be, and dropped once nobody holds or waits for it any more."""
    lock = getattr(owner, attribute)
    if lock is None:
        lock = LazyLock()
        setattr(owner, attribute, lock)
    try:
        async with lock:
            yield
    finally:
        if not lock.locked() and getattr(owner, attribute) is lock:
            setattr(owner, attribute, None)
