"""pools/<pool>/ and pools/<pool>/volumes/<vol>/."""

from __future__ import annotations

from typing import TYPE_CHECKING

from libvirtfs.nodes.base import Context, Directory, Entry, Node, QueryFile, StaticDirectory
from libvirtfs.nodes.render import flag, key_values, word

if TYPE_CHECKING:
    from libvirtfs.drivers.host import Host


class PoolsDirectory(Directory):
    def __init__(self, ctx: Context, host: Host) -> None:
        super().__init__(ctx)
        self.host = host

    async def scan(self) -> list[Entry]:
        return [Entry(uuid, name, lambda uuid=uuid: PoolDirectory(self.ctx, self.host, uuid))
                for uuid, name in await self.host.list_pools()]


class PoolDirectory(StaticDirectory):
    def __init__(self, ctx: Context, host: Host, uuid: str) -> None:
        super().__init__(ctx)
        self.host = host
        self.uuid = uuid

    def build(self) -> dict[str, Node]:
        host, uuid, ctx = self.host, self.uuid, self.ctx

        async def state() -> bytes:
            return word(await host.pool_state(uuid))

        async def info() -> bytes:
            return key_values(await host.pool_info(uuid))

        async def xml() -> str:
            return await host.pool_xml(uuid, inactive=True)

        async def autostart() -> bytes:
            return flag(await host.pool_autostart(uuid))

        return {
            "state": QueryFile(ctx, state),
            "info": QueryFile(ctx, info),
            "xml": QueryFile(ctx, xml),
            "autostart": QueryFile(ctx, autostart),
            "volumes": VolumesDirectory(ctx, host, uuid),
        }


class VolumesDirectory(Directory):
    def __init__(self, ctx: Context, host: Host, pool_uuid: str) -> None:
        super().__init__(ctx)
        self.host = host
        self.pool_uuid = pool_uuid

    async def scan(self) -> list[Entry]:
        return [Entry(name, name,
                      lambda name=name: VolumeDirectory(self.ctx, self.host, self.pool_uuid, name))
                for name in await self.host.list_volumes(self.pool_uuid)]


class VolumeDirectory(StaticDirectory):
    def __init__(self, ctx: Context, host: Host, pool_uuid: str, name: str) -> None:
        super().__init__(ctx)
        self.host = host
        self.pool_uuid = pool_uuid
        self.volume = name

    def build(self) -> dict[str, Node]:
        host, pool, vol, ctx = self.host, self.pool_uuid, self.volume, self.ctx

        async def xml() -> str:
            return await host.volume_xml(pool, vol)

        async def info() -> bytes:
            return key_values(await host.volume_info(pool, vol))

        async def path() -> bytes:
            return word(await host.volume_path(pool, vol))

        return {
            "xml": QueryFile(ctx, xml),
            "info": QueryFile(ctx, info),
            "path": QueryFile(ctx, path),
        }
