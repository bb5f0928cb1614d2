"""The root of the tree, hosts/ and hosts/<host>/.

hosts/ changes while mounted: `mkdir hosts/NAME` makes a pending host folder holding only
a writable `uri`; a URI written there connects it, and the same folder then shows the
host's tree.  `rmdir hosts/NAME` disconnects it (libvirt is never asked to change
anything).  What connecting and disconnecting take (a libvirt connection, event
registrations, background tasks) is the mount's business: `HostLifecycle`.  Hosts given
at startup go through the very same `attach`.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import trio

from libvirtfs.nodes.base import (
    Context,
    Directory,
    File,
    Node,
    QueryFile,
    StaticDirectory,
    fs_error,
)
from libvirtfs.nodes.domains import DomainsDirectory
from libvirtfs.nodes.guard import Guard
from libvirtfs.nodes.networks import NetworksDirectory
from libvirtfs.nodes.render import key_values, word
from libvirtfs.nodes.storage import PoolsDirectory
from libvirtfs.nodes.stream import EventStream, StreamFile
from libvirtfs.nodes.writable import WordFile

if TYPE_CHECKING:
    from libvirtfs.nodes.backend import Change, Host

log = logging.getLogger(__name__)

# Which collection of a host each kind of event is about.
_COLLECTION = {"domain": "domains", "snapshot": "domains", "pool": "pools", "volume": "pools",
               "network": "networks"}

READ_ONLY_HOST = "this host is mounted read-only (read_only = true in the config file)"
MAX_URI_BYTES = 4096
MAX_NAME_BYTES = 255  # NAME_MAX, as statfs says


class HostLifecycle(Protocol):
    """What the mount does when a host folder connects or goes."""

    async def connect(self, name: str, uri: str) -> tuple[Host, bool]:
        """A connected host for `uri` and whether it is read-only; OSError (libvirt's
        message) if it cannot be connected within the timeout."""
        ...

    async def attach(self, directory: HostDirectory) -> None:
        """Keep `directory` (whose `host` is connected) true: events, reconnecting."""
        ...

    async def detach(self, directory: HostDirectory) -> None:
        """Undo `attach` and close the host's connection."""
        ...


class LiveFile(File):
    """A file rendered at every read, never kept: `status` must be true whenever read,
    and is cheap (no libvirt call)."""

    def __init__(self, ctx: Context, render: Callable[[], str]) -> None:
        super().__init__(ctx)
        self._render = render

    async def content(self) -> bytes:
        return self._render().encode()


class UriFile(WordFile):
    """`uri`: the URI libvirt reports; while the folder is pending, writable once: the
    write connects the host and returns when it is connected (or with libvirt's error)."""

    owner_only = True  # a URI is connected with the owner's credentials

    max_size = MAX_URI_BYTES

    def __init__(self, ctx: Context, directory: HostDirectory) -> None:
        async def render() -> bytes:
            host = directory.host
            return b"" if host is None else word(await host.uri())
        super().__init__(ctx, render)
        self.directory = directory

    @property
    def writable(self) -> bool:
        return self.directory.pending and not self.ctx.read_only

    async def execute(self, data: bytes) -> None:
        # Each write() is one URI: a megabyte of it, or a NUL, must not reach libvirt.
        self.check_size(len(data))
        try:
            words = data.decode().split()
        except UnicodeDecodeError:
            raise fs_error(errno.EINVAL, "a URI is text") from None
        if any(not ch.isprintable() for word in words for ch in word):
            raise fs_error(errno.EINVAL, "a URI has no control characters (NUL, escape, ...)")
        if len(words) != 1:
            raise fs_error(errno.EINVAL, f"write one libvirt URI to {self.path} "
                                         f"(echo qemu+ssh://HOST/system > uri)")
        await self.directory.connect(words[0])
        self.last_error = ""
        self.invalidate()

    async def commit(self, data: bytes) -> None:
        await self.execute(data)


