"""pyfuse3 operations over a tree of nodes.

Every handler goes through `_fuse_errors`: an `OSError` from below becomes its errno
(pyfuse3 only understands FUSEError, and anything else would end the mount), anything
unexpected is logged with its traceback and becomes EIO.

Fast paths: a request whose answer is at hand (a fresh rendering or listing, a reader's
read, flush and release) is answered by a plain function, with no cancel scope and no
await, which cost as much as the answer itself (a hot `cat` is open, two reads, a flush
and a release).  It says `_SLOW` when it cannot, having changed nothing, and the handler
runs as before.  The nodes say what is at hand (`size_now`, `open_now`, `read_now`, ...).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import reprlib
import stat
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from libvirtfs.nodes.base import Context, Directory, File, Node, Symlink, fs_error
from libvirtfs.nodes.guard import calling, thread_group
from libvirtfs.nodes.handles import Handle, opens_for_writing
from libvirtfs.nodes.writable import ScratchFile
from libvirtfs.vfs import counters, permissions
from libvirtfs.vfs.callers import CallerInodes
from libvirtfs.vfs.handles import HandleTable
from libvirtfs.vfs.inodes import InodeTable
from libvirtfs.vfs.kernel_cache import KernelCache
from libvirtfs.vfs.page_cache import SizesTold
from libvirtfs.vfs.pending import Pending, unless_interrupted, unless_killed

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# Readdir offsets are node ids shifted past 0, 1 and 2, which some layers treat specially.
_OFFSET_BASE = 3

# pyfuse3 answers at most this many requests at once (mount/serve.py asks for it); each
# waiting read of a stream holds one.  Its default, 99, let 99 `cat events` freeze the mount:
# no request at all was answered until one of them ended.
MAX_FUSE_TASKS = 1000
# Open stream files at most, so that waiting reads leave room for every other request.
MAX_STREAM_READERS = 500


# What a fast path returns when the answer is not at hand: the handler itself runs then.
_SLOW: Any = object()


def _fuse_errors(now: Callable[..., Any] | None = None
                 ) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """The handler, tried first as `now` (its fast path, see the module's docstring)."""
    def decorate(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        name = fn.__name__
        counters.REQUESTS.setdefault(name, 0)
        counters.WAITED.setdefault(name, 0)

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            counters.REQUESTS[name] += 1  # vfs/counters.py: the benchmark's request counts
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s(%s)", name, _arguments(name, args))
            operations: Operations = args[0]  # type: ignore[assignment]
            try:
                if now is not None and not operations.pending.ending:
                    result = now(*args, **kwargs)
                    if result is not _SLOW:
                        return result
                counters.WAITED[name] += 1
                with operations.pending.request():  # unmounting ends it (vfs/pending.py)
                    return await fn(*args, **kwargs)
            except pyfuse3.FUSEError as e:
                log.debug("%s -> errno %d", name, e.errno)
                raise
            except OSError as e:
                log.debug("%s -> %s", name, e)
                raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
            except Exception:
                log.exception("unexpected error in %s%r", name, args[1:])
                raise pyfuse3.FUSEError(errno.EIO) from None
        return wrapper
    return decorate


_short_repr = reprlib.Repr()
_short_repr.maxstring = _short_repr.maxother = 80
# Where the bytes a user writes are among a handler's arguments: the debug log shows only
# their length, since a document written to `xml` may hold a password.
_DATA_ARGUMENT = {"write": 3, "setxattr": 3}


def _arguments(name: str, args: tuple[Any, ...]) -> str:
    return ", ".join(f"<{len(a)} bytes>" if i == _DATA_ARGUMENT.get(name) else _short_repr.repr(a)
                     for i, a in enumerate(args) if i)


def _name(raw: bytes) -> str:
    return os.fsdecode(raw)


def _program(pid: int) -> int:
    """The thread group of a request's thread (0: unknown); only /proc/PID/status is read,
    since a lookup of `control` or `autostart` asks for it on every path walk."""
    try:
        return thread_group(pid) if pid > 0 else 0
    except (OSError, ValueError):
        return 0


def _alive(node: Node) -> Node:
    if not node.alive:
        raise fs_error(errno.ENOENT, f"{node.path} is gone")
    return node


class Operations(pyfuse3.Operations):
    """The FUSE side of a mount: inodes, handles, attributes, xattrs, errno."""

    supports_dot_lookup = True
    enable_writeback_cache = False  # the kernel must not acknowledge writes we never saw
    enable_acl = False

    def __init__(self, root: Directory, ctx: Context) -> None:
        super().__init__()
        if root.id != pyfuse3.ROOT_INODE:
            raise ValueError("the root node must be the first node made")
        self.root = root
        self.ctx = ctx
        self.inodes: InodeTable[Node] = InodeTable(root)
        self.handles = HandleTable()
        self.kernel_cache = KernelCache(self.inodes)
        self.callers = CallerInodes(ctx, self.inodes)
        self.pending = Pending()
        self.sizes = SizesTold()  # which opens may use the page cache (vfs/page_cache.py)
        # fh -> the program that opened it, for handles whose writes may wait long
        self._writers: dict[int, int] = {}
        # fh -> (node id, opening thread, its program), for handles whose reads may wait
        self._readers: dict[int, tuple[int, int, int]] = {}
        ctx.changed = self.kernel_cache.node_changed
        ctx.entry_changed = self.kernel_cache.entry_changed

    # -- helpers -----------------------------------------------------------------------

    def _check_writable_mount(self, *nodes: Node) -> None:
        """EROFS on a read-only mount, or where one of `nodes` is in a read-only part of
        the tree (a read-only host)."""
        for ctx in (self.ctx, *(node.ctx for node in nodes)):
            if ctx.read_only:
                raise fs_error(errno.EROFS, ctx.read_only_reason)

    def _node(self, inode: int) -> Node:
        # A scratch file renamed onto a served file stands in for it: the kernel keeps the
        # renamed inode under the served name until it looks the name up again.
        return _alive(self.inodes.get(inode).resolve())

    def _directory(self, inode: int) -> Directory:
        node = _alive(self.inodes.get(inode))
        if not isinstance(node, Directory):
            raise fs_error(errno.ENOTDIR, f"{node.path} is not a folder")
        return node

    async def attributes(self, node: Node, inode: int | None = None
                         ) -> pyfuse3.EntryAttributes:
        size = node.size_now()
        if size is None:
            try:
                size = await node.size()
            except OSError as e:
                if e.errno == errno.ENOENT:
                    raise
                # The object is there but this file cannot be rendered (unsupported by
                # the hypervisor, denied, timed out): list it anyway; reading it gives
                # the error.
                log.debug("size of %s: %s", node.path, e)
                size = 0
        return self._attributes(node, inode, size)

    def _attributes_now(self, node: Node, inode: int | None = None
                        ) -> pyfuse3.EntryAttributes | None:
        """`attributes()` when the size is at hand, else None."""
        size = node.size_now()
        return None if size is None else self._attributes(node, inode, size)

    def _attributes(self, node: Node, inode: int | None, size: int
                    ) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode or node.id
        attrs.generation = 0
        # Files with an inode per program are looked up by each program anew, and their
        # per-program inodes hear of no change: nothing about them is cached.
        timeout = 0 if node.per_caller or node.uncached else self.ctx.cache_timeout
        if timeout and node.file_type == stat.S_IFREG:
            now = self.ctx.clock()
            pinned = self.sizes.pinned(attrs.st_ino)
            if pinned is not None and pinned != size:
                # An open reading through the page cache would be cut at the new size:
                # its length, kept by nobody, until it is released (vfs/page_cache.py).
                size, timeout = pinned, 0
            self.sizes.told(attrs.st_ino, size, now, timeout)
        attrs.entry_timeout = attrs.attr_timeout = timeout
        attrs.st_mode = permissions.file_mode(node)  # the policy: vfs/permissions.py
        # 1 means "count unknown" to find(1), which then never skips subfolders.
        attrs.st_nlink = 1
        attrs.st_uid, attrs.st_gid = permissions.owner(node)
        attrs.st_size = size
        attrs.st_blksize = 4096
        attrs.st_blocks = (size + 511) // 512
        mtime_ns = int(node.mtime * 1e9)
        attrs.st_atime_ns = mtime_ns
        attrs.st_mtime_ns = mtime_ns
        attrs.st_ctime_ns = max(mtime_ns, int(node.ctime * 1e9))
        return attrs

    async def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = await self.attributes(node)
        self.inodes.remember(node)
        return attrs

    def _missing(self) -> pyfuse3.EntryAttributes:
        """A negative entry: the kernel answers ENOENT itself for `cache_timeout`, so that
        probes of missing names (shells, editors) cost libvirt nothing.  Whatever makes the
        name appear tells the kernel (Context.entry_changed)."""
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = 0
        attrs.entry_timeout = self.ctx.cache_timeout
        return attrs

    # -- lookups and attributes --------------------------------------------------------

    def _lookup_now(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        parent = self._directory(parent_inode)
        if name in (b".", b".."):
            return _SLOW
        known, node = parent.find_now(_name(name))
        if not known:
            return _SLOW
        if node is None:
            return self._missing_entry(parent, name)
        if node.per_caller:
            return _SLOW
        attrs = self._attributes_now(node)
        if attrs is None:
            return _SLOW
        self.inodes.remember(node)
        return attrs

    def _missing_entry(self, parent: Directory, name: bytes) -> pyfuse3.EntryAttributes:
        if not parent.remembers_missing:
            raise fs_error(errno.ENOENT, f"{parent.path}/{_name(name)} does not exist")
        log.debug("lookup -> %s/%s is missing", parent.path, _name(name))
        return self._missing()

    @_fuse_errors(_lookup_now)
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        parent = self._directory(parent_inode)
        if name == b".":
            node: Node = parent
        elif name == b"..":
            node = parent.parent or parent
        else:
            found = await parent.find(_name(name))
            if found is None:
                return self._missing_entry(parent, name)
            node = found
            if node.per_caller and ctx is not None:
                return await self._caller_entry(node, _program(ctx.pid))
        return await self._entry(node)

    async def _caller_entry(self, node: Node, caller: int) -> pyfuse3.EntryAttributes:
        """`node` under the inode number of this program (vfs/callers.py)."""
        inode = self.callers.inode_for(node, caller)
        attrs = await self.attributes(node, inode)
        self.inodes.remember(node, inode)
        return attrs

    def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.inodes.forget(inode, count)
            if self.inodes.known(inode) is None:
                self.sizes.forget(inode)

    def _getattr_now(self, inode: int, ctx: Any = None) -> Any:
        node = self.inodes.get(inode).resolve()
        if node.uncached:
            return _SLOW
        attrs = self._attributes_now(_alive(node), inode)
        return _SLOW if attrs is None else attrs

    @_fuse_errors(_getattr_now)
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        node = self.inodes.get(inode).resolve()
        # A reader of a stream whose host went (rmdir) still fstats its open file: `tail -f`
        # must get the last `removed` line, not ENOENT.
        if not (node.uncached and ctx is not None
                and self._stream_size(node, _program(ctx.pid)) is not None):
            _alive(node)
        attrs = await self.attributes(node, inode)
        if node.uncached and ctx is not None:
            size = self._stream_size(node, _program(ctx.pid))
            if size is not None:
                attrs.st_size = size
                attrs.st_blocks = (size + 511) // 512
        return attrs

    def _stream_size(self, node: Node, program: int) -> int | None:
        """A stream's size as the program reading it sees it (nodes/stream.py): the
        size of the handle it opened last on `node`."""
        for fh, (node_id, _, opener) in reversed(self._readers.items()):
            if node_id == node.id and opener == program and program > 0:
                return self.handles.get(fh).stream_size()
        return None

    @_fuse_errors()
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None,
                      ctx: Any) -> Any:
        node = self._node(inode)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            permissions.check_metadata_change(node, ctx)
        if fields.update_size:
            self._check_writable_mount(node)
            if not isinstance(node, File):
                raise fs_error(errno.EISDIR, f"{node.path} is a folder")
            if fh is not None:
                await self.handles.get(fh).truncate(attr.st_size)
            else:
                with node.reporting():
                    await node.truncate(attr.st_size)
        # chmod, chown and utimensat are accepted and have no effect: tools that copy
        # metadata (sed -i, cp -p, Ansible) must not fail on a file whose mode the policy
        # decides (vfs/permissions.py), and nobody widens it.
        return await self.attributes(node, inode)

    @_fuse_errors()
    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        node = self._node(inode)
        if not isinstance(node, Symlink):
            raise fs_error(errno.EINVAL, f"{node.path} is not a symbolic link")
        return os.fsencode(node.target)

    @_fuse_errors()
    async def statfs(self, ctx: Any = None) -> Any:
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_blocks = st.f_bfree = st.f_bavail = 0
        st.f_files = len(self.inodes)
        st.f_ffree = st.f_favail = 0
        st.f_namemax = 255
        return st

    # -- folders -----------------------------------------------------------------------

    @_fuse_errors()
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        self._directory(inode)
        return inode

    @_fuse_errors()
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        directory = self._directory(fh)
        # `.` and `..` at offsets 1 and 2; the kernel makes no dentries of them, so they
        # add no lookup count.
        for offset, dot, node in ((1, b".", directory), (2, b"..", directory.parent or directory)):
            if start_id < offset and not pyfuse3.readdir_reply(
                    token, dot, await self.attributes(node), offset):
                return
        children = await directory.children()
        for name, node in children.items():
            offset = node.id + _OFFSET_BASE
            if offset <= start_id:
                continue
            try:
                attrs = await self.attributes(node)
            except OSError as e:
                # One object that cannot be read (gone, unsupported) must not break `ls`.
                log.debug("readdir %s/%s: %s", directory.path, name, e)
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, offset):
                return
            self.inodes.remember(node)

    @_fuse_errors()
    async def releasedir(self, fh: int) -> None:
        return None

    @_fuse_errors()
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        parent = self._directory(parent_inode)
        self._check_writable_mount(parent)
        with parent.reporting(), calling(ctx.pid):  # cp -r into snapshots/ restores
            node = await parent.mkdir(_name(name))
        parent.last_error = ""
        return await self._entry(node)

    @_fuse_errors()
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        with calling(ctx.pid):  # who removes decides what rmdir may do (nodes/guard.py)
            await self._remove(parent_inode, name, directory=True)

    @_fuse_errors()
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        with calling(ctx.pid):
            await self._remove(parent_inode, name, directory=False)

    async def _remove(self, parent_inode: int, name: bytes, *, directory: bool) -> None:
        parent = self._directory(parent_inode)
        self._check_writable_mount(parent)
        # find, not children(): rm of thousands of pending folders must not merge them
        # all into a listing at every rmdir.
        removed = await parent.find(_name(name)) if directory else None
        with parent.reporting():
            await parent.remove(_name(name), directory=directory)
        parent.last_error = ""
        if removed is not None and await parent.find(_name(name)) is not removed:
            # Whoever still holds the folder (a shell's cwd, an open fd) gets ENOENT from
            # now on, and watchers of the parent hear of the deletion.  (The name may show
            # another folder now: a pending one goes, an object defined elsewhere stays.)
            removed.vanish()
            self.kernel_cache.entry_changed(parent, _name(name), removed)

    @_fuse_errors()
    async def rename(self, parent_old: int, name_old: bytes, parent_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        source = self._directory(parent_old)
        target = self._directory(parent_new)
        self._check_writable_mount(source, target)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise fs_error(errno.EINVAL, "exchanging names is not supported")
        moving = (await source.children()).get(_name(name_old))
        replaced = (await target.children()).get(_name(name_new))
        # A refused rename is recorded on the file it would have replaced (sed -i's commit
        # onto xml), or else on the folder it came from.
        blamed = replaced if isinstance(replaced, File) else source
        # Who renames decides whether a domain folder may migrate (nodes/domains.py); a
        # migration lasts, and a mv killed meanwhile must be let go (and aborts it).
        with blamed.reporting(), calling(ctx.pid) as caller:
            await unless_killed(caller.pid, lambda: source.rename(
                _name(name_old), target, _name(name_new),
                replace=not flags & pyfuse3.RENAME_NOREPLACE))
        blamed.last_error = ""
        if moving is not None and moving.resolve() is not moving:
            # Committed onto a served file: make the kernel look the name up again.
            self.kernel_cache.entry_changed(target, _name(name_new), None)
        if moving is not None:
            self.kernel_cache.entry_changed(source, _name(name_old), None)

    @_fuse_errors()
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        self._check_writable_mount()
        raise fs_error(errno.EPERM, "symbolic links cannot be made here")

    @_fuse_errors()
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        self._check_writable_mount()
        raise fs_error(errno.EPERM, "hard links cannot be made here")

    @_fuse_errors()
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: Any) -> Any:
        parent = self._directory(parent_inode)
        self._check_writable_mount(parent)
        if not stat.S_ISREG(mode):
            raise fs_error(errno.EPERM, "only regular files can be made here")
        return await self._entry(self._made_by(await parent.create(_name(name)), ctx))

    # -- files -------------------------------------------------------------------------

    def _open_now(self, inode: int, flags: int, ctx: Any) -> Any:
        if opens_for_writing(flags):
            return _SLOW
        node = self._node(inode)
        if not isinstance(node, File):
            raise fs_error(errno.EISDIR, f"{node.path} is a folder")
        handle = node.open_now(flags)
        if handle is None or handle.reads_may_wait:
            return _SLOW
        return self._file_info(handle, inode)

    @_fuse_errors(_open_now)
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        node = self._node(inode)
        if not isinstance(node, File):
            raise fs_error(errno.EISDIR, f"{node.path} is a folder")
        if not opens_for_writing(flags):
            info = self._file_info(await node.open_handle(flags), inode)
            if self.handles.get(info.fh).reads_may_wait:
                if len(self._readers) >= MAX_STREAM_READERS:
                    await self.release(info.fh)
                    raise fs_error(errno.EMFILE, f"{node.path}: {MAX_STREAM_READERS} stream "
                                                 f"files are open already")
                self._readers[info.fh] = (node.id, ctx.pid, _program(ctx.pid))
            return info
        self._check_writable_mount(node)
        with calling(ctx.pid) as caller:  # who writes decides what control takes (guard.py)
            handle = await node.open_handle(flags)
        info = self._file_info(handle)
        if handle.writes_may_wait:
            self._writers[info.fh] = caller.pid
        return info

    @staticmethod
    def _made_by(node: Node, ctx: Any) -> Node:
        """A scratch file belongs to the user who made it (vfs/permissions.py)."""
        if isinstance(node, ScratchFile) and node.creator is None:
            node.creator = getattr(ctx, "uid", None)
        return node

    def _file_info(self, handle: Handle, inode: int = 0) -> pyfuse3.FileInfo:
        """`direct_io` unless the kernel surely holds the size of what `handle` reads
        (vfs/page_cache.py); the page cache is emptied at every open all the same."""
        length = handle.fixed_length()
        # Opens share the inode's page cache: while one reads through it, another that
        # filled it would leave its own rendering's pages for the first one's next reads.
        # A file one may write is never read so: a writer's O_TRUNC open and its writes
        # set the kernel's size themselves, and a reader then got nothing at all.
        cached = (length is not None and inode != 0 and not handle.node.writable
                  and self.sizes.pinned(inode) is None
                  and self.sizes.settled_at(inode, length, self.ctx.clock()))
        fh = self.handles.add(handle)
        if cached:
            assert length is not None
            self.sizes.pin(inode, fh, length)
        return pyfuse3.FileInfo(fh=fh, direct_io=not cached, keep_cache=False)

    @_fuse_errors()
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> Any:
        parent = self._directory(parent_inode)
        self._check_writable_mount(parent)
        with parent.reporting():
            node = self._made_by(await parent.create(_name(name)), ctx)
        parent.last_error = ""
        handle = await node.open_handle(flags)
        attrs = await self._entry(node)
        return self._file_info(handle), attrs

    def _read_now(self, fh: int, off: int, size: int) -> Any:
        handle = self.handles.find(fh)
        if handle is None or fh in self._readers:
            return _SLOW
        data = handle.read_now(off, size)
        return _SLOW if data is None else data

    @_fuse_errors(_read_now)
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.handles.get(fh)
        reader = self._readers.get(fh)
        if reader is None:
            return await handle.read(off, size)
        # A read that waits for the next event must let Ctrl-C through (vfs/signals.py);
        # pyfuse3 tells no pid on read, so the program that opened the file is watched.
        return await unless_interrupted(reader[1:], lambda: handle.read(off, size))

    @_fuse_errors()
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles.get(fh)
        # A control word may wait long; a writer killed meanwhile must be let go.  Other
        # writes only fill a buffer: no watcher for them (pid 0).
        return await self._shown(unless_killed(self._writers.get(fh, 0),
                                               lambda: handle.write(off, buf)))

    async def _shown(self, change: Awaitable[R]) -> R:
        """Await `change` (a write, a commit); if it queued invalidations, return once the
        kernel was told them, so that a `stat` right after shows the new size."""
        queued = self.kernel_cache.queued
        result = await change
        if self.kernel_cache.queued != queued:
            await self.kernel_cache.told()
        return result

    def _flush_now(self, fh: int) -> Any:
        """A reader's close() (and a writer's that wrote nothing since): nothing to do.
        The kernel sends FLUSH at every close(): pyfuse3 3.5 cannot set FOPEN_NOFLUSH, and
        a flush that says ENOSYS stops them for the whole mount, writers' errors too."""
        handle = self.handles.find(fh)
        return None if handle is not None and handle.flush_now() else _SLOW

    @_fuse_errors(_flush_now)
    async def flush(self, fh: int) -> None:
        await self._shown(self.handles.get(fh).flush())  # a document may be committed

    @_fuse_errors()
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.flush(fh)

    def _release_now(self, fh: int) -> Any:
        handle = self.handles.find(fh)
        if handle is not None and not handle.release_now():
            return _SLOW
        self._writers.pop(fh, None)
        self._readers.pop(fh, None)
        self.sizes.unpin(fh)
        self.handles.pop(fh)
        return None

    @_fuse_errors(_release_now)
    async def release(self, fh: int) -> None:
        self._writers.pop(fh, None)
        self._readers.pop(fh, None)
        self.sizes.unpin(fh)
        handle = self.handles.pop(fh)
        if handle is not None:
            await handle.release()

    # -- extended attributes -----------------------------------------------------------

    @_fuse_errors()
    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        if inode == pyfuse3.ROOT_INODE and name == b"user.counters":
            return counters.text()  # not listed: copies of the tree never carry it
        node = self._node(inode)
        _served_namespace(name)  # raises for any name outside user.
        permissions.check_xattr_read(node, _name(name), ctx)
        values = await node.xattrs()
        try:
            return values[_name(name)]
        except KeyError:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None

    @_fuse_errors()
    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        node = self._node(inode)
        names = permissions.visible_xattrs(node, list(await node.xattrs()), ctx)
        return [os.fsencode(name) for name in names]

    @_fuse_errors()
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any = None) -> None:
        node = self._node(inode)
        self._check_writable_mount(node)
        if _served_namespace(name, changing=True):
            return
        permissions.check_xattr_change(node, ctx)
        with node.reporting(unless=(errno.ENOTSUP, errno.EOPNOTSUPP)):
            await node.set_xattr(_name(name), value)

    @_fuse_errors()
    async def removexattr(self, inode: int, name: bytes, ctx: Any = None) -> None:
        self._check_writable_mount(self._node(inode))
        if _served_namespace(name, changing=True):
            return
        permissions.check_xattr_change(self._node(inode), ctx)
        try:
            await self._node(inode).remove_xattr(_name(name))
        except OSError as e:
            if e.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise


_ACLS = (b"system.posix_acl_access", b"system.posix_acl_default")


def _served_namespace(name: bytes, *, changing: bool = False) -> bool:
    """Attributes live in the `user.` namespace only.  Reading any other name
    (security.selinux and the POSIX ACLs, which `ls -l` asks for every file) is EOPNOTSUPP:
    ls and getfattr then know the filesystem has none and stop asking, where ENODATA
    ("this file has none") makes them ask again for the next file.

    Setting or removing an ACL is accepted and has no effect, as chmod is (True: done):
    `cp -a`, `rsync -A` and setfacl copying an ACL onto a file here must not fail after
    its content was written.  Any other name outside `user.` is EOPNOTSUPP."""
    if name.startswith(b"user."):
        return False
    if changing and name in _ACLS:
        return True
    raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
