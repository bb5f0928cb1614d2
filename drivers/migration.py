"""Live migration between hosts (blocking; worker threads).

The mount already holds a connection to every host, so a migration between two of them
uses both (`virDomain.migrate3(dconn, ...)`: this process drives libvirt's protocol, and
nothing new has to be reachable from the mounting machine).  With `p2p` the source daemon
drives it instead and must reach the destination's URI itself (`migrateToURI3`).  A
destination given as a URI that no mounted host has is connected for the one migration
(drivers/host.py, bounded by the timeout as any connection; with `p2p`, handed to the
source daemon as it is).  docs/hosts.md, "Migration".
"""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence

import libvirt

from libvirtfs.drivers import xmldocs
from libvirtfs.drivers.errors import DriverError, from_libvirt

# nodes/words.py's MIGRATE_FLAGS -> libvirt's flags.
FLAGS: dict[str, int] = {
    "live": libvirt.VIR_MIGRATE_LIVE,
    "offline": libvirt.VIR_MIGRATE_OFFLINE,
    "p2p": libvirt.VIR_MIGRATE_PEER2PEER,
    "tunnelled": libvirt.VIR_MIGRATE_TUNNELLED,
    "persist": libvirt.VIR_MIGRATE_PERSIST_DEST,
    "undefine-source": libvirt.VIR_MIGRATE_UNDEFINE_SOURCE,
    "copy-storage-all": libvirt.VIR_MIGRATE_NON_SHARED_DISK,
    "copy-storage-inc": libvirt.VIR_MIGRATE_NON_SHARED_INC,
    "compressed": libvirt.VIR_MIGRATE_COMPRESSED,
    "auto-converge": libvirt.VIR_MIGRATE_AUTO_CONVERGE,
    "postcopy": libvirt.VIR_MIGRATE_POSTCOPY,
    "unsafe": libvirt.VIR_MIGRATE_UNSAFE,
}

# nodes/words.py's MIGRATE_PARAMS -> libvirt's typed parameters (dest-xml: the file's text).
PARAMS: dict[str, str] = {
    "bandwidth": libvirt.VIR_MIGRATE_PARAM_BANDWIDTH,
    "migrate-uri": libvirt.VIR_MIGRATE_PARAM_URI,
    "listen-address": libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS,
    "dest-name": libvirt.VIR_MIGRATE_PARAM_DEST_NAME,
    "dest-xml": libvirt.VIR_MIGRATE_PARAM_DEST_XML,
}


def flags_of(words: Sequence[str]) -> int:
    flags = 0
    for word in words:
        flags |= FLAGS[word]
    return flags


def params_of(params: Mapping[str, str]) -> dict[str, object]:
    """Typed parameters; dest-xml's file is read here (in a worker thread: the path may
    even be inside this mount)."""
    typed: dict[str, object] = {}
    for name, value in params.items():
        if name == "bandwidth":
            typed[PARAMS[name]] = int(value)
        elif name == "dest-xml":
            typed[PARAMS[name]] = _read_document(value)
        else:
            typed[PARAMS[name]] = value
    return typed


def _read_document(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(xmldocs.MAX_DOCUMENT_BYTES + 1)
    except OSError as e:
        raise DriverError(e.errno or errno.EIO, f"dest-xml={path}: {e.strerror}") from None
    if len(data) > xmldocs.MAX_DOCUMENT_BYTES:
        raise DriverError(errno.EFBIG, f"dest-xml={path}: larger than "
                                       f"{xmldocs.MAX_DOCUMENT_BYTES} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise DriverError(errno.EINVAL, f"dest-xml={path}: not UTF-8 text") from None


def migrate(dom: libvirt.virDomain, dconn: libvirt.virConnect | None, dest_uri: str | None,
            words: Sequence[str], params: Mapping[str, str]) -> None:
    """Move `dom` to `dconn` (migrate3), or with p2p to `dest_uri` (migrateToURI3).  The
    destination without p2p is a connection: the caller holds it for the call."""
    flags = flags_of(words)
    typed = params_of(params)
    try:
        if flags & libvirt.VIR_MIGRATE_PEER2PEER:
            if not dest_uri:
                raise DriverError(errno.EINVAL, "p2p needs the destination's URI")
            dom.migrateToURI3(dest_uri, typed, flags)
        else:
            if dconn is None:
                raise DriverError(errno.EINVAL, "no connection to the destination")
            dom.migrate3(dconn, typed, flags)
    except libvirt.libvirtError as e:
        raise _explained(from_libvirt(e), params) from None


def _explained(error: DriverError, params: Mapping[str, str]) -> DriverError:
    """libvirt's error, as EEXIST when the name is taken at the destination (libvirt says
    only "operation failed"), and with the hint a user needs when the destination named
    itself by a host name the source cannot resolve (two daemons on one machine, say)."""
    message = error.strerror or ""
    err = error.errno or errno.EIO
    if error.libvirt_code == libvirt.VIR_ERR_OPERATION_FAILED and "already exists" in message:
        err = errno.EEXIST  # the name (or UUID) is taken at the destination
    if "migrate-uri" not in params and ("resolve address" in message
                                        or "Name or service not known" in message):
        message += ("; the destination gave its host name as the migration address: "
                    "give one the source reaches, e.g. migrate-uri=tcp://ADDRESS")
    return DriverError(err, message, error.libvirt_code)
