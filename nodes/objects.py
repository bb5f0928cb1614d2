"""Folders for libvirt objects and the collections that hold them.

`CollectionDirectory` (domains/, pools/, networks/, volumes/) lists objects and handles
mkdir (a pending entry, visible in this mount until its `xml` is written), rmdir (undefine,
delete) and mv (rename).  `ObjectDirectory` is one object's folder: its served files, and
scratch files that tools create beside them.  A served name always means the served file:
no scratch file can take it, so restoring a saved folder with cp, tar or rsync defines the
object from its `xml` and leaves `control` and the others served.

Each object folder has one lock for what changes the object (define, control words,
rmdir, mv), so an rmdir never races a `start` into a transient running domain; and a
`Guard` (guard.py) that keeps recursive deletes from removing it.

An object folder's served files do not depend on libvirt, only on its key: they are made
once (`served_files`, a table per kind, no closures per folder), and only those asked for
by name until something lists the folder: `cat domains/*/state` makes one file per
domain, not eight.  They are made anew only when the folder's shape changes (its key, its
pending `xml`).
"""

from __future__ import annotations

import errno
import functools
import math
import stat
import sys
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, ClassVar

import trio

from libvirtfs.nodes.base import Context, Directory, Entry, File, Node, QueryFile, fs_error
from libvirtfs.nodes.guard import Guard
from libvirtfs.nodes.locks import LazyLock
from libvirtfs.nodes.names import from_filename, name_for_new_object, to_filename
from libvirtfs.nodes.render import key_values, word
from libvirtfs.nodes.words import CONTROL_WORDS
from libvirtfs.nodes.writable import ControlFile, DefinitionFile, FlagFile, ScratchFile

# What an object folder's files were made for (ObjectDirectory._built_key) before any.
_UNBUILT = object()


def folder(node: Node) -> ObjectDirectory:
    """The object folder a served file belongs to."""
    parent = node.parent
    assert isinstance(parent, ObjectDirectory)
    return parent


class StateFile(QueryFile):
    """`state`: the word the object's folder says."""

    __slots__ = ()

    async def render(self) -> bytes:
        return word(await folder(self).state())

    def render_now(self) -> bytes | None:
        state = folder(self).state_now()
        return None if state is None else word(state)


class InfoFile(QueryFile):
    __slots__ = ()

    async def render(self) -> bytes:
        return key_values(await folder(self).info())

    def render_now(self) -> bytes | None:
        info = folder(self).info_now()
        return None if info is None else key_values(info)


class AutostartFile(FlagFile):
    __slots__ = ()

    async def read(self) -> bool:
        # The folder's host, not the host of now: a folder migrated by mv keeps its files.
        directory = folder(self)
        return await directory.host.autostart(directory.kind, directory.key)  # type: ignore[arg-type]

    async def write(self, value: bool) -> None:
        directory = folder(self)
        await directory.host.set_autostart(directory.kind, directory.key,  # type: ignore[arg-type]
                                           value)
        directory.invalidate_all()  # `info` says autostart too


class ObjectControlFile(ControlFile):
    __slots__ = ()

    async def words(self) -> list[str]:
        return await folder(self).listed_words()

    async def run(self, word: str, arguments: list[str]) -> None:
        await folder(self).control(word, arguments)

if TYPE_CHECKING:
    from libvirtfs.nodes.backend import Host


DEFAULT_WAIT_SECONDS = 60.0
# A writer waits inside write(), where no signal reaches it: keep that bounded.
MAX_WAIT_SECONDS = 3600.0
WAIT_POLL_SECONDS = 0.1


