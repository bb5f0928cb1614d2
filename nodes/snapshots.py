"""domains/<name>/snapshots/: one folder per snapshot, and `current`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from libvirtfs.nodes.base import Context, Directory, Entry, QueryFile, Symlink
from libvirtfs.nodes.names import to_filename
from libvirtfs.nodes.render import key_values, word

if TYPE_CHECKING:
    from libvirtfs.drivers.host import Host

CURRENT = "current"


class SnapshotsDirectory(Directory):
    reserved = frozenset({CURRENT})

    def __init__(self, ctx: Context, host: Host, domain_uuid: str) -> None:
        super().__init__(ctx)
        self.host = host
        self.domain_uuid = domain_uuid

    async def scan(self) -> list[Entry]:
        names = await self.host.list_snapshots(self.domain_uuid)
        entries = [Entry(("snapshot", name), name,
                         lambda name=name: SnapshotDirectory(self.ctx, self.host,
                                                             self.domain_uuid, name))
                   for name in names]
        current = await self.host.current_snapshot(self.domain_uuid) if names else None
        if current is not None:
            target = to_filename(current, self.reserved)
            entries.append(Entry(("current", target), CURRENT,
                                 lambda: Symlink(self.ctx, target)))
        return entries

    def _adopt(self, entries: list[Entry]) -> None:
        # `current` is reserved for the link, so it must not be escaped like a snapshot name.
        super()._adopt(entries)
        for key, node in self._by_key.items():
            if isinstance(key, tuple) and key[0] == "current":
                del self._by_name[node.name]
                node.name = CURRENT
                self._by_name[CURRENT] = node


class SnapshotDirectory(Directory):
    def __init__(self, ctx: Context, host: Host, domain_uuid: str, name: str) -> None:
        super().__init__(ctx)
        self.host = host
        self.domain_uuid = domain_uuid
        self.snapshot = name

    async def scan(self) -> list[Entry]:
        host, uuid, snap, ctx = self.host, self.domain_uuid, self.snapshot, self.ctx

        async def xml() -> str:
            return await host.snapshot_xml(uuid, snap)

        async def info() -> bytes:
            return key_values(await host.snapshot_info(uuid, snap))

        async def state() -> bytes:
            return word((await host.snapshot_info(uuid, snap))["state"])

        entries = [
            Entry("xml", "xml", lambda: QueryFile(ctx, xml)),
            Entry("state", "state", lambda: QueryFile(ctx, state)),
            Entry("info", "info", lambda: QueryFile(ctx, info)),
        ]
        parent = await host.snapshot_parent(uuid, snap)
        if parent is not None:
            target = "../" + to_filename(parent, SnapshotsDirectory.reserved)
            entries.append(Entry(("parent", target), "parent", lambda: Symlink(ctx, target)))
        return entries
