"""The node types the tree is made of; nothing here knows FUSE or libvirt.

A node is a long-lived object with a permanent `id` (the vfs uses it as the inode number,
so it is never reused).  Directories keep their children across listings, matched by an
identity key (a UUID, a name), so an object keeps its node, and its inode, for its life.
Errors are `OSError`s with an errno; the vfs passes them on to the kernel as they are.

Cached renderings and listings carry a generation: `invalidate()` bumps it, and a render
or scan that was in flight meanwhile is handed to its caller but not kept as fresh, so a
change is never hidden behind an answer older than it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import gc
import itertools
import logging
import os
import stat
import time
import weakref
from collections.abc import Awaitable, Callable, Collection, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from libvirtfs.nodes.handles import ContentHandle, DocumentHandle, Handle, opens_for_writing
from libvirtfs.nodes.locks import LazyLock, held
from libvirtfs.nodes.names import to_filename

log = logging.getLogger(__name__)


def fs_error(err: int, message: str) -> OSError:
    """An error the vfs reports with errno `err`; `message` is for the user (user.error)."""
    return OSError(err, message)


MAX_HELD_BYTES = 256 * 1024 * 1024
# user.error must stay readable: an extended attribute holds 64 KiB at most.
MAX_ERROR_CHARS = 4000


class Holder(Protocol):
    def held_bytes(self) -> int: ...


@dataclass
class Context:
    """What every node of one mount shares."""

    cache_timeout: float = 1.0
    read_only: bool = False
    # What a change refused for read_only says (EROFS).
    read_only_reason: str = "the filesystem is mounted read-only"
    # The owner of what is served (`-o uid=`, `gid=`; the mounting user by default) and the
    # group that shares its rights (`-o admin_group=`; None: none), see vfs/permissions.py.
    uid: int = 0
    gid: int = 0
    admin_gid: int | None = None
    # Called with a node whose content or listing changed without anybody asking (events),
    # so the vfs can tell the kernel to drop what it cached.  No-op without a mount.
    changed: Callable[[Node], None] = lambda node: None
    # Called when a name in a folder appeared, went or names another node now, so the vfs
    # can tell the kernel to look it up again; `gone` is the node it named, if that is gone.
    entry_changed: Callable[[Directory, str, Node | None], None] = (
        lambda directory, name, gone: None)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    # What scratch files and open writers hold in memory (see hold()).
    _holders: weakref.WeakSet = field(default_factory=weakref.WeakSet)
    # Fresh renderings, oldest first: (when, file); see QueryFile.
    _renderings: collections.deque = field(default_factory=collections.deque)

    def new_id(self) -> int:
        return next(self._ids)

    def read_only_part(self, reason: str) -> Context:
        """The context of a part of the tree that is read-only on its own (a host with
        `read_only = true`): ids, memory and the kernel's notifications stay the mount's."""
        if self.read_only:
            return self
        return dataclasses.replace(
            self, read_only=True, read_only_reason=reason,
            changed=lambda node: self.changed(node),
            entry_changed=lambda directory, name, gone: self.entry_changed(directory, name,
                                                                           gone))

    def hold(self, holder: Holder, size: int, path: str) -> None:
        """Let `holder` keep `size` bytes, or refuse with ENOSPC: each scratch file and
        writer is bounded, but their number is not, and together they must not fill the
        mount's memory."""
        for attempt in range(2):
            others = sum(h.held_bytes() for h in self._holders if h is not holder)
            if others + size <= MAX_HELD_BYTES:
                self._holders.add(holder)
                return
            if attempt == 0:
                gc.collect()  # folders that went may still hold theirs in a cycle
        raise fs_error(errno.ENOSPC, f"{path}: files being written hold at most "
                                     f"{MAX_HELD_BYTES} bytes of this mount's memory in "
                                     f"total; remove scratch files no longer needed")

    @staticmethod
    def now() -> float:
        """Wall-clock time: what mtime and ctime show."""
        return time.time()

    @staticmethod
    def clock() -> float:
        """What freshness is measured on: a clock the administrator or NTP setting the
        wall clock back cannot stop, which would keep every rendering for ever."""
        return time.monotonic()

    def rendered(self, file: QueryFile, when: float) -> None:
        """`file` keeps a fresh rendering made at `when`; the bytes of renderings that
        expired since are let go (each keeps a digest, to tell whether the next differs).
        So what renderings hold is bounded by what was read in the last `cache_timeout`,
        not by the size of the tree."""
        renderings = self._renderings
        renderings.append((when, file))
        expired = self.clock() - self.cache_timeout
        while renderings and renderings[0][0] <= expired:
            if renderings[0][1] is file and renderings[0][0] == when:
                break  # expired as it arrived (a slow host): its waiters take it first
            old_when, old = renderings.popleft()
            old.expire(old_when)


