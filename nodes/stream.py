"""hosts/<host>/events: a stream of one line per event, for every reader from its open on.

The host's `EventStream` is the hub; each open handle subscribes a `Reader` with a queue of
its own, bounded by `MAX_QUEUED_LINES`: a reader that falls further behind loses the newest
lines and, once it catches up, gets one `missed N` line in their place.  Publishing never
waits for anyone, so a slow (or stopped) reader holds up neither the others nor the mount.

What a handle looks like to the reading program (docs/hosts.md, "Events"):

- A read returns the lines waiting for this reader at once, and waits for the next one when
  none is waiting: `cat`, `grep -m1`, `head -n1`, Python's `readline()`.
- `st_size`, as the reading program's own `fstat` sees it, is where its file offset stands
  after its last read, plus the bytes waiting for it; 1 before its first read.  A read that
  asks for at most one byte past all there is does not wait.  That is for GNU `tail -f`,
  which polls files on FUSE: it first reads a file's tail up to `st_size` (with 0 it would
  take the file for a pipe and wait for its end for ever), then every second reads as many
  bytes as `st_size` grew, and names the file (`==> events <==`) whenever size or mtime
  moved: so the size must stand still while nothing happens.
- A read from beyond what the reader was given returns the new lines all the same
  (`tail -n0 -f` starts reading at `st_size`).
- The last `KEEP_BYTES` given to a reader can be read again: `bash`'s `read` and `grep -m1`
  seek back to just after the line they used.
"""

from __future__ import annotations

import errno
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime

import trio

from libvirtfs.nodes.base import Context, File, fs_error
from libvirtfs.nodes.handles import Handle, opens_for_writing

MAX_QUEUED_LINES = 1000
KEEP_BYTES = 64 * 1024


def event_word(text: str) -> str:
    """One field of an event line: `%`, white space and unprintable characters are written
    `%XX` (each byte of their UTF-8), so a name never splits a line or a field; an empty
    field is `-`."""
    if not text:
        return "-"
    return "".join(ch if ch.isprintable() and not ch.isspace() and ch != "%"
                   else "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogateescape"))
                   for ch in text)


def event_line(when: float, kind: str, name: str, event: str, detail: str = "") -> bytes:
    """`2026-11-26T08:00:00.123Z domain web started booted`: UTC time to the millisecond,
    then kind, name, event and detail, each one field."""
    stamp = datetime.fromtimestamp(when, UTC)
    text = (f"{stamp:%Y-%m-%dT%H:%M:%S}.{stamp.microsecond // 1000:03d}Z "
            f"{event_word(kind)} {event_word(name)} {event_word(event)} {event_word(detail)}")
    return text.encode() + b"\n"


class Reader:
    """One open handle's queue of lines not yet read."""

    def __init__(self, stream: EventStream, limit: int = MAX_QUEUED_LINES) -> None:
        self.stream = stream
        self.limit = limit
        self._lines: deque[bytes] = deque()
        self.queued_bytes = 0
        self.missed = 0
        self.ended = False  # the host went: end of file once the queue is read
        self._arrived = trio.Event()

    def push(self, line: bytes) -> None:
        if len(self._lines) >= self.limit:
            self.missed += 1  # the gap is told once the reader has read what came before
        else:
            self._lines.append(line)
            self.queued_bytes += len(line)
        self._arrived.set()

    def take(self) -> bytes:
        """Everything waiting, and the `missed` line if lines were dropped after it."""
        data = b"".join(self._lines)
        self._lines.clear()
        self.queued_bytes = 0
        if self.missed:
            data += self.stream.line("host", self.stream.name(), "missed", str(self.missed))
            self.missed = 0
        self._arrived = trio.Event()
        return data

    @property
    def waiting(self) -> bool:
        return bool(self._lines) or self.missed > 0

    def end(self) -> None:
        self.ended = True
        self._arrived.set()

    async def wait(self) -> None:
        while not self.waiting and not self.ended:
            await self._arrived.wait()
            if not self.waiting and not self.ended:  # taken by another read meanwhile
                self._arrived = trio.Event()

    def close(self) -> None:
        self.stream.readers.discard(self)


