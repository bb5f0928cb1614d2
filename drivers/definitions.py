"""Defining objects from documents users write, and showing definitions back to them.

One `Kind` per object type says how libvirt names, looks up, defines and renders it.  The
rules shared by all are here once: the hardened parse, the name check, keeping identity
(UUID, MAC addresses) that a short document leaves out, doing nothing when nothing
changes, and remembering the written bytes (records.py).  These functions block; they run in
the connection's worker threads.
"""

from __future__ import annotations

import copy
import errno
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import libvirt
from lxml import etree

from libvirtfs.drivers import records, statedir, xmldocs

log = logging.getLogger(__name__)

Key = str  # a UUID, or "POOL-UUID/VOLUME-NAME" for volumes


def _inactive_xml(obj: Any, flag: int) -> str:
    try:
        return obj.XMLDesc(flag)
    except libvirt.libvirtError as e:
        # The test driver knows no INACTIVE flag for pools and networks.
        if e.get_error_code() not in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT):
            raise
        return obj.XMLDesc(0)


_VOLATILE_VOLUME = re.compile(
    r"\n?[ \t]*<(allocation|physical)\b[^>]*>[^<]*</\1>|\n?[ \t]*<timestamps>.*?</timestamps>",
    re.S)


@dataclass(frozen=True)
class Kind:
    name: str                                   # "domain"
    root: str                                   # the document's root element
    lookup: Callable[[libvirt.virConnect, Key], Any]
    define: Callable[[libvirt.virConnect, Key | None, str], Any]
    xml: Callable[[Any], str]                   # the persistent definition
    key: Callable[[Any], Key]
    exists_by_name: Callable[[libvirt.virConnect, Key | None, str], bool]
    redefinable: bool = True
    record_in_libvirt: bool = False               # record kept as libvirt metadata
    normalize: Callable[[str], str] = lambda text: text


def _lookup_volume(conn: libvirt.virConnect, key: Key) -> Any:
    pool_uuid, _, name = key.partition("/")
    return conn.storagePoolLookupByUUIDString(pool_uuid).storageVolLookupByName(name)


def _create_volume(conn: libvirt.virConnect, key: Key | None, xml: str) -> Any:
    assert key is not None  # the pool's UUID, for a new volume
    return conn.storagePoolLookupByUUIDString(key.partition("/")[0]).createXML(xml, 0)


def _exists(fn: Callable[[], Any]) -> bool:
    try:
        fn()
    except libvirt.libvirtError:
        return False
    return True


def _volume_exists(conn: libvirt.virConnect, key: Key | None, name: str) -> bool:
    assert key is not None
    pool = conn.storagePoolLookupByUUIDString(key.partition("/")[0])
    return _exists(lambda: pool.storageVolLookupByName(name))


KINDS: dict[str, Kind] = {
    "domain": Kind(
        "domain", "domain",
        lookup=lambda conn, key: conn.lookupByUUIDString(key),
        define=lambda conn, key, xml: conn.defineXML(xml),
        xml=lambda dom: dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE),
        key=lambda dom: dom.UUIDString(),
        exists_by_name=lambda conn, key, name: _exists(lambda: conn.lookupByName(name)),
        record_in_libvirt=True),
    "network": Kind(
        "network", "network",
        lookup=lambda conn, key: conn.networkLookupByUUIDString(key),
        define=lambda conn, key, xml: conn.networkDefineXML(xml),
        xml=lambda net: _inactive_xml(net, libvirt.VIR_NETWORK_XML_INACTIVE),
        key=lambda net: net.UUIDString(),
        exists_by_name=lambda conn, key, name: _exists(lambda: conn.networkLookupByName(name))),
    "pool": Kind(
        "pool", "pool",
        lookup=lambda conn, key: conn.storagePoolLookupByUUIDString(key),
        define=lambda conn, key, xml: conn.storagePoolDefineXML(xml, 0),
        xml=lambda pool: _inactive_xml(pool, libvirt.VIR_STORAGE_XML_INACTIVE),
        key=lambda pool: pool.UUIDString(),
        exists_by_name=lambda conn, key, name: _exists(
            lambda: conn.storagePoolLookupByName(name))),
    "volume": Kind(
        "volume", "volume",
        lookup=_lookup_volume,
        define=_create_volume,
        xml=lambda vol: vol.XMLDesc(0),
        key=lambda vol: f"{vol.storagePoolLookupByVolume().UUIDString()}/{vol.name()}",
        exists_by_name=_volume_exists,
        redefinable=False,
        normalize=lambda text: _VOLATILE_VOLUME.sub("", text)),
}


