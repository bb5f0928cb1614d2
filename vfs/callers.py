"""Inodes of their own, per program, for files whose writes may wait (`control`,
`autostart`).

The kernel serialises write() calls on one inode (FUSE direct-io writes hold the inode
lock), so `echo 'wait shutoff 60' > control` in one shell would make `echo destroy >
control` from another wait the full minute.  A lookup of such a file therefore answers
each program (thread group) with an inode number of its own, for the same node, and with
an entry timeout of 0 so that every program's next path walk asks again.  One program still
sees one inode: `stat` then `open` (what cp and install check) agree.
"""

from __future__ import annotations

from libvirtfs.nodes.base import Context, Node
from libvirtfs.vfs.inodes import InodeTable


class CallerInodes:
    def __init__(self, ctx: Context, inodes: InodeTable[Node]) -> None:
        self._ctx = ctx
        self._inodes = inodes
        self._by_caller: dict[tuple[int, int], int] = {}

    def inode_for(self, node: Node, caller: int) -> int:
        """The inode number `caller` (a thread-group id, 0 if unknown) sees for `node`."""
        if caller <= 0:
            return node.id
        key = (node.id, caller)
        inode = self._by_caller.get(key)
        if inode is None:
            self._prune()
            inode = self._by_caller[key] = self._ctx.new_id()
        return inode

    def _prune(self) -> None:
        """Forget the numbers the kernel has forgotten (programs that ended)."""
        gone = [key for key, inode in self._by_caller.items()
                if self._inodes.known(inode) is None]
        for key in gone:
            del self._by_caller[key]
