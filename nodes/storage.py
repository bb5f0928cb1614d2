"""pools/<pool>/ and pools/<pool>/volumes/<vol>/."""

from __future__ import annotations

from typing import Any

from libvirtfs.nodes.base import Entry, QueryFile
from libvirtfs.nodes.objects import CollectionDirectory, ObjectDirectory
from libvirtfs.nodes.render import key_values, word
from libvirtfs.nodes.words import POOL_STATES
from libvirtfs.nodes.writable import DefinitionFile

POOL_WORDS_BY_STATE = {"inactive": ["start", "build"], "running": ["stop", "refresh"],
                       "degraded": ["stop", "refresh"], "inaccessible": ["stop"],
                       "building": []}


class PoolsDirectory(CollectionDirectory):
    kind = "pool"

    async def listing(self) -> list[tuple[str, str]]:
        return await self.host.list_pools()

    def make(self, key: str | None) -> ObjectDirectory:
        return PoolDirectory(self.ctx, self.host, key)


class PoolDirectory(ObjectDirectory):
    kind = "pool"
    states = POOL_STATES
    served_names = ObjectDirectory.served_names | {"volumes"}

    async def state(self) -> str:
        return await self.host.pool_state(self.key)  # type: ignore[arg-type]

    async def info(self) -> dict[str, Any]:
        return await self.host.pool_info(self.key)  # type: ignore[arg-type]

    async def words(self) -> list[str]:
        return POOL_WORDS_BY_STATE.get(await self.state(), [])

    def extra_served(self) -> list[Entry]:
        return [Entry(("volumes", self.key), "volumes",
                      lambda: VolumesDirectory(self.ctx, self.host, self.key))]


class VolumesDirectory(CollectionDirectory):
    kind = "volume"

    async def listing(self) -> list[tuple[str, str]]:
        return [(f"{self.parent_key}/{name}", name)
                for name in await self.host.list_volumes(self.parent_key)]  # type: ignore[arg-type]

    def make(self, key: str | None) -> ObjectDirectory:
        return VolumeDirectory(self.ctx, self.host, key, self.parent_key)


class VolumeDirectory(ObjectDirectory):
    kind = "volume"
    served_names = frozenset({"xml", "info", "path"})

    def served(self) -> list[Entry]:
        host, ctx = self.host, self.ctx
        assert self.key is not None and self.parent_key is not None
        pool, volume = self.parent_key, self.key.partition("/")[2]

        async def info() -> bytes:
            return key_values(await host.volume_info(pool, volume))

        async def path() -> bytes:
            return word(await host.volume_path(pool, volume))

        return [
            Entry("xml", "xml", lambda: DefinitionFile(ctx, self)),
            Entry("info", "info", lambda: QueryFile(ctx, info)),
            Entry("path", "path", lambda: QueryFile(ctx, path)),
        ]
