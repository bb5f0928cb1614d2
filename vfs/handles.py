"""Open files: one consistent rendering per handle, and the buffer a writer fills.

A reader sees the bytes rendered when it opened, from offset 0 to the end, whatever
libvirt does meanwhile.  A writer edits a private copy; `flush` (every `close()`) commits
it when something was written, so errors reach `close()`.
"""

from __future__ import annotations

import errno
import itertools
from dataclasses import dataclass, field

from libvirtfs.nodes.base import File


@dataclass
class Handle:
    node: File
    data: bytearray
    dirty: bool = False
    append: bool = False
    # A refused write spoils the document: close() reports that error and commits nothing.
    failed: OSError | None = None

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset:offset + size])

    def write(self, offset: int, buf: bytes) -> int:
        if self.append:
            offset = len(self.data)
        end = offset + len(buf)
        limit = self.node.max_size
        if limit is not None and max(end, len(self.data)) > limit:
            raise OSError(errno.EFBIG, f"{self.node.path} takes at most {limit} bytes")
        if offset > len(self.data):
            self.data.extend(b"\0" * (offset - len(self.data)))
        self.data[offset:end] = buf
        self.dirty = True
        return len(buf)

    def truncate(self, size: int) -> None:
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(b"\0" * (size - len(self.data)))
        self.dirty = True


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

    def pop(self, fh: int) -> Handle | None:
        return self._handles.pop(fh, None)
