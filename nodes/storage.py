"""pools/<pool>/ and pools/<pool>/volumes/<vol>/."""

from __future__ import annotations

from typing import Any

from libvirtfs.nodes.base import QueryFile
from libvirtfs.nodes.objects import CollectionDirectory, ObjectDirectory, folder
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


def _volumes(directory: ObjectDirectory) -> VolumesDirectory:
    return VolumesDirectory(directory.ctx, directory.host, directory.key)


class PoolDirectory(ObjectDirectory):
    kind = "pool"
    states = POOL_STATES
    # `volumes` is keyed by the pool (per_object): a pool defined anew has new volumes.
    served_files = {**ObjectDirectory.served_files, "volumes": _volumes}
    served_names = frozenset(served_files)
    __slots__ = ()

    async def state(self) -> str:
        return await self.host.pool_state(self.key)  # type: ignore[arg-type]

    async def info(self) -> dict[str, Any]:
        return await self.host.pool_info(self.key)  # type: ignore[arg-type]

    def state_now(self) -> str | None:
        return None if self.key is None else self.host.pool_state_now(self.key)

    async def words(self) -> list[str]:
        return POOL_WORDS_BY_STATE.get(await self.state(), [])


class VolumesDirectory(CollectionDirectory):
    kind = "volume"

    async def listing(self) -> list[tuple[str, str]]:
        return [(f"{self.parent_key}/{name}", name)
                for name in await self.host.list_volumes(self.parent_key)]  # type: ignore[arg-type]

    def make(self, key: str | None) -> ObjectDirectory:
        return VolumeDirectory(self.ctx, self.host, key, self.parent_key)


class VolumeInfoFile(QueryFile):
    __slots__ = ()

    async def render(self) -> bytes:
        directory = folder(self)
        return key_values(await directory.host.volume_info(*_volume(directory)))


class VolumePathFile(QueryFile):
    __slots__ = ()

    async def render(self) -> bytes:
        directory = folder(self)
        return word(await directory.host.volume_path(*_volume(directory)))


def _volume(directory: ObjectDirectory) -> tuple[str, str]:
    """(pool UUID, volume name) of a volume's folder."""
    assert directory.key is not None and directory.parent_key is not None
    return directory.parent_key, directory.key.partition("/")[2]


class VolumeDirectory(ObjectDirectory):
    kind = "volume"
    served_files = {
        "xml": lambda d: DefinitionFile(d.ctx, d),
        "info": lambda d: VolumeInfoFile(d.ctx),
        "path": lambda d: VolumePathFile(d.ctx),
    }
    served_names = frozenset(served_files)
    __slots__ = ()
