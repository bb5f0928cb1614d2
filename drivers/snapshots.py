"""Snapshot calls of a host (domains/<name>/snapshots/).  Mixed into `Host`.

The words users write (in `user.flags`, `user.delete-flags` and `control`, listed in
nodes/words.py) are turned into libvirt's VIR_DOMAIN_SNAPSHOT_* flags here, from the tables
below.  Snapshots are addressed by name within their domain (UUID).
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING, Any, TypeVar

import libvirt
from lxml import etree

from libvirtfs.drivers import xmldocs
from libvirtfs.drivers.errors import DriverError
from libvirtfs.nodes.backend import SnapshotListing, SnapshotSummary
from libvirtfs.nodes.words import SNAPSHOT_REDEFINE_FLAGS

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from collections.abc import Callable

    from libvirtfs.drivers.connection import Connection

T = TypeVar("T")

Info = dict[str, Any]

# The words of nodes/words.py -> libvirt's flags.
CREATE_FLAGS: dict[str, int] = {
    "redefine": libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE,
    "current": libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT,
    "no-metadata": libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA,
    "halt": libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_HALT,
    "disk-only": libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY,
    "reuse-ext": libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT,
    "quiesce": libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE,
    "atomic": libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC,
    "live": libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_LIVE,
    "validate": libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_VALIDATE,
}

DELETE_FLAGS: dict[str, int] = {
    "children": libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN,
    "metadata-only": libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY,
    "children-only": libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN_ONLY,
}

REVERT_WORDS: dict[str, int] = {
    "revert": 0,
    "revert-running": libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING,
    "revert-paused": libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED,
    "revert-force": libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_FORCE,
}
REVERT_MODIFIERS: dict[str, int] = {
    "running": libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING,
    "paused": libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED,
    "force": libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_FORCE,
}
if hasattr(libvirt, "VIR_DOMAIN_SNAPSHOT_REVERT_RESET_NVRAM"):
    REVERT_MODIFIERS["reset-nvram"] = libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RESET_NVRAM


# The first libvirt that reverts to external snapshots (9.7.0).
EXTERNAL_REVERT_VERSION = 9_007_000
# What libvirt says when an external snapshot's overlay is no longer in the disk's chain
# (merged with commit-active and pivot): only its metadata can go.
MERGED_ALREADY = "could not find base disk source"


def bits(words: list[str], table: dict[str, int]) -> int:
    """The flags for `words`; EOPNOTSUPP for a word this libvirt has no flag for."""
    value = 0
    for word in words:
        if word not in table:
            raise DriverError(errno.EOPNOTSUPP, f"{word!r} needs a newer libvirt")
        value |= table[word]
    return value


def parse_template(data: bytes) -> etree._Element:
    """A `<domainsnapshot>` document, parsed by the hardened parser (EINVAL if it is not)."""
    return xmldocs.parse(data, "domainsnapshot")


def new_snapshot_document(name: str, description: str | None, template: bytes | None) -> str:
    """The document for a new snapshot: the template (or nothing) with this name and
    description."""
    root = parse_template(template) if template else etree.Element("domainsnapshot")
    name_element = root.find("name")
    if name_element is None:
        name_element = etree.Element("name")
        root.insert(0, name_element)
    name_element.text = name
    if description is not None:
        element = root.find("description")
        if element is None:
            element = etree.Element("description")
            name_element.addnext(element)
        element.text = description
    return etree.tostring(root, encoding="unicode")


def _snapshot(conn: libvirt.virConnect, uuid: str, name: str) -> libvirt.virDomainSnapshot:
    return conn.lookupByUUIDString(uuid).snapshotLookupByName(name, 0)


def _summary(snap: libvirt.virDomainSnapshot) -> SnapshotSummary:
    """What a listing needs of one snapshot.  libvirt may be unable to send a snapshot's
    document at all (over its 4 MiB RPC limit: a domain definition near the limit with a
    long description around it): that snapshot is listed anyway, with its parent asked for
    separately and no creation time, so one snapshot never hides the others."""
    try:
        doc = _document(snap)
    except libvirt.libvirtError as e:
        if e.get_error_code() != libvirt.VIR_ERR_RPC:
            raise
        log.warning("snapshot %s: libvirt cannot send its document (%s); listed without it",
                    snap.getName(), e.get_error_message())
        try:
            parent: str | None = snap.getParent(0).getName()
        except libvirt.libvirtError as missing:
            if missing.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                raise
            parent = None
        return SnapshotSummary(snap.getName(), parent, 0)
    return SnapshotSummary(snap.getName(), doc.findtext("parent/name"),
                           int(doc.findtext("creationTime") or 0))


def _document(snap: libvirt.virDomainSnapshot) -> etree._Element:
    """A snapshot's document as libvirt has it: not a user's document, so whatever its size
    (a long description, a large domain definition), it is read."""
    return xmldocs.from_libvirt(snap.getXMLDesc(0))


def _exists(dom: libvirt.virDomain, name: str) -> bool:
    try:
        dom.snapshotLookupByName(name, 0)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
            return False
        raise
    return True


def _location(element: etree._Element | None) -> str:
    """`internal`, `no`, `external /path` ... for a <memory> or <disk> of a snapshot."""
    if element is None:
        return "no"
    kind = element.get("snapshot") or "default"
    where = element.get("file")
    source = element.find("source")
    if not where and source is not None:
        where = source.get("file") or source.get("dev") or source.get("name")
    return f"{kind} {where}" if where else kind


def _is_external(snap: libvirt.virDomainSnapshot) -> bool:
    """Whether deleting `snap` merges files (external memory or disks): a long job."""
    doc = _document(snap)
    return any(element.get("snapshot") == "external"
               for element in [doc.find("memory"), *doc.findall("disks/disk")]
               if element is not None)


class SnapshotCalls:
    connection: Connection

    if TYPE_CHECKING:
        async def run_job(self, uuid: str, what: str,
                          fn: Callable[[libvirt.virConnect], T]) -> T: ...

    @staticmethod
    def check_snapshot_template(data: bytes) -> None:
        parse_template(data)

    @staticmethod
    def snapshot_document(name: str, description: str | None, template: bytes | None) -> bytes:
        return new_snapshot_document(name, description, template).encode()

    # -- reading -----------------------------------------------------------------------

    async def snapshot_listing(self, uuid: str) -> SnapshotListing:
        """Every snapshot with metadata, its parent and creation time, and the current one."""
        def fetch(conn: libvirt.virConnect) -> SnapshotListing:
            dom = conn.lookupByUUIDString(uuid)
            try:
                snaps = dom.listAllSnapshots(libvirt.VIR_DOMAIN_SNAPSHOT_LIST_TOPOLOGICAL)
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
                    # A hypervisor without snapshots (LXC) has none: an empty folder
                    # keeps `find`, `cp -r` and `rsync` of the host working.
                    return SnapshotListing([], None)
                raise
            summaries = [_summary(snap) for snap in snaps]
            current = dom.snapshotCurrent(0).getName() if dom.hasCurrentSnapshot(0) else None
            return SnapshotListing(summaries, current)
        return await self.connection.call(fetch, changes=False)

    async def snapshot_xml(self, uuid: str, name: str) -> str:
        return await self.connection.call(lambda conn: _snapshot(conn, uuid, name).getXMLDesc(0),
                                          changes=False)

    async def snapshot_info(self, uuid: str, name: str) -> Info:
        def fetch(conn: libvirt.virConnect) -> Info:
            snap = _snapshot(conn, uuid, name)
            doc = _document(snap)
            info: Info = {
                "name": snap.getName(),
                "description": (doc.findtext("description") or "").replace("\n", " "),
                "creation-time": int(doc.findtext("creationTime") or 0),
                "state": doc.findtext("state") or "nostate",
                "parent": doc.findtext("parent/name") or "",
                "children": snap.numChildren(0),
                "descendants": snap.numChildren(libvirt.VIR_DOMAIN_SNAPSHOT_LIST_DESCENDANTS),
                "current": bool(snap.isCurrent(0)),
                "has-metadata": bool(snap.hasMetadata(0)),
                "memory": _location(doc.find("memory")),
            }
            for disk in doc.findall("disks/disk"):
                info[f"disk-{disk.get('name')}"] = _location(disk)
            return info
        return await self.connection.call(fetch, changes=False)

    # -- changing ----------------------------------------------------------------------

    async def create_snapshot(self, uuid: str, name: str, flags: list[str],
                              description: str | None, template: bytes | None) -> None:
        """Take a snapshot named `name` (mkdir).  EEXIST if the name is taken; libvirt's
        refusal otherwise, and then nothing was made."""
        document = new_snapshot_document(name, description, template)
        value = bits(flags, CREATE_FLAGS)

        def create(conn: libvirt.virConnect) -> None:
            dom = conn.lookupByUUIDString(uuid)
            if "redefine" not in flags and _exists(dom, name):
                raise DriverError(errno.EEXIST, f"domain {dom.name()!r} has a snapshot named "
                                                f"{name!r} already")
            dom.snapshotCreateXML(document, value)

        # With memory (a running domain, not disk-only) a snapshot writes all of the
        # guest's memory: a job (drivers/jobs.py), watched in `job`, abortable.
        memory = "disk-only" not in flags and await self.connection.call(
            lambda conn: bool(conn.lookupByUUIDString(uuid).isActive()), changes=False)
        if memory:
            await self.run_job(uuid, f"snapshot {name}", create)
        else:
            await self.connection.call(create)

    async def redefine_snapshot(self, uuid: str, name: str, data: bytes,
                                flags: list[str]) -> None:
        """Write a saved `<domainsnapshot>` document back as the metadata of `name`
        (VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE, with `current` and `validate` if given)."""
        root = parse_template(data)
        xmldocs.check_name(root, name, "snapshot")
        xmldocs.check_size(root, "snapshot")
        document = etree.tostring(root, encoding="unicode")
        value = CREATE_FLAGS["redefine"] | bits(
            [f for f in flags if f in SNAPSHOT_REDEFINE_FLAGS], CREATE_FLAGS)

        def redefine(conn: libvirt.virConnect) -> None:
            conn.lookupByUUIDString(uuid).snapshotCreateXML(document, value)
        await self.connection.call(redefine)

    async def delete_snapshot(self, uuid: str, name: str, flags: list[str]) -> None:
        def delete(conn: libvirt.virConnect) -> None:
            snap = _snapshot(conn, uuid, name)
            snap.delete(bits(flags, DELETE_FLAGS))

        # Deleting an external snapshot merges its files back: a job.
        external = "metadata-only" not in flags and await self.connection.call(
            lambda conn: _is_external(_snapshot(conn, uuid, name)), changes=False)
        try:
            if external:
                await self.run_job(uuid, f"snapshot-delete {name}", delete)
            else:
                await self.connection.call(delete)
        except DriverError as e:
            if MERGED_ALREADY not in (e.strerror or ""):
                raise
            raise DriverError(e.errno or errno.EBUSY,
                              f"{e.strerror}: the overlay this snapshot made is no longer in "
                              f"the disk's chain (merged back with commit-active and pivot, "
                              f"say), so libvirt cannot merge it; remove only the snapshot's "
                              f"metadata: setfattr -n user.delete-flags -v metadata-only "
                              f"snapshots, then rmdir again", e.libvirt_code) from None

    async def snapshot_revertible(self, uuid: str, name: str) -> bool:
        """Whether libvirt can revert to the snapshot: libvirt before 9.7 cannot revert to
        an external one ("revert to external snapshot not supported yet")."""
        def ask(conn: libvirt.virConnect) -> bool:
            if conn.getLibVersion() >= EXTERNAL_REVERT_VERSION:
                return True
            return not _is_external(_snapshot(conn, uuid, name))
        return await self.connection.call(ask, changes=False)

    async def revert_snapshot(self, uuid: str, name: str, word: str,
                              modifiers: list[str]) -> None:
        """`word` of REVERT_WORDS, each modifier of REVERT_MODIFIERS (the caller checked)."""
        flags = REVERT_WORDS[word] | bits(modifiers, REVERT_MODIFIERS)

        def revert(conn: libvirt.virConnect) -> None:
            dom = conn.lookupByUUIDString(uuid)
            snap = dom.snapshotLookupByName(name, 0)
            dom.revertToSnapshot(snap, flags)
        await self.connection.call(revert)
