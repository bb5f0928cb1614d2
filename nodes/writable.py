"""Files users write: scratch files, definitions (`xml`), control words, flags.

A refused write raises an OSError whose message the vfs records as the file's
`user.error`; a successful one clears it.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from libvirtfs.nodes.base import Context, File, QueryFile, fs_error
from libvirtfs.nodes.guard import FILE_COPIERS, caller
from libvirtfs.nodes.handles import Handle, WordHandle, opens_for_writing

if TYPE_CHECKING:
    from libvirtfs.nodes.objects import ObjectDirectory

MAX_SCRATCH_BYTES = 16 * 1024 * 1024
MAX_WORD_FILE_BYTES = 4096  # `control` and `autostart` take one short line


class ScratchFile(File):
    """A file a tool made beside the served ones (sed's sedXXXXXX, vim's swap file,
    Ansible's .ansible_tmp): kept in memory for the life of the mount, and committed to a
    served file when renamed onto it."""

    max_size = MAX_SCRATCH_BYTES
    private = True  # sed -i's copy of an `xml`, say

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.data = b""
        # The uid that made it, which owns it (vfs/permissions.py); None: the mount's owner.
        self.creator: int | None = None
        self.xattr_values: dict[str, bytes] = {}
        # Set once renamed onto a served file, which it then stands in for.
        self.replaced: File | None = None

    def resolve(self) -> File:
        return self.replaced or self

    @property
    def writable(self) -> bool:
        return True

    async def content(self) -> bytes:
        return self.data

    async def open_handle(self, flags: int) -> Handle:
        # Its bytes are kept here, not rendered: O_TRUNC empties them at once, as on disk.
        if opens_for_writing(flags) and flags & os.O_TRUNC:
            await self.truncate(0)
        return await super().open_handle(flags)

    def held_bytes(self) -> int:
        return 0 if self.replaced is not None else len(self.data)

    async def commit(self, data: bytes) -> None:
        self.ctx.hold(self, len(data), self.path)
        self.data = data
        self.touch()

    async def truncate(self, size: int) -> None:
        self.check_size(size)
        await self.commit(self.data[:size].ljust(size, b"\0"))

    async def xattrs(self) -> dict[str, bytes]:
        return {**self.xattr_values, **await super().xattrs()}

    async def set_xattr(self, name: str, value: bytes) -> None:
        # Tools copy attributes onto their temporary files (the vfs lets `user.` ones
        # through); keep them harmlessly, so that nothing fails half-way through an
        # atomic replace.
        self.xattr_values[name] = value

    async def remove_xattr(self, name: str) -> None:
        if self.xattr_values.pop(name, None) is None:
            await super().remove_xattr(name)


class DefinitionFile(QueryFile):
    """`xml`: reading shows the definition; a whole new document, written and closed or
    renamed onto it, defines or updates the object."""

    __slots__ = ("directory",)
    private = True  # definitions can hold secrets even without the secure flag

    def __init__(self, ctx: Context, directory: ObjectDirectory) -> None:
        super().__init__(ctx)
        self.directory = directory

    @property
    def max_size(self) -> int:  # type: ignore[override]
        return self.directory.host.max_document_bytes

    async def render(self) -> bytes:
        return await self.directory.definition()

    @property
    def writable(self) -> bool:
        return not self.ctx.read_only

    async def commit(self, data: bytes) -> None:
        try:
            await self.directory.define(data)
        except OSError as e:
            raise without_passwords(e, data) from None
        self.last_error = ""
        self.invalidate()
        self.touch()


_PASSWORD = re.compile(rb"""\bpasswd\s*=\s*(?:'([^']*)'|"([^"]*)")""")


def without_passwords(error: OSError, document: bytes) -> OSError:
    """`error` with every password of `document` hidden: libvirt's messages quote values
    of the document, and what they say becomes `user.error` and a log line."""
    message = error.strerror or str(error)
    for match in _PASSWORD.finditer(document):
        secret = (match.group(1) or match.group(2) or b"").decode(errors="replace")
        if secret:
            message = message.replace(secret, "(password hidden)")
    if message != (error.strerror or str(error)):
        error.strerror = message
        error.args = (error.errno, message)
    return error