class Definitions:
    """Show and define objects of one connection, and keep their read-your-writes records:
    a domain's in its metadata while there is room (see xmldocs.DEFINITION_BUDGET), other
    records in `state` (or, for the test driver, in memory)."""

    def __init__(self, state: statedir.StateDir) -> None:
        self.state = state
        # (id of the connection, its host's identity, where its records are kept)
        self._host_of: tuple[int, str, statedir.RecordStore] | None = None

    def _host(self, conn: libvirt.virConnect) -> tuple[str, statedir.RecordStore]:
        """The host's identity for records kept outside libvirt, and where they are kept."""
        known = self._host_of
        # By libvirt's own object: wrappers (drivers/counting.py, faults.py) are new per call.
        ident = id(getattr(conn, "_o", conn))
        if known is None or known[0] != ident:  # the first call, or a new connection
            caps = xmldocs.from_libvirt(conn.getCapabilities())
            host_id = caps.findtext("host/uuid") or conn.getURI()
            # The test driver's objects live in this process (test:///default is one host
            # for all its connections here), and another mount of test:///default is another
            # host with the same UUIDs: its records live in this process too.
            store = statedir.IN_PROCESS if conn.getType().lower() == "test" else self.state
            known = self._host_of = (ident, host_id, store)
        return known[1], known[2]

    def _record(self, conn: libvirt.virConnect, kind: Kind, key: Key,
                text: str) -> tuple[str, records.Written | None]:
        """libvirt's text without our element, and the object's record if libvirtfs made it."""
        clean, written = records.strip(text)
        if written is None or not kind.record_in_libvirt:
            host_id, store = self._host(conn)
            written = store.get(host_id, kind.name, key)
        if written is None:
            return clean, None  # the usual case: no key to read
        return clean, records.verified(self.state.key(create=False),
                                       records.subject(kind.name, key), written)

    def show(self, conn: libvirt.virConnect, kind_name: str, key: Key) -> bytes:
        kind = KINDS[kind_name]
        try:
            obj = kind.lookup(conn, key)
        except libvirt.libvirtError as e:
            if e.get_error_code() in _GONE:
                self.forget(conn, kind_name, key)  # removed outside libvirtfs
            raise
        clean, written = self._record(conn, kind, key, kind.xml(obj))
        return records.shown(clean, written, kind.normalize)

    def define(self, conn: libvirt.virConnect, kind_name: str, key: Key | None,
               expected_name: str | None, data: bytes, *, parent: Key | None = None) -> Key:
        """Define (or create) from `data`; returns the object's key.  `key` is None for an
        object that does not exist yet; `parent` is the pool of a new volume."""
        kind = KINDS[kind_name]
        root = xmldocs.parse(data, kind.root)
        name = xmldocs.check_name(root, expected_name, kind.name)
        _drop_records(root)
        current = kind.lookup(conn, key) if key is not None else None
        if current is None and kind.exists_by_name(conn, parent, name):
            raise OSError(errno.EEXIST, f"a {kind.name} named {name!r} exists already")
        if current is not None and not kind.redefinable:
            if self.show(conn, kind.name, key) == data:  # type: ignore[arg-type]
                return key  # type: ignore[return-value]
            raise OSError(errno.EEXIST, f"libvirt cannot redefine an existing {kind.name}; "
                                        f"remove it with rmdir and write it again")
        current_root = None
        if current is not None:
            current_text, written = self._record(conn, kind, key, kind.xml(current))  # type: ignore[arg-type]
            if records.shown(current_text, written, kind.normalize) == data:
                return key  # type: ignore[return-value]  # nothing to change
            current_root = xmldocs.from_libvirt(current_text)
            _keep_identity(root, current_root, kind.name)
            if kind.name == "domain":
                _keep_passwords(root, current)
        xmldocs.check_size(root, kind.name)
        if current_root is not None and (xmldocs.canonical(root)
                                         == xmldocs.canonical(current_root)):
            obj = current  # libvirt's definition stays as it is
        else:
            obj = kind.define(conn, parent if current is None else key,
                              etree.tostring(root, encoding="unicode"))
        new_key = kind.key(obj)
        # libvirt has the new definition: from here on nothing may fail the write.
        secret = bool(root.xpath("boolean(//@passwd)"))
        try:
            self._remember(conn, kind, obj, new_key, data, secret)
        except (libvirt.libvirtError, OSError) as e:
            message = e.get_error_message() if isinstance(e, libvirt.libvirtError) else e
            log.warning("the %s %s is defined, but the bytes written could not be remembered "
                        "(%s); its xml shows libvirt's text", kind.name, name, message)
        return new_key

    def _remember(self, conn: libvirt.virConnect, kind: Kind, obj: Any, key: Key,
                  data: bytes, secret: bool) -> None:
        """Keep the record of a write libvirt accepted: in the domain's metadata if it fits
        beside the definition in one RPC reply, else in the state folder.  A document
        holding a password is not remembered: xml shows libvirt's text, which leaves
        passwords out, and the bytes are kept nowhere."""
        host_id, store = self._host(conn)
        clean, _ = records.strip(kind.xml(obj))
        sealed = None
        if not secret:
            written = records.Written(records.digest(kind.normalize(clean)), data)
            key_bytes = self.state.key(create=True)
            if key_bytes is None:
                secret = True  # nothing to seal with: remember nothing
            else:
                sealed = records.seal(key_bytes, records.subject(kind.name, key), written)
        in_metadata = (kind.record_in_libvirt and sealed is not None
                       and len(clean.encode()) + _metadata_size(sealed)
                       <= xmldocs.DEFINITION_BUDGET)
        if kind.record_in_libvirt:
            obj.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                            records.element(sealed) if in_metadata else None,
                            records.PREFIX if in_metadata else None, records.NAMESPACE,
                            libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        if sealed is None or in_metadata:
            store.forget(host_id, kind.name, key)
        else:
            store.put(host_id, kind.name, key, sealed)

    def forget(self, conn: libvirt.virConnect, kind_name: str, key: Key) -> None:
        """Drop the records of an object that is gone (undefined, deleted)."""
        host_id, store = self._host(conn)
        store.forget(host_id, kind_name, key)
        if kind_name == "pool":
            store.forget_scope(host_id, "volume", key)

    def prune(self, conn: libvirt.virConnect, kind_name: str, present: list[Key],
              since: float, scope: str = "") -> None:
        """Drop the records of objects that a listing started at `since` did not show."""
        host_id, store = self._host(conn)
        store.prune(host_id, kind_name, scope, present, since)
        if kind_name == "pool":
            store.prune(host_id, "volume", "", present, since)