class HostDirectory(StaticDirectory):
    """One host; `host` is None while the folder is pending (made by mkdir, no URI yet)."""

    owner_only = True  # a URI is connected with the owner's credentials

    def __init__(self, ctx: Context, host: Host | None,
                 lifecycle: HostLifecycle | None = None) -> None:
        super().__init__(ctx)
        self.host = host
        self.lifecycle = lifecycle
        self.guard = Guard()  # rm -rf hosts/NAME must not disconnect it (guard.py)
        self.uri_file = UriFile(ctx, self)
        self._connecting = trio.Lock()
        self.removed = False  # rmdir took it out of hosts/: a late `uri` write connects nothing
        self._to_list: dict[Directory, None] = {}
        self._listing_wanted = trio.Event()
        # What happens on the host, as lines (drivers/events.py publishes them).
        self.events = EventStream(lambda: self.name)
        self._events_file = StreamFile(ctx, self.events)
        self._events_file.parent, self._events_file.name = self, "events"

    @property
    def pending(self) -> bool:
        return self.host is None

    @property
    def connecting(self) -> bool:
        return self._connecting.locked()

    @property
    def writable(self) -> bool:
        return self.pending and not self.ctx.read_only

    async def children(self, *, refresh: bool = False) -> dict[str, Node]:
        if self.host is None:
            if not self._by_name:
                self.uri_file.parent, self.uri_file.name = self, "uri"
                self._by_name = {"uri": self.uri_file}
            return self._by_name
        return await super().children(refresh=refresh)

    def build(self) -> dict[str, Node]:
        host, ctx = self.host, self.ctx
        assert host is not None

        async def info() -> bytes:
            return key_values(await host.info())

        return {
            "uri": self.uri_file,
            "status": LiveFile(ctx, lambda: f"{host.status()}\n"),
            "info": QueryFile(ctx, info),
            "capabilities.xml": QueryFile(ctx, host.capabilities),
            "domains": DomainsDirectory(ctx, host),
            "pools": PoolsDirectory(ctx, host),
            "networks": NetworksDirectory(ctx, host),
        }

    async def attach_host(self, host: Host, read_only: bool = False) -> None:
        """Show `host` here from now on (startup and `uri` both come here)."""
        pending_ctx = self.ctx
        if read_only:
            self.ctx = self.uri_file.ctx = self.ctx.read_only_part(READ_ONLY_HOST)
        self.host = host
        self._built, self._by_name = False, {}
        if self.lifecycle is not None:
            try:
                await self.lifecycle.attach(self)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.lifecycle.detach(self)
                self.host, self.ctx, self.uri_file.ctx = None, pending_ctx, pending_ctx
                self._by_name = {}
                raise
        self.touch()
        self.ctx.changed(self)
        await self.list_collections()

    async def list_collections(self) -> None:
        """List the domains, pools and networks once as the host is attached: the first
        `ls` or `cat */state` is then answered from listings that events keep true from
        here on, instead of waiting for the host's first batched calls."""
        if self.ctx.cache_timeout <= 0:  # nothing is kept: every read asks libvirt anyway
            return
        for node in (await self.children()).values():
            if isinstance(node, (DomainsDirectory, PoolsDirectory, NetworksDirectory)):
                try:
                    await node.children()
                except OSError as e:  # the first reader gets the error, with its reason
                    log.debug("listing %s as the host is attached: %s", node.path, e)

    async def connect(self, uri: str) -> None:
        """A pending folder's `uri` was written.  On failure it stays pending (and empty
        but for `uri`), as a folder whose file could not be written stays a folder."""
        if self.lifecycle is None:
            raise fs_error(errno.EPERM, f"{self.path}: hosts cannot be connected here")
        if self._connecting.locked():
            raise fs_error(errno.EBUSY, f"{self.path} is being connected now")
        async with self._connecting:
            if self.removed:  # `uri` was opened before the rmdir: no host behind a folder gone
                raise fs_error(errno.ENOENT, f"{self.path} was removed")
            if self.host is not None:
                raise fs_error(errno.EISCONN, f"{self.path} is connected already; rmdir it "
                                              f"and mkdir it again to connect elsewhere")
            # rmdir of this folder is EBUSY meanwhile, so nothing can orphan the host.
            host, read_only = await self.lifecycle.connect(self.name, uri)
            await self.attach_host(host, read_only)

    async def remove(self, name: str, *, directory: bool) -> None:
        self.guard.arm()  # a recursive delete: its rmdir of this folder is refused too
        raise fs_error(errno.EPERM, f"{self.path}/{name} is served by libvirtfs and cannot be "
                                    f"removed; rmdir {self.path} disconnects the host")

    async def find(self, name: str) -> Node | None:
        """`events` is found by name but not listed: it never ends, and whatever reads a
        whole folder (cp -r, tar, rsync, grep -r) would wait on it for ever."""
        if name == "events" and not self.pending:
            return self._events_file
        return await super().find(name)

    def children_now(self) -> dict[str, Node] | None:
        return self._by_name if self.host is not None and self._built else None

    def find_now(self, name: str) -> tuple[bool, Node | None]:
        if name == "events" and not self.pending:
            return True, self._events_file
        children = self.children_now()
        return (False, None) if children is None else (True, children.get(name))

    def apply(self, change: Change) -> list[Node]:
        """Drop cached renderings that an event made stale, tell the kernel, and have the
        collections it touches listed again soon (`keep_listed`); returns the nodes
        touched.  Listing again, not only forgetting, is what finds names that went or
        appeared, so that the kernel forgets them before anyone looks."""
        if change.kind == "host":
            touched = self.walk_known()
            collections = [node for node in self._by_name.values()
                           if isinstance(node, Directory)]
        else:
            collection = self._by_name.get(_COLLECTION.get(change.kind, ""))
            if not isinstance(collection, Directory):
                return []
            touched = [collection]
            collections = [collection] if change.listing else []
            changed = collection.known(change.uuid)
            if changed is not None:
                touched.extend(changed.walk_known())
                if change.kind == "pool":  # a refresh (or a start) changes its volumes/
                    collections.extend(node for node in changed.walk_known()
                                       if isinstance(node, Directory) and node.parent is changed)
        for node in touched:
            node.invalidate()
            self.ctx.changed(node)
        for collection in collections:
            self._to_list[collection] = None
        if collections:
            self._listing_wanted.set()
        return touched

    async def keep_listed(self) -> None:
        """List the collections events touched, each once however many events came."""
        while True:
            await self._listing_wanted.wait()
            self._listing_wanted = trio.Event()
            wanted, self._to_list = list(self._to_list), {}
            for collection in wanted:
                if not collection.alive:
                    continue
                try:
                    await collection.children(refresh=True)
                except OSError as e:
                    log.debug("listing %s after an event: %s", collection.path, e)
                except Exception:  # a bug here must not end the mount's event handling
                    log.exception("listing %s after an event", collection.path)