class WordFile(QueryFile):
    """A file each write() of which is carried out before write() returns, so the writer
    gets libvirt's answer; opening it to write renders nothing."""

    __slots__ = ()
    per_caller = True  # a `wait` in one shell must not hold up another shell's words
    max_size = MAX_WORD_FILE_BYTES  # truncate(2) would otherwise make its zeros in memory

    @property
    def writable(self) -> bool:
        return not self.ctx.read_only

    async def open_handle(self, flags: int) -> Handle:
        if opens_for_writing(flags) and self.writable:
            return WordHandle(self)
        return await super().open_handle(flags)

    async def execute(self, data: bytes) -> None:
        raise NotImplementedError


class ControlFile(WordFile):
    """`control`: each write is one word, carried out before write() returns, so the
    writer gets libvirt's answer.  Reading lists the words that make sense now."""

    __slots__ = ("_run", "_words")

    def __init__(self, ctx: Context, words: Callable[[], Awaitable[list[str]]] | None = None,
                 run: Callable[[str, list[str]], Awaitable[None]] | None = None) -> None:
        super().__init__(ctx)
        self._words, self._run = words, run

    async def words(self) -> list[str]:
        """The words that make sense now (a subclass may ask its folder instead)."""
        assert self._words is not None
        return await self._words()

    async def run(self, word: str, arguments: list[str]) -> None:
        assert self._run is not None
        await self._run(word, arguments)

    async def render(self) -> bytes:
        return "".join(f"{word}\n" for word in await self.words()).encode()

    async def execute(self, data: bytes) -> None:
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise fs_error(errno.EINVAL, "control words are text") from None
        lines = [line.split() for line in text.splitlines() if line.strip()]
        if len(lines) != 1:
            raise fs_error(errno.EINVAL, "write one control word per write "
                                         f"(got {len(lines)} lines)")
        word, *arguments = lines[0]
        try:
            await self.run(word, arguments)
        except OSError as e:
            # Its object was defined anew under the same name: the word is for the new one.
            if e.errno != errno.ENOENT or not await self.recheck():
                raise
            await self.run(word, arguments)
        self.last_error = ""
        self.invalidate()

    async def open_handle(self, flags: int) -> Handle:
        copier = caller().command
        if opens_for_writing(flags) and copier in FILE_COPIERS:
            with self.reporting():
                raise fs_error(errno.EPERM, f"{self.path} takes words written on purpose "
                                            f"(echo start > control); {copier} copies files, "
                                            f"and a saved control file is not written back")
        return await super().open_handle(flags)

    async def commit(self, data: bytes) -> None:
        raise fs_error(errno.EPERM, f"{self.path} takes one word per write(); "
                                    f"a file cannot replace it")


class FlagFile(WordFile):
    """`autostart`: 0 or 1, taken at write() so that `echo maybe > autostart` fails
    visibly; a file renamed onto it works too."""

    __slots__ = ("_read", "_write")

    def __init__(self, ctx: Context, read: Callable[[], Awaitable[bool]] | None = None,
                 write: Callable[[bool], Awaitable[None]] | None = None) -> None:
        super().__init__(ctx)
        self._read, self._write = read, write

    async def read(self) -> bool:
        assert self._read is not None
        return await self._read()

    async def write(self, value: bool) -> None:
        assert self._write is not None
        await self._write(value)

    async def render(self) -> bytes:
        return b"1\n" if await self.read() else b"0\n"

    async def execute(self, data: bytes) -> None:
        value = data.strip()
        if value not in (b"0", b"1"):
            shown = value[:20].decode(errors="replace")
            raise fs_error(errno.EINVAL, f"{self.name} takes 0 or 1, not {shown!r}")
        await self.write(value == b"1")
        self.last_error = ""
        self.invalidate()

    async def commit(self, data: bytes) -> None:
        await self.execute(data)