class Node:
    """Something with a name in the tree.  Nodes have `__slots__`: a mount may hold a
    hundred thousand of them."""

    __slots__ = ("ctime", "ctx", "gone", "id", "last_error", "moving", "mtime", "name",
                 "parent")

    file_type = 0  # stat.S_IFDIR, S_IFREG or S_IFLNK
    # Each program gets an inode of its own for this node (vfs/callers.py): the kernel
    # serialises writes on one inode, and one program's write may wait long.
    per_caller = False
    # What it shows changes with every read (a stream): the kernel caches no attributes.
    uncached = False

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.id = ctx.new_id()
        self.name = ""
        self.parent: Directory | None = None
        self.mtime = self.ctime = ctx.now()
        self.last_error = ""
        self.gone = False  # its object went: ENOENT for good, whoever still holds it
        # Being moved to another folder (a domain migrated by mv): a listing of its old
        # folder that misses it meanwhile does not make it vanish.
        self.moving = False

    @property
    def path(self) -> str:
        """Path from the mount's root, for logs and messages."""
        parts: list[str] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return "/" + "/".join(reversed(parts))

    # May hold secrets (definitions, snapshot documents, what a tool writes): readable by
    # the owner and the admin group only (vfs/permissions.py).
    private = False
    # Changes here reach other hosts with the owner's credentials (ssh keys, certificates):
    # the owner's alone, not the admin group's (vfs/permissions.py).
    owner_only = False

    @property
    def writable(self) -> bool:
        """Whether this file can be written, or this folder changed (mkdir, rmdir, mv,
        new files); vfs/permissions.py turns it into modes."""
        return False

    def touch(self) -> None:
        self.mtime = self.ctx.now()

    def invalidate(self) -> None:
        """Forget cached renderings, so the next read asks libvirt again."""

    @property
    def alive(self) -> bool:
        """False once this node or a folder above it was found gone."""
        node: Node | None = self
        while node is not None:
            if node.gone:
                return False
            node = node.parent
        return True

    def vanish(self) -> None:
        """The object behind this node is gone; a new one of the same name gets a new node."""
        self.gone = True

    def rekey(self, key: Hashable) -> bool:
        """The same name now stands for another object (libvirt's undefine and define
        again: a new UUID).  Nodes that can show it instead say True (see objects.py)."""
        return False

    async def recheck(self) -> bool:
        """libvirt says what this node shows does not exist: list again where that is
        decided; True if the node now shows another object, worth asking again."""
        return await self.parent.recheck() if self.parent is not None else False

    def resolve(self) -> Node:
        """The node that operations on this one reach (see ScratchFile.replaced)."""
        return self

    def walk_known(self) -> list[Node]:
        """This node and every descendant created so far (no libvirt call)."""
        return [self]

    async def size(self) -> int:
        return 0

    # The vfs answers a request at once, without a cancel scope or any await, when the
    # answer is at hand (vfs/operations.py, "fast paths"); these say what is.  A subclass
    # that overrides size, content, open_handle, children or find is asked the slow way
    # unless it overrides the matching method here too.
    def size_now(self) -> int | None:
        """What `size()` answers, when no libvirt call or await is needed; else None."""
        return 0 if type(self).size is Node.size else None

    # Extended attributes: `user.error` holds the last refused operation's message.
    async def xattrs(self) -> dict[str, bytes]:
        return {"user.error": self.last_error.encode()} if self.last_error else {}

    async def set_xattr(self, name: str, value: bytes) -> None:
        # Only `user.` names get here: the vfs answers EOPNOTSUPP to any other.
        raise fs_error(errno.ENOTSUP, f"{name} cannot be set on {self.path}")

    async def remove_xattr(self, name: str) -> None:
        if name == "user.error" and self.last_error:
            self.last_error = ""
            return
        raise fs_error(errno.ENODATA, f"{self.path} has no attribute {name}")

    def record_error(self, error: OSError) -> None:
        message = error.strerror or str(error)
        if len(message) > MAX_ERROR_CHARS:  # it may quote what was written, at any length
            message = (f"{message[:MAX_ERROR_CHARS]}... "
                       f"({len(message) - MAX_ERROR_CHARS} more characters)")
        self.last_error = message
        log.warning("%s: %s", self.path, self.last_error)

    @contextlib.contextmanager
    def reporting(self, *, unless: Collection[int] = ()) -> Iterator[None]:
        """Record a refused operation's reason as this node's `user.error` (unless its
        errno is one of `unless`), and let the error go on to the caller."""
        try:
            yield
        except OSError as e:
            if e.errno not in unless:
                self.record_error(e)
            raise


