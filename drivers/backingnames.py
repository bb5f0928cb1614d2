"""The backing name a qcow2 image stores, read through libvirt (a disk's `chain`).

libvirt's domain XML gives a backing chain only as the paths it resolved; the name an
overlay stores (`base.qcow2`, relative, the seed's point) is in the image's header.  The
host may be remote, so the header is never read from a local file: it comes through
libvirt's storage API, `virStorageVolDownload` of the image's first 64 KiB over a stream,
for an image libvirt knows as a storage volume.  libvirt 9 lets a volume be downloaded
(read-only) while a running guest uses it.  Whatever stands in the way (no pool has the
image, a refused download, a header that is not qcow2) means no name, never an error: the
chain is still worth showing without it.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import struct

import libvirt
from lxml import etree

from libvirtfs.drivers import xmldocs

log = logging.getLogger(__name__)

HEADER_BYTES = 64 * 1024
QCOW2_MAGIC = b"QFI\xfb"
# The qcow2 specification: a backing file name is at most 1023 bytes.
MAX_NAME_BYTES = 1023
_HEADER = struct.Struct(">4sIQI")  # magic, version, backing_file_offset, backing_file_size


class NotQcow2(ValueError):
    """The bytes are no qcow2 header, or name a backing file where none can be."""


def backing_field(header: bytes) -> tuple[int, int]:
    """(offset, size) of the backing name a qcow2 header gives; (0, 0) when it has none."""
    if len(header) < _HEADER.size:
        raise NotQcow2(f"{len(header)} bytes are too few for a qcow2 header")
    magic, version, offset, size = _HEADER.unpack_from(header)
    if magic != QCOW2_MAGIC or version not in (2, 3):
        raise NotQcow2("not a qcow2 header (version 2 or 3)")
    if offset == 0:
        return 0, 0
    if not 0 < size <= MAX_NAME_BYTES or offset < _HEADER.size:
        raise NotQcow2(f"backing name of {size} bytes at {offset}: not a valid qcow2 header")
    return offset, size


def shown(name: bytes) -> str:
    """The stored bytes as a `chain` field: UTF-8, other bytes as \\xNN, a line break as
    \\n (one image stays one line)."""
    text = name.decode("utf-8", errors="backslashreplace")
    return text.replace("\n", "\\n").replace("\r", "\\r")


def _download(conn: libvirt.virConnect, vol: libvirt.virStorageVol, offset: int,
              length: int) -> bytes:
    """Bytes [offset, offset+length) of a volume (fewer at its end), over one stream."""
    stream = conn.newStream(0)
    try:
        vol.download(stream, offset, length, 0)
        data = bytearray()
        while True:
            chunk = stream.recv(length)
            if not isinstance(chunk, bytes) or not chunk:
                break  # the end the download was asked for (or the volume's end)
            data += chunk
        stream.finish()
    except BaseException:
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        raise
    return bytes(data[:length])


def _pool_path(pool: libvirt.virStoragePool) -> str | None:
    path = xmldocs.from_libvirt(pool.XMLDesc(0)).findtext("target/path")
    return posixpath.normpath(path) if path else None


def volume(conn: libvirt.virConnect, source: etree._Element) -> libvirt.virStorageVol | None:
    """The storage volume an image (a `<disk>` or `<backingStore>`) is, if libvirt knows it.
    A file a pool has not seen yet (made after the pool's last refresh, as a pre-created
    overlay is) is found after refreshing the one active pool whose folder holds it."""
    src = source.find("source")
    if src is None:
        return None
    if src.get("pool") and src.get("volume"):
        return conn.storagePoolLookupByName(src.get("pool")).storageVolLookupByName(
            src.get("volume"))
    path = src.get("file") or src.get("dev")
    if not path:
        return None  # a network disk: no volume of a pool
    # libvirt resolves a stored `./mid.qcow2` to `/pool/./mid.qcow2`, and finds volumes
    # only by their plain path.
    plain = posixpath.normpath(path)
    found = _by_path(conn, plain)
    if found is not None:
        return found
    folder = posixpath.dirname(plain)
    for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
        if _pool_path(pool) == folder:
            pool.refresh(0)
            return _by_path(conn, plain)
    return None


def _by_path(conn: libvirt.virConnect, path: str) -> libvirt.virStorageVol | None:
    try:
        return conn.storageVolLookupByPath(path)
    except libvirt.libvirtError as e:
        if e.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
            raise
    return None


def stored_backing(conn: libvirt.virConnect, image: etree._Element) -> str | None:
    """The backing name a qcow2 image stores, as stored; None when it stores none or when
    libvirt cannot give it (said in the debug log)."""
    try:
        vol = volume(conn, image)
        if vol is None:
            return None
        header = _download(conn, vol, 0, HEADER_BYTES)
        offset, size = backing_field(header)
        if not size:
            return None
        if offset + size <= len(header):
            name = header[offset:offset + size]
        else:
            name = _download(conn, vol, offset, size)
        if len(name) != size:
            raise NotQcow2(f"the image ends inside its backing name at {offset}")
        return shown(name)
    except (libvirt.libvirtError, NotQcow2) as e:
        log.debug("no stored backing name for %s: %s",
                  etree.tostring(image.find("source"), encoding=str).strip()
                  if image.find("source") is not None else "an image", e)
        return None
