"""The root of the tree and hosts/<host>/."""

from __future__ import annotations

from typing import TYPE_CHECKING

from libvirtfs.nodes.base import Context, Directory, Node, QueryFile, StaticDirectory
from libvirtfs.nodes.domains import DomainsDirectory
from libvirtfs.nodes.networks import NetworksDirectory
from libvirtfs.nodes.render import key_values, word
from libvirtfs.nodes.storage import PoolsDirectory

if TYPE_CHECKING:
    from libvirtfs.nodes.backend import Change, Host


class HostDirectory(StaticDirectory):
    def __init__(self, ctx: Context, host: Host) -> None:
        super().__init__(ctx)
        self.host = host

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
        """Drop cached renderings that an event made stale; returns the nodes touched."""
        if change.kind == "host":
            touched = self.walk_known()
            for node in touched:
                node.invalidate()
            return touched
        folder = {"domain": "domains", "snapshot": "domains", "pool": "pools",
                  "volume": "pools", "network": "networks"}.get(change.kind)
        collection = self._by_name.get(folder or "")
        if not isinstance(collection, Directory):
            return []
        collection.invalidate()
        touched: list[Node] = [collection]
        changed = collection.known(change.uuid)
        if changed is not None:
            touched.extend(changed.walk_known())
        for node in touched:
            node.invalidate()
        return touched


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