class ObjectDirectory(Directory):
    """One libvirt object; `key` is None while it is pending (made by mkdir, not defined)."""

    kind: ClassVar[str]
    states: ClassVar[list[str]]  # what `state` can say, and so what `wait` takes
    # Every name `served()` gives: never a scratch file's, even while pending.
    served_names: ClassVar[frozenset[str]] = frozenset({"state", "info", "xml", "autostart",
                                                        "control"})
    # Words `control` takes besides CONTROL_WORDS and `wait`, as its usage says them.
    more_words: ClassVar[list[str]] = []
    # What an existing object serves, name -> how to make it, in listing order.
    served_files: ClassVar[dict[str, Callable[[ObjectDirectory], Node]]] = {
        "state": lambda d: StateFile(d.ctx),
        "info": lambda d: InfoFile(d.ctx),
        "xml": lambda d: DefinitionFile(d.ctx, d),
        "autostart": lambda d: AutostartFile(d.ctx),
        "control": lambda d: ObjectControlFile(d.ctx),
    }
    # Served folders keyed by the object too: one defined anew under this name (a new
    # key) has new snapshots or volumes, so a new node.
    per_object: ClassVar[frozenset[str]] = frozenset({"snapshots", "volumes", "disks"})
    # Whether the served files are made once (no libvirt call decides them); else listed
    # again every cache_timeout, as any folder.
    fixed: ClassVar[bool] = True

    __slots__ = ("_built_key", "_built_xml", "_guard", "_partial", "_scratch",
                 "_xml_created", "host", "key", "lock", "parent_key")

    def __init__(self, ctx: Context, host: Host, key: str | None,
                 parent_key: str | None = None) -> None:
        super().__init__(ctx)
        self.host = host
        self.key = key
        self.parent_key = parent_key
        self._scratch: dict[str, ScratchFile] | None = None  # made by the first one
        self.lock = LazyLock()  # define, control words, rmdir and mv, one at a time
        self._guard: Guard | None = None
        self._xml_created = False  # pending: `xml` appears once a writer creates it
        # The key and pending `xml` the served files were made for, and whether only
        # those looked up by name are made yet.
        self._built_key: object = _UNBUILT
        self._built_xml = False
        self._partial = False

    @property
    def guard(self) -> Guard:
        if self._guard is None:
            self._guard = Guard()
        return self._guard

    @property
    def writable(self) -> bool:
        return not self.ctx.read_only

    @property
    def libvirt_name(self) -> str:
        return from_filename(self.name)

    @property
    def pending(self) -> bool:
        return self.key is None

    @property
    def defining(self) -> bool:
        """A pending folder whose first definition is with libvirt right now."""
        return self.key is None and self.lock.locked()

    def rekey(self, key: Hashable) -> bool:
        """Undefined and defined again under the same name (a new UUID, say by virsh):
        this folder shows the new object, so that nobody who holds it or is about to
        read it finds a half-empty folder."""
        if self.key is None:
            return False
        self.key = key  # type: ignore[assignment]
        self.invalidate_all()
        return True

    async def recheck(self) -> bool:
        if self.key is None or not isinstance(self.parent, CollectionDirectory):
            return False
        key = self.key
        try:
            await self.parent.children(refresh=True)
        except OSError:
            return False
        return self.key != key and self.alive

    # What an existing object serves: state, info, xml, autostart and control, then what
    # its kind adds.  Subclasses say how to read state and info and which words apply.
    async def state(self) -> str:
        raise NotImplementedError

    async def info(self) -> dict[str, Any]:
        raise NotImplementedError

    # `state()` and `info()` when they need no wait (a host's table at hand), else None.
    def state_now(self) -> str | None:
        return None

    def info_now(self) -> dict[str, Any] | None:
        return None

    async def words(self) -> list[str]:
        """The control words that make sense now (reading `control`)."""
        raise NotImplementedError

    async def listed_words(self) -> list[str]:
        """What reading `control` shows: the words valid now, then `wait`, always.  So the
        listing is never one valid word, and a saved `control` copied back (by any program)
        is refused instead of carried out."""
        return [*await self.words(), "wait"]

    async def control(self, word: str, arguments: list[str]) -> None:
        if word == "wait":
            await self.wait(arguments)
            return
        words = CONTROL_WORDS[self.kind]
        if word not in words or arguments:
            raise fs_error(errno.EINVAL, f"unknown control word "
                                         f"{' '.join([word, *arguments])!r}; the words are: "
                                         f"{', '.join([*words, *self.more_words, 'wait'])}")
        await self.carry_out(word)

    async def carry_out(self, word: str) -> None:
        async with self.lock:
            await self.check_word(word)
            await self.host.control(self.kind, self.key, word)  # type: ignore[arg-type]
        self.invalidate_all()

    async def check_word(self, word: str) -> None:
        """Refuse a word the object's state does not allow (under its lock, so that two
        writers cannot both pass the check); libvirt decides unless a kind says here."""

    async def wait(self, arguments: list[str]) -> None:
        """`wait STATE [SECONDS]`: return once `state` says STATE (ETIMEDOUT after SECONDS)."""
        if not 1 <= len(arguments) <= 2 or arguments[0] not in self.states:
            raise fs_error(errno.EINVAL, f"usage: wait STATE [SECONDS], STATE one of "
                                         f"{', '.join(self.states)}")
        target = arguments[0]
        try:
            seconds = float(arguments[1]) if len(arguments) == 2 else DEFAULT_WAIT_SECONDS
        except ValueError:
            seconds = math.nan
        if not 0 <= seconds <= MAX_WAIT_SECONDS:  # also refuses nan and inf
            raise fs_error(errno.EINVAL, f"wait: {arguments[1]!r} is not a number of seconds "
                                         f"from 0 to {MAX_WAIT_SECONDS:g}")
        deadline = trio.current_time() + seconds
        while await self.state() != target:
            if trio.current_time() >= deadline:
                raise fs_error(errno.ETIMEDOUT, f"the {self.kind} did not reach {target} "
                                                f"within {seconds:g} s")
            await trio.sleep(min(WAIT_POLL_SECONDS, max(0.0, deadline - trio.current_time())))

    def rehost(self, host: Host) -> None:
        """The object now lives on `host` (migrated by mv): this folder and its files, and
        their inodes, show it there (the kernel may hand out the files it knows before it
        hears of anything).  What sub-folders held was made for the old host: it goes, and
        is listed afresh."""
        self.host = host
        self.invalidate_all()
        for child in self._by_name.values():
            if isinstance(child, Directory) and hasattr(child, "host"):
                child.host = host
                for name, grandchild in child._by_name.items():
                    grandchild.vanish()
                    self.ctx.entry_changed(child, name, grandchild)
                child._by_key, child._by_name = {}, {}
                child.invalidate()

    def invalidate_all(self) -> None:
        """After a change through the mount: renderings go, and the kernel forgets the
        files' attributes, so that a `stat` right after shows the new size."""
        for node in self.walk_known():
            node.invalidate()
            if node.file_type == stat.S_IFREG:
                self.ctx.changed(node)

    def _served_key(self, name: str) -> Hashable:
        return (name, self.key) if name in self.per_object else name

    def served(self) -> list[Entry]:
        return [Entry(self._served_key(name), name, functools.partial(make, self))
                for name, make in self.served_files.items()]

    async def scan(self) -> list[Entry]:
        self._built_key, self._built_xml = self.key, self._xml_created
        if self.key is None:
            # Empty, so that cp -r, tar and install can create `xml` (they use O_EXCL).
            if not self._xml_created:
                return []
            return [Entry("xml", "xml", functools.partial(DefinitionFile, self.ctx, self))]
        return self.served()

    # -- served files made once, and on demand ------------------------------------------

    def _built(self) -> bool:
        """Whether the served files made so far are for the folder's present shape."""
        return self._built_key == self.key and self._built_xml == self._xml_created

    def fresh(self) -> bool:
        if not self.fixed:
            return super().fresh()
        return self._built() and not self._partial

    async def children(self, *, refresh: bool = False) -> dict[str, Node]:
        if self._partial and self._built():
            self._make_all()
        return await super().children(refresh=refresh)

    def _make(self, name: str) -> Node | None:
        make = self.served_files.get(name)
        if make is None:
            return None
        name = sys.intern(name)  # a lookup's name is a new string each time: keep one
        node = make(self)
        node.parent, node.name = self, name
        self._by_key[self._served_key(name)] = node
        self._by_name[name] = node  # the newest id: the listing stays in id order
        return node

    def _make_all(self) -> None:
        """Make the served files no lookup made yet: the folder is the same to anybody."""
        for name in self.served_files:
            if name not in self._by_name:
                self._make(name)
        self._partial = False

    async def find(self, name: str) -> Node | None:
        """A lookup makes the file it names, not the whole folder."""
        known, node = self._find_fixed(name)
        return node if known else await super().find(name)

    def find_now(self, name: str) -> tuple[bool, Node | None]:
        if type(self).find is not ObjectDirectory.find:
            return False, None
        return self._find_fixed(name)

    def _find_fixed(self, name: str) -> tuple[bool, Node | None]:
        """(True, the file) in a folder of fixed files, which waits for nothing, not even
        the first time (the vfs answers at once); (False, None): it must be listed."""
        if not self.fixed or self.key is None:
            return False, None
        if not self._built():
            if self._ever_scanned:  # its key changed: list again, matching what was made
                return False, None
            self._built_key, self._built_xml = self.key, self._xml_created
            self._partial = self._ever_scanned = True
        node = self._by_name.get(name)
        if node is None and self._partial:
            node = self._make(name)
        if node is None and self._scratch:
            node = self._scratch.get(name)
        return True, node

    def _adopt(self, entries: list[Entry]) -> None:
        if self._partial:
            # What lookups made is no listing: completing it changes no name (no mtime).
            self._ever_scanned = self._partial = False
        super()._adopt(entries)

    def extra_children(self) -> dict[str, Node]:
        if not self._scratch:
            return {}
        return {name: scratch for name, scratch in self._scratch.items()
                if name not in self._by_name}

    def _scratch_files(self) -> dict[str, ScratchFile]:
        if self._scratch is None:
            self._scratch = {}
        return self._scratch

    # -- the definition ----------------------------------------------------------------

    async def definition(self) -> bytes:
        if self.key is None:
            return b""
        return await self.host.definition(self.kind, self.key)

    async def define(self, data: bytes) -> None:
        async with self.lock:  # two writers: each commit whole, the last wins
            key = await self.host.define(self.kind, self.key, self.libvirt_name, data,
                                         parent=self.parent_key)
            if self.key is None:
                self.key = key
                if isinstance(self.parent, CollectionDirectory):
                    self.parent.adopt(self)
            self.invalidate_all()

    # -- scratch files -----------------------------------------------------------------

    def _not_a_scratch_name(self, name: str) -> OSError:
        when = (f"once the {self.kind} is defined (write its xml first)" if self.pending
                else "by libvirtfs")
        return fs_error(errno.EPERM, f"{self.path}/{name} is served {when}; a file of that "
                                     f"name cannot be made here")

    async def _created_xml(self) -> File:
        """A pending folder's `xml`, made by a writer (cp, tar, install, `>`)."""
        self._xml_created = True
        self.invalidate()
        node = (await self.children(refresh=True))["xml"]
        assert isinstance(node, File)
        self.touch()
        return node

    async def create(self, name: str) -> File:
        if name in await self.children():
            raise fs_error(errno.EEXIST, f"{self.path}/{name} exists")
        if name in self.served_names:
            if self.pending and name == "xml":
                return await self._created_xml()
            raise self._not_a_scratch_name(name)
        scratch = ScratchFile(self.ctx)
        scratch.parent, scratch.name = self, name
        self._scratch_files()[name] = scratch
        self.touch()
        return scratch

    async def remove(self, name: str, *, directory: bool) -> None:
        if self._scratch and name in self._scratch:
            self._scratch.pop(name).data = b""  # its memory is given back (Context.hold)
            self.touch()
            return
        node = (await self.children()).get(name)
        if node is None:
            raise fs_error(errno.ENOENT, f"{self.path}/{name} does not exist")
        if self.pending and name == "xml":
            # Made by a writer whose document was refused: it holds nothing, and removing
            # it lets rm -rf and find -delete remove the pending folder, as any tool may.
            self._xml_created = False
            self.invalidate()
            self.touch()
            return
        self.guard.arm()  # a recursive delete: its rmdir of this folder is refused too
        raise fs_error(errno.EPERM, f"{node.path} is served by libvirtfs and cannot be "
                                    f"removed; rmdir {self.path} removes the {self.kind}")

    async def rename(self, name: str, target: Directory, new_name: str, *,
                     replace: bool = True) -> None:
        source = self._scratch.get(name) if self._scratch else None
        if source is None:
            node = (await self.children()).get(name)
            if node is None:
                raise fs_error(errno.ENOENT, f"{self.path}/{name} does not exist")
            raise fs_error(errno.EPERM, f"{node.path} is served by libvirtfs and cannot be "
                                        f"renamed")
        existing = (await target.children()).get(new_name)
        if existing is not None and not replace:
            raise fs_error(errno.EEXIST, f"{target.path}/{new_name} exists")
        if (existing is None and isinstance(target, ObjectDirectory)
                and new_name in target.served_names):
            if not (target.pending and new_name == "xml"):
                raise target._not_a_scratch_name(new_name)
            # rsync and Ansible write `.xml.XXXXXX`, then rename it onto `xml`: a commit.
            existing = await target._created_xml()
            try:
                await existing.commit(source.data)
            except OSError:
                if target.pending:
                    target._xml_created = False
                    target.invalidate()
                raise
            self._scratch_files().pop(name, None)
            source.replaced = existing
            self.touch()
            return
        if existing is not None and not isinstance(existing, ScratchFile):
            if not isinstance(existing, File) or not existing.writable:
                raise fs_error(errno.EPERM, f"{existing.path} cannot be replaced")
            # The atomic replace of sed -i, editors and Ansible: commit, then drop.
            await existing.commit(source.data)
            self._scratch_files().pop(name, None)
            source.replaced = existing
            self.touch()
            return
        if not isinstance(target, ObjectDirectory):
            raise fs_error(errno.EPERM, f"files cannot be moved to {target.path}")
        self._scratch_files().pop(name, None)
        target._scratch_files()[new_name] = source
        source.parent, source.name = target, new_name
        self.touch()
        target.touch()


