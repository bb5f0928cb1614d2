"""What control words, rmdir and mv do to libvirt objects (blocking; worker threads)."""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence

import libvirt

from libvirtfs.drivers.definitions import KINDS, Key

Action = Callable[[libvirt.virConnect, Key], object]


def _on(kind: str, method: Callable[[object], object]) -> Action:
    return lambda conn, key: method(KINDS[kind].lookup(conn, key))


# kind -> word -> what it does; the words are nodes/words.py's CONTROL_WORDS.
ACTIONS: dict[str, dict[str, Action]] = {
    "domain": {
        "start": _on("domain", lambda dom: dom.createWithFlags(0)),
        "start-paused": _on("domain",
                            lambda dom: dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)),
        "shutdown": _on("domain", lambda dom: dom.shutdown()),
        "reboot": _on("domain", lambda dom: dom.reboot(0)),
        "reset": _on("domain", lambda dom: dom.reset(0)),
        "destroy": _on("domain", lambda dom: dom.destroy()),
        "suspend": _on("domain", lambda dom: dom.suspend()),
        "resume": _on("domain", lambda dom: dom.resume()),
        "managed-save": _on("domain", lambda dom: dom.managedSave(0)),
        # A job of this mount is aborted by drivers/jobs.py (its writer learns why); this
        # aborts another program's job.
        "abort": _on("domain", lambda dom: dom.abortJob()),
    },
    "pool": {
        "start": _on("pool", lambda pool: pool.create(0)),
        "stop": _on("pool", lambda pool: pool.destroy()),
        "refresh": _on("pool", lambda pool: pool.refresh(0)),
        "build": _on("pool", lambda pool: pool.build(0)),
    },
    "network": {
        "start": _on("network", lambda net: net.create()),
        "stop": _on("network", lambda net: net.destroy()),
    },
}

# Domain words that run as jobs (drivers/jobs.py): nodes/words.py DOMAIN_JOB_WORDS.
JOB_WORDS = frozenset({"managed-save"})

# The words of nodes/words.py's UNDEFINE_FLAGS (user.undefine-flags on domains/).
UNDEFINE_FLAGS: dict[str, int] = {
    "managed-save": libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE,
    "snapshots-metadata": libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA,
    "checkpoints-metadata": libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA,
    "nvram": libvirt.VIR_DOMAIN_UNDEFINE_NVRAM,
    "keep-nvram": libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM,
}


def _has_managed_save(dom: libvirt.virDomain) -> bool:
    try:
        return bool(dom.hasManagedSaveImage(0))
    except libvirt.libvirtError:
        return False  # a hypervisor without managed save has no image to lose


def _has_snapshots(dom: libvirt.virDomain) -> bool:
    try:
        return bool(dom.snapshotNum(0))
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
            return False  # LXC keeps no snapshots: none to lose
        raise


def remove_object(conn: libvirt.virConnect, kind: str, key: Key,
                  words: Sequence[str] = ()) -> None:
    """rmdir: undefine a domain, pool or network (refused while active), delete a volume.
    `words` (UNDEFINE_FLAGS) say what may go with a domain; nothing else goes silently."""
    obj = KINDS[kind].lookup(conn, key)
    if kind == "volume":
        obj.delete(0)
        return
    if obj.isActive():
        hint = {"domain": "echo destroy > control", "pool": "echo stop > control",
                "network": "echo stop > control"}[kind]
        raise OSError(errno.EBUSY, f"{kind} {obj.name()!r} is active; stop it first ({hint})")
    if kind == "domain":
        if _has_snapshots(obj) and "snapshots-metadata" not in words:
            raise OSError(errno.ENOTEMPTY, f"domain {obj.name()!r} has snapshots; remove "
                                           f"them first (rmdir snapshots/NAME)")
        if "managed-save" not in words and _has_managed_save(obj):
            raise OSError(errno.EBUSY, f"domain {obj.name()!r} has a managed save image, "
                                       f"which undefining would discard; start it, or "
                                       f"setfattr -n user.undefine-flags -v managed-save on "
                                       f"domains/ to discard the image with the domain")
        flags = 0
        for word in words:
            flags |= UNDEFINE_FLAGS[word]
        obj.undefineFlags(flags)
    else:
        obj.undefine()


def rename_object(conn: libvirt.virConnect, kind: str, key: Key, new_name: str) -> None:
    obj = KINDS[kind].lookup(conn, key)
    if kind != "domain":
        raise OSError(errno.EPERM, f"libvirt cannot rename a {kind}")
    if obj.isActive():
        raise OSError(errno.EBUSY, f"domain {obj.name()!r} is running; libvirt renames only "
                                   f"inactive domains")
    obj.rename(new_name, 0)
