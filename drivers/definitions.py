"""Defining objects from documents users write, and showing definitions back to them.

One `Kind` per object type says how libvirt names, looks up, defines and renders it.  The
rules shared by all are here once: the hardened parse, the name check, keeping identity
(UUID, MAC addresses) that a short document leaves out, doing nothing when nothing
changes, and remembering the written bytes (records.py).  These functions block; they run in
the connection's worker threads.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import libvirt
from lxml import etree

from libvirtfs.drivers import records, statedir, xmldocs

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
    """Show and define objects of one connection; `store` keeps records libvirt cannot."""

    def __init__(self, store: statedir.StateDir) -> None:
        self.store = store
        self._host_ids: dict[int, str] = {}

    def _host_id(self, conn: libvirt.virConnect) -> str:
        known = self._host_ids.get(id(conn))
        if known is None:
            caps = etree.fromstring(conn.getCapabilities().encode())
            known = caps.findtext("host/uuid") or conn.getURI()
            self._host_ids[id(conn)] = known
        return known

    def _record(self, conn: libvirt.virConnect, kind: Kind, key: Key,
              text: str) -> tuple[str, records.Written | None]:
        clean, written = records.strip(text)
        if not kind.record_in_libvirt:
            written = self.store.get(self._host_id(conn), kind.name, key)
        return clean, written

    def show(self, conn: libvirt.virConnect, kind_name: str, key: Key) -> bytes:
        kind = KINDS[kind_name]
        clean, written = self._record(conn, kind, key, kind.xml(kind.lookup(conn, key)))
        return records.shown(clean, written, kind.normalize)

    def define(self, conn: libvirt.virConnect, kind_name: str, key: Key | None,
               expected_name: str | None, data: bytes, *, parent: Key | None = None) -> Key:
        """Define (or create) from `data`; returns the object's key.  `key` is None for an
        object that does not exist yet; `parent` is the pool of a new volume."""
        kind = KINDS[kind_name]
        root = xmldocs.parse(data, kind.root)
        name = xmldocs.check_name(root, expected_name, kind.name)
        current = kind.lookup(conn, key) if key is not None else None
        if current is None and kind.exists_by_name(conn, parent, name):
            raise OSError(errno.EEXIST, f"a {kind.name} named {name!r} exists already")
        if current is not None and not kind.redefinable:
            if self.show(conn, kind.name, key) == data:  # type: ignore[arg-type]
                return key  # type: ignore[return-value]
            raise OSError(errno.EEXIST, f"libvirt cannot redefine an existing {kind.name}; "
                                        f"remove it with rmdir and write it again")
        current_text = None
        if current is not None:
            current_text, written = self._record(conn, kind, key, kind.xml(current))  # type: ignore[arg-type]
            if records.shown(current_text, written, kind.normalize) == data:
                return key  # type: ignore[return-value]  # nothing to change
            _keep_identity(root, etree.fromstring(current_text.encode()), kind.name)
            if kind.name == "domain":
                _keep_passwords(root, current)
        new_text = etree.tostring(root, encoding="unicode")
        if current_text is not None and (xmldocs.canonical(new_text)
                                         == xmldocs.canonical(current_text)):
            obj = current  # libvirt's definition stays as it is
        else:
            obj = kind.define(conn, parent if current is None else key, new_text)
        new_key = kind.key(obj)
        clean, _ = records.strip(kind.xml(obj))
        written = records.Written(records.digest(kind.normalize(clean)), data)
        # A document holding a password is not remembered: xml shows libvirt's text, which
        # leaves passwords out, and the bytes are kept nowhere.
        secret = root.xpath("boolean(//@passwd)")
        if kind.record_in_libvirt:
            obj.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                            None if secret else records.element(written),
                            None if secret else records.PREFIX, records.NAMESPACE,
                            libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        elif secret:
            self.store.forget(self._host_id(conn), kind.name, new_key)
        else:
            self.store.put(self._host_id(conn), kind.name, new_key, written)
        return new_key

    def forget(self, conn: libvirt.virConnect, kind_name: str, key: Key) -> None:
        """Drop the record of an object that is gone (undefined, deleted)."""
        if not KINDS[kind_name].record_in_libvirt:
            self.store.forget(self._host_id(conn), kind_name, key)


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
        secure = etree.fromstring(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE
                                                 | libvirt.VIR_DOMAIN_XML_SECURE).encode())
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
    return etree.fromstring(etree.tostring(element))
