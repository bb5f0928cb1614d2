"""networks/<net>/."""

from __future__ import annotations

from typing import TYPE_CHECKING

from libvirtfs.nodes.base import Context, Directory, Entry, Node, QueryFile, StaticDirectory
from libvirtfs.nodes.render import flag, key_values, word

if TYPE_CHECKING:
    from libvirtfs.drivers.host import Host


class NetworksDirectory(Directory):
    def __init__(self, ctx: Context, host: Host) -> None:
        super().__init__(ctx)
        self.host = host

    async def scan(self) -> list[Entry]:
        return [Entry(uuid, name, lambda uuid=uuid: NetworkDirectory(self.ctx, self.host, uuid))
                for uuid, name in await self.host.list_networks()]


class NetworkDirectory(StaticDirectory):
    def __init__(self, ctx: Context, host: Host, uuid: str) -> None:
        super().__init__(ctx)
        self.host = host
        self.uuid = uuid

    def build(self) -> dict[str, Node]:
        host, uuid, ctx = self.host, self.uuid, self.ctx

        async def state() -> bytes:
            return word(await host.network_state(uuid))

        async def info() -> bytes:
            return key_values(await host.network_info(uuid))

        async def xml() -> str:
            return await host.network_xml(uuid, inactive=True)

        async def autostart() -> bytes:
            return flag(await host.network_autostart(uuid))

        return {
            "state": QueryFile(ctx, state),
            "info": QueryFile(ctx, info),
            "xml": QueryFile(ctx, xml),
            "autostart": QueryFile(ctx, autostart),
        }
