"""Snapshot calls of a host (domains/<name>/snapshots/).  Mixed into `Host`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import libvirt
from lxml import etree

if TYPE_CHECKING:
    from libvirtfs.drivers.connection import Connection

Info = dict[str, Any]


def _snapshot(conn: libvirt.virConnect, uuid: str, name: str) -> libvirt.virDomainSnapshot:
    return conn.lookupByUUIDString(uuid).snapshotLookupByName(name, 0)


def _safe_parser() -> etree.XMLParser:
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                           huge_tree=False)


class SnapshotCalls:
    connection: Connection

    async def list_snapshots(self, uuid: str) -> list[str]:
        return await self.connection.call(
            lambda conn: [s.getName() for s in conn.lookupByUUIDString(uuid).listAllSnapshots(0)])

    async def current_snapshot(self, uuid: str) -> str | None:
        def fetch(conn: libvirt.virConnect) -> str | None:
            dom = conn.lookupByUUIDString(uuid)
            if not dom.hasCurrentSnapshot(0):
                return None
            return dom.snapshotCurrent(0).getName()
        return await self.connection.call(fetch)

    async def snapshot_parent(self, uuid: str, name: str) -> str | None:
        def fetch(conn: libvirt.virConnect) -> str | None:
            try:
                return _snapshot(conn, uuid, name).getParent(0).getName()
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                    return None
                raise
        return await self.connection.call(fetch)

    async def snapshot_xml(self, uuid: str, name: str) -> str:
        return await self.connection.call(lambda conn: _snapshot(conn, uuid, name).getXMLDesc(0))

    async def snapshot_info(self, uuid: str, name: str) -> Info:
        def fetch(conn: libvirt.virConnect) -> Info:
            snap = _snapshot(conn, uuid, name)
            doc = etree.fromstring(snap.getXMLDesc(0).encode(), _safe_parser())
            memory = doc.find("memory")
            disks = [f"{d.get('name')}={d.get('snapshot', 'default')}"
                     for d in doc.findall("disks/disk")]
            return {
                "name": snap.getName(),
                "description": doc.findtext("description") or "",
                "creation-time": int(doc.findtext("creationTime") or 0),
                "state": doc.findtext("state") or "nostate",
                "parent": doc.findtext("parent/name") or "",
                "children": snap.numChildren(0),
                "current": bool(snap.isCurrent(0)),
                "metadata": bool(snap.hasMetadata(0)),
                "memory": memory.get("snapshot", "") if memory is not None else "",
                "disks": " ".join(disks),
            }
        return await self.connection.call(fetch)