class File(Node):
    """A regular file; its bytes come from `content()`."""

    __slots__ = ()
    file_type = stat.S_IFREG

    async def content(self) -> bytes:
        raise NotImplementedError

    async def size(self) -> int:
        return len(await self.content())

    def content_now(self) -> bytes | None:
        """What `content()` answers, when it is at hand (a fresh rendering); else None."""
        return None

    def size_now(self) -> int | None:
        if type(self).size is not File.size:
            return None
        content = self.content_now()
        return None if content is None else len(content)

    def open_now(self, flags: int) -> Handle | None:
        """A reader's handle, when its content is at hand; else None (`open_handle`)."""
        if opens_for_writing(flags) or type(self).open_handle is not File.open_handle:
            return None
        content = self.content_now()
        return None if content is None else ContentHandle(self, content)

    # Writing.  By default a writable file is a document: a handle buffers the whole new
    # text and `commit`s it at close(); rename() onto the file commits too.  Kinds that
    # act otherwise (control words, scratch files) open their own handles.
    max_size: int | None = None

    async def open_handle(self, flags: int) -> Handle:
        """The handle for one open(2) with `flags`; content errors are recorded here."""
        if not opens_for_writing(flags):
            with self.reporting():  # libvirt's reason, for getfattr -n user.error
                return ContentHandle(self, await self.content())
        if not self.writable:
            raise fs_error(errno.EACCES, f"{self.path} is read-only")
        if flags & os.O_TRUNC:
            data = b""
        else:
            with self.reporting():
                data = await self.content()
        return DocumentHandle(self, data, append=bool(flags & os.O_APPEND))

    async def commit(self, data: bytes) -> None:
        raise fs_error(errno.EACCES, f"{self.path} is read-only")

    def check_size(self, size: int) -> None:
        """Refuse a size over `max_size` before anything that big is made in memory."""
        if self.max_size is not None and size > self.max_size:
            raise fs_error(errno.EFBIG, f"{self.path} takes at most {self.max_size} bytes")

    async def truncate(self, size: int) -> None:
        """truncate(2) without an open handle."""
        self.check_size(size)
        data = await self.content()
        await self.commit(data[:size].ljust(size, b"\0"))