class HostsDirectory(Directory):
    """hosts/: one folder per host, named as the command line or config file says, or as
    `mkdir` made it."""

    owner_only = True  # a URI is connected with the owner's credentials

    def __init__(self, ctx: Context, lifecycle: HostLifecycle | None = None) -> None:
        super().__init__(ctx)
        self.lifecycle = lifecycle

    @property
    def writable(self) -> bool:
        return self.lifecycle is not None and not self.ctx.read_only

    async def children(self, *, refresh: bool = False) -> dict[str, Node]:
        return self._by_name

    def children_now(self) -> dict[str, Node] | None:
        return self._by_name

    def host_directories(self) -> dict[str, HostDirectory]:
        return {name: node for name, node in self._by_name.items()
                if isinstance(node, HostDirectory)}

    def _put(self, name: str, node: Node) -> None:
        node.parent, node.name = self, name
        self._by_name = dict(sorted({**self._by_name, name: node}.items(),
                                    key=lambda item: item[1].id))
        self.touch()

    async def add(self, name: str, host: Host, read_only: bool = False) -> HostDirectory:
        """A connected host, shown as hosts/NAME."""
        if name in self._by_name:
            raise fs_error(errno.EEXIST, f"{self.path}/{name} exists")
        directory = HostDirectory(self.ctx, None, self.lifecycle)
        directory.parent, directory.name = self, name
        await directory.attach_host(host, read_only)
        self._put(name, directory)
        return directory

    async def mkdir(self, name: str) -> Directory:
        if self.lifecycle is None:
            return await super().mkdir(name)
        if name in self._by_name:
            raise fs_error(errno.EEXIST, f"{self.path}/{name} exists")
        if len(os.fsencode(name)) > MAX_NAME_BYTES:  # FUSE allows 1024; tools do not
            raise fs_error(errno.ENAMETOOLONG, f"a host name has at most {MAX_NAME_BYTES} bytes")
        directory = HostDirectory(self.ctx, None, self.lifecycle)
        self._put(name, directory)
        return directory

    def _host(self, name: str) -> HostDirectory:
        node = self._by_name.get(name)
        if not isinstance(node, HostDirectory):
            raise fs_error(errno.ENOENT, f"{self.path}/{name} does not exist")
        return node

    async def remove(self, name: str, *, directory: bool) -> None:
        node = self._host(name)
        if node.connecting:
            raise fs_error(errno.EBUSY, f"{node.path} is being connected now")
        if not node.pending:
            node.guard.check_rmdir(node.path, "a connected host")
        await self.disconnect(node)

    async def disconnect(self, node: HostDirectory) -> None:
        """Take a host's folder out of hosts/: rmdir's work once its checks passed, and a
        reload's for a host gone from the config file (mount/reload.py).  Only the
        connection goes; libvirt is asked nothing."""
        name = node.name
        if node.connecting:
            raise fs_error(errno.EBUSY, f"{node.path} is being connected now")
        if not node.pending:
            assert node.host is not None
            busy = node.host.busy_with()
            if busy:
                # Its connection is what a job's abort (echo abort, a killed writer, a
                # stall) goes through: the job would run on unseen and unabortable.
                raise fs_error(errno.EBUSY, f"{node.path}: a job runs with this host "
                                            f"({'; '.join(busy)[:200]}); wait for it, or "
                                            f"echo abort > domains/VM/control")
            if self.lifecycle is not None:
                await self.lifecycle.detach(node)
            node.events.end("removed")  # its readers get the line, then the end of file
        if self._by_name.get(name) is node:
            del self._by_name[name]
            node.removed = True
            node.vanish()  # whoever is inside: ENOENT from now on, as after an rmdir
            self.ctx.entry_changed(self, name, node)  # the kernel did not see it go
        self.touch()

    async def rename(self, name: str, target: Directory, new_name: str, *,
                     replace: bool = True) -> None:
        node = self._host(name)
        if target is not self:
            raise fs_error(errno.EPERM, f"{node.path} can only be renamed within {self.path}")
        if new_name in self._by_name:
            raise fs_error(errno.EEXIST, f"{self.path}/{new_name} exists; libvirtfs never "
                                         f"replaces a host by renaming another")
        del self._by_name[name]
        self._put(new_name, node)


class RootDirectory(StaticDirectory):
    def __init__(self, ctx: Context, hosts: dict[str, Host] | None = None,
                 lifecycle: HostLifecycle | None = None) -> None:
        super().__init__(ctx)
        self.hosts_directory = HostsDirectory(ctx, lifecycle)
        for name, host in (hosts or {}).items():  # no lifecycle: nothing to wait for
            directory = HostDirectory(ctx, host, lifecycle)
            self.hosts_directory._put(name, directory)

    def build(self) -> dict[str, Node]:
        return {"hosts": self.hosts_directory}
