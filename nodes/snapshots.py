"""domains/<name>/snapshots/: one folder per snapshot, `current`, and the settings of mkdir.

`mkdir snapshots/NAME` takes a snapshot, with the flags, description and template held
as extended attributes of `snapshots/` (`user.flags`, `user.description`, `user.template`);
`rmdir` deletes one, as `user.delete-flags` says.  These settings live in memory, in this
node, for as long as the mount shows the domain, except `user.flags`, which the next
snapshot taken uses up (`halt` must not stay armed for every later mkdir by anyone).  With
`redefine` among the flags, or when cp, tar or rsync makes the folder (restoring a saved
one), mkdir makes a pending folder instead, whose `xml` takes a saved document (see
docs/snapshots.md); `redefine` flags stay until changed.

A snapshot folder's mtime is the snapshot's creation time, so `ls -lt` sorts by age.  The
`current` and `parent` links are nodes that keep their identity and change their target,
so a `readlink` right after a change already sees the new target.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from libvirtfs.nodes.backend import SnapshotSummary
from libvirtfs.nodes.base import Context, Directory, Entry, Node, QueryFile, Symlink, fs_error
from libvirtfs.nodes.guard import FILE_COPIERS, Guard, caller
from libvirtfs.nodes.names import name_for_new_object, to_filename
from libvirtfs.nodes.objects import ObjectDirectory
from libvirtfs.nodes.render import key_values, word
from libvirtfs.nodes.words import (
    SNAPSHOT_CREATE_FLAGS,
    SNAPSHOT_DELETE_FLAGS,
    SNAPSHOT_REDEFINE_FLAGS,
    SNAPSHOT_REVERT_MODIFIERS,
    SNAPSHOT_REVERT_WORDS,
    parse_words,
)
from libvirtfs.nodes.writable import ControlFile, DefinitionFile

if TYPE_CHECKING:
    from libvirtfs.nodes.backend import Host

CURRENT = "current"
FLAGS = "user.flags"
DESCRIPTION = "user.description"
TEMPLATE = "user.template"
DELETE = "user.delete-flags"
SETTINGS = (FLAGS, DESCRIPTION, TEMPLATE, DELETE)


def _is_xml_text(text: str) -> bool:
    """Whether XML 1.0 can hold `text` as character data (its Char production)."""
    return all(char in "\t\n\r" or " " <= char <= "\ud7ff" or "\ue000" <= char <= "\ufffd"
               or char >= "\U00010000" for char in text)


class SnapshotsDirectory(Directory):
    reserved = frozenset({CURRENT})

    def __init__(self, ctx: Context, host: Host, domain_uuid: str) -> None:
        super().__init__(ctx)
        self.host = host
        self.domain_uuid = domain_uuid
        self.settings: dict[str, bytes] = {}
        self._summaries: dict[str, SnapshotSummary] = {}
        self._current: str | None = None
        self._current_link: Symlink | None = None
        self._pending: dict[str, SnapshotDirectory] = {}

    @property
    def writable(self) -> bool:
        return not self.ctx.read_only

    # -- listing -----------------------------------------------------------------------

    async def scan(self) -> list[Entry]:
        listing = await self.host.snapshot_listing(self.domain_uuid)
        self._summaries = {summary.name: summary for summary in listing.snapshots}
        self._current = listing.current
        return [Entry(("snapshot", name), name,
                      lambda name=name: SnapshotDirectory(self.ctx, self, name))
                for name in self._summaries]

    def _adopt(self, entries: list[Entry]) -> None:
        super()._adopt(entries)
        for node in self._by_name.values():
            if isinstance(node, SnapshotDirectory):
                node.update(self._summaries.get(node.snapshot))
        if self._current is None:
            self._current_link = None
            return
        target = to_filename(self._current, self.reserved)
        if self._current_link is None:
            self._current_link = Symlink(self.ctx, target)
            self._current_link.parent, self._current_link.name = self, CURRENT
        elif self._current_link.target != target:
            self._current_link.target = target
            self._current_link.touch()

    def extra_children(self) -> dict[str, Node]:
        extra: dict[str, Node] = {name: node for name, node in self._pending.items()
                                  if name not in self._by_name}
        if self._current_link is not None:
            extra[CURRENT] = self._current_link
        return extra

    def summary(self, name: str) -> SnapshotSummary | None:
        return self._summaries.get(name)

    async def refresh_after_change(self, *, domain: bool) -> None:
        """Something we did changed snapshots (and the domain, if `domain`): forget what
        was rendered, and list again now, so links and mtimes are right at once."""
        top: Node = self.parent if domain and self.parent is not None else self
        for node in top.walk_known():
            node.invalidate()
        await self.children(refresh=True)

    # -- settings (extended attributes) ------------------------------------------------

    def words(self, name: str) -> list[str]:
        table = SNAPSHOT_CREATE_FLAGS if name == FLAGS else SNAPSHOT_DELETE_FLAGS
        return parse_words(self.settings.get(name, b""), table, "flag")

    def description(self) -> str | None:
        value = self.settings.get(DESCRIPTION)
        return value.decode() if value is not None else None

    async def xattrs(self) -> dict[str, bytes]:
        return {**self.settings, **await super().xattrs()}

    async def set_xattr(self, name: str, value: bytes) -> None:
        if name not in SETTINGS:
            await super().set_xattr(name, value)
            return
        if name == FLAGS:
            words = parse_words(value, SNAPSHOT_CREATE_FLAGS, "flag")
            if "redefine" in words and not set(words) <= SNAPSHOT_REDEFINE_FLAGS:
                others = ", ".join(sorted(SNAPSHOT_REDEFINE_FLAGS - {"redefine"}))
                raise fs_error(errno.EINVAL, "redefine makes mkdir wait for a saved document "
                                             "instead of taking a snapshot; it goes only with "
                                             f"{others}")
            value = ",".join(words).encode()
        elif name == DELETE:
            value = ",".join(parse_words(value, SNAPSHOT_DELETE_FLAGS, "delete flag")).encode()
        elif name == DESCRIPTION:
            try:
                text = value.decode()
            except UnicodeDecodeError:
                raise fs_error(errno.EINVAL, "the description must be UTF-8 text") from None
            if not _is_xml_text(text):
                raise fs_error(errno.EINVAL, "the description goes into the snapshot's XML, "
                                             "which cannot hold NUL or control characters "
                                             "other than tab and newline")
        elif value.strip():
            self.host.check_snapshot_template(value)
        if value.strip():
            self.settings[name] = value
        else:
            self.settings.pop(name, None)  # an empty value is the default, as removing is

    async def remove_xattr(self, name: str) -> None:
        if self.settings.pop(name, None) is None:
            await super().remove_xattr(name)

    # -- mkdir, rmdir, mv --------------------------------------------------------------

    async def mkdir(self, name: str) -> Directory:
        snapshot = name_for_new_object(name, self.reserved)
        if name in self._pending:
            raise fs_error(errno.EEXIST, f"{self.path}/{name} exists (waiting for its xml)")
        flags = self.words(FLAGS)
        flags_set = self.settings.get(FLAGS)
        description = self.description()
        template = self.settings.get(TEMPLATE)
        # A folder that cp, tar or rsync makes here is a saved snapshot being copied back:
        # it waits for its xml, whatever the flags say.
        restoring = caller().command in FILE_COPIERS
        if ("redefine" in flags and template is None) or restoring:
            if name in await self.children(refresh=True):
                raise fs_error(errno.EEXIST, f"{self.path}/{name} exists")
            node = SnapshotDirectory(self.ctx, self, snapshot, pending=True)
            node.parent, node.name = self, name
            self._pending[name] = node
            self.touch()
            self.last_error = ""
            return node
        if "redefine" in flags:
            document = self.host.snapshot_document(snapshot, description, template)
            await self.host.redefine_snapshot(self.domain_uuid, snapshot, document, flags)
        else:
            await self.host.create_snapshot(self.domain_uuid, snapshot, flags, description,
                                            template)
            if self.settings.get(FLAGS) is flags_set:  # not set anew meanwhile
                self.settings.pop(FLAGS, None)  # used up: one snapshot's flags
        self.last_error = ""
        await self.refresh_after_change(domain=True)
        made = self._by_name.get(name)
        if isinstance(made, SnapshotDirectory):
            return made
        # no-metadata: the snapshot was taken, but libvirt keeps no record of it, so it
        # has no folder; mkdir still gets a folder, which vanishes at the next lookup.
        gone = SnapshotDirectory(self.ctx, self, snapshot, metadata=False)
        gone.parent, gone.name = self, name
        return gone

    @property
    def guard(self) -> Guard:
        """The domain folder's: a refused removal in here is one inside the domain."""
        owner = self.parent
        return owner.guard if isinstance(owner, ObjectDirectory) else Guard()

    async def remove(self, name: str, *, directory: bool) -> None:
        pending = self._pending.get(name)
        if pending is not None:
            if pending.lock.locked():
                raise fs_error(errno.EBUSY, f"{pending.path}: its xml is being defined now")
            del self._pending[name]
            self.touch()
            return
        node = await self.lookup(name)
        if not isinstance(node, SnapshotDirectory):
            self.guard.arm()
            raise fs_error(errno.EPERM, f"{node.path} is a link libvirtfs keeps; it goes "
                                        f"when there is no current snapshot")
        node.guard.check_rmdir(node.path, f"snapshot {node.snapshot!r}")
        async with node.lock:
            await self.host.delete_snapshot(self.domain_uuid, node.snapshot,
                                            self.words(DELETE))
        self.last_error = ""
        await self.refresh_after_change(domain=False)

    async def rename(self, name: str, target: Directory, new_name: str, *,
                     replace: bool = True) -> None:
        raise fs_error(errno.EPERM, "libvirt cannot rename a snapshot")

    def adopt(self, node: SnapshotDirectory) -> None:
        """A pending folder was redefined: it keeps its node (and inode)."""
        self._pending.pop(node.name, None)
        self._by_key[("snapshot", node.snapshot)] = node