class QueryFile(File):
    """A file whose content is a rendering of what libvirt says now.

    The rendering is kept for `cache_timeout` seconds, so the `stat` before a read and the
    read itself agree (tar trusts st_size).  mtime moves only when the bytes change: once a
    rendering expired, only its digest is kept to tell (Context.rendered).

    What it shows comes from `render()`: the function given, or a subclass's method.
    """

    __slots__ = ("_cache_seconds", "_cached", "_digest", "_fetched_at", "_generation",
                 "_lock", "_render")

    def __init__(self, ctx: Context,
                 render: Callable[[], Awaitable[bytes | str]] | None = None, *,
                 cache_seconds: float | None = None) -> None:
        super().__init__(ctx)
        self._render = render
        # A file that changes while one watches it (`job`) keeps its rendering shorter.
        self._cache_seconds = cache_seconds
        self._cached: bytes | None = None
        self._digest: int | None = None  # hash() of the last rendering
        self._fetched_at: float | None = None
        self._generation = 0
        self._lock: LazyLock | None = None  # while rendering (locks.held)

    async def render(self) -> bytes | str:
        assert self._render is not None
        return await self._render()

    def render_now(self) -> bytes | str | None:
        """What `render()` gives, when that needs no wait (a table at hand); else None."""
        return None

    def invalidate(self) -> None:
        self._generation += 1
        self._fetched_at = None
        self._cached = None  # its digest stays, to tell whether the next bytes differ

    def expire(self, when: float) -> None:
        """The rendering made at `when` is old now: let its bytes go (Context.rendered)."""
        if self._fetched_at == when:
            self._fetched_at = self._cached = None

    def fresh(self) -> bool:
        limit = self.ctx.cache_timeout
        if self._cache_seconds is not None:
            limit = min(limit, self._cache_seconds)
        return self._fetched_at is not None and self.ctx.clock() - self._fetched_at < limit

    def content_now(self) -> bytes | None:
        if type(self).content is not QueryFile.content:
            return None
        if self.fresh():
            return self._cached
        if self._lock is not None:  # a rendering is under way: it answers first
            return None
        data = self.render_now()
        if data is None:
            return None
        return self._keep(data, self._generation, self.ctx.clock())

    async def content(self) -> bytes:
        if self.fresh():
            return self._cached  # type: ignore[return-value]
        asked = self.ctx.clock()
        async with held(self, "_lock"):  # one render at a time
            # A rendering begun after this caller asked answers it too, even if it took
            # longer than cache_timeout (a slow host): readers that came while one was
            # asking share the next answer instead of asking again, each in turn.
            fetched_at = self._fetched_at
            if self.fresh() or (fetched_at is not None and fetched_at > asked
                                and self._cached is not None):
                return self._cached  # type: ignore[return-value]
            generation, fetched_at = self._generation, self.ctx.clock()
            try:
                data = await self.render()
            except OSError as e:
                if e.errno != errno.ENOENT or not await self.recheck():
                    raise
                generation = self._generation
                data = await self.render()
            return self._keep(data, generation, fetched_at)

    def _keep(self, data: bytes | str, generation: int, fetched_at: float) -> bytes:
        """A rendering made at `fetched_at`: mtime moves if it differs from the last one,
        and it is kept unless a change landed (`generation`) while it was being made."""
        if isinstance(data, str):
            data = data.encode()
        digest = hash(data)
        if self._digest is not None and digest != self._digest:
            self.touch()
            self.ctx.changed(self)
        self._digest = digest
        if generation == self._generation:  # else a change landed while we asked
            self._cached, self._fetched_at = data, fetched_at
            self.ctx.rendered(self, fetched_at)
        return data


class Symlink(Node):
    __slots__ = ("target",)
    file_type = stat.S_IFLNK

    def __init__(self, ctx: Context, target: str) -> None:
        super().__init__(ctx)
        self.target = target

    async def size(self) -> int:
        return len(self.target.encode())

    def size_now(self) -> int | None:
        return len(self.target.encode()) if type(self).size is Symlink.size else None


@dataclass(frozen=True)
class Entry:
    """One child a directory's scan found: `key` is its identity across scans, `name` the
    libvirt name (escaped into a file name by the directory), `make` builds a new node."""

    key: Hashable
    name: str
    make: Callable[[], Node]


