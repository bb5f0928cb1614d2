"""pools/<pool>/ and pools/<pool>/volumes/<vol>/."""

from __future__ import annotations

import errno

from libvirtfs.nodes.base import Entry, QueryFile, fs_error
from libvirtfs.nodes.objects import CollectionDirectory, ObjectDirectory
from libvirtfs.nodes.render import key_values, word
from libvirtfs.nodes.writable import ControlFile, DefinitionFile, FlagFile

POOL_WORDS_BY_STATE = {"inactive": ["start", "build"], "running": ["stop", "refresh"],
                       "degraded": ["stop", "refresh"], "inaccessible": ["stop"],
                       "building": []}


async def run_word(directory: ObjectDirectory, word: str, arguments: list[str]) -> None:
    """Carry out a control word of a pool or network folder."""
    words = directory.host.control_words(directory.kind)
    if word not in words or arguments:
        raise fs_error(errno.EINVAL, f"unknown control word {' '.join([word, *arguments])!r}; "
                                     f"the words are: {', '.join(words)}")
    await directory.host.control(directory.kind, directory.key, word)  # type: ignore[arg-type]
    for node in directory.walk_known():
        node.invalidate()


class PoolsDirectory(CollectionDirectory):
    kind = "pool"

    async def listing(self) -> list[tuple[str, str]]:
        return await self.host.list_pools()

    def make(self, key: str | None) -> ObjectDirectory:
        return PoolDirectory(self.ctx, self.host, key)


class PoolDirectory(ObjectDirectory):
    kind = "pool"

    def served(self) -> list[Entry]:
        host, ctx = self.host, self.ctx
        uuid = self.key
        assert uuid is not None

        async def state() -> bytes:
            return word(await host.pool_state(uuid))

        async def info() -> bytes:
            return key_values(await host.pool_info(uuid))

        async def autostart() -> bool:
            return await host.pool_autostart(uuid)

        async def set_autostart(value: bool) -> None:
            await host.set_autostart("pool", uuid, value)

        async def words() -> list[str]:
            return POOL_WORDS_BY_STATE.get(await host.pool_state(uuid), [])

        async def control(word: str, arguments: list[str]) -> None:
            await run_word(self, word, arguments)

        return [
            Entry("state", "state", lambda: QueryFile(ctx, state)),
            Entry("info", "info", lambda: QueryFile(ctx, info)),
            Entry("xml", "xml", lambda: DefinitionFile(ctx, self)),
            Entry("autostart", "autostart", lambda: FlagFile(ctx, autostart, set_autostart)),
            Entry("control", "control", lambda: ControlFile(ctx, words, control)),
            Entry("volumes", "volumes", lambda: VolumesDirectory(ctx, host, uuid)),
        ]


class VolumesDirectory(CollectionDirectory):
    kind = "volume"

    async def listing(self) -> list[tuple[str, str]]:
        return [(f"{self.parent_key}/{name}", name)
                for name in await self.host.list_volumes(self.parent_key)]  # type: ignore[arg-type]

    def make(self, key: str | None) -> ObjectDirectory:
        return VolumeDirectory(self.ctx, self.host, key, self.parent_key)


class VolumeDirectory(ObjectDirectory):
    kind = "volume"

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
