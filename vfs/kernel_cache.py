"""Telling the kernel what to forget of the tree: attributes of changed nodes, and names
that went, appeared or now stand for another node.

Nodes report changes through the Context callbacks (`changed`, `entry_changed`); this
queues them without bound (an event storm must not drop one, or a `stat` shows a ghost
until the kernel's timeout) and without duplicates, and tells the kernel from a task of its
own: pyfuse3's invalidations wait for requests on the same folder to finish, so calling them
inside a request handler can deadlock.  A write that changed something waits (`told`, with a
time limit) until what it queued has been told: the `stat` that follows `echo suspend >
control` must not show the size of the state before.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Generic, NamedTuple, TypeVar

import pyfuse3
import trio

from libvirtfs.nodes.base import Directory, Node
from libvirtfs.vfs.inodes import InodeTable

log = logging.getLogger(__name__)

N = TypeVar("N", bound=Node)


class _Forget(NamedTuple):
    """One thing the kernel must forget: a node's attributes (`name` None), or the name
    `name` in folder `inode` (whose node `deleted` is gone, 0 if it is not)."""

    inode: int
    name: str | None
    deleted: int = 0


class KernelCache(Generic[N]):
    def __init__(self, inodes: InodeTable[N]) -> None:
        self._inodes = inodes
        # Each item once, in the order of its last queueing, with that queueing's number.
        self._queue: dict[_Forget, int] = {}
        self._wakeup = trio.Event()
        self.queued = 0  # items queued so far
        self._told = 0  # every item queued up to this number has been told
        self._progress = trio.Event()

    # -- called by nodes (Context callbacks), never blocking ---------------------------

    def node_changed(self, node: Node) -> None:
        self._put(_Forget(node.id, None))

    def entry_changed(self, directory: Directory, name: str, gone: Node | None) -> None:
        self._put(_Forget(directory.id, name, gone.id if gone is not None else 0))

    def _put(self, item: _Forget) -> None:
        self.queued += 1
        self._queue.pop(item, None)
        self._queue[item] = self.queued
        self._wakeup.set()

    async def told(self, limit: float = 2.0) -> None:
        """Return once everything queued before this call has been told to the kernel, or
        after `limit` seconds (an invalidation can wait for a request that waits)."""
        target = self.queued
        with trio.move_on_after(limit):
            while self._told < target:
                await self._progress.wait()

    def pending(self) -> int:
        return len(self._queue)

    # -- the task that tells the kernel ------------------------------------------------

    async def run(self) -> None:
        while True:
            if not self._queue:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            item, number = next(iter(self._queue.items()))
            del self._queue[item]
            if self._inodes.known(item.inode) is not None:  # else the kernel holds nothing
                if item.deleted and self._inodes.known(item.deleted) is None:
                    item = item._replace(deleted=0)
                # Abandoned at unmount: an invalidation may wait for a request nobody serves.
                await trio.to_thread.run_sync(_tell, item, abandon_on_cancel=True)
            self._told = number
            self._progress.set()
            self._progress = trio.Event()


def _tell(item: _Forget) -> None:
    """In a worker thread: one invalidation, waiting for the requests it depends on."""
    try:
        if item.name is None:
            pyfuse3.invalidate_inode(item.inode, False)
            return
        name = os.fsencode(item.name)
        log.debug("kernel: forget %r in inode %d (gone: %d)", item.name, item.inode,
                  item.deleted)
        try:
            pyfuse3.invalidate_entry(item.inode, name, item.deleted)
        except OSError as e:
            if not item.deleted or e.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                raise
            log.debug("kernel: %r in inode %d: %s", item.name, item.inode, e)
            # The kernel's entry is another inode, or a folder still in use: forget the
            # name all the same (without telling watchers of a deletion).
            pyfuse3.invalidate_entry(item.inode, name)
        if item.deleted:
            # The deletion reaches the gone node itself only through a name the kernel
            # still has; a folder held open by a program whose name it forgot already
            # would keep its attributes for the cache time, and `fstat` (so
            # `os.listdir(fd)`) would say it exists: its attributes go too.
            try:
                pyfuse3.invalidate_inode(item.deleted, True)
            except OSError as e:
                log.debug("kernel: attributes of inode %d: %s", item.deleted, e)
    except OSError as e:
        if e.errno != errno.ENOENT:  # the kernel had nothing cached
            log.debug("kernel cache of inode %d %r: %s", item.inode, item.name, e)
