"""The numbers the kernel knows open files by.

What a handle does (a snapshot to read, a document to commit at close(), words carried
out at write()) is the file's business: see nodes/handles.py.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from libvirtfs.nodes.handles import Handle


@dataclass
class HandleTable:
    _handles: dict[int, Handle] = field(default_factory=dict)
    _numbers: itertools.count = field(default_factory=lambda: itertools.count(1))

    def add(self, handle: Handle) -> int:
        fh = next(self._numbers)
        self._handles[fh] = handle
        return fh

    def get(self, fh: int) -> Handle:
        return self._handles[fh]

    def find(self, fh: int) -> Handle | None:
        return self._handles.get(fh)

    def pop(self, fh: int) -> Handle | None:
        return self._handles.pop(fh, None)
