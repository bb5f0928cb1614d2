"""networks/<net>/."""

from __future__ import annotations

from libvirtfs.nodes.base import Entry, QueryFile
from libvirtfs.nodes.objects import CollectionDirectory, ObjectDirectory
from libvirtfs.nodes.render import key_values, word
from libvirtfs.nodes.storage import run_word
from libvirtfs.nodes.writable import ControlFile, DefinitionFile, FlagFile


class NetworksDirectory(CollectionDirectory):
    kind = "network"

    async def listing(self) -> list[tuple[str, str]]:
        return await self.host.list_networks()

    def make(self, key: str | None) -> ObjectDirectory:
        return NetworkDirectory(self.ctx, self.host, key)


class NetworkDirectory(ObjectDirectory):
    kind = "network"

    def served(self) -> list[Entry]:
        host, ctx = self.host, self.ctx
        uuid = self.key
        assert uuid is not None

        async def state() -> bytes:
            return word(await host.network_state(uuid))

        async def info() -> bytes:
            return key_values(await host.network_info(uuid))

        async def autostart() -> bool:
            return await host.network_autostart(uuid)

        async def set_autostart(value: bool) -> None:
            await host.set_autostart("network", uuid, value)

        async def words() -> list[str]:
            return ["stop"] if await host.network_state(uuid) == "active" else ["start"]

        async def control(word: str, arguments: list[str]) -> None:
            await run_word(self, word, arguments)

        return [
            Entry("state", "state", lambda: QueryFile(ctx, state)),
            Entry("info", "info", lambda: QueryFile(ctx, info)),
            Entry("xml", "xml", lambda: DefinitionFile(ctx, self)),
            Entry("autostart", "autostart", lambda: FlagFile(ctx, autostart, set_autostart)),
            Entry("control", "control", lambda: ControlFile(ctx, words, control)),
        ]
