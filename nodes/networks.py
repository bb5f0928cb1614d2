"""networks/<net>/."""

from __future__ import annotations

from typing import Any

from libvirtfs.nodes.objects import CollectionDirectory, ObjectDirectory
from libvirtfs.nodes.words import NETWORK_STATES


class NetworksDirectory(CollectionDirectory):
    kind = "network"

    async def listing(self) -> list[tuple[str, str]]:
        return await self.host.list_networks()

    def make(self, key: str | None) -> ObjectDirectory:
        return NetworkDirectory(self.ctx, self.host, key)


class NetworkDirectory(ObjectDirectory):
    kind = "network"
    states = NETWORK_STATES
    __slots__ = ()

    async def state(self) -> str:
        return await self.host.network_state(self.key)  # type: ignore[arg-type]

    async def info(self) -> dict[str, Any]:
        return await self.host.network_info(self.key)  # type: ignore[arg-type]

    def state_now(self) -> str | None:
        return None if self.key is None else self.host.network_state_now(self.key)

    async def words(self) -> list[str]:
        return ["stop"] if await self.state() == "active" else ["start"]