class SnapshotDirectory(ObjectDirectory):
    """snapshots/<name>/.  `pending`: made by mkdir with `redefine`, waiting for its xml.
    Without `metadata` (made by mkdir with `no-metadata`) it has nothing to show.  As in
    any object's folder, tools may make scratch files here (sed -i, editors)."""

    kind = "snapshot"
    served_names = frozenset({"xml", "state", "info", "control", "parent"})
    fixed = False  # what it serves depends on the listing of snapshots/

    def __init__(self, ctx: Context, snapshots: SnapshotsDirectory, name: str, *,
                 pending: bool = False, metadata: bool = True) -> None:
        super().__init__(ctx, snapshots.host, None if pending else name,
                         parent_key=snapshots.domain_uuid)
        self.snapshots = snapshots
        self.domain_uuid = snapshots.domain_uuid
        self.snapshot = name
        self.metadata = metadata
        self._parent_link: Symlink | None = None

    def touch(self) -> None:
        if self.pending:  # an existing snapshot's folder keeps its creation time
            super().touch()

    def update(self, summary: SnapshotSummary | None) -> None:
        """The listing of snapshots/ says this about us (None: we are gone)."""
        if summary is None:
            return
        if summary.created:
            self.mtime = self.ctime = float(summary.created)
        if summary.parent is None:
            self._parent_link = None
            return
        target = "../" + to_filename(summary.parent, SnapshotsDirectory.reserved)
        if self._parent_link is None:
            self._parent_link = Symlink(self.ctx, target)
            self._parent_link.parent, self._parent_link.name = self, "parent"
        elif self._parent_link.target != target:
            self._parent_link.target = target
            self._parent_link.touch()

    async def scan(self) -> list[Entry]:
        if not self.metadata:
            raise fs_error(errno.ENOENT, f"snapshot {self.snapshot!r} was taken with "
                                         f"no-metadata: libvirt keeps no record of it")
        ctx = self.ctx
        xml = Entry("xml", "xml", lambda: DefinitionFile(ctx, self))
        if self.pending:
            return [xml] if self._xml_created else []
        await self.snapshots.children()  # our parent link and mtime come from the listing
        if self.snapshots.summary(self.snapshot) is None:
            raise fs_error(errno.ENOENT, f"snapshot {self.snapshot!r} does not exist")
        host, uuid, snap = self.host, self.domain_uuid, self.snapshot

        async def info() -> bytes:
            return key_values(await host.snapshot_info(uuid, snap))

        async def state() -> bytes:
            return word((await host.snapshot_info(uuid, snap))["state"])

        async def words() -> list[str]:
            # Only what libvirt will take: none for an external snapshot on a libvirt
            # that cannot revert to one.
            if not await host.snapshot_revertible(uuid, snap):
                return []
            return list(SNAPSHOT_REVERT_WORDS)

        return [
            xml,
            Entry("state", "state", lambda: QueryFile(ctx, state)),
            Entry("info", "info", lambda: QueryFile(ctx, info)),
            Entry("control", "control", lambda: ControlFile(ctx, words, self.control)),
        ]

    def extra_children(self) -> dict[str, Node]:
        extra = super().extra_children()
        if self._parent_link is not None:
            extra["parent"] = self._parent_link
        return extra

    # -- xml: what DefinitionFile shows and commits --------------------------------------

    async def definition(self) -> bytes:
        if self.pending:
            return b""
        return (await self.host.snapshot_xml(self.domain_uuid, self.snapshot)).encode()

    async def define(self, data: bytes) -> None:
        """A whole `<domainsnapshot>` document written to `xml` redefines the snapshot's
        metadata (VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE)."""
        async with self.lock:
            await self.host.redefine_snapshot(self.domain_uuid, self.snapshot, data,
                                              self.snapshots.words(FLAGS))
            if self.pending:
                self.key = self.snapshot
                self.snapshots.adopt(self)
                self.ctx.changed(self)  # its mtime becomes the snapshot's creation time
            self.invalidate()
            await self.snapshots.refresh_after_change(domain=False)

    async def control(self, command: str, arguments: list[str]) -> None:
        unknown = [a for a in arguments if a not in SNAPSHOT_REVERT_MODIFIERS]
        if command not in SNAPSHOT_REVERT_WORDS or unknown:
            raise fs_error(errno.EINVAL, f"unknown control word "
                                         f"{' '.join([command, *arguments])!r}; the words are "
                                         f"{', '.join(SNAPSHOT_REVERT_WORDS)}, optionally "
                                         f"followed by {', '.join(SNAPSHOT_REVERT_MODIFIERS)}")
        async with self.lock:
            await self.host.revert_snapshot(self.domain_uuid, self.snapshot, command,
                                            arguments)
        await self.snapshots.refresh_after_change(domain=True)