# libvirt's errors for an object that does not exist.
_GONE = frozenset({libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_NO_NETWORK,
                   libvirt.VIR_ERR_NO_STORAGE_POOL, libvirt.VIR_ERR_NO_STORAGE_VOL})


def _metadata_size(sealed: records.Written) -> int:
    """The bytes our element adds to libvirt's rendering of a domain."""
    return (len(records.element(sealed)) + len(records.PREFIX) * 2
            + len(records.NAMESPACE) + 64)


def _drop_records(root: etree._Element) -> None:
    """Remove elements in our namespace from a document before libvirt sees it: records
    are libvirtfs's to write (one in a document would show as the write's own bytes
    anyway, which keep it)."""
    for element in root.findall(f"metadata/{{{records.NAMESPACE}}}*"):
        metadata = element.getparent()
        metadata.remove(element)
        if len(metadata) == 0 and not (metadata.text or "").strip():
            metadata.getparent().remove(metadata)


def _keep_identity(new: etree._Element, current: etree._Element, kind: str) -> None:
    """Carry over the UUID and MAC addresses a hand-written document leaves out, so that
    rewriting a short document never yields a new identity."""
    current_uuid = current.findtext("uuid")
    new_uuid = new.find("uuid")
    if current_uuid:
        if new_uuid is None:
            element = etree.Element("uuid")
            element.text = current_uuid
            name = new.find("name")
            (name.addnext(element) if name is not None else new.insert(0, element))
        elif (new_uuid.text or "").strip().lower() != current_uuid.lower():
            raise xmldocs.invalid(f"the document's <uuid> {new_uuid.text} is not this "
                                  f"{kind}'s ({current_uuid})")
    if kind == "network" and new.find("mac") is None and current.find("mac") is not None:
        new.append(_copy(current.find("mac")))
    if kind == "domain":
        old_interfaces = current.findall("devices/interface")
        for index, interface in enumerate(new.findall("devices/interface")):
            if interface.find("mac") is None and index < len(old_interfaces):
                old_mac = old_interfaces[index].find("mac")
                if old_mac is not None:
                    interface.insert(0, _copy(old_mac))


def _keep_passwords(new: etree._Element, domain: Any) -> None:
    """`xml` never shows graphics passwords (like virsh dumpxml); a document written back
    without one keeps the password the domain has."""
    try:
        secure = xmldocs.from_libvirt(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE
                                                     | libvirt.VIR_DOMAIN_XML_SECURE))
    except libvirt.libvirtError:
        return  # a read-only connection cannot see them, so cannot lose them either
    old_graphics = secure.findall("devices/graphics")
    for index, graphics in enumerate(new.findall("devices/graphics")):
        if index >= len(old_graphics) or graphics.get("passwd") is not None:
            continue
        old = old_graphics[index]
        if old.get("type") == graphics.get("type") and old.get("passwd") is not None:
            for attribute in ("passwd", "passwdValidTo"):
                if old.get(attribute) is not None:
                    graphics.set(attribute, old.get(attribute))


def _copy(element: etree._Element) -> etree._Element:
    return copy.deepcopy(element)
