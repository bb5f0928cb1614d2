"""Which opens may read through the kernel's page cache instead of `direct_io`.

A read through the page cache costs one READ request, where `direct_io` costs two (`cat`
reads again to see the end, and only a request can tell it): a sixth of the requests of
`cat */state`.  But the kernel then ends the file at its own `st_size`, the one from our
last attribute reply it kept: if the content an open serves is longer, the reader gets it
cut short, and if it is shorter, padded with zeros.  So an open reads through the page
cache only when every size told for the inode within the attribute timeout was the
content's own length: then the kernel holds that length (or its attributes have expired,
and a read past the end, as `cat` makes, asks for them again first).

A size told while another one may still be held (replies can be applied out of order, and
the kernel drops one computed earlier than the size it holds) makes the inode unsettled
until the older one has expired, with a second to spare (the kernel starts an attribute's
time when it takes the reply in).  And the size must have been told within the first three
quarters of its timeout: a read through the page cache that finds the kernel's attributes
expired asks for them again first (GETATTR), which on a host slower than `cache_timeout`
would be one more rendering per reader.  Any other open keeps `direct_io`: it serves
exactly the bytes of the open, whatever size the kernel believes.

An open through the page cache pins its length until it is released, however long that
is: an attribute reply for the inode meanwhile says that length, with no time to keep it,
even if the content has changed since, because the kernel would end that open's reads at
the new size (a `cat` whose own fstat came after a change read `running` without its
newline; a program busy for longer than `cache_timeout` between its open and its read,
likewise).  It is the size of what the open reads.  Opens made meanwhile read with
`direct_io`: the page cache is the inode's, not the open's, and a second open reading
through it would fill it with its own rendering, which the first one's next reads would
then get (of an `xml` rewritten with the same length, the first 64 KiB of one and the
rest of the other).

Only files nobody can write through the mount are read so (`state`, `info`, ...): a
writer's O_TRUNC open sets the kernel's size to 0, and its writes to what it wrote, behind
every size told; a reader of `xml` meanwhile read nothing at all.
"""

from __future__ import annotations

# Seconds added to an attribute reply's validity: the kernel counts it from when it
# takes the reply in, a little after the reply was made here.
_MARGIN = 1.0


class SizesTold:
    """The sizes told to the kernel per inode of a regular file with cached attributes."""

    def __init__(self) -> None:
        # inode -> (the size told last, until when the kernel surely still holds it)
        self._told: dict[int, tuple[int, float]] = {}
        # inode -> until when a different, earlier size may still be held by the kernel
        self._unsettled: dict[int, float] = {}
        # An open reading through the page cache, at most one per inode (others of the
        # inode read with direct_io meanwhile): inode -> its length, and fh -> inode.
        self._pins: dict[int, int] = {}
        self._pinned_by: dict[int, int] = {}

    def told(self, inode: int, size: int, now: float, valid_for: float) -> None:
        """An attribute reply saying `size`, valid for `valid_for` seconds, was made."""
        before = self._told.get(inode)
        self._told[inode] = (size, now + valid_for * 0.75)
        if before is not None and before[0] != size:
            self._unsettled[inode] = now + valid_for + _MARGIN

    def settled_at(self, inode: int, size: int, now: float) -> bool:
        """Whether the kernel holds no size for `inode` but `size`, and will not ask for
        one again while the open that asks reads it."""
        told = self._told.get(inode)
        if told is None or told[0] != size or now >= told[1]:
            return False
        until = self._unsettled.get(inode)
        if until is None:
            return True
        if now < until:
            return False
        del self._unsettled[inode]
        return True

    def pin(self, inode: int, fh: int, length: int) -> None:
        """Open `fh` reads `length` bytes of `inode` through the page cache, until it is
        released (`unpin`)."""
        self._pins[inode] = length
        self._pinned_by[fh] = inode

    def unpin(self, fh: int) -> None:
        """Open `fh` was released (whether it read through the page cache or not)."""
        inode = self._pinned_by.pop(fh, None)
        if inode is not None:
            del self._pins[inode]

    def pinned(self, inode: int) -> int | None:
        """The length the open through the page cache reads, while one does."""
        return self._pins.get(inode)

    def forget(self, inode: int) -> None:
        """The kernel dropped the inode, and with it every size it held."""
        self._told.pop(inode, None)
        self._unsettled.pop(inode, None)
