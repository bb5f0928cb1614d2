"""The root of the tree and hosts/<host>/."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from libvirtfs.nodes.base import Context, Directory, Node, QueryFile, StaticDirectory
from libvirtfs.nodes.domains import DomainsDirectory
from libvirtfs.nodes.networks import NetworksDirectory
from libvirtfs.nodes.render import key_values, word
from libvirtfs.nodes.storage import PoolsDirectory

if TYPE_CHECKING:
    from libvirtfs.nodes.backend import Change, Host

log = logging.getLogger(__name__)

# Which collection of a host each kind of event is about.
_COLLECTION = {"domain": "domains", "snapshot": "domains", "pool": "pools", "volume": "pools",
               "network": "networks"}


class HostDirectory(StaticDirectory):
    def __init__(self, ctx: Context, host: Host) -> None:
        super().__init__(ctx)
        self.host = host
        self._to_list: dict[Directory, None] = {}
        self._listing_wanted = trio.Event()

    def build(self) -> dict[str, Node]:
        host, ctx = self.host, self.ctx

        async def uri() -> bytes:
            return word(await host.uri())

        async def info() -> bytes:
            return key_values(await host.info())

        return {
            "uri": QueryFile(ctx, uri),
            "info": QueryFile(ctx, info),
            "capabilities.xml": QueryFile(ctx, host.capabilities),
            "domains": DomainsDirectory(ctx, host),
            "pools": PoolsDirectory(ctx, host),
            "networks": NetworksDirectory(ctx, host),
        }

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


class HostsDirectory(StaticDirectory):
    """hosts/: one folder per mounted URI, named as the command line says."""

    def __init__(self, ctx: Context, hosts: dict[str, Host]) -> None:
        super().__init__(ctx)
        self.hosts = hosts

    def build(self) -> dict[str, Node]:
        return {name: HostDirectory(self.ctx, host) for name, host in self.hosts.items()}


class RootDirectory(StaticDirectory):
    def __init__(self, ctx: Context, hosts: dict[str, Host]) -> None:
        super().__init__(ctx)
        self.hosts_directory = HostsDirectory(ctx, hosts)

    def build(self) -> dict[str, Node]:
        return {"hosts": self.hosts_directory}