class CollectionDirectory(Directory):
    """A folder of objects of one kind; `make(key)` builds an object's folder.

    Pending folders (made by mkdir) are kept apart from the listing, and nothing done per
    lookup, mkdir or scan walks all of them: thousands of them cost each mkdir no more
    than the first (the merged listing readdir shows is made once per change)."""

    kind: ClassVar[str]
    remembers_missing = True  # every miss would cost a libvirt listing

    def __init__(self, ctx: Context, host: Host, parent_key: str | None = None) -> None:
        super().__init__(ctx)
        self.host = host
        self.parent_key = parent_key
        self._pending: dict[str, ObjectDirectory] = {}
        self._pending_changes = 0  # counts changes of _pending, for _shown
        # The merged listing, and the listing and pending version it was made of.
        self._shown: tuple[dict[str, Node], int, int, dict[str, Node]] | None = None
        self._listed_version: int | None = None  # the host's listing_version at the scan

    def fresh(self) -> bool:
        """While libvirt's events keep the host's listing true, the listing is fresh until
        it changes (no listing again every `cache_timeout` in a long pass, and a missing
        name costs nothing); otherwise for `cache_timeout`."""
        version = self.host.listing_version(self.kind)
        if version is None:
            return super().fresh()
        return self._scanned_at is not None and self._listed_version == version

    def _pending_changed(self) -> None:
        self._pending_changes += 1

    def _visible(self) -> dict[str, Node]:
        if not self._pending:
            return self._by_name
        shown = self._shown
        if (shown is not None and shown[0] is self._by_name
                and shown[1] == len(self._by_name) and shown[2] == self._pending_changes):
            return shown[3]
        merged = super()._visible()
        self._shown = (self._by_name, len(self._by_name), self._pending_changes, merged)
        return merged

    def _told(self) -> dict[str, Node]:
        # A scan changes no pending folder: only the listed names can change.
        return self._by_name

    async def find(self, name: str) -> Node | None:
        await self.listed()
        return self._by_name.get(name) or self._pending.get(name)

    def find_now(self, name: str) -> tuple[bool, Node | None]:
        cls = type(self)
        if (cls.find is not CollectionDirectory.find or cls.listed is not Directory.listed
                or not self.fresh()):
            return False, None
        return True, self._by_name.get(name) or self._pending.get(name)

    def invalidate(self) -> None:
        super().invalidate()
        self.host.stale(self.kind)  # what the host keeps is asked again too

    async def _rescan(self) -> None:
        if self.fresh():  # listed again although fresh (refresh): libvirt's listing of now,
            self.host.stale(self.kind)  # not the host's table (an event may be on its way)
        await super()._rescan()

    @property
    def writable(self) -> bool:
        return not self.ctx.read_only

    async def listing(self) -> list[tuple[str, str]]:
        """(key, libvirt name) of every object (subclasses)."""
        raise NotImplementedError

    def make(self, key: str | None) -> ObjectDirectory:
        raise NotImplementedError

    async def scan(self) -> list[Entry]:
        self._listed_version = self.host.listing_version(self.kind)
        listing = await self.listing()
        # A folder made here whose definition libvirt has taken but not yet answered for
        # is that object: it keeps its node, and no second one appears meanwhile.
        return [Entry(key, name, lambda key=key: self.make(key))
                for key, name in listing
                if key in self._by_key or not self._defining(to_filename(name, self.reserved))]

    def _defining(self, name: str) -> bool:
        pending = self._pending.get(name)
        return pending is not None and pending.defining

    def extra_children(self) -> dict[str, Node]:
        return {name: node for name, node in self._pending.items() if name not in self._by_name}

    def take(self, key: str, node: ObjectDirectory) -> None:
        """An object folder that moved here from another host's collection (migrated by
        mv): listed here at once, under the node (and inode) it had.  A node a listing
        here made for it meanwhile (libvirt's events) is dropped."""
        made = self._by_key.get(key)
        if made is not None and made is not node:
            self._by_name.pop(made.name, None)
            made.vanish()
        self._by_key[key] = node
        self._by_name = dict(sorted({**self._by_name, node.name: node}.items(),
                                    key=lambda item: item[1].id))
        self.invalidate()
        self.touch()
        self.ctx.changed(self)

    def adopt(self, node: ObjectDirectory) -> None:
        """A pending folder's object now exists: it keeps its node (and inode)."""
        self._pending.pop(node.name, None)
        self._pending_changed()
        self._by_key[node.key] = node
        self._by_name = dict(sorted({**self._by_name, node.name: node}.items(),
                                    key=lambda item: item[1].id))  # listed where it was
        self.invalidate()

    async def mkdir(self, name: str) -> Directory:
        name_for_new_object(name, self.reserved)
        await self.listed(refresh=True)
        if name in self._by_name or name in self._pending:
            raise fs_error(errno.EEXIST, f"{self.path}/{name} exists")
        node = self.make(None)
        node.parent, node.name = self, name
        self._pending[name] = node
        self._pending_changed()
        self.touch()
        return node

    async def _object(self, name: str) -> ObjectDirectory:
        node = await self.lookup(name)
        assert isinstance(node, ObjectDirectory)
        return node

    def removal_words(self) -> list[str]:
        """How rmdir removes (user.undefine-flags on domains/)."""
        return []

    async def remove(self, name: str, *, directory: bool) -> None:
        pending = self._pending.get(name)
        if pending is not None:
            # Only this mount's pending folder goes, even if someone else has defined an
            # object of that name meanwhile.
            if pending.lock.locked():
                raise fs_error(errno.EBUSY, f"{pending.path}: its xml is being defined now")
            del self._pending[name]
            self._pending_changed()
            self.invalidate()  # an object of that name defined elsewhere shows at once
            self.touch()
            return
        node = await self._object(name)
        what = f"{self.kind} {node.libvirt_name!r}"
        node.guard.check_rmdir(node.path, what)
        async with node.lock:
            await self.host.remove(self.kind, node.key,  # type: ignore[arg-type]
                                   self.removal_words())
        self.invalidate()
        self.touch()

    async def rename(self, name: str, target: Directory, new_name: str, *,
                     replace: bool = True) -> None:
        node = await self._object(name)
        if target is not self:
            raise fs_error(errno.EPERM, f"{node.path} can only be renamed within {self.path}")
        if new_name in await self.children(refresh=True):
            raise fs_error(errno.EEXIST, f"{self.path}/{new_name} exists; libvirtfs never "
                                         f"replaces an object by renaming another")
        if node.key is None:
            if node.lock.locked():  # its define names the object by the folder's name
                raise fs_error(errno.EBUSY, f"{node.path}: its xml is being defined now")
            self._pending.pop(name, None)
            node.name = new_name
            self._pending[new_name] = node
            self._pending_changed()
        else:
            async with node.lock:
                await self.host.rename(self.kind, node.key,
                                       name_for_new_object(new_name, self.reserved))
            # The folder has its new name at once, and nothing rendered under the old one
            # (an `xml` naming the old name) is shown again.
            self._by_name.pop(name, None)
            node.name = new_name
            self._by_name = dict(sorted({**self._by_name, new_name: node}.items(),
                                        key=lambda item: item[1].id))
            node.invalidate_all()
            self.invalidate()
        self.touch()