class EventStream:
    """A host's event lines, handed to every subscribed reader."""

    def __init__(self, name: Callable[[], str],
                 now: Callable[[], float] = time.time) -> None:
        self.name = name  # the host's folder name, known once the tree is built
        self.now = now
        self.readers: set[Reader] = set()
        self.published = 0
        self.ended = False
        self.on_publish: list[Callable[[], None]] = []

    def line(self, kind: str, name: str, event: str, detail: str = "",
             when: float | None = None) -> bytes:
        return event_line(self.now() if when is None else when, kind, name, event, detail)

    def subscribe(self) -> Reader:
        reader = Reader(self)
        if self.ended:
            reader.end()
        else:
            self.readers.add(reader)
        return reader

    def end(self, event: str) -> None:
        """The host is gone from the mount: a last `host NAME EVENT` line, then every
        reader reads to the end of the file, as does anyone who opens it still."""
        self.publish("host", "", event)
        self.ended = True
        for reader in list(self.readers):
            reader.end()

    def publish(self, kind: str, name: str, event: str, detail: str = "",
                when: float | None = None) -> None:
        """Hand one event to every reader (on the trio thread; never waits).  A host's own
        events name the host's folder when `name` is empty."""
        if kind == "host" and not name:
            name = self.name()
        line = self.line(kind, name, event, detail, when)
        self.published += 1
        for reader in list(self.readers):
            reader.push(line)
        for callback in self.on_publish:
            callback()


class StreamHandle(Handle):
    """One reader of a stream file (see the module's docstring for what it looks like)."""

    reads_may_wait = True

    def __init__(self, node: File, reader: Reader) -> None:
        super().__init__(node)
        self.reader = reader
        self._data = bytearray()  # bytes given to this reader, from offset `_base` on
        self._base = 0
        # Where the reader's file offset stands after its last read (None: no read yet).
        self._position: int | None = None

    @property
    def _end(self) -> int:
        return self._base + len(self._data)

    def stream_size(self) -> int:
        """Where the reader stands plus what waits for it; 1 before its first read."""
        start = 1 if self._position is None else self._position
        return start + self.reader.queued_bytes

    async def read(self, offset: int, size: int) -> bytes:
        chunk = await self._read(offset, size)
        self._position = offset + len(chunk)
        return chunk

    async def _read(self, offset: int, size: int) -> bytes:
        if offset >= self._end:
            new = self._end
            # Up to one byte past all there is: tail's look at what st_size promised.
            if offset + size > self._end + self.reader.queued_bytes + 1:
                await self.reader.wait()
            self._data += self.reader.take()
            # Past what it was given (`tail -n0 -f` starts at st_size, the extra byte):
            # the new lines, all the same.
            offset = new
        start = max(offset, self._base) - self._base
        chunk = bytes(self._data[start:start + size])
        keep_from = max(offset + len(chunk) - KEEP_BYTES, self._base)
        del self._data[:keep_from - self._base]
        self._base = keep_from
        return chunk

    async def release(self) -> None:
        self.reader.close()


class StreamFile(File):
    """A file whose reads follow an `EventStream`; `ls -l` shows size 0."""

    # Its size is per reader and grows with every event: the kernel keeps no attributes.
    uncached = True

    def __init__(self, ctx: Context, stream: EventStream) -> None:
        super().__init__(ctx)
        self.stream = stream
        stream.on_publish.append(self.touch)

    async def content(self) -> bytes:
        return b""

    async def open_handle(self, flags: int) -> Handle:
        if opens_for_writing(flags):
            raise fs_error(errno.EACCES, f"{self.path} is read-only")
        return StreamHandle(self, self.stream.subscribe())
