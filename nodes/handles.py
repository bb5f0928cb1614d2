"""Open files: what each kind of file does between open() and close().

A file chooses its handle in `File.open_handle`; the vfs only numbers handles and passes
read, write, truncate and flush on.  Refused operations are recorded on the file
(`user.error`) here, where the protocol says when an error is due:

- `ContentHandle`: a reader sees the bytes rendered when it opened, from offset 0 to the
  end, whatever libvirt does meanwhile.
- `DocumentHandle`: a writer edits a private copy; `flush` (every `close()`) commits it
  when something was written, so a document's errors reach `close()`.  A refused write
  spoils the copy: close() reports that error and commits nothing.
- `WordHandle`: each write() is carried out at once (control words, autostart), so its
  error reaches write().
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from libvirtfs.nodes.base import File
    from libvirtfs.nodes.writable import WordFile


def opens_for_writing(flags: int) -> bool:
    return bool(flags & (os.O_WRONLY | os.O_RDWR))


class Handle:
    """One open file.  The base refuses what its subclasses do not allow."""

    # Whether a write() may wait long (a control word's `wait`): the vfs then watches the
    # writer, so that `kill -9` lets it go.  Buffered writes return at once.
    writes_may_wait = False
    # Whether a read() may wait for data (a stream): the vfs then watches the reader, so
    # that Ctrl-C and `kill` reach it (vfs/signals.py).
    reads_may_wait = False

    def __init__(self, node: File) -> None:
        self.node = node

    async def read(self, offset: int, size: int) -> bytes:
        return b""

    async def write(self, offset: int, buf: bytes) -> int:
        raise OSError(errno.EBADF, f"{self.node.path} is not open for writing")

    def fixed_length(self) -> int | None:
        """The length of what reads give, when it was fixed at open (None: it was not)."""
        return None

    def stream_size(self) -> int | None:
        """The st_size this handle's program sees, for streams (None: the file's own)."""
        return None

    async def truncate(self, size: int) -> None:
        raise OSError(errno.EBADF, f"{self.node.path} is not open for writing")

    async def flush(self) -> None:
        """Every close() of a descriptor (and fsync) ends here."""

    async def release(self) -> None:
        """The last descriptor is closed."""

    # The vfs answers a request at once, without a cancel scope or any await, when these
    # say it can (vfs/operations.py, "fast paths"): a hot `cat` is open, two reads, a
    # flush and a release, and each await costs as much as the answer.  A subclass that
    # overrides read, flush or release is asked the slow way unless it overrides these.
    def read_now(self, offset: int, size: int) -> bytes | None:
        """What `read` answers, when that cannot wait; None: `await read()`."""
        return None

    def flush_now(self) -> bool:
        """True when `flush` has nothing to do (a reader's close()); False: `await flush()`."""
        return type(self).flush is Handle.flush

    def release_now(self) -> bool:
        """Release now and say True, when that cannot wait; False: `await release()`."""
        return type(self).release is Handle.release


class ContentHandle(Handle):
    """Reads one snapshot of the content, taken at open()."""

    def __init__(self, node: File, data: bytes) -> None:
        super().__init__(node)
        self.data = data

    async def read(self, offset: int, size: int) -> bytes:
        return self.data[offset:offset + size]

    def read_now(self, offset: int, size: int) -> bytes | None:
        if type(self).read is not ContentHandle.read:
            return None
        return self.data[offset:offset + size]

    def fixed_length(self) -> int | None:
        return len(self.data) if type(self).read is ContentHandle.read else None


class DocumentHandle(Handle):
    """A private copy of a whole document, committed at close() when it was changed.

    Opening with O_TRUNC starts from an empty copy but commits nothing by itself: the
    shell's `>` opens, dup2()s and closes before it writes, and that first close must not
    define an empty document.
    """

    def __init__(self, node: File, data: bytes, *, append: bool = False) -> None:
        super().__init__(node)
        self.data = bytearray(data)
        self.append = append
        self.dirty = False
        self.failed: OSError | None = None

    async def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset:offset + size])

    async def write(self, offset: int, buf: bytes) -> int:
        try:
            return self._write(offset, buf)
        except OSError as e:
            self.failed, self.dirty = e, False
            self.node.record_error(e)
            raise

    def _write(self, offset: int, buf: bytes) -> int:
        if self.append:
            offset = len(self.data)
        end = offset + len(buf)
        self.node.check_size(max(end, len(self.data)))
        if end > len(self.data):
            self.node.ctx.hold(self, end, self.node.path)
        if offset > len(self.data):
            self.data.extend(b"\0" * (offset - len(self.data)))
        self.data[offset:end] = buf
        self.dirty = True
        return len(buf)

    async def truncate(self, size: int) -> None:
        try:
            self.node.check_size(size)
            if size > len(self.data):
                self.node.ctx.hold(self, size, self.node.path)
        except OSError as e:
            self.node.record_error(e)
            raise
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(b"\0" * (size - len(self.data)))
        self.dirty = True

    def held_bytes(self) -> int:
        return len(self.data)

    async def release(self) -> None:
        self.data = bytearray()  # given back at once, whoever still refers to the handle

    def release_now(self) -> bool:
        if type(self).release is not DocumentHandle.release:
            return False
        self.data = bytearray()
        return True

    def flush_now(self) -> bool:
        # What flush() does without committing: nothing, unless written or refused.
        return (type(self).flush is DocumentHandle.flush
                and self.failed is None and not self.dirty)

    async def flush(self) -> None:
        if self.failed is not None:
            failed, self.failed = self.failed, None
            raise failed  # recorded when the write was refused
        if not self.dirty:
            return
        self.dirty = False
        with self.node.reporting():
            await self.node.commit(bytes(self.data))


class WordHandle(Handle):
    """Carries out each write() at once, so the writer gets libvirt's answer there.

    A refused write is not carried out again when the same bytes come back at the same
    offset on the same open file: that is Python's buffered file (and other stdio-like
    buffers) writing again at close() what failed at flush(), and by then libvirt may
    take the word (a managed-save, a migration) that the program was told had failed.
    The repeat gets the first refusal; writing the word anew means opening anew."""

    node: WordFile
    writes_may_wait = True

    def __init__(self, node: File) -> None:
        super().__init__(node)
        self._refused: tuple[int, bytes, OSError] | None = None

    async def write(self, offset: int, buf: bytes) -> int:
        if self._refused is not None and self._refused[:2] == (offset, buf):
            raise self._refused[2]
        self._refused = None
        try:
            with self.node.reporting():
                await self.node.execute(buf)
        except OSError as e:
            self._refused = (offset, bytes(buf), e)
            raise
        return len(buf)

    async def truncate(self, size: int) -> None:
        with self.node.reporting():
            await self.node.truncate(size)
