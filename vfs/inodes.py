"""The kernel's view of the tree: which nodes it holds, and how many lookups of each.

Inode numbers are node ids, which are never reused, so `generation` stays 0.  A node stays
here until `forget` brings its lookup count to zero, even if its object is gone from
libvirt: the kernel may still stat it, and gets ENOENT from the node then.
"""

from __future__ import annotations

import errno
from typing import Generic, Protocol, TypeVar


class HasId(Protocol):
    id: int


N = TypeVar("N", bound=HasId)


class InodeTable(Generic[N]):
    def __init__(self, root: N) -> None:
        self.root = root
        self._nodes: dict[int, N] = {root.id: root}
        self._lookups: dict[int, int] = {root.id: 1}

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, inode: int) -> N:
        try:
            return self._nodes[inode]
        except KeyError:
            raise OSError(errno.ENOENT, f"inode {inode} is not known") from None

    def remember(self, node: N, inode: int | None = None) -> None:
        """The kernel got a reference to `node` (lookup, create, readdirplus), under its
        own number or, for a program of its own, under `inode` (vfs/callers.py)."""
        inode = node.id if inode is None else inode
        self._nodes[inode] = node
        self._lookups[inode] = self._lookups.get(inode, 0) + 1

    def forget(self, inode: int, count: int) -> None:
        if inode == self.root.id:
            return
        left = self._lookups.get(inode, 0) - count
        if left > 0:
            self._lookups[inode] = left
        else:
            self._lookups.pop(inode, None)
            self._nodes.pop(inode, None)

    def known(self, inode: int) -> N | None:
        return self._nodes.get(inode)
