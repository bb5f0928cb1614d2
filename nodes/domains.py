"""domains/<name>/: one folder per domain, addressed by UUID so renames keep identity."""

from __future__ import annotations

from typing import TYPE_CHECKING

from libvirtfs.nodes.base import Context, Directory, Entry, Node, QueryFile, StaticDirectory
from libvirtfs.nodes.render import flag, key_values, word
from libvirtfs.nodes.snapshots import SnapshotsDirectory

if TYPE_CHECKING:
    from libvirtfs.drivers.host import Host


class DomainsDirectory(Directory):
    def __init__(self, ctx: Context, host: Host) -> None:
        super().__init__(ctx)
        self.host = host

    async def scan(self) -> list[Entry]:
        return [Entry(uuid, name, lambda uuid=uuid: DomainDirectory(self.ctx, self.host, uuid))
                for uuid, name in await self.host.list_domains()]


class DomainDirectory(StaticDirectory):
    def __init__(self, ctx: Context, host: Host, uuid: str) -> None:
        super().__init__(ctx)
        self.host = host
        self.uuid = uuid

    def build(self) -> dict[str, Node]:
        host, uuid, ctx = self.host, self.uuid, self.ctx

        async def state() -> bytes:
            return word((await host.domain_state(uuid))[0])

        async def info() -> bytes:
            return key_values(await host.domain_info(uuid))

        async def xml() -> str:
            return await host.domain_xml(uuid, inactive=True)

        async def live_xml() -> str:
            return await host.domain_xml(uuid, inactive=False)

        async def autostart() -> bytes:
            return flag(await host.domain_autostart(uuid))

        return {
            "state": QueryFile(ctx, state),
            "info": QueryFile(ctx, info),
            "xml": QueryFile(ctx, xml),
            "live.xml": QueryFile(ctx, live_xml),
            "autostart": QueryFile(ctx, autostart),
            "snapshots": SnapshotsDirectory(ctx, host, uuid),
        }