class Directory(Node):
    """A folder whose children come from `scan()`, kept `cache_timeout` seconds.

    Children are matched by key between scans, so a node outlives listings.  `reserved`
    names are escaped when an object uses them (see names.py).
    """

    file_type = stat.S_IFDIR
    reserved: frozenset[str] = frozenset()
    # Whether the kernel may remember a missing name for `cache_timeout` (a negative
    # entry).  Only where a miss costs libvirt: elsewhere a name can appear through the
    # mount (a served file once an object is defined) faster than the kernel can be told.
    remembers_missing = False

    __slots__ = ("_by_key", "_by_name", "_ever_scanned", "_generation", "_scan_complete",
                 "_scan_lock", "_scanned_at")

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self._by_key: dict[Hashable, Node] = {}
        self._by_name: dict[str, Node] = {}
        self._scanned_at: float | None = None
        self._ever_scanned = False
        self._generation = 0
        self._scan_complete = True
        self._scan_lock: LazyLock | None = None  # while scanning (locks.held)

    async def scan(self) -> list[Entry]:
        raise NotImplementedError

    def invalidate(self) -> None:
        self._generation += 1
        self._scanned_at = None

    def known(self, key: Hashable) -> Node | None:
        """The child with identity `key`, if a scan has seen it (no libvirt call)."""
        return self._by_key.get(key)

    def walk_known(self) -> list[Node]:
        nodes: list[Node] = [self]
        for child in self._by_name.values():
            nodes.extend(child.walk_known())
        return nodes

    def fresh(self) -> bool:
        return (self._scanned_at is not None
                and self.ctx.clock() - self._scanned_at < self.ctx.cache_timeout)

    async def children(self, *, refresh: bool = False) -> dict[str, Node]:
        """File name -> node, in a stable order (by node id)."""
        await self.listed(refresh=refresh)
        return self._visible()

    async def listed(self, *, refresh: bool = False) -> None:
        """Scan now if the listing is not fresh (or `refresh`), one scan at a time."""
        if refresh or not self.fresh():
            async with held(self, "_scan_lock"):
                if refresh or not self.fresh():
                    await self._rescan()

    def children_now(self) -> dict[str, Node] | None:
        """What `children()` answers, when the listing is fresh (no scan); else None."""
        cls = type(self)
        if (cls.children is not Directory.children or cls.listed is not Directory.listed
                or not self.fresh()):
            return None
        return self._visible()

    def find_now(self, name: str) -> tuple[bool, Node | None]:
        """(True, what `find(name)` answers) when the listing is at hand; else (False, None)."""
        if type(self).find is not Directory.find:
            return False, None
        children = self.children_now()
        if children is None:
            return False, None
        return True, children.get(name)

    def _visible(self) -> dict[str, Node]:
        extra = self.extra_children()
        if not extra:
            return self._by_name
        merged = {**self._by_name, **extra}
        return dict(sorted(merged.items(), key=lambda item: item[1].id))

    # A listing that keeps racing changes is tried this often; the last one is kept
    # without dropping anything, and not as fresh.
    _SCAN_ATTEMPTS = 3

    def _told(self) -> dict[str, Node]:
        """What the kernel is told changes of after a scan: what it may have cached."""
        return self._visible()

    async def _rescan(self) -> None:
        before = dict(self._told()) if self._ever_scanned else None
        listed = list(self._by_key.values())
        for _ in range(self._SCAN_ATTEMPTS):
            generation, scanned_at = self._generation, self.ctx.clock()
            entries = await self.scan()
            self._scan_complete = generation == self._generation
            self._adopt(entries)
            if self._scan_complete:
                self._scanned_at = scanned_at
                break
        if self._scan_complete:
            kept = {id(node) for node in self._by_key.values()}
            for node in listed:
                # A complete listing no longer shows its object; a node that moved to
                # another folder meanwhile (migrated by mv) shows it there.
                if id(node) not in kept and node.parent is self and not node.moving:
                    node.vanish()
        if before is not None:
            self._tell_entries(before, self._told())

    def _tell_entries(self, before: dict[str, Node], after: dict[str, Node]) -> None:
        """Say which names went, appeared or changed node, for the kernel's caches."""
        for name, node in before.items():
            if after.get(name) is not node:
                self.ctx.entry_changed(self, name, node if node.gone else None)
        for name in after.keys() - before.keys():
            self.ctx.entry_changed(self, name, None)  # a "missing" the kernel may keep

    def _adopt(self, entries: list[Entry]) -> None:
        """Match a scan's entries to the nodes known so far.  After a complete scan, a name
        whose object was replaced keeps its node when the node can show the new one
        (`rekey`); a scan that raced a change (incomplete) drops and replaces nothing."""
        complete = self._scan_complete
        names = {entry.key: to_filename(entry.name, self.reserved) for entry in entries}
        key_of = {id(node): key for key, node in self._by_key.items()}
        by_key: dict[Hashable, Node] = {}
        by_name: dict[str, Node] = {}
        for entry in entries:
            name = names[entry.key]
            node = self._by_key.get(entry.key)
            if node is None:
                previous = self._by_name.get(name)
                if previous is not None and key_of.get(id(previous)) not in names:
                    if not complete:
                        continue  # decided by the next, complete scan
                    if previous.rekey(entry.key):
                        node = previous
                        for changed in node.walk_known():
                            self.ctx.changed(changed)
                if node is None:
                    node = entry.make()
            node.parent = self
            node.name = name
            by_key[entry.key] = node
            by_name[node.name] = node
        if not complete:
            for key, node in self._by_key.items():
                if key not in by_key and node.name not in by_name:
                    by_key[key], by_name[node.name] = node, node
        if self._ever_scanned and by_name.keys() != self._by_name.keys():
            self.touch()
            self.ctx.changed(self)
        self._ever_scanned = True
        self._by_key = by_key
        self._by_name = dict(sorted(by_name.items(), key=lambda item: item[1].id))

    def extra_children(self) -> dict[str, Node]:
        """Children that do not come from a scan (scratch files, pending folders)."""
        return {}

    # Changing the folder; each refuses unless a subclass allows it.
    async def create(self, name: str) -> File:
        raise fs_error(errno.EACCES, f"files cannot be created in {self.path}")

    async def mkdir(self, name: str) -> Directory:
        raise fs_error(errno.EACCES, f"folders cannot be created in {self.path}")

    async def remove(self, name: str, *, directory: bool) -> None:
        raise fs_error(errno.EPERM, f"{self.path}/{name} cannot be removed")

    async def rename(self, name: str, target: Directory, new_name: str, *,
                     replace: bool = True) -> None:
        raise fs_error(errno.EPERM, f"{self.path}/{name} cannot be renamed")

    async def find(self, name: str) -> Node | None:
        """The child called `name`, or None.  A miss is answered from a listing kept for
        `cache_timeout` like any other: shells and editors probe many missing names, and
        libvirt's events or the timeout bring in what appeared elsewhere."""
        return (await self.children()).get(name)

    async def lookup(self, name: str) -> Node:
        node = await self.find(name)
        if node is None:
            raise fs_error(errno.ENOENT, f"{self.path}/{name} does not exist")
        return node


class StaticDirectory(Directory):
    """A folder with a fixed set of children, built once."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self._built = False

    def build(self) -> dict[str, Node]:
        raise NotImplementedError

    async def children(self, *, refresh: bool = False) -> dict[str, Node]:
        if not self._built:
            for name, node in self.build().items():
                node.parent, node.name = self, name
                self._by_name[name] = node
            self._built = True
        return self._by_name

    def children_now(self) -> dict[str, Node] | None:
        if type(self).children is not StaticDirectory.children or not self._built:
            return None
        return self._by_name
